"""`JaxLayer`: a JAX function as a Keras layer, on every Keras backend."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras
import numpy as np

from jaxlayer import _config as C
from jaxlayer import _contract as K
from jaxlayer import _errors, _private, _record, _signature, bridges, saving
from jaxlayer import _shapes as S
from jaxlayer import _transforms as T
from jaxlayer import _variables as V
from jaxlayer._pure import PureFunction
from jaxlayer._transform_methods import TransformMethods


@keras.saving.register_keras_serializable(package="jaxlayer")
class JaxLayer(TransformMethods, keras.layers.Layer):
    """A Keras layer that runs a JAX model, on every Keras backend.

    A drop-in replacement for `keras.layers.JaxLayer`: the same arguments,
    attributes, hooks and errors, and it also runs on the TensorFlow, PyTorch
    and NumPy (inference) backends.

    `call_fn` takes arguments with these exact names, in any order:

    - `params` (optional): the trainable parameters, a pytree of arrays.
    - `state` (optional): the non-trainable state. When present, `call_fn`
      returns `(outputs, new_state)` and `init_fn` returns `(params, state)`.
    - `rng` (optional): a JAX PRNG key, fresh on every training call (None in
      inference, unless `_get_call_rng` is overridden).
    - `inputs`: the inputs, an array or a pytree of arrays.
    - `training` (optional): `True` in training, `False` in inference.

    `init_fn` takes `rng`, `inputs` (placeholder arrays of the input shapes,
    None dimensions set to 1) and optionally `training` (always `True`); it
    runs at build time unless `params` or `state` are given.

    Every array leaf of `params` and `state` becomes one Keras variable named
    by its pytree path (`layer/encoder/dense_1/kernel`); `layer.params` and
    `layer.state` are the same trees with a variable at each array leaf.
    Floating leaves of `params` are trainable; `state` takes the values
    `call_fn` returns on every call, in training and in inference (as with
    Keras's class): a function that must leave its state alone in inference
    returns it unchanged.

    Args:
        call_fn: the function computing the model's outputs.
        init_fn: the function creating the initial `params` (and `state`).
            If None, `params` and/or `state` must be given.
        params: a pytree of the model's trainable parameters. Given, it builds
            the layer at once and `init_fn` is not called.
        state: a pytree of the model's non-trainable state.
        seed: the seed of the layer's random generator (an int), which draws
            the `rng` of `call_fn` and of `init_fn`.
        native_serialization_platforms: the platforms (`"cpu"`, `"cuda"`,
            `"rocm"`, `"tpu"`) the function is compiled for when it runs inside
            a TensorFlow graph; None serves CPU and GPU.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        TypeError: `call_fn` or `init_fn` is not callable, `seed` is not an
            integer, or (at call time) an input, output or state leaf is not
            an array.
        ValueError: `call_fn`/`init_fn` takes an argument other than the
            exact names above, or lacks a required one; `call_fn` takes
            `params` or `state` but neither `init_fn` nor the tree is given;
            a tree is given that `call_fn` does not take; at build or call
            time, `init_fn` or `call_fn` returns trees of another structure,
            shape or dtype than the layer's (each message names the function,
            the argument and the pytree path).

    Examples:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> def init_fn(rng, inputs):
        ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 3))}
        >>> def call_fn(params, inputs):
        ...     return jnp.tanh(inputs @ params["w"])
        >>> layer = JaxLayer(call_fn, init_fn, seed=0, name="tiny")
        >>> layer(np.ones((2, 4), "float32")).shape
        (2, 3)
        >>> [w.path for w in layer.weights]
        ['tiny/w']
    """

    def __init__(
        self,
        call_fn: Callable,
        init_fn: Callable | None = None,
        params: Any = None,
        state: Any = None,
        seed: int | None = None,
        native_serialization_platforms: Sequence[str] | None = None,
        **kwargs,
    ):
        # Set by `from_config`: the transforms (`enable_lora`, `quantize`)
        # to replay once the weights exist, making the same variables.
        replay = T.steps_from_config(kwargs.pop("weight_transforms", None))
        super().__init__(**kwargs)
        owner = self._owner
        self._pure_fns: dict = {}
        self._set_untracked("_replay_steps", replay)
        self._set_untracked("_inherited_steps", ())
        self.call_fn = call_fn
        self.init_fn = init_fn
        self.seed = K.check_seed(seed, owner)
        self.native_serialization_platforms = (
            tuple(native_serialization_platforms)
            if native_serialization_platforms is not None
            else None
        )
        # Keras's attribute name for the same setting.
        self.jax2tf_native_serialization_platforms = self.native_serialization_platforms
        self.init_fn_arguments = (
            _signature.argument_names(
                init_fn, "init_fn", _signature.INIT_FN_ARGUMENTS, owner=owner
            )
            if init_fn is not None
            else None
        )
        if (
            init_fn is None
            and params is None
            and state is None
            and (self.call_fn_has_params or self.call_fn_has_state)
        ):
            raise ValueError(
                "`init_fn`, `params` and `state` cannot all be `None` when "
                "`call_fn` takes a `params` or a `state` argument "
                f"({owner}): give `init_fn` to initialise them at build "
                "time, or the initial `params`/`state`."
            )
        if params is not None and not self.call_fn_has_params:
            raise ValueError(
                f"{owner}: `params` were given but `call_fn` takes no "
                "`params` argument; add `params` to `call_fn`'s arguments."
            )
        if state is not None and not self.call_fn_has_state:
            raise ValueError(
                f"{owner}: `state` was given but `call_fn` takes no `state` "
                "argument, so it could never be used or updated; add `state` "
                "to `call_fn`'s arguments (and return `(outputs, new_state)`)."
            )
        self.seed_generator = (
            K.seed_generator(self.seed) if self.call_fn_has_rng else None
        )
        self._init_seed_count = 0
        # Whether `init_fn` made the weights (at build), rather than the
        # `params`/`state` given: a copy by `clone_model` is then initialised
        # by `init_fn` again, as Keras's own layers are.
        self._init_on_build = False
        self._bridge = bridges.get(keras.backend.backend())
        self._input_dtypes = None
        self._set_untracked("_export_memo", saving.ExportMemo())
        self._set_trees(None, None)
        if params is not None or state is not None:
            self._create_weights(params, state, copy=True)
            self.built = True
            self._replay()

    # -- the function and what depends on it -----------------------------

    @property
    def call_fn(self) -> Callable:
        """The function computing the model's outputs (see the class doc)."""
        return self._call_fn

    @call_fn.setter
    def call_fn(self, fn: Callable) -> None:
        names = _signature.argument_names(
            fn, "call_fn", _signature.CALL_FN_ARGUMENTS, owner=self._owner
        )
        for name, value in (
            ("_call_fn", fn),
            ("call_fn_arguments", names),
            ("call_fn_has_params", "params" in names),
            ("call_fn_has_state", "state" in names),
            ("call_fn_has_rng", "rng" in names),
        ):
            self._set_untracked(name, value)
        self._reset_pure_fns()

    @property
    def dtype_policy(self):
        return keras.layers.Layer.dtype_policy.fget(self)

    @dtype_policy.setter
    def dtype_policy(self, value):
        keras.layers.Layer.dtype_policy.fset(self, value)
        self._reset_pure_fns()

    def _reset_pure_fns(self):
        """Drops the pure functions and with them every bridge's caches."""
        if "_pure_fns" in self.__dict__:
            self._pure_fns.clear()

    # -- weights ---------------------------------------------------------

    def _set_trees(self, params_spec, state_spec):
        # Set without Keras's (and TensorFlow's) automatic tracking, which
        # would wrap the trees in containers JAX's tree functions do not know;
        # the variables themselves are tracked when they are created.
        values = {
            "_params_spec": params_spec,
            "_state_spec": state_spec,
            "params": None if params_spec is None else params_spec.tree,
            "state": None if state_spec is None else state_spec.tree,
            "tracked_params": K.variables(params_spec),
            "tracked_state": K.variables(state_spec),
        }
        for name, value in values.items():
            self._set_untracked(name, value)
        self._reset_pure_fns()

    def _set_untracked(self, name, value):
        """Sets an attribute without Keras's `__setattr__`: no tracking (it
        would wrap trees and lists in containers JAX's tree functions do not
        know), and none of its cost on the call path."""
        object.__setattr__(self, name, value)

    def _create_weights(self, params, state, *, copy):
        taken: set = set()  # one namespace for the paths of params and state
        params_spec = (
            V.create_variables(self, params, trainable=True, copy=copy, taken=taken)
            if params is not None
            else None
        )
        state_spec = (
            V.create_variables(self, state, trainable=False, copy=copy, taken=taken)
            if state is not None
            else None
        )
        self._set_trees(params_spec, state_spec)

    @property
    def _needs_init(self) -> bool:
        return (
            self._params_spec is None
            and self._state_spec is None
            and (self.call_fn_has_params or self.call_fn_has_state)
        )

    def build(self, input_shape):
        """Creates the weights with `init_fn`, unless they were given.

        `init_fn` gets placeholder inputs of `input_shape` (None dimensions
        set to 1) and an `rng` drawn from the seed; each array leaf of what
        it returns becomes a variable named by its pytree path. Keras calls
        this on the first call; it runs eagerly, also while a train step is
        being traced.

        Args:
            input_shape: the shape of the inputs, or a pytree of shapes (as
                the inputs are structured).

        Raises:
            ValueError: `init_fn` returns trees `call_fn` cannot take (a
                state where `call_fn` takes none, `params` without a
                `params` argument), or tracers (built inside a `jax.jit`).

        Examples:

            >>> import jax, numpy as np
            >>> def init_fn(rng, inputs):
            ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  init_fn, seed=1, name="lin")
            >>> layer.build((None, 5))
            >>> layer.params["w"].shape
            (5, 2)
        """
        if self._needs_init:
            # Initialised eagerly, also when Keras builds the layer while
            # TensorFlow traces a train step.
            outside = getattr(self._bridge, "outside_graph", None)
            initialize = functools.partial(self._initialize_weights, input_shape)
            if outside is not None:
                outside(initialize)
            else:
                initialize()
        self.built = True
        self._replay()

    def _initialize_weights(self, input_shape):
        # Keras may build the layer while tracing (a subclassed model's
        # symbolic build runs under `jax.eval_shape`): draw the seed and
        # initialise eagerly.
        with jax.ensure_compile_time_eval():
            rng = self._get_init_rng()
            params, state = self._init_trees(input_shape, rng)
        for root, tree in (("params", params), ("state", state)):
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                if _private.is_tracer(leaf):
                    raise ValueError(
                        f"{self._owner} cannot be built in a tracing scope "
                        f"(`init_fn` returned a tracer at "
                        f"{V.keystr(path, root)}); call the layer once "
                        "outside `jax.jit`, or give `params`/`state`."
                    )
        self._create_weights(params, state, copy=False)
        self._init_on_build = True

    def _init_trees(self, input_shape, rng, abstract=False):
        """`(params, state)` from `init_fn` for inputs of `input_shape`.

        With `abstract`, `init_fn` runs under `jax.eval_shape` and the trees
        hold `jax.ShapeDtypeStruct`s (nothing is computed or drawn).
        """
        shapes, shapes_def = S.flatten_shapes(input_shape)
        return K.init_trees(
            self._owner,
            self.init_fn,
            self.init_fn_arguments,
            (self.call_fn_has_params, self.call_fn_has_state),
            (shapes, shapes_def, self._input_dtypes),
            rng,
            abstract,
        )

    @property
    def _owner(self):
        return _errors.owner(self)

    # -- rng hooks (the same as keras.layers.JaxLayer's) -----------------

    def _get_init_seed(self):
        """Returns one seed, a backend tensor of shape [2], for `init_fn`.

        Drawn from `seed` when the layer has one (so that initialisation is
        reproducible), otherwise from Keras's global seed generator (which
        `keras.utils.set_random_seed` makes deterministic).
        """
        if self.seed is None:
            return keras.random.randint((2,), 0, 2**31 - 1, dtype="int32")
        count = self._init_seed_count
        self._init_seed_count = count + 1
        words = np.array(
            [self.seed % 2**32, (self.seed // 2**32 + 2**20 + count) % 2**32],
            dtype=np.uint32,
        )
        return keras.ops.convert_to_tensor(words.view(np.int32))

    def _get_init_rng(self):
        """Returns the `rng` passed to `init_fn`; override for a structure."""
        return self._get_init_seed()

    def _get_call_seed(self):
        """Returns one fresh seed, a backend tensor of shape [2]."""
        if self.seed_generator is None:
            raise ValueError(
                f"{self._owner}: `call_fn` takes no `rng` argument, so the "
                "layer has no seed generator."
            )
        return self.seed_generator.next()

    def _get_call_rng(self, training):
        """Returns the `rng` passed to `call_fn`: a fresh seed in training,
        None in inference. Override to pass a structure or seeds in inference.
        """
        if training:
            return self._get_call_seed()
        return None

    # -- call ------------------------------------------------------------

    # Until the layer has recorded the input structure of its first call
    # (what `.keras` saving exports) and one call of known shapes, its calls
    # go through `_watched_call`; then this is one attribute check.
    _saving_watch = True
    _input_record = None

    def __call__(self, *args, **kwargs):
        bridge = self._bridge
        tracing = getattr(bridge, "tracing", None)
        if tracing is not None:
            if tracing():
                # torch.compile / torch.export: the bridge's `layer_call`
                # takes the call; the input record comes from an eager or
                # symbolic call.
                return super().__call__(*args, **kwargs)
            # A call made eagerly, where torch's compiler may still be
            # watching (a frame it gave up on): what runs JAX must never be
            # traced by it, so the bridge runs the eager call out of its
            # sight.
            return bridge.untraced(self._eager_call, args, kwargs)
        return self._eager_call(args, kwargs)

    def _eager_call(self, args, kwargs):
        """`__call__` outside any torch trace: Keras's, watched for saving."""
        if not self.built:
            inputs = args[0] if args else kwargs.get("inputs")
            self._input_dtypes = [
                self._placeholder_dtype(x) for x in jax.tree_util.tree_leaves(inputs)
            ]
        if self._saving_watch:
            return self._watched_call(args, kwargs)
        return super().__call__(*args, **kwargs)

    def _watched_call(self, args, kwargs):
        """Keras's `__call__`, recording the input structure on the way.

        While the layer still watches its calls: until it has recorded the
        input structure and one call of known shapes, and while its
        computation, rebuilt from a file, waits for its artifacts (then a
        call on `KerasTensor`s, Keras rebuilding the model, is answered with
        the saved output shapes).
        """
        inputs = args[0] if args else kwargs.get("inputs")
        record, symbolic = _record.observe(
            self._input_record, inputs, self._placeholder_dtype
        )
        if record is not self._input_record:
            self._set_untracked("_input_record", record)
        fn = self.call_fn
        pending = saving.pending(fn)
        if not pending and record is not None and record.called is not None:
            self._set_untracked("_saving_watch", False)
        if pending and symbolic:
            with fn.symbolic():
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _placeholder_dtype(self, x):
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            return "float32"
        dtype = keras.backend.standardize_dtype(dtype)
        if V.is_float(dtype) and self.autocast:
            return self.compute_dtype
        return dtype

    def call(self, inputs, training=False):
        """Runs `call_fn` on the inputs, through the backend's bridge.

        Gradients flow to the trainable `params` and the floating inputs;
        when `call_fn` takes `state`, the state it returns is stored in the
        state variables (in training and in inference). The `rng` is drawn
        by `_get_call_rng`.

        Args:
            inputs: an array or tensor, or a pytree of them.
            training: passed to `call_fn` when it takes `training`.

        Returns:
            The outputs of `call_fn`: an array or tensor of the backend, or a
            pytree of them.

        Raises:
            TypeError: an input leaf, an output or a returned state leaf is
                not an array.
            ValueError: the state `call_fn` returns differs in structure,
                shape or dtype from the layer's state (the path is named).
        """
        # The hot path: one flatten of the inputs, cached functions. A bridge
        # may take a call over (`layer_call`, see `jaxlayer.bridges`): the
        # torch one does while torch.compile or torch.export traces.
        bridge = self._bridge
        hook = getattr(bridge, "layer_call", None)
        if hook is not None:
            result = hook(self, inputs, training)
            if result is not NotImplemented:
                return result
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        for leaf in in_leaves:
            if isinstance(leaf, K.NOT_TENSORS) or not hasattr(leaf, "shape"):
                self._raise_bad_input(inputs)
        rng_leaves, rng_def = self._call_rng(training)
        params, state, cast = self._call_values(getattr(bridge, "casts_params", 0))
        fn = self._pure_fns.get((training, in_def, rng_def))
        if fn is None:
            example = [self._param_struct(v) for v in K.variables(self._params_spec)]
            fn = self._pure_fn(
                training, in_def, rng_def, (example, in_leaves, state, rng_leaves)
            )
        if cast is None:
            outputs, new_state = bridge(fn, params, in_leaves, state, rng_leaves)
        else:
            outputs, new_state = bridge(
                fn, params, in_leaves, state, rng_leaves, cast=cast
            )
        self._assign_state(new_state)
        return jax.tree_util.tree_unflatten(fn.out_treedef, outputs)

    def _call_values(self, casts):
        """`(params, state, cast)`: the values of a call's variables (backend
        tensors) and the dtype the bridge casts `params` to, or None.

        `casts`: whether the bridge takes the stored parameters and `cast=`
        (`run.casts_params`); with mixed precision it then casts them inside
        JAX, so its views of the stored values serve every call. The torch
        bridge's `layer_call` takes its values here too.
        """
        spec = self._params_spec
        params = cast = None
        if spec is not None and self.autocast and casts:
            dtype = self.compute_dtype
            if dtype != self.variable_dtype:
                params = V.values_of(spec, stored=True)
                cast = None if params is None else dtype
        if params is None:
            params = V.values_of(spec)
        return params, V.values_of(self._state_spec), cast

    def _assign_state(self, new_state):
        """Stores the state `call_fn` returned (backend tensors, in variable
        order): in training and in inference (as Keras does); a function
        that must leave it alone returns it unchanged."""
        if self._state_spec is not None:
            for variable, value in zip(
                self._state_spec.variables, new_state, strict=True
            ):
                variable.assign(value)

    def _raise_bad_input(self, inputs):
        for path, leaf in jax.tree_util.tree_flatten_with_path(inputs)[0]:
            if isinstance(leaf, K.NOT_TENSORS) or not hasattr(leaf, "shape"):
                raise TypeError(
                    f"{self._owner}: every leaf of `inputs` must be an array "
                    f"or tensor; {V.keystr(path, 'inputs')} is "
                    f"{K.describe(leaf)}."
                )

    def _call_rng(self, training):
        if not self.call_fn_has_rng:
            return [], K.NONE_TREEDEF
        leaves, treedef = jax.tree_util.tree_flatten(self._get_call_rng(training))
        # Seeds go to JAX as int32 (uint32 on the jax backend); typed keys
        # pass as they are.
        return [
            leaf if K.seed_dtype_ok(leaf.dtype) else keras.ops.cast(leaf, "int32")
            for leaf in leaves
        ], treedef

    def _pure_fn(self, training, in_def, rng_def, example):
        """The pure function for this call structure, made on first use.

        Args:
            training: the training flag.
            in_def: the structure of the inputs.
            rng_def: the structure of the `rng` argument.
            example: `(params, inputs, state, rng)`, lists of tensors (or
                anything with `shape` and `dtype`) of the first call, from
                which the output structure is computed with `jax.eval_shape`.
        """
        key = (training, in_def, rng_def)
        fn = self._pure_fns.get(key)
        if fn is not None:
            return fn
        tree_fn = self._tree_fn(training, in_def, rng_def)
        out_def, _ = S.eval_outputs(
            self._owner, tree_fn, *example, called=self._called_shapes(in_def)
        )
        owner = self._owner

        def flat(params, inputs, state, rng):
            result, new_state = tree_fn(params, inputs, state, rng)
            return K.output_leaves(owner, result), new_state

        fn = self._pure_fns[key] = PureFunction(
            flat,
            owner=owner,
            platforms=self.native_serialization_platforms,
            training=training,
            in_treedef=in_def,
            rng_treedef=rng_def,
            out_treedef=out_def,
            trainable=self._params_trainable,
            input_shapes=functools.partial(self._input_shapes, in_def),
            called_shapes=functools.partial(self._called_shapes, in_def),
        )
        return fn

    def _params_trainable(self):
        return tuple(v.trainable for v in K.variables(self._params_spec))

    def _input_shapes(self, in_def):
        record = self._input_record
        if record is None or record.treedef != in_def:
            return None
        return _record.input_template(record)

    def _called_shapes(self, in_def):
        record = self._input_record
        if record is None or record.treedef != in_def or record.called is None:
            return None
        return [tuple(s) for s in record.called]

    def _tree_fn(self, training, in_def, rng_def, abstract_defs=None):
        """`call_fn` on flat lists: `(outputs tree, new state leaves)`.

        `abstract_defs`, the `(params, state)` tree structures of a layer not
        built yet, rebuild the trees from `jax.ShapeDtypeStruct` leaves (for
        output shapes only: the returned state is not checked).
        """
        return K.tree_fn(
            self._owner,
            self.call_fn,
            self.call_fn_arguments,
            (self._params_spec, self._state_spec),
            (training, in_def, rng_def),
            abstract_defs,
        )

    def _abstract_trees(self, input_shape):
        """`(params, state, defs)`: the shapes and dtypes a call receives.

        From the variables once built (`defs` is None); before that, from
        `init_fn` run abstractly (`jax.eval_shape`: no variable is made, no
        seed drawn), with `defs` the structures of the trees it returns.
        """
        if not self._needs_init:
            params = [self._param_struct(v) for v in K.variables(self._params_spec)]
            state = [S.struct(v.shape, v.dtype) for v in K.variables(self._state_spec)]
            return params, state, None
        params, state = self._init_trees(
            input_shape, self._dry_init_rng(), abstract=True
        )
        params, params_def = jax.tree_util.tree_flatten(params)
        state, state_def = jax.tree_util.tree_flatten(state)
        params = [self._param_struct(x) for x in params]
        state = [S.struct(x.shape, x.dtype) for x in state]
        return params, state, (params_def, state_def)

    def _param_struct(self, x):
        """The shape and dtype of a parameter as `call_fn` receives it."""
        dtype = keras.backend.standardize_dtype(x.dtype)
        if V.is_float(dtype):
            dtype = self.compute_dtype if self.autocast else self.variable_dtype
        return S.struct(x.shape, dtype)

    def _dry_init_rng(self):
        """`_get_init_rng()` drawn without changing any generator's state."""
        count = self._init_seed_count
        try:
            with keras.StatelessScope():
                return self._get_init_rng()
        finally:
            self._init_seed_count = count

    def compute_output_spec(self, inputs, training=False):
        """The outputs' shapes and dtypes, from `jax.eval_shape` of `call_fn`.

        Nothing is computed and no variable is made: on an unbuilt layer,
        `init_fn` runs abstractly too.

        Args:
            inputs: a `keras.KerasTensor` (or anything with `shape` and
                `dtype`), or a pytree of them.
            training: the training flag to evaluate `call_fn` with.

        Returns:
            A `keras.KerasTensor`, or a pytree of them as `call_fn` returns.

        Examples:

            >>> import keras, numpy as np
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  params={"w": np.ones((4, 2), "float32")})
            >>> layer.compute_output_spec(keras.KerasTensor((None, 4))).shape
            (None, 2)
        """
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        with keras.StatelessScope():
            rng_leaves, rng_def = self._call_rng(training)
        rng = [S.struct(k.shape, k.dtype) for k in rng_leaves]
        shapes = [tuple(x.shape) for x in in_leaves]
        if not self.built and self._needs_init:
            # Not built yet (`compute_output_shape` before any call): the
            # shapes of the weights come from `init_fn`, run abstractly.
            params, state, defs = self._abstract_trees(
                jax.tree_util.tree_unflatten(in_def, shapes)
            )
            out_def, out = S.eval_outputs(
                self._owner,
                self._tree_fn(training, in_def, rng_def, defs),
                params,
                in_leaves,
                state,
                rng,
            )
        else:
            params, state, _ = self._abstract_trees(None)
            fn = self._pure_fn(
                training, in_def, rng_def, (params, in_leaves, state, rng)
            )
            out_def = fn.out_treedef
            _, out = S.eval_outputs(
                self._owner,
                lambda p, x, s, r: (fn(p, x, s, r)[0], []),
                params,
                in_leaves,
                state,
                rng,
            )
        return jax.tree_util.tree_unflatten(
            out_def, [keras.KerasTensor(shape, dtype=dtype) for shape, dtype in out]
        )

    def compute_output_shape(self, input_shape):
        """The outputs' shapes, from `jax.eval_shape` of `call_fn`.

        Works before the layer is built (`init_fn` runs abstractly). The
        input dtypes are those of the layer's first call when known; else
        the compute dtype is tried, then int32 (an embedding lookup).

        Args:
            input_shape: a shape tuple (None where unknown), or a pytree of
                them.

        Returns:
            A shape tuple, or a pytree of them as `call_fn` returns.

        Raises:
            ValueError: `call_fn` (or `init_fn`) fails on inputs of these
                shapes; its own error, naming the layer.

        Examples:

            >>> import jax
            >>> def init_fn(rng, inputs):
            ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 3))}
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  init_fn, seed=0)
            >>> layer.compute_output_shape((None, 8))
            (None, 3)
        """
        shapes, shapes_def = S.flatten_shapes(input_shape)
        dtypes = self._input_dtypes
        candidates = (
            [dtypes]
            if dtypes is not None and len(dtypes) == len(shapes)
            else [[self.compute_dtype] * len(shapes), ["int32"] * len(shapes)]
        )
        # Without known input dtypes, floating inputs are tried first, then
        # integer ones (an embedding lookup takes integer indices).
        for i, dtypes in enumerate(candidates):
            inputs = jax.tree_util.tree_unflatten(
                shapes_def,
                [
                    keras.KerasTensor(shape, dtype=dtype)
                    for shape, dtype in zip(shapes, dtypes, strict=True)
                ],
            )
            try:
                spec = self.compute_output_spec(inputs)
            except Exception:
                if i + 1 == len(candidates):
                    raise
                continue
            return jax.tree_util.tree_map(lambda t: tuple(t.shape), spec)

    # -- saving ----------------------------------------------------------

    def get_config(self):
        """The layer's config; saving also exports its computation.

        Besides the functions (by registered name), the seed and the
        platforms, the config describes the `params` and `state` trees and
        holds the manifest of the computation exported with `jax.export`,
        whose artifacts `save_assets` writes next to it in a `.keras` file
        (see `jaxlayer.saving`).

        Returns:
            A JSON-serializable dict.

        Raises:
            ValueError: a `params`/`state` tree the config cannot describe (a
                custom pytree node), when the computation could not be
                exported and no `init_fn` can rebuild the tree.
        """
        config = super().get_config()
        config["name"] = C.LayerName.of(self)
        artifacts, why = saving.artifacts_for_save(self._export_source())
        fn = self.call_fn
        rebuilt = isinstance(fn, saving.ExportedCall)
        trees = self._tree_configs()
        for err in trees.pop("undescribable").values():
            if artifacts is None and self.init_fn is None:
                raise _errors.CannotSave(
                    f"{self._owner} cannot be saved in a `.keras` file: "
                    f"`{err.path}` is {err.what}, and its computation "
                    f"could not be exported ({why}). Use dicts, lists, "
                    "tuples or NamedTuples for `params`/`state`, or give "
                    "the layer an `init_fn` (which rebuilds the tree when "
                    "loading); or save the weights only with "
                    "`save_weights`."
                )
        config.update(
            {
                "call_fn": fn.fn_config if rebuilt else C.serialize_fn(fn),
                "init_fn": fn.init_config if rebuilt else C.serialize_fn(self.init_fn),
                "seed": self.seed,
                "native_serialization_platforms": (
                    list(self.native_serialization_platforms)
                    if self.native_serialization_platforms is not None
                    else None
                ),
                "params_spec": trees["params"],
                "state_spec": trees["state"],
                "init_on_build": self._init_on_build,
                "exported": artifacts.manifest if artifacts is not None else None,
            }
        )
        steps = self._weight_steps()
        if steps:
            config["weight_transforms"] = [step.to_config() for step in steps]
        return config

    def _export_source(self) -> saving.ExportSource:
        """What exporting takes from the layer (`saving.ExportSource`)."""
        return saving.ExportSource(
            owner=self._owner,
            layer_class=type(self).__name__,
            call_fn=self.call_fn,
            call_fn_arguments=tuple(self.call_fn_arguments),
            built=self.built,
            record=self._input_record,
            trees=(T.export_view(self._params_spec), self._state_spec),
            dtype_policy=self.dtype_policy.name,
            native_serialization_platforms=self.native_serialization_platforms,
            trainable=frozenset(id(v) for v in self.trainable_variables),
            abstract_trees=functools.partial(self._abstract_trees, None),
            call_rng=self._call_rng,
            pure_fn=self._pure_fn,
            compute_output_spec=self.compute_output_spec,
            memo=self._export_memo,
        )

    def _tree_configs(self) -> dict:
        """The config's descriptions of the `params` and `state` trees.

        A tree of a type a config cannot describe (a custom pytree node) is
        described as `FLAT` (kept by variable name); its error is under
        `"undescribable"`.
        """
        trees: dict = {"undescribable": {}}
        for root, spec in (
            ("params", T.described(self._params_spec)),
            ("state", self._state_spec),
        ):
            try:
                trees[root] = V.spec_to_config(spec, root)
            except V.UndescribableTree as err:
                trees["undescribable"][root] = err
                trees[root] = dict(V.FLAT)
        return trees

    @classmethod
    def from_config(cls, config):
        """Rebuilds the layer from `get_config`'s dict.

        With its Python functions where Keras can locate them (registered
        with `keras.saving.register_keras_serializable`, or passed in
        `custom_objects`); otherwise from the computation exported in the
        `.keras` file (read by `load_assets`), with one warning line.

        Args:
            config: the dict `get_config` returned.

        Returns:
            The layer, unbuilt or built from placeholders that the weights
            file then fills.

        Raises:
            ValueError: `call_fn` (or a needed `init_fn`) cannot be located
                and the config holds no exported computation (a file of
                jaxlayer 0.1.0); the message says where the function was
                defined and how to register it.
        """
        config = dict(config)
        source = C.LayerName.source(config, cls)
        if source is not None and saving.rebuilt(source):
            return saving.copy_of_rebuilt(cls, config, source)
        owner = _errors.named(cls, config.get("name"))
        exported = config.get("exported")
        call_fn, reason = C.locate_fn(config.get("call_fn"))
        init_fn, init_reason = C.locate_fn(config.get("init_fn"))
        values = None
        if source is not None:
            # A copy of a live layer, made from its config object: its very
            # functions (where the config still names them), and, for
            # weights that were given rather than made by `init_fn`, their
            # current values (a config holds none).
            if config.get("call_fn") == C.serialize_fn(source.call_fn):
                call_fn = source.call_fn
            if config.get("init_fn") == C.serialize_fn(source.init_fn):
                init_fn = source.init_fn
            # (`source` is a layer of this very class.)
            values = source._given_values(config)
        flat = any(
            isinstance(config.get(k), dict) and config[k].get("flat")
            for k in ("params_spec", "state_spec")
        )
        if call_fn is not None and (
            init_fn is not None or not flat or values is not None
        ):
            config.pop("exported", None)
            params, state = C.pop_saved_trees(
                config, source is not None and init_fn is not None
            )
            if values is not None:
                params, state = values
            if params is None and state is None and config.get("init_fn"):
                if init_fn is None:
                    raise ValueError(
                        f"{owner}: cannot load `init_fn`: {init_reason}, and "
                        "the file describes no `params`/`state` to rebuild "
                        f"the layer without it. {C.fix(config['init_fn'])}"
                    )
            config["call_fn"] = call_fn
            config["init_fn"] = init_fn
            if config.get("params") is None and config.get("state") is None:
                config["params"], config["state"] = params, state
            return cls(**config)
        if exported:
            if call_fn is not None:
                reason = (
                    "its `params`/`state` tree is of a type the file does not "
                    "describe, and it has no `init_fn` to rebuild it"
                )
            if not C.is_lambda(config.get("call_fn")) or call_fn is not None:
                saving.warn_rebuilt(owner, reason)
            return saving.from_artifacts(cls, config)
        raise ValueError(
            f"{owner}: cannot load `call_fn`: {reason}, and the file holds no "
            "exported computation to run instead (it was saved by jaxlayer "
            f"0.1, or its computation could not be exported). "
            f"{C.fix(config.get('call_fn'))}"
        )

    def _given_values(self, config) -> tuple | None:
        """Copies of this layer's `(params, state)` for a layer made from `config`.

        Only for weights that were given (not made by `init_fn`) and that the
        config describes as this layer has them; None otherwise.
        """
        if config.get("init_on_build") or not self.built:
            return None
        if self._params_spec is None and self._state_spec is None:
            return None
        trees = self._tree_configs()
        if (trees["params"], trees["state"]) != (
            config.get("params_spec"),
            config.get("state_spec"),
        ):
            return None
        return self._effective_params(), V.numpy_tree(self.state)

    def save_assets(self, dir_path: str) -> None:
        """Writes the exported computation to the layer's asset folder.

        Called by Keras when saving a `.keras` file, after `get_config` (which
        made the artifacts and put their manifest in the config).
        """
        saving.save_assets(self.call_fn, self._export_memo, dir_path)

    def load_assets(self, dir_path: str | None) -> None:
        """Reads and checks the exported computation of a layer rebuilt
        without its Python code (does nothing for a layer that has it)."""
        if saving.load_assets(self.call_fn, dir_path):
            self._reset_pure_fns()

    @classmethod
    def _from_exported(cls, call_fn, params, state, record, config):
        """The hook `saving` rebuilds a layer of this class through: a layer
        running `call_fn` (a `saving.ExportedCall`), its weights the
        placeholders (or values) `params` and `state`, having seen the
        inputs of `record`; `config` holds the base layer's arguments.

        Made with `JaxLayer.__init__` whatever the class: an adapter's own
        `__init__` takes a module, which a rebuilt layer has not. Adapters
        extend this to set what their `__init__` would have.
        """
        config = dict(config)
        steps = T.steps_from_config(config.pop("weight_transforms", None))
        layer = cls.__new__(cls)
        JaxLayer.__init__(layer, call_fn=call_fn, params=params, state=state, **config)
        if steps:
            # The saved computation applies the transforms itself: the layer
            # holds the stored variables, trainable as they were saved.
            layer._inherit_steps(steps, call_fn.manifest)
        layer._set_untracked("_input_record", record)
        # (Watched until the artifacts are read: see `_watched_call`.)
        layer._set_untracked("_saving_watch", True)
        return layer
