"""The PyTorch backend: a zero-copy DLPack bridge with a torch autograd rule.

Torch tensors cross to JAX and back through DLPack without copying, and a
`torch.autograd.Function` ties the JAX forward and backward to torch's
autograd. Importing this module imports torch: the layer imports it only on
the torch backend.

What the bridge keeps, per pure function `fn` (in `fn.slot("torch")`, so it
goes when the layer drops the function or the layer itself goes):

- the JAX views of the parameter and state tensors, made once through DLPack
  and re-made only when a tensor's storage changes. Keras's and torch's
  optimizers update parameters in place, so a view keeps seeing the current
  values: the parameters exist once, in torch's memory (no second copy).
- per call signature (a call without gradient, or one with gradient and
  which tensors it differentiates; the input shapes and dtypes; the dtypes
  of the parameters), the compiled forward and backward, in a
  least-recently-used cache of `MAX_SIGNATURES` (16) signatures per pure
  function. A stream of new input shapes compiles one signature per shape
  (as `jax.jit` would) but keeps at most 16: the oldest is dropped with its
  executables.

One training step crosses twice. The forward is one JAX call that returns
the outputs, the new state and the VJP residuals; the residuals stay JAX
arrays in the autograd node (they never become torch tensors), and those
that are the call's own parameters, inputs or seeds are not returned at all:
the backward reads them again from the views (torch's version counter, on
the tensors saved for backward, reports an in-place change in between). The
backward is one JAX call for all gradients (parameters and inputs).

Mixed precision (`mixed_bfloat16`, `mixed_float16`): the layer hands the
bridge the parameters as stored (float32) with `cast=<compute dtype>`, and
the cast happens inside the compiled JAX function; the cached views serve
every call, and the gradients come back in float32 (what torch's autograd
would give through Keras's own cast).

Ordering: on the CPU, JAX's DLPack export waits until the array is ready, so
every tensor handed to torch is complete, and since every JAX call hands at
least one result to torch before returning, no JAX computation still reads
a torch buffer when torch next changes one in place. A result that shares a
buffer with another result is cloned. There is no `block_until_ready` on the
hot path; one is left only for a call with no result at all.

Threads (CPU): torch's OpenMP pool and XLA's thread pool share the cores. At
import, before JAX has made its CPU client, the bridge turns JAX's CPU
asynchronous dispatch off (`jax_cpu_enable_async_dispatch=False`, unless the
environment sets `JAX_CPU_ENABLE_ASYNC_DISPATCH`): the bridge waits for every
result anyway, so running a computation on the calling thread saves a
hand-over to XLA's dispatch thread and back on every call. If JAX's client
already exists when the bridge is imported (a JAX array was made first),
that setting can no longer apply; import `jaxlayer` before making JAX arrays
to get it. Nothing of torch's is changed.

Where a CPU step still loses time is between the two pools: after a torch op
large enough to run in parallel (an input batch converted or copied, a loss
over a large batch), torch's idle OpenMP threads (libgomp) keep spinning for
a while on the cores that XLA's threads then need. Measured on a 2-core CPU:
the same JAX CNN gradient took 16-17 ms alone or after a small torch op, and
20-24 ms right after an add over 40,000 elements or the copy of a
50,000-element input batch; with `GOMP_SPINCOUNT=100` the difference went
away. In `fit`, Keras's own torch ops just before the layer (the batch's
conversion) are such ops. The bridge cannot stop that spin without changing
torch's OpenMP runtime for the whole process, so it does not. What a user
can set, in the environment before starting Python (measured side by side
in `benchmarks.fit_step`, 2-core CPU):

- `GOMP_SPINCOUNT=1000` (or `100`, or `OMP_WAIT_POLICY=PASSIVE`): libgomp
  spins less. The layer's CNN step went from 27 to 19 ms, but native torch
  layers lost speed (a transformer step 51 -> 61 ms with `100`): they gain
  from the spin. A choice for a process whose torch work is mostly small.
- `PJRT_NPROC=1`: XLA's CPU thread pool gets one thread (read when JAX
  makes its CPU client). No contention, and no parallelism in XLA: the MLP
  step went from 4.1 to 3.2 ms (1.39x -> 1.10x native), the CNN from 29 to
  32 ms and the transformer from 73 to 106 ms. For small models only.
- `torch.set_num_threads(n)`: fewer torch threads fight less.

XLA's options (CPU): what the bridge compiles for the CPU is compiled with
YNNPACK's convolutions off (`_cpu_compiler_options`): with jaxlib 0.10's
defaults, a small CNN's gradient took 15.5-17.3 ms, without them 9.5-9.6 ms.
Per executable; not where `XLA_FLAGS` names the option.

GPU (CUDA; checked on an H200 with torch 2.11 and jax 0.11 by
`benchmarks/cuda_check.py`: zero copy both ways, gradients equal to
`jax.grad`, an in-place torch update seen by the next JAX call, calls queued
without waiting for the GPU): tensors cross without a host
synchronisation. Into JAX, `jax.dlpack.from_dlpack(tensor)` calls
`tensor.__dlpack__(stream=<JAX's stream for external ready events>)`, so torch
makes JAX's stream wait for its current stream (an event, not a host wait).
Back to torch, `torch.from_dlpack(array)` calls
`array.__dlpack__(stream=<torch's current stream>)`, so JAX makes torch's
current stream wait for the array's ready event. Torch runs a backward on the
stream of its forward, so the cotangents and gradients follow the same
order. Each JAX call hands a result to torch's stream before torch can run
the optimizer, so an in-place update is ordered after JAX's reads of that
buffer; a torch tensor viewed by JAX stays alive (the DLPack capsule holds
it) until JAX releases the buffer, after its last use. So there is no
`block_until_ready` on CUDA at all (it would serialise every call with the
host); the CPU export path above is the only place that waits, because a CPU
tensor is read by torch at once. The cached parameter views skip DLPack's
stream hand-over, but every call imports its inputs through DLPack first,
which orders JAX's stream after torch's current one, so an optimizer's
in-place update queued before the call is seen by it. Inputs on another
device than the layer's variables (a CPU tensor given to a layer on CUDA)
are moved to the variables' device, and their gradients moved back.

torch.compile and torch.export (Keras's `jit_compile=True` on the torch
backend): while torch traces, the layer call goes to `layer_call` (the
layer's hook), which captures it as one opaque operator,
`torch.ops.jaxlayer.call`, a `torch.library.custom_op` whose fake
implementation takes its shapes from `jax.eval_shape` (a symbolic batch
dimension maps to torch's symbolic size), with its gradient registered
(`register_autograd`) as a second operator, `torch.ops.jaxlayer.call_vjp`,
that recomputes the forward inside one JAX call. Operators take only
tensors and integers, so each call site (layer, training flag, input and
rng structure) is registered under an integer, in an index of weak
references: the site belongs to its layer and goes with it. No graph break
inside the layer. What cannot be captured (an input or rng structure other
than tensors in tuples, lists, dicts and NamedTuples, a device JAX does not
serve) runs eagerly with one warning, a graph break at the layer.

torch.export is the exception: a program may run in another process, where
no call site exists, so while torch.export traces, the call becomes
`torch.ops.jaxlayer.call_exported` instead, whose arguments carry the
site's computation itself (its `jax.export` artifact as an int8 tensor
constant, and its sha256); see `jaxlayer.bridges.torch_export`.

Module-level state: the `counters`, the probed DLPack functions, whether XLA
refused the CPU options, and the weak index of call sites; everything else
is in the layer's pure functions.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import itertools
import os
import warnings
import weakref
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
from torch.utils import dlpack as _torch_dlpack

from jaxlayer.bridges import torch_export

#: Counts, for tests and debugging: `forward_traces` (the no-gradient
#: forward), `vjp_traces` (the forward that returns residuals),
#: `backward_traces`, `jit_functions` (compiled functions made), `views`
#: (JAX views of parameters and state made through DLPack), `evictions`
#: (signatures dropped by the LRU), `forwarded_residuals` (residuals read
#: again from the call's arguments), `op_calls`/`op_vjp_calls` (runs of the
#: torch.compile operators), `eager_fallbacks`.
counters: collections.Counter = collections.Counter()

#: Compiled signatures kept per pure function (least recently used dropped).
MAX_SIGNATURES = 16

# With 64-bit types disabled, JAX would turn these into their 32-bit kinds.
_NARROW = {
    torch.int64: torch.int32,
    torch.float64: torch.float32,
    torch.complex128: torch.complex64,
}
_FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_SEED_DTYPES = frozenset({torch.int32, torch.uint32})


# -- JAX's CPU client -------------------------------------------------------


def _configure_cpu_client() -> None:
    """Turns JAX's CPU async dispatch off if JAX has no CPU client yet.

    Read by JAX when it makes its CPU client (the first array or device
    query); after that it changes nothing, so it is set only if the user did
    not choose (`JAX_CPU_ENABLE_ASYNC_DISPATCH` unset).
    """
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
        return
    try:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except Exception:  # noqa: BLE001 - an older or newer JAX without it
        pass


_configure_cpu_client()


# -- DLPack -----------------------------------------------------------------


def _cpu_importer() -> Callable[[torch.Tensor], jax.Array]:
    """A torch CPU tensor -> JAX array function, zero-copy.

    `jax.dlpack.from_dlpack` spends most of its 30-115 us in Python checks;
    on CPU the bridge calls the extension underneath it directly (4 us), after
    checking once that it shares the buffer. Falls back to the public API if
    the private one is missing or behaves differently.
    """

    def public(t):
        return jax.dlpack.from_dlpack(t)

    try:
        from jax._src.lib import _jax, jaxlib_extension_version

        device = jax.devices("cpu")[0]
        to_buffer = _jax.dlpack_managed_tensor_to_buffer
        to_dlpack = _torch_dlpack.to_dlpack
        cpu = 1  # DLDeviceType.kDLCPU
        if jaxlib_extension_version >= 467:

            def fast(t):
                return to_buffer(to_dlpack(t), device, None, None, cpu)

        else:

            def fast(t):
                return to_buffer(to_dlpack(t), device, None, None)

        probe = torch.arange(8, dtype=torch.float32)
        array = fast(probe)
        if (
            not isinstance(array, jax.Array)
            or array.unsafe_buffer_pointer() != probe.data_ptr()
            or array.dtype != np.float32
            or not np.array_equal(np.asarray(array), probe.numpy())
        ):
            return public
        return fast
    except Exception:  # noqa: BLE001 - any mismatch: use the public API
        return public


def _cpu_exporter() -> Callable[[jax.Array], torch.Tensor]:
    """A JAX CPU array -> torch tensor function, zero-copy.

    Both paths wait until the array is ready (DLPack export on the CPU has
    no stream to order on).
    """

    def public(a):
        return torch.from_dlpack(a)

    try:
        from jax._src.lib import _jax

        to_capsule = _jax.buffer_to_dlpack_managed_tensor
        from_dlpack = _torch_dlpack.from_dlpack

        def fast(a):
            return from_dlpack(to_capsule(a))

        probe = jax.numpy.arange(8, dtype=np.float32) + 1
        tensor = fast(probe)
        if tensor.data_ptr() != probe.unsafe_buffer_pointer() or not (
            np.array_equal(tensor.numpy(), np.asarray(probe))
        ):
            return public
        return fast
    except Exception:  # noqa: BLE001 - any mismatch: use the public API
        return public


_import_cpu = _cpu_importer()
_export_cpu = _cpu_exporter()


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, contiguous and of a dtype JAX keeps (no copy if it is)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    narrow = _NARROW.get(t.dtype)
    if narrow is not None and not jax.config.jax_enable_x64:
        t = t.to(narrow)
    return t


def _realign(t: torch.Tensor) -> bool:
    """Moves a leaf tensor's data to memory JAX can view in place, once.

    XLA views a CPU buffer without copying only when it is 64-byte aligned;
    Keras's torch variables made from NumPy arrays often are not (NumPy aligns
    to 16 bytes). A leaf tensor that owns its whole storage gets an aligned
    copy of its data (`t.data = ...`, what `Module.to` does): the same tensor
    object, so optimizers and Keras variables keep working on it in place.

    Returns:
        Whether the data was moved.
    """
    if not (t.is_leaf and t.is_contiguous() and t.storage_offset() == 0):
        return False
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    if _NARROW.get(t.dtype) is not None and not jax.config.jax_enable_x64:
        return False
    with torch.no_grad():
        t.data = t.detach().clone(memory_format=torch.contiguous_format)
    counters["realigned"] += 1
    return True


def _to_jax(t: torch.Tensor, device_type: str) -> jax.Array:
    t = _prepare(t)
    if device_type == "cpu":
        # The extension behind the fast path would read another device's
        # pointer as host memory: never hand it one.
        return _import_cpu(t if t.is_cpu else t.cpu())
    # CUDA: JAX asks torch (`__dlpack__(stream=...)`) to order its stream
    # after torch's current one; no host synchronisation.
    return jax.dlpack.from_dlpack(t)


def _to_torch(a: jax.Array, device_type: str) -> torch.Tensor:
    if device_type == "cpu":
        return _export_cpu(a)  # waits until `a` is ready
    # CUDA: torch passes its current stream to `a.__dlpack__`, which makes
    # that stream wait for `a`; no host synchronisation.
    return torch.from_dlpack(a)


def _export(arrays, device_type: str) -> list[torch.Tensor]:
    """JAX results as torch tensors; a result sharing a buffer is cloned.

    The compiled functions never return a buffer of their arguments (no
    donation), but two results may share one.
    """
    tensors = []
    seen = set()
    for a in arrays:
        t = _to_torch(a, device_type)
        ptr = t.data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        else:
            seen.add(ptr)
        tensors.append(t)
    return tensors


def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, np.dtype(dtype).name)


# -- devices ----------------------------------------------------------------

_JAX_PLATFORMS: dict = {}


def _jax_serves(device_type: str) -> bool:
    """Whether JAX has a device of this torch device type (`cuda`)."""
    served = _JAX_PLATFORMS.get(device_type)
    if served is None:
        try:
            served = bool(jax.devices("gpu" if device_type == "cuda" else device_type))
        except RuntimeError:
            served = False
        _JAX_PLATFORMS[device_type] = served
    return served


def _placement(fn, entry, tensors):
    """(device type JAX reads from, torch device to move results to or None).

    Tensors on a device JAX does not serve (CUDA with a CPU-only jaxlib) go
    through the CPU, with a copy each way and a warning once.
    """
    device = None
    for t in tensors:
        device = t.device
        break
    if device is None or device.type == "cpu":
        return "cpu", None
    if device.type == "meta":
        raise RuntimeError(
            f"{fn.owner}: cannot run `call_fn` on torch tensors of the 'meta' "
            "device (symbolic tensors); call the layer on real tensors."
        )
    if _jax_serves(device.type):
        return device.type, None
    if not entry.warned_device:
        warnings.warn(
            f"{fn.owner}: the torch tensors are on {device} but JAX has no "
            f"{device.type} device; they are copied to the CPU and back on "
            "every call. Install a jaxlib for that device (for example "
            "`pip install jax[cuda12]`) to run zero-copy.",
            stacklevel=4,
        )
        entry.warned_device = True
    return "cpu", device


# -- compiled functions and cached views ------------------------------------


class _Entry:
    """What the bridge keeps per pure function: compiled code and views."""

    __slots__ = ("fn", "signatures", "views", "param_dtypes", "warned_device")

    def __init__(self, fn):
        self.fn = fn
        # key -> _Signature, least recently used first.
        self.signatures: collections.OrderedDict = collections.OrderedDict()
        # Per position of params + state: (tensor, data_ptr, shape, view).
        self.views: list = []
        # The JAX dtypes of the parameter views (part of every signature).
        self.param_dtypes: tuple = ()
        self.warned_device = False

    def signature(self, key, make):
        """The signature for `key`, made with `make()` on a miss (LRU)."""
        signatures = self.signatures
        sig = signatures.get(key)
        if sig is None:
            sig = signatures[key] = make()
            if len(signatures) > MAX_SIGNATURES:
                signatures.popitem(last=False)
                counters["evictions"] += 1
        elif len(signatures) > 1:
            signatures.move_to_end(key)
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
        view = _to_jax(t, device_type)
        counters["views"] += 1
        if view.unsafe_buffer_pointer() != ptr and _realign(t):
            ptr = t.data_ptr()
            view = _to_jax(t, device_type)
        # Only a view that shares the tensor's buffer is kept: a copy made
        # on the way would go stale when torch updates in place.
        if view.unsafe_buffer_pointer() == ptr or not t.numel():
            self.views[i] = (t, ptr, t.shape, view)
        else:
            self.views[i] = None
        return view


def _cast_params(params, cast):
    """Floating parameters cast to `cast` (inside JAX), others as they are."""
    if cast is None:
        return list(params)
    dtype = jax.dtypes.canonicalize_dtype(cast)
    return [
        p.astype(dtype)
        if jax.numpy.issubdtype(p.dtype, jax.numpy.floating) and p.dtype != dtype
        else p
        for p in params
    ]


def _split(flat, counts):
    out, start = [], 0
    for n in counts:
        out.append(list(flat[start : start + n]))
        start += n
    return out


class _Plain:
    """The compiled forward of one signature, without gradient."""

    __slots__ = ("forward",)

    def __init__(self, fn, cast, counts, example):
        def forward(*flat):
            counters["forward_traces"] += 1
            params, inputs, state, rng = _split(flat, counts)
            return fn(_cast_params(params, cast), inputs, state, rng)

        counters["jit_functions"] += 1
        self.forward = _compile(forward, example)


class _Grad:
    """The forward-with-residuals and the backward of one signature.

    The forward returns `(outputs, new_state, residuals)`. A residual that is
    one of the call's parameters, inputs or seeds is not returned: `refs`
    lists, per residual, `(True, index into the call's flat arguments)` or
    `(False, index into the returned residuals)`, and the backward is given
    the arguments it reads (`args`) again. State is never read again that
    way: the layer assigns the new state in place right after the call.
    """

    __slots__ = ("forward", "backward", "refs", "args", "float_outputs", "treedef")

    def __init__(self, fn, cast, counts, diff, example):
        self.refs = self.args = self.float_outputs = self.treedef = None
        n_params, n_inputs, n_state, _ = counts
        no_forward = range(n_params + n_inputs, n_params + n_inputs + n_state)
        sig = self

        def forward(*flat):
            counters["vjp_traces"] += 1
            flat = list(flat)

            def differentiable(values):
                full = list(flat)
                for i, v in zip(diff, values, strict=True):
                    full[i] = v
                params, inputs, state, rng = _split(full, counts)
                return fn(_cast_params(params, cast), inputs, state, rng)

            outputs, vjp_fn, new_state = jax.vjp(
                differentiable, [flat[i] for i in diff], has_aux=True
            )
            leaves, sig.treedef = jax.tree_util.tree_flatten(vjp_fn)
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
            sig.refs, sig.args = refs, args
            sig.float_outputs = [
                (jax.numpy.issubdtype(o.dtype, jax.numpy.inexact), o.shape)
                for o in outputs
            ]
            return outputs, new_state, residuals

        counters["jit_functions"] += 2
        self.forward = _compile(forward, example)
        positions = {i: k for k, i in enumerate(self.args)}
        float_outputs = self.float_outputs

        def backward(args, residuals, cotangents):
            counters["backward_traces"] += 1
            leaves = [
                args[positions[i]] if is_arg else residuals[i] for is_arg, i in sig.refs
            ]
            vjp_fn = jax.tree_util.tree_unflatten(sig.treedef, leaves)
            cts = iter(cotangents)
            full = [
                next(cts) if floating else np.zeros(shape, jax.dtypes.float0)
                for floating, shape in float_outputs
            ]
            (grads,) = vjp_fn(full)
            return grads

        # Compiled at its first call, for the residuals' shapes, with the
        # options the forward was compiled with (none if XLA refused them).
        self.backward = jax.jit(backward, compiler_options=_options_for(example))


def _compile(f, example):
    """`f` compiled for the arguments `example` (ahead of time, bounded).

    On the CPU, with `_cpu_compiler_options()`; if XLA refuses them, without
    (and never again in this process).
    """
    lowered = jax.jit(f).lower(*example)
    options = _options_for(example)
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


def _options_for(example) -> dict | None:
    """The compile options for arguments `example`: the CPU's, or None."""
    return _cpu_compiler_options() if _on_cpu(example) else None


