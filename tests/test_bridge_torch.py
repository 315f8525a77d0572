"""The PyTorch bridge: zero-copy DLPack, torch autograd, caching, fit.

Every number is compared with the same function run by `jax.jit`/`jax.grad`
on the same parameters (float32: rtol = atol = 1e-5; float16/bfloat16 runs
are checked for training, not against float32 numbers).
"""

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from _reference import mlp_call, mlp_init
from jaxlayer import JaxLayer

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="tests the PyTorch bridge (KERAS_BACKEND=torch)"
)
if BACKEND == "torch":
    import torch

    from jaxlayer.bridges import torch as bridge
    from jaxlayer.bridges.torch import _exchange, _signatures

TOL = {"rtol": 1e-5, "atol": 1e-5}


def stateful_call(params, state, inputs, training):
    out = mlp_call(params, inputs - state["mean"])
    if training:
        state = {
            "mean": 0.9 * state["mean"] + 0.1 * inputs.mean(0),
            "count": state["count"] + 1,
        }
    return out, state


def stateful_init(rng, inputs):
    d = inputs.shape[-1]
    return mlp_init(rng, inputs), {
        "mean": jnp.zeros(d),
        "count": jnp.zeros((), jnp.int32),
    }


def dropout_call(params, rng, inputs, training):
    h = jnp.tanh(inputs @ params["hidden"]["w"] + params["hidden"]["b"])
    if training:
        h = jnp.where(jax.random.bernoulli(rng, 0.5, h.shape), h * 2, 0.0)
    return h @ params["out"]["w"]


def jax_params(layer):
    """The layer's params as a tree of JAX arrays (copies)."""
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(keras.ops.convert_to_numpy(v)), layer.params
    )


def assert_trees_close(got, want, **tol):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), **(tol or TOL)
        ),
        got,
        want,
    )


def grads_of(layer):
    return jax.tree_util.tree_map(lambda v: v.value.grad.numpy(), layer.params)


def data(n=16, d=5, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(n, d).astype("float32"), rs.randn(n, 3).astype("float32")


@pytest.fixture
def cuda():
    """Skips unless torch and JAX both have a CUDA device."""
    if BACKEND != "torch" or not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip("needs jax with a GPU")


# -- zero copy ----------------------------------------------------------------


def test_parameter_views_share_the_torch_buffers():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    layer(torch.tensor(x))
    fn = next(iter(layer._pure_fns.values()))
    views = fn.slots()["torch"].views
    tensors = [v.value for v in layer._params_spec.variables]
    assert len(tensors) == 3
    for (cached, _, _, view), tensor in zip(views, tensors, strict=True):
        assert cached is tensor
        assert view.unsafe_buffer_pointer() == tensor.data_ptr()


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "bfloat16", "int32", "uint8", "bool"]
)
def test_dlpack_round_trip_is_zero_copy(dtype):
    t = torch.ones(8, 4, dtype=getattr(torch, dtype))
    a = _exchange.to_jax(t, "cpu")
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    assert str(a.dtype) == dtype
    back = _exchange.to_torch(a, "cpu")
    assert back.data_ptr() == t.data_ptr()
    assert back.dtype == t.dtype


def test_requires_grad_and_non_contiguous_tensors_convert():
    p = torch.nn.Parameter(torch.randn(4, 6))
    a = _exchange.to_jax(p, "cpu")
    assert a.unsafe_buffer_pointer() == p.data_ptr()
    nc = torch.randn(4, 6)[:, ::2]
    np.testing.assert_array_equal(np.asarray(_exchange.to_jax(nc, "cpu")), nc.numpy())


def test_int64_is_narrowed_like_jax():
    a = _exchange.to_jax(torch.arange(4), "cpu")
    assert a.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(a), np.arange(4))


@pytest.mark.usefixtures("cuda")
def test_cuda_views_share_the_torch_buffers():
    t = torch.randn(64, 32, device="cuda")
    a = _exchange.to_jax(t, "cuda")
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = _exchange.to_torch(a + 1, "cuda")
    assert back.device.type == "cuda"
    np.testing.assert_allclose(back.cpu().numpy(), t.cpu().numpy() + 1, **TOL)


