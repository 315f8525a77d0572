"""Lazy imports of optional dependencies, with the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# Module to import -> extra of `jaxlayer` that provides it.
_EXTRAS = {
    "haiku": "haiku",
    "flax": "flax",
    "flax.linen": "flax",
    "flax.nnx": "flax",
    "equinox": "equinox",
    "tensorflow": "tensorflow",
    "torch": "torch",
    "sklearn": "demo",
    "optax": "test",
}


def require(module: str, feature: str | None = None) -> ModuleType:
    """Imports `module`, or raises an ImportError naming the extra to install.

    Args:
        module: the dotted module name, such as `"flax.linen"`.
        feature: what needs it, for the message (defaults to the module).

    Returns:
        The imported module.

    Raises:
        ImportError: when the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRAS.get(module, _EXTRAS.get(module.split(".")[0]))
        hint = (
            f"install it with `pip install 'jaxlayer[{extra}]'`"
            if extra
            else f"install `{module.split('.')[0]}`"
        )
        raise ImportError(
            f"{feature or module} needs `{module}`, which could not be "
            f"imported ({err}); {hint}."
        ) from err
