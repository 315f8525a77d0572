"""The ONNX graph of a layer's inference function, for its `.keras` file.

A layer reloaded without its source runs its saved StableHLO
(`call_exported`), which jax2onnx cannot convert. So while the live
function exists, saving also writes the ONNX graph jax2onnx makes of it
(the flat function: parameters, inputs, state and rng in, outputs and new
state out; the weights stay in the weights file), with the same symbolic
dimensions; exporting the reloaded model to ONNX or OpenVINO splices it in
where the layer's call is (`_jax2onnx`). It is data (an ONNX protobuf),
listed in the manifest with its size and sha256, read only by the
exporters, and checked before use (`onnx.checker`, no external data, only
standard ONNX domains).

Opt-in: written only when `JAXLAYER_SAVE_ONNX=1` is set at save time.
jax2onnx's first conversion in a process imports all its plugins (measured
58-100 s on a 2-core machine shared with other work; then seconds a
function), which a plain `model.save` must not pay. A model saved without it
still reloads, predicts and trains everywhere; only its ONNX and OpenVINO
exports without the source need it, and they say so.
"""

from __future__ import annotations

import importlib.util
import os

from jaxlayer.export import _onnx

# The opset the saved graph is written at: the lowest any host converter
# uses (tf2onnx's default); `onnx.version_converter` raises it to the host's.
OPSET = 15
SUFFIX = ".onnx"


def make(fn, specs) -> tuple[bytes | None, str | None]:
    """`(bytes, None)`, the ONNX model of `fn(params, inputs, state, rng)`
    on the flat `specs` (`[params, inputs, state, rng]` lists), or
    `(None, why)`."""
    if os.environ.get("JAXLAYER_SAVE_ONNX", "0") != "1":
        return None, (
            "its `.keras` file holds no ONNX form, which is written only on "
            "request (save the model again from its source with the "
            "environment variable JAXLAYER_SAVE_ONNX=1 and jax2onnx installed)"
        )
    if importlib.util.find_spec("jax2onnx") is None:
        return None, (
            "jax2onnx was not installed when the model was saved (install "
            "`jaxlayer[export]` and save the model again from its source)"
        )
    sizes = [len(s) for s in specs]
    flat_specs = [s for group in specs for s in group]

    def flat(*args):
        groups, start = [], 0
        for n in sizes:
            groups.append(list(args[start : start + n]))
            start += n
        outputs, new_state = fn(*groups)
        return [*outputs, *new_state]

    try:
        proto = _onnx.to_onnx(
            flat,
            flat_specs,
            opset=OPSET,
            feature="saving the ONNX form of a layer",
            input_names=[f"arg_{i}" for i in range(len(flat_specs))],
        )
    except Exception as err:  # noqa: BLE001 - saved without it, said why
        text = str(err).strip().splitlines()
        return None, (
            f"jax2onnx could not convert the function when it was saved "
            f"({type(err).__name__}: {text[0][:200] if text else ''})"
        )
    return proto.SerializeToString(), None