# -- outputs and gradients -------------------------------------------------------


def test_outputs_and_gradients_match_jax_grad():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, y = data()
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt)
    loss = ((out - torch.tensor(y)) ** 2).mean()
    loss.backward()

    params = jax_params(layer)

    def ref_loss(p, x):
        return jnp.mean((mlp_call(p, x) - y) ** 2)

    want_out = jax.jit(mlp_call)(params, x)
    gp, gx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(out.detach().numpy(), want_out, **TOL)
    assert_trees_close(grads_of(layer), gp)
    np.testing.assert_allclose(xt.grad.numpy(), gx, **TOL)


def test_gradient_of_unused_and_multiple_outputs():
    def call_fn(params, inputs):
        h = mlp_call(params, inputs)
        return {"a": h, "b": jnp.sum(h, -1), "n": jnp.argmax(h, -1)}

    layer = JaxLayer(call_fn, mlp_init, seed=0)
    x, _ = data()
    out = layer(torch.tensor(x))
    assert out["n"].dtype == torch.int32 and not out["n"].requires_grad
    out["b"].sum().backward()  # `a` unused: a zero cotangent
    params = jax_params(layer)
    want = jax.grad(lambda p: jnp.sum(call_fn(p, x)["b"]))(params)
    assert_trees_close(grads_of(layer), want)


def test_no_grad_runs_the_plain_forward():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    layer(torch.tensor(x))
    before = dict(bridge.counters)
    with torch.no_grad():
        out = layer(torch.tensor(x))
    assert not out.requires_grad
    assert bridge.counters["forward_traces"] == before.get("forward_traces", 0) + 1
    assert bridge.counters["vjp_traces"] == before.get("vjp_traces", 0)
    np.testing.assert_allclose(out.numpy(), mlp_call(jax_params(layer), x), **TOL)


# -- caching ---------------------------------------------------------------------


def test_forward_and_vjp_are_traced_once_per_signature():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    layer(torch.tensor(x)).sum().backward()
    start = dict(bridge.counters)
    for _ in range(3):
        layer.zero_grad()
        layer(torch.tensor(x)).sum().backward()
    assert bridge.counters["vjp_traces"] == start["vjp_traces"]
    assert bridge.counters["backward_traces"] == start["backward_traces"]
    assert bridge.counters["jit_functions"] == start["jit_functions"]
    assert bridge.counters["views"] == start["views"]  # parameter views cached
    # A new batch size: one new forward and one new backward.
    layer(torch.tensor(x[:4])).sum().backward()
    assert bridge.counters["vjp_traces"] == start["vjp_traces"] + 1
    assert bridge.counters["backward_traces"] == start["backward_traces"] + 1
    # A parameter whose storage is replaced gets a new view.
    variable = layer._params_spec.variables[0]
    variable.value.data = variable.value.data.clone()
    with torch.no_grad():
        layer(torch.tensor(x))
    assert bridge.counters["views"] == start["views"] + 1


# -- in-place updates ------------------------------------------------------------


def test_in_place_updates_are_seen_and_safe():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    xt = torch.tensor(x)
    for step in range(3):
        layer.zero_grad()
        out = layer(xt)
        out.sum().backward()
        want = mlp_call(jax_params(layer), x)
        np.testing.assert_allclose(out.detach().numpy(), want, **TOL)
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(0.5).add_(p.grad, alpha=0.1 * (step + 1))
    with torch.no_grad():
        np.testing.assert_allclose(
            layer(xt).numpy(), mlp_call(jax_params(layer), x), **TOL
        )


def test_in_place_change_before_backward_is_reported():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    out = layer(torch.tensor(x))
    with torch.no_grad():
        layer._params_spec.variables[0].value.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_outputs_never_alias_inputs():
    def call_fn(params, state, inputs):
        return (inputs, params["w"]), state

    layer = JaxLayer(call_fn, params={"w": np.ones(3, "float32")}, state={"s": 1.0})
    xt = torch.ones(2, 3)
    (a, b), _ = layer(xt), None
    assert a.data_ptr() != xt.data_ptr()
    assert b.data_ptr() != layer._params_spec.variables[0].value.data_ptr()


