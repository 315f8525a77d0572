"""The model zoo (issue 30): third-party model code wrapped as Keras layers.

Each model is the library's own code, not rewritten here: Hugging Face
`transformers` 4.x Flax `FlaxBertModel` (with a `Dense` head),
`FlaxGPT2LMHeadModel` and `FlaxViTModel` (tiny configs, random weights, no
network), the CNN of Flax's NNX MNIST tutorial (BatchNorm, Dropout, as the
tutorial writes it), an Equinox model with state (`eqx.nn.BatchNorm`) and a
Haiku one (`hk.transform_with_state`, `hk.BatchNorm`).

`ZOO[name]` gives the model's `Spec`: `build()` makes the compiled Keras
model (and returns the jaxlayer layer in it), `inputs(batch, length)` the
inputs of a call, `reference(model, inputs)` the library's own model called
(in inference) on the layer's current weights. The text models take token
ids and an attention mask, two `keras.Input((None,), dtype="int32")` that
share the batch and sequence dimensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import keras
import numpy as np

import jaxlayer

# The libraries a fresh process loading the saved zoo must never import.
LIBRARIES = ("transformers", "flax", "equinox", "haiku")
TEXT = ("bert", "gpt2")
VOCAB = 50
# Shapes (batch, length): checked after `fit`; after a reload, also `MORE`;
# exports are run at `EXPORT`, which neither those nor the export traced.
SHAPES = ((2, 5), (3, 5), (3, 8))
MORE = (4, 11)
EXPORT = (6, 7)
NUM_FIT = 4


def _np(tree):
    return jax.tree_util.tree_map(
        lambda v: np.asarray(keras.ops.convert_to_numpy(v)), tree
    )


def _text_inputs(batch, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length)).astype("int32")
    mask = np.ones((batch, length), "int32")
    mask[0, length - 2 :] = 0  # one padded example
    return {"input_ids": ids, "attention_mask": mask}


def _text_model(layer, head=None):
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("input_ids", "attention_mask")
    }
    outputs = layer(inputs)
    if head is not None:
        outputs = head(outputs)
    return keras.Model(inputs, outputs)


def _dense(model, y):
    kernel, bias = (np.asarray(w) for w in model.layers[-1].get_weights())
    return y @ kernel + bias


# -- Hugging Face Flax models ---------------------------------------------


def bert():
    from transformers import BertConfig, FlaxBertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    hf = FlaxBertModel(config, seed=0)

    def encode(module, inputs, training):
        return module(
            inputs["input_ids"],
            inputs["attention_mask"],
            deterministic=not training,
        ).pooler_output

    layer = jaxlayer.FlaxLayer(
        hf.module, method=encode, variables={"params": hf.params}, name="bert"
    )
    model = _text_model(layer, keras.layers.Dense(2, name="head"))
    model.compile("adam", "mse")

    def reference(model, inputs):
        params = layer.flax_variables()["params"]
        y = hf(inputs["input_ids"], inputs["attention_mask"], params=params)
        return _dense(model, np.asarray(y.pooler_output))

    return model, layer, reference


def gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32
    )
    hf = FlaxGPT2LMHeadModel(config, seed=0)

    def logits(module, inputs, training):
        ids = inputs["input_ids"]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return module(
            ids,
            inputs["attention_mask"],
            positions,
            deterministic=not training,
        ).logits

    layer = jaxlayer.FlaxLayer(
        hf.module, method=logits, variables={"params": hf.params}, name="gpt2"
    )
    model = _text_model(layer)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def reference(model, inputs):
        params = layer.flax_variables()["params"]
        y = hf(inputs["input_ids"], inputs["attention_mask"], params=params)
        return np.asarray(y.logits)

    return model, layer, reference


def vit():
    from transformers import FlaxViTModel, ViTConfig

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    hf = FlaxViTModel(config, seed=0)

    # The module takes NHWC images, as Keras does (HF's wrapper takes NCHW
    # and transposes).
    def encode(module, images, training):
        return module(images, deterministic=not training).pooler_output

    layer = jaxlayer.FlaxLayer(
        hf.module, method=encode, variables={"params": hf.params}, name="vit"
    )
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(layer(inputs)))
    model.compile("adam", "mse")

    def reference(model, images):
        params = layer.flax_variables()["params"]
        y = hf(np.transpose(images, (0, 3, 1, 2)), params=params)
        return _dense(model, np.asarray(y.pooler_output))

    return model, layer, reference


# -- Flax NNX: the CNN of Flax's MNIST tutorial -----------------------------


def nnx_cnn():
    from flax import nnx

    class CNN(nnx.Module):
        """A simple CNN model."""

        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
            self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
            self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
            self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
            self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.linear2 = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
            x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
            x = x.reshape(x.shape[0], -1)  # flatten
            x = nnx.relu(self.dropout2(self.linear1(x)))
            x = self.linear2(x)
            return x

    layer = jaxlayer.NNXLayer(CNN(rngs=nnx.Rngs(0)), name="cnn")
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def reference(model, images):
        module = layer.to_module()
        module.eval()
        return np.asarray(module(images))

    return model, layer, reference


# -- Equinox, with state -----------------------------------------------------


def equinox_bn():
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        bn: eqx.nn.BatchNorm
        drop: eqx.nn.Dropout
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
            self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
            self.drop = eqx.nn.Dropout(0.1)
            self.out = eqx.nn.Linear(4 * 8 * 8, 2, key=k2)

        def __call__(self, x, state, *, key=None):
            x, state = self.bn(jax.nn.relu(self.conv(x)), state)
            return self.out(self.drop(x, key=key).reshape(-1)), state

    net, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    layer = jaxlayer.EquinoxLayer(net, state, name="eqx")
    inputs = keras.Input((3, 8, 8))  # Equinox is channels-first
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse")

    def reference(model, images):
        net, state = layer.to_module()
        net = eqx.nn.inference_mode(net)
        run = jax.vmap(lambda x: net(x, state)[0], axis_name="batch")
        return np.asarray(run(images))

    return model, layer, reference


# -- Haiku, with state --------------------------------------------------------


def haiku_bn():
    import haiku as hk

    def net(inputs, training):
        x = hk.Conv2D(4, 3, name="conv")(inputs)
        x = hk.BatchNorm(True, True, 0.9, name="bn")(x, is_training=training)
        if training:
            x = hk.dropout(hk.next_rng_key(), 0.1, x)
        return hk.nets.MLP([16, 2], name="mlp")(hk.Flatten()(x))

    f = hk.transform_with_state(net)
    layer = jaxlayer.JaxLayer(call_fn=f.apply, init_fn=f.init, seed=0, name="hk")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse")

    def reference(model, images):
        y, _ = f.apply(_np(layer.params), _np(layer.state), None, images, False)
        return np.asarray(y)

    return model, layer, reference


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build, feed and check one zoo model."""

    build: Callable
    image: tuple | None = None  # the per-example image shape; None: text
    classes: int = 0  # sparse class targets (0: regression to 2 outputs)

    def inputs(self, batch: int, length: int, seed: int = 0):
        if self.image is None:
            return _text_inputs(batch, length, seed)
        rng = np.random.default_rng(seed)
        return rng.normal(size=(batch, *self.image)).astype("float32")

    def targets(self, inputs):
        n = len(inputs["input_ids"]) if isinstance(inputs, dict) else len(inputs)
        if self.image is None and self.classes:
            return inputs["input_ids"]  # GPT-2: tokens as their own targets
        if self.classes:
            return np.arange(n) % self.classes
        return np.linspace(-1, 1, 2 * n).reshape(n, 2).astype("float32")


ZOO = {
    "bert": Spec(bert),
    "gpt2": Spec(gpt2, classes=VOCAB),
    "vit": Spec(vit, image=(8, 8, 3)),
    "nnx_cnn": Spec(nnx_cnn, image=(28, 28, 1), classes=10),
    "equinox_bn": Spec(equinox_bn, image=(3, 8, 8)),
    "haiku_bn": Spec(haiku_bn, image=(8, 8, 3)),
}


def build_and_fit(name: str):
    """`(model, layer, reference)` for zoo model `name`, fitted one epoch on
    `NUM_FIT` examples (two batches)."""
    spec = ZOO[name]
    keras.utils.set_random_seed(0)
    model, layer, reference = spec.build()
    x = spec.inputs(NUM_FIT, 8, seed=1)
    history = model.fit(x, spec.targets(x), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1]), name
    return model, layer, reference
