"""Every array leaf is one Keras variable whose path is its pytree path."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from conftest import BACKEND
from jaxlayer import JaxLayer


def test_paths_follow_the_tree():
    params = {
        "encoder": {
            "dense_1": {
                "kernel": np.ones((2, 3), "float32"),
                "bias": np.zeros(3, "float32"),
            }
        },
        "layers": [np.ones(3, "float32"), {"scale": np.ones((), "float32")}],
    }
    state = {"bn": {"mean": np.zeros(3, "float32"), "steps": np.zeros((), "int32")}}

    def call_fn(params, state, inputs):
        return inputs, state

    layer = JaxLayer(call_fn, params=params, state=state, name="my_layer")
    assert sorted(v.path for v in layer.trainable_weights) == [
        "my_layer/encoder/dense_1/bias",
        "my_layer/encoder/dense_1/kernel",
        "my_layer/layers/0",
        "my_layer/layers/1/scale",
    ]
    assert sorted(v.path for v in layer.non_trainable_weights) == [
        "my_layer/bn/mean",
        "my_layer/bn/steps",
    ]
    # layer.params / layer.state: the same trees, a variable at each leaf.
    assert layer.params["encoder"]["dense_1"]["kernel"].path.endswith("dense_1/kernel")
    assert isinstance(layer.params["layers"], list)
    assert layer.state["bn"]["steps"].dtype == "int32"
    assert layer.tracked_params and layer.tracked_state


def test_haiku_module_names_become_scopes():
    """Haiku's `~` separators are dropped: every backend accepts the names
    (TensorFlow refuses `~` in scope names) and they read as module paths."""
    params = {"mlp/~/linear_0": {"w": np.ones((2, 2), "float32")}}
    layer = JaxLayer(lambda params, inputs: inputs, params=params, name="hk")
    assert [v.path for v in layer.weights] == ["hk/mlp/linear_0/w"]


def test_names_that_would_clash_get_a_deterministic_suffix():
    params = {
        "a b": np.ones(2, "float32"),
        "a_b": np.ones(2, "float32"),
        "mlp/~/w": np.ones(2, "float32"),
        "mlp/w": np.ones(2, "float32"),
    }
    state = {"a_b": np.zeros(2, "float32")}

    def call_fn(params, state, inputs):
        return inputs, state

    layer = JaxLayer(call_fn, params=params, state=state, name="clash")
    paths = [v.path for v in layer.weights]
    assert len(set(paths)) == len(paths) == 5
    assert sorted(paths) == [
        "clash/a_b",
        "clash/a_b_1",
        "clash/a_b_2",
        "clash/mlp/w",
        "clash/mlp/w_1",
    ]
    # The same tree gives the same names again.
    again = JaxLayer(call_fn, params=params, state=state, name="clash")
    assert [v.path for v in again.weights] == paths


@pytest.mark.skipif(BACKEND == "numpy", reason="optimizers: training backends")
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.Adam(use_ema=True),
        lambda: keras.optimizers.AdamW(),
        lambda: keras.optimizers.Lion(),
    ],
    ids=["sgd_momentum", "adam_ema", "adamw", "lion"],
)
def test_every_optimizer_builds_its_slots_from_haiku_paths(optimizer):
    params = {
        "res_net/~/block_group_0/~/block_0/~/batchnorm_0": {
            "offset": np.zeros(3, "float32"),
            "scale": np.ones(3, "float32"),
        }
    }
    layer = JaxLayer(
        lambda params, inputs: (
            inputs * params["res_net/~/block_group_0/~/block_0/~/batchnorm_0"]["scale"]
        ),
        params=params,
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer(), "mse")
    x = np.ones((4, 3), "float32")
    model.train_on_batch(x, x)
    names = [v.path for v in model.optimizer.variables]
    assert all("~" not in name for name in names)


def test_paths_inside_models_and_summary(capsys):
    params = {"dense": {"kernel": np.ones((4, 2), "float32")}}
    inner = JaxLayer(
        lambda params, inputs: inputs @ params["dense"]["kernel"],
        params=params,
        name="jax_part",
    )
    model = keras.Sequential([keras.Input((4,)), inner], name="outer")
    assert [v.path for v in model.weights] == ["jax_part/dense/kernel"]
    model.summary()
    out = capsys.readouterr().out
    assert "jax_part (JaxLayer)" in out and "8" in out


def test_integer_params_are_not_trainable():
    params = {"w": np.ones(2, "float32"), "table": np.arange(4, dtype="int32")}
    layer = JaxLayer(lambda params, inputs: inputs * params["w"], params=params)
    assert [v.path.split("/")[-1] for v in layer.trainable_weights] == ["w"]
    assert [v.path.split("/")[-1] for v in layer.non_trainable_weights] == ["table"]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX-only")
def test_layout_map_shards_by_path():
    """With 8 virtual CPU devices, a LayoutMap regex on the pytree path shards
    the kernel, and fit gives the same losses as the unsharded run."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["KERAS_BACKEND"] = "jax"
        import jax, jax.numpy as jnp, keras, numpy as np
        from jaxlayer import JaxLayer

        def call_fn(params, inputs):
            h = jnp.tanh(inputs @ params["dense_1"]["kernel"])
            return h @ params["head"]["kernel"]

        rs = np.random.RandomState(0)
        params = {"dense_1": {"kernel": rs.randn(16, 32).astype("float32") / 4},
                  "head": {"kernel": rs.randn(32, 4).astype("float32") / 6}}
        x = rs.randn(64, 16).astype("float32"); y = rs.randn(64, 4).astype("float32")

        def run():
            model = keras.Sequential([keras.Input((16,)),
                                      JaxLayer(call_fn, params=params, name="net")])
            model.compile(keras.optimizers.SGD(0.1), "mse")
            h = model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False)
            return model, h.history["loss"]

        _, plain = run()
        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"])
        layout = keras.distribution.LayoutMap(mesh)
        layout[".*dense_1/kernel"] = (None, "model")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch"))
        model, sharded = run()
        kernel = model.layers[0].params["dense_1"]["kernel"].value
        assert len(kernel.sharding.device_set) == 8, kernel.sharding
        assert not kernel.sharding.is_fully_replicated
        np.testing.assert_allclose(sharded, plain, rtol=1e-5)
        print("OK", plain, sharded)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_jnp_params_are_accepted():
    layer = JaxLayer(
        lambda params, inputs: inputs + params["b"], params={"b": jnp.ones(2)}
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(np.zeros((1, 2), "float32"))), 1.0
    )
