"""`FlaxLayer`: a Flax linen module as a Keras layer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import keras

from jaxlayer import _config as C
from jaxlayer import _deps, _errors, saving
from jaxlayer import _variables as V
from jaxlayer.adapters._common import check_module, plain
from jaxlayer.adapters._saving import module_layer_config
from jaxlayer.layer import JaxLayer

_FEATURE = "FlaxLayer"


@keras.saving.register_keras_serializable(package="jaxlayer")
class FlaxLayer(JaxLayer):
    """A Keras layer that runs a `flax.linen.Module`, on every Keras backend.

    A drop-in replacement for `keras.layers.FlaxLayer`. The module's
    `"params"` collection holds the trainable weights; every other collection
    (`"batch_stats"`, ...) is non-trainable state, updated by the calls made
    in training and left alone in inference.

    The method run (`method`, by default `module.__call__`) takes the inputs
    as one argument (an array or a pytree of arrays) and, optionally, a
    `training` argument, which then receives `True` in training and `False`
    in inference. Random streams: `init` gets `"params"` and `"dropout"`
    streams, a training call gets a fresh `"dropout"` stream, an inference
    call none; all are drawn from the layer's seed generator (`seed`, or
    Keras's global seed).

    Weights are named after the variables of the module:
    `layer/params/Conv_0/kernel`, `layer/batch_stats/BatchNorm_0/mean`.

    Args:
        module: a `flax.linen.Module` instance.
        method: what to run: None (the module's `__call__`), the name of a
            method of the module, a method bound to it, or a function taking
            the module as its first argument (`fn(module, inputs, training)`).
        variables: the module's variables, as `module.init` returns them
            (`{"params": ..., "batch_stats": ...}`); None initialises them
            with `module.init` at build time.
        **kwargs: `JaxLayer` arguments (`seed`, ...) and base
            `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        TypeError: `module` is not a linen module, or `variables` is not a
            mapping.
        ValueError: `method` names no method of the module.

    Examples:

        >>> import flax.linen as nn, numpy as np
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, training=False):
        ...         x = nn.Dense(8)(x)
        ...         x = nn.Dropout(0.5, deterministic=not training)(x)
        ...         return nn.Dense(2)(x)
        >>> layer = FlaxLayer(MLP(), seed=0, name="mlp")
        >>> layer(np.ones((3, 4), "float32")).shape
        (3, 2)
        >>> [w.path for w in layer.trainable_weights][:2]
        ['mlp/params/Dense_0/bias', 'mlp/params/Dense_0/kernel']
    """

    def __init__(
        self,
        module: Any,
        method: str | Callable | None = None,
        variables: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        nn = _deps.require("flax.linen", _FEATURE)
        layer_name = kwargs.get("name") or "FlaxLayer"
        check_module(
            module, nn.Module, "flax.linen", _errors.named(FlaxLayer, layer_name)
        )
        target = _resolve_method(module, method, layer_name)
        has_training = _takes(target, "training")
        # Every collection but params may change in a call (batch statistics):
        # `apply` returns them as the new state; params stay Keras's to train.
        mutable = nn.DenyList(["params"])

        # `training` only for a method that takes it: the layer passes what
        # `call_fn`'s signature names.
        if has_training:

            def call_fn(params, state, rng, inputs, training):
                return module.apply(
                    _merge(params, state),
                    inputs,
                    rngs=rng,
                    method=method,
                    mutable=mutable,
                    training=training,
                )

            def init_fn(rng, inputs, training):
                return _split(
                    module.init(rng, inputs, method=method, training=training)
                )

        else:

            def call_fn(params, state, rng, inputs):
                return module.apply(
                    _merge(params, state),
                    inputs,
                    rngs=rng,
                    method=method,
                    mutable=mutable,
                )

            def init_fn(rng, inputs):
                return _split(module.init(rng, inputs, method=method))

        if variables is not None and not isinstance(variables, Mapping):
            raise TypeError(
                f"{_errors.named(FlaxLayer, layer_name)}: `variables` must be "
                "a dict of collections as `module.init` returns "
                "(`{'params': ..., 'batch_stats': ...}`), got "
                f"{type(variables).__name__}."
            )
        params, state = _split(variables) if variables is not None else (None, None)
        super().__init__(
            call_fn=call_fn, init_fn=init_fn, params=params, state=state, **kwargs
        )
        self.module = module
        self.method = method

    # -- rng hooks -------------------------------------------------------

    def _get_init_rng(self):
        # A `dropout` stream at init too: `module.init` runs `__call__`, and a
        # module with dropout asks for it there.
        return {"params": self._get_init_seed(), "dropout": self._get_init_seed()}

    def _get_call_rng(self, training):
        return {"dropout": self._get_call_seed()} if training else {}

    # -- the variables as Flax sees them ---------------------------------

    def flax_variables(self) -> dict:
        """The module's variables as NumPy arrays, as `module.init` gives them.

        Returns:
            A dict of collections (`{"params": ..., "batch_stats": ...}`)
            holding the current values, for `module.apply`.

        Examples:

            >>> import flax.linen as nn, numpy as np
            >>> layer = FlaxLayer(nn.Dense(2), seed=0)
            >>> x = np.ones((1, 3), "float32")
            >>> y = layer(x)
            >>> out = layer.module.apply(layer.flax_variables(), x)
            >>> bool(np.allclose(out, y))
            True
        """
        return _merge(self._effective_params(), V.numpy_tree(self.state))

    # -- saving ----------------------------------------------------------

    def get_config(self):
        """The layer's config: the module by its own config, or by its class.

        A module whose class has `get_config()` (registered with
        `@keras.saving.register_keras_serializable()`) is written to the
        config and rebuilt from it, as Keras's `FlaxLayer` does. Any other
        module is recorded by its class name only: a `.keras` file then holds
        the layer's exported computation, from which it reloads without the
        module's code (predict and fit work), and `keras.models.clone_model`
        in this process copies the live module.

        Raises:
            TypeError: the module has no `get_config()` and the computation
                could not be exported (the layer was never called).
        """
        config = super().get_config()
        # Closures over the module, made again by `__init__` from it.
        config.pop("call_fn", None)
        config.pop("init_fn", None)
        if saving.rebuilt(self):
            # Rebuilt from its exported computation: the module's config as
            # it was saved, for a process that has the module's class.
            config.update(self.call_fn.kept)
            if "module" not in self.call_fn.kept:
                config["module_class"] = self.call_fn.module_class
            return config
        # A method bound to an equal module (a dataclass) is saved by name.
        method = self.method
        if getattr(method, "__self__", None) == self.module:
            method = method.__name__
        if method is not None and not isinstance(method, str):
            method = C.serialize_fn(method)
        if not hasattr(self.module, "get_config"):
            cls = type(self.module)
            if config.get("exported") is None:
                raise _errors.CannotSave(
                    f"{self._owner}: the Flax module {cls.__name__} has no "
                    "`get_config()`, so the config can hold only the layer's "
                    "exported computation, which could not be made "
                    f"({saving.export_failure(self._export_memo)}). Call the "
                    "layer (or fit the model) first; or give the module's class a "
                    "`get_config()` returning its constructor arguments and "
                    "a `from_config()` classmethod, and register it with "
                    "`@keras.saving.register_keras_serializable()`; or save "
                    "only the weights with `save_weights`."
                )
            config = module_layer_config(
                self,
                config,
                f"the Flax module {cls.__name__} (without `get_config()`)",
                "FlaxLayer(module)",
                f"{cls.__module__}.{cls.__qualname__}",
                saving.export_failure(self._export_memo),
            )
            config.pop("call_fn")
            config.pop("init_fn")
            config["method"] = method
            return config
        config["module"] = keras.saving.serialize_keras_object(self.module)
        config["method"] = method
        return config

    @classmethod
    def _from_exported(cls, call_fn, params, state, record, config):
        # Rebuilt from its computation: no module, no method.
        layer = super()._from_exported(call_fn, params, state, record, config)
        layer.module = None
        layer.method = None
        return layer

    @classmethod
    def from_config(cls, config):
        """Rebuilds the layer with its module where the module's class can be
        located (registered), otherwise from the computation saved in the
        `.keras` file.

        A copy of a live layer made from its config object
        (`keras.models.clone_model`) takes the live module, and the values
        of variables that were given (`variables=`) rather than made by
        `module.init`.
        """
        config = dict(config)
        source = C.LayerName.source(config, cls)
        owner = _errors.named(cls, config.get("name"))
        module_class = config.pop("module_class", None)
        module_config = config.get("module")
        if source is not None and saving.rebuilt(source):
            return saving.copy_of_rebuilt(cls, config, source)
        if source is not None:
            module, method = source.module, source.method
            # (`source` is a layer of this very class.)
            values = source._given_values(config)
        elif module_class is not None:
            # A module recorded by its class only: its computation.
            config.pop("module", None)
            if not config.get("exported"):
                raise ValueError(
                    f"{owner}: the config holds no exported computation, and "
                    f"the Flax module ({module_class}) has no `get_config()` "
                    "to rebuild it from; load the model from its `.keras` "
                    "file, or give the module's class `get_config()`."
                )
            saving.warn_rebuilt(
                owner,
                f"the Flax module's class `{module_class}` has no `get_config()`",
            )
            return saving.from_artifacts(
                cls, config, keep=("method",), module_class=module_class
            )
        else:
            values = None
            try:
                module = keras.saving.deserialize_keras_object(module_config)
                method = config.get("method")
                if isinstance(method, dict):
                    method = C.deserialize_fn(method, "method", cls)
            except Exception:  # noqa: BLE001 - rebuilt from artifacts below
                if not config.get("exported"):
                    raise
                label = _class_label(module_config)
                saving.warn_rebuilt(
                    owner, f"the Flax module's class {label} is not registered here"
                )
                return saving.from_artifacts(
                    cls, config, keep=("module", "method"), module_class=label
                )
        config["module"] = module
        config["method"] = method
        config.pop("exported", None)
        params, state = C.pop_saved_trees(config, source is not None)
        if values is not None:
            params, state = values
        # The placeholders as `variables`: the weights file fills them, and
        # `module.init` does not run for weights it holds.
        if config.get("variables") is None and params is not None:
            config["variables"] = _merge(params, state)
        return cls(**config)


def _class_label(config) -> str:
    if isinstance(config, dict):
        return f"`{config.get('module')}.{config.get('class_name')}`"
    return "(unknown)"


def _resolve_method(module, method, layer_name):
    """The callable run for `method`, to read its signature."""
    owner = _errors.named(FlaxLayer, layer_name)
    if method is None:
        if "__call__" not in dir(type(module)):
            raise ValueError(
                f"{owner}: the module {type(module).__name__} has no "
                "`__call__`; pass `method`, the name of the method to run."
            )
        return module.__call__
    if isinstance(method, str):
        target = getattr(module, method, None)
        if target is None or not callable(target):
            names = sorted(
                n
                for n, v in vars(type(module)).items()
                if callable(v) and not n.startswith("_")
            )
            raise ValueError(
                f"{owner}: `method` {method!r} is not a method of "
                f"{type(module).__name__}; its methods: {', '.join(names)}."
            )
        return target
    if not callable(method):
        raise TypeError(
            f"{owner}: `method` must be a method name, a method of the module "
            f"or a function taking the module first; got {method!r}."
        )
    return method


def _takes(fn, name) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _split(variables):
    """Flax variables -> (`{"params": ...}`, the other collections)."""
    variables = {k: plain(v) for k, v in dict(variables).items()}
    params = {"params": variables.pop("params")} if "params" in variables else {}
    return params, variables


def _merge(params, state):
    return {**(params or {}), **(state or {})}
