"""The deployment matrix's TensorFlow cells (issue 23), on the current backend.

`tf_saved_model` from jax and tensorflow and `litert` from tensorflow, for
the model of `_export_models` with each layer kind (native `Dense` beside
`JaxLayer`, `FlaxLayer`, `NNXLayer`, `EquinoxLayer`) and a `JaxLayer`
reloaded from its `.keras` file without its source. Each backend's run
exports every model once (a module fixture) and loads every artifact in one
fresh process (TensorFlow's `tf.saved_model.load`, the LiteRT interpreter)
that imports neither jaxlayer nor keras; each must give `model.predict`'s
numbers (1e-4) at batches 5 and 7 where the native artifact's batch is
dynamic (and is dynamic where native's is). The cells where Keras fails for
a native layer too are one test each. The ONNX and OpenVINO cells are in
test_export_onnx.py (jax, tensorflow) and test_export_torch.py (torch, with
`.pt2` and LiteRT from torch).
"""

import os
import textwrap
import warnings

import keras
import numpy as np
import pytest

import jaxlayer
from _export_models import ATOL, KINDS, X7, X, model, run_loader

BACKEND = keras.backend.backend()
# The cells of this file where a native model exports, per backend.
FORMATS = {"jax": ["tf_saved_model"], "tensorflow": ["tf_saved_model", "litert"]}
pytestmark = pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow", "torch"),
    reason="Keras exports from jax, tensorflow and torch only",
)
SUFFIX = {"tf_saved_model": "", "litert": ".tflite"}

_LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    results = {}
    for name, fmt, path, inputs in json.load(open(sys.argv[1])):
        try:
            if fmt == "tf_saved_model":
                import tensorflow as tf
                loaded = tf.saved_model.load(path)  # kept: it owns the variables
                run = lambda x: loaded.serve(tf.constant(x)).numpy()
                dynamic = True  # checked by running two batch sizes
            else:
                from ai_edge_litert.interpreter import Interpreter
                runner = Interpreter(path)
                (inp,) = runner.get_input_details()
                dynamic = int(inp["shape_signature"][0]) == -1
                def run(x):
                    if dynamic:
                        runner.resize_tensor_input(inp["index"], x.shape)
                    runner.allocate_tensors()
                    runner.set_tensor(inp["index"], x)
                    runner.invoke()
                    return runner.get_tensor(runner.get_output_details()[0]["index"])
            outs = {}
            for x in inputs:
                a = np.load(x)
                if dynamic or a.shape[0] == int(inp["shape"][0]):
                    outs[x] = np.asarray(run(a)).tolist()
            results[name] = {"dynamic": dynamic, "outputs": outs}
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    print("RESULTS" + json.dumps(results))
    """
)


def _load_in_fresh_process(folder, artifacts):
    """`{name: {"dynamic", "outputs": {input file: output}}}` (or the error
    text) for each `(format, path)` of `artifacts`, from one child process."""
    batches = (X, X7, X[:1])
    report, inputs = run_loader(_LOADER, folder, artifacts, batches)
    return report, dict(zip(inputs, batches, strict=True))


def _export_and_load(models, folder):
    artifacts = {}
    for name, built in models.items():
        for fmt in FORMATS.get(BACKEND, []):
            path = os.path.join(folder, f"{name}-{fmt}{SUFFIX[fmt]}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built.export(path, format=fmt, verbose=False)
            artifacts[f"{name}:{fmt}"] = (fmt, path)
    results, inputs = _load_in_fresh_process(folder, artifacts)
    return models, results, inputs


def _needs(fmt):
    if fmt not in FORMATS.get(BACKEND, []):
        pytest.skip(f"{fmt} from {BACKEND}: not a cell of this file")
    pytest.importorskip("tensorflow")
    if fmt == "litert":
        pytest.importorskip("ai_edge_litert", reason="needs ai-edge-litert")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind's model, and the `JaxLayer` one reloaded from its `.keras`
    file (its functions are not registered: it runs its saved computation),
    exported once and loaded in one fresh process."""
    if not FORMATS.get(BACKEND):
        pytest.skip(f"no cell of this file exports from {BACKEND}")
    pytest.importorskip("tensorflow")
    folder = str(tmp_path_factory.mktemp("matrix"))
    models = {kind: model(kind) for kind in KINDS}
    path = os.path.join(folder, "m.keras")
    models["jaxlayer"].save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.layers[1].call_fn, jaxlayer.saving.ExportedCall)
    reloaded(X)
    models["reloaded"] = reloaded
    return _export_and_load(models, folder)


def _check(exported, name, fmt, want_from=None):
    models, results, inputs = exported
    got = results[f"{name}:{fmt}"]
    assert not isinstance(got, str), f"{name}:{fmt}: {got}"
    native = results[f"native:{fmt}"]
    assert not isinstance(native, str), f"native:{fmt}: {native}"
    # The batch is dynamic exactly where native's is.
    assert got["dynamic"] == native["dynamic"], (name, fmt, got["dynamic"])
    assert sorted(got["outputs"]) == sorted(native["outputs"])
    if got["dynamic"]:
        assert len(got["outputs"]) == 3  # batches 5, 7 and 1
    reference = models[want_from or name]
    for file, y in got["outputs"].items():
        want = reference.predict(inputs[file], verbose=0)
        np.testing.assert_allclose(np.asarray(y), want, atol=ATOL, err_msg=name)


FORMAT_CASES = ["tf_saved_model", "litert"]


# The export-and-load fixture takes 30-40 s (TensorFlow's conversions and
# the fresh process importing TensorFlow): slow, run in CI.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMAT_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_layer_kind(exported, kind, fmt):
    _needs(fmt)
    _check(exported, kind, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_reloaded_without_source(exported, fmt):
    _needs(fmt)
    # The same numbers as the model it was saved from.
    _check(exported, "reloaded", fmt, want_from="jaxlayer")


@pytest.mark.skipif(BACKEND != "jax", reason="the jax backend's LiteRT cell")
def test_litert_from_jax_is_refused_for_native_too(tmp_path):
    # Keras's LiteRT export runs on tensorflow and torch only: the same
    # ValueError for either model (export from one of those backends).
    for kind in ("native", "jaxlayer"):
        with pytest.raises(ValueError, match="LiteRT export requires TensorFlow or"):
            model(kind).export(str(tmp_path / "m.tflite"), format="litert")
    assert not os.path.exists(tmp_path / "m.tflite")


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's SavedModel cell")
def test_saved_model_from_torch_fails_for_native_too(tmp_path):
    # Keras's torch SavedModel export calls `torch.export.export` with
    # `dynamic_shapes` of another structure than its inputs: torch refuses,
    # the same error for either model (export to ONNX, OpenVINO or LiteRT).
    pytest.importorskip("tensorflow")
    errors = {}
    for kind in ("native", "jaxlayer"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(Exception, match="structure of `inputs` and `dyn") as e:
                model(kind).export(str(tmp_path / kind), format="tf_saved_model")
        errors[kind] = f"{type(e.value).__name__}: {e.value}"
    assert errors["jaxlayer"] == errors["native"], errors
