"""Training and inference cost of `jaxlayer.JaxLayer` against pure JAX and
native Keras, measured side by side.

Usage, from the repository root (`pip install -e ".[all]"` or `".[bench]"`
plus the backends to measure):

    python -m benchmarks.fit_step --backend jax
    python -m benchmarks.fit_step --backend all      # each backend in turn
    python -m benchmarks.fit_step --quick            # a smoke run, < 1 min each
    python -m benchmarks.fit_step --backend all --runs 3 --write  # checked in

From any other directory: `python /path/to/jaxlayer/benchmarks/fit_step.py`
(or `PYTHONPATH=/path/to/jaxlayer python -m benchmarks.fit_step`).

For each Keras backend (one process per backend, `KERAS_BACKEND` set before
Keras is imported) and each workload (`mlp`, `cnn`, `transformer`), four
contenders do the same training on the same in-memory synthetic data:

- pure JAX: a `jax.jit` train step with optax Adam and donated buffers,
  one step per call, the data on the device;
- the same architecture in native `keras.layers`, trained with `fit`;
- `jaxlayer.JaxLayer` wrapping the pure JAX function, trained with `fit`;
- `keras.layers.JaxLayer` wrapping it, where Keras supports it.

Contenders are timed in rounds, round robin (A, B, C, D, A, B, ...), so that
a machine busy with other work slows all of them alike; min and median over
rounds are reported, and ratios of the mins. `--runs N` repeats the whole
measurement N times, each backend in a fresh process each time: the tables
then pool every run's rounds, and the targets table adds the spread of the
per-run ratios (each measured side by side within its run). A contender that raises is
reported as "unsupported: <reason>". On the JAX backend the live
`jax.Array` bytes after building and one fit step are compared as well.

Where the results go: the markdown report is printed, then a one-screen
summary (per backend, workload and `steps_per_execution`: jaxlayer's `fit`
time over native Keras layers', Keras's `JaxLayer`'s and pure JAX's). The
report is written to `benchmarks/out/results.md` (git-ignored) and a chart of
the ratios next to it, `results.svg` (matplotlib, the `bench` extra; skipped
with a note when it is missing). `--output PATH` writes the report elsewhere
(`-`: nowhere), `--chart PATH` the chart (`.svg` or `.png`; `-`: none), and
`--write` updates the checked-in `benchmarks/results.md` and
`benchmarks/results.svg`; nothing overwrites them otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a script (`python path/to/benchmarks/fit_step.py`): make the
    # `benchmarks` package importable from any directory.
    sys.path.insert(0, str(_ROOT))

BACKENDS = ("jax", "tensorflow", "torch")
CHECKED_IN = Path(__file__).with_name("results.md")
DEFAULT_OUTPUT = Path(__file__).parent / "out" / "results.md"
# --quick: a smoke run of every workload, under a minute per backend.
QUICK_SPE = "1"
QUICK_STEPS = 2
_BACKEND_MODULES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fit_step",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--backend",
        default="all",
        choices=(*BACKENDS, "all"),
        help="Keras backend to measure; 'all' runs each installed one in its "
        "own subprocess and merges the tables (default: all).",
    )
    parser.add_argument(
        "--workloads",
        default="mlp,cnn,transformer",
        help="comma-separated workloads (default: mlp,cnn,transformer).",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds (default 3)."
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement this many times, each backend in "
        "a fresh process per run; the report gives the ratio of the mins "
        "over every run and each target's spread of per-run ratios "
        "(default 1).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per timed fit, rounded up to a multiple of the "
        "largest steps_per_execution (default: per workload, 200/50/25).",
    )
    parser.add_argument(
        "--spe",
        default=None,
        help="comma-separated steps_per_execution values (default: 1,25; "
        f"{QUICK_SPE} with --quick).",
    )
    parser.add_argument(
        "--predict-batches",
        type=int,
        default=None,
        help="batches per timed predict (default: 20, 5 with --quick).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run, under a minute per backend: 1 round, {QUICK_STEPS} "
        f"steps per fit, steps_per_execution {QUICK_SPE} unless --spe is "
        "given; the numbers mean nothing.",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on the jax backend, compare live jax.Array bytes after build and "
        "one fit step (builds every contender again; default: on, off with "
        "--quick).",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="markdown report to write, '-' for none (default: "
        f"{DEFAULT_OUTPUT.relative_to(_ROOT)}, git-ignored; with --write: "
        f"{CHECKED_IN.relative_to(_ROOT)}).",
    )
    parser.add_argument(
        "--chart",
        default=None,
        help="chart of the fit-time ratios to write (.svg or .png), '-' for "
        "none (default: the report's path with .svg; needs matplotlib).",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the checked-in benchmarks/results.md and results.svg "
        "(for a run on a quiet machine).",
    )
    parser.add_argument(
        "--jit-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="`jit_compile` of the Keras contenders' `compile` (default: "
        "auto, Keras's own choice; on TensorFlow, true runs the whole train "
        "step in XLA).",
    )
    parser.add_argument(
        "--note", default=None, help="a line added to the report's header."
    )
    parser.add_argument(
        "--json", default=None, help="also write the raw results as JSON here."
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.spe is None:
        args.spe = QUICK_SPE if args.quick else "1,25"
    args.spe = sorted({int(s) for s in args.spe.split(",")})
    if args.output is None:
        args.output = str(CHECKED_IN if args.write else DEFAULT_OUTPUT)
    elif args.write:
        parser.error("--write writes benchmarks/results.md: give --output or --write")
    if args.write and args.quick:
        parser.error("--write keeps full runs only: --quick numbers mean nothing")
    if args.chart is None:
        args.chart = (
            "-" if args.output == "-" else str(Path(args.output).with_suffix(".svg"))
        )
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.memory is None:
        args.memory = not args.quick
    if args.predict_batches is None:
        args.predict_batches = 5 if args.quick else 20
    return args


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "keras", "tensorflow", "torch", "optax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(f"{name}-cpu")
            except metadata.PackageNotFoundError:
                out[name] = "not installed"
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()}


# Environment variables that change how fast XLA, torch or TensorFlow run on
# the CPU (threads, XLA's options, the C allocator); a report records those
# that were set, so a table says what it ran under.
TUNING_VARIABLES = (
    "XLA_FLAGS",
    "TF_XLA_FLAGS",
    "PJRT_NPROC",
    "JAX_CPU_ENABLE_ASYNC_DISPATCH",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "TF_ENABLE_ONEDNN_OPTS",
    "LD_PRELOAD",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_CONF",
    "GLIBC_TUNABLES",
)


def _tuning() -> dict:
    """The tuning variables (`TUNING_VARIABLES`) set in this environment."""
    return {k: os.environ[k] for k in TUNING_VARIABLES if k in os.environ}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _steps(workload, args) -> int:
    steps = args.steps if args.steps is not None else workload.default_steps
    if args.quick and args.steps is None:
        steps = min(steps, QUICK_STEPS)
    top = max(args.spe)
    # Whole executions of the largest steps_per_execution, at least one.
    return max(top, -(-steps // top) * top)


def run_backend(args) -> dict:
    """Measures every workload on the current backend, in this process.

    Returns:
        A JSON-ready dict: backend, machine, versions, settings and, per
        workload, each contender's timings (or its error) and memory.
    """
    import keras

    from benchmarks import _contenders as C
    from benchmarks._names import CONTENDERS, PURE_JAX
    from benchmarks._workloads import WORKLOADS

    C.JIT_COMPILE = {"auto": "auto", "true": True, "false": False}[args.jit_compile]

    backend = keras.backend.backend()
    if backend != args.backend:
        raise SystemExit(
            f"Keras was already imported with the {backend!r} backend; run "
            f"with KERAS_BACKEND={args.backend} or in a fresh process."
        )
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(
            f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}."
        )
    run = {
        "backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "rounds": args.rounds,
            "spe": args.spe,
            "predict_batches": args.predict_batches,
            "quick": args.quick,
            "jit_compile": args.jit_compile,
            "environment": _tuning(),
        },
        "load_before": _load(),
        "workloads": [],
    }
    for name in args.workloads:
        workload = WORKLOADS[name]
        steps = _steps(workload, args)
        data = workload.data(steps)
        print(f"[{backend}] {name}: {steps} steps/fit", file=sys.stderr, flush=True)
        started = time.perf_counter()
        entry = {
            "name": name,
            "description": workload.description,
            "batch_size": workload.batch_size,
            "steps": steps,
            "param_bytes": C.param_bytes(workload),
            "memory": (
                C.memory(workload, data) if backend == "jax" and args.memory else None
            ),
            "results": {},
        }
        runners = {}
        for kind in CONTENDERS:
            keras.backend.clear_session()
            res = entry["results"][kind] = {}
            for spe in args.spe:
                if kind == PURE_JAX and spe != args.spe[0]:
                    # One loop for every column (see `_contenders.pure_jax`):
                    # timed once per round, shown in each.
                    runners[kind, spe] = runners.get((kind, args.spe[0]))
                    res[f"fit_{spe}"] = res[f"fit_{args.spe[0]}"]
                    continue
                try:
                    runners[kind, spe] = C.BUILDERS[kind](
                        workload, data, spe, args.predict_batches
                    )
                    res[f"fit_{spe}"] = []
                except Exception as err:  # noqa: BLE001 - reported as a row
                    res[f"fit_{spe}"] = C.unsupported(err)
            first = runners.get((kind, args.spe[0]))
            res["predict"] = [] if first else res[f"fit_{args.spe[0]}"]
        # Round robin: in every round, each contender in turn.
        for _ in range(args.rounds):
            for spe in args.spe:
                for kind in CONTENDERS:
                    if kind == PURE_JAX and spe != args.spe[0]:
                        continue
                    _time(entry["results"][kind], f"fit_{spe}", runners, kind, spe)
            for kind in CONTENDERS:
                _time(entry["results"][kind], "predict", runners, kind, args.spe[0])
        runners.clear()
        keras.backend.clear_session()
        run["workloads"].append(entry)
        print(
            f"[{backend}] {name}: done in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    run["load_after"] = _load()
    return run


def _time(res, key, runners, kind, spe):
    from benchmarks import _contenders as C

    if not isinstance(res[key], list):
        return
    runner = runners[kind, spe]
    try:
        res[key].append(runner.predict() if key == "predict" else runner.fit())
    except Exception as err:  # noqa: BLE001 - reported as a row
        res[key] = C.unsupported(err)


def run_all(args, argv) -> list[dict]:
    """Runs each installed backend in its own subprocess; returns the runs."""
    passthrough = _strip(
        argv,
        ("--backend", "--output", "--json", "--note", "--chart", "--runs"),
        ("--write",),
    )
    child_argv = ["--output", "-", *passthrough]
    runs = []
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    for backend in backends:
        if importlib.util.find_spec(_BACKEND_MODULES[backend]) is None:
            print(f"[{backend}] not installed, skipped", file=sys.stderr)
            continue
        runs.append(in_subprocess("benchmarks.fit_step", backend, child_argv))
    return runs


def profile_parser(
    prog: str, doc: str, *, rounds: int, seconds: float, json_help: str
) -> argparse.ArgumentParser:
    """The command line shared by the one-call profiles (`benchmarks.crossing`,
    `benchmarks.allocator`): `--workloads`, `--rounds`, `--seconds`,
    `--output`, `--write`, `--note` and `--json`; each adds its `--backend`."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, description=doc.split("\n\n")[0]
    )
    parser.add_argument("--workloads", default="mlp,cnn,transformer")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument(
        "--seconds",
        type=float,
        default=seconds,
        help=f"about how long each timing lasts (default {seconds} s).",
    )
    parser.add_argument("--output", default=None, help="'-' for none.")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--note", default=None)
    parser.add_argument("--json", default=None, help=json_help)
    return parser


