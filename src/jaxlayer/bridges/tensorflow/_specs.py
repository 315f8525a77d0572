"""Structure keys and `jax.ShapeDtypeStruct`s of the bridge's arguments.

A structure key says what one export depends on (dtypes, ranks, the known
dims, how the inputs' batch dims group); the specs are what `jax.export` or
`jax.eval_shape` is given for it.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import tensorflow as tf

from jaxlayer._pure import fill_unknown


def split(flat, counts):
    """`(params, inputs, state, rng)`, lists, of the bridge's flat arguments."""
    n_params, n_inputs, n_state = counts
    a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
    return list(flat[:a]), list(flat[a:b]), list(flat[b:c]), list(flat[c:])


def shape_of(x: tf.Tensor) -> tuple:
    return tuple(x.shape.as_list()) if x.shape.rank is not None else None


def jax_dtype(tf_dtype):
    # JAX's dtype for a TensorFlow one (int64 -> int32 without x64, ...).
    return jax.dtypes.canonicalize_dtype(np.dtype(tf_dtype.as_numpy_dtype))


def is_float(dtype) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


def struct(x):
    # Symbolic dims kept (unlike `jaxlayer._shapes.struct`).
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def cast_args(args, specs):
    """Casts tensors whose dtype JAX canonicalizes (int64 -> int32, ...)."""
    out = []
    for x, spec in zip(args, specs, strict=True):
        if x.dtype.as_numpy_dtype != spec.dtype:
            x = tf.cast(x, tf.as_dtype(spec.dtype))
        out.append(x)
    return out


# -- structure keys -------------------------------------------------------------


def symbolic_key(args, counts):
    """What one export depends on.

    Variables are keyed by shape and dtype; inputs by dtype, rank, their
    known non-batch dims and how their first (batch) dims group: inputs whose
    first dims agree (or are all unknown) share one batch symbol. A None dim
    is symbolic.
    """
    n_params, n_inputs, _ = counts
    firsts = {x.shape[0] for x in args[n_params : n_params + n_inputs] if x.shape.rank}
    # One shared symbol tells the export that the batch sizes are equal.
    shared = len(firsts) <= 1
    parts = []
    for i, x in enumerate(args):
        shape = shape_of(x)
        if shape is None:
            raise ValueError(
                f"JaxLayer on TensorFlow: every tensor needs a known rank; got {x!r}."
            )
        if n_params <= i < n_params + n_inputs and shape:
            if shared:
                group = ("b", 0)
            elif shape[0] is None:
                # An unknown batch of its own: one symbol per input.
                group = ("b", "input", i)
            else:
                group = ("b", shape[0])
            shape = (group, *shape[1:])
        parts.append((x.dtype, shape))
    return ("symbolic", tuple(parts))


def general_key(key, counts):
    """`key` with every non-batch input dim symbolic."""
    n_params, n_inputs, _ = counts
    parts = list(key[1])
    for i in range(n_params, n_params + n_inputs):
        dtype, shape = parts[i]
        if len(shape) > 1:
            parts[i] = (dtype, (shape[0], *[None] * (len(shape) - 1)))
    return ("symbolic", tuple(parts))


def declared_key(key, counts, declared):
    """`key` with the input dims unknown in `declared` symbolic (or None)."""
    n_params, n_inputs, _ = counts
    if declared is None or len(declared) != n_inputs:
        return None
    parts = list(key[1])
    for i, template in zip(range(n_params, n_params + n_inputs), declared, strict=True):
        dtype, shape = parts[i]
        if len(template) != len(shape):
            return None
        parts[i] = (
            dtype,
            # The batch (j == 0) keeps its group whatever was declared.
            tuple(
                d if j == 0 or t is not None else None
                for j, (d, t) in enumerate(zip(shape, template, strict=True))
            ),
        )
    return ("symbolic", tuple(parts))


def shared_key(key, counts, called):
    """`key` with every non-batch input dim symbolic, and those that are
    equal in this trace (or, unknown here, in `called`, the shapes of a call
    the layer recorded; else at the same position) one symbol: token ids
    and their attention mask share the sequence length. Tried after the
    keys of separate symbols fail (a function that adds one to the other)."""
    n_params, n_inputs, _ = counts
    parts = list(key[1])
    fits = called is not None and len(called) == n_inputs
    for k, i in enumerate(range(n_params, n_params + n_inputs)):
        dtype, shape = parts[i]
        sizes = called[k] if fits and len(called[k]) == len(shape) else None
        dims = [shape[0]] if shape else []
        for j, d in enumerate(shape[1:], start=1):
            if d is not None:
                dims.append(("s", "size", d))
            elif sizes is not None:
                dims.append(("s", "size", sizes[j]))
            else:
                dims.append(("s", "at", j))
        parts[i] = (dtype, tuple(dims))
    return ("symbolic", tuple(parts))


# -- specs ----------------------------------------------------------------------


