"""Load safety: an exported computation from a file is checked before use.

A `.keras` file's artifacts (serialized `jax.export` modules) are untrusted
input. Deserializing them runs C++ parsers (flatbuffers, MLIR bytecode,
VHLO -> StableHLO) that are not hardened against hostile bytes, and a
module that parses can still name a custom call that reads arbitrary
memory (jax's Python callbacks) or a kernel whose buffers its shapes size
(LAPACK), or a host transfer that blocks forever. So, before the loading
process deserializes anything:

1. the sizes: the manifest's byte count is at most `max_artifact_bytes()`
   and equals the file's size on disk (nothing larger is ever read); then
   the layout (`check_layout`): the flatbuffer's offsets and lengths are
   followed through a memory map, and a file with one out of bounds, a
   structure reached twice (jax's recursive reader would walk it without
   end) or bytes that nothing reaches (padding) is refused;
2. a child process (this file, run by path: it imports jax only, never
   jaxlayer or Keras; one serves every load of a process, see `_verify`)
   deserializes each artifact and its VJPs, parses the modules as jax
   would, lowers each for this platform, and reports the operations,
   custom-call targets and signatures it found. A signal, a time-out or too
   much memory there is a refusal; the loading process is never at risk.
   One deadline (`timeout_s`, a `Budget` shared by the layers of a file)
   covers a file's reading, checking and rebuilding; each parse has a
   shorter one (`parse_timeout_s`); past them the child is killed.
   The report is cached by the artifact's sha256 (in this process and in a
   folder on disk), so a file is verified once;
3. the report is checked here against the policy below and against the
   manifest: the operations, the custom-call targets (an allowlist), the
   file holding no bytes beyond its computation, and its platforms.

The policy does not depend on anything the file claims (`jax.export`'s
"disabled safety checks" included). With Keras's `safe_mode=False` step 2
is skipped (the module is deserialized in this process, as before); 1 and
3 still run on what this process deserializes.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import importlib.util
import json
import mmap
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

# Bumped when the child's report changes, so that cached reports of an older
# check are not used.
CHECK_VERSION = 1

# -- the policy --------------------------------------------------------------

# The custom-call targets jax.export writes for ordinary programs and that
# cannot be driven out of bounds by their shapes: shape assertions (symbolic
# shapes), sharding annotations, memory-kind annotations. The threefry
# kernels (random numbers on GPUs) size their buffers from their operands:
# they are accepted only where every operand and result has one type.
ALLOWED_TARGETS = frozenset(
    {
        "shape_assertion",
        "Sharding",
        "SPMDFullToShardShape",
        "SPMDShardToFullShape",
        "annotate_device_placement",
        "cu_threefry2x32_ffi",
        "hip_threefry2x32_ffi",
    }
)
_SAME_TYPE_TARGETS = frozenset({"cu_threefry2x32_ffi", "hip_threefry2x32_ffi"})

# The linear-algebra kernels on jax's list of stable custom calls (LAPACK on
# CPUs, cuSOLVER/hipSOLVER/cuSPARSE on GPUs, and the TPU ones). Their
# workspace and result buffers are sized from the shapes the module gives
# them, so a crafted module can make them write out of bounds: they are
# refused unless the user trusts the file (`allow_solver_kernels`).
_SOLVER_TARGET = re.compile(
    r"^(lapack_[sdcz]\w+_ffi"
    r"|(cu|hip)solver_\w+_ffi"
    r"|cusparse_gtsv2_ffi"
    r"|(cu|hip)_lu_pivots_to_permutation"
    r"|Eigh|Qr|ProductOfElementaryHouseholderReflectors|LuDecomposition)$"
)

# Operations by dialect: what jax.export writes. Host transfers are refused
# by name even though their dialect is allowed (they block on a host that
# never answers, or hand data to one).
_ALLOWED_DIALECTS = ("builtin", "func", "stablehlo", "chlo", "sdy", "shape")
HOST_TRANSFER_OPS = frozenset(
    {
        "stablehlo.infeed",
        "stablehlo.outfeed",
        "stablehlo.send",
        "stablehlo.recv",
    }
)

_ALLOW_SOLVERS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jaxlayer_allow_solver_kernels", default=False
)

# What a file may hold beyond its computation (flatbuffer alignment, a
# serializer of another jax version writing a field more or less).
_SLACK_BYTES = 4096
_SLACK_FRACTION = 0.05

_DEFAULT_MAX_MIB = 256
_DEFAULT_TIMEOUT_S = 30.0
# A legitimate artifact parses in well under a second: a parse that takes
# longer than this is cut off long before the whole load's deadline.
_DEFAULT_PARSE_TIMEOUT_S = 10.0


@contextlib.contextmanager
def allow_solver_kernels() -> Iterator[None]:
    """Accepts linear-algebra kernels in the computations loaded inside it.

    A `.keras` file's saved computation may not call LAPACK or GPU solver
    kernels (`jnp.linalg.solve`, `eigh`, `qr`, `svd`, ... lower to them):
    their buffers are sized by the shapes the file states, so a crafted file
    could make them write out of bounds. Load a file you trust that needs
    them inside this context; every other check still applies.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp, keras, numpy as np, jaxlayer
        >>> solve = lambda params, inputs: jnp.linalg.solve(params["a"], inputs.T).T
        >>> params = {"a": 2 * np.eye(2, dtype="float32")}
        >>> layer = jaxlayer.JaxLayer(solve, params=params)
        >>> model = keras.Sequential([keras.Input((2,)), layer])
        >>> path = os.path.join(tempfile.mkdtemp(), "solver.keras")
        >>> model.save(path)
        >>> with jaxlayer.allow_solver_kernels():
        ...     loaded = keras.saving.load_model(path)
        >>> loaded.predict(np.ones((1, 2), "float32"), verbose=0)
        array([[0.5, 0.5]], dtype=float32)
    """
    token = _ALLOW_SOLVERS.set(True)
    try:
        yield
    finally:
        _ALLOW_SOLVERS.reset(token)


def solver_kernels_allowed() -> bool:
    """Whether `allow_solver_kernels` is in effect here."""
    return _ALLOW_SOLVERS.get()


def max_artifact_bytes() -> int:
    """The largest artifact a loader reads: `JAXLAYER_MAX_ARTIFACT_MIB`
    (MiB), 256 by default. The weights are never in an artifact (they are
    arguments of the computation), so artifacts are small."""
    text = os.environ.get("JAXLAYER_MAX_ARTIFACT_MIB", "")
    try:
        # A malformed setting falls back to the default, never to no cap.
        mib = float(text) if text else _DEFAULT_MAX_MIB
    except ValueError:
        mib = _DEFAULT_MAX_MIB
    return int(mib * 2**20)


def timeout_s() -> float:
    """The deadline of a file's load (reading, checking and rebuilding its
    artifacts): `JAXLAYER_LOAD_TIMEOUT` (s; `JAXLAYER_VERIFY_TIMEOUT`, its
    older name, is read too), 30 by default."""
    text = os.environ.get("JAXLAYER_LOAD_TIMEOUT") or os.environ.get(
        "JAXLAYER_VERIFY_TIMEOUT", ""
    )
    try:
        return float(text) if text else _DEFAULT_TIMEOUT_S
    except ValueError:
        return _DEFAULT_TIMEOUT_S


def parse_timeout_s() -> float:
    """How long the verifier may take to parse one artifact (jax's
    deserializer and the MLIR parser): `JAXLAYER_PARSE_TIMEOUT` (s), 10 by
    default, within the load's deadline."""
    text = os.environ.get("JAXLAYER_PARSE_TIMEOUT", "")
    try:
        return float(text) if text else _DEFAULT_PARSE_TIMEOUT_S
    except ValueError:
        return _DEFAULT_PARSE_TIMEOUT_S


