"""The NumPy bridge: inference only, compared with the pure-JAX reference.

Outputs are compared with `jax.jit` of the same function on the same
parameters (float32: rtol = atol = 1e-5).
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _reference import mlp_call, mlp_init
from jaxlayer import JaxLayer

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "numpy", reason="tests the NumPy bridge (KERAS_BACKEND=numpy)"
)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def stateful_call(params, state, rng, inputs, training):
    out = mlp_call(params, inputs - state["mean"])
    if training:
        out = out + 0.01 * jax.random.normal(rng, out.shape)
        state = {"mean": 0.9 * state["mean"] + 0.1 * inputs.mean(0)}
    return out, state


def stateful_init(rng, inputs):
    return mlp_init(rng, inputs), {"mean": jnp.full(inputs.shape[-1], 0.5)}


def jax_tree(tree):
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(keras.ops.convert_to_numpy(v)), tree
    )


def data(n=16, d=5):
    rs = np.random.RandomState(0)
    return rs.randn(n, d).astype("float32"), rs.randn(n, 3).astype("float32")


def test_call_and_predict_match_jax():
    x, _ = data()
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    out = layer(x)
    assert isinstance(out, np.ndarray)
    want = jax.jit(mlp_call)(jax_tree(layer.params), x)
    np.testing.assert_allclose(out, want, **TOL)
    model = keras.Sequential([keras.Input((5,)), layer])
    np.testing.assert_allclose(model.predict(x, batch_size=5, verbose=0), want, **TOL)


def test_pytree_inputs_and_outputs():
    def call_fn(params, inputs):
        h = mlp_call(params, inputs["a"] + inputs["b"])
        return {"sum": h.sum(-1), "h": h}

    def init_fn(rng, inputs):
        return mlp_init(rng, inputs["a"])

    x, _ = data()
    layer = JaxLayer(call_fn, init_fn, seed=0)
    out = layer({"a": x, "b": 2 * x})
    want = call_fn(jax_tree(layer.params), {"a": x, "b": 2 * x})
    for key in ("sum", "h"):
        np.testing.assert_allclose(out[key], want[key], **TOL)


def test_given_params_and_state_left_untouched_in_inference():
    x, _ = data()
    params = mlp_init(jax.random.PRNGKey(3), x)
    layer = JaxLayer(stateful_call, params=params, state={"mean": np.ones(5)})
    out = layer(x)
    want, _ = stateful_call(params, {"mean": jnp.ones(5)}, None, x, False)
    np.testing.assert_allclose(out, want, **TOL)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.predict(x, verbose=0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.state["mean"]), np.ones(5), **TOL
    )


def test_training_call_updates_state():
    x, _ = data()
    layer = JaxLayer(stateful_call, stateful_init, seed=0)
    layer(x[:2])
    before = jax_tree(layer.state)
    layer(x, training=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.state["mean"]),
        0.9 * before["mean"] + 0.1 * x.mean(0),
        **TOL,
    )


def test_outputs_are_writable_numpy_arrays():
    x, _ = data()
    out = JaxLayer(mlp_call, mlp_init, seed=0)(x)
    out += 1.0  # NumPy-backend code may update results in place


def test_fit_raises_keras_error():
    x, y = data()
    model = keras.Sequential([keras.Input((5,)), JaxLayer(mlp_call, mlp_init, seed=0)])
    model.compile("sgd", "mse")
    with pytest.raises(NotImplementedError, match="fit not implemented"):
        model.fit(x, y, verbose=0)


def test_model_library_adapters_predict():
    """Each adapter's inference on the NumPy backend equals the library's own
    forward on the same variables."""
    import equinox as eqx
    import flax.linen as nn
    import haiku as hk
    from flax import nnx

    from jaxlayer import EquinoxLayer, FlaxLayer, NNXLayer

    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, training=False):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not training)(x)
            return nn.Dense(2)(x.reshape((x.shape[0], -1)))

    module = CNN()
    variables = module.init(jax.random.key(0), x)
    layer = FlaxLayer(module, variables=variables)
    np.testing.assert_allclose(layer(x), module.apply(variables, x), **TOL)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(64, 2, rngs=rngs)
            self.bn = nnx.BatchNorm(2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.linear(x.reshape((x.shape[0], -1)))))

    net = Net(nnx.Rngs(0))
    layer = NNXLayer(net)
    net.eval()
    np.testing.assert_allclose(layer(x), net(jnp.asarray(x)), **TOL)

    mlp = eqx.nn.MLP(64, 2, 8, 1, key=jax.random.key(0))
    flat = x.reshape(4, 64)
    layer = EquinoxLayer(mlp)
    np.testing.assert_allclose(layer(flat), jax.vmap(mlp)(flat), **TOL)

    def forward(inputs, training):
        h = hk.Linear(2)(inputs.reshape((inputs.shape[0], -1)))
        return hk.BatchNorm(True, True, 0.9)(h, is_training=training)

    f = hk.transform_with_state(forward)
    params, state = f.init(jax.random.key(0), x, True)
    layer = JaxLayer(f.apply, params=params, state=state)
    expected, _ = f.apply(params, state, None, x, False)
    np.testing.assert_allclose(layer(x), expected, **TOL)
    model = keras.Sequential([keras.Input((8, 8, 1)), layer])
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, **TOL)


@keras.saving.register_keras_serializable(package="jaxlayer_numpy_tests")
def doubled(params, inputs):
    return inputs @ params["w"]


def test_keras_file_round_trip(tmp_path):
    layer = JaxLayer(doubled, params={"w": 2 * np.eye(3, dtype="float32")})
    model = keras.Sequential([keras.Input((3,)), layer])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), 2 * x, **TOL)


def test_a_saved_largest_length_is_kept_and_more_refused(tmp_path):
    # A table of 6 rows sliced to the length (GPT-2's causal mask): exported
    # with `length <= 6`, and the reloaded layer refuses 7.
    def bounded(params, inputs):
        pos = params["pos"][: inputs.shape[1]]
        return jnp.tanh(inputs[..., None] * pos[None]) @ params["w"]

    rs = np.random.RandomState(3)
    params = {"pos": rs.randn(6, 4).astype("float32"), "w": rs.randn(4, 2)}
    params["w"] = params["w"].astype("float32")
    inputs = keras.Input((None,))
    model = keras.Model(inputs, JaxLayer(bounded, params=params, name="maxlen")(inputs))
    model.predict(rs.randn(2, 3).astype("float32"), verbose=0)
    path = str(tmp_path / "maxlen.keras")
    with pytest.warns(UserWarning, match=r"dimension 1 up to 6 only"):
        model.save(path)
    with pytest.warns(UserWarning, match="not registered"):
        loaded = keras.saving.load_model(path)
    for batch, length in [(2, 3), (3, 6), (1, 1)]:
        x = rs.randn(batch, length).astype("float32")
        np.testing.assert_allclose(
            loaded.predict(x, verbose=0), jax.jit(bounded)(params, x), **TOL
        )
    with pytest.raises(ValueError, match=r"maxlen.*inputs\[0\] dimension 1 up to 6"):
        loaded.predict(rs.randn(2, 7).astype("float32"), verbose=0)