def symbolic_dims(key):
    """`(dims, dtypes)` of one structure key, for `_shapes.structs_of_dims`.

    Batch groups are named `batch`, `batch1`, ...; shared groups
    (`shared_key`) `s0`, `s1`, ...; every other None dim is a symbol of its
    own (`d0`, `d1`, ...).
    """
    names = {}
    shared = {}
    fresh = (f"d{i}" for i in itertools.count())
    dims = []
    for _, shape in key[1]:
        leaf = []
        for d in shape:
            if isinstance(d, tuple) and d[0] == "s":  # a shared group
                leaf.append(shared.setdefault(d, f"s{len(shared)}"))
            elif isinstance(d, tuple):  # a batch group
                if d not in names:
                    names[d] = "batch" if not names else f"batch{len(names)}"
                leaf.append(names[d])
            elif d is None:
                leaf.append(next(fresh))
            else:
                leaf.append(d)
        dims.append(leaf)
    return dims, [jax_dtype(tf_dtype) for tf_dtype, _ in key[1]]


def within(specs, args, bounds) -> bool:
    """Whether the known sizes of `args` are within the `bounds`
    (`{symbol name: largest size}`) of the symbols of `specs`."""
    if not bounds:
        return True
    for spec, x in zip(specs, args, strict=True):
        for d, size in zip(spec.shape, x.shape.as_list(), strict=True):
            bound = None if isinstance(d, int) else bounds.get(str(d))
            if bound is not None and size is not None and size > bound:
                return False
    return True


def concrete_specs(args):
    return [
        jax.ShapeDtypeStruct(tuple(x.shape.as_list()), jax_dtype(x.dtype)) for x in args
    ]


# -- shape probes -----------------------------------------------------------------
# Not `jaxlayer._shapes.eval_outputs`: these run after the symbolic export
# failed (so no symbolic try first), on every argument, and give the new
# state's shapes too.


def eval_flat(fn, specs, counts) -> list:
    """`jax.eval_shape` of `fn` on the flat `specs` of its arguments: its
    outputs, then its new state."""
    outputs, new_state = jax.eval_shape(fn, *split(specs, counts))
    return [*outputs, *new_state]


def probe_specs(fn, args, counts, size, called=True):
    """`jax.ShapeDtypeStruct`s of `args` with their unknown dims made
    concrete: the inputs' as in `fn.called_shapes()` (a call the layer knows
    the function runs with) when `called` and they fit, every other `size`.

    Returns:
        `(specs, put_in)`: `put_in` is the set of sizes taken from the
        called shapes (empty when none were).
    """
    n_params, n_inputs, _ = counts
    shapes = [tuple(x.shape.as_list()) for x in args]
    put_in: set = set()
    inputs = slice(n_params, n_params + n_inputs)
    # Only the inputs: the variables' shapes are always known.
    fit = fill_unknown(shapes[inputs], fn.called_shapes()) if called else None
    if fit is not None:
        shapes[inputs], put_in = fit
    specs = [
        jax.ShapeDtypeStruct(
            tuple(size if d is None else d for d in shape), jax_dtype(x.dtype)
        )
        for shape, x in zip(shapes, args, strict=True)
    ]
    return specs, put_in


def error_with_concrete_shapes(fn, args, counts):
    """The error `fn` raises when traced with its unknown dims made concrete
    (`probe_specs`), if any."""
    specs, _ = probe_specs(fn, args, counts, 2)
    try:
        eval_flat(fn, specs, counts)
    except Exception as err:  # noqa: BLE001 - returned to be raised
        return err
    return None


class RunTimeSpecs:
    """The outputs' `(tf dtype, static shape)`s of a call exported at run time.

    It holds the layer's name rather than its function, so that a traced
    graph does not keep the function alive.
    """

    __slots__ = ("owner", "outs")

    def __init__(self, owner, outs):
        self.owner = owner
        self.outs = outs


def run_time_specs(fn, args, counts):
    """Output dtypes and static shapes: `fn` evaluated at two sizes for the
    unknown dims; a dim that differs is unknown. A function that runs at
    one size only (a computation reloaded from a file, exported per shape)
    is evaluated at the shapes of a call it is known to run with, and an
    output dim of a size put in for an unknown dim is unknown."""
    try:
        results = [
            eval_flat(fn, probe_specs(fn, args, counts, n, called=False)[0], counts)
            for n in (2, 3)
        ]
    except Exception:  # noqa: BLE001 - tried at the called shapes, else raised
        specs, put_in = probe_specs(fn, args, counts, 2)
        if not put_in:
            raise
        outs = [
            (tf.as_dtype(x.dtype), [None if d in put_in else d for d in x.shape])
            for x in eval_flat(fn, specs, counts)
        ]
        return RunTimeSpecs(fn.owner, outs)
    outs = [
        (
            tf.as_dtype(x.dtype),
            [p if p == q else None for p, q in zip(x.shape, y.shape, strict=True)],
        )
        for x, y in zip(*results, strict=True)
    ]
    return RunTimeSpecs(fn.owner, outs)
