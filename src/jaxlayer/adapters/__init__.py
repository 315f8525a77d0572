"""Adapters: layers for the models of JAX libraries (Flax, Equinox).

Each adapter is a `JaxLayer` that turns a library's model into the
`call_fn`/`init_fn` pair (and the `params`/`state` trees) that `JaxLayer`
runs; it knows nothing of Keras backends. Each library is imported on first
use only. Haiku needs no adapter: pass a transformed function's `apply` and
`init` to `JaxLayer` (see `docs/adapters.md`).
"""

from jaxlayer.adapters.equinox import EquinoxLayer as EquinoxLayer
from jaxlayer.adapters.flax_linen import FlaxLayer as FlaxLayer
from jaxlayer.adapters.flax_nnx import NNXLayer as NNXLayer

__all__ = ["EquinoxLayer", "FlaxLayer", "NNXLayer"]
