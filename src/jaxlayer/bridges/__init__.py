"""How a pure JAX function runs on each Keras backend.

A bridge is a function

    run(fn, params, inputs, state, rng) -> (outputs, new_state)

where every argument after `fn` is a list of backend tensors (what
`keras.Variable.value` and the layer's inputs are on that backend), and the
two results are lists of backend tensors. `fn` is a `jaxlayer._pure.
PureFunction`: a pure JAX function with the same signature taking and
returning lists of `jax.Array`, made by the layer for one training flag,
input structure and rng structure.

Gradients: `outputs` are differentiable with respect to the floating tensors
of `params` and `inputs`, through the backend's own autodiff; `state` and
`rng` are not differentiated and `new_state` carries no gradient.

What `fn` tells the bridges: `fn.owner` (the layer, for messages),
`fn.platforms` (platforms to compile for inside a TensorFlow graph, or
None), `fn.out_treedef` (the output structure, from `jax.eval_shape`),
`fn.trainable()` (which parameters are trainable now).

Lifetimes: the layer owns its pure functions and drops them whenever its
trees, its `call_fn` or its dtype policy change. A bridge keeps what it
compiles or caches (jitted functions, `jax.export` modules, DLPack views of
parameters) in `fn.slot(name, make)`, never at module level, so a dropped
layer takes its compiled code with it and a live layer never runs stale
code. Module-level state is limited to counters and probed capabilities.
TensorFlow keeps the gradient function of each graph-mode
`tf.custom_gradient` for good: the TensorFlow bridge's holds only a weak
reference to what it needs, which the layer's function owns, so a traced
train or predict function does not keep a dropped layer's exports alive.

Optional attributes of a bridge's `run`, which the layer looks up (the torch
bridge has them; the others need none): `tracing()`, whether the call is
being traced by the backend's compiler (torch.compile, torch.export);
`layer_call(computation, inputs, training)`, which takes a traced call over
(or returns NotImplemented): it gets the layer's `Computation`
(`jaxlayer._computation`: its pure functions, a call's values, rng, state
assignment and eager path), never the layer; `untraced(f, *args)`, through
which the layer runs its eager calls so that the compiler never traces into
JAX; `casts_params`, whether `run` takes the stored parameters and a `cast=`
dtype (mixed precision); `outside_graph(f)`, which runs `f()` eagerly while
the backend traces a graph (the TensorFlow bridge has it: `init_fn` runs in
JAX on concrete seeds, also when Keras builds the layer inside a
`tf.function`).

The layer knows nothing of backends beyond choosing a bridge with `get`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_MODULES = ("jax", "tensorflow", "torch", "numpy")


def get(backend: str) -> Callable:
    """The bridge `run` function of a Keras backend.

    Args:
        backend: a Keras backend name (`keras.backend.backend()`).

    Returns:
        The bridge's `run` function.

    Raises:
        NotImplementedError: no bridge exists for this backend.

    Examples:

        >>> from jaxlayer import bridges
        >>> bridges.get("jax").__module__
        'jaxlayer.bridges.jax'
    """
    if backend not in _MODULES:
        raise NotImplementedError(
            f"jaxlayer has no bridge for the Keras backend {backend!r}; "
            f"supported backends: {', '.join(sorted(_MODULES))}."
        )
    return importlib.import_module(f"{__name__}.{backend}").run
