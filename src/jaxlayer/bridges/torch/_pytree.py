"""Trees in plain Python, for what torch.compile traces.

JAX's tree functions cannot run on traced tensors, so while torch traces, the
layer's inputs, seeds and outputs are flattened and built here (tensors in
tuples, lists, dicts, NamedTuples and None), in JAX's leaf order.
"""

from __future__ import annotations

import jax
import torch


def py_flatten(tree, leaves):
    """Python-only flatten that torch.compile can trace, in JAX's leaf order.

    Appends the tensors of `tree` to `leaves` and returns a hashable key of
    its structure, or None for a structure it does not know (anything but
    tensors in tuples, lists, dicts, NamedTuples and None).
    """
    # Keys: "L" a tensor, "N" None, then `(tag, children)` with the tag "T"
    # (tuple), "l" (list), ("D", keys) or ("NT", class).
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return "L"
    if tree is None:
        return "N"
    kind = type(tree)
    if kind is tuple or kind is list:
        children = tuple(py_flatten(x, leaves) for x in tree)
        tag = "T" if kind is tuple else "l"
    elif kind is dict:
        # JAX orders a dict's leaves by sorted key.
        keys = tuple(sorted(tree))
        children = tuple(py_flatten(tree[k], leaves) for k in keys)
        tag = ("D", keys)
    elif isinstance(tree, tuple) and hasattr(kind, "_fields"):
        children = tuple(py_flatten(x, leaves) for x in tree)
        tag = ("NT", kind)
    else:
        return None
    if None in children:
        return None
    return (tag, children)


def placeholder(key):
    """A tree of the structure `key` (from `py_flatten`) with 0 leaves."""
    if key == "L":
        return 0
    if key == "N":
        return None
    tag, children = key
    values = [placeholder(c) for c in children]
    if tag == "T":
        return tuple(values)
    if tag == "l":
        return values
    if tag[0] == "D":
        return dict(zip(tag[1], values, strict=True))
    return tag[1](*values)


def out_spec(treedef):
    """The structure of `treedef` as a Python constant for `py_build`, or
    None for node types other than tuples, lists, dicts, NamedTuples."""
    # Leaves numbered in order: a leaf's spec is its index in the outputs.
    tree = jax.tree_util.tree_unflatten(treedef, list(range(treedef.num_leaves)))

    def spec(node):
        kind = type(node)
        if kind is int:
            return node
        if node is None:
            return "N"
        if kind is tuple or kind is list:
            children = tuple(spec(x) for x in node)
            tag = "T" if kind is tuple else "l"
        elif kind is dict:
            children = tuple(spec(x) for x in node.values())
            tag = ("D", tuple(node))
        elif isinstance(node, tuple) and hasattr(kind, "_fields"):
            children = tuple(spec(x) for x in node)
            tag = ("NT", kind)
        else:
            raise TypeError(kind)
        return (tag, children)

    try:
        return spec(tree)
    except TypeError:
        return None


def py_build(spec, leaves):
    """The tree `spec` (from `out_spec`) with `leaves`; traceable."""
    # `isinstance`, not `type(...) is int`: TorchDynamo cannot guard on the
    # builtin `int` looked up from this module.
    if isinstance(spec, int):
        return leaves[spec]
    if spec == "N":
        return None
    tag, children = spec
    values = [py_build(c, leaves) for c in children]
    if tag == "T":
        return tuple(values)
    if tag == "l":
        return values
    if tag[0] == "D":
        return dict(zip(tag[1], values, strict=True))
    return tag[1](*values)
