"""A newcomer's first ten minutes: the backend is chosen for them, the command
line explains itself, and a fresh install from the clone runs the demo.

Most tests start a subprocess (Keras picks its backend once per process, at
import) and do not depend on the backend of this process: they run in the jax
process of the suite only. A library is hidden from a subprocess by a
`sitecustomize` on its `PYTHONPATH` that swaps Python's path finder for one
that does not find it: `importlib.util.find_spec` returns None and `import`
raises `ModuleNotFoundError`, as if it were not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import pytest

from jaxlayer import _backend

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="subprocess tests that do not depend on this process's backend: "
    "they run in the jax process of the suite",
)

FALLBACK_LINE = (
    "jaxlayer: Keras's configured backend 'tensorflow' is not installed; "
    "using the JAX backend (set KERAS_BACKEND to choose)."
)
PRINT_BACKEND = "import jaxlayer, keras; print(keras.backend.backend())"


def _hide(tmp_path: Path, *modules: str) -> str:
    """A directory with a `sitecustomize` that hides `modules`; its path."""
    directory = tmp_path / "hide"
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""\
            import sys
            from importlib.machinery import PathFinder

            HIDDEN = {modules!r}


            class _HidingPathFinder(PathFinder):
                @classmethod
                def find_spec(cls, name, path=None, target=None):
                    if name.split(".")[0] in HIDDEN:
                        return None
                    return super().find_spec(name, path, target)


            sys.meta_path[:] = [
                _HidingPathFinder if f is PathFinder else f for f in sys.meta_path
            ]
            """
        )
    )
    return str(directory)


def _run(
    args: list[str],
    tmp_path: Path,
    *,
    backend: str | None = None,
    keras_json: str | None = None,
    hide: tuple[str, ...] = (),
    home: bool = False,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Runs `python *args` with no KERAS_BACKEND unless `backend` is given.

    Keras's config lives in an empty `KERAS_HOME` under `tmp_path` (holding a
    keras.json naming `keras_json` when given); with `home`, `KERAS_HOME` is
    unset and `HOME` is that directory instead (Keras's `~/.keras`).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_BACKEND", "KERAS_HOME", "PYTHONPATH")
    }
    keras_home = tmp_path / ("home/.keras" if home else "keras_home")
    keras_home.mkdir(parents=True, exist_ok=True)
    if keras_json is not None:
        (keras_home / "keras.json").write_text(json.dumps({"backend": keras_json}))
    if home:
        env["HOME"] = str(tmp_path / "home")
    else:
        env["KERAS_HOME"] = str(keras_home)
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    if hide:
        env["PYTHONPATH"] = _hide(tmp_path, *hide)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# The choice itself, in this process (Keras is imported here: pretend not).


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """`_backend.choose()` as before Keras's import, with a private KERAS_HOME
    and only the libraries in `installed` present."""
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    installed = {"jax", "numpy", "torch"}
    monkeypatch.setattr(_backend, "_installed", lambda module: module in installed)
    return tmp_path


def test_choose_falls_back_to_jax_when_keras_default_is_missing(fresh, capsys):
    _backend.choose()  # no keras.json: Keras's default, tensorflow
    assert os.environ["KERAS_BACKEND"] == "jax"
    assert capsys.readouterr().err.strip() == FALLBACK_LINE


def test_choose_keeps_a_configured_backend_that_is_installed(fresh, capsys):
    (fresh / "keras.json").write_text('{"backend": "torch"}')
    _backend.choose()
    assert "KERAS_BACKEND" not in os.environ
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["not json", "[]", '{"floatx": "float32"}'])
def test_choose_reads_keras_json_as_keras_does(fresh, text):
    # An unreadable file, or one without "backend": Keras's default.
    (fresh / "keras.json").write_text(text)
    assert _backend.configured_backend() == "tensorflow"


@pytest.mark.parametrize("backend", ["jax", "torch", "numpy", "no_such_backend"])
def test_choose_never_overrides_keras_backend(fresh, monkeypatch, backend, capsys):
    # Installed, or unknown (Keras reports it): left alone.
    monkeypatch.setenv("KERAS_BACKEND", backend)
    _backend.choose()
    assert os.environ["KERAS_BACKEND"] == backend
    assert capsys.readouterr().err == ""


