"""Portable saving: a layer's computation, exported, inside its `.keras` file.

When a model is saved as `.keras`, every jaxlayer layer also stores its
pure function `fn(params, inputs, state, rng) -> (outputs, new_state)` (the
bridges' seam, on flat lists) as serialized `jax.export` artifacts:
StableHLO bytes, data and not pickles, one for `training=False` and one for
`training=True`, for the input structure the layer was first called with,
with a symbolic batch dimension (and every other dimension that was None
symbolic too), for the layer's `native_serialization_platforms` (CPU and
CUDA by default), with the VJP (`vjp_order=1`) so that gradients work after
reloading. The weights are arguments of the function, never constants in
it: they stay in the weights file.

Where the artifacts go: the layer's config (`config.json`) holds a
manifest (format version, jaxlayer version, platforms, the `call_fn`
argument names, the input, output and rng structures, the variables and
the sha256 of each artifact); Keras's per-layer asset hooks
(`Layer.save_assets`/`load_assets`) write the artifacts and a copy of the
manifest to the layer's folder of the archive's `assets/`.

Loading: Keras calls `from_config` first, then builds the model (calling
each layer on `KerasTensor`s), then loads the weights, then the assets.
When the layer's Python functions can be located (registered, or in
`custom_objects`), they are used and the artifacts are not read. Otherwise
`from_config` makes the layer with an `ExportedCall` as its `call_fn`: a
function with the original argument names that, once `load_assets` has read
and checked the artifacts, flattens its arguments and calls the deserialized
`Exported` for the right training flag. Until then it can only answer the
symbolic build, with outputs of the saved shapes. Nothing from the file is
ever run as Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from jaxlayer import _artifact_check as check
from jaxlayer import _variables as V

FORMAT = 1
DEFAULT_PLATFORMS = ("cpu", "cuda")
KINDS = ("inference", "training")
MANIFEST_FILE = "manifest.json"
_SUFFIX = ".jaxexport"


# -- what the layer records of its calls ----------------------------------


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """The input structure a layer was first called with.

    Attributes:
        treedef: the structure of the inputs.
        shapes: per input leaf, its shape (None where unknown).
        dtypes: per input leaf, its dtype as the layer's function gets it.
        called: per input leaf, the concrete shape of the first call whose
            shapes were all known (None until one happened): what is
            exported when a symbolic batch cannot be.
    """

    treedef: Any
    shapes: tuple
    dtypes: tuple
    called: tuple | None = None


def _dims(shape) -> tuple:
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in shape)


def watched_call(layer, call, args, kwargs):
    """`call(*args, **kwargs)`, recording the input structure on the way.

    Called by `JaxLayer.__call__` while the layer still watches its calls:
    until it has recorded the input structure and one call of known shapes,
    and while its computation, rebuilt from a file, waits for its artifacts
    (then a call on `KerasTensor`s, Keras rebuilding the model, is answered
    with the saved output shapes).
    """
    inputs = args[0] if args else kwargs.get("inputs")
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    arrays = all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)
    symbolic = any(isinstance(x, keras.KerasTensor) for x in leaves)
    record = layer._input_record
    if arrays and record is None:
        record = InputRecord(
            treedef,
            tuple(_dims(x.shape) for x in leaves),
            tuple(layer._placeholder_dtype(x) for x in leaves),
        )
    if arrays and record is not None and record.called is None:
        shapes = tuple(_dims(x.shape) for x in leaves)
        known = all(None not in s for s in shapes)
        if not symbolic and known and treedef == record.treedef:
            record = dataclasses.replace(record, called=shapes)
    if record is not layer._input_record:
        object.__setattr__(layer, "_input_record", record)
    fn = layer.call_fn
    pending = isinstance(fn, ExportedCall) and not fn.loaded
    if not pending and record is not None and record.called is not None:
        object.__setattr__(layer, "_saving_watch", False)
    if pending and symbolic:
        with fn.symbolic():
            return call(*args, **kwargs)
    return call(*args, **kwargs)


def record_from_manifest(manifest) -> InputRecord | None:
    """The input record a manifest describes (for a reloaded layer)."""
    specs = []
    try:
        tree = V.decode_tree(manifest["inputs"], lambda body: _Spec(**body))
    except (KeyError, TypeError, ValueError):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: isinstance(x, _Spec)
    )
    specs = [(tuple(x.shape), x.dtype) for x in leaves]
    called = None
    for entry in manifest.get("functions", {}).values():
        if entry.get("shapes") == "concrete":
            called = tuple(tuple(s) for s in entry.get("input_shapes", []))
            break
    return InputRecord(
        treedef,
        tuple(s for s, _ in specs),
        tuple(d for _, d in specs),
        called,
    )


@dataclasses.dataclass
class _Spec:
    """A shape (None where unknown) and a dtype."""

    shape: Any
    dtype: Any


# -- exporting -------------------------------------------------------------


@dataclasses.dataclass
class Artifacts:
    """A layer's exported computation: the manifest and the artifact bytes."""

    manifest: dict
    blobs: dict  # file name -> bytes


