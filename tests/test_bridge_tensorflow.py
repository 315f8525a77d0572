"""The TensorFlow bridge: XLA modules inside TF graphs, gradients, export.

Every number is compared with the same function run by `jax.jit`/`jax.grad`
on the same parameters (float32: rtol = atol = 1e-5).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _reference import mlp_call, mlp_init
from jaxlayer import JaxLayer

BACKEND = keras.backend.backend()
TF_ONLY = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tests the TensorFlow bridge (KERAS_BACKEND)"
)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def numpy_tree(tree):
    return jax.tree_util.tree_map(
        lambda v: np.asarray(keras.ops.convert_to_numpy(v)), tree
    )


def assert_trees_close(got, want):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL),
        got,
        want,
    )


def tf_bridge():
    from jaxlayer.bridges import tensorflow

    return tensorflow


# -- outputs and gradients ----------------------------------------------------


@TF_ONLY
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_outputs_and_gradients_match_jax(mode):
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    layer = JaxLayer(mlp_call, mlp_init, seed=1)
    layer(x[:2])
    variables = jax.tree_util.tree_leaves(layer.params)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y))
        return y, tape.gradient(loss, [x, *(v.value for v in variables)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    y, grads = step(tf.constant(x))

    params = numpy_tree(layer.params)
    want_y = jax.jit(mlp_call)(params, x)
    want_gp, want_gx = jax.grad(
        lambda p, x: jnp.sum(jnp.sin(mlp_call(p, x))), argnums=(0, 1)
    )(params, x)
    np.testing.assert_allclose(y.numpy(), want_y, **TOL)
    np.testing.assert_allclose(grads[0].numpy(), want_gx, **TOL)
    assert_trees_close(
        [g.numpy() for g in grads[1:]], jax.tree_util.tree_leaves(want_gp)
    )


@TF_ONLY
def test_gradient_of_a_function_traced_without_a_tape():
    """Traced for inference first, differentiated later from outside."""
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    layer = JaxLayer(mlp_call, mlp_init, seed=1)
    forward = tf.function(lambda x: layer(x))
    forward(tf.constant(x))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.sin(forward(xt)))
    grads = tape.gradient(loss, [xt, *layer.trainable_variables])
    params = numpy_tree(layer.params)
    want_gp, want_gx = jax.grad(
        lambda p, x: jnp.sum(jnp.sin(mlp_call(p, x))), argnums=(0, 1)
    )(params, x)
    np.testing.assert_allclose(grads[0].numpy(), want_gx, **TOL)
    by_path = {
        v.path: g.numpy()
        for v, g in zip(layer.trainable_variables, grads[1:], strict=True)
    }
    np.testing.assert_allclose(
        by_path[layer.params["hidden"]["w"].path], want_gp["hidden"]["w"], **TOL
    )


@TF_ONLY
def test_integer_inputs_get_no_gradient_and_int64_is_accepted():
    import tensorflow as tf

    def call(params, inputs):
        return jnp.take(params["table"], inputs, axis=0).sum(axis=1)

    table = np.arange(12, dtype="float32").reshape(6, 2)
    layer = JaxLayer(call, params={"table": table})
    ids = tf.constant([[0, 5], [2, 2]], dtype=tf.int64)
    with tf.GradientTape() as tape:
        y = layer(ids)
        loss = tf.reduce_sum(y * [[1.0, 2.0]])
    (g,) = tape.gradient(loss, layer.trainable_variables)
    want_g = jax.grad(lambda p: jnp.sum(call(p, ids.numpy()) * jnp.array([1.0, 2.0])))(
        {"table": table}
    )["table"]
    np.testing.assert_allclose(y.numpy(), call({"table": table}, ids.numpy()), **TOL)
    np.testing.assert_allclose(g.numpy(), want_g, **TOL)


# -- training under fit --------------------------------------------------------


@TF_ONLY
@pytest.mark.parametrize("jit_compile", [False, True])
def test_dense_before_the_layer_trains_under_fit(jit_compile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    dense = keras.layers.Dense(4)
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    model = keras.Sequential([keras.Input((6,)), dense, layer])
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    kernel = dense.kernel.numpy().copy()
    params = numpy_tree(layer.params)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.allclose(dense.kernel.numpy(), kernel)
    for old, new in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(numpy_tree(layer.params)),
        strict=True,
    ):
        assert not np.allclose(old, new)
    # The trained model still equals the JAX reference.
    h = x[:5] @ dense.kernel.numpy() + dense.bias.numpy()
    np.testing.assert_allclose(
        model.predict(x[:5], verbose=0),
        mlp_call(numpy_tree(layer.params), h),
        **TOL,
    )


@TF_ONLY
def test_eager_batch_of_4_then_functional_then_other_batches():
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")

    def call(params, inputs):
        return jnp.mean(inputs * params["w"], axis=(1, 2)) + params["b"]

    layer = JaxLayer(
        call,
        params={"w": np.full((8, 8, 1), 0.5, "float32"), "b": np.ones(1, "float32")},
    )
    np.testing.assert_allclose(layer(x), call(numpy_tree(layer.params), x), **TOL)
    count = tf_bridge().conversion_count()
    inputs = keras.Input(shape=(8, 8, 1))
    model = keras.Model(inputs, layer(inputs))
    for n in (3, 4, 7):
        xn = np.random.default_rng(n).normal(size=(n, 8, 8, 1)).astype("float32")
        np.testing.assert_allclose(
            model.predict(xn, verbose=0), call(numpy_tree(layer.params), xn), **TOL
        )
    assert tf_bridge().conversion_count() == count


@TF_ONLY
def test_thirty_inputs_each_with_an_unknown_dimension():
    n = 30

    def call(params, inputs):
        return sum(jnp.mean(inputs[f"x{i}"], axis=1) * params["w"][i] for i in range(n))

    w = np.linspace(-1, 1, n * 2, dtype="float32").reshape(n, 2)
    layer = JaxLayer(call, params={"w": w})
    inputs = {f"x{i}": keras.Input(shape=(None, 2), name=f"x{i}") for i in range(n)}
    model = keras.Model(inputs, layer(inputs))
    start = tf_bridge().conversion_count()
    counts = []
    for batch, seq in ((2, 5), (3, 7), (4, 2), (1, 9)):
        rng = np.random.default_rng(batch)
        data = {
            f"x{i}": rng.normal(size=(batch, seq, 2)).astype("float32")
            for i in range(n)
        }
        np.testing.assert_allclose(
            model.predict(data, verbose=0), call({"w": w}, data), **TOL
        )
        counts.append(tf_bridge().conversion_count())
    # Keras traces `predict` with the first shapes (a known sequence length),
    # then once with unknown dims. Every input dim symbolic cannot be
    # exported (`* w[i]` needs the last dim to be 2), so the export has the
    # dims the `keras.Input`s left unknown symbolic: it serves both traces
    # and every size.
    assert counts[0] - start == 1
    assert counts[0] == counts[1] == counts[2] == counts[3]


@TF_ONLY
def test_unknown_sequence_dimension_trains_and_serves_other_lengths():
    def call(params, inputs):
        return jnp.cumsum(inputs @ params["w"], axis=1)

    w = np.full((4, 2), 0.1, "float32")
    layer = JaxLayer(call, params={"w": w})
    inputs = keras.Input(shape=(None, 4))
    model = keras.Model(inputs, layer(inputs))
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    model.fit(x, rng.normal(size=(8, 5, 2)), batch_size=4, epochs=1, verbose=0)
    assert not np.allclose(layer.params["w"].numpy(), w)
    x9 = rng.normal(size=(3, 9, 4)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x9, verbose=0), call(numpy_tree(layer.params), x9), **TOL
    )


# -- state and rng ---------------------------------------------------------------


def counting_call(params, state, inputs, training):
    y = inputs * params["scale"]
    if training:
        state = {"count": state["count"] + 1, "mean": jnp.mean(inputs, axis=0)}
    return y, state


@TF_ONLY
def test_state_updates_under_fit_and_not_in_predict():
    layer = JaxLayer(
        counting_call,
        params={"scale": np.ones(3, "float32")},
        state={"count": np.zeros((), "int32"), "mean": np.zeros(3, "float32")},
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.fit(x, x * 2, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert int(layer.state["count"].numpy()) == 4
    np.testing.assert_allclose(layer.state["mean"].numpy(), x[4:].mean(0), **TOL)
    model.predict(x, verbose=0)
    assert int(layer.state["count"].numpy()) == 4


@TF_ONLY
def test_rng_is_fresh_on_every_training_call():
    def dropout_call(rng, inputs, training):
        if not training:
            return inputs
        keep = jax.random.bernoulli(rng, 0.5, inputs.shape)
        return jnp.where(keep, inputs * 2, 0.0)

    layer = JaxLayer(dropout_call, seed=3)
    x = np.ones((4, 16), "float32")
    a = layer(x, training=True).numpy()
    b = layer(x, training=True).numpy()
    assert set(np.unique(a)) <= {0.0, 2.0}
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(layer(x, training=False), x)


# -- caching and fallbacks ----------------------------------------------------------


@TF_ONLY
def test_conversions_are_cached():
    import tensorflow as tf

    bridge = tf_bridge()
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x = np.ones((2, 4), "float32")
    start = bridge.conversion_count()
    layer(x)
    assert bridge.conversion_count() - start == 1
    layer(np.ones((7, 4), "float32"))
    assert bridge.conversion_count() - start == 1
    with tf.GradientTape() as tape:
        y = layer(x)
    tape.gradient(y, layer.trainable_variables)
    trained = bridge.conversion_count()
    assert trained - start == 3  # + forward with residuals, + backward
    for n in (3, 5):
        with tf.GradientTape() as tape:
            y = layer(np.ones((n, 4), "float32"))
        tape.gradient(y, layer.trainable_variables)
    assert bridge.conversion_count() == trained
    layer(np.ones((2, 5, 4), "float32"))  # a new rank is a new structure
    assert bridge.conversion_count() == trained + 1


@TF_ONLY
def test_shape_dependent_code_falls_back_to_concrete_shapes():
    def call(params, inputs):
        if inputs.shape[0] > 4:  # needs a concrete batch size
            return inputs[:4] * params["w"]
        return inputs * params["w"]

    layer = JaxLayer(call, params={"w": np.full(2, 3.0, "float32")})
    x = np.arange(8, dtype="float32").reshape(4, 2)
    with pytest.warns(UserWarning, match="concrete input shapes"):
        y = layer(x)
    np.testing.assert_allclose(y, x * 3.0, **TOL)
    x6 = np.arange(12, dtype="float32").reshape(6, 2)
    np.testing.assert_allclose(layer(x6), x6[:4] * 3.0, **TOL)


def tf_conversions(layer, training=None):
    """The bridge's conversions of the pure functions of `layer`."""
    out = []
    for fn in layer._pure_fns.values():
        if training is not None and fn.training != training:
            continue
        slot = fn.slots().get("tensorflow")
        if slot is not None:
            out.extend(dict.fromkeys(slot.conversions.values()))
    return out


