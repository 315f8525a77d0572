"""What a layer's config holds besides Keras's: its functions, by registered
name (`serialize_fn`, `locate_fn`), the placeholders of its saved trees,
and its name with the live layer it came from (`LayerName`).

Used by `JaxLayer.get_config`/`from_config` and the adapters'.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras

from jaxlayer import _variables as V


class LayerName(str):
    """A layer's name in its config, with (in this process) the layer itself.

    `keras.models.clone_model` and `Layer.from_config(layer.get_config())`
    hand the config object itself to `from_config`, which then finds the
    live layer it came from (a weak reference) and takes its functions and
    given weights from it: a copy works with unregistered functions, a
    layer built from `params` keeps them, and a copy of a layer rebuilt
    from a `.keras` file shares its loaded computation. Written out (JSON,
    a `.keras` file, pickle, deepcopy) it is a plain name, and a copy made
    from that is one from a config alone.
    """

    source_ref: Callable[[], Any] | None = None

    @classmethod
    def of(cls, layer) -> LayerName:
        name = cls(layer.name)
        name.source_ref = weakref.ref(layer)
        return name

    @staticmethod
    def source(config: dict, cls) -> Any:
        """The live layer of class `cls` that `config` came from, or None.

        The name in `config` is made a plain string. The layer may be one
        rebuilt from a `.keras` file (`saving.rebuilt`).
        """
        name = config.get("name")
        ref = getattr(name, "source_ref", None)
        if name is not None:
            # Plain from here on: the layer made from this config must not keep a
            # reference to its source.
            config["name"] = str(name)
        source = ref() if ref is not None else None
        # Exactly `cls`: another class's layer has other functions and trees.
        return source if type(source) is cls else None

    def __reduce__(self):
        # Written out as a plain str: a weak reference does not pickle, and a
        # copy from a written config must not find the live layer.
        return (str, (str(self),))


def pop_saved_trees(config, init_afresh=False):
    """Removes the saved tree descriptions from `config`; returns placeholders.

    The placeholders (zeros of the saved shapes and dtypes, or None where no
    tree was described) rebuild the variables; the weights file fills them.
    A tree kept by name only (`{"flat": true}`, a custom pytree) gives None:
    `init_fn` rebuilds it. So do trees that `init_fn` made (`init_on_build`)
    with `init_afresh` (a copy of a live layer, by `clone_model`): the copy
    is left unbuilt, like a Keras layer made from its config, and `init_fn`
    initialises it when it is built. Loading a file keeps placeholders, so
    that `init_fn` does not run for weights the file holds.
    """
    if config.pop("init_on_build", False) and init_afresh:
        config.pop("params_spec", None)
        config.pop("state_spec", None)
        return None, None
    return (
        V.config_to_placeholders(config.pop("params_spec", None)),
        V.config_to_placeholders(config.pop("state_spec", None)),
    )


def serialize_fn(fn):
    """A function's config: by registered name, with the module it came from.

    A lambda is saved as a marker, never as its bytecode (Keras would store
    it as base64 code that loading refuses to run under `safe_mode`): a
    layer whose `call_fn` is a lambda reloads from its exported computation.
    """
    if fn is None:
        return None
    name = getattr(fn, "__name__", None)
    module = getattr(fn, "__module__", None)
    if name == "<lambda>":
        return {
            "class_name": "function",
            "config": "<lambda>",
            "module": module,
            "registered_name": None,
            "lambda": True,
            "defined_in": module,
        }
    try:
        config = dict(keras.saving.serialize_keras_object(fn))
    except Exception:  # noqa: BLE001 - saving must not crash on it
        config = {
            "class_name": "function",
            "config": name or repr(fn),
            "module": module,
            "registered_name": None,
        }
    where = defined_in(fn)
    if where is not None:
        config["defined_in"] = where
    return config


def defined_in(fn) -> str | None:
    """`module.qualname` of a function (what a saved config records and a
    located function is checked against), or None without a module."""
    module = getattr(fn, "__module__", None)
    if module is None:
        return None
    return f"{module}.{getattr(fn, '__qualname__', getattr(fn, '__name__', None))}"


def is_lambda(config) -> bool:
    if not isinstance(config, dict):
        return False
    # Our marker, or Keras's own for a lambda it saved as bytecode.
    return bool(config.get("lambda")) or config.get("class_name") == "__lambda__"


def fn_label(config) -> str:
    """`name` (defined in `module.qualname`) of a function's config."""
    if not isinstance(config, dict):
        return f"`{config}`"
    name = config.get("config")
    where = config.get("defined_in")
    if where:
        return f"`{name}` (defined in `{where}`)"
    return f"`{name}`"


def fix(config) -> str:
    """What to do when a saved function cannot be located."""
    if is_lambda(config):
        return (
            "A lambda cannot be reloaded under Keras's safe_mode: define the "
            "function with `def`, register it with "
            "`@keras.saving.register_keras_serializable()` and save again (or "
            "load with `safe_mode=False` if you trust the file)."
        )
    name = config.get("config") if isinstance(config, dict) else config
    return (
        "Decorate it with `@keras.saving.register_keras_serializable()` where "
        "it is defined and import that module before loading, or pass it in "
        f"`custom_objects={{'{name}': {name}}}` to `load_model`."
    )


def locate_fn(config):
    """`(function, None)` for a saved function config, or `(None, why)`.

    Keras's registry and `custom_objects` are searched as Keras does; a
    lambda saved as a marker is never found, and one saved as bytecode (by
    jaxlayer 0.1) is run only when `safe_mode` is off.
    """
    if config is None:
        return None, None
    if isinstance(config, dict) and config.get("lambda"):
        # Never handed to Keras: the marker has no code to find, and Keras's own
        # error for it would not say why.
        return None, "it is a lambda, saved without its code"
    try:
        # Keras raises for an unregistered function; the caller says why.
        fn = keras.saving.deserialize_keras_object(config)
    except Exception:  # noqa: BLE001 - reported by the caller
        if is_lambda(config):
            return None, (
                "it is a lambda saved as Python bytecode, which Keras does not "
                "run under safe_mode"
            )
        fn = None
    if callable(fn) and is_the_saved_fn(fn, config):
        return fn, None
    if callable(fn):
        found = defined_in(fn) or repr(fn)
        return None, (
            f"{fn_label(config)} is not registered in this process (only a "
            f"function of the same name defined in `{found}` is)"
        )
    return None, f"{fn_label(config)} is not registered in this process"


def is_the_saved_fn(fn, config) -> bool:
    """Whether `fn`, found by Keras for `config`, is the function saved.

    Keras resolves a function saved unregistered (`module: "builtins"`) to
    any registered function whose name ends in `>name`, from any package:
    an unrelated `pkg>call_fn` would silently replace the saved `call_fn`.
    A function is taken when it is registered under exactly the saved name
    (or passed so in `custom_objects`), or is defined where the saved one
    was (`defined_in`).
    """
    if not isinstance(config, dict):
        return True
    name = config.get("config")
    if isinstance(name, str) and keras.saving.get_registered_object(name) is fn:
        return True
    where = config.get("defined_in")
    if where is None:
        return True  # saved without it (jaxlayer 0.1): as Keras found it
    return defined_in(fn) == where


def deserialize_fn(config, fn_name, cls):
    """The function a saved config names; raises a one-line error if none."""
    fn, reason = locate_fn(config)
    if config is not None and fn is None:
        raise ValueError(
            f"{cls.__name__}: cannot load `{fn_name}`: {reason}. {fix(config)}"
        )
    return fn
