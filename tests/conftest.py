"""Test configuration: one Keras backend per process (`KERAS_BACKEND`)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# The NumPy backend trains nothing: only inference tests run there.
if BACKEND == "numpy":
    collect_ignore_glob = ["test_*.py"]
    collect_ignore_glob = [
        p
        for p in (
            os.path.basename(f)
            for f in os.listdir(os.path.dirname(__file__))
            if f.startswith("test_") and f.endswith(".py")
        )
        if p not in ("test_bridge_numpy.py",)
    ]


def pytest_report_header(config):
    return f"KERAS_BACKEND={BACKEND}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
