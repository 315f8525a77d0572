"""EquinoxLayer against Equinox's own (vmapped) forward and gradients."""

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
from jaxlayer.adapters import EquinoxLayer

# Equinox convolutions take channels first.
CHW = (1, 8, 8)

eqx = pytest.importorskip("equinox")


class ConvBN(eqx.Module):
    """Conv -> BatchNorm -> relu -> Dropout -> Linear, on one 1x8x8 example."""

    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, rate=0.5, *, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
        self.drop = eqx.nn.Dropout(rate)
        self.out = eqx.nn.Linear(4 * 8 * 8, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        x, state = self.bn(self.conv(x), state)
        x = self.drop(jax.nn.relu(x), key=key)
        return self.out(x.reshape(-1)), state


def _make(rate=0.5, seed=0):
    return eqx.nn.make_with_state(ConvBN)(rate, key=jax.random.PRNGKey(seed))


def _batched(model):
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")


def _state_tree(model, state):
    return {
        "bn": {
            "batch_counter": state.get(model.bn.batch_counter),
            "batch_state_index": state.get(model.bn.batch_state_index),
        }
    }


def test_weights_named_after_module_fields():
    layer = EquinoxLayer(*_make(), name="net")
    assert [w.path for w in layer.trainable_weights] == [
        "net/conv/weight",
        "net/conv/bias",
        "net/bn/weight",
        "net/bn/bias",
        "net/out/weight",
        "net/out/bias",
    ]
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        "net/bn/batch_counter",
        "net/bn/batch_state_index/0",
        "net/bn/batch_state_index/1",
    ]


def test_inference_matches_equinox():
    x, _ = image_data(shape=CHW)
    module, state = _make()
    layer = EquinoxLayer(module, state)
    expected, _ = _batched(eqx.nn.inference_mode(module))(x, state)
    np.testing.assert_allclose(to_np(layer(x)), expected, atol=1e-5)


def test_sgd_step_matches_jax_grad_and_updates_state():
    x, y = image_data(shape=CHW)
    module, state = _make(rate=0.0)
    layer = EquinoxLayer(module, state)
    model = sgd_model(layer, shape=CHW)
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def loss(params):
        out, new_state = _batched(eqx.combine(params, static))(x, state)
        return jnp.mean((out - y) ** 2), new_state

    grads, new_state = jax.grad(loss, has_aux=True)(params)
    model.train_on_batch(x, y)
    expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)
    assert_trees_close(layer.params, expected)
    assert_trees_close(layer.state, _state_tree(module, new_state))


def test_fit_lowers_loss_and_inference_leaves_state_alone():
    x, y = image_data(32, shape=CHW)
    layer = EquinoxLayer(*_make(rate=0.2), seed=3)
    model = sgd_model(layer, shape=CHW)
    before = model.evaluate(x, y, verbose=0)
    weight = to_np(layer.params.conv.weight).copy()
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    assert not np.allclose(to_np(layer.params.conv.weight), weight)
    assert int(to_np(layer.state["bn"]["batch_counter"])) == 8 * 4
    hidden = to_np(layer.state["bn"]["batch_state_index"][0]).copy()
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), first)
    np.testing.assert_array_equal(
        to_np(layer.state["bn"]["batch_state_index"][0]), hidden
    )

    trained, trained_state = layer.to_module()
    assert isinstance(trained, ConvBN)
    expected, _ = _batched(eqx.nn.inference_mode(trained))(x, trained_state)
    np.testing.assert_allclose(expected, first, atol=1e-5)


def test_dropout_key_fresh_per_call_per_example_and_seeded():
    x, _ = image_data(shape=CHW)
    x = np.repeat(x[:1], 8, axis=0)
    a = EquinoxLayer(*_make(), seed=7)
    b = EquinoxLayer(*_make(), seed=7)
    a1, a2 = to_np(a(x, training=True)), to_np(a(x, training=True))
    assert not np.allclose(a1, a2)
    assert not np.allclose(a1[0], a1[1])  # one key per example
    np.testing.assert_allclose(to_np(b(x, training=True)), a1, atol=1e-6)