def artifacts_for_save(layer) -> tuple[Artifacts | None, str | None]:
    """The artifacts to save with `layer`, made (or reused) now.

    Returns `(artifacts, None)`, or `(None, why)` when the layer's
    computation cannot be exported (the file then holds the config and
    weights only, as jaxlayer 0.1.0 wrote them). Warns once when an export
    fell back (concrete shapes, no VJP, fewer platforms).
    """
    artifacts, why = _artifacts_for_save(layer)
    object.__setattr__(layer, "_export_why", why)
    return artifacts, why


def export_failure(layer) -> str:
    """Why the last `get_config` of `layer` saved no computation."""
    return layer.__dict__.get("_export_why") or "it could not be exported"


def _artifacts_for_save(layer):
    fn = layer.call_fn
    if isinstance(fn, ExportedCall):
        if not fn.loaded:
            return None, (
                "its computation, rebuilt from a file, was never loaded from "
                "that file's assets"
            )
        return fn.artifacts(), None
    record = layer._input_record
    if record is None or not layer.built:
        return None, "it was never called, so its input structure is unknown"
    key = (
        fn,
        layer._params_spec,
        layer._state_spec,
        layer.dtype_policy.name,
        layer.native_serialization_platforms,
        record,
    )
    cached = layer.__dict__.get("_export_cache")
    if cached is not None and _same_key(cached[0], key):
        artifacts, notes = cached[1], cached[2]
    else:
        artifacts, notes = _export(layer, record)
        object.__setattr__(layer, "_export_cache", (key, artifacts, notes))
    if notes:
        say(
            f"{layer._owner}: the computation saved with it in the `.keras` "
            f"file {'; '.join(notes)}."
        )
    if artifacts is None:
        return None, "; ".join(notes) or "it could not be exported"
    return artifacts, None


def _same_key(a, b) -> bool:
    return len(a) == len(b) and all(
        x is y or (not isinstance(x, (V.TreeSpec,)) and x == y)
        for x, y in zip(a, b, strict=True)
    )


