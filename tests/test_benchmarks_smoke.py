"""Smoke test of `benchmarks.fit_step`: it runs and reports every contender.

A tiny `--quick` run of the MLP workload on the current Keras backend, in this
process. Only that each contender gets a row (numbers or "unsupported"), the
summary and the chart are checked; timings are not asserted. The options that
decide where results go, the chart of made-up results and a run as a script
from another directory are checked without training.
"""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _report, allocator, crossing, fit_step  # noqa: E402
from benchmarks._names import (  # noqa: E402
    CONTENDERS,
    JAXLAYER,
    KERAS_JAXLAYER,
    NATIVE,
    PURE_JAX,
)

BACKEND = keras.backend.backend()

pytestmark = pytest.mark.skipif(
    BACKEND not in fit_step.BACKENDS,
    reason=f"the benchmark trains; the {BACKEND} backend does not",
)


def test_quick_run_reports_every_contender(tmp_path, capsys):
    output = tmp_path / "results.md"
    (run,) = fit_step.main(
        [
            "--backend",
            BACKEND,
            "--quick",
            "--workloads",
            "mlp",
            "--spe",
            "1,2",
            "--steps",
            "4",
            "--predict-batches",
            "2",
            "--memory",
            "--output",
            str(output),
        ]
    )
    (workload,) = run["workloads"]
    assert workload["name"] == "mlp"
    for kind in CONTENDERS:
        result = workload["results"][kind]
        for key in ("fit_1", "fit_2", "predict"):
            value = result[key]
            assert (isinstance(value, list) and len(value) == 1) or (
                isinstance(value, str) and value.startswith("unsupported")
            ), (kind, key, value)
    # Pure JAX and native Keras run everywhere; so does jaxlayer on JAX.
    for kind in CONTENDERS[:2] + ((JAXLAYER,) if BACKEND == "jax" else ()):
        assert isinstance(workload["results"][kind]["fit_1"], list), kind
    text = output.read_text()
    out = capsys.readouterr().out
    assert text in out
    # The summary comes last: one row per spe for this backend's mlp.
    summary = out[out.index("Summary: jaxlayer.JaxLayer") :]
    rows = [line.split() for line in summary.splitlines()]
    assert [r[:3] for r in rows if r[:1] == [BACKEND]] == [
        [BACKEND, "1", "mlp"],
        *([[BACKEND, "2", "mlp"]] if BACKEND != "torch" else []),
    ]
    chart = output.with_suffix(".svg")
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_text().lstrip().startswith("<?xml")
        assert f"chart: {chart.name}" in out or f"/{chart.name}" in out
    else:
        assert not chart.exists()
        assert "chart skipped: matplotlib is not installed" in out
    rows = [line for line in text.splitlines() if line.startswith("| mlp |")]
    assert all(f"| {kind} |" in text for kind in CONTENDERS)
    for kind in CONTENDERS:
        assert any(f"| mlp | {kind} |" in row for row in rows), kind
    if BACKEND == "jax":
        assert "## Memory" in text
    environment = run["settings"]["environment"]
    assert f"- environment: {_report._environment(environment)}" in text


def test_report_says_which_tuning_variables_were_set(monkeypatch):
    for name in fit_step.TUNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert fit_step._tuning() == {}
    assert _report._environment({}).startswith("no tuning variable set")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=reduce")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    assert _report._environment(fit_step._tuning()) == (
        "`GOMP_SPINCOUNT=1000`, "
        "`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=reduce`"
    )


def test_results_go_to_benchmarks_out_unless_asked():
    checked_in = ROOT / "benchmarks" / "results.md"
    args = fit_step.parse_args([])
    assert Path(args.output) == ROOT / "benchmarks" / "out" / "results.md"
    assert Path(args.chart) == ROOT / "benchmarks" / "out" / "results.svg"
    args = fit_step.parse_args(["--write"])
    assert Path(args.output) == checked_in
    assert Path(args.chart) == checked_in.with_suffix(".svg")
    args = fit_step.parse_args(["--output", "-"])
    assert (args.output, args.chart) == ("-", "-")
    args = fit_step.parse_args(["--output", "x.md", "--chart", "y.png"])
    assert (args.output, args.chart) == ("x.md", "y.png")
    for argv in (["--write", "--output", "x.md"], ["--write", "--quick"]):
        with pytest.raises(SystemExit):
            fit_step.parse_args(argv)
    quick = fit_step.parse_args(["--quick"])
    assert (quick.spe, quick.rounds, quick.memory) == ([1], 1, False)
    assert fit_step.parse_args([]).memory


