"""FlaxLayer (Flax linen) against Flax's own forward and gradients."""

import os

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _helpers import (
    LR,
    assert_trains_apart,
    assert_trees_close,
    image_data,
    sgd_model,
    to_np,
)
from jaxlayer.adapters import FlaxLayer

nn = pytest.importorskip("flax.linen")


@keras.saving.register_keras_serializable(package="test_flax_linen")
class ConvBN(nn.Module):
    """Conv -> BatchNorm -> relu -> Dropout -> Dense: 8x8x1 inputs, 2 outputs."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.rate, deterministic=not training)(x)
        return nn.Dense(2)(x.reshape((x.shape[0], -1)))

    def get_config(self):
        return {"rate": self.rate}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class Heads(nn.Module):
    """A module with a named method, for `method=`."""

    def setup(self):
        self.head = nn.Dense(3)

    def __call__(self, x):
        return self.features(x)

    def features(self, x):
        return self.head(x.reshape((x.shape[0], -1)))


def test_weights_named_after_flax_variables():
    layer = FlaxLayer(ConvBN(), seed=1, name="net")
    layer(image_data()[0])
    assert sorted(w.path for w in layer.trainable_weights) == [
        "net/params/BatchNorm_0/bias",
        "net/params/BatchNorm_0/scale",
        "net/params/Conv_0/bias",
        "net/params/Conv_0/kernel",
        "net/params/Dense_0/bias",
        "net/params/Dense_0/kernel",
    ]
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        "net/batch_stats/BatchNorm_0/mean",
        "net/batch_stats/BatchNorm_0/var",
    ]
    assert layer.params["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 4)


def test_inference_matches_flax_apply():
    x, _ = image_data()
    module = ConvBN()
    variables = module.init(jax.random.PRNGKey(0), x)
    layer = FlaxLayer(module, variables=variables)
    expected = module.apply(variables, x, training=False)
    np.testing.assert_allclose(to_np(layer(x)), expected, atol=1e-5)
    assert_trees_close(layer.flax_variables(), variables)


def test_sgd_step_matches_jax_grad_and_updates_batch_stats():
    x, y = image_data()
    module = ConvBN(rate=0.0)
    variables = module.init(jax.random.PRNGKey(0), x)
    layer = FlaxLayer(module, variables=variables)
    model = sgd_model(layer)

    def loss(params):
        out, updates = module.apply(
            {**variables, "params": params},
            x,
            training=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(1)},
        )
        return jnp.mean((out - y) ** 2), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    model.train_on_batch(x, y)
    expected = jax.tree_util.tree_map(
        lambda p, g: p - LR * g, variables["params"], grads
    )
    assert_trees_close(layer.params["params"], expected)
    assert_trees_close(layer.state["batch_stats"], updates["batch_stats"])


def test_fit_lowers_loss_and_inference_leaves_stats_alone():
    x, y = image_data(32)
    layer = FlaxLayer(ConvBN(rate=0.2), seed=3)
    model = sgd_model(layer)
    before = model.evaluate(x, y, verbose=0)
    kernel = to_np(layer.params["params"]["Conv_0"]["kernel"]).copy()
    mean = to_np(layer.state["batch_stats"]["BatchNorm_0"]["mean"]).copy()
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < before
    assert not np.allclose(to_np(layer.params["params"]["Conv_0"]["kernel"]), kernel)
    mean = to_np(layer.state["batch_stats"]["BatchNorm_0"]["mean"])
    assert not np.allclose(mean, 0.0)
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), first)
    np.testing.assert_array_equal(
        to_np(layer.state["batch_stats"]["BatchNorm_0"]["mean"]), mean
    )


def test_dropout_rng_fresh_per_call_and_seeded():
    x, _ = image_data()
    a = FlaxLayer(ConvBN(), seed=7)
    b = FlaxLayer(ConvBN(), seed=7)
    a1, a2 = to_np(a(x, training=True)), to_np(a(x, training=True))
    assert not np.allclose(a1, a2)
    np.testing.assert_allclose(to_np(b(x, training=True)), a1, atol=1e-6)


def test_method_by_name_and_function():
    x, _ = image_data()
    module = Heads()
    by_name = FlaxLayer(module, method="features", seed=0)
    assert by_name(x).shape == (8, 3)
    assert [w.path.split("/", 1)[1] for w in by_name.trainable_weights] == [
        "params/head/bias",
        "params/head/kernel",
    ]
    variables = {"params": by_name.flax_variables()["params"]}

    def wrapper(module, inputs, training):
        return module.features(inputs) * (2.0 if training else 1.0)

    by_fn = FlaxLayer(module, method=wrapper, variables=variables)
    np.testing.assert_allclose(to_np(by_fn(x)), to_np(by_name(x)), atol=1e-6)
    np.testing.assert_allclose(
        to_np(by_fn(x, training=True)), 2 * to_np(by_name(x)), atol=1e-5
    )


def test_save_and_load_weights(tmp_path):
    x, y = image_data()
    model = sgd_model(FlaxLayer(ConvBN(), seed=0))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "flax.weights.h5")
    model.save_weights(path)
    other = sgd_model(FlaxLayer(ConvBN(), seed=5))
    other.load_weights(path)
    np.testing.assert_allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_keras_file_round_trip(tmp_path):
    x, y = image_data()
    model = sgd_model(FlaxLayer(ConvBN(rate=0.25), method="__call__", seed=0))
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "flax.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[-1]
    assert isinstance(layer, FlaxLayer) and layer.module.rate == 0.25
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


class Plain(nn.Module):
    """A module as most are written: no `get_config()`."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x.reshape((x.shape[0], -1)))