class Budget:
    """The time a file's load may spend on its artifacts (`timeout_s()`),
    shared by all its layers: it runs only while one of them is being read
    (`with budget:`), so Keras's own work between them (a large weights
    file) is not counted.

    Example:
        >>> budget = Budget(30.0)
        >>> with budget:
        ...     budget.left() > 29
        True
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._spent = 0.0
        self._since: float | None = None
        self.last = time.monotonic()

    def __enter__(self) -> Budget:
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        now = time.monotonic()
        if self._since is not None:
            self._spent += now - self._since
        self._since = None
        self.last = now

    def left(self) -> float:
        """Seconds left (negative once spent)."""
        running = time.monotonic() - self._since if self._since is not None else 0.0
        return self.limit - self._spent - running


_BUDGETS: dict[str, Budget] = {}


def budget_for(key: str) -> Budget:
    """The budget of the file whose load `key` names (Keras extracts each
    `.keras` file to a folder of its own: the layers' asset folders are in
    it). A budget unused for longer than its limit is a new load's."""
    now = time.monotonic()
    limit = timeout_s()
    for old in [k for k, b in _BUDGETS.items() if now - b.last > b.limit]:
        del _BUDGETS[old]
    budget = _BUDGETS.get(key)
    if budget is None or budget.limit != limit:
        budget = _BUDGETS[key] = Budget(limit)
    return budget


def idle_s() -> float:
    """How long the verifying process waits for another load before it
    exits: `JAXLAYER_VERIFY_IDLE` (s), 30 by default."""
    text = os.environ.get("JAXLAYER_VERIFY_IDLE", "")
    try:
        return float(text) if text else _IDLE_S
    except ValueError:
        return _IDLE_S


class Refused(ValueError):
    """An artifact failed a check; the message says which and why."""


