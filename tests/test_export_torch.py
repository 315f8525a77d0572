"""Deployment from the torch backend: `.pt2` programs, LiteRT, ONNX, OpenVINO.

A model holding a jaxlayer layer is exported with `model.export(format=
"torch")` (static batch, as Keras makes it) and with `torch.export.export`
given a dynamic batch; each program is loaded in a fresh process that
imports torch and jaxlayer and nothing of this file, and must predict what
`model.predict` does (which is checked against a pure-JAX reference). The
artifact inside a program goes through the load-safety checks there: a
changed byte is refused. `model.export(format="litert")` is loaded by the
LiteRT interpreter in a fresh process (where litert-torch is installed).
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "torch",
    reason="torch.export and litert-torch trace torch models: torch backend only",
)
IN = 8
TOL = dict(rtol=1e-5, atol=1e-5)


# Not registered: reloaded from its `.keras` file, the layer runs its export.
def mlp_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    return {
        "w1": jax.random.normal(k1, (inputs.shape[-1], 32)) / 3,
        "b1": jnp.full((32,), 0.1),
        "w2": jax.random.normal(k2, (32, 16)) / 5,
    }


def mlp_call(params, inputs):
    return jnp.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"]


def around(layer):
    model = keras.Sequential(
        [keras.Input((IN,)), keras.layers.Dense(16), layer, keras.layers.Dense(3)]
    )
    return model


def adapter_models() -> dict:
    """The MLP as a `FlaxLayer`, an `NNXLayer` and an `EquinoxLayer`, each
    `around` the same input and output layers."""
    import equinox as eqx
    from flax import linen, nnx

    from jaxlayer import EquinoxLayer, FlaxLayer, NNXLayer

    class Linen(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(16)(linen.tanh(linen.Dense(32)(x)))

    class Nnx(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.b = nnx.Linear(32, 16, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    return {
        "flax": around(FlaxLayer(Linen(), seed=0)),
        "nnx": around(NNXLayer(Nnx(nnx.Rngs(0)))),
        "equinox": around(
            EquinoxLayer(eqx.nn.MLP(16, 16, 32, 1, key=jax.random.key(0)))
        ),
    }


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def batch(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IN)).astype("float32")


def run_fresh(script: str, timeout=600, **env) -> dict:
    """Runs `script` in a fresh process (none of this file's code); its last
    line of output, JSON."""
    env = dict(os.environ, **env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The fresh process: loads each program and reports its outputs' errors.
LOAD_PT2 = """
import json
import numpy as np
import torch
import jaxlayer  # registers torch.ops.jaxlayer.call_exported (torch imported)
from jaxlayer.bridges import torch_export

cases = json.load(open({cases!r}))
out = {{}}
for name, case in cases.items():
    program = torch.export.load(case["path"])
    if case.get("tamper"):
        node = torch_export.nodes(program)[0]
        arg = node.args[0].name
        spec = next(s for s in program.graph_signature.input_specs if s.arg.name == arg)
        program.constants[spec.target][100] += 1
        try:
            program.module()(torch.tensor(np.load(case["inputs"][0])))
            out[name] = "ran"
        except ValueError as err:
            out[name] = str(err)
        continue
    module = program.module()
    errors = []
    for x, y in zip(case["inputs"], case["expected"]):
        got = module(torch.tensor(np.load(x))).detach().numpy()
        errors.append(float(np.abs(got - np.load(y)).max()))
    out[name] = errors
print(json.dumps(out))
"""


def export_all(models, folder, dynamic=True):
    """Each model as `model.export(format="torch")` (batch 1) and, with
    `dynamic`, `torch.export.export` with a dynamic batch; the cases for
    `LOAD_PT2`."""
    import torch

    cases = {}
    sizes = {"static": [1], "dynamic": [5, 7]}
    for name, model in models.items():
        paths = {"static": os.path.join(folder, f"{name}.pt2")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(paths["static"], format="torch", verbose=False)
            if dynamic:
                paths["dynamic"] = os.path.join(folder, f"{name}-dyn.pt2")
                program = torch.export.export(
                    model,
                    (torch.tensor(batch(4)),),
                    dynamic_shapes=(({0: torch.export.Dim("batch", max=1024)},),),
                    strict=False,
                )
                torch.export.save(program, paths["dynamic"])
        for kind, path in paths.items():
            cases[f"{name}/{kind}"] = case(model, path, sizes[kind], folder, name, kind)
    return cases


def case(model, path, sizes, folder, name, kind):
    """One artifact to check in a fresh process: its path, and per batch
    size an input and `model.predict` of it, saved as `.npy` files."""
    inputs, expected = [], []
    for n in sizes:
        x = batch(n, seed=n)
        inputs.append(os.path.join(folder, f"{name}-{kind}-{n}-x.npy"))
        expected.append(os.path.join(folder, f"{name}-{kind}-{n}-y.npy"))
        np.save(inputs[-1], x)
        np.save(expected[-1], model.predict(x, verbose=0))
    return {"path": path, "inputs": inputs, "expected": expected}


def run_cases(script, cases, folder, file):
    """Runs `script` (its `{cases}`: the JSON file of `cases`) in a fresh
    process."""
    path = os.path.join(folder, file)
    with open(path, "w") as f:
        json.dump(cases, f)
    return run_fresh(script.format(cases=path))


def load_fresh(cases, folder):
    return run_cases(LOAD_PT2, cases, folder, "cases.json")


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(0)
    from jaxlayer import JaxLayer

    model = around(JaxLayer(mlp_call, mlp_init, seed=0, name="mlp"))
    model(batch(2))
    return model


def squeezed_call(params, inputs):
    # The bias kept as (16, 1, 1), as Equinox's Conv2d keeps its own:
    # jax2onnx writes a Squeeze of axes (1, 2) of a parameter, a node that
    # TorchScript's ONNX export folds into a constant.
    bias = jnp.squeeze(params["b"], axis=(1, 2))
    return jnp.tanh(inputs @ params["w"] + bias)


def reference(model, x, call=mlp_call):
    """`model` computed in JAX alone: the Dense kernels and the layer's
    params through `jax.jit` of the same functions."""
    d1, layer, d2 = model.layers
    k1, b1 = (to_np(w) for w in d1.weights)
    k2, b2 = (to_np(w) for w in d2.weights)
    params = jax.tree_util.tree_map(to_np, layer.params)
    params = {k: to_np(v) for k, v in params.items()}

    @jax.jit
    def f(x):
        return call(params, x @ k1 + b1) @ k2 + b2

    return np.asarray(f(x))


@pytest.fixture(scope="module")
def mlp_files(mlp, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pt2"))
    return export_all({"mlp": mlp}, folder), folder


def test_program_carries_the_computation(mlp, mlp_files):
    import torch

    from jaxlayer.bridges import torch_export

    cases, _ = mlp_files
    program = torch.export.load(cases["mlp/dynamic"]["path"])
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "jaxlayer.call_exported.default" in targets
    assert not any(t.startswith("jaxlayer.call.") for t in targets)
    (node,) = torch_export.nodes(program)
    blob = torch_export.artifact_bytes(program, node)
    exp = torch_export.exported(program, node)
    # The weights are the program's tensors, not the artifact's bytes.
    w1 = to_np(mlp.layers[1].params["w1"]).astype("float32").tobytes()
    assert w1[:64] not in blob and w1[-64:] not in blob
    assert [len(a.shape) for a in exp.in_avals] == [1, 2, 2, 2]
    assert not isinstance(exp.in_avals[-1].shape[0], int)  # the batch
    # In this process, the live function is at hand (for exporters).
    live = torch_export.live_function(node.args[1])
    x = batch(5)
    layer = mlp.layers[1]
    params = [to_np(layer.params[k]) for k in ("b1", "w1", "w2")]
    h = x @ to_np(mlp.layers[0].weights[0]) + to_np(mlp.layers[0].weights[1])
    np.testing.assert_allclose(
        np.asarray(live(*params, h)[0]),
        np.asarray(
            jax.jit(mlp_call)(dict(zip(("b1", "w1", "w2"), params, strict=True)), h)
        ),
        **TOL,
    )


def test_pt2_loads_and_predicts_in_a_fresh_process(mlp, mlp_files):
    cases, folder = mlp_files
    x = batch(7, seed=7)
    np.testing.assert_allclose(mlp.predict(x, verbose=0), reference(mlp, x), **TOL)
    cases = dict(cases)
    cases["tampered"] = dict(cases["mlp/static"], tamper=True)
    # The changed copy first: a good load must not have cached its hash.
    cases = {"tampered": cases.pop("tampered"), **cases}
    out = load_fresh(cases, folder)
    assert "do not have the sha256" in out["tampered"], out["tampered"]
    assert max(out["mlp/static"]) <= 1e-5, out
    assert max(out["mlp/dynamic"]) <= 1e-5, out  # batches 5 and 7


def test_import_registers_the_operator_only_where_torch_is_imported():
    script = """
    import json, sys
    import jaxlayer
    before = "torch" in sys.modules
    jaxlayer.register_torch_operators()
    import torch
    print(json.dumps([before, hasattr(torch.ops.jaxlayer, "call_exported")]))
    """
    before, registered = run_fresh(script, KERAS_BACKEND="jax")
    assert before is False and registered is True


@pytest.mark.slow
def test_adapters_and_a_reloaded_layer_export_to_pt2(mlp, tmp_path):
    from jaxlayer import saving

    path = str(tmp_path / "mlp.keras")
    mlp.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.layers[1].call_fn, saving.ExportedCall)
    models = {
        **adapter_models(),
        "reloaded": reloaded,
    }
    for model in models.values():
        model(batch(2))
    x = batch(3)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), mlp.predict(x, verbose=0), **TOL
    )
    cases = export_all(models, str(tmp_path))
    out = load_fresh(cases, str(tmp_path))
    for name, errors in out.items():
        assert max(errors) <= 1e-5, (name, errors)
    assert len(out) == 2 * len(models)


LOAD_TFLITE = """
import json
import numpy as np
from ai_edge_litert.interpreter import Interpreter

out = {{}}
for name, case in json.load(open({cases!r})).items():
    runner = Interpreter(case["path"])
    runner.allocate_tensors()
    (inp,), (outp,) = runner.get_input_details(), runner.get_output_details()
    errors = []
    for x, y in zip(case["inputs"], case["expected"]):
        runner.set_tensor(inp["index"], np.load(x))
        runner.invoke()
        got = runner.get_tensor(outp["index"])
        errors.append(float(np.abs(got - np.load(y)).max()))
    out[name] = [errors, [int(d) for d in inp["shape_signature"]]]
print(json.dumps(out))
"""


def kept_state_call(params, state, inputs):
    # The state returned as it came (a BatchNorm's statistics in inference):
    # a LiteRT model holds it as constants. `jnp.where` of a Python int is
    # float64 while litert-torch has turned `jax_enable_x64` on.
    n = state["n"]
    scale = jnp.where(n == 0, 1, 1 - 0.9**n)
    return jnp.tanh(inputs @ params["w"]) * (state["mean"] / scale), state


def counter_call(params, state, inputs):
    out, state = kept_state_call(params, state, inputs)
    return out, {**state, "n": state["n"] + 1}


def with_state(call):
    from jaxlayer import JaxLayer

    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(16, 16)).astype("float32") / 4}
    state = {
        "mean": rng.normal(size=(16,)).astype("float32"),
        "n": np.array(3, "int32"),
    }
    built = around(JaxLayer(call, params=params, state=state, name="stateful"))
    built(batch(2))
    return built


@pytest.fixture
def keeps_x64():
    """Importing litert-torch turns on `jax_enable_x64` for the whole process
    (its own doing); the tests after this one run with the flag as it was."""
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.slow
def test_litert_from_the_torch_backend(mlp, tmp_path, keeps_x64):
    # Native beside the MLP, the adapters and a layer reloaded from its
    # `.keras` file; static batch 1 for every one (as Keras exports it).
    pytest.importorskip("litert_torch", reason="needs litert-torch")
    pytest.importorskip("ai_edge_litert", reason="needs ai-edge-litert")
    from _export_models import model

    folder = str(tmp_path)
    mlp.save(os.path.join(folder, "mlp.keras"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = keras.saving.load_model(os.path.join(folder, "mlp.keras"))
    models = {kind: model(kind) for kind in ("native", "flax", "nnx", "equinox")}
    models.update(mlp=mlp, reloaded=reloaded, state=with_state(kept_state_call))
    cases = {}
    for name, built in models.items():
        path = os.path.join(folder, f"{name}.tflite")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built.export(path, format="litert", verbose=False)
        cases[name] = case(built, path, [1], folder, name, "litert")
    # State that changes in inference: refused, no file.
    counter = with_state(counter_call)
    path = os.path.join(folder, "counter.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Keras re-raises what the converter raised as a RuntimeError.
        with pytest.raises(RuntimeError, match=r"JaxLayer 'stateful'.*state\['n'\]"):
            counter.export(path, format="litert", verbose=False)
    assert not os.path.exists(path)
    out = run_cases(LOAD_TFLITE, cases, folder, "litert-cases.json")
    assert sorted(out) == sorted(models)
    for name, (errors, signature) in out.items():
        assert max(errors) <= 1e-4, (name, errors)
        assert signature == [1, IN], (name, signature)  # native's too


def test_a_computation_jax_cannot_export_is_one_clear_error(tmp_path):
    import torch

    from jaxlayer import JaxLayer

    def host(x):
        return np.tanh(x)

    def callback_call(params, inputs):
        shape = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)
        return jax.pure_callback(host, shape, inputs @ params["w"])

    layer = JaxLayer(callback_call, params={"w": np.eye(16, dtype="float32")})
    model = around(layer)
    model.predict(batch(2), verbose=0)  # no gradient: a callback has none
    with pytest.raises(ValueError, match=r"JaxLayer .*torch\.export.*jax\.export"):
        torch.export.export(model, (torch.tensor(batch(2)),), strict=False)
    # The model itself still runs, eagerly.
    model.predict(batch(2), verbose=0)


# The fresh process for ONNX and OpenVINO: each artifact loaded by its
# runtime (OpenVINO computing in float32), its largest error per batch.
LOAD_ONNX_OPENVINO = """
import json
import numpy as np
import onnxruntime
import openvino

cases = json.load(open({cases!r}))
core = openvino.Core()
out = {{}}
for name, case in cases.items():
    if case["path"].endswith(".onnx"):
        session = onnxruntime.InferenceSession(case["path"])
        feed = session.get_inputs()[0].name
        run = lambda x: session.run(None, {{feed: x}})[0]
    else:
        compiled = core.compile_model(
            case["path"], "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}}
        )
        run = lambda x: compiled(x)[0]
    errors = []
    for x, y in zip(case["inputs"], case["expected"]):
        errors.append(float(np.abs(run(np.load(x)) - np.load(y)).max()))
    out[name] = errors
print(json.dumps(out))
"""


def export_onnx_openvino(models, folder, static=()):
    """Each model as `model.export(format="onnx")` and `"openvino"` (a
    dynamic batch, checked at batches 1 and 5); the models named in
    `static` also as ONNX at a static batch of 3 (where Keras tries the
    dynamo exporter first). The cases for `LOAD_ONNX_OPENVINO`."""
    cases = {}
    for name, model in models.items():
        files = {
            "onnx": (f"{name}.onnx", None, [1, 5]),
            "openvino": (f"{name}.xml", None, [1, 5]),
        }
        if name in static:
            spec = [keras.InputSpec(shape=(3, IN), dtype="float32")]
            files["onnx-static"] = (f"{name}-static.onnx", spec, [3])
        for kind, (file, signature, sizes) in files.items():
            path = os.path.join(folder, file)
            fmt = kind.split("-")[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.export(path, format=fmt, verbose=False, input_signature=signature)
            cases[f"{name}/{kind}"] = case(model, path, sizes, folder, name, kind)
    return cases


def load_onnx_openvino(cases, folder):
    return run_cases(LOAD_ONNX_OPENVINO, cases, folder, "onnx-cases.json")


def needs_onnx_openvino():
    for name in ("onnxscript", "onnxruntime", "openvino", "jax2onnx"):
        pytest.importorskip(name, reason="needs jaxlayer[export] and the runtimes")


FMTS = ("onnx", "openvino")


def test_onnx_and_openvino_from_the_torch_backend(mlp, tmp_path):
    # Keras traces the model with torch.jit.trace: the layer is one
    # jaxlayer::call_exported node, converted to the ONNX graph of its JAX
    # function; the batch stays dynamic, as for native layers.
    # A parameter squeezed on several axes: TorchScript folds that Squeeze
    # applying the axes one by one, in ascending order ("Dimension out of
    # range"); jaxlayer writes it as one Squeeze per axis.
    needs_onnx_openvino()
    from jaxlayer import JaxLayer

    rng = np.random.default_rng(1)
    params = {
        "w": rng.normal(size=(16, 16)).astype("float32") / 4,
        "b": rng.normal(size=(16, 1, 1)).astype("float32"),
    }
    squeezed = around(JaxLayer(squeezed_call, params=params, name="squeezed"))
    x = batch(4, seed=9)
    np.testing.assert_allclose(mlp.predict(x, verbose=0), reference(mlp, x), **TOL)
    np.testing.assert_allclose(
        squeezed.predict(x, verbose=0),
        reference(squeezed, x, squeezed_call),
        **TOL,
    )
    cases = export_onnx_openvino({"mlp": mlp, "squeezed": squeezed}, str(tmp_path))
    import onnx

    graph = onnx.load(cases["mlp/onnx"]["path"]).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {"Tanh", "MatMul"} <= {n.op_type for n in graph.node}
    # The artifact constant is not in the file: the weights and graph only.
    assert os.path.getsize(cases["mlp/onnx"]["path"]) < 20_000
    out = load_onnx_openvino(cases, str(tmp_path))
    assert sorted(out) == [f"{m}/{f}" for m in ("mlp", "squeezed") for f in FMTS]
    for name, errors in out.items():
        assert len(errors) == 2 and max(errors) <= 1e-4, (name, errors)


def test_state_returned_as_it_came_is_found_through_jit_and_stop_gradient():
    # Such state is not assigned while torch exports (no parameter mutation
    # in the program); state computed anew is.
    from jaxlayer.bridges import torch_export

    @jax.jit
    def inner(s):
        return jax.lax.stop_gradient(s)

    def flat(p, x, s1, s2, s3):
        return x @ p, inner(s1), s2 + 1, jnp.zeros_like(s3)

    args = [jnp.ones((2, 2)), jnp.ones((3, 2)), jnp.ones(2), jnp.ones(()), jnp.ones(())]
    jaxpr = jax.make_jaxpr(flat)(*args).jaxpr
    assert torch_export._unchanged_state(jaxpr, (1, 1, 3, 0)) == (0,)


def test_squeeze_and_unsqueeze_of_several_axes_go_one_axis_at_a_time():
    # The order in which one-axis nodes give ONNX's result, whatever order
    # TorchScript's constant folding applies several axes in.
    onnx = pytest.importorskip("onnx")
    from jaxlayer.export import _torch_onnx

    def steps(op, axes, rank=3):
        node = onnx.helper.make_node(op, ["x", "axes"], ["y"])
        return _torch_onnx._axis_steps(node, {"x": rank}, {"axes": np.array(axes)})

    assert steps("Squeeze", [1, 2]) == [2, 1]
    assert steps("Squeeze", [-1, 0]) == [2, 0]
    assert steps("Unsqueeze", [-1, -2], rank=1) == [1, 2]
    assert steps("Unsqueeze", [0, -1], rank=1) == [0, 2]
    assert steps("Squeeze", [1]) is None  # one axis: folded right
    # A negative axis of a value whose rank is not known: left as it is.
    node = onnx.helper.make_node("Squeeze", ["x", "axes"], ["y"])
    assert _torch_onnx._axis_steps(node, {}, {"axes": np.array([-1, -2])}) is None
    # Opset < 13: the axes are an attribute.
    node = onnx.helper.make_node("Squeeze", ["x"], ["y"], axes=[0, 2])
    assert _torch_onnx._axis_steps(node, {}, {}) == [2, 0]


@pytest.mark.slow
def test_onnx_and_openvino_from_torch_static_adapters_and_reloaded(
    mlp, tmp_path, monkeypatch
):
    # A static batch (Keras tries torch's dynamo exporter first, which has
    # no translation of the op, then TorchScript); FlaxLayer, NNXLayer,
    # EquinoxLayer;
    # a layer reloaded from its `.keras` file without its source (the ONNX
    # form saved in the file).
    needs_onnx_openvino()
    from jaxlayer import JaxLayer, saving

    path = str(tmp_path / "mlp.keras")
    monkeypatch.setenv("JAXLAYER_SAVE_ONNX", "1")  # the suite turns it off
    # A layer not saved before (a saved layer keeps its first inference export).
    source = around(JaxLayer(mlp_call, mlp_init, seed=1, name="mlp"))
    source(batch(2))
    source.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.layers[1].call_fn, saving.ExportedCall)
    models = {
        "mlp": mlp,
        **adapter_models(),
        "reloaded": reloaded,
    }
    for model in models.values():
        model(batch(2))
    x = batch(3)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), source.predict(x, verbose=0), **TOL
    )
    cases = export_onnx_openvino(
        {k: v for k, v in models.items() if k != "mlp"}, str(tmp_path)
    )
    cases.update(export_onnx_openvino({"mlp": mlp}, str(tmp_path), static=["mlp"]))
    del cases["mlp/onnx"], cases["mlp/openvino"]  # the fast test has them
    out = load_onnx_openvino(cases, str(tmp_path))
    assert len(out) == 9, sorted(out)
    for name, errors in out.items():
        assert max(errors) <= 1e-4, (name, errors)


# The fresh process for OpenVINO models of several inputs, by name.
LOAD_OPENVINO_NAMED = """
import json
import numpy as np
import openvino

cases = json.load(open({cases!r}))
out = {{}}
for name, case in cases.items():
    compiled = openvino.Core().compile_model(
        case["path"], "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}}
    )
    names = [sorted(i.get_names())[0] for i in compiled.inputs]
    errors = []
    for xs, y in zip(case["inputs"], case["expected"]):
        xs = {{k: np.load(v) for k, v in xs.items()}}
        got = compiled([xs.get(n, xs.get("input_0")) for n in names])[0]
        errors.append(float(np.abs(got - np.load(y)).max()))
    shapes = [str(i.get_partial_shape()) for i in compiled.inputs]
    out[name] = [errors, names, shapes]
print(json.dumps(out))
"""


def embed_call(params, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return (params["emb"][ids] * mask[..., None]).sum(axis=1)


def test_openvino_of_named_inputs_and_unknown_lengths_from_torch(tmp_path):
    # Keras traces a model of named inputs with one dict, each unknown size
    # as 1, and hands OpenVINO the traced module alone: jaxlayer goes
    # through ONNX with the inputs one by one and those sizes dynamic
    # (checked by running OpenVINO at other sizes). An input whose size 1
    # is real keeps it, with a warning.
    needs_onnx_openvino()
    from jaxlayer import JaxLayer

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(10, 4)).astype("float32")
    named = {
        n: keras.Input((None,), dtype="int32", name=n)
        for n in ("input_ids", "attention_mask")
    }
    text = keras.Model(named, JaxLayer(embed_call, params={"emb": emb})(named))
    one = keras.Sequential(
        [
            keras.Input((1,)),
            JaxLayer(mlp_call, params={"w1": emb[:1], "b1": emb[0], "w2": emb[:4]}),
        ]
    )

    def text_inputs(n, length, seed):
        r = np.random.default_rng(seed)
        return {
            "input_ids": r.integers(0, 10, (n, length)).astype("int32"),
            "attention_mask": r.integers(0, 2, (n, length)).astype("int32"),
        }

    examples = {
        "text": (text, [text_inputs(2, 5, 0), text_inputs(3, 7, 1)]),
        "one": (one, [{"input_0": batch(n, seed=n)[:, :1]} for n in (1, 5)]),
    }
    cases = {}
    for name, (model, xs) in examples.items():
        model.predict(xs[0] if name == "text" else xs[0]["input_0"], verbose=0)
        path = str(tmp_path / f"{name}.xml")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.export(path, format="openvino", verbose=False)
        said = [
            str(w.message)
            for w in caught
            if "declares only the batch" in str(w.message)
        ]
        assert bool(said) == (name == "one"), said
        inputs, expected = [], []
        for i, x in enumerate(xs):
            files = {}
            for k, a in x.items():
                files[k] = str(tmp_path / f"{name}-{i}-{k}.npy")
                np.save(files[k], a)
            inputs.append(files)
            expected.append(str(tmp_path / f"{name}-{i}-y.npy"))
            arg = x if name == "text" else x["input_0"]
            np.save(expected[-1], model.predict(arg, verbose=0))
        cases[name] = {"path": path, "inputs": inputs, "expected": expected}
    # The reference: the layer's function in JAX on the same weights.
    x = examples["text"][1][1]
    np.testing.assert_allclose(
        text.predict(x, verbose=0), np.asarray(embed_call({"emb": emb}, x)), **TOL
    )
    out = run_cases(LOAD_OPENVINO_NAMED, cases, str(tmp_path), "named.json")
    errors, names, shapes = out["text"]
    assert max(errors) <= 1e-4 and len(errors) == 2, errors
    assert names == ["input_ids", "attention_mask"]
    assert shapes == ["[?,?]", "[?,?]"], shapes
    errors, _, shapes = out["one"]
    assert max(errors) <= 1e-4 and shapes == ["[?,1]"], (errors, shapes)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_call_torch_jit_trace_cannot_record_is_one_clear_error(tmp_path, fmt):
    # A layer whose computation jax.export cannot export: one error naming
    # the layer, never an artifact without it; the model still runs.
    pytest.importorskip({"onnx": "onnxscript", "openvino": "openvino"}[fmt])
    from jaxlayer import JaxLayer

    def host(x):
        return np.tanh(x)

    def callback_call(params, inputs):
        shape = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)
        return jax.pure_callback(host, shape, inputs @ params["w"])

    model = around(JaxLayer(callback_call, params={"w": np.eye(16, dtype="float32")}))
    model.predict(batch(2), verbose=0)
    path = str(tmp_path / ("m.onnx" if fmt == "onnx" else "m.xml"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"JaxLayer '.*jax\.export"):
            model.export(path, format=fmt, verbose=False)
    assert not os.path.exists(path)
    model.predict(batch(2), verbose=0)
