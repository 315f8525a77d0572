"""The unit the bridges run: one pure JAX function of a layer, and its caches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PureFunction:
    """A layer's computation as a pure JAX function on flat lists.

    `fn(params, inputs, state, rng) -> (outputs, new_state)`, where every
    argument and both results are lists of `jax.Array`s: the values of the
    layer's parameter and state variables in variable order, the leaves of
    the inputs, and the leaves of the `rng` structure (seeds or keys).

    A layer makes one per (training flag, input structure, rng structure)
    and owns it; it drops them all whenever its trees, its `call_fn` or its
    dtype policy change, so no bridge ever runs stale code. The bridges keep
    nothing at module level: what they compile or cache for this function
    (jitted code, exports, DLPack views of parameters) lives in its slot,
    `fn.slot(name, make)`, and goes when the layer goes.

    Attributes:
        owner: the layer, for messages (`"JaxLayer 'mlp'"`).
        platforms: the platforms to compile for when the function runs
            inside a TensorFlow graph (`native_serialization_platforms`), or
            None for the default (CPU and CUDA).
        training: the training flag the function was made for.
        in_treedef: the structure of the inputs.
        rng_treedef: the structure of the `rng` argument.
        out_treedef: the structure of the outputs, computed by the layer
            with `jax.eval_shape` when it makes the function.
    """

    __slots__ = (
        "_fn",
        "_slots",
        "owner",
        "platforms",
        "training",
        "in_treedef",
        "rng_treedef",
        "out_treedef",
        "_trainable",
        "_input_shapes",
        "_called_shapes",
        "__weakref__",
    )

    def __init__(
        self,
        fn: Callable,
        *,
        owner: str,
        platforms: tuple[str, ...] | None,
        training: bool,
        in_treedef: Any,
        rng_treedef: Any,
        out_treedef: Any = None,
        trainable: Callable[[], tuple[bool, ...]] | None = None,
        input_shapes: Callable[[], list[tuple] | None] | None = None,
        called_shapes: Callable[[], list[tuple] | None] | None = None,
    ):
        self._fn = fn
        self._slots: dict[str, Any] = {}
        self.owner = owner
        self.platforms = platforms
        self.training = training
        self.in_treedef = in_treedef
        self.rng_treedef = rng_treedef
        self.out_treedef = out_treedef
        self._trainable = trainable
        self._input_shapes = input_shapes
        self._called_shapes = called_shapes

    def __call__(self, params, inputs, state, rng):
        return self._fn(params, inputs, state, rng)

    @property
    def __name__(self) -> str:  # for jax.jit and jax.export's messages
        return "jaxlayer_call"

    @property
    def native_serialization_platforms(self) -> tuple[str, ...] | None:
        """Keras's name for `platforms`."""
        return self.platforms

    def trainable(self) -> tuple[bool, ...] | None:
        """Per parameter (in `params` order), whether it is trainable now.

        Read at call time (`variable.trainable` may change between calls),
        so that a bridge computes no gradient for frozen parameters. None
        when the layer does not say.
        """
        return None if self._trainable is None else self._trainable()

    def input_shapes(self) -> list[tuple] | None:
        """Per input leaf, the shape the layer was first called with, None
        where a dimension is unknown (the batch, a `keras.Input`'s None).

        A bridge that compiles per shape compiles once for these, symbolic
        where None. None when the layer does not say (or the structure
        differs).
        """
        return None if self._input_shapes is None else self._input_shapes()

    def called_shapes(self) -> list[tuple] | None:
        """Per input leaf, the concrete shape of a call the function is known
        to run with (the layer's first call of known shapes, or the shapes a
        computation reloaded from a file was exported for), or None.

        A bridge that must try the function on concrete shapes before the
        real ones are known tries these.
        """
        return None if self._called_shapes is None else self._called_shapes()

    def slot(self, name: str, make: Callable[[], Any]) -> Any:
        """What the bridge `name` keeps for this function, made on first use.

        Args:
            name: the bridge's name (`"torch"`, `"tensorflow"`, ...).
            make: called once, with no argument, to make the slot's value.

        Returns:
            The value kept in the slot.
        """
        value = self._slots.get(name)
        if value is None:
            value = self._slots[name] = make()
        return value

    def slots(self) -> dict[str, Any]:
        """The bridges' slots (a copy), for tests and debugging."""
        return dict(self._slots)

    def __repr__(self) -> str:
        return (
            f"PureFunction({self.owner}, training={self.training}, "
            f"inputs={self.in_treedef})"
        )


def fill_unknown(shapes, called) -> tuple[list[tuple], set] | None:
    """`shapes` (None for an unknown dim) with their unknown dims as in the
    concrete shapes `called`, or None where `called` does not fit them
    (another count, rank or known dim).

    Returns:
        `(filled, put_in)`: the filled shapes, and the set of sizes put in
        for unknown dims.
    """
    if called is None or len(called) != len(shapes):
        return None
    filled, put_in = [], set()
    for shape, known in zip(shapes, called, strict=True):
        if len(shape) != len(known):
            return None
        pairs = list(zip(shape, known, strict=True))
        if any(d is not None and d != k for d, k in pairs):
            return None
        put_in.update(k for d, k in pairs if d is None)
        filled.append(tuple(k if d is None else d for d, k in pairs))
    return filled, put_in
