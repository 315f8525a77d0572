"""Every private API jaxlayer uses (`jaxlayer._private.CATALOGUE`) still
exists in the installed libraries: a new release that removes or moves one
fails here, by name, rather than deep inside a bridge or an export.

Each library's entries are checked in the backend process that imports it
anyway (TensorFlow and its converters on the tensorflow backend,
litert-torch on torch), so no process imports a library only for this."""

import importlib.metadata
import importlib.util

import jax
import keras
import pytest

from conftest import BACKEND
from jaxlayer import _private

# Library -> the backend whose process checks its entries (None: every one).
_CHECKED_ON = {
    "keras": None,
    "jax": None,
    "tensorflow": "tensorflow",
    "tf2onnx": "tensorflow",
    "jax2onnx": "jax",
    "openvino": "tensorflow",
    "litert_torch": "torch",
}


def _entries():
    for entry in _private.CATALOGUE:
        library, module, attribute = entry[:3]
        yield pytest.param(entry, id=f"{module}:{attribute}")


@pytest.mark.parametrize("entry", list(_entries()))
def test_catalogued_private_name_exists(entry):
    library, module, attribute, checked, fallback = entry
    backend = _CHECKED_ON[library]
    if backend is not None and backend != BACKEND:
        pytest.skip(f"{library}'s names are checked on the {backend} backend")
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    if library == "keras" and attribute.startswith("Layer."):
        assert hasattr(keras.layers.Layer, attribute.split(".")[1]), (
            f"Keras {keras.__version__} has no {attribute} (checked on {checked})"
        )
        return
    if not fallback.startswith("optional"):
        _private.resolve(module, attribute)
        return
    # Used where present: missing from a release older than the one it was
    # checked on is expected; from that release on, it must be there.
    try:
        _private.resolve(module, attribute)
    except ImportError:
        installed = importlib.metadata.version(library)
        if _release(installed) >= _release(checked):
            raise
        pytest.skip(f"{library} {installed} has no {module}.{attribute} (optional)")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def test_every_entry_names_a_known_library():
    assert {e[0] for e in _private.CATALOGUE} == set(_CHECKED_ON)


def test_a_missing_name_raises_naming_the_checked_versions():
    with pytest.raises(ImportError, match=r"0\.7-0\.10"):
        _private.resolve("jax._src.config", "no_such_flag_anywhere")
    with pytest.raises(ImportError, match="no_such_module"):
        _private.resolve("no_such_module")


def test_jax_flag_scope_falls_back_to_the_public_update():
    flag = "jax_include_full_tracebacks_in_locations"
    before = getattr(jax.config, flag)
    with _private.jax_config_scope("include_full_tracebacks_in_locations", False):
        assert getattr(jax.config, flag) is False
    with _private._updated_flag(flag, not before):
        assert getattr(jax.config, flag) is (not before)
    assert getattr(jax.config, flag) is before


def test_keras_scopes_answer_outside_any_scope():
    assert _private.keras_in_safe_mode() is True
    in_scope = _private.keras_in_stateless_scope()
    assert in_scope is not None and in_scope() is False
    with keras.StatelessScope():
        assert in_scope() is True


def test_jax_mlir_tools_resolve():
    tools = _private.jax_mlir()
    with tools.make_ir_context():
        module = tools.ir.Module.parse("module {}")
    assert module is not None
