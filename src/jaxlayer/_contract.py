"""The `call_fn`/`init_fn` contract at run time: calling by argument name,
checking what the functions return (state, outputs), seeds and keys.

The layer calls these on every call or trace; each message names the layer
(its owner prefix), the function and the pytree path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from jaxlayer import _private
from jaxlayer import _variables as V

# Leaves that are never tensors (`bool` has no `shape`, but a NumPy scalar
# would pass the `hasattr` check were it listed by `shape` alone).
NOT_TENSORS = (bool, int, float, complex, str, bytes)


NONE_TREEDEF = jax.tree_util.tree_structure(None)


# Cached: checked on every call, and `standardize_dtype` is Python work;
# few distinct dtypes ever reach it.
@functools.lru_cache(maxsize=64)
def seed_dtype_ok(dtype) -> bool:
    name = keras.backend.standardize_dtype(dtype)
    # Raw keys (uint32, or int32: Keras's seed state on some backends) or
    # typed keys.
    return name in ("uint32", "int32") or "key" in name


def variables(spec):
    return [] if spec is None else list(spec.variables)


def describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    # Bounded: the repr of a large tree or array would swamp the message.
    return f"{type(value).__name__} {value!r}"[:200]


def as_key(x):
    # jax.random takes raw keys as uint32; Keras's seed state may be int32
    # (torch): the same bits, reinterpreted.
    if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint32:
        return x.astype(jnp.uint32)
    return x


def to_jax_keys(rng):
    def convert(x):
        x = np.asarray(keras.ops.convert_to_numpy(x))
        # Through NumPy: the `rng` tensors may be any backend's (seed state).
        return jnp.asarray(x.astype(np.uint32) if x.dtype.kind in "iu" else x)

    return jax.tree_util.tree_map(convert, rng)


def check_state(owner, spec, new_state):
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
    # Paths rather than the treedefs in the message: a treedef's text names
    # no leaf.
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
        # A Python number for a scalar state (`count + 1` on a Python int).
        if not hasattr(leaf, "shape") and isinstance(leaf, (bool, int, float)):
            leaf = jnp.asarray(leaf)
        if not hasattr(leaf, "shape"):
            raise TypeError(
                f"{owner}: `call_fn` returned {describe(leaf)} at "
                f"{V.keystr(path, 'state')}, where an array is needed."
            )
        if tuple(leaf.shape) != tuple(variable.shape):
            raise ValueError(
                f"{owner}: `call_fn` returned a new state of shape "
                f"{tuple(leaf.shape)} at {V.keystr(path, 'state')}, but that "
                f"state has shape {tuple(variable.shape)}."
            )
        # The new state is assigned, not trained: no gradient flows through it
        # into the next step.
        leaves.append(jax.lax.stop_gradient(leaf))
    return leaves


def output_leaves(owner, result):
    """The array leaves of `call_fn`'s outputs (Python numbers as arrays)."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(result)[0]:
        if isinstance(leaf, (bool, int, float)):
            leaf = jnp.asarray(leaf)
        # Tracers are `jax.Array`s too, so this holds under jit.
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{owner}: every output of `call_fn` must be an array; "
                f"{V.keystr(path, 'outputs')} is {describe(leaf)}."
            )
        leaves.append(leaf)
    return leaves


def call_by_name(fn, names, values):
    """Calls `fn` with `values[name]` for each of its argument `names`."""
    # Positionally, in signature order: Haiku's transformed functions take
    # `*args` under a published signature.
    return fn(*[values[name] for name in names])


def check_seed(seed, owner):
    if seed is None:
        return None
    # `bool` is an `int` subclass; `True` is no seed.
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"{owner}: `seed` must be an integer or None, got {describe(seed)}."
        )
    return int(seed)


def seed_generator(seed):
    """Keras's seed generator for `seed`; a seed out of the range the backend
    stores (2**31 and over on torch, negative on jax) is folded into it."""
    try:
        return keras.random.SeedGenerator(seed)
    except (OverflowError, RuntimeError, ValueError):
        return keras.random.SeedGenerator(seed % (2**31 - 1))


def init_trees(owner, init_fn, names, takes, inputs, rng, abstract=False):
    """`(params, state)` from `init_fn`, for placeholder inputs.

    Args:
        owner: the layer, for messages.
        init_fn: the function, and `names` its argument names.
        takes: `(call_fn takes params, call_fn takes state)`.
        inputs: `(shapes, treedef, dtypes)` of the inputs (None dimensions
            are 1 in the placeholders; dtypes None: float32).
        rng: the `rng` (backend tensors, made JAX keys here).
        abstract: run `init_fn` under `jax.eval_shape`: the trees hold
            `jax.ShapeDtypeStruct`s (nothing is computed or drawn).
    """
    has_params, has_state = takes
    shapes, shapes_def, dtypes = inputs
    if dtypes is None or len(dtypes) != len(shapes):
        dtypes = ["float32"] * len(shapes)
    placeholders = [
        jax.ShapeDtypeStruct(
            # Unknown dimensions (the batch) as 1: `init_fn` makes the same trees
            # for any batch size.
            tuple(1 if d is None else int(d) for d in shape),
            # float64 as float32 unless x64 is on: the dtype JAX would give the
            # arrays `init_fn` sees at run time.
            jax.dtypes.canonicalize_dtype(dtype),
        )
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]
    rng = to_jax_keys(rng)

    def init(leaves):
        values = {
            "rng": rng,
            "inputs": jax.tree_util.tree_unflatten(shapes_def, leaves),
            # As for training (as Keras's JaxLayer does): a module that makes
            # some variables only on that path (batch statistics) makes them.
            "training": True,
        }
        return call_by_name(init_fn, names, values)

    if abstract:
        result = jax.eval_shape(init, placeholders)
    else:
        result = init([jnp.ones(p.shape, p.dtype) for p in placeholders])
    if has_state:
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(
                f"{owner}: `init_fn` must return a tuple "
                "`(params, state)` because `call_fn` takes a `state` "
                f"argument; it returned {describe(result)}."
            )
        params, state = result
    else:
        params, state = result, None
    if not has_params:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        if leaves:
            raise ValueError(
                f"{owner}: `init_fn` returned params (at "
                f"{V.keystr(leaves[0][0], 'params')}) but `call_fn` takes "
                "no `params` argument, so they could never be used; add "
                "`params` to `call_fn`'s arguments or return empty params."
            )
        params = None
    return params, state


