"""Eager calls: `run`, a JAX function under torch's autograd.

One training step crosses twice. The forward is one JAX call that returns
the outputs, the new state and the VJP residuals (`Grad`); the backward is
one JAX call for all gradients (parameters and inputs). Torch runs a
backward on the stream of its forward, so on CUDA the cotangents and
gradients follow the same order as the forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import torch

from jaxlayer.bridges.torch._devices import arguments, device_type
from jaxlayer.bridges.torch._exchange import FLOATING, export_all, to_jax
from jaxlayer.bridges.torch._polymorphic import make
from jaxlayer.bridges.torch._signatures import Entry

# Under `torch.jit.trace` a layer call is one `jaxlayer::call_exported` node
# (`layer_call`); a call that cannot be one would be baked in as constants.
JIT_TRACE = (
    "{owner}: `torch.jit.trace` (what Keras's torch-backend exports to "
    "`onnx` and `openvino` use) records a jaxlayer layer's call as one "
    "operator, which it cannot do for this call ({reason}). Pass the layer "
    "tensors (in tuples, lists, dicts or NamedTuples) on a device JAX has, "
    "or export the model from the jax backend (`onnx`) or the tensorflow "
    "backend (`onnx`, `openvino`), where jaxlayer converts the layer (a "
    "`.keras` file saved on torch loads there)."
)


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
        # Only the arguments the backward reads again are kept.
        call.args = [flat[i] for i in sig.args]
        call.flat = None
        device_type = call.device_type
        outs = export_all(outputs, device_type)
        call.new_state = export_all(new_state, device_type)
        # Exporting a result waits for the call; with none, wait here, so
        # no JAX computation still reads a buffer torch may change next.
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
            to_jax(g, device_type)
            for g, (floating, _) in zip(grad_outputs, sig.float_outputs, strict=True)
            if floating
        ]
        grads = sig.backward(call.args, call.residuals, cotangents)
        result = export_all(grads, device_type)
        diff_tensors = saved[: len(result)]
        for i, t in enumerate(diff_tensors):
            # An input moved to the parameters' device gets its gradient
            # back on its own device.
            if result[i].dtype != t.dtype or result[i].device != t.device:
                result[i] = result[i].to(t.device, t.dtype)
        return (None, None, *result)


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
        raise ValueError(JIT_TRACE.format(owner=fn.owner, reason=reason))
    entry = fn.slot("torch", Entry)
    kind = device_type(fn, entry, params, inputs, state)
    if kind is None:  # a device JAX lacks (CUDA with a CPU-only jaxlib)
        return _run_through_cpu(fn, params, inputs, state, rng, cast)
    flat, shapes = arguments(entry, params, inputs, state, rng, kind)
    counts = (len(params), len(inputs), len(state), len(rng))
    # `diff`: the positions in params + inputs of the tensors differentiated.
    diff = ()
    if torch.is_grad_enabled():
        diff = tuple(
            i
            for i, t in enumerate(itertools.chain(params, inputs))
            if t.requires_grad and t.dtype in FLOATING
        )
    key = (diff, shapes, counts, cast)
    sig = entry.signature(
        key, lambda: make(entry, fn, cast, counts, diff, flat, shapes), fn
    )
    if not diff:
        outputs, new_state = sig.forward(*flat)
        return export_all(outputs, kind), export_all(new_state, kind)

    tensors = (*params, *inputs)
    diff_tensors = [tensors[i] for i in diff]
    # Saved for backward (torch's in-place check): the differentiated
    # tensors, then every other tensor the backward reads through a view.
    saved = diff_tensors + [
        tensors[i] for i in sig.args if i < len(tensors) and i not in diff
    ]
    call = _Call(sig, flat, kind, fn.owner)
    outputs = _JaxFunction.apply(call, saved, *diff_tensors)
    return list(outputs), call.new_state


def _run_through_cpu(fn, params, inputs, state, rng, cast):
    """`run` for tensors on a device JAX lacks: through CPU copies."""
    target = (inputs[0] if inputs else params[0]).device
    cpu = [[t.to("cpu") for t in group] for group in (params, inputs, state, rng)]
    outputs, new_state = run(fn, *cpu, cast=cast)
    return [t.to(target) for t in outputs], [t.to(target) for t in new_state]