# -- Keras ------------------------------------------------------------------------


def test_dense_before_the_layer_trains_under_fit():
    x, y = data(64)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(5), JaxLayer(mlp_call, mlp_init, seed=0)]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    dense_before = model.layers[0].kernel.numpy().copy()
    jax_before = jax_params(model.layers[1])
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.layers[0].kernel.numpy(), dense_before)
    after = jax_params(model.layers[1])
    assert not np.allclose(after["out"]["w"], jax_before["out"]["w"])
    want = mlp_call(
        after, x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy()
    )
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-4, atol=1e-4)


def test_state_updates_in_training_not_in_predict():
    x, y = data(32)
    layer = JaxLayer(stateful_call, stateful_init, seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    state = jax.tree_util.tree_map(keras.ops.convert_to_numpy, layer.state)
    assert int(state["count"]) == 2
    mean = 0.1 * x[16:].mean(0) + 0.9 * (0.1 * x[:16].mean(0))
    np.testing.assert_allclose(state["mean"], mean, **TOL)
    assert not layer._state_spec.variables[0].value.requires_grad
    model.predict(x, verbose=0)
    after = jax.tree_util.tree_map(keras.ops.convert_to_numpy, layer.state)
    assert_trees_close(after, state)
    # The outputs are computed with the state as it was before the call.
    out, new_state = stateful_call(jax_params(layer), after, x, True)
    with torch.no_grad():
        got = layer(torch.tensor(x), training=True)
    np.testing.assert_allclose(got.numpy(), out, **TOL)
    assert int(keras.ops.convert_to_numpy(layer.state["count"])) == 3


def test_rng_is_fresh_on_every_training_call():
    layer = JaxLayer(dropout_call, mlp_init, seed=1)
    x = torch.ones(4, 5)
    a = layer(x, training=True).detach().numpy()
    b = layer(x, training=True).detach().numpy()
    assert not np.allclose(a, b)
    c = layer(x, training=False).detach().numpy()
    d = layer(x, training=False).detach().numpy()
    np.testing.assert_array_equal(c, d)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16", "float16"])
def test_low_precision_policies_train(policy):
    keras.config.set_dtype_policy(policy)
    x, y = data(64)
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    before = jax_params(layer)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    out = model(torch.tensor(x))
    assert out.dtype == getattr(torch, policy.replace("mixed_", ""))
    after = jax_params(layer)
    assert not np.allclose(after["out"]["w"], before["out"]["w"])


def test_non_contiguous_input():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    base = torch.randn(5, 16)
    xt = base.t()  # (16, 5), not contiguous
    assert not xt.is_contiguous()
    xt.requires_grad_(True)
    out = layer(xt)
    out.sum().backward()
    params = jax_params(layer)
    x = xt.detach().contiguous().numpy()
    np.testing.assert_allclose(out.detach().numpy(), mlp_call(params, x), **TOL)
    gx = jax.grad(lambda x: mlp_call(params, x).sum())(x)
    np.testing.assert_allclose(xt.grad.numpy(), gx, **TOL)


def test_plain_pytorch_loop_matches_optax():
    import optax

    x, y = data(32)
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    layer(torch.tensor(x[:2]))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    assert len(list(layer.parameters())) == 3

    params = jax_params(layer)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def ref_step(params, opt_state, xb, yb):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((mlp_call(p, xb) - yb) ** 2))(
            params
        )
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for step in range(6):
        xb, yb = x[step % 2 * 16 :][:16], y[step % 2 * 16 :][:16]
        opt.zero_grad()
        loss = ((layer(torch.tensor(xb)) - torch.tensor(yb)) ** 2).mean()
        loss.backward()
        opt.step()
        params, opt_state, ref_loss = ref_step(params, opt_state, xb, yb)
        np.testing.assert_allclose(loss.item(), ref_loss, **TOL)
        assert_trees_close(jax_params(layer), params)


