"""Chooses the Keras backend before Keras is imported, for a newcomer's install.

Keras reads its backend once, at import: `KERAS_BACKEND` when it is set, else
the `"backend"` key of its config file (`$KERAS_HOME/keras.json`, or
`~/.keras/keras.json`), else TensorFlow. Keras writes that file with
`"tensorflow"` on its first import, so an install with only the JAX extras
(`pip install ".[demo]"`) would fail at `import keras` with
`No module named 'tensorflow'`.

`choose()` runs when this module is imported, at the top of
`jaxlayer/__init__.py`; a backend that was chosen and works is never
overridden (each case is commented in `choose`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# Keras backend name -> (module that provides it, extra of jaxlayer or None
# when a core dependency provides it, its name in messages).
_LIBRARIES = {
    "jax": ("jax", None, "JAX"),
    "tensorflow": ("tensorflow", "tensorflow", "TensorFlow"),
    "torch": ("torch", "torch", "PyTorch"),
    "numpy": ("numpy", None, "NumPy"),
    "openvino": ("openvino", None, "OpenVINO"),
}
# Keras's backend when neither KERAS_BACKEND nor its config file names one.
_KERAS_DEFAULT = "tensorflow"
FALLBACK = "jax"


class BackendNotInstalledError(ImportError):
    """`KERAS_BACKEND` names a backend whose library is not installed."""


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def configured_backend() -> str:
    """The backend Keras would pick when `KERAS_BACKEND` is not set.

    Follows Keras 3's own lookup: `$KERAS_HOME/keras.json` when `KERAS_HOME`
    is set, else `~/.keras/keras.json` (`/tmp/.keras/keras.json` when the
    home directory is not writable); its `"backend"` key; TensorFlow when
    there is no file, no key or the file is not valid JSON.
    """
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        # As Keras's own lookup does, so the file read is the one Keras reads.
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_dir = os.path.join(base, ".keras")
    # `KERAS_HOME` may itself start with `~`.
    path = os.path.expanduser(os.path.join(keras_dir, "keras.json"))
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return _KERAS_DEFAULT
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend if isinstance(backend, str) and backend else _KERAS_DEFAULT


def _install_hint(backend: str) -> str:
    module, extra, _ = _LIBRARIES[backend]
    if extra is None:
        return f"pip install {module}"
    return f'pip install "jaxlayer[{extra}]" (from a clone: pip install ".[{extra}]")'


def missing_backend_message(backend: str) -> str:
    """The one-line error for `KERAS_BACKEND=backend` when it is not installed."""
    module, _, name = _LIBRARIES[backend]
    return (
        f"KERAS_BACKEND={backend} names the {name} backend, but `{module}` is not "
        f"installed: {_install_hint(backend)}, or set KERAS_BACKEND to an "
        f"installed backend ({', '.join(installed_backends()) or 'none'})."
    )


def installed_backends() -> list[str]:
    """The training-capable and NumPy backends whose library is installed."""
    return [
        b
        for b in ("jax", "tensorflow", "torch", "numpy")
        if _installed(_LIBRARIES[b][0])
    ]


def choose() -> None:
    """Sets `KERAS_BACKEND` to JAX when Keras's own choice is not installed.

    Does nothing when Keras is already imported, or when the backend named
    by `KERAS_BACKEND` (or by Keras's config file) is installed.

    Raises:
        BackendNotInstalledError: `KERAS_BACKEND` names a backend whose
            library is not installed.
    """
    # Keras already imported: its backend is fixed, and setting
    # `KERAS_BACKEND` now would only make the environment disagree with it.
    if "keras" in sys.modules:
        return
    requested = os.environ.get("KERAS_BACKEND")
    if requested:
        # An explicit choice is never overridden: one clear error instead of
        # Keras's `No module named ...` at import. A name not in `_LIBRARIES`
        # is left for Keras to report.
        if requested in _LIBRARIES and not _installed(_LIBRARIES[requested][0]):
            raise BackendNotInstalledError(missing_backend_message(requested))
        return
    # Not set: Keras's configured backend is kept when installed; otherwise
    # JAX, with one line on stderr saying so.
    configured = configured_backend()
    if configured not in _LIBRARIES or _installed(_LIBRARIES[configured][0]):
        # Installed, or a name Keras itself reports on (an unknown backend).
        return
    # JAX is a dependency of jaxlayer, so the fallback is always installed.
    os.environ["KERAS_BACKEND"] = FALLBACK
    print(
        f"jaxlayer: Keras's configured backend {configured!r} is not installed; "
        "using the JAX backend (set KERAS_BACKEND to choose).",
        file=sys.stderr,
    )


def _running_as_cli() -> bool:
    """Whether this process is `python -m jaxlayer ...` (still starting)."""
    # While `python -m` locates (imports) the package, sys.argv[0] is "-m".
    if sys.argv[:1] != ["-m"]:
        return False
    argv = getattr(sys, "orig_argv", None) or []
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[i + 1 : i + 2] in (["jaxlayer"], ["jaxlayer.__main__"])
        if arg.startswith("-m"):
            return arg[2:] in ("jaxlayer", "jaxlayer.__main__")
    return False


def choose_or_exit() -> None:
    """`choose()`; under `python -m jaxlayer`, an error is one line, exit 1.

    A library import gets the `ImportError` (its message is one line); the
    command line gets that line on stderr and exit status 1, no traceback.
    """
    try:
        choose()
    except BackendNotInstalledError as err:
        if not _running_as_cli():
            raise
        print(f"python -m jaxlayer: {err}", file=sys.stderr)
        raise SystemExit(1) from None


choose_or_exit()