# -- XLA's options for the bridge's CPU executables --------------------------

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default YNNPACK fusions (dots, reductions and convolutions),
# less the convolutions.
_YNN_WITHOUT_CONVOLUTIONS = (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
)
# Set when XLA refused the options once: they are not given again.
_cpu_options_refused = False


def _cpu_compiler_options() -> dict | None:
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
    if _jaxlib_minor() != (0, 10):
        return None
    return {_YNN_FUSIONS: _YNN_WITHOUT_CONVOLUTIONS}


@functools.cache
def _jaxlib_minor() -> tuple[int, ...]:
    """jaxlib's `(major, minor)` version."""
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _on_cpu(example) -> bool:
    """Whether the JAX arrays of `example` (or JAX's default device) are CPU."""
    for leaf in jax.tree_util.tree_leaves(example):
        devices = getattr(leaf, "devices", None)
        if devices is not None:
            return all(d.platform == "cpu" for d in devices())
    return jax.default_backend() == "cpu"


class _Call:
    """One differentiable call, carried from the forward to the backward."""

    __slots__ = (
        "sig",
        "flat",
        "device_type",
        "owner",
        "new_state",
        "args",
        "residuals",
    )

    def __init__(self, sig, flat, device_type, owner):
        self.sig = sig
        self.flat = flat
        self.device_type = device_type
        self.owner = owner
        self.new_state = self.args = self.residuals = None


