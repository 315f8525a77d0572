"""jaxlayer: any JAX model as a Keras 3 layer, on every Keras backend.

Public API:

- `JaxLayer`: a JAX function (`call_fn`/`init_fn`) as a Keras layer; a
  drop-in replacement for `keras.layers.JaxLayer` that also runs on the
  TensorFlow, PyTorch and NumPy (inference) backends.
- `FlaxLayer`: a Flax linen module (drop-in for `keras.layers.FlaxLayer`).
- `NNXLayer`: a Flax NNX module.
- `EquinoxLayer`: an Equinox module.
- `register_torch_operators`: registers the torch operator a `.pt2`
  program of a model with a jaxlayer layer calls (done by `import jaxlayer`
  when torch is imported already).
- `allow_solver_kernels`: a context in which files that are trusted may
  load computations calling linear-algebra kernels (see the saving docs).

Haiku models need no adapter: pass `hk.transform(f).apply` and `.init` to
`JaxLayer` as `call_fn` and `init_fn`.
"""

# First, before anything imports Keras: importing `_backend` falls back to the
# JAX backend when the one Keras would pick is not installed.
from jaxlayer import (
    _backend,  # noqa: F401
    _torch_ops,
)
from jaxlayer._artifact_check import allow_solver_kernels as allow_solver_kernels
from jaxlayer._torch_ops import register_torch_operators as register_torch_operators
from jaxlayer._version import __version__ as __version__
from jaxlayer.adapters.equinox import EquinoxLayer as EquinoxLayer
from jaxlayer.adapters.flax_linen import FlaxLayer as FlaxLayer
from jaxlayer.adapters.flax_nnx import NNXLayer as NNXLayer
from jaxlayer.export import _hooks as _export_hooks
from jaxlayer.layer import JaxLayer as JaxLayer

# `model.export(format="onnx"/"openvino")` from the tensorflow backend: the
# converters are installed in tf2onnx and OpenVINO when those are imported.
_export_hooks.install()

__all__ = [
    "EquinoxLayer",
    "FlaxLayer",
    "JaxLayer",
    "NNXLayer",
    "allow_solver_kernels",
    "register_torch_operators",
]

# A `.pt2` program loads with `import jaxlayer` alone where torch is in use.
_torch_ops.register_if_torch_imported()
