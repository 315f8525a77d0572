"""The TensorFlow backend: the JAX function runs as an `XlaCallModule` op.

The pure function is exported with `jax.export` (StableHLO, with symbolic
dimensions) and called inside TensorFlow through the `XlaCallModule` op, the
op `jax2tf` uses (`_export`). Gradients are attached with
`tf.custom_gradient` (`_gradients`); which export serves a call, and when
shapes are concrete, is `_dispatch`'s. Exports are made lazily, kept in the
layer's pure function (`fn.slot("tensorflow")`, dropped with the layer or
whenever its function changes) and counted by `conversion_count()`.

Speed, and when to turn on `jit_compile`: docs/performance.md and
docs/backends/tensorflow.md (measured per op and per train step).

The modules, each importing only those before it: `_graph` (eager, graph or
tape), `_specs` (structure keys and specs), `_export` (`jax.export` and the
op), `_gradients`, `_conversion` (the exports of one structure), `_run_time`
(the `tf.py_function` fallback), `_dispatch`, and this face.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from jaxlayer.bridges.tensorflow import _export
from jaxlayer.bridges.tensorflow._dispatch import (
    Slot,
    checked_args,
    concrete,
    diff_mask,
    symbolic,
)
from jaxlayer.bridges.tensorflow._export import DEFAULT_PLATFORMS as DEFAULT_PLATFORMS
from jaxlayer.bridges.tensorflow._graph import mode
from jaxlayer.bridges.tensorflow._graph import outside_graph as outside_graph


def conversion_count() -> int:
    """How many JAX functions this bridge has exported (forward and VJP).

    Calling a layer again with inputs of the same structure (any batch size)
    reuses the export, so the count does not change.

    Returns:
        The number of `jax.export` conversions made in this process.

    Examples:

        >>> from jaxlayer.bridges import tensorflow as tf_bridge
        >>> before = tf_bridge.conversion_count()
        >>> tf_bridge.conversion_count() - before
        0
    """
    return _export.count()


def run(
    fn: Callable,
    params: Sequence[tf.Tensor],
    inputs: Sequence[tf.Tensor],
    state: Sequence[tf.Tensor],
    rng: Sequence[tf.Tensor],
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Runs the pure JAX `fn` on TensorFlow tensors as compiled XLA.

    Args:
        fn: the layer's pure function (`jaxlayer._pure.PureFunction`),
            `fn(params, inputs, state, rng) -> (outputs, new_state)` on lists
            of JAX arrays.
        params: the values of the parameter variables.
        inputs: the input tensors (any static shape, unknown dims included).
        state: the values of the state variables.
        rng: the seeds, int32 tensors of shape [2].

    Returns:
        `(outputs, new_state)`, lists of TensorFlow tensors. `outputs` are
        differentiable with respect to the floating `params` that are
        trainable and the floating `inputs`; `new_state` carries no gradient.
    """
    args = [
        x if isinstance(x, tf.Tensor) else tf.convert_to_tensor(x)
        for x in (*params, *inputs, *state, *rng)
    ]
    counts = (len(params), len(inputs), len(state))
    slot = fn.slot("tensorflow", Slot)
    call_mode = mode()
    conversion = symbolic(fn, slot, args, counts)
    if conversion is not None:
        args = checked_args(fn, slot, conversion, args, counts)
        return conversion(args, call_mode, diff_mask(fn, conversion))
    # The run-time fallback calls `run` again, eagerly, for the shapes it meets.
    return concrete(fn, slot, args, counts, call_mode, run)


# -- import-time side effects -----------------------------------------------------
# `JaxLayer.build` initialises through it (see `outside_graph`): the optional
# bridge attribute `run.outside_graph` (`jaxlayer.bridges`).
run.outside_graph = outside_graph
