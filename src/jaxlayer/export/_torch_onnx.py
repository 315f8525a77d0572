"""torch -> onnx and openvino through TorchScript, for a jaxlayer layer.

Keras's torch-backend exports to ONNX (with a dynamic batch, or when the
dynamo exporter fails) and to OpenVINO trace the model with
`torch.jit.trace`. While it traces, the torch bridge records a layer's call
as one `jaxlayer::call_exported` node (the operator `torch.export` records,
`bridges.torch_export`). TorchScript's ONNX exporter knows no such op; the
symbolic registered here puts in its place the ONNX graph jax2onnx makes of
the layer's flat function (`torch_export.live_function`, in the process that
traced it) at the export's opset, its inputs' leading dimension symbolic
(`batch`) so that a dynamic batch stays dynamic. A layer reloaded from its
`.keras` file without its source calls its saved computation, which
jaxlayer's jax2onnx plugin (`_jax2onnx`) replaces by the ONNX form saved in
the file.

OpenVINO's PyTorch frontend takes conversion rules only as arguments of
`convert_model`, which Keras calls itself; `_openvino`'s wrapper of
`openvino.convert_model` sends a traced module holding the node here
(`to_onnx_file`): exported to ONNX with the symbolic, then read by OpenVINO.

The dynamo ONNX exporter (what Keras tries first for static shapes) takes
translations only per call (`custom_translation_table`), so it fails on the
node and Keras falls back to TorchScript, which this serves.
"""

from __future__ import annotations

import io

from jaxlayer.export import _onnx

#: The node's kind in a TorchScript graph.
KIND = "jaxlayer::call_exported"
# The lowest opset jax2onnx converts to.
_MIN_OPSET = 9
# The opset of the intermediate model for OpenVINO.
OPENVINO_OPSET = 18
_installed = False


def install() -> None:
    """Registers the symbolic with TorchScript's ONNX exporter (once)."""
    global _installed
    if _installed:
        return
    import torch

    torch.onnx.register_custom_op_symbolic(KIND, _symbolic, _MIN_OPSET)
    _installed = True


def _list(value) -> list:
    """The elements of a TorchScript list value (a `prim::ListConstruct`)."""
    node = value.node()
    if node.kind() != "prim::ListConstruct":
        raise ValueError(
            f"jaxlayer: the {KIND} node takes a list built by {node.kind()}, "
            "which the ONNX export cannot read."
        )
    return list(node.inputs())


def _specs(exported, counts, dims) -> list:
    """The flat argument shapes: the traced ones, with the inputs' dims
    named in `dims` (per input, per dim, a symbol name or None) symbolic."""
    import jax

    specs = list(exported.in_avals)
    start = counts[0]
    for k, i in enumerate(range(start, start + counts[1])):
        aval = specs[i]
        names = dims[k] if dims is not None and k < len(dims) else None
        if aval.shape and names is not None and len(names) == len(aval.shape):
            shape = tuple(
                d if n is None else n for d, n in zip(aval.shape, names, strict=True)
            )
            specs[i] = jax.ShapeDtypeStruct(shape, aval.dtype)
    return specs


def dynamic_dims(values) -> list:
    """Per input value of the node, per dim, a key of its symbol where the
    ONNX export declares the dim dynamic (`dynamic_axes`), else None."""
    out = []
    for v in values:
        kind = v.type()
        sizes = getattr(kind, "symbolic_sizes", lambda: None)()
        if sizes is None:
            out.append(None)
            continue
        out.append([s if s is not None and s < 0 else None for s in sizes])
    return out


def _candidates(dynamic) -> list:
    """The symbol names to try, most general first: each of the export's
    dynamic dims its own symbol (as the file declares them); then the
    non-batch ones at one position one symbol (token ids and their mask: one
    sequence length, which the function needs equal)."""
    if not any(d is not None and any(x is not None for x in d) for d in dynamic):
        return []
    batch = {d[0] for d in dynamic if d and d[0] is not None}

    def named(key_of):
        names: dict = {}
        out = []
        for d in dynamic:
            if d is None:
                out.append(None)
                continue
            leaf = []
            for j, s in enumerate(d):
                if s is None:
                    leaf.append(None)
                    continue
                key = "batch" if s in batch and j == 0 else key_of(j, s)
                leaf.append(
                    names.setdefault(
                        key, "batch" if key == "batch" else f"d{len(names)}"
                    )
                )
            out.append(leaf)
        return out

    separate = named(lambda j, s: ("symbol", s))
    shared = named(lambda j, s: ("at", j))
    return [separate] if shared == separate else [separate, shared]


