"""tensorflow -> openvino for a model holding a jaxlayer layer, through ONNX.

OpenVINO's TensorFlow frontend has no rule for `XlaCallModule`, the op the
TensorFlow bridge runs a layer's function as, and a conversion rule of its
own could not find the op's function (the frontend hands rules the op's
`module` attribute decoded as UTF-8 text, which StableHLO bytes are not).
So a TensorFlow function holding such ops from a live layer (`_registry`)
is converted to ONNX with tf2onnx and jaxlayer's handler (`_tf2onnx`), and
OpenVINO reads that ONNX model instead.

OpenVINO has no registry of converters to add to, and Keras calls
`openvino.convert_model` itself: `_hooks`, when the program imports
openvino, wraps `openvino.convert_model` so that it does the above for a
TensorFlow function with a jaxlayer op, converts a traced torch module
holding a `jaxlayer::call_exported` node (Keras's torch-backend export)
through ONNX too (`_torch_onnx`), and passes everything else through
untouched.
"""

from __future__ import annotations

import functools

from jaxlayer import _private
from jaxlayer.export import _onnx, _registry, _torch_onnx

# The ONNX opset of the intermediate model (OpenVINO reads up to 23 here).
OPSET = 18
# The wrappers made (so that installing twice wraps once).
_WRAPPED: set = set()


def jaxlayer_modules(model) -> list:
    """The `ForwardSource`s of the jaxlayer `XlaCallModule` ops in a
    `tf.function` or concrete function (empty for anything else)."""
    concrete = _concrete(model)
    graph = getattr(concrete, "graph", None)
    if graph is None:
        return []
    try:
        graph_def = graph.as_graph_def()
    except Exception:  # noqa: BLE001 - not a TensorFlow graph
        return []
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    found = []
    for node in nodes:
        if node.op == "XlaCallModule":
            source = _registry.lookup(node.attr["module"].s)
            if source is not None:
                found.append(source)
    return found


def _concrete(model):
    if type(model).__module__.split(".")[0] != "tensorflow":
        return None
    if hasattr(model, "graph") and hasattr(model, "structured_input_signature"):
        return model
    if hasattr(model, "get_concrete_function"):
        try:  # a `tf.function` with an input signature (what Keras gives)
            return model.get_concrete_function()
        except Exception:  # noqa: BLE001 - not one: left to OpenVINO
            return None
    return None


def via_onnx(model, sources):
    """The ONNX model (an in-memory file) of the concrete function `model`."""
    import tensorflow as tf

    from jaxlayer._deps import require

    owner = sources[0].owner
    feature = f"{owner}: exporting to OpenVINO from the tensorflow backend"
    _onnx.jax2onnx_module(feature)
    tf2onnx = require("tf2onnx", feature, extra="export")
    from jaxlayer.export import _tf2onnx

    _tf2onnx.install()
    # The function's positional arguments as it takes them (a model of a
    # dict of inputs takes one dict), each spec keeping its name.
    args, _ = _concrete(model).structured_input_signature
    signature = tf.nest.map_structure(
        lambda s: tf.TensorSpec(s.shape, s.dtype, name=s.name), list(args)
    )
    proto, _ = tf2onnx.convert.from_function(
        model, input_signature=signature, opset=OPSET
    )
    _inputs_in_signature_order(proto, _names_in_order(signature))
    return _onnx.as_file_object(proto)


def _names_in_order(structure) -> list:
    """The specs' names in `structure`, dicts in their insertion order (the
    order in which Keras names the converted model's inputs, where tf2onnx
    orders them by sorted key)."""
    if isinstance(structure, dict):
        return [n for v in structure.values() for n in _names_in_order(v)]
    if isinstance(structure, (list, tuple)):
        return [n for v in structure for n in _names_in_order(v)]
    return [getattr(structure, "name", None)]


def _inputs_in_signature_order(proto, names) -> None:
    """Reorders the ONNX graph's inputs as `names` (an input is named after
    its spec, `name` or `name:0`); left as they are where they do not match."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    found = [
        next((v for v in inputs if n and v.name in (n, f"{n}:0")), None) for n in names
    ]
    if len(inputs) != len(names) or any(v is None for v in found):
        return
    if len({id(v) for v in found}) != len(found):
        return
    rest = [v for v in graph.input if v.name in initializers]
    ordered = [type(v).FromString(v.SerializeToString()) for v in found + rest]
    del graph.input[:]
    graph.input.extend(ordered)


def wrap(convert_model):
    """`convert_model` that converts a TensorFlow function with jaxlayer ops,
    or a traced torch module with a jaxlayer node, through ONNX."""
    if convert_model in _WRAPPED:
        return convert_model

    @functools.wraps(convert_model)
    def convert_model_jaxlayer(input_model=None, *args, **kwargs):
        sources = jaxlayer_modules(input_model)
        if sources:
            input_model = via_onnx(input_model, sources)
        elif _torch_onnx.has_jaxlayer_node(input_model):
            input_model = _torch_onnx.to_onnx_file(input_model)
        return convert_model(input_model, *args, **kwargs)

    _WRAPPED.add(convert_model_jaxlayer)
    return convert_model_jaxlayer


def install() -> None:
    """Wraps `openvino.convert_model` (once)."""
    _private.patch_openvino_convert_model(wrap)
