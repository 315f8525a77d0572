"""Pytrees of arrays <-> Keras variables, each named by its pytree path."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
import sys
from collections.abc import Callable
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
    # `DictKey.key`, `GetAttrKey.name`, `SequenceKey.idx` (and
    # `FlattenedIndexKey.key`): jax's path entries.
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
            # A part of refused characters only still names a scope.
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
            # Python numbers have no dtype: NumPy's (int64, float64), and a float
            # then takes the layer's variable dtype below.
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
            # State is not autocast: under mixed precision it is read and assigned
            # back in its own dtype (running statistics stay float32).
            autocast=trainable,
        )
        slots.append(len(variables))
        static.append(None)
        variables.append(variable)
        leaves.append(variable)
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return TreeSpec(treedef, slots, static, paths, variables, tree)


def add_variable(
    layer, parts: list[str], value, *, trainable: bool, taken: set
) -> tuple[Any, str]:
    """One more `params` variable of `layer`, named by `parts` (name scopes,
    then the name; made unique against `taken`, which is updated), as
    `create_variables` makes them: floating values take the layer's variable
    dtype, other values keep theirs and are never trainable.

    Returns:
        `(variable, name)`, the name relative to the layer
        (`"dense/kernel_lora_a"`).
    """
    dtype = keras.backend.standardize_dtype(value.dtype)
    floating = is_float(dtype)
    if floating:
        dtype = layer.variable_dtype
    parts = unique_parts(parts, taken)
    variable = _new_variable(
        layer,
        parts,
        _cast(value, dtype, copy=False),
        dtype=dtype,
        trainable=trainable and floating,
        autocast=True,
    )
    return variable, "/".join(parts)


def _cast(value, dtype, copy):
    """`value` as an array of `dtype` that the layer may own."""
    if keras.backend.backend() == "jax" and isinstance(value, jax.Array):
        if value.dtype != dtype:
            # `astype` makes a new array: no copy needed.
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


class UndescribableTree(TypeError):
    """A tree a `.keras` file cannot describe (a custom pytree node, ...).

    Attributes:
        path: where, as Python indexing (`params['encoder']`).
        what: what was found there.
    """

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is {what}")
        self.path = path
        self.what = what


# The description of a tree whose variables are kept by name only (see
# `FlatTree`): a layer rebuilt from its exported computation.
FLAT = {"flat": True}


def spec_to_config(spec: TreeSpec | None, root: str = "params"):
    """A JSON-serializable description of a tree of variables, or None.

    Trees of dicts (string or scalar keys), OrderedDicts, lists, tuples and
    NamedTuples, with JSON-serializable static leaves, are described; a
    `FlatTree` is described as `FLAT`.

    Args:
        spec: the tree's `TreeSpec` (None gives None).
        root: the tree's name, for messages (`"params"`, `"state"`).

    Raises:
        UndescribableTree: a node or a static leaf cannot be described
            (a registered custom pytree node, an object leaf); the error
            names its path.
    """
    if spec is None:
        return None
    if isinstance(spec.tree, FlatTree):
        return dict(FLAT)
    leaves = []
    for slot, value, variable, path in zip(
        spec.slots, spec.static, _slot_variables(spec), spec.paths, strict=True
    ):
        if slot is None:
            if not isinstance(value, (str, int, float, bool)):
                raise UndescribableTree(
                    keystr(path, root),
                    f"a static leaf of type {type(value).__name__}",
                )
            leaves.append(Leaf(static=value))
        else:
            leaves.append(Leaf(shape=list(variable.shape), dtype=variable.dtype))
    try:
        tree = jax.tree_util.tree_unflatten(spec.treedef, leaves)
    except Exception as err:  # noqa: BLE001 - a node type that checks its leaves
        raise UndescribableTree(root, f"a tree of {spec.treedef}") from err
    return encode_tree(tree, root)


def _slot_variables(spec):
    return [None if s is None else spec.variables[s] for s in spec.slots]


class Leaf(dict):
    """A leaf's description, told apart from the tree's own dicts."""


_KEY_TYPES = (int, float, bool)


def encode_tree(tree: Any, root: str = "tree"):
    """A JSON-serializable description of a tree whose leaves are `dict`s.

    The nodes described are `dict` (string keys, or int/float/bool keys),
    `collections.OrderedDict`, `list`, `tuple`, NamedTuples and None; each
    leaf, a `dict` of JSON values, is kept as it is. `decode_tree` reverses
    it.

    Raises:
        UndescribableTree: a node of another type, or a key that JSON cannot
            hold; the error names its path under `root`.
    """
    return _encode(tree, root)


def _encode(node, path):
    if isinstance(node, Leaf):
        return {"leaf": dict(node)}
    kind = type(node)
    # Exact types: a dict subclass (a FrozenDict, a FlatTree) is another
    # pytree node, which this description could not rebuild.
    if kind is dict or kind is collections.OrderedDict:
        keys = list(node)
        # JSON objects have string keys only: other keys (and OrderedDicts, whose
        # order is part of the tree) are written as `[key, value]` pairs.
        if kind is dict and all(isinstance(k, str) for k in keys):
            return {"dict": {k: _encode(v, f"{path}[{k!r}]") for k, v in node.items()}}
        for k in keys:
            if not isinstance(k, (str, *_KEY_TYPES)):
                raise UndescribableTree(
                    path, f"a dict with a key of type {type(k).__name__} ({k!r})"
                )
        items = [[k, _encode(v, f"{path}[{k!r}]")] for k, v in node.items()]
        return {"ordered_dict" if kind is not dict else "dict_items": items}
    if kind is list:
        return {"list": [_encode(v, f"{path}[{i}]") for i, v in enumerate(node)]}
    if kind is tuple:
        return {"tuple": [_encode(v, f"{path}[{i}]") for i, v in enumerate(node)]}
    if node is None:
        return {"none": True}
    if isinstance(node, tuple) and hasattr(kind, "_fields"):
        return {
            "namedtuple": {
                "name": kind.__name__,
                "module": kind.__module__,
                "qualname": kind.__qualname__,
                "fields": list(kind._fields),
                "values": [
                    _encode(v, f"{path}.{f}")
                    for f, v in zip(kind._fields, node, strict=True)
                ],
            }
        }
    raise UndescribableTree(
        path,
        f"a {kind.__module__}.{kind.__qualname__} (a pytree node type that a "
        "`.keras` file cannot describe)",
    )


def decode_tree(config, leaf: Callable[[dict], Any]):
    """The tree `encode_tree` described, with `leaf(description)` at leaves.

    A NamedTuple comes back as its class when that class is already loaded
    in this process (nothing is imported), and otherwise as a
    `collections.namedtuple` with the same name and fields.
    """
    ((kind, body),) = config.items()
    if kind == "leaf":
        return leaf(body)
    if kind == "dict":
        return {k: decode_tree(v, leaf) for k, v in body.items()}
    if kind == "dict_items":
        return {k: decode_tree(v, leaf) for k, v in body}
    if kind == "ordered_dict":
        return collections.OrderedDict((k, decode_tree(v, leaf)) for k, v in body)
    if kind == "list":
        return [decode_tree(v, leaf) for v in body]
    if kind == "tuple":
        return tuple(decode_tree(v, leaf) for v in body)
    if kind == "none":
        return None
    if kind == "namedtuple":
        cls = _namedtuple_class(body)
        return cls(*[decode_tree(v, leaf) for v in body["values"]])
    raise ValueError(f"unknown tree description {kind!r}")


def _namedtuple_class(body):
    fields = tuple(body["fields"])
    # Only an already loaded class: loading a file imports nothing it names.
    module = sys.modules.get(body.get("module") or "")
    cls = module
    for part in (body.get("qualname") or "").split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, tuple):
        # A class of that name with other fields would put the values in the
        # wrong ones: then a namedtuple of the saved fields instead.
        if tuple(getattr(cls, "_fields", ())) == fields:
            return cls
    return collections.namedtuple(body["name"], fields)


def config_to_placeholders(config, flat=None):
    """Zero arrays (and static leaves) in the tree a config describes.

    Args:
        config: what `spec_to_config` returned.
        flat: for a `FLAT` description, the variables as `(name, shape,
            dtype)`; the tree is then a `FlatTree` of them.
    """
    if config is None:
        return None
    if config.get("flat"):
        if flat is None:
            return None
        return FlatTree(
            (name, np.zeros(shape, dtype=dtype)) for name, shape, dtype in flat
        )

    def leaf(body):
        if "static" in body:
            return body["static"]
        return np.zeros(body["shape"], dtype=body["dtype"])

    return decode_tree(config, leaf)


class FlatTree(dict):
    """Variables by name, in order: a tree rebuilt without its structure.

    A layer rebuilt from the computation saved in a `.keras` file, whose
    `params` (or `state`) were a tree the file could not describe (a custom
    pytree node), holds them as a `FlatTree`: a dict from each variable's
    name (`"encoder/dense/kernel"`) to its value, flattened in insertion
    order (not sorted, as a plain dict would be), so that its leaves are in
    the order of the variables.
    """


def _flat_tree_flatten_with_keys(tree):
    # The names are the node's static data, so FlatTrees of other variables
    # are other structures (and unflatten in the same order).
    return [(jax.tree_util.DictKey(k), v) for k, v in tree.items()], tuple(tree)


def _flat_tree_flatten(tree):
    return list(tree.values()), tuple(tree)


def _flat_tree_unflatten(names, children):
    return FlatTree(zip(names, children, strict=True))


jax.tree_util.register_pytree_with_keys(
    FlatTree,
    _flat_tree_flatten_with_keys,
    _flat_tree_unflatten,
    _flat_tree_flatten,
)


def variable_names(specs) -> list[tuple[str, Any]]:
    """`(name, variable)` for the variables of `specs`, as the layer named them.

    The names are the pytree paths made unique as `create_variables` made
    them (one namespace for all `specs`), relative to the layer:
    `"encoder/dense/kernel"`.
    """
    taken: set = set()
    names = []
    for spec in specs:
        if spec is None:
            continue
        for slot, path in zip(spec.slots, spec.paths, strict=True):
            if slot is None:
                continue
            parts = unique_parts(path_parts(path) or ["value"], taken)
            names.append(("/".join(parts), spec.variables[slot]))
    return names


def values_of(spec: TreeSpec | None, stored: bool = False) -> list | None:
    """The current values of the variables of `spec` (backend tensors).

    Args:
        spec: the tree's `TreeSpec` (None gives `[]`).
        stored: the tensors as the variables store them, without the cast
            of Keras's autocast scope (the caller casts them). None when
            they cannot be read that way: inside a `keras.StatelessScope`
            (whose values replace the stored ones), before a deferred
            variable exists, or if Keras's private `Variable._value` or
            `in_stateless_scope` is gone (see `jaxlayer._private`).
    """
    if spec is None:
        return []
    if not stored:
        # The hot path: one check for all the variables where Keras's
        # `.value` makes one per variable (`_private.plain_values`).
        values = _private.plain_values(spec.variables)
        return values if values is not None else [v.value for v in spec.variables]
    # Not public API (see `jaxlayer._private`): without it, no stored read.
    in_stateless_scope = _private.keras_in_stateless_scope()
    if in_stateless_scope is None or in_stateless_scope():
        return None
    # `_value` is None while a deferred variable is not yet created.
    values = [getattr(v, "_value", None) for v in spec.variables]
    return None if any(x is None for x in values) else values


def numpy_tree(tree):
    """A tree of variables or tensors as a tree of NumPy arrays."""
    return jax.tree_util.tree_map(
        lambda x: ops.convert_to_numpy(x) if is_array(x) else x, tree
    )
