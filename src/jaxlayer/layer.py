"""`JaxLayer`: a JAX function as a Keras layer, on every Keras backend."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras.src.random.seed_generator import draw_seed

from jaxlayer import _signature, bridges
from jaxlayer import _variables as V


@keras.saving.register_keras_serializable(package="jaxlayer")
class JaxLayer(keras.layers.Layer):
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
    Floating leaves of `params` are trainable; `state` is updated with the
    values `call_fn` returns in training and left untouched in inference.

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

    Example:

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
        super().__init__(**kwargs)
        owner = f"{type(self).__name__} '{self.name}'"
        self.call_fn = call_fn
        self.init_fn = init_fn
        self.seed = seed
        self.native_serialization_platforms = (
            tuple(native_serialization_platforms)
            if native_serialization_platforms is not None
            else None
        )
        # Keras's attribute name for the same setting.
        self.jax2tf_native_serialization_platforms = self.native_serialization_platforms
        self.call_fn_arguments = _signature.argument_names(
            call_fn, "call_fn", _signature.CALL_FN_ARGUMENTS, owner=owner
        )
        self.init_fn_arguments = (
            _signature.argument_names(
                init_fn, "init_fn", _signature.INIT_FN_ARGUMENTS, owner=owner
            )
            if init_fn is not None
            else None
        )
        self.call_fn_has_params = "params" in self.call_fn_arguments
        self.call_fn_has_state = "state" in self.call_fn_arguments
        self.call_fn_has_rng = "rng" in self.call_fn_arguments
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
            keras.random.SeedGenerator(seed) if self.call_fn_has_rng else None
        )
        self._init_seed_counter = itertools.count()
        self._bridge = bridges.get(keras.backend.backend())
        self._pure_fns: dict = {}
        self._input_dtypes = None
        self._set_trees(None, None)
        if params is not None or state is not None:
            self._create_weights(params, state, copy=True)
            self.built = True

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
            "tracked_params": _variables(params_spec),
            "tracked_state": _variables(state_spec),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _create_weights(self, params, state, *, copy):
        params_spec = (
            V.create_variables(self, params, trainable=True, copy=copy)
            if params is not None
            else None
        )
        state_spec = (
            V.create_variables(self, state, trainable=False, copy=copy)
            if state is not None
            else None
        )
        self._set_trees(params_spec, state_spec)

    def build(self, input_shape):
        """Creates the weights with `init_fn`, unless they were given."""
        if (
            self._params_spec is None
            and self._state_spec is None
            and (self.call_fn_has_params or self.call_fn_has_state)
        ):
            # Initialised eagerly, also when Keras builds the layer while
            # TensorFlow traces a train step.
            _outside_graph(lambda: self._initialize_weights(input_shape))
        self.built = True

    def _initialize_weights(self, input_shape):
        dtypes = self._input_dtypes

        def placeholder(shape, dtype):
            shape = tuple(1 if d is None else int(d) for d in shape)
            return jnp.ones(shape, jax.dtypes.canonicalize_dtype(dtype))

        shapes, shapes_def = _flatten_shapes(input_shape)
        if dtypes is None or len(dtypes) != len(shapes):
            dtypes = ["float32"] * len(shapes)
        # Keras may build the layer while tracing (a subclassed model's
        # symbolic build runs under `jax.eval_shape`): initialise eagerly.
        with jax.ensure_compile_time_eval():
            inputs = jax.tree_util.tree_unflatten(
                shapes_def,
                [placeholder(s, d) for s, d in zip(shapes, dtypes, strict=True)],
            )
            args = []
            for name in self.init_fn_arguments:
                if name == "rng":
                    args.append(_to_jax_keys(self._get_init_rng()))
                elif name == "inputs":
                    args.append(inputs)
                else:
                    args.append(True)
            result = self.init_fn(*args)
        if self.call_fn_has_state:
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise ValueError(
                    f"{self._owner}: `init_fn` must return a tuple "
                    "`(params, state)` because `call_fn` takes a `state` "
                    f"argument; it returned {_describe(result)}."
                )
            params, state = result
        else:
            params, state = result, None
        for root, tree in (("params", params), ("state", state)):
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                if isinstance(leaf, jax.core.Tracer):
                    raise ValueError(
                        f"{self._owner} cannot be built in a tracing scope "
                        f"(`init_fn` returned a tracer at "
                        f"{V.keystr(path, root)}); call the layer once "
                        "outside `jax.jit`, or give `params`/`state`."
                    )
        if not self.call_fn_has_params:
            leaves = jax.tree_util.tree_flatten_with_path(params)[0]
            if leaves:
                raise ValueError(
                    f"{self._owner}: `init_fn` returned params (at "
                    f"{V.keystr(leaves[0][0], 'params')}) but `call_fn` takes "
                    "no `params` argument, so they could never be used; add "
                    "`params` to `call_fn`'s arguments or return empty params."
                )
            params = None
        self._create_weights(params, state, copy=False)

    @property
    def _owner(self):
        return f"{type(self).__name__} '{self.name}'"

    # -- rng hooks (the same as keras.layers.JaxLayer's) -----------------

    def _get_init_seed(self):
        """Returns one seed, a backend tensor of shape [2], for `init_fn`.

        Drawn from `seed` when the layer has one (so that initialisation is
        reproducible), otherwise from Keras's global seed generator (which
        `keras.utils.set_random_seed` makes deterministic).
        """
        if self.seed is None:
            return draw_seed(None)
        count = next(self._init_seed_counter)
        return keras.ops.convert_to_tensor(
            [int(self.seed), 2**20 + count], dtype="int32"
        )

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

    def __call__(self, *args, **kwargs):
        if not self.built:
            inputs = args[0] if args else kwargs.get("inputs")
            self._input_dtypes = [
                self._placeholder_dtype(x) for x in jax.tree_util.tree_leaves(inputs)
            ]
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
        # The hot path: one flatten of the inputs, cached functions.
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        for leaf in in_leaves:
            if isinstance(leaf, _NOT_TENSORS) or not hasattr(leaf, "shape"):
                self._raise_bad_input(inputs)
        rng_leaves, rng_def = self._call_rng(training)
        fn = self._pure_fn(training, in_def, rng_def)
        outputs, new_state = self._bridge(
            fn,
            V.values_of(self._params_spec),
            in_leaves,
            V.values_of(self._state_spec),
            rng_leaves,
        )
        if training and self._state_spec is not None:
            for variable, value in zip(
                self._state_spec.variables, new_state, strict=True
            ):
                variable.assign(value)
        return jax.tree_util.tree_unflatten(fn.out_treedef, outputs)

    def _raise_bad_input(self, inputs):
        for path, leaf in jax.tree_util.tree_flatten_with_path(inputs)[0]:
            if isinstance(leaf, _NOT_TENSORS) or not hasattr(leaf, "shape"):
                raise TypeError(
                    f"{self._owner}: every leaf of `inputs` must be an array "
                    f"or tensor; {V.keystr(path, 'inputs')} is "
                    f"{_describe(leaf)}."
                )

    def _call_rng(self, training):
        if not self.call_fn_has_rng:
            return [], _NONE_TREEDEF
        leaves, treedef = jax.tree_util.tree_flatten(self._get_call_rng(training))
        # Seeds go to JAX as int32 (uint32 on the jax backend); typed keys
        # pass as they are.
        return [
            leaf if _seed_dtype_ok(leaf.dtype) else keras.ops.cast(leaf, "int32")
            for leaf in leaves
        ], treedef

    def _pure_fn(self, training, in_def, rng_def):
        key = (training, in_def, rng_def)
        fn = self._pure_fns.get(key)
        if fn is None:
            fn = self._pure_fns[key] = self._make_pure_fn(training, in_def, rng_def)
        return fn

    def _make_pure_fn(self, training, in_def, rng_def):
        params_spec, state_spec = self._params_spec, self._state_spec
        call_fn, names, owner = self.call_fn, self.call_fn_arguments, self._owner
        has_state = self.call_fn_has_state

        def pure(params, inputs, state, rng):
            args = []
            for name in names:
                if name == "params":
                    args.append(params_spec.rebuild(params) if params_spec else None)
                elif name == "state":
                    args.append(state_spec.rebuild(state) if state_spec else None)
                elif name == "rng":
                    keys = [_as_key(k) for k in rng]
                    args.append(jax.tree_util.tree_unflatten(rng_def, keys))
                elif name == "inputs":
                    args.append(jax.tree_util.tree_unflatten(in_def, inputs))
                else:
                    args.append(training)
            result = call_fn(*args)
            new_state = []
            if has_state:
                if not (isinstance(result, (tuple, list)) and len(result) == 2):
                    raise ValueError(
                        f"{owner}: `call_fn` takes a `state` argument, so it "
                        "must return a tuple `(outputs, new_state)`; it "
                        f"returned {_describe(result)}."
                    )
                result, returned_state = result
                new_state = _check_state(owner, state_spec, returned_state)
            out_leaves = []
            flat, out_def = jax.tree_util.tree_flatten_with_path(result)
            for path, leaf in flat:
                if isinstance(leaf, (bool, int, float)):
                    leaf = jnp.asarray(leaf)
                if not isinstance(leaf, (jax.Array, np.ndarray)):
                    raise TypeError(
                        f"{owner}: every output of `call_fn` must be an "
                        f"array; {V.keystr(path, 'outputs')} is "
                        f"{_describe(leaf)}."
                    )
                out_leaves.append(leaf)
            pure.out_treedef = jax.tree_util.tree_structure(
                jax.tree_util.tree_unflatten(out_def, [0] * len(out_leaves))
            )
            return out_leaves, new_state

        # Read by the bridges: the output structure (set when `pure` is
        # traced), the owner for messages and the TF compilation platforms.
        pure.out_treedef = None
        pure.owner = owner
        pure.native_serialization_platforms = self.native_serialization_platforms
        return pure

    def compute_output_spec(self, inputs, training=False):
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        with keras.StatelessScope():
            rng_leaves, rng_def = self._call_rng(training)
        fn = self._pure_fn(training, in_def, rng_def)

        def struct(x, autocast):
            dtype = keras.backend.standardize_dtype(x.dtype)
            if autocast and V.is_float(dtype) and self.autocast:
                dtype = self.compute_dtype
            return jax.ShapeDtypeStruct(tuple(x.shape), dtype)

        params = [struct(v, v._autocast) for v in _variables(self._params_spec)]
        state = [struct(v, v._autocast) for v in _variables(self._state_spec)]
        rng = [struct(k, False) for k in rng_leaves]
        shapes = [tuple(x.shape) for x in in_leaves]
        dtypes = [keras.backend.standardize_dtype(x.dtype) for x in in_leaves]
        out = _eval_output_shapes(
            lambda inputs, p, s, r: fn(p, inputs, s, r)[0],
            shapes,
            dtypes,
            (params, state, rng),
        )
        return jax.tree_util.tree_unflatten(
            fn.out_treedef,
            [keras.KerasTensor(shape, dtype=dtype) for shape, dtype in out],
        )

    def compute_output_shape(self, input_shape):
        shapes, shapes_def = _flatten_shapes(input_shape)
        dtypes = self._input_dtypes
        if dtypes is None or len(dtypes) != len(shapes):
            dtypes = [self.compute_dtype] * len(shapes)
        inputs = jax.tree_util.tree_unflatten(
            shapes_def,
            [
                keras.KerasTensor(shape, dtype=dtype)
                for shape, dtype in zip(shapes, dtypes, strict=True)
            ],
        )
        return jax.tree_util.tree_map(
            lambda t: tuple(t.shape), self.compute_output_spec(inputs)
        )

    # -- saving ----------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "call_fn": _serialize_fn(self.call_fn),
                "init_fn": _serialize_fn(self.init_fn),
                "seed": self.seed,
                "native_serialization_platforms": (
                    list(self.native_serialization_platforms)
                    if self.native_serialization_platforms is not None
                    else None
                ),
                "params_spec": V.spec_to_config(self._params_spec),
                "state_spec": V.spec_to_config(self._state_spec),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        params, state = _pop_saved_trees(config)
        config["call_fn"] = _deserialize_fn(config["call_fn"], "call_fn", cls)
        config["init_fn"] = _deserialize_fn(config.get("init_fn"), "init_fn", cls)
        if config.get("params") is None and config.get("state") is None:
            config["params"], config["state"] = params, state
        return cls(**config)


def _pop_saved_trees(config):
    """Removes the saved tree descriptions from `config`; returns placeholders.

    The placeholders (zeros of the saved shapes and dtypes, or None where no
    tree was described) rebuild the variables; the weights file fills them.
    """
    return (
        V.config_to_placeholders(config.pop("params_spec", None)),
        V.config_to_placeholders(config.pop("state_spec", None)),
    )


_NOT_TENSORS = (bool, int, float, complex, str, bytes)
_NONE_TREEDEF = jax.tree_util.tree_structure(None)


@functools.lru_cache(maxsize=64)
def _seed_dtype_ok(dtype) -> bool:
    name = keras.backend.standardize_dtype(dtype)
    return name in ("uint32", "int32") or "key" in name


def _variables(spec):
    return [] if spec is None else list(spec.variables)


def _describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _as_key(x):
    if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint32:
        return x.astype(jnp.uint32)
    return x


def _outside_graph(fn):
    """Calls `fn` eagerly even while TensorFlow traces a graph (TF backend)."""
    if keras.backend.backend() == "tensorflow":
        from jaxlayer.bridges.tensorflow import outside_graph

        return outside_graph(fn)
    return fn()


def _to_jax_keys(rng):
    def convert(x):
        x = np.asarray(keras.ops.convert_to_numpy(x))
        return jnp.asarray(x.astype(np.uint32) if x.dtype.kind in "iu" else x)

    return jax.tree_util.tree_map(convert, rng)


def _check_state(owner, spec, new_state):
    """The new state's array leaves, after checking it matches `spec`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(new_state)
    if spec is None:
        if flat:
            raise ValueError(
                f"{owner}: `call_fn` returned a state with arrays at "
                f"{', '.join(V.keystr(p, 'state') for p, _ in flat[:5])}, but "
                "the layer has no state (`state=None` and no `init_fn` "
                "state); give the initial `state`."
            )
        return []
    if treedef != spec.treedef:
        expected = {jax.tree_util.keystr(p) for p in spec.paths}
        got = {jax.tree_util.keystr(p) for p, _ in flat}
        missing = sorted(expected - got)
        extra = sorted(got - expected)
        detail = []
        if missing:
            detail.append("missing " + ", ".join(f"state{p}" for p in missing))
        if extra:
            detail.append("unexpected " + ", ".join(f"state{p}" for p in extra))
        if not detail:
            detail.append(f"expected the structure {spec.treedef}, got {treedef}")
        raise ValueError(
            f"{owner}: the state returned by `call_fn` does not match the "
            f"structure of the state at initialization: {'; '.join(detail)}."
        )
    leaves = []
    for (path, leaf), slot in zip(flat, spec.slots, strict=True):
        if slot is None:
            continue
        variable = spec.variables[slot]
        if not hasattr(leaf, "shape") and isinstance(leaf, (bool, int, float)):
            leaf = jnp.asarray(leaf)
        if not hasattr(leaf, "shape"):
            raise TypeError(
                f"{owner}: `call_fn` returned {_describe(leaf)} at "
                f"{V.keystr(path, 'state')}, where an array is needed."
            )
        if tuple(leaf.shape) != tuple(variable.shape):
            raise ValueError(
                f"{owner}: `call_fn` returned a new state of shape "
                f"{tuple(leaf.shape)} at {V.keystr(path, 'state')}, but that "
                f"state has shape {tuple(variable.shape)}."
            )
        leaves.append(jax.lax.stop_gradient(leaf))
    return leaves


