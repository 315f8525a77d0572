"""How a pure JAX function runs on each Keras backend.

A bridge is a callable

    run(fn, params, inputs, state, rng) -> (outputs, new_state)

where every argument after `fn` is a list of backend tensors (what
`keras.Variable.value` and the layer's inputs are on that backend), and the
two results are lists of backend tensors. `fn` is a pure JAX function with
the same signature taking and returning lists of `jax.Array`; the layer makes
one per (training flag, input structure) and keeps it, so a bridge may cache
compiled versions keyed on `fn` (and on shapes and dtypes).

Gradients: `outputs` are differentiable with respect to the floating tensors
of `params` and `inputs`, through the backend's own autodiff; `state` and
`rng` are not differentiated and `new_state` carries no gradient.

`fn` also carries attributes for the bridges: `fn.owner` (the layer, for
messages), `fn.native_serialization_platforms` (platforms to compile for
inside a TensorFlow graph, or None) and `fn.out_treedef` (set by the layer
when `fn` is traced).

The layer knows nothing of backends beyond choosing a bridge with `get`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_MODULES = {
    "jax": "jax",
    "tensorflow": "tensorflow",
    "torch": "torch",
    "numpy": "numpy",
}


def get(backend: str) -> Callable:
    """The bridge `run` function of a Keras backend.

    Args:
        backend: a Keras backend name (`keras.backend.backend()`).

    Returns:
        The bridge's `run` function.

    Raises:
        NotImplementedError: no bridge exists for this backend.
    """
    module = _MODULES.get(backend)
    if module is None:
        raise NotImplementedError(
            f"jaxlayer has no bridge for the Keras backend {backend!r}; "
            f"supported backends: {', '.join(sorted(_MODULES))}."
        )
    try:
        bridge = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{module}":
            raise
        raise NotImplementedError(
            f"jaxlayer cannot run JAX functions on the Keras backend "
            f"{backend!r} yet; use KERAS_BACKEND=jax."
        ) from err
    return bridge.run
