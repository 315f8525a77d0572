"""The JaxLayer contract, checked against a pure-JAX reference on every backend.

Tolerances: float32 outputs and one-step weight updates agree with `jax.jit`
and `jax.grad` of the same function within rtol=1e-5, atol=1e-5 (1e-4 for
quantities that go through an optimizer step).
"""

import itertools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _reference import (
    IN,
    OUT,
    make_call_fn,
    make_init_fn,
    numpy_tree,
    reference_apply,
    reference_init,
)
from conftest import BACKEND
from jaxlayer import JaxLayer

TOL = dict(rtol=1e-5, atol=1e-5)
STEP_TOL = dict(rtol=1e-4, atol=1e-5)


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def variables_tree(tree):
    return jax.tree_util.tree_map(to_np, tree)


# Every contract combination: with/without state, rng and training, and the
# weights given at construction or made by init_fn.
KINDS = [
    pytest.param(stateful, rng, training, given, id=f"{s}-{r}-{t}-{g}")
    for (stateful, s), (rng, r), (training, t), (given, g) in itertools.product(
        [(False, "stateless"), (True, "stateful")],
        [(False, "norng"), (True, "rng")],
        [(False, "notraining"), (True, "training")],
        [(False, "init_fn"), (True, "given")],
    )
]


def make_layer(stateful, rng, training, given, seed=1, **kwargs):
    names = ["params"] + (["state"] if stateful else [])
    names += (["rng"] if rng else []) + ["inputs"] + (["training"] if training else [])
    call_fn = make_call_fn(names)
    if given:
        init = reference_init(jax.random.PRNGKey(7), jnp.ones((1, IN)), stateful)
        params, state = init if stateful else (init, None)
        return JaxLayer(call_fn, params=params, state=state, seed=seed, **kwargs)
    init_names = ["rng", "inputs"] + (["training"] if training else [])
    return JaxLayer(call_fn, make_init_fn(init_names, stateful), seed=seed, **kwargs)


def current_values(layer):
    params = variables_tree(layer.params)
    state = variables_tree(layer.state) if layer.state is not None else None
    return params, state


def data(n=8, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(n, IN).astype("float32"), rs.randn(n, OUT).astype("float32")


@pytest.mark.parametrize("stateful,rng,training,given", KINDS)
def test_inference_matches_reference(stateful, rng, training, given):
    layer = make_layer(stateful, rng, training, given)
    x, _ = data()
    layer.build(x.shape)
    params, state = current_values(layer)
    out = to_np(layer(x))
    # Without a `training` argument the reference updates its state in every
    # call; with one, only in training.
    ref = jax.jit(reference_apply, static_argnums=4)(
        params, state, None, x, not training
    )
    if stateful:
        ref, ref_state = ref
    np.testing.assert_allclose(out, ref, **TOL)
    # The layer stores the state the function returns, in inference too.
    if stateful:
        after = current_values(layer)[1]
        np.testing.assert_allclose(after["mean"], ref_state["mean"], **TOL)
        assert int(after["count"]) == (0 if training else 1)


@pytest.mark.parametrize("stateful,rng,training,given", KINDS)
def test_training_step_matches_jax_grad(stateful, rng, training, given):
    """One SGD step through `train_on_batch`, with a Keras Dense before the
    JaxLayer (gradients must reach the inputs), equals the pure-JAX step."""
    lr = 0.1
    x, y = data()
    layer = make_layer(stateful, rng, training, given)
    dense = keras.layers.Dense(
        IN, use_bias=False, kernel_initializer=keras.initializers.Identity()
    )
    model = keras.Sequential([keras.Input((IN,)), dense, layer])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    params, state = current_values(layer)
    kernel = to_np(dense.kernel)
    key = None
    if rng:
        # The layer draws its key from its SeedGenerator: the state before
        # the step is the key used in the step.
        key = to_np(layer.seed_generator.state.value).astype(np.uint32)

    def loss_fn(trainables):
        k, p = trainables
        out = reference_apply(p, state, key, x @ k, True)
        out, new_state = out if stateful else (out, None)
        return jnp.mean((out - y) ** 2), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        (kernel, params)
    )
    expected_kernel, expected_params = jax.tree_util.tree_map(
        lambda p, g: p - lr * g, (kernel, params), grads
    )
    got_loss = model.train_on_batch(x, y)
    np.testing.assert_allclose(got_loss, loss, **STEP_TOL)
    np.testing.assert_allclose(to_np(dense.kernel), expected_kernel, **STEP_TOL)
    got_params, got_state = current_values(layer)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, **STEP_TOL),
        got_params,
        numpy_tree(expected_params),
    )
    if stateful:
        np.testing.assert_allclose(got_state["mean"], new_state["mean"], **TOL)
        assert int(got_state["count"]) == 1


