"""Fixed against rotating input shapes: what a stream of new shapes costs,
jaxlayer beside the same model in native Keras layers, on every backend.

Usage, from the repository root:

    python -m benchmarks.shapes                       # every backend
    python -m benchmarks.shapes --backend torch --quick
    python -m benchmarks.shapes --write               # the checked-in copy

Two models, each as a `jaxlayer.JaxLayer` and in native Keras layers with
the same parameters' shapes, called with `predict_on_batch` and
`train_on_batch` (Adam, sparse softmax cross-entropy):

- `mlp`: the fit benchmark's 64-256-256-10 MLP; the batch size rotates
  through 64 distinct sizes (65 to 128).
- `text`: a text-like model (embedding 1000x64, a tanh projection, a mean
  over the sequence, a 10-way head) on int32 token ids of a batch of 16;
  the sequence length rotates through 32 distinct lengths (17 to 48), the
  input `keras.Input((None,))`.

For each, after a warm-up that has seen every shape once (what a first
epoch does), the mean milliseconds per call over whole cycles: `fixed` at
one shape (the largest), `rotating` through all of them, the min over
rounds. `rotating / fixed` is what the rotation costs; `vs native` compares
jaxlayer's rotating figure with native Keras's. Targets: rotating at most
3x fixed, and at most 1.5x native doing the same.

Each backend runs in its own process (`KERAS_BACKEND` set before Keras is
imported); numpy has no training, so only `predict_on_batch` there. The
report is printed and written to `benchmarks/out/shapes.md` (git-ignored);
`--write` writes `benchmarks/results-shapes.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(_ROOT))

BACKENDS = ("jax", "tensorflow", "torch", "numpy")
CHECKED_IN = Path(__file__).with_name("results-shapes.md")
DEFAULT_OUTPUT = Path(__file__).parent / "out" / "shapes.md"
#: Per model: the rotated sizes (batch for `mlp`, length for `text`).
SIZES = {"mlp": list(range(65, 129)), "text": list(range(17, 49))}
QUICK_SIZES = {"mlp": [3, 4], "text": [3, 4]}
TEXT_BATCH = 16
VOCAB = 1000
WIDTH = 64
TARGET_FIXED = 3.0
TARGET_NATIVE = 1.5


# -- the text model -------------------------------------------------------------


def text_init(key):
    """Parameters of the text model: embedding, projection, head."""
    import jax

    from benchmarks import _workloads as W

    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (VOCAB, WIDTH)) * 0.05,
        "proj": W._dense_init(k2, WIDTH, WIDTH),
        "head": W._dense_init(k3, WIDTH, W.NUM_CLASSES),
    }


def text_apply(params, inputs):
    """Logits of int token ids `(batch, length)`: embed, tanh projection,
    mean over the sequence, linear head."""
    import jax.numpy as jnp

    from benchmarks import _workloads as W

    x = jnp.take(params["embed"], inputs, axis=0)
    x = jnp.tanh(W._dense(params["proj"], x))
    return W._dense(params["head"], x.mean(axis=1))


def text_native():
    """The text model in native Keras layers."""
    import keras

    from benchmarks import _workloads as W

    return keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(VOCAB, WIDTH),
            keras.layers.Dense(WIDTH, activation="tanh"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(W.NUM_CLASSES),
        ]
    )


# -- measuring (in the backend's own process) ------------------------------------


def _models(name):
    """`{"jaxlayer": model, "native": model}` for one model, compiled."""
    import jax
    import keras

    import jaxlayer
    from benchmarks import _workloads as W

    if name == "mlp":
        init, apply, native, shape, dtype = (
            W.mlp_init,
            W.mlp_apply,
            W.mlp_native,
            (64,),
            "float32",
        )
    else:
        init, apply, native, shape, dtype = (
            text_init,
            text_apply,
            text_native,
            (None,),
            "int32",
        )
    layer = jaxlayer.JaxLayer(apply, params=init(jax.random.key(0)), name="jax_model")
    models = {
        "jaxlayer": keras.Sequential([keras.Input(shape, dtype=dtype), layer]),
        "native": native(),
    }
    if keras.backend.backend() != "numpy":
        for model in models.values():
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
    return models


def _batches(name, sizes):
    """Per size, one `(x, y)` batch of that shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        if name == "mlp":
            x = rng.normal(size=(n, 64)).astype("float32")
            y = rng.integers(0, 10, n).astype("int32")
        else:
            x = rng.integers(0, VOCAB, (TEXT_BATCH, n)).astype("int32")
            y = rng.integers(0, 10, TEXT_BATCH).astype("int32")
        out.append((x, y))
    return out