def _export(layer, record: InputRecord):
    """Exports the layer's function for both training flags."""
    platforms = tuple(layer.native_serialization_platforms or DEFAULT_PLATFORMS)
    params, state, _ = layer._abstract_trees(None)
    names = V.variable_names([layer._params_spec, layer._state_spec])
    trainable = {id(v) for v in layer.trainable_variables}
    kinds = {id(v): "params" for v in _variables(layer._params_spec)}
    variables = [
        {
            "name": name,
            "tree": kinds.get(id(v), "state"),
            "shape": list(v.shape),
            "dtype": keras.backend.standardize_dtype(v.dtype),
            "trainable": id(v) in trainable,
        }
        for name, v in names
    ]
    in_tree = jax.tree_util.tree_unflatten(
        record.treedef,
        [
            V._Leaf(shape=list(s), dtype=d)
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
        "layer_class": type(layer).__name__,
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
                entry, blob, note = _export_one(
                    layer, kind, record, params, state, platforms
                )
        except _NotExported as err:
            notes.append(f"has no {kind} function ({err})")
            continue
        if note:
            notes.append(note)
        manifest["functions"][kind] = entry
        blobs[entry["file"]] = blob
    if not manifest["functions"]:
        return None, notes
    for kind in KINDS:
        entry = manifest["functions"].get(kind)
        if entry is not None:
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
    from jax._src import config

    scope = contextlib.ExitStack()
    scope.enter_context(config.include_full_tracebacks_in_locations(False))
    scope.enter_context(config.hlo_source_file_canonicalization_regex(r".*"))
    return scope


def _export_one(layer, kind, record, params, state, platforms):
    training = kind == "training"
    with keras.StatelessScope():
        rng_leaves, rng_def = layer._call_rng(training)
    rng = [_rng_struct(x) for x in rng_leaves]
    rng_desc = [V._Leaf(shape=list(x.shape), dtype=_dtype_name(x.dtype)) for x in rng]
    try:
        rng_config = V.encode_tree(
            jax.tree_util.tree_unflatten(rng_def, rng_desc), "rng"
        )
    except V.UndescribableTree as err:
        raise _NotExported(err) from None
    examples = [_Spec(s, d) for s, d in zip(record.shapes, record.dtypes, strict=True)]
    try:
        fn = layer._pure_fn(
            training, record.treedef, rng_def, (params, examples, state, rng)
        )
        outputs = _output_spec(layer, training, record)
    except Exception as err:  # noqa: BLE001 - reported in the save warning
        raise _NotExported(_first_line(err)) from None
    note = None
    symbolic = _symbolic_structs(record)
    exported, used, error = _lower(fn, params, symbolic, state, rng, platforms)
    shapes = "symbolic"
    if exported is None and record.called is not None:
        concrete = [
            jax.ShapeDtypeStruct(s, jnp.dtype(d))
            for s, d in zip(record.called, record.dtypes, strict=True)
        ]
        exported, used, _ = _lower(fn, params, concrete, state, rng, platforms)
        if exported is not None:
            shapes = "concrete"
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
    return entry, blob, note


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
        lambda t: V._Leaf(
            shape=[None if d is None else int(d) for d in t.shape],
            dtype=keras.backend.standardize_dtype(t.dtype),
        ),
        spec,
    )
    try:
        return V.encode_tree(tree, "outputs")
    except V.UndescribableTree as err:
        raise _NotExported(err) from None


def input_template(record: InputRecord) -> list[tuple]:
    """Per input leaf, its shape with None where the export is symbolic.

    The first dimension of every input is the batch (when it was unknown,
    or equal to the first input's), and every unknown dimension is symbolic.
    """
    first = next((s[0] for s in record.shapes if s), None)
    return [
        tuple(
            None if d is None or (i == 0 and d == first) else int(d)
            for i, d in enumerate(shape)
        )
        for shape in record.shapes
    ]


def _symbolic_structs(record: InputRecord):
    """The inputs with a symbolic batch and every unknown dimension symbolic."""
    scope = jax.export.SymbolicScope()
    names = (f"d{i}" for i in itertools.count())
    structs = []
    for shape, dtype in zip(input_template(record), record.dtypes, strict=True):
        dims = [
            ("batch" if i == 0 else next(names)) if d is None else str(d)
            for i, d in enumerate(shape)
        ]
        sym = jax.export.symbolic_shape(",".join(dims), scope=scope) if dims else ()
        structs.append(jax.ShapeDtypeStruct(sym, jnp.dtype(dtype)))
    return structs


def _lower(fn, params, inputs, state, rng, platforms):
    """`(exported, platforms, None)`, or `(None, None, error)`."""
    error = None
    choices = [tuple(platforms)]
    current = jax.export.default_export_platform()
    if choices[0] != (current,) and current in platforms:
        choices.append((current,))
    for choice in choices:
        try:
            exported = jax.export.export(jax.jit(fn), platforms=choice)(
                params, inputs, state, rng
            )
        except Exception as err:  # noqa: BLE001 - next choice, or reported
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


def _version() -> str:
    try:
        import jaxlayer

        return str(jaxlayer.__version__)
    except Exception:  # noqa: BLE001 - a partial import
        return "unknown"


def _first_line(err) -> str:
    if err is None:
        return "unknown error"
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line}"[:300]


def _shapes_text(shapes) -> str:
    if len(shapes) == 1:
        return str(tuple(shapes[0]))
    return ", ".join(str(tuple(s)) for s in shapes)


# -- the asset hooks -------------------------------------------------------


