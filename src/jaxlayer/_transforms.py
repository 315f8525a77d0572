"""Weight transforms by path: LoRA factors and int8 storage of `params` leaves.

A transform changes what the layer *stores* for some `params` leaves, not
what `call_fn` receives: `call_fn` still gets the tree of the shapes and
dtypes it was written for, computed inside the pure function from the
stored variables, so gradients, every bridge, torch.compile, `jax.export`
(portable saving) and sharding by path see one more JAX function and
nothing else.

- LoRA (`enable_lora`): for a target `W` of shape `(..., n)`, two new
  trainable variables `A` `(prod(...), rank)` and `B` `(rank, n)`, named
  after it (`dense/kernel` -> `dense/kernel_lora_a`, `dense/kernel_lora_b`,
  in the same name scopes, so a `LayoutMap` regex on the path reaches
  them); `W` becomes non-trainable; `call_fn` gets
  `W + (A @ B).reshape(W.shape) * (alpha / rank)`.
- int8 (`quantize("int8")`): the target's variable is replaced by an int8
  one of the same path and a float scale per output channel (the last
  axis), `dense/kernel_scale` (abs-max over the other axes / 127);
  `call_fn` gets `int8 * scale`. No float copy of the leaf is kept.

Both compose (QLoRA: int8, then LoRA on the dequantized weight).

`TransformedSpec` is the `params` spec of a transformed layer: a
`_variables.TreeSpec` whose `variables` are the stored list (the base
leaves, int8 where quantized, then the new variables in creation order) and
whose `rebuild` computes the tree `call_fn` receives. `Step` is one
transform as a config value, which `from_config` replays on a layer built
from the same base tree to make the same variables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import keras
import numpy as np

from jaxlayer import _private
from jaxlayer import _variables as V

MODES = ("lora", "int8")
# The suffixes of the names of the variables a transform adds.
LORA_A, LORA_B, SCALE = "_lora_a", "_lora_b", "_scale"

# Keras's quantization modes that jaxlayer does not implement (yet).
UNSUPPORTED_MODES = ("int4", "float8", "gptq", "awq")


@dataclasses.dataclass(frozen=True)
class Step:
    """One transform, as recorded in the layer's config (`weight_transforms`).

    Attributes:
        mode: `"lora"` or `"int8"`.
        targets: the variables it applies to, by name relative to the layer
            (`"dense/kernel"`), in variable order.
        rank: LoRA's rank.
        alpha: LoRA's `lora_alpha` (the factors' product is scaled by
            `alpha / rank`).
    """

    mode: str
    targets: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None

    def to_config(self) -> dict:
        config: dict = {"mode": self.mode, "targets": list(self.targets)}
        if self.mode == "lora":
            config.update(rank=self.rank, alpha=self.alpha)
        return config

    @classmethod
    def from_config(cls, config: dict) -> Step:
        if config.get("mode") not in MODES:
            raise ValueError(f"unknown weight transform {config.get('mode')!r}")
        return cls(
            mode=config["mode"],
            targets=tuple(config["targets"]),
            rank=config.get("rank"),
            alpha=config.get("alpha"),
        )


def steps_from_config(config) -> tuple[Step, ...]:
    return tuple(Step.from_config(c) for c in config or ())


@dataclasses.dataclass(frozen=True)
class LeafOp:
    """How one base leaf is computed: indices into the stored list."""

    scale: int | None = None  # the int8 scale's index
    lora: tuple | None = None  # (A's index, B's index, alpha / rank)


@dataclasses.dataclass(eq=False)
class TransformedSpec(V.TreeSpec):
    """The `params` spec of a transformed layer (see the module docstring).

    Attributes (besides `TreeSpec`'s, whose `variables` is the stored list):
        n_base: how many of `variables` are the base leaves' (in leaf order).
        ops: per base variable, its `LeafOp` or None (used as stored).
        steps: the transforms applied, in order.
        described: per base variable, `(shape, dtype)` of the leaf as
            `call_fn` receives it (what a config describes).
        flat: the stored variables as one flat tree by name (what portable
            saving exports and rebuilds), made once.
    """

    n_base: int = 0
    ops: tuple = ()
    steps: tuple = ()
    described: tuple = ()
    extra_names: tuple = ()
    flat: Any = None

    def rebuild(self, arrays):
        return V.TreeSpec.rebuild(self, leaves_for_call(self, arrays))


def leaves_for_call(spec: TransformedSpec, arrays: Sequence) -> list:
    """The base leaves `call_fn` receives, from the stored `arrays` (JAX
    arrays, traced or not)."""
    base = list(arrays[: spec.n_base])
    for i, op in enumerate(spec.ops):
        if op is None:
            continue
        w = base[i]
        if op.scale is not None:
            scale = arrays[op.scale]
            w = w.astype(scale.dtype) * scale
        if op.lora is not None:
            a, b, factor = arrays[op.lora[0]], arrays[op.lora[1]], op.lora[2]
            delta = (a @ b).reshape(w.shape) * factor
            # Back to the leaf's dtype: `call_fn` gets the dtype it was written for,
            # whatever the factors' (a bfloat16 kernel with float32 factors).
            w = w + delta.astype(w.dtype)
        base[i] = w
    return base


@dataclasses.dataclass(frozen=True)
class _Desc:
    """A variable's shape and dtype, for `_variables.spec_to_config`."""

    shape: tuple
    dtype: str


def described(spec):
    """`spec` as a config describes it: the base tree, as `call_fn` takes it."""
    if not isinstance(spec, TransformedSpec):
        return spec
    return V.TreeSpec(
        spec.treedef,
        spec.slots,
        spec.static,
        spec.paths,
        [_Desc(tuple(s), d) for s, d in spec.described],
        None,
    )


def export_view(spec):
    """What portable saving exports: the stored variables, flat by name."""
    return spec.flat if isinstance(spec, TransformedSpec) else spec


def steps_of(spec) -> tuple[Step, ...]:
    return spec.steps if isinstance(spec, TransformedSpec) else ()


def effective_tree(spec):
    """The `params` tree as `call_fn` receives it (NumPy arrays): LoRA
    merged, int8 dequantized; the layer's own tree when not transformed."""
    if not isinstance(spec, TransformedSpec):
        return V.numpy_tree(spec.tree) if spec is not None else None
    # Through NumPy: the variables may be any backend's tensors; the math is
    # the JAX code the layer's call runs.
    arrays = [
        jax.numpy.asarray(keras.ops.convert_to_numpy(v.value)) for v in spec.variables
    ]
    leaves = [np.asarray(x) for x in leaves_for_call(spec, arrays)]
    return V.TreeSpec.rebuild(spec, leaves)


def ordered_weights(spec, weights: Sequence) -> list:
    """The layer's weights in the order its weights file stores them when
    transformed: the stored `params` list, then the others as Keras orders
    them (so that a layer rebuilt from its artifacts, whose variables were
    made in that order, reads the same file)."""
    first = list(spec.variables)
    ids = {id(v) for v in first}
    return first + [w for w in weights if id(w) not in ids]


# -- targets ----------------------------------------------------------------


def _parts(spec, state_spec):
    """`(names, taken)`: the base variables' names (relative to the layer)
    and every name path taken in the layer."""
    n_base = spec.n_base if isinstance(spec, TransformedSpec) else len(spec.variables)
    named = V.variable_names([spec, state_spec])
    names = [name for name, _ in named[:n_base]]
    taken = {tuple(name.split("/")) for name, _ in named}
    # And the names of the exported flat tree: a new variable must not take
    # one (a layer rebuilt from artifacts names its variables by them).
    taken.update(
        tuple(name.split("/")) for name, _ in V.variable_names([export_view(spec)])
    )
    return names, taken


def _base(spec):
    if isinstance(spec, TransformedSpec):
        return (
            list(spec.variables[: spec.n_base]),
            list(spec.variables[spec.n_base :]),
            list(spec.ops),
            list(spec.described),
            list(spec.extra_names),
        )
    variables = list(spec.variables)
    return (
        variables,
        [],
        [None] * len(variables),
        [(tuple(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in variables],
        [],
    )


def eligible(spec, state_spec, mode: str) -> list[str]:
    """The names of the base variables `mode` may transform.

    LoRA: trainable floating leaves of two or more dimensions, and int8
    ones (QLoRA), not already adapted. int8: trainable floating leaves of
    two or more dimensions.
    """
    if spec is None:
        return []
    names, _ = _parts(spec, state_spec)
    base, _, ops, _, _ = _base(spec)
    out = []
    for name, variable, op in zip(names, base, ops, strict=True):
        floating = V.is_float(variable.dtype)
        # Vectors (biases, norms) gain nothing from a low-rank factor or a
        # per-channel scale, and are small.
        if len(variable.shape) < 2:
            continue
        if mode == "lora":
            if op is not None and op.lora is not None:
                continue
            if (floating and variable.trainable) or (
                op is not None and op.scale is not None
            ):
                out.append(name)
        elif floating and variable.trainable:
            out.append(name)
    return out


def select(
    owner: str, spec, state_spec, mode: str, paths, what: str
) -> tuple[str, ...]:
    """The targets of `mode`: every eligible variable, or those whose path
    (`layer/dense/kernel`) matches one of `paths` with `re.search`.

    Raises:
        ValueError: no eligible variable, `paths` of the wrong type, or
            matching none of them (the message lists the eligible paths).
    """
    names = eligible(spec, state_spec, mode)
    # `paths` match the weights' full `path` (`layer/dense/kernel`), as a
    # Keras `LayoutMap` does; the owner prefix is `Class 'name'`.
    layer_name = owner.split("'")[1] if "'" in owner else ""
    if not names:
        raise ValueError(
            f"{owner}: `{what}` found no `params` leaf to transform: it takes "
            "the trainable floating `params` leaves with two or more "
            "dimensions" + (" (and int8 ones)" if mode == "lora" else "") + ", and the "
            "layer has none."
        )
    if paths is None:
        return tuple(names)
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not all(
        isinstance(p, str) for p in paths
    ):
        raise TypeError(
            f"{owner}: `{what}`'s `paths` must be a regex (a string) or a list "
            f"of them, matched against each weight's `path`; got {paths!r}."
        )
    full = {name: f"{layer_name}/{name}" for name in names}
    chosen = tuple(
        name for name in names if any(re.search(p, full[name]) for p in paths)
    )
    if not chosen:
        raise ValueError(
            f"{owner}: `{what}`'s `paths` {list(paths)!r} match no eligible "
            f"weight; the eligible paths are {sorted(full.values())}. Give a "
            "regex that `re.search` finds in one of them."
        )
    return chosen


# -- applying ------------------------------------------------------------------


def apply(layer, spec, state_spec, step: Step, initializers=("he_uniform", "zeros")):
    """A new `TransformedSpec`: `spec` with `step` applied, its variables
    made in `layer` (and the int8 targets' float variables untracked)."""
    names, taken = _parts(spec, state_spec)
    base, extras, ops, desc, extra_names = _base(spec)
    index = {name: i for i, name in enumerate(names)}
    for name in step.targets:
        i = index[name]
        parts = name.split("/")
        op = ops[i] or LeafOp()
        if step.mode == "int8":
            old = base[i]
            # In float32 whatever the variable dtype: the scale is stored as
            # float32 and computed at that precision.
            w = np.asarray(keras.ops.convert_to_numpy(old.value), dtype=np.float32)
            q, scale = quantize_int8(w)
            _private.untrack_variable(layer, old)
            # The int8 variable takes the float leaf's own path (a `LayoutMap` or a
            # sharding rule by path still finds it).
            taken.discard(tuple(parts))
            del old  # the float leaf is gone from the layer
            base[i], _ = V.add_variable(layer, parts, q, trainable=False, taken=taken)
            _add(
                layer, extras, extra_names, _suffixed(parts, SCALE), scale, False, taken
            )
            op = dataclasses.replace(op, scale=len(base) + len(extras) - 1)
        else:
            shape = desc[i][0]
            # A is (prod(...), rank): `A @ B` reshapes to a target of any rank.
            fan_in = math.prod(shape[:-1])
            a_init, b_init = (keras.initializers.get(x) for x in initializers)
            dtype = layer.variable_dtype
            a = keras.ops.convert_to_numpy(a_init((fan_in, step.rank), dtype=dtype))
            b = keras.ops.convert_to_numpy(b_init((step.rank, shape[-1]), dtype=dtype))
            _add(layer, extras, extra_names, _suffixed(parts, LORA_A), a, True, taken)
            _add(layer, extras, extra_names, _suffixed(parts, LORA_B), b, True, taken)
            n = len(base) + len(extras)
            op = dataclasses.replace(op, lora=(n - 2, n - 1, step.alpha / step.rank))
            # An int8 base is non-trainable already (QLoRA).
            if V.is_float(base[i].dtype):
                base[i].trainable = False
        ops[i] = op
    return _spec(spec, base, extras, ops, desc, extra_names, (*steps_of(spec), step))


def _add(layer, extras, names, parts, value, trainable, taken):
    variable, name = V.add_variable(
        layer, parts, value, trainable=trainable, taken=taken
    )
    extras.append(variable)
    names.append(name)


# In the target's name scopes, so a `LayoutMap` regex on the target's path
# reaches its factors and scale too.
def _suffixed(parts, suffix):
    return [*parts[:-1], parts[-1] + suffix]


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(int8 values, float32 scale)`: abs-max per output channel (the last
    axis), over the other axes; `w ~= q * scale`."""
    axes = tuple(range(w.ndim - 1))
    amax = np.max(np.abs(w), axis=axes)
    # An all-zero channel gets scale 1 (its values stay 0), not 0/0.
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    # Symmetric: -128 is never used, so `-q` is always an int8 and the
    # abs-max maps to exactly +-127.
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _spec(spec, base, extras, ops, desc, extra_names, steps):
    variables = base + extras
    leaves = [
        spec.static[k] if slot is None else base[slot]
        for k, slot in enumerate(spec.slots)
    ]
    tree = jax.tree_util.tree_unflatten(spec.treedef, leaves)
    stored = TransformedSpec(
        spec.treedef,
        spec.slots,
        spec.static,
        spec.paths,
        variables,
        tree,
        n_base=len(base),
        ops=tuple(ops),
        steps=tuple(steps),
        described=tuple(desc),
        extra_names=tuple(extra_names),
    )
    # The base leaves' names as `create_variables` made them (by path).
    names = [name for name, _ in V.variable_names([_base_only(stored)])]
    names += list(extra_names)
    flat = V.FlatTree(zip(names, variables, strict=True))
    stored.flat = V.TreeSpec(
        jax.tree_util.tree_structure(flat),
        list(range(len(variables))),
        [None] * len(variables),
        [(jax.tree_util.DictKey(n),) for n in names],
        variables,
        flat,
    )
    return stored


def _base_only(spec):
    """`spec` as a plain `TreeSpec` of its base leaves (for their names)."""
    return V.TreeSpec(
        spec.treedef, spec.slots, spec.static, spec.paths, spec.variables, None
    )


def check_rank(owner: str, rank) -> int:
    # `bool` is an `int` subclass; `True` is no rank.
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(
            f"{owner}: `enable_lora`'s `rank` must be a positive integer "
            f"(the factors' inner dimension, such as 4 or 8); got {rank!r}."
        )
    return int(rank)
