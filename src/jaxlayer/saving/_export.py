"""Exporting a layer's computation for its `.keras` file (`jax.export`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

import jax
import jax.export
import jax.numpy as jnp
import keras

from jaxlayer import _private
from jaxlayer import _variables as V
from jaxlayer._record import InputRecord, input_template, shared_groups
from jaxlayer._shapes import symbolic_dims, trace_bounded
from jaxlayer.export import _saved
from jaxlayer.saving._exported_call import ExportedCall
from jaxlayer.saving._manifest import (
    DEFAULT_PLATFORMS,
    FORMAT,
    KINDS,
    Artifacts,
    say,
)

# The manifest's helpers under the names this module's code used when it
# was one file with them (`jaxlayer/saving.py`).
from jaxlayer.saving._manifest import SUFFIX as _SUFFIX
from jaxlayer.saving._manifest import Spec as _Spec
from jaxlayer.saving._manifest import first_line as _first_line
from jaxlayer.saving._manifest import shapes_text as _shapes_text
from jaxlayer.saving._manifest import version as _version


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What exporting takes from a layer: values, and functions it hands over.

    The layer makes one when its config is asked for
    (`JaxLayer._export_source`); exporting never reads the layer itself.

    Attributes:
        owner: the layer, for messages (`"JaxLayer 'mlp'"`).
        layer_class: the layer's class name, for the manifest.
        call_fn: the function, part of the export cache's key.
        call_fn_arguments: its argument names, for the manifest.
        built: whether the layer has its weights.
        record: the input record, or None before the first call.
        trees: `(params spec, state spec)`, the `_variables.TreeSpec`s.
        dtype_policy: the name of the layer's dtype policy.
        native_serialization_platforms: the platforms to export for (None:
            `DEFAULT_PLATFORMS`).
        trainable: the ids of the trainable variables.
        abstract_trees: `() -> (params, state, defs)`, the shapes and dtypes
            the pure function takes.
        call_rng: `(training) -> (rng leaves, rng treedef)`, drawn in a
            `keras.StatelessScope`.
        pure_fn: `(training, in_def, rng_def, example) -> PureFunction`.
        compute_output_spec: the layer's `compute_output_spec`.
        memo: the layer's `ExportMemo`.
    """

    owner: str
    layer_class: str
    call_fn: Callable
    call_fn_arguments: tuple
    built: bool
    record: InputRecord | None
    trees: tuple
    dtype_policy: str
    native_serialization_platforms: tuple | None
    trainable: frozenset
    abstract_trees: Callable
    call_rng: Callable
    pure_fn: Callable
    compute_output_spec: Callable
    memo: ExportMemo


@dataclasses.dataclass
class ExportMemo:
    """What a layer's last export left: kept by the layer, written here.

    Attributes:
        cache: `(key, artifacts, notes)` of the last export, reused while
            the key (function, trees, policy, platforms, record) holds.
        why: why the last `get_config` saved no computation, or None.
    """

    cache: tuple | None = None
    why: str | None = None


def artifacts_for_save(layer: ExportSource) -> tuple[Artifacts | None, str | None]:
    """The artifacts to save with the layer, made (or reused) now.

    Returns `(artifacts, None)`, or `(None, why)` when the layer's
    computation cannot be exported (the file then holds the config and
    weights only, as jaxlayer 0.1.0 wrote them). Warns once when an export
    fell back (concrete shapes, no VJP, fewer platforms).
    """
    artifacts, why = _artifacts_for_save(layer)
    layer.memo.why = why
    return artifacts, why


def export_failure(memo: ExportMemo) -> str:
    """Why the last `get_config` of a layer saved no computation."""
    return memo.why or "it could not be exported"


def _artifacts_for_save(layer: ExportSource):
    fn = layer.call_fn
    if isinstance(fn, ExportedCall):
        if not fn.loaded:
            return None, (
                "its computation, rebuilt from a file, was never loaded from "
                "that file's assets"
            )
        return fn.artifacts(), None
    record = layer.record
    if record is None or not layer.built:
        return None, "it was never called, so its input structure is unknown"
    key = (
        fn,
        *layer.trees,
        layer.dtype_policy,
        layer.native_serialization_platforms,
        record,
    )
    cached = layer.memo.cache
    if cached is not None and _same_key(cached[0], key):
        artifacts, notes = cached[1], cached[2]
    else:
        artifacts, notes = _export(layer, record)
        layer.memo.cache = (key, artifacts, notes)
    if notes:
        say(
            f"{layer.owner}: the computation saved with it in the `.keras` "
            f"file {'; '.join(notes)}."
        )
    if artifacts is None:
        return None, "; ".join(notes) or "it could not be exported"
    return artifacts, None


