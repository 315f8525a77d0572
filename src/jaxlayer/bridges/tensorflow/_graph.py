"""Where the call runs: eagerly, in a graph being traced, under a tape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from jaxlayer import _private

# TensorFlow's private handles, looked up once (see `jaxlayer._private`).
call_module = _private.tf_call_module()
could_possibly_record = _private.tf_could_possibly_record()


def outside_graph(fn: Callable[[], Any]) -> Any:
    """Calls `fn` eagerly, lifted out of any graph being traced.

    The layer draws its `init_fn` seed with it: a layer built while Keras
    traces a train step needs concrete seed values to initialise in JAX.

    Args:
        fn: a function of no arguments.

    Returns:
        What `fn` returns.
    """
    with tf.init_scope():
        return fn()


def mode():
    """How the call may be differentiated.

    "plain": eager, no tape: no gradient can be asked for. "train": a tape may
    record (eager or while tracing a train step): outputs and residuals in
    one op, the VJP from the residuals. "graph": traced without a tape
    (predict, SavedModel): a plain forward, with a gradient that recomputes
    the forward, in case the function is differentiated later.
    """
    if could_possibly_record():
        return "train"
    return "plain" if tf.executing_eagerly() else "graph"
