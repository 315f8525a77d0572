"""`Computation`: a layer's function and everything derived from it.

The layer owns one and tells it of every change (its `call_fn`, its trees,
its dtype policy, the inputs it has seen); the computation never reads the
layer. From those values it makes the pure functions the bridges run (one
per call structure, dropped on every change), the values and state
assignment of a call, and the abstract trees of shape inference. A bridge
that takes a call over (the torch one while torch traces) and saving get
this object, or values made from it, instead of the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from jaxlayer import _contract as K
from jaxlayer import _private, _record
from jaxlayer import _shapes as S
from jaxlayer import _variables as V
from jaxlayer._pure import PureFunction


def _stateless() -> bool:
    """Whether a Keras `StatelessScope` is active (True where Keras no
    longer says: then the assignment goes ahead, as before)."""
    in_scope = _private.keras_in_stateless_scope()
    return in_scope is None or bool(in_scope())


class Computation:
    """A layer's computation, as the bridges and saving see it.

    Attributes:
        owner: the layer, for messages (`"JaxLayer 'mlp'"`).
        cache: the pure functions made so far, by `(training, in_def,
            rng_def)`.
        slots: what a bridge keeps per layer (by the bridge's name), for the
            layer's life (the pure functions' own slots go with them).
        record: the input record (`_record.InputRecord`), or None before the
            first call.
        rng: `(training) -> rng`, the layer's `_get_call_rng` hook.
        eager_call: `(inputs, training)`, the layer's eager `call`.

    Example:
        A layer's computation makes its pure functions on flat lists::

            fn = layer._computation.get(False, in_def, rng_def, example)
            outputs, new_state = fn(params, inputs, state, rng)
    """

    __slots__ = (
        "owner",
        "platforms",
        "cache",
        "slots",
        "record",
        "rng",
        "eager_call",
        "_call_fn",
        "_names",
        "_specs",
        "_dtypes",
        "__weakref__",
    )

    def __init__(self, owner: str, platforms, *, rng: Callable, eager_call: Callable):
        self.owner = owner
        self.platforms = platforms
        self.cache: dict = {}
        self.slots: dict[str, Any] = {}
        self.record = None
        self.rng = rng
        self.eager_call = eager_call
        self._call_fn = None
        self._names: tuple = ()
        self._specs = (None, None)
        # (autocast, compute dtype, variable dtype): how parameters reach
        # `call_fn`.
        self._dtypes = (True, "float32", "float32")

    # -- what the layer tells it -----------------------------------------

    def set_fn(self, call_fn: Callable, names) -> None:
        """A new `call_fn` (and its argument names)."""
        self._call_fn, self._names = call_fn, tuple(names)
        self.clear()

    def set_trees(self, params_spec, state_spec) -> None:
        """New `params`/`state` trees (`_variables.TreeSpec`s or None)."""
        self._specs = (params_spec, state_spec)
        self.clear()

    def set_dtypes(self, autocast: bool, compute_dtype, variable_dtype) -> None:
        """A new dtype policy (or `autocast` setting)."""
        self._dtypes = (bool(autocast), compute_dtype, variable_dtype)
        self.clear()

    def set_record(self, record) -> None:
        """The input record, once the layer has seen a call's inputs."""
        self.record = record

    def clear(self) -> None:
        """Drops the pure functions, and with them every bridge's caches."""
        self.cache.clear()

    # -- a call ----------------------------------------------------------

    def has_rng(self) -> bool:
        """Whether `call_fn` takes an `rng`."""
        return "rng" in self._names

    def values(self, casts) -> tuple:
        """`(params, state, cast)`: the values of a call's variables (backend
        tensors) and the dtype the bridge casts `params` to, or None.

        `casts`: whether the bridge takes the stored parameters and `cast=`
        (`run.casts_params`); with mixed precision it then casts them inside
        JAX, so its views of the stored values serve every call.
        """
        params_spec, state_spec = self._specs
        autocast, compute, variable = self._dtypes
        params = cast = None
        if params_spec is not None and autocast and casts and compute != variable:
            params = V.values_of(params_spec, stored=True)
            # (None where a variable cannot hand over its stored value.)
            cast = None if params is None else compute
        if params is None:
            params = V.values_of(params_spec)
        return params, V.values_of(state_spec), cast

    def state_names(self) -> list[str]:
        """Each state leaf's pytree path, for messages (`state['n']`)."""
        state_spec = self._specs[1]
        if state_spec is None:
            return []
        return [V.keystr(path, "state") for path in state_spec.paths]

    def assign_state(self, new_state) -> None:
        """Stores the state `call_fn` returned (backend tensors, in variable
        order): in training and in inference (as Keras does); a function
        that must leave it alone returns it unchanged. A bridge passes None
        for a value it knows is the variable's own (not assigned)."""
        state_spec = self._specs[1]
        if state_spec is None:
            return
        new_state = list(new_state)
        if new_state and _private.is_tracer(new_state[0]) and not _stateless():
            # Traced outside any `StatelessScope`: the trace is someone
            # else's (Keras's ONNX export on jax runs `model(x)` under
            # jax2onnx's trace; a user's `jax.jit` around a model call).
            # Assigned, the tracer would stay in the variable and fail every
            # later call; its value exists only inside that trace, whose
            # outputs are all the caller gets. Keras's own trainers and
            # `stateless_call` trace inside a scope, which collects it.
            return
        for variable, value in zip(state_spec.variables, new_state, strict=True):
            if value is not None:  # None: a bridge knows it unchanged
                variable.assign(value)

    # -- the pure functions ----------------------------------------------

    def get(self, training, in_def, rng_def, example) -> PureFunction:
        """The pure function for this call structure, made on first use.

        Args:
            training: the training flag.
            in_def: the structure of the inputs.
            rng_def: the structure of the `rng` argument.
            example: `(params, inputs, state, rng)`, lists of tensors (or
                anything with `shape` and `dtype`) of the first call, from
                which the output structure is computed with `jax.eval_shape`.
        """
        key = (training, in_def, rng_def)
        fn = self.cache.get(key)
        if fn is not None:
            return fn
        tree_fn = self.tree_fn(training, in_def, rng_def)
        owner = self.owner
        out_def, _ = S.eval_outputs(
            owner, tree_fn, *example, called=self.called_shapes(in_def)
        )

        def flat(params, inputs, state, rng):
            result, new_state = tree_fn(params, inputs, state, rng)
            return K.output_leaves(owner, result), new_state

        fn = self.cache[key] = PureFunction(
            flat,
            owner=owner,
            platforms=self.platforms,
            training=training,
            in_treedef=in_def,
            rng_treedef=rng_def,
            out_treedef=out_def,
            trainable=self._trainable,
            input_shapes=lambda: self.input_shapes(in_def),
            called_shapes=lambda: self.called_shapes(in_def),
        )
        return fn

    def tree_fn(self, training, in_def, rng_def, abstract_defs=None):
        """`call_fn` on flat lists: `(outputs tree, new state leaves)`.

        `abstract_defs`, the `(params, state)` tree structures of a layer not
        built yet, rebuild the trees from `jax.ShapeDtypeStruct` leaves (for
        output shapes only: the returned state is not checked).
        """
        return K.tree_fn(
            self.owner,
            self._call_fn,
            self._names,
            self._specs,
            (training, in_def, rng_def),
            abstract_defs,
        )

    def _trainable(self):
        return tuple(v.trainable for v in K.variables(self._specs[0]))

    def input_shapes(self, in_def):
        """The recorded input shapes (None where unknown) for `in_def`."""
        record = self.record
        if record is None or record.treedef != in_def:
            return None
        return _record.input_template(record)

    def called_shapes(self, in_def):
        """The shapes of a recorded call of known shapes for `in_def`."""
        record = self.record
        if record is None or record.treedef != in_def or record.called is None:
            return None
        return [tuple(s) for s in record.called]

    # -- shapes and dtypes -----------------------------------------------

    def param_struct(self, x):
        """The shape and dtype of a parameter as `call_fn` receives it."""
        autocast, compute, variable = self._dtypes
        dtype = keras.backend.standardize_dtype(x.dtype)
        if V.is_float(dtype):
            dtype = compute if autocast else variable
        return S.struct(x.shape, dtype)

    def variable_structs(self) -> tuple[list, list]:
        """`(params, state)`: the shapes and dtypes a call receives, from
        the variables."""
        params_spec, state_spec = self._specs
        params = [self.param_struct(v) for v in K.variables(params_spec)]
        state = [S.struct(v.shape, v.dtype) for v in K.variables(state_spec)]
        return params, state

    def output_structs(self, training, in_leaves, in_def, rng, rng_def, abstract):
        """`(out_def, [(shape, dtype)])` of `call_fn`'s outputs, abstractly.

        Args:
            training: the training flag.
            in_leaves: the inputs, anything with `shape` and `dtype`.
            in_def: their structure.
            rng: the `rng` leaves (structs), and `rng_def` their structure.
            abstract: for a layer not built yet, `(params, state, defs)` of
                its `init_fn` run abstractly; None once built.
        """
        if abstract is not None:
            params, state, defs = abstract
            return S.eval_outputs(
                self.owner,
                self.tree_fn(training, in_def, rng_def, defs),
                params,
                in_leaves,
                state,
                rng,
            )
        params, state = self.variable_structs()
        fn = self.get(training, in_def, rng_def, (params, in_leaves, state, rng))
        _, out = S.eval_outputs(
            self.owner,
            lambda p, x, s, r: (fn(p, x, s, r)[0], []),
            params,
            in_leaves,
            state,
            rng,
        )
        return fn.out_treedef, out
