"""A jax2onnx plugin for `call_exported`: a layer reloaded without its source.

Such a layer runs its saved StableHLO (`jax.export`'s `call_exported`
primitive), which jax2onnx cannot convert. The plugin puts in its place the
ONNX graph saved beside it in the `.keras` file (`_saved`, recorded in
`_registry` when the file was loaded), checked first and raised to the
opset of the graph being built. This serves Keras's ONNX export on the jax
backend and, through the tf2onnx handler, on the tensorflow backend.
Installed by `_hooks` when jax2onnx is imported.
"""

from __future__ import annotations

from jaxlayer import _private
from jaxlayer.export import _onnx, _registry

_STANDARD_DOMAINS = ("", "ai.onnx")


def checked_model(saved: _registry.SavedOnnx, opset: int):
    """The saved ONNX model, checked, at `opset`."""
    import onnx
    from onnx import version_converter

    where = f"{saved.owner}: the ONNX form saved in its `.keras` file"
    try:
        model = onnx.load_model_from_string(saved.blob)
        onnx.checker.check_model(model)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{where} is not a valid ONNX model ({err}).") from err
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise ValueError(f"{where} refers to external data; refused.")
    domains = {n.domain for n in model.graph.node}
    domains |= {n.domain for f in model.functions for n in f.node}
    local = {f.domain for f in model.functions}
    if any(d not in _STANDARD_DOMAINS and d not in local for d in domains):
        raise ValueError(f"{where} uses operations outside standard ONNX; refused.")
    if _onnx.has_subgraphs(model.graph) or model.functions:
        raise ValueError(
            f"{where} has control flow or functions, which jaxlayer does not "
            "splice into another graph."
        )
    current = next(
        (o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS),
        None,
    )
    if current != opset:
        if current is None or current > opset:
            raise ValueError(
                f"{where} has opset {current}, above the export's opset "
                f"{opset}; export with `opset_version={current}` or higher."
            )
        model = version_converter.convert_version(model, opset)
    return model


def lower(ctx, eqn) -> None:
    """Lowers one `call_exported` equation to the saved ONNX graph."""
    exported = eqn.params.get("exported")
    saved = _registry.saved_onnx(exported)
    if saved is None:
        raise ValueError(
            "jaxlayer: the model calls a `jax.export` computation that no "
            "jaxlayer layer loaded from a `.keras` file, so it has no ONNX "
            "form; export the model where its Python code is importable."
        )
    if saved.blob is None:
        raise ValueError(
            f"{saved.owner} was reloaded from its `.keras` file without its "
            "Python code and runs the computation saved there, which cannot "
            f"be exported to ONNX here: {saved.why}. Or load the model where "
            "the layer's Python code is importable and export it there."
        )
    import onnx
    import onnx_ir as ir

    model = checked_model(saved, int(ctx.opset))
    graph = model.graph
    names = {
        v.name: ctx.get_value_for_var(eqn.invars[int(v.name.split("_")[1])])
        for v in graph.input
    }

    def constant(name, array):
        del name
        return ctx.builder.add_initializer_from_array(
            ctx.fresh_name("jaxlayer_const"), array
        )

    def make(node, inputs):
        attrs = {}
        for key, value in _onnx.attribute_values(node).items():
            attrs[key] = ir.tensor(value) if hasattr(value, "dtype") else value
        outs = [ctx.fresh_name(f"jaxlayer_{node.op_type}") for _ in node.output]
        result = getattr(ctx.builder, node.op_type)(
            *inputs, _domain=node.domain, _outputs=outs, **attrs
        )
        return [result] if len(outs) == 1 else list(result)

    def missing(name):
        return ValueError(
            f"{saved.owner}: the ONNX form saved in its `.keras` file reads "
            f"{name!r}, which no input or node makes; save the model again."
        )

    outputs = _onnx.splice(graph, names, constant, make, missing)
    if len(outputs) != len(eqn.outvars):
        raise ValueError(
            f"{saved.owner}: the ONNX form saved in its `.keras` file returns "
            f"{len(outputs)} arrays where its computation returns "
            f"{len(eqn.outvars)}; save the model again."
        )
    for var, value in zip(eqn.outvars, outputs, strict=True):
        spec = ctx.get_value_for_var(var, name_hint=ctx.fresh_name("jaxlayer_out"))
        if getattr(spec, "type", None) is not None:
            value.type = spec.type
        if getattr(spec, "shape", None) is not None:
            value.shape = spec.shape
        ctx.bind_value_for_var(var, value)
    del onnx


def install() -> None:
    """Registers the plugin with jax2onnx (once), and wraps `to_onnx` for
    Keras's exports on the jax backend (`_keras_jax`)."""
    from jaxlayer.export import _keras_jax

    _private.patch_jax2onnx_to_onnx(_keras_jax.wrap_to_onnx)
    plugin_system = _private.jax2onnx_plugin_system()

    if "call_exported" in plugin_system.PLUGIN_REGISTRY:
        return

    @plugin_system.register_primitive(
        jaxpr_primitive="call_exported",
        context="primitives.jaxlayer",
        component="call_exported",
        since="jaxlayer",
        testcases=[],
    )
    class _CallExported(plugin_system.PrimitiveLeafPlugin):
        def lower(self, ctx, eqn):
            lower(ctx, eqn)
