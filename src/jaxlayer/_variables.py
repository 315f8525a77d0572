"""Pytrees of arrays <-> Keras variables, each named by its pytree path."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import jax
import keras
import numpy as np
from keras import ops

from jaxlayer import _private

# Characters every backend accepts in a variable's name and in the names that
# optimizers derive from its path (TensorFlow's scope names allow
# `[A-Za-z0-9_.\\/>-]`).
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def is_array(value: Any) -> bool:
    """Whether a pytree leaf becomes a variable (arrays and Python numbers)."""
    if isinstance(value, (bool, int, float, np.ndarray, np.generic, jax.Array)):
        return True
    return keras.ops.is_tensor(value) or isinstance(value, keras.Variable)


def is_float(dtype: Any) -> bool:
    return "float" in keras.backend.standardize_dtype(dtype)


def key_name(key: Any) -> str:
    """One element of a pytree path as a plain name (`'encoder'`, `'0'`)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_parts(path: tuple) -> list[str]:
    """A pytree path as name-scope parts; `/` inside a key splits it too.

    Haiku names its modules `res_net18/~/block_group_0/~/block_0`; splitting
    on `/` and dropping Haiku's `~` separators gives the scopes `res_net18`,
    `block_group_0`, `block_0`. Characters that some backend refuses in a
    name become `_`.
    """
    parts = []
    for key in path:
        for part in key_name(key).split("/"):
            if part.strip() == "~":
                continue
            parts.append(_SAFE.sub("_", part) or "_")
    return parts


def unique_parts(parts: list[str], taken: set) -> list[str]:
    """`parts`, with `_1`, `_2`, ... added to the last one if already taken.

    Two leaves whose paths map to the same name (`{"a b": ..., "a_b": ...}`)
    get distinct, deterministic names (in leaf order) instead of a clash.
    """
    candidate, n = list(parts), 0
    while tuple(candidate) in taken:
        n += 1
        candidate = [*parts[:-1], f"{parts[-1]}_{n}"]
    taken.add(tuple(candidate))
    return candidate


def keystr(path: tuple, root: str) -> str:
    """A pytree path as Python indexing, `state['bn']['mean']`, for messages."""
    return root + jax.tree_util.keystr(path)


