"""What load safety adds to loading a `.keras` file that runs its saved
computation (the benchmark MLP, 64-256-256-10, its function not registered).

Usage, from the repository root:

    python -m benchmarks.load                 # jax backend, 3 rounds
    python -m benchmarks.load --backend torch --rounds 5
    python -m benchmarks.load --write         # the checked-in copy

Each figure is one `keras.saving.load_model` (and then the first `predict`,
which compiles) in a fresh process, timed inside it; the min over rounds,
the three settings interleaved in each round:

- `safe_mode=False`: the artifacts are deserialized in the loading process
  with no verifying child (what loading cost before the checks, plus the
  policy checks, which take microseconds);
- `safe_mode=True`, nothing cached: a child process verifies the artifacts
  first (it imports jax: most of its cost);
- `safe_mode=True`, cached: the same file again, its report read from the
  cache folder (what every later load of a file costs);
- `safe_mode=True`, another file: a second file (another function, nothing
  cached) loaded by a process that has just loaded the first: the verifying
  child started for the first serves it (what each further layer or model
  costs).

The report is printed and written to `benchmarks/out/load.md` (git-ignored);
`--write` writes `benchmarks/results-load.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = Path(__file__).with_name("results-load.md")
DEFAULT_OUTPUT = Path(__file__).parent / "out" / "load.md"

_SAVE = """
import sys
sys.path.insert(0, {root!r})
import jax, keras, numpy as np
from jaxlayer import JaxLayer
from benchmarks import _workloads as W

layer = JaxLayer(lambda params, inputs: W.mlp_apply(params, inputs) * {scale},
                 params=W.mlp_init(jax.random.key(0)))
model = keras.Sequential([keras.Input((64,)), layer])
model.predict(np.zeros((4, 64), "float32"), verbose=0)
model.save({path!r})
"""

_LOAD = """
import json, time, warnings
warnings.simplefilter("ignore")
import keras, numpy as np
import jaxlayer
start = time.perf_counter()
model = keras.saving.load_model({path!r}, safe_mode={safe})
loaded = time.perf_counter()
model.predict(np.zeros((128, 64), "float32"), verbose=0)
done = time.perf_counter()
print("RESULT " + json.dumps([loaded - start, done - start]))
"""

_LOAD_SECOND = """
import json, time, warnings
warnings.simplefilter("ignore")
import keras, numpy as np
import jaxlayer
keras.saving.load_model({first!r})
start = time.perf_counter()
model = keras.saving.load_model({path!r})
loaded = time.perf_counter()
model.predict(np.zeros((128, 64), "float32"), verbose=0)
done = time.perf_counter()
print("RESULT " + json.dumps([loaded - start, done - start]))
"""


def _run(script: str, env: dict) -> list[float] | None:
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(_ROOT),
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def measure(backend: str, rounds: int) -> dict:
    """Per setting, the min over `rounds` of (load, load + first predict)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.keras")
        other = os.path.join(tmp, "other.keras")
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        _run(_SAVE.format(root=str(_ROOT), path=path, scale=1.0), env)
        _run(_SAVE.format(root=str(_ROOT), path=other, scale=2.0), env)
        times: dict = {
            "safe_mode=False": [],
            "verified": [],
            "cached": [],
            "second": [],
        }
        for i in range(rounds):
            cache = os.path.join(tmp, f"cache{i}")
            run_env = dict(env, JAXLAYER_CACHE_DIR=cache)
            times["safe_mode=False"].append(
                _run(_LOAD.format(path=path, safe=False), run_env)
            )
            times["verified"].append(_run(_LOAD.format(path=path, safe=True), run_env))
            times["cached"].append(_run(_LOAD.format(path=path, safe=True), run_env))
            fresh = dict(env, JAXLAYER_CACHE_DIR=os.path.join(tmp, f"second{i}"))
            times["second"].append(
                _run(_LOAD_SECOND.format(first=path, path=other), fresh)
            )
    return {
        key: [min(t[0] for t in rows), min(t[1] for t in rows)]
        for key, rows in times.items()
    }


def render(backend: str, rounds: int, result: dict) -> str:
    base = result["safe_mode=False"]
    lines = [
        f"# Loading a portable `.keras` file: the MLP ({backend} backend, "
        f"min of {rounds} fresh processes)",
        "",
        "| setting | load_model (s) | + first predict (s) | added to load_model |",
        "| --- | --- | --- | --- |",
    ]
    names = {
        "safe_mode=False": "`safe_mode=False` (no verifying child)",
        "verified": "`safe_mode=True`, first load (verified in a child)",
        "cached": "`safe_mode=True`, later loads (report cached)",
        "second": "`safe_mode=True`, another file after a first (child reused)",
    }
    for key, (load, total) in result.items():
        lines.append(
            f"| {names[key]} | {load:.3f} | {total:.3f} | {load - base[0]:+.3f} |"
        )
    return "\n".join(lines) + "\n"