# -- shapes: symbolic signatures, a cache that cannot thrash -------------------


def masked_call(params, inputs):
    # Token features `(batch, length, 5)` and a mask `(batch, length)`: the
    # batch and the length each shared by both inputs.
    x, mask = inputs
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return (h * mask[..., None]).sum(1) @ params["out"]["w"]


def masked_init(rng, inputs):
    return mlp_init(rng, inputs[0])


def counted(names):
    return {name: bridge.counters[name] for name in names}


def test_rotating_shapes_trace_once_per_symbolic_signature():
    # 40 shapes (8 batch sizes x 5 lengths, both shared by two inputs): the
    # first shape is traced for itself, the first new batch size makes the
    # batch symbolic, the first new length the length too: 3 traces, one
    # compile per shape, and none at all in the second cycle.
    rs = np.random.RandomState(0)
    shapes = [(b, n) for n in (3, 4, 6, 7, 9) for b in (1, 2, 3, 5, 8, 11, 13, 16)]
    batches = [
        (rs.randn(b, n, 5).astype("float32"), (rs.rand(b, n) > 0.3).astype("float32"))
        for b, n in shapes
    ]
    layer = JaxLayer(masked_call, masked_init, seed=0)
    names = ("forward_traces", "symbolic_traces", "compiles", "evictions")
    with torch.no_grad():
        start = counted(names)
        for cycle in range(2):
            for x, mask in batches:
                out = layer((torch.tensor(x), torch.tensor(mask)))
                if cycle == 0:
                    want = jax.jit(masked_call)(jax_params(layer), (x, mask))
                    np.testing.assert_allclose(out.numpy(), want, **TOL)
            done = counted(names)
            assert {k: done[k] - start[k] for k in names} == {
                "forward_traces": 3 if cycle == 0 else 0,
                "symbolic_traces": 2 if cycle == 0 else 0,
                "compiles": len(shapes) if cycle == 0 else 0,
                "evictions": 0,
            }, cycle
            start = done


def test_rotating_shapes_train_with_state_and_gradients():
    # The symbolic forward and backward of a call with state and gradients:
    # outputs, new state and gradients equal to `jax.vjp` at each batch size.
    layer = JaxLayer(stateful_call, stateful_init, seed=0)
    layer.build((None, 5))
    start = counted(("vjp_traces", "backward_traces", "symbolic_traces"))
    for n in (4, 7, 9, 12):
        x, _ = data(n, seed=n)
        state = jax.tree_util.tree_map(
            lambda v: jnp.asarray(keras.ops.convert_to_numpy(v)), layer.state
        )
        params = jax_params(layer)
        layer.zero_grad()
        out = layer(torch.tensor(x), training=True)
        out.sum().backward()
        want, vjp_fn, new_state = jax.vjp(
            lambda p, s=state, x=x: stateful_call(p, s, x, True), params, has_aux=True
        )
        np.testing.assert_allclose(out.detach().numpy(), want, **TOL)
        after = jax.tree_util.tree_map(keras.ops.convert_to_numpy, layer.state)
        assert_trees_close(after, new_state)
        (grads,) = vjp_fn(jnp.ones_like(want))
        assert_trees_close(grads_of(layer), grads)
    done = counted(("vjp_traces", "backward_traces", "symbolic_traces"))
    # The first size traced for itself, then one symbolic trace for all.
    assert done["vjp_traces"] - start["vjp_traces"] == 2
    assert done["backward_traces"] - start["backward_traces"] == 2
    assert done["symbolic_traces"] - start["symbolic_traces"] == 1


def concrete_call(params, inputs):
    # Needs its batch size as a Python int: cannot be traced symbolically.
    scale = 1.0 / int(inputs.shape[0])
    return mlp_call(params, inputs) * scale


