"""The TensorFlow backend: the JAX function runs as an `XlaCallModule` op.

The pure function is exported with `jax.export` (StableHLO, with symbolic
dimensions) and called inside TensorFlow through the `XlaCallModule` op, the
op `jax2tf` uses: it runs eagerly, inside `tf.function` (with or without
`jit_compile`) and in a SavedModel served by TensorFlow alone (no jax).

Gradients are attached with `tf.custom_gradient`. Where a gradient tape may
record (a train step), one op computes the outputs and the VJP residuals and
one op the gradients of every differentiable argument from them, so the
forward is not computed twice. Residuals that are arguments or outputs are
not returned twice, and parameters that are frozen at trace time
(`variable.trainable = False`) get no gradient and no residuals. Traced
without a tape (predict, SavedModel), the op is the plain forward, with a
gradient that recomputes it should the graph be differentiated later. Eager
calls outside any tape use the plain forward alone.

Shapes: one export serves every batch size. The first export of an input
structure makes every input dimension symbolic (one shared batch symbol when
the inputs' first dims agree), so that one export also serves the other
sequence lengths or image sizes Keras may trace later; where the function
needs some of them concrete, only the batch and the dims unknown in the
traced shapes are symbolic. A function that cannot be exported with a
symbolic batch (an Equinox `BatchNorm`: `pmean` over a vmapped axis) is
exported for each concrete input shape, with one warning per layer; where
TensorFlow traces with an unknown batch (the partial last batch of `fit`
or `predict`), the call runs eagerly through `tf.py_function` and exports
for each batch size it meets. A graph with such a call cannot be compiled
with `jit_compile` nor served from a SavedModel without Python: give a fixed
batch size there. Exports are made lazily, kept in the layer's pure function
(`fn.slot("tensorflow")`, dropped with the layer or whenever its function
changes) and counted by `conversion_count()`.

Speed, and when to turn on `jit_compile`: without XLA (Keras's default on
the CPU) the forward and the VJP run as `XlaCallModule` ops among
TensorFlow's own. Measured on a 2-core CPU (tensorflow 2.21, jax 0.10): an
op costs about 35 us beyond its math (a trivial module: 41-47 us in a
`tf.function`, beyond an empty one, with one or six arguments or results;
JAX runs the same in 6-12 us); the rest of the difference is TensorFlow's
XLA compiling the module differently from JAX's: for the benchmark MLP, the
forward with residuals took 440 us against 330 us in JAX, the VJP 700
against 500 us, while for the CNN the forward took the same and the VJP
8.1 ms against 12.4 ms (TensorFlow's faster). Exports with concrete shapes
ran no faster than symbolic ones, and one op per step (a plain forward, the
VJP recomputing it) was slower than two (MLP 1.12 against 1.06 ms per
gradient, CNN 14.8 against 12.1 ms; `benchmarks/crossing.py` takes a call
apart). With `model.compile(..., jit_compile=True)` the whole train step,
the exported modules included, is one XLA computation, and the layer's
`fit` step was measured at 1.00x native Keras layers compiled the same way
for an MLP and a CNN, 1.16x for a transformer block (`benchmarks/results-tensorflow-jit-
compile.md`, 2-core CPU). Turn it on for training loops where the per-step
cost matters; leave it off for functions XLA cannot compile whole (a
`tf.py_function` fallback above, say).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from jaxlayer import _private
from jaxlayer._pure import fill_unknown
from jaxlayer.export import _registry

_call_module = _private.tf_call_module()
_could_possibly_record = _private.tf_could_possibly_record()

# Platforms the export serves when the layer names none: TensorFlow may place
# the op on a CPU or on an NVIDIA GPU.
DEFAULT_PLATFORMS = ("cpu", "cuda")

_count = 0


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
    return _count


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
    slot = fn.slot("tensorflow", _Slot)
    mode = _mode()
    conversion = _conversion(fn, slot, args, counts)
    if conversion is not None:
        return conversion(args, mode, _diff_mask(fn, conversion))
    return _concrete(fn, slot, args, counts, mode)


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


# -- what the bridge keeps for one pure function --------------------------------


class _Slot:
    """The bridge's state for one pure function (its "tensorflow" slot).

    Attributes:
        conversions: structure key -> `_Conversion` (several keys may share
            one conversion: the general one serves them all).
        failed: structure keys whose symbolic export failed -> the error.
        warned: whether the concrete-shapes warning was given (once per
            function).
        run_time_specs: structure key -> output `(dtype, shape)`s of a call
            exported at run time (unknown dims traced, concrete fallback).
        graph_grads: what the gradients of the run-time calls traced in
            graphs need (see `_grad_fn`).
    """

    __slots__ = ("conversions", "failed", "warned", "run_time_specs", "graph_grads")

    def __init__(self):
        self.conversions: dict = {}
        self.failed: dict = {}
        self.warned = False
        self.run_time_specs: dict = {}
        self.graph_grads: list = []


def _conversion(fn, slot, args, counts):
    """The conversion serving `args` with symbolic dims, or None.

    Tries, once per structure: every input dim symbolic (the general key);
    the dims unknown when the layer was first called (a `keras.Input`'s
    None) symbolic, so that Keras's traces with and without a known
    sequence length share one export (the declared key); then the batch and
    the dims unknown in this trace only (the structure key).
    """
    key = _symbolic_key(args, counts)
    conversion = slot.conversions.get(key)
    if conversion is not None or key in slot.failed:
        return conversion
    candidates = (
        _general_key(key, counts),
        _declared_key(key, counts, fn.input_shapes()),
        key,
    )
    for candidate in dict.fromkeys(c for c in candidates if c is not None):
        conversion = slot.conversions.get(candidate)
        if conversion is None and candidate not in slot.failed:
            conversion = _Conversion(fn, _symbolic_specs(candidate), counts)
            try:
                conversion.forward()
            except _ExportError as err:
                slot.failed[candidate] = err.__cause__
                conversion = None
            else:
                slot.conversions[candidate] = conversion
        if conversion is not None:
            slot.conversions[key] = conversion
            return conversion
    return None


def _concrete(fn, slot, args, counts, mode):
    """Runs `fn` exported for the concrete shapes (the symbolic export failed).

    Shapes known here: one export per shape. Unknown dims (a graph traced
    with an unknown batch): the call runs eagerly at run time, inside
    `tf.py_function`, and exports for the shapes it meets.
    """
    key = _symbolic_key(args, counts)
    cause = slot.failed.get(key)
    if any(None in x.shape.as_list() for x in args):
        own = _error_with_concrete_shapes(fn, args, counts)
        if own is not None:
            # The function fails whatever the shapes: its own error.
            del slot.failed[key]
            raise own
        _warn_concrete(fn, slot, cause)
        return _at_run_time(fn, slot, args, counts, key)
    concrete_key = ("concrete", tuple(_shape_of(a) for a in args), key)
    conversion = slot.conversions.get(concrete_key)
    if conversion is None:
        conversion = _Conversion(fn, _concrete_specs(args), counts)
        try:
            conversion.forward()
        except _ExportError as err:
            # It fails with concrete shapes too: the error is the function's
            # own (or the layer's contract), not the symbolic shapes'. Raise
            # it as it is, and try symbolic shapes again next time.
            slot.failed.pop(key, None)
            raise err.__cause__ from None
        slot.conversions[concrete_key] = conversion
    _warn_concrete(fn, slot, cause)
    return conversion(args, mode, _diff_mask(fn, conversion))


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
        stacklevel=4,
    )


def _at_run_time(fn, slot, args, counts, key):
    """Calls `fn` eagerly when the graph runs, for the shapes it then has.

    The forward and its VJP are each one `tf.py_function`; the gradient is
    computed by the eager call's own (exported) VJP, for the floating
    arguments only: integer state and seeds get none.
    """
    specs = slot.run_time_specs.get(key)
    if specs is None:
        specs = slot.run_time_specs[key] = _run_time_specs(fn, args, counts)
    n_params, n_inputs, n_state = counts
    n_args = len(args)
    fn_ref = weakref.ref(fn)
    n_outputs = len(specs.outs) - n_state
    floats = [i for i, x in enumerate(args) if x.dtype.is_floating]
    float_outs = [j for j in range(n_outputs) if specs.outs[j][0].is_floating]

    def eager_run(values):
        live = fn_ref()
        if live is None:
            raise RuntimeError(f"{specs.owner}: the layer's function was deleted.")
        a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
        return run(live, values[:a], values[a:b], values[b:c], values[c:])

    def eager(*values):
        outputs, new_state = eager_run(values)
        return [*outputs, *new_state]

    def eager_vjp(*values):
        primals, cts = list(values[:n_args]), values[n_args:]
        with tf.GradientTape() as tape:
            for i in floats:
                tape.watch(primals[i])
            outputs, _ = eager_run(primals)
        return tape.gradient(
            [outputs[j] for j in float_outs],
            [primals[i] for i in floats],
            output_gradients=list(cts),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    @tf.custom_gradient
    def differentiable(*values):
        results = tf.py_function(eager, values, Tout=[d for d, _ in specs.outs])
        for x, (_, shape) in zip(results, specs.outs, strict=True):
            x.set_shape(shape)

        def backward(cts):
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
                g.set_shape(values[i].shape)
                full[i] = g
            return full

        return list(results), _grad_fn(backward, slot)

    results = differentiable(*args)
    return list(results[:n_outputs]), [tf.stop_gradient(x) for x in results[n_outputs:]]


class _RunTimeSpecs:
    __slots__ = ("owner", "outs")

    def __init__(self, owner, outs):
        self.owner = owner
        self.outs = outs


def _run_time_specs(fn, args, counts):
    """Output dtypes and static shapes: `fn` evaluated at two sizes for the
    unknown dims; a dim that differs is unknown. A function that runs at
    one size only (a computation reloaded from a file, exported per shape)
    is evaluated at the shapes of a call it is known to run with, and an
    output dim of a size put in for an unknown dim is unknown."""
    try:
        results = [
            _eval_flat(fn, _probe_specs(fn, args, counts, n, called=False)[0], counts)
            for n in (2, 3)
        ]
    except Exception:  # noqa: BLE001 - tried at the called shapes, else raised
        specs, put_in = _probe_specs(fn, args, counts, 2)
        if not put_in:
            raise
        outs = [
            (tf.as_dtype(x.dtype), [None if d in put_in else d for d in x.shape])
            for x in _eval_flat(fn, specs, counts)
        ]
        return _RunTimeSpecs(fn.owner, outs)
    outs = [
        (
            tf.as_dtype(x.dtype),
            [p if p == q else None for p, q in zip(x.shape, y.shape, strict=True)],
        )
        for x, y in zip(*results, strict=True)
    ]
    return _RunTimeSpecs(fn.owner, outs)


def _eval_flat(fn, specs, counts) -> list:
    """`jax.eval_shape` of `fn` on the flat `specs` of its arguments: its
    outputs, then its new state."""
    n_params, n_inputs, n_state = counts
    a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
    outputs, new_state = jax.eval_shape(
        fn, specs[:a], specs[a:b], specs[b:c], specs[c:]
    )
    return [*outputs, *new_state]


def _probe_specs(fn, args, counts, size, called=True):
    """`jax.ShapeDtypeStruct`s of `args` with their unknown dims made
    concrete: the inputs' as in `fn.called_shapes()` (a call the layer knows
    the function runs with) when `called` and they fit, every other `size`.

    Returns:
        `(specs, put_in)`: `put_in` is the set of sizes taken from the
        called shapes (empty when none were).
    """
    n_params, n_inputs, _ = counts
    shapes = [tuple(x.shape.as_list()) for x in args]
    put_in: set = set()
    inputs = slice(n_params, n_params + n_inputs)
    fit = fill_unknown(shapes[inputs], fn.called_shapes()) if called else None
    if fit is not None:
        shapes[inputs], put_in = fit
    specs = [
        jax.ShapeDtypeStruct(
            tuple(size if d is None else d for d in shape), _jax_dtype(x.dtype)
        )
        for shape, x in zip(shapes, args, strict=True)
    ]
    return specs, put_in


# -- structure keys and export specs ----------------------------------------


def _shape_of(x: tf.Tensor) -> tuple:
    return tuple(x.shape.as_list()) if x.shape.rank is not None else None


def _symbolic_key(args, counts):
    """What one export depends on.

    Variables are keyed by shape and dtype; inputs by dtype, rank, their
    known non-batch dims and how their first (batch) dims group: inputs whose
    first dims agree (or are all unknown) share one batch symbol. A None dim
    is symbolic.
    """
    n_params, n_inputs, _ = counts
    firsts = {x.shape[0] for x in args[n_params : n_params + n_inputs] if x.shape.rank}
    shared = len(firsts) <= 1
    parts = []
    for i, x in enumerate(args):
        shape = _shape_of(x)
        if shape is None:
            raise ValueError(
                f"JaxLayer on TensorFlow: every tensor needs a known rank; got {x!r}."
            )
        if n_params <= i < n_params + n_inputs and shape:
            if shared:
                group = ("b", 0)
            elif shape[0] is None:
                group = ("b", "input", i)
            else:
                group = ("b", shape[0])
            shape = (group, *shape[1:])
        parts.append((x.dtype, shape))
    return ("symbolic", tuple(parts))


def _general_key(key, counts):
    """`key` with every non-batch input dim symbolic."""
    n_params, n_inputs, _ = counts
    parts = list(key[1])
    for i in range(n_params, n_params + n_inputs):
        dtype, shape = parts[i]
        if len(shape) > 1:
            parts[i] = (dtype, (shape[0], *[None] * (len(shape) - 1)))
    return ("symbolic", tuple(parts))


def _declared_key(key, counts, declared):
    """`key` with the input dims unknown in `declared` symbolic (or None)."""
    n_params, n_inputs, _ = counts
    if declared is None or len(declared) != n_inputs:
        return None
    parts = list(key[1])
    for i, template in zip(range(n_params, n_params + n_inputs), declared, strict=True):
        dtype, shape = parts[i]
        if len(template) != len(shape):
            return None
        parts[i] = (
            dtype,
            tuple(
                d if j == 0 or t is not None else None
                for j, (d, t) in enumerate(zip(shape, template, strict=True))
            ),
        )
    return ("symbolic", tuple(parts))


def _jax_dtype(tf_dtype):
    return jax.dtypes.canonicalize_dtype(np.dtype(tf_dtype.as_numpy_dtype))


def _symbolic_specs(key):
    """`jax.ShapeDtypeStruct`s with symbolic dims for one structure key."""
    scope = jax.export.SymbolicScope()
    names = {}
    fresh = (f"d{i}" for i in itertools.count())
    specs = []
    for tf_dtype, shape in key[1]:
        dims = []
        for d in shape:
            if isinstance(d, tuple):  # a batch group
                if d not in names:
                    names[d] = "batch" if not names else f"batch{len(names)}"
                dims.append(names[d])
            elif d is None:
                dims.append(next(fresh))
            else:
                dims.append(str(d))
        sym = jax.export.symbolic_shape(",".join(dims), scope=scope)
        specs.append(jax.ShapeDtypeStruct(sym, _jax_dtype(tf_dtype)))
    return specs


def _concrete_specs(args):
    return [
        jax.ShapeDtypeStruct(tuple(x.shape.as_list()), _jax_dtype(x.dtype))
        for x in args
    ]


# -- conversion ---------------------------------------------------------------


class _ExportError(Exception):
    """`jax.export` failed; the cause is the original error."""


def _mode():
    """How the call may be differentiated.

    "plain": eager, no tape: no gradient can be asked for. "train": a tape may
    record (eager or while tracing a train step): outputs and residuals in
    one op, the VJP from the residuals. "graph": traced without a tape
    (predict, SavedModel): a plain forward, with a gradient that recomputes
    the forward, in case the function is differentiated later.
    """
    if _could_possibly_record():
        return "train"
    return "plain" if tf.executing_eagerly() else "graph"


def _diff_mask(fn, conversion):
    """Which floating params are differentiated: the trainable ones."""
    trainable = fn.trainable()
    if trainable is None:
        return None
    n_params = conversion.counts[0]
    if len(trainable) != n_params:
        return None
    return tuple(bool(t) for t in trainable)


def _error_with_concrete_shapes(fn, args, counts):
    """The error `fn` raises when traced with its unknown dims made concrete
    (`_probe_specs`), if any."""
    specs, _ = _probe_specs(fn, args, counts, 2)
    try:
        _eval_flat(fn, specs, counts)
    except Exception as err:  # noqa: BLE001 - returned to be raised
        return err
    return None


def _platform_choices(fn):
    chosen = getattr(fn, "native_serialization_platforms", None)
    if chosen is not None:
        return [tuple(chosen)]
    current = "cuda" if tf.config.list_logical_devices("GPU") else "cpu"
    # Should some operation not lower for every default platform, the
    # platform TensorFlow runs on here is enough.
    return [DEFAULT_PLATFORMS, (current,)]


def _export(fn_flat, specs, platforms_list):
    """Exports `fn_flat` for the first platform set that lowers."""
    global _count
    first_error = None
    for platforms in platforms_list:
        try:
            exported = jax.export.export(jax.jit(fn_flat), platforms=platforms)(*specs)
        except Exception as err:  # noqa: BLE001 - next platforms, or re-raise
            first_error = first_error or err
            continue
        _count += 1
        return exported
    raise _ExportError() from first_error


def _is_float(dtype) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


class _Call:
    """One export and how to call it as an `XlaCallModule` op.

    The op's attributes are built once, from the export's public fields.
    """

    __slots__ = ("exported", "attrs", "kept", "in_avals", "out_avals")

    def __init__(self, exported):
        self.exported = exported
        self.in_avals = exported.in_avals
        self.out_avals = exported.out_avals
        self.attrs = {
            "version": exported.calling_convention_version,
            "module": exported.mlir_module_serialized,
            "Tout": [tf.as_dtype(a.dtype) for a in exported.out_avals],
            "Sout": [
                [d if isinstance(d, int) else None for d in a.shape]
                for a in exported.out_avals
            ],
            "platforms": [p.upper() for p in exported.platforms],
            "disabled_checks": [str(c) for c in exported.disabled_safety_checks],
            "has_token_input_output": False,
            "function_list": [],
            "use_shardy_partitioner": bool(jax.config.jax_use_shardy_partitioner),
        }
        kept = sorted(exported.module_kept_var_idx)
        self.kept = None if kept == list(range(len(exported.in_avals))) else kept

    def __call__(self, args) -> list[Any]:
        """Runs the export on `args` (TensorFlow tensors)."""
        kept = self.kept
        results = list(
            _call_module(
                args if kept is None else [args[i] for i in kept], **self.attrs
            )
        )
        if not tf.executing_eagerly():
            # Static output dims where a symbol's size is static in this graph.
            sizes = {}
            for aval, x in zip(self.in_avals, args, strict=True):
                for d, size in zip(aval.shape, x.shape, strict=True):
                    if not isinstance(d, int) and size is not None:
                        sizes.setdefault(str(d), size)
            for aval, x in zip(self.out_avals, results, strict=True):
                x.set_shape(
                    [d if isinstance(d, int) else sizes.get(str(d)) for d in aval.shape]
                )
        return results


class _Train:
    """The training pair of one conversion for one set of differentiated
    arguments: the forward with residuals, and the backward (made lazily)."""

    __slots__ = ("forward", "sources", "res_specs", "treedef", "backward")

    def __init__(self, forward, sources, res_specs, treedef):
        self.forward = forward
        self.sources = sources
        self.res_specs = res_specs
        self.treedef = treedef
        self.backward = None


class _Conversion:
    """The exports of one function for one input structure, made lazily.

    `forward()` exports the plain forward (and raises `_ExportError` when it
    cannot be exported); the training exports are made per set of
    differentiated arguments (the floating inputs, and the floating params
    trainable when traced).
    """

    def __init__(self, fn, specs, counts):
        self._fn = weakref.ref(fn)
        self.owner = fn.owner
        self.specs = specs
        self.counts = counts
        self._platforms = _platform_choices(fn)
        self._forward = None
        self._source = None
        self._train = {}
        self._vjp = {}
        self._train_failed = {}
        # What the gradients of the calls traced in graphs need (`_grad_fn`).
        self.graph_grads = []
        n_params, n_inputs, _ = counts
        self._float = [
            i for i, s in enumerate(specs[: n_params + n_inputs]) if _is_float(s.dtype)
        ]

    # -- the pure function on flat lists --

    def _live_fn(self):
        fn = self._fn()
        if fn is None:
            raise RuntimeError(
                f"{self.owner}: the layer's function was deleted; it can no "
                "longer be exported."
            )
        return fn

    def _split(self, flat):
        n_params, n_inputs, n_state = self.counts
        a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
        return list(flat[:a]), list(flat[a:b]), list(flat[b:c]), list(flat[c:])

    def diff(self, mask):
        """The differentiated argument indices for a trainable mask."""
        n_params = self.counts[0]
        if mask is None:
            return tuple(self._float)
        return tuple(i for i in self._float if i >= n_params or mask[i])

    # -- exports --

    def forward(self):
        """The plain forward's call (exported on first use)."""
        if self._forward is None:
            fn = self._live_fn()

            def forward(*flat):
                outputs, new_state = fn(*self._split(flat))
                return [*outputs, *new_state]

            call = _Call(_export(forward, self.specs, self._platforms))
            self._remember(call, forward)
            n_outputs = len(call.out_avals) - self.counts[2]
            self._float_outs = [
                j
                for j, a in enumerate(call.out_avals[:n_outputs])
                if _is_float(a.dtype)
            ]
            self._n_outputs = n_outputs
            self._forward = call
        return self._forward

    def _remember(self, call, forward):
        """Records the forward's function for the ONNX/OpenVINO converters
        (`jaxlayer.export`), which read the op's module from a graph."""
        # The conversion owns the source (in the layer's function's slot);
        # the registry holds it weakly.
        self._source = _registry.ForwardSource(
            owner=self.owner,
            function=lambda: forward,
            specs=list(self.specs),
            kept=call.kept,
        )
        _registry.remember(call.attrs["module"], self._source)

    def _of_diff(self, fn, flat, diff, float_outs):
        """`f(*diff_values) -> (float outputs, (outputs, new_state))`."""

        def of_diff(*diff_values):
            full = list(flat)
            for i, v in zip(diff, diff_values, strict=True):
                full[i] = v
            outputs, new_state = fn(*self._split(full))
            return [outputs[j] for j in float_outs], (outputs, new_state)

        return of_diff

    def train(self, diff):
        """The forward with VJP residuals for `diff` (exported on first use)."""
        train = self._train.get(diff)
        if train is not None:
            return train
        if diff in self._train_failed:
            raise self._train_failed[diff]
        self.forward()
        fn, specs, float_outs = self._live_fn(), self.specs, self._float_outs
        box = {}

        def train_fn(*flat):
            _, pullback, (outputs, new_state) = jax.vjp(
                self._of_diff(fn, flat, diff, float_outs),
                *[flat[i] for i in diff],
                has_aux=True,
            )
            leaves, box["treedef"] = jax.tree_util.tree_flatten(pullback)
            known = {id(x): ("arg", i) for i, x in enumerate(flat)}
            known.update({id(x): ("out", j) for j, x in enumerate(outputs)})
            sources, residuals = [], []
            for leaf in leaves:
                source = known.get(id(leaf))
                if source is None:
                    source = ("res", len(residuals))
                    residuals.append(leaf)
                sources.append(source)
            box["sources"] = sources
            return [*outputs, *new_state, *residuals]

        try:
            call = _Call(_export(train_fn, specs, self._platforms))
        except _ExportError as err:
            error = self._gradient_error("the forward pass with its VJP", err)
            self._train_failed[diff] = error
            raise error from None
        n_out_state = self._n_outputs + self.counts[2]
        out_avals = call.out_avals
        sources = [
            ("res", n_out_state + i) if kind == "res" else (kind, i)
            for kind, i in box["sources"]
        ]
        res_specs = [
            _struct(specs[i] if kind == "arg" else out_avals[i]) for kind, i in sources
        ]
        train = self._train[diff] = _Train(call, sources, res_specs, box["treedef"])
        return train

    def backward(self, train):
        """The gradients from the residuals and cotangents of `train`."""
        if train.backward is None:
            treedef, n_res = train.treedef, len(train.res_specs)

            def backward(*flat):
                pullback = jax.tree_util.tree_unflatten(treedef, list(flat[:n_res]))
                return list(pullback(list(flat[n_res:])))

            try:
                exported = _export(
                    backward, [*train.res_specs, *self._ct_specs()], self._platforms
                )
            except _ExportError as err:
                raise self._gradient_error("the VJP (backward pass)", err) from None
            train.backward = _Call(exported)
        return train.backward

    def vjp(self, diff):
        """The gradients from the args and cotangents (recomputes the forward)."""
        call = self._vjp.get(diff)
        if call is not None:
            return call
        self.forward()
        fn, n_args, float_outs = self._live_fn(), len(self.specs), self._float_outs

        def vjp(*flat):
            primals = list(flat[:n_args])
            _, pullback, _ = jax.vjp(
                self._of_diff(fn, primals, diff, float_outs),
                *[primals[i] for i in diff],
                has_aux=True,
            )
            return list(pullback(list(flat[n_args:])))

        try:
            exported = _export(vjp, [*self.specs, *self._ct_specs()], self._platforms)
        except _ExportError as err:
            raise self._gradient_error("the VJP", err) from None
        call = self._vjp[diff] = _Call(exported)
        return call

    def _ct_specs(self):
        avals = self.forward().out_avals
        return [_struct(avals[j]) for j in self._float_outs]

    def _gradient_error(self, what, err):
        cause = err.__cause__
        return ValueError(
            f"{self.owner}: the gradient of `call_fn` cannot be computed: "
            f"exporting {what} with `jax.export` failed ({type(cause).__name__}: "
            f"{cause}). Check that `jax.vjp` works on `call_fn` (no "
            "non-differentiable operations on the trainable parameters or "
            "floating inputs), or freeze the parameters that cannot be "
            "differentiated (`variable.trainable = False`)."
        )

    # -- calls --

    def __call__(self, args, mode, mask):
        args = _cast_args(args, self.specs)
        forward = self.forward()
        n_outputs, n_state = self._n_outputs, self.counts[2]
        diff = self.diff(mask) if self._float_outs else ()
        if mode == "plain" or not diff:
            results = forward(args)
            return results[:n_outputs], results[n_outputs:]
        train, error = None, None
        if mode == "train":
            try:
                train = self.train(diff)
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
                    args[i] if kind == "arg" else results[i]
                    for kind, i in train.sources
                ]
                context = _Backward(self, diff, train, residuals, results, None)
                results = results[:n_out]
            else:
                results = forward(args)
                context = _Backward(self, diff, None, args, results, error)
            return results, _grad_fn(context, self)

        results = differentiable(*args)
        new_state = [tf.stop_gradient(x) for x in results[n_outputs:]]
        return list(results[:n_outputs]), new_state