def tree_fn(owner, call_fn, names, specs, structure, abstract_defs=None):
    """`call_fn` on flat lists: `(outputs tree, new state leaves)`.

    Args:
        owner: the layer, for messages.
        call_fn: the function, and `names` its argument names.
        specs: `(params spec, state spec)`, the layer's `TreeSpec`s.
        structure: `(training, inputs treedef, rng treedef)`.
        abstract_defs: the `(params, state)` tree structures of a layer not
            built yet, to rebuild the trees from `jax.ShapeDtypeStruct`
            leaves (for output shapes only: the returned state is not
            checked).
    """
    params_spec, state_spec = specs
    training, in_def, rng_def = structure
    has_state = "state" in names
    if abstract_defs is None:
        rebuild_params = params_spec.rebuild if params_spec else lambda _: None
        rebuild_state = state_spec.rebuild if state_spec else lambda _: None
    else:
        params_def, state_def = abstract_defs
        rebuild_params = functools.partial(jax.tree_util.tree_unflatten, params_def)
        rebuild_state = functools.partial(jax.tree_util.tree_unflatten, state_def)

    def tree_fn(params, inputs, state, rng):
        values = {
            "params": rebuild_params(params),
            "state": rebuild_state(state),
            "inputs": jax.tree_util.tree_unflatten(in_def, inputs),
            "training": training,
        }
        if "rng" in names:
            keys = [as_key(k) for k in rng]
            values["rng"] = jax.tree_util.tree_unflatten(rng_def, keys)
        result = call_by_name(call_fn, names, values)
        if not has_state:
            return result, []
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(
                f"{owner}: `call_fn` takes a `state` argument, so it "
                "must return a tuple `(outputs, new_state)`; it "
                f"returned {describe(result)}."
            )
        result, returned_state = result
        # A layer not built has no state spec to check against: shapes only.
        if abstract_defs is not None:
            return result, []
        return result, check_state(owner, state_spec, returned_state)

    return tree_fn


def check_given(owner, init_fn, params, state, takes) -> None:
    """Checks the trees given to a layer against what `call_fn` takes.

    Args:
        owner: the layer, for messages.
        init_fn: the layer's `init_fn`, or None.
        params: the `params` given, or None; `state` likewise.
        takes: `(takes params, takes state)`, of `call_fn`.

    Raises:
        ValueError: nothing can make the trees `call_fn` takes, or a tree is
            given that `call_fn` does not take.
    """
    takes_params, takes_state = takes
    if init_fn is None and params is None and state is None and any(takes):
        raise ValueError(
            "`init_fn`, `params` and `state` cannot all be `None` when "
            "`call_fn` takes a `params` or a `state` argument "
            f"({owner}): give `init_fn` to initialise them at build "
            "time, or the initial `params`/`state`."
        )
    if params is not None and not takes_params:
        raise ValueError(
            f"{owner}: `params` were given but `call_fn` takes no "
            "`params` argument; add `params` to `call_fn`'s arguments."
        )
    if state is not None and not takes_state:
        raise ValueError(
            f"{owner}: `state` was given but `call_fn` takes no `state` "
            "argument, so it could never be used or updated; add `state` "
            "to `call_fn`'s arguments (and return `(outputs, new_state)`)."
        )


def check_not_traced(owner, params, state) -> None:
    """Raises if `init_fn` returned tracers (the layer built inside a trace).

    Keras may build a layer while tracing (a subclassed model's symbolic
    build runs under `jax.eval_shape`); variables cannot hold tracers.
    """
    for root, tree in (("params", params), ("state", state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if _private.is_tracer(leaf):
                raise ValueError(
                    f"{owner} cannot be built in a tracing scope "
                    f"(`init_fn` returned a tracer at "
                    f"{V.keystr(path, root)}); call the layer once "
                    "outside `jax.jit`, or give `params`/`state`."
                )


def bad_input(owner, inputs) -> TypeError:
    """The error for inputs with a leaf that is not an array or tensor."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        if isinstance(leaf, NOT_TENSORS) or not hasattr(leaf, "shape"):
            return TypeError(
                f"{owner}: every leaf of `inputs` must be an array "
                f"or tensor; {V.keystr(path, 'inputs')} is "
                f"{describe(leaf)}."
            )
    return TypeError(f"{owner}: `inputs` has a leaf that is not an array.")
