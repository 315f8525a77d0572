"""The PyTorch backend: a zero-copy DLPack bridge with a torch autograd rule.

Torch tensors cross to JAX and back through DLPack without copying. Per pure
function `fn` (one per layer, training flag and input structure) the bridge
keeps:

- one jitted forward, used when no gradient is needed (`torch.no_grad`,
  inference, nothing requires grad);
- per signature (which tensors are differentiated, input shapes and dtypes)
  a jitted forward that returns the outputs, the new state and the VJP
  residuals as a flat list, and a jitted backward that applies them to the
  output cotangents; a `torch.autograd.Function` ties the two to autograd;
- the JAX views of the parameter and state tensors, made once through DLPack
  and re-made when a tensor's storage changes. Optimizers update parameters
  in place, so a view keeps seeing the current values.

Ordering under asynchronous dispatch: every JAX result handed to torch is
ready before the bridge returns (so no JAX computation still reads a torch
buffer when torch updates it in place), and a result that aliases a buffer
the bridge passed in is cloned, so no tensor handed out shares memory with a
tensor that torch may change. The torch tensors a gradient depends on are
saved for backward, so torch's own version check reports an in-place change
between the forward and the backward pass.

Importing this module imports torch: the layer imports it only on the torch
backend.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
from torch.utils import dlpack as _torch_dlpack

#: Counts of traces and of jitted functions created, for tests and debugging:
#: `forward_traces` (the no-gradient forward), `vjp_traces` (the forward that
#: returns residuals), `backward_traces`, `jit_functions`, `views` (JAX views
#: of parameters and state made through DLPack).
counters: collections.Counter = collections.Counter()

# With 64-bit types disabled, JAX would turn these into their 32-bit kinds.
_NARROW = {
    torch.int64: torch.int32,
    torch.float64: torch.float32,
    torch.complex128: torch.complex64,
}
_FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


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
    """A JAX CPU array -> torch tensor function, zero-copy."""

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
        return _import_cpu(t)
    return jax.dlpack.from_dlpack(t)


def _to_torch(a: jax.Array, device_type: str) -> torch.Tensor:
    a.block_until_ready()
    if device_type == "cpu":
        return _export_cpu(a)
    return torch.from_dlpack(a)


def _export(arrays, device_type, taken):
    """JAX results as torch tensors, cloning any that alias a buffer in `taken`.

    `taken` holds the addresses of the buffers passed in (and of the results
    exported so far), so no tensor handed out shares memory with one that
    torch may change or that another result uses.
    """
    tensors = []
    for a in arrays:
        t = _to_torch(a, device_type)
        ptr = t.data_ptr()
        if ptr in taken and t.numel():
            t = t.clone()
        else:
            taken.add(ptr)
        tensors.append(t)
    return tensors


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


def _placement(fn, tensors):
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
    entry = _entry(fn)
    if not entry.warned_device:
        warnings.warn(
            f"{fn.owner}: the torch tensors are on {device} but JAX has no "
            f"{device.type} device; they are copied to the CPU and back on "
            "every call. Install a jaxlib for that device (for example "
            "`pip install jax[cuda12]`) to run zero-copy.",
            stacklevel=3,
        )
        entry.warned_device = True
    return "cpu", device


# -- compiled functions and cached views ------------------------------------


class _Entry:
    """What the bridge keeps per pure function: jitted code and views."""

    __slots__ = ("forward", "signatures", "views", "warned_device")

    def __init__(self, fn):
        def forward(params, inputs, state, rng):
            counters["forward_traces"] += 1
            return fn(params, inputs, state, rng)

        counters["jit_functions"] += 1
        self.forward = jax.jit(forward)
        self.signatures: dict = {}
        # Per position of params + state: (tensor, data_ptr, shape, view).
        self.views: list = []
        self.warned_device = False

    def cached_views(self, tensors, offset, device_type, taken):
        """JAX views of long-lived tensors (parameters, state), cached."""
        views = self.views
        need = offset + len(tensors)
        if len(views) < need:
            views.extend([None] * (need - len(views)))
        out = []
        for i, t in enumerate(tensors, offset):
            ptr = t.data_ptr()
            cached = views[i]
            if (
                cached is not None
                and cached[0] is t
                and cached[1] == ptr
                and cached[2] == t.shape
            ):
                view = cached[3]
            else:
                view = _to_jax(t, device_type)
                counters["views"] += 1
                if view.unsafe_buffer_pointer() != ptr and _realign(t):
                    ptr = t.data_ptr()
                    view = _to_jax(t, device_type)
                # Only a view that shares the tensor's buffer is kept: a copy
                # made on the way would go stale when torch updates in place.
                if view.unsafe_buffer_pointer() == ptr or not t.numel():
                    views[i] = (t, ptr, t.shape, view)
                else:
                    views[i] = None
            taken.add(ptr)
            out.append(view)
        return out


class _Signature:
    """The forward-with-residuals and the backward of one call signature."""

    __slots__ = ("forward", "backward", "treedef", "float_outputs", "owner")

    def __init__(self, fn, diff_params, diff_inputs):
        self.treedef = None
        self.float_outputs = None
        self.owner = fn.owner
        sig = self

        def forward(params, inputs, state, rng):
            counters["vjp_traces"] += 1

            def differentiable(diff):
                p, x = list(params), list(inputs)
                for k, i in enumerate(diff_params):
                    p[i] = diff[k]
                for k, i in enumerate(diff_inputs, len(diff_params)):
                    x[i] = diff[k]
                return fn(p, x, state, rng)

            diff = [params[i] for i in diff_params] + [inputs[i] for i in diff_inputs]
            outputs, vjp_fn, new_state = jax.vjp(differentiable, diff, has_aux=True)
            residuals, sig.treedef = jax.tree_util.tree_flatten(vjp_fn)
            sig.float_outputs = [
                (jax.numpy.issubdtype(o.dtype, jax.numpy.inexact), o.shape)
                for o in outputs
            ]
            return outputs, new_state, residuals

        def backward(residuals, cotangents):
            counters["backward_traces"] += 1
            vjp_fn = jax.tree_util.tree_unflatten(sig.treedef, residuals)
            cts = iter(cotangents)
            full = [
                next(cts) if floating else np.zeros(shape, jax.dtypes.float0)
                for floating, shape in sig.float_outputs
            ]
            (grads,) = vjp_fn(full)
            return grads

        counters["jit_functions"] += 2
        self.forward = jax.jit(forward)
        self.backward = jax.jit(backward)


class _Call:
    """One differentiable call, carried from the forward to the backward."""

    __slots__ = ("sig", "args", "device_type", "taken", "new_state", "residuals")

    def __init__(self, sig, args, device_type, taken):
        self.sig = sig
        self.args = args
        self.device_type = device_type
        self.taken = taken
        self.new_state = None
        self.residuals = None


class _JaxFunction(torch.autograd.Function):
    """Autograd rule: the jitted forward saves residuals, the backward uses them."""

    @staticmethod
    def forward(ctx, call: _Call, *diff_tensors):
        sig = call.sig
        outputs, new_state, residuals = sig.forward(*call.args)
        call.args = None
        taken = call.taken
        outs = _export(outputs, call.device_type, taken)
        call.new_state = _export(new_state, call.device_type, taken)
        call.residuals = residuals
        call.taken = None
        ctx.call = call
        ctx.save_for_backward(*diff_tensors)
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
    def backward(ctx, *grad_outputs):
        call = ctx.call
        diff_tensors = ctx.saved_tensors  # raises if changed in place since
        if call.residuals is None:
            raise RuntimeError(
                f"{call.sig.owner}: backward through the JAX function a second "
                "time; pass `retain_graph=True` to the first backward."
            )
        sig = call.sig
        device_type = call.device_type
        cotangents = []
        taken: set = set()
        for g, (floating, _) in zip(grad_outputs, sig.float_outputs, strict=True):
            if floating:
                taken.add(g.data_ptr())
                cotangents.append(_to_jax(g, device_type))
        grads = sig.backward(call.residuals, cotangents)
        result = _export(grads, device_type, taken)
        for i, t in enumerate(diff_tensors):
            if result[i].dtype != t.dtype:
                result[i] = result[i].to(t.dtype)
        return (None, *result)


def _entry(fn) -> _Entry:
    # Kept in the pure function's slot: it goes with the layer.
    return fn.slot("torch", lambda: _Entry(fn))


def _requires_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and t.dtype in _FLOATING


def run(
    fn: Callable,
    params: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    state: Sequence[torch.Tensor],
    rng: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Runs the pure JAX function `fn` on torch tensors, with autograd.

    Args:
        fn: the layer's pure function `fn(params, inputs, state, rng) ->
            (outputs, new_state)` on lists of JAX arrays.
        params: the parameter tensors (Keras variable values).
        inputs: the input tensors.
        state: the state tensors.
        rng: the seed tensors (int32, shape [2]) or an empty list.

    Returns:
        `(outputs, new_state)`: lists of torch tensors on the device of the
        arguments. `outputs` are differentiable with respect to the floating
        `params` and `inputs` that require grad; `new_state` carries no
        gradient.
    """
    entry = _entry(fn)
    device_type, target = _placement(fn, (*inputs, *params))
    if target is not None:
        return _run_through_cpu(fn, params, inputs, state, rng, target)
    taken: set = set()
    j_params = entry.cached_views(params, 0, device_type, taken)
    j_state = entry.cached_views(state, len(params), device_type, taken)
    j_rng = [_to_jax(t, device_type) for t in rng]
    j_inputs = []
    for t in inputs:
        taken.add(t.data_ptr())
        j_inputs.append(_to_jax(t, device_type))

    diff_params = diff_inputs = ()
    if torch.is_grad_enabled():
        diff_params = tuple(i for i, t in enumerate(params) if _requires_grad(t))
        diff_inputs = tuple(i for i, t in enumerate(inputs) if _requires_grad(t))
    if not diff_params and not diff_inputs:
        outputs, new_state = entry.forward(j_params, j_inputs, j_state, j_rng)
        return (
            _export(outputs, device_type, taken),
            _export(new_state, device_type, taken),
        )

    key = (
        diff_params,
        diff_inputs,
        tuple(t.shape for t in inputs),
        tuple(v.dtype for v in j_inputs),
        tuple(v.dtype for v in j_params),
    )
    sig = entry.signatures.get(key)
    if sig is None:
        sig = entry.signatures[key] = _Signature(fn, diff_params, diff_inputs)
    diff_tensors = [params[i] for i in diff_params] + [inputs[i] for i in diff_inputs]
    call = _Call(sig, (j_params, j_inputs, j_state, j_rng), device_type, taken)
    outputs = _JaxFunction.apply(call, *diff_tensors)
    return list(outputs), call.new_state


def _run_through_cpu(fn, params, inputs, state, rng, target):
    """`run` for tensors on a device JAX lacks: through CPU copies."""
    cpu = [[t.to("cpu") for t in group] for group in (params, inputs, state, rng)]
    outputs, new_state = run(fn, *cpu)
    return [t.to(target) for t in outputs], [t.to(target) for t in new_state]
