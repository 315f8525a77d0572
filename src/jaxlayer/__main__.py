"""`python -m jaxlayer demo`: a Haiku CNN trained with Keras, saved, reloaded."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def demo(epochs: int = 12, seed: int = 0) -> float:
    """Trains the spec's Haiku CNN on scikit-learn's 8x8 digits with `fit`.

    Prints the test accuracy, saves the model to a `.keras` file, reloads it
    and checks that the reloaded model predicts the same.

    Args:
        epochs: training epochs.
        seed: the random seed (`keras.utils.set_random_seed`).

    Returns:
        The test accuracy.
    """
    import keras
    import numpy as np

    from jaxlayer import _deps
    from jaxlayer._demo_model import build_model

    datasets = _deps.require("sklearn.datasets", "the demo")
    keras.utils.set_random_seed(seed)
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    y = keras.utils.to_categorical(digits.target, 10)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]

    print(f"Keras {keras.__version__}, backend: {keras.backend.backend()}")
    model = build_model()
    model.summary()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=1)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")

    predictions = model.predict(x_test, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "haiku_cnn.keras")
        model.save(path)
        print(f"saved to {path} ({os.path.getsize(path) / 1024:.0f} KiB)")
        reloaded = keras.saving.load_model(path)
    again = reloaded.predict(x_test, verbose=0)
    difference = float(np.max(np.abs(predictions - again)))
    print(f"reloaded model predicts the same: max |difference| = {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit("the reloaded model predicts differently")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayer")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="train, save and reload a Haiku CNN")
    run.add_argument("--epochs", type=int, default=12)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    accuracy = demo(epochs=args.epochs, seed=args.seed)
    return 0 if accuracy >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
