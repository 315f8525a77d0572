"""Where a call runs: the device JAX reads from, and the flat arguments."""

from __future__ import annotations

import itertools
import warnings

import jax

from jaxlayer.bridges.torch._exchange import to_jax

# Torch device type -> whether JAX has a device of it (probed once each).
_JAX_PLATFORMS: dict = {}


def jax_serves(device_type: str) -> bool:
    """Whether JAX has a device of this torch device type (`cuda`)."""
    served = _JAX_PLATFORMS.get(device_type)
    if served is None:
        # `jax.devices` raises for a platform this jaxlib lacks.
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
    # The call's device is its first tensor's.
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
    if jax_serves(device.type):
        return device.type, None
    if entry.first_device_warning():
        warnings.warn(
            f"{fn.owner}: the torch tensors are on {device} but JAX has no "
            f"{device.type} device; they are copied to the CPU and back on "
            "every call. Install a jaxlib for that device (for example "
            "`pip install jax[cuda12]`) to run zero-copy.",
            stacklevel=4,
        )
    return "cpu", device


def device_type(fn, entry, params, inputs, state):
    """The device type JAX reads from, or None to go through CPU copies.

    The variables decide (they live on Keras's device); inputs elsewhere are
    moved to them in `arguments`.
    """
    first = next(itertools.chain(params, state, inputs), None)
    if first is None or first.is_cpu:
        return "cpu"
    kind, target = _placement(fn, entry, (first,))
    return None if target is not None else kind


def arguments(entry, params, inputs, state, rng, device_type):
    """The flat JAX arguments `params + inputs + state + rng` and their key.

    Inputs and seeds on another device than the parameters (a CPU tensor
    given to a layer whose variables are on CUDA) are moved to theirs, as
    Keras's `convert_to_tensor` would: one JAX call reads one device.
    Importing the inputs through DLPack orders JAX's stream after torch's
    current one (the cached parameter views skip that hand-over), so an
    optimizer's in-place update queued before the call is seen by it.
    """
    # Parameters and state: long-lived, so their views are cached (indexed
    # by position in params + state); inputs and seeds are new every call.
    j_params = entry.cached_views(params, 0, device_type)
    j_state = entry.cached_views(state, len(params), device_type)
    anchor = params or state
    if anchor:
        device = anchor[0].device
        inputs = [t if t.device == device else t.to(device) for t in inputs]
        rng = [t if t.device == device else t.to(device) for t in rng]
    flat = (
        *j_params,
        *[to_jax(t, device_type) for t in inputs],
        *j_state,
        *[to_jax(t, device_type) for t in rng],
    )
    # Shapes and dtypes of everything (the compiled functions take exactly
    # these); the JAX dtypes, after any narrowing of 64-bit types.
    key = tuple((v.shape, v.dtype) for v in flat)
    return flat, key
