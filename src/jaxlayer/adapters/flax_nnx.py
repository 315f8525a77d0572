"""`NNXLayer`: a Flax NNX module as a Keras layer."""

from __future__ import annotations

from typing import Any

import jax
import keras
import numpy as np

from jaxlayer import _deps, _errors, saving
from jaxlayer import _variables as V
from jaxlayer.adapters._common import check_module, plain
from jaxlayer.adapters._saving import (
    module_error,
    module_layer_config,
    module_layer_from_config,
)
from jaxlayer.layer import JaxLayer

_FEATURE = "NNXLayer"


@keras.saving.register_keras_serializable(package="jaxlayer")
class NNXLayer(JaxLayer):
    """A Keras layer that runs a live `flax.nnx.Module`, on every backend.

    The module is split (`nnx.split`) into its structure and its variables:
    `nnx.Param` variables become trainable Keras weights, every other variable
    (`nnx.BatchStat`, custom `nnx.Variable`s) non-trainable weights, updated
    by the calls made in training and left alone in inference. Weights are
    named after the module's attributes: `layer/conv/kernel`,
    `layer/bn/mean`.

    Train and eval behaviour follows Keras's `training` flag: each call runs
    the module as `module.train()` (in training) or `module.eval()` (in
    inference) would, so dropout is active and batch norm uses and updates
    batch statistics only in training; there is no need to call those
    methods.

    RNG streams (`nnx.Rngs`, the streams kept by `nnx.Dropout`) are not Keras
    weights: Keras variables cannot hold JAX key arrays. Every training call
    reseeds all the module's streams from the layer's seed generator (`seed`,
    or Keras's global seed, which `keras.utils.set_random_seed` sets), so
    dropout masks differ per step and are reproducible. Inference calls use
    the streams as they were when the layer was made.

    After training, `to_module()` returns an `nnx.Module` holding the trained
    values.

    Saving: `model.save("m.keras")` stores the layer's computation, exported
    with `jax.export`, with its weights; the file reloads anywhere jaxlayer
    is installed (predict and fit work), without the module's code, which an
    NNX module (a live Python object) cannot be saved as. `to_module()` on
    such a reloaded layer raises. `save_weights`/`load_weights` work too.

    Args:
        module: a `flax.nnx.Module` instance, with its variables initialised.
        **kwargs: `JaxLayer` arguments (`seed`, ...) and base
            `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        TypeError: `module` is not an NNX module instance.

    Examples:

        >>> from flax import nnx
        >>> import numpy as np
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.dense = nnx.Linear(4, 8, rngs=rngs)
        ...         self.drop = nnx.Dropout(0.5, rngs=rngs)
        ...         self.out = nnx.Linear(8, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.out(self.drop(self.dense(x)))
        >>> layer = NNXLayer(MLP(nnx.Rngs(0)), seed=0, name="mlp")
        >>> layer(np.ones((3, 4), "float32")).shape
        (3, 2)
        >>> [w.path for w in layer.trainable_weights][:2]
        ['mlp/dense/bias', 'mlp/dense/kernel']
        >>> type(layer.to_module()).__name__
        'MLP'
    """

    def __init__(self, module: Any, **kwargs):
        nnx = _deps.require("flax.nnx", _FEATURE)
        layer_name = kwargs.get("name") or "NNXLayer"
        check_module(
            module, nnx.Module, "flax.nnx", _errors.named(NNXLayer, layer_name)
        )
        # Filters in order, each variable to the first that takes it: params,
        # then RNG state (not layer state), then the rest (batch statistics).
        graphdef, params, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        templates = (params, rest)
        rng_template = rngs
        # Typed keys as raw bits with their implementation: kept outside the
        # traced function and rebuilt in it (`_data_to_keys`).
        rng_data = jax.tree_util.tree_map(_key_to_data, nnx.to_pure_dict(rngs))
        has_streams = bool(jax.tree_util.tree_leaves(rng_data))

        def merge(params_dict, state_dict, rng_data):
            return nnx.merge(
                graphdef,
                _filled(nnx, templates[0], params_dict),
                _filled(nnx, rng_template, _data_to_keys(rng_data)),
                _filled(nnx, templates[1], state_dict),
            )

        def call_fn(params, state, rng, inputs, training):
            # A fresh module per call from the pure values: NNX modules are mutable,
            # and a traced call must not write tracers into the one given.
            model = merge(params, state, rng_data)
            if training:
                model.train()
                # Reseeded from the layer's seed: the streams' counters are not kept
                # between calls, so their own keys would give the same mask every call.
                if has_streams and rng is not None:
                    _reseed(nnx, model, rng)
            else:
                model.eval()
            outputs = model(inputs)
            # RNG state is split off and dropped: the streams' counters advanced by
            # the call are not layer state (each training call reseeds them).
            _, _, _, new_rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return outputs, nnx.to_pure_dict(new_rest)

        super().__init__(
            call_fn=call_fn,
            params=plain(nnx.to_pure_dict(params)),
            state=plain(nnx.to_pure_dict(rest)),
            **kwargs,
        )
        self._set_untracked("_merge", merge)
        self._set_untracked("_rng_data", rng_data)
        self._set_untracked("_module_class", _class_name(module))

    def to_module(self) -> Any:
        """Returns the module with the layer's current weights.

        The module is new (the one given to the layer is left as it was); its
        RNG streams are those it was given, and it is in the train/eval mode
        it was given in.

        Returns:
            A `flax.nnx.Module` of the type given to the layer.

        Raises:
            ValueError: the layer was loaded from a `.keras` file, without the
                module's class (it runs the saved computation).

        Examples:

            >>> import jax
            >>> from flax import nnx
            >>> layer = NNXLayer(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
            >>> _ = layer.params["kernel"].assign(jax.numpy.zeros((3, 2)))
            >>> float(abs(layer.to_module().kernel[...]).sum())
            0.0
        """
        if saving.rebuilt(self):
            raise module_error(self._owner, self.call_fn.module_class)
        # Through NumPy: the variables may be any backend's tensors.
        params = jax.tree_util.tree_map(np.asarray, self._effective_params())
        state = jax.tree_util.tree_map(np.asarray, V.numpy_tree(self.state))
        to_jax = lambda tree: jax.tree_util.tree_map(jax.numpy.asarray, tree)
        return self._merge(to_jax(params), to_jax(state), self._rng_data)

    def get_config(self):
        """The layer's config, with its computation exported (no module).

        An NNX module is a live Python object, not a config: a `.keras` file
        holds the layer's exported computation instead, from which it reloads
        (predict and fit work; `to_module()` needs the module's code).

        Raises:
            ValueError: the computation could not be exported (say, the layer
                was never called); save the weights with `save_weights`.
        """
        return module_layer_config(
            self,
            super().get_config(),
            "an NNX module (a live Python object)",
            "NNXLayer(MyModule(...))",
            self._module_class_name(),
            saving.export_failure(self._export_memo),
        )

    def _module_class_name(self) -> str:
        if saving.rebuilt(self):
            return self.call_fn.module_class
        return self._module_class

    @classmethod
    def _copy_of(cls, source: NNXLayer, kwargs: dict) -> NNXLayer:
        """A new layer of `source.to_module()` (`clone_model` in this
        process)."""
        return cls(source.to_module(), **kwargs)

    @classmethod
    def _from_exported(cls, call_fn, params, state, record, config):
        # Rebuilt from its computation: no module to merge into. (`layer`, made
        # here, is set up with its own class's attributes.)
        layer = super()._from_exported(call_fn, params, state, record, config)
        layer._set_untracked("_merge", None)
        layer._set_untracked("_rng_data", None)
        return layer

    @classmethod
    def from_config(cls, config):
        """The layer, running the computation saved in its `.keras` file (or,
        for `clone_model` in this process, a copy of the live layer's module
        with its current weights)."""
        return module_layer_from_config(cls, config, "an NNX module")