class _JaxFunction(torch.autograd.Function):
    """Autograd rule: the compiled forward keeps residuals, the backward
    applies them to the output cotangents (one JAX call for all gradients)."""

    @staticmethod
    def forward(ctx, call: _Call, saved, *diff_tensors):
        sig = call.sig
        outputs, new_state, residuals = sig.forward(*call.flat)
        flat = call.flat
        call.args = [flat[i] for i in sig.args]
        call.flat = None
        device_type = call.device_type
        outs = _export(outputs, device_type)
        call.new_state = _export(new_state, device_type)
        if not outs and not call.new_state:
            jax.block_until_ready(residuals)
        call.residuals = residuals
        ctx.call = call
        ctx.save_for_backward(*saved)
        non_diff = [
            t
            for t, (floating, _) in zip(outs, sig.float_outputs, strict=True)
            if not floating
        ]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.compiler.disable  # run by autograd, maybe inside a compiled frame
    def backward(ctx, *grad_outputs):
        call = ctx.call
        saved = ctx.saved_tensors  # raises if changed in place since
        if call.residuals is None:
            raise RuntimeError(
                f"{call.owner}: backward through the JAX function a second "
                "time; pass `retain_graph=True` to the first backward."
            )
        sig = call.sig
        device_type = call.device_type
        cotangents = [
            _to_jax(g, device_type)
            for g, (floating, _) in zip(grad_outputs, sig.float_outputs, strict=True)
            if floating
        ]
        grads = sig.backward(call.args, call.residuals, cotangents)
        result = _export(grads, device_type)
        diff_tensors = saved[: len(result)]
        for i, t in enumerate(diff_tensors):
            # An input moved to the parameters' device gets its gradient
            # back on its own device.
            if result[i].dtype != t.dtype or result[i].device != t.device:
                result[i] = result[i].to(t.device, t.dtype)
        return (None, None, *result)


