"""The input record: the input structure a layer was first called with.

A layer records it on its first calls (`JaxLayer._watched_call`); the
bridges read the shapes from it (`PureFunction.input_shapes`), saving
exports the layer's function for it, and a layer rebuilt from a `.keras`
file starts from the one its manifest describes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """The input structure a layer was first called with.

    Attributes:
        treedef: the structure of the inputs.
        shapes: per input leaf, its shape (None where unknown).
        dtypes: per input leaf, its dtype as the layer's function gets it.
        called: per input leaf, the concrete shape of the first call whose
            shapes were all known (None until one happened): what is
            exported when a symbolic batch cannot be.
    """

    treedef: Any
    shapes: tuple
    dtypes: tuple
    called: tuple | None = None


def dims(shape) -> tuple:
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in shape)


def input_template(record: InputRecord) -> list[tuple]:
    """Per input leaf, its shape with None where the export is symbolic.

    The first dimension of every input is the batch (when it was unknown,
    or equal to the first input's), and every unknown dimension is symbolic.
    """
    first = next((s[0] for s in record.shapes if s), None)
    return [
        tuple(
            # A leading size equal to the first input's is the batch too, so inputs
            # that share a batch share one symbol in the export.
            None if d is None or (i == 0 and d == first) else int(d)
            for i, d in enumerate(shape)
        )
        for shape in record.shapes
    ]


def shared_groups(record: InputRecord) -> list[tuple]:
    """Per input leaf, per dimension, the group of an unknown non-batch
    dimension (None elsewhere): dimensions in one group are equal in every
    recorded call, so that one symbol can stand for them all (token ids and
    their attention mask share the sequence length).

    The sizes of the recorded call of known shapes (`called`) decide; before
    one, the dimension's position does (the inputs' second dims are one
    group, their third another).
    """
    template = input_template(record)
    called = record.called
    fits = called is not None and len(called) == len(template)
    groups = []
    for k, shape in enumerate(template):
        sizes = called[k] if fits and len(called[k]) == len(shape) else None
        groups.append(
            tuple(
                None
                if i == 0 or d is not None
                else (("size", int(sizes[i])) if sizes is not None else ("at", i))
                for i, d in enumerate(shape)
            )
        )
    return groups


def observe(record: InputRecord | None, inputs, dtype_of) -> tuple:
    """`(record, symbolic)`: `record` updated with a call on `inputs`.

    The first call whose leaves are arrays (or `KerasTensor`s) gives the
    structure, shapes and dtypes (`dtype_of(leaf)`, as the function gets
    it); the first call of concrete, fully known shapes of that structure
    gives `called`. `symbolic`: whether the call is on `KerasTensor`s.
    """
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    arrays = all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)
    symbolic = any(isinstance(x, keras.KerasTensor) for x in leaves)
    if arrays and record is None:
        record = InputRecord(
            treedef,
            tuple(dims(x.shape) for x in leaves),
            tuple(dtype_of(x) for x in leaves),
        )
    if arrays and record is not None and record.called is None:
        shapes = tuple(dims(x.shape) for x in leaves)
        known = all(None not in s for s in shapes)
        # Only for the recorded structure: a later call of another structure
        # must not decide what is exported.
        if not symbolic and known and treedef == record.treedef:
            record = dataclasses.replace(record, called=shapes)
    return record, symbolic