def _same_key(a, b) -> bool:
    return len(a) == len(b) and all(
        # TreeSpecs by identity: dataclass equality would compare the Keras
        # variables in them, whose `==` is elementwise.
        x is y or (not isinstance(x, (V.TreeSpec,)) and x == y)
        for x, y in zip(a, b, strict=True)
    )


def _export(layer, record: InputRecord):
    """Exports the layer's function for both training flags."""
    platforms = tuple(layer.native_serialization_platforms or DEFAULT_PLATFORMS)
    params, state, _ = layer.abstract_trees()
    params_spec, state_spec = layer.trees
    names = V.variable_names([params_spec, state_spec])
    trainable = layer.trainable
    # By id: a Keras variable's `==` is elementwise.
    kinds = {id(v): "params" for v in _variables(params_spec)}
    variables = [
        {
            "name": name,
            "tree": kinds.get(id(v), "state"),
            "shape": list(v.shape),
            "dtype": keras.backend.standardize_dtype(v.dtype),
            # Saved so a rebuilt layer freezes what a transform froze
            # (`_inherit_steps`).
            "trainable": id(v) in trainable,
        }
        for name, v in names
    ]
    in_tree = jax.tree_util.tree_unflatten(
        record.treedef,
        [
            V.Leaf(shape=list(s), dtype=d)
            for s, d in zip(record.shapes, record.dtypes, strict=True)
        ],
    )
    try:
        inputs_config = V.encode_tree(in_tree, "inputs")
    except V.UndescribableTree as err:
        return None, [f"was not saved: {err}"]
    manifest = {
        "format": FORMAT,
        "jaxlayer_version": _version(),
        "layer_class": layer.layer_class,
        "platforms": list(platforms),
        "call_fn_arguments": list(layer.call_fn_arguments),
        "inputs": inputs_config,
        "variables": variables,
        "functions": {},
    }
    blobs: dict = {}
    notes: list = []
    for kind in KINDS:
        try:
            with _no_source_paths():
                entry, blob, note, extra = _export_one(
                    layer, kind, record, params, state, platforms
                )
        except _NotExported as err:
            notes.append(f"has no {kind} function ({err})")
            continue
        if note:
            notes.append(note)
        manifest["functions"][kind] = entry
        blobs[entry["file"]] = blob
        blobs.update(extra)
    if not manifest["functions"]:
        return None, notes
    for kind in KINDS:
        entry = manifest["functions"].get(kind)
        if entry is not None:
            # Those exported for, which may be fewer than asked (see `_lower`).
            manifest["platforms"] = entry["platforms"]
    return Artifacts(manifest, blobs), notes


class _NotExported(Exception):
    pass


def _no_source_paths():
    """A context in which exported modules carry no path of this machine.

    jax writes each operation's Python traceback into its MLIR location
    (file paths of the saving machine's code and site-packages). Here only
    the name of each operation stays, with one frame whose file name is
    emptied. The VJP is exported while serializing, so both run in here.
    """
    # Private flags: jax has no public switch for what locations hold.
    scope = contextlib.ExitStack()
    scope.enter_context(
        _private.jax_config_scope("include_full_tracebacks_in_locations", False)
    )
    scope.enter_context(
        _private.jax_config_scope("hlo_source_file_canonicalization_regex", r".*")
    )
    return scope


