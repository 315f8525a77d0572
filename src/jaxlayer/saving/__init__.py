"""Portable saving: a layer's computation, exported, inside its `.keras` file.

When a model is saved as `.keras`, every jaxlayer layer also stores its
pure function `fn(params, inputs, state, rng) -> (outputs, new_state)` (the
bridges' seam, on flat lists) as serialized `jax.export` artifacts:
StableHLO bytes, data and not pickles, one for `training=False` and one for
`training=True`, for the input structure the layer was first called with,
with a symbolic batch dimension (and every other dimension that was None
symbolic too), for the layer's `native_serialization_platforms` (CPU and
CUDA by default), with the VJP (`vjp_order=1`) so that gradients work after
reloading. The weights are arguments of the function, never constants in
it: they stay in the weights file.

Where the artifacts go: the layer's config (`config.json`) holds a
manifest (format version, jaxlayer version, platforms, the `call_fn`
argument names, the input, output and rng structures, the variables and
the sha256 of each artifact); Keras's per-layer asset hooks
(`Layer.save_assets`/`load_assets`) write the artifacts and a copy of the
manifest to the layer's folder of the archive's `assets/`.

Loading: Keras calls `from_config` first, then builds the model (calling
each layer on `KerasTensor`s), then loads the weights, then the assets.
When the layer's Python functions can be located (registered, or in
`custom_objects`), they are used and the artifacts are not read. Otherwise
`from_config` makes the layer with an `ExportedCall` as its `call_fn`: a
function with the original argument names that, once `load_assets` has read
and checked the artifacts, flattens its arguments and calls the deserialized
`Exported` for the right training flag. Until then it can only answer the
symbolic build, with outputs of the saved shapes. Nothing from the file is
ever run as Python.

The package, one idea per module, data flowing one way (each imports only
those above it):

- `_manifest`: the format's constants (`FORMAT`, `KINDS`, the default
  platforms), the shape and dtype descriptions, the input record a manifest
  describes.
- `_blob`: an artifact held as bytes (a `torch.export` program's constant),
  checked as `ExportedCall.load` checks files, then deserialized.
- `_exported_call`: `ExportedCall`, the `call_fn` rebuilt from artifacts.
- `_export`: exporting a layer's pure function with `jax.export` into
  `Artifacts`, from what the layer hands over (`ExportSource`).
- `_assets`: Keras's asset hooks, writing and reading the artifacts.
- `_rebuild`: a layer rebuilt from its config and artifacts, through the
  class's `_from_exported` hook.
- `_layer_config`: the layer's config, written (`layer_config`) and read
  (`layer_from_config`: the Python functions, else `_rebuild`).

Nothing here imports `jaxlayer.layer`: the layer imports saving.
"""

from jaxlayer.saving._assets import MANIFEST_FILE as MANIFEST_FILE
from jaxlayer.saving._assets import load_assets as load_assets
from jaxlayer.saving._assets import save_assets as save_assets
from jaxlayer.saving._export import ExportMemo as ExportMemo
from jaxlayer.saving._export import ExportSource as ExportSource
from jaxlayer.saving._export import artifacts_for_save as artifacts_for_save
from jaxlayer.saving._export import export_failure as export_failure
from jaxlayer.saving._exported_call import ExportedCall as ExportedCall
from jaxlayer.saving._layer_config import layer_config as layer_config
from jaxlayer.saving._layer_config import layer_from_config as layer_from_config
from jaxlayer.saving._layer_config import tree_configs as tree_configs
from jaxlayer.saving._manifest import DEFAULT_PLATFORMS as DEFAULT_PLATFORMS
from jaxlayer.saving._manifest import FORMAT as FORMAT
from jaxlayer.saving._manifest import KINDS as KINDS
from jaxlayer.saving._manifest import Artifacts as Artifacts
from jaxlayer.saving._rebuild import copy_of_rebuilt as copy_of_rebuilt
from jaxlayer.saving._rebuild import from_artifacts as from_artifacts
from jaxlayer.saving._rebuild import pending as pending
from jaxlayer.saving._rebuild import placeholders as placeholders
from jaxlayer.saving._rebuild import rebuilt as rebuilt
from jaxlayer.saving._rebuild import say as say
from jaxlayer.saving._rebuild import warn_rebuilt as warn_rebuilt
