"""The three benchmark workloads, each in pure JAX and in native Keras layers.

A workload is one model architecture written twice: as a pure JAX
`init(key) -> params` / `apply(params, inputs) -> logits` pair (what the pure
JAX loop trains and what both `JaxLayer`s wrap), and as a Keras model built
from `keras.layers` (the native contender). Every model ends in 10 logits
trained with softmax cross-entropy on integer labels, so the four contenders
do the same work on the same synthetic data.

This module imports JAX and NumPy only; Keras is imported inside
`Workload.native` so that the caller can choose the backend first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 10
# Keras's default epsilon for `LayerNormalization`.
LN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model architecture, its input shape and its batch size.

    Attributes:
        name: the workload's short name (`mlp`, `cnn`, `transformer`).
        description: one line for the report.
        input_shape: the shape of one sample (without the batch dimension).
        batch_size: samples per training step.
        default_steps: training steps per timed `fit`, chosen so that one
            timed `fit` takes well under a second on a 2-core CPU.
        init: `init(key) -> params`, the pure JAX initializer.
        apply: `apply(params, inputs) -> logits`, the pure JAX model.
        native: `native() -> keras.Model`, the same model in `keras.layers`.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    batch_size: int
    default_steps: int
    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    native: Callable[[], Any]

    def data(self, num_batches: int, seed: int = 0):
        """Synthetic inputs and integer labels for `num_batches` batches.

        Returns:
            `(x, y)`: NumPy arrays of `num_batches * batch_size` samples,
            `float32` inputs and `int32` labels in `[0, 10)`.
        """
        rng = np.random.default_rng(seed)
        n = num_batches * self.batch_size
        x = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, size=(n,), dtype=np.int32)
        return x, y


# -- pure JAX building blocks --------------------------------------------


def _glorot(key, shape, fan_in, fan_out):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def _dense_init(key, n_in, n_out):
    return {
        "kernel": _glorot(key, (n_in, n_out), n_in, n_out),
        "bias": jnp.zeros((n_out,), jnp.float32),
    }


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _layer_norm_init(width):
    return {
        "gamma": jnp.ones((width,), jnp.float32),
        "beta": jnp.zeros((width,), jnp.float32),
    }


def _layer_norm(p, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPSILON) * p["gamma"] + p["beta"]


# -- MLP: 64-256-256-10 ------------------------------------------------------

_MLP_WIDTHS = (64, 256, 256, NUM_CLASSES)


def mlp_init(key):
    """Parameters of the 64-256-256-10 MLP, Glorot-uniform kernels."""
    keys = jax.random.split(key, len(_MLP_WIDTHS) - 1)
    return {
        f"dense_{i}": _dense_init(k, n_in, n_out)
        for i, (k, n_in, n_out) in enumerate(
            zip(keys, _MLP_WIDTHS[:-1], _MLP_WIDTHS[1:], strict=True)
        )
    }


def mlp_apply(params, inputs):
    """The MLP's logits: two ReLU hidden layers, then a linear layer."""
    x = inputs
    last = len(_MLP_WIDTHS) - 2
    for i in range(last):
        x = jax.nn.relu(_dense(params[f"dense_{i}"], x))
    return _dense(params[f"dense_{last}"], x)


def mlp_native():
    """The MLP in `keras.layers.Dense`."""
    import keras

    return keras.Sequential(
        [keras.Input((_MLP_WIDTHS[0],))]
        + [keras.layers.Dense(w, activation="relu") for w in _MLP_WIDTHS[1:-1]]
        + [keras.layers.Dense(NUM_CLASSES)]
    )


# -- CNN: conv32-pool-conv64-pool-dense10 on 28x28x1 ----------------------


def cnn_init(key):
    """Parameters of the small CNN (HWIO kernels, as Keras's `Conv2D`)."""
    k0, k1, k2 = jax.random.split(key, 3)
    return {
        "conv_0": {
            "kernel": _glorot(k0, (3, 3, 1, 32), 9 * 1, 9 * 32),
            "bias": jnp.zeros((32,), jnp.float32),
        },
        "conv_1": {
            "kernel": _glorot(k1, (3, 3, 32, 64), 9 * 32, 9 * 64),
            "bias": jnp.zeros((64,), jnp.float32),
        },
        "dense": _dense_init(k2, 5 * 5 * 64, NUM_CLASSES),
    }


def _conv(p, x):
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