def test_choose_names_keras_backend_and_the_extra(fresh, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(ImportError) as info:
        _backend.choose()
    message = str(info.value)
    assert "\n" not in message
    assert "KERAS_BACKEND=tensorflow" in message
    assert 'pip install "jaxlayer[tensorflow]"' in message
    assert os.environ["KERAS_BACKEND"] == "tensorflow"


def test_choose_does_nothing_once_keras_is_imported(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", keras)
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # "missing", ignored
    _backend.choose()
    assert os.environ["KERAS_BACKEND"] == "tensorflow"


# The same, end to end: `import jaxlayer` in a fresh process.


def test_import_uses_jax_when_configured_tensorflow_is_missing(tmp_path):
    result = _run(
        ["-c", PRINT_BACKEND], tmp_path, keras_json="tensorflow", hide=("tensorflow",)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["jax"]
    assert [line for line in _lines(result.stderr) if "jaxlayer" in line] == [
        FALLBACK_LINE
    ]


def test_import_reads_the_config_in_home(tmp_path):
    # No KERAS_HOME: Keras's ~/.keras/keras.json, naming an installed backend.
    result = _run(["-c", PRINT_BACKEND], tmp_path, keras_json="numpy", home=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["numpy"]
    assert "jaxlayer:" not in result.stderr


def test_import_keeps_keras_backend_that_is_installed(tmp_path):
    # Set and installed: kept, even with a config naming a missing backend.
    result = _run(
        ["-c", PRINT_BACKEND],
        tmp_path,
        backend="torch",
        keras_json="tensorflow",
        hide=("tensorflow",),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["torch"]
    assert "jaxlayer:" not in result.stderr


def test_import_with_missing_keras_backend_is_one_clear_error(tmp_path):
    result = _run(
        ["-c", "import jaxlayer"], tmp_path, backend="tensorflow", hide=("tensorflow",)
    )
    assert result.returncode != 0
    last = _lines(result.stderr)[-1]
    assert last.startswith("jaxlayer._backend.BackendNotInstalledError: ")
    assert "KERAS_BACKEND=tensorflow" in last
    assert "jaxlayer[tensorflow]" in last


# The command line.


def test_cli_without_command_prints_help(tmp_path):
    result = _run(["-m", "jaxlayer"], tmp_path, backend="jax")
    assert result.returncode in (0, 2), result.stderr[-3000:]
    assert "usage: python -m jaxlayer" in result.stdout
    assert "demo" in result.stdout
    assert "Traceback" not in result.stderr


def test_cli_help_explains_keras_backend(tmp_path):
    result = _run(["-m", "jaxlayer", "--help"], tmp_path, backend="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    for text in (
        "KERAS_BACKEND",
        "keras.json",
        "jax, tensorflow, torch or numpy",
        "KERAS_BACKEND=torch python -m jaxlayer demo",
    ):
        assert text in result.stdout, text


def test_cli_demo_on_numpy_needs_a_training_backend(tmp_path):
    result = _run(["-m", "jaxlayer", "demo"], tmp_path, backend="numpy")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in _lines(result.stderr) if "jaxlayer" in line]
    assert "training backend (jax, tensorflow or torch)" in line


def test_cli_with_missing_keras_backend_is_one_line(tmp_path):
    result = _run(
        ["-m", "jaxlayer", "demo"], tmp_path, backend="tensorflow", hide=("tensorflow",)
    )
    assert result.returncode == 1
    (line,) = _lines(result.stderr)
    assert line.startswith("python -m jaxlayer: KERAS_BACKEND=tensorflow ")
    assert 'pip install "jaxlayer[tensorflow]"' in line


def test_cli_demo_without_haiku_names_the_demo_extra(tmp_path):
    result = _run(["-m", "jaxlayer", "demo"], tmp_path, backend="jax", hide=("haiku",))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in _lines(result.stderr) if "jaxlayer" in line]
    assert "pip install 'jaxlayer[demo]'" in line
    assert "jaxlayer[haiku]" not in line


# The real thing: the README's demo command in a copy of the clone.


@pytest.mark.slow
def test_fresh_clone_runs_the_demo_on_jax(tmp_path):
    """`bash scripts/demo.sh` from a copy of the clone: a new .venv with
    `pip install -e ".[demo]"` (jax, keras, haiku, scikit-learn; no
    TensorFlow), no KERAS_BACKEND, an empty Keras config: the demo runs on
    the JAX backend and says so."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("src", "scripts"):
        shutil.copytree(
            ROOT / name,
            clone / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, clone / name)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_BACKEND", "VIRTUAL_ENV", "PYTHON", "PYTHONPATH")
    }
    env["KERAS_HOME"] = str(tmp_path / "empty_keras_home")
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    start = time.perf_counter()
    # Output to files, so that a failure (or a time-out) shows how far it got.
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            ["bash", "scripts/demo.sh", "--epochs", "2"],
            cwd=clone,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=3600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # bash, pip, python
            process.wait()
            code = "timed out after 3600 s"
    seconds = time.perf_counter() - start
    result = subprocess.CompletedProcess([], code, out.read_text(), err.read_text())
    output = result.stdout + result.stderr
    assert result.returncode == 0, (code, output[-5000:])
    assert (clone / ".venv" / ".jaxlayer-demo").exists()
    freeze = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pip", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.lower()
    assert "tensorflow" not in freeze and "dm-haiku" in freeze
    assert FALLBACK_LINE in result.stderr
    assert "backend: jax" in result.stdout
    assert "test accuracy" in result.stdout
    assert "reloaded model predicts the same" in result.stdout
    print(f"fresh clone: set-up and a 2-epoch demo in {seconds:.0f} s")
