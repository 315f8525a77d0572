"""The exports of one function for one input structure: the plain forward,
and per set of differentiated arguments the forward with VJP residuals, the
backward from them and a VJP that recomputes the forward."""

from __future__ import annotations

import weakref

import jax

from jaxlayer.bridges.tensorflow._export import (
    Call,
    ExportError,
    export,
    platform_choices,
)
from jaxlayer.bridges.tensorflow._gradients import differentiable_call
from jaxlayer.bridges.tensorflow._specs import cast_args, is_float, split, struct
from jaxlayer.export import _registry


class Train:
    """The forward with residuals of one conversion for one set of
    differentiated arguments, and where each pullback leaf comes from:
    `("arg", i)`, `("out", j)` or `("res", k)` (the op's k-th result)."""

    __slots__ = ("forward", "sources", "res_specs", "treedef")

    def __init__(self, forward, sources, res_specs, treedef):
        self.forward = forward
        self.sources = sources
        self.res_specs = res_specs
        self.treedef = treedef


class Conversion:
    """The exports of one function for one input structure, made lazily.

    `forward()` exports the plain forward (and raises `ExportError` when it
    cannot be exported); the training exports are made per set of
    differentiated arguments (the floating inputs, and the floating params
    trainable when traced).

    Attributes:
        owner: the layer, for messages.
        specs: the arguments' `jax.ShapeDtypeStruct`s.
        counts: `(n_params, n_inputs, n_state)`.
        graph_grads: what the gradients of the calls traced in graphs need
            (see `grad_fn`).
    """

    def __init__(self, fn, specs, counts):
        # Weak: the conversion lives in `fn`'s slot.
        self._fn = weakref.ref(fn)
        self.owner = fn.owner
        self.specs = specs
        self.counts = counts
        # Chosen once: the gradients' exports serve the forward's platforms.
        self._platforms = platform_choices(fn)
        self._forward = None
        self._source = None
        self._train = {}
        self._backward = {}
        self._vjp = {}
        # A failed training export is not retried at every step.
        self._train_failed = {}
        self.graph_grads = []
        # Only floating params and inputs can be differentiated.
        n_params, n_inputs, _ = counts
        self._float = [
            i for i, s in enumerate(specs[: n_params + n_inputs]) if is_float(s.dtype)
        ]

    def _live_fn(self):
        fn = self._fn()
        if fn is None:
            raise RuntimeError(
                f"{self.owner}: the layer's function was deleted; it can no "
                "longer be exported."
            )
        return fn

    def diff(self, mask):
        """The differentiated argument indices for a trainable mask."""
        n_params = self.counts[0]
        if mask is None:
            return tuple(self._float)
        # Frozen params get no gradient, and so no residuals.
        return tuple(i for i in self._float if i >= n_params or mask[i])

    @property
    def n_outputs(self) -> int:
        """How many outputs the function has (its new state follows them)."""
        self.forward()
        return self._n_outputs

    @property
    def float_outs(self) -> list:
        """The indices of the floating outputs, the differentiated ones."""
        self.forward()
        return self._float_outs

    # -- exports --

    def forward(self):
        """The plain forward's call (exported on first use)."""
        if self._forward is None:
            fn = self._live_fn()

            def forward(*flat):
                outputs, new_state = fn(*split(flat, self.counts))
                return [*outputs, *new_state]

            call = Call(export(forward, self.specs, self._platforms))
            self._remember(call, forward)
            # The op returns the outputs, then the new state.
            n_outputs = len(call.out_avals) - self.counts[2]
            self._float_outs = [
                j for j, a in enumerate(call.out_avals[:n_outputs]) if is_float(a.dtype)
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
        # The other arguments are closed over: `jax.vjp` sees only `diff`.

        def of_diff(*diff_values):
            full = list(flat)
            for i, v in zip(diff, diff_values, strict=True):
                full[i] = v
            outputs, new_state = fn(*split(full, self.counts))
            return [outputs[j] for j in float_outs], (outputs, new_state)

        return of_diff

    def train(self, diff):
        """The forward with VJP residuals for `diff` (exported on first use)."""
        train = self._train.get(diff)
        if train is not None:
            return train
        if diff in self._train_failed:
            raise self._train_failed[diff]
        # `_float_outs` and `_n_outputs` come from the forward's export.
        self.forward()
        fn, specs, float_outs = self._live_fn(), self.specs, self._float_outs
        # What tracing `train_fn` finds out: the pullback's structure and the
        # sources of its leaves.
        box = {}

        def train_fn(*flat):
            _, pullback, (outputs, new_state) = jax.vjp(
                self._of_diff(fn, flat, diff, float_outs),
                *[flat[i] for i in diff],
                has_aux=True,
            )
            leaves, box["treedef"] = jax.tree_util.tree_flatten(pullback)
            # A leaf that is an argument or an output is not returned twice.
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
            call = Call(export(train_fn, specs, self._platforms))
        except ExportError as err:
            error = self._gradient_error("the forward pass with its VJP", err)
            self._train_failed[diff] = error
            raise error from None
        # Residual k is the op's result after the outputs and the new state.
        n_out_state = self._n_outputs + self.counts[2]
        out_avals = call.out_avals
        sources = [
            ("res", n_out_state + i) if kind == "res" else (kind, i)
            for kind, i in box["sources"]
        ]
        res_specs = [
            struct(specs[i] if kind == "arg" else out_avals[i]) for kind, i in sources
        ]
        train = self._train[diff] = Train(call, sources, res_specs, box["treedef"])
        return train

    def backward(self, diff):
        """The gradients from the residuals of `train(diff)` and the
        cotangents (exported on first use)."""
        call = self._backward.get(diff)
        if call is None:
            train = self._train[diff]
            treedef, n_res = train.treedef, len(train.res_specs)

            # The pullback is rebuilt from its leaves (the residuals) and the
            # structure found while the forward with residuals was exported.
            def backward(*flat):
                pullback = jax.tree_util.tree_unflatten(treedef, list(flat[:n_res]))
                return list(pullback(list(flat[n_res:])))

            try:
                exported = export(
                    backward, [*train.res_specs, *self._ct_specs()], self._platforms
                )
            except ExportError as err:
                raise self._gradient_error("the VJP (backward pass)", err) from None
            call = self._backward[diff] = Call(exported)
        return call

    def vjp(self, diff):
        """The gradients from the args and cotangents (recomputes the forward)."""
        # For calls traced without a tape ("graph" mode): no residuals kept.
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
            exported = export(vjp, [*self.specs, *self._ct_specs()], self._platforms)
        except ExportError as err:
            raise self._gradient_error("the VJP", err) from None
        call = self._vjp[diff] = Call(exported)
        return call

    def _ct_specs(self):
        avals = self.forward().out_avals
        return [struct(avals[j]) for j in self._float_outs]

    def _gradient_error(self, what, err):
        # A ValueError: `differentiable_call` then runs the plain forward and
        # raises it only should a gradient be asked for.
        cause = err.__cause__
        return ValueError(
            f"{self.owner}: the gradient of `call_fn` cannot be computed: "
            f"exporting {what} with `jax.export` failed ({type(cause).__name__}: "
            f"{cause}). Check that `jax.vjp` works on `call_fn` (no "
            "non-differentiable operations on the trainable parameters or "
            "floating inputs), or freeze the parameters that cannot be "
            "differentiated (`variable.trainable = False`)."
        )

    def __call__(self, args, mode, mask):
        """Runs the function on `args` (see `differentiable_call`)."""
        return differentiable_call(self, cast_args(args, self.specs), mode, mask)
