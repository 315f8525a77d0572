"""The PyTorch backend: a zero-copy DLPack bridge with a torch autograd rule.

Torch tensors cross to JAX and back through DLPack without copying
(`_exchange`), and a `torch.autograd.Function` ties the JAX forward and
backward to torch's autograd (`_autograd`), with compiled signatures and
cached parameter views kept per pure function (`_signatures`). While
torch.compile, torch.export or `torch.jit.trace` traces, the layer's call
goes to `layer_call` instead, which records it as one operator
(`_layer_call`, `_sites`, `_operators`; `jaxlayer.bridges.torch_export` for
the operator a program carries to another process).

Importing this package imports torch (the layer imports it only on the
torch backend) and has the side effects listed in the one block below.
Module-level state: the `counters`, the probed DLPack functions, whether XLA
refused the CPU options, and the weak index of call sites; everything else
is in the layer's pure functions (`fn.slot("torch")`).

Modules, each importing only those before it: `_exchange` (DLPack, dtypes,
counters), `_signatures` (compiled functions, XLA options), `_polymorphic`
(symbolic signatures), `_devices`, `_autograd` (`run`), `_pytree`,
`_sites`, `_operators`, `_layer_call`.
"""

from __future__ import annotations

import torch

# Registers `torch.ops.jaxlayer.call_exported` (on import): first, as before
# this bridge's own set-up. It is a module of its own, outside this package,
# so that `import jaxlayer` can register it without the side effects below.
from jaxlayer.bridges import torch_export as torch_export
from jaxlayer.bridges.torch import _exchange, _operators
from jaxlayer.bridges.torch._autograd import run
from jaxlayer.bridges.torch._exchange import counters as counters
from jaxlayer.bridges.torch._layer_call import layer_call, untraced
from jaxlayer.bridges.torch._signatures import CACHE_BYTES as CACHE_BYTES

__all__ = ["CACHE_BYTES", "counters", "layer_call", "run", "untraced"]

# -- import-time side effects, in this order ----------------------------------
# 1. JAX's flag `jax_cpu_enable_async_dispatch=False`, before anything below
#    makes JAX's CPU client (unless the environment chose).
_exchange.configure_cpu_client()
# 2. The DLPack probes: choose the fast CPU paths (this makes the CPU client).
_exchange.probe_cpu_paths()
# 3. Registers `torch.ops.jaxlayer.call` and `call_vjp` with torch.
_operators.define_operators()
# 4. What the layer looks up on its bridge (see `jaxlayer.bridges`):
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
