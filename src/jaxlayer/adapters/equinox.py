"""`EquinoxLayer`: an Equinox module as a Keras layer."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from jaxlayer import _deps, _errors, saving
from jaxlayer import _variables as V
from jaxlayer.adapters._common import check_module
from jaxlayer.adapters._saving import (
    module_error,
    module_layer_config,
    module_layer_from_config,
)
from jaxlayer.layer import JaxLayer

_FEATURE = "EquinoxLayer"


@keras.saving.register_keras_serializable(package="jaxlayer")
class EquinoxLayer(JaxLayer):
    """A Keras layer that runs an `equinox.Module`, on every Keras backend.

    The module's floating-point arrays (`eqx.is_inexact_array`) become
    trainable Keras weights named after its fields (`layer/conv/weight`,
    `layer/layers/0/bias`); everything else stays in the module. A stateful
    module (built with `eqx.nn.make_with_state`) comes with its
    `eqx.nn.State`, whose values become non-trainable weights named after the
    `eqx.nn.StateIndex` they belong to (`layer/bn/state_index/0`), set to
    what the module returns on every call (a batch norm returns its state
    unchanged in inference).

    The module is called as Equinox modules are, on one example at a time:
    `module(x, key=key)`, or `module(x, state, key=key)` returning
    `(y, new_state)` when stateful. The layer maps it over the batch with
    `jax.vmap` under the axis name `axis_name`, so that
    `eqx.nn.BatchNorm(..., axis_name="batch")` computes batch statistics. The
    state is shared by the whole batch: its new value must not depend on the
    example (as with `BatchNorm`, which averages over the named axis). With
    `vmap=False` the module gets the whole batch instead.

    In inference the module runs under `eqx.nn.inference_mode` (dropout off,
    batch norm on its running statistics). If its `__call__` takes `key`, a
    training call passes a key drawn from the layer's seed generator (`seed`,
    or Keras's global seed), a different one per example when vmapped; an
    inference call passes none when `key` is optional, and a fresh key, drawn
    the same way, when `__call__` requires one (a sampling module).

    The module sees one example at a time (the batch axis is mapped away):
    an image batch `(N, C, H, W)` reaches an `eqx.nn.Conv2d` as `(C, H, W)`,
    channels first, as Equinox expects. When the module fails on an
    example, the error says the per-example shape it got and, for a
    convolution, the one it expects.

    After training, `to_module()` returns the module (and its state, when it
    has one) with the trained values.

    Saving: `model.save("m.keras")` stores the layer's computation, exported
    with `jax.export`, with its weights; the file reloads anywhere jaxlayer
    is installed (predict and fit work), without the module's code (an
    Equinox module cannot be written to a config). `to_module()` on such a
    reloaded layer raises. `save_weights`/`load_weights` work too.

    Args:
        module: an `equinox.Module` instance.
        state: the `eqx.nn.State` of a stateful module, as
            `eqx.nn.make_with_state` returns it; None for a module without
            state (or one whose state indices still hold their initial
            values, from which the state is made).
        axis_name: the name of the batch axis of `jax.vmap`.
        vmap: whether to map the module over the batch; False passes it the
            whole batch.
        **kwargs: `JaxLayer` arguments (`seed`, ...) and base
            `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        TypeError: `module` is not an Equinox module instance, or `state` not
            an `eqx.nn.State`.
        ValueError: `state` does not match the module.

    Examples:

        >>> import equinox as eqx, jax, numpy as np
        >>> mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
        >>> layer = EquinoxLayer(mlp, name="mlp")
        >>> layer(np.ones((3, 4), "float32")).shape
        (3, 2)
        >>> [w.path for w in layer.trainable_weights][:2]
        ['mlp/layers/0/weight', 'mlp/layers/0/bias']
        >>> type(layer.to_module()).__name__
        'MLP'
    """

    def __init__(
        self,
        module: Any,
        state: Any = None,
        axis_name: str = "batch",
        vmap: bool = True,
        **kwargs,
    ):
        eqx = _deps.require("equinox", _FEATURE)
        layer_name = kwargs.get("name") or "EquinoxLayer"
        owner = _errors.named(EquinoxLayer, layer_name)
        check_module(module, eqx.Module, "equinox", owner)
        module, state = _check_state(eqx, module, state, owner)
        indices = _state_indices(eqx, module)
        # Floating arrays only, as `eqx.filter_grad` would differentiate: integer
        # arrays and the rest stay in the static half.
        params, static = eqx.partition(module, eqx.is_inexact_array)
        key_mode = _key_mode(module)
        stateful = state is not None

        example = _expected_example(eqx, module)

        def run(model, inputs, eqx_state, key, training):
            # Set on every call from `training`: the module's own `inference`
            # flags are overridden, whatever they were when it was given.
            model = eqx.nn.inference_mode(model, value=not training)

            def one(x, k):
                kw = {"key": k} if key_mode and k is not None else {}
                try:
                    if stateful:
                        return model(x, eqx_state, **kw)
                    return model(x, **kw), None
                except Exception as err:  # noqa: BLE001 - re-raised with context
                    if _symbolic_shape_error(err):
                        # Not the input's fault: the module cannot be traced
                        # with a symbolic batch (an exporting bridge then
                        # falls back to concrete shapes); no shape hint.
                        raise
                    raise _with_shape_context(err, owner, x, vmap, example) from err

            if not vmap:
                return one(inputs, key)

            def per_example(x):
                # One key per example, without a batch-sized `split` (which
                # needs a concrete batch size).
                k = None
                if key is not None:
                    k = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
                return one(x, k)

            # `out_axes=None` for the state: one value for the whole batch (vmap
            # refuses a state that varies by example).
            return jax.vmap(
                per_example, in_axes=0, out_axes=(0, None), axis_name=axis_name
            )(inputs)

        if stateful:
            # The template is kept strong-typed so `State.set` accepts the values
            # read back from Keras variables (see `_strong`).
            template = _strong(state)

            def call_fn(params, state, rng, inputs, training):
                model = eqx.combine(params, static)
                eqx_state = _to_eqx_state(template, indices, state)
                outputs, new_state = run(model, inputs, eqx_state, rng, training)
                return outputs, _from_eqx_state(indices, new_state)

            state_tree = _from_eqx_state(indices, state)
        else:
            template = None

            def call_fn(params, rng, inputs, training):
                model = eqx.combine(params, static)
                return run(model, inputs, None, rng, training)[0]

            state_tree = None

        super().__init__(call_fn=call_fn, params=params, state=state_tree, **kwargs)
        self.axis_name = axis_name
        self.vmap = vmap
        self._set_parts(static, template, indices, key_mode)

    def _set_parts(self, static, template, indices, key_mode):
        # The module's static half, its state's template and indices, and
        # how it takes `key` (None for all but `key_mode` when rebuilt).
        for name, value in (
            ("_static", static),
            ("_template", template),
            ("_indices", indices),
            ("_key_mode", key_mode),
        ):
            self._set_untracked(name, value)

    def _get_call_rng(self, training):
        # A module whose `__call__` requires `key` gets a fresh key on every
        # call, in inference too (drawn from the seed generator).
        if training or self._key_mode == "required":
            return self._get_call_seed()
        return None

    def to_module(self) -> Any:
        """Returns the module with the layer's current weights.

        Returns:
            The `equinox.Module`; for a stateful module, the tuple
            `(module, state)` with the current `eqx.nn.State`.

        Raises:
            ValueError: the layer was loaded from a `.keras` file, without the
                module's class (it runs the saved computation).

        Examples:

            >>> import equinox as eqx, jax
            >>> linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
            >>> layer = EquinoxLayer(linear)
            >>> _ = layer.params.weight.assign(jax.numpy.zeros((2, 3)))
            >>> float(abs(layer.to_module().weight).sum())
            0.0
        """
        if saving.rebuilt(self):
            raise module_error(self._owner, self.call_fn.module_class)
        eqx = _deps.require("equinox", _FEATURE)
        as_jax = lambda tree: jax.tree_util.tree_map(
            lambda x: jax.numpy.asarray(np.asarray(x)), V.numpy_tree(tree)
        )
        module = eqx.combine(as_jax(self._effective_params()), self._static)
        if self._template is None:
            return module
        state = _to_eqx_state(self._template, self._indices, as_jax(self.state))
        return module, state

    def get_config(self):
        """The layer's config, with its computation exported (no module).

        An Equinox module cannot be written to a config: a `.keras` file
        holds the layer's exported computation instead, from which it reloads
        (predict and fit work; `to_module()` needs the module's code).

        Raises:
            ValueError: the computation could not be exported (say, the layer
                was never called); save the weights with `save_weights`.
        """
        if saving.rebuilt(self):
            module_class = self.call_fn.module_class
        else:
            cls = type(self._static)  # the static half: the module's class
            module_class = f"{cls.__module__}.{cls.__qualname__}"
        config = module_layer_config(
            self,
            super().get_config(),
            "an Equinox module",
            "EquinoxLayer(module, state)",
            module_class,
            saving.export_failure(self._export_memo),
        )
        config.update(
            {
                "axis_name": self.axis_name,
                "vmap": self.vmap,
                "key_mode": self._key_mode,
            }
        )
        return config

    @classmethod
    def _copy_of(cls, source: EquinoxLayer, kwargs: dict) -> EquinoxLayer:
        """A new layer of `source.to_module()` (`clone_model` in this
        process)."""
        module = source.to_module()
        state = None
        if isinstance(module, tuple):  # (module, state): a module with state
            module, state = module
        return cls(module, state, **kwargs)

    @classmethod
    def _from_exported(cls, call_fn, params, state, record, config):
        # Rebuilt from its computation: no module; `from_config` sets the
        # saved `axis_name`, `vmap` and `key_mode`.
        layer = super()._from_exported(call_fn, params, state, record, config)
        layer.axis_name = "batch"
        layer.vmap = True
        # (The layer this classmethod just made: its own class's attribute.)
        layer._set_parts(None, None, None, None)
        return layer

    @classmethod
    def from_config(cls, config):
        """The layer, running the computation saved in its `.keras` file (or,
        for `clone_model` in this process, a copy of the live layer's module
        with its current weights)."""
        config = dict(config)
        extra = {k: config.pop(k, None) for k in ("axis_name", "vmap", "key_mode")}
        arguments = {k: extra[k] for k in ("axis_name", "vmap") if extra[k] is not None}
        layer = module_layer_from_config(cls, config, "an Equinox module", arguments)
        if not saving.rebuilt(layer):
            return layer
        layer.axis_name = extra["axis_name"] or "batch"
        layer.vmap = True if extra["vmap"] is None else bool(extra["vmap"])
        # (The layer this classmethod just made: its own class's attribute.)
        layer._set_parts(None, None, None, extra["key_mode"])
        return layer


def _is_index(eqx, x):
    return isinstance(x, eqx.nn.StateIndex)


def _state_indices(eqx, module):
    """`(name parts, StateIndex)` for each state index of `module`."""
    flat = jax.tree_util.tree_flatten_with_path(
        module, is_leaf=lambda x: _is_index(eqx, x)
    )[0]
    return [(V.path_parts(path), leaf) for path, leaf in flat if _is_index(eqx, leaf)]


def _check_state(eqx, module, state, owner):
    """The module and its state, checked (and made, if the module holds it)."""
    indices = _state_indices(eqx, module)
    if state is None:
        if not indices:
            return module, None
        try:
            return eqx.nn.make_with_state(lambda: module)()
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(
                f"{owner}: the module has state (`eqx.nn.StateIndex` at "
                f"{', '.join('.'.join(p) for p, _ in indices)}) but no `state` "
                "was given; build it with `model, state = "
                "eqx.nn.make_with_state(Model)(...)` and pass "
                "`EquinoxLayer(model, state)`."
            ) from err
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"{owner}: `state` must be the `eqx.nn.State` returned by "
            f"`eqx.nn.make_with_state`, got {type(state).__name__}."
        )
    if not indices:
        raise ValueError(
            f"{owner}: a `state` was given but the module has no "
            "`eqx.nn.StateIndex`; drop `state`, or pass the module it was "
            "made with."
        )
    for parts, index in indices:
        try:
            state.get(index)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(
                f"{owner}: `state` does not match the module: it has no value "
                f"for the state index at `{'.'.join(parts)}`; pass the state "
                "made together with this module by `eqx.nn.make_with_state`."
            ) from err
    return module, state


