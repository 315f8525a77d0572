"""The TensorFlow backend: the JAX function runs as an `XlaCallModule` op.

The pure function is exported with `jax.export` (StableHLO, with symbolic
dimensions) and called inside TensorFlow through the `XlaCallModule` op, the
op `jax2tf` uses: it runs eagerly, inside `tf.function` (with or without
`jit_compile`) and in a SavedModel served by TensorFlow alone (no jax).

Gradients are attached with `tf.custom_gradient`. Where a gradient tape may
record (a train step), one op computes the outputs and the VJP residuals and
one op the VJP from them, so the forward is not computed twice. Traced
without a tape (predict, SavedModel), the op is the plain forward, with a
gradient that recomputes it should the graph be differentiated later. Eager
calls outside any tape use the plain forward alone.

One export serves every batch size: the first dimension of every input (one
shared symbol when the inputs' first dims agree) and every dimension unknown
in a tensor's static shape are symbolic; a function that cannot be exported
so is exported per concrete shape, with a warning. Exports are made lazily,
cached per (function, input structure, variable shapes and dtypes), and
counted by `conversion_count()`.
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
from tensorflow.compiler.tf2xla.python import xla as _tfxla
from tensorflow.python.eager import record as _record

# Platforms the export serves when the layer names none: TensorFlow may place
# the op on a CPU or on an NVIDIA GPU.
DEFAULT_PLATFORMS = ("cpu", "cuda")

_count = 0


def conversion_count() -> int:
    """How many JAX functions this bridge has exported (forward and VJP).

    Calling a layer again with inputs of the same structure (any batch size)
    reuses the cached export, so the count does not change.

    Returns:
        The number of `jax.export` conversions made in this process.

    Example:

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
        fn: the layer's pure function, `fn(params, inputs, state, rng) ->
            (outputs, new_state)` on lists of JAX arrays.
        params: the values of the parameter variables.
        inputs: the input tensors (any static shape, unknown dims included).
        state: the values of the state variables.
        rng: the seeds, int32 tensors of shape [2].

    Returns:
        `(outputs, new_state)`, lists of TensorFlow tensors. `outputs` are
        differentiable with respect to the floating `params` and `inputs`;
        `new_state` carries no gradient.
    """
    args = [tf.convert_to_tensor(x) for x in (*params, *inputs, *state, *rng)]
    counts = (len(params), len(inputs), len(state))
    # {structure key -> _Conversion}, kept in the pure function's slot: it
    # goes with the layer.
    per_fn = fn.slot("tensorflow", dict)
    key = _symbolic_key(args, counts)
    conversion = per_fn.get(key)
    if conversion is None:
        conversion = per_fn[key] = _Conversion(fn, _symbolic_specs(key), counts)
    mode = _mode()
    symbolic = conversion
    if symbolic.symbolic_failed is None:
        try:
            return symbolic(args, mode)
        except _ExportError as err:
            _symbolic_failure(fn, symbolic, args, counts, err.__cause__)
    concrete_key = ("concrete", tuple(_shape_of(a) for a in args), key)
    conversion = per_fn.get(concrete_key)
    if conversion is None:
        conversion = per_fn[concrete_key] = _Conversion(
            fn, _concrete_specs(args), counts
        )
    try:
        result = conversion(args, mode)
    except _ExportError as err:
        # It fails with concrete shapes too: the error is the function's own
        # (or the layer's contract), not the symbolic shapes'. Raise it as it
        # is, and try symbolic shapes again next time.
        symbolic.symbolic_failed = None
        del per_fn[concrete_key]
        raise err.__cause__ from None
    if not symbolic.warned:
        symbolic.warned = True
        warnings.warn(
            f"{fn.owner}: `call_fn` could not be exported with a symbolic "
            "batch dimension, so it is exported for the concrete input "
            "shapes, again for each new shape. Cause: "
            f"{symbolic.symbolic_failed}",
            stacklevel=2,
        )
    return result


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


# -- structure keys and export specs ----------------------------------------


def _shape_of(x: tf.Tensor) -> tuple:
    return tuple(x.shape.as_list()) if x.shape.rank is not None else None


def _symbolic_key(args, counts):
    """What one export depends on.

    Variables are keyed by shape and dtype; inputs by dtype, rank, their
    known non-batch dims and how their first (batch) dims group: inputs whose
    first dims agree (or are all unknown) share one batch symbol.
    """
    n_params, n_inputs, _ = counts
    firsts = [x.shape[0] for x in args[n_params : n_params + n_inputs] if x.shape.rank]
    shared = len(set(firsts)) <= 1
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
    if _record.could_possibly_record():
        return "train"
    return "plain" if tf.executing_eagerly() else "graph"


def _symbolic_failure(fn, conversion, args, counts, err):
    conversion.symbolic_failed = err
    if any(None in x.shape.as_list() for x in args):
        own = _error_with_concrete_shapes(fn, args, counts)
        if own is not None:
            # The function fails whatever the shapes: its own error.
            conversion.symbolic_failed = None
            raise own
        raise ValueError(
            f"{fn.owner}: `call_fn` could not be exported with symbolic "
            "dimensions (the batch dimension and unknown dimensions), and the "
            "inputs have unknown dimensions here, so it cannot be exported "
            "with concrete ones either. Make `call_fn` work for any batch "
            "size (no Python code depending on `inputs.shape[0]`), or give "
            f"the inputs static shapes. Cause: {err}"
        ) from err


def _error_with_concrete_shapes(fn, args, counts):
    """The error `fn` raises when traced with unknown dims set to 2, if any."""
    specs = [
        jax.ShapeDtypeStruct(
            tuple(2 if d is None else d for d in x.shape.as_list()),
            jax.dtypes.canonicalize_dtype(x.dtype.as_numpy_dtype),
        )
        for x in args
    ]
    n_params, n_inputs, n_state = counts
    a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
    try:
        jax.eval_shape(fn, specs[:a], specs[a:b], specs[b:c], specs[c:])
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


class _Conversion:
    """The exports of one function for one input structure, made lazily.

    Attributes:
        symbolic_failed: the export error, when symbolic shapes failed.
    """

    def __init__(self, fn, specs, counts):
        self.symbolic_failed = None
        self.warned = False
        self._fn = weakref.ref(fn)
        self._owner = fn.owner
        self._specs = specs
        self._counts = counts
        self._platforms = _platform_choices(fn)
        self._exports = {}
        self._attrs = {}
        n_params, n_inputs, _ = counts
        self._diff = [
            i for i, s in enumerate(specs[: n_params + n_inputs]) if _is_float(s.dtype)
        ]

    # -- the pure function on flat lists --

    def _live_fn(self):
        fn = self._fn()
        if fn is None:
            raise RuntimeError(
                f"{self._owner}: the layer's function was deleted; it can no "
                "longer be exported."
            )
        return fn

    def _split(self, flat):
        n_params, n_inputs, n_state = self._counts
        a, b, c = n_params, n_params + n_inputs, n_params + n_inputs + n_state
        return list(flat[:a]), list(flat[a:b]), list(flat[b:c]), list(flat[c:])

    def _export_kind(self, kind):
        exported = self._exports.get(kind)
        if exported is None:
            exported = self._exports[kind] = getattr(self, f"_export_{kind}")()
        return exported

    def _export_forward(self):
        fn = self._live_fn()

        def forward(*flat):
            outputs, new_state = fn(*self._split(flat))
            return [*outputs, *new_state]

        exported = _export(forward, self._specs, self._platforms)
        n_state = self._counts[2]
        self._n_outputs = len(exported.out_avals) - n_state
        self._float_outs = [
            j
            for j, a in enumerate(exported.out_avals[: self._n_outputs])
            if _is_float(a.dtype)
        ]
        return exported

    def _export_train(self):
        """Outputs, new state and the VJP residuals not already at hand."""
        self._export_kind("forward")
        fn, diff, specs = self._live_fn(), self._diff, self._specs
        float_outs = self._float_outs
        box = {}

        def train(*flat):
            def of_diff(*diff_values):
                full = list(flat)
                for i, v in zip(diff, diff_values, strict=True):
                    full[i] = v
                outputs, new_state = fn(*self._split(full))
                return [outputs[j] for j in float_outs], (outputs, new_state)

            _, pullback, (outputs, new_state) = jax.vjp(
                of_diff, *[flat[i] for i in diff], has_aux=True
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

        exported = _export(train, specs, self._platforms)
        n_out_state = self._n_outputs + self._counts[2]
        res_avals = exported.out_avals[n_out_state:]
        out_avals = exported.out_avals
        self._res_sources = box["sources"]
        self._res_specs = [
            _struct(
                specs[i]
                if kind == "arg"
                else out_avals[i]
                if kind == "out"
                else res_avals[i]
            )
            for kind, i in box["sources"]
        ]
        self._res_treedef = box["treedef"]
        return exported

    def _ct_specs(self):
        avals = self._export_kind("forward").out_avals
        return [_struct(avals[j]) for j in self._float_outs]

    def _export_backward(self):
        """Gradients of the differentiable args from residuals and cotangents."""
        self._export_kind("train")
        treedef, n_res = self._res_treedef, len(self._res_specs)

        def backward(*flat):
            pullback = jax.tree_util.tree_unflatten(treedef, list(flat[:n_res]))
            return list(pullback(list(flat[n_res:])))

        return _export(backward, [*self._res_specs, *self._ct_specs()], self._platforms)

    def _export_vjp(self):
        """Gradients from the args and cotangents (recomputes the forward)."""
        self._export_kind("forward")
        fn, diff, n_args = self._live_fn(), self._diff, len(self._specs)
        float_outs = self._float_outs

        def vjp(*flat):
            primals = list(flat[:n_args])

            def of_diff(*diff_values):
                full = list(primals)
                for i, v in zip(diff, diff_values, strict=True):
                    full[i] = v
                outputs, _ = fn(*self._split(full))
                return [outputs[j] for j in float_outs]

            _, pullback = jax.vjp(of_diff, *[primals[i] for i in diff])
            return list(pullback(list(flat[n_args:])))

        return _export(vjp, [*self._specs, *self._ct_specs()], self._platforms)

    # -- calls --

    def __call__(self, args, mode):
        args = _cast_args(args, self._specs)
        forward = self._export_kind("forward")
        n_outputs = self._n_outputs
        if mode == "plain" or not self._diff or not self._float_outs:
            results = _call_exported(forward, args, self._attrs)
            return results[:n_outputs], results[n_outputs:]
        n_args, float_outs = len(args), self._float_outs
        diff, diff_set = self._diff, set(self._diff)

        def full_grads(grads):
            by_index = dict(zip(diff, grads, strict=True))
            return [by_index.get(i) if i in diff_set else None for i in range(n_args)]

        def cotangents(cts, results):
            return [
                tf.zeros_like(results[j]) if cts[j] is None else cts[j]
                for j in float_outs
            ]

        if mode == "train":
            train = self._export_kind("train")
            n_out_state = n_outputs + self._counts[2]

            @tf.custom_gradient
            def differentiable(*args):
                results = _call_exported(train, args, self._attrs)
                residuals = [
                    args[i]
                    if kind == "arg"
                    else results[i]
                    if kind == "out"
                    else results[n_out_state + i]
                    for kind, i in self._res_sources
                ]

                def grad(*cts):
                    backward = self._export_kind("backward")
                    grads = _call_exported(
                        backward,
                        [*residuals, *cotangents(cts, results)],
                        self._attrs,
                    )
                    return full_grads(grads)

                return results[:n_out_state], grad

        else:

            @tf.custom_gradient
            def differentiable(*args):
                results = _call_exported(forward, args, self._attrs)

                def grad(*cts):
                    vjp = self._export_kind("vjp")
                    grads = _call_exported(
                        vjp, [*args, *cotangents(cts, results)], self._attrs
                    )
                    return full_grads(grads)

                return results, grad

        results = differentiable(*args)
        new_state = [tf.stop_gradient(x) for x in results[n_outputs:]]
        return list(results[:n_outputs]), new_state


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


def _call_attrs(exported, cache):
    """The `XlaCallModule` attributes of `exported`, built once per export.

    `cache` (id(exported) -> (exported, attributes, kept argument indices))
    belongs to the conversion that made the export, so it goes with it.
    """
    entry = cache.get(id(exported))
    if entry is None or entry[0] is not exported:
        attrs = {
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
        entry = cache[id(exported)] = (exported, attrs, kept)
    return entry[1], entry[2]


def _call_exported(exported, args, cache) -> list[Any]:
    """Runs one `jax.export.Exported` as an `XlaCallModule` op."""
    attrs, kept = _call_attrs(exported, cache)
    results = list(_tfxla.call_module([args[i] for i in kept], **attrs))
    if not tf.executing_eagerly():
        # Static output dims where a symbol's size is static in this graph.
        sizes = {}
        for aval, x in zip(exported.in_avals, args, strict=True):
            for d, size in zip(aval.shape, x.shape, strict=True):
                if not isinstance(d, int) and size is not None:
                    sizes.setdefault(str(d), size)
        for aval, x in zip(exported.out_avals, results, strict=True):
            x.set_shape(
                [d if isinstance(d, int) else sizes.get(str(d)) for d in aval.shape]
            )
    return results