def test_stateless_module_and_no_vmap():
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.PRNGKey(0))
    layer = EquinoxLayer(mlp, name="mlp")
    assert layer.non_trainable_weights == []
    assert layer.trainable_weights[0].path == "mlp/layers/0/weight"
    np.testing.assert_allclose(to_np(layer(x)), jax.vmap(mlp)(x), atol=1e-5)

    class Whole(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return x @ self.w - jnp.mean(x @ self.w, axis=0)  # needs the whole batch

    whole = Whole(jnp.ones((4, 3)))
    layer = EquinoxLayer(whole, vmap=False)
    np.testing.assert_allclose(to_np(layer(x)), whole(x), atol=1e-5)
    assert isinstance(layer.to_module(), Whole)


def test_save_and_load_weights(tmp_path):
    x, y = image_data(shape=CHW)
    model = sgd_model(EquinoxLayer(*_make()), shape=CHW)
    # Full batches: on TensorFlow a partial batch has an unknown size, and JAX
    # cannot export BatchNorm's `pmean` over a vmapped axis of unknown size.
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "eqx.weights.h5")
    model.save_weights(path)
    other = sgd_model(EquinoxLayer(*_make(seed=1)), shape=CHW)
    other.load_weights(path)
    np.testing.assert_allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_keras_file_reloads_from_its_export_without_the_module(tmp_path):
    # The module is not in the file: the layer comes back as its exported
    # computation (tests/test_portable_saving.py covers fine-tuning and other
    # backends); `to_module()` then says the module's class is missing.
    x, _ = image_data(shape=CHW)
    model = sgd_model(EquinoxLayer(*_make()), shape=CHW)
    want = model.predict(x, verbose=0)
    path = str(tmp_path / "eqx.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-5)
    with pytest.raises(ValueError, match="needs the module's class"):
        loaded.layers[-1].to_module()
    # A clone of the reloaded model runs the loaded computation too.
    clone = keras.models.clone_model(loaded)
    assert isinstance(clone.layers[-1], EquinoxLayer)
    np.testing.assert_allclose(clone.predict(x, verbose=0), want, atol=1e-5)
    _, y = image_data(shape=CHW)
    assert_trains_apart(loaded, clone, x, y)


def test_clone_model_copies_the_module_with_its_weights():
    x, y = image_data(shape=CHW)
    module, state = _make()
    model = sgd_model(EquinoxLayer(module, state, seed=3), shape=CHW)
    model.fit(x, y, epochs=1, verbose=0)
    clone = keras.models.clone_model(model)
    layer = clone.layers[-1]
    assert isinstance(layer, EquinoxLayer) and layer.axis_name == "batch"
    np.testing.assert_allclose(
        clone.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert_trains_apart(model, clone, x, y)  # weights of its own


def test_bad_arguments():
    module, state = _make()
    with pytest.raises(TypeError, match="EquinoxLayer.*instance"):
        EquinoxLayer(ConvBN)
    with pytest.raises(TypeError, match="`state` must be"):
        EquinoxLayer(module, {"bn": 0})
    mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no `eqx.nn.StateIndex`"):
        EquinoxLayer(mlp, state)
    with pytest.raises(ValueError, match="no `state` was given"):
        EquinoxLayer(module)
    nnx = pytest.importorskip("flax.nnx")
    with pytest.raises(TypeError, match="EquinoxLayer.*NNXLayer"):
        EquinoxLayer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_state_from_another_model_is_refused():
    class Other(eqx.Module):
        bn: eqx.nn.BatchNorm

        def __init__(self):
            self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")

        def __call__(self, x, state):
            return self.bn(x, state)

    module, _ = _make()
    _, other_state = eqx.nn.make_with_state(Other)()
    with pytest.raises(ValueError, match="does not match the module"):
        EquinoxLayer(module, other_state)


class Sampler(eqx.Module):
    """Adds noise whatever the mode: its `__call__` requires `key`."""

    linear: eqx.nn.Linear

    def __call__(self, x, key):
        return self.linear(x) + jax.random.normal(key, (2,))


def test_module_requiring_a_key_gets_a_fresh_key_in_inference_too():
    layer = EquinoxLayer(Sampler(eqx.nn.Linear(3, 2, key=jax.random.key(0))), seed=4)
    x = np.ones((2, 3), "float32")
    first, second = to_np(layer(x)), to_np(layer(x))
    assert not np.allclose(first, second)  # not a fixed key
    again = EquinoxLayer(Sampler(eqx.nn.Linear(3, 2, key=jax.random.key(0))), seed=4)
    np.testing.assert_allclose(to_np(again(x)), first)  # seeded


def test_channels_last_input_to_a_conv_says_what_the_module_expects():
    conv = eqx.nn.Conv2d(1, 4, 3, key=jax.random.key(0))
    layer = EquinoxLayer(conv, name="conv")
    with pytest.raises(ValueError, match=r"EquinoxLayer 'conv'.*shape \(8, 8, 1\)"):
        layer(np.ones((2, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match=r"channels first: \(1, H, W\)"):
        layer(np.ones((2, 8, 8, 1), "float32"))
    assert layer(np.ones((2, 1, 8, 8), "float32")).shape == (2, 4, 6, 6)
