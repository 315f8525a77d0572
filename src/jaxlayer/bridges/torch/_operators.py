"""The torch.compile operators: `torch.ops.jaxlayer.call` and `call_vjp`.

While torch.compile traces, a layer call becomes `torch.ops.jaxlayer.call(
site, params, inputs, state, rng)`, a `torch.library.custom_op`. `site`
names the call site (`_sites`); the operator's real implementation runs the
layer's current pure function for that site (the same compiled functions and
views as the eager path), its fake implementation computes the output shapes
with `jax.eval_shape` (a symbolic batch dimension maps to torch's symbolic
size). Its gradient (`register_autograd`) is a second operator, `call_vjp`,
that recomputes the forward inside one JAX call. No graph break inside the
layer.
"""

from __future__ import annotations

import jax
import numpy as np
import torch

from jaxlayer.bridges.torch._devices import arguments, device_type
from jaxlayer.bridges.torch._exchange import FLOATING, counters, export_all, to_jax
from jaxlayer.bridges.torch._polymorphic import make
from jaxlayer.bridges.torch._signatures import (
    Entry,
    compile_for,
    differentiable_in,
    executable_bytes,
    split,
)
from jaxlayer.bridges.torch._sites import lookup


def _plain_run(found, params, inputs, state, rng):
    """The operator's real implementation: the plain forward, flat."""
    fn = found.pure_fn(params, inputs, state, rng)
    entry = fn.slot("torch", Entry)
    kind = device_type(fn, entry, params, inputs, state)
    # `layer_call` hands the operator only tensors on a device JAX serves.
    if kind is None:
        raise RuntimeError(f"{fn.owner}: unreachable device")  # pragma: no cover
    flat, shapes = arguments(entry, params, inputs, state, rng, kind)
    counts = (len(params), len(inputs), len(state), len(rng))
    cast = found.cast
    # `()`: no gradient, the key of the eager path's plain signature too.
    key = ((), shapes, counts, cast)
    sig = entry.signature(
        key, lambda: make(entry, fn, cast, counts, (), flat, shapes), fn
    )
    outputs, new_state = sig.forward(*flat)
    return export_all((*outputs, *new_state), kind)


class _Recompute:
    """The VJP of one signature, recomputing the forward (one JAX call)."""

    __slots__ = ("vjp", "hits", "nbytes")

    def __init__(self, fn, cast, counts, diff, example, cotangents):
        self.hits = self.nbytes = 0

        def vjp(flat, cts):
            counters["backward_traces"] += 1
            flat = list(flat)
            call = differentiable_in(fn, cast, counts, diff, flat)
            outputs, vjp_fn = jax.vjp(
                lambda values: call(values)[0], [flat[i] for i in diff]
            )
            cts = iter(cts)
            # Integer outputs take float0 cotangents (torch passes none).
            full = [
                next(cts)
                if jax.numpy.issubdtype(o.dtype, jax.numpy.inexact)
                else np.zeros(o.shape, jax.dtypes.float0)
                for o in outputs
            ]
            (grads,) = vjp_fn(full)
            return grads

        counters["jit_functions"] += 1
        self.vjp = compile_for(vjp, (example, cotangents))

    def estimate_bytes(self) -> int:
        return executable_bytes(self.vjp)


def _vjp_run(found, params, inputs, state, rng, cotangents, diff):
    fn = found.pure_fn(params, inputs, state, rng)
    entry = fn.slot("torch", Entry)
    kind = device_type(fn, entry, params, inputs, state)
    flat, shapes = arguments(entry, params, inputs, state, rng, kind)
    cts = [to_jax(g, kind) for g in cotangents]
    counts = (len(params), len(inputs), len(state), len(rng))
    cast = found.cast
    key = (
        ("vjp", tuple(diff)),
        shapes,
        tuple((c.shape, c.dtype) for c in cts),
        counts,
        cast,
    )
    sig = entry.signature(
        key, lambda: _Recompute(fn, cast, counts, tuple(diff), flat, cts), fn
    )
    grads = export_all(sig.vjp(flat, cts), kind)
    # Each gradient in its tensor's dtype (JAX may have narrowed it).
    tensors = (*params, *inputs)
    return [
        g if g.dtype == tensors[i].dtype else g.to(tensors[i].dtype)
        for g, i in zip(grads, diff, strict=True)
    ]


# `torch.ops.jaxlayer.call`, once `define_operators` has run.
_call_op = None


def define_operators() -> None:
    """Registers `torch.ops.jaxlayer.call` and `call_vjp` (once per process)."""
    global _call_op

    # Explicit schemas: this module's annotations are strings.
    @torch.library.custom_op(
        "jaxlayer::call",
        mutates_args=(),
        schema="(int site, Tensor[] params, Tensor[] inputs, Tensor[] state, "
        "Tensor[] rng) -> Tensor[]",
    )
    def call_op(site, params, inputs, state, rng):
        counters["op_calls"] += 1
        return _plain_run(lookup(site), params, inputs, state, rng)

    @call_op.register_fake
    def _(site, params, inputs, state, rng):
        return lookup(site).fake(params, inputs, state, rng)

    @torch.library.custom_op(
        "jaxlayer::call_vjp",
        mutates_args=(),
        schema="(int site, Tensor[] params, Tensor[] inputs, Tensor[] state, "
        "Tensor[] rng, Tensor[] cotangents, int[] diff) -> Tensor[]",
    )
    def vjp_op(site, params, inputs, state, rng, cotangents, diff):
        counters["op_vjp_calls"] += 1
        return _vjp_run(lookup(site), params, inputs, state, rng, cotangents, diff)

    @vjp_op.register_fake
    def _(site, params, inputs, state, rng, cotangents, diff):
        tensors = (*params, *inputs)
        return [tensors[i].new_empty(tensors[i].shape) for i in diff]

    def setup_context(ctx, inputs, output):
        site, params, x, state, rng = inputs
        tensors = (*params, *x)
        ctx.site = site
        # Differentiated: the floating tensors that require grad.
        ctx.diff = [
            i for i, t in enumerate(tensors) if t.requires_grad and t.dtype in FLOATING
        ]
        ctx.counts = (len(params), len(x), len(state), len(rng))
        n_out = lookup(site).out[0]
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in output[:n_out]]
        # State and seeds as they were: the layer assigns the new state in
        # place right after the call.
        ctx.save_for_backward(
            *params, *x, *[t.clone() for t in state], *[t.clone() for t in rng]
        )

    def backward(ctx, grads):
        params, x, state, rng = split(ctx.saved_tensors, ctx.counts)
        # A cotangent per floating output (zeros for an unused one); the new
        # state's outputs take none.
        cotangents = [
            (g if g is not None else torch.zeros(shape, dtype=dtype, device=device))
            for g, (shape, dtype, device) in zip(grads, ctx.outputs, strict=False)
            if dtype in FLOATING
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
    _call_op = call_op


def call(site, params, inputs, state, rng) -> list[torch.Tensor]:
    """`torch.ops.jaxlayer.call`: the layer call while torch.compile traces."""
    return _call_op(site, params, inputs, state, rng)