def _export_one(layer, kind, record, params, state, platforms):
    training = kind == "training"
    # Drawn in a stateless scope: saving must not advance the layer's seed
    # generator (a saved model trains on as an unsaved one would).
    with keras.StatelessScope():
        rng_leaves, rng_def = layer.call_rng(training)
    rng = [_rng_struct(x) for x in rng_leaves]
    rng_desc = [V.Leaf(shape=list(x.shape), dtype=_dtype_name(x.dtype)) for x in rng]
    try:
        rng_config = V.encode_tree(
            jax.tree_util.tree_unflatten(rng_def, rng_desc), "rng"
        )
    except V.UndescribableTree as err:
        raise _NotExported(err) from None
    examples = [_Spec(s, d) for s, d in zip(record.shapes, record.dtypes, strict=True)]
    try:
        fn = layer.pure_fn(
            training, record.treedef, rng_def, (params, examples, state, rng)
        )
        outputs = _output_spec(layer, training, record)
    except Exception as err:  # noqa: BLE001 - reported in the save warning
        raise _NotExported(_first_line(err)) from None
    note = None
    # Every unknown dimension its own symbol first; then those equal in the
    # recorded calls (token ids and their mask: one sequence length) as one
    # symbol, for a function that needs them equal (adds one to the other).
    template = input_template(record)
    attempts = [symbolic_dims(template)]
    shared = symbolic_dims(template, shared_groups(record))
    if shared != attempts[0]:
        attempts.append(shared)
    exported = error = None
    bounds: dict = {}
    for dims in attempts:
        exported, used, err, lowered_with, bounds = _lower_symbolic(
            fn, params, dims, record.dtypes, state, rng, platforms, record.called
        )
        error = error or err
        if exported is not None:
            break
    shapes = "symbolic"
    # A function whose code needs the batch size (a reshape to it) cannot
    # take a symbolic batch: then the shapes of its first concrete call.
    if exported is None and record.called is not None:
        concrete = [
            jax.ShapeDtypeStruct(s, jnp.dtype(d))
            for s, d in zip(record.called, record.dtypes, strict=True)
        ]
        exported, used, _ = _lower(fn, params, concrete, state, rng, platforms)
        if exported is not None:
            shapes = "concrete"
            lowered_with = concrete
            note = (
                f"({kind}) is for inputs of the shapes the layer was first "
                f"called with, {_shapes_text(record.called)}, not for any "
                f"batch size (exporting it with a symbolic batch failed: "
                f"{_first_line(error)})"
            )
    if exported is None:
        raise _NotExported(_first_line(error))
    if tuple(used) != tuple(platforms):
        extra = (
            f"({kind}) was exported for {', '.join(used)} only (lowering it "
            f"for {', '.join(platforms)} failed)"
        )
        note = f"{note}; {extra}" if note else extra
    try:
        # First order: enough to fine-tune a reloaded layer; each order more is
        # one more module in the file (and for the load check to verify).
        blob = bytes(exported.serialize(vjp_order=1))
        vjp_order = 1
    except Exception as err:  # noqa: BLE001 - saved without gradients
        blob = bytes(exported.serialize(vjp_order=0))
        vjp_order = 0
        extra = (
            f"({kind}) has no gradient, so a reloaded layer cannot be "
            f"fine-tuned ({_first_line(err)})"
        )
        note = f"{note}; {extra}" if note else extra
    entry = {
        "file": f"{kind}{_SUFFIX}",
        "training": training,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "platforms": list(exported.platforms),
        "shapes": shapes,
        "vjp_order": vjp_order,
        "rng": rng_config,
        "outputs": outputs,
    }
    if shapes == "concrete":
        entry["input_shapes"] = [list(s) for s in record.called]
    else:
        # Which unknown dimensions share a symbol (one name: equal sizes).
        entry["input_dims"] = [
            [d if isinstance(d, int) else str(d) for d in s.shape] for s in lowered_with
        ]
        if bounds:
            # The largest size of each bounded symbol: a reloaded layer refuses
            # a larger one with a message (`ExportedCall`), not an XLA error.
            entry["bounds"] = dict(sorted(bounds.items()))
            extra = (
                f"({kind}) takes {_bounds_text(bounds, entry['input_dims'])} "
                "only (the function compares it with that size, so it "
                "cannot be exported for any size)"
            )
            note = f"{note}; {extra}" if note else extra
    extra = {}
    # ONNX for inference only: the exports that read it deploy the layer in
    # inference.
    if not training:
        with _no_source_paths():
            # With the input shapes the artifact was lowered with (concrete after a
            # fallback), so both forms take the same inputs.
            onnx_blob, why = _saved.make(fn, [params, lowered_with, state, rng])
        if onnx_blob is None:
            entry["onnx"] = {"missing": why}
        else:
            name = f"{kind}{_saved.SUFFIX}"
            entry["onnx"] = {
                "file": name,
                "sha256": hashlib.sha256(onnx_blob).hexdigest(),
                "bytes": len(onnx_blob),
                "opset": _saved.OPSET,
            }
            extra[name] = onnx_blob
    return entry, blob, note, extra


