"""The JAX backend: the function is plain JAX, traced by Keras's own jit."""

from __future__ import annotations


def run(fn, params, inputs, state, rng):
    """Calls `fn` directly: Keras variables and inputs are already JAX arrays.

    Keras traces and differentiates the whole train step, so nothing here
    needs a custom gradient or a cache.
    """
    return fn(params, inputs, state, rng)
