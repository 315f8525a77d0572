"""Haiku through `JaxLayer` (`hk.transform`, `transform_with_state`, ...)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _helpers import LR, assert_trees_close, image_data, sgd_model, to_np
from conftest import BACKEND
from jaxlayer import JaxLayer
from jaxlayer import _variables as V

hk = pytest.importorskip("haiku")


# The example of the JaxLayer spec, verbatim.
class MyHaikuModule(hk.Module):
    def __call__(self, x, training):
        x = hk.Conv2D(32, (3, 3))(x)
        x = jax.nn.relu(x)
        x = hk.AvgPool((1, 2, 2, 1), (1, 2, 2, 1), "VALID")(x)
        x = hk.Flatten()(x)
        x = hk.Linear(200)(x)
        if training:
            x = hk.dropout(rng=hk.next_rng_key(), rate=0.3, x=x)
        x = jax.nn.relu(x)
        x = hk.Linear(10)(x)
        x = jax.nn.softmax(x)
        return x


def my_haiku_module_fn(inputs, training):
    module = MyHaikuModule()
    return module(inputs, training)


def _conv_bn(rate):
    """Conv -> BatchNorm -> relu -> dropout -> Linear, with Haiku state."""

    def net(inputs, training):
        x = hk.Conv2D(4, 3, name="conv")(inputs)
        x = hk.BatchNorm(True, True, 0.5, name="bn")(x, is_training=training)
        x = jax.nn.relu(x)
        if training and rate:
            x = hk.dropout(hk.next_rng_key(), rate, x)
        return hk.Linear(2, name="out")(hk.Flatten()(x))

    return hk.transform_with_state(net)


def test_spec_example():
    transformed_module = hk.transform(my_haiku_module_fn)
    keras_layer = JaxLayer(
        call_fn=transformed_module.apply,
        init_fn=transformed_module.init,
        seed=0,
    )
    x, _ = image_data()
    y = np.eye(10, dtype="float32")[np.arange(8) % 10]
    model = sgd_model(keras_layer, loss="categorical_crossentropy")
    expected = transformed_module.apply(
        V.numpy_tree(keras_layer.params), None, x, False
    )
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    assert {w.path.split("/", 1)[1] for w in keras_layer.trainable_weights} >= {
        "my_haiku_module/conv2_d/w",
        "my_haiku_module/linear_1/b",
    }
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=3, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    a, b = to_np(keras_layer(x, training=True)), to_np(keras_layer(x, training=True))
    assert not np.allclose(a, b)  # a fresh dropout key per training call


def test_transform_with_state_inference_matches_haiku():
    x, _ = image_data()
    f = _conv_bn(0.5)
    params, state = f.init(jax.random.PRNGKey(0), x, True)
    layer = JaxLayer(f.apply, params=params, state=state, name="hk")
    expected, _ = f.apply(params, state, None, x, False)
    np.testing.assert_allclose(to_np(layer(x)), expected, atol=1e-5)
    paths = sorted(w.path for w in layer.non_trainable_weights)
    assert "hk/bn/mean_ema/average" in paths
    assert "hk/conv/w" in [w.path for w in layer.trainable_weights]


def test_sgd_step_matches_jax_grad_and_updates_state():
    x, y = image_data()
    f = _conv_bn(0.0)
    params, state = f.init(jax.random.PRNGKey(0), x, True)
    layer = JaxLayer(f.apply, params=params, state=state)
    model = sgd_model(layer)

    def loss(params):
        out, new_state = f.apply(params, state, jax.random.PRNGKey(1), x, True)
        return jnp.mean((out - y) ** 2), new_state

    grads, new_state = jax.grad(loss, has_aux=True)(params)
    model.train_on_batch(x, y)
    expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)
    assert_trees_close(layer.params, expected)
    assert_trees_close(layer.state, new_state)


def test_fit_lowers_loss_and_inference_leaves_state_alone():
    x, y = image_data(32)
    f = _conv_bn(0.2)
    layer = JaxLayer(f.apply, f.init, seed=3)
    model = sgd_model(layer)
    before = model.evaluate(x, y, verbose=0)
    w = to_np(layer.params["conv"]["w"]).copy()
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    assert not np.allclose(to_np(layer.params["conv"]["w"]), w)
    average = to_np(layer.state["bn/~/mean_ema"]["average"]).copy()
    assert not np.allclose(average, 0.0)
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), first)
    np.testing.assert_array_equal(
        to_np(layer.state["bn/~/mean_ema"]["average"]), average
    )


def test_without_apply_rng():
    def mlp(inputs):
        return hk.nets.MLP([8, 2])(inputs)

    f = hk.without_apply_rng(hk.transform(mlp))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    layer = JaxLayer(f.apply, f.init, seed=0)
    out = to_np(layer(x))
    np.testing.assert_allclose(out, f.apply(V.numpy_tree(layer.params), x), atol=1e-5)
    assert layer.trainable_weights[0].path.endswith("mlp/linear_0/b")


def test_save_and_load_weights(tmp_path):
    x, y = image_data()
    f = _conv_bn(0.2)
    model = sgd_model(JaxLayer(f.apply, f.init, seed=0))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "hk.weights.h5")
    model.save_weights(path)
    other = sgd_model(JaxLayer(f.apply, f.init, seed=1))
    other.load_weights(path)
    np.testing.assert_allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def resnet_fn(inputs, is_training):
    return hk.nets.ResNet18(4, resnet_v2=False)(inputs, is_training=is_training)


@pytest.mark.skipif(BACKEND == "numpy", reason="fit: training backends")
def test_resnet18_with_nested_modules_fits():
    """Haiku's ResNet18 (nested modules, `~` in every name, batch norm state)
    trains with Adam on every backend, with readable weight paths."""

    net = hk.transform_with_state(resnet_fn)

    def call_fn(params, state, rng, inputs, training):
        return net.apply(params, state, rng, inputs, training)

    def init_fn(rng, inputs):
        return net.init(rng, inputs, True)

    layer = JaxLayer(call_fn, init_fn, seed=0, name="resnet")
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, layer(inputs))
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    rs = np.random.RandomState(0)
    x = rs.rand(8, 16, 16, 3).astype("float32")
    y = np.eye(4, dtype="float32")[rs.randint(0, 4, 8)]
    before = [to_np(w).copy() for w in layer.trainable_weights[:3]]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = [to_np(w) for w in layer.trainable_weights[:3]]
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    paths = [w.path for w in layer.weights]
    assert "resnet/res_net18/block_group_0/block_0/batchnorm_0/offset" in paths
    assert not any("~" in p for p in paths)
