"""Serialized `jax.export` artifacts held in memory, checked before use.

A `.keras` file's artifacts are read from its assets folder
(`ExportedCall.load`); a program that carries one as data (a `torch.export`
program's tensor constant) hands over the bytes themselves. Both go through
`jaxlayer._artifact_check` in the same order before JAX deserializes
anything: the size cap, the sha256 the bytes are named by, the flatbuffer's
layout (`check_layout`), the verifying
child process (its reports cached by that hash), the policy, the
artifact's own types against what the caller will pass, then
`jax.export.deserialize`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import jax.export

from jaxlayer import _artifact_check as check
from jaxlayer.saving._manifest import first_line


def deserialize_checked(
    blob: bytes, sha256: str, where: str, inputs: list[tuple] | None = None
) -> jax.export.Exported:
    """The `jax.export.Exported` serialized in `blob`, once proven safe.

    Args:
        blob: the serialized artifact.
        sha256: the hex sha256 it is known by (the caller's key for it).
        where: how messages name it (the layer or program, the operator).
        inputs: what the caller will pass, `(shape, dtype name)` per array,
            None for a dimension that may be anything; None: not checked.

    Returns:
        The deserialized artifact.

    Raises:
        jaxlayer._artifact_check.Refused: a check failed (the message names
            which); nothing was deserialized in this process.
        ValueError: the bytes are not an artifact JAX can read.
    """
    size = len(blob)
    cap = check.max_artifact_bytes()
    if size > cap:
        raise check.Refused(
            f"{where} is {size} bytes, more than the {cap} bytes "
            f"({cap / 2**20:g} MiB) a loaded computation may have (the weights "
            "are never part of it); refused. If the file is trusted, set "
            "JAXLAYER_MAX_ARTIFACT_MIB higher."
        )
    # One immutable copy: the bytes hashed, the file the child reads and the
    # bytes deserialized are the same, whatever the caller's buffer does.
    data = bytes(blob)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise check.Refused(
            f"{where} is damaged or was changed after it was written: its "
            f"{size} bytes do not have the sha256 {sha256} it is named by; "
            "refused. Export the model again from its source."
        )
    # The verifier reads files; a private folder (mode 0700) that no other
    # user can swap the file in.
    with tempfile.TemporaryDirectory(prefix="jaxlayer-artifact-") as folder:
        path = os.path.join(folder, "artifact.bin")
        with open(path, "wb") as f:
            f.write(data)
        check.check_layout(path, size, where)
        # One deadline for reading and checking it, as for a `.keras` file's.
        with check.Budget(check.timeout_s()) as budget:
            report = check.reports(
                {"artifact": (path, sha256)}, {"artifact": where}, budget
            )["artifact"]
    check.check(report, where, size)
    platform = jax.export.default_export_platform()
    # Results unchecked: a program's caller knows what it passes, not what
    # comes back.
    expected = {"platform": platform, "in": inputs, "out": None}
    check.check_signature(report, where, expected)
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{where} cannot be read: {first_line(err)}.") from err
