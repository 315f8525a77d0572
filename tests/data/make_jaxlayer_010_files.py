"""Writes the `.keras` files of jaxlayer 0.1.0 that tests/test_portable_saving.py
loads (files without exported computation, as 0.1.0 saved them).

Run with the 0.1.0 sources first on the path, from the repository root:

    git archive e25347f~3 src | tar -x -C /tmp/old010
    KERAS_BACKEND=jax PYTHONPATH=/tmp/old010/src python \\
        tests/data/make_jaxlayer_010_files.py
"""

import os

import jax.numpy as jnp
import keras
import numpy as np

import jaxlayer
from jaxlayer import JaxLayer

assert jaxlayer.__version__ == "0.1.0", jaxlayer.__file__
HERE = os.path.dirname(os.path.abspath(__file__))


# The same functions, by the same registered names, are in the test file.
@keras.saving.register_keras_serializable(package="jaxlayer_010")
def old_call(params, state, inputs, training):
    y = jnp.tanh(inputs @ params["w"] + params["b"])
    new_state = {"count": state["count"] + 1} if training else state
    return y, new_state


def main():
    params = {
        "w": np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3),
        "b": np.full(3, 0.5, "float32"),
    }
    state = {"count": np.array(7, "int32")}
    layer = JaxLayer(old_call, params=params, state=state, name="old")
    model = keras.Sequential([keras.Input((4,)), layer], name="old_model")
    model.save(os.path.join(HERE, "jaxlayer-0.1.0.keras"))

    lam = JaxLayer(lambda params, inputs: inputs @ params["w"], params=params)
    model = keras.Sequential([keras.Input((4,)), lam], name="old_lambda")
    model.save(os.path.join(HERE, "jaxlayer-0.1.0-lambda.keras"))


if __name__ == "__main__":
    main()