# -- save time (issue 30) ------------------------------------------------------
# `python -m benchmarks.load --save`: what a default `model.save` of the MLP
# costs (every extra installed, jax2onnx included: the ONNX form is opt-in)
# beside a native Keras save of the same weights (Dense layers) plus the
# `jax.export` serialization a portable file holds (the function exported
# for inference and training, with first-order VJPs); and, for scale, the
# opt-in ONNX form (`JAXLAYER_SAVE_ONNX=1`). Each figure is timed inside a
# fresh process: the first save there, then a second one.

_SAVE_JAXLAYER = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import jax, keras, numpy as np
from jaxlayer import JaxLayer
from benchmarks import _workloads as W

layer = JaxLayer(W.mlp_apply, params=W.mlp_init(jax.random.key(0)))
model = keras.Sequential([keras.Input((64,)), layer])
model.predict(np.zeros((4, 64), "float32"), verbose=0)
t0 = time.perf_counter()
model.save({path!r})
t1 = time.perf_counter()
model.save({path!r})
t2 = time.perf_counter()
print("RESULT " + json.dumps([t1 - t0, t2 - t1]))
"""

_SAVE_NATIVE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, keras, numpy as np
from benchmarks import _workloads as W

params = W.mlp_init(jax.random.key(0))
leaves = jax.tree_util.tree_leaves(params)
model = W.mlp_native()  # the same layers and weight shapes
model.predict(np.zeros((4, 64), "float32"), verbose=0)
specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
(batch,) = jax.export.symbolic_shape("batch")
x_spec = jax.ShapeDtypeStruct((batch, 64), jnp.float32)

def fn(flat, x):
    return W.mlp_apply(jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), flat), x)

times = []
for _ in range(2):
    t0 = time.perf_counter()
    model.save({path!r})
    t1 = time.perf_counter()
    # What a portable file adds: the function for both training flags.
    for _ in range(2):
        exp = jax.export.export(jax.jit(fn))(specs, x_spec)
        exp.serialize(vjp_order=1)
    t2 = time.perf_counter()
    times.append([t1 - t0, t2 - t1])
print("RESULT " + json.dumps(times))
"""


def measure_save(backend: str, rounds: int, onnx: bool = True) -> dict:
    """The min over `rounds` fresh processes of each save time (s)."""
    root = str(_ROOT)
    rows: dict = {"native": [], "jaxlayer": [], "jaxlayer+onnx": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("JAXLAYER_SAVE_ONNX", None)
        for _ in range(rounds):
            rows["native"].append(_run(_SAVE_NATIVE.format(root=root, path=path), env))
            rows["jaxlayer"].append(
                _run(_SAVE_JAXLAYER.format(root=root, path=path), env)
            )
            if onnx:
                rows["jaxlayer+onnx"].append(
                    _run(
                        _SAVE_JAXLAYER.format(root=root, path=path),
                        dict(env, JAXLAYER_SAVE_ONNX="1"),
                    )
                )
    out = {}
    native = rows.pop("native")
    out["native save"] = [min(r[0][0] for r in native), min(r[1][0] for r in native)]
    out["jax.export serialization"] = [
        min(r[0][1] for r in native),
        min(r[1][1] for r in native),
    ]
    for key, values in rows.items():
        if values:
            out[key] = [min(v[0] for v in values), min(v[1] for v in values)]
    return out


def render_save(backend: str, rounds: int, result: dict) -> str:
    reference = [
        a + b
        for a, b in zip(
            result["native save"], result["jax.export serialization"], strict=True
        )
    ]
    names = {
        "native save": "native Keras save (Dense, same weights)",
        "jax.export serialization": "`jax.export` serialization (both flags)",
        "jaxlayer": "jaxlayer `model.save`, default (every extra installed)",
        "jaxlayer+onnx": "jaxlayer `model.save`, `JAXLAYER_SAVE_ONNX=1`",
    }
    lines = [
        f"# Saving the MLP (64-256-256-10, {backend} backend, min of {rounds} "
        "fresh processes)",
        "",
        "Reference: native save + `jax.export` serialization = "
        f"{reference[0]:.3f} s (first save in a process), {reference[1]:.3f} s "
        "(second).",
        "",
        "| save | first in process (s) | second (s) | first / reference |",
        "| --- | --- | --- | --- |",
    ]
    for key, (first, second) in result.items():
        lines.append(
            f"| {names[key]} | {first:.3f} | {second:.3f} | "
            f"{first / reference[0]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser("python -m benchmarks.load", description=__doc__)
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--save", action="store_true", help="save times instead")
    parser.add_argument("--no-onnx", action="store_true", help="with --save")
    args = parser.parse_args(argv)
    if args.save:
        text = render_save(
            args.backend,
            args.rounds,
            measure_save(args.backend, args.rounds, not args.no_onnx),
        )
        output = DEFAULT_OUTPUT.with_name("save.md")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(text)
        return text
    text = render(args.backend, args.rounds, measure(args.backend, args.rounds))
    output = CHECKED_IN if args.write else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