def save_assets(layer, dirpath: str) -> None:
    """Writes the artifacts made for the layer's config to `dirpath`."""
    fn = layer.call_fn
    if isinstance(fn, ExportedCall) and fn.loaded:
        artifacts = fn.artifacts()
    else:
        cached = layer.__dict__.get("_export_cache")
        artifacts = cached[1] if cached is not None else None
    if artifacts is None:
        return
    for name, blob in artifacts.blobs.items():
        with open(os.path.join(dirpath, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(dirpath, MANIFEST_FILE), "w") as f:
        json.dump(artifacts.manifest, f, indent=1)


def load_assets(layer, dirpath: str | None) -> None:
    """Reads and checks the artifacts of a layer rebuilt from them."""
    fn = layer.call_fn
    if not isinstance(fn, ExportedCall) or fn.loaded:
        return
    fn.load(dirpath)
    layer._reset_pure_fns()


# -- the call_fn rebuilt from the artifacts ---------------------------------


class ExportedCall:
    """A `call_fn` rebuilt from the computation saved in a `.keras` file.

    It takes the arguments the original `call_fn` took, by the same names,
    flattens them and calls the deserialized `jax.export.Exported` of the
    training flag (or, for a function without `training`, of the `rng`
    structure) it is called with; outputs and new state come back in the
    saved structures.

    Attributes:
        owner: the layer, for messages.
        manifest: the manifest saved in the layer's config.
        fn_config: the saved config of the original `call_fn` (kept for
            re-saving).
        init_config: the saved config of the original `init_fn`.
        module_class: the class of the module the layer was made from, for
            messages (adapters), or None.
    """

    def __init__(
        self,
        manifest: dict,
        owner: str,
        fn_config: Any = None,
        init_config: Any = None,
        module_class: str | None = None,
    ):
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{owner}: the computation saved in the `.keras` file has "
                f"format {manifest.get('format')!r} (jaxlayer "
                f"{manifest.get('jaxlayer_version')}), which this jaxlayer "
                f"({_version()}, format {FORMAT}) cannot read; upgrade "
                "jaxlayer, or load the model where its Python code is "
                "importable."
            )
        self.owner = owner
        self.manifest = manifest
        self.fn_config = fn_config
        self.init_config = init_config
        self.module_class = module_class
        self.kept: dict = {}
        self.names = list(manifest["call_fn_arguments"])
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for n in self.names
            ]
        )
        name = fn_config.get("config") if isinstance(fn_config, dict) else None
        self.__name__ = f"{name if isinstance(name, str) else 'call_fn'}_exported"
        self._exported: dict = {}
        self._artifacts: Artifacts | None = None
        # Keras's `safe_mode` of the load that rebuilt the layer (read while
        # `from_config` runs; the assets are read after it, outside its scope).
        self.safe_mode = _in_safe_mode()
        self._symbolic = 0
        functions = manifest.get("functions", {})
        self._out = {}
        self._rng_defs = {}
        for kind, entry in functions.items():
            outputs = V.decode_tree(entry["outputs"], lambda b: _Spec(**b))
            leaves, treedef = jax.tree_util.tree_flatten(
                outputs, is_leaf=lambda x: isinstance(x, _Spec)
            )
            self._out[kind] = (treedef, leaves)
            rng = V.decode_tree(entry["rng"], lambda b: _Spec(**b))
            self._rng_defs[kind] = jax.tree_util.tree_structure(
                rng, is_leaf=lambda x: isinstance(x, _Spec)
            )

    @property
    def loaded(self) -> bool:
        """Whether the artifacts were read (`load`)."""
        return bool(self._exported)

    def symbolic(self):
        """A context in which calls answer with the saved output shapes."""
        call = self

        class _Scope:
            def __enter__(self):
                call._symbolic += 1

            def __exit__(self, *exc):
                call._symbolic -= 1

        return _Scope()

    def artifacts(self) -> Artifacts:
        """The computation as saved again: serialized anew from what was
        loaded (no copy of the file's bytes is kept), so the manifest's
        byte counts and hashes are those of the new bytes."""
        if self._artifacts is None:
            manifest = json.loads(json.dumps(self.manifest))
            blobs = {}
            for kind, exp in self._exported.items():
                entry = manifest["functions"][kind]
                blob = bytes(exp.serialize(vjp_order=int(entry.get("vjp_order", 0))))
                entry["sha256"] = hashlib.sha256(blob).hexdigest()
                entry["bytes"] = len(blob)
                blobs[entry["file"]] = blob
            self._artifacts = Artifacts(manifest, blobs)
        return self._artifacts

    def share(self, other: ExportedCall) -> None:
        """Takes the computation `other` loaded (a copy of its layer)."""
        if other.manifest != self.manifest:
            raise ValueError(
                f"{self.owner}: cannot share the computation of "
                f"{other.owner}, which was saved with another manifest."
            )
        self._exported = dict(other._exported)
        self._artifacts = other._artifacts

    # -- loading --

    def load(self, dirpath: str | None) -> None:
        """Reads, checks and deserializes the artifacts in `dirpath`.

        Nothing is deserialized in this process before it was proven safe
        (see `jaxlayer._artifact_check`): sizes first, then the verifying
        child process (skipped under `safe_mode=False`), then the policy and
        the manifest's shapes against the artifact's own.
        """
        functions = self.manifest.get("functions", {})
        platforms = self.manifest.get("platforms")
        if dirpath is None or not os.path.isdir(dirpath):
            raise ValueError(
                f"{self.owner}: the `.keras` file has no exported computation "
                "for this layer (its assets folder is missing), and the "
                "layer's Python code was not found; load the model where "
                "that code is importable, or save it again with jaxlayer "
                ">= 0.2."
            )
        current = jax.export.default_export_platform()
        cap = check.max_artifact_bytes()
        files, wheres, sizes = {}, {}, {}
        for entry in functions.values():
            name = entry["file"]
            where = (
                f"{self.owner}: the exported computation `{name}` in the `.keras` file"
            )
            made = (
                f"(exported by jaxlayer {self.manifest.get('jaxlayer_version')}"
                f" for platforms {', '.join(entry.get('platforms', platforms))})"
            )
            path = os.path.join(dirpath, os.path.basename(name))
            if not os.path.isfile(path):
                raise ValueError(f"{where} is missing {made}; save the model again.")
            size = os.path.getsize(path)
            declared = entry.get("bytes")
            if isinstance(declared, int) and size == declared and size > cap:
                raise check.Refused(
                    f"{where} is {size} bytes, more than the {cap} bytes "
                    f"({cap / 2**20:g} MiB) a loaded computation may have "
                    "(the weights are never part of it); refused. If the "
                    "file is trusted, set JAXLAYER_MAX_ARTIFACT_MIB higher."
                )
            sha = check.sha256_of(path) if size == declared else None
            if sha is None or sha != entry.get("sha256"):
                raise ValueError(
                    f"{where} is damaged or was changed after saving: its "
                    f"{size} bytes do not match the {declared} "
                    f"bytes and sha256 recorded when it was saved {made}. Save "
                    "the model again from its source."
                )
            if current not in entry.get("platforms", []):
                raise ValueError(
                    f"{where} was exported for platforms "
                    f"{', '.join(entry.get('platforms', []))}, and this process "
                    f"runs JAX on {current} {made}. Save the model with "
                    f"`native_serialization_platforms` naming {current!r} "
                    "(the default names cpu and cuda), or load it where the "
                    "layer's Python code is importable."
                )
            files[name] = (path, sha)
            wheres[name] = where
            sizes[name] = size
        if self.safe_mode:
            reports = check.reports(files, wheres)
        else:
            reports = {name: check.describe_here(p) for name, (p, _) in files.items()}
        for kind, entry in functions.items():
            name = entry["file"]
            check.check(reports[name], wheres[name], sizes[name])
            check.check_signature(
                reports[name], wheres[name], self._signature(kind, current)
            )
        exported = {}
        for kind, entry in functions.items():
            name = entry["file"]
            where = wheres[name]
            made = f"(exported by jaxlayer {self.manifest.get('jaxlayer_version')})"
            blob = bytearray(sizes[name])
            with open(files[name][0], "rb") as f:
                f.readinto(blob)
            if hashlib.sha256(blob).hexdigest() != files[name][1]:
                raise check.Refused(f"{where} changed while it was checked; refused.")
            try:
                exp = jax.export.deserialize(blob)
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    f"{where} cannot be read {made}: {_first_line(err)}."
                ) from err
            del blob  # the Exported holds its module; nothing else is kept
            expected = self._counts()
            n_in = len(exp.in_avals)
            n_out = len(exp.out_avals)
            want_out = len(self._out[kind][1]) + expected[2]
            want_in = sum(expected) + self._rng_defs[kind].num_leaves
            if n_in != want_in or n_out != want_out:
                raise ValueError(
                    f"{where} does not match the layer saved with it: it "
                    f"takes {n_in} arrays and returns {n_out}, where the "
                    f"layer's config says {want_in} and {want_out} {made}."
                )
            exported[kind] = exp
        self._exported = exported

    def _signature(self, kind: str, platform: str) -> dict:
        """What the manifest says the `kind` artifact takes and returns:
        `(shape, dtype)` per array, None where a dimension is symbolic."""
        entry = self.manifest["functions"][kind]
        variables = self.manifest.get("variables", [])

        def described(tree):
            return [
                (tuple(x.shape), x.dtype)
                for x in jax.tree_util.tree_leaves(
                    tree, is_leaf=lambda x: isinstance(x, _Spec)
                )
            ]

        record = record_from_manifest(self.manifest)
        if record is None:
            raise check.Refused(
                f"{self.owner}: the `.keras` file's description of the layer's "
                "inputs cannot be read; refused. Save the model again."
            )
        if entry.get("shapes") == "concrete":
            shapes = [tuple(s) for s in entry.get("input_shapes", [])]
        else:
            shapes = input_template(record)
        inputs = list(zip(shapes, record.dtypes, strict=True))
        rng = [
            (tuple(s), d)
            for s, d in described(V.decode_tree(entry["rng"], lambda b: _Spec(**b)))
        ]
        params = [
            (tuple(v["shape"]), v["dtype"]) for v in variables if v["tree"] == "params"
        ]
        state = [
            (tuple(v["shape"]), v["dtype"]) for v in variables if v["tree"] != "params"
        ]
        outputs = described(V.decode_tree(entry["outputs"], lambda b: _Spec(**b)))
        return {
            "in": params + inputs + state + rng,
            "out": outputs + state,
            "platform": platform,
        }

    def _counts(self):
        variables = self.manifest.get("variables", [])
        n_params = sum(1 for v in variables if v["tree"] == "params")
        n_state = len(variables) - n_params
        inputs = V.decode_tree(self.manifest["inputs"], lambda b: _Spec(**b))
        n_inputs = len(
            jax.tree_util.tree_leaves(inputs, is_leaf=lambda x: isinstance(x, _Spec))
        )
        return n_params, n_inputs, n_state

    # -- calling --

    def _kind(self, values) -> str:
        if "training" in values:
            return "training" if values["training"] else "inference"
        rng_def = jax.tree_util.tree_structure(values.get("rng"))
        for kind in KINDS:
            if self._rng_defs.get(kind) == rng_def:
                return kind
        return "training" if values.get("rng") is not None else "inference"

    def __call__(self, *args):
        values = dict(zip(self.names, args, strict=True))
        kind = self._kind(values)
        exp = self._exported.get(kind)
        has_state = "state" in self.names
        if exp is None:
            if self._symbolic and kind in self._out:
                return self._placeholder(kind, values, has_state)
            raise self._missing(kind)
        params = _arrays(values.get("params"))
        state_leaves, state_def = jax.tree_util.tree_flatten(values.get("state"))
        state = [x for x in state_leaves if _is_array(x)]
        inputs = self._checked_inputs(exp, len(params), values["inputs"])
        rng = jax.tree_util.tree_leaves(values.get("rng"))
        first_rng = len(params) + len(inputs) + len(state)
        rng = [_as(x, exp.in_avals[first_rng + i].dtype) for i, x in enumerate(rng)]
        outputs, new_state = exp.call(params, inputs, state, rng)
        treedef = self._out[kind][0]
        outputs = jax.tree_util.tree_unflatten(treedef, outputs)
        if not has_state:
            return outputs
        new = iter(new_state)
        leaves = [next(new) if _is_array(x) else x for x in state_leaves]
        return outputs, jax.tree_util.tree_unflatten(state_def, leaves)

    def _checked_inputs(self, exp, n_params, inputs):
        leaves = jax.tree_util.tree_leaves(inputs)
        n_inputs = self._counts()[1]
        avals = exp.in_avals[n_params : n_params + n_inputs]
        ok = len(leaves) == len(avals)
        for x, aval in zip(leaves, avals, strict=False):
            shape = getattr(x, "shape", None)
            if shape is None or len(shape) != len(aval.shape):
                ok = False
                break
            for d, a in zip(shape, aval.shape, strict=True):
                if isinstance(a, int) and isinstance(d, int) and a != d:
                    ok = False
        if not ok:
            saved = _shapes_text(
                [tuple(str(d) for d in a.shape) for a in avals]
            ).replace("'", "")
            got = _shapes_text([tuple(getattr(x, "shape", ())) for x in leaves])
            raise ValueError(
                f"{self.owner} runs the computation saved in its `.keras` "
                f"file, which takes {len(avals)} input array(s) of shapes "
                f"{saved}; it got {len(leaves)} of shapes {got}. A layer "
                "rebuilt without its Python code accepts the input structure "
                "it was saved with only (any batch size where the saved shapes "
                "say `batch`)."
            )
        return [_as(x, a.dtype) for x, a in zip(leaves, avals, strict=True)]

    def _placeholder(self, kind, values, has_state):
        treedef, specs = self._out[kind]
        dims = [
            d
            for x in jax.tree_util.tree_leaves(values["inputs"])
            for d in getattr(x, "shape", ())
            if not isinstance(d, int)
        ]
        first = jax.tree_util.tree_leaves(values["inputs"])
        unknown = dims[0] if dims else (first[0].shape[0] if first else 1)
        outputs = jax.tree_util.tree_unflatten(
            treedef,
            [
                jnp.zeros(
                    tuple(unknown if d is None else d for d in s.shape),
                    jnp.dtype(s.dtype),
                )
                for s in specs
            ],
        )
        return (outputs, values.get("state")) if has_state else outputs

    def _missing(self, kind) -> ValueError:
        if kind not in self.manifest.get("functions", {}):
            return ValueError(
                f"{self.owner} was rebuilt from the computation saved in its "
                f"`.keras` file, which has no {kind} function (it could not "
                "be exported when the model was saved; see the warning given "
                "then); load the model where the layer's Python code is "
                "importable."
            )
        return ValueError(
            f"{self.owner}: its Python code was not found when it was rebuilt "
            "from a config alone (`model_from_json`, a config written out), "
            "which does not hold the computation a "
            "`.keras` file saves: register `call_fn` and `init_fn` with "
            "`@keras.saving.register_keras_serializable()` where they are "
            "defined, or load the model from its `.keras` file with "
            "`keras.saving.load_model`."
        )

    def __repr__(self) -> str:
        return f"<call_fn of {self.owner}, rebuilt from its exported computation>"