def _device_type(fn, entry, params, inputs, state):
    """The device type JAX reads from, or None to go through CPU copies.

    The variables decide (they live on Keras's device); inputs elsewhere are
    moved to them in `_arguments`.
    """
    first = next(itertools.chain(params, state, inputs), None)
    if first is None or first.is_cpu:
        return "cpu"
    device_type, target = _placement(fn, entry, (first,))
    return None if target is not None else device_type


def _arguments(entry, params, inputs, state, rng, device_type):
    """The flat JAX arguments `params + inputs + state + rng` and their key.

    Inputs and seeds on another device than the parameters (a CPU tensor
    given to a layer whose variables are on CUDA) are moved to theirs, as
    Keras's `convert_to_tensor` would: one JAX call reads one device.
    """
    j_params = entry.cached_views(params, 0, device_type)
    j_state = entry.cached_views(state, len(params), device_type)
    anchor = params or state
    if anchor:
        device = anchor[0].device
        inputs = [t if t.device == device else t.to(device) for t in inputs]
        rng = [t if t.device == device else t.to(device) for t in rng]
    flat = (
        *j_params,
        *[_to_jax(t, device_type) for t in inputs],
        *j_state,
        *[_to_jax(t, device_type) for t in rng],
    )
    # Shapes and dtypes of everything (the compiled functions take exactly
    # these); the JAX dtypes, after any narrowing of 64-bit types.
    key = tuple((v.shape, v.dtype) for v in flat)
    return flat, key


