"""Deployment exports to ONNX and OpenVINO (issue 23), on the current backend.

`Sequential([Input(8), Dense(16), <layer>, Dense(3)])`, `<layer>` a
`JaxLayer` MLP (and Flax, NNX and Equinox layers), beside the same model
with a native `Dense`; each artifact is loaded by its own runtime
(onnxruntime, OpenVINO) in one fresh process and compared with
`model.predict` (1e-4) at the exported batch and another one (the dynamic
batch). Also: a layer reloaded from its `.keras` file without its source.
"""

import os
import textwrap

import keras
import numpy as np
import pytest

import jaxlayer
from _export_models import ATOL, X7, X, run_loader
from _export_models import model as _model

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow"),
    reason="the torch backend's ONNX/OpenVINO cells are in test_export_torch.py",
)

# Formats that export from this backend: every cell where a native model
# exports (on jax, Keras's OpenVINO export fails for native layers too).
FORMATS = {"jax": ["onnx"], "tensorflow": ["onnx", "openvino"]}.get(BACKEND, [])

_LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    results = {}
    for name, fmt, path, inputs in json.load(open(sys.argv[1])):
        outs = []
        try:
            if fmt == "onnx":
                import onnxruntime as ort
                s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                run = lambda a: s.run(None, {s.get_inputs()[0].name: a})[0]
            else:
                import openvino as ov
                c = ov.Core().compile_model(
                    path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
                )
                run = lambda a: c(a)[0]
            for x in inputs:
                outs.append(np.asarray(run(np.load(x))).tolist())
            results[name] = outs
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    print("RESULTS" + json.dumps(results))
    """
)


def _load_in_fresh_process(tmp_path, artifacts):
    """`{name: [outputs per input]}` (or the error text) from one child
    process that imports neither jaxlayer nor keras."""
    return run_loader(_LOADER, tmp_path, artifacts, (X, X7))[0]


def _export(model, tmp_path, name, fmt):
    path = str(tmp_path / (f"{name}.onnx" if fmt == "onnx" else f"{name}.xml"))
    model.export(path, format=fmt, verbose=False)
    return fmt, path


def _check(results, models, artifacts):
    for name in artifacts:
        got = results[name]
        assert not isinstance(got, str), f"{name}: {got}"
        model = models[name.split(":")[0]]
        for x, y in zip((X, X7), got, strict=True):
            want = model.predict(x, verbose=0)
            np.testing.assert_allclose(np.asarray(y), want, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def models():
    return {kind: _model(kind) for kind in ("native", "jaxlayer")}


@pytest.mark.slow
def test_matrix_native_and_jaxlayer(models, tmp_path):
    artifacts = {
        f"{kind}:{fmt}": _export(model, tmp_path, f"{kind}-{fmt}", fmt)
        for kind, model in models.items()
        for fmt in FORMATS
    }
    _check(_load_in_fresh_process(tmp_path, artifacts), models, artifacts)


@pytest.mark.skipif(BACKEND != "jax", reason="the jax backend's OpenVINO cell")
def test_openvino_from_jax_fails_for_native_too(models, tmp_path):
    # Keras's jax2tf path gives OpenVINO an `XlaCallModule` for any model.
    pytest.importorskip("openvino")
    for model in models.values():
        with pytest.raises(Exception, match="XlaCallModule"):
            model.export(str(tmp_path / "m.xml"), format="openvino", verbose=False)


@pytest.mark.slow
def test_adapters(tmp_path):
    built = {kind: _model(kind) for kind in ("flax", "nnx", "equinox")}
    artifacts = {
        f"{kind}:{fmt}": _export(model, tmp_path, f"{kind}-{fmt}", fmt)
        for kind, model in built.items()
        for fmt in FORMATS
    }
    _check(_load_in_fresh_process(tmp_path, artifacts), built, artifacts)


def test_reloaded_without_source(models, tmp_path, monkeypatch):
    # The functions are not registered: the reloaded layer runs its saved
    # computation, and exports the ONNX form saved beside it (what a save
    # writes by default with jax2onnx installed; conftest.py turns it off).
    monkeypatch.setenv("JAXLAYER_SAVE_ONNX", "1")
    path = str(tmp_path / "m.keras")
    models["jaxlayer"].save(path)
    reloaded = keras.saving.load_model(path)
    layer = reloaded.layers[1]
    assert isinstance(layer.call_fn, jaxlayer.saving.ExportedCall)
    reloaded(X)
    artifacts = {
        f"jaxlayer:{fmt}": _export(reloaded, tmp_path, f"reloaded-{fmt}", fmt)
        for fmt in FORMATS
    }
    _check(_load_in_fresh_process(tmp_path, artifacts), models, artifacts)
    # Saved again from the reloaded layer, the ONNX form travels on.
    again = str(tmp_path / "again.keras")
    reloaded.save(again)
    twice = keras.saving.load_model(again)
    twice(X)
    artifacts = {"jaxlayer:onnx": _export(twice, tmp_path, "twice", "onnx")}
    _check(_load_in_fresh_process(tmp_path, artifacts), models, artifacts)


def test_file_without_onnx_form_says_to_save_again(tmp_path):
    data = os.path.join(os.path.dirname(__file__), "data")
    model = keras.saving.load_model(
        os.path.join(data, "jaxlayer-0.2.0.dev0-exported.keras")
    )
    config = model.get_config()["layers"]
    shape = config[0]["config"]["batch_shape"]
    x = np.zeros((2, *shape[1:]), "float32")
    model(x)
    with pytest.raises(BaseException, match=r"saved no ONNX form.*jaxlayer\[export\]"):
        model.export(str(tmp_path / "old.onnx"), format="onnx", verbose=False)
