"""Pure-JAX reference models shared by the tests.

One function computes everything (`reference_apply`); `make_call_fn` wraps it
with an exact-name signature, so every combination of `params`, `state`,
`rng` and `training` the contract allows can be tested against `jax.jit` and
`jax.grad` of the same function.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np

IN, HIDDEN, OUT = 5, 7, 3


def reference_init(rng, inputs, stateful=False):
    k0, k1 = jax.random.split(jax.random.key_data(rng) if _is_typed(rng) else rng)
    d = inputs.shape[-1]
    params = {
        "dense_0": {
            "kernel": jax.random.normal(k0, (d, HIDDEN)) / np.sqrt(d),
            "bias": jnp.full((HIDDEN,), 0.1),
        },
        "dense_1": {
            "kernel": jax.random.normal(k1, (HIDDEN, OUT)) / np.sqrt(HIDDEN),
            "bias": jnp.zeros((OUT,)),
        },
    }
    if not stateful:
        return params
    state = {"mean": jnp.zeros((d,)), "count": jnp.zeros((), jnp.int32)}
    return params, state


def _is_typed(key):
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def reference_apply(params, state, rng, x, training):
    """The model: optional input centring by a running mean (state), a
    tanh layer, optional noise from `rng` in training, a linear layer."""
    h = x if state is None else x - state["mean"]
    h = jnp.tanh(h @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    if rng is not None and training:
        h = h + 0.1 * jax.random.uniform(rng, h.shape)
    out = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]
    if state is None:
        return out
    if training:
        new_state = {
            "mean": 0.9 * state["mean"] + 0.1 * jnp.mean(x, axis=0),
            "count": state["count"] + 1,
        }
    else:
        new_state = state
    return out, new_state


def signature_of(fn, names):
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return fn


def make_call_fn(names):
    """A call_fn taking exactly `names` (in that order) around the reference."""

    def call_fn(*args):
        a = dict(zip(names, args, strict=True))
        return reference_apply(
            a.get("params"),
            a.get("state"),
            a.get("rng"),
            a["inputs"],
            # Without a `training` argument the function behaves the same in
            # both modes: it always updates its state and uses its rng.
            a.get("training", True),
        )

    return signature_of(call_fn, names)


def make_init_fn(names, stateful):
    def init_fn(*args):
        a = dict(zip(names, args, strict=True))
        return reference_init(a["rng"], a["inputs"], stateful)

    return signature_of(init_fn, names)


def numpy_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def mlp_init(rng, inputs):
    """A small two-layer perceptron's params (hidden width 8, 3 outputs)."""
    k1, k2 = jax.random.split(rng)
    d = inputs.shape[-1]
    return {
        "hidden": {"w": jax.random.normal(k1, (d, 8)) / 2, "b": jnp.full(8, 0.1)},
        "out": {"w": jax.random.normal(k2, (8, 3)) / 3},
    }


def mlp_call(params, inputs):
    h = jnp.tanh(inputs @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"]