def _in_safe_mode() -> bool:
    """Keras's `safe_mode` now: True unless a load said `safe_mode=False` or
    `keras.config.enable_unsafe_deserialization()` was called."""
    try:
        from keras.src.saving import serialization_lib
    except ImportError:  # a Keras without it: the safe choice
        return True
    return serialization_lib.in_safe_mode() is not False


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _arrays(tree) -> list:
    return [x for x in jax.tree_util.tree_leaves(tree) if _is_array(x)]


def _as(x, dtype):
    """`x` as `dtype` (integer seeds and inputs of another width)."""
    if x.dtype == dtype or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return x
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(x).astype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x).astype(dtype)
    return x


# -- rebuilding a layer from its artifacts ---------------------------------


def placeholders(config_tree, manifest, tree: str):
    """The placeholders of `params` or `state` for a rebuilt layer."""
    flat = None
    if manifest is not None:
        flat = [
            (v["name"], v["shape"], v["dtype"])
            for v in manifest.get("variables", [])
            if v["tree"] == tree
        ]
    if config_tree is None and flat:
        # A tree the config does not describe (jaxlayer 0.2 writes FLAT).
        config_tree = dict(V.FLAT)
    return V.config_to_placeholders(config_tree, flat=flat)


def from_artifacts(
    cls,
    config: dict,
    *,
    keep: tuple = (),
    module_class: str | None = None,
    values: tuple | None = None,
):
    """A layer of class `cls` whose `call_fn` runs the saved artifacts.

    `config` is the layer's config (what `get_config` returned); the keys in
    `keep` are adapter arguments the rebuilt layer has no use for, kept in
    `call_fn.kept` to be saved again as they were. The artifacts themselves
    are read later, by `load_assets`. `values`: the `(params, state)` to
    start from instead of placeholders (which the weights file fills).
    """
    from jaxlayer.layer import JaxLayer

    config = dict(config)
    manifest = config.pop("exported")
    owner = f"{cls.__name__} '{config.get('name')}'"
    call = ExportedCall(
        manifest,
        owner,
        fn_config=config.pop("call_fn", None),
        init_config=config.pop("init_fn", None),
        module_class=module_class,
    )
    config.pop("init_on_build", None)  # the artifacts have no init_fn
    params = placeholders(config.pop("params_spec", None), manifest, "params")
    state = placeholders(config.pop("state_spec", None), manifest, "state")
    if values is not None:
        params, state = values
    call.kept = {key: config.pop(key, None) for key in keep}
    layer = cls.__new__(cls)
    JaxLayer.__init__(layer, call_fn=call, params=params, state=state, **config)
    object.__setattr__(layer, "_input_record", record_from_manifest(manifest))
    object.__setattr__(layer, "_saving_watch", True)
    return layer


