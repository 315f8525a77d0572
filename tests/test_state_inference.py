"""State is stored on every call, in training and in inference, as Keras does.

A `call_fn` with a `state` argument returns `(outputs, new_state)`; the layer
stores `new_state` whatever the mode: eager calls, `predict`, `evaluate`,
inside `tf.function`, under `torch.no_grad`. That is what stateful inference
needs (a counter, a streaming carry, a KV cache). A function that must leave
its state alone in inference returns it unchanged.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from conftest import BACKEND
from jaxlayer import JaxLayer

TOL = dict(rtol=1e-5, atol=1e-5)


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def counter_call(params, state, inputs):
    """Counts calls and the examples seen; no `training` argument."""
    new_state = {
        "calls": state["calls"] + 1,
        "seen": state["seen"] + inputs.shape[0],
    }
    return inputs * params["scale"], new_state


def counter_layer():
    return JaxLayer(
        counter_call,
        params={"scale": np.full(3, 2.0, "float32")},
        state={"calls": np.zeros((), "int32"), "seen": np.zeros((), "int32")},
        name="counter",
    )


def counts(layer):
    return int(to_np(layer.state["calls"])), int(to_np(layer.state["seen"]))


def test_eager_inference_calls_store_the_state():
    layer = counter_layer()
    x = np.ones((4, 3), "float32")
    np.testing.assert_allclose(to_np(layer(x)), 2 * x)
    assert counts(layer) == (1, 4)
    layer(x, training=False)
    assert counts(layer) == (2, 8)


def test_predict_and_evaluate_store_the_state():
    layer = counter_layer()
    model = keras.Sequential([keras.Input((3,)), layer])
    x = np.ones((10, 3), "float32")
    model.predict(x, batch_size=4, verbose=0)  # batches of 4, 4, 2
    assert counts(layer) == (3, 10)
    if BACKEND == "numpy":
        return
    model.compile("sgd", "mse")
    model.evaluate(x, 2 * x, batch_size=5, verbose=0)
    assert counts(layer) == (5, 20)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function: TensorFlow")
def test_inference_inside_tf_function_stores_the_state():
    import tensorflow as tf

    layer = counter_layer()
    x = tf.ones((4, 3))
    layer(x)

    @tf.function
    def serve(x):
        return layer(x, training=False)

    serve(x)
    serve(x)
    assert counts(layer) == (3, 12)


@pytest.mark.skipif(BACKEND != "jax", reason="a foreign jax trace: jax backend")
def test_a_foreign_jax_trace_leaves_the_state_concrete():
    # Keras's ONNX export on jax runs `model(x)` under jax2onnx's trace (a
    # `jax.jit` here): its new state is a tracer, which must not stay in the
    # variables. Inside a `StatelessScope` the update is collected as usual.
    layer = counter_layer()
    x = np.ones((4, 3), "float32")
    layer(x)
    out = jax.jit(lambda x: layer(x, training=False))(x)
    np.testing.assert_allclose(np.asarray(out), 2 * x, **TOL)
    assert counts(layer) == (1, 4)
    layer(x)  # a later call runs on concrete values
    assert counts(layer) == (2, 8)

    def stateless(values, x):
        with keras.StatelessScope(
            state_mapping=list(zip(layer.variables, values, strict=True))
        ) as scope:
            layer(x)
        state = layer.non_trainable_weights
        return {v.path.split("/")[-1]: scope.get_current_value(v) for v in state}

    values = [v.value for v in layer.variables]
    new = jax.jit(stateless)(values, x)
    assert {k: int(np.asarray(v)) for k, v in new.items()} == {"calls": 3, "seen": 12}
    assert counts(layer) == (2, 8)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.no_grad: PyTorch")
def test_inference_under_no_grad_stores_the_state():
    import torch

    layer = counter_layer()
    with torch.no_grad():
        layer(torch.ones(4, 3))
        layer(torch.ones(2, 3))
    assert counts(layer) == (2, 6)


def test_a_function_that_keeps_its_state_in_inference_keeps_it():
    def call_fn(params, state, inputs, training):
        if training:
            state = {"mean": 0.5 * state["mean"] + 0.5 * inputs.mean(axis=0)}
        return inputs - state["mean"], state

    layer = JaxLayer(call_fn, params={}, state={"mean": np.ones(3, "float32")})
    x = np.full((2, 3), 3.0, "float32")
    np.testing.assert_allclose(to_np(layer(x)), x - 1)
    np.testing.assert_allclose(to_np(layer.state["mean"]), np.ones(3))
    if BACKEND != "numpy":
        layer(x, training=True)
        np.testing.assert_allclose(to_np(layer.state["mean"]), np.full(3, 2.0))


def rnn_call(params, state, inputs):
    """A streaming tanh RNN: `state["h"]` carries across calls."""

    def step(h, x):
        h = jnp.tanh(x @ params["wx"] + h @ params["wh"])
        return h, h

    h, ys = jax.lax.scan(step, state["h"], jnp.swapaxes(inputs, 0, 1))
    return jnp.swapaxes(ys, 0, 1), {"h": h}


def test_streaming_rnn_carry_matches_one_pass_over_the_whole_sequence():
    """Chunks fed one call at a time give the outputs of the whole sequence
    run at once by the pure-JAX reference (the carry is the state)."""
    rs = np.random.RandomState(0)
    params = {
        "wx": (rs.randn(3, 5) * 0.5).astype("float32"),
        "wh": (rs.randn(5, 5) * 0.5).astype("float32"),
    }
    sequence = rs.randn(2, 12, 3).astype("float32")
    h0 = np.zeros((2, 5), "float32")
    want, _ = jax.jit(rnn_call)(params, {"h": h0}, sequence)
    layer = JaxLayer(rnn_call, params=params, state={"h": h0})
    chunks = [to_np(layer(sequence[:, i : i + 4])) for i in range(0, 12, 4)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), want, **TOL)
    np.testing.assert_allclose(to_np(layer.state["h"]), want[:, -1], **TOL)


def test_nnx_layer_stores_what_the_module_returns_in_inference():
    nnx = pytest.importorskip("flax.nnx")
    from jaxlayer import NNXLayer

    class Count(nnx.Variable):
        pass

    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)
            self.calls = Count(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls.value = self.calls.value + 1
            return self.linear(x)

    layer = NNXLayer(Counting(nnx.Rngs(0)), name="counting")
    x = np.ones((4, 3), "float32")
    layer(x)
    layer(x, training=False)
    assert int(to_np(layer.state["calls"])) == 2


def test_equinox_layer_stores_what_the_module_returns_in_inference():
    eqx = pytest.importorskip("equinox")
    from jaxlayer import EquinoxLayer

    class Counting(eqx.Module):
        linear: eqx.nn.Linear
        calls: eqx.nn.StateIndex

        def __init__(self, key):
            self.linear = eqx.nn.Linear(3, 2, key=key)
            self.calls = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))

        def __call__(self, x, state):
            state = state.set(self.calls, state.get(self.calls) + 1)
            return self.linear(x), state

    model, state = eqx.nn.make_with_state(Counting)(jax.random.key(0))
    layer = EquinoxLayer(model, state, name="counting")
    x = np.ones((4, 3), "float32")
    layer(x)
    layer(x, training=False)
    # Vmapped over the batch, the state is shared: one update per call.
    assert int(to_np(layer.state["calls"])) == 2
