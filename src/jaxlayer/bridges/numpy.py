"""The NumPy backend: inference only, through a jitted JAX function."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxlayer._pure import PureFunction


def run(
    fn: PureFunction,
    params: Sequence[np.ndarray],
    inputs: Sequence[np.ndarray],
    state: Sequence[np.ndarray],
    rng: Sequence[np.ndarray],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Runs the jitted `fn` on NumPy arrays and returns NumPy arrays.

    The NumPy backend has no autodiff, so no gradient is defined (Keras
    itself refuses to `fit` on it). The results are writable NumPy arrays of
    their own (copies), never views of JAX buffers.

    Args:
        fn: the layer's pure function `fn(params, inputs, state, rng) ->
            (outputs, new_state)` on lists of JAX arrays.
        params: the parameter values.
        inputs: the input arrays.
        state: the state values.
        rng: the seed arrays (int32, shape [2]) or an empty list.

    Returns:
        `(outputs, new_state)`, lists of NumPy arrays.
    """
    # One jitted function per pure function, kept in its slot (jax.jit
    # caches per shape and dtype); it goes with the layer.
    jitted = fn.slot("numpy", lambda: jax.jit(fn))
    outputs, new_state = jitted(
        [np.asarray(x) for x in params],
        [np.asarray(x) for x in inputs],
        [np.asarray(x) for x in state],
        [np.asarray(x) for x in rng],
    )
    return [np.array(x) for x in outputs], [np.array(x) for x in new_state]