def sha256_of(path: str) -> str:
    """The sha256 of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the child process and its cache ------------------------------------------

_REPORTS: dict[str, dict] = {}


def _cache_dir() -> str:
    root = os.environ.get("JAXLAYER_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        root = os.path.join(base, "jaxlayer")
    return os.path.join(root, "verified")


# Keyed by jax's version as well: a report made with another jax's parser
# says nothing about what this one accepts.
def _key(sha: str) -> str:
    import jax

    return hashlib.sha256(
        f"{sha}:{jax.__version__}:{CHECK_VERSION}".encode()
    ).hexdigest()


def _cached(key: str) -> dict | None:
    if key in _REPORTS:
        return _REPORTS[key]
    try:
        # A report read from disk is trusted: the folder is the user's own, and
        # whoever can write there can already change what this process imports.
        with open(os.path.join(_cache_dir(), f"{key}.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("check") != CHECK_VERSION:
        return None
    _REPORTS[key] = report
    return report


def _store(key: str, report: dict) -> None:
    _REPORTS[key] = report
    folder = _cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        # Written aside and renamed: a concurrent load never reads half a report.
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f)
        os.replace(tmp, os.path.join(folder, f"{key}.json"))
    except OSError:
        pass  # an unwritable cache: the next load verifies again


def reports(
    files: dict[str, tuple[str, str]],
    where: dict[str, str],
    budget: Budget | None = None,
) -> dict:
    """The child's report on each artifact, verifying those not cached.

    Args:
        files: per artifact name, `(path, sha256)`; each file's size was
            already checked against the cap, and its layout (`check_layout`).
        where: per artifact name, how messages name it.
        budget: the load's time budget (a new one of `timeout_s()` if None).

    Returns:
        Per artifact name, the report (a dict).

    Raises:
        Refused: the child crashed, timed out or ran out of memory.
    """
    out, todo = {}, {}
    for name, (path, sha) in files.items():
        key = _key(sha)
        report = _cached(key)
        if report is None:
            todo[name] = (path, key)
        else:
            out[name] = report
    if not todo:
        return out
    # Sizes were capped by the caller, so this bounds the child's memory limit.
    total = sum(os.path.getsize(path) for path, _ in todo.values())
    request = {
        "files": {name: path for name, (path, _) in todo.items()},
        # Memory: jax itself, and a bounded multiple of what is checked.
        "memory": 4 * 2**30 + 8 * total,
    }
    names = ", ".join(f"`{n}`" for n in todo)
    first = where[next(iter(todo))]
    if budget is None:
        budget = Budget(timeout_s())
    try:
        found = _verify(request, budget)
    except _TimedOut as late:
        if str(late) == "parse":
            limit, name = parse_timeout_s(), "JAXLAYER_PARSE_TIMEOUT"
            what = "parsing"
        else:
            limit, name, what = budget.limit, "JAXLAYER_LOAD_TIMEOUT", "checking"
        raise Refused(
            f"{first}: {what} {names} before use did not finish in "
            f"{limit:g} s (a corrupted or hostile module can make the "
            "deserializer loop); refused, and the verifying process was "
            "stopped. If the file is trusted and large, set "
            f"{name} to more seconds."
        ) from None
    except _Died as death:
        raise Refused(
            f"{first}: checking {names} before use "
            f"{death}: the file is corrupted or hostile; refused "
            "(this process never deserialized it). Save the model again "
            "from its source."
        ) from None
    for name, (_, key) in todo.items():
        report = found.get(name)
        if not isinstance(report, dict):
            raise Refused(f"{where[name]}: the verifier gave no report; refused.")
        report["check"] = CHECK_VERSION
        _store(key, report)
        out[name] = report
    return out


# -- the verifying process, seen from the loading process ----------------------

# A verifying process that got no request for this long exits (`idle_s`);
# the next load starts a new one (its `import jax`: about 1.4 s on a
# 2-core machine, benchmarks/results-load.md).
_IDLE_S = 30.0

_WORKER_LOCK = threading.Lock()
_WORKER: _Worker | None = None


class _TimedOut(Exception):
    pass


class _Died(Exception):
    """The verifying process ended while checking; `str` says how."""


class _Idle(Exception):
    """The verifying process had exited while idle, before reading."""


def _verify(request: dict, budget: Budget) -> dict:
    """The verifying process's reports on `request["files"]`.

    One process serves every load of this process, so a model with many
    layers (or many models) pays for its `import jax` once. It is stopped
    after a request it could not answer cleanly (a time-out, a death, or an
    artifact it failed to parse: hostile input gets a fresh process), and
    it exits by itself when idle (`idle_s()`) or when this process ends.
    """
    global _WORKER
    with _WORKER_LOCK:
        # A second try only for a child that had just exited idle (`_Idle`).
        for _ in range(2):
            worker = _WORKER
            if worker is None or not worker.usable():
                # A child that ended (or a parent's, after a fork) is dropped
                # with its pipes and message file closed, not left to the
                # garbage collector (a ResourceWarning in whatever runs then).
                if worker is not None:
                    worker.stop()
                worker = _WORKER = _Worker()
            try:
                found = worker.ask(request, budget)
            except _Idle:
                worker.stop()
                _WORKER = None
                continue
            except (_TimedOut, _Died):
                worker.stop()
                _WORKER = None
                raise
            # Hostile input gets a fresh child: one that failed to parse is stopped.
            if any(not isinstance(r, dict) or "error" in r for r in found.values()):
                worker.stop()
                _WORKER = None
            return found
        raise _Died("could not start the verifying process")


@atexit.register
def _stop_worker() -> None:
    # The child would exit on its own when its stdin closes; stopping it
    # here spares Python's warning about a child still running at exit.
    if _WORKER is not None:
        _WORKER.stop()


class _Worker:
    """A verifying child: `python -I _artifact_check.py --serve`.

    One JSON request per line on its stdin, one JSON answer per line on its
    stdout (its own stdout goes to stderr, so nothing else is read as an
    answer); its stderr goes to a temporary file, read back for messages.
    """

    def __init__(self) -> None:
        # CPU only: the child never takes a GPU (or its memory) from the loading
        # process.
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("PYTHONSTARTUP", None)
        self._stderr = tempfile.TemporaryFile()
        self._pid = os.getpid()
        self._buffer = b""
        # Whether it said it is ready (its `import jax` done).
        self._ready = False
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        # The child runs isolated (`-I`: no PYTHONPATH, no user site, no
        # current folder) and imports jax from where this process did.
        self._send({"path": [p for p in sys.path if p], "idle": idle_s()})

    def usable(self) -> bool:
        # A forked process does not share its parent's child.
        return self._pid == os.getpid() and self._proc.poll() is None

    def _send(self, message: dict) -> bool:
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:  # it had exited: the answer's EOF says how
            return False
        return True

    def ask(self, request: dict, budget: Budget) -> dict:
        """The reports on `request["files"]`, within `budget` (the process's
        start included; each parse within `parse_timeout_s()` too)."""
        start = self._stderr.tell()
        self._send(request)
        if not self._ready:
            try:
                message = self._message(time.monotonic() + budget.left(), start)
            except _TimedOut:
                raise _TimedOut("load") from None
            if "ready" not in message:
                self.stop()
                raise _Died("gave an answer that is not a report")
            self._ready = True
        parse_limit = parse_timeout_s()
        stage_end = None
        while True:
            end = time.monotonic() + budget.left()
            if stage_end is not None and stage_end < end:
                end, late = stage_end, "parse"
            else:
                late = "load"
            try:
                message = self._message(end, start)
            except _TimedOut:
                raise _TimedOut(late) from None
            stage = message.get("stage")
            if stage is None:
                found = message.get("reports")
                if not isinstance(found, dict):
                    self.stop()
                    raise _Died("gave an answer that is not a report")
                return found
            # A parse has a short limit of its own; the rest, the load's.
            stage_end = time.monotonic() + parse_limit if stage == "parse" else None

    def _message(self, deadline: float, start: int) -> dict:
        """The next line the child writes, as a dict, by `deadline` (the
        child is stopped past it)."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise _TimedOut
            # Raw reads (`os.read`): a buffered file object would hide bytes already
            # read from `select`, and could block past the deadline.
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                # It ended: wait for its exit status, bounded (it closed its
                # output, so it is exiting).
                try:
                    code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.stop()
                    raise _Died("stopped answering") from None
                if code == 0:  # it had timed out idle before this request
                    raise _Idle
                raise _Died(self._death(code, start))
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.stop()
            raise _Died("gave an answer that is not a report")
        return message

    def _death(self, code: int, start: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"crashed the verifying process ({name})"
        self._stderr.seek(start)
        tail = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        last = tail[-1][:200] if tail else ""
        # RLIMIT_DATA makes an allocation fail rather than the OOM killer act, so
        # running out of memory shows as a Python error on stderr, not a signal.
        if "MemoryError" in last or "memory" in last.lower():
            return "ran the verifying process out of memory"
        return f"failed in the verifying process (exit {code}: {last or 'no output'})"

    def stop(self) -> None:
        """Ends the child (if it runs) and closes its files; safe to repeat."""
        if self._pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            # A killed child ends at once; the bound only keeps a wedged one from
            # hanging this process.
            self._proc.wait(timeout=5)
        self._proc.stdout.close()
        self._stderr.close()


# -- checking a report ----------------------------------------------------------


def check(report: dict, where: str, size: int) -> None:
    """Applies the policy to one artifact's report.

    Args:
        report: the child's report on it.
        where: how messages name the artifact (the layer and the file).
        size: the artifact's size in bytes.

    Raises:
        Refused: a check failed; the message names the operation.
    """
    if "error" in report:
        raise Refused(
            f"{where} cannot be read: {report['error']}. Save the model again "
            "from its source."
        )
    canonical = int(report.get("canonical_bytes", 0))
    # Bytes that jax would not write again are where a second payload for
    # another parser would hide.
    if size > canonical + _SLACK_BYTES + _SLACK_FRACTION * canonical:
        raise Refused(
            f"{where} holds {size} bytes, of which its computation needs "
            f"{canonical}: the rest is not part of any computation jax "
            "writes (a padded or crafted file); refused."
        )
    allow_solvers = solver_kernels_allowed()
    for level, module in enumerate(report.get("modules", [])):
        what = where if level == 0 else f"{where} (its VJP of order {level})"
        for op in module.get("ops", []):
            # An allowlist by dialect, not a denylist of ops: an unknown dialect is
            # refused whatever it does.
            dialect = op.split(".", 1)[0]
            if op in HOST_TRANSFER_OPS:
                raise Refused(
                    f"{what} contains the host-transfer operation `{op}`, "
                    "which jaxlayer never saves (it exchanges data with the "
                    "host, or blocks waiting for it); refused."
                )
            if dialect not in _ALLOWED_DIALECTS:
                raise Refused(
                    f"{what} contains the operation `{op}`, which is not "
                    "one jax.export writes; refused."
                )
        for call in module.get("custom_calls", []):
            _check_call(call, what, allow_solvers)


def _check_call(call: dict, what: str, allow_solvers: bool) -> None:
    target = call.get("target")
    if target in ALLOWED_TARGETS:
        if target in _SAME_TYPE_TARGETS and len(set(call.get("types", []))) > 1:
            raise Refused(
                f"{what} calls `{target}` with operands and results of "
                f"different types ({', '.join(call.get('types', []))}), which "
                "jax never writes (the kernel would go out of bounds); refused."
            )
        if target == "shape_assertion" and not call.get("message_ok", False):
            raise Refused(
                f"{what} has a `shape_assertion` whose message names operands "
                "it does not have; refused."
            )
        return
    if _SOLVER_TARGET.match(str(target)):
        if allow_solvers:
            return
        raise Refused(
            f"{what} calls the linear-algebra kernel `{target}` (a custom "
            "call whose buffers the file's shapes size, so a crafted file "
            "can make it write out of bounds); refused. If you trust the "
            "file, load it inside `with jaxlayer.allow_solver_kernels():`."
        )
    raise Refused(
        f"{what} contains `stablehlo.custom_call @{target}`, a custom call "
        "outside the allowlist of those jax.export writes for ordinary "
        "programs (Python callbacks, host calls and native kernels are "
        "never loaded from a file); refused."
    )


def check_signature(report: dict, where: str, expected: dict) -> None:
    """Checks the artifact's own argument and result types against the
    manifest's description of them.

    Args:
        report: the child's report.
        where: how messages name the artifact.
        expected: `{"in": [...], "out": [...]}`, each a list of `(shape,
            dtype)` with None for a dimension that is symbolic (a side
            given as None is not checked), and `"platform"`, the platform
            this process runs.

    Raises:
        Refused: they differ.
    """
    module = (report.get("modules") or [{}])[0]
    platforms = module.get("platforms", [])
    # The artifact's own platforms, not the manifest's: the manifest is only
    # what the file claims.
    if expected.get("platform") not in platforms:
        raise Refused(
            f"{where} was exported for platforms {', '.join(platforms)} "
            f"(its own record, whatever the manifest says), and this process "
            f"runs JAX on {expected.get('platform')}; refused."
        )
    for side, word in (("in", "arguments"), ("out", "results")):
        if expected.get(side) is None:
            continue
        got = [(_shape(s), d) for s, d in module.get(f"{side}_avals", [])]
        want = [(tuple(s), d) for s, d in expected[side]]
        if len(got) != len(want) or any(
            not _same_aval(g, w) for g, w in zip(got, want, strict=False)
        ):
            raise Refused(
                f"{where} does not match the layer saved with it: its "
                f"{word} are {_avals_text(got)}, where the layer's config "
                f"says {_avals_text(want)}; refused."
            )


def _shape(dims) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in dims)