def test_per_shape_fallback_warns_once_and_cannot_thrash(monkeypatch):
    # Room for 3 signatures, 5 shapes in rotation: a least-recently-used
    # cache would compile on every call; this one keeps 2 of the 3 it holds
    # (the first call's shape, 1, and the rotation's first, 2) through every
    # cycle and recompiles only the other 4 shapes.
    monkeypatch.setattr(_signatures, "CACHE_BYTES", 3 * _signatures.EXECUTABLE_BYTES)
    layer = JaxLayer(concrete_call, mlp_init, seed=0)
    sizes = (2, 3, 4, 5, 6)
    with torch.no_grad():
        layer(torch.ones(1, 5))
        with pytest.warns(UserWarning) as record:
            for cycle in range(3):
                start = bridge.counters["compiles"]
                for n in sizes:
                    x, _ = data(n, seed=n)
                    out = layer(torch.tensor(x))
                    want = concrete_call(jax_params(layer), jnp.asarray(x))
                    np.testing.assert_allclose(out.numpy(), want, **TOL)
                compiles = bridge.counters["compiles"] - start
                assert compiles == (len(sizes) if cycle == 0 else len(sizes) - 1)
    messages = [str(w.message) for w in record]
    (symbolic,) = [m for m in messages if "cannot be traced" in m]
    assert "inputs[0] dimension 0 (sizes 1 and 2)" in symbolic
    assert "int(x.shape[0])" in symbolic
    (full,) = [m for m in messages if "memory bound" in m]
    assert "JAXLAYER_TORCH_CACHE_MB" in full
    entries = [fn.slots().get("torch") for fn in layer._pure_fns.values()]
    assert all(e.nbytes <= _signatures.CACHE_BYTES for e in entries if e is not None)


# -- XLA's options on the CPU ---------------------------------------------------


def conv_call(params, inputs):
    x = jax.lax.conv_general_dilated(
        inputs, params["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(x).mean(axis=(1, 2)) @ params["out"]


def ynn_convolutions(hlo: str) -> int:
    """Convolutions XLA handed to YNNPACK in an optimized HLO module's text."""
    bodies = {block.strip().split(" ")[0]: block for block in hlo.split("\n\n")}
    count = 0
    for line in hlo.splitlines():
        called = re.search(r"calls=(%[\w.-]+)", line)
        if "__ynn_fusion" in line and called:
            count += "convolution(" in bodies.get(called.group(1), "")
    return count


@pytest.mark.skipif(
    BACKEND == "torch" and _signatures.jaxlib_minor() != (0, 10),
    reason="the options restate jaxlib 0.10's defaults",
)
def test_cpu_executables_leave_convolutions_to_xla(monkeypatch):
    # jaxlib 0.10 hands convolutions to YNNPACK, where a gradient's ran
    # 1.4-2.2x slower; the bridge's own CPU executables keep them in XLA
    # (the user's `jax.jit` functions are left as they are).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w": jax.random.normal(k1, (3, 3, 16, 32)) * 0.1,
        "out": jax.random.normal(k2, (32, 4)),
    }
    x = np.random.default_rng(0).standard_normal((4, 12, 12, 16), dtype=np.float32)
    grad = jax.jit(jax.grad(lambda p, x: conv_call(p, x).sum(), argnums=(0, 1)))
    assert ynn_convolutions(grad.lower(params, x).compile().as_text()) > 0

    layer = JaxLayer(conv_call, params=params)
    xt = torch.tensor(x, requires_grad=True)
    out = layer(xt)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), conv_call(params, x), **TOL)
    want_p, want_x = grad(params, x)
    np.testing.assert_allclose(xt.grad.numpy(), want_x, **TOL)
    np.testing.assert_allclose(layer.params["w"].value.grad.numpy(), want_p["w"], **TOL)

    (fn,) = [fn for fn in layer._pure_fns.values() if "torch" in fn.slots()]
    (sig,) = fn.slots()["torch"].signatures.values()
    assert ynn_convolutions(sig.forward.as_text()) == 0
    flat = sig.forward.in_avals[0]
    outputs, _, residuals = sig.forward.out_info
    backward = sig.backward.lower([flat[i] for i in sig.args], residuals, outputs)
    assert ynn_convolutions(backward.compile().as_text()) == 0

    # Where XLA_FLAGS names the option, the user's choice stands.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert _signatures.cpu_compiler_options() is None


