"""Call sites: what a traced layer call stands for, under an integer.

Torch's custom operators take only tensors and integers, so each call site
(the layer, training flag, input and rng structures, parameter cast) is
registered under an integer, in a weak index: the site belongs to its layer
(see `_layer_call`) and goes with it.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import jax
import torch

from jaxlayer._shapes import structs_of_dims
from jaxlayer.bridges import torch_export
from jaxlayer.bridges.torch._exchange import FLOATING, jax_dtype, torch_dtype
from jaxlayer.bridges.torch._pytree import out_spec, placeholder

# Call sites by integer, weakly: each is owned by its layer.
_SITES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SITE_IDS = itertools.count(1)


class _Meta:
    """A shape (None for a symbolic dimension) and a dtype name."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = shape
        self.dtype = dtype


class Site:
    """One call site: a layer, a training flag, input and rng structures."""

    __slots__ = (
        "__weakref__",
        "id",
        "layer",
        "owner",
        "training",
        "in_def",
        "rng_def",
        "cast",
        "out_def",
        "out",
        "_pure_fn_of",
    )

    def __init__(self, layer, owner, training, in_key, rng_key, cast, pure_fn_of):
        self.id = next(_SITE_IDS)
        # Weak: the layer owns its sites, not the other way round. `layer`
        # is what `_layer_call` hands over (the layer's `Computation`), read
        # only by `pure_fn_of`.
        self.layer = weakref.ref(layer)
        self.owner = owner  # the layer, for messages
        self.training = training
        self.in_def = jax.tree_util.tree_structure(placeholder(in_key))
        self.rng_def = jax.tree_util.tree_structure(placeholder(rng_key))
        self.cast = cast
        self.out_def = None
        # (number of outputs, output structure for `py_build` or None).
        self.out = None
        # `(layer, key, example) -> PureFunction`, `example()` called only
        # when the layer has no function for `key` yet.
        self._pure_fn_of = pure_fn_of

    def pure_fn(self, params, inputs, state, rng):
        """The layer's current pure function for this site."""
        layer = self.layer()
        if layer is None:
            raise RuntimeError(
                f"{self.owner} was deleted; a function torch.compile traced "
                "through it cannot run any more."
            )
        key = (self.training, self.in_def, self.rng_def)
        fn = self._pure_fn_of(
            layer, key, lambda: self.example(params, inputs, state, rng)
        )
        if self.out_def is None:
            self.out_def = fn.out_treedef
            self.out = (fn.out_treedef.num_leaves, out_spec(fn.out_treedef))
        elif fn.out_treedef != self.out_def:
            # The traced graph builds the outputs from `self.out`.
            raise RuntimeError(
                f"{self.owner}: the structure of `call_fn`'s outputs changed "
                f"({self.out_def} -> {fn.out_treedef}) after torch.compile "
                "traced the layer; call `torch._dynamo.reset()` (or compile "
                "the model again) after changing `call_fn`."
            )
        return fn

    def example(self, params, inputs, state, rng):
        """Shapes and dtypes as `fn` takes them (None: symbolic size)."""

        def meta(t, dtype=None):
            shape = tuple(d if isinstance(d, int) else None for d in t.shape)
            return _Meta(shape, dtype or jax_dtype(t.dtype).name)

        cast = self.cast
        return (
            [meta(p, cast if cast and p.dtype in FLOATING else None) for p in params],
            [meta(x) for x in inputs],
            [meta(x) for x in state],
            [meta(x) for x in rng],
        )

    def fake(self, params, inputs, state, rng):
        """Fake outputs: shapes from `jax.eval_shape`, symbolic sizes kept."""
        fn = self.pure_fn(params, inputs, state, rng)
        p, x, s, r = self.example(params, inputs, state, rng)
        concrete = [
            [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in group]
            for group in (p, s, r)
        ]
        # A symbolic torch size becomes a JAX symbol of the same name, so an
        # output's size maps back to torch's symbol.
        sizes = {}  # symbol name -> torch.SymInt
        try:
            dims = []
            for t, m in zip(inputs, x, strict=True):
                leaf = []
                for d, known in zip(t.shape, m.shape, strict=True):
                    if known is not None:
                        leaf.append(known)
                        continue
                    name = str(d)
                    if not name.isidentifier():  # an expression (`2*s0`)
                        raise ValueError(name)
                    sizes[name] = d
                    leaf.append(name)
                dims.append(leaf)
            structs = structs_of_dims(dims, [m.dtype for m in x])
            out = jax.eval_shape(fn, concrete[0], structs, concrete[1], concrete[2])
            shapes = [
                tuple(d if isinstance(d, int) else sizes[str(d)] for d in o.shape)
                for o in (*out[0], *out[1])
            ]
            dtypes = [o.dtype for o in (*out[0], *out[1])]
        except Exception:  # noqa: BLE001 - specialise the sizes instead
            structs = [
                jax.ShapeDtypeStruct(tuple(int(d) for d in t.shape), m.dtype)
                for t, m in zip(inputs, x, strict=True)
            ]
            out = jax.eval_shape(fn, concrete[0], structs, concrete[1], concrete[2])
            shapes = [o.shape for o in (*out[0], *out[1])]
            dtypes = [o.dtype for o in (*out[0], *out[1])]
        anchor = next(iter((*inputs, *params, *state, *rng)), None)
        device = anchor.device if anchor is not None else torch.device("cpu")
        return [
            torch.empty(shape, dtype=torch_dtype(dtype), device=device)
            for shape, dtype in zip(shapes, dtypes, strict=True)
        ]


