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


# How many `XlaCallModule` ops the handler has met (the wrapper of
# `from_function` checks the models that hold some).
_converted = 0


def convert(ctx, node) -> None:
    """Replaces the `XlaCallModule` `node` of the tf2onnx graph `ctx`, or
    raises `ExportAborted` saying why it cannot."""
    global _converted
    _converted += 1
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
    try:
        proto = _onnx.to_onnx(
            source.function(), source.specs, opset=ctx.opset, feature=feature
        )
    except ImportError:
        raise
    except Exception as err:
        raise ValueError(
            _onnx.conversion_failure(source.owner, source.specs, err)
        ) from err
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


def as_value_error(err: ExportAborted) -> ValueError:
    """The `ValueError` a user gets for an `ExportAborted`: its message,
    and what to change when a symbolic dimension is the cause."""
    cause = err.__cause__ or err
    text = str(cause).strip() or type(cause).__name__
    return ValueError(f"Exporting to ONNX failed: {text}")


def check_at_other_shape(function, signature, model_proto, size: int = 3) -> None:
    """Runs `model_proto` (a jaxlayer layer's nodes in it) in onnxruntime
    with its dynamic dims at `size` and compares it with `function`, the
    TensorFlow function it was made from (taking `signature`'s structure);
    raises `ValueError` (before any
    file is written) when it fails or differs there. Skipped without
    onnxruntime."""
    import importlib.util

    graph = model_proto.graph
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import numpy as np
    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    rng = np.random.RandomState(0)
    feed, shapes = {}, []
    for v in inputs:
        dims = v.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else size for d in dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            value = rng.randn(*shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            # Small ints: valid indices into any table (token ids).
            value = rng.randint(0, 2, shape).astype(dtype)
        else:
            value = np.zeros(shape, dtype)
        feed[v.name] = value
        shapes.append(shape)
    where = (
        f"The ONNX model made of the model for input shapes "
        f"{', '.join(str(s) for s in shapes)} (its dynamic dimensions at {size})"
    )
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failure is this check's to report
        session = ort.InferenceSession(
            model_proto.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        got = session.run(None, feed)
    except Exception as err:  # noqa: BLE001 - reported as the refusal's cause
        raise ValueError(
            f"{where} does not run, although it declares those dimensions "
            f"dynamic ({type(err).__name__}: {str(err).strip()[:300]}). No file "
            "was written. Export with an `input_signature` of fixed sizes, or "
            "from the torch or jax backend."
        ) from err
    flat = [tf.constant(feed[v.name]) for v in inputs]
    if signature is not None:
        want = function(*tf.nest.pack_sequence_as(list(signature), flat))
    else:
        want = function(*flat)
    want = [np.asarray(w) for w in tf.nest.flatten(want)]
    for g, w in zip(got, want, strict=False):
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"{where} gives results other than the model's, although it "
                "declares those dimensions dynamic. No file was written. Export "
                "with an `input_signature` of fixed sizes, or from the torch or "
                "jax backend."
            )


# -- the patch of tf2onnx ----------------------------------------------------
# The one place jaxlayer changes tf2onnx: `tf2onnx.convert.from_function`
# (what Keras's ONNX export calls) is wrapped so that an `ExportAborted`
# raised by the handler leaves it as a `ValueError` (a `BaseException` would
# pass the user's `except Exception`). Checked against the tf2onnx versions
# below; `tests/test_export_onnx.py` fails when the wrapped function is gone.
_TF2ONNX_CHECKED = ("1.16", "1.17")


def _wrap_from_function(convert_module) -> None:
    import functools

    original = getattr(convert_module, "from_function", None)
    if original is None or getattr(original, "_jaxlayer_wrapped", False):
        return

    @functools.wraps(original)
    def from_function(function, *args, output_path=None, **kwargs):
        # Written here after the check (a large model: by tf2onnx, unchecked).
        large = kwargs.get("large_model", False)
        before = _converted
        try:
            result = original(
                function, *args, output_path=output_path if large else None, **kwargs
            )
        except ExportAborted as err:
            raise as_value_error(err) from err.__cause__
        if large:
            return result
        if _converted != before:
            signature = args[0] if args else kwargs.get("input_signature")
            try:
                check_at_other_shape(function, signature, result[0])
            except ValueError:
                result = _without_reshape_merging(
                    lambda: original(function, *args, output_path=None, **kwargs)
                )
                if result is None:
                    raise
                check_at_other_shape(function, signature, result[0])
        model_proto = result[0]
        if output_path:
            save = _private.resolve("tf2onnx.utils", "save_protobuf")
            save(output_path, model_proto)
        return result

    from_function._jaxlayer_wrapped = True
    convert_module.from_function = from_function


def _without_reshape_merging(convert):
    """`convert()` with tf2onnx's `reshape_optimizer` left out (None when
    tf2onnx has none).

    That optimizer merges two `Reshape`s of a layer's graph (a `Gemm`'s
    2-D output to `(batch, length, 16)`, then to `(batch, length, 2, 8)`)
    into one that copies the first two dimensions of the 2-D input (`[0, 0,
    2, 8]`), right only at the shape it was traced with (Hugging Face's
    BERT), which `check_at_other_shape` finds.
    """
    optimizers = _private.resolve("tf2onnx.optimizer", "_optimizers")
    if "reshape_optimizer" not in optimizers:
        return None
    kept = dict(optimizers)
    del optimizers["reshape_optimizer"]
    try:
        return convert()
    except ExportAborted as err:
        raise as_value_error(err) from err.__cause__
    finally:
        optimizers.clear()
        optimizers.update(kept)


_installed = False


def install() -> None:
    """Registers the handler with tf2onnx (once)."""
    import tf2onnx
    from tf2onnx import convert as tf2onnx_convert

    handler, tf_utils, _ = _private.tf2onnx_internals()

    global _installed
    if _installed:
        return
    version = getattr(tf2onnx, "__version__", "")
    if not version.startswith(_TF2ONNX_CHECKED):
        import warnings

        warnings.warn(
            f"jaxlayer: tf2onnx {version} is newer than the versions its "
            f"ONNX handler was checked with ({', '.join(_TF2ONNX_CHECKED)}).",
            stacklevel=2,
        )
    _wrap_from_function(tf2onnx_convert)
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
