"""The manifest's constants and descriptions, shared by export and load."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from jaxlayer import _variables as V
from jaxlayer._record import InputRecord
from jaxlayer._version import __version__

# Bumped when an older reader could misread a newer file: a reader
# refuses any format but its own (`ExportedCall`).
FORMAT = 1
# None in `native_serialization_platforms`: the platforms exported for.
DEFAULT_PLATFORMS = ("cpu", "cuda")
KINDS = ("inference", "training")
SUFFIX = ".jaxexport"


def check_manifest(manifest, owner: str) -> None:
    """Refuses a manifest (file content) whose structure is not the one
    jaxlayer writes, so that reading it later fails with no `TypeError` or
    `KeyError` from deep inside the loader.

    Args:
        manifest: the `exported` entry of a layer's config.
        owner: the layer, for messages.

    Raises:
        ValueError: names the entry that is malformed.
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(
                f"{owner}: the `.keras` file's description of its saved "
                f"computation is malformed (`{what}` is not what jaxlayer "
                "writes); refused. Save the model again from its source."
            )

    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def shape(value) -> bool:
        return isinstance(value, list) and all(
            d is None or (type(d) is int and d >= 0) for d in value
        )

    need(isinstance(manifest, dict), "exported")
    need(strings(manifest.get("call_fn_arguments")), "call_fn_arguments")
    need(isinstance(manifest.get("inputs"), dict), "inputs")
    platforms = manifest.get("platforms", [])
    need(strings(platforms), "platforms")
    variables = manifest.get("variables", [])
    need(
        isinstance(variables, list)
        and all(
            isinstance(v, dict)
            and isinstance(v.get("name"), str)
            and isinstance(v.get("tree"), str)
            and shape(v.get("shape"))
            and isinstance(v.get("dtype"), str)
            for v in variables
        ),
        "variables",
    )
    functions = manifest.get("functions")
    need(
        isinstance(functions, dict)
        and bool(functions)
        and set(functions) <= set(KINDS),
        "functions",
    )
    for kind, entry in functions.items():
        where = f"functions[{kind!r}]"
        need(isinstance(entry, dict), where)
        need(isinstance(entry.get("file"), str), f"{where}['file']")
        need(strings(entry.get("platforms", platforms)), f"{where}['platforms']")
        for key in ("outputs", "rng"):
            need(isinstance(entry.get(key), dict), f"{where}[{key!r}]")
        order = entry.get("vjp_order", 0)
        need(type(order) is int and order >= 0, f"{where}['vjp_order']")
        shapes = entry.get("input_shapes", [])
        need(
            isinstance(shapes, list) and all(shape(s) for s in shapes),
            f"{where}['input_shapes']",
        )
        need(isinstance(entry.get("onnx", {}), dict), f"{where}['onnx']")
        bounds = entry.get("bounds", {})
        need(
            isinstance(bounds, dict)
            and all(type(n) is int and n >= 1 for n in bounds.values()),
            f"{where}['bounds']",
        )
        dims = entry.get("input_dims", [])
        need(
            isinstance(dims, list)
            and all(
                isinstance(leaf, list) and all(type(d) in (int, str) for d in leaf)
                for leaf in dims
            ),
            f"{where}['input_dims']",
        )


def record_from_manifest(manifest) -> InputRecord | None:
    """The input record a manifest describes (for a reloaded layer)."""
    try:
        tree = V.decode_tree(manifest["inputs"], lambda body: Spec(**body))
    # File content: an unreadable description gives None, which the loader
    # refuses with a message, never a crash here.
    except (KeyError, TypeError, ValueError):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: isinstance(x, Spec)
    )
    specs = [(tuple(x.shape), x.dtype) for x in leaves]
    called = None
    for entry in manifest.get("functions", {}).values():
        if entry.get("shapes") == "concrete":
            called = tuple(tuple(s) for s in entry.get("input_shapes", []))
            break
    return InputRecord(
        treedef,
        tuple(s for s, _ in specs),
        tuple(d for _, d in specs),
        called,
    )


@dataclasses.dataclass
class Spec:
    """A shape (None where unknown) and a dtype."""

    shape: Any
    dtype: Any


@dataclasses.dataclass
class Artifacts:
    """A layer's exported computation: the manifest and the artifact bytes."""

    manifest: dict
    blobs: dict  # file name -> bytes


def version() -> str:
    """The jaxlayer version written in (and checked against) manifests."""
    return __version__


def first_line(err) -> str:
    if err is None:
        return "unknown error"
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line}"[:300]


def shapes_text(shapes) -> str:
    if len(shapes) == 1:
        return str(tuple(shapes[0]))
    return ", ".join(str(tuple(s)) for s in shapes)


def say(message: str) -> None:
    """One line of warning (a `UserWarning`, without a source line under it)."""
    warnings.warn_explicit(message, UserWarning, "jaxlayer", 0, module="jaxlayer")
