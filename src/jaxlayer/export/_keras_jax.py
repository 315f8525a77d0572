"""Keras's exports on the jax backend, for inputs that share a dimension.

Keras's jax-backend exporters give every unknown dimension of every input
its own symbol (`tf_saved_model`: `batch`, `a`, `b`, ...; `onnx`: `batch`,
`dim_0_1`, `dim_1_1`, ...), so a model whose token ids and attention mask
must have one sequence length (it adds one to the other) cannot be traced.
jaxlayer knows which dimensions are equal: a layer records the shapes of
its first concrete call (`_record.shared_groups`). When such an export
fails and a jaxlayer layer fed straight from the model's inputs recorded
some of their unknown dimensions equal, the export is made once more with
one symbol for each group of those (the layer's saving does the same:
separate symbols first, shared ones where those fail). An export that
works as Keras makes it is left as it is, and so is one whose
`jax2tf_kwargs` name `polymorphic_shapes`.

Two functions of Keras are wrapped (public behaviour unchanged otherwise):
`keras.src.export.export_saved_model` (what `model.export` calls for
`tf_saved_model`: the retry passes `jax2tf_kwargs={"polymorphic_shapes":
...}`, Keras's own option) and `keras.src.export.onnx._export_onnx_jax`
(the retry has jaxlayer's wrapper of `jax2onnx.to_onnx`, installed with
jaxlayer's jax2onnx plugin, rename the symbols of the inputs Keras gives
it, and trace the model with `jax.numpy` as it is: `_onnx._plain_numpy`).
"""

from __future__ import annotations

import contextvars
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import keras

from jaxlayer import _private, _record
from jaxlayer._shapes import upper_bounds

# While `_export_onnx_jax` runs again with shared symbols: per flat input,
# its dimensions (ints, or symbol names) for `jax2onnx.to_onnx`.
_ONNX_DIMS: contextvars.ContextVar = contextvars.ContextVar(
    "jaxlayer_onnx_dims", default=None
)


def shared_dims(model, signature) -> tuple[list[list], list[str]] | None:
    """`(dims, notes)`: per flat input spec of `signature` (Keras's tree
    order), its dimensions as ints and symbol names, the unknown ones that
    a jaxlayer layer of `model` recorded equal sharing one name; `notes`
    says which. None when no two unknown dimensions are known equal (or the
    signature is not the model's inputs).
    """
    specs = keras.tree.flatten(signature)
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        return None
    if len(inputs) != len(specs) or any(
        len(tuple(s.shape)) != len(tuple(x.shape))
        for s, x in zip(specs, inputs, strict=True)
    ):
        return None
    names = [
        _input_name(s, x, j) for j, (s, x) in enumerate(zip(specs, inputs, strict=True))
    ]
    parent: dict = {}

    def find(a):
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    notes = []
    for layer, members in _layer_groups(model, inputs, specs):
        joined = False
        for group in members:
            first = find(group[0])
            for other in group[1:]:
                root = find(other)
                if root != first:
                    parent[max(root, first)] = min(root, first)
                    first = min(root, first)
                    joined = True
        if joined:
            notes.append(layer)
    if not parent:
        return None
    symbols: dict = {}

    def symbol(root):
        # The first input's name and the dimension (`input_ids_1`), unique.
        if root not in symbols:
            text = f"{_symbol(names[root[0]])}_{root[1]}"
            while text in symbols.values() or text == "batch":
                text += "_"
            symbols[root] = text
        return symbols[root]

    dims = []
    for j, spec in enumerate(specs):
        leaf = []
        for i, d in enumerate(tuple(spec.shape)):
            if d is not None:
                leaf.append(int(d))
            elif i == 0:
                leaf.append("batch")
            else:
                leaf.append(symbol(find((j, i))))
        dims.append(leaf)
    return dims, notes


def _input_name(spec, tensor, j) -> str:
    return getattr(spec, "name", None) or getattr(tensor, "name", None) or f"in{j}"


def _symbol(name: str) -> str:
    text = "".join(c if c.isalnum() else "_" for c in name)
    return text if text[:1].isalpha() else f"in_{text}"