def _flatten_shapes(input_shape):
    """Input shapes (a shape or a pytree of shapes) as a flat list."""

    def is_shape(x):
        return isinstance(x, (tuple, list)) and all(
            d is None or isinstance(d, (int, np.integer)) for d in x
        )

    if is_shape(input_shape):
        return [tuple(input_shape)], jax.tree_util.tree_structure(0)
    leaves, treedef = jax.tree_util.tree_flatten(input_shape, is_leaf=is_shape)
    return [tuple(s) for s in leaves], treedef


def _eval_output_shapes(fn, shapes, dtypes, extra):
    """Output (shape, dtype) pairs of `fn`, None where a dimension varies.

    Unknown input dimensions are made symbolic (the first dimension of every
    input shares one symbol, the batch); functions that cannot be traced with
    symbolic shapes are evaluated at two concrete sizes instead.
    """
    scope = jax.export.SymbolicScope()
    names = (f"d{i}" for i in itertools.count())
    try:
        structs = []
        for shape, dtype in zip(shapes, dtypes, strict=True):
            dims = [
                str(d) if d is not None else ("batch" if i == 0 else next(names))
                for i, d in enumerate(shape)
            ]
            sym = jax.export.symbolic_shape(",".join(dims), scope=scope)
            structs.append(jax.ShapeDtypeStruct(sym, dtype))
        out = jax.eval_shape(fn, structs, *extra)
        return [
            (tuple(d if isinstance(d, int) else None for d in o.shape), o.dtype)
            for o in out
        ]
    except Exception as first_error:  # noqa: BLE001 - fall back, re-raise below
        try:
            results = [
                jax.eval_shape(
                    fn,
                    [
                        jax.ShapeDtypeStruct(
                            tuple(size if d is None else d for d in shape), dt
                        )
                        for shape, dt in zip(shapes, dtypes, strict=True)
                    ],
                    *extra,
                )
                for size in (2, 3)
            ]
        except Exception:  # noqa: BLE001
            raise first_error from None
        return [
            (
                tuple(
                    a if a == b else None for a, b in zip(x.shape, y.shape, strict=True)
                ),
                x.dtype,
            )
            for x, y in zip(*results, strict=True)
        ]


def _serialize_fn(fn):
    if fn is None:
        return None
    try:
        return keras.saving.serialize_keras_object(fn)
    except Exception:  # noqa: BLE001 - saving must not crash on it
        return {
            "class_name": "function",
            "config": getattr(fn, "__name__", repr(fn)),
            "module": getattr(fn, "__module__", None),
            "registered_name": None,
        }


def _deserialize_fn(config, fn_name, cls):
    if config is None:
        return None
    try:
        fn = keras.saving.deserialize_keras_object(config)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        fn = None
        cause = err
    else:
        cause = None
    if not callable(fn):
        name = config.get("config") if isinstance(config, dict) else config
        module = config.get("module") if isinstance(config, dict) else None
        raise TypeError(
            f"{cls.__name__}: cannot load `{fn_name}` `{name}` (from module "
            f"{module!r}). Decorate it with "
            "`@keras.saving.register_keras_serializable()` where it is "
            "defined and import that module before loading, or pass it in "
            f"`custom_objects={{'{name}': {name}}}` to `load_model`."
            + (f" ({cause})" if cause else "")
        ) from cause
    return fn
