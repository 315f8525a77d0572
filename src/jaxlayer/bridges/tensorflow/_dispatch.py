"""Which export serves a call: one per input structure, symbolic where it can.

One export serves every batch size. The first export of an input structure
makes every input dimension symbolic (one shared batch symbol when the
inputs' first dims agree), so that one export also serves the other sequence
lengths or image sizes Keras may trace later; where the function needs some
of them concrete, only the batch and the dims unknown in the traced shapes
are symbolic. A function that cannot be exported with a symbolic batch (an
Equinox `BatchNorm`: `pmean` over a vmapped axis) is exported for each
concrete input shape, with one warning per layer, and runs at run time
(`at_run_time`) where TensorFlow traces with an unknown batch.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from jaxlayer._shapes import trace_bounded
from jaxlayer.bridges.tensorflow._conversion import Conversion
from jaxlayer.bridges.tensorflow._export import ExportError
from jaxlayer.bridges.tensorflow._run_time import at_run_time
from jaxlayer.bridges.tensorflow._specs import (
    concrete_specs,
    declared_key,
    error_with_concrete_shapes,
    general_key,
    run_time_specs,
    shape_of,
    shared_key,
    symbolic_dims,
    symbolic_key,
    within,
)


class Slot:
    """The bridge's state for one pure function (its "tensorflow" slot).

    Attributes:
        conversions: structure key -> `Conversion` (several keys may share
            one conversion: the general one serves them all).
        failed: structure keys whose symbolic export failed -> the error.
        hopeless: structure keys for which every candidate failed.
        warned: whether the concrete-shapes warning was given (once per
            function).
        run_time_specs: structure key -> output `(dtype, shape)`s of a call
            exported at run time (unknown dims traced, concrete fallback).
        bounds: conversion -> the largest sizes of its symbols, where the
            function needs them (`_shapes.trace_bounded`).
        graph_grads: what the gradients of the run-time calls traced in
            graphs need (see `grad_fn`).
    """

    __slots__ = (
        "conversions",
        "failed",
        "hopeless",
        "warned",
        "run_time_specs",
        "graph_grads",
        "bounds",
    )

    def __init__(self):
        self.conversions: dict = {}
        self.failed: dict = {}
        self.hopeless: set = set()
        self.warned = False
        self.run_time_specs: dict = {}
        self.graph_grads: list = []
        self.bounds: dict = {}


def diff_mask(fn, conversion):
    """Which floating params are differentiated: the trainable ones."""
    # None: every floating param is differentiated.
    trainable = fn.trainable()
    if trainable is None:
        return None
    n_params = conversion.counts[0]
    if len(trainable) != n_params:
        return None
    return tuple(bool(t) for t in trainable)


def symbolic(fn, slot, args, counts):
    """The conversion serving `args` with symbolic dims, or None.

    Tries, once per structure: every input dim symbolic (the general key);
    the dims unknown when the layer was first called (a `keras.Input`'s
    None) symbolic, so that Keras's traces with and without a known
    sequence length share one export (the declared key); then the batch and
    every dim symbolic with equal dims sharing a symbol (`shared_key`: token
    ids and their attention mask); then the batch and the dims unknown in
    this trace only (the structure key).
    """
    key = symbolic_key(args, counts)
    conversion = slot.conversions.get(key)
    # A structure met before: its conversion, or None (every candidate
    # failed, not retried).
    if conversion is not None or key in slot.hopeless:
        return conversion
    candidates = (
        general_key(key, counts),
        declared_key(key, counts, fn.input_shapes()),
        shared_key(key, counts, fn.called_shapes()),
        key,
    )
    # In order, each once: the keys may coincide (and the structure's own key
    # may be a candidate that failed for another structure).
    for candidate in dict.fromkeys(c for c in candidates if c is not None):
        conversion = slot.conversions.get(candidate)
        if conversion is None and candidate not in slot.failed:
            try:
                conversion, bounds = trace_bounded(
                    lambda specs: _exported(Conversion(fn, specs, counts)),
                    *symbolic_dims(candidate),
                    # Never below the sizes of this call.
                    known=[[shape_of(x) for x in args]],
                )
            except ExportError as err:
                # The cause is what the concrete-shapes warning reports.
                slot.failed[candidate] = err.__cause__
                conversion = None
            else:
                slot.conversions[candidate] = conversion
                if bounds:
                    slot.bounds[conversion] = bounds
        # A size above a bound the function needs: not this conversion (the
        # next candidates keep that size known, or the concrete export does).
        if conversion is not None and not within(
            conversion.specs, args, slot.bounds.get(conversion)
        ):
            conversion = None
        if conversion is not None:
            # Under this structure's own key too: found at once next time.
            slot.conversions[key] = conversion
            return conversion
    slot.hopeless.add(key)
    # The cause the concrete-shapes warning reports.
    slot.failed.setdefault(key, next(iter(slot.failed.values()), None))
    return None


def checked_args(fn, slot, conversion, args, counts):
    """`args`, made to wait for a run-time check of each unknown size that
    has a bound in `conversion` (known sizes were checked by `symbolic`),
    so that a larger one fails with the layer's message, not inside XLA."""
    bounds = slot.bounds.get(conversion)
    if not bounds:
        return args
    n_params, n_inputs, _ = counts
    out = list(args)
    for k in range(n_inputs):
        x = args[n_params + k]
        spec = conversion.specs[n_params + k]
        checks = [
            tf.debugging.assert_less_equal(
                tf.shape(x)[i],
                tf.constant(bound, tf.int32),
                message=(
                    f"{fn.owner}: inputs[{k}] dimension {i} may be at most "
                    f"{bound} (the function compares that size with {bound}, "
                    f"so it was exported for sizes up to {bound})"
                ),
            )
            for i, (d, size) in enumerate(
                zip(spec.shape, x.shape.as_list(), strict=True)
            )
            if size is None
            and not isinstance(d, int)
            and (bound := bounds.get(str(d))) is not None
        ]
        if checks:
            with tf.control_dependencies(checks):
                out[n_params + k] = tf.identity(x)
    return out


