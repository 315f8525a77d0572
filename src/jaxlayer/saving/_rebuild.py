"""Rebuilding a layer from its exported computation (no Python code)."""

from __future__ import annotations

from jaxlayer import _variables as V
from jaxlayer._errors import named
from jaxlayer.saving._exported_call import ExportedCall
from jaxlayer.saving._manifest import record_from_manifest, say


def placeholders(config_tree, manifest, tree: str):
    """The placeholders of `params` or `state` for a rebuilt layer."""
    flat = None
    if manifest is not None:
        flat = [
            (v["name"], v["shape"], v["dtype"])
            for v in manifest.get("variables", [])
            if v["tree"] == tree
        ]
    if config_tree is None and flat:
        # A tree the config does not describe (jaxlayer 0.2 writes FLAT).
        config_tree = dict(V.FLAT)
    return V.config_to_placeholders(config_tree, flat=flat)


def from_artifacts(
    cls,
    config: dict,
    *,
    keep: tuple = (),
    module_class: str | None = None,
    values: tuple | None = None,
):
    """A layer of class `cls` whose `call_fn` runs the saved artifacts.

    The layer is made by the class's hook, `cls._from_exported(call,
    params, state, record, config)` (`JaxLayer`'s, which adapters extend).

    `config` is the layer's config (what `get_config` returned); the keys in
    `keep` are adapter arguments the rebuilt layer has no use for, kept in
    `call_fn.kept` to be saved again as they were. The artifacts themselves
    are read later, by `load_assets`. `values`: the `(params, state)` to
    start from instead of placeholders (which the weights file fills).
    """
    config = dict(config)
    manifest = config.pop("exported")
    owner = named(cls, config.get("name"))
    call = ExportedCall(
        manifest,
        owner,
        fn_config=config.pop("call_fn", None),
        init_config=config.pop("init_fn", None),
        module_class=module_class,
    )
    config.pop("init_on_build", None)  # the artifacts have no init_fn
    params_config = config.pop("params_spec", None)
    if config.get("weight_transforms"):
        # A layer with weight transforms (LoRA, int8) stores other variables
        # than its tree's leaves: the artifacts take them flat, by name.
        params_config = dict(V.FLAT)
    params = placeholders(params_config, manifest, "params")
    state = placeholders(config.pop("state_spec", None), manifest, "state")
    if values is not None:
        params, state = values
    call.kept = {key: config.pop(key, None) for key in keep}
    return cls._from_exported(
        call, params, state, record_from_manifest(manifest), config
    )


def copy_of_rebuilt(cls, config: dict, source):
    """A copy of `source`, a live layer rebuilt from a `.keras` file, made
    from its config object (`keras.models.clone_model` in this process).

    The copy runs the computation `source` loaded (shared, read-only) and
    starts from copies of `source`'s current weights, in variables of its
    own: like a layer built from given `params`, there is no `init_fn` to
    initialise it afresh. If `source` has not read its artifacts, the copy
    waits for `load_assets` too.
    """
    call = source.call_fn
    values = None
    if call.loaded:
        # NumPy copies: the copy's variables never alias the source's.
        values = (V.numpy_tree(source.params), V.numpy_tree(source.state))
    config = dict(config)
    config.pop("module_class", None)  # the source's call knows it
    # (A source that never read its artifacts saves no manifest in its config.)
    config["exported"] = call.manifest
    for key, value in call.kept.items():
        config.setdefault(key, value)
    layer = from_artifacts(
        cls,
        config,
        keep=tuple(call.kept),
        module_class=call.module_class,
        values=values,
    )
    if call.loaded:
        layer.call_fn.share(call)
    return layer


def rebuilt(layer) -> bool:
    """Whether `layer` runs a computation rebuilt from a `.keras` file."""
    return isinstance(layer.call_fn, ExportedCall)


def pending(fn) -> bool:
    """Whether `fn`, a `call_fn`, waits for its artifacts (`load_assets`)."""
    return isinstance(fn, ExportedCall) and not fn.loaded


def warn_rebuilt(owner: str, what: str) -> None:
    """The one line said when a layer is rebuilt from its artifacts."""
    say(
        f"{owner}: {what}; the layer runs the computation saved in the "
        "`.keras` file (predict and fit work; the Python code is not used)."
    )
