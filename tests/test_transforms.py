"""Weight transforms by path: `enable_lora`, `quantize("int8")`, QLoRA.

Every layer class (JaxLayer, Haiku through JaxLayer, FlaxLayer, NNXLayer,
EquinoxLayer) on every training backend, against a pure-JAX reference: the
layer's own `call_fn` under `jax.jit`, on the tree computed here from the
stored variables (W + A @ B * alpha / rank, int8 * scale). Tolerances: 1e-5
(float32 round-off of one extra matmul); int8 outputs within 1% of the
float model's output range. On the NumPy backend: saved LoRA / int8 models
load and predict.
"""

import gc
import os
import weakref

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxlayer import EquinoxLayer, FlaxLayer, JaxLayer, NNXLayer, saving

BACKEND = keras.backend.backend()
TRAINING = BACKEND != "numpy"
needs_training = pytest.mark.skipif(not TRAINING, reason="a training backend")
TOL = dict(rtol=1e-5, atol=1e-5)
IN, OUT = 5, 3
PKG = "jaxlayer_transforms_tests"


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, IN)).astype("float32")
    w = np.random.default_rng(7).normal(size=(IN, OUT)).astype("float32")
    return x, (np.tanh(x) @ w).astype("float32")


# -- the models -----------------------------------------------------------


@keras.saving.register_keras_serializable(PKG)
def mlp_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (inputs.shape[-1], 8)) / 2,
            "bias": jnp.zeros(8),
        },
        "out": {"kernel": jax.random.normal(k2, (8, OUT)) / 3},
    }


@keras.saving.register_keras_serializable(PKG)
def mlp_call(params, inputs):
    h = jnp.tanh(inputs @ params["dense"]["kernel"] + params["dense"]["bias"])
    return h @ params["out"]["kernel"]


# Not registered: a file of a layer running these reloads from its
# exported computation (portable saving).
def unregistered_call(params, inputs):
    return mlp_call(params, inputs)


def unregistered_init(rng, inputs):
    return mlp_init(rng, inputs)


def jax_layer():
    return JaxLayer(mlp_call, mlp_init, seed=0, name="mlp")


def portable_layer():
    return JaxLayer(unregistered_call, unregistered_init, seed=0, name="mlp")


def haiku_layer():
    import haiku as hk

    def forward(inputs):
        return hk.Linear(OUT)(jnp.tanh(hk.Linear(8)(inputs)))

    f = hk.transform(forward)
    return JaxLayer(
        lambda params, inputs: f.apply(params, None, inputs),
        lambda rng, inputs: f.init(rng, inputs),
        seed=1,
        name="haiku",
    )


def flax_layer():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT)(jnp.tanh(nn.Dense(8)(x)))

    return FlaxLayer(Net(), seed=2, name="flax")


def nnx_layer():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(IN, 8, rngs=rngs)
            self.out = nnx.Linear(8, OUT, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.dense(x)))

    return NNXLayer(Net(nnx.Rngs(3)), seed=3, name="nnx")


def equinox_layer():
    import equinox as eqx

    class Net(eqx.Module):
        dense: eqx.nn.Linear
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.dense = eqx.nn.Linear(IN, 8, key=k1)
            self.out = eqx.nn.Linear(8, OUT, key=k2)

        def __call__(self, x):
            return self.out(jnp.tanh(self.dense(x)))

    return EquinoxLayer(Net(jax.random.key(4)), seed=4, name="equinox")


KINDS = {
    "jax": jax_layer,
    "haiku": haiku_layer,
    "flax": flax_layer,
    "nnx": nnx_layer,
    "equinox": equinox_layer,
}


def model_of(layer):
    inputs = keras.Input((IN,))
    model = keras.Model(inputs, layer(inputs))
    if TRAINING:
        model.compile(keras.optimizers.Adam(0.02), "mse")
    return model


def weight(layer, name):
    """The layer's variable whose path ends with `/name`."""
    (found,) = [w for w in layer.weights if w.path.endswith("/" + name)]
    return found


def reference(layer, params, x):
    """The layer's `call_fn` on `params`, jitted: the pure-JAX reference."""
    names = layer.call_fn_arguments
    state = jax.tree_util.tree_map(
        np.asarray, jax.tree_util.tree_map(to_np, layer.state)
    )

    def run(params, inputs):
        values = {"params": params, "state": state, "inputs": inputs, "training": False}
        values["rng"] = None
        out = layer.call_fn(*[values[n] for n in names])
        return out[0] if "state" in names else out

    return np.asarray(jax.jit(run)(params, x))


