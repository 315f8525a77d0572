"""What the adapters share: the module check and plain-dict trees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The library of a module (by the package of a class in its MRO) -> the
# jaxlayer layer for it and how to make an instance.
_LAYERS = {
    "flax.linen": ("FlaxLayer", "()"),
    "flax.nnx": ("NNXLayer", "(..., rngs=nnx.Rngs(0))"),
    "equinox": ("EquinoxLayer", "(...)"),
}


def library_of(obj: Any) -> str | None:
    """`"flax.linen"`, `"flax.nnx"` or `"equinox"` for a module (or class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    # By the MRO: a user's module class lives in the user's package, its
    # bases in the library's.
    for klass in cls.__mro__:
        module = klass.__module__ or ""
        for library in _LAYERS:
            if module == library or module.startswith(library + "."):
                return library
    return None


def check_module(module: Any, base: type, library: str, owner: str) -> None:
    """Raises a TypeError naming the right layer unless `module` is a `base`.

    Args:
        module: what the user passed as `module`.
        base: the module class the adapter takes (`nn.Module`, ...).
        library: the adapter's library (a key of `_LAYERS`).
        owner: the layer, for the message (`"FlaxLayer 'cnn'"`).

    Raises:
        TypeError: `module` is not an instance of `base`.
    """
    if isinstance(module, base):
        return
    hint = ""
    if isinstance(module, type) and issubclass(module, base):
        hint = (
            f"; pass an instance, `{module.__name__}{_LAYERS[library][1]}`, "
            "not the class"
        )
    else:
        other = library_of(module)
        if other is not None and other != library:
            kind = {"flax.linen": "Flax linen", "flax.nnx": "Flax NNX"}.get(
                other, "Equinox"
            )
            hint = f"; for a {kind} module use `jaxlayer.{_LAYERS[other][0]}`"
    article = "an" if library[0] in "aeiou" else "a"
    raise TypeError(
        f"{owner}: `module` must be {article} `{library}.Module` instance, got "
        f"{type(module).__name__}{hint}."
    )


def plain(tree: Any) -> Any:
    """`tree` with every mapping (FrozenDict, State dicts) as a plain dict."""
    # FrozenDicts and NNX State dicts are pytree nodes a config cannot
    # describe; plain dicts are.
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    return tree
