"""Bad input: clear errors, raised early, the layer unchanged afterwards."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxlayer import JaxLayer


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def good_call(params, inputs):
    return inputs @ params["w"]


PARAMS = {"w": np.ones((2, 2), "float32")}


def test_missing_inputs_argument():
    with pytest.raises(ValueError, match="`call_fn`.*`inputs`"):
        JaxLayer(lambda params: params, params=PARAMS)
    with pytest.raises(ValueError, match="`init_fn`.*`inputs`"):
        JaxLayer(good_call, init_fn=lambda rng: {})


def test_unknown_argument_names_the_function_and_the_allowed_set():
    def call_fn(params, inputs, mode):
        return inputs

    with pytest.raises(ValueError, match=r"`call_fn`: `mode`.*`params`, `state`"):
        JaxLayer(call_fn, params=PARAMS)

    def init_fn(rng, inputs, mode):
        return {}

    with pytest.raises(ValueError, match="`init_fn`: `mode`"):
        JaxLayer(good_call, init_fn)


def test_var_args_are_rejected():
    def call_fn(params, inputs, *args):
        return inputs

    with pytest.raises(ValueError, match=r"`call_fn`: `\*args`"):
        JaxLayer(call_fn, params=PARAMS)


def test_not_callable():
    with pytest.raises(TypeError, match="`call_fn` must be a callable"):
        JaxLayer("not a function", params=PARAMS)
    with pytest.raises(TypeError, match="`init_fn` must be a callable"):
        JaxLayer(good_call, init_fn=3)


def test_nothing_to_initialise_from():
    with pytest.raises(ValueError, match="cannot all be `None`"):
        JaxLayer(good_call)


def test_params_or_state_given_to_a_function_that_does_not_take_them():
    with pytest.raises(ValueError, match="no `params` argument"):
        JaxLayer(lambda inputs: inputs, params=PARAMS)
    with pytest.raises(ValueError, match="no `state` argument"):
        JaxLayer(good_call, params=PARAMS, state={"n": np.zeros(())})


def test_init_fn_returning_the_wrong_structure():
    def call_fn(params, state, inputs):
        return inputs, state

    def init_fn(rng, inputs):
        return {"w": jnp.ones(2)}  # forgot the state

    layer = JaxLayer(call_fn, init_fn, name="needs_state")
    with pytest.raises(
        ValueError,
        match=r"needs_state.*`init_fn` must return a tuple `\(params, state\)`",
    ):
        layer(np.ones((1, 2), "float32"))


def test_stateful_call_fn_that_forgets_the_state():
    def call_fn(params, state, inputs):
        return inputs * params["w"]

    layer = JaxLayer(
        call_fn, params={"w": np.ones(2, "float32")}, state={"n": np.zeros(())}
    )
    with pytest.raises(
        ValueError, match=r"must return a tuple `\(outputs, new_state\)`"
    ):
        layer(np.ones((1, 2), "float32"))


@pytest.mark.parametrize(
    "returned,match",
    [
        (
            lambda s: {"bn": {"mean": s["bn"]["mean"]}},
            r"missing state\['bn'\]\['var'\]",
        ),
        (
            lambda s: {"bn": {**s["bn"], "extra": jnp.zeros(())}},
            r"unexpected state\['bn'\]\['extra'\]",
        ),
        (lambda s: [s["bn"]["mean"], s["bn"]["var"]], "does not match"),
        (
            lambda s: {"bn": {"mean": jnp.zeros(5), "var": s["bn"]["var"]}},
            r"shape \(5,\) at state\['bn'\]\['mean'\].*shape \(3,\)",
        ),
    ],
)
def test_state_structure_mismatch_names_the_path(returned, match):
    def call_fn(params, state, inputs, training):
        return inputs * params["w"], returned(state)

    state = {"bn": {"mean": np.zeros(3, "float32"), "var": np.ones(3, "float32")}}
    layer = JaxLayer(call_fn, params={"w": np.ones(3, "float32")}, state=state)
    before = [to_np(v) for v in layer.weights]
    with pytest.raises(ValueError, match=match):
        layer(np.ones((2, 3), "float32"), training=True)
    # The layer is unchanged after the failed call.
    for v, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(to_np(v), b)


def test_non_array_input_leaf_names_the_path():
    layer = JaxLayer(lambda inputs: inputs["x"], name="picky")
    # Keras refuses non-tensor positional inputs itself, naming the value.
    with pytest.raises(ValueError, match="hello"):
        layer({"x": np.ones((1, 2), "float32"), "tag": "hello"})
    # Past Keras's own checks (calling `call`), the layer names the path.
    with pytest.raises(TypeError, match=r"picky.*inputs\['tag'\] is str"):
        layer.call({"x": np.ones((1, 2), "float32"), "tag": "hello"})


def test_non_array_output_names_the_path():
    layer = JaxLayer(lambda inputs: {"y": inputs, "label": "oops"})
    with pytest.raises(TypeError, match=r"outputs\['label'\] is str"):
        layer(np.ones((1, 2), "float32"))


def test_errors_from_user_code_keep_their_message():
    def call_fn(params, inputs):
        raise RuntimeError("my model exploded")

    layer = JaxLayer(call_fn, params=PARAMS)
    with pytest.raises(RuntimeError, match="my model exploded"):
        layer(np.ones((1, 2), "float32"))


def test_failed_training_call_leaves_weights_and_state_unchanged():
    calls = {"n": 0}

    def call_fn(params, state, inputs, training):
        calls["n"] += 1
        if inputs.shape[-1] != 2:
            raise ValueError("expected 2 features")
        return inputs @ params["w"], {"n": state["n"] + 1}

    layer = JaxLayer(call_fn, params=PARAMS, state={"n": np.zeros((), "float32")})
    layer(np.ones((1, 2), "float32"), training=True)
    before = [to_np(v) for v in layer.weights]
    with pytest.raises(ValueError, match="expected 2 features"):
        layer(np.ones((1, 3), "float32"), training=True)
    for v, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(to_np(v), b)


def test_building_inside_jit_initialises_eagerly():
    if keras.backend.backend() != "jax":
        pytest.skip("jax tracing scopes exist on the jax backend only")

    def init_fn(rng, inputs):
        return {"w": jnp.ones((inputs.shape[-1], 2)) * inputs.sum()}

    layer = JaxLayer(good_call, init_fn)

    @jax.jit
    def f(x):
        layer.build(x.shape)
        return x

    # Initialisation is forced eagerly on placeholders, so building inside a
    # trace works and gives concrete weights.
    f(jnp.ones((3, 4)))
    assert layer.params["w"].shape == (4, 2)
    np.testing.assert_allclose(to_np(layer.params["w"]), 12.0)  # ones((3, 4)).sum()


def test_errors_from_user_code_keep_their_type_inside_fit_and_predict():
    """Also when the function is traced with an unknown batch dimension."""

    def call_fn(params, inputs, training):
        if training:
            raise RuntimeError("no training for this model")
        raise KeyError("missing table")

    layer = JaxLayer(call_fn, params=PARAMS)
    with pytest.raises(KeyError, match="missing table"):
        layer.compute_output_spec(keras.KerasTensor((None, 2)))
    x = np.ones((4, 2), "float32")
    model = keras.Sequential([JaxLayer(call_fn, params=PARAMS)])
    with pytest.raises(KeyError, match="missing table"):
        model.predict(x, verbose=0)
    model = keras.Sequential([JaxLayer(call_fn, params=PARAMS)])
    model.compile("sgd", "mse")
    with pytest.raises((RuntimeError, KeyError)):
        model.fit(x, x, verbose=0)


def test_init_fn_params_unused_by_call_fn_are_not_dropped_silently():
    def call_fn(state, inputs):
        return inputs, state

    def init_fn(rng, inputs):
        return {"w": jnp.ones(2)}, {"n": jnp.zeros(())}

    layer = JaxLayer(call_fn, init_fn, name="stateonly")
    with pytest.raises(ValueError, match=r"stateonly.*params\['w'\].*no `params`"):
        layer(np.ones((1, 2), "float32"))

    def empty_init(rng, inputs):
        return {}, {"n": jnp.zeros(())}

    layer = JaxLayer(call_fn, empty_init)
    layer(np.ones((1, 2), "float32"))
    assert layer.params is None and len(layer.non_trainable_weights) == 1


def test_an_unsaveable_layer_fails_with_one_type_in_every_adapter():
    # A module that cannot be written to a config, in a layer never called
    # (so no computation to export): one failure, one exception type, a
    # TypeError (as Keras raises for what it cannot serialize) and a
    # ValueError, whichever adapter raises it.
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    from jaxlayer import EquinoxLayer, FlaxLayer, NNXLayer
    from jaxlayer._errors import CannotSave

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    layers = [
        FlaxLayer(Plain(), seed=0, name="f"),
        NNXLayer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), name="n"),
        EquinoxLayer(eqx.nn.Linear(2, 2, key=jax.random.key(0)), name="e"),
    ]
    for layer in layers:
        with pytest.raises(CannotSave, match=f"{type(layer).__name__} '{layer.name}'"):
            layer.get_config()
    assert issubclass(CannotSave, TypeError) and issubclass(CannotSave, ValueError)
