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

TensorFlow (2.20 - 2.21), used by `bridges/tensorflow/`:

- `tensorflow.compiler.tf2xla.python.xla.call_module`: the `XlaCallModule`
  op that runs a `jax.export` module inside a TensorFlow graph (what
  `jax2tf` uses). Its attributes are built by the bridge from the public
  fields of `jax.export.Exported`. If it goes: no JAX call on the
  TensorFlow backend (the error names the supported versions).
- `tensorflow.python.eager.record.could_possibly_record()`: whether a
  gradient tape may record the op, to choose between a forward with VJP
  residuals and a plain forward. If it goes: the bridge assumes a tape may
  record (correct, a little slower in inference).

JAX (0.7 - 0.10):

- `jax.core.Tracer` (public, but marked for removal from `jax.core` in
  future releases): tells a tracer from a concrete array when `init_fn`
  runs. If it goes: `is_tracer` falls back to "not a concrete array".
- `jax._src.lib._jax.dlpack_managed_tensor_to_buffer` and
  `buffer_to_dlpack_managed_tensor` (and `jaxlib_extension_version`): the
  torch bridge's zero-copy DLPack exchange on CPU without the per-call
  Python checks in `jax.dlpack.from_dlpack`. Probed at first use; if they
  are missing or behave differently the bridge uses the public
  `jax.dlpack.from_dlpack` / `torch.from_dlpack` (tested both ways).
