"""Runs the test suite's pytest processes, a few at a time (stdlib only).

Used by scripts/test.sh and .ci/run. Jobs come as JSON lines on stdin, one
pytest process each: `{"name": ..., "argv": [...], "env": {...},
"weight": seconds}`. The heaviest jobs start first, at most `--jobs` at
once, so that the last to end are short ones: on two cores, four backends'
processes of very unequal length left one core idle for the last third of
a run. Each job's output is printed whole when it ends.

Shared by every job (and the processes the tests start): one JAX
compilation cache, one folder of load-safety reports, and the time budget
(`JAXLAYER_TEST_BUDGET` seconds: one deadline for the run, see
tests/conftest.py). Exit status 1 when a job failed (pytest's 5, nothing
collected, is not a failure).

    python scripts/_pool.py --jobs 4 < jobs.jsonl
    python scripts/_pool.py --suite "jax torch" --print -k saving
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Seconds each test file took in one backend's process (tests/durations.json,
# `JAXLAYER_DURATIONS_OUT` of tests/conftest.py): the weights for sharding.
DURATIONS = ROOT / "tests" / "durations.json"
DEFAULT_WEIGHT = 20.0


def weights(backend: str) -> dict[str, float]:
    """Seconds per test file for `backend`, as last measured."""
    try:
        table = json.loads(DURATIONS.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in table.get(backend, {}).items()}


def shards(files: list[str], backend: str, count: int) -> list[tuple[float, list[str]]]:
    """`files` split into `count` groups of about equal measured time, each
    `(seconds, files)`: the longest file first into the lightest group."""
    known = weights(backend)
    cost = {f: known.get(Path(f).name, DEFAULT_WEIGHT) for f in files}
    groups: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(1, count))]
    for f in sorted(files, key=lambda f: (-cost[f], f)):
        i = min(range(len(groups)), key=lambda i: groups[i][0])
        total, members = groups[i]
        groups[i] = (total + cost[f], [*members, f])
    return [(t, sorted(m)) for t, m in groups if m]


def _shared_env() -> tuple[dict[str, str], str | None]:
    """What every job shares, and a temporary folder to remove at the end."""
    env: dict[str, str] = {}
    folder = None
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        folder = tempfile.mkdtemp(prefix="jaxlayer-tests-")
    budget = os.environ.get("JAXLAYER_TEST_BUDGET")
    if budget and float(budget) and not os.environ.get("JAXLAYER_TEST_DEADLINE"):
        env["JAXLAYER_TEST_DEADLINE"] = str(int(time.time() + float(budget)))
    # Several processes on few cores: one thread each for the libraries'
    # own pools (OpenMP: torch, TensorFlow's kernels) unless asked.
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    env["JAXLAYER_POOL_PID"] = str(os.getpid())
    return env, folder


def report_times(times: dict[str, Path]) -> None:
    """Prints wall and CPU seconds per backend and file (`times`: each job's
    name and the file its pytest wrote them to); with
    `JAXLAYER_UPDATE_DURATIONS=1`, keeps the wall seconds of the suite's
    jobs as the weights of later runs (tests/durations.json)."""
    table: dict[str, dict[str, list[float]]] = {}
    for name, path in times.items():
        try:
            got = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        kind = "" if name.startswith("KERAS_BACKEND=") else name.split(",")[0] + " "
        files = table.setdefault(kind + got["backend"], {})
        for name, (wall, cpu) in got["files"].items():
            old = files.get(name, [0.0, 0.0])
            files[name] = [old[0] + wall, old[1] + cpu]
    if not table:
        return
    print("=== seconds per backend: wall (tests one after another), CPU ===")
    for backend, files in sorted(table.items()):
        wall = sum(w for w, _ in files.values())
        cpu = sum(c for _, c in files.values())
        print(f"{backend:>10}: {wall:7.0f} wall {cpu:7.0f} CPU")
        heavy = sorted(files.items(), key=lambda kv: -kv[1][1])
        for name, (w, c) in heavy:
            print(f"{'':>10}  {w:7.0f} wall {c:7.0f} CPU  {name}")
    if os.environ.get("JAXLAYER_UPDATE_DURATIONS") == "1":
        try:
            old = json.loads(DURATIONS.read_text("utf-8"))
        except (OSError, ValueError):
            old = {}
        for backend, files in table.items():
            if " " in backend:  # another leg's (floors) environment
                continue
            kept = old.setdefault(backend, {})
            kept.update({name: round(w, 1) for name, (w, _) in files.items()})
        text = json.dumps(old, indent=1, sort_keys=True) + "\n"
        DURATIONS.write_text(text, "utf-8")
        print(f"weights written: {DURATIONS}")


def _caches(folder: str | None, job: dict) -> dict[str, str]:
    """One JAX compilation cache and one folder of load-safety reports for
    the jobs of one interpreter (the floors leg's is another environment):
    a function compiled by one process is read back by the others."""
    if folder is None:
        return {}
    key = hashlib.sha256(job["argv"][0].encode()).hexdigest()[:12]
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(folder, key, "jax")}
    if not os.environ.get("JAXLAYER_CACHE_DIR"):
        env["JAXLAYER_CACHE_DIR"] = os.path.join(folder, key, "jaxlayer")
    return env


def run(jobs: list[dict], at_once: int) -> int:
    shared, folder = _shared_env()
    logs = Path(tempfile.mkdtemp(prefix="jaxlayer-logs-"))
    times: dict[str, Path] = {}
    pending = sorted(jobs, key=lambda j: -float(j.get("weight", DEFAULT_WEIGHT)))
    running: dict[subprocess.Popen, tuple[dict, float, Path]] = {}
    done: list[tuple[str, int, float]] = []
    start = time.monotonic()

    def stop(signum, frame):  # noqa: ARG001 - a signal handler's signature
        for proc in running:
            proc.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            while pending and len(running) < at_once:
                job = pending.pop(0)
                log = logs / f"{len(done) + len(running)}.log"
                env = {**os.environ, **shared, **_caches(folder, job)}
                env.update(job.get("env", {}))
                # Its seconds per test file (tests/conftest.py).
                times[job["name"]] = log.with_suffix(".json")
                env["JAXLAYER_DURATIONS_OUT"] = str(times[job["name"]])
                print(f"=== {job['name']}: started ===", flush=True)
                with open(log, "w") as out:
                    proc = subprocess.Popen(
                        job["argv"],
                        cwd=job.get("cwd", ROOT),
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                running[proc] = (job, time.monotonic(), log)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                job, began, log = running.pop(proc)
                took = time.monotonic() - began
                done.append((job["name"], proc.returncode, took))
                print(f"=== {job['name']} ({took:.0f} s, exit {proc.returncode}) ===")
                print(log.read_text("utf-8", "replace"), flush=True)
    finally:
        for proc in running:
            proc.kill()
        report_times(times)
        shutil.rmtree(logs, ignore_errors=True)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    failed = [name for name, code, _ in done if code not in (0, 5)]
    wall = time.monotonic() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime + used.ru_stime
    print(
        f"=== {len(done)} jobs in {wall:.0f} s, {at_once} at once; "
        f"CPU {cpu:.0f} s (the jobs and the processes they waited for) ==="
    )
    for name, code, took in sorted(done, key=lambda d: -d[2]):
        print(f"{took:7.0f} s  exit {code}  {name}")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    return 0


def suite_jobs(python: str, backends: list[str], pytest_args: list[str]) -> list[dict]:
    """One job per shard of each backend's run of the suite: the test
    files split by measured time (`JAXLAYER_TEST_SHARDS`, e.g. "jax:3
    torch:2"; 1 for a backend not named), unless `pytest_args` name tests."""
    counts = dict(
        (b, int(c or 1))
        for b, _, c in (
            s.partition(":") for s in os.environ.get("JAXLAYER_TEST_SHARDS", "").split()
        )
    )
    named = any("::" in a or a.endswith(".py") or os.path.isdir(a) for a in pytest_args)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    select = [] if os.environ.get("JAXLAYER_SLOW") else ["-m", "not slow"]
    base = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *select,
        *pytest_args,
    ]
    jobs = []
    for backend in backends:
        count = 1 if named else counts.get(backend, 1)
        groups = (
            shards(files, backend, count)
            if count > 1
            else [(sum(weights(backend).values()) or DEFAULT_WEIGHT, [])]
        )
        for i, (total, members) in enumerate(groups):
            name = backend if len(groups) == 1 else f"{backend} {i + 1}/{len(groups)}"
            jobs.append(
                {
                    "name": f"KERAS_BACKEND={name}",
                    "argv": base + members,
                    "env": {"KERAS_BACKEND": backend},
                    "weight": total,
                }
            )
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes at once")
    parser.add_argument(
        "--suite",
        metavar="BACKENDS",
        help="the suite's jobs for these backends (space-separated), "
        "instead of jobs on stdin; other arguments go to pytest",
    )
    parser.add_argument("--print", action="store_true", help="print the jobs only")
    args, rest = parser.parse_known_args()
    if args.suite is not None:
        jobs = suite_jobs(sys.executable, args.suite.split(), rest)
        # Another leg's jobs run in the same pool (.ci/run: the floors').
        extra = os.environ.get("JAXLAYER_EXTRA_JOBS")
        if extra:
            with open(extra, encoding="utf-8") as f:
                jobs += [json.loads(line) for line in f if line.strip()]
    else:
        if rest:
            parser.error(f"unknown arguments: {rest}")
        jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    if args.print:
        for job in jobs:
            print(json.dumps(job))
        return 0
    return run(jobs, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