# Under `torch.jit.trace` a layer call is one `jaxlayer::call_exported` node
# (`layer_call`); a call that cannot be one would be baked in as constants.
_JIT_TRACE = (
    "{owner}: `torch.jit.trace` (what Keras's torch-backend exports to "
    "`onnx` and `openvino` use) records a jaxlayer layer's call as one "
    "operator, which it cannot do for this call ({reason}). Pass the layer "
    "tensors (in tuples, lists, dicts or NamedTuples) on a device JAX has, "
    "or export the model from the jax backend (`onnx`) or the tensorflow "
    "backend (`onnx`, `openvino`), where jaxlayer converts the layer (a "
    "`.keras` file saved on torch loads there)."
)


def run(
    fn: Callable,
    params: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    state: Sequence[torch.Tensor],
    rng: Sequence[torch.Tensor],
    cast: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Runs the pure JAX function `fn` on torch tensors, with autograd.

    Args:
        fn: the layer's pure function `fn(params, inputs, state, rng) ->
            (outputs, new_state)` on lists of JAX arrays.
        params: the parameter tensors (Keras variable values, or the stored
            tensors when `cast` is given).
        inputs: the input tensors.
        state: the state tensors.
        rng: the seed tensors (int32, shape [2]) or an empty list.
        cast: the dtype the floating `params` are cast to inside JAX before
            `fn` sees them (mixed precision), or None.

    Returns:
        `(outputs, new_state)`: lists of torch tensors on the device of the
        arguments. `outputs` are differentiable with respect to the floating
        `params` and `inputs` that require grad; `new_state` carries no
        gradient.

    Raises:
        ValueError: called while `torch.jit.trace` records (where
            `layer_call` records the call as one operator instead).
    """
    if torch.jit.is_tracing():  # `layer_call` records the call instead
        reason = "it did not reach the layer's `call`"
        raise ValueError(_JIT_TRACE.format(owner=fn.owner, reason=reason))
    entry = fn.slot("torch", lambda: _Entry(fn))
    device_type = _device_type(fn, entry, params, inputs, state)
    if device_type is None:
        return _run_through_cpu(fn, params, inputs, state, rng, cast)
    flat, shapes = _arguments(entry, params, inputs, state, rng, device_type)
    counts = (len(params), len(inputs), len(state), len(rng))
    diff = ()
    if torch.is_grad_enabled():
        diff = tuple(
            i
            for i, t in enumerate(itertools.chain(params, inputs))
            if t.requires_grad and t.dtype in _FLOATING
        )
    key = (diff, shapes, counts, cast)
    if not diff:
        sig = entry.signature(key, lambda: _Plain(fn, cast, counts, flat))
        outputs, new_state = sig.forward(*flat)
        return _export(outputs, device_type), _export(new_state, device_type)

    sig = entry.signature(key, lambda: _Grad(fn, cast, counts, diff, flat))
    tensors = (*params, *inputs)
    diff_tensors = [tensors[i] for i in diff]
    # Saved for backward (torch's in-place check): the differentiated
    # tensors, then every other tensor the backward reads through a view.
    saved = diff_tensors + [
        tensors[i] for i in sig.args if i < len(tensors) and i not in diff
    ]
    call = _Call(sig, flat, device_type, fn.owner)
    outputs = _JaxFunction.apply(call, saved, *diff_tensors)
    return list(outputs), call.new_state


def _run_through_cpu(fn, params, inputs, state, rng, cast):
    """`run` for tensors on a device JAX lacks: through CPU copies."""
    target = (inputs[0] if inputs else params[0]).device
    cpu = [[t.to("cpu") for t in group] for group in (params, inputs, state, rng)]
    outputs, new_state = run(fn, *cpu, cast=cast)
    return [t.to(target) for t in outputs], [t.to(target) for t in new_state]


# -- torch.compile and torch.export ------------------------------------------
#
# While torch traces, a layer call becomes `torch.ops.jaxlayer.call(site,
# params, inputs, state, rng)`. `site` is an integer naming the call site (the
# layer, training flag, input and rng structures, parameter cast) in a weak
# index; the site belongs to its layer. The operator's real implementation
# runs the layer's current pure function for that site (the same compiled
# functions and views as the eager path); its fake implementation computes
# the output shapes with `jax.eval_shape`.

# Call sites by integer, weakly: each is owned by its layer.
_SITES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SITE_IDS = itertools.count(1)


class _Meta:
    """A shape (None for a symbolic dimension) and a dtype name."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = shape
        self.dtype = dtype


def _jax_dtype(dtype: torch.dtype):
    return jax.dtypes.canonicalize_dtype(
        jax.numpy.dtype(str(dtype).removeprefix("torch."))
    )


def _py_flatten(tree, leaves):
    """Python-only flatten that torch.compile can trace, in JAX's leaf order.

    Appends the tensors of `tree` to `leaves` and returns a hashable key of
    its structure, or None for a structure it does not know (anything but
    tensors in tuples, lists, dicts, NamedTuples and None).
    """
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return "L"
    if tree is None:
        return "N"
    kind = type(tree)
    if kind is tuple or kind is list:
        children = tuple(_py_flatten(x, leaves) for x in tree)
        tag = "T" if kind is tuple else "l"
    elif kind is dict:
        keys = tuple(sorted(tree))
        children = tuple(_py_flatten(tree[k], leaves) for k in keys)
        tag = ("D", keys)
    elif isinstance(tree, tuple) and hasattr(kind, "_fields"):
        children = tuple(_py_flatten(x, leaves) for x in tree)
        tag = ("NT", kind)
    else:
        return None
    if None in children:
        return None
    return (tag, children)


def _placeholder(key):
    """A tree of the structure `key` (from `_py_flatten`) with 0 leaves."""
    if key == "L":
        return 0
    if key == "N":
        return None
    tag, children = key
    values = [_placeholder(c) for c in children]
    if tag == "T":
        return tuple(values)
    if tag == "l":
        return values
    if tag[0] == "D":
        return dict(zip(tag[1], values, strict=True))
    return tag[1](*values)


def _out_spec(treedef):
    """The structure of `treedef` as a Python constant for `_py_build`, or
    None for node types other than tuples, lists, dicts, NamedTuples."""
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


def _py_build(spec, leaves):
    """The tree `spec` (from `_out_spec`) with `leaves`; traceable."""
    # `isinstance`, not `type(...) is int`: TorchDynamo cannot guard on the
    # builtin `int` looked up from this module.
    if isinstance(spec, int):
        return leaves[spec]
    if spec == "N":
        return None
    tag, children = spec
    values = [_py_build(c, leaves) for c in children]
    if tag == "T":
        return tuple(values)
    if tag == "l":
        return values
    if tag[0] == "D":
        return dict(zip(tag[1], values, strict=True))
    return tag[1](*values)


class _Site:
    """One call site: a layer, a training flag, input and rng structures."""

    __slots__ = (
        "__weakref__",
        "id",
        "layer",
        "owner",
        "training",
        "in_def",
        "rng_def",
        "cast",
        "out_def",
        "out",
    )

    def __init__(self, functions, training, in_key, rng_key, cast):
        self.id = next(_SITE_IDS)
        # (The layer's `Computation`, which lives as long as the layer.)
        self.layer = weakref.ref(functions)
        self.owner = functions.owner
        self.training = training
        self.in_def = jax.tree_util.tree_structure(_placeholder(in_key))
        self.rng_def = jax.tree_util.tree_structure(_placeholder(rng_key))
        self.cast = cast
        self.out_def = None
        # (number of outputs, output structure for `_py_build` or None).
        self.out = None

    def pure_fn(self, params, inputs, state, rng):
        """The layer's current pure function for this site."""
        functions = self.layer()
        if functions is None:
            raise RuntimeError(
                f"{self.owner} was deleted; a function torch.compile traced "
                "through it cannot run any more."
            )
        fn = functions.get(
            self.training,
            self.in_def,
            self.rng_def,
            self.example(params, inputs, state, rng),
        )
        if self.out_def is None:
            self.out_def = fn.out_treedef
            self.out = (fn.out_treedef.num_leaves, _out_spec(fn.out_treedef))
        elif fn.out_treedef != self.out_def:
            raise RuntimeError(
                f"{self.owner}: the structure of `call_fn`'s outputs changed "
                f"({self.out_def} -> {fn.out_treedef}) after torch.compile "
                "traced the layer; call `torch._dynamo.reset()` (or compile "
                "the model again) after changing `call_fn`."
            )
        return fn

    def example(self, params, inputs, state, rng):
        """Shapes and dtypes as `fn` takes them (None: symbolic size)."""

        def meta(t, dtype=None):
            shape = tuple(d if isinstance(d, int) else None for d in t.shape)
            return _Meta(shape, dtype or _jax_dtype(t.dtype).name)

        cast = self.cast
        return (
            [meta(p, cast if cast and p.dtype in _FLOATING else None) for p in params],
            [meta(x) for x in inputs],
            [meta(x) for x in state],
            [meta(x) for x in rng],
        )

    def fake(self, params, inputs, state, rng):
        """Fake outputs: shapes from `jax.eval_shape`, symbolic sizes kept."""
        fn = self.pure_fn(params, inputs, state, rng)
        p, x, s, r = self.example(params, inputs, state, rng)
        concrete = [
            [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in group]
            for group in (p, s, r)
        ]
        sizes = {}  # symbol name -> torch.SymInt
        try:
            scope = jax.export.SymbolicScope()
            structs = []
            for t, m in zip(inputs, x, strict=True):
                dims = []
                for d, known in zip(t.shape, m.shape, strict=True):
                    if known is not None:
                        dims.append(str(known))
                        continue
                    name = str(d)
                    if not name.isidentifier():
                        raise ValueError(name)
                    sizes[name] = d
                    dims.append(name)
                shape = jax.export.symbolic_shape(",".join(dims), scope=scope)
                structs.append(jax.ShapeDtypeStruct(shape, m.dtype))
            out = jax.eval_shape(fn, concrete[0], structs, concrete[1], concrete[2])
            shapes = [
                tuple(d if isinstance(d, int) else sizes[str(d)] for d in o.shape)
                for o in (*out[0], *out[1])
            ]
            dtypes = [o.dtype for o in (*out[0], *out[1])]
        except Exception:  # noqa: BLE001 - specialise the sizes instead
            structs = [
                jax.ShapeDtypeStruct(tuple(int(d) for d in t.shape), m.dtype)
                for t, m in zip(inputs, x, strict=True)
            ]
            out = jax.eval_shape(fn, concrete[0], structs, concrete[1], concrete[2])
            shapes = [o.shape for o in (*out[0], *out[1])]
            dtypes = [o.dtype for o in (*out[0], *out[1])]
        anchor = next(iter((*inputs, *params, *state, *rng)), None)
        device = anchor.device if anchor is not None else torch.device("cpu")
        return [
            torch.empty(shape, dtype=_torch_dtype(dtype), device=device)
            for shape, dtype in zip(shapes, dtypes, strict=True)
        ]


def _site(site_id: int) -> _Site:
    site = _SITES.get(site_id)
    if site is None:
        raise RuntimeError(
            f"jaxlayer: the layer of call site {site_id} was deleted; a "
            "function torch.compile traced through it cannot run any more."
        )
    return site


@torch.compiler.assume_constant_result
def _site_id(functions, training, in_key, rng_key, cast) -> int:
    """The integer naming a call site, made on first use (run while torch
    traces, its result baked into the graph)."""
    sites = functions.slots.setdefault("torch", {})
    key = (training, in_key, rng_key, cast)
    site = sites.get(key)
    if site is None:
        site = sites[key] = _Site(functions, training, in_key, rng_key, cast)
        _SITES[site.id] = site
    return site.id


@torch.compiler.assume_constant_result
def _site_out(site_id: int):
    """`(number of outputs, output structure or None)`, known once the fake
    implementation of the site's operator has run."""
    return _site(site_id).out


def _described(tensors) -> tuple:
    """`(shape, dtype)` of each tensor, constants for `_site_artifact`
    (static sizes under `torch.jit.trace`, whose sizes are traced values)."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return tuple((tuple(int(d) for d in t.shape), t.dtype) for t in tensors)
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@torch.compiler.assume_constant_result
def _site_artifact(site_id, params, inputs, state, rng) -> str:
    """The sha256 of the site's computation exported at the traced shapes
    (`torch_export.artifact_for`), from `(shape, dtype)` per tensor; run
    while torch.export traces."""
    site = _site(site_id)
    params, inputs, state, rng = (
        [torch_export.Described(*d) for d in group]
        for group in (params, inputs, state, rng)
    )
    fn = site.pure_fn(params, inputs, state, rng)
    try:
        return torch_export.artifact_for(fn, site.cast, params, inputs, state, rng)
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{site.owner}: torch.export (format='torch', and the LiteRT and "
            "ONNX exporters that trace with it) puts the layer's computation "
            "in the program with `jax.export`, which failed: "
            f"{type(err).__name__}: {first[:300]}. The model still runs in "
            "this process, eagerly or under torch.compile; to deploy it, make "
            "`call_fn` exportable by `jax.export` (no host callbacks), or give "
            "torch.export static shapes where the error names a dimension."
        ) from err


@torch.compiler.assume_constant_result
def _artifact_tensor(sha: str) -> torch.Tensor:
    """The artifact `sha` as an int8 tensor: a constant of the traced
    program (int8, not uint8: LiteRT's MLIR takes signless integers only)."""
    blob = bytearray(torch_export.artifact_blob(sha))
    return torch.frombuffer(blob, dtype=torch.int8)


def _plain_run(site, params, inputs, state, rng):
    """The operator's real implementation: the plain forward, flat."""
    fn = site.pure_fn(params, inputs, state, rng)
    entry = fn.slot("torch", lambda: _Entry(fn))
    device_type = _device_type(fn, entry, params, inputs, state)
    if device_type is None:
        raise RuntimeError(f"{fn.owner}: unreachable device")  # pragma: no cover
    flat, shapes = _arguments(entry, params, inputs, state, rng, device_type)
    counts = (len(params), len(inputs), len(state), len(rng))
    cast = site.cast
    key = ((), shapes, counts, cast)
    sig = entry.signature(key, lambda: _Plain(fn, cast, counts, flat))
    outputs, new_state = sig.forward(*flat)
    return _export((*outputs, *new_state), device_type)


class _Recompute:
    """The VJP of one signature, recomputing the forward (one JAX call)."""

    __slots__ = ("vjp",)

    def __init__(self, fn, cast, counts, diff, example, cotangents):
        def vjp(flat, cts):
            counters["backward_traces"] += 1
            flat = list(flat)

            def outputs_of(values):
                full = list(flat)
                for i, v in zip(diff, values, strict=True):
                    full[i] = v
                params, inputs, state, rng = _split(full, counts)
                return fn(_cast_params(params, cast), inputs, state, rng)[0]

            outputs, vjp_fn = jax.vjp(outputs_of, [flat[i] for i in diff])
            cts = iter(cts)
            full = [
                next(cts)
                if jax.numpy.issubdtype(o.dtype, jax.numpy.inexact)
                else np.zeros(o.shape, jax.dtypes.float0)
                for o in outputs
            ]
            (grads,) = vjp_fn(full)
            return grads

        counters["jit_functions"] += 1
        self.vjp = _compile(vjp, (example, cotangents))


def _vjp_run(site, params, inputs, state, rng, cotangents, diff):
    fn = site.pure_fn(params, inputs, state, rng)
    entry = fn.slot("torch", lambda: _Entry(fn))
    device_type = _device_type(fn, entry, params, inputs, state)
    flat, shapes = _arguments(entry, params, inputs, state, rng, device_type)
    cts = [_to_jax(g, device_type) for g in cotangents]
    counts = (len(params), len(inputs), len(state), len(rng))
    cast = site.cast
    key = (
        ("vjp", tuple(diff)),
        shapes,
        tuple((c.shape, c.dtype) for c in cts),
        counts,
        cast,
    )
    sig = entry.signature(
        key, lambda: _Recompute(fn, cast, counts, tuple(diff), flat, cts)
    )
    grads = _export(sig.vjp(flat, cts), device_type)
    tensors = (*params, *inputs)
    return [
        g if g.dtype == tensors[i].dtype else g.to(tensors[i].dtype)
        for g, i in zip(grads, diff, strict=True)
    ]


def _define_operators():
    """`torch.ops.jaxlayer.call` and `call_vjp` (once per process)."""

    # Explicit schemas: this module's annotations are strings.
    @torch.library.custom_op(
        "jaxlayer::call",
        mutates_args=(),
        schema="(int site, Tensor[] params, Tensor[] inputs, Tensor[] state, "
        "Tensor[] rng) -> Tensor[]",
    )
    def call_op(site, params, inputs, state, rng):
        counters["op_calls"] += 1
        return _plain_run(_site(site), params, inputs, state, rng)

    @call_op.register_fake
    def _(site, params, inputs, state, rng):
        return _site(site).fake(params, inputs, state, rng)

    @torch.library.custom_op(
        "jaxlayer::call_vjp",
        mutates_args=(),
        schema="(int site, Tensor[] params, Tensor[] inputs, Tensor[] state, "
        "Tensor[] rng, Tensor[] cotangents, int[] diff) -> Tensor[]",
    )
    def vjp_op(site, params, inputs, state, rng, cotangents, diff):
        counters["op_vjp_calls"] += 1
        return _vjp_run(_site(site), params, inputs, state, rng, cotangents, diff)

    @vjp_op.register_fake
    def _(site, params, inputs, state, rng, cotangents, diff):
        tensors = (*params, *inputs)
        return [tensors[i].new_empty(tensors[i].shape) for i in diff]

    def setup_context(ctx, inputs, output):
        site, params, x, state, rng = inputs
        tensors = (*params, *x)
        ctx.site = site
        ctx.diff = [
            i for i, t in enumerate(tensors) if t.requires_grad and t.dtype in _FLOATING
        ]
        ctx.counts = (len(params), len(x), len(state), len(rng))
        n_out = _site(site).out[0]
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in output[:n_out]]
        # State and seeds as they were: the layer assigns the new state in
        # place right after the call.
        ctx.save_for_backward(
            *params, *x, *[t.clone() for t in state], *[t.clone() for t in rng]
        )

    def backward(ctx, grads):
        params, x, state, rng = _split(ctx.saved_tensors, ctx.counts)
        cotangents = [
            (g if g is not None else torch.zeros(shape, dtype=dtype, device=device))
            for g, (shape, dtype, device) in zip(grads, ctx.outputs, strict=False)
            if dtype in _FLOATING
        ]
        diff = ctx.diff
        result = vjp_op(ctx.site, params, x, state, rng, cotangents, diff)
        n_params = len(params)
        g_params = [None] * n_params
        g_inputs = [None] * len(x)
        for i, g in zip(diff, result, strict=True):
            if i < n_params:
                g_params[i] = g
            else:
                g_inputs[i - n_params] = g
        # One entry per input of the operator, lists as lists.
        return (
            None,
            g_params,
            g_inputs,
            [None] * len(state),
            [None] * len(rng),
        )

    call_op.register_autograd(backward, setup_context=setup_context)
    return call_op


_call_op = _define_operators()


def layer_call(functions, inputs, training):
    """`JaxLayer.call`'s hook: the call as one operator while torch traces.

    `functions` is the layer's `_computation.Computation`: its pure functions
    and the values, rng and state assignment of a call.

    Returns NotImplemented outside torch.compile, torch.export and
    torch.jit.trace (the layer then runs its eager path, which calls `run`).
    Under torch.export and torch.jit.trace the call is one
    `jaxlayer::call_exported` node carrying the computation (torch.jit.trace:
    at the traced shapes).
    """
    jit_tracing = torch.jit.is_tracing()
    if not (jit_tracing or torch.compiler.is_compiling()):
        return NotImplemented

    training = bool(training)
    leaves: list = []
    in_key = _py_flatten(inputs, leaves)
    if in_key is None:
        return _eager_call(
            functions,
            inputs,
            training,
            "its inputs are not tensors in tuples, lists, dicts or NamedTuples",
        )
    for t in leaves:
        if not (t.is_cpu or (t.is_cuda and _jax_serves("cuda"))):
            return _eager_call(
                functions, inputs, training, f"JAX has no device for {t.device}"
            )
    rng: list = []
    rng_key = "N"
    if functions.has_rng():
        rng_key = _py_flatten(functions.rng(training), rng)
        if rng_key is None:
            return _eager_call(
                functions, inputs, training, "`_get_call_rng` returns non-tensors"
            )
        rng = [r if r.dtype in _SEED_DTYPES else r.to(torch.int32) for r in rng]
    # The layer's own values and cast, and its own state assignment (the
    # same as its eager `call`).
    params, state, cast = functions.values(True)  # run.casts_params
    site = _site_id(functions, training, in_key, rng_key, cast)
    if jit_tracing or torch.compiler.is_exporting():
        # A program that may run elsewhere: the computation goes in it.
        # Under `torch.jit.trace` (Keras's exports to onnx and openvino),
        # the same node, which TorchScript's ONNX exporter converts with
        # jaxlayer's symbolic (`export._torch_onnx`).
        if jit_tracing:
            from jaxlayer.export import _torch_onnx

            _torch_onnx.install()
        sha = _site_artifact(
            site, *[_described(g) for g in (params, leaves, state, rng)]
        )
        flat = torch_export.call(_artifact_tensor(sha), sha, params, leaves, state, rng)
    else:
        flat = _call_op(site, params, leaves, state, rng)
    n_out, spec = _site_out(site)
    functions.assign_state(flat[n_out:])
    outputs = flat[:n_out]
    if spec is None:
        return _eager_unflatten(site, outputs)
    return _py_build(spec, outputs)


@torch.compiler.disable
def _eager_call(functions, inputs, training, reason):
    """A layer call torch cannot capture: run eagerly (a graph break); under
    `torch.jit.trace`, which has no graph breaks, one clear error."""
    if torch.jit.is_tracing():
        raise ValueError(_JIT_TRACE.format(owner=functions.owner, reason=reason))
    counters["eager_fallbacks"] += 1
    warned = functions.slots.setdefault("torch warnings", set())
    if "call" not in warned:
        warned.add("call")
        warnings.warn(
            f"{functions.owner}: torch.compile cannot capture this call ({reason}); "
            "it runs eagerly, with a graph break at the layer.",
            stacklevel=3,
        )
    return functions.eager_call(inputs, training=training)


@torch.compiler.disable
def _eager_unflatten(site_id, outputs):
    """Outputs of a structure torch cannot build while tracing (a custom
    pytree node): unflattened eagerly, a graph break after the operator."""
    site = _site(site_id)
    functions = site.layer()
    warned = (
        functions.slots.setdefault("torch warnings", set())
        if functions is not None
        else set()
    )
    if "outputs" not in warned:
        warned.add("outputs")
        warnings.warn(
            f"{site.owner}: torch.compile cannot build `call_fn`'s outputs "
            f"({site.out_def}) while tracing; they are assembled eagerly, with "
            "a graph break after the layer's operator.",
            stacklevel=3,
        )
    return jax.tree_util.tree_unflatten(site.out_def, list(outputs))


@torch.compiler.disable
def untraced(f: Callable, *args):
    """`f(*args)`, never traced by torch.compile (the layer's eager calls).

    When torch.compile gives up on a frame (a graph break it cannot resume
    from, its recompile limit reached), it runs that frame as plain Python
    but still compiles the functions the frame calls, one by one; it would
    then trace into JAX itself (`jax.tree_util`, `jax.jit`, DLPack) and fail.
    The layer's eager calls run through here, out of its sight: everything
    inside runs as plain Python. While torch traces, the layer never comes
    here (it goes to `layer_call`).
    """
    return f(*args)


#: `JaxLayer.call` passes the stored parameters and `cast=` to `run`.
run.casts_params = True
#: `JaxLayer.__call__` runs its eager calls through it.
run.untraced = untraced
#: `JaxLayer.call` calls it first (see `layer_call`).
run.layer_call = layer_call
# Whether the call being made is traced (torch.compile, torch.export): the
# layer then skips its own bookkeeping in Python (JAX's tree functions
# cannot run on traced tensors) and goes straight to `layer_call`.
run.tracing = torch.compiler.is_compiling
