"""The demo's model: the spec's Haiku CNN, written as in the spec."""

from __future__ import annotations

import jax
import keras

from jaxlayer import _deps
from jaxlayer.layer import JaxLayer

hk = _deps.require("haiku", "the demo", extra="demo")


class MyHaikuModule(hk.Module):
    def __call__(self, x, training):
        x = hk.Conv2D(32, (3, 3))(x)
        x = jax.nn.relu(x)
        x = hk.AvgPool((1, 2, 2, 1), (1, 2, 2, 1), "VALID")(x)
        x = hk.Flatten()(x)
        x = hk.Linear(200)(x)
        if training:
            x = hk.dropout(rng=hk.next_rng_key(), rate=0.3, x=x)
        x = jax.nn.relu(x)
        x = hk.Linear(10)(x)
        x = jax.nn.softmax(x)
        return x


def my_haiku_module_fn(inputs, training):
    module = MyHaikuModule()
    return module(inputs, training)


transformed_module = hk.transform(my_haiku_module_fn)


# Registered so that a saved model reloads: Keras saves functions by name.
@keras.saving.register_keras_serializable(package="jaxlayer_demo")
def haiku_cnn_apply(params, rng, inputs, training):
    return transformed_module.apply(params, rng, inputs, training)


@keras.saving.register_keras_serializable(package="jaxlayer_demo")
def haiku_cnn_init(rng, inputs, training):
    return transformed_module.init(rng, inputs, training)


def build_model() -> keras.Model:
    """A functional model holding the Haiku CNN as a `JaxLayer`."""
    inputs = keras.Input(shape=(8, 8, 1))
    keras_layer = JaxLayer(
        call_fn=haiku_cnn_apply, init_fn=haiku_cnn_init, name="haiku_cnn"
    )
    return keras.Model(inputs, keras_layer(inputs), name="haiku_digits")
