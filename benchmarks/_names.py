"""The contenders' names, shared by the runner and the report (no imports)."""

PURE_JAX = "pure JAX (jit + optax, donated)"
NATIVE = "native Keras layers"
JAXLAYER = "jaxlayer.JaxLayer"
KERAS_JAXLAYER = "keras.layers.JaxLayer"
CONTENDERS = (PURE_JAX, NATIVE, JAXLAYER, KERAS_JAXLAYER)
