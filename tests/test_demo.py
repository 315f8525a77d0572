"""`python -m jaxlayer demo` trains to >= 0.95 test accuracy and reloads; its
command line's exit status and one-line errors."""

import keras
import pytest

import jaxlayer.__main__ as jaxlayer_main
from jaxlayer import _deps
from jaxlayer.__main__ import demo


def test_demo(capsys):
    accuracy = demo(epochs=12, seed=0)
    out = capsys.readouterr().out
    assert accuracy >= 0.95
    assert "test accuracy" in out
    assert "reloaded model predicts the same" in out
    assert f"backend: {keras.backend.backend()}" in out


@pytest.mark.parametrize(
    "argv,accuracy,code",
    [
        (["demo"], 0.96, 0),
        (["demo"], 0.90, 1),  # the default 12 epochs must reach 0.95
        (["demo", "--epochs", "2"], 0.50, 0),  # a short run: no threshold
        (["demo", "--epochs", "2", "--min-accuracy", "0.9"], 0.50, 1),
    ],
)
def test_main_exit_status_follows_the_accuracy(monkeypatch, argv, accuracy, code):
    calls = []
    monkeypatch.setattr(
        jaxlayer_main, "demo", lambda **kw: calls.append(kw) or accuracy
    )
    assert jaxlayer_main.main(argv) == code
    epochs = int(argv[2]) if len(argv) > 2 else 12
    assert calls == [{"epochs": epochs, "seed": 0}]


def test_main_missing_extra_is_one_line(monkeypatch, capsys):
    def demo(**kw):
        _deps.require("no_such_module_xyz", "the demo", extra="demo")

    monkeypatch.setattr(jaxlayer_main, "demo", demo)
    assert jaxlayer_main.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "pip install 'jaxlayer[demo]'" in err


def test_main_without_command_prints_help(capsys):
    assert jaxlayer_main.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: python -m jaxlayer" in out and "KERAS_BACKEND" in out