def copy_of_rebuilt(cls, config: dict, source):
    """A copy of `source`, a live layer rebuilt from a `.keras` file, made
    from its config object (`keras.models.clone_model` in this process).

    The copy runs the computation `source` loaded (shared, read-only) and
    starts from copies of `source`'s current weights, in variables of its
    own: like a layer built from given `params`, there is no `init_fn` to
    initialise it afresh. If `source` has not read its artifacts, the copy
    waits for `load_assets` too.
    """
    call = source.call_fn
    values = None
    if call.loaded:
        values = (V.numpy_tree(source.params), V.numpy_tree(source.state))
    config = dict(config)
    config.pop("module_class", None)  # the source's call knows it
    # (A source that never read its artifacts saves no manifest in its config.)
    config["exported"] = call.manifest
    for key, value in call.kept.items():
        config.setdefault(key, value)
    layer = from_artifacts(
        cls,
        config,
        keep=tuple(call.kept),
        module_class=call.module_class,
        values=values,
    )
    if call.loaded:
        layer.call_fn.share(call)
    return layer


def rebuilt(layer) -> bool:
    """Whether `layer` runs a computation rebuilt from a `.keras` file."""
    return isinstance(layer.call_fn, ExportedCall)


def say(message: str) -> None:
    """One line of warning (a `UserWarning`, without a source line under it)."""
    warnings.warn_explicit(message, UserWarning, "jaxlayer", 0, module="jaxlayer")


