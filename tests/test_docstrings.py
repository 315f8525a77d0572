"""The examples in the public docstrings (the API reference) run as shown.

Each docstring with `>>>` lines is one test, run with `doctest` in the
namespace of its module. The printed values are the JAX backend's (a shape
prints as `(3, 2)` there, `torch.Size([3, 2])` on torch), so the examples
run in the jax test process only.
"""

import doctest
import importlib

import pytest

from conftest import BACKEND

MODULES = [
    "jaxlayer.layer",
    "jaxlayer._transform_methods",
    "jaxlayer._layer_shapes",
    "jaxlayer.adapters.flax_linen",
    "jaxlayer.adapters.flax_nnx",
    "jaxlayer.adapters.equinox",
    "jaxlayer.bridges",
    "jaxlayer.__main__",
    "jaxlayer._deps",
    "jaxlayer._artifact_check",
    "jaxlayer._torch_ops",
]


def _docstrings():
    if BACKEND != "jax":
        return [pytest.param(None, id="jax-only")]
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an extra that is not installed
            continue
        for test in finder.find(module, name):
            if test.examples:
                found.append(pytest.param(test, id=test.name))
    return found


@pytest.mark.skipif(BACKEND != "jax", reason="prints the jax backend's values")
@pytest.mark.parametrize("test", _docstrings())
def test_docstring_example(test):
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    out = []
    runner.run(test, out=out.append, clear_globs=False)
    assert runner.failures == 0, "".join(out)