@TF_ONLY
def test_platforms_are_honoured():
    layer = JaxLayer(mlp_call, mlp_init, seed=0, native_serialization_platforms=["cpu"])
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(layer(x), mlp_call(numpy_tree(layer.params), x), **TOL)
    (conversion,) = tf_conversions(layer)
    assert conversion.forward().exported.platforms == ("cpu",)
    default = JaxLayer(mlp_call, mlp_init, seed=0)
    default(x)
    (conversion,) = tf_conversions(default)
    assert conversion.forward().exported.platforms == ("cpu", "cuda")


@TF_ONLY
def test_a_function_exported_per_batch_size_trains_with_a_partial_batch():
    """An Equinox BatchNorm (`pmean` over the vmapped batch) cannot be exported
    with a symbolic batch: it is exported per shape, the partial last batch
    of `fit` included, with one warning."""
    eqx = pytest.importorskip("equinox")
    from jaxlayer.adapters import EquinoxLayer

    class Net(eqx.Module):
        linear: eqx.nn.Linear
        bn: eqx.nn.BatchNorm

        def __init__(self, key):
            self.linear = eqx.nn.Linear(3, 2, key=key)
            self.bn = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")

        def __call__(self, x, state):
            return self.bn(self.linear(x), state)

    module, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    layer = EquinoxLayer(module, state)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        got = model.predict(x[:3], verbose=0)  # another batch size
    ours = [w for w in caught if "symbolic batch" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    # The reference: Equinox's own batched call (in inference mode, with the
    # running statistics) on the trained module and state.
    trained, trained_state = layer.to_module()
    batched = jax.vmap(
        eqx.nn.inference_mode(trained),
        in_axes=(0, None),
        out_axes=(0, None),
        axis_name="batch",
    )
    want, _ = batched(x[:3], trained_state)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(np.isfinite(got))
    assert not np.allclose(trained.linear.weight, module.linear.weight)


@TF_ONLY
def test_frozen_parameters_get_no_gradient_export_work():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    frozen = layer.params["hidden"]["w"]
    frozen.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")  # Keras reads `trainable`
    before = numpy_tree(layer.params)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = numpy_tree(layer.params)
    np.testing.assert_array_equal(after["hidden"]["w"], before["hidden"]["w"])
    assert not np.allclose(after["out"]["w"], before["out"]["w"])
    # The training exports compute gradients for the trainable arguments only
    # (one fewer than the floating parameters and inputs).
    (conversion,) = tf_conversions(layer, training=True)
    n_float = len(conversion.diff(None))
    (backward,) = conversion._backward.values()
    assert len(backward.out_avals) == n_float - 1
    # The trained layer still equals the JAX reference.
    np.testing.assert_allclose(model.predict(x, verbose=0), mlp_call(after, x), **TOL)


@TF_ONLY
def test_gradient_export_failures_name_the_layer():
    import tensorflow as tf

    @jax.custom_vjp
    def odd(x):
        return x * 2

    def odd_fwd(x):
        return x * 2, None

    def odd_bwd(_, ct):
        raise NotImplementedError("no backward for odd")

    odd.defvjp(odd_fwd, odd_bwd)

    def call(params, inputs):
        return odd(inputs * params["w"])

    def looping(params, inputs):
        # Reverse-mode differentiation of a while loop is not supported.
        return jax.lax.while_loop(
            lambda c: c[1] < 3, lambda c: (c[0] * params["w"], c[1] + 1), (inputs, 0)
        )[0]

    x = tf.constant(np.ones((2, 3), "float32"))
    for fn, traced_first in ((call, False), (call, True), (looping, False)):
        layer = JaxLayer(fn, params={"w": np.full(3, 2.0, "float32")}, name="odd")
        forward = layer
        if traced_first:
            # Traced without a tape, differentiated later: the VJP export.
            forward = tf.function(lambda x, layer=layer: layer(x))
            forward(x)
        # Under a tape the forward with residuals is exported, so a function
        # whose VJP cannot be exported may fail there or at `tape.gradient`:
        # either way with the layer's error, never an internal exception.
        with pytest.raises(ValueError, match=r"JaxLayer 'odd'.*gradient of `call_fn`"):
            with tf.GradientTape() as tape:
                y = forward(x)
            tape.gradient(y, layer.trainable_variables)


# -- SavedModel ---------------------------------------------------------------------

# TensorFlow's `tf.lite` imports jax when it can; serving must not need it, so
# the subprocess makes jax unimportable before importing TensorFlow.
SERVE = textwrap.dedent(
    """
    import sys

    class NoJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib"):
                raise ImportError("jax is blocked in this process")

    sys.meta_path.insert(0, NoJax())
    import numpy as np
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    y = loaded.serve(tf.constant(x)).numpy()
    assert "jax" not in sys.modules and "jaxlib" not in sys.modules
    np.save(sys.argv[3], y)
    """
)


def serve_without_jax(tmp_path, export_dir, x):
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            str(export_dir),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "y.npy")