def _same_aval(got, want) -> bool:
    # A dimension the manifest leaves unknown (None) may be anything; one it
    # states must be the artifact's, static.
    (gs, gd), (ws, wd) = got, want
    return (
        gd == wd
        and len(gs) == len(ws)
        and all(w is None or g == w for g, w in zip(gs, ws, strict=True))
    )


def _avals_text(avals) -> str:
    parts = []
    for shape, dtype in avals:
        dims = ",".join("?" if d is None else str(d) for d in shape)
        parts.append(f"{dtype}[{dims}]")
    return "(" + ", ".join(parts) + ")"


# -- the artifact's layout, read without deserializing it -----------------------

# What jax's deserializer reaches from each flatbuffer table of an artifact
# (the schema of `jax/_src/export/serialization_generated.py`), by field
# index: another table's type, `[type]` a vector of those, `s` a string,
# `[s]` a vector of strings, `[n]` a vector of n-byte scalars. Scalar fields
# lie inside their table and need no entry.
_LAYOUT: dict[str, dict[int, str]] = {
    "Exported": {
        1: "s",
        2: "PyTreeDef",
        3: "[AbstractValue]",
        4: "PyTreeDef",
        5: "[AbstractValue]",
        7: "[Sharding]",
        8: "[Sharding]",
        9: "[s]",
        10: "[Effect]",
        11: "[Effect]",
        12: "[DisabledSafetyCheck]",
        13: "[1]",
        15: "[2]",
        17: "Exported",
        19: "[AbstractValue]",
        20: "[AbstractMesh]",
        21: "[NamedSharding]",
        22: "[4]",
        23: "[4]",
        24: "[4]",
        25: "[4]",
    },
    "PyTreeDef": {1: "[PyTreeDef]", 2: "[s]", 3: "s", 4: "[1]"},
    "AbstractDevice": {0: "s", 2: "s"},
    "AbstractMesh": {0: "[4]", 1: "[s]", 2: "[1]", 3: "AbstractDevice"},
    "PartitionSpecOneAxis": {0: "[s]"},
    "PartitionSpec": {0: "[PartitionSpecOneAxis]", 1: "[s]", 2: "[s]"},
    "NamedSharding": {0: "AbstractMesh", 1: "PartitionSpec", 2: "s"},
    "AbstractValue": {1: "[s]"},
    "Sharding": {1: "[1]", 2: "NamedSharding"},
    "Effect": {0: "s"},
    "DisabledSafetyCheck": {1: "s"},
}
# Alignment: what a flatbuffer may hold between the pieces it is made of.
_ALIGN_BYTES = 8
# Deeper nesting than this (a pytree inside a pytree ...) is not something
# jaxlayer saves; jax's deserializer recurses on it.
_MAX_DEPTH = 100


