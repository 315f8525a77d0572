"""Keras's asset hooks: the artifacts and the manifest in the `.keras` file."""

from __future__ import annotations

import json
import os

from jaxlayer.saving._export import ExportMemo
from jaxlayer.saving._exported_call import ExportedCall

MANIFEST_FILE = "manifest.json"


def save_assets(fn, memo: ExportMemo, dirpath: str) -> None:
    """Writes the artifacts made for a layer's config to `dirpath`.

    Args:
        fn: the layer's `call_fn`.
        memo: the layer's `ExportMemo` (what `get_config` exported).
        dirpath: the layer's asset folder.
    """
    if isinstance(fn, ExportedCall) and fn.loaded:
        artifacts = fn.artifacts()
    else:
        # Keras asks for the config before the assets: the memo holds the
        # export whose manifest that config holds.
        cached = memo.cache
        artifacts = cached[1] if cached is not None else None
    if artifacts is None:
        return
    for name, blob in artifacts.blobs.items():
        with open(os.path.join(dirpath, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(dirpath, MANIFEST_FILE), "w") as f:
        json.dump(artifacts.manifest, f, indent=1)


def load_assets(fn, dirpath: str | None) -> bool:
    """Reads and checks the artifacts of a layer rebuilt from them.

    Args:
        fn: the layer's `call_fn`.
        dirpath: the layer's asset folder (None when the file has none).

    Returns:
        Whether `fn` changed (it read its artifacts): the layer's pure
        functions, made before, must go.
    """
    # A copy that shares a loaded computation (`copy_of_rebuilt`) is not
    # read again.
    if not isinstance(fn, ExportedCall) or fn.loaded:
        return False
    fn.load(dirpath)
    return True