def _layer_groups(model, inputs, specs):
    """`(layer name, groups)` per jaxlayer layer of `model` fed straight
    from its inputs: each group, the `(input, dim)` positions of unknown
    dimensions that its first concrete call had equal."""
    position = {id(x): j for j, x in enumerate(inputs)}
    for layer in model._flatten_layers(include_self=False):
        # A jaxlayer layer (its `Computation` holds the input record).
        record = getattr(getattr(layer, "_computation", None), "record", None)
        if not isinstance(record, _record.InputRecord) or record.called is None:
            continue
        groups = _record.shared_groups(record)
        for node in getattr(layer, "_inbound_nodes", ()):
            arguments = node.arguments
            args = arguments.args
            x = args[0] if args else arguments.kwargs.get("inputs")
            leaves, treedef = jax.tree_util.tree_flatten(x)
            if treedef != record.treedef or len(leaves) != len(groups):
                continue
            found: dict = {}
            for k, leaf in enumerate(leaves):
                j = position.get(id(leaf))
                if j is None or len(groups[k]) != len(tuple(specs[j].shape)):
                    continue
                for i, key in enumerate(groups[k]):
                    if key is not None and tuple(specs[j].shape)[i] is None:
                        found.setdefault(key, []).append((j, i))
            together = [g for g in found.values() if len(g) > 1]
            if together:
                yield f"{type(layer).__name__} {layer.name!r}", together


def _retry_note(notes, dims, err) -> str:
    shared = sorted(
        {d for leaf in dims for d in leaf if isinstance(d, str) and d != "batch"}
    )
    first = str(err).strip().splitlines()
    return (
        f"jaxlayer: exported again with the input dimensions that "
        f"{', '.join(notes)} had equal in its first call as one symbol each "
        f"({', '.join(shared)}), after the export with one symbol per input "
        f"dimension failed ({type(err).__name__}: "
        f"{first[0][:200] if first else ''})."
    )


def _signature(model, input_signature):
    if input_signature is not None:
        return input_signature
    get = _private.resolve("keras.src.export.export_utils", "get_input_signature")
    try:
        return get(model)
    except Exception:  # noqa: BLE001 - then Keras's own error stands
        return None


def _plan(model, signature):
    """`shared_dims`, or None where it cannot tell (Keras's error stands)."""
    if signature is None:
        return None
    try:
        return shared_dims(model, signature)
    except Exception:  # noqa: BLE001 - a model jaxlayer cannot read
        return None


def wrap_export_saved_model(export_saved_model: Callable) -> Callable:
    """`export_saved_model` that, on the jax backend, exports again with
    shared symbols where jaxlayer knows inputs' dimensions equal."""
    if getattr(export_saved_model, "_jaxlayer_wrapped", False):
        return export_saved_model

    @functools.wraps(export_saved_model)
    def export(model, filepath, verbose=None, input_signature=None, **kwargs):
        try:
            return export_saved_model(
                model, filepath, verbose, input_signature, **kwargs
            )
        except Exception as err:
            jax2tf_kwargs = dict(kwargs.get("jax2tf_kwargs") or {})
            if (
                keras.backend.backend() != "jax"
                or "polymorphic_shapes" in jax2tf_kwargs
                or kwargs.get("is_static")
            ):
                raise
            signature = _signature(model, input_signature)
            plan = _plan(model, signature)
            if plan is None:
                raise
            dims, notes = plan
            strings = [f"({', '.join(str(d) for d in leaf)})" for leaf in dims]
            jax2tf_kwargs["polymorphic_shapes"] = keras.tree.pack_sequence_as(
                signature, strings
            )
            note, first = _retry_note(notes, dims, err), err
        try:
            return export_saved_model(
                model,
                filepath,
                verbose,
                signature,
                **{**kwargs, "jax2tf_kwargs": jax2tf_kwargs},
            )
        except Exception as second:
            # A function with a largest size (GPT-2's causal mask, sliced to
            # min(n_positions, length)): once more with that bound, as
            # saving does (`_shapes.upper_bounds`).
            names = {d for leaf in dims for d in leaf if isinstance(d, str)}
            bounds = upper_bounds(second, names)
            if not bounds or "polymorphic_constraints" in jax2tf_kwargs:
                second.add_note(note)
                raise second from first
            constraints = [f"{name} <= {n}" for name, n in sorted(bounds.items())]
            note += f" (then with {', '.join(constraints)})"
            try:
                exported = export_saved_model(
                    model,
                    filepath,
                    verbose,
                    signature,
                    **{
                        **kwargs,
                        # Without gradient: TensorFlow traces the
                        # gradient of the SavedModel's function with the
                        # shapes alone, the constraints left out.
                        "jax2tf_kwargs": {
                            "with_gradient": False,
                            **jax2tf_kwargs,
                            "polymorphic_constraints": constraints,
                        },
                    },
                )
            except Exception as third:
                third.add_note(note)
                raise third from first
            warnings.warn(
                f"jaxlayer: the SavedModel at {filepath!r} takes inputs with "
                f"{', '.join(constraints)} only (the model's function slices a "
                "fixed-size array to that dimension); a larger size fails "
                "when the SavedModel runs.",
                stacklevel=2,
            )
            return exported

    export._jaxlayer_wrapped = True
    return export


