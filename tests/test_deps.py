"""Optional libraries are imported lazily; a missing one names its extra."""

import os
import subprocess
import sys

import pytest

from jaxlayer import EquinoxLayer, FlaxLayer, NNXLayer, _deps


@pytest.mark.parametrize(
    "make,module,extra",
    [
        (lambda: FlaxLayer(object()), "flax", "flax"),
        (lambda: NNXLayer(object()), "flax", "flax"),
        (lambda: EquinoxLayer(object()), "equinox", "equinox"),
    ],
)
def test_missing_library_names_the_extra(monkeypatch, make, module, extra):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'jaxlayer\[{extra}\]'"):
        make()


@pytest.mark.parametrize("module", ["torch", "tensorflow", "haiku", "sklearn"])
def test_require_names_the_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    extra = {"haiku": "haiku", "sklearn": "demo"}.get(module, module)
    with pytest.raises(ImportError, match=rf"jaxlayer\[{extra}\]"):
        _deps.require(module, "this feature")


def test_importing_jaxlayer_imports_no_optional_library():
    code = (
        "import sys, jaxlayer; "
        "print(sorted(m for m in ('flax', 'equinox', 'haiku', 'torch', 'optax') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_require_names_an_explicit_extra(monkeypatch):
    # A feature needing several libraries names the extra with all of them.
    monkeypatch.setitem(sys.modules, "haiku", None)
    with pytest.raises(_deps.MissingExtraError) as info:
        _deps.require("haiku", "the demo", extra="demo")
    message = str(info.value)
    assert "pip install 'jaxlayer[demo]'" in message
    assert "jaxlayer[haiku]" not in message
    assert isinstance(info.value, ImportError)


def test_demo_model_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "haiku", None)
    monkeypatch.delitem(sys.modules, "jaxlayer._demo_model", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'jaxlayer\[demo\]'"):
        import jaxlayer._demo_model  # noqa: F401


# Modules imported by src/ that come with a required dependency, or with
# the package an extra installs (litert-torch brings litert_converter).
_BROUGHT_BY_OTHERS = {
    "keras": None,
    "jax": None,
    "jaxlib": None,
    "numpy": None,
    "flatbuffers": None,
    "jaxlayer": None,
    "ml_dtypes": "jax",
    "litert_converter": "litert_torch",
}


def test_every_optional_import_belongs_to_an_extra():
    import ast
    import pathlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = pathlib.Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    imported = set()
    for path in (root / "src" / "jaxlayer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add(node.module.split(".")[0])
    # `_deps.require("x")` / `importlib.import_module("x")` name theirs too.
    known = {m.split(".")[0] for m in _deps._EXTRAS} | set(_BROUGHT_BY_OTHERS)
    stray = imported - known - set(sys.stdlib_module_names)
    assert not stray, f"imported by src/ but in no extra (_deps._EXTRAS): {stray}"
    for module, extra in _deps._EXTRAS.items():
        assert extra in extras, f"{module}: no extra {extra!r} in pyproject.toml"