def _exported(conversion):
    """`conversion`, its forward exported (`ExportError` if it cannot be)."""
    conversion.forward()
    return conversion


def concrete(fn, slot, args, counts, mode, run):
    """Runs `fn` exported for the concrete shapes (the symbolic export failed).

    Shapes known here: one export per shape. Unknown dims (a graph traced
    with an unknown batch): the call runs eagerly at run time, inside
    `tf.py_function`, and exports for the shapes it meets (through `run`,
    the bridge's).
    """
    key = symbolic_key(args, counts)
    cause = slot.failed.get(key)
    # Unknown dims while tracing: no concrete export can be made now.
    if any(None in x.shape.as_list() for x in args):
        own = error_with_concrete_shapes(fn, args, counts)
        if own is not None:
            # The function fails whatever the shapes: its own error.
            slot.failed.pop(key, None)
            slot.hopeless.discard(key)
            raise own
        _warn_concrete(fn, slot, cause)
        specs = slot.run_time_specs.get(key)
        if specs is None:
            specs = slot.run_time_specs[key] = run_time_specs(fn, args, counts)
        return at_run_time(fn, specs, args, counts, slot.graph_grads, run)
    concrete_key = ("concrete", tuple(shape_of(a) for a in args), key)
    conversion = slot.conversions.get(concrete_key)
    if conversion is None:
        conversion = Conversion(fn, concrete_specs(args), counts)
        try:
            conversion.forward()
        except ExportError as err:
            # It fails with concrete shapes too: the error is the function's
            # own (or the layer's contract), not the symbolic shapes'. Raise
            # it as it is, and try symbolic shapes again next time.
            slot.failed.pop(key, None)
            slot.hopeless.discard(key)
            raise err.__cause__ from None
        slot.conversions[concrete_key] = conversion
    _warn_concrete(fn, slot, cause)
    return conversion(args, mode, diff_mask(fn, conversion))


def _warn_concrete(fn, slot, cause):
    if slot.warned:
        return
    slot.warned = True
    warnings.warn(
        f"{fn.owner}: `call_fn` could not be exported with a symbolic batch "
        "dimension, so it is exported for the concrete input shapes, once "
        "for each new shape (a partial last batch runs through "
        "`tf.py_function`, which `jit_compile` and a SavedModel served "
        f"without Python cannot run). Cause: {cause}",
        # Past this module and `run`: where the layer calls the bridge.
        stacklevel=4,
    )
