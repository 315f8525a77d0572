"""The call as a `tf.custom_gradient` op, and its gradient functions.

Where a gradient tape may record (a train step), one op computes the outputs
and the VJP residuals and one op the gradients of every differentiable
argument from them, so the forward is not computed twice (two ops measured
faster than one that recomputes the forward: docs/performance.md). Traced
without a tape (predict, SavedModel), the op is the plain forward, with a
gradient that recomputes it should the graph be differentiated later. Eager
calls outside any tape use the plain forward alone.
"""

from __future__ import annotations

import weakref

import tensorflow as tf


def differentiable_call(conversion, args, mode, mask):
    """Runs `conversion` (a `Conversion`) on `args`, as `graph.mode()` says.

    Returns:
        `(outputs, new_state)`; `new_state` carries no gradient.
    """
    forward = conversion.forward()
    n_outputs, n_state = conversion.n_outputs, conversion.counts[2]
    # Nothing floating comes out: nothing to differentiate.
    diff = conversion.diff(mask) if conversion.float_outs else ()
    if mode == "plain" or not diff:
        results = forward(args)
        return results[:n_outputs], results[n_outputs:]
    train, error = None, None
    if mode == "train":
        try:
            train = conversion.train(diff)
        except ValueError as err:
            # Not differentiable: the plain forward, and this error should
            # a gradient be asked for.
            error = err
    n_out = n_outputs + n_state if train is not None else None

    @tf.custom_gradient
    def differentiable(*args):
        if train is not None:
            results = train.forward(args)
            residuals = [
                args[i] if kind == "arg" else results[i] for kind, i in train.sources
            ]
            context = Backward(conversion, diff, True, residuals, results, None)
            # The residuals are not outputs of the op's caller.
            results = results[:n_out]
        else:
            results = forward(args)
            context = Backward(conversion, diff, False, args, results, error)
        return results, grad_fn(context, conversion.graph_grads)

    results = differentiable(*args)
    new_state = [tf.stop_gradient(x) for x in results[n_outputs:]]
    return list(results[:n_outputs]), new_state


class Backward:
    """What the gradient of one call needs: the conversion, the residuals
    (`from_residuals`) or the arguments (for a VJP that recomputes the
    forward) and the results, or the error to raise."""

    __slots__ = (
        "conversion",
        "diff",
        "from_residuals",
        "saved",
        "results",
        "error",
        "__weakref__",
    )

    def __init__(self, conversion, diff, from_residuals, saved, results, error):
        self.conversion = conversion
        self.diff = diff
        self.from_residuals = from_residuals
        self.saved = saved
        self.results = results
        self.error = error

    def __call__(self, cts):
        conversion, diff, results = self.conversion, self.diff, self.results
        # TensorFlow gives None for an output that received no gradient.
        cts = [
            tf.zeros_like(results[j]) if cts[j] is None else cts[j]
            for j in conversion.float_outs
        ]
        # Raised only now: a call that is never differentiated runs fine.
        if self.error is not None:
            raise self.error
        if self.from_residuals:
            grads = conversion.backward(diff)([*self.saved, *cts])
        else:
            grads = conversion.vjp(diff)([*self.saved, *cts])
        # One gradient per differentiated argument; the others get None.
        position = {i: k for k, i in enumerate(diff)}
        return [
            grads[position[i]] if i in position else None
            for i in range(len(conversion.specs))
        ]


def grad_fn(context, keep):
    """The gradient function given to `tf.custom_gradient`: `context(cts)`.

    In a graph, TensorFlow registers the gradient function in its gradient
    registry for good, under a unique name. Holding the context (the
    conversion and its exports, the graph's residual tensors), it would keep
    them for the life of the process. So there the registered function holds
    a weak reference, and the list `keep` (the conversion's, or the bridge's
    slot's for the function: what lives as long as the layer) holds the
    context. In eager mode the tape holds the function only while it records.

    TensorFlow's own wrapper, registered with it, keeps the traced graph
    itself; that is not ours to free.
    """
    if tf.executing_eagerly():

        def grad(*cts):
            return context(cts)

        return grad
    # As long as the layer's function lives; the registry's is weak.
    keep.append(context)
    return _weak_grad(weakref.ref(context))


def _weak_grad(ref):
    def grad(*cts):
        context = ref()
        if context is None:
            raise RuntimeError(
                "jaxlayer: the gradient of a graph that no longer exists was asked for."
            )
        return context(cts)

    return grad
