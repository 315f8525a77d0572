"""The owner prefix of error messages, and the exception types shared by
more than one module."""

from __future__ import annotations


class CannotSave(TypeError, ValueError):
    """A layer's config cannot be written: its module (or function) cannot
    be written to a config and its computation could not be exported.

    One failure, one type, wherever it is raised: a `TypeError`, as Keras
    raises for an object it cannot serialize (code written for Keras's
    `FlaxLayer` catches that), and a `ValueError`, as jaxlayer's NNX and
    Equinox layers raised it before.
    """


def owner(layer) -> str:
    """The layer as error messages name it: `JaxLayer 'mlp'`."""
    return named(type(layer), layer.name)


def named(cls: type, name) -> str:
    """A layer of class `cls` and name `name` as messages name it (a layer
    still being made from its config)."""
    return f"{cls.__name__} '{name}'"
