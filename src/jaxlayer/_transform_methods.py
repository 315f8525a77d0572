"""The weight-transform methods of `JaxLayer`: `enable_lora`, `quantize`.

A mixin of `JaxLayer` (on its own instances only), so that the layer's
module keeps its weights, calls and saving, and this one the public face
of `jaxlayer._transforms` (what a transform is and how it is computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from jaxlayer import _contract as K
from jaxlayer import _transforms as T
from jaxlayer import saving


class TransformMethods:
    """`enable_lora`, `quantize` and what they need of the layer (a mixin
    of `JaxLayer`; it reads the layer's own trees)."""

    def enable_lora(
        self,
        rank: int,
        lora_alpha: float | None = None,
        a_initializer: Any = "he_uniform",
        b_initializer: Any = "zeros",
        paths: str | Sequence[str] | None = None,
    ) -> None:
        """Adds LoRA factors to `params` leaves and freezes those leaves.

        Each target `W` of shape `(..., n)` gets two trainable float
        variables named after it, `.../kernel_lora_a` of shape
        `(prod(...), rank)` and `.../kernel_lora_b` of `(rank, n)`; `W`
        becomes non-trainable and `call_fn` receives
        `W + (A @ B).reshape(W.shape) * (lora_alpha / rank)`, computed
        inside the layer's JAX function. `B` starts at zero, so the outputs
        are unchanged until training moves it. Other weights keep their
        trainable flag. On an int8 layer (`quantize("int8")` first), the
        int8 leaves are targets too (QLoRA).

        Args:
            rank: the factors' inner dimension, a positive integer.
            lora_alpha: the scale numerator; None means `rank` (scale 1).
            a_initializer: Keras initializer of `A`.
            b_initializer: Keras initializer of `B`.
            paths: a regex or a list of them, matched with `re.search`
                against each weight's `path` (`"layer/dense/kernel"`);
                None targets every trainable floating leaf of two or more
                dimensions.

        Raises:
            ValueError: the layer is not built, LoRA is already enabled,
                `rank` is not a positive integer, or `paths` match no
                eligible leaf (the message lists the eligible paths).

        Examples:

            >>> import numpy as np
            >>> from jaxlayer import JaxLayer
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  params={"w": np.ones((4, 2), "float32")},
            ...                  name="lin")
            >>> layer.enable_lora(2)
            >>> [(w.path, w.trainable) for w in layer.weights]
            [('lin/w', False), ('lin/w_lora_a', True), ('lin/w_lora_b', True)]
        """
        owner = self._owner
        self._check_transformable("enable_lora")
        if self.lora_enabled:
            raise ValueError(
                f"{owner}: LoRA is already enabled; `enable_lora` can be "
                "called once per layer."
            )
        rank = T.check_rank(owner, rank)
        # `alpha = rank` (scale 1) by default, as Keras's own layers do.
        alpha = float(rank if lora_alpha is None else lora_alpha)
        targets = T.select(
            owner, self._params_spec, self._state_spec, "lora", paths, "enable_lora"
        )
        step = T.Step("lora", targets, rank=rank, alpha=alpha)
        self._apply_step(step, (a_initializer, b_initializer))

    @property
    def lora_enabled(self) -> bool:
        """Whether `enable_lora` was called (as Keras's layers say)."""
        return any(step.mode == "lora" for step in self._weight_steps())

    def quantize(self, mode=None, type_check=True, config=None, paths=None):
        """Stores `params` leaves as int8, with a float scale per output
        channel; called by `model.quantize("int8")`.

        The targets (the trainable floating `params` leaves with two or
        more dimensions, or those whose path matches `paths`, as in
        `enable_lora`) are replaced by non-trainable int8 variables of the
        same path and a scale `.../kernel_scale` (abs-max over every axis
        but the last, / 127); `call_fn` receives `int8 * scale`, computed
        inside the layer's JAX function. Weights only: activations stay in
        the compute dtype. The dtype policy becomes `int8_from_<policy>`.

        Args:
            mode: `"int8"`; Keras's other modes raise `NotImplementedError`.
            type_check: refuse subclasses that override `call` (as Keras's
                layers refuse subclasses).
            config: a `keras.quantizers.Int8QuantizationConfig`, whose
                weight quantizer, if set, must be an `AbsMaxQuantizer`.
            paths: a regex or a list of them (see `enable_lora`).

        Raises:
            NotImplementedError: a mode other than `"int8"`, or a subclass
                that overrides `call` with `type_check`.
            ValueError: the layer is not built or already quantized, LoRA
                is enabled (quantize first, then `enable_lora`), or `paths`
                match no eligible leaf.

        Examples:

            >>> import numpy as np
            >>> from jaxlayer import JaxLayer
            >>> layer = JaxLayer(lambda params, inputs: inputs @ params["w"],
            ...                  params={"w": np.ones((4, 2), "float32")},
            ...                  name="lin")
            >>> layer.quantize("int8")
            >>> [(w.path, w.dtype) for w in layer.weights]
            [('lin/w', 'int8'), ('lin/w_scale', 'float32')]
            >>> layer.dtype_policy.name
            'int8_from_float32'
        """
        owner = self._owner
        if mode != "int8":
            raise NotImplementedError(
                f"{owner}: quantization mode {mode!r} is not implemented by "
                "jaxlayer; only 'int8' is (weights stored as int8 with a "
                "per-channel scale)."
            )
        # A subclass's `call` may read `params` outside `call_fn`, where it would
        # see the raw int8 values.
        if type_check and type(self).call.__qualname__ != "JaxLayer.call":
            raise NotImplementedError(
                f"{owner}: {type(self).__name__} overrides `call`, so "
                "`quantize` cannot tell what its weights feed; pass "
                "`type_check=False` to quantize its `params` anyway."
            )
        quantizer = getattr(config, "weight_quantizer", None)
        if quantizer is not None and not isinstance(
            quantizer, keras.quantizers.AbsMaxQuantizer
        ):
            raise ValueError(
                f"{owner}: `quantize` stores int8 weights with an abs-max "
                f"scale; the config's weight quantizer {quantizer!r} is not "
                "supported. Pass `config=None` or an `AbsMaxQuantizer`."
            )
        self._check_transformable("quantize")
        steps = self._weight_steps()
        if any(step.mode == "int8" for step in steps):
            raise ValueError(f"{owner} is already quantized (int8).")
        if any(step.mode == "lora" for step in steps):
            raise ValueError(
                f"{owner}: LoRA is enabled, so its kernels cannot be "
                "quantized under their factors; call `quantize` first and "
                "`enable_lora` after it (QLoRA)."
            )
        targets = T.select(
            owner, self._params_spec, self._state_spec, "int8", paths, "quantize"
        )
        self._apply_step(T.Step("int8", targets))
        policy = self.dtype_policy
        # Only from a float policy: one already quantized (carried by the
        # config of a layer being rebuilt) is kept as it is.
        if policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(f"int8_from_{policy.name}")

    def quantized_call(self, *args, **kwargs):
        # The dequantization is inside the layer's JAX function.
        return self.call(*args, **kwargs)

    def _check_transformable(self, what):
        if not self.built or (self._params_spec is None and self.call_fn_has_params):
            raise ValueError(
                f"{self._owner} is not built: call it once (or `build` it) "
                f"before `{what}`."
            )
        if saving.rebuilt(self):
            raise ValueError(
                f"{self._owner} runs the computation saved in a `.keras` "
                f"file, which `{what}` cannot change; load the model with "
                "its Python code (registered functions or module) to "
                "transform its weights."
            )

    def _weight_steps(self) -> tuple:
        return T.steps_of(self._params_spec) or self._inherited_steps

    def _apply_step(self, step, initializers=("he_uniform", "zeros")):
        # Keras locks a built layer's variables; these are made after it.
        tracker = getattr(self, "_tracker", None)
        locked = bool(getattr(tracker, "locked", False))
        if locked:
            tracker.unlock()
        try:
            spec = T.apply(
                self, self._params_spec, self._state_spec, step, initializers
            )
        finally:
            if locked:
                tracker.lock()
        self._set_trees(spec, self._state_spec)
        # (The last export's cache holds the old trees and their variables.)
        self._set_untracked("_export_memo", saving.ExportMemo())
        if step.mode == "int8":
            self._set_untracked("_is_quantized", True)

    def _replay(self):
        """Applies the transforms a config recorded (see `__init__`)."""
        steps, owner = self._replay_steps, self._owner
        self._set_untracked("_replay_steps", ())
        for step in steps:
            eligible = T.eligible(self._params_spec, self._state_spec, step.mode)
            missing = [t for t in step.targets if t not in eligible]
            if missing:
                raise ValueError(
                    f"{owner}: the config's `weight_transforms` ({step.mode}) "
                    f"name {missing}, which the layer's weights do not have "
                    f"(eligible: {eligible}); the config was saved from "
                    "another model."
                )
            self._apply_step(step)

    def _inherit_steps(self, steps, manifest):
        """A layer rebuilt from artifacts that apply `steps` themselves."""
        self._set_untracked("_inherited_steps", tuple(steps))
        entries = [e for e in manifest.get("variables", []) if e["tree"] == "params"]
        for variable, entry in zip(
            K.variables(self._params_spec), entries, strict=True
        ):
            # Rebuilt variables are made trainable; the saved flags say which the
            # transforms froze (a LoRA base, int8 leaves).
            variable.trainable = bool(entry.get("trainable", True))
        if any(step.mode == "int8" for step in steps):
            self._set_untracked("_is_quantized", True)

    def _effective_params(self):
        """`params` as `call_fn` receives them, as NumPy arrays (LoRA merged,
        int8 dequantized): what a module made from the layer holds."""
        return T.effective_tree(self._params_spec)

    def save_own_variables(self, store):
        # A transformed layer stores its `params` in the order its JAX
        # function takes them, so that a layer rebuilt from the artifacts
        # (whose variables were made in that order) reads the same file.
        if not self._weight_steps():
            return super().save_own_variables(store)
        for i, variable in enumerate(
            T.ordered_weights(self._params_spec, self.weights)
        ):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self._weight_steps():
            return super().load_own_variables(store)
        weights = T.ordered_weights(self._params_spec, self.weights)
        # Checked before any assignment: a mismatched file leaves the layer as
        # it was.
        if len(store.keys()) != len(weights):
            raise ValueError(
                f"{self._owner}: the file holds {len(store.keys())} weights "
                f"for this layer, which has {len(weights)} (with its weight "
                "transforms); it was saved from another model."
            )
        for i, variable in enumerate(weights):
            variable.assign(store[str(i)])
