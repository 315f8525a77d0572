"""Compiled signatures and cached views, per pure function.

What the bridge keeps per pure function `fn` is an `Entry`, in
`fn.slot("torch")`, so it goes when the layer drops the function or the
layer itself goes:

- the JAX views of the parameter and state tensors, made once through DLPack
  and re-made only when a tensor's storage changes. Keras's and torch's
  optimizers update parameters in place, so a view keeps seeing the current
  values: the parameters exist once, in torch's memory (no second copy).
- per call signature (a call without gradient, or one with gradient and
  which tensors it differentiates; the input shapes and dtypes; the dtypes
  of the parameters), the compiled forward and backward, in a cache bounded
  by memory (`CACHE_BYTES`, an estimate per executable). A stream of new
  input shapes is traced once per symbolic signature (`_polymorphic`) and
  compiled once per shape; past the bound, the signature used least often
  goes (never the ones a cycle of shapes keeps using, so the cache cannot
  thrash: a cycle longer than the bound recompiles only its excess).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings

import jax
import numpy as np

from jaxlayer.bridges.torch._exchange import counters, realign, to_jax

#: The memory the compiled signatures of one pure function may take, in
#: bytes (`JAXLAYER_TORCH_CACHE_MB`, default 1024 MiB), estimated per
#: executable: its generated code where XLA reports it (GPU), else
#: `EXECUTABLE_BYTES` (the CPU reports none).
CACHE_BYTES = int(os.environ.get("JAXLAYER_TORCH_CACHE_MB", "1024")) << 20
#: The estimated memory of one CPU executable (a small model's measured
#: 2.5-3 MiB of resident memory per compiled shape, rounded up).
EXECUTABLE_BYTES = 4 << 20

CACHE_FULL = (
    "{owner}: the compiled signatures of this function reached their memory "
    "bound ({mib} MiB, about {n} signatures); a new one now replaces the "
    "least used. Set `JAXLAYER_TORCH_CACHE_MB` higher (before importing "
    "jaxlayer) to keep more, or feed fewer distinct shapes (pad to a few "
    "sizes)."
)


class Entry:
    """What the bridge keeps per pure function: compiled code and views."""

    __slots__ = (
        "signatures",
        "views",
        "shapes",
        "nbytes",
        "_warned_device",
        "_warned_full",
    )

    def __init__(self):
        # key -> signature (`Plain`, `Grad`, ...), oldest first.
        self.signatures: dict = {}
        # Per position of params + state: (tensor, data_ptr, shape, view).
        self.views: list = []
        # Per structure (a signature with its input sizes left out), what
        # `_polymorphic` learnt of the sizes seen.
        self.shapes: dict = {}
        # The estimated memory of `signatures`.
        self.nbytes = 0
        self._warned_device = False
        self._warned_full = False

    def first_device_warning(self) -> bool:
        """True once: whether to warn that this function's tensors go
        through CPU copies."""
        first = not self._warned_device
        self._warned_device = True
        return first

    def signature(self, key, make, fn=None):
        """The signature for `key`, made with `make()` on a miss.

        Bounded by memory (`CACHE_BYTES`): past it, the signatures used
        least often go first, the newest of them first among equals, so a
        cycle of more shapes than fit keeps all but one of those it holds
        (a least-recently-used cache would lose each just before its turn).
        """
        sig = self.signatures.get(key)
        if sig is None:
            sig = self._add(key, make(), fn)
        sig.hits += 1
        return sig

    def _add(self, key, sig, fn):
        signatures = self.signatures
        sig.nbytes = sig.estimate_bytes()
        while signatures and self.nbytes + sig.nbytes > CACHE_BYTES:
            fewest = min(sig.hits for sig in signatures.values())
            # The newest of those used fewest times (reversed: newest first).
            victim = next(
                k for k in reversed(signatures) if signatures[k].hits == fewest
            )
            self.nbytes -= signatures.pop(victim).nbytes
            counters["evictions"] += 1
            if not self._warned_full:
                self._warned_full = True
                warnings.warn(
                    CACHE_FULL.format(
                        owner=getattr(fn, "owner", "JaxLayer"),
                        mib=CACHE_BYTES >> 20,
                        n=max(1, CACHE_BYTES // max(sig.nbytes, 1)),
                    ),
                    stacklevel=5,
                )
        signatures[key] = sig
        self.nbytes += sig.nbytes
        counters["compiles"] += 1
        return sig

    def cached_views(self, tensors, offset, device_type):
        """JAX views of long-lived tensors (parameters, state), cached."""
        views = self.views
        need = offset + len(tensors)
        if len(views) < need:
            views.extend([None] * (need - len(views)))
        out = []
        for i, t in enumerate(tensors, offset):
            cached = views[i]
            # The same tensor, storage and shape: the view still sees it.
            if (
                cached is not None
                and cached[0] is t
                and cached[1] == t.data_ptr()
                and cached[2] == t.shape
            ):
                out.append(cached[3])
                continue
            out.append(self._new_view(i, t, device_type))
        return out

    def _new_view(self, i, t, device_type):
        ptr = t.data_ptr()
        view = to_jax(t, device_type)
        counters["views"] += 1
        if view.unsafe_buffer_pointer() != ptr and realign(t):
            ptr = t.data_ptr()
            view = to_jax(t, device_type)
        # Only a view that shares the tensor's buffer is kept: a copy made
        # on the way would go stale when torch updates in place.
        if view.unsafe_buffer_pointer() == ptr or not t.numel():
            self.views[i] = (t, ptr, t.shape, view)
        else:
            self.views[i] = None
        return view


def cast_params(params, cast):
    """Floating parameters cast to `cast` (inside JAX), others as they are.

    Mixed precision: the layer hands the bridge the parameters as stored
    (float32) with `cast=<compute dtype>`, so the cached views serve every
    call and the gradients come back in float32 (what torch's autograd would
    give through Keras's own cast).
    """
    if cast is None:
        return list(params)
    dtype = jax.dtypes.canonicalize_dtype(cast)
    return [
        p.astype(dtype)
        if jax.numpy.issubdtype(p.dtype, jax.numpy.floating) and p.dtype != dtype
        else p
        for p in params
    ]


def split(flat, counts):
    """`flat` cut into lists of `counts` (params, inputs, state, rng)."""
    out, start = [], 0
    for n in counts:
        out.append(list(flat[start : start + n]))
        start += n
    return out


def differentiable_in(fn, cast, counts, diff, flat):
    """`fn` as a function of the arguments at the positions `diff` of the
    flat list `flat` (params, inputs, state, rng), the others fixed: what
    `jax.vjp` differentiates. Returns `(outputs, new_state)`."""

    def call(values):
        full = list(flat)
        for i, v in zip(diff, values, strict=True):
            full[i] = v
        params, inputs, state, rng = split(full, counts)
        return fn(cast_params(params, cast), inputs, state, rng)

    return call


def plain_forward(fn, cast, counts):
    """The no-gradient forward of `fn` on the flat arguments."""

    def forward(*flat):
        counters["forward_traces"] += 1
        params, inputs, state, rng = split(flat, counts)
        return fn(cast_params(params, cast), inputs, state, rng)

    return forward


class Plain:
    """The compiled forward of one signature, without gradient.

    Traced from `fn`, or compiled from `exported`, the forward exported
    once for a symbolic signature (`_polymorphic`).
    """

    __slots__ = ("forward", "hits", "nbytes")

    def __init__(self, fn, cast, counts, example, exported=None):
        self.hits = self.nbytes = 0
        if exported is None:
            counters["jit_functions"] += 1
            self.forward = compile_for(plain_forward(fn, cast, counts), example)
        else:
            self.forward = compile_for(exported.call, example)

    def estimate_bytes(self) -> int:
        return executable_bytes(self.forward)


def grad_functions(fn, cast, counts, diff, holder):
    """The forward-with-residuals and the backward of `fn` for the
    differentiated positions `diff` (see `Grad`). Tracing the forward sets
    `holder.refs`, `.args`, `.float_outputs` and `.treedef`, which the
    backward reads."""
    n_params, n_inputs, n_state, _ = counts
    no_forward = range(n_params + n_inputs, n_params + n_inputs + n_state)

    def forward(*flat):
        counters["vjp_traces"] += 1
        flat = list(flat)
        differentiable = differentiable_in(fn, cast, counts, diff, flat)
        outputs, vjp_fn, new_state = jax.vjp(
            differentiable, [flat[i] for i in diff], has_aux=True
        )
        # Set while tracing (the structure of the residuals is known only
        # then), read by the backward below.
        leaves, holder.treedef = jax.tree_util.tree_flatten(vjp_fn)
        where = {id(x): i for i, x in enumerate(flat) if i not in no_forward}
        refs, residuals, args = [], [], []
        for leaf in leaves:
            i = where.get(id(leaf))
            if i is not None and flat[i] is leaf:
                refs.append((True, i))
                if i not in args:
                    args.append(i)
                counters["forwarded_residuals"] += 1
            else:
                refs.append((False, len(residuals)))
                residuals.append(leaf)
        holder.refs, holder.args = refs, args
        holder.float_outputs = [
            (jax.numpy.issubdtype(o.dtype, jax.numpy.inexact), o.shape) for o in outputs
        ]
        return outputs, new_state, residuals

    def backward(args, residuals, cotangents):
        counters["backward_traces"] += 1
        positions = {i: k for k, i in enumerate(holder.args)}
        leaves = [
            args[positions[i]] if is_arg else residuals[i] for is_arg, i in holder.refs
        ]
        vjp_fn = jax.tree_util.tree_unflatten(holder.treedef, leaves)
        cts = iter(cotangents)
        # Integer outputs take float0 cotangents.
        full = [
            next(cts) if floating else np.zeros(shape, jax.dtypes.float0)
            for floating, shape in holder.float_outputs
        ]
        (grads,) = vjp_fn(full)
        return grads

    return forward, backward


class Grad:
    """The forward-with-residuals and the backward of one signature.

    The forward returns `(outputs, new_state, residuals)`; the residuals stay
    JAX arrays in the autograd node (they never become torch tensors). A
    residual that is one of the call's parameters, inputs or seeds is not
    returned: `refs` lists, per residual, `(True, index into the call's flat
    arguments)` or `(False, index into the returned residuals)`, and the
    backward is given the arguments it reads (`args`) again (torch's version
    counter, on the tensors saved for backward, reports an in-place change in
    between). State is never read again that way: the layer assigns the new
    state in place right after the call.

    Traced from `fn`, or compiled from `exported`, the pair exported once
    for a symbolic signature (`_polymorphic.SymbolicGrad`, which holds the
    `refs`, `args` and `float_outputs` of its trace).
    """

    __slots__ = (
        "forward",
        "backward",
        "refs",
        "args",
        "float_outputs",
        "treedef",
        "hits",
        "nbytes",
    )

    def __init__(self, fn, cast, counts, diff, example, exported=None):
        self.hits = self.nbytes = 0
        self.refs = self.args = self.float_outputs = self.treedef = None
        if exported is None:
            counters["jit_functions"] += 2
            forward, backward = grad_functions(fn, cast, counts, diff, self)
        else:
            forward, backward = exported.forward.call, exported.backward.call
            self.refs, self.args = exported.refs, exported.args
            self.float_outputs = exported.float_outputs
        self.forward = compile_for(forward, example)
        # Compiled at its first call, for the residuals' shapes, with the
        # options the forward was compiled with (none if XLA refused them).
        self.backward = jax.jit(backward, compiler_options=options_for(example))

    def estimate_bytes(self) -> int:
        # The backward is compiled later: counted as large as the forward.
        return 2 * executable_bytes(self.forward)


def executable_bytes(compiled) -> int:
    """The estimated memory of one compiled executable: its generated code
    where XLA reports it, else `EXECUTABLE_BYTES`."""
    try:
        size = compiled.memory_analysis().generated_code_size_in_bytes
    except Exception:  # noqa: BLE001 - an estimate; none is reported
        size = 0
    return max(int(size or 0), EXECUTABLE_BYTES)


def compile_for(f, example):
    """`f` compiled for the arguments `example` (ahead of time, bounded).

    On the CPU, with `cpu_compiler_options()`; if XLA refuses them, without
    (and never again in this process).
    """
    lowered = jax.jit(f).lower(*example)
    options = options_for(example)
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(options)
    except jax.errors.JaxRuntimeError:
        # Raises if the function itself cannot compile; otherwise the
        # options were at fault.
        compiled = lowered.compile()
        global _cpu_options_refused
        _cpu_options_refused = True
        return compiled


def options_for(example) -> dict | None:
    """The compile options for arguments `example`: the CPU's, or None."""
    return cpu_compiler_options() if on_cpu(example) else None


# -- XLA's options for the bridge's CPU executables --------------------------

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default YNNPACK fusions (dots, reductions and convolutions),
# less the convolutions.
_YNN_WITHOUT_CONVOLUTIONS = (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
)
# Set when XLA refused the options once: they are not given again.
_cpu_options_refused = False


def cpu_compiler_options() -> dict | None:
    """XLA compile options for the bridge's own CPU executables, or None.

    jaxlib 0.10 hands convolutions to YNNPACK by default, with dots and
    reductions. The convolutions a gradient is made of (the weight gradient
    is a convolution with a window as large as the image) ran 1.4-2.2x
    slower there than in XLA's own kernels on the 2-core CPU measured: a
    small CNN's gradient took 15.5-17.3 ms with them and 9.5-9.6 ms without,
    a 3-layer 3x3 64-channel block's 213 against 141 ms (forward
    convolutions, dots and every other op: unchanged). The bridge compiles
    what it runs on the CPU with YNNPACK's convolutions off (its dots and
    reductions kept), per executable: XLA's global flags, and the user's own
    `jax.jit` functions, are left as they are.

    None (XLA's defaults) when `XLA_FLAGS` names the option (the user chose),
    with a jaxlib other than 0.10 (whose default list this restates; check
    it again before widening), or once XLA has refused the options.
    """
    if _cpu_options_refused:
        return None
    if _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return None
    if jaxlib_minor() != (0, 10):
        return None
    return {_YNN_FUSIONS: _YNN_WITHOUT_CONVOLUTIONS}


@functools.cache
def jaxlib_minor() -> tuple[int, ...]:
    """jaxlib's `(major, minor)` version."""
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def on_cpu(example) -> bool:
    """Whether the JAX arrays of `example` (or JAX's default device) are CPU."""
    for leaf in jax.tree_util.tree_leaves(example):
        devices = getattr(leaf, "devices", None)
        if devices is not None:
            return all(d.platform == "cpu" for d in devices())
    return jax.default_backend() == "cpu"
