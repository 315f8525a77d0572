"""A call exported when the graph runs, for the shapes it then has.

The fallback for a function exported per concrete shape, traced with an
unknown dim (the partial last batch of `fit` or `predict`): the call runs
eagerly through `tf.py_function`, which `jit_compile` and a SavedModel
served without Python cannot run.
"""

from __future__ import annotations

import weakref

import tensorflow as tf

from jaxlayer.bridges.tensorflow._gradients import grad_fn
from jaxlayer.bridges.tensorflow._specs import split


def at_run_time(fn, specs, args, counts, keep, run):
    """Calls `fn` eagerly when the graph runs, for the shapes it then has.

    The forward and its VJP are each one `tf.py_function`; the gradient is
    computed by the eager call's own (exported) VJP, for the floating
    arguments only: integer state and seeds get none.

    Args:
        fn: the pure function.
        specs: the outputs' `RunTimeSpecs`.
        args: the flat arguments (tensors of the graph being traced).
        counts: `(n_params, n_inputs, n_state)`.
        keep: the list that holds the gradients' contexts (see `grad_fn`).
        run: the bridge's `run`, which the eager call goes through.
    """
    n_state = counts[2]
    n_args = len(args)
    # Weak: the traced graph must not keep a dropped layer's function.
    fn_ref = weakref.ref(fn)
    n_outputs = len(specs.outs) - n_state
    # Integer arguments (state, seeds) and outputs take no gradient.
    floats = [i for i, x in enumerate(args) if x.dtype.is_floating]
    float_outs = [j for j in range(n_outputs) if specs.outs[j][0].is_floating]

    def eager_run(values):
        live = fn_ref()
        if live is None:
            raise RuntimeError(f"{specs.owner}: the layer's function was deleted.")
        return run(live, *split(values, counts))

    def eager(*values):
        outputs, new_state = eager_run(values)
        return [*outputs, *new_state]

    def eager_vjp(*values):
        primals, cts = list(values[:n_args]), values[n_args:]
        # Under the tape, `run` uses the exported forward with residuals and
        # its VJP: the gradient is the conversion's own.
        with tf.GradientTape() as tape:
            for i in floats:
                tape.watch(primals[i])
            outputs, _ = eager_run(primals)
        return tape.gradient(
            [outputs[j] for j in float_outs],
            [primals[i] for i in floats],
            output_gradients=list(cts),
            # `tf.py_function` needs a tensor for every declared result.
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    @tf.custom_gradient
    def differentiable(*values):
        results = tf.py_function(eager, values, Tout=[d for d, _ in specs.outs])
        # `tf.py_function` knows no shapes: the probed static ones.
        for x, (_, shape) in zip(results, specs.outs, strict=True):
            x.set_shape(shape)

        def backward(cts):
            # Nothing to differentiate: no `tf.py_function` in the gradient.
            if not floats or not float_outs:
                return [None] * n_args
            cts = [
                tf.zeros_like(results[j]) if cts[j] is None else cts[j]
                for j in float_outs
            ]
            grads = tf.py_function(
                eager_vjp, [*values, *cts], Tout=[values[i].dtype for i in floats]
            )
            full = [None] * n_args
            for i, g in zip(floats, grads, strict=True):
                # Its results have unknown shapes: the argument's.
                g.set_shape(values[i].shape)
                full[i] = g
            return full

        return list(results), grad_fn(backward, keep)

    results = differentiable(*args)
    return list(results[:n_outputs]), [tf.stop_gradient(x) for x in results[n_outputs:]]
