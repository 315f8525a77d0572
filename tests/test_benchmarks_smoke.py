"""Smoke test of `benchmarks.fit_step`: it runs and reports every contender.

A tiny `--quick` run of the MLP workload on the current Keras backend, in this
process. Only that each contender gets a row (numbers or "unsupported") is
checked; timings are not asserted.
"""

import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fit_step  # noqa: E402
from benchmarks._names import CONTENDERS, JAXLAYER  # noqa: E402

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
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| mlp |")]
    for kind in CONTENDERS:
        assert any(f"| mlp | {kind} |" in row for row in rows), kind
    if BACKEND == "jax":
        assert "## Memory" in text