def expected_params(layer, alpha_over_rank=None):
    """The tree `call_fn` should receive, computed here from the stored
    variables by their paths (not by jaxlayer's own code)."""
    by_path = {w.path: w for w in layer.weights}

    def leaf(v):
        if not isinstance(v, keras.Variable):
            return v
        w = to_np(v).astype("float32") if "int" not in str(v.dtype) else to_np(v)
        scale = by_path.get(v.path + "_scale")
        if scale is not None:
            w = w.astype("float32") * to_np(scale)
        a = by_path.get(v.path + "_lora_a")
        if a is not None:
            b = by_path[v.path + "_lora_b"]
            w = w + (to_np(a) @ to_np(b)).reshape(w.shape) * alpha_over_rank
        return w

    return jax.tree_util.tree_map(
        leaf, layer.params, is_leaf=lambda v: isinstance(v, keras.Variable)
    )


def randomize_factors(layer, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        if w.path.endswith(("_lora_a", "_lora_b")):
            w.assign(rng.normal(size=tuple(w.shape)).astype("float32") / 4)


# -- LoRA -------------------------------------------------------------------


@needs_training
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lora_outputs_identical_then_match_the_reference(kind):
    layer = KINDS[kind]()
    model = model_of(layer)
    x, _ = data()
    before = to_np(model(x))
    bases = {w.path: w for w in layer.weights if len(w.shape) >= 2}
    layer.enable_lora(2, lora_alpha=4)
    np.testing.assert_array_equal(to_np(model(x)), before)
    # Each ≥2-d leaf: frozen, once (the same variable), with its factors.
    for path, w in bases.items():
        assert [v for v in layer.weights if v.path == path] == [w]
        assert not w.trainable
        a, b = by_suffix(layer, path)
        assert tuple(a.shape) == (int(np.prod(w.shape[:-1])), 2)
        assert tuple(b.shape) == (2, w.shape[-1])
        assert a.trainable and b.trainable and a.dtype == "float32"
    # 1-d leaves (biases) keep their trainable flag.
    assert all(w.trainable for w in layer.weights if len(w.shape) == 1)
    assert len(layer.weights) == len(bases) * 3 + sum(
        len(w.shape) == 1 for w in layer.weights
    )
    randomize_factors(layer)
    expected = reference(layer, expected_params(layer, 4 / 2), x)
    np.testing.assert_allclose(to_np(model(x)), expected, **TOL)
    assert np.abs(expected - before).max() > 1e-2


def by_suffix(layer, path):
    paths = {w.path: w for w in layer.weights}
    return paths[path + "_lora_a"], paths[path + "_lora_b"]


@needs_training
@pytest.mark.parametrize("kind", ["jax", "equinox"])
def test_lora_fit_trains_only_the_factors_and_the_other_weights(kind):
    layer = KINDS[kind]()
    model = model_of(layer)
    x, y = data()
    layer.enable_lora(2)
    frozen = {w.path: to_np(w) for w in layer.weights if not w.trainable}
    others = {w.path: to_np(w) for w in layer.weights if w.trainable}
    loss0 = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < loss0
    for w in layer.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(to_np(w), frozen[w.path])
        elif not w.path.endswith("_lora_a"):  # B (and biases) move from step 1
            assert not np.array_equal(to_np(w), others[w.path]), w.path


@needs_training
def test_lora_paths_select_by_regex_and_errors():
    layer = jax_layer()
    model_of(layer)
    before = [w.path for w in layer.weights]
    for rank in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"JaxLayer 'mlp'.*positive integer"):
            layer.enable_lora(rank)
    with pytest.raises(ValueError, match=r"match no eligible.*mlp/dense/kernel"):
        layer.enable_lora(2, paths="nothing")
    with pytest.raises(ValueError, match="match no eligible"):
        layer.enable_lora(2, paths=["bias"])  # 1-d: not eligible
    assert [w.path for w in layer.weights] == before  # unchanged by failures
    layer.enable_lora(2, paths="dense/kernel$")
    assert layer.lora_enabled
    assert [w.path.split("/", 1)[1] for w in layer.weights[len(before) :]] == [
        "dense/kernel_lora_a",
        "dense/kernel_lora_b",
    ]
    assert weight(layer, "out/kernel").trainable
    with pytest.raises(ValueError, match="already enabled"):
        layer.enable_lora(2)
    unbuilt = jax_layer()
    with pytest.raises(ValueError, match=r"JaxLayer 'mlp' is not built"):
        unbuilt.enable_lora(2)


