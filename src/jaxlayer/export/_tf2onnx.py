"""A tf2onnx handler for `XlaCallModule`: tensorflow -> onnx.

tf2onnx has no conversion of `XlaCallModule`, the op the TensorFlow bridge
runs a layer's function as. This handler finds the op's JAX function
(`_registry`, by the module's sha256), converts it with jax2onnx at the
graph's opset and puts its nodes in the op's place. Installed by `_hooks`
when tf2onnx is imported.
"""

from __future__ import annotations

from jaxlayer import _private
from jaxlayer.export import _onnx, _registry


class ExportAborted(BaseException):
    """An ONNX export that cannot be done, raised through tf2onnx.

    `tf2onnx.convert.from_function` (what Keras calls) logs the exceptions
    of handlers and writes the model without the node, so an `Exception`
    would give a file that fails only when loaded; this is not an
    `Exception`, so that the export stops with the message. The error it
    stands for is its `__cause__`.
    """


def convert(ctx, node) -> None:
    """Replaces the `XlaCallModule` `node` of the tf2onnx graph `ctx`, or
    raises `ExportAborted` saying why it cannot."""
    try:
        _convert(ctx, node)
    except Exception as err:  # noqa: BLE001 - re-raised past tf2onnx
        raise ExportAborted(str(err)) from err


def _convert(ctx, node) -> None:
    _, _, make_name = _private.tf2onnx_internals()

    module = node.get_attr_value("module")
    source = _registry.lookup(module) if module is not None else None
    if source is None:
        raise ValueError(
            f"jaxlayer: the TensorFlow graph has an `XlaCallModule` op "
            f"({node.name}) that no live jaxlayer layer made (a SavedModel "
            "loaded from disk, or `jax2tf`), so its computation cannot be "
            "converted to ONNX; export the model with `model.export(..., "
            "format='onnx')` from the process that holds it, or from the jax "
            "backend."
        )
    feature = f"{source.owner}: exporting to ONNX from the tensorflow backend"
    proto = _onnx.to_onnx(
        source.function(), source.specs, opset=ctx.opset, feature=feature
    )
    graph = proto.graph
    if _onnx.has_subgraphs(graph):
        raise ValueError(
            f"{source.owner}: its ONNX graph has control flow (If/Loop/Scan), "
            "which cannot be put into a tf2onnx graph; export the model to "
            "ONNX from the jax backend."
        )
    kept = source.kept or list(range(len(source.specs)))
    if len(node.input) != len(kept):
        raise ValueError(
            f"{source.owner}: the `XlaCallModule` op {node.name} takes "
            f"{len(node.input)} inputs where its module takes {len(kept)}."
        )
    names = {}
    for i, value in enumerate(graph.input):
        if i in kept:
            names[value.name] = node.input[kept.index(i)]
    prefix = f"{node.name}/jaxlayer/"

    def constant(name, array):
        return ctx.make_const(make_name(prefix + "const"), array).output[0]

    def make(n, inputs):
        outputs = [make_name(prefix + n.op_type) for _ in n.output]
        ctx.make_node(
            n.op_type,
            ["" if x is None else x for x in inputs],
            attr=_onnx.attribute_values(n),
            outputs=outputs,
            domain=n.domain or None,
            op_name_scope=node.name,
        )
        return outputs

    def missing(name):
        return ValueError(
            f"{source.owner}: its ONNX graph reads {name!r}, an argument the "
            "`XlaCallModule` op drops; export the model to ONNX from the jax "
            "backend."
        )

    results = _onnx.splice(graph, names, constant, make, missing)
    if len(results) != len(node.output):
        raise ValueError(
            f"{source.owner}: its ONNX graph returns {len(results)} arrays "
            f"where the `XlaCallModule` op {node.name} returns "
            f"{len(node.output)}."
        )
    outputs = list(node.output)
    dtypes = [ctx.get_dtype(o) for o in outputs]
    shapes = [ctx.get_shape(o) for o in outputs]
    ctx.remove_node(node.name)
    for out, result, dtype, shape in zip(outputs, results, dtypes, shapes, strict=True):
        ctx.make_node(
            "Identity", [result], outputs=[out], shapes=[shape], dtypes=[dtype]
        )


_installed = False


def install() -> None:
    """Registers the handler with tf2onnx (once)."""
    handler, tf_utils, _ = _private.tf2onnx_internals()

    global _installed
    if _installed:
        return
    # The op's output shapes (`Sout`, a list of shapes: an attribute of
    # `XlaCallModule` only) cannot be written as an ONNX attribute, and
    # tf2onnx fails reading the graph before any handler runs; the shapes
    # are in the graph anyway.
    tf_utils.TF_IGNORED_NODE_ATTRS.add("Sout")

    @handler.tf_op("XlaCallModule")
    class _XlaCallModule:
        @classmethod
        def version_1(cls, ctx, node, **kwargs):
            convert(ctx, node)

    _installed = True
