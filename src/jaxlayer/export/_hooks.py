"""Installs jaxlayer's converters in tf2onnx and OpenVINO when (and only
when) the program imports them, and its wrappers of Keras's jax-backend
exports (`_keras_jax`, at `install()`: Keras imports those with itself).

Keras imports the exporters itself inside `model.export`, so there is no
call of ours in between: a finder on `sys.meta_path` (it answers for these
names only) runs the installer right after the library's own module has
run. A library imported before jaxlayer is handled at `install()`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading

# Top-level module -> the jaxlayer module whose `install()` it needs.
_INSTALLERS = {
    "tf2onnx": "jaxlayer.export._tf2onnx",
    "openvino": "jaxlayer.export._openvino",
    "jax2onnx": "jaxlayer.export._jax2onnx",
}
_lock = threading.RLock()
_busy: set = set()


def _run(name: str) -> None:
    importlib.import_module(_INSTALLERS[name]).install()


class _Loader(importlib.abc.Loader):
    def __init__(self, name, loader):
        self._name = name
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run(self._name)

    def __getattr__(self, attr):  # the wrapped loader's other methods
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _INSTALLERS or fullname in _busy:
            return None
        with _lock:
            _busy.add(fullname)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                _busy.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(fullname, spec.loader)
        return spec


def install() -> None:
    """Installs the finder (once), and the converters of the libraries
    already imported."""
    from jaxlayer.export import _keras_jax

    _keras_jax.install()
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _INSTALLERS:
        if name in sys.modules:
            _run(name)