def warn_rebuilt(owner: str, what: str) -> None:
    """The one line said when a layer is rebuilt from its artifacts."""
    say(
        f"{owner}: {what}; the layer runs the computation saved in the "
        "`.keras` file (predict and fit work; the Python code is not used)."
    )


def module_layer_config(
    layer, config: dict, module: str, rebuild: str, module_class: str
) -> dict:
    """The config of a layer whose module cannot be written to a config.

    `NNXLayer` and `EquinoxLayer`: the `.keras` file holds the layer's
    exported computation instead of its module, so saving needs it.

    Args:
        layer: the layer.
        config: its config from `JaxLayer.get_config`.
        module: what the module is, for the message ("an NNX module").
        rebuild: how to rebuild the layer with its code, for the message.
        module_class: the module's class (`module.Class`), kept for messages.

    Raises:
        ValueError: the computation could not be exported.
    """
    if config.get("exported") is None:
        raise ValueError(
            f"{layer._owner} cannot be saved in a `.keras` file: {module} "
            "cannot be written to a config, so the file must hold the layer's "
            "exported computation, which could not be made "
            f"({export_failure(layer)}). Call the layer (or fit the model) "
            "before saving, or save the weights with `model.save_weights(path)` "
            f"and rebuild the model with a new `{rebuild}` to load them."
        )
    config.update(call_fn=None, init_fn=None, module_class=module_class)
    return config


