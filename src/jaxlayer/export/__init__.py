"""Deployment exports: the pieces Keras's exporters lack for a jaxlayer layer.

Keras's `model.export(format=...)` runs the exporters itself; this package
supplies what they cannot convert on their own, with no change to the
user's call:

- `_registry`: which live JAX function each `XlaCallModule` op of the
  TensorFlow bridge runs (by the sha256 of its module).
- `_onnx`: a layer's function as an ONNX graph (jax2onnx), the ONNX graph
  saved in a `.keras` file for a layer reloaded without its source (a
  jax2onnx plugin for `call_exported`), and splicing an ONNX graph into
  another converter's graph.
- `_tf2onnx`: a tf2onnx handler for `XlaCallModule` (tensorflow -> onnx).
- `_openvino`: an OpenVINO conversion rule for `XlaCallModule`
  (tensorflow -> openvino).
- `_hooks`: installs those in tf2onnx, jax2onnx and OpenVINO when (and only
  when) the program imports them; importing jaxlayer imports none of them.
"""
