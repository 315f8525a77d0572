"""Symbolic signatures: a stream of new input shapes traced once, not per shape.

A function's calls are grouped by structure: what they differentiate, the
dtypes and ranks of the inputs, the shapes of everything else. The first
call of a structure is traced and compiled for its shapes, as a fixed-shape
model always is. When a call of the same structure brings new input sizes,
the input dimensions that changed become symbolic (`jax.export`, one
symbol per group of dimensions equal in every call so far: the batch of
several inputs, a shared sequence length), the function is traced once for
that symbolic signature, and every shape after it is compiled from that one
trace (XLA compiles per shape; the Python trace is not repeated). A shape
that changes a dimension that had stayed fixed (or splits a group) widens
the signature once more, so a structure is traced at most once per input
dimension.

A function that cannot be traced with symbolic sizes (`int(x.shape[0])`, a
host callback) is traced per shape instead, with a warning once naming the
dimensions; both ways, the compiled shapes live in the bounded cache of
`_signatures.Entry`.
"""

from __future__ import annotations

import warnings

import jax

from jaxlayer._shapes import trace_bounded
from jaxlayer.bridges.torch._exchange import counters
from jaxlayer.bridges.torch._signatures import (
    Grad,
    Plain,
    grad_functions,
    on_cpu,
    plain_forward,
)

NOT_SYMBOLIC = (
    "{owner}: the input sizes change between calls ({where}; `inputs[i]`: "
    "the i-th input array), but `call_fn` "
    "cannot be traced with {them} symbolic ({error}). Each new input shape "
    "is traced and compiled on its own (and kept, up to "
    "`JAXLAYER_TORCH_CACHE_MB`). To trace once for every size, let the "
    "function keep sizes symbolic (`x.shape[0]` used as is, `jnp.ones(x.shape)`, "
    "no `int(x.shape[0])`, no shape-dependent Python branches)."
)


def make(entry, fn, cast, counts, diff, flat, shapes):
    """The signature (`Plain` without `diff`, else `Grad`) for a call with
    flat arguments `flat` whose `(shape, dtype)`s are `shapes`, made on a
    miss of the compiled cache."""
    n_params, n_inputs = counts[0], counts[1]
    inputs = range(n_params, n_params + n_inputs)
    structure = (
        diff,
        counts,
        cast,
        tuple(
            (len(shape), dtype) if i in inputs else (shape, dtype)
            for i, (shape, dtype) in enumerate(shapes)
        ),
    )
    input_shapes = [tuple(shapes[i][0]) for i in inputs]
    sizes = entry.shapes.get(structure)
    if sizes is None:
        entry.shapes[structure] = _Sizes(input_shapes)
    else:
        sizes.see(input_shapes)
        symbolic = _symbolic(sizes, fn, cast, counts, diff, flat)
        if symbolic is not None:
            try:
                if diff:
                    return Grad(fn, cast, counts, diff, flat, exported=symbolic)
                return Plain(fn, cast, counts, flat, exported=symbolic.forward)
            except Exception:  # noqa: BLE001 - a size the symbols exclude (0)
                counters["symbolic_misfits"] += 1
    if diff:
        return Grad(fn, cast, counts, diff, flat)
    return Plain(fn, cast, counts, flat)


def _symbolic(sizes, fn, cast, counts, diff, flat):
    """The symbolic trace for what `sizes` learnt, made if it changed; None
    when the sizes have not varied or the function cannot be traced so."""
    if sizes.failed or not sizes.varying:
        return None
    dims = sizes.dims()
    if sizes.symbolic is not None and sizes.symbolic.dims == dims:
        return sizes.symbolic
    n_params, n_inputs = counts[0], counts[1]
    inputs = range(n_params, n_params + n_inputs)
    all_dims = [
        dims[i - n_params] if i in inputs else tuple(x.shape)
        for i, x in enumerate(flat)
    ]
    try:
        # Bounded where the function needs it (a mask sliced to
        # `min(max_length, length)`): a larger size misses the signature in
        # `make` (jax refuses it) and is traced on its own.
        sizes.symbolic, _ = trace_bounded(
            lambda specs: _Symbolic(fn, cast, counts, diff, flat, dims, specs),
            all_dims,
            [x.dtype for x in flat],
            # Never below the sizes of this call or the first.
            known=[
                [tuple(x.shape) for x in flat],
                [None] * n_params + [tuple(s) for s in sizes.first],
            ],
            # A larger size misses the signature and is traced on its own.
            compare=True,
        )
    except Exception as error:  # noqa: BLE001 - reported, then per shape
        sizes.failed = True
        sizes.symbolic = None
        where = ", ".join(
            f"inputs[{leaf}] dimension {axis} (sizes {a} and {b})"
            for leaf, axis, a, b in sizes.changes()
        )
        warnings.warn(
            NOT_SYMBOLIC.format(
                owner=fn.owner,
                where=where,
                them="it" if len(sizes.varying) == 1 else "them",
                error=f"{type(error).__name__}: {_first_line(error)}",
            ),
            stacklevel=6,
        )
        return None
    return sizes.symbolic