def _from_eqx_state(indices, state):
    """An `eqx.nn.State` as a nested dict named by the indices' paths."""
    tree: dict = {}
    for parts, index in indices:
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = state.get(index)
    return tree


def _strong(state):
    """`state` with no weak-typed arrays (`jnp.array(0)` is weak).

    `State.set` refuses a value whose weak type differs from the old one, and
    the values read back from Keras variables are never weak.
    """
    leaves, treedef = jax.tree_util.tree_flatten(state)
    leaves = [
        jnp.asarray(x, dtype=x.dtype) if hasattr(x, "dtype") else x for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _to_eqx_state(template, indices, tree):
    """A new `eqx.nn.State` like `template`, holding the values of `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    for parts, index in indices:
        value = tree
        for part in parts:
            value = value[part]
        old = state.get(index)
        # In the old value's dtype: `State.set` refuses a change of dtype (a
        # Keras variable may hold another float width).
        value = jax.tree_util.tree_map(
            lambda v, o: jnp.asarray(v, dtype=o.dtype), value, old
        )
        state = state.set(index, value)
    return state


def _key_mode(module):
    """None (no `key`), "optional" or "required": how `__call__` takes `key`."""
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return None
    key = parameters.get("key")
    if key is None:
        return None
    return "required" if key.default is inspect.Parameter.empty else "optional"


def _expected_example(eqx, module):
    """What the first convolution of `module` expects of one example, if any."""
    leaves = jax.tree_util.tree_leaves(
        module, is_leaf=lambda x: isinstance(x, eqx.nn.Conv)
    )
    for leaf in leaves:
        if isinstance(leaf, eqx.nn.Conv):
            names = {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}
            dims = ", ".join(
                [str(leaf.in_channels)] + names.get(leaf.num_spatial_dims, ["..."])
            )
            return (
                f"its first convolution ({type(leaf).__name__}) expects one "
                f"example channels first: ({dims}) - transpose NHWC images "
                "to NCHW before the layer"
            )
    return None


def _symbolic_shape_error(err) -> bool:
    # `jax.export`'s error for an operation on a symbolic dimension whose
    # result depends on the dimension's value (not a public class).
    return type(err).__name__ == "InconclusiveDimensionOperation"


def _with_shape_context(err, owner, x, vmapped, example):
    """`err` with the per-example shape the module got (and expects)."""
    got = tuple(x.shape) if hasattr(x, "shape") else None
    where = (
        "one example at a time (the batch axis mapped away by jax.vmap)"
        if vmapped
        else "the whole batch (vmap=False)"
    )
    message = (
        f"{owner}: the Equinox module failed on its input of shape {got}; it "
        f"is called on {where}"
        + (f", and {example}" if example else "")
        + f". Original error: {type(err).__name__}: {err}"
    )
    try:
        # The module's own error type, so callers catching it still do.
        return type(err)(message)
    except Exception:  # noqa: BLE001 - an error type with another signature
        return ValueError(message)