# -- int8 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_cnn():
    """A small Flax CNN, trained, its float predictions, and its data."""
    if not TRAINING:
        pytest.skip("a training backend")
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    w = rng.normal(size=(64, 2)).astype("float32") / 8
    y = (x.reshape(32, -1) @ w).astype("float32")

    def make():
        inputs = keras.Input((8, 8, 1))
        return keras.Model(inputs, FlaxLayer(CNN(), seed=0, name="cnn")(inputs))

    keras.utils.set_random_seed(0)
    model = make()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    return model, make, x, y


@needs_training
def test_int8_cnn_within_one_percent_and_half_the_size(trained_cnn, tmp_path):
    model, make, x, y = trained_cnn
    # A model without an optimizer (a built optimizer holds the variables
    # it was built for: compile again after quantizing).
    clone = make()
    clone.set_weights(model.get_weights())
    float_out = to_np(clone.predict(x, verbose=0))
    float_file = str(tmp_path / "float.weights.h5")
    clone.save_weights(float_file)
    layer = clone.layers[-1]
    kernels = [w for w in layer.weights if len(w.shape) >= 2]
    dead = [weakref.ref(w) for w in kernels]
    shapes = [tuple(w.shape) for w in kernels]

    def live_float_kernels():  # JAX buffers of the kernels' shapes
        gc.collect()
        live = [a for a in jax.live_arrays() if a.dtype == jnp.float32]
        return sum(tuple(a.shape) in shapes for a in live)

    if BACKEND == "jax":
        before = live_float_kernels()
    clone.quantize("int8")
    del kernels
    gc.collect()
    # No float copy of a quantized leaf stays alive: the variables are gone,
    # and (jax) their buffers with them.
    assert all(r() is None for r in dead)
    if BACKEND == "jax":
        assert live_float_kernels() <= before - len(shapes)
    assert layer.dtype_policy.name == "int8_from_float32"
    assert layer.quantization_mode == "int8"
    dtype = layer.get_config()["dtype"]
    assert dtype["class_name"] == "QuantizedDTypePolicy"
    assert dtype["config"] == {"mode": "int8", "source_name": "float32"}
    assert sorted({w.dtype for w in layer.weights}) == ["float32", "int8"]
    assert all(not w.trainable for w in layer.weights if w.dtype == "int8")
    out = to_np(clone.predict(x, verbose=0))
    spread = float_out.max() - float_out.min()
    assert np.abs(out - float_out).max() <= 0.01 * spread
    expected = reference(layer, expected_params(layer), x)
    np.testing.assert_allclose(out, expected, **TOL)
    int8_file = str(tmp_path / "int8.weights.h5")
    clone.save_weights(int8_file)
    assert os.path.getsize(int8_file) < os.path.getsize(float_file) / 2 or (
        # h5 overhead dominates tiny files: compare the arrays' bytes too.
        sum(to_np(w).nbytes for w in layer.weights)
        < sum(to_np(w).nbytes for w in model.layers[-1].weights) / 2
    )
    # QLoRA: fit trains the factors; the int8 weights never change.
    layer.enable_lora(2)
    int8 = {w.path: to_np(w) for w in layer.weights if w.dtype == "int8"}
    scales = {w.path: to_np(w) for w in layer.weights if w.path.endswith("_scale")}
    np.testing.assert_array_equal(to_np(clone.predict(x, verbose=0)), out)
    clone.compile(keras.optimizers.Adam(0.01), "mse")
    loss0 = clone.evaluate(x, y, verbose=0)
    clone.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert clone.evaluate(x, y, verbose=0) < loss0
    for w in layer.weights:
        if w.path in int8:
            assert w.dtype == "int8"
            np.testing.assert_array_equal(to_np(w), int8[w.path])
        if w.path in scales:
            np.testing.assert_array_equal(to_np(w), scales[w.path])
    randomize_factors(layer, seed=1)
    np.testing.assert_allclose(
        to_np(clone.predict(x, verbose=0)),
        reference(layer, expected_params(layer, 1.0), x),
        **TOL,
    )


