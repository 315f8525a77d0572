"""Load safety: a crafted `.keras` file is refused with a clear error.

Each hostile file is made here from a file the current code saved: the
MLIR text of a real artifact is edited and serialized again, and the
manifest's byte counts and sha256 are fixed, as an attacker would. Each is
loaded in a fresh process (it may be the process that crashes), which
reports what happened; the tests check that every load ended in the
expected `ValueError`, with no signal, no hang and no file written by a
payload. Runs on every backend (the NumPy backend included: it loads and
predicts).
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxlayer import JaxLayer

BACKEND = keras.backend.backend()
IN, OUT = 4, 3
HERE = os.path.dirname(os.path.abspath(__file__))


# Not registered: the loading process rebuilds the layers from their
# exported computation.
def init_fn(rng, inputs):
    k1, k2 = jax.random.split(rng)
    params = {
        "hidden": {"w": jax.random.normal(k1, (IN, 8)) / 2, "b": jnp.zeros(8)},
        "out": {"w": jax.random.normal(k2, (8, OUT)) / 3},
    }
    return params, {"mean": jnp.zeros(IN)}


def call_fn(params, state, rng, inputs, training):
    h = jnp.tanh(
        (inputs - state["mean"]) @ params["hidden"]["w"] + params["hidden"]["b"]
    )
    if training:
        h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
        state = {"mean": 0.9 * state["mean"] + 0.1 * inputs.mean(0)}
    return h @ params["out"]["w"], state


def solve_init(rng, inputs):
    return {"a": jax.random.normal(rng, (IN, IN)) / 4}


def solve_call(params, inputs):
    # `jnp.linalg.solve` lowers to LAPACK's getrf on the CPU.
    a = params["a"] + 2 * jnp.eye(IN)
    return jnp.linalg.solve(a, inputs.T).T


def x_data(n=8):
    return np.random.default_rng(0).normal(size=(n, IN)).astype("float32")


def saved(path, call, init):
    inputs = keras.Input((IN,))
    layer = JaxLayer(call, init, seed=1, name="net")
    model = keras.Model(inputs, layer(inputs))
    model.predict(x_data(), verbose=0)
    model.save(path)
    return model


# -- crafting ------------------------------------------------------------------


def members(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write(path, files):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def artifact_name(files, kind):
    return next(n for n in files if n.endswith(f"/{kind}.jaxexport"))


def fix_manifests(files, change=None):
    """Recomputes every artifact's bytes and sha256 in both copies of the
    manifest (the config's and the assets'), then applies `change`."""

    def mend(manifest):
        for entry in manifest["functions"].values():
            blob = files[next(n for n in files if n.endswith("/" + entry["file"]))]
            entry["bytes"] = len(blob)
            entry["sha256"] = hashlib.sha256(blob).hexdigest()
        if change is not None:
            change(manifest)

    config = json.loads(files["config.json"])
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("exported"), dict):
                found.append(node["exported"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    assert found, "no manifest in the config"
    for manifest in found:
        mend(manifest)
    files["config.json"] = json.dumps(config).encode()
    name = next(n for n in files if n.endswith("/manifest.json"))
    manifest = json.loads(files[name])
    mend(manifest)
    files[name] = json.dumps(manifest).encode()


def edit_module(exp, edit):
    """`exp` with its MLIR text passed through `edit` (no VJP)."""
    from jax._src.export import _export
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    text = edit(exp.mlir_module())
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        blob = _export._module_to_bytecode(module)
    return dataclasses.replace(exp, mlir_module_serialized=blob, _get_vjp=None)


def in_main(lines):
    """An edit that adds `lines` to the `main` function, before its return."""

    def edit(text):
        start = text.index("func.func public @main")
        at = text.index("\n    return ", start)
        return text[:at] + "\n" + textwrap.indent(lines, "    ") + text[at:]

    return edit


# The second matrix argument of `main` (params[1], 4x8), for ops that need one.
MATRIX = "%arg2"
CALLBACK = (
    "stablehlo.custom_call @xla_ffi_python_cpu_callback() {api_version = 4 : "
    "i32, backend_config = {index = INDEX : ui64}, has_side_effect = true} : "
    "() -> ()"
)
GETRF = (
    f"%lu:3 = stablehlo.custom_call @lapack_sgetrf_ffi({MATRIX}) "
    "{api_version = 4 : i32, has_side_effect = true} : (tensor<4x8xf32>) -> "
    "(tensor<1x1xf32>, tensor<1xi32>, tensor<i32>)"
)
OUTFEED = (
    "%tk = stablehlo.create_token : !stablehlo.token\n"
    f'%tk2 = "stablehlo.outfeed"({MATRIX}, %tk) {{outfeed_config = ""}} : '
    "(tensor<4x8xf32>, !stablehlo.token) -> !stablehlo.token"
)
INFEED = (
    "%tk = stablehlo.create_token : !stablehlo.token\n"
    '%in:2 = "stablehlo.infeed"(%tk) {infeed_config = ""} : '
    "(!stablehlo.token) -> (tensor<3xf32>, !stablehlo.token)"
)


def crafted(base, out, kind, make):
    """A copy of `base` whose `kind` artifact is `make(exported)` serialized,
    with the manifests fixed."""
    files = members(base)
    name = artifact_name(files, kind)
    exp = jax.export.deserialize(bytearray(files[name]))
    files[name] = make(exp)
    fix_manifests(files)
    return write(out, files)


def with_module(edit, disable=False):
    def make(exp):
        new = edit_module(exp, edit)
        if disable:
            # A file may claim jax's checks were disabled for its target.
            check = jax.export.DisabledSafetyCheck.custom_call(
                "xla_ffi_python_cpu_callback"
            )
            new = dataclasses.replace(new, disabled_safety_checks=(check,))
        return bytes(new.serialize(vjp_order=0))

    return make


def in_vjp(edit):
    def make(exp):
        vjp = edit_module(exp.vjp(), edit)
        return bytes(
            dataclasses.replace(exp, _get_vjp=lambda _: vjp).serialize(vjp_order=1)
        )

    return make


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> path of each file to load (the legitimate ones and the
    crafted), and the legitimate model's predictions."""
    folder = tmp_path_factory.mktemp("crafted")
    base = str(folder / "base.keras")
    model = saved(base, call_fn, init_fn)
    x = x_data()
    marker = str(folder / "MARKER")
    pointer = str(id(exec))  # what an exploit would aim the index at
    paths = {"base": base}
    solver_y = None
    if BACKEND != "tensorflow":
        paths["solver"] = str(folder / "solver.keras")
        solver_y = saved(paths["solver"], solve_call, solve_init).predict(x, verbose=0)

    def add(name, kind, make):
        paths[name] = crafted(base, str(folder / f"{name}.keras"), kind, make)

    add("callback", "inference", with_module(in_main(CALLBACK.replace("INDEX", "0"))))
    add(
        "callback_pointer",
        "training",
        with_module(in_main(CALLBACK.replace("INDEX", pointer)), disable=True),
    )
    add("callback_in_vjp", "training", in_vjp(in_main(CALLBACK.replace("INDEX", "0"))))
    add("getrf", "inference", with_module(in_main(GETRF)))
    add("outfeed", "inference", with_module(in_main(OUTFEED)))
    add("infeed", "inference", with_module(in_main(INFEED)))

    def manifest_edit(name, change):
        copy = members(base)
        fix_manifests(copy, change)
        paths[name] = write(str(folder / f"{name}.keras"), copy)

    def wider(manifest):
        for entry in manifest["functions"].values():
            entry["outputs"]["leaf"]["shape"] = [None, OUT + 2]

    def half(manifest):
        for entry in manifest["functions"].values():
            entry["outputs"]["leaf"]["dtype"] = "float16"

    def variable(manifest):
        # The state's `mean` (Keras casts the weights file's values to it).
        (mean,) = [v for v in manifest["variables"] if v["name"] == "mean"]
        mean["dtype"] = "float16"

    manifest_edit("output_shape", wider)
    manifest_edit("output_dtype", half)
    manifest_edit("variable_dtype", variable)
    # A 250 MiB artifact of which a few KiB are its computation: a small
    # `.keras` file (zeros compress).
    copy = members(base)
    name = artifact_name(copy, "training")
    copy[name] = copy[name] + bytes(250 * 2**20)
    fix_manifests(copy)
    paths["padded"] = write(str(folder / "padded.keras"), copy)
    padded_bytes = len(copy[name])
    del copy
    return {
        "padded_bytes": padded_bytes,
        "paths": paths,
        "marker": marker,
        "x": x,
        "base": np.asarray(model.predict(x, verbose=0)),
        "solver": solver_y,
    }


