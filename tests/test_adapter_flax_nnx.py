"""NNXLayer (Flax NNX) against Flax's own forward and gradients."""

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
from jaxlayer.adapters import NNXLayer

nnx = pytest.importorskip("flax.nnx")


class ConvBN(nnx.Module):
    """Conv -> BatchNorm -> relu -> Dropout -> Linear: 8x8x1 inputs, 2 outputs."""

    def __init__(self, rate=0.5, *, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(8 * 8 * 4, 2, rngs=rngs)

    def __call__(self, x):
        x = self.drop(jax.nn.relu(self.bn(self.conv(x))))
        return self.out(x.reshape((x.shape[0], -1)))


def test_weights_named_after_module_attributes():
    layer = NNXLayer(ConvBN(rngs=nnx.Rngs(0)), name="net")
    assert sorted(w.path for w in layer.trainable_weights) == [
        "net/bn/bias",
        "net/bn/scale",
        "net/conv/bias",
        "net/conv/kernel",
        "net/out/bias",
        "net/out/kernel",
    ]
    # RNG streams are not weights: they are reseeded on every training call.
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        "net/bn/mean",
        "net/bn/var",
    ]


def test_inference_matches_nnx_eval():
    x, _ = image_data()
    module = ConvBN(rngs=nnx.Rngs(0))
    layer = NNXLayer(module)
    module.eval()
    np.testing.assert_allclose(to_np(layer(x)), module(x), atol=1e-5)
    # No `.eval()` needed on the module given to the layer.
    layer2 = NNXLayer(ConvBN(rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(to_np(layer2(x)), module(x), atol=1e-5)


def test_sgd_step_matches_jax_grad_and_updates_batch_stats():
    x, y = image_data()
    module = ConvBN(rate=0.0, rngs=nnx.Rngs(0))
    layer = NNXLayer(module)
    model = sgd_model(layer)
    module.train()
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    # Flax's own gradient; it also updates the module's batch statistics.
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(module)
    stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    model.train_on_batch(x, y)
    expected = jax.tree_util.tree_map(
        lambda p, g: p - LR * g, params, nnx.to_pure_dict(grads)
    )
    assert_trees_close(layer.params, expected)
    assert_trees_close(layer.state, stats)


def test_fit_lowers_loss_and_inference_leaves_stats_alone():
    x, y = image_data(32)
    layer = NNXLayer(ConvBN(rate=0.2, rngs=nnx.Rngs(0)), seed=3)
    model = sgd_model(layer)
    before = model.evaluate(x, y, verbose=0)
    kernel = to_np(layer.params["conv"]["kernel"]).copy()
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    assert not np.allclose(to_np(layer.params["conv"]["kernel"]), kernel)
    mean = to_np(layer.state["bn"]["mean"]).copy()
    assert not np.allclose(mean, 0.0)
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), first)
    np.testing.assert_array_equal(to_np(layer.state["bn"]["mean"]), mean)

    trained = layer.to_module()
    assert isinstance(trained, ConvBN)
    np.testing.assert_allclose(trained.bn.mean[...], mean)
    trained.eval()
    np.testing.assert_allclose(trained(x), first, atol=1e-5)


def test_dropout_fresh_per_call_and_seeded():
    x, _ = image_data()
    a = NNXLayer(ConvBN(rngs=nnx.Rngs(0)), seed=7)
    b = NNXLayer(ConvBN(rngs=nnx.Rngs(0)), seed=7)
    a1, a2 = to_np(a(x, training=True)), to_np(a(x, training=True))
    assert not np.allclose(a1, a2)
    np.testing.assert_allclose(to_np(b(x, training=True)), a1, atol=1e-6)
    keras.utils.set_random_seed(11)
    c1 = to_np(NNXLayer(ConvBN(rngs=nnx.Rngs(0)))(x, training=True))
    keras.utils.set_random_seed(11)
    c2 = to_np(NNXLayer(ConvBN(rngs=nnx.Rngs(0)))(x, training=True))
    np.testing.assert_allclose(c1, c2, atol=1e-6)


def test_save_and_load_weights(tmp_path):
    x, y = image_data()
    model = sgd_model(NNXLayer(ConvBN(rngs=nnx.Rngs(0))))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "nnx.weights.h5")
    model.save_weights(path)
    other = sgd_model(NNXLayer(ConvBN(rngs=nnx.Rngs(1))))
    other.load_weights(path)
    np.testing.assert_allclose(
        other.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_keras_file_reloads_from_its_export_without_the_module(tmp_path):
    # The module is not in the file: the layer comes back as its exported
    # computation (tests/test_portable_saving.py covers fine-tuning and other
    # backends); `to_module()` then says the module's class is missing.
    x, _ = image_data()
    model = sgd_model(NNXLayer(ConvBN(rngs=nnx.Rngs(0))))
    want = model.predict(x, verbose=0)
    path = str(tmp_path / "nnx.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-5)
    with pytest.raises(ValueError, match="needs the module's class"):
        loaded.layers[-1].to_module()


def test_clone_model_copies_the_module_with_its_weights():
    x, y = image_data()
    model = sgd_model(NNXLayer(ConvBN(rngs=nnx.Rngs(0)), seed=3))
    model.fit(x, y, epochs=1, verbose=0)
    clone = keras.models.clone_model(model)
    layer = clone.layers[-1]
    assert isinstance(layer, NNXLayer) and type(layer.to_module()) is ConvBN
    np.testing.assert_allclose(
        clone.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert_trains_apart(model, clone, x, y)  # weights of its own


def test_bad_arguments():
    linen = pytest.importorskip("flax.linen")
    with pytest.raises(TypeError, match="NNXLayer.*FlaxLayer"):
        NNXLayer(linen.Dense(2))
    with pytest.raises(TypeError, match="NNXLayer.*instance"):
        NNXLayer(ConvBN)
