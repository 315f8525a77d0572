"""Every private API of Keras, TensorFlow and JAX that jaxlayer uses, in one place.

Each entry says what it is for, what breaks if it changes, and the fallback.
Nothing here is imported at `import jaxlayer`: the TensorFlow names are
imported by the TensorFlow bridge, the DLPack ones by the torch bridge. When
a private name has gone, the message names the versions jaxlayer supports.

Keras (3.10 - 3.15):

- `Layer._track_variable(variable)`: registers a variable made outside
  `add_weight` (which would reset the name scope that gives the variable its
  pytree path). If it goes: `layer.weights` would miss the variables.
  Fallback: the variables are tracked by assigning them to a list attribute,
  which Keras's attribute tracking picks up.
- `Layer._untrack_variable(variable)`: drops a variable from the layer (the
  float leaf `quantize("int8")` replaces). If it goes: quantizing raises
  (naming the versions supported) rather than keep a float copy.
- `Variable._value` and the global state's `stateless_scope`,
  `autocast_scope` and (torch) `torch_device`: `plain_values` reads the
  stored tensors of a call's variables directly where `Variable.value` would
  return them unchanged (no stateless scope, no autocast scope, not a
  symbolic call on torch's meta device); `Variable.value` costs ~5 us a
  variable on torch, which was half the layer's own Python per call. If they
  go: `Variable.value`.

TensorFlow (2.17 - 2.21), used by `bridges/tensorflow/`:

- `tensorflow.compiler.tf2xla.python.xla.call_module`: the `XlaCallModule`
  op that runs a `jax.export` module inside a TensorFlow graph (what
  `jax2tf` uses). Its attributes are built by the bridge from the public
  fields of `jax.export.Exported`. If it goes: no JAX call on the
  TensorFlow backend (the error names the supported versions).
- `tensorflow.python.eager.record.could_possibly_record()`: whether a
  gradient tape may record the op, to choose between a forward with VJP
  residuals and a plain forward. If it goes: the bridge assumes a tape may
  record (correct, a little slower in inference).

JAX (0.6 - 0.10):

- `jax.core.Tracer` (public, but marked for removal from `jax.core` in
  future releases): tells a tracer from a concrete array when `init_fn`
  runs. If it goes: `is_tracer` falls back to "not a concrete array".
- `jax._src.lib._jax.dlpack_managed_tensor_to_buffer` and
  `buffer_to_dlpack_managed_tensor` (and `jaxlib_extension_version`): the
  torch bridge's zero-copy DLPack exchange on CPU without the per-call
  Python checks in `jax.dlpack.from_dlpack`. Probed at first use; if they
  are missing or behave differently the bridge uses the public
  `jax.dlpack.from_dlpack` / `torch.from_dlpack` (tested both ways).
"""

from __future__ import annotations

from typing import Any

SUPPORTED = "Keras 3.10-3.15, TensorFlow 2.17-2.21, JAX 0.6-0.10"


def unsupported(what: str, err: Exception) -> ImportError:
    """The error for a private API that is missing from an installed library."""
    return ImportError(
        f"jaxlayer needs {what}, which this installation does not provide "
        f"({type(err).__name__}: {err}); jaxlayer supports {SUPPORTED}."
    )


def track_variable(layer: Any, variable: Any) -> None:
    """Makes `variable` one of `layer`'s weights (see the module docstring)."""
    track = getattr(layer, "_track_variable", None)
    if track is not None:
        track(variable)
        return
    extra = getattr(layer, "_jaxlayer_variables", None)
    if extra is None:
        # A list attribute: Keras's attribute tracking collects the variables in
        # it (the fallback the module docstring names).
        layer._jaxlayer_variables = []
        extra = layer._jaxlayer_variables
    extra.append(variable)


def untrack_variable(layer: Any, variable: Any) -> None:
    """Drops `variable` from `layer`'s weights (see the module docstring)."""
    untrack = getattr(layer, "_untrack_variable", None)
    if untrack is None:
        raise unsupported(
            "Keras's Layer._untrack_variable",
            AttributeError("keras.layers.Layer has no _untrack_variable"),
        )
    untrack(variable)


def is_tracer(value: Any) -> bool:
    """Whether `value` is a JAX tracer (an abstract value, not an array)."""
    import jax

    tracer = getattr(jax.core, "Tracer", None)
    if tracer is not None:
        return isinstance(value, tracer)
    # Every JAX tracer class is named `...Tracer` (DynamicJaxprTracer, ...).
    return type(value).__name__.endswith("Tracer")


def tf_call_module():
    """TensorFlow's `XlaCallModule` op wrapper (see the module docstring)."""
    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError as err:
        raise unsupported("TensorFlow's XlaCallModule op", err) from err
    call = getattr(xla, "call_module", None)
    if call is None:
        raise unsupported(
            "TensorFlow's XlaCallModule op",
            AttributeError("tensorflow xla has no call_module"),
        )
    return call


def tf_could_possibly_record():
    """A function telling whether a gradient tape may record (or always True)."""
    try:
        from tensorflow.python.eager import record
    except ImportError:
        # Assume a tape may record: always correct, only slower in inference.
        return lambda: True
    return getattr(record, "could_possibly_record", lambda: True)


_PLAIN_READER: list = []


def plain_values(variables) -> list | None:
    """`[v.value for v in variables]` without Keras's per-read checks, on
    torch; None where those checks could change a value, on other backends,
    or where a private name has gone (the caller then reads `v.value`).

    `Variable.value` checks, for every read, for a stateless scope (whose
    values replace the stored ones), an autocast scope (which casts) and, on
    torch, the meta device of a symbolic call (which gets a placeholder).
    Checked once here for all the variables of a call.
    """
    if not _PLAIN_READER:
        _PLAIN_READER.append(_plain_reader())
    reader = _PLAIN_READER[0]
    return None if reader is None else reader(variables)


def _plain_reader():
    import keras

    # Only torch's reads are slow enough to matter (and the JAX backend's
    # variables hold their values elsewhere).
    if keras.backend.backend() != "torch":
        return None
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        return None
    if not hasattr(global_state, "GLOBAL_STATE_TRACKER"):
        return None

    def read(variables):
        # Keras's global state (a `threading.local`, which `clear_session`
        # replaces: looked up on every call): the scopes a read would
        # honour, read from its dict (`get_global_attribute`'s miss costs
        # ~2 us, an exception each).
        state = global_state.GLOBAL_STATE_TRACKER.__dict__
        if state.get("stateless_scope") is not None:
            return None
        if state.get("autocast_scope") is not None:
            return None
        device = state.get("torch_device")
        if device is not None and str(device) == "meta":
            return None
        values = [getattr(v, "_value", None) for v in variables]
        # (None: a variable whose creation a stateless scope deferred.)
        return None if any(x is None for x in values) else values

    return read
