"""The owner prefix of error messages: one helper for every message."""

from __future__ import annotations


def owner(layer) -> str:
    """The layer as error messages name it: `JaxLayer 'mlp'`."""
    return named(type(layer), layer.name)


def named(cls: type, name) -> str:
    """A layer of class `cls` and name `name` as messages name it (a layer
    still being made from its config)."""
    return f"{cls.__name__} '{name}'"