def new_site(layer, owner, training, in_key, rng_key, cast, pure_fn_of) -> Site:
    """A new call site, in the index under its integer."""
    site = Site(layer, owner, training, in_key, rng_key, cast, pure_fn_of)
    _SITES[site.id] = site
    return site


def lookup(site_id: int) -> Site:
    """The call site `site_id`; raises once its layer is gone."""
    found = _SITES.get(site_id)
    if found is None:
        raise RuntimeError(
            f"jaxlayer: the layer of call site {site_id} was deleted; a "
            "function torch.compile traced through it cannot run any more."
        )
    return found


@torch.compiler.assume_constant_result
def site_out(site_id: int):
    """`(number of outputs, output structure or None)`, known once the fake
    implementation of the site's operator has run."""
    return lookup(site_id).out


def described(tensors) -> tuple:
    """`(shape, dtype)` of each tensor, constants for `site_artifact`
    (static sizes under `torch.jit.trace`, whose sizes are traced values)."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return tuple((tuple(int(d) for d in t.shape), t.dtype) for t in tensors)
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@torch.compiler.assume_constant_result
def site_artifact(site_id, params, inputs, state, rng) -> str:
    """The sha256 of the site's computation exported at the traced shapes
    (`torch_export.artifact_for`), from `(shape, dtype)` per tensor; run
    while torch.export traces."""
    found = lookup(site_id)
    params, inputs, state, rng = (
        [torch_export.Described(*d) for d in group]
        for group in (params, inputs, state, rng)
    )
    fn = found.pure_fn(params, inputs, state, rng)
    try:
        return torch_export.artifact_for(fn, found.cast, params, inputs, state, rng)
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{found.owner}: torch.export (format='torch', and the LiteRT and "
            "ONNX exporters that trace with it) puts the layer's computation "
            "in the program with `jax.export`, which failed: "
            f"{type(err).__name__}: {first[:300]}. The model still runs in "
            "this process, eagerly or under torch.compile; to deploy it, make "
            "`call_fn` exportable by `jax.export` (no host callbacks), or give "
            "torch.export static shapes where the error names a dimension."
        ) from err


@torch.compiler.assume_constant_result
def artifact_tensor(sha: str) -> torch.Tensor:
    """The artifact `sha` as an int8 tensor: a constant of the traced
    program (int8, not uint8: LiteRT's MLIR takes signless integers only)."""
    blob = bytearray(torch_export.artifact_blob(sha))
    return torch.frombuffer(blob, dtype=torch.int8)
