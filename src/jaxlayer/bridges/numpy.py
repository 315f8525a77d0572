"""The NumPy backend: inference only, through a jitted JAX function."""

from __future__ import annotations

import weakref

import jax
import numpy as np

_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run(fn, params, inputs, state, rng):
    """Runs the jitted `fn` on NumPy arrays and returns NumPy arrays.

    The NumPy backend has no autodiff, so no gradient is defined (Keras
    itself refuses to train on it).
    """
    jitted = _JITTED.get(fn)
    if jitted is None:
        jitted = _JITTED[fn] = jax.jit(fn)
    outputs, new_state = jitted(params, inputs, state, rng)
    return [np.asarray(x) for x in outputs], [np.asarray(x) for x in new_state]
