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

from jaxlayer import _variables as V

# Leaves that are never tensors (`bool` has no `shape`, but a NumPy scalar
# would pass the `hasattr` check were it listed by `shape` alone).
NOT_TENSORS = (bool, int, float, complex, str, bytes)


NONE_TREEDEF = jax.tree_util.tree_structure(None)


@functools.lru_cache(maxsize=64)
def seed_dtype_ok(dtype) -> bool:
    name = keras.backend.standardize_dtype(dtype)
    return name in ("uint32", "int32") or "key" in name


def variables(spec):
    return [] if spec is None else list(spec.variables)


def describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}"[:200]


def as_key(x):
    if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint32:
        return x.astype(jnp.uint32)
    return x


def to_jax_keys(rng):
    def convert(x):
        x = np.asarray(keras.ops.convert_to_numpy(x))
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
                f"{owner}: `call_fn` returned {describe(leaf)} at "
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


def output_leaves(owner, result):
    """The array leaves of `call_fn`'s outputs (Python numbers as arrays)."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(result)[0]:
        if isinstance(leaf, (bool, int, float)):
            leaf = jnp.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{owner}: every output of `call_fn` must be an array; "
                f"{V.keystr(path, 'outputs')} is {describe(leaf)}."
            )
        leaves.append(leaf)
    return leaves


def call_by_name(fn, names, values):
    """Calls `fn` with `values[name]` for each of its argument `names`."""
    return fn(*[values[name] for name in names])


def check_seed(seed, owner):
    if seed is None:
        return None
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
