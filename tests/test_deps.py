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
