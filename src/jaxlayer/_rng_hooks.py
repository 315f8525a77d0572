"""The random-number facet of `JaxLayer`: the seeds and keys of its calls.

The hooks have the names and behaviour of `keras.layers.JaxLayer`'s
(`_get_init_seed`, `_get_init_rng`, `_get_call_seed`, `_get_call_rng`):
subclasses override them to pass key structures, or keys in inference.
A mixin of `JaxLayer` only (it uses the layer's `seed`, `seed_generator`
and seed count).
"""

from __future__ import annotations

import jax
import keras
import numpy as np

from jaxlayer import _contract as K


class RngHooks:
    """The rng hooks of `JaxLayer` (the same as `keras.layers.JaxLayer`'s)."""

    def _get_init_seed(self):
        """Returns one seed, a backend tensor of shape [2], for `init_fn`.

        Drawn from `seed` when the layer has one (so that initialisation is
        reproducible), otherwise from Keras's global seed generator (which
        `keras.utils.set_random_seed` makes deterministic).
        """
        if self.seed is None:
            return keras.random.randint((2,), 0, 2**31 - 1, dtype="int32")
        count = self._init_seed_count
        self._init_seed_count = count + 1
        words = np.array(
            [self.seed % 2**32, (self.seed // 2**32 + 2**20 + count) % 2**32],
            dtype=np.uint32,
        )
        return keras.ops.convert_to_tensor(words.view(np.int32))

    def _get_init_rng(self):
        """Returns the `rng` passed to `init_fn`; override for a structure."""
        return self._get_init_seed()

    def _get_call_seed(self):
        """Returns one fresh seed, a backend tensor of shape [2]."""
        if self.seed_generator is None:
            raise ValueError(
                f"{self._owner}: `call_fn` takes no `rng` argument, so the "
                "layer has no seed generator."
            )
        return self.seed_generator.next()

    def _get_call_rng(self, training):
        """Returns the `rng` passed to `call_fn`: a fresh seed in training,
        None in inference. Override to pass a structure or seeds in inference.
        """
        if training:
            return self._get_call_seed()
        return None

    def _call_rng(self, training):
        if not self.call_fn_has_rng:
            return [], K.NONE_TREEDEF
        leaves, treedef = jax.tree_util.tree_flatten(self._get_call_rng(training))
        # Seeds go to JAX as int32 (uint32 on the jax backend); typed keys
        # pass as they are.
        return [
            leaf if K.seed_dtype_ok(leaf.dtype) else keras.ops.cast(leaf, "int32")
            for leaf in leaves
        ], treedef

    def _dry_init_rng(self):
        """`_get_init_rng()` drawn without changing any generator's state."""
        count = self._init_seed_count
        try:
            with keras.StatelessScope():
                return self._get_init_rng()
        finally:
            self._init_seed_count = count
