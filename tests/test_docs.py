"""The examples of the README and of docs/*.md run, on every backend.

Each ```python block runs in a fresh namespace. A block whose first line is
`# backend: NAME` runs on that backend only.
"""

import pathlib
import re

import pytest

from conftest import BACKEND

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for path in FILES:
        if not path.exists():
            continue
        for match in BLOCK.finditer(path.read_text()):
            code = match.group(1)
            line = path.read_text()[: match.start()].count("\n") + 1
            yield pytest.param(code, id=f"{path.name}:{line}")


@pytest.mark.parametrize("code", list(blocks()))
def test_example_runs(code, tmp_path, monkeypatch):
    first = code.splitlines()[0] if code else ""
    wanted = re.match(r"#\s*backend:\s*(\w+)", first)
    if wanted and wanted.group(1) != BACKEND:
        pytest.skip(f"example for the {wanted.group(1)} backend")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
