"""Writes the `.keras` files of jaxlayer 0.2.0.dev0 (before the redesign of
issue 21) that tests/test_saved_files.py loads: files with exported
computation, written by the code of `main` at c5bbf29.

Run from the repository root, with those sources first on the path:

    git archive c5bbf29 src | tar -x -C /tmp/old020
    KERAS_BACKEND=jax PYTHONPATH=/tmp/old020/src python \\
        tests/data/make_jaxlayer_020_files.py
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import keras
import numpy as np

import jaxlayer
from jaxlayer import EquinoxLayer, JaxLayer

assert jaxlayer.__version__ == "0.2.0.dev0", jaxlayer.__file__
HERE = os.path.dirname(os.path.abspath(__file__))
PARAMS = {
    "w": np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3),
    "b": np.full(3, 0.5, "float32"),
}


# The same function, by the same registered name, is in the test file.
@keras.saving.register_keras_serializable(package="jaxlayer_020")
def registered_call(params, state, rng, inputs, training):
    y = jnp.tanh(inputs @ params["w"] + params["b"])
    if training:
        y = y * jax.random.bernoulli(rng, 0.9, y.shape) / 0.9
        state = {"count": state["count"] + 1}
    return y, state


# Not registered: the test process loads it from its exported computation.
def unregistered_call(params, state, inputs, training):
    y = jnp.tanh(inputs @ params["w"] + params["b"])
    new_state = {"count": state["count"] + 1} if training else state
    return y, new_state


def main():
    state = {"count": np.array(7, "int32")}
    x = np.linspace(-2, 2, 32, dtype="float32").reshape(8, 4)
    for name, fn in (("", registered_call), ("-exported", unregistered_call)):
        layer = JaxLayer(fn, params=PARAMS, state=state, seed=3, name="net")
        model = keras.Sequential([keras.Input((4,)), layer], name="model")
        model.predict(x, verbose=0)
        model.save(os.path.join(HERE, f"jaxlayer-0.2.0.dev0{name}.keras"))

    linear = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    layer = EquinoxLayer(linear, name="eqx")
    model = keras.Sequential([keras.Input((4,)), layer], name="eqx_model")
    model.predict(x, verbose=0)
    model.save(os.path.join(HERE, "jaxlayer-0.2.0.dev0-equinox.keras"))
    np.savez(
        os.path.join(HERE, "jaxlayer-0.2.0.dev0-equinox.npz"),
        x=x,
        y=np.asarray(model.predict(x, verbose=0)),
    )


if __name__ == "__main__":
    main()
