"""Registering jaxlayer's torch operators without importing torch."""

from __future__ import annotations

import importlib
import sys

from jaxlayer import _deps


def register_torch_operators() -> None:
    """Registers `torch.ops.jaxlayer.call_exported` with torch.

    A `torch.export` program (`.pt2`) of a model holding a jaxlayer layer
    calls this operator, with the layer's computation as one of its
    constants. `import jaxlayer` registers it already when torch was
    imported first (always so on Keras's torch backend); call this where
    torch is imported after jaxlayer, before `torch.export.load`. Importing
    jaxlayer alone never imports torch.

    Raises:
        ImportError: torch is not installed (naming the extra to install).

    Example:
        >>> import jaxlayer
        >>> jaxlayer.register_torch_operators()
        >>> import torch
        >>> hasattr(torch.ops.jaxlayer, "call_exported")
        True
    """
    _deps.require("torch", "jaxlayer's torch operators")
    importlib.import_module("jaxlayer.bridges.torch_export")


def register_if_torch_imported() -> None:
    """`register_torch_operators()` if torch is imported already."""
    if "torch" in sys.modules:
        register_torch_operators()