def module_layer_from_config(
    cls, config: dict, module: str, arguments: dict | None = None
):
    """`from_config` of a layer saved by `module_layer_config`.

    `arguments`: the adapter's own constructor arguments, taken out of
    `config`, for a copy of a live layer (`clone_model` in this process),
    which is made by the live layer's `_copy(kwargs)`.

    Returns:
        The layer, running the computation saved in its `.keras` file.

    Raises:
        ValueError: the config holds no exported computation.
    """
    from jaxlayer.layer import _LayerName

    config = dict(config)
    source = _LayerName.source(config, cls)
    if source is not None and rebuilt(source):
        return copy_of_rebuilt(cls, config, source)
    if source is not None:
        # A copy of a live layer made from its config object (clone_model):
        # a new layer of the module's current values.
        return source._copy({**layer_kwargs(config), **(arguments or {})})
    module_class = config.pop("module_class", None)
    if not config.get("exported"):
        raise ValueError(
            f"{cls.__name__} '{config.get('name')}': the config holds no "
            f"exported computation, and {module} cannot be rebuilt from a "
            "config; load the model from its `.keras` file."
        )
    return from_artifacts(cls, config, module_class=module_class)


# What a jaxlayer config holds besides Keras's and the layer's arguments.
_SAVED_ONLY = (
    "call_fn",
    "init_fn",
    "params_spec",
    "state_spec",
    "init_on_build",
    "exported",
    "module_class",
)


def layer_kwargs(config: dict) -> dict:
    """The constructor arguments in a module layer's config (`name`,
    `dtype`, `seed`, ..., the adapter's own), without what only saving uses."""
    return {k: v for k, v in config.items() if k not in _SAVED_ONLY}


def module_error(owner: str, module_class: str | None) -> ValueError:
    """`to_module()`'s error on a layer rebuilt from its artifacts."""
    return ValueError(
        f"{owner}: `to_module()` needs the module's class "
        f"({module_class or 'unknown'}), which was not available: the layer "
        "was rebuilt from the computation saved in its `.keras` file. To get "
        "a module, build it with its code and load the weights "
        "(`model.save_weights`, then `load_weights` into a model made with "
        "that module)."
    )
