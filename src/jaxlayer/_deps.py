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
    "jax2onnx": "export",
    "tf2onnx": "export",
    "onnx": "export",
    "openvino": "export",
    "onnx_ir": "export",
    "onnxruntime": "export",
    "litert_torch": "litert",
}


class MissingExtraError(ImportError):
    """An optional library is missing; the message names the extra to install."""


def require(
    module: str, feature: str | None = None, extra: str | None = None
) -> ModuleType:
    """Imports `module`, or raises an ImportError naming the extra to install.

    Args:
        module: the dotted module name, such as `"flax.linen"`.
        feature: what needs it, for the message (defaults to the module).
        extra: the extra of `jaxlayer` to name (defaults to the one that
            provides `module`); a feature that needs several libraries names
            the extra that installs them all (the demo: `"demo"`).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: (an `ImportError`) when the module cannot be
            imported.

    Examples:
        >>> hk = require("haiku", "the demo", extra="demo")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if extra is None:
            # A submodule not listed takes its package's extra (`flax.struct`).
            extra = _EXTRAS.get(module, _EXTRAS.get(module.split(".")[0]))
        hint = (
            f"install it with `pip install 'jaxlayer[{extra}]'` (from a clone: "
            f"`pip install '.[{extra}]'`)"
            if extra
            else f"install `{module.split('.')[0]}`"
        )
        raise MissingExtraError(
            f"{feature or module} needs `{module}`, which could not be "
            f"imported ({err}); {hint}."
        ) from err
