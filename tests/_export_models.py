"""The deployment matrix's model (issue 23), shared by the export tests.

`Sequential([Input(8), Dense(16), <layer>, Dense(3)])`, `<layer>` one of
`KINDS`: a native `Dense` (the reference), a `JaxLayer` MLP, and the same
MLP as a Flax linen, NNX and Equinox layer.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import jaxlayer

KINDS = ("native", "jaxlayer", "flax", "nnx", "equinox")
ATOL = 1e-4
X = np.random.RandomState(0).randn(5, 8).astype("float32")
X7 = np.random.RandomState(1).randn(7, 8).astype("float32")


def text_init(rng, inputs):
    """The parameters of the tests' small text models (token ids and their
    mask: a vocabulary of 10, positions up to 16, width 4, 2 outputs)."""
    k1, k2, k3 = jax.random.split(rng, 3)
    return {
        "emb": jax.random.normal(k1, (10, 4)),
        "pos": jax.random.normal(k2, (16, 4)),
        "w": jax.random.normal(k3, (4, 2)),
    }


def init_fn(rng, inputs):
    k1, k2 = jax.random.split(rng)
    return {
        "w1": jax.random.normal(k1, (16, 32)) * 0.3,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 16)) * 0.3,
        "b2": jnp.zeros(16),
    }


def call_fn(params, inputs):
    h = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def middle(kind):
    """The layer of `kind` between the two `Dense` layers."""
    if kind == "native":
        return keras.layers.Dense(16)
    if kind == "jaxlayer":
        return jaxlayer.JaxLayer(call_fn, init_fn=init_fn)
    if kind == "flax":
        nn = pytest.importorskip("flax.linen")

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(16)(jnp.tanh(nn.Dense(32)(x)))

        return jaxlayer.FlaxLayer(MLP())
    if kind == "nnx":
        nnx = pytest.importorskip("flax.nnx")

        class Block(nnx.Module):
            def __init__(self, rngs):
                self.a = nnx.Linear(16, 32, rngs=rngs)
                self.b = nnx.Linear(32, 16, rngs=rngs)

            def __call__(self, x):
                return self.b(jnp.tanh(self.a(x)))

        return jaxlayer.NNXLayer(Block(nnx.Rngs(0)))
    eqx = pytest.importorskip("equinox")
    return jaxlayer.EquinoxLayer(
        eqx.nn.MLP(16, 16, 32, 1, activation=jnp.tanh, key=jax.random.key(0))
    )


def model(kind):
    """The model with a `kind` layer, called once (Keras's ONNX export on
    jax wants the model called)."""
    keras.utils.set_random_seed(0)
    built = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16), middle(kind), keras.layers.Dense(3)]
    )
    built(X)
    return built


def run_loader(loader: str, folder, artifacts: dict, batches) -> tuple[dict, list]:
    """Runs the script `loader` in one fresh process that imports neither
    jaxlayer nor keras: it gets a JSON file of jobs, `(name, format, path,
    input files)` per artifact of `artifacts` (`{name: (format, path)}`),
    and prints `RESULTS` and its JSON report.

    Returns:
        `(report, input files)`, one input file per array of `batches`.
    """
    folder = str(folder)
    inputs = []
    for i, x in enumerate(batches):
        inputs.append(os.path.join(folder, f"x{i}.npy"))
        np.save(inputs[-1], x)
    jobs = [(name, fmt, path, inputs) for name, (fmt, path) in artifacts.items()]
    with open(os.path.join(folder, "jobs.json"), "w") as f:
        json.dump(jobs, f)
    script = os.path.join(folder, "load.py")
    with open(script, "w") as f:
        f.write(loader)
    # Neither this checkout nor a backend choice reaches the runtime.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")
    }
    done = subprocess.run(
        [sys.executable, script, os.path.join(folder, "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULTS")]
    assert line, done.stderr[-3000:]
    return json.loads(line[0][len("RESULTS") :]), inputs