_U16, _U32, _I32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<i")


class _Malformed(Exception):
    """The artifact's layout is not one jax writes; `str` says where."""


def check_layout(path: str, size: int, where: str) -> None:
    """Refuses an artifact whose flatbuffer is malformed or holds bytes that
    jax's reader would never reach (padding), before anything parses it.

    Args:
        path: the artifact's file.
        size: its size in bytes (already checked against the manifest's).
        where: how messages name it.

    Raises:
        Refused: the message says what is wrong.
    """
    try:
        reached = layout_bytes(path)
    except (_Malformed, OSError, ValueError) as err:
        raise Refused(
            f"{where} is not laid out as jax writes an artifact ({err}); "
            "refused before anything parsed it. Save the model again from "
            "its source."
        ) from None
    if size > reached:
        raise Refused(
            f"{where} holds {size} bytes, of which jax's reader would reach "
            f"at most {reached}: the rest is not part of any computation jax "
            "writes (a padded or crafted file); refused before anything "
            "parsed it."
        )


def layout_bytes(path: str) -> int:
    """How many bytes of the artifact at `path` jax's deserializer would
    reach, read from its flatbuffer's offsets and lengths alone (nothing is
    deserialized; the file is mapped, not read whole).

    Raises:
        _Malformed: an offset or a length points outside the file, a table is
            reached more often than the file could hold distinct ones (a
            loop, or a tree that shares its branches), or it nests deeper
            than jax's deserializer could follow; what jax would do with
            such bytes is loop, recurse or read out of bounds.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 8:
            raise _Malformed("it is shorter than a flatbuffer's header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Layout(buf).total()


class _Layout:
    """One walk over an artifact's flatbuffer (`layout_bytes`)."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.size = len(buf)
        self.spans: list[tuple[int, int]] = []
        # Each table or string reached is one piece of the file, at least four
        # bytes: more visits than that is a structure reached twice.
        self.visits = self.size // 4 + 16
        self.levels = 0

    def total(self) -> int:
        self.table(self.u32(0), "Exported", 0)
        covered, end = 0, 0
        for start, stop in sorted(self.spans):
            covered += max(0, stop - max(start, end))
            end = max(end, stop)
        # The root offset, and the alignment between pieces.
        return covered + 4 + _ALIGN_BYTES * len(self.spans)

    def read(self, fmt: struct.Struct, at: int) -> int:
        if at < 0 or at + fmt.size > self.size:
            raise _Malformed(f"an offset points outside it (to byte {at})")
        return fmt.unpack_from(self.buf, at)[0]

    def u32(self, at: int) -> int:
        return self.read(_U32, at)

    def visit(self, depth: int) -> None:
        self.visits -= 1
        if self.visits < 0:
            raise _Malformed("its tables are reached more often than it holds any")
        if depth > _MAX_DEPTH:
            raise _Malformed(f"it nests deeper than {_MAX_DEPTH} levels")

    def span(self, start: int, stop: int) -> None:
        if start < 0 or stop > self.size or stop < start:
            raise _Malformed(f"a piece of it lies outside it (bytes {start}-{stop})")
        self.spans.append((start, stop))

    def string(self, at: int, depth: int) -> None:
        self.visit(depth)
        # Its length, its bytes and a terminating zero.
        self.span(at, at + 4 + self.u32(at) + 1)

    def table(self, at: int, kind: str, depth: int) -> None:
        self.visit(depth)
        if kind == "Exported":
            self.levels += 1
            if self.levels > _MAX_VJP_ORDER + 1:
                raise _Malformed(
                    f"it holds VJPs beyond order {_MAX_VJP_ORDER}, more than "
                    "jaxlayer writes or checks"
                )
        vtable = at - self.read(_I32, at)
        vsize, osize = self.read(_U16, vtable), self.read(_U16, vtable + 2)
        if vsize < 4 or vsize % 2 or osize < 4:
            raise _Malformed(f"a table at byte {at} has a malformed layout")
        self.span(vtable, vtable + vsize)
        self.span(at, at + osize)
        for field, what in _LAYOUT[kind].items():
            slot = 4 + 2 * field
            offset = self.read(_U16, vtable + slot) if slot < vsize else 0
            if offset == 0:
                continue
            if offset + 4 > osize:
                raise _Malformed(f"a field of the table at byte {at} lies outside it")
            target = at + offset + self.u32(at + offset)
            if what == "s":
                self.string(target, depth + 1)
            elif not what.startswith("["):
                self.table(target, what, depth + 1)
            else:
                self.vector(target, what[1:-1], depth + 1)

    def vector(self, at: int, item: str, depth: int) -> None:
        self.visit(depth)
        count = self.u32(at)
        width = int(item) if item.isdigit() else 4
        self.span(at, at + 4 + count * width)
        if item.isdigit():
            return
        for i in range(count):
            slot = at + 4 + 4 * i
            target = slot + self.u32(slot)
            if item == "s":
                self.string(target, depth)
            else:
                self.table(target, item, depth)


