"""The four contenders, each as a pair of timing closures over one model.

Imports Keras: import this module only after `KERAS_BACKEND` is set.

Every contender is built by a function returning a `Runner`, whose `fit()`
trains for one pass over the benchmark data and returns the steady-state
ms/step, and whose `predict()` returns ms/batch of inference. Building (and
compiling, in the warm-up) happens before any timing, so compile time is
excluded; a contender that raises while being built or warmed up is reported
as unsupported by the caller.

How a `fit` is timed: the clock starts when the second execution of the epoch
begins, after the first one has finished (`steps_per_execution` steps), and
stops at the end of the epoch, after the epoch's loss is on the host. This
excludes `fit`'s set-up (data adapters, iterators) and includes everything a
training step costs in steady state: feeding the batch, Keras's loop and
callbacks, the step itself.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable

import jax
import keras
import numpy as np
import optax

from benchmarks._names import JAXLAYER, KERAS_JAXLAYER, NATIVE, PURE_JAX
from benchmarks._workloads import Workload

LEARNING_RATE = 1e-3
# Keras's Adam epsilon, so that optax's Adam does the same arithmetic.
ADAM_EPSILON = 1e-7
INIT_SEED = 0


@dataclasses.dataclass
class Runner:
    """Timing closures of one contender at one `steps_per_execution`.

    Attributes:
        fit: trains one pass over the data; returns steady-state ms/step.
        predict: runs inference over the prediction batches; returns ms/batch.
    """

    fit: Callable[[], float]
    predict: Callable[[], float]


def _adam():
    return optax.adam(LEARNING_RATE, eps=ADAM_EPSILON)


def _train_step(apply):
    """One pure JAX training step: loss, gradients, an Adam update."""
    opt = _adam()

    def loss_fn(params, x, y):
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pure_jax(workload: Workload, data, spe: int, predict_batches: int) -> Runner:
    """The best a JAX user would write: a jitted train step with donated
    parameters and optimizer state, the batches already on the device, a
    Python loop and no framework.

    `spe` is ignored: the loop dispatches one step per call whatever
    `steps_per_execution` the Keras contenders use. (A `lax.scan` over 25
    steps was tried: in one trial on a busy 2-core CPU it ran the CNN at
    676 ms/step against 34 for this loop; XLA's CPU convolutions inside a
    loop body looked much slower. Not re-measured quietly.)
    """
    del spe
    x, y = data
    b = workload.batch_size
    n = len(x) // b
    batches = [
        (jax.device_put(x[i * b : (i + 1) * b]), jax.device_put(y[i * b : (i + 1) * b]))
        for i in range(n)
    ]
    pred_batches = [xb for xb, _ in batches[:predict_batches]]
    run = jax.jit(_train_step(workload.apply), donate_argnums=(0, 1))
    apply = jax.jit(workload.apply)
    params = workload.init(jax.random.key(INIT_SEED))
    state = {"params": params, "opt_state": _adam().init(params)}

    # The first step is not timed (as Keras's first execution), unless it is
    # the only one.
    skipped = 1 if n > 1 else 0

    def fit():
        p, s = state["params"], state["opt_state"]
        jax.block_until_ready((p, s))
        for xb, yb in batches[:skipped]:
            p, s, loss = run(p, s, xb, yb)
        jax.block_until_ready((p, s))
        start = time.perf_counter()
        for xb, yb in batches[skipped:]:
            p, s, loss = run(p, s, xb, yb)
        float(loss)
        jax.block_until_ready((p, s))
        elapsed = time.perf_counter() - start
        state["params"], state["opt_state"] = p, s
        return 1e3 * elapsed / (n - skipped)

    def predict():
        start = time.perf_counter()
        outs = [apply(state["params"], xb) for xb in pred_batches]
        np.concatenate([np.asarray(o) for o in outs])
        return 1e3 * (time.perf_counter() - start) / len(pred_batches)

    fit()  # compiles
    predict()
    return Runner(fit, predict)


class _EpochTimer(keras.callbacks.Callback):
    """Times an epoch from the start of its second execution to its end
    (from its start when it has one execution only).

    Only `on_train_batch_begin` and `on_epoch_end` are overridden, so Keras
    keeps dispatching batch ends asynchronously (no per-step host sync).
    """

    def __init__(self, first_timed_step):
        super().__init__()
        self.first_timed_step = first_timed_step
        self.start = self.end = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.first_timed_step:
            # On the JAX backend the first execution may still be running:
            # wait for it so that the clock starts with an empty queue.
            state = getattr(self.model, "_jax_state", None)
            if state is not None:
                jax.block_until_ready(state)
            self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        # The loss in `logs` is already a Python float: every step is done.
        self.end = time.perf_counter()


def keras_model(kind: str, workload: Workload):
    """The Keras model of a contender (not compiled).

    `jaxlayer.JaxLayer` and `keras.layers.JaxLayer` wrap `workload.apply`
    with the parameters of `workload.init` at the pure JAX run's seed.
    """
    if kind == NATIVE:
        return workload.native()
    params = workload.init(jax.random.key(INIT_SEED))
    if kind == JAXLAYER:
        import jaxlayer

        layer = jaxlayer.JaxLayer(workload.apply, params=params, name="jax_model")
    elif kind == KERAS_JAXLAYER:
        layer = keras.layers.JaxLayer(workload.apply, params=params, name="jax_model")
    else:
        raise ValueError(f"unknown Keras contender {kind!r}")
    return keras.Sequential([keras.Input(workload.input_shape), layer])


# `jit_compile` of every Keras contender (`--jit-compile`).
JIT_COMPILE = "auto"


def compile_model(model, spe: int):
    """Compiles for training with Adam and sparse softmax cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE, epsilon=ADAM_EPSILON),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
        jit_compile=JIT_COMPILE,
    )
    return model