def _first_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


class _Sizes:
    """What the calls of one structure showed of their input sizes.

    `varying`: the `(input, axis)` positions whose size changed; `together`:
    per varying position, the varying positions equal to it in every call.
    """

    __slots__ = ("first", "varying", "together", "symbolic", "failed", "_seen")

    def __init__(self, input_shapes):
        self.first = input_shapes
        self.varying: set = set()
        self.together: dict = {}
        self.symbolic = None
        self.failed = False
        # Per varying position, two sizes it had (for the warning).
        self._seen: dict = {}

    def see(self, input_shapes):
        size = _positions(input_shapes)
        first = _positions(self.first)
        new = {p for p, n in size.items() if n != first[p] and p not in self.varying}
        for p in new:
            self._seen[p] = (first[p], size[p])
            # Equal in every call so far: only positions that change first
            # now, from the same size to the same size (one that changed
            # before differed from this one's size in that call).
            self.together[p] = frozenset(
                q for q in new if first[q] == first[p] and size[q] == size[p]
            )
        for p in self.varying:
            self.together[p] = frozenset(
                q for q in self.together[p] if size[q] == size[p]
            )
        self.varying |= new

    def dims(self) -> tuple:
        """Per input leaf, its dimensions: a size, or a symbol's name."""
        names: dict = {}
        batch = other = 0
        out = []
        for leaf, shape in enumerate(self.first):
            leaf_dims = []
            for axis, size in enumerate(shape):
                p = (leaf, axis)
                if p not in self.varying:
                    leaf_dims.append(size)
                    continue
                group = self.together[p]
                if group not in names:
                    if any(a == 0 for _, a in group):
                        names[group] = "batch" if not batch else f"batch{batch}"
                        batch += 1
                    else:
                        names[group] = f"d{other}"
                        other += 1
                leaf_dims.append(names[group])
            out.append(tuple(leaf_dims))
        return tuple(out)

    def changes(self):
        """`(input, axis, a size, another)` per varying position."""
        return [(*p, *self._seen[p]) for p in sorted(self.varying)]


def _positions(input_shapes) -> dict:
    """`{(input, axis): size}`."""
    return {
        (leaf, axis): n
        for leaf, shape in enumerate(input_shapes)
        for axis, n in enumerate(shape)
    }


class _Symbolic:
    """One symbolic signature: the forward (and, with `diff`, backward)
    exported with the input dimensions `dims` (`specs`: all the arguments'
    `jax.ShapeDtypeStruct`s).

    Holds what `Grad` reads of its trace: `refs`, `args`, `float_outputs`.
    """

    __slots__ = (
        "dims",
        "forward",
        "backward",
        "refs",
        "args",
        "float_outputs",
        "treedef",
    )

    def __init__(self, fn, cast, counts, diff, flat, dims, specs):
        self.dims = dims
        self.refs = self.args = self.float_outputs = self.treedef = None
        platforms = ["cpu" if on_cpu(flat) else jax.export.default_export_platform()]
        counters["symbolic_traces"] += 1
        if not diff:
            self.backward = None
            self.forward = jax.export.export(
                jax.jit(plain_forward(fn, cast, counts)), platforms=platforms
            )(*specs)
            return
        forward, backward = grad_functions(fn, cast, counts, diff, self)
        self.forward = jax.export.export(jax.jit(forward), platforms=platforms)(*specs)
        outs = self.forward.out_avals
        n_residuals = sum(1 for is_arg, _ in self.refs if not is_arg)
        residuals = outs[len(outs) - n_residuals :] if n_residuals else []
        cotangents = [
            o
            for o, (floating, _) in zip(outs, self.float_outputs, strict=False)
            if floating
        ]

        def spec(aval):
            return jax.ShapeDtypeStruct(aval.shape, aval.dtype)

        self.backward = jax.export.export(jax.jit(backward), platforms=platforms)(
            [specs[i] for i in self.args],
            [spec(a) for a in residuals],
            [spec(a) for a in cotangents],
        )
