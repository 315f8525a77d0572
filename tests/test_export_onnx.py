"""Deployment exports to ONNX and OpenVINO (issue 23), on the current backend.

`Sequential([Input(8), Dense(16), <layer>, Dense(3)])`, `<layer>` a
`JaxLayer` MLP (and Flax, NNX and Equinox layers), beside the same model
with a native `Dense`; each artifact is loaded by its own runtime
(onnxruntime, OpenVINO) in one fresh process and compared with
`model.predict` (1e-4) at the exported batch and another one (the dynamic
batch). Also: a layer reloaded from its `.keras` file without its source.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import jaxlayer
from _export_models import ATOL, X7, X, run_loader, text_init
from _export_models import model as _model

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow", "torch"), reason="no ONNX export"
)
not_torch = pytest.mark.skipif(
    BACKEND == "torch",
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


@not_torch
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


@not_torch
@pytest.mark.slow
def test_adapters(tmp_path):
    built = {kind: _model(kind) for kind in ("flax", "nnx", "equinox")}
    artifacts = {
        f"{kind}:{fmt}": _export(model, tmp_path, f"{kind}-{fmt}", fmt)
        for kind, model in built.items()
        for fmt in FORMATS
    }
    _check(_load_in_fresh_process(tmp_path, artifacts), built, artifacts)


@not_torch
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


@not_torch
def test_file_without_onnx_form_says_to_save_again(tmp_path):
    data = os.path.join(os.path.dirname(__file__), "data")
    model = keras.saving.load_model(
        os.path.join(data, "jaxlayer-0.2.0.dev0-exported.keras")
    )
    config = model.get_config()["layers"]
    shape = config[0]["config"]["batch_shape"]
    x = np.zeros((2, *shape[1:]), "float32")
    model(x)
    with pytest.raises(ValueError, match=r"saved no ONNX form.*jaxlayer\[export\]"):
        model.export(str(tmp_path / "old.onnx"), format="onnx", verbose=False)


# -- inputs that share an unknown dimension (issue 30) ------------------------
# Token ids and their mask through two `keras.Input((None,), "int32")`: the
# function needs their lengths equal and builds positions from the length
# (`arange`, `broadcast_to`, `zeros_like`: Hugging Face's glue). Every export
# either works at other batch sizes and lengths, or raises a `ValueError`
# before writing a file.


def _text_fn(params, inputs):
    ids, mask = inputs
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h = params["emb"][ids] + params["pos"][positions]
    h = h * (mask[..., None] + jnp.zeros_like(ids)[..., None]).astype(h.dtype)
    return jnp.tanh(h).sum(1) @ params["w"]


def _text_data(batch, length):
    rng = np.random.default_rng(batch * 100 + length)
    ids = rng.integers(0, 10, (batch, length)).astype("int32")
    return [ids, (rng.random((batch, length)) > 0.2).astype("int32")]


_TEXT_LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    path, shapes = json.load(open(sys.argv[1]))
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = []
    for b, t in shapes:
        rng = np.random.default_rng(b * 100 + t)
        ids = rng.integers(0, 10, (b, t)).astype("int32")
        mask = (rng.random((b, t)) > 0.2).astype("int32")
        feed = dict(zip([i.name for i in s.get_inputs()], [ids, mask]))
        out.append(s.run(None, feed)[0].tolist())
    print("RESULTS" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def text_model():
    ids = keras.Input((None,), dtype="int32")
    mask = keras.Input((None,), dtype="int32")
    layer = jaxlayer.JaxLayer(_text_fn, text_init, seed=0, name="text")
    model = keras.Model([ids, mask], layer([ids, mask]))
    model(_text_data(2, 5))  # Keras's ONNX export on jax wants a call
    return model


def test_shared_dimension_exports_work_at_other_shapes(text_model, tmp_path):
    # On jax, Keras's exporter gives each input its own sequence symbol
    # (`dim_0_1`, `dim_1_1`), which this function cannot take: jaxlayer
    # exports again with the one the layer recorded equal.
    path = tmp_path / "text.onnx"
    text_model.export(str(path), format="onnx", verbose=False)
    shapes = [(3, 7), (1, 2)]
    script = tmp_path / "load.py"
    script.write_text(_TEXT_LOADER)
    args = tmp_path / "args.json"
    args.write_text(json.dumps([str(path), shapes]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(script), str(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS")]
    assert line, proc.stderr[-2000:]
    got = json.loads(line[0][len("RESULTS") :])
    for (b, t), y in zip(shapes, got, strict=True):
        want = text_model.predict(_text_data(b, t), verbose=0)
        np.testing.assert_allclose(np.asarray(y), want, atol=ATOL)


@pytest.mark.skipif(BACKEND != "jax", reason="Keras's jax2tf export: jax backend")
def test_shared_dimension_saved_model_on_jax(text_model, tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "text_saved_model")
    text_model.export(path, format="tf_saved_model", verbose=False)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    names = [t.name for t in text_model.inputs]
    assert sorted(names) == sorted(serve.structured_input_signature[1])
    for b, t in [(3, 7), (1, 2)]:
        x = _text_data(b, t)
        feed = {n: tf.constant(a) for n, a in zip(names, x, strict=True)}
        (got,) = serve(**feed).values()
        want = text_model.predict(x, verbose=0)
        np.testing.assert_allclose(got.numpy(), want, atol=ATOL)


def _bounded_fn(params, inputs):
    # Ids and mask of one length, plus a table of six positions sliced to it
    # (GPT-2's causal mask, sliced to min(n_positions, length)): the length
    # can be at most 6.
    ids, mask = inputs
    table = params["pos"][: ids.shape[1]]
    return ((ids * mask).astype("float32") + table[None, :]).sum(1, keepdims=True)


@pytest.mark.skipif(BACKEND != "jax", reason="Keras's jax2tf export: jax backend")
def test_a_largest_length_is_passed_on_to_the_saved_model_on_jax(tmp_path):
    import tensorflow as tf

    ids, mask = keras.Input((None,), dtype="int32"), keras.Input((None,), dtype="int32")
    pos = np.arange(6, dtype="float32")
    layer = jaxlayer.JaxLayer(_bounded_fn, params={"pos": pos}, name="bounded")
    model = keras.Model([ids, mask], layer([ids, mask]))
    model.predict(_text_data(2, 5), verbose=0)
    path = str(tmp_path / "bounded_saved_model")
    with pytest.warns(UserWarning, match="<= 6 only"):
        model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)  # kept: its functions need it alive
    for b, t in [(3, 4), (1, 6)]:
        x = _text_data(b, t)
        want = jax.jit(_bounded_fn)({"pos": pos}, x)
        np.testing.assert_allclose(loaded.serve(x).numpy(), want, atol=ATOL)
    with pytest.raises(tf.errors.InvalidArgumentError, match="slice size"):
        loaded.serve(_text_data(1, 7))


def _apart_fn(params, inputs):
    # Two sequences of any lengths, one after the other.
    ids, more = inputs
    return params["emb"][jnp.concatenate([ids, more], axis=1)].sum(1)


@pytest.mark.skipif(BACKEND != "jax", reason="Keras's jax export: jax backend")
def test_inputs_apart_keep_their_own_symbols_and_explicit_shapes_are_kept(
    text_model, tmp_path
):
    import onnx

    # Called with equal lengths, but exported as Keras makes it (one symbol
    # per input dimension), since that works.
    a, b = keras.Input((None,), dtype="int32"), keras.Input((None,), dtype="int32")
    layer = jaxlayer.JaxLayer(_apart_fn, text_init, seed=0, name="apart")
    model = keras.Model([a, b], layer([a, b]))
    model(_text_data(2, 5))
    path = tmp_path / "apart.onnx"
    model.export(str(path), format="onnx", verbose=False)
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in onnx.load(str(path)).graph.input
    ]
    assert dims[0][0] == dims[1][0] and dims[0][1] != dims[1][1], dims
    # The user's own `polymorphic_shapes`: used as given, never retried.
    shapes = [["(b, x)", "(b, y)"]]
    with pytest.raises(Exception) as info:
        text_model.export(
            str(tmp_path / "kept"),
            format="tf_saved_model",
            verbose=False,
            jax2tf_kwargs={"polymorphic_shapes": shapes},
        )
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "exported again" not in notes


def _dict_fn(params, inputs):
    return _text_fn(params, (inputs["ids"], inputs["a_mask"]))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf -> openvino: tensorflow")
def test_openvino_of_a_dict_of_inputs(tmp_path):
    # Keras's OpenVINO export gives the model's function one positional
    # argument, the dict, and names the converted model's inputs in the
    # dict's order (here not the sorted one, tf2onnx's).
    pytest.importorskip("openvino")
    import openvino as ov

    keys = ("ids", "a_mask")
    inputs = {n: keras.Input((None,), dtype="int32", name=n) for n in keys}
    layer = jaxlayer.JaxLayer(_dict_fn, text_init, seed=0, name="text_dict")
    model = keras.Model(inputs, layer(inputs))
    model(dict(zip(keys, _text_data(2, 5), strict=True)))
    path = str(tmp_path / "text_dict.xml")
    model.export(path, format="openvino", verbose=False)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    order = [next(iter(i.get_names() & set(keys))) for i in compiled.inputs]
    assert sorted(order) == sorted(keys)
    for b, t in [(3, 7), (1, 2)]:
        x = dict(zip(keys, _text_data(b, t), strict=True))
        got = compiled({n: x[n] for n in order})[0]
        want = model.predict(x, verbose=0)
        np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf2onnx: tensorflow backend")
def test_tf2onnx_handler_failure_is_a_value_error(text_model, tmp_path, monkeypatch):
    from jaxlayer.export import _tf2onnx

    def fail(ctx, node):
        raise RuntimeError("no conversion here")

    monkeypatch.setattr(_tf2onnx, "_convert", fail)
    path = tmp_path / "broken.onnx"
    with pytest.raises(ValueError, match="no conversion here"):
        text_model.export(str(path), format="onnx", verbose=False)
    assert not path.exists()
    # The one patch of tf2onnx: `from_function` wrapped (fails when tf2onnx
    # renames it; see `_tf2onnx`).
    import tf2onnx.convert

    assert getattr(tf2onnx.convert.from_function, "_jaxlayer_wrapped", False)


@pytest.mark.skipif(BACKEND != "jax", reason="once: jax2onnx itself")
def test_jax2onnx_still_replaces_jax_numpy():
    # `_onnx._plain_numpy` undoes jax2onnx's replacements of `jax.numpy`
    # functions while a layer's function is traced; this fails when jax2onnx
    # stops replacing `jnp.full` (then the workaround can go).
    import jax2onnx

    from jaxlayer.export import _onnx

    plain = jnp.full
    seen = {}

    def fn(x):
        seen["replaced"] = jnp.full is not plain
        return [x + 1]

    def plain_fn(x):
        seen["plain"] = jnp.full is plain
        return [x + 1]

    spec = [jax.ShapeDtypeStruct(("b", 3), jnp.float32)]
    jax2onnx.to_onnx(fn, inputs=spec, opset=18, return_mode="proto")
    jax2onnx.to_onnx(
        _onnx._plain_numpy(plain_fn), inputs=spec, opset=18, return_mode="proto"
    )
    assert seen == {"replaced": True, "plain": True}
    assert jnp.full is plain
