"""LiteRT from the torch backend: a lowering of `jaxlayer::call_exported`.

`litert_torch.convert` (what Keras's `model.export(format="litert")` runs on
the torch backend) traces the model with `torch.export`, then lowers each
torch operator to StableHLO through its registry of lowerings. This module
registers one for `torch.ops.jaxlayer.call_exported`: it calls the layer's
`jax.export.Exported` inside a JAX function that litert-torch's own JAX
bridge (`litert_torch.backend.jax_bridge.wrap`) lowers and inlines, so the
layer's StableHLO becomes part of the model and LiteRT's converter turns it
into builtin operators, as it does for every other operator.

Imported by `torch_export` while a program is traced in a process that has
imported `litert_torch`; importing it imports litert-torch.
"""

from __future__ import annotations

import dataclasses

import torch

from jaxlayer import _private
from jaxlayer.bridges import torch_export

ir, jax_bridge, registry = _private.litert_torch_internals()


def _lowering(lctx, artifact, sha256, params, inputs, state, rng):
    del artifact  # the computation is taken from its checked, cached form
    exp = torch_export.exported_by_hash(sha256)

    def jaxlayer_call(params, inputs, state, rng):
        flat = (*params, *inputs, *state, *rng)
        return tuple(exp.call(*flat))

    # Without the node, the bridge returns the call's results as they are
    # (with it, it reads the node's value as one tensor, and this node's is
    # a list); the results' dtypes are the artifact's, those of the node.
    bare = dataclasses.replace(lctx, node=None)
    results = jax_bridge.wrap(jaxlayer_call)(bare, params, inputs, state, rng)
    if isinstance(results, ir.Value):
        return [results]
    return list(results)


registry.lower(torch.ops.jaxlayer.call_exported.default)(_lowering)
