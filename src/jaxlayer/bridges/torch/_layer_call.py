"""The layer's hook while torch traces.

The layer hands the hook its `Computation` (`jaxlayer._computation`): its
pure functions, and a call's values, rng, state assignment and eager path.

Under torch.compile a layer call is one `jaxlayer::call` operator
(`_operators`); under torch.export and `torch.jit.trace`, where a program
may run in another process that has no call site, it is one
`jaxlayer::call_exported` node whose arguments carry the site's computation
itself (its `jax.export` artifact as an int8 tensor constant, and its
sha256; see `jaxlayer.bridges.torch_export`). What cannot be captured (an
input or rng structure other than tensors in tuples, lists, dicts and
NamedTuples, a device JAX does not serve) runs eagerly with one warning, a
graph break at the layer.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import jax
import torch

from jaxlayer.bridges import torch_export
from jaxlayer.bridges.torch import _operators
from jaxlayer.bridges.torch._autograd import JIT_TRACE
from jaxlayer.bridges.torch._devices import jax_serves
from jaxlayer.bridges.torch._exchange import SEED_DTYPES, counters
from jaxlayer.bridges.torch._pytree import py_build, py_flatten
from jaxlayer.bridges.torch._sites import (
    artifact_tensor,
    described,
    lookup,
    new_site,
    site_artifact,
    site_out,
)


def _sites_of(computation) -> dict:
    """Per layer (in its computation's slots, which go with it), its call
    sites by `(training, input structure, rng structure, cast)`, and the
    flags of the warnings given once per layer (`"warned"`,
    `"warned_outputs"`)."""
    return computation.slots.setdefault("torch", {})


def _pure_fn_of(computation, key, example: Callable):
    """The layer's pure function for `key` (training, input and rng
    structures), made from `example()` on first use."""
    fn = computation.cache.get(key)
    if fn is None:
        fn = computation.get(*key, example())
    return fn


@torch.compiler.assume_constant_result
def _site_id(computation, training, in_key, rng_key, cast) -> int:
    """The integer naming a call site, made on first use (run while torch
    traces, its result baked into the graph)."""
    sites = _sites_of(computation)
    key = (training, in_key, rng_key, cast)
    site = sites.get(key)
    if site is None:
        site = sites[key] = new_site(
            computation,
            computation.owner,
            training,
            in_key,
            rng_key,
            cast,
            _pure_fn_of,
        )
    return site.id


def layer_call(computation, inputs, training):
    """`JaxLayer.call`'s hook: the call as one operator while torch traces.

    `computation` is the layer's `Computation`.

    Returns NotImplemented outside torch.compile, torch.export and
    torch.jit.trace (the layer then runs its eager path, which calls `run`).
    Under torch.export and torch.jit.trace the call is one
    `jaxlayer::call_exported` node carrying the computation (torch.jit.trace:
    at the traced shapes).
    """
    jit_tracing = torch.jit.is_tracing()
    if not (jit_tracing or torch.compiler.is_compiling()):
        return NotImplemented

    training = bool(training)
    leaves: list = []
    in_key = py_flatten(inputs, leaves)
    if in_key is None:
        return _eager_call(
            computation,
            inputs,
            training,
            "its inputs are not tensors in tuples, lists, dicts or NamedTuples",
        )
    for t in leaves:
        if not (t.is_cpu or (t.is_cuda and jax_serves("cuda"))):
            return _eager_call(
                computation, inputs, training, f"JAX has no device for {t.device}"
            )
    rng: list = []
    rng_key = "N"
    if computation.has_rng():
        rng_key = py_flatten(computation.rng(training), rng)
        if rng_key is None:
            return _eager_call(
                computation, inputs, training, "`_get_call_rng` returns non-tensors"
            )
        # JAX takes key data as 32-bit integers.
        rng = [r if r.dtype in SEED_DTYPES else r.to(torch.int32) for r in rng]
    # The layer's own values and cast, and its own state assignment (the
    # same as its eager `call`).
    params, state, cast = computation.values(True)  # run.casts_params
    # An integer constant of the traced graph (`_site_id` runs while torch
    # traces; the operators take no Python objects).
    site = _site_id(computation, training, in_key, rng_key, cast)
    if jit_tracing or torch.compiler.is_exporting():
        # A program that may run elsewhere: the computation goes in it.
        # Under `torch.jit.trace` (Keras's exports to onnx and openvino),
        # the same node, which TorchScript's ONNX exporter converts with
        # jaxlayer's symbolic (`export._torch_onnx`).
        if jit_tracing:
            from jaxlayer.export import _torch_onnx

            _torch_onnx.install()
        sha = site_artifact(site, *[described(g) for g in (params, leaves, state, rng)])
        flat = torch_export.call(artifact_tensor(sha), sha, params, leaves, state, rng)
        # State the computation returns as it took it (a BatchNorm's
        # statistics in inference) is not assigned: the program then
        # mutates no parameter for it (LiteRT cannot convert one that does).
        unchanged = _unchanged_state(sha)
        if not jit_tracing and len(unchanged) < len(state) and _litert_converting():
            names = computation.state_names()
            changed = [n for k, n in enumerate(names) if k not in unchanged]
            raise ValueError(
                LITERT_STATE.format(
                    owner=computation.owner, names=", ".join(changed[:4])
                )
            )
    else:
        flat = _operators.call(site, params, leaves, state, rng)
        unchanged = ()
    # Outputs first, then the new state (the flat results of the artifact).
    n_out, spec = site_out(site)
    new_state = list(flat[n_out:])
    for k in unchanged:
        new_state[k] = None
    computation.assign_state(new_state)
    outputs = flat[:n_out]
    if spec is None:
        return _eager_unflatten(site, outputs)
    return py_build(spec, outputs)


LITERT_STATE = (
    "{owner}: LiteRT cannot hold state that changes: in inference, `call_fn` "
    "returns new values for {names}, and a LiteRT model has no variables to "
    "write them to (litert-torch cannot convert a program that assigns its "
    "parameters). Return the state unchanged when `training` is False (as "
    "Keras's BatchNorm does), or export with format='torch' (a torch.export "
    "program updates its state)."
)


def _litert_converting() -> bool:
    """Whether litert-torch's converter is what traces (one of its frames
    is on the stack)."""
    if "litert_torch" not in sys.modules:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("litert_torch."):
            return True
        frame = frame.f_back
    return False


@torch.compiler.assume_constant_result
def _unchanged_state(sha: str) -> tuple:
    """`torch_export.unchanged_state`, a constant of the traced graph."""
    return torch_export.unchanged_state(sha)


@torch.compiler.disable
def _eager_call(computation, inputs, training, reason):
    """A layer call torch cannot capture: run eagerly (a graph break); under
    `torch.jit.trace`, which has no graph breaks, one clear error."""
    if torch.jit.is_tracing():
        raise ValueError(JIT_TRACE.format(owner=computation.owner, reason=reason))
    counters["eager_fallbacks"] += 1
    sites = _sites_of(computation)
    if not sites.get("warned"):
        sites["warned"] = True
        warnings.warn(
            f"{computation.owner}: torch.compile cannot capture this call ({reason}); "
            "it runs eagerly, with a graph break at the layer.",
            stacklevel=3,
        )
    return computation.eager_call(inputs, training=training)


@torch.compiler.disable
def _eager_unflatten(site_id, outputs):
    """Outputs of a structure torch cannot build while tracing (a custom
    pytree node): unflattened eagerly, a graph break after the operator."""
    site = lookup(site_id)
    computation = site.layer()
    sites = _sites_of(computation) if computation is not None else {}
    if not sites.get("warned_outputs"):
        sites["warned_outputs"] = True
        warnings.warn(
            f"{site.owner}: torch.compile cannot build `call_fn`'s outputs "
            f"({site.out_def}) while tracing; they are assembled eagerly, with "
            "a graph break after the layer's operator.",
            stacklevel=3,
        )
    return jax.tree_util.tree_unflatten(site.out_def, list(outputs))


@torch.compiler.disable
def untraced(f: Callable, *args):
    """`f(*args)`, never traced by torch.compile (the layer's eager calls).

    When torch.compile gives up on a frame (a graph break it cannot resume
    from, its recompile limit reached), it runs that frame as plain Python
    but still compiles the functions the frame calls, one by one; it would
    then trace into JAX itself (`jax.tree_util`, `jax.jit`, DLPack) and fail.
    The layer's eager calls run through here, out of its sight: everything
    inside runs as plain Python. While torch traces, the layer never comes
    here (it goes to `layer_call`).
    """
    return f(*args)
