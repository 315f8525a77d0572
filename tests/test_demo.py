"""`python -m jaxlayer demo` trains to >= 0.95 test accuracy and reloads."""

from jaxlayer.__main__ import demo


def test_demo(capsys):
    accuracy = demo(epochs=12, seed=0)
    out = capsys.readouterr().out
    assert accuracy >= 0.95
    assert "test accuracy" in out
    assert "reloaded model predicts the same" in out