class _Backward:
    """What the gradient of one call needs: the conversion, the residuals
    (or the arguments, for a VJP that recomputes the forward) and the
    results, or the error to raise."""

    __slots__ = (
        "conversion",
        "diff",
        "train",
        "saved",
        "results",
        "error",
        "__weakref__",
    )

    def __init__(self, conversion, diff, train, saved, results, error):
        self.conversion = conversion
        self.diff = diff
        self.train = train
        self.saved = saved
        self.results = results
        self.error = error

    def __call__(self, cts):
        conversion, diff, results = self.conversion, self.diff, self.results
        cts = [
            tf.zeros_like(results[j]) if cts[j] is None else cts[j]
            for j in conversion._float_outs
        ]
        if self.error is not None:
            raise self.error
        if self.train is not None:
            grads = conversion.backward(self.train)([*self.saved, *cts])
        else:
            grads = conversion.vjp(diff)([*self.saved, *cts])
        position = {i: k for k, i in enumerate(diff)}
        return [
            grads[position[i]] if i in position else None
            for i in range(len(conversion.specs))
        ]


def _grad_fn(context, owner):
    """The gradient function given to `tf.custom_gradient`: `context(cts)`.

    In a graph, TensorFlow registers the gradient function in its gradient
    registry for good, under a unique name. Holding the context (the
    conversion and its exports, the graph's residual tensors), it would keep
    them for the life of the process. So there the registered function holds
    a weak reference, and `owner` (the conversion, or the bridge's slot for
    the function: what lives as long as the layer) holds the context. In
    eager mode the tape holds the function only while it records.

    TensorFlow's own wrapper, registered with it, keeps the traced graph
    itself; that is not ours to free.
    """
    if tf.executing_eagerly():

        def grad(*cts):
            return context(cts)

        return grad
    owner.graph_grads.append(context)
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


def _struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _cast_args(args, specs):
    """Casts tensors whose dtype JAX canonicalizes (int64 -> int32, ...)."""
    out = []
    for x, spec in zip(args, specs, strict=True):
        if x.dtype.as_numpy_dtype != spec.dtype:
            x = tf.cast(x, tf.as_dtype(spec.dtype))
        out.append(x)
    return out


#: `JaxLayer.build` initialises through it (see `outside_graph`).
run.outside_graph = outside_graph
