"""The saving facet of `JaxLayer`: its config, its assets, `from_config`.

A mixin of `JaxLayer` only (it uses the layer's own attributes). What saving
needs goes to `jaxlayer.saving` as values: an `ExportSource`, the trees'
descriptions, the functions; the config logic itself lives there
(`saving._layer_config`). A layer rebuilt from a file comes back through
the class's `_from_exported` hook.
"""

from __future__ import annotations

from jaxlayer import _config as C
from jaxlayer import _transforms as T
from jaxlayer import _variables as V
from jaxlayer import saving


class SavingMethods:
    """`get_config`, `from_config` and the asset hooks of `JaxLayer`."""

    def get_config(self):
        """The layer's config; saving also exports its computation.

        Besides the functions (by registered name), the seed and the
        platforms, the config describes the `params` and `state` trees and
        holds the manifest of the computation exported with `jax.export`,
        whose artifacts `save_assets` writes next to it in a `.keras` file
        (see `jaxlayer.saving`).

        Returns:
            A JSON-serializable dict.

        Raises:
            ValueError: a `params`/`state` tree the config cannot describe (a
                custom pytree node), when the computation could not be
                exported and no `init_fn` can rebuild the tree.
        """
        base = super().get_config()
        base["name"] = C.LayerName.of(self)
        return saving.layer_config(
            base,
            self._export_source(),
            init_fn=self.init_fn,
            seed=self.seed,
            trees=self._tree_configs(),
            init_on_build=self._init_on_build,
            steps=self._weight_steps(),
        )

    def _export_source(self) -> saving.ExportSource:
        """What exporting takes from the layer (`saving.ExportSource`)."""
        computation = self._computation
        return saving.ExportSource(
            owner=self._owner,
            layer_class=type(self).__name__,
            call_fn=self.call_fn,
            call_fn_arguments=tuple(self.call_fn_arguments),
            built=self.built,
            record=computation.record,
            trees=(T.export_view(self._params_spec), self._state_spec),
            dtype_policy=self.dtype_policy.name,
            native_serialization_platforms=self.native_serialization_platforms,
            trainable=frozenset(id(v) for v in self.trainable_variables),
            abstract_trees=lambda: (*computation.variable_structs(), None),
            call_rng=self._call_rng,
            pure_fn=computation.get,
            compute_output_spec=self.compute_output_spec,
            memo=self._export_memo,
        )

    def _tree_configs(self) -> dict:
        """The config's descriptions of the trees (`saving.tree_configs`)."""
        return saving.tree_configs(T.described(self._params_spec), self._state_spec)

    @classmethod
    def from_config(cls, config):
        """Rebuilds the layer from `get_config`'s dict.

        With its Python functions where Keras can locate them (registered
        with `keras.saving.register_keras_serializable`, or passed in
        `custom_objects`); otherwise from the computation exported in the
        `.keras` file (read by `load_assets`), with one warning line.

        Args:
            config: the dict `get_config` returned.

        Returns:
            The layer, unbuilt or built from placeholders that the weights
            file then fills.

        Raises:
            ValueError: `call_fn` (or a needed `init_fn`) cannot be located
                and the config holds no exported computation (a file of
                jaxlayer 0.1.0); the message says where the function was
                defined and how to register it.
        """
        config = dict(config)
        source = C.LayerName.source(config, cls)
        if source is None:
            return saving.layer_from_config(cls, config)
        if saving.rebuilt(source):
            return saving.copy_of_rebuilt(cls, config, source)
        # A copy of a live layer of this class (`clone_model`), made from its
        # config object: its very functions, and the values of weights that
        # were given rather than made by `init_fn` (`source` is of this very
        # class: its private hook is this class's).
        return saving.layer_from_config(
            cls,
            config,
            live_fns=(source.call_fn, source.init_fn),
            given=source._given_values(config),
        )

    def _given_values(self, config) -> tuple | None:
        """Copies of this layer's `(params, state)` for a layer made from `config`.

        Only for weights that were given (not made by `init_fn`) and that the
        config describes as this layer has them; None otherwise.
        """
        if config.get("init_on_build") or not self.built:
            return None
        if self._params_spec is None and self._state_spec is None:
            return None
        trees = self._tree_configs()
        if (trees["params"], trees["state"]) != (
            config.get("params_spec"),
            config.get("state_spec"),
        ):
            return None
        return self._effective_params(), V.numpy_tree(self.state)

    def save_assets(self, dir_path: str) -> None:
        """Writes the exported computation to the layer's asset folder.

        Called by Keras when saving a `.keras` file, after `get_config` (which
        made the artifacts and put their manifest in the config).
        """
        saving.save_assets(self.call_fn, self._export_memo, dir_path)

    def load_assets(self, dir_path: str | None) -> None:
        """Reads and checks the exported computation of a layer rebuilt
        without its Python code (does nothing for a layer that has it)."""
        if saving.load_assets(self.call_fn, dir_path):
            self._reset_pure_fns()
