"""`JaxLayer`: a JAX function as a Keras layer, on every Keras backend."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras

from jaxlayer import _contract as K
from jaxlayer import _errors, _record, _signature, bridges, saving
from jaxlayer import _shapes as S
from jaxlayer import _transforms as T
from jaxlayer import _variables as V
from jaxlayer._computation import Computation
from jaxlayer._layer_saving import SavingMethods
from jaxlayer._layer_shapes import ShapeMethods
from jaxlayer._rng_hooks import RngHooks
from jaxlayer._transform_methods import TransformMethods


@keras.saving.register_keras_serializable(package="jaxlayer")
class JaxLayer(
    RngHooks, ShapeMethods, SavingMethods, TransformMethods, keras.layers.Layer
):
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
        platforms = (
            tuple(native_serialization_platforms)
            if native_serialization_platforms is not None
            else None
        )
        # The function and all that is derived from it (`_computation`):
        # told of every change below, handed to the bridges and to saving.
        computation = Computation(
            owner, platforms, rng=self._get_call_rng, eager_call=self.call
        )
        self._set_untracked("_computation", computation)
        self._set_untracked("_pure_fns", computation.cache)
        self._set_dtypes()
        self._set_untracked("_replay_steps", replay)
        self._set_untracked("_inherited_steps", ())
        self.call_fn = call_fn
        self.init_fn = init_fn
        self.seed = K.check_seed(seed, owner)
        self.native_serialization_platforms = platforms
        # Keras's attribute name for the same setting.
        self.jax2tf_native_serialization_platforms = self.native_serialization_platforms
        self.init_fn_arguments = (
            _signature.argument_names(
                init_fn, "init_fn", _signature.INIT_FN_ARGUMENTS, owner=owner
            )
            if init_fn is not None
            else None
        )
        K.check_given(
            owner,
            init_fn,
            params,
            state,
            (self.call_fn_has_params, self.call_fn_has_state),
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
        self._computation.set_fn(fn, names)

    @property
    def dtype_policy(self):
        return keras.layers.Layer.dtype_policy.fget(self)

    @dtype_policy.setter
    def dtype_policy(self, value):
        keras.layers.Layer.dtype_policy.fset(self, value)
        self._set_dtypes()

    @property
    def autocast(self) -> bool:
        """Whether floating parameters reach `call_fn` in the compute dtype."""
        return self.__dict__.get("_autocast", True)

    @autocast.setter
    def autocast(self, value: bool) -> None:
        self._set_untracked("_autocast", value)
        self._set_dtypes()

    def _set_dtypes(self):
        # (Keras sets the policy and `autocast` before `__init__` makes the
        # computation, which then takes them.)
        if "_computation" in self.__dict__:
            self._computation.set_dtypes(
                self.autocast, self.compute_dtype, self.variable_dtype
            )

    def _reset_pure_fns(self):
        """Drops the pure functions and with them every bridge's caches."""
        if "_computation" in self.__dict__:
            self._computation.clear()

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
        self._computation.set_trees(params_spec, state_spec)

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
        K.check_not_traced(self._owner, params, state)
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

    # -- call ------------------------------------------------------------

    # Until the layer has recorded the input structure of its first call
    # (what `.keras` saving exports) and one call of known shapes, its calls
    # go through `_watched_call`; then this is one attribute check.
    _saving_watch = True

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
        computation = self._computation
        record, symbolic = _record.observe(
            computation.record, inputs, self._placeholder_dtype
        )
        if record is not computation.record:
            computation.set_record(record)
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
            result = hook(self._computation, inputs, training)
            if result is not NotImplemented:
                return result
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        for leaf in in_leaves:
            if isinstance(leaf, K.NOT_TENSORS) or not hasattr(leaf, "shape"):
                raise K.bad_input(self._owner, inputs)
        rng_leaves, rng_def = self._call_rng(training)
        computation = self._computation
        params, state, cast = computation.values(getattr(bridge, "casts_params", 0))
        fn = self._pure_fns.get((training, in_def, rng_def))
        if fn is None:
            example = computation.variable_structs()[0]
            fn = computation.get(
                training, in_def, rng_def, (example, in_leaves, state, rng_leaves)
            )
        if cast is None:
            outputs, new_state = bridge(fn, params, in_leaves, state, rng_leaves)
        else:
            outputs, new_state = bridge(
                fn, params, in_leaves, state, rng_leaves, cast=cast
            )
        computation.assign_state(new_state)
        return jax.tree_util.tree_unflatten(fn.out_treedef, outputs)

    # -- saving: the class hook (the rest is `_layer_saving`; shape
    # inference is `_layer_shapes`, the rng hooks `_rng_hooks`) ----------

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
        # (`layer`, made here, is set up by its own class's code: the private
        # names below are this class's.)
        layer = cls.__new__(cls)
        JaxLayer.__init__(layer, call_fn=call_fn, params=params, state=state, **config)
        if steps:
            # The saved computation applies the transforms itself: the layer
            # holds the stored variables, trainable as they were saved.
            layer._inherit_steps(steps, call_fn.manifest)
        layer._computation.set_record(record)
        # (Watched until the artifacts are read: see `_watched_call`.)
        layer._set_untracked("_saving_watch", True)
        return layer