def function_proto(sha: str, opset: int, dynamic=None):
    """The ONNX model of the computation `sha` (made in this process), with
    the dims `dynamic` (`dynamic_dims`) symbolic.

    Raises:
        ValueError: it cannot be converted with those dims symbolic (a file
            declaring them dynamic would fail or differ at other sizes).
    """
    from jaxlayer.bridges import torch_export

    live = torch_export.live_function(sha)
    if live is None:
        raise ValueError(
            f"jaxlayer: the TorchScript graph calls the jaxlayer computation "
            f"{sha[:12]}, whose layer is not in this process (a module traced "
            "elsewhere, or its layer deleted), so it cannot be converted to "
            "ONNX; export the model with `model.export(..., format='onnx')` "
            "in the process that holds it."
        )
    exported = torch_export.exported_by_hash(sha)
    feature = "exporting to ONNX or OpenVINO from the torch backend"
    candidates = _candidates(dynamic or [])
    if not candidates:
        return _onnx.to_onnx(
            live, _specs(exported, live.counts, None), opset=opset, feature=feature
        )
    error = None
    for dims in candidates:
        specs = _specs(exported, live.counts, dims)
        try:
            return _onnx.to_onnx(live, specs, opset=opset, feature=feature)
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - next candidate, or refused
            error = error or (specs, err)
    fn = live.fn()
    owner = getattr(fn, "owner", None) or "a jaxlayer layer"
    raise ValueError(_onnx.conversion_failure(owner, *error))


def _attributes(node) -> dict:
    """An `onnx.NodeProto`'s attributes as `g.op` keywords (typed names)."""
    import numpy as np
    import torch

    out = {}
    for key, value in _onnx.attribute_values(node).items():
        if isinstance(value, np.ndarray):
            out[f"{key}_t"] = torch.from_numpy(np.array(value))
        elif isinstance(value, bytes):
            out[f"{key}_s"] = value.decode()
        elif isinstance(value, float):
            out[f"{key}_f"] = value
        elif isinstance(value, int):
            out[f"{key}_i"] = value
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, int) for v in value
        ):
            out[f"{key}_i"] = list(value)
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, float) for v in value
        ):
            out[f"{key}_f"] = list(value)
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, bytes) for v in value
        ):
            out[f"{key}_s"] = [v.decode() for v in value]
        else:
            raise ValueError(
                f"jaxlayer: the ONNX node {node.op_type} has an attribute "
                f"{key} of a kind the TorchScript ONNX exporter cannot write."
            )
    return out


def _symbolic(g, artifact, sha, params, inputs, state, rng):
    """The ONNX nodes of one `jaxlayer::call_exported` node."""
    import numpy as np
    import torch

    del artifact  # the computation comes from its layer, by `sha`
    if not isinstance(sha, str):
        node = sha.node()
        kinds = ("prim::Constant", "onnx::Constant")
        sha = node.s("value") if node.kind() in kinds else None
    if not isinstance(sha, str):
        raise ValueError(f"jaxlayer: the {KIND} node's sha256 is not a constant.")
    values = [v for group in (params, inputs, state, rng) for v in _list(group)]
    proto = function_proto(sha, int(g.opset), dynamic_dims(_list(inputs)))
    graph = proto.graph
    if _onnx.has_subgraphs(graph):
        raise ValueError(
            "jaxlayer: the layer's ONNX graph has control flow (If/Loop/Scan), "
            "which jaxlayer does not put into a TorchScript ONNX export; "
            "export the model to ONNX from the jax backend."
        )
    values = [v for group in (params, inputs, state, rng) for v in _list(group)]
    names = {v.name: value for v, value in zip(graph.input, values, strict=True)}

    def constant(name, array):
        del name
        return g.op("Constant", value_t=torch.from_numpy(np.array(array)))

    ranks, arrays = None, None

    def make(n, host_inputs):
        nonlocal ranks, arrays
        if any(x is None for x in host_inputs):
            raise ValueError(
                f"jaxlayer: the layer's ONNX node {n.op_type} omits an input, "
                "which the TorchScript ONNX exporter cannot write."
            )
        if n.op_type in _ONE_AXIS_ORDER and not n.domain:
            if ranks is None:
                ranks, arrays = _ranks(proto), _constant_arrays(graph)
            steps = _axis_steps(n, ranks, arrays)
            if steps is not None:
                return [_one_axis_chain(g, n.op_type, host_inputs[0], steps)]
        kind = n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
        made = g.op(kind, *host_inputs, outputs=len(n.output), **_attributes(n))
        return [made] if len(n.output) == 1 else list(made)

    def missing(name):
        return ValueError(f"jaxlayer: the layer's ONNX graph reads {name!r}.")

    results = _onnx.splice(graph, names, constant, make, missing)
    return g.op("prim::ListConstruct", *results)