def _made_up_run(backend, quick=False):
    def fit(ms):
        return {"fit_1": [ms], "predict": [1.0]}

    results = {
        PURE_JAX: fit(1.0),
        NATIVE: fit(2.0),
        JAXLAYER: fit(1.5),
        KERAS_JAXLAYER: (
            {"fit_1": "unsupported: refuses torch", "predict": "unsupported"}
            if backend == "torch"
            else fit(3.0)
        ),
    }
    return {
        "backend": backend,
        "settings": {"spe": [1], "quick": quick},
        "workloads": [
            {"name": w, "results": copy.deepcopy(results)} for w in ("mlp", "cnn")
        ],
    }


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib"
)
@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_chart_of_made_up_results(tmp_path, suffix):
    runs = [_made_up_run("jax"), _made_up_run("torch"), {"backend": "x", "error": "1"}]
    path = tmp_path / f"chart{suffix}"
    assert _report.write_chart(runs, path) is None
    data = path.read_bytes()
    assert data.startswith(b"<?xml" if suffix == ".svg" else b"\x89PNG")
    if suffix == ".svg":
        text = data.decode()
        for label in ("vs native Keras", "vs Keras JaxLayer", "vs pure JAX"):
            assert label in text
        # Reproducible: the same results give the same file.
        again = tmp_path / "again.svg"
        _report.write_chart(runs, again)
        assert again.read_bytes() == data


def test_summary_of_made_up_results():
    text = _report.summary([_made_up_run("jax"), _made_up_run("torch")])
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in text.splitlines()}
    assert rows["jax", "1", "mlp"] == ["0.75x", "0.50x", "1.50x"]
    assert rows["torch", "1", "cnn"] == ["0.75x", "unsupported", "1.50x"]
    assert len(text.splitlines()) <= 24  # one screen