def _output_spec(layer, training, record):
    """The outputs' description for the saved input structure (None dims)."""
    inputs = jax.tree_util.tree_unflatten(
        record.treedef,
        [
            keras.KerasTensor(s, dtype=d)
            for s, d in zip(input_template(record), record.dtypes, strict=True)
        ],
    )
    try:
        spec = layer.compute_output_spec(inputs, training=training)
    except Exception:  # noqa: BLE001 - a batch-size dependent function
        inputs = jax.tree_util.tree_unflatten(
            record.treedef,
            [
                keras.KerasTensor(s, dtype=d)
                for s, d in zip(
                    record.called or record.shapes, record.dtypes, strict=True
                )
            ],
        )
        spec = layer.compute_output_spec(inputs, training=training)
    tree = jax.tree_util.tree_map(
        lambda t: V.Leaf(
            # Python ints: JSON cannot hold NumPy integers.
            shape=[None if d is None else int(d) for d in t.shape],
            dtype=keras.backend.standardize_dtype(t.dtype),
        ),
        spec,
    )
    try:
        return V.encode_tree(tree, "outputs")
    except V.UndescribableTree as err:
        raise _NotExported(err) from None


def _lower_symbolic(fn, params, dims, dtypes, state, rng, platforms, called):
    """`_lower` with the inputs' symbolic `dims`, bounded where the function
    needs it (`trace_bounded`, never below the sizes of `called`, the
    recorded call): `(exported, platforms, error, inputs, bounds)`."""

    def trace(inputs):
        exported, used, error = _lower(fn, params, inputs, state, rng, platforms)
        if exported is None:
            raise error
        return exported, used, inputs

    try:
        (exported, used, inputs), bounds = trace_bounded(
            # A larger size is refused by the reloaded layer, with a message.
            trace,
            dims,
            dtypes,
            known=[called] if called else (),
            compare=True,
        )
    except Exception as err:  # noqa: BLE001 - reported, or the next attempt
        return None, None, err, None, {}
    return exported, used, None, inputs, bounds


def _bounds_text(bounds, input_dims) -> str:
    """`inputs[0] dimension 1 up to 32, ...`: where each bounded symbol is."""
    parts = []
    for name, n in sorted(bounds.items()):
        where = [
            f"inputs[{k}] dimension {i}"
            for k, leaf in enumerate(input_dims)
            for i, d in enumerate(leaf)
            if d == name
        ]
        parts.append(f"{' and '.join(where) or name} up to {n}")
    return ", ".join(parts)


def _lower(fn, params, inputs, state, rng, platforms):
    """`(exported, platforms, None)`, or `(None, None, error)`."""
    error = None
    choices = [tuple(platforms)]
    current = jax.export.default_export_platform()
    # Then this platform alone: a function that lowers here but not for
    # every platform asked (a platform-specific kernel) still saves, with a
    # note saying for which.
    if choices[0] != (current,) and current in platforms:
        choices.append((current,))
    for choice in choices:
        try:
            exported = jax.export.export(jax.jit(fn), platforms=choice)(
                params, inputs, state, rng
            )
        except Exception as err:  # noqa: BLE001 - next choice, or reported
            # The first error: the one for every platform asked, which the note
            # reports.
            error = error or err
            continue
        return exported, choice, None
    return None, None, error


def _is_key_dtype(dtype) -> bool:
    # A backend's dtype (`tf.int32`, `torch.int32`) is never a JAX key type,
    # and `jax.dtypes.issubdtype` cannot read it.
    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def _rng_struct(x):
    dtype = x.dtype
    if _is_key_dtype(dtype):
        return jax.ShapeDtypeStruct(tuple(x.shape), dtype)
    # Integer seeds reach `call_fn` as uint32 (whatever the backend's dtype).
    return jax.ShapeDtypeStruct(tuple(int(d) for d in x.shape), jnp.uint32)


def _dtype_name(dtype) -> str:
    if _is_key_dtype(dtype):
        return str(dtype)
    return keras.backend.standardize_dtype(dtype)


def _variables(spec):
    return [] if spec is None else list(spec.variables)
