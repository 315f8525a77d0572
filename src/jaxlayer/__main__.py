"""`python -m jaxlayer demo`: a Haiku CNN trained with Keras, saved, reloaded."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

DEFAULT_EPOCHS = 12
# The accuracy the default run must reach (it reaches about 0.97).
MIN_ACCURACY = 0.95
TRAINING_BACKENDS = ("jax", "tensorflow", "torch")

_EPILOG = """\
how the Keras backend is chosen (once per process, when Keras is imported):
  1. KERAS_BACKEND, when set: jax, tensorflow, torch or numpy (numpy runs
     inference only; the demo needs jax, tensorflow or torch). A backend
     that is not installed is an error naming the extra to install.
  2. Else the "backend" of Keras's config file ($KERAS_HOME/keras.json, or
     ~/.keras/keras.json), when that backend is installed (Keras writes the
     file with "tensorflow" on its first import).
  3. Else jax, a dependency of jaxlayer (one line on stderr says so).

examples:
  python -m jaxlayer demo
  KERAS_BACKEND=torch python -m jaxlayer demo
  KERAS_BACKEND=tensorflow python -m jaxlayer demo --epochs 2
"""


class DemoError(Exception):
    """The demo cannot run here; the message says why in one line."""


def demo(epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> float:
    """Trains the spec's Haiku CNN on scikit-learn's 8x8 digits with `fit`.

    Prints the Keras backend and the test accuracy, saves the model to a
    `.keras` file, reloads it and checks that the reloaded model predicts the
    same.

    Args:
        epochs: training epochs.
        seed: the random seed (`keras.utils.set_random_seed`).

    Returns:
        The test accuracy.

    Raises:
        DemoError: on the NumPy backend, which cannot train.
        ImportError: when Haiku or scikit-learn is missing (the message names
            the `demo` extra).

    Examples:
        >>> accuracy = demo(epochs=2)  # doctest: +SKIP
    """
    import keras
    import numpy as np

    backend = keras.backend.backend()
    if backend not in TRAINING_BACKENDS:
        raise DemoError(
            f"the demo trains a model, which the {backend} backend of Keras "
            f"cannot do: run it on a training backend (jax, tensorflow or torch), "
            f"e.g. KERAS_BACKEND=jax python -m jaxlayer demo"
        )

    from jaxlayer import _deps
    from jaxlayer._demo_model import build_model

    datasets = _deps.require("sklearn.datasets", "the demo", extra="demo")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlayer",
        description="jaxlayer: any JAX model as a Keras 3 layer.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "demo",
        help="train, save and reload a Haiku CNN on the current Keras backend",
        description="Trains the Haiku CNN of the spec with `model.fit` on\n"
        "scikit-learn's 8x8 digits, saves it to a .keras file, reloads it and\n"
        "checks that it predicts the same.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="training epochs (default: %(default)s).",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0).")
    run.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help=f"exit 1 below this test accuracy (default: {MIN_ACCURACY} with "
        f"the default {DEFAULT_EPOCHS} epochs, no check otherwise).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m jaxlayer demo`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    minimum = args.min_accuracy
    if minimum is None:
        minimum = MIN_ACCURACY if args.epochs >= DEFAULT_EPOCHS else 0.0
    from jaxlayer._deps import MissingExtraError

    try:
        accuracy = demo(epochs=args.epochs, seed=args.seed)
    except (DemoError, MissingExtraError) as err:
        # One line, no traceback: the NumPy backend, a missing extra.
        print(f"python -m jaxlayer demo: {err}", file=sys.stderr)
        return 1
    if accuracy < minimum:
        print(
            f"python -m jaxlayer demo: test accuracy {accuracy:.4f} is below {minimum}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