def test_runs_as_a_script_from_another_directory(tmp_path):
    # Far enough to import the `benchmarks` package (and Keras), then an
    # unknown workload stops it before any training.
    script = ROOT / "benchmarks" / "fit_step.py"
    result = subprocess.run(
        [sys.executable, str(script), "--backend", "jax", "--workloads", "nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "unknown workloads ['nope']" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def _scaled(run, factor):
    """`run` with jaxlayer's timings multiplied by `factor`."""
    out = copy.deepcopy(run)
    for w in out["workloads"]:
        res = w["results"][JAXLAYER]
        res["fit_1"] = [t * factor for t in res["fit_1"]]
    return out


def test_runs_merged_with_the_spread_of_their_ratios():
    first = [_made_up_run("jax"), _made_up_run("torch")]
    second = [_scaled(run, 0.5) for run in first]
    merged = _report.merge([first, second])
    assert [run["backend"] for run in merged] == ["jax", "torch"]
    jax_run = merged[0]
    assert jax_run["settings"]["runs"] == 2
    mlp = jax_run["workloads"][0]["results"]
    # Every run's rounds pooled; the reference's too.
    assert sorted(mlp[JAXLAYER]["fit_1"]) == [0.75, 1.5]
    assert mlp[NATIVE]["fit_1"] == [2.0, 2.0]
    # A single run is left as it is.
    assert _report.merge([first]) is first
    targets = [
        line.split(" | ")
        for line in _report._targets(merged)
        if line.startswith("| jax | mlp |") or line.startswith("| torch | cnn |")
    ]
    rows = {(r[0][2:], r[2]): r[3:] for r in targets if len(r) == 6}
    # jaxlayer 0.75 (min over runs) / native 2.0; per run 1.5/2 and 0.75/2.
    native = rows["jax", f"{JAXLAYER} fit spe=1 <= 1.02x {NATIVE}"]
    assert native == ["0.375x", "0.375-0.750x (2 runs)", "met |"]
    # Keras's JaxLayer (3.0): below it on jax.
    keras_layer = rows["jax", f"{JAXLAYER} fit spe=1 <= 1.02x {KERAS_JAXLAYER}"]
    assert keras_layer[0] == "0.250x"
    assert rows["torch", f"{JAXLAYER} fit spe=1 <= 1.00x {NATIVE}"][2] == "met |"
    # Not met: the ratio of the mins above the limit.
    slow = _report.merge([[_scaled(first[0], 2.0)], [_scaled(first[0], 1.5)]])
    lines = _report._targets(slow)
    assert not [row for row in lines if f"{JAXLAYER} fit spe=1 <= 1.00x" in row]
    line = next(
        row
        for row in lines
        if row.startswith(f"| jax | mlp | {JAXLAYER} fit spe=1 <= 1.02x {NATIVE}")
    )
    assert line.endswith("| 1.125x | 1.125-1.500x (2 runs) | **not met** |")


@pytest.mark.skipif(
    BACKEND not in crossing.BACKENDS, reason="the profile covers tensorflow and torch"
)
def test_crossing_profile_has_every_row():
    args = crossing.parse_args(
        ["--backend", BACKEND, "--workloads", "mlp", "--rounds", "1", "--seconds", "0"]
    )
    run = crossing.run_backend(args)
    (workload,) = run["workloads"]
    rows = {row: (fwd, grad) for row, fwd, grad in workload["rows"]}
    first = next(iter(rows))
    assert first.startswith("jax.jit on JAX arrays")
    expected = 5 if BACKEND == "torch" else 4
    assert len(rows) == expected, rows
    for row, (fwd, grad) in rows.items():
        assert fwd > 0, row
        assert grad is None if row.startswith("empty") else grad > 0, row
    text = crossing.render([run], args)
    assert f"## {BACKEND} backend" in text
    assert text.count("| mlp |") == expected


@pytest.mark.skipif(BACKEND != "jax", reason="pure JAX: run from the jax process")
def test_allocator_report_runs_each_setting_in_its_process(tmp_path):
    found = allocator.settings()
    assert found["glibc"] == {} and found["glibc, tuned"] == allocator.GLIBC_TUNED
    out = tmp_path / "allocator.md"
    argv = ["--workloads", "mlp", "--rounds", "1", "--seconds", "0"]
    results = allocator.main([*argv, "--output", str(out)])
    assert set(results) == set(found)
    for name, rows in results.items():
        assert [(r["workload"], r["call"]) for r in rows] == [
            ("mlp", "fwd"),
            ("mlp", "grad"),
        ], name
        assert all(r["ms"] > 0 and r["faults"] >= 0 for r in rows), rows
    text = out.read_text()
    assert text.count("| mlp |") == 2
    assert "MALLOC_MMAP_MAX_=0" in text
    assert allocator.parse_args(["--write"]).output == str(allocator.CHECKED_IN)


def test_load_report_of_made_up_results():
    from benchmarks import load

    text = load.render(
        "jax",
        3,
        {
            "safe_mode=False": [0.1, 0.3],
            "verified": [2.1, 2.4],
            "cached": [0.05, 0.25],
            "second": [0.3, 0.5],
        },
    )
    assert "min of 3 fresh processes" in text
    rows = [line for line in text.splitlines() if line.startswith("| `safe_mode")]
    assert len(rows) == 4
    assert "| 2.100 | 2.400 | +2.000 |" in rows[1]
    assert "child reused" in rows[3] and "| 0.300 | 0.500 | +0.200 |" in rows[3]


def test_transforms_quick_run_reports_both_steps(tmp_path):
    from benchmarks import transforms

    out = tmp_path / "transforms.md"
    rows = transforms.main(["--quick", "--output", str(out)])
    assert [(r["step"], r["label"]) for r in rows] == [
        ("fit", "LoRA"),
        ("predict", "int8"),
    ]
    assert all(r["plain"] > 0 and r["transformed"] > 0 for r in rows)
    assert "| mlp | fit (LoRA) |" in out.read_text()


def test_shapes_quick_run_and_report():
    from benchmarks import shapes

    rows = shapes.measure(["text"], rounds=1, quick=True)
    calls = ["predict_on_batch", "train_on_batch"]
    assert [(r["contender"], r["call"]) for r in rows] == [
        (contender, call) for contender in ("jaxlayer", "native") for call in calls
    ]
    assert all(r["fixed"] > 0 and r["rotating"] > 0 for r in rows)
    text = shapes.render({BACKEND: rows, "numpy": "it failed"})
    assert text.count(f"| {BACKEND} | text |") == len(rows)
    assert "| numpy | error: it failed |" in text
    assert shapes.parse_args(["--write"]).write
    with pytest.raises(SystemExit):
        shapes.parse_args(["--models", "nope"])