RUNNER = """
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
import keras
import numpy as np
import jaxlayer
from jaxlayer import _artifact_check

asked, started = [], []
real = _artifact_check._verify
_artifact_check._verify = lambda *a: asked.append(1) or real(*a)
real_start = _artifact_check._Worker.__init__


def start(self):
    real_start(self)
    started.append(self._proc.pid)


_artifact_check._Worker.__init__ = start
x = np.load(sys.argv[1])
out = {}
for name, path in json.loads(sys.argv[2]).items():
    # What a case sets: `trusted_*` loads inside `allow_solver_kernels`,
    # `capped_*` under a tiny size cap, `unsafe_*` with `safe_mode=False`,
    # `late_*` and `slowparse_*` under tiny time limits (nothing cached).
    if name.startswith("capped"):
        os.environ["JAXLAYER_MAX_ARTIFACT_MIB"] = "0.001"
    if name.startswith(("late", "slowparse")):
        os.environ["JAXLAYER_CACHE_DIR"] += "-" + name
        _artifact_check._REPORTS.clear()
        setting = "LOAD" if name[0] == "l" else "PARSE"
        os.environ[f"JAXLAYER_{setting}_TIMEOUT"] = "0.001"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    asked.clear()
    started.clear()
    start_time = time.monotonic()
    try:
        if name.startswith("trusted"):
            with jaxlayer.allow_solver_kernels():
                model = keras.saving.load_model(path)
        else:
            model = keras.saving.load_model(
                path, safe_mode=not name.startswith("unsafe")
            )
        y = np.asarray(model.predict(x, verbose=0))
        out[name] = {"ok": True, "y": y.tolist()}
    except Exception as err:
        out[name] = {"ok": False, "type": type(err).__name__, "message": str(err)}
    out[name]["s"] = time.monotonic() - start_time
    for setting in ("MAX_ARTIFACT_MIB", "LOAD_TIMEOUT", "PARSE_TIMEOUT"):
        os.environ.pop("JAXLAYER_" + setting, None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out[name]["grew_kib"] = after - before
    out[name]["verified"] = len(asked)
    # The verifying processes this case started that still run.
    out[name]["alive"] = [p for p in started if os.path.exists(f"/proc/{p}")]
print("RESULT " + json.dumps(out))
"""