# -- Squeeze and Unsqueeze of several axes -----------------------------------
# TorchScript's ONNX export folds the nodes whose inputs are all constants
# or parameters (`do_constant_folding`, on in Keras's export) by running
# them in torch; its fold of Squeeze and Unsqueeze applies the axes one at a
# time in ascending order, which is wrong for several axes: a Squeeze of
# axes (1, 2) of a (4, 1, 1) parameter (Equinox's Conv2d bias) fails with
# "Dimension out of range (expected to be in range of [-2, 1], but got 2)",
# and an Unsqueeze of several negative axes folds to the wrong shape. The
# symbolic writes such a node as a chain of one-axis nodes, in an order in
# which each axis is still the one ONNX meant.

#: Per op, whether its one-axis steps go in descending axis order.
_ONE_AXIS_ORDER = {"Squeeze": True, "Unsqueeze": False}


def _ranks(proto) -> dict:
    """The rank of each value of `proto`'s graph that ONNX shape inference
    knows, by name."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - the ranks the graph states, then
        graph = proto.graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        kind = v.type.tensor_type
        if kind.HasField("shape"):
            ranks[v.name] = len(kind.shape.dim)
    return ranks


def _constant_arrays(graph) -> dict:
    """The graph's initializers and `Constant` nodes' values, by name."""
    arrays = _onnx.initializer_arrays(graph)
    for n in graph.node:
        if n.op_type == "Constant" and not n.domain:
            value = _onnx.attribute_values(n).get("value")
            if value is not None:
                arrays[n.output[0]] = value
    return arrays


def _axis_steps(node, ranks: dict, arrays: dict) -> list | None:
    """The non-negative axes, in the order to apply them one at a time, of
    a Squeeze or Unsqueeze `node` of several constant axes (None for one
    axis, axes not constant, or a rank not known where one is needed)."""
    import numpy as np

    if len(node.input) > 1:
        axes = arrays.get(node.input[1])
    else:
        axes = _onnx.attribute_values(node).get("axes")
    if axes is None:
        return None
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if len(axes) < 2:
        return None
    if any(a < 0 for a in axes):
        rank = ranks.get(node.input[0])
        if rank is None:
            return None
        if node.op_type == "Unsqueeze":
            rank += len(axes)
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(set(axes), reverse=_ONE_AXIS_ORDER[node.op_type])


def _one_axis_chain(g, op_type: str, value, axes: list):
    """`value` through one `op_type` node per axis of `axes`, in order."""
    import torch

    for axis in axes:
        if g.opset >= 13:
            index = g.op("Constant", value_t=torch.tensor([axis], dtype=torch.int64))
            value = g.op(op_type, value, index)
        else:
            value = g.op(op_type, value, axes_i=[axis])
    return value


# -- OpenVINO ----------------------------------------------------------------


def has_jaxlayer_node(model) -> bool:
    """Whether `model` is a TorchScript module whose graph has the node."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.jit.ScriptModule):
        return False
    try:
        graph = model.inlined_graph
    except Exception:  # noqa: BLE001 - not a traced graph: left to OpenVINO
        return False
    return any(n.kind() == KIND for n in graph.nodes())


def to_onnx_file(module) -> io.BytesIO:
    """The ONNX model (an in-memory file) of a traced module with the node.

    Keras traces the model at its input signature with each unknown size
    as 1, and hands OpenVINO the traced module alone: the sizes of 1 are
    taken as the unknown ones and declared dynamic (with the batch), then
    the model is run by OpenVINO at other sizes. Where it fails there (a
    size 1 that the model needs, or one the trace baked in), only the
    batch is declared dynamic; where that fails too, a `ValueError`.
    """
    import torch

    install()
    args, flat = _example_inputs(module)
    if any(isinstance(a, dict) for a in args):
        module = _flat_inputs(module, args)
        args = list(flat)
    names = [f"input_{i}" for i in range(len(flat))]
    wide = {
        name: {
            j: "batch" if j == 0 else f"{name}_{j}"
            for j, d in enumerate(t.shape)
            if j == 0 or d == 1
        }
        for name, t in zip(names, flat, strict=True)
        if t.dim()
    }
    batch = {name: {0: "batch"} for name, t in zip(names, flat, strict=True) if t.dim()}
    tries = (wide, batch) if wide != batch else (batch,)
    error = None
    for axes in tries:
        buffer = io.BytesIO()
        try:
            torch.onnx.export(
                module,
                (*args, {}),
                buffer,
                input_names=names,
                dynamic_axes=axes,
                opset_version=OPENVINO_OPSET,
                dynamo=False,
            )
        except ValueError as err:  # jaxlayer's: the function, not symbolic
            if axes is tries[-1]:
                raise
            error = str(err)
            continue
        failed = _fails_at_other_sizes(buffer.getvalue(), flat, names, axes)
        if failed is None:
            if axes is not tries[0]:
                _warn_static(module, wide, error)
            buffer.seek(0)
            return buffer
        error = failed
    raise ValueError(
        f"{_owners(module)}: the OpenVINO model made through ONNX (torch "
        "backend) does not run at a batch size other than the traced one "
        f"({error}); give `model.export` an `input_signature` with static "
        "shapes, or export with format='onnx'."
    )


