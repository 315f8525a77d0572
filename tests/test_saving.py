"""Saving: `.keras` round trips, weights files, and unregistered functions."""

import json
import os

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _reference import IN, reference_apply, reference_init
from jaxlayer import JaxLayer

TOL = dict(rtol=1e-6, atol=1e-6)


def to_np(x):
    return keras.ops.convert_to_numpy(x)


@keras.saving.register_keras_serializable(package="jaxlayer_tests")
def saved_call(params, state, rng, inputs, training):
    return reference_apply(params, state, rng, inputs, training)


@keras.saving.register_keras_serializable(package="jaxlayer_tests")
def saved_init(rng, inputs):
    return reference_init(rng, inputs, stateful=True)


def unregistered_call(params, inputs):
    return inputs @ params["w"]


def train(model, n=32):
    rs = np.random.RandomState(0)
    x = rs.randn(n, IN).astype("float32")
    y = rs.randn(n, 3).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    return x


def check_same(model, loaded, x, same_names=True):
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), **TOL
    )
    if same_names:
        assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_np(a), to_np(b))


def test_keras_round_trip_with_init_fn(tmp_path):
    inputs = keras.Input((IN,))
    layer = JaxLayer(saved_call, saved_init, seed=5, name="ref")
    model = keras.Model(inputs, layer(inputs))
    x = train(model)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    check_same(model, loaded, x)
    again = loaded.get_layer("ref")
    assert again.seed == 5 and again.call_fn is saved_call
    assert int(to_np(again.state["count"])) == int(to_np(layer.state["count"]))
    # It trains on after loading.
    train(loaded)


def test_keras_round_trip_with_params_only(tmp_path):
    """No init_fn: the tree of the params is kept in the config, so the layer
    is rebuilt with the right variables and the weights file fills them."""
    params, state = reference_init(jax.random.PRNGKey(0), jnp.ones((1, IN)), True)
    params["note"] = "kept"  # a static leaf, kept in the config
    layer = JaxLayer(saved_call, params=params, state=state, seed=1)
    model = keras.Sequential([keras.Input((IN,)), layer])
    x = train(model)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    check_same(model, loaded, x)
    assert loaded.layers[0].params["note"] == "kept"


def test_tuple_and_list_trees_round_trip(tmp_path):
    @keras.saving.register_keras_serializable(package="jaxlayer_tests")
    def tuple_call(params, inputs):
        (w, b), extra = params
        return inputs @ w + b + extra[0]

    params = (
        (np.ones((IN, 3), "float32"), np.zeros(3, "float32")),
        [np.ones(3, "float32")],
    )
    model = keras.Sequential([keras.Input((IN,)), JaxLayer(tuple_call, params=params)])
    x = train(model)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    check_same(model, loaded, x)
    assert isinstance(loaded.layers[0].params, tuple)
    assert isinstance(loaded.layers[0].params[1], list)


def test_weights_files(tmp_path):
    def build():
        inputs = keras.Input((IN,))
        return keras.Model(inputs, JaxLayer(saved_call, saved_init)(inputs))

    model = build()
    x = train(model)
    path = os.path.join(tmp_path, "w.weights.h5")
    model.save_weights(path)
    other = build()
    other.load_weights(path)
    check_same(model, other, x, same_names=False)


def test_unregistered_function_reloads_from_its_export(tmp_path):
    layer = JaxLayer(unregistered_call, params={"w": np.ones((IN, 2), "float32")})
    model = keras.Sequential([keras.Input((IN,)), layer])
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    x = np.ones((2, IN), "float32")
    want = model.predict(x, verbose=0)
    # Keras cannot locate the function: the layer runs its exported
    # computation, and says so in one warning.
    with pytest.warns(UserWarning, match="unregistered_call") as record:
        loaded = keras.saving.load_model(path)
    assert sum("unregistered_call" in str(w.message) for w in record) == 1
    assert type(loaded.layers[0].call_fn).__name__ == "ExportedCall"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want)
    # With the function given, the live function is used.
    loaded = keras.saving.load_model(
        path, custom_objects={"unregistered_call": unregistered_call}
    )
    assert loaded.layers[0].call_fn is unregistered_call
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want)


def test_config_round_trip():
    layer = JaxLayer(
        saved_call,
        saved_init,
        seed=3,
        native_serialization_platforms=("cpu", "cuda"),
        name="cfg",
    )
    config = layer.get_config()
    assert config["seed"] == 3
    assert config["native_serialization_platforms"] == ["cpu", "cuda"]
    again = JaxLayer.from_config(config)
    assert again.name == "cfg" and again.call_fn is saved_call
    assert again.init_fn is saved_init
    assert again.native_serialization_platforms == ("cpu", "cuda")