def _avg_pool(x):
    summed = jax.lax.reduce_window(
        x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    return summed / 4.0


def cnn_apply(params, inputs):
    """The CNN's logits: 28x28x1 -> 26 -> 13 -> 11 -> 5 -> dense 10."""
    x = _avg_pool(jax.nn.relu(_conv(params["conv_0"], inputs)))
    x = _avg_pool(jax.nn.relu(_conv(params["conv_1"], x)))
    return _dense(params["dense"], x.reshape(x.shape[0], -1))


def cnn_native():
    """The CNN in `keras.layers.Conv2D` / `AveragePooling2D` / `Dense`."""
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.AveragePooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.AveragePooling2D(2),
            layers.Flatten(),
            layers.Dense(NUM_CLASSES),
        ]
    )


# -- Transformer encoder block: seq 128, width 128, 4 heads, MLP 512 ------

_SEQ, _WIDTH, _HEADS, _MLP = 128, 128, 4, 512
_HEAD_DIM = _WIDTH // _HEADS


def transformer_init(key):
    """Parameters of one post-LN encoder block and its classifier head.

    The attention kernels have Keras's `MultiHeadAttention` shapes
    (`(width, heads, head_dim)` for query/key/value, `(heads, head_dim,
    width)` for the output).
    """
    ks = jax.random.split(key, 7)

    def qkv(k):
        return {
            "kernel": _glorot(k, (_WIDTH, _HEADS, _HEAD_DIM), _WIDTH, _WIDTH),
            "bias": jnp.zeros((_HEADS, _HEAD_DIM), jnp.float32),
        }

    return {
        "attention": {
            "query": qkv(ks[0]),
            "key": qkv(ks[1]),
            "value": qkv(ks[2]),
            "output": {
                "kernel": _glorot(ks[3], (_HEADS, _HEAD_DIM, _WIDTH), _WIDTH, _WIDTH),
                "bias": jnp.zeros((_WIDTH,), jnp.float32),
            },
        },
        "norm_0": _layer_norm_init(_WIDTH),
        "mlp_in": _dense_init(ks[4], _WIDTH, _MLP),
        "mlp_out": _dense_init(ks[5], _MLP, _WIDTH),
        "norm_1": _layer_norm_init(_WIDTH),
        "head": _dense_init(ks[6], _WIDTH, NUM_CLASSES),
    }


def _attention(p, x):
    def project(q):
        return jnp.einsum("bsd,dhk->bshk", x, q["kernel"]) + q["bias"]

    q, k, v = project(p["query"]), project(p["key"]), project(p["value"])
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(_HEAD_DIM)
    mixed = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v)
    out = p["output"]
    return jnp.einsum("bqhk,hkd->bqd", mixed, out["kernel"]) + out["bias"]


def transformer_apply(params, inputs):
    """Encoder block (attention, add & norm, ReLU MLP, add & norm), mean
    pooling over the sequence, then a dense layer to 10 logits."""
    x = _layer_norm(params["norm_0"], inputs + _attention(params["attention"], inputs))
    h = jax.nn.relu(_dense(params["mlp_in"], x))
    x = _layer_norm(params["norm_1"], x + _dense(params["mlp_out"], h))
    return _dense(params["head"], jnp.mean(x, axis=1))


def transformer_native():
    """The encoder block in `keras.layers.MultiHeadAttention` etc."""
    import keras

    layers = keras.layers
    inputs = keras.Input((_SEQ, _WIDTH))
    attended = layers.MultiHeadAttention(_HEADS, _HEAD_DIM)(inputs, inputs)
    x = layers.LayerNormalization(epsilon=LN_EPSILON)(inputs + attended)
    h = layers.Dense(_MLP, activation="relu")(x)
    x = layers.LayerNormalization(epsilon=LN_EPSILON)(x + layers.Dense(_WIDTH)(h))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(NUM_CLASSES)(x))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "mlp",
            "MLP 64-256-256-10, batch 128",
            (64,),
            128,
            200,
            mlp_init,
            mlp_apply,
            mlp_native,
        ),
        Workload(
            "cnn",
            "CNN conv32-avgpool-conv64-avgpool-dense10 on 28x28x1, batch 64",
            (28, 28, 1),
            64,
            50,
            cnn_init,
            cnn_apply,
            cnn_native,
        ),
        Workload(
            "transformer",
            "encoder block: seq 128, width 128, 4 heads, MLP 512, post-LN, "
            "mean-pool + dense 10, batch 32",
            (_SEQ, _WIDTH),
            32,
            25,
            transformer_init,
            transformer_apply,
            transformer_native,
        ),
    )
}
