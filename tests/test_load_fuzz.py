"""Load safety under fuzzing: mutated `.keras` files end in a clean refusal
or a correct prediction, within a wall-clock and a memory limit.

Each case is a seeded mutation of a file the current code saved, of one of
four kinds (`KINDS`): the serialized artifact's raw bytes, its StableHLO
text (edited, parsed and serialized again), the flatbuffer's offsets and
lengths, and the zip's entries (the manifests, the members). The manifests'
byte counts and sha256 are recomputed, as an attacker would, except where
the mutation is that they lie.

Cases are loaded by runner processes (`RUNNER`: `import jaxlayer;
keras.saving.load_model(path); model.predict(x)`, one case after another,
each reported on its own line). A runner does not parse a case's bytes
before the verifying child has (a fresh child after any artifact that
failed to parse), so one runner serves many cases; a runner that crashes,
runs past a case's wall-clock limit (`CASE_LIMIT_S`) or past its memory
limit (`MEMORY_LIMIT`, an address-space limit) fails that case, and a
fresh runner takes the rest (a runner loads `PER_RUNNER` cases at most).

The default run loads the regression seeds (those that found bugs) and
`JAXLAYER_FUZZ_CASES` (default 16) further seeds, on every backend;
`JAXLAYER_FUZZ_CASES=500` runs the full campaign (docs/saving.md gives its
last result).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import zipfile

import jax
import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_load_safety import (  # noqa: E402
    artifact_name,
    call_fn,
    fix_manifests,
    init_fn,
    members,
    saved,
    x_data,
)

BACKEND = keras.backend.backend()
KINDS = ("bytes", "text", "offsets", "zip")
# Seeds that found bugs, loaded on every backend: in the first full
# campaign (500 seeds), a manifest of another structure (`platforms=-1`,
# `functions='x'` or `[]`, `inputs=None`, `variables={...}`, `file=None`)
# ended in a `TypeError` or `AttributeError` from inside the loader that
# named neither the layer nor the file.
REGRESSION_SEEDS: tuple[int, ...] = (119, 147, 195, 211, 295, 419)
CASES = int(os.environ.get("JAXLAYER_FUZZ_CASES", "16"))
# Past the loader's own 30 s, the time a runner needs to report.
CASE_LIMIT_S = 45.0
MEMORY_LIMIT = 8 * 2**30
# Cases per runner: a TensorFlow process that has loaded some 170 models
# stops within its memory limit (each load keeps graphs and executables).
PER_RUNNER = 50


# -- the mutations ---------------------------------------------------------------


def _flip_bytes(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(blob)
    spots = []
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        at = rng.randrange(len(data))
        how = rng.randrange(3)
        if how == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif how == 1:
            data[at] = rng.randrange(256)
        else:
            data[at] = rng.choice([0, 0xFF, 0x7F, 0x80])
        spots.append(at)
    return bytes(data), f"bytes at {spots}"


_NUMBERS = (0, 1, 2, 3, 7, 255, 65535, 2**31 - 1, 2**32, 10**12, 2**62)
_OPS = (
    "add",
    "multiply",
    "tanh",
    "exponential",
    "negate",
    "reshape",
    "broadcast_in_dim",
    "dot_general",
    "while",
    "transpose",
    "concatenate",
    "slice",
    "iota",
    "reduce",
    "sort",
    "rng_bit_generator",
    "get_dimension_size",
)


def _mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    how = rng.randrange(6)
    if how == 0:  # a number
        spots = [m.span() for m in re.finditer(r"(?<![\w%#.])\d+(?![\w.])", text)]
        a, b = rng.choice(spots)
        new = str(rng.choice(_NUMBERS + (rng.randrange(100),)))
        return text[:a] + new + text[b:], f"number {text[a:b]}->{new}"
    if how == 1:  # a tensor dimension
        spots = [m.span(1) for m in re.finditer(r"tensor<(?:[\d?]+x)*?(\d+)x", text)]
        a, b = rng.choice(spots)
        new = str(rng.choice(_NUMBERS))
        return text[:a] + new + text[b:], f"dimension {text[a:b]}->{new}"
    if how == 2:  # an operation
        spots = [m.span(1) for m in re.finditer(r"stablehlo\.(\w+)", text)]
        a, b = rng.choice(spots)
        new = rng.choice(_OPS)
        return text[:a] + new + text[b:], f"op {text[a:b]}->{new}"
    lines = text.split("\n")
    body = [i for i, line in enumerate(lines) if line.startswith("    ")]
    at = rng.choice(body)
    if how == 3:
        del lines[at]
        return "\n".join(lines), f"line {at} deleted"
    if how == 4:
        lines.insert(rng.choice(body), lines[at])
        return "\n".join(lines), f"line {at} copied"
    old = rng.choice(["f32", "i32", "i1"])
    new = rng.choice(["f64", "f16", "i32", "i64", "i1", "ui8", "f32"])
    return text.replace(old, new, 1), f"type {old}->{new}"


def _edit_text(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    from jax._src.export import _export
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    exp = jax.export.deserialize(bytearray(blob))
    order = 1 if exp.has_vjp() else 0
    text = exp.mlir_module()
    for _ in range(30):
        new, what = _mutate_text(text, rng)
        try:
            with mlir.make_ir_context():
                module = ir.Module.parse(new)
                module_bytes = _export._module_to_bytecode(module)
            break
        except Exception:  # noqa: BLE001 - an edit that does not parse: another
            continue
    else:
        # Text that does not parse, as the module's bytes.
        module_bytes, what = new.encode(), f"unparsable text ({what})"
    edited = dataclasses.replace(exp, mlir_module_serialized=module_bytes)
    return bytes(edited.serialize(vjp_order=order)), f"text: {what}"


def _edit_offsets(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Offsets and lengths: words whose value could be one (smaller than the
    buffer), set to another value."""
    data = bytearray(blob)
    size = len(data)
    words = [
        p
        for p in range(0, size - 4, 4)
        if 0 < int.from_bytes(data[p : p + 4], "little") < size
    ]
    shorts = [
        p
        for p in range(0, size - 2, 2)
        if 0 < int.from_bytes(data[p : p + 2], "little") < 256
    ]
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        if rng.random() < 0.7:
            at = rng.choice(words)
            old = int.from_bytes(data[at : at + 4], "little")
            new = rng.choice(
                [
                    old + 4,
                    max(old - 4, 0),
                    0,
                    size,
                    size - 4,
                    old * 2,
                    0x7FFFFFFF,
                    0xFFFFFFFF,
                    0x10000000,
                    rng.randrange(size),
                    at,
                ]
            )
            data[at : at + 4] = (new % 2**32).to_bytes(4, "little")
        else:
            at = rng.choice(shorts)
            old = int.from_bytes(data[at : at + 2], "little")
            new = rng.choice([0, old + 2, old + 4, 0xFFFF, 0x7FFF, rng.randrange(512)])
            data[at : at + 2] = (new % 2**16).to_bytes(2, "little")
        done.append((at, old, new))
    return bytes(data), f"offsets {done}"