def _per_call_ms(f, batches, cycles):
    start = time.perf_counter()
    for _ in range(cycles):
        for x, y in batches:
            f(x, y)
    return 1e3 * (time.perf_counter() - start) / (cycles * len(batches))


def measure(names, rounds, quick=False) -> list[dict]:
    """Rows `{model, call, contender, fixed, rotating, warm_up}` (ms/call)."""
    import keras

    calls = ["predict_on_batch"]
    if keras.backend.backend() != "numpy":
        calls.append("train_on_batch")
    rows = []
    for name in names:
        sizes = (QUICK_SIZES if quick else SIZES)[name]
        batches = _batches(name, sizes)
        fixed = [batches[-1]] * len(batches)
        for contender, model in _models(name).items():
            for call in calls:
                if call == "predict_on_batch":

                    def f(x, y, model=model):
                        model.predict_on_batch(x)

                else:

                    def f(x, y, model=model):
                        model.train_on_batch(x, y)

                # Warm-up: every shape once (the compiles), then once more.
                warm_up = _per_call_ms(f, batches, 1)
                _per_call_ms(f, batches, 1)
                times = {"fixed": [], "rotating": []}
                for _ in range(rounds):
                    times["fixed"].append(_per_call_ms(f, fixed, 1))
                    times["rotating"].append(_per_call_ms(f, batches, 1))
                rows.append(
                    {
                        "model": name,
                        "sizes": len(sizes),
                        "call": call,
                        "contender": contender,
                        "warm_up": warm_up,
                        "fixed": min(times["fixed"]),
                        "rotating": min(times["rotating"]),
                    }
                )
    return rows


# -- the report --------------------------------------------------------------------


def render(results: dict) -> str:
    """The markdown report of `{backend: rows or error}`."""
    lines = [
        "# Fixed against rotating input shapes",
        "",
        f"{datetime.date.today().isoformat()}; ms per call, min over rounds, after a "
        "warm-up cycle through every shape. `mlp`: batch sizes 65-128 (64 "
        f"sizes); `text`: batch {TEXT_BATCH}, sequence lengths 17-48 (32 "
        f"lengths). Targets: rotating <= {TARGET_FIXED:g}x fixed, jaxlayer "
        f"rotating <= {TARGET_NATIVE:g}x native rotating.",
        "",
        "| backend | model | call | contender | first cycle | fixed | rotating "
        "| rotating / fixed | vs native (rotating) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, rows in results.items():
        if isinstance(rows, str):
            lines.append(f"| {backend} | error: {rows} | | | | | | | |")
            continue
        native = {
            (r["model"], r["call"]): r["rotating"]
            for r in rows
            if r["contender"] == "native"
        }
        for r in rows:
            ratio = r["rotating"] / r["fixed"]
            vs = (
                f"{r['rotating'] / native[r['model'], r['call']]:.2f}x"
                if r["contender"] == "jaxlayer"
                else ""
            )
            lines.append(
                f"| {backend} | {r['model']} | {r['call']} | {r['contender']} "
                f"| {r['warm_up']:.2f} | {r['fixed']:.2f} | {r['rotating']:.2f} "
                f"| {ratio:.2f}x | {vs} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser("python -m benchmarks.shapes", description=__doc__)
    parser.add_argument("--backend", default="all", choices=(*BACKENDS, "all"))
    parser.add_argument("--models", default="mlp,text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few sizes, one round")
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--json",
        help="measure in this process (KERAS_BACKEND already set to --backend) "
        "and write the raw rows here; what each backend's subprocess is given.",
    )
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in SIZES]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(SIZES)}")
    if args.quick:
        args.rounds = 1
    return args


def _in_subprocess(backend, args) -> list[dict] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        argv = [
            sys.executable,
            "-m",
            "benchmarks.shapes",
            "--backend",
            backend,
            "--models",
            ",".join(args.models),
            "--rounds",
            str(args.rounds),
            "--json",
            out,
        ]
        if args.quick:
            argv.append("--quick")
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            argv, cwd=str(_ROOT), env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            return proc.stderr.strip().splitlines()[-1][:200]
        return json.loads(Path(out).read_text())


def main(argv=None) -> dict:
    """Runs the benchmark; returns `{backend: rows or error}`."""
    args = parse_args(argv)
    if args.json:
        rows = measure(args.models, args.rounds, args.quick)
        Path(args.json).write_text(json.dumps(rows))
        return {args.backend: rows}
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    results = {b: _in_subprocess(b, args) for b in backends}
    text = render(results)
    output = CHECKED_IN if args.write else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