def test_options_xla_refuses_are_dropped(monkeypatch):
    monkeypatch.setattr(_signatures, "_cpu_options_refused", False)
    monkeypatch.setattr(_signatures, "jaxlib_minor", lambda: (0, 10))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(_signatures, "_YNN_FUSIONS", "xla_no_such_option_here")
    x = jnp.arange(6.0)
    compiled = _signatures.compile_for(lambda x: x.sum(), (x,))
    assert float(compiled(x)) == 15.0
    assert _signatures.options_for((x,)) is None
    assert _signatures._cpu_options_refused
    assert _signatures.cpu_compiler_options() is None


def test_mixed_precision_reuses_the_parameter_views():
    # `mixed_bfloat16`: parameters are stored in float32 and cast inside the
    # JAX function, so the views made at the first call serve every call.
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = data(32)
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.predict(x, verbose=0)  # the inference function's views
    views = bridge.counters["views"]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    model.predict(x, verbose=0)
    assert bridge.counters["views"] == views
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype == "float32" for v in layer.trainable_weights)


# -- torch.compile ----------------------------------------------------------------


@pytest.fixture
def aot_eager(monkeypatch):
    """`torch.compile` with the "aot_eager" backend, from a reset Dynamo.

    Keras's `jit_compile=True` on torch is `torch.compile` of each step.
    Inductor's C++ code generation takes minutes on a small CPU; "aot_eager"
    runs the same capture (TorchDynamo, the operator's fake implementation,
    AOTAutograd with its registered gradient) and executes the captured
    graph as it is.
    """
    real_compile = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}),
    )
    torch._dynamo.reset()
    yield
    # Nothing compiled with "aot_eager" (or frames given up on) is left for
    # the tests after.
    torch._dynamo.reset()


@pytest.mark.usefixtures("aot_eager")
def test_torch_compile_trains_and_predicts_like_eager():
    x, y = data(32)
    results = {}
    for stateful in (False, True):
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            if stateful:
                layer = JaxLayer(stateful_call, stateful_init, seed=0)
            else:
                layer = JaxLayer(mlp_call, mlp_init, seed=0)
            model = keras.Sequential([keras.Input((5,)), layer])
            model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
            calls = bridge.counters["op_calls"]
            fallbacks = bridge.counters["eager_fallbacks"]
            history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
            out = model.predict(x, verbose=0)
            state = jax.tree_util.tree_map(keras.ops.convert_to_numpy, layer.state)
            results[stateful, jit] = (history.history["loss"], out, state)
            if jit:  # captured as one operator, never run eagerly
                assert bridge.counters["op_calls"] > calls
                assert bridge.counters["eager_fallbacks"] == fallbacks
    eager, compiled = results[False, False], results[False, True]
    np.testing.assert_allclose(compiled[0], eager[0], **TOL)
    np.testing.assert_allclose(compiled[1], eager[1], **TOL)
    # The stateful layer: every compiled step stores its state.
    eager, compiled = results[True, False], results[True, True]
    assert int(compiled[2]["count"]) == int(eager[2]["count"]) == 4
    np.testing.assert_allclose(compiled[2]["mean"], eager[2]["mean"], atol=1e-3)
    assert compiled[0][-1] < compiled[0][0]


@pytest.mark.usefixtures("aot_eager")
def test_torch_compile_of_a_layer_never_called_eagerly():
    # A functional model's layer is built on symbolic tensors only; its
    # first real call is inside torch.compile (a model loaded from a file
    # whose compile config says `jit_compile: True` does the same).
    x, _ = data(32)
    inputs = keras.Input((5,))
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    model = keras.Model(inputs, layer(inputs))
    model.compile("sgd", "mse", jit_compile=True)
    calls = bridge.counters["op_calls"]
    out = model.predict(x, verbose=0)
    assert bridge.counters["op_calls"] > calls
    want = jax.jit(mlp_call)(jax_params(layer), x)
    np.testing.assert_allclose(out, want, **TOL)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_captures_the_layer_as_one_operator(strict):
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    xt = torch.tensor(x)
    layer(xt)
    exported = torch.export.export(layer, (xt,), strict=strict)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    # torch.export (not torch.compile): the operator that carries the
    # layer's computation in the program (tests/test_export_torch.py).
    op = torch.ops.jaxlayer.call_exported.default
    assert op in targets
    assert all(t is op or t.__name__ == "getitem" for t in targets), targets
    want = jax.jit(mlp_call)(jax_params(layer), x)
    out = exported.module()(xt)
    np.testing.assert_allclose(out.detach().numpy(), want, **TOL)


