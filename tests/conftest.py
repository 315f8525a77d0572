"""Test configuration: one Keras backend per process (`KERAS_BACKEND`)."""

import gc
import os
import tempfile
import time

_START = time.monotonic()

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The reports of verified artifacts (load safety) go to a folder of this run,
# not the user's cache: each run verifies the files it loads afresh.
os.environ.setdefault("JAXLAYER_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlayer-cache-"))
# One verifying process for the whole run of a backend's tests (loads are
# often more than the default 30 s apart).
os.environ.setdefault("JAXLAYER_VERIFY_IDLE", "3600")
# The load deadline (30 s; 10 s per parse) counts the verifying process's
# start (`import jax`), which four backends' suites on two cores can slow
# past it: legitimate files would then be refused at random. The suite
# allows more; the tests of the deadline set their own limits, and the fuzz
# campaign's runners get the defaults back (tests/test_load_fuzz.py).
os.environ.setdefault("JAXLAYER_LOAD_TIMEOUT", "120")
os.environ.setdefault("JAXLAYER_PARSE_TIMEOUT", "60")
# No ONNX form in saved files (with jax2onnx installed, every save would
# convert its layer to ONNX: seconds each); the tests of that form turn it
# on (tests/test_export_onnx.py).
os.environ.setdefault("JAXLAYER_SAVE_ONNX", "0")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# The NumPy backend trains nothing: only its inference tests run there.
NUMPY_FILES = (
    "test_bridge_numpy.py",
    "test_state_inference.py",
    "test_lifetimes.py",
    "test_saved_files.py",  # earlier files load (predict only there)
    "test_docs.py",  # the examples that name the NumPy backend
    "test_load_safety.py",  # files saved here, loaded in fresh processes
    "test_load_fuzz.py",  # the same, mutated
    "test_transforms.py",  # LoRA / int8 files load and predict
    "test_zoo.py",  # the zoo saved on jax loads and predicts
)
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


def pytest_collection_finish(session):
    # Every library is imported now (TensorFlow too, by Keras's own suite):
    # hundreds of thousands of long-lived objects that each full garbage
    # collection would walk again (seconds per test on a small machine).
    # Frozen, they are left out of every collection; later objects are not.
    gc.freeze()


# A time budget, in seconds (`JAXLAYER_TEST_BUDGET`; unset or 0: none).
# CI sets one so that a machine far slower than usual still ends within its
# time limit: once it is spent, the tests not started yet are skipped, each
# saying why, and the run FAILS, its summary naming every test that did not
# run (a run that left tests out is not a pass). `scripts/test.sh` turns it
# into one deadline for all its backends (`JAXLAYER_TEST_DEADLINE`, a Unix
# time); a lone pytest process counts it from its own start.
_BUDGET = float(os.environ.get("JAXLAYER_TEST_BUDGET") or 0)
_DEADLINE = float(os.environ.get("JAXLAYER_TEST_DEADLINE") or 0) or (
    time.time() - (time.monotonic() - _START) + _BUDGET if _BUDGET else 0
)
# The tests the budget left out (node ids), for the summary and exit status.
_NOT_RUN: list[str] = []


def time_left() -> float | None:
    """Seconds until the run's deadline, or None when it has none."""
    return _DEADLINE - time.time() if _DEADLINE else None


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        _NOT_RUN.append(item.nodeid)
        pytest.skip(
            f"not run: the time budget of this run (JAXLAYER_TEST_BUDGET="
            f"{_BUDGET:.0f} s) was spent"
        )


def pytest_sessionfinish(session, exitstatus):
    _write_file_times()
    # Tests left out for time make the run fail, whatever else passed.
    if _NOT_RUN and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _NOT_RUN:
        return
    terminalreporter.section(
        f"NOT RUN: {len(_NOT_RUN)} tests (time budget spent)", sep="!", red=True
    )
    for nodeid in _NOT_RUN:
        terminalreporter.write_line(nodeid)
    terminalreporter.write_line(
        f"FAILED: the time budget (JAXLAYER_TEST_BUDGET={_BUDGET:.0f} s) left "
        f"{len(_NOT_RUN)} tests unrun; raise it or make the suite faster."
    )


# Seconds per test file, wall and CPU (this process's and the processes it
# waited for), written at the end to the file `JAXLAYER_DURATIONS_OUT`
# names: scripts/_pool.py reports them and keeps them as the weights by
# which it splits the suite (tests/durations.json).
_FILE_TIMES: dict[str, list[float]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.perf_counter(), sum(os.times()[:4])
    yield
    times = _FILE_TIMES.setdefault(item.path.name, [0.0, 0.0])
    times[0] += time.perf_counter() - wall
    times[1] += sum(os.times()[:4]) - cpu


def _write_file_times():
    path = os.environ.get("JAXLAYER_DURATIONS_OUT")
    # The pool's own jobs only, not the pytest processes tests start.
    pool = os.environ.get("JAXLAYER_POOL_PID")
    if not path or not _FILE_TIMES or str(os.getppid()) != pool:
        return
    import json

    with open(path, "w") as f:
        json.dump({"backend": BACKEND, "files": _FILE_TIMES}, f)


def pytest_report_header(config):
    budget = f", time budget {_BUDGET:.0f} s" if _BUDGET else ""
    return f"KERAS_BACKEND={BACKEND}{budget}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # A clean, seeded Keras per test: `fit`'s shuffling and Keras's global
    # seed generator are the same on every run (JAXLAYER_TEST_SEED varies it).
    # Without `free_memory`: no full garbage collection per test (tests that
    # count what was freed collect themselves).
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(int(os.environ.get("JAXLAYER_TEST_SEED", "0")))
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
