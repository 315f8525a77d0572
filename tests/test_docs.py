"""Every Python example of README.md and docs/ runs, on the backends it names.

The examples are found and run by `pytest-examples`: each ```python block is
one test, run as a module named `__main__` in a fresh namespace, in a
temporary working directory. Where a block prints, the output it shows in
`#> ` comment lines right after the `print(...)` must be what it prints (run
`pytest tests/test_docs.py --update-examples` to rewrite them, then review
the diff).

How a block is run is set by an HTML comment on the line just before it
(invisible on the rendered page), with `key="value"` pairs:

    <!-- test: backends="jax tensorflow" -->

- `backends`: the Keras backends the block runs on, space-separated, or
  `"all"`. Default: `"jax tensorflow torch"` (the NumPy backend trains
  nothing: a block that runs there names it).
- `skip`: the block is not run; the value says why (a script for several
  hosts, a command a user types). Shell sessions are ```bash blocks, which
  are not collected at all.
- `file`: the block is a script saved under this name in the working
  directory of the page's other blocks (which may run it), not run itself;
  its test checks that it compiles.
- `continues`: the block runs in the namespace the page's previous Python
  block leaves (which runs first, and so on back along the chain; the
  outputs of every block of the chain are checked).
- `subprocess`: the block runs in a fresh Python process (pytest on this
  one example), with the environment variables the value gives
  (`subprocess="XLA_FLAGS=--xla_force_host_platform_device_count=8"`):
  for settings that must be made before JAX starts.
"""

from __future__ import annotations

import builtins
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import keras
import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
DEFAULT_BACKENDS = ("jax", "tensorflow", "torch")
ALL_BACKENDS = ("jax", "tensorflow", "torch", "numpy")
KEYS = {"backends", "skip", "file", "continues", "subprocess"}
# Set in the process that runs a `subprocess` block.
CHILD = "JAXLAYER_DOCS_CHILD"

_SETTINGS = re.compile(r"^\s*<!--\s*test:(.*)-->\s*$")


def _files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _examples() -> list[CodeExample]:
    return [ex for ex in find_examples(*_files()) if ex.prefix.startswith("python")]


EXAMPLES = _examples()


def _id(example: CodeExample) -> str:
    return f"{example.path.relative_to(ROOT).as_posix()}:{example.start_line}"


def settings(example: CodeExample) -> dict[str, str]:
    """The `<!-- test: ... -->` settings written just before `example`."""
    lines = example.path.read_text("utf-8").splitlines()
    # `start_line` is the fence's line (1-based): the line before it is
    # `lines[start_line - 2]`.
    above = lines[example.start_line - 2] if example.start_line >= 2 else ""
    match = _SETTINGS.match(above)
    if match is None:
        return {}
    result = {}
    for token in shlex.split(match.group(1)):
        key, _, value = token.partition("=")
        if key not in KEYS:
            raise ValueError(
                f"{_id(example)}: unknown test setting {key!r}; known: "
                f"{', '.join(sorted(KEYS))}"
            )
        result[key] = value
    return result


def backends(example: CodeExample) -> tuple[str, ...]:
    value = settings(example).get("backends")
    if value is None:
        return DEFAULT_BACKENDS
    names = tuple(value.split())
    if names == ("all",):
        return ALL_BACKENDS
    unknown = set(names) - set(ALL_BACKENDS)
    assert not unknown, f"{_id(example)}: unknown backends {sorted(unknown)}"
    return names


def _chain(example: CodeExample) -> list[CodeExample]:
    """`example` and the blocks it continues, first to last."""
    page = [ex for ex in EXAMPLES if ex.path == example.path]
    index = next(i for i, ex in enumerate(page) if ex.start_line == example.start_line)
    chain = [page[index]]
    while "continues" in settings(chain[0]):
        index -= 1
        assert index >= 0, f"{_id(example)} continues no earlier block"
        chain.insert(0, page[index])
    return chain


def _write_files(example: CodeExample, where: Path) -> None:
    for ex in EXAMPLES:
        name = settings(ex).get("file") if ex.path == example.path else None
        if name:
            (where / name).write_text(ex.source, "utf-8")


@pytest.fixture(autouse=True)
def _quick_print_mock(monkeypatch):
    """pytest-examples' print mock calls `inspect.stack()` (which reads the
    source file of every frame) on each `print` in the process while an
    example runs, libraries' own included: torch.compile's logging prints
    thousands of lines into buffers, which made a 50 s example take 300 s.
    Here a print into a file goes to the real `print`, one from outside the
    example is dropped at once (the mock dropped those too), and only the
    example's own reach the mock, which checks them."""
    from pytest_examples import run_code

    real_print = builtins.print

    def call(self, *args, sep=" ", **kwargs):
        if kwargs.get("file") is not None:
            return real_print(*args, sep=sep, **kwargs)
        # The caller of `print`, as the mock finds it (`inspect.stack()`
        # at the same depth), without reading every frame's source.
        frame = sys._getframe(run_code.parent_frame_id)
        name = frame.f_code.co_filename
        ours = str(self.file)
        if name != ours and not (os.path.exists(name) and os.path.samefile(name, ours)):
            return None
        info = types.SimpleNamespace(frame=frame, filename=name)
        if self._include_file(info, args):
            line = self._find_line_number(info)
            arguments = [run_code.Arg(arg) for arg in args]
            self.statements.append(run_code.PrintStatement(line, sep, arguments))
        return None

    monkeypatch.setattr(run_code.MockPrintFunction, "__call__", call)


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_example(
    example: CodeExample,
    eval_example: EvalExample,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    setting = settings(example)
    if "skip" in setting:
        pytest.skip(f"not run: {setting['skip']}")
    wanted = backends(example)
    if BACKEND not in wanted:
        pytest.skip(f"an example for the {' / '.join(wanted)} backend(s)")
    if "file" in setting:
        compile(example.source, setting["file"], "exec")
        return
    if "subprocess" in setting and os.environ.get(CHILD) != _id(example):
        _run_in_subprocess(example, setting["subprocess"], tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    _write_files(example, tmp_path)
    namespace: dict = {}
    for ex in _chain(example):  # each block's printed output is checked
        if eval_example.update_examples:
            namespace = eval_example.run_print_update(ex, module_globals=namespace)
        else:
            namespace = eval_example.run_print_check(ex, module_globals=namespace)


def _run_in_subprocess(example: CodeExample, assignments: str, tmp_path: Path):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, **{CHILD: _id(example)})
    for assignment in shlex.split(assignments):
        name, _, value = assignment.partition("=")
        env[name] = value
    node = f"{Path(__file__).relative_to(ROOT)}::test_example[{_id(example)}]"
    result = subprocess.run(
        # No conftest: its per-test Keras set-up would start the backend's
        # runtime before the block configures it (TensorFlow's logical
        # devices, for one).
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["--noconftest", node],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and " passed" in result.stdout, (
        f"{_id(example)} failed in a subprocess:\n{result.stdout[-6000:]}"
        f"\n{result.stderr[-3000:]}"
    )


def test_settings_are_valid():
    """Every block's settings parse and name known backends and keys."""
    assert EXAMPLES, "no examples found"
    for example in EXAMPLES:
        setting = settings(example)
        backends(example)
        if "continues" in setting:
            _chain(example)
        assert not ({"file", "continues"} <= set(setting)), _id(example)
