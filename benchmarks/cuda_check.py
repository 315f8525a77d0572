"""Checks the torch bridge on a CUDA GPU: zero copy, no host wait, gradients.

Needs torch with CUDA and a jaxlib with a CUDA plugin in one environment;
run from the repository root (nothing here runs without a GPU):

    KERAS_BACKEND=torch XLA_PYTHON_CLIENT_PREALLOCATE=false \
        python -m benchmarks.cuda_check

Prints one line per check and exits non-zero when one fails:

- `zero copy`: the JAX views of the layer's parameters and the outputs handed
  to torch share the torch buffers (device pointers equal);
- `gradients`: outputs and the gradients of a loss through `backward` equal
  `jax.jit`/`jax.grad` of the same function (same device, same precision);
- `stream order`: a parameter changed in place by torch (on torch's stream)
  is what the next JAX call reads, with no synchronisation in between;
- `no host wait`: queueing calls of a heavy layer returns long before the GPU
  finishes them (the bridge never blocks the host per call);
- `fit`: a Keras `fit` on the GPU trains the layer (the loss goes down).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxlayer import JaxLayer  # noqa: E402
from jaxlayer.bridges.torch import _exchange  # noqa: E402

FAILED = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def mlp_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    return {
        "w1": jax.random.normal(k1, (inputs.shape[-1], 256)) * 0.1,
        "w2": jax.random.normal(k2, (256, 10)) * 0.1,
    }


def mlp_call(params, inputs):
    return jnp.tanh(inputs @ params["w1"]) @ params["w2"]


def heavy_call(params, inputs):
    x = inputs
    for _ in range(40):
        x = jnp.tanh(x @ params["w"])
    return x


def main() -> int:
    assert keras.backend.backend() == "torch", "run with KERAS_BACKEND=torch"
    gpus = jax.devices("gpu")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    print(f"jax {jax.__version__} on {gpus[0].device_kind}; keras {keras.__version__}")

    layer = JaxLayer(mlp_call, mlp_init, seed=0)
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    out = layer(x)
    params = [v.value for v in layer.trainable_variables]
    views = []
    for fn in layer._pure_fns.values():  # the bridge's cache, per function
        slot = fn.slots().get("torch")
        if slot is not None:
            views += [v for v in slot.views if v is not None]
    shared = [v[3].unsafe_buffer_pointer() == v[0].data_ptr() for v in views]
    check(
        "zero copy (parameters)",
        len(views) >= len(params) and all(shared),
        f"{sum(shared)}/{len(params)} parameter views share the torch buffer",
    )
    check("output device", out.device.type == "cuda", str(out.device))
    a = jnp.ones((1024,), jnp.float32) * 3
    t = _exchange.to_torch(a, "cuda")
    check(
        "zero copy (results)",
        t.data_ptr() == a.unsafe_buffer_pointer(),
        "a JAX result handed to torch keeps its buffer",
    )

    # Gradients against pure JAX on the same device.
    y = torch.randn(128, 10, device="cuda")
    loss = ((out - y) ** 2).mean()
    loss.backward()
    ref = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in _named(layer).items()}
    xj, yj = jnp.asarray(x.detach().cpu().numpy()), jnp.asarray(y.cpu().numpy())

    def ref_loss(p, xv):
        return jnp.mean((mlp_call(p, xv) - yj) ** 2)

    gp, gx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(ref, xj)
    want = np.asarray(jax.jit(mlp_call)(ref, xj))
    err_out = float(np.abs(out.detach().cpu().numpy() - want).max())
    grads = {k: v.grad for k, v in _named(layer).items()}
    err_g = max(
        float(np.abs(grads[k].cpu().numpy() - np.asarray(gp[k])).max()) for k in ref
    )
    err_x = float(np.abs(x.grad.cpu().numpy() - np.asarray(gx)).max())
    check(
        "gradients",
        max(err_out, err_g, err_x) < 1e-4,
        f"max |diff| outputs {err_out:.2e}, params {err_g:.2e}, inputs {err_x:.2e}",
    )

    # Stream order: an in-place change on torch's stream, then a JAX call.
    big = JaxLayer(heavy_call, params={"w": np.eye(2048, dtype="float32")})
    xb = torch.randn(2048, 2048, device="cuda")
    with torch.no_grad():
        big(xb)
        torch.cuda.synchronize()
        w = big.trainable_variables[0].value
        for _ in range(50):  # keep torch's stream busy for a while
            xb.add_(torch.tanh(xb @ w) * 0)
        w.mul_(0.5)  # queued on torch's stream, after that work
        got = big(xb)
        want_b = xb
        for _ in range(40):
            want_b = torch.tanh(want_b @ w)
        err_b = float((got - want_b).abs().max())
    check(
        "stream order",
        err_b < 1e-2,
        f"after an in-place update: max |diff| {err_b:.2e} (TF32 tolerance)",
    )

    # No host wait: queue calls, time the queueing, then the whole.
    with torch.no_grad():
        for _ in range(3):
            big(xb)
        torch.cuda.synchronize()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            r = big(xb)
        queued = time.perf_counter() - t0
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    del r
    check(
        "no host wait",
        queued < 0.5 * total,
        f"{n} calls queued in {queued * 1e3:.1f} ms, done after {total * 1e3:.1f} ms",
    )
    xg = torch.randn(2048, 2048, device="cuda", requires_grad=True)
    for _ in range(2):
        big(xg).sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        big(xg).sum().backward()
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    check(
        "no host wait (forward + backward)",
        queued < 0.5 * total,
        f"5 steps queued in {queued * 1e3:.1f} ms, done after {total * 1e3:.1f} ms",
    )

    # fit on the GPU.
    model = keras.Sequential([keras.Input((64,)), JaxLayer(mlp_call, mlp_init)])
    model.compile("adam", "mse")
    xs = np.random.RandomState(0).randn(512, 64).astype("float32")
    ys = xs[:, :10] * 0.5
    hist = model.fit(xs, ys, epochs=5, batch_size=64, verbose=0).history["loss"]
    check("fit", hist[-1] < hist[0], f"loss {hist[0]:.4f} -> {hist[-1]:.4f}")

    print("all passed" if not FAILED else f"FAILED: {', '.join(FAILED)}")
    return 1 if FAILED else 0


def _named(layer):
    return {v.path.split("/")[-1]: v.value for v in layer.trainable_variables}


if __name__ == "__main__":
    sys.exit(main())
