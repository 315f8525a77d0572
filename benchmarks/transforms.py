"""What a weight transform costs inside the layer's JAX function: a LoRA
fit step and an int8 predict step, beside the plain layer's.

Usage, from the repository root:

    python -m benchmarks.transforms                  # current KERAS_BACKEND
    python -m benchmarks.transforms --quick          # a smoke run
    KERAS_BACKEND=torch python -m benchmarks.transforms --rounds 7

For each workload (`mlp`, `cnn` of `benchmarks._workloads`), four models
built from the same parameters: the plain `JaxLayer` and one with
`enable_lora(8)` (timed: one `train_on_batch`, Adam), the plain one and one
after `quantize("int8")` (timed: one `predict_on_batch`). Timed in rounds,
round robin, after a warm-up (compilation); the min over rounds and the
ratio of the transformed model's min to the plain one's are reported.

The report is printed and written to `benchmarks/out/transforms.md`
(git-ignored); `--output PATH` writes it elsewhere (`-`: nowhere).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

DEFAULT_OUTPUT = Path(__file__).parent / "out" / "transforms.md"
RANK = 8


def _model(workload, params, transform=None):
    import keras

    from jaxlayer import JaxLayer

    def call_fn(params, inputs):
        return workload.apply(params, inputs)

    layer = JaxLayer(call_fn, params=params, name=workload.name)
    inputs = keras.Input(workload.input_shape)
    model = keras.Model(inputs, layer(inputs))
    if transform == "lora":
        layer.enable_lora(RANK)
    elif transform == "int8":
        model.quantize("int8")
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def measure(workload_name: str, rounds: int, batches: int) -> list[dict]:
    """The rows of one workload: per step, the plain and transformed mins."""
    import warnings

    import jax

    from benchmarks import _workloads as W

    workload = W.WORKLOADS[workload_name]
    params = workload.init(jax.random.key(0))
    x, y = workload.data(batches)
    b = workload.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the InputLayer's quantize warning
        models = {
            "plain": _model(workload, params),
            "lora": _model(workload, params, "lora"),
            "int8": _model(workload, params, "int8"),
        }
    steps = {
        "fit: plain": lambda: models["plain"].train_on_batch(x[:b], y[:b]),
        "fit: LoRA": lambda: models["lora"].train_on_batch(x[:b], y[:b]),
        "predict: plain": lambda: models["plain"].predict_on_batch(x[:b]),
        "predict: int8": lambda: models["int8"].predict_on_batch(x[:b]),
    }
    for step in steps.values():  # compile
        step()
        step()
    times: dict = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(batches):
                step()
            times[name].append((time.perf_counter() - start) / batches * 1e3)
    best = {name: min(t) for name, t in times.items()}
    return [
        {
            "workload": workload_name,
            "step": kind,
            "plain": best[f"{kind}: plain"],
            "transformed": best[f"{kind}: {label}"],
            "label": label,
        }
        for kind, label in (("fit", "LoRA"), ("predict", "int8"))
    ]


def report(rows: list[dict], backend: str) -> str:
    lines = [
        f"# Weight transforms: cost inside the pure function ({backend})",
        "",
        "| workload | step | plain (ms) | transformed (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['step']} ({r['label']}) | {r['plain']:.3g} "
            f"| {r['transformed']:.3g} | {r['transformed'] / r['plain']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.rounds, args.batches = "mlp", 2, 2
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import keras

    rows = []
    for name in args.workloads.split(","):
        rows.extend(measure(name, args.rounds, args.batches))
    text = report(rows, keras.backend.backend())
    print(text)
    if args.output != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        Path(args.output).write_text(text)
    return rows


if __name__ == "__main__":
    main()