def wrap_export_onnx_jax(export_onnx_jax: Callable) -> Callable:
    """Keras's `_export_onnx_jax` that exports again with shared symbols
    where jaxlayer knows inputs' dimensions equal."""
    if getattr(export_onnx_jax, "_jaxlayer_wrapped", False):
        return export_onnx_jax

    @functools.wraps(export_onnx_jax)
    def export(model, filepath, input_signature, opset_version, *args, **kwargs):
        try:
            return export_onnx_jax(
                model, filepath, input_signature, opset_version, *args, **kwargs
            )
        except Exception as err:
            plan = _plan(model, input_signature)
            if plan is None:
                raise
            dims, notes = plan
            note, first = _retry_note(notes, dims, err), err
        token = _ONNX_DIMS.set(dims)
        try:
            return export_onnx_jax(
                model, filepath, input_signature, opset_version, *args, **kwargs
            )
        except Exception as second:
            second.add_note(note)
            raise second from first
        finally:
            _ONNX_DIMS.reset(token)

    export._jaxlayer_wrapped = True
    return export


def wrap_to_onnx(to_onnx: Callable) -> Callable:
    """`jax2onnx.to_onnx` that, inside a retried `_export_onnx_jax`, gives
    its inputs' unknown dimensions the shared symbols."""
    if getattr(to_onnx, "_jaxlayer_wrapped", False):
        return to_onnx

    @functools.wraps(to_onnx)
    def convert(fn, *args, inputs: Any = None, **kwargs):
        dims = _ONNX_DIMS.get()
        if inputs is None:
            return to_onnx(fn, *args, **kwargs)
        if dims is not None:
            # Symbolic dimensions through `jax.numpy` as it is (jax2onnx's
            # replacements of `arange`, `full`, ... need sizes).
            from jaxlayer.export import _onnx

            inputs = _renamed(inputs, dims)
            fn = _onnx._plain_numpy(fn)
        return to_onnx(fn, *args, inputs=inputs, **kwargs)

    convert._jaxlayer_wrapped = True
    return convert


def _renamed(inputs, dims):
    """`inputs` (`jax.ShapeDtypeStruct`s) with their symbolic (str)
    dimensions named as `dims`, when they are the inputs `dims` describes."""
    inputs = list(inputs)
    if len(inputs) != len(dims) or any(
        len(getattr(x, "shape", ())) != len(d)
        for x, d in zip(inputs, dims, strict=True)
    ):
        return inputs
    return [
        jax.ShapeDtypeStruct(
            tuple(
                d if isinstance(old, str) and isinstance(d, str) else old
                for old, d in zip(x.shape, leaf, strict=True)
            ),
            x.dtype,
        )
        for x, leaf in zip(inputs, dims, strict=True)
    ]


def install() -> None:
    """Wraps Keras's two jax-backend export functions (once), each where the
    installed Keras has it: without one (Keras 3.10 has no
    `_export_onnx_jax`; it exports ONNX on jax through its SavedModel
    path), that export is Keras's own, without the retry."""
    try:
        package = _private.resolve("keras.src.export")
        saved_model = _private.resolve("keras.src.export.saved_model")
        wrapped = wrap_export_saved_model(
            _private.resolve("keras.src.export", "export_saved_model")
        )
    except ImportError:
        pass
    else:
        package.export_saved_model = wrapped
        saved_model.export_saved_model = wrapped
    try:
        onnx = _private.resolve("keras.src.export.onnx")
        export_onnx_jax = _private.resolve("keras.src.export.onnx", "_export_onnx_jax")
    except ImportError:
        return
    onnx._export_onnx_jax = wrap_export_onnx_jax(export_onnx_jax)
