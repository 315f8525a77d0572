"""Tensors across: torch <-> JAX through DLPack, without copying.

Ordering on the CPU: JAX's DLPack export waits until the array is ready, so
every tensor handed to torch is complete, and since every JAX call hands at
least one result to torch before returning, no JAX computation still reads
a torch buffer when torch next changes one in place. There is no
`block_until_ready` on the hot path.

On CUDA (checked on an H200 by `benchmarks/cuda_check.py`) tensors cross
without a host synchronisation: each side passes its stream to the other's
`__dlpack__`, which orders the streams with an event. A torch tensor viewed
by JAX stays alive (the DLPack capsule holds it) until JAX releases the
buffer, after its last use.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

import jax
import numpy as np
import torch
from torch.utils import dlpack as _torch_dlpack

from jaxlayer import _private

#: Counts, for tests and debugging: `forward_traces` (the no-gradient
#: forward), `vjp_traces` (the forward that returns residuals),
#: `backward_traces`, `jit_functions` (compiled functions made), `compiles`
#: (signatures compiled, one per new shape), `symbolic_traces` (symbolic
#: signatures exported), `symbolic_misfits` (shapes a symbolic signature
#: could not take), `evictions` (signatures dropped past the memory bound),
#: `views` (JAX views of parameters and state made through DLPack),
#: `forwarded_residuals` (residuals read again from the call's arguments),
#: `op_calls`/`op_vjp_calls` (runs of the torch.compile operators),
#: `eager_fallbacks`, `realigned`.
counters: collections.Counter = collections.Counter()

# With 64-bit types disabled, JAX would turn these into their 32-bit kinds.
NARROW = {
    torch.int64: torch.int32,
    torch.float64: torch.float32,
    torch.complex128: torch.complex64,
}
FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
SEED_DTYPES = frozenset({torch.int32, torch.uint32})


def configure_cpu_client() -> None:
    """Turns JAX's CPU async dispatch off if JAX has no CPU client yet.

    Torch's OpenMP pool and XLA's thread pool share the cores. The bridge
    waits for every result anyway, so running a computation on the calling
    thread saves a hand-over to XLA's dispatch thread and back on every
    call. Read by JAX when it makes its CPU client (the first array or
    device query); after that it changes nothing (import `jaxlayer` before
    making JAX arrays to get it), so it is set only if the user did not
    choose (`JAX_CPU_ENABLE_ASYNC_DISPATCH` unset). Nothing of torch's is
    changed: torch's idle OpenMP threads still spin a while after a large
    torch op, on cores XLA then needs (`GOMP_SPINCOUNT`, `PJRT_NPROC=1` or
    `torch.set_num_threads` trade that off: docs/backends/torch.md).
    """
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
        return
    try:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except Exception:  # noqa: BLE001 - an older or newer JAX without it
        pass


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
        _jax, jaxlib_extension_version = _private.jax_dlpack_extension()
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
        _jax, _ = _private.jax_dlpack_extension()
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


# The CPU paths; public DLPack until `probe_cpu_paths` has run (at import of
# the package).
_import_cpu: Callable[[torch.Tensor], jax.Array] = jax.dlpack.from_dlpack
_export_cpu: Callable[[jax.Array], torch.Tensor] = torch.from_dlpack


def probe_cpu_paths() -> None:
    """Chooses the CPU import and export paths (makes JAX's CPU client)."""
    global _import_cpu, _export_cpu
    _import_cpu = _cpu_importer()
    _export_cpu = _cpu_exporter()


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, contiguous and of a dtype JAX keeps (no copy if it is)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    narrow = NARROW.get(t.dtype)
    if narrow is not None and not jax.config.jax_enable_x64:
        t = t.to(narrow)
    return t


def realign(t: torch.Tensor) -> bool:
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
    if NARROW.get(t.dtype) is not None and not jax.config.jax_enable_x64:
        return False
    with torch.no_grad():
        t.data = t.detach().clone(memory_format=torch.contiguous_format)
    counters["realigned"] += 1
    return True


def to_jax(t: torch.Tensor, device_type: str) -> jax.Array:
    """A JAX view of `t` on `device_type`'s JAX device (`cpu`, `cuda`)."""
    t = _prepare(t)
    if device_type == "cpu":
        # The extension behind the fast path would read another device's
        # pointer as host memory: never hand it one.
        return _import_cpu(t if t.is_cpu else t.cpu())
    # CUDA: JAX asks torch (`__dlpack__(stream=...)`) to order its stream
    # after torch's current one; no host synchronisation.
    return jax.dlpack.from_dlpack(t)


def to_torch(a: jax.Array, device_type: str) -> torch.Tensor:
    """A torch view of the JAX array `a`."""
    if device_type == "cpu":
        return _export_cpu(a)  # waits until `a` is ready
    # CUDA: torch passes its current stream to `a.__dlpack__`, which makes
    # that stream wait for `a`; no host synchronisation.
    return torch.from_dlpack(a)


def export_all(arrays, device_type: str) -> list[torch.Tensor]:
    """JAX results as torch tensors; a result sharing a buffer is cloned.

    The compiled functions never return a buffer of their arguments (no
    donation), but two results may share one.
    """
    tensors = []
    seen = set()
    for a in arrays:
        t = to_torch(a, device_type)
        ptr = t.data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        else:
            seen.add(ptr)
        tensors.append(t)
    return tensors


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a JAX (NumPy) dtype."""
    return getattr(torch, np.dtype(dtype).name)


def jax_dtype(dtype: torch.dtype):
    """The JAX dtype a torch dtype becomes (64-bit kinds narrowed)."""
    return jax.dtypes.canonicalize_dtype(
        jax.numpy.dtype(str(dtype).removeprefix("torch."))
    )
