"""The manifest's constants and descriptions, shared by export and load."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from jaxlayer import _variables as V
from jaxlayer._record import InputRecord, input_template
from jaxlayer._shapes import symbolic_specs
from jaxlayer._version import __version__

# Bumped when an older reader could misread a newer file: a reader
# refuses any format but its own (`ExportedCall`).
FORMAT = 1
# None in `native_serialization_platforms`: the platforms exported for.
DEFAULT_PLATFORMS = ("cpu", "cuda")
KINDS = ("inference", "training")
SUFFIX = ".jaxexport"


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


def symbolic_structs(record: InputRecord):
    """The inputs with a symbolic batch and every unknown dimension symbolic."""
    return symbolic_specs(input_template(record), record.dtypes)


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
