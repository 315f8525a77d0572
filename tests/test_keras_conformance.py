"""Keras's own JaxLayer/FlaxLayer test suite, run against jaxlayer's classes.

Keras ships the tests of `keras.layers.JaxLayer` and `FlaxLayer` in its wheel
(`keras/src/utils/jax_layer_test.py`). Running them with our classes put in
place of Keras's is the most direct check that jaxlayer is a drop-in
replacement. Nothing of that file is copied here: it is imported from the
installed Keras. Keras marks its suite for the jax and tensorflow backends.

Deliberate differences, deselected below:
- `test_with_flax_state_no_params` expects the state to change in an
  inference call; jaxlayer updates state in training only (the contract).
"""

import pytest

kt = pytest.importorskip("keras.src.utils.jax_layer_test")

from jaxlayer import FlaxLayer, JaxLayer  # noqa: E402

DELIBERATE = {"test_with_flax_state_no_params"}


@pytest.fixture(autouse=True)
def _use_jaxlayer_classes(monkeypatch, request):
    if request.node.originalname in DELIBERATE:
        pytest.skip("deliberate difference: state is updated in training only")
    monkeypatch.setattr(kt, "JaxLayer", JaxLayer)
    monkeypatch.setattr(kt, "FlaxLayer", FlaxLayer)


class TestKerasSuiteWithJaxlayer(kt.TestJaxLayer):
    """Keras's TestJaxLayer, with jaxlayer's JaxLayer and FlaxLayer."""
