"""`ExportedCall`: a `call_fn` rebuilt from a `.keras` file's artifacts."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any

import jax
import jax.export
import jax.numpy as jnp

from jaxlayer import _artifact_check as check
from jaxlayer import _variables as V
from jaxlayer._record import input_template
from jaxlayer.export import _registry
from jaxlayer.saving._manifest import (
    FORMAT,
    KINDS,
    Artifacts,
    check_manifest,
    record_from_manifest,
)

# The manifest's helpers under the names this module's code used when it
# was one file with them (`jaxlayer/saving.py`).
from jaxlayer.saving._manifest import Spec as _Spec
from jaxlayer.saving._manifest import first_line as _first_line
from jaxlayer.saving._manifest import shapes_text as _shapes_text
from jaxlayer.saving._manifest import version as _version


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
        if not isinstance(manifest, dict):
            check_manifest(manifest, owner)  # refused, with its message
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{owner}: the computation saved in the `.keras` file has "
                f"format {manifest.get('format')!r} (jaxlayer "
                f"{manifest.get('jaxlayer_version')}), which this jaxlayer "
                f"({_version()}, format {FORMAT}) cannot read; upgrade "
                "jaxlayer, or load the model where its Python code is "
                "importable."
            )
        # File content: its structure checked before any of it is used.
        check_manifest(manifest, owner)
        self.owner = owner
        self.manifest = manifest
        self.fn_config = fn_config
        self.init_config = init_config
        self.module_class = module_class
        self.kept: dict = {}
        self.names = list(manifest["call_fn_arguments"])
        # The saved argument names: the layer reads what to pass from
        # `call_fn`'s signature, as it did for the original.
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
        self._onnx: dict = {}
        # Keras's `safe_mode` of the load that rebuilt the layer (read while
        # `from_config` runs; the assets are read after it, outside its scope).
        self.safe_mode = _in_safe_mode()
        # A depth, not a flag: symbolic scopes nest (a model built in another's
        # build).
        self._symbolic = 0
        functions = manifest.get("functions", {})
        self._out = {}
        self._rng_defs = {}
        try:
            self._read_trees(functions)
        except (
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            ValueError,
            RecursionError,
        ) as err:
            raise ValueError(
                f"{owner}: the `.keras` file's description of its saved "
                f"computation is malformed ({_first_line(err)}); refused. Save "
                "the model again from its source."
            ) from None

    def _read_trees(self, functions: dict) -> None:
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
        # (The scope is part of this class: it counts on `call`'s own field.)
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
            # A deep copy: the new byte counts and hashes must not change the
            # manifest held in the layer's config.
            manifest = json.loads(json.dumps(self.manifest))
            blobs = {}
            for kind, exp in self._exported.items():
                entry = manifest["functions"][kind]
                # With the saved VJP order, so a re-saved model keeps its gradients.
                blob = bytes(exp.serialize(vjp_order=int(entry.get("vjp_order", 0))))
                entry["sha256"] = hashlib.sha256(blob).hexdigest()
                entry["bytes"] = len(blob)
                blobs[entry["file"]] = blob
            blobs.update(self._onnx)
            self._artifacts = Artifacts(manifest, blobs)
        return self._artifacts

    def share(self, other: ExportedCall) -> None:
        """Takes the computation `other` loaded (a copy of its layer)."""
        if other.manifest != self.manifest:
            raise ValueError(
                f"{self.owner}: cannot share the computation of "
                f"{other.owner}, which was saved with another manifest."
            )
        # The dicts copied, the `Exported`s shared (nothing changes them);
        # `other` is an `ExportedCall` too, its fields this class's own.
        self._exported = dict(other._exported)
        self._onnx = dict(other._onnx)
        self._artifacts = other._artifacts

    # -- loading --

    def load(self, dirpath: str | None) -> None:
        """Reads, checks and deserializes the artifacts in `dirpath`.

        Nothing is deserialized in this process before it was proven safe
        (see `jaxlayer._artifact_check`): sizes first, then the verifying
        child process (skipped under `safe_mode=False`), then the policy and
        the manifest's shapes against the artifact's own.
        """
        if dirpath is None or not os.path.isdir(dirpath):
            raise ValueError(
                f"{self.owner}: the `.keras` file has no exported computation "
                "for this layer (its assets folder is missing), and the "
                "layer's Python code was not found; load the model where "
                "that code is importable, or save it again with jaxlayer "
                ">= 0.2."
            )
        # One deadline for the file: every layer's reading, checking and
        # rebuilding spends it (`_artifact_check.Budget`).
        budget = check.budget_for(_archive_root(dirpath))
        with budget:
            try:
                self._load(dirpath, budget)
            except (
                KeyError,
                TypeError,
                AttributeError,
                IndexError,
                RecursionError,
            ) as err:
                # What `check_manifest` did not foresee in a crafted manifest.
                raise ValueError(
                    f"{self.owner}: the `.keras` file's description of its saved "
                    f"computation is malformed ({_first_line(err)}); refused. "
                    "Save the model again from its source."
                ) from err

    def _load(self, dirpath: str, budget: check.Budget) -> None:
        functions = self.manifest.get("functions", {})
        platforms = self.manifest.get("platforms")
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
            # The base name only: a manifest's `file` cannot reach outside the
            # layer's asset folder (`../`).
            path = os.path.join(dirpath, os.path.basename(name))
            if not os.path.isfile(path):
                raise ValueError(f"{where} is missing {made}; save the model again.")
            size = os.path.getsize(path)
            declared = entry.get("bytes")
            # Refused for size only when the file is as saved (the message says to
            # raise the cap); a size unlike the manifest's is damage, reported below.
            if isinstance(declared, int) and size == declared and size > cap:
                raise check.Refused(
                    f"{where} is {size} bytes, more than the {cap} bytes "
                    f"({cap / 2**20:g} MiB) a loaded computation may have "
                    "(the weights are never part of it); refused. If the "
                    "file is trusted, set JAXLAYER_MAX_ARTIFACT_MIB higher."
                )
            # Hashed only at the declared size: a file of another size is damaged
            # anyway, and an oversized one is not read.
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
            # Its flatbuffer's offsets and lengths, and no bytes beyond them, before
            # any parser sees it (nothing is read whole).
            check.check_layout(path, size, where)
            files[name] = (path, sha)
            wheres[name] = where
            sizes[name] = size
        if self.safe_mode:
            # Parsed in the verifying child; under `safe_mode=False` the user trusts
            # the file and it is parsed here, but the policy below still applies.
            reports = check.reports(files, wheres, budget)
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
            if budget.left() <= 0:
                raise check.Refused(
                    f"{where}: loading the `.keras` file's computations did not "
                    f"finish in {budget.limit:g} s; refused. If the file is "
                    "trusted and large, set JAXLAYER_LOAD_TIMEOUT to more seconds."
                )
            made = f"(exported by jaxlayer {self.manifest.get('jaxlayer_version')})"
            # Exactly the checked number of bytes, hashed again: what is deserialized
            # is what the child verified, even if the file was replaced meanwhile.
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
            # Arrays in and out against the config, so a mismatched artifact fails
            # here with a message rather than inside `exp.call`.
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
        saved = {
            kind: self._saved_onnx(entry, dirpath, cap)
            for kind, entry in functions.items()
        }
        for kind, exp in exported.items():
            _registry.remember_saved(exp, saved[kind])
        self._onnx = {
            entry["onnx"]["file"]: saved[kind].blob
            for kind, entry in functions.items()
            if saved[kind].blob is not None
        }
        # Set last: a load that fails part-way leaves the layer unloaded.
        self._exported = exported

    def _saved_onnx(self, entry, dirpath, cap) -> _registry.SavedOnnx:
        """The ONNX form saved beside a function (bytes checked against the
        manifest's size and sha256; parsed only by an export)."""
        onnx = entry.get("onnx")
        version = self.manifest.get("jaxlayer_version")
        if not isinstance(onnx, dict):
            return _registry.SavedOnnx(
                self.owner,
                None,
                None,
                f"the file was saved by jaxlayer {version}, which saved no ONNX "
                "form of the layer's computation; save the model again from "
                "its source with `jaxlayer[export]` installed and the "
                "environment variable JAXLAYER_SAVE_ONNX=1",
            )
        if "file" not in onnx:
            return _registry.SavedOnnx(
                self.owner, None, None, str(onnx.get("missing", "not saved"))
            )
        # The base name only, as for the artifacts (no `../`).
        name = os.path.basename(str(onnx["file"]))
        where = f"{self.owner}: the ONNX form `{name}` in the `.keras` file"
        path = os.path.join(dirpath, name)
        if not os.path.isfile(path):
            raise ValueError(f"{where} is missing; save the model again.")
        size = os.path.getsize(path)
        if size == onnx.get("bytes") and size > cap:
            raise check.Refused(
                f"{where} is {size} bytes, more than the {cap} bytes a loaded "
                "computation may have; refused. If the file is trusted, set "
                "JAXLAYER_MAX_ARTIFACT_MIB higher."
            )
        with open(path, "rb") as f:
            # One byte past the cap at most: a file grown since `getsize` fails the
            # size comparison below without being read whole.
            blob = f.read(cap + 1)
        if len(blob) != onnx.get("bytes") or (
            hashlib.sha256(blob).hexdigest() != onnx.get("sha256")
        ):
            raise ValueError(
                f"{where} is damaged or was changed after saving: its bytes do "
                "not match the size and sha256 recorded when it was saved. "
                "Save the model again from its source."
            )
        return _registry.SavedOnnx(self.owner, blob, onnx.get("opset"), None)

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
        # A function without `training`: the kind whose saved rng structure this
        # call's rng has; an unsaved structure falls back to whether rng is given.
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
        # Non-array state leaves (None, Python numbers) were not exported; they
        # go back unchanged below.
        state = [x for x in state_leaves if _is_array(x)]
        inputs = self._checked_inputs(exp, len(params), values["inputs"])
        self._check_bounds(kind, inputs)
        rng = jax.tree_util.tree_leaves(values.get("rng"))
        first_rng = len(params) + len(inputs) + len(state)
        # Seeds may come as another integer width than the one exported.
        rng = [_as(x, exp.in_avals[first_rng + i].dtype) for i, x in enumerate(rng)]
        # The exported function's own order, the bridges' seam:
        # `fn(params, inputs, state, rng)` on flat lists.
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
                # Only dimensions concrete on both sides: a saved symbolic one (`batch`)
                # takes any size, and a symbolic input (Keras's build) matches any.
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

    def _check_bounds(self, kind, inputs) -> None:
        """Refuses an input dimension above the largest size the saved
        computation was exported for (`bounds` in its manifest entry)."""
        entry = self.manifest["functions"][kind]
        bounds = entry.get("bounds")
        if not bounds:
            return
        for k, (x, leaf) in enumerate(
            zip(inputs, entry.get("input_dims", []), strict=False)
        ):
            for i, (size, name) in enumerate(zip(x.shape, leaf, strict=False)):
                bound = bounds.get(name) if isinstance(name, str) else None
                # `size <= bound` on a symbolic size (a bridge's trace) raises
                # jax's inconclusive comparison, which the trace's retry reads
                # to bound that size too (`_shapes.trace_bounded`).
                if bound is not None and not size <= bound:
                    raise ValueError(
                        f"{self.owner} runs the computation saved in its "
                        f"`.keras` file, which takes inputs[{k}] dimension {i} "
                        f"up to {bound} only (its function compares that size "
                        f"with {bound}, so it was exported for sizes up to "
                        f"{bound}); it got {size} (input shape "
                        f"{tuple(x.shape)}). Use at most {bound}, or load the "
                        "model where the layer's Python code is importable."
                    )

    def _placeholder(self, kind, values, has_state):
        treedef, specs = self._out[kind]
        dims = [
            d
            for x in jax.tree_util.tree_leaves(values["inputs"])
            for d in getattr(x, "shape", ())
            if not isinstance(d, int)
        ]
        first = jax.tree_util.tree_leaves(values["inputs"])
        # The saved symbolic dimension is the batch: given the input's symbolic
        # batch when it has one, else its leading size, so Keras's shape
        # inference sees the batch it passed.
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
        # The state as given: a symbolic build needs shapes, and its are its own.
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


def _archive_root(dirpath: str) -> str:
    """What the asset folders of one `.keras` file's layers share: the folder
    Keras extracted the file to (the part of the path before its last
    `assets`: a folder of the user's of that name comes before Keras's)."""
    parts = os.path.abspath(dirpath).split(os.sep)
    if "assets" in parts:
        parts = parts[: len(parts) - 1 - parts[::-1].index("assets")]
    return os.sep.join(parts)


def _in_safe_mode() -> bool:
    """Keras's `safe_mode` now: True unless a load said `safe_mode=False` or
    `keras.config.enable_unsafe_deserialization()` was called."""
    from jaxlayer import _private

    return _private.keras_in_safe_mode()


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _arrays(tree) -> list:
    return [x for x in jax.tree_util.tree_leaves(tree) if _is_array(x)]


def _as(x, dtype):
    """`x` as `dtype` (integer seeds and inputs of another width)."""
    # Typed keys have no width to convert; they pass as they are.
    if x.dtype == dtype or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return x
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(x).astype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x).astype(dtype)
    return x
