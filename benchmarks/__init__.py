"""Benchmarks of jaxlayer against pure JAX and native Keras.

Run `python -m benchmarks.fit_step --help`, or `benchmarks/run_all.sh`.
"""
