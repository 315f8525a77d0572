"""Shape inference: one builder of symbolic specs, one shape probe.

`structs_of_dims` makes every symbolic `jax.ShapeDtypeStruct` of the package;
`trace_bounded` traces a function with them, bounding a symbol above where
the function compares it with a constant (a mask of a largest length);
`symbolic_dims` names the unknown dimensions of inputs (the batch, a
`keras.Input`'s None) for `jax.eval_shape` and `jax.export`; `eval_outputs`
finds the shapes of a function's outputs, symbolically where it can, else at
two batch sizes, else at the shapes of a call it is known to run with.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.export
import jax.numpy as jnp
import keras
import numpy as np

from jaxlayer._contract import output_leaves
from jaxlayer._pure import fill_unknown


def structs_of_dims(dims, dtypes, bounds=None) -> list:
    """`jax.ShapeDtypeStruct`s, one per input leaf, in one symbolic scope.

    The one place symbolic shapes are made (the layer, saving and every
    bridge name their dimensions their own way, then come here): a leaf's
    dimensions are ints (known sizes) or names (symbols); the same name in
    two leaves is the same symbol.

    Args:
        dims: per input leaf, its dimensions (ints or symbol names).
        dtypes: per input leaf, its dtype (anything `jnp.dtype` takes).
        bounds: `{symbol name: largest size}`, constraints of the scope
            (see `trace_bounded`); None: none.

    Raises:
        ValueError: a name is not a valid symbol (`jax.export`'s message).
    """
    scope = jax.export.SymbolicScope(
        [f"{name} <= {int(n)}" for name, n in sorted((bounds or {}).items())]
    )
    specs = []
    for leaf_dims, dtype in zip(dims, dtypes, strict=True):
        # (A scalar has no dimension to make symbolic.)
        shape = (
            jax.export.symbolic_shape(",".join(str(d) for d in leaf_dims), scope=scope)
            if leaf_dims
            else ()
        )
        specs.append(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return specs


# How many times `trace_bounded` bounds more symbols and traces again.
MAX_BOUND_RETRIES = 4
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# `min(32, d)`: a slice of a constant-size array to a symbolic length.
_MIN = re.compile(rf"min\((?:(\d+), ({_NAME})|({_NAME}), (\d+))\)")
# jax's InconclusiveDimensionOperation: "comparison 'd' > '32' is inconclusive".
_CMP = re.compile(rf"'({_NAME}|\d+)' (>=|<=|>|<|==|!=) '({_NAME}|\d+)'")
_FLIP = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "==": "==", "!=": "!="}


def upper_bounds(error, names, compare=False) -> dict:
    """`{symbol: largest size}` that decides what `error` left open.

    Read from the messages of `error` and its causes: a `min(N, d)` (a
    constant-size array sliced to a symbolic length, then broadcast against
    that length, which fails at any larger size too) gives `d <= N`; with
    `compare`, an inconclusive comparison of a symbol with a constant gives
    the bound that decides it (`d > N`, `d <= N`: `d <= N`; `d >= N`,
    `d < N`: `d <= N - 1`), a choice of branch. Only symbols in `names`.
    """
    found: dict = {}

    def add(name, n):
        if name in names and n >= 1:
            found[name] = min(n, found.get(name, n))

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        for a, b, c, d in _MIN.findall(text):
            add(b or c, int(a or d))
        for left, op, right in _CMP.findall(text) if compare else ():
            if left.isdigit() and not right.isdigit():
                left, op, right = right, _FLIP[op], left
            if right.isdigit() and not left.isdigit():
                n = int(right)
                if op in (">", "<="):
                    add(left, n)
                elif op in (">=", "<"):
                    add(left, n - 1)
        error = error.__cause__ or error.__context__
    return found


def trace_bounded(trace, dims, dtypes, bounds=None, known=(), compare=False):
    """`(trace(specs), bounds)`: `trace` of the symbolic `specs` of `dims`,
    its symbols bounded above where it needs them to be.

    A function with a largest size (GPT-2's causal mask, sliced to
    `min(n_positions, length)`) cannot be traced with a length of any size;
    when `trace` fails on such a comparison of a symbol with a constant
    (`upper_bounds`), it is traced again with that symbol bounded
    (`length <= n_positions`), up to `MAX_BOUND_RETRIES` times. The bounds
    come from the function's own constants, the same on every run.

    Args:
        trace: `(specs) -> result`; raises when it cannot trace.
        dims: per input leaf, its dimensions (ints or symbol names).
        dtypes: per input leaf, its dtype.
        bounds: bounds to start from (`{symbol name: largest size}`).
        known: calls the function is known to run with, each a list of
            shapes (per input leaf, as `dims`; None where unknown): no bound
            excludes their sizes (a function that branches on `length > 4`
            and was called at 8 is not bounded to 4).
        compare: whether an inconclusive comparison bounds too
            (`upper_bounds`): only where a larger size is refused with a
            message or traced on its own, since the bound picks a branch
            that a larger size would not take.

    Raises:
        Exception: `trace`'s error when no bound (or no further bound) helps.
    """
    bounds = dict(bounds or {})
    names = {d for leaf in dims for d in leaf if isinstance(d, str)}
    seen: dict = {}
    for shape in known:
        for leaf, size in zip(dims, shape or (), strict=False):
            for d, n in zip(leaf, size or (), strict=False):
                if isinstance(d, str) and isinstance(n, (int, np.integer)):
                    seen[d] = max(int(n), seen.get(d, 0))
    for retry in itertools.count():
        try:
            return trace(structs_of_dims(dims, dtypes, bounds)), bounds
        except Exception as err:
            new = {
                k: n
                for k, n in upper_bounds(err, names, compare).items()
                if n < bounds.get(k, n + 1) and n >= seen.get(k, 0)
            }
            if not new or retry >= MAX_BOUND_RETRIES:
                raise
            bounds.update(new)
    raise AssertionError  # unreachable: the loop returns or raises


def symbolic_dims(shapes, groups=None) -> list[list]:
    """The dimensions of inputs with every unknown one symbolic: ints, and
    symbol names (the first dimension of every input is one symbol,
    `batch`).

    Args:
        shapes: per input leaf, its shape (None where unknown).
        groups: per input leaf, per dimension, a key or None
            (`_record.shared_groups`): unknown dimensions past the first
            with the same key share one symbol (`s0`, `s1`, ...). None:
            each has its own (`d0`, `d1`, ...).
    """
    names = (f"d{i}" for i in itertools.count())
    shared: dict = {}
    dims = []
    for k, shape in enumerate(shapes):
        leaf = []
        for i, d in enumerate(shape):
            group = groups[k][i] if groups is not None else None
            if d is not None:
                leaf.append(d)
            elif i == 0:
                leaf.append("batch")
            elif group is not None:
                leaf.append(shared.setdefault(group, f"s{len(shared)}"))
            else:
                leaf.append(next(names))
        dims.append(leaf)
    return dims


def flatten_shapes(input_shape):
    """Input shapes (a shape or a pytree of shapes) as a flat list."""

    def is_shape(x):
        return isinstance(x, (tuple, list)) and all(
            d is None or isinstance(d, (int, np.integer)) for d in x
        )

    if is_shape(input_shape):
        return [tuple(input_shape)], jax.tree_util.tree_structure(0)
    leaves, treedef = jax.tree_util.tree_flatten(input_shape, is_leaf=is_shape)
    return [tuple(s) for s in leaves], treedef


def eval_outputs(owner, tree_fn, params, inputs, state, rng, called=None):
    """The structure and `(shape, dtype)` leaves of `tree_fn`'s outputs.

    `tree_fn(params, inputs, state, rng) -> (outputs, new_state)`; the
    arguments are lists of anything with `shape` and `dtype` (tensors,
    `KerasTensor`s, `jax.ShapeDtypeStruct`s). Unknown (None) input
    dimensions are made symbolic (the first dimension of every input shares
    one symbol, the batch) and come out None where an output depends on
    them; a function that cannot be traced with symbolic shapes is evaluated
    at two concrete sizes instead, and, should it take only one size (a
    computation reloaded from a file, exported per shape), at the input
    shapes `called` of a call it is known to run with.
    """
    params = [struct(x.shape, x.dtype) for x in params]
    state = [struct(x.shape, x.dtype) for x in state]
    rng = [struct(x.shape, x.dtype) for x in rng]
    # Unknown and symbolic dims (a jax2tf or `jax.export` trace: `batch`)
    # are None here.
    shapes = [
        tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in x.shape)
        for x in inputs
    ]
    dtypes = [keras.backend.standardize_dtype(x.dtype) for x in inputs]

    def outputs_of(inputs, params, state, rng):
        result, _ = tree_fn(params, inputs, state, rng)
        treedef = jax.tree_util.tree_structure(result)
        return jax.tree_util.tree_unflatten(treedef, output_leaves(owner, result))

    def evaluate(structs):
        out = jax.eval_shape(outputs_of, structs, params, state, rng)
        leaves, treedef = jax.tree_util.tree_flatten(out)
        return treedef, leaves

    try:
        (treedef, out), _ = trace_bounded(
            evaluate, symbolic_dims(shapes), dtypes, known=[called or ()]
        )
        return treedef, [
            (tuple(d if isinstance(d, int) else None for d in o.shape), o.dtype)
            for o in out
        ]
    except Exception as first_error:
        if all(None not in shape for shape in shapes):
            raise
        try:
            results = [
                evaluate(
                    [
                        jax.ShapeDtypeStruct(
                            tuple(size if d is None else d for d in shape), dt
                        )
                        for shape, dt in zip(shapes, dtypes, strict=True)
                    ]
                )
                for size in (2, 3)
            ]
        except Exception:  # noqa: BLE001
            return eval_at_called(evaluate, shapes, dtypes, called, first_error)
        (treedef, x_out), (_, y_out) = results
        return treedef, [
            (
                tuple(
                    a if a == b else None for a, b in zip(x.shape, y.shape, strict=True)
                ),
                x.dtype,
            )
            for x, y in zip(x_out, y_out, strict=True)
        ]


def eval_at_called(evaluate, shapes, dtypes, called, error):
    """`eval_outputs` at the concrete input shapes `called`; an output
    dimension of the size of an unknown input dimension comes out None."""
    fit = fill_unknown(shapes, called)
    if fit is None:
        raise error from None
    filled, put_in = fit
    try:
        treedef, out = evaluate(
            [
                jax.ShapeDtypeStruct(shape, dt)
                for shape, dt in zip(filled, dtypes, strict=True)
            ]
        )
    except Exception:  # noqa: BLE001
        raise error from None
    return treedef, [
        (tuple(None if d in put_in else int(d) for d in o.shape), o.dtype) for o in out
    ]


def struct(shape, dtype):
    return jax.ShapeDtypeStruct(
        tuple(int(d) for d in shape),
        jax.dtypes.canonicalize_dtype(keras.backend.standardize_dtype(dtype)),
    )


def output_shapes(output_spec, input_shape, known_dtypes, compute_dtype):
    """The output shapes of a layer for inputs of `input_shape`
    (`compute_output_shape`), from its `compute_output_spec`.

    The input dtypes are `known_dtypes` (those of the first call) when they
    fit; else floating inputs of `compute_dtype` are tried, then int32 (an
    embedding lookup takes integer indices).

    Raises:
        Exception: the last candidate's error, when every candidate fails.
    """
    shapes, shapes_def = flatten_shapes(input_shape)
    n = len(shapes)
    candidates = (
        [known_dtypes]
        if known_dtypes is not None and len(known_dtypes) == n
        else [[compute_dtype] * n, ["int32"] * n]
    )
    for i, dtypes in enumerate(candidates):
        inputs = jax.tree_util.tree_unflatten(
            shapes_def,
            [
                keras.KerasTensor(shape, dtype=dtype)
                for shape, dtype in zip(shapes, dtypes, strict=True)
            ],
        )
        try:
            spec = output_spec(inputs)
        except Exception:
            if i + 1 == len(candidates):
                raise
            continue
        return jax.tree_util.tree_map(lambda t: tuple(t.shape), spec)