def test_module_without_get_config_saves_its_computation(tmp_path):
    layer = FlaxLayer(Plain(), seed=0)
    # Nothing to save before the layer is called: the message says so.
    with pytest.raises(TypeError, match=r"Plain has no `get_config\(\)`.*Call the"):
        layer.get_config()
    x, y = image_data()
    model = sgd_model(layer)
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "plain.keras")
    model.save(path)
    with pytest.warns(UserWarning, match="Plain` has no `get_config"):
        loaded = keras.saving.load_model(path)
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-6)
    assert loaded.layers[-1].module is None
    # A clone of the reloaded model runs the loaded computation too.
    clone = keras.models.clone_model(loaded)
    assert isinstance(clone.layers[-1], FlaxLayer) and clone.layers[-1].module is None
    np.testing.assert_allclose(clone.predict(x, verbose=0), want, atol=1e-6)
    assert_trains_apart(loaded, clone, x, y)
    # Saved again, it reloads the same way.
    again = os.path.join(tmp_path, "again.keras")
    loaded.save(again)
    with pytest.warns(UserWarning, match="Plain` has no `get_config"):
        twice = keras.saving.load_model(again)
    np.testing.assert_allclose(twice.predict(x, verbose=0), want, atol=1e-6)


def test_clone_model_copies_the_live_module():
    x, y = image_data()
    module = Plain()
    variables = module.init(jax.random.key(1), x[:1])
    given = sgd_model(FlaxLayer(module, variables=variables))
    fresh = sgd_model(FlaxLayer(module, seed=0))
    for model in (given, fresh):
        clone = keras.models.clone_model(model)
        layer = clone.layers[-1]
        assert layer.module is module and layer.name == model.layers[-1].name
        assert type(layer.name) is str
    # Variables that were given are the clone's initial values (a config
    # holds none); ones `module.init` made are made afresh, as Keras's
    # layers are, from the same seed.
    clone = keras.models.clone_model(given)
    want = module.apply(variables, x)
    np.testing.assert_allclose(clone.predict(x, verbose=0), want, atol=1e-6)
    fresh.fit(x, y, epochs=1, verbose=0)
    clone = keras.models.clone_model(fresh)
    other = sgd_model(FlaxLayer(module, seed=0))
    np.testing.assert_allclose(
        clone.predict(x, verbose=0), other.predict(x, verbose=0), atol=1e-6
    )
    assert_trains_apart(fresh, clone, x, y)  # weights of its own


def test_bad_arguments():
    nnx = pytest.importorskip("flax.nnx")
    with pytest.raises(TypeError, match="FlaxLayer.*NNXLayer"):
        FlaxLayer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="FlaxLayer.*instance"):
        FlaxLayer(ConvBN)
    with pytest.raises(ValueError, match="`method` 'nope'.*features"):
        FlaxLayer(Heads(), method="nope")
    with pytest.raises(TypeError, match="`variables`"):
        FlaxLayer(ConvBN(), variables=[1, 2])
