"""jaxlayer: any JAX model as a Keras 3 layer, on every Keras backend."""

from jaxlayer.layer import JaxLayer as JaxLayer

__version__ = "0.1.0"

__all__ = ["JaxLayer"]
