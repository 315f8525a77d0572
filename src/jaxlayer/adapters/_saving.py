"""Saving a module layer (`NNXLayer`, `EquinoxLayer`, a Flax module without
`get_config()`): the `.keras` file holds its exported computation only."""

from __future__ import annotations

from jaxlayer import saving
from jaxlayer._config import LayerName
from jaxlayer._errors import CannotSave, named, owner


def module_layer_config(
    layer, config: dict, module: str, rebuild: str, module_class: str, why: str
) -> dict:
    """The config of a layer whose module cannot be written to a config.

    `NNXLayer` and `EquinoxLayer`: the `.keras` file holds the layer's
    exported computation instead of its module, so saving needs it.

    Args:
        layer: the layer.
        config: its config from `JaxLayer.get_config`.
        module: what the module is, for the message ("an NNX module").
        rebuild: how to rebuild the layer with its code, for the message.
        module_class: the module's class (`module.Class`), kept for messages.
        why: why the computation could not be exported, for the message
            (`saving.export_failure`).

    Raises:
        CannotSave: the computation could not be exported (a `TypeError`
            and a `ValueError`).
    """
    if config.get("exported") is None:
        raise CannotSave(
            f"{owner(layer)} cannot be saved in a `.keras` file: {module} "
            "cannot be written to a config, so the file must hold the layer's "
            "exported computation, which could not be made "
            f"({why}). Call the layer (or fit the model) "
            "before saving, or save the weights with `model.save_weights(path)` "
            f"and rebuild the model with a new `{rebuild}` to load them."
        )
    # No function configs: the functions are closures over the module, which
    # no process can locate; the file reloads from its computation.
    config.update(call_fn=None, init_fn=None, module_class=module_class)
    return config


def module_layer_from_config(
    cls, config: dict, module: str, arguments: dict | None = None
):
    """`from_config` of a layer saved by `module_layer_config`.

    `arguments`: the adapter's own constructor arguments, taken out of
    `config`, for a copy of a live layer (`clone_model` in this process),
    which is made by the class's `_copy_of(source, kwargs)` hook.

    Returns:
        The layer, running the computation saved in its `.keras` file.

    Raises:
        ValueError: the config holds no exported computation.
    """
    config = dict(config)
    source = LayerName.source(config, cls)
    if source is not None and saving.rebuilt(source):
        return saving.copy_of_rebuilt(cls, config, source)
    if source is not None:
        # A copy of a live layer made from its config object (clone_model):
        # a new layer of the module's current values.
        return cls._copy_of(source, {**layer_kwargs(config), **(arguments or {})})
    module_class = config.pop("module_class", None)
    if not config.get("exported"):
        raise ValueError(
            f"{named(cls, config.get('name'))}: the config holds no "
            f"exported computation, and {module} cannot be rebuilt from a "
            "config; load the model from its `.keras` file."
        )
    return saving.from_artifacts(cls, config, module_class=module_class)


# What a jaxlayer config holds besides Keras's and the layer's arguments.
_SAVED_ONLY = (
    "call_fn",
    "init_fn",
    "params_spec",
    "state_spec",
    "init_on_build",
    "exported",
    "module_class",
)


def layer_kwargs(config: dict) -> dict:
    """The constructor arguments in a module layer's config (`name`,
    `dtype`, `seed`, ..., the adapter's own), without what only saving uses."""
    return {k: v for k, v in config.items() if k not in _SAVED_ONLY}


def module_error(owner: str, module_class: str | None) -> ValueError:
    """`to_module()`'s error on a layer rebuilt from its artifacts."""
    return ValueError(
        f"{owner}: `to_module()` needs the module's class "
        f"({module_class or 'unknown'}), which was not available: the layer "
        "was rebuilt from the computation saved in its `.keras` file. To get "
        "a module, build it with its code and load the weights "
        "(`model.save_weights`, then `load_weights` into a model made with "
        "that module)."
    )
