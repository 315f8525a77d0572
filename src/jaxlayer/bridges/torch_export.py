"""torch.export programs that carry a layer's computation in the file.

While `torch.export` traces a model (`model.export(path, format="torch")`,
`torch.export.export`, `litert_torch.convert`), a jaxlayer layer's call is
captured as

    torch.ops.jaxlayer.call_exported(artifact, sha256, params, inputs, state, rng)

where `artifact` is a 1-D `int8` tensor constant (int8, not uint8: LiteRT's
MLIR accepts only signless integer constants) holding the serialized
`jax.export.Exported` of the layer's computation (made from its pure
function at the traced shapes, a symbolic size where torch's is symbolic;
the weights are not in it, they are the program's parameters), `sha256` is
the hex sha256 of those bytes, and the four lists are the tensors the
artifact takes, in that order. The artifact is a flat function: its
arguments are `(*params, *inputs, *state, *rng)`, its results
`(*outputs, *new_state)`; floating parameters are cast inside it where the
layer computes in another dtype (mixed precision). `torch.export.save`
writes the constant into the `.pt2` file, so the program runs in any
process where the operator is registered (`import jaxlayer` with torch
imported, or `jaxlayer.register_torch_operators()`), without the model's
code.

Bytes that come from a program (a real `artifact` tensor whose hash is not
in this process's cache) go through the same checks as a `.keras` file's
artifacts before JAX deserializes them (`saving._blob.deserialize_checked`:
size cap, hash, the verifying child process, the policy, the argument
types); the result is cached by its sha256 for the life of the process.

This module imports torch; `jaxlayer` imports it only where torch is already
imported (see `jaxlayer.register_torch_operators`).
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.export
import numpy as np
import torch

from jaxlayer._shapes import structs_of_dims
from jaxlayer.saving._blob import deserialize_checked
from jaxlayer.saving._manifest import DEFAULT_PLATFORMS

#: The operator's qualified name and schema.
NAME = "jaxlayer::call_exported"
SCHEMA = (
    "(Tensor artifact, str sha256, Tensor[] params, Tensor[] inputs, "
    "Tensor[] state, Tensor[] rng) -> Tensor[]"
)

# sha256 -> `_Loaded`: artifacts made or checked in this process.
_LOADED: dict[str, _Loaded] = {}
# sha256 -> `_Live`: the function an artifact was made from, in this process.
_LIVE: dict[str, _Live] = {}

_NARROW = {torch.int64: torch.int32, torch.float64: torch.float32}


class Described(NamedTuple):
    """A tensor's shape (torch's sizes, symbolic ones kept) and dtype."""

    shape: tuple
    dtype: torch.dtype

    def dim(self) -> int:
        return len(self.shape)


class _Loaded:
    """A deserialized artifact and its compiled call."""

    __slots__ = ("blob", "call", "exported")

    def __init__(self, exported: jax.export.Exported, blob: bytes | None):
        self.exported = exported
        self.blob = blob  # kept only for artifacts made here (the constant)
        self.call = jax.jit(exported.call)


class _Live:
    """The pure JAX function an artifact was exported from (weakly)."""

    __slots__ = ("cast", "counts", "fn")

    def __init__(self, fn, cast, counts):
        self.fn = weakref.ref(fn)
        self.cast = cast
        self.counts = counts

    def __call__(self, *flat):
        fn = self.fn()
        if fn is None:
            raise RuntimeError("jaxlayer: the layer of this artifact was deleted.")
        return _flat_call(fn, self.cast, self.counts)(*flat)


def _flat_call(fn, cast, counts) -> Callable:
    """`fn(params, inputs, state, rng)` as a flat function of arrays."""
    dtype = jax.dtypes.canonicalize_dtype(cast) if cast is not None else None

    def flat_fn(*flat):
        groups, start = [], 0
        for n in counts:
            groups.append(list(flat[start : start + n]))
            start += n
        params, inputs, state, rng = groups
        if dtype is not None:
            params = [
                p.astype(dtype)
                if jax.numpy.issubdtype(p.dtype, jax.numpy.floating)
                and p.dtype != dtype
                else p
                for p in params
            ]
        outputs, new_state = fn(params, inputs, state, rng)
        return (*outputs, *new_state)

    flat_fn.__name__ = f"{getattr(fn, '__name__', 'call_fn')}_flat"
    return flat_fn


def _jax_dtype(dtype: torch.dtype) -> str:
    if not jax.config.jax_enable_x64:
        dtype = _NARROW.get(dtype, dtype)
    return str(dtype).rsplit(".", 1)[-1]


def _structs(tensors: Sequence[Described]) -> list[jax.ShapeDtypeStruct]:
    """Shapes for `jax.export`; a symbolic torch size keeps its name (one
    scope: the same torch symbol in two tensors is one JAX symbol)."""
    dims = []
    for t in tensors:
        for d in t.shape:
            if not isinstance(d, int) and not str(d).isidentifier():
                raise ValueError(
                    f"the size {d} is an expression torch.export derived; "
                    "give the batch dimension its own `torch.export.Dim`"
                )
        dims.append([d if isinstance(d, int) else str(d) for d in t.shape])
    return structs_of_dims(dims, [_jax_dtype(t.dtype) for t in tensors])


def artifact_for(
    fn,
    cast: str | None,
    params: Sequence[Described],
    inputs: Sequence[Described],
    state: Sequence[Described],
    rng: Sequence[Described],
) -> str:
    """Exports `fn` at the (traced) shapes of the tensors; its sha256.

    Called while torch.export traces a layer. The serialized artifact and
    its deserialized form are cached by the hash (and per function and
    shapes in `fn.slot("torch_export")`, so tracing again exports nothing).
    """
    # litert_torch.convert may be what traces: its lowering of the operator
    # is registered here, outside what TorchDynamo traces (strict mode
    # cannot trace an import; this function runs as a constant).
    if "litert_torch" in sys.modules:
        importlib.import_module("jaxlayer.bridges.torch_litert")
    tensors = (*params, *inputs, *state, *rng)
    key = (
        cast,
        tuple((tuple(str(d) for d in t.shape), t.dtype) for t in tensors),
        (len(params), len(inputs), len(state), len(rng)),
    )
    made = fn.slot("torch_export", dict)
    sha = made.get(key)
    if sha is not None and sha in _LOADED:
        return sha
    counts = key[2]
    platforms = fn.native_serialization_platforms or DEFAULT_PLATFORMS
    flat_fn = jax.jit(_flat_call(fn, cast, counts))
    with _x64_of(tensors):
        structs = _structs(tensors)
        exported = jax.export.export(flat_fn, platforms=tuple(platforms))(*structs)
        if counts[2]:
            jaxpr = jax.make_jaxpr(flat_fn)(*structs).jaxpr
    blob = bytes(exported.serialize())
    sha = hashlib.sha256(blob).hexdigest()
    _LOADED[sha] = _Loaded(exported, blob)
    _LIVE[sha] = _Live(fn, cast, counts)
    if counts[2]:
        _UNCHANGED[sha] = _unchanged_state(jaxpr, counts)
    made[key] = sha
    return sha


_WIDE = (torch.float64, torch.int64, torch.complex128, torch.uint64)


def _x64_of(tensors: Sequence[Described]):
    """The context to trace a layer of `tensors` in: `jax_enable_x64` off
    while litert-torch has turned it on (importing litert-torch turns it on
    for the whole process; Keras's LiteRT export turns it back afterwards)
    and no tensor is 64-bit. With it on, a layer of 32-bit tensors traces
    Python scalars and integer literals as 64-bit (`jnp.where(c, 1, x)` is
    float64, and so is all that follows), which is not what the layer
    computes elsewhere, and which LiteRT's converter rejects
    (`failed to legalize operation 'tfl.div'` of float64)."""
    import contextlib

    if (
        jax.config.jax_enable_x64
        and "litert_torch" in sys.modules
        and not any(t.dtype in _WIDE for t in tensors)
    ):
        return jax.enable_x64(False)
    return contextlib.nullcontext()


# sha256 -> the positions (in the state) of the state values the artifact
# made here returns as it took them.
_UNCHANGED: dict[str, tuple[int, ...]] = {}


def unchanged_state(sha: str) -> tuple[int, ...]:
    """The positions of the state values that the artifact `sha` (made in
    this process) returns unchanged: its argument itself, not a computed
    value (a BatchNorm's statistics in inference). Assigning those to their
    variables changes nothing, and a traced program that did would mutate
    its parameters, which LiteRT's converter cannot express."""
    return _UNCHANGED.get(sha, ())


def _unchanged_state(jaxpr, counts) -> tuple[int, ...]:
    """The state positions whose new value is the state argument itself."""
    n_params, n_inputs, n_state, _ = counts
    first = n_params + n_inputs
    sources = _forwarded(jaxpr)
    n_out = len(jaxpr.outvars) - n_state
    return tuple(k for k in range(n_state) if sources[n_out + k] == first + k)


# Primitives whose one output is their one input's value (the adapters stop
# the gradient of the state they return).
_IDENTITIES = frozenset({"stop_gradient", "copy", "copy_p"})


def _forwarded(jaxpr) -> list[int | None]:
    """For each output of `jaxpr`, the index of the argument it is (through
    nested `jit` calls), or None where it is computed."""
    arguments = {v: i for i, v in enumerate(jaxpr.invars)}
    made_by = {v: (eqn, k) for eqn in jaxpr.eqns for k, v in enumerate(eqn.outvars)}
    inner_cache: dict = {}

    def source(v) -> int | None:
        while True:
            if hasattr(v, "val"):
                return None  # a literal
            if v in arguments:
                return arguments[v]
            eqn, k = made_by.get(v, (None, None))
            if eqn is not None and eqn.primitive.name in _IDENTITIES:
                v = eqn.invars[0]
                continue
            inner = eqn.params.get("jaxpr") if eqn is not None else None
            inner = getattr(inner, "jaxpr", inner)
            if inner is None or not hasattr(inner, "outvars"):
                return None
            if id(inner) not in inner_cache:
                inner_cache[id(inner)] = _forwarded(inner)
            j = inner_cache[id(inner)][k]
            if j is None:
                return None
            v = eqn.invars[j]

    return [source(v) for v in jaxpr.outvars]


def artifact_blob(sha: str) -> bytes:
    """The serialized artifact made in this process under `sha`."""
    return _LOADED[sha].blob


def call(artifact, sha, params, inputs, state, rng) -> list[torch.Tensor]:
    """`torch.ops.jaxlayer.call_exported`: the layer call while torch.export
    traces (the bridge passes `artifact`, the constant of `sha`)."""
    return _call_op(artifact, sha, params, inputs, state, rng)


# -- reading artifacts ---------------------------------------------------------


def _signature(tensors) -> list[tuple]:
    return [((None,) * t.dim(), _jax_dtype(t.dtype)) for t in tensors]


def _loaded(artifact: torch.Tensor, sha: str, tensors, where: str) -> _Loaded:
    """The checked artifact `sha`, from the cache or from `artifact`'s bytes."""
    found = _LOADED.get(sha)
    if found is not None:
        return found
    if artifact.dtype not in (torch.int8, torch.uint8) or artifact.dim() != 1:
        raise ValueError(
            f"{where}: its artifact is a {artifact.dtype} tensor of shape "
            f"{tuple(artifact.shape)}, not the 1-D int8 tensor jaxlayer writes."
        )
    blob = artifact.detach().cpu().contiguous().numpy().tobytes()
    exported = deserialize_checked(blob, sha, where, _signature(tensors))
    found = _LOADED[sha] = _Loaded(exported, None)
    return found


def _to_jax(t: torch.Tensor, dtype) -> jax.Array:
    t = t.detach()
    narrow = _NARROW.get(t.dtype)
    if narrow is not None and not jax.config.jax_enable_x64:
        t = t.to(narrow)
    array = jax.dlpack.from_dlpack(t.contiguous())
    return array if array.dtype == dtype else array.astype(dtype)


def _run(artifact, sha, params, inputs, state, rng) -> list[torch.Tensor]:
    tensors = (*params, *inputs, *state, *rng)
    where = f"the jaxlayer computation {sha[:12]} in a torch.export program"
    loaded = _loaded(artifact, sha, tensors, where)
    avals = loaded.exported.in_avals
    if len(avals) != len(tensors):
        raise ValueError(
            f"{where} takes {len(avals)} tensors; the program passes it {len(tensors)}."
        )
    flat = [_to_jax(t, a.dtype) for t, a in zip(tensors, avals, strict=True)]
    results = loaded.call(*flat)
    device = tensors[0].device if tensors else torch.device("cpu")
    taken = {t.data_ptr() for t in tensors if t.numel()}
    out = []
    for r in results:
        t = torch.from_dlpack(r)
        if t.numel() and t.data_ptr() in taken:
            t = t.clone()  # an operator's results never alias its arguments
        taken.add(t.data_ptr())
        out.append(t if t.device == device else t.to(device))
    return out


def _fake(artifact, sha, params, inputs, state, rng) -> list[torch.Tensor]:
    found = _LOADED.get(sha)
    if found is None:
        raise RuntimeError(
            f"the jaxlayer computation {sha[:12]} of this torch.export program "
            "was not read yet, so its output shapes are unknown; call "
            "`jaxlayer.bridges.torch_export.prepare(program)` first (it reads "
            "and checks the program's artifacts)."
        )
    exp = found.exported
    tensors = (*params, *inputs, *state, *rng)
    sizes = {}
    for aval, t in zip(exp.in_avals, tensors, strict=True):
        for d, size in zip(aval.shape, t.shape, strict=True):
            if not isinstance(d, int):
                sizes.setdefault(str(d), size)
    anchor = tensors[0] if tensors else torch.empty(0)
    out = []
    for aval in exp.out_avals:
        shape = []
        for d in aval.shape:
            if isinstance(d, int):
                shape.append(d)
            elif str(d) in sizes:
                shape.append(sizes[str(d)])
            else:
                raise RuntimeError(
                    f"the jaxlayer computation {sha[:12]} returns a size "
                    f"{d} that is not one of its arguments' sizes; export "
                    "with a static shape there."
                )
        dtype = getattr(torch, np.dtype(aval.dtype).name)
        out.append(anchor.new_empty(shape, dtype=dtype))
    return out


def _define():
    op = torch.library.custom_op(NAME, mutates_args=(), schema=SCHEMA)(_run)
    op.register_fake(_fake)
    return op


_call_op = _define()


# -- for exporters (ONNX, LiteRT) ------------------------------------------------


def nodes(program) -> list:
    """The `call_exported` nodes of an `ExportedProgram` (or a GraphModule)."""
    graph = program.graph
    target = torch.ops.jaxlayer.call_exported.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def artifact_bytes(program, node) -> bytes:
    """The serialized artifact a `call_exported` node of `program` names.

    The node's first argument is a placeholder for one of the program's
    lifted constants; made in this process, the bytes come from the cache.
    The bytes are not checked here: `exported(...)` checks them.
    """
    sha = node.args[1]
    found = _LOADED.get(sha)
    if found is not None and found.blob is not None:
        return found.blob
    return _constant(program, node).detach().cpu().contiguous().numpy().tobytes()


def _constant(program, node) -> torch.Tensor:
    name = node.args[0].name
    sig = program.graph_signature
    for spec in sig.input_specs:
        if spec.arg.name == name and spec.target is not None:
            if spec.target in program.constants:
                return program.constants[spec.target]
            return program.state_dict[spec.target]
    raise ValueError(f"the program has no constant for the artifact {name}")


def exported(program, node) -> jax.export.Exported:
    """The `jax.export.Exported` of a `call_exported` node, checked (the
    same checks as a `.keras` file's artifacts) and cached by its sha256."""
    sha = node.args[1]
    found = _LOADED.get(sha)
    if found is None:
        blob = artifact_bytes(program, node)
        where = f"the jaxlayer computation {sha[:12]} in a torch.export program"
        tensors = [a.meta["val"] for group in node.args[2:] for a in group]
        found = _LOADED[sha] = _Loaded(
            deserialize_checked(blob, sha, where, _signature(tensors)), None
        )
    return found.exported


def exported_by_hash(sha: str) -> jax.export.Exported:
    """The artifact `sha` made or read (and checked) in this process."""
    found = _LOADED.get(sha)
    if found is None:
        raise ValueError(
            f"the jaxlayer computation {sha[:12]} was not made or read in this "
            "process; call `prepare(program)` on its program first."
        )
    return found.exported


def prepare(program) -> None:
    """Reads and checks every jaxlayer artifact of a loaded program, so its
    fake implementation knows the output shapes (`run_decompositions`,
    re-exporting); running the program needs no call to it."""
    for node in nodes(program):
        exported(program, node)


def live_function(sha: str) -> Callable | None:
    """The flat pure JAX function the artifact `sha` was made from, in the
    process that made it (`(*params, *inputs, *state, *rng) -> (*outputs,
    *new_state)`), or None elsewhere or once its layer is gone."""
    live = _LIVE.get(sha)
    if live is None or live.fn() is None:
        return None
    return live