def keras_contender(kind: str):
    """A builder of `Runner`s for one Keras contender (`NATIVE`, ...)."""

    def build(workload: Workload, data, spe: int, predict_batches: int) -> Runner:
        x, y = data
        b = workload.batch_size
        steps = len(x) // b
        model = compile_model(keras_model(kind, workload), spe)
        # With one execution per epoch, the whole epoch is timed (its set-up
        # is then included, a small share of a long execution).
        skipped = spe if steps >= 2 * spe else 0
        timer = _EpochTimer(skipped)
        x_pred = x[: predict_batches * b]
        common = dict(batch_size=b, epochs=1, shuffle=False, verbose=0)

        def fit():
            timer.start = timer.end = None
            model.fit(x, y, callbacks=[timer], **common)
            return 1e3 * (timer.end - timer.start) / (steps - skipped)

        def predict():
            start = time.perf_counter()
            model.predict(x_pred, batch_size=b, verbose=0)
            return 1e3 * (time.perf_counter() - start) / predict_batches

        # Warm-up: compiles the train and predict functions.
        model.fit(x[: spe * b], y[: spe * b], **common)
        model.predict(x[: 2 * b], batch_size=b, verbose=0)
        return Runner(fit, predict)

    return build


BUILDERS = {
    PURE_JAX: pure_jax,
    NATIVE: keras_contender(NATIVE),
    JAXLAYER: keras_contender(JAXLAYER),
    KERAS_JAXLAYER: keras_contender(KERAS_JAXLAYER),
}


# -- memory (JAX backend) --------------------------------------------------


def live_bytes() -> int:
    """Bytes held by all live `jax.Array`s in this process."""
    return sum(a.nbytes for a in jax.live_arrays())


def param_bytes(workload: Workload) -> int:
    """Bytes of the workload's parameters."""
    shapes = jax.eval_shape(workload.init, jax.random.key(INIT_SEED))
    return sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(shapes))


def _hold_pure_jax(workload, data):
    x, y = data
    b = workload.batch_size
    params = workload.init(jax.random.key(INIT_SEED))
    opt_state = _adam().init(params)
    run = jax.jit(_train_step(workload.apply), donate_argnums=(0, 1))
    params, opt_state, loss = run(params, opt_state, x[:b], y[:b])
    jax.block_until_ready((params, opt_state, loss))
    return params, opt_state


def _hold_keras(kind):
    def hold(workload, data):
        x, y = data
        b = workload.batch_size
        model = compile_model(keras_model(kind, workload), 1)
        model.fit(x[:b], y[:b], batch_size=b, epochs=1, shuffle=False, verbose=0)
        return model

    return hold


def memory(workload: Workload, data) -> dict:
    """Live `jax.Array` bytes each contender holds after build + 1 fit step.

    Each contender is built from scratch (its own init, its own compile) and
    measured as the growth of `live_bytes()` while it is alive; the caller's
    parameters are not kept, so a layer that held on to them (a second copy
    of the weights) would show it. Contenders that raise give their error.
    """
    holders = {
        PURE_JAX: _hold_pure_jax,
        NATIVE: _hold_keras(NATIVE),
        JAXLAYER: _hold_keras(JAXLAYER),
        KERAS_JAXLAYER: _hold_keras(KERAS_JAXLAYER),
    }
    out = {}
    for kind, hold in holders.items():
        keras.backend.clear_session()
        gc.collect()
        base = live_bytes()
        try:
            held = hold(workload, data)
            gc.collect()
            out[kind] = live_bytes() - base
            del held
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            out[kind] = unsupported(err)
    keras.backend.clear_session()
    gc.collect()
    return out


def unsupported(err: BaseException) -> str:
    """`"unsupported: <type>: <first line of the message>"`, shortened."""
    first = (str(err).strip().splitlines() or [""])[0]
    if len(first) > 120:
        first = first[:117] + "..."
    return f"unsupported: {type(err).__name__}: {first}"