- `jax._src.config.include_full_tracebacks_in_locations` and
  `hlo_source_file_canonicalization_regex` (context managers; saving keeps
  the saving machine's paths out of exported modules). If they go: the same
  flags set through the public `jax.config.update` for the duration.
- `jax._src.interpreters.mlir.refine_polymorphic_shapes` (the load-safety
  verifier's trial lowering of a module, as compiling does). If it goes:
  the verifier raises, naming the versions supported (a load is refused,
  never run unchecked). The rest of its MLIR toolkit is public:
  `jax.interpreters.mlir.make_ir_context` / `.ir` and
  `jax.extend.mlir.deserialize_portable_artifact`.

Keras (3.10 - 3.15), besides the above:

- `keras.src.backend.common.stateless_scope.in_stateless_scope`: whether
  a `keras.StatelessScope` is active (its values replace the stored ones).
  If it goes: no read of the stored tensors (`Variable.value` instead).
- `keras.src.saving.serialization_lib.in_safe_mode`: whether the load in
  progress said `safe_mode=False`. If it goes: safe mode (the strict
  choice) is assumed.

Export converters (the `export` and `litert` extras; checked with
tf2onnx 1.17, jax2onnx 0.17, openvino 2026.4, litert-torch 0.10):

- tf2onnx: `tf2onnx.handler.tf_op` (its documented way to add a custom op
  handler), `tf2onnx.utils.make_name` and `tf2onnx.tf_utils.
  TF_IGNORED_NODE_ATTRS` (the `XlaCallModule` attribute it cannot read).
- tf2onnx: `tf2onnx.convert.from_function` (public) is wrapped in
  `export/_tf2onnx.py`, which writes the checked model with
  `tf2onnx.utils.save_protobuf`; a model that fails the check at another
  shape is converted again without `tf2onnx.optimizer._optimizers`'
  `reshape_optimizer` (it merges two of a layer's `Reshape`s wrongly).
- jax2onnx's replacement of `jax.numpy` functions while it traces (a
  behaviour, not a name): `export/_onnx._plain_numpy` undoes it for symbolic
  shapes; `tests/test_export_onnx.py` fails when jax2onnx stops doing it.
- jax2onnx: `jax2onnx.plugins.plugin_system` (`register_primitive`,
  `PLUGIN_REGISTRY`): the plugin for `call_exported`.
- jax2onnx: `jax2onnx.to_onnx` (public) and Keras's
  `keras.src.export.export_saved_model` and `keras.src.export.onnx.
  _export_onnx_jax` are wrapped (`export/_keras_jax.py`): on the jax backend,
  an export that fails with one symbol per input dimension is made again
  with one symbol for the dimensions a jaxlayer layer recorded equal.
  Optional: where a Keras lacks one (Keras 3.10 has no `_export_onnx_jax`:
  it exports ONNX on jax through its SavedModel path), that export is
  Keras's own, without the retry.
- openvino: `openvino.convert_model` is replaced by a wrapper (public name,
  patched) that converts a model holding a jaxlayer layer through ONNX.
- litert-torch: `litert_torch.backend.jax_bridge.wrap`,
  `litert_torch.backend.lowerings.registry.lower` and
  `litert_converter.mlir.ir`: the lowering of `jaxlayer::call_exported`.

For all of these: if a name has gone, the export raises an ImportError
naming the name and the versions checked (no fallback: the export cannot
be done another way). `CATALOGUE` lists every entry; tests/test_private.py
checks that each one resolves in the installed versions.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

SUPPORTED = "Keras 3.10-3.15, TensorFlow 2.20-2.21, JAX 0.7-0.10"

# Every private (or patched) name of another library that jaxlayer uses:
# (library, module, attribute path or None, versions checked on, fallback).
# tests/test_private.py resolves each one in the installed versions.
CATALOGUE: tuple[tuple[str, str, str | None, str, str], ...] = (
    ("keras", "keras.layers", "Layer._track_variable", "3.10-3.15", "list attr"),
    ("keras", "keras.layers", "Layer._untrack_variable", "3.10-3.15", "error"),
    (
        "keras",
        "keras.src.backend.common.global_state",
        "GLOBAL_STATE_TRACKER",
        "3.10-3.15",
        "Variable.value",
    ),
    (
        "keras",
        "keras.src.backend.common.stateless_scope",
        "in_stateless_scope",
        "3.10-3.15",
        "Variable.value",
    ),
    (
        "keras",
        "keras.src.saving.serialization_lib",
        "in_safe_mode",
        "3.10-3.15",
        "safe mode",
    ),
    (
        "tensorflow",
        "tensorflow.compiler.tf2xla.python.xla",
        "call_module",
        "2.20-2.21",
        "error",
    ),
    (
        "tensorflow",
        "tensorflow.python.eager.record",
        "could_possibly_record",
        "2.20-2.21",
        "always True",
    ),
    ("jax", "jax.core", "Tracer", "0.7-0.10", "class name"),
    (
        "jax",
        "jax._src.lib",
        "_jax.dlpack_managed_tensor_to_buffer",
        "0.7-0.10",
        "jax.dlpack",
    ),
    (
        "jax",
        "jax._src.lib",
        "_jax.buffer_to_dlpack_managed_tensor",
        "0.7-0.10",
        "torch.from_dlpack",
    ),
    ("jax", "jax._src.lib", "jaxlib_extension_version", "0.7-0.10", "jax.dlpack"),
    (
        "jax",
        "jax._src.config",
        "include_full_tracebacks_in_locations",
        "0.7-0.10",
        "jax.config.update",
    ),
    (
        "jax",
        "jax._src.config",
        "hlo_source_file_canonicalization_regex",
        "0.7-0.10",
        "jax.config.update",
    ),
    # Public in `jax.extend.mlir` from jax 0.7.1 (used there when present).
    (
        "jax",
        "jax._src.lib",
        "_jax.mlir.deserialize_portable_artifact",
        "0.7-0.10",
        "jax.extend.mlir",
    ),
    (
        "jax",
        "jax._src.interpreters.mlir",
        "refine_polymorphic_shapes",
        "0.7-0.10",
        "error",
    ),
    ("tf2onnx", "tf2onnx.handler", "tf_op", "1.17", "error"),
    ("tf2onnx", "tf2onnx.utils", "make_name", "1.17", "error"),
    ("tf2onnx", "tf2onnx.tf_utils", "TF_IGNORED_NODE_ATTRS", "1.17", "error"),
    # Public, wrapped (export/_tf2onnx.py): its BaseException becomes a
    # ValueError, and the model is checked at another shape before writing.
    ("tf2onnx", "tf2onnx.convert", "from_function", "1.17", "patched; error"),
    ("tf2onnx", "tf2onnx.utils", "save_protobuf", "1.17", "error"),
    # A converted model that fails at another shape is converted again
    # without its `reshape_optimizer` (export/_tf2onnx.py).
    ("tf2onnx", "tf2onnx.optimizer", "_optimizers", "1.17", "error"),
    (
        "jax2onnx",
        "jax2onnx.plugins.plugin_system",
        "register_primitive",
        "0.17",
        "error",
    ),
    ("jax2onnx", "jax2onnx.plugins.plugin_system", "PLUGIN_REGISTRY", "0.17", "error"),
    ("openvino", "openvino", "convert_model", "2026.4", "patched; error"),
    # Public, wrapped (export/_keras_jax.py): a retried export on the jax
    # backend names the inputs' dimensions jaxlayer knows equal as one.
    ("jax2onnx", "jax2onnx", "to_onnx", "0.17", "patched; error"),
    ("keras", "keras.src.export", "export_saved_model", "3.15", "optional; patched"),
    ("keras", "keras.src.export.onnx", "_export_onnx_jax", "3.15", "optional; patched"),
    ("keras", "keras.src.export.export_utils", "get_input_signature", "3.15", "error"),
    ("litert_torch", "litert_torch.backend.jax_bridge", "wrap", "0.10", "error"),
    (
        "litert_torch",
        "litert_torch.backend.lowerings.registry",
        "lower",
        "0.10",
        "error",
    ),
    ("litert_torch", "litert_converter.mlir", "ir", "0.10", "error"),
)


def resolve(module: str, attribute: str | None = None) -> Any:
    """The catalogued `module` (and dotted `attribute` in it), or an
    ImportError naming it and the versions it was checked on."""
    entry = next((e for e in CATALOGUE if e[1] == module and e[2] == attribute), None)
    checked = f"{entry[0]} {entry[3]}" if entry else SUPPORTED
    try:
        value = importlib.import_module(module)
        for name in (attribute or "").split(".") if attribute else ():
            value = getattr(value, name)
    except (ImportError, AttributeError) as err:
        what = f"{module}.{attribute}" if attribute else module
        raise ImportError(
            f"jaxlayer needs `{what}`, which this installation does not "
            f"provide ({type(err).__name__}: {err}); it was checked on "
            f"{checked}."
        ) from err
    return value


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


# JAX.


def jax_config_scope(name: str, value: Any):
    """A context in which JAX's flag `jax_<name>` is `value` (see the module
    docstring: `jax._src.config`'s context managers, or the public
    `jax.config.update` undone on exit)."""
    try:
        return resolve("jax._src.config", name)(value)
    except ImportError:
        return _updated_flag(f"jax_{name}", value)


@contextlib.contextmanager
def _updated_flag(flag: str, value: Any):
    import jax

    old = getattr(jax.config, flag)
    jax.config.update(flag, value)
    try:
        yield
    finally:
        jax.config.update(flag, old)


def jax_mlir() -> types.SimpleNamespace:
    """JAX's MLIR tools for the load-safety verifier: `make_ir_context`,
    `ir`, `deserialize_portable_artifact` (public) and
    `refine_polymorphic_shapes` on a module (private; see the docstring)."""
    from jax.extend import mlir as extend_mlir
    from jax.interpreters import mlir

    return types.SimpleNamespace(
        make_ir_context=mlir.make_ir_context,
        ir=mlir.ir,
        deserialize_portable_artifact=getattr(
            extend_mlir, "deserialize_portable_artifact", None
        )
        or resolve("jax._src.lib", "_jax.mlir.deserialize_portable_artifact"),
        refine_polymorphic_shapes=resolve(
            "jax._src.interpreters.mlir", "refine_polymorphic_shapes"
        ),
    )


def jax_dlpack_extension() -> tuple[Any, int]:
    """jaxlib's extension module and its version, for the torch bridge's
    DLPack exchange (ImportError when missing: the bridge uses the public
    DLPack functions)."""
    resolve("jax._src.lib", "_jax.dlpack_managed_tensor_to_buffer")
    resolve("jax._src.lib", "_jax.buffer_to_dlpack_managed_tensor")
    lib = resolve("jax._src.lib")
    return lib._jax, resolve("jax._src.lib", "jaxlib_extension_version")


# Keras.


def keras_in_stateless_scope() -> Any:
    """Keras's `in_stateless_scope` function, or None where it has gone."""
    try:
        return resolve("keras.src.backend.common.stateless_scope", "in_stateless_scope")
    except ImportError:
        return None


def keras_in_safe_mode() -> bool:
    """Keras's `safe_mode` now: False only where a load said
    `safe_mode=False` (or unsafe deserialization was enabled); True where
    Keras's `in_safe_mode` has gone (the strict choice)."""
    try:
        in_safe_mode = resolve("keras.src.saving.serialization_lib", "in_safe_mode")
    except ImportError:
        return True
    # None outside any load: safe.
    return in_safe_mode() is not False


# Export converters.


def tf2onnx_internals() -> tuple[Any, Any, Any]:
    """tf2onnx's `handler` module, `tf_utils` module and `utils.make_name`."""
    return (
        resolve("tf2onnx.handler"),
        resolve("tf2onnx.tf_utils"),
        resolve("tf2onnx.utils", "make_name"),
    )


def jax2onnx_plugin_system() -> Any:
    """jax2onnx's plugin registry module (`register_primitive`, ...)."""
    module = resolve("jax2onnx.plugins.plugin_system")
    resolve("jax2onnx.plugins.plugin_system", "register_primitive")
    return module


def patch_openvino_convert_model(wrap: Any) -> None:
    """Replaces `openvino.convert_model` by `wrap(openvino.convert_model)`."""
    openvino = resolve("openvino")
    resolve("openvino", "convert_model")
    openvino.convert_model = wrap(openvino.convert_model)


def patch_jax2onnx_to_onnx(wrap: Any) -> None:
    """Replaces `jax2onnx.to_onnx` by `wrap(jax2onnx.to_onnx)`."""
    jax2onnx = resolve("jax2onnx")
    jax2onnx.to_onnx = wrap(resolve("jax2onnx", "to_onnx"))


def litert_torch_internals() -> tuple[Any, Any, Any]:
    """litert-torch's MLIR `ir`, `jax_bridge` and lowering `registry`."""
    return (
        resolve("litert_converter.mlir", "ir"),
        resolve("litert_torch.backend.jax_bridge"),
        resolve("litert_torch.backend.lowerings.registry"),
    )
