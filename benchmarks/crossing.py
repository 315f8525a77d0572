"""Where the time of one layer call goes: XLA's math, the bridge, the layer,
Keras -- a profile table per backend, measured side by side.

Usage, from the repository root:

    python -m benchmarks.crossing                      # tensorflow and torch
    python -m benchmarks.crossing --backend torch --workloads mlp
    python -m benchmarks.crossing --write              # the checked-in copy

`benchmarks.fit_step` compares whole training steps; this one takes one call
apart, so that a ratio there can be traced to its cause. For each workload,
on the batch of the fit benchmark, it times a forward (no gradient) and a
forward with the gradient of every parameter (the sum of the outputs as the
loss), each as the min over interleaved rounds of the mean over many calls:

- `jax.jit` on JAX arrays: XLA's math as JAX compiles it, plus JAX's
  dispatch; what no bridge can go below.
- torch: `bridge.run` (the DLPack crossing and the autograd rule, on the
  layer's pure function), `layer.call` (the layer's own Python on top),
  `layer(x)` (Keras's `Layer.__call__` on top), and the same model in native
  Keras layers called the same way.
- tensorflow: `layer(x)` inside a `tf.function` (Keras's default for `fit`
  and `predict`: the `XlaCallModule` ops among TensorFlow's graph), the
  native model the same way, and an empty `tf.function` (TensorFlow's own
  cost of one graph call, part of both).

Each backend runs in its own process (`KERAS_BACKEND` set before Keras is
imported). The report is printed and written to `benchmarks/out/crossing.md`
(git-ignored); `--write` writes `benchmarks/results-crossing.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(_ROOT))

BACKENDS = ("tensorflow", "torch")
CHECKED_IN = Path(__file__).with_name("results-crossing.md")
DEFAULT_OUTPUT = Path(__file__).parent / "out" / "crossing.md"


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    from benchmarks.fit_step import parse_profile_args, profile_parser

    parser = profile_parser(
        "python -m benchmarks.crossing",
        __doc__,
        rounds=5,
        seconds=0.25,
        json_help="measure in this process (KERAS_BACKEND already set to "
        "--backend) and write the raw rows here; what each backend's "
        "subprocess is given.",
    )
    parser.add_argument("--backend", default="all", choices=(*BACKENDS, "all"))
    return parse_profile_args(parser, argv, CHECKED_IN, DEFAULT_OUTPUT)


def _timer(seconds):
    """`time_us(f)`: the mean microseconds per call of `f` over a batch of
    calls lasting about `seconds` (the batch size is fixed on first use)."""
    sizes = {}

    def time_us(name, f):
        n = sizes.get(name)
        if n is None:
            f()
            start = time.perf_counter()
            f()
            once = max(time.perf_counter() - start, 1e-6)
            n = sizes[name] = max(3, int(seconds / once))
        start = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - start) / n * 1e6

    return time_us


def _contenders(backend, workload):
    """`{(row, "fwd" | "grad"): f}`: the calls to time, each blocking."""
    import jax
    import keras

    import jaxlayer

    params = workload.init(jax.random.key(0))
    x_np, _ = workload.data(1)

    def call_fn(params, inputs):
        return workload.apply(params, inputs)

    layer = jaxlayer.JaxLayer(call_fn, params=params)
    native = workload.native()
    x = keras.ops.convert_to_tensor(x_np)
    layer(x)
    native(x)

    x_jax = jax.numpy.asarray(x_np)
    forward = jax.jit(workload.apply)
    grad = jax.jit(jax.grad(lambda p, x: workload.apply(p, x).sum()))
    calls = {
        ("jax.jit on JAX arrays (XLA's math)", "fwd"): lambda: forward(
            params, x_jax
        ).block_until_ready(),
        ("jax.jit on JAX arrays (XLA's math)", "grad"): lambda: jax.block_until_ready(
            grad(params, x_jax)
        ),
    }
    if backend == "torch":
        calls.update(_torch_calls(layer, native, x))
    else:
        calls.update(_tf_calls(layer, native, x))
    return calls


def _torch_calls(layer, native, x):
    import torch

    from jaxlayer.bridges import torch as bridge

    (fn,) = layer._pure_fns.values()
    params = [v.value for v in layer.trainable_variables]
    native_params = [v.value for v in native.trainable_variables]

    def no_grad(f):
        def call():
            with torch.no_grad():
                f()

        return call

    def with_grad(f, ps):
        def call():
            f().sum().backward()
            for p in ps:
                p.grad = None

        return call

    def run():
        return bridge.run(fn, params, [x], [], [])[0][0]

    rows = {
        "bridge.run (DLPack + autograd rule)": run,
        "layer.call (+ the layer's Python)": lambda: layer.call(x),
        "layer(x) (+ Keras's Layer.__call__)": lambda: layer(x),
    }
    calls = {}
    for name, f in rows.items():
        calls[name, "fwd"] = no_grad(f)
        calls[name, "grad"] = with_grad(f, params)
    calls["native Keras model(x)", "fwd"] = no_grad(lambda: native(x))
    calls["native Keras model(x)", "grad"] = with_grad(lambda: native(x), native_params)
    return calls


def _tf_calls(layer, native, x):
    import tensorflow as tf

    def fwd(model):
        f = tf.function(lambda x: model(x))
        return lambda: f(x).numpy()

    def grad(model):
        @tf.function
        def f(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x))
            return tape.gradient(loss, model.trainable_variables)

        return lambda: [g.numpy() for g in f(x)]

    empty = tf.function(lambda x: x)
    return {
        ("layer(x) in a tf.function (XlaCallModule ops)", "fwd"): fwd(layer),
        ("layer(x) in a tf.function (XlaCallModule ops)", "grad"): grad(layer),
        ("native Keras model(x) in a tf.function", "fwd"): fwd(native),
        ("native Keras model(x) in a tf.function", "grad"): grad(native),
        ("empty tf.function (TF's cost per graph call)", "fwd"): lambda: empty(x),
    }


def run_backend(args) -> dict:
    """Times every workload on the current backend; returns the rows."""
    import keras

    from benchmarks._workloads import WORKLOADS

    backend = keras.backend.backend()
    out = {"backend": backend, "workloads": []}
    for name in args.workloads:
        workload = WORKLOADS[name]
        time_us = _timer(args.seconds)  # batch sizes fixed per workload
        print(f"[{backend}] {name}", file=sys.stderr, flush=True)
        calls = _contenders(backend, workload)
        best = {}
        for _ in range(args.rounds):
            for key, f in calls.items():
                t = time_us(key, f)
                best[key] = min(best.get(key, t), t)
        rows = list(dict.fromkeys(row for row, _ in calls))
        out["workloads"].append(
            {
                "name": name,
                "description": workload.description,
                "rows": [
                    (r, best.get((r, "fwd")), best.get((r, "grad"))) for r in rows
                ],
            }
        )
        keras.backend.clear_session()
    return out


def render(runs, args) -> str:
    """The markdown report."""
    from benchmarks._report import _environment
    from benchmarks.fit_step import _load, _machine, _tuning, _versions

    machine = _machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Where one layer call's time goes",
        "",
        "Generated by `python -m benchmarks.crossing` (`--write` for this "
        "file). Do not edit by hand.",
        "",
        f"- date: {now.isoformat(timespec='seconds')}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        f"- settings: min over {args.rounds} interleaved rounds of the mean of "
        f"~{args.seconds} s of calls; load average after: {_load()}",
        f"- environment: {_environment(_tuning())}",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        "Microseconds per call, one batch of the fit benchmark's workload. "
        "`fwd`: no gradient. `fwd+grad`: the forward and the gradient of every "
        "parameter (loss: the sum of the outputs). Each row includes the rows "
        "above it where it says `+`; `vs XLA` is the row over `jax.jit` on "
        "JAX arrays.",
        "",
    ]
    for run in runs:
        lines += [f"## {run['backend']} backend", ""]
        if "error" in run:
            lines += [f"failed: {run['error']}", ""]
            continue
        lines += [
            "| workload | call | fwd us | vs XLA | fwd+grad us | vs XLA |",
            "|---|---|---|---|---|---|",
        ]
        for w in run["workloads"]:
            base = w["rows"][0]
            for row, fwd, grad in w["rows"]:
                lines.append(
                    f"| {w['name']} | {row} | {_us(fwd)} | {_vs(fwd, base[1])} | "
                    f"{_us(grad)} | {_vs(grad, base[2])} |"
                )
        lines.append("")
    workloads = {
        w["name"]: w["description"] for r in runs for w in r.get("workloads", [])
    }
    lines += ["## Workloads", ""]
    lines += [f"- `{name}`: {desc}" for name, desc in workloads.items()]
    lines.append("")
    return "\n".join(lines)


def _us(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def _vs(x, base) -> str:
    return "—" if x is None or not base else f"{x / base:.2f}x"


def main(argv=None):
    """Runs the profile per backend (a subprocess each) and writes the report."""
    from benchmarks.fit_step import in_subprocess, write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.json:
        result = run_backend(args)
        Path(args.json).write_text(json.dumps(result))
        return result
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    settings = ["--workloads", ",".join(args.workloads), "--rounds", str(args.rounds)]
    settings += ["--seconds", str(args.seconds)]
    runs = [in_subprocess("benchmarks.crossing", b, settings) for b in backends]
    write_report(render(runs, args), args.output)
    return runs


if __name__ == "__main__":
    main()