def _warn_static(module, wide, error) -> None:
    """The warning for sizes of 1 kept static (`to_onnx_file`)."""
    import warnings

    dims = ", ".join(
        f"input {name[6:]} dimension {j}"
        for name, axes in wide.items()
        for j in axes
        if j
    )
    warnings.warn(
        f"{_owners(module)}: the OpenVINO model declares only the batch "
        f"dynamic; {dims} (traced at size 1: fixed by the input signature, "
        "or unknown and traced as 1 by Keras) stay at 1, since with them "
        f"dynamic the model fails ({error[:300]}). Give `model.export` an "
        "`input_signature` with the sizes you need.",
        stacklevel=4,
    )


def _example(kind, where: str):
    """Zeros of the traced shape and dtype of a TorchScript tensor type."""
    import torch

    sizes = kind.sizes() if isinstance(kind, torch._C.TensorType) else None
    dtype = kind.dtype() if sizes is not None else None
    if sizes is None or dtype is None:
        raise ValueError(
            "jaxlayer: converting a traced module with a jaxlayer layer to "
            f"OpenVINO needs its inputs' shapes; {where} has none. Trace it "
            "with `torch.jit.trace` on example tensors."
        )
    return torch.zeros(sizes, dtype=dtype)


def _example_inputs(module) -> tuple[list, list]:
    """`(args, tensors)`: example arguments of the traced `module` (tensors,
    or dicts of tensors: Keras traces a model of named inputs with one
    dict), and their tensors in the order `torch.onnx.export` takes them."""
    import torch

    graph = module.inlined_graph
    args, flat = [], []
    for i, value in enumerate(list(graph.inputs())[1:]):  # the first: `self`
        kind = value.type()
        if not isinstance(kind, torch._C.DictType):
            args.append(_example(kind, f"input {i}"))
            flat.append(args[-1])
            continue
        entries = {}
        for use in value.uses():
            node = use.user
            key = (
                node.inputsAt(1).toIValue()
                if node.kind() == "aten::__getitem__"
                else None
            )
            if not isinstance(key, str):
                raise ValueError(
                    f"jaxlayer: input {i} of the traced module is a dict that "
                    f"the graph reads with {node.kind()}, which the conversion "
                    "to OpenVINO through ONNX cannot follow; pass the inputs "
                    "as a list."
                )
            entries.setdefault(key, _example(node.output().type(), f"input {key!r}"))
        args.append(entries)
        flat.extend(entries.values())
    return args, flat


def _flat_inputs(module, args):
    """`module` traced again as a function of its tensors one by one (the
    TorchScript ONNX exporter leaves a dict input of a scripted module a
    `Gather` of string keys, which no runtime reads)."""
    import torch

    def rebuild(flat):
        it = iter(flat)
        return [
            {k: next(it) for k in a} if isinstance(a, dict) else next(it) for a in args
        ]

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *flat):
            return self.inner(*rebuild(flat))

    flat = [t for a in args for t in (a.values() if isinstance(a, dict) else [a])]
    return torch.jit.trace(Flat(), tuple(flat), check_trace=False)


def _fails_at_other_sizes(onnx_bytes, flat, names, axes) -> str | None:
    """None if OpenVINO runs the ONNX model with its dynamic sizes at 2 and
    3 (the batch at 3), else what failed."""
    import numpy as np
    import openvino

    try:
        compiled = openvino.Core().compile_model(
            openvino.Core().read_model(io.BytesIO(onnx_bytes)), "CPU"
        )
        for size in (2, 3):
            feed = []
            for name, t in zip(names, flat, strict=True):
                shape = [
                    (3 if j == 0 else size) if j in axes.get(name, {}) else d
                    for j, d in enumerate(t.shape)
                ]
                feed.append(np.zeros(shape, dtype=t.numpy().dtype))
            compiled(feed)
    except Exception as err:  # noqa: BLE001 - reported, or the next try
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0][:300] if text else ''}"
    return None


def _owners(module) -> str:
    """The jaxlayer layers in a traced module's graph, for messages."""
    from jaxlayer.bridges import torch_export

    found = []
    for node in module.inlined_graph.nodes():
        if node.kind() != KIND:
            continue
        sha = node.inputsAt(1).toIValue()
        live = torch_export.live_function(sha) if isinstance(sha, str) else None
        fn = live.fn() if live is not None else None
        owner = getattr(fn, "owner", None)
        if owner and owner not in found:
            found.append(str(owner))
    return ", ".join(found) or "a jaxlayer layer"