@pytest.mark.parametrize("how", ["clone_model", "deepcopy", "model_from_json"])
def test_config_only_copies_with_registered_functions(how):
    import copy

    inputs = keras.Input((IN,))
    layer = JaxLayer(saved_call, saved_init, seed=5, name="ref")
    model = keras.Model(inputs, layer(inputs))
    x = train(model)
    copies = {
        "clone_model": keras.models.clone_model,
        "deepcopy": copy.deepcopy,
        "model_from_json": lambda m: keras.models.model_from_json(m.to_json()),
    }
    clone = copies[how](model)
    clone.set_weights(model.get_weights())
    check_same(model, clone, x, same_names=False)


def test_copies_of_an_unregistered_function():
    import copy

    inputs = keras.Input((IN,))
    w = np.ones((IN, 3), "float32")
    layer = JaxLayer(unregistered_call, params={"w": w}, name="plain")
    model = keras.Model(inputs, layer(inputs))
    x = np.ones((2, IN), "float32")
    # deepcopy (and pickle) go through a `.keras` archive in memory, which
    # holds the exported computation.
    with pytest.warns(UserWarning, match="unregistered_call"):
        copied = copy.deepcopy(model)
    np.testing.assert_allclose(
        copied.predict(x, verbose=0), model.predict(x, verbose=0), **TOL
    )
    # clone_model hands the config object itself to `from_config`, which
    # takes the live layer's function and given params.
    clone = keras.models.clone_model(model)
    assert clone.layers[-1].call_fn is unregistered_call
    np.testing.assert_allclose(
        clone.predict(x, verbose=0), model.predict(x, verbose=0), **TOL
    )
    # A config written out (JSON) is a config alone: the call says what to do.
    with pytest.warns(UserWarning, match="unregistered_call"):
        copy_ = keras.models.model_from_json(model.to_json())
    with pytest.raises(ValueError, match=r"JaxLayer 'plain'.*config alone.*register"):
        copy_.predict(x, verbose=0)


def test_clone_model_initialises_afresh_or_keeps_given_params():
    x = np.random.RandomState(1).randn(4, IN).astype("float32")

    def model_of(layer):
        inputs = keras.Input((IN,))
        return keras.Model(inputs, layer(inputs))

    # Weights made by init_fn: the clone is initialised by it again (from
    # the same seed), like Keras's own layers; never zeros.
    trained = model_of(JaxLayer(saved_call, saved_init, seed=5))
    train(trained)
    clone = keras.models.clone_model(trained)
    fresh = model_of(JaxLayer(saved_call, saved_init, seed=5))
    for a, b in zip(clone.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    assert any(np.abs(to_np(w)).sum() > 0 for w in clone.weights)
    # Params that were given: the clone starts from their current values,
    # in variables of its own.
    w = np.random.RandomState(2).randn(IN, 3).astype("float32")
    given = model_of(JaxLayer(unregistered_call, params={"w": w}, name="given"))
    clone = keras.models.clone_model(given)
    np.testing.assert_allclose(to_np(clone.layers[-1].params["w"]), w)
    clone.layers[-1].params["w"].assign(np.zeros_like(w))
    np.testing.assert_allclose(to_np(given.layers[-1].params["w"]), w)
    np.testing.assert_allclose(given.predict(x, verbose=0), x @ w, **TOL)


def test_scikit_learn_wrapper_clones_and_fits():
    # Keras's scikit-learn wrappers clone the model (clone_model) before
    # each fit: a layer of unregistered code with given params trains there.
    pytest.importorskip("sklearn")
    from keras.wrappers import SKLearnRegressor

    rs = np.random.RandomState(3)
    w = rs.randn(IN, 1).astype("float32")
    x = rs.randn(32, IN).astype("float32")
    y = (x @ (2 * w))[:, 0]  # scikit-learn regressors take 1-d targets
    model = keras.Sequential(
        [keras.Input((IN,)), JaxLayer(unregistered_call, params={"w": w})]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    before = np.mean((model.predict(x, verbose=0)[:, 0] - y) ** 2)
    reg = SKLearnRegressor(model=model, fit_kwargs={"epochs": 5, "verbose": 0})
    reg.fit(x, y)
    after = np.mean((np.ravel(reg.predict(x)) - y) ** 2)
    assert after < 0.5 * before
    # The wrapped model itself is left as it was.
    np.testing.assert_allclose(to_np(model.layers[0].params["w"]), w)


def test_config_of_a_copy_equals_the_original():
    layer = JaxLayer(unregistered_call, params={"w": np.ones((IN, 2), "float32")})
    config = layer.get_config()
    copy_ = JaxLayer.from_config(config)
    assert copy_.get_config() == config
    assert copy_.call_fn is unregistered_call and type(copy_.name) is str
    # What a config holds is written out as plain JSON.
    assert json.loads(json.dumps(config))["name"] == layer.name