# -- the child: `python -I _artifact_check.py --serve`, requests on stdin -------


def _serve() -> None:  # pragma: no cover - runs in the verifying process
    """The verifying process: a set-up line, then one request per line."""
    import resource

    # Answers go to a private copy of stdout; anything else printed here
    # (jax's or XLA's own output) goes to stderr, never into an answer.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    buffer = bytearray()
    setup = json.loads(_read_line(0, buffer, None) or "{}")
    sys.path[:] = [str(p) for p in setup.get("path", sys.path)]
    idle = float(setup.get("idle", 30.0))
    import jax
    import jax.export

    def say(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    say({"ready": True})
    while True:
        line = _read_line(0, buffer, idle)
        if not line:
            # Idle (None) or the loading process ended (""): exit 0; a later
            # load starts another.
            return
        request = json.loads(line)
        with contextlib.suppress(ValueError, OSError):  # a bounded heap
            memory = int(request["memory"])
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            # Never above the hard limit the child inherited (setting it would fail).
            if hard != resource.RLIM_INFINITY:
                memory = min(memory, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (memory, hard))
        found = {}
        for name, path in request["files"].items():
            try:
                found[name] = _describe_file(
                    jax,
                    path,
                    stage=lambda stage, n=name: say({"stage": stage, "name": n}),
                )
            except Exception as err:  # noqa: BLE001 - reported, refused by the parent
                text_lines = str(err).strip().splitlines()
                text = f"{type(err).__name__}: {text_lines[0] if text_lines else ''}"
                found[name] = {"error": text[:300]}
        say({"reports": found})


def _read_line(fd: int, buffer: bytearray, timeout: float | None) -> str | None:
    """The next line from `fd` (Python's own buffering would hide a waiting
    line from `select`); "" when `fd` ends, None after `timeout` seconds
    without one."""  # pragma: no cover - in the child
    while b"\n" not in buffer:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return ""
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


# The highest VJP order a file may hold (jaxlayer writes 1; a file of any
# order up to this is checked module by module).
_MAX_VJP_ORDER = 8


def describe_here(path: str) -> dict:
    """The report on an artifact, made in this process (`safe_mode=False`:
    the user trusts the file, so its module is parsed here, not in a child)."""
    import jax
    import jax.export

    return _describe_file(jax, path, exercise=False)


def _describe_file(jax, path: str, exercise: bool = True, stage=None) -> dict:
    # `stage` tells the loading process what starts: "parse" (it has a short
    # limit), then "exercise".
    if stage is not None:
        stage("parse")
    with open(path, "rb") as f:
        blob = f.read()
    exp = jax.export.deserialize(bytearray(blob))
    del blob
    modules, levels = [], []
    level = exp
    # Every VJP the file holds is checked, whatever order the manifest says,
    # up to `_MAX_VJP_ORDER`; a file holding more is refused (jaxlayer writes
    # order 1), so no module in it goes unchecked.
    for _ in range(_MAX_VJP_ORDER + 1):
        levels.append(level)
        modules.append(_describe_module(jax, level))
        if not level.has_vjp():
            break
        level = level.vjp()
    else:
        raise ValueError(
            f"the artifact holds VJPs beyond order {_MAX_VJP_ORDER}, more "
            "than jaxlayer writes or checks"
        )
    # What jax itself writes for these modules; the file may exceed it only
    # by the slack (`check`).
    canonical = len(exp.serialize(vjp_order=len(levels) - 1))
    if stage is not None:
        stage("exercise")
    for level in levels if exercise else ():
        _exercise(jax, level)
    return {"canonical_bytes": canonical, "modules": modules}


def _private_module():
    """`jaxlayer._private`, whose `jax_mlir()` the verifying child uses.

    Imported as a package module here in the loading process; in the child
    (this file run alone, `-I`), the file beside this one, loaded by itself:
    `from jaxlayer import ...` would run `jaxlayer/__init__` and import
    Keras, about a second more on every child's start (and more code run
    where hostile bytes are parsed). It imports nothing but the standard
    library at module level.
    """
    if __package__:
        from jaxlayer import _private

        return _private
    module = sys.modules.get("_jaxlayer_private")
    if module is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_private.py")
        spec = importlib.util.spec_from_file_location("_jaxlayer_private", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_jaxlayer_private"] = module
        spec.loader.exec_module(module)
    return module


def _describe_module(jax, exp) -> dict:
    tools = _private_module().jax_mlir()
    ir = tools.ir
    ops: set = set()
    calls: dict = {}
    with tools.make_ir_context():
        # The parse `Exported.mlir_module()` does, inside this context so the ops
        # can be walked; some jaxlib versions return text, parsed again below.
        module = tools.deserialize_portable_artifact(exp.mlir_module_serialized)
        if isinstance(module, (str, bytes)):
            module = ir.Module.parse(module)
        stack = [module.operation]
        while stack:
            op = stack.pop()
            ops.add(op.name)
            if op.name == "stablehlo.custom_call":
                entry = _describe_call(ir, op)
                calls[json.dumps(entry, sort_keys=True)] = entry
            for region in op.regions:
                for block in region:
                    stack.extend(o.operation for o in block)
    return {
        "ops": sorted(ops),
        "custom_calls": list(calls.values()),
        "platforms": list(exp.platforms),
        "in_avals": [_aval(a) for a in exp.in_avals],
        "out_avals": [_aval(a) for a in exp.out_avals],
        "nr_devices": exp.nr_devices,
    }


def _describe_call(ir, op) -> dict:
    try:
        target = ir.StringAttr(op.attributes["call_target_name"]).value
    except (KeyError, ValueError, TypeError):
        target = None
    types = [str(v.type) for v in op.operands] + [str(r.type) for r in op.results]
    entry = {"target": target, "types": sorted(set(types))}
    if target == "shape_assertion":
        try:
            message = ir.StringAttr(op.attributes["error_message"]).value
        except (KeyError, ValueError, TypeError):
            message = ""
        # `{k}` in the message formats the k-th operand after the predicate.
        # The runtime formats the message with the operands: an index beyond
        # them, or any other brace, is not something jax writes.
        used = [int(k) for k in re.findall(r"\{(\d+)\}", message)]
        entry["message_ok"] = all(k < len(op.operands) - 1 for k in used) and (
            "{" not in re.sub(r"\{\d+\}", "", message)
        )
    return entry


def _aval(aval) -> list:
    dims = [d if isinstance(d, int) else str(d) for d in aval.shape]
    return [dims, str(aval.dtype)]


def _exercise(jax, exp) -> None:  # pragma: no cover - in the child
    """What the loading process will do with the module: lower a call of it
    for this platform (with small concrete sizes for its symbolic
    dimensions) and refine its shapes, as compiling it does. A Python
    exception here is left for the loading process to report where it
    happens: only a crash or a hang matters here."""
    refine = _private_module().jax_mlir().refine_polymorphic_shapes
    try:
        concrete = [
            jax.ShapeDtypeStruct(
                tuple(d if isinstance(d, int) else 2 for d in a.shape), a.dtype
            )
            for a in exp.in_avals
        ]
        args, kwargs = jax.tree_util.tree_unflatten(exp.in_tree, concrete)
        lowered = jax.jit(exp.call).lower(*args, **kwargs)
        refine(lowered.compiler_ir("stablehlo"))
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


if __name__ == "__main__":  # pragma: no cover - the verifying process
    _serve()