def parse_profile_args(parser, argv, checked_in, default_output):
    """`parser`'s arguments; `--output` defaults to `checked_in` with
    `--write`, else `default_output`."""
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.output is None:
        args.output = str(checked_in if args.write else default_output)
    return args


def write_report(text: str, output: str) -> None:
    """Prints the report `text` and writes it to `output` (`-`: nowhere)."""
    print(text)
    if output != "-":
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)


def in_subprocess(
    module: str, backend: str, argv: list[str], env: dict | None = None
) -> dict:
    """Runs `python -m <module> --backend <backend> --json <file> <argv>` in a
    fresh process with `KERAS_BACKEND` set (the benchmarks' own modules), and
    the environment variables `env` on top of this process's.

    Returns:
        What the process wrote to the JSON file, or `{"backend", "error"}`
        when it failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", module, "--backend", backend]
        cmd += ["--json", str(out), *argv]
        child = dict(os.environ, KERAS_BACKEND=backend, **(env or {}))
        child.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_ROOT), child.get("PYTHONPATH")) if p
        )
        proc = subprocess.run(cmd, env=child, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.exists():
            return {"backend": backend, "error": f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def _strip(argv, options, flags=()):
    """`argv` without the given options (and their values) and flags."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        if arg in flags:
            continue
        out.append(arg)
    return out


def main(argv=None) -> list[dict]:
    """Runs the benchmark; prints and writes the report; returns the runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from benchmarks._report import merge, render, summary, write_chart

    reps = []
    for rep in range(args.runs):
        if args.runs > 1:
            print(f"run {rep + 1} of {args.runs}", file=sys.stderr, flush=True)
        if args.backend == "all" or args.runs > 1:
            reps.append(run_all(args, argv))
        else:
            os.environ["KERAS_BACKEND"] = args.backend
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            reps.append([run_backend(args)])
    runs = merge(reps)

    write_report(render(runs, note=args.note), args.output)
    written = []
    if args.output != "-":
        written.append(f"report: {_shown(args.output)}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs[0] if len(runs) == 1 else runs))
    if args.chart != "-":
        Path(args.chart).parent.mkdir(parents=True, exist_ok=True)
        note = write_chart(runs, args.chart)
        written.append(note or f"chart: {_shown(args.chart)}")
    print(summary(runs))
    for line in written:
        print(line)
    return runs


def _shown(path) -> str:
    """`path` relative to the working directory when it is below it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