def _class_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _filled(nnx, template, pure):
    """A new `nnx.State` like `template`, holding the values of `pure`."""
    # A shallow copy: `replace_by_pure_dict` fills it in place, and the
    # template serves every call.
    state = jax.tree_util.tree_map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _key_to_data(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return _KeyData(np.asarray(jax.random.key_data(x)), jax.random.key_impl(x))
    return np.asarray(x)


def _data_to_keys(tree):
    return jax.tree_util.tree_map(
        lambda x: (
            jax.random.wrap_key_data(x.data, impl=x.impl)
            if isinstance(x, _KeyData)
            else jax.numpy.asarray(x)
        ),
        tree,
        is_leaf=lambda x: isinstance(x, _KeyData),
    )


class _KeyData:
    """Raw key bits and the PRNG implementation, to rebuild a key array."""

    def __init__(self, data, impl):
        self.data = data
        self.impl = impl


def _reseed(nnx, model, rng):
    """Gives every RNG stream of `model` a key drawn from `rng`."""
    key = (
        rng
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        else (jax.random.wrap_key_data(rng))
    )
    tags = sorted(
        {
            stream.key.tag
            for _, stream in nnx.iter_graph(model)
            if isinstance(stream, nnx.RngStream)
        }
    )
    # Sorted: a set of strings iterates in another order in each process
    # (hash randomization), and the keys must not change with it.
    keys = {tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)}
    nnx.reseed(model, policy="match_shape", **keys)