def load_in_fresh_process(paths, x, tmp, env=None, timeout=600):
    """Loads each file in a fresh process; name -> what happened."""
    np.save(os.path.join(tmp, "x.npy"), x)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, os.path.join(tmp, "x.npy"), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=tmp,
    )
    assert proc.returncode == 0, (
        f"the loading process ended with {proc.returncode}: {proc.stderr[-3000:]}"
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
    paths = dict(files["paths"])
    if "solver" in paths:
        paths["trusted_solver"] = paths["solver"]
    # The padded file first: the process's peak memory is still its own;
    # then `safe_mode=False` before any report of those files is cached.
    paths = {
        "padded": paths.pop("padded"),
        "unsafe_base": paths["base"],
        "unsafe_callback": paths["callback"],
        **paths,
        "capped_base": paths["base"],
        "late_base": paths["base"],
        "slowparse_base": paths["base"],
    }
    # One process loads them all (a fresh Keras process per backend), with
    # a cache of reports of its own.
    run = str(tmp_path_factory.mktemp("run"))
    return load_in_fresh_process(
        paths, files["x"], run, env={"JAXLAYER_CACHE_DIR": os.path.join(run, "c")}
    )


def refused(results, name, *words):
    got = results[name]
    assert not got["ok"], f"{name} loaded and predicted"
    assert got["type"] == "ValueError", got
    message = got["message"]
    assert "JaxLayer 'net'" in message and ".jaxexport" in message, message
    for word in words:
        assert word in message, message
    return message


def test_legitimate_files_load_and_predict(files, results):
    assert results["base"]["ok"], results["base"]
    assert results["base"]["verified"] == 1
    np.testing.assert_allclose(
        results["base"]["y"], files["base"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["callback", "callback_pointer", "callback_in_vjp"])
def test_a_python_callback_is_refused(files, results, name):
    message = refused(results, name, "xla_ffi_python_cpu_callback", "refused")
    if name == "callback_in_vjp":
        assert "VJP" in message
    assert not os.path.exists(files["marker"])


def test_a_solver_kernel_is_refused_unless_trusted(files, results):
    refused(results, "getrf", "lapack_sgetrf_ffi", "allow_solver_kernels")
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow's XLA has no handler for jax's LAPACK kernels")
    # A legitimate model that solves a linear system: refused by default too
    # (the loader cannot tell its shapes from a crafted file's), loaded and
    # right inside `allow_solver_kernels`.
    refused(results, "solver", "linear-algebra kernel `lapack_s")
    trusted = results["trusted_solver"]
    assert trusted["ok"], trusted
    np.testing.assert_allclose(trusted["y"], files["solver"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, op", [("outfeed", "outfeed"), ("infeed", "infeed")])
def test_a_host_transfer_is_refused(results, name, op):
    refused(results, name, f"stablehlo.{op}", "host-transfer")


@pytest.mark.parametrize("name", ["output_shape", "output_dtype", "variable_dtype"])
def test_a_manifest_that_lies_about_shapes_is_refused(results, name):
    refused(results, name, "does not match the layer saved with it")


def test_saved_artifacts_carry_no_path_of_the_saving_machine(files):
    blobs = [
        data
        for name, data in members(files["paths"]["base"]).items()
        if name.endswith(".jaxexport")
    ]
    assert blobs
    roots = {HERE, os.path.dirname(jax.__file__), os.path.expanduser("~")}
    for blob in blobs:
        assert b".py" not in blob
        for root in roots:
            assert root.encode() not in blob


def test_a_padded_artifact_is_refused_before_it_is_read(files, results):
    # The padded artifact is refused without the loader reading it whole.
    assert os.path.getsize(files["paths"]["padded"]) < 2 * 2**20
    message = refused(results, "padded", "not part of any computation")
    assert str(files["padded_bytes"]) in message
    # Refused from its flatbuffer's layout alone: no verifying process read it.
    assert results["padded"]["verified"] == 0
    # The loading process grew by much less than the artifact (ru_maxrss, KiB;
    # the bound docs/saving.md states: it reads 1 MiB at a time).
    assert results["padded"]["grew_kib"] < 32 * 1024, results["padded"]["grew_kib"]


@pytest.mark.parametrize(
    "name, words",
    [
        ("late_base", ["did not finish in 0.001 s", "JAXLAYER_LOAD_TIMEOUT"]),
        ("slowparse_base", ["parsing", "JAXLAYER_PARSE_TIMEOUT"]),
    ],
)
def test_a_load_past_its_deadline_is_refused_and_stopped(results, name, words):
    """The load's deadline (and the parse's, shorter) covers the verifying
    process's work: past it, a clear refusal, and the process is gone.
    (Tiny limits stand in for a parser that loops.)"""
    refused(results, name, "refused", *words)
    assert results[name]["s"] < 30, results[name]
    assert results[name]["alive"] == [], results[name]


def test_the_size_cap_is_checked_before_reading(results):
    refused(results, "capped_base", "JAXLAYER_MAX_ARTIFACT_MIB")
    assert results["capped_base"]["verified"] == 0


def test_safe_mode_false_skips_the_child_but_not_the_checks(files, results):
    unsafe = results["unsafe_base"]
    assert unsafe["ok"], unsafe
    np.testing.assert_allclose(unsafe["y"], files["base"], rtol=1e-5, atol=1e-5)
    assert "xla_ffi_python_cpu_callback" in refused(results, "unsafe_callback")
    assert unsafe["verified"] == results["unsafe_callback"]["verified"] == 0


def test_a_verified_file_is_not_verified_twice(files, tmp_path, monkeypatch):
    from jaxlayer import _artifact_check

    monkeypatch.setenv("JAXLAYER_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    real = _artifact_check._verify

    def counting(*args, **kwargs):
        runs.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_artifact_check, "_verify", counting)
    monkeypatch.setattr(_artifact_check, "_REPORTS", {})
    first = keras.saving.load_model(files["paths"]["base"])
    assert len(runs) == 1
    monkeypatch.setattr(_artifact_check, "_REPORTS", {})  # a new process: disk
    second = keras.saving.load_model(files["paths"]["base"])
    assert len(runs) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(first(files["x"])),
        keras.ops.convert_to_numpy(second(files["x"])),
        rtol=1e-6,
    )


def test_one_verifying_process_serves_many_loads(files, tmp_path, monkeypatch):
    """Loads in one process share a verifying process (its `import jax` is
    most of a first load's cost); one that went idle is replaced."""
    from jaxlayer import _artifact_check

    started = []

    class Counted(_artifact_check._Worker):
        def __init__(self):
            started.append(1)
            super().__init__()

    monkeypatch.setattr(_artifact_check, "_Worker", Counted)
    monkeypatch.setattr(_artifact_check, "_WORKER", None)
    # Long enough for the second load to come within it on a busy machine
    # (3 s was not, with four backends' suites on two cores).
    monkeypatch.setenv("JAXLAYER_VERIFY_IDLE", "10")
    monkeypatch.setattr(_artifact_check, "_REPORTS", {})
    monkeypatch.setenv("JAXLAYER_CACHE_DIR", str(tmp_path / "cache"))
    model = keras.saving.load_model(files["paths"]["base"])
    with pytest.raises(ValueError, match="xla_ffi_python_cpu_callback"):
        keras.saving.load_model(files["paths"]["callback"])
    assert len(started) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(files["x"])), files["base"], rtol=1e-5
    )
    # Idle past `_IDLE_S`: it exits by itself, and the next load starts one.
    monkeypatch.setattr(_artifact_check, "_REPORTS", {})
    monkeypatch.setenv("JAXLAYER_CACHE_DIR", str(tmp_path / "cache2"))
    worker = _artifact_check._WORKER
    waited = time.monotonic()
    while worker._proc.poll() is None and time.monotonic() - waited < 60:
        time.sleep(0.2)
    assert worker._proc.poll() == 0
    keras.saving.load_model(files["paths"]["base"])
    assert len(started) == 2
    _artifact_check._WORKER.stop()


# Random corruption: tests/test_load_fuzz.py.


@pytest.mark.skipif(BACKEND != "jax", reason="pure JAX: one backend suffices")
def test_every_vjp_an_artifact_holds_is_checked_or_it_is_refused(tmp_path):
    """A file whose VJP chain goes beyond the orders the check walks is
    refused, so that no module in it (one only a high-order gradient would
    run) escapes the checks; up to that order every level is described."""
    from jaxlayer import _artifact_check

    exp = jax.export.export(jax.jit(jnp.sin))(jax.ShapeDtypeStruct((3,), "float32"))
    top = _artifact_check._MAX_VJP_ORDER
    for order, ok in ((top, True), (top + 1, False)):
        path = tmp_path / f"order{order}.bin"
        path.write_bytes(exp.serialize(vjp_order=order))
        if ok:
            report = _artifact_check.describe_here(str(path))
            assert len(report["modules"]) == top + 1
        else:
            with pytest.raises(ValueError, match=f"beyond order {top}"):
                _artifact_check.describe_here(str(path))
