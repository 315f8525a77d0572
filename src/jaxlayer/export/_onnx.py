"""A layer's JAX function as an ONNX graph (jax2onnx), and ONNX graphs
spliced into another converter's graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxlayer._deps import require
from jaxlayer._shapes import trace_bounded

# The opset jax2onnx targets when the host converter does not say.
DEFAULT_OPSET = 23


def jax2onnx_module(feature: str):
    """jax2onnx, or the missing-extra error naming `feature`."""
    return require("jax2onnx", feature, extra="export")


def symbolic_inputs(specs: Sequence) -> list:
    """`specs` with each symbolic dimension as its name (jax2onnx's dims)."""
    out = []
    for s in specs:
        shape = tuple(d if isinstance(d, int) else str(d) for d in s.shape)
        out.append(jax.ShapeDtypeStruct(shape, s.dtype))
    return out


def to_onnx(
    fn: Callable,
    specs: Sequence,
    *,
    opset: int,
    feature: str,
    input_names: Sequence[str] | None = None,
):
    """The ONNX model (`onnx.ModelProto`) of `fn(*flat) -> list` on `specs`.

    A function that jax2onnx's `jax.numpy` rewrites cannot convert with
    symbolic dimensions is converted again through `jax.numpy` itself
    (`_plain_numpy`): its primitives then carry the symbolic shapes. One
    that needs a symbol bounded (a mask sliced to `min(max_length,
    length)`) is converted with that bound (`_shapes.trace_bounded`); the
    file declares the dimension dynamic, and a larger size fails in it as
    it fails in the function.
    """
    jax2onnx = jax2onnx_module(feature)
    symbolic = bool(symbol_names(specs))

    def convert(f, structs):
        return jax2onnx.to_onnx(
            f,
            inputs=structs,
            opset=opset,
            model_name="jaxlayer_call",
            return_mode="proto",
            input_names=input_names,
        )

    def attempt(structs):
        try:
            return convert(fn, structs)
        except Exception:
            if not symbolic:
                raise
            return convert(_plain_numpy(fn), structs)

    if not symbolic:
        return attempt(symbolic_inputs(specs))
    # The symbols by name, in a scope of their own (the specs' may be
    # another trace's), bounded where the function needs it.
    dims = [[d if isinstance(d, int) else str(d) for d in s.shape] for s in specs]
    return trace_bounded(attempt, dims, [s.dtype for s in specs])[0]


# -- the patch of jax2onnx ---------------------------------------------------
# The one place jaxlayer works around jax2onnx: while it traces, jax2onnx
# replaces functions of `jax.numpy` (`full`, `zeros`, `ones`, `arange`, ...)
# with versions that need concrete sizes (`int(dim)`: "Symbolic dimension
# 'batch' used in a context that requires a constant"; `arange` of a
# symbolic size: a data-dependent dim). `_plain_numpy` runs a layer's
# function with `jax.numpy` as it was before the conversion started, so that
# it emits JAX's own primitives (`iota`, `broadcast_in_dim`, ...), whose
# jax2onnx lowerings take symbolic shapes. Checked with the jax2onnx
# versions below; `tests/test_export_onnx.py` fails when jax2onnx stops
# replacing `jax.numpy.full` (then this can go).
JAX2ONNX_CHECKED = ("0.17",)


def _plain_numpy(fn: Callable) -> Callable:
    """`fn`, run with the `jax.numpy` functions of now (before jax2onnx's
    conversion replaces some)."""
    import functools

    import jax.numpy as jnp

    version = _jax2onnx_version()
    if not version.startswith(JAX2ONNX_CHECKED):
        import warnings

        warnings.warn(
            f"jaxlayer: jax2onnx {version} is newer than the versions its "
            f"symbolic-shape workaround was checked with "
            f"({', '.join(JAX2ONNX_CHECKED)}).",
            stacklevel=3,
        )
    plain = dict(vars(jnp))

    @functools.wraps(fn)
    def run(*args):
        namespace = vars(jnp)
        replaced = {
            k: v for k, v in namespace.items() if k in plain and plain[k] is not v
        }
        namespace.update({k: plain[k] for k in replaced})
        try:
            return fn(*args)
        finally:
            namespace.update(replaced)

    return run


def _jax2onnx_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jax2onnx")
    except metadata.PackageNotFoundError:
        return ""


def symbol_names(specs: Sequence) -> list[str]:
    """The names of the symbolic dimensions in `specs`, in order."""
    names: dict = {}
    for s in specs:
        for d in s.shape:
            if not isinstance(d, int):
                names[str(d)] = None
    return list(names)


def conversion_failure(owner: str, specs: Sequence, err: Exception) -> str:
    """The message for jax2onnx failing on a layer's function: the layer,
    the symbolic dimensions, and what to change (jaxlayer's own messages
    as they are)."""
    if isinstance(err, ValueError) and (
        owner in str(err) or str(err).startswith("jaxlayer")
    ):
        return str(err)
    text = str(err).strip().splitlines()
    first = f"{type(err).__name__}: {text[0][:300] if text else ''}"
    names = symbol_names(specs)
    if not names:
        return f"{owner}: jax2onnx could not convert its function ({first})."
    dims = ", ".join(repr(n) for n in names)
    return (
        f"{owner}: jax2onnx could not convert its function with the "
        f"dimension(s) {dims} left symbolic, as the export declares them "
        f"({first}). Give `model.export` an `input_signature` with those "
        "dimensions fixed (a static export), or change the function so that "
        "it does not need them as constants (see docs/saving.md)."
    )


def attribute_values(node) -> dict:
    """An `onnx.NodeProto`'s attributes as Python values."""
    import onnx

    values = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.TENSOR:
            value = onnx.numpy_helper.to_array(value)
        values[attr.name] = value
    return values


def initializer_arrays(graph) -> dict[str, np.ndarray]:
    """The graph's initializers as numpy arrays, by name."""
    import onnx

    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}


def has_subgraphs(graph) -> bool:
    """Whether some node of `graph` holds a graph attribute (If, Loop, Scan)."""
    import onnx

    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


def as_file_object(proto):
    """An `onnx.ModelProto` as an in-memory file (OpenVINO reads those)."""
    import io

    return io.BytesIO(proto.SerializeToString())


def splice(
    graph,
    names: dict,
    constant: Callable,
    node: Callable,
    missing: Callable[[str], Exception],
) -> list:
    """Puts the nodes of the ONNX `graph` into a host converter's graph.

    Args:
        graph: an `onnx.GraphProto` (no subgraphs).
        names: the host's value for each input of `graph`, by input name.
        constant: `(name, array) -> value`, an initializer made in the host.
        node: `(node_proto, host_inputs) -> list of values`, one node made
            in the host (`host_inputs` has None for an omitted input).
        missing: `(name) -> Exception` for a value no input or node makes.

    Returns:
        The host's values of the graph's outputs, in order.
    """
    names = dict(names)
    for name, array in initializer_arrays(graph).items():
        names[name] = constant(name, array)
    for n in graph.node:
        absent = [x for x in n.input if x and x not in names]
        if absent:
            raise missing(absent[0])
        results = node(n, [names[x] if x else None for x in n.input])
        names.update(zip(n.output, results, strict=True))
    return [names[v.name] for v in graph.output]
