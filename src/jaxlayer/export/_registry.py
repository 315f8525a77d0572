"""Which live JAX function each `XlaCallModule` of a layer runs.

An exporter that reads a TensorFlow graph (tf2onnx, OpenVINO's TensorFlow
frontend) sees a layer's call as an `XlaCallModule` op holding serialized
StableHLO, which neither converts. The TensorFlow bridge records here, for
each forward module it makes, the sha256 of the module's bytes and the JAX
function it was exported from; the converters (`_tf2onnx`, `_openvino`)
look the op's module up and convert the function instead.

Only weak references are kept: an entry goes with the layer's function
(the bridge's conversion owns the `ForwardSource`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable

_BY_MODULE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclasses.dataclass(eq=False)
class ForwardSource:
    """The JAX function behind one `XlaCallModule` module.

    Attributes:
        owner: the layer, for messages.
        function: `() -> f(*flat) -> list`, the flat forward (params,
            inputs, state, rng in; outputs then new state out), or raises
            when the layer's function is gone.
        specs: one `jax.ShapeDtypeStruct` per flat argument (symbolic
            dimensions as the module has them).
        kept: the indices of the arguments the op receives (None: all).
    """

    owner: str
    function: Callable[[], Callable]
    specs: list
    kept: list[int] | None


def module_key(module: bytes) -> str:
    """The key of a serialized module (its sha256)."""
    return hashlib.sha256(bytes(module)).hexdigest()


def remember(module: bytes, source: ForwardSource) -> None:
    """Records that `module` was exported from `source` (held weakly)."""
    _BY_MODULE[module_key(module)] = source


def lookup(module: bytes) -> ForwardSource | None:
    """The source of a module, or None when no live layer made it."""
    return _BY_MODULE.get(module_key(module))


# The ONNX graph saved in a `.keras` file beside each reloaded layer's
# `jax.export.Exported` (by the Exported's id; the entry goes with it).
_SAVED: dict = {}


@dataclasses.dataclass(eq=False)
class SavedOnnx:
    """What a `.keras` file holds for ONNX beside one exported function.

    Attributes:
        owner: the layer, for messages.
        blob: the ONNX model's bytes (checked against the manifest's size
            and sha256 when the file was loaded; parsed only when
            exporting), or None when the file has none.
        opset: the model's opset.
        why: why the file has none (saved without jax2onnx, ...).
    """

    owner: str
    blob: bytes | None
    opset: int | None
    why: str | None


def remember_saved(exported, saved: SavedOnnx) -> None:
    """Records what the file holds for ONNX beside `exported`."""
    key = id(exported)
    _SAVED[key] = saved
    weakref.finalize(exported, _SAVED.pop, key, None)


def saved_onnx(exported) -> SavedOnnx | None:
    """What was recorded for `exported`, or None (not from a file)."""
    return _SAVED.get(id(exported))