def exported_model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, activation="relu")(inputs)
    return keras.Model(inputs, JaxLayer(mlp_call, mlp_init, seed=0)(h))


@TF_ONLY
def test_saved_model_serves_without_jax(tmp_path):
    model = exported_model()
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    model.fit(x, np.zeros((6, 3), "float32"), epochs=1, verbose=0)
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    x5 = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        serve_without_jax(tmp_path, tmp_path / "saved", x5),
        model.predict(x5, verbose=0),
        **TOL,
    )


@pytest.mark.skipif(BACKEND != "jax", reason="exports from the JAX backend")
def test_saved_model_export_from_the_jax_backend(tmp_path):
    model = exported_model()
    x = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
    want = np.asarray(model.predict(x, verbose=0))
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    np.testing.assert_allclose(
        serve_without_jax(tmp_path, tmp_path / "saved", x), want, **TOL
    )


@TF_ONLY
def test_a_traced_train_step_does_not_keep_the_exports_of_a_dropped_layer():
    """TensorFlow registers the gradient of every `tf.custom_gradient` traced
    in a graph for the life of the process: the bridge's gradient function
    must not hold the conversion (its exports) from there. (TensorFlow's own
    wrapper keeps the traced graph.)"""
    import gc
    import weakref

    import tensorflow as tf

    def train_step(layer):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) ** 2)
            return tape.gradient(loss, layer.trainable_variables)

        return step

    def trained_then_dropped():
        # Checked after this function returns: inside a running frame, the
        # conversions stayed alive after `del layer` (most likely a snapshot
        # of the frame's locals, taken by code recording the stack); the
        # frame's end frees them.
        layer = JaxLayer(mlp_call, mlp_init, seed=0)
        grads = train_step(layer)(tf.ones((4, 4)))
        assert all(g is not None for g in grads)
        return [weakref.ref(c) for c in tf_conversions(layer)]

    conversions = trained_then_dropped()
    gc.collect()
    assert conversions
    assert all(ref() is None for ref in conversions)