@dataclasses.dataclass
class TreeSpec:
    """Where the variables of one pytree (`params` or `state`) sit.

    Attributes:
        treedef: the structure of the tree.
        slots: per leaf, the index of its variable, or None for a static leaf.
        static: per leaf, the static value (None where the leaf is a variable).
        paths: per leaf, its pytree path.
        variables: the Keras variables, in leaf order.
        tree: the tree with a variable at each array leaf (`layer.params`).
    """

    treedef: Any
    slots: list
    static: list
    paths: list
    variables: list
    tree: Any

    def rebuild(self, arrays):
        """The tree, with `arrays` (one per variable) at the variable leaves."""
        leaves = [
            self.static[i] if slot is None else arrays[slot]
            for i, slot in enumerate(self.slots)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def create_variables(
    layer, values, *, trainable: bool, copy: bool, taken: set | None = None
) -> TreeSpec:
    """Creates one Keras variable per array leaf of `values`.

    Each variable is created inside nested name scopes that follow its pytree
    path, so that its `path` reads `layer/encoder/dense_1/kernel`. Floating
    leaves take the layer's variable dtype (as `keras.layers.JaxLayer` does),
    other leaves keep theirs and are never trainable.

    Args:
        layer: the layer that owns the variables.
        values: a pytree of arrays (or None).
        trainable: whether floating leaves are trainable.
        copy: copy the arrays (for user-given values that the layer must not
            alias: Keras donates variable buffers in jitted train steps, and
            torch optimizers update in place).
        taken: the name paths already used in the layer (updated), so that
            no two variables of the layer get the same path.

    Returns:
        The `TreeSpec` describing the tree and its variables.
    """
    if taken is None:
        taken = set()
    flat, treedef = jax.tree_util.tree_flatten_with_path(values)
    slots, static, paths, variables, leaves = [], [], [], [], []
    for path, value in flat:
        paths.append(path)
        if not is_array(value):
            slots.append(None)
            static.append(value)
            leaves.append(value)
            continue
        if isinstance(value, keras.Variable):
            value = value.value
        if isinstance(value, (bool, int, float)):
            value = np.asarray(value)
        dtype = keras.backend.standardize_dtype(value.dtype)
        floating = is_float(dtype)
        if floating:
            dtype = layer.variable_dtype
        value = _cast(value, dtype, copy)
        variable = _new_variable(
            layer,
            unique_parts(path_parts(path) or ["value"], taken),
            value,
            dtype=dtype,
            trainable=trainable and floating,
            autocast=trainable,
        )
        slots.append(len(variables))
        static.append(None)
        variables.append(variable)
        leaves.append(variable)
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return TreeSpec(treedef, slots, static, paths, variables, tree)


def _cast(value, dtype, copy):
    """`value` as an array of `dtype` that the layer may own."""
    if keras.backend.backend() == "jax" and isinstance(value, jax.Array):
        if value.dtype != dtype:
            return value.astype(dtype)
        return jax.numpy.array(value, copy=True) if copy else value
    if keras.ops.is_tensor(value) and not isinstance(value, jax.Array):
        # A torch or TensorFlow tensor: copied, so that training never
        # changes the caller's tensor and two layers never share one.
        value = keras.ops.cast(value, dtype)
        return keras.ops.copy(value) if copy else value
    # A backend tensor: Keras hands out the initializer's value as is while
    # the creation of a variable is deferred (a symbolic build).
    return keras.ops.convert_to_tensor(np.array(value, copy=copy), dtype=dtype)


def _new_variable(layer, parts, value, *, dtype, trainable, autocast):
    # `Layer.add_weight` would reset the name scope to the layer's own, so
    # the variable is made here, under one scope per pytree path element.
    with contextlib.ExitStack() as scopes:
        scopes.enter_context(keras.name_scope(layer.name, caller=layer))
        for part in parts[:-1]:
            scopes.enter_context(keras.name_scope(part))
        # A callable initializer, so that Keras can defer the creation when
        # the layer is built inside a stateless (symbolic) scope.
        variable = keras.Variable(
            initializer=lambda shape, dtype=None: value,
            shape=tuple(value.shape),
            dtype=dtype,
            trainable=trainable,
            autocast=autocast,
            name=parts[-1],
        )
    _private.track_variable(layer, variable)
    return variable


def spec_to_config(spec: TreeSpec | None):
    """A JSON-serializable description of a tree of variables, or None.

    Only trees made of dicts, lists and tuples (with string or int dict keys)
    and JSON-serializable static leaves can be described; anything else gives
    None, and the layer then needs `init_fn` to be rebuilt from a config.
    """
    if spec is None:
        return None
    leaves = []
    for slot, value, variable in zip(
        spec.slots, spec.static, _slot_variables(spec), strict=True
    ):
        if slot is None:
            if not isinstance(value, (str, int, float, bool)):
                return None
            leaves.append(_Leaf(static=value))
        else:
            leaves.append(_Leaf(shape=list(variable.shape), dtype=variable.dtype))
    tree = jax.tree_util.tree_unflatten(spec.treedef, leaves)
    try:
        return _encode(tree)
    except TypeError:
        return None


def _slot_variables(spec):
    return [None if s is None else spec.variables[s] for s in spec.slots]


class _Leaf(dict):
    """A leaf's description, told apart from the tree's own dicts."""


def _encode(node):
    if isinstance(node, _Leaf):
        return {"leaf": dict(node)}
    if type(node) is dict:
        if not all(isinstance(k, str) for k in node):
            raise TypeError("non-string key")
        return {"dict": {k: _encode(v) for k, v in node.items()}}
    if type(node) is list:
        return {"list": [_encode(v) for v in node]}
    if type(node) is tuple:
        return {"tuple": [_encode(v) for v in node]}
    if node is None:
        return {"none": True}
    raise TypeError(f"cannot describe {type(node).__name__}")


def config_to_placeholders(config):
    """Zero arrays (and static leaves) in the tree a config describes."""
    if config is None:
        return None
    ((kind, body),) = config.items()
    if kind == "leaf":
        if "static" in body:
            return body["static"]
        return np.zeros(body["shape"], dtype=body["dtype"])
    if kind == "dict":
        return {k: config_to_placeholders(v) for k, v in body.items()}
    if kind == "list":
        return [config_to_placeholders(v) for v in body]
    if kind == "tuple":
        return tuple(config_to_placeholders(v) for v in body)
    return None


def values_of(spec: TreeSpec | None) -> list:
    """The current values of the variables of `spec` (backend tensors)."""
    if spec is None:
        return []
    return [v.value for v in spec.variables]


def numpy_tree(tree):
    """A tree of variables or tensors as a tree of NumPy arrays."""
    return jax.tree_util.tree_map(
        lambda x: ops.convert_to_numpy(x) if is_array(x) else x, tree
    )