def test_gradients_match_jax_grad_in_eager_mode():
    """Gradients of the layer's outputs with respect to its params and its
    inputs, taken with the backend's own autodiff, equal jax.grad."""
    layer = make_layer(False, False, False, False)
    x, _ = data()
    layer(x)
    params, _ = current_values(layer)

    def ref_loss(p, xx):
        return jnp.sum(reference_apply(p, None, None, xx, False) ** 2)

    ref_gp, ref_gx = jax.grad(ref_loss, argnums=(0, 1))(params, x)
    variables = layer.trainable_variables
    if BACKEND == "jax":

        def loss(values, xx):
            out, _ = layer.stateless_call(values, [], xx)
            return jnp.sum(out**2)

        gp, gx = jax.grad(loss, argnums=(0, 1))(
            [v.value for v in variables], jnp.asarray(x)
        )
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt) ** 2)
        *gp, gx = tape.gradient(loss, [v.value for v in variables] + [xt])
    elif BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        loss = torch.sum(layer(xt) ** 2)
        *gp, gx = torch.autograd.grad(loss, [v.value for v in variables] + [xt])
    else:
        pytest.skip(f"no autodiff on the {BACKEND} backend")
    by_path = {v.path: to_np(g) for v, g in zip(variables, gp, strict=True)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(ref_gp)[0]:
        name = "/".join(str(k.key) for k in path)
        np.testing.assert_allclose(by_path[f"{layer.name}/{name}"], leaf, **TOL)
    np.testing.assert_allclose(to_np(gx), ref_gx, **TOL)


def test_fit_trains_and_inference_keeps_the_state_call_fn_returns():
    x, y = data(64)
    layer = make_layer(True, True, True, False)
    model = keras.Sequential([keras.Input((IN,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < before
    _, state = current_values(layer)
    assert int(state["count"]) == 3 * 4
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    layer(x)
    layer(x, training=False)
    _, after = current_values(layer)
    np.testing.assert_array_equal(after["mean"], state["mean"])
    assert int(after["count"]) == 12


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_modes(steps_per_execution, jit_compile):
    if BACKEND == "torch" and jit_compile:
        pytest.skip("jit_compile=True on torch means torch.compile/dynamo")
    if BACKEND == "torch" and steps_per_execution > 1:
        pytest.skip("Keras allows steps_per_execution=1 only on torch")
    x, y = data(64)
    layer = make_layer(True, True, True, False)
    model = keras.Sequential([keras.Input((IN,)), layer])
    model.compile(
        optimizer="adam",
        loss="mse",
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, epochs=4, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert int(current_values(layer)[1]["count"]) == 4 * 8


def test_rng_fresh_per_training_call_and_deterministic_with_seed():
    x, _ = data()
    layer = make_layer(False, True, True, True, seed=3)
    first = to_np(layer(x, training=True))
    second = to_np(layer(x, training=True))
    assert not np.allclose(first, second)
    # Inference: no rng, deterministic.
    np.testing.assert_array_equal(to_np(layer(x)), to_np(layer(x)))
    # The same seed gives the same sequence of keys.
    again = make_layer(False, True, True, True, seed=3)
    np.testing.assert_allclose(to_np(again(x, training=True)), first, **TOL)
    np.testing.assert_allclose(to_np(again(x, training=True)), second, **TOL)


@pytest.mark.skipif(
    tuple(int(v) for v in keras.__version__.split(".")[:2]) < (3, 13),
    reason="Keras < 3.13's set_random_seed keeps its global seed generator",
)
def test_init_is_deterministic_under_set_random_seed():
    x, _ = data()

    def build():
        layer = make_layer(False, False, False, False, seed=None)
        layer(x)
        return current_values(layer)[0]

    keras.utils.set_random_seed(11)
    a = build()
    keras.utils.set_random_seed(11)
    b = build()
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    c = build()
    assert not np.allclose(a["dense_0"]["kernel"], c["dense_0"]["kernel"])


def test_init_fn_runs_at_build_with_placeholders_and_training_true():
    seen = {}

    def init_fn(training, inputs, rng):
        seen["training"] = training
        seen["inputs"] = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), inputs)
        seen["rng"] = rng
        return {"w": jnp.ones((3, 2))}

    def call_fn(inputs, params):
        return {"y": inputs["a"] @ params["w"], "n": inputs["b"].sum(-1)}

    layer = JaxLayer(call_fn, init_fn)
    inputs = {
        "a": keras.Input((3,), name="a"),
        "b": keras.Input((None, 4), dtype="int32", name="b"),
    }
    outputs = layer(inputs)
    assert seen["training"] is True
    assert seen["inputs"]["a"][0] == (1, 3)
    assert seen["inputs"]["b"][0] == (1, 1, 4)
    assert seen["inputs"]["b"][1] == jnp.int32
    assert seen["rng"].shape == (2,)
    assert tuple(outputs["y"].shape) == (None, 2)
    assert tuple(outputs["n"].shape) == (None, None)
    model = keras.Model(inputs, outputs)
    result = model.predict(
        {"a": np.ones((5, 3), "float32"), "b": np.ones((5, 6, 4), "int32")},
        verbose=0,
    )
    np.testing.assert_allclose(result["y"], np.full((5, 2), 3.0), **TOL)
    np.testing.assert_array_equal(result["n"], np.full((5, 6), 4))


def test_given_params_build_at_once_and_init_fn_not_called():
    def init_fn(rng, inputs):
        raise AssertionError("init_fn must not be called")

    def call_fn(params, inputs):
        return inputs * params["scale"]

    layer = JaxLayer(call_fn, init_fn, params={"scale": np.float32(3.0)})
    assert layer.built
    assert isinstance(layer.params["scale"], keras.Variable)
    np.testing.assert_allclose(to_np(layer(np.ones((2, 2), "float32"))), 3.0)


def test_argument_order_does_not_matter():
    names = ["inputs", "training", "rng", "state", "params"]
    init = reference_init(jax.random.PRNGKey(0), jnp.ones((1, IN)), True)
    layer = JaxLayer(make_call_fn(names), params=init[0], state=init[1], seed=0)
    x, _ = data()
    ref, _ = reference_apply(*numpy_tree(init), None, x, False)
    np.testing.assert_allclose(to_np(layer(x)), ref, **TOL)


def test_pytree_inputs_and_outputs_in_a_functional_model():
    def call_fn(params, inputs):
        (a, b), c = inputs["pair"], inputs["c"]
        y = a @ params["w"] + b
        return {"sum": y + c, "parts": (y, [c * 2.0])}

    layer = JaxLayer(call_fn, params={"w": np.eye(3, dtype="float32")})
    inputs = {
        "pair": (keras.Input((3,)), keras.Input((3,))),
        "c": keras.Input((3,), name="c"),
    }
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    rs = np.random.RandomState(0)
    a, b, c = (rs.randn(4, 3).astype("float32") for _ in range(3))
    got = model.predict({"pair": (a, b), "c": c}, verbose=0)
    np.testing.assert_allclose(got["sum"], a + b + c, **TOL)
    np.testing.assert_allclose(got["parts"][0], a + b, **TOL)
    np.testing.assert_allclose(got["parts"][1][0], 2 * c, **TOL)


def test_none_dimensions_and_varying_batch_sizes():
    def call_fn(params, inputs):
        return jnp.tanh(inputs @ params["w"]).mean(axis=1)

    layer = JaxLayer(call_fn, params={"w": np.ones((4, 2), "float32") / 4})
    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, layer(inputs))
    assert tuple(model.output.shape) == (None, 2)
    for batch, length in [(1, 3), (5, 7), (2, 1)]:
        x = np.random.RandomState(batch).randn(batch, length, 4).astype("float32")
        ref = jnp.tanh(x @ (np.ones((4, 2)) / 4)).mean(axis=1)
        np.testing.assert_allclose(model.predict(x, verbose=0), ref, **TOL)


def test_layer_called_eagerly_then_in_a_functional_model():
    layer = make_layer(False, False, False, False)
    x, y = data(4)
    eager = to_np(layer(x))
    inputs = keras.Input((IN,))
    model = keras.Model(inputs, layer(inputs))
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, **TOL)
    x9, y9 = data(9)
    model.compile("adam", "mse")
    model.fit(x9, y9, batch_size=3, verbose=0)


def test_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.jax_part = make_layer(True, True, True, False)
            self.head = keras.layers.Dense(OUT)

        def call(self, x, training=False):
            return self.head(self.jax_part(x, training=training))

    x, y = data(32)
    model = Net()
    model.compile("adam", "mse")
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert len(model.trainable_weights) == 4 + 2
    state = current_values(model.jax_part)[1]
    assert int(state["count"]) == 12


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_dtype_policies(policy):
    keras.config.set_dtype_policy(policy)
    compute = policy.split("_")[1]
    seen = {}

    def call_fn(params, state, inputs, training):
        seen["inputs"] = inputs.dtype
        seen["params"] = params["w"].dtype
        out = inputs @ params["w"]
        return out, {"n": state["n"] + 1.0} if training else state

    layer = JaxLayer(
        call_fn,
        params={"w": np.full((IN, OUT), 0.1, "float32")},
        state={"n": np.zeros((), "float32")},
    )
    for v in layer.weights:
        assert v.dtype == "float32"
    x, y = data(16)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert seen["inputs"] == jnp.dtype(compute)
    assert seen["params"] == jnp.dtype(compute)
    model = keras.Sequential([keras.Input((IN,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert float(to_np(layer.state["n"])) == 4.0
    assert not np.allclose(to_np(layer.params["w"]), 0.1)
    assert layer.params["w"].dtype == "float32"


def test_nan_passes_through():
    layer = JaxLayer(
        lambda params, inputs: inputs * params["w"], params={"w": np.ones(3, "float32")}
    )
    x = np.array([[1.0, np.nan, 2.0]], "float32")
    out = to_np(layer(x))
    assert np.isnan(out[0, 1]) and out[0, 0] == 1.0 and out[0, 2] == 2.0


def test_stateless_function_without_params():
    def call_fn(inputs):
        return inputs * 2.0

    layer = JaxLayer(call_fn)
    assert layer.params is None and layer.weights == []
    np.testing.assert_allclose(to_np(layer(np.ones((2, 3), "float32"))), 2.0)


def test_params_with_non_array_leaves_stay_static():
    def call_fn(params, inputs):
        assert params["activation"] == "tanh"
        assert params["spec"] is None
        return jnp.tanh(inputs * params["w"])

    layer = JaxLayer(
        call_fn,
        params={"w": np.ones(2, "float32"), "activation": "tanh", "spec": None},
    )
    assert [v.path for v in layer.weights] == [f"{layer.name}/w"]
    assert layer.params["activation"] == "tanh"
    np.testing.assert_allclose(
        to_np(layer(np.ones((1, 2), "float32"))), np.tanh(1.0), **TOL
    )


def test_user_params_survive_training():
    """The layer copies given arrays: a jitted train step that donates its
    variables must not delete the user's own arrays."""
    init = reference_init(jax.random.PRNGKey(0), jnp.ones((1, IN)))
    layer = JaxLayer(make_call_fn(["params", "inputs"]), params=init)
    model = keras.Sequential([keras.Input((IN,)), layer])
    model.compile("sgd", "mse")
    x, y = data(16)
    model.fit(x, y, epochs=2, verbose=0)
    np.asarray(init["dense_0"]["kernel"])  # still alive
    assert not np.allclose(
        to_np(layer.params["dense_0"]["kernel"]), init["dense_0"]["kernel"]
    )


def test_compute_output_shape():
    def call_fn(params, inputs):
        return {"y": inputs["x"] @ params["w"], "s": inputs["x"].sum()}

    layer = JaxLayer(call_fn, params={"w": np.ones((5, 2), "float32")})
    shapes = layer.compute_output_shape({"x": (None, 7, 5)})
    assert shapes == {"y": (None, 7, 2), "s": ()}


def test_call_rng_is_deterministic_under_set_random_seed():
    x, _ = data()

    def two_training_calls():
        layer = make_layer(False, True, True, True, seed=None)
        return [to_np(layer(x, training=True)) for _ in range(2)]

    keras.utils.set_random_seed(5)
    first = two_training_calls()
    keras.utils.set_random_seed(5)
    again = two_training_calls()
    np.testing.assert_allclose(again[0], first[0], **TOL)
    np.testing.assert_allclose(again[1], first[1], **TOL)
    assert not np.allclose(first[0], first[1])