def _zip_case(files: dict, rng: random.Random) -> tuple[bytes, str]:
    """A mutation of the archive: its members, or the manifests' claims."""
    how = rng.randrange(12)
    names = list(files)
    art = [n for n in names if n.endswith(".jaxexport")]
    if how == 0:
        drop = rng.choice(names)
        del files[drop]
        return _zip(files), f"zip: {drop} dropped"
    if how == 1:
        a, b = art
        files[a], files[b] = files[b], files[a]
        fix_manifests(files)
        return _zip(files), "zip: the artifacts swapped"
    if how == 2:
        data = _zip(files)
        cut = rng.randrange(len(data))
        return data[:cut], f"zip: truncated at {cut}"
    if how == 3:
        data = bytearray(_zip(files))
        for _ in range(rng.choice([1, 4, 16])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "zip: archive bytes flipped"
    if how == 4:
        value = rng.choice([0, 1, -1, 8, 2**31, 2**40, "8488", None, 1.5])
        field = rng.choice(["bytes", "sha256", "file", "vjp_order", "platforms"])

        def lie(manifest):
            entry = rng.choice(list(manifest["functions"].values()))
            entry[field] = value

        fix_manifests(files, lie)
        return _zip(files), f"zip: manifest {field}={value!r}"
    if how == 5:
        target = rng.choice(
            ["../../config.json", "/etc/passwd", "manifest.json", "", ".", "x/.."]
        )

        def rename(manifest):
            entry = rng.choice(list(manifest["functions"].values()))
            entry["file"] = target

        fix_manifests(files, rename)
        return _zip(files), f"zip: file name {target!r}"
    if how == 6:
        mib = rng.choice([1, 8, 64, 200])
        name = rng.choice(art)
        files[name] = files[name] + bytes(mib * 2**20)
        fix_manifests(files)
        return _zip(files), f"zip: {name} padded by {mib} MiB"
    if how == 7:
        name = rng.choice(art)
        files[name] = rng.randbytes(len(files[name]))
        fix_manifests(files)
        return _zip(files), f"zip: {name} random bytes"
    if how == 8:
        name = rng.choice(names)
        data = _zip(files)
        buffer = io.BytesIO(data)
        with zipfile.ZipFile(buffer, "a") as z, _quiet():
            z.writestr(name, rng.randbytes(rng.choice([0, 10, 5000])))
        return buffer.getvalue(), f"zip: a second {name}"
    if how == 9:
        key = rng.choice(["format", "functions", "variables", "inputs", "platforms"])
        value = rng.choice([None, [], {}, "x", 2, {"inference": 1}])

        def damage(manifest):
            manifest[key] = value

        fix_manifests(files, damage)
        return _zip(files), f"zip: manifest {key}={value!r}"
    if how == 10:
        name = rng.choice(art)
        files[name] = files[name][: rng.randrange(len(files[name]))]
        fix_manifests(files)
        return _zip(files), f"zip: {name} truncated"
    # A member of the assets folder that is a folder, or a huge sparse one.
    name = rng.choice(art)
    files[name + "/"] = b""
    return _zip(files), f"zip: a folder beside {name}"


class _quiet:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _zip(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def case(source: dict, seed: int) -> tuple[bytes, str, str]:
    """The `.keras` file of one seed: `(bytes, kind, what was changed)`."""
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    files = dict(source)
    if kind == "zip":
        data, what = _zip_case(files, rng)
        return data, kind, what
    name = artifact_name(files, rng.choice(["inference", "training"]))
    mutate = {"bytes": _flip_bytes, "text": _edit_text, "offsets": _edit_offsets}
    files[name], what = mutate[kind](files[name], rng)
    fix_manifests(files)
    return _zip(files), kind, f"{name.rsplit('/', 1)[1]}: {what}"


# -- running the cases -----------------------------------------------------------

RUNNER = """
import json, os, resource, sys, time, traceback, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]),) * 2)
import keras
import numpy as np
import jaxlayer

x = np.load(sys.argv[1])
for name, path in json.loads(sys.argv[2]):
    print("START " + name, flush=True)
    start = time.monotonic()
    try:
        model = keras.saving.load_model(path, safe_mode=True)
        y = np.asarray(model.predict(x, verbose=0))
        out = {"ok": True, "y": y.tolist()}
    except Exception as err:
        out = {"ok": False, "type": type(err).__name__, "message": str(err)[:2000]}
        # Whether jaxlayer's code raised it (or what Keras raised from it).
        frames, seen = [], err
        while seen is not None:
            frames += traceback.extract_tb(seen.__traceback__)
            seen = seen.__cause__ or seen.__context__
        out["ours"] = any("jaxlayer" in f.filename for f in frames)
    out["s"] = time.monotonic() - start
    print("RESULT " + json.dumps([name, out]), flush=True)
"""


# The runners load with jaxlayer's default deadlines (the suite's own,
# longer ones are for legitimate files on a busy machine: tests/conftest.py).
_SUITE_ONLY = ("JAXLAYER_LOAD_TIMEOUT", "JAXLAYER_PARSE_TIMEOUT")


def run_cases(paths: dict, x, folder: str, env: dict | None = None) -> dict:
    """Loads each case; name -> its outcome (`ok`, or a refusal's `type` and
    `message`, or `failure`: what went wrong with the runner)."""
    np.save(os.path.join(folder, "x.npy"), x)
    todo = list(paths.items())
    got: dict = {}
    while todo:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RUNNER,
                os.path.join(folder, "x.npy"),
                json.dumps(todo[:PER_RUNNER]),
                str(MEMORY_LIMIT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={
                **{k: v for k, v in os.environ.items() if k not in _SUITE_ONLY},
                **(env or {}),
            },
            cwd=folder,
            start_new_session=True,
        )
        current, since, buffer = None, time.monotonic(), b""
        failure = None
        while True:
            limit = CASE_LIMIT_S if current else CASE_LIMIT_S + 60  # imports
            left = since + limit - time.monotonic()
            if left <= 0:
                failure = f"still running after {limit:g} s"
                break
            if not select.select([proc.stdout], [], [], left)[0]:
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                code = proc.wait()
                failure = f"the runner exited with {code}" if current else None
                break
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                text = line.decode("utf-8", "replace")
                if text.startswith("START "):
                    current, since = text[6:], time.monotonic()
                elif text.startswith("RESULT "):
                    name, out = json.loads(text[7:])
                    got[name] = out
                    current, since = None, time.monotonic()
                    todo = [(n, p) for n, p in todo if n != name]
        # The runner's whole group: its verifying child too.
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if current is not None and current not in got:
            got[current] = {"ok": False, "failure": failure or "no result"}
            todo = [(n, p) for n, p in todo if n != current]
        elif failure is not None and current is None:
            # The runner failed between cases (its start): give up on the rest.
            for name, _ in todo:
                got[name] = {"ok": False, "failure": failure}
            todo = []
    return got


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        return kind is not None and issubclass(kind, ProcessLookupError)


# -- the tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    base = str(folder / "base.keras")
    model = saved(base, call_fn, init_fn)
    x = x_data()
    return {
        "files": members(base),
        "x": x,
        "y": np.asarray(model.predict(x, verbose=0)),
        "folder": folder,
    }


def check_outcomes(got: dict, kinds: dict, y) -> dict:
    """Asserts each case ended in a clean refusal or a prediction of the
    saved shapes; the counts by kind and outcome."""
    counts: dict = {}
    for name, out in got.items():
        kind = kinds[name]
        assert "failure" not in out, (name, kind, out)
        assert out["s"] < CASE_LIMIT_S, (name, kind, out)
        if out["ok"]:
            # A mutation may change what the program computes (a constant, an
            # operation): what matters is that it runs as the program it is.
            pred = np.asarray(out["y"], dtype="float32")
            assert pred.shape == y.shape, (name, kind, out)
            same = np.allclose(pred, y, rtol=1e-5, atol=1e-5, equal_nan=True)
            outcome = "predicted (same)" if same else "predicted (other program)"
        else:
            message = out["message"]
            if out["ours"]:
                # Whatever jaxlayer raises on a file is a ValueError naming the layer
                # (Keras's and zipfile's own errors on a broken archive are theirs).
                assert out["type"] == "ValueError", (name, kind, out)
                assert "JaxLayer 'net'" in message, (name, kind, out)
            if kind != "zip":
                # Bytes of an artifact: always jaxlayer's refusal, naming the
                # layer and the artifact.
                assert out["type"] == "ValueError", (name, kind, out)
                assert "JaxLayer 'net'" in message, (name, kind, out)
                assert ".jaxexport" in message, (name, kind, out)
            outcome = f"refused ({out['type']})"
        counts.setdefault(kind, {}).setdefault(outcome, 0)
        counts[kind][outcome] += 1
    return counts


def test_mutated_files_are_refused_or_predict(source, tmp_path):
    """The regression seeds and `JAXLAYER_FUZZ_CASES` more: each ends in a
    refusal or a prediction, within the time and memory limits."""
    seeds = list(REGRESSION_SEEDS) + [
        s for s in range(CASES) if s not in REGRESSION_SEEDS
    ]
    paths, kinds, whats = {}, {}, {}
    for seed in seeds:
        data, kind, what = case(source["files"], seed)
        name = f"seed{seed}"
        paths[name] = str(tmp_path / f"{name}.keras")
        with open(paths[name], "wb") as f:
            f.write(data)
        kinds[name], whats[name] = kind, what
    start = time.monotonic()
    got = run_cases(
        paths, source["x"], str(tmp_path), env={"JAXLAYER_CACHE_DIR": str(tmp_path)}
    )
    took = time.monotonic() - start
    report = os.environ.get("JAXLAYER_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(
                {
                    "backend": BACKEND,
                    "cases": len(seeds),
                    "seconds": took,
                    "outcomes": {
                        n: {
                            "kind": kinds[n],
                            "what": whats[n],
                            **{k: v for k, v in o.items() if k != "y"},
                        }
                        for n, o in got.items()
                    },
                },
                f,
                indent=1,
            )
    assert set(got) == set(paths)
    counts = check_outcomes(got, kinds, source["y"])
    refused = sum(v for c in counts.values() for k, v in c.items() if "refused" in k)
    assert refused >= len(seeds) // 4, counts


def _tree_artifact(path, depth: int, width: int) -> int:
    """An artifact whose input tree is `depth` levels of `width` children
    that are all the same node: `width ** depth` nodes to jax's reader."""
    import flatbuffers
    from jax._src.export import serialization_generated as G

    b = flatbuffers.Builder(1024)
    G.PyTreeDefStart(b)
    G.PyTreeDefAddKind(b, G.PyTreeDefKind.leaf)
    node = G.PyTreeDefEnd(b)
    for _ in range(depth):
        G.PyTreeDefStartChildrenVector(b, width)
        for _ in range(width):
            b.PrependUOffsetTRelative(node)
        children = b.EndVector()
        G.PyTreeDefStart(b)
        G.PyTreeDefAddKind(b, G.PyTreeDefKind.tuple)
        G.PyTreeDefAddChildren(b, children)
        node = G.PyTreeDefEnd(b)
    G.ExportedStart(b)
    G.ExportedAddInTree(b, node)
    b.Finish(G.ExportedEnd(b))
    data = bytes(b.Output())
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


@pytest.mark.parametrize(
    "depth, width, words",
    [(40, 2, "reached more often"), (150, 1, "deeper than 100")],
)
def test_a_tree_jax_would_walk_forever_is_refused_from_its_layout(
    tmp_path, depth, width, words
):
    """Offsets that share a branch (2**40 nodes for jax's recursive reader,
    which would run for days) or nest past any real tree: refused from the
    layout alone, at once."""
    from jaxlayer import _artifact_check

    path = str(tmp_path / "tree.jaxexport")
    size = _tree_artifact(path, depth, width)
    start = time.monotonic()
    with pytest.raises(_artifact_check.Refused, match=words) as err:
        _artifact_check.check_layout(path, size, "the artifact")
    assert "refused before anything parsed it" in str(err.value)
    assert time.monotonic() - start < 1
