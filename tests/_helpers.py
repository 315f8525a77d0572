"""Helpers shared by the adapter tests."""

import jax
import keras
import numpy as np

from jaxlayer import _variables as V

LR = 0.1


def image_data(n=8, seed=0, shape=(8, 8, 1)):
    """Images of shape (n, *shape) and regression targets of shape (n, 2).

    The targets are a fixed linear function of the images, so that a model
    can learn them and `fit` lowering the loss is a reliable check.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    size = int(np.prod(shape))
    w = np.random.default_rng(1234).normal(size=(size, 2)) / np.sqrt(size)
    y = (x.reshape(n, size) @ w).astype("float32")
    return x, y


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_trees_close(actual, expected, atol=1e-5):
    """Same structure, same values (rtol 1e-5); `actual` may hold variables."""
    actual = jax.tree_util.tree_map(np.asarray, V.numpy_tree(actual))
    expected = jax.tree_util.tree_map(np.asarray, expected)
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(
        expected
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5),
        actual,
        expected,
    )


def sgd_model(layer, shape=(8, 8, 1), loss="mse", lr=LR):
    """A functional model around `layer`, compiled with plain SGD."""
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss)
    return model


def assert_trains_apart(model, clone, x, y):
    """Training `clone` leaves `model`'s outputs as they were."""
    before = model.predict(x, verbose=0)
    clone.compile(keras.optimizers.SGD(LR), "mse")
    clone.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=0)