@pytest.mark.usefixtures("aot_eager")
def test_torch_compile_giving_up_on_a_frame_runs_the_layer_eagerly():
    # Past its recompile limit (every new model recompiles Keras's layer
    # frames; after 8, or here 1, torch gives up on them) torch.compile runs
    # a frame as plain Python but still compiles what it calls. It then
    # traced into JAX itself and crashed ("InternalTorchDynamoError ... from
    # user code: jax/_src/literals.py"); the layer's eager calls must run
    # out of its sight, with the eager model's losses.
    x, y = data(32)
    losses = {}
    with torch._dynamo.config.patch(recompile_limit=1):
        _fit_three_times(x, y, losses)
    for compiled in losses[True]:
        np.testing.assert_allclose(compiled, losses[False][0], **TOL)


def _fit_three_times(x, y, losses):
    for jit in (False, True, True):
        keras.utils.set_random_seed(0)
        layer = JaxLayer(mlp_call, mlp_init, seed=0)
        model = keras.Sequential([keras.Input((5,)), layer])
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        losses.setdefault(jit, []).append(history.history["loss"])
        np.testing.assert_allclose(
            model.predict(x, verbose=0),
            jax.jit(mlp_call)(jax_params(layer), x),
            **TOL,
        )


@pytest.mark.usefixtures("cuda")
def test_cpu_inputs_to_a_layer_on_cuda_run_on_its_device():
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x, _ = data()
    xt = torch.tensor(x, requires_grad=True)  # on the CPU; the variables: CUDA
    out = layer(xt)
    assert out.device.type == "cuda"
    params = jax_params(layer)
    want = jax.jit(mlp_call)(params, x)
    np.testing.assert_allclose(out.detach().cpu().numpy(), want, **TOL)
    out.sum().backward()
    gx = jax.grad(lambda x: mlp_call(params, x).sum())(x)
    assert xt.grad.device.type == "cpu"  # the gradient on the input's device
    np.testing.assert_allclose(xt.grad.numpy(), gx, **TOL)


def test_the_fast_read_of_variable_values_matches_keras_value_in_every_scope():
    """`_private.plain_values` (a call's variables read with one check) gives
    what `Variable.value` gives, and steps aside wherever a scope would make
    `.value` differ: a stateless scope, an autocast scope, torch's meta
    device; without it (a Keras whose private names have gone) a layer
    computes the same."""
    from keras.src.backend.common.variables import AutocastScope
    from keras.src.backend.torch.core import device_scope

    from jaxlayer import _private

    # `clear_session` replaces Keras's global state: the scopes of the new
    # one must count.
    _private.plain_values([])
    keras.utils.clear_session()
    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    layer(x)
    variables = list(layer.trainable_variables)
    fast = _private.plain_values(variables)
    assert fast is not None
    assert all(a is v.value for a, v in zip(fast, variables, strict=True))
    with keras.StatelessScope(state_mapping=[(v, v.value * 2) for v in variables]):
        assert _private.plain_values(variables) is None
    with AutocastScope("float16"):
        assert _private.plain_values(variables) is None
    with device_scope("meta"):
        assert _private.plain_values(variables) is None
    expected = np.asarray(jax.jit(mlp_call)(jax_params(layer), x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, **TOL)
    # The fallback: every read through `Variable.value`.
    saved = list(_private._PLAIN_READER)
    try:
        _private._PLAIN_READER[:] = [None]
        assert _private.plain_values(variables) is None
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer(x)), expected, **TOL
        )
    finally:
        _private._PLAIN_READER[:] = saved
