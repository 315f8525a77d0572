"""A layer's config: what `get_config` writes and how `from_config` reads it.

The layer hands over values (its `ExportSource`, the descriptions of its
trees, its functions); this module never reads the layer. A config rebuilds
the layer with its Python functions where Keras can locate them, else from
the computation exported into the `.keras` file (`_rebuild`).
"""

from __future__ import annotations

from typing import Any

from jaxlayer import _config as C
from jaxlayer import _errors
from jaxlayer import _variables as V
from jaxlayer.saving._export import ExportSource, artifacts_for_save
from jaxlayer.saving._exported_call import ExportedCall
from jaxlayer.saving._rebuild import from_artifacts, warn_rebuilt

# The `.keras` file cannot hold a tree of a custom pytree node without a way
# to rebuild it; the fixes, in the order a user would try them.
_UNDESCRIBABLE = (
    "{owner} cannot be saved in a `.keras` file: `{path}` is {what}, and its "
    "computation could not be exported ({why}). Use dicts, lists, tuples or "
    "NamedTuples for `params`/`state`, or give the layer an `init_fn` (which "
    "rebuilds the tree when loading); or save the weights only with "
    "`save_weights`."
)


def tree_configs(params_spec, state_spec) -> dict:
    """The config's descriptions of the `params` and `state` trees.

    A tree of a type a config cannot describe (a custom pytree node) is
    described as `FLAT` (kept by variable name); its error is under
    `"undescribable"`.

    Args:
        params_spec: the `_variables.TreeSpec` of `params` (or None), as the
            config describes it (with the weight transforms' base tree).
        state_spec: that of `state` (or None).
    """
    trees: dict = {"undescribable": {}}
    for root, spec in (("params", params_spec), ("state", state_spec)):
        try:
            trees[root] = V.spec_to_config(spec, root)
        except V.UndescribableTree as err:
            trees["undescribable"][root] = err
            trees[root] = dict(V.FLAT)
    return trees


def layer_config(
    base: dict,
    source: ExportSource,
    *,
    init_fn,
    seed: int | None,
    trees: dict,
    init_on_build: bool,
    steps: tuple,
) -> dict:
    """`get_config`'s dict: `base` (Keras's) with the layer's own keys.

    Exports the computation (or takes it from the memo) and puts its
    manifest under `"exported"`; the artifacts themselves go to the asset
    folder (`save_assets`).

    Args:
        base: the base layer's config (Keras's `Layer.get_config`).
        source: what exporting takes from the layer.
        init_fn: the layer's `init_fn` (or None).
        seed: the layer's seed.
        trees: `tree_configs` of the layer's trees.
        init_on_build: whether `init_fn` made the weights.
        steps: the layer's weight transforms (`_transforms.Step`s).

    Raises:
        CannotSave: a tree cannot be described, the computation could not
            be exported and no `init_fn` can rebuild the tree.
    """
    config = dict(base)
    artifacts, why = artifacts_for_save(source)
    fn = source.call_fn
    rebuilt = isinstance(fn, ExportedCall)
    trees = dict(trees)
    for err in trees.pop("undescribable").values():
        if artifacts is None and init_fn is None:
            raise _errors.CannotSave(
                _UNDESCRIBABLE.format(
                    owner=source.owner, path=err.path, what=err.what, why=why
                )
            )
    platforms = source.native_serialization_platforms
    config.update(
        {
            # A layer rebuilt from a file writes the function configs it was
            # loaded with: the original names, for a later load that has them.
            "call_fn": fn.fn_config if rebuilt else C.serialize_fn(fn),
            "init_fn": fn.init_config if rebuilt else C.serialize_fn(init_fn),
            "seed": seed,
            "native_serialization_platforms": (
                list(platforms) if platforms is not None else None
            ),
            "params_spec": trees["params"],
            "state_spec": trees["state"],
            "init_on_build": init_on_build,
            "exported": artifacts.manifest if artifacts is not None else None,
        }
    )
    if steps:
        # Only transformed layers have the key: other configs stay as 0.1's.
        config["weight_transforms"] = [step.to_config() for step in steps]
    return config


def layer_from_config(
    cls, config: dict, *, live_fns: tuple | None = None, given: Any = None
):
    """A layer of `cls` from `get_config`'s dict (`JaxLayer.from_config`).

    Args:
        cls: the layer class.
        config: the dict (a copy the function may change).
        live_fns: `(call_fn, init_fn)` of the live layer the config is a
            copy of (`clone_model`), or None: taken where the config still
            names them.
        given: that layer's `(params, state)` values, for weights that were
            given rather than made by `init_fn` (a config holds no values),
            or None.

    Raises:
        ValueError: `call_fn` (or a needed `init_fn`) cannot be located and
            the config holds no exported computation.
    """
    owner = _errors.named(cls, config.get("name"))
    exported = config.get("exported")
    call_fn, reason = C.locate_fn(config.get("call_fn"))
    init_fn, init_reason = C.locate_fn(config.get("init_fn"))
    if live_fns is not None:
        # The live functions where the config still names them (unregistered
        # ones work in a copy); a config edited to name others gets those.
        if config.get("call_fn") == C.serialize_fn(live_fns[0]):
            call_fn = live_fns[0]
        if config.get("init_fn") == C.serialize_fn(live_fns[1]):
            init_fn = live_fns[1]
    # A tree kept by variable name (a custom pytree node) needs `init_fn` or
    # the live values to get its structure back.
    flat = any(
        isinstance(config.get(k), dict) and config[k].get("flat")
        for k in ("params_spec", "state_spec")
    )
    if call_fn is not None and (init_fn is not None or not flat or given is not None):
        config.pop("exported", None)
        params, state = C.pop_saved_trees(
            config, live_fns is not None and init_fn is not None
        )
        if given is not None:
            params, state = given
        if params is None and state is None and config.get("init_fn"):
            if init_fn is None:
                raise ValueError(
                    f"{owner}: cannot load `init_fn`: {init_reason}, and "
                    "the file describes no `params`/`state` to rebuild "
                    f"the layer without it. {C.fix(config['init_fn'])}"
                )
        config["call_fn"] = call_fn
        config["init_fn"] = init_fn
        if config.get("params") is None and config.get("state") is None:
            config["params"], config["state"] = params, state
        return cls(**config)
    if exported:
        if call_fn is not None:
            reason = (
                "its `params`/`state` tree is of a type the file does not "
                "describe, and it has no `init_fn` to rebuild it"
            )
        # A lambda can never be located: no warning for what cannot be fixed.
        if not C.is_lambda(config.get("call_fn")) or call_fn is not None:
            warn_rebuilt(owner, reason)
        return from_artifacts(cls, config)
    raise ValueError(
        f"{owner}: cannot load `call_fn`: {reason}, and the file holds no "
        "exported computation to run instead (it was saved by jaxlayer "
        f"0.1, or its computation could not be exported). "
        f"{C.fix(config.get('call_fn'))}"
    )
