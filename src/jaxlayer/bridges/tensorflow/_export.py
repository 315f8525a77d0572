"""`jax.export` of a flat function, and one export called as an op.

The op is `XlaCallModule`, the one `jax2tf` uses: it runs eagerly, inside
`tf.function` (with or without `jit_compile`) and in a SavedModel served by
TensorFlow alone (no jax).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.export
import tensorflow as tf

from jaxlayer.bridges.tensorflow._graph import call_module

# Platforms the export serves when the layer names none: TensorFlow may place
# the op on a CPU or on an NVIDIA GPU.
DEFAULT_PLATFORMS = ("cpu", "cuda")

_count = 0


def count() -> int:
    """How many exports `export` has made in this process."""
    return _count


class ExportError(Exception):
    """`jax.export` failed; the cause is the original error."""


def platform_choices(fn):
    """The platform sets to try, in order, for the pure function `fn`."""
    chosen = getattr(fn, "native_serialization_platforms", None)
    if chosen is not None:
        return [tuple(chosen)]
    current = "cuda" if tf.config.list_logical_devices("GPU") else "cpu"
    # Should some operation not lower for every default platform, the
    # platform TensorFlow runs on here is enough.
    return [DEFAULT_PLATFORMS, (current,)]


def export(fn_flat, specs, platforms_list):
    """Exports `fn_flat` for the first platform set that lowers.

    Raises:
        ExportError: no platform set lowers; the first one's error is the
            cause (the others are fallbacks).
    """
    global _count
    first_error = None
    for platforms in platforms_list:
        try:
            exported = jax.export.export(jax.jit(fn_flat), platforms=platforms)(*specs)
        except Exception as err:  # noqa: BLE001 - next platforms, or re-raise
            first_error = first_error or err
            continue
        _count += 1
        return exported
    raise ExportError() from first_error


class Call:
    """One export and how to call it as an `XlaCallModule` op.

    The op's attributes are built once, from the export's public fields.
    """

    __slots__ = ("exported", "attrs", "kept", "in_avals", "out_avals")

    def __init__(self, exported):
        self.exported = exported
        self.in_avals = exported.in_avals
        self.out_avals = exported.out_avals
        self.attrs = {
            "version": exported.calling_convention_version,
            "module": exported.mlir_module_serialized,
            "Tout": [tf.as_dtype(a.dtype) for a in exported.out_avals],
            "Sout": [
                [d if isinstance(d, int) else None for d in a.shape]
                for a in exported.out_avals
            ],
            "platforms": [p.upper() for p in exported.platforms],
            "disabled_checks": [str(c) for c in exported.disabled_safety_checks],
            "has_token_input_output": False,
            "function_list": [],
            "use_shardy_partitioner": bool(jax.config.jax_use_shardy_partitioner),
        }
        # The module takes only the arguments it uses (None: all of them).
        kept = sorted(exported.module_kept_var_idx)
        self.kept = None if kept == list(range(len(exported.in_avals))) else kept

    def __call__(self, args) -> list[Any]:
        """Runs the export on `args` (TensorFlow tensors)."""
        kept = self.kept
        results = list(
            call_module(args if kept is None else [args[i] for i in kept], **self.attrs)
        )
        if not tf.executing_eagerly():
            # Static output dims where a symbol's size is static in this graph.
            sizes = {}
            for aval, x in zip(self.in_avals, args, strict=True):
                for d, size in zip(aval.shape, x.shape, strict=True):
                    if not isinstance(d, int) and size is not None:
                        sizes.setdefault(str(d), size)
            for aval, x in zip(self.out_avals, results, strict=True):
                x.set_shape(
                    [d if isinstance(d, int) else sizes.get(str(d)) for d in aval.shape]
                )
        return results
