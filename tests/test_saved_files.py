"""`.keras` files written by earlier jaxlayer code still load (issue 21).

The files in `tests/data/` were written by the code of 0.2.0.dev0 before
the internal redesign (`tests/data/make_jaxlayer_020_files.py`); the 0.1.0
files are tested in `test_portable_saving.py`.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxlayer import EquinoxLayer, JaxLayer, saving

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOL = dict(rtol=1e-5, atol=1e-5)
W = np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3)
X = np.linspace(-2, 2, 32, dtype="float32").reshape(8, 4)


@keras.saving.register_keras_serializable(package="jaxlayer_020")
def registered_call(params, state, rng, inputs, training):
    y = jnp.tanh(inputs @ params["w"] + params["b"])
    if training:
        y = y * jax.random.bernoulli(rng, 0.9, y.shape) / 0.9
        state = {"count": state["count"] + 1}
    return y, state


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def load(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.saving.load_model(os.path.join(DATA, name))
    return model, [str(w.message) for w in caught]


def fit_once(model):
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(X, np.zeros((8, 3), "float32"), batch_size=8, epochs=1, verbose=0)


def test_a_020_file_with_its_function_registered_loads_it():
    model, said = load("jaxlayer-0.2.0.dev0.keras")
    assert said == []
    layer = model.get_layer("net")
    assert isinstance(layer, JaxLayer) and layer.call_fn is registered_call
    assert layer.seed == 3
    np.testing.assert_allclose(model.predict(X, verbose=0), np.tanh(X @ W + 0.5), **TOL)
    assert int(to_np(layer.state["count"])) == 7
    if keras.backend.backend() != "numpy":
        fit_once(model)
        assert int(to_np(layer.state["count"])) == 8


def test_a_020_file_without_its_function_runs_its_export():
    model, said = load("jaxlayer-0.2.0.dev0-exported.keras")
    assert len(said) == 1 and "unregistered_call" in said[0], said
    layer = model.get_layer("net")
    assert isinstance(layer.call_fn, saving.ExportedCall)
    np.testing.assert_allclose(model.predict(X, verbose=0), np.tanh(X @ W + 0.5), **TOL)
    assert int(to_np(layer.state["count"])) == 7
    if keras.backend.backend() != "numpy":
        fit_once(model)
        assert int(to_np(layer.state["count"])) == 8
        again = keras.models.clone_model(model)
        np.testing.assert_allclose(
            again.predict(X, verbose=0), model.predict(X, verbose=0), **TOL
        )


def test_a_020_equinox_file_runs_its_export():
    pytest.importorskip("equinox")
    model, said = load("jaxlayer-0.2.0.dev0-equinox.keras")
    assert said == []
    layer = model.get_layer("eqx")
    assert isinstance(layer, EquinoxLayer)
    expected = np.load(os.path.join(DATA, "jaxlayer-0.2.0.dev0-equinox.npz"))
    np.testing.assert_allclose(
        model.predict(expected["x"], verbose=0), expected["y"], **TOL
    )
