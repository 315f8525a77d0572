"""Test configuration: one Keras backend per process (`KERAS_BACKEND`)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# The NumPy backend trains nothing: only its inference tests run there.
NUMPY_FILES = ("test_bridge_numpy.py", "test_state_inference.py", "test_lifetimes.py")
if BACKEND == "numpy":
    collect_ignore_glob = [
        f
        for f in os.listdir(os.path.dirname(__file__))
        if f.startswith("test_") and f.endswith(".py") and f not in NUMPY_FILES
    ]


def pytest_collection_modifyitems(config, items):
    # Files named on the command line are collected even when ignored above.
    if BACKEND != "numpy":
        return
    skip = pytest.mark.skip(reason="the NumPy backend runs inference tests only")
    for item in items:
        if item.path.name not in NUMPY_FILES:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"KERAS_BACKEND={BACKEND}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # A clean, seeded Keras per test: `fit`'s shuffling and Keras's global
    # seed generator are the same on every run (JAXLAYER_TEST_SEED varies it).
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(os.environ.get("JAXLAYER_TEST_SEED", "0")))
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