@needs_training
def test_quantize_contract_filters_and_errors():
    a, b = jax_layer(), JaxLayer(mlp_call, mlp_init, seed=1, name="other")
    inputs = keras.Input((IN,))
    model = keras.Model(inputs, [a(inputs), b(inputs)])
    model.quantize("int8", filters="mlp")
    assert a.quantization_mode == "int8" and b.quantization_mode is None
    with pytest.raises(ValueError, match="already quantized"):
        a.quantize("int8")
    for mode in ("int4", "float8"):
        with pytest.raises(NotImplementedError, match=f"'{mode}'"):
            b.quantize(mode)
    b.enable_lora(2)
    with pytest.raises(ValueError, match="call `quantize` first"):
        b.quantize("int8")
    assert b.quantization_mode is None
    assert not any(w.dtype == "int8" for w in b.weights)
    c = JaxLayer(mlp_call, mlp_init, seed=2, name="third")
    with pytest.raises(ValueError, match="built"):
        c.quantize("int8")


# -- saving -----------------------------------------------------------------


def transformed(make, how):
    keras.utils.set_random_seed(0)
    layer = make()
    model = model_of(layer)
    if "int8" in how:
        layer.quantize("int8")
    if "lora" in how:
        layer.enable_lora(2, lora_alpha=1.0)
        randomize_factors(layer)
    return model


@needs_training
@pytest.mark.parametrize(
    "source, how",
    [("with_source", "lora"), ("with_source", "int8"), ("portable", "int8+lora")],
)
def test_keras_file_weights_file_and_clone_agree(source, how, tmp_path):
    model = transformed(jax_layer if source == "with_source" else portable_layer, how)
    x, y = data()
    expected = to_np(model.predict(x, verbose=0))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.layers[-1]
    assert isinstance(layer.call_fn, saving.ExportedCall) == (source == "portable")
    np.testing.assert_allclose(to_np(loaded.predict(x, verbose=0)), expected, **TOL)
    original = model.layers[-1]
    assert sorted(described(layer)) == sorted(described(original))
    assert (
        layer.get_config()["weight_transforms"]
        == original.get_config()["weight_transforms"]
    )
    if "int8" in how:
        assert layer.dtype_policy.name == "int8_from_float32"
    # Fine-tuning the reloaded model trains the factors only.
    loaded.compile(keras.optimizers.Adam(0.02), "mse")
    frozen = {w.path: to_np(w) for w in layer.weights if not w.trainable}
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for w in layer.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(to_np(w), frozen[w.path])
    # save_weights / load_weights: into a fresh model with the same transforms.
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    fresh = transformed(jax_layer if source == "with_source" else portable_layer, how)
    fresh.load_weights(weights)
    np.testing.assert_allclose(to_np(fresh.predict(x, verbose=0)), expected, **TOL)
    # ... and into the model reloaded from the `.keras` file.
    loaded.load_weights(weights)
    np.testing.assert_allclose(to_np(loaded.predict(x, verbose=0)), expected, **TOL)
    # clone_model: the same transforms, factors afresh; with the weights,
    # the same outputs.
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(to_np(clone.predict(x, verbose=0)), expected, **TOL)


def described(layer):
    """`(path relative to the layer, dtype, trainable)` of its weights."""
    return [
        (w.path.split(layer.name + "/", 1)[1], w.dtype, w.trainable)
        for w in layer.weights
    ]


@needs_training
def test_untransformed_config_has_no_new_keys():
    layer = jax_layer()
    model_of(layer)
    assert "weight_transforms" not in layer.get_config()
    assert not layer.lora_enabled and layer.quantization_mode is None


# -- NumPy: saved files load and predict ------------------------------------


@pytest.mark.skipif(TRAINING, reason="the NumPy backend's own test")
@pytest.mark.parametrize("how", ["lora", "int8+lora"])
def test_numpy_loads_and_predicts_a_transformed_file(how, tmp_path):
    model = transformed(portable_layer, how)
    x, _ = data()
    layer = model.layers[-1]
    expected = reference(
        layer, expected_params(layer, 0.5 if "lora" in how else None), x
    )
    np.testing.assert_allclose(to_np(model.predict(x, verbose=0)), expected, **TOL)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_np(loaded.predict(x, verbose=0)), expected, **TOL)
