"""The shape facet of `JaxLayer`: output shapes and dtypes, abstractly.

`compute_output_spec` and `compute_output_shape` run `call_fn` under
`jax.eval_shape` (through the layer's `Computation`, or, before the layer is
built, with `init_fn` run abstractly too): nothing is computed, no variable
made, no seed drawn. A mixin of `JaxLayer` only.
"""

from __future__ import annotations

import jax
import keras

from jaxlayer import _shapes as S


class ShapeMethods:
    """`compute_output_spec` and `compute_output_shape` of `JaxLayer`."""

    def _abstract_trees(self, input_shape):
        """`(params, state, defs)` of `init_fn` run abstractly
        (`jax.eval_shape`: no variable is made, no seed drawn), with `defs`
        the structures of the trees it returns: a layer not built yet."""
        params, state = self._init_trees(
            input_shape, self._dry_init_rng(), abstract=True
        )
        params, params_def = jax.tree_util.tree_flatten(params)
        state, state_def = jax.tree_util.tree_flatten(state)
        params = [self._computation.param_struct(x) for x in params]
        state = [S.struct(x.shape, x.dtype) for x in state]
        return params, state, (params_def, state_def)

    def compute_output_spec(self, inputs, training=False):
        """The outputs' shapes and dtypes, from `jax.eval_shape` of `call_fn`.

        Nothing is computed and no variable is made: on an unbuilt layer,
        `init_fn` runs abstractly too.

        Args:
            inputs: a `keras.KerasTensor` (or anything with `shape` and
                `dtype`), or a pytree of them.
            training: the training flag to evaluate `call_fn` with.

        Returns:
            A `keras.KerasTensor`, or a pytree of them as `call_fn` returns.

        Examples:

            >>> import keras, numpy as np
            >>> from jaxlayer import JaxLayer
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  params={"w": np.ones((4, 2), "float32")})
            >>> layer.compute_output_spec(keras.KerasTensor((None, 4))).shape
            (None, 2)
        """
        training = bool(training)
        in_leaves, in_def = jax.tree_util.tree_flatten(inputs)
        with keras.StatelessScope():
            rng_leaves, rng_def = self._call_rng(training)
        rng = [S.struct(k.shape, k.dtype) for k in rng_leaves]
        abstract = None
        if not self.built and self._needs_init:
            # Not built yet (`compute_output_shape` before any call): the
            # shapes of the weights come from `init_fn`, run abstractly.
            shapes = [tuple(x.shape) for x in in_leaves]
            abstract = self._abstract_trees(
                jax.tree_util.tree_unflatten(in_def, shapes)
            )
        out_def, out = self._computation.output_structs(
            training, in_leaves, in_def, rng, rng_def, abstract
        )
        return jax.tree_util.tree_unflatten(
            out_def, [keras.KerasTensor(shape, dtype=dtype) for shape, dtype in out]
        )

    def compute_output_shape(self, input_shape):
        """The outputs' shapes, from `jax.eval_shape` of `call_fn`.

        Works before the layer is built (`init_fn` runs abstractly). The
        input dtypes are those of the layer's first call when known; else
        the compute dtype is tried, then int32 (an embedding lookup).

        Args:
            input_shape: a shape tuple (None where unknown), or a pytree of
                them.

        Returns:
            A shape tuple, or a pytree of them as `call_fn` returns.

        Raises:
            ValueError: `call_fn` (or `init_fn`) fails on inputs of these
                shapes; its own error, naming the layer.

        Examples:

            >>> import jax
            >>> from jaxlayer import JaxLayer
            >>> def init_fn(rng, inputs):
            ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 3))}
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  init_fn, seed=0)
            >>> layer.compute_output_shape((None, 8))
            (None, 3)
        """
        return S.output_shapes(
            self.compute_output_spec,
            input_shape,
            self._input_dtypes,
            self.compute_dtype,
        )
