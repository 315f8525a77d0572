"""How the C allocator changes the cost of XLA's CPU calls: page faults and
time in the kernel, per call, under each allocator setting.

Usage, from the repository root:

    python -m benchmarks.allocator                  # every setting found
    python -m benchmarks.allocator --workloads transformer
    python -m benchmarks.allocator --write          # the checked-in copy

XLA's CPU runtime allocates each call's outputs and scratch buffers with the
C allocator and frees them when the call is done. glibc's `malloc` gives
large blocks back to the kernel (`mmap`/`munmap`, and trimming its heaps),
so the next call page-faults the same memory in again, one zeroed 4 KiB page
at a time. This benchmark shows how much that costs: for each workload of
the fit benchmark, `jax.jit` of its forward and of its gradient (loss: the
sum of the outputs) on JAX arrays, with no Keras involved, in a fresh
process per allocator setting:

- `glibc`: nothing set (the default).
- `glibc, tuned`: `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=<16 GiB>`: one heap for every thread, no `mmap`,
  nothing given back to the kernel.
- `tcmalloc`: `LD_PRELOAD` of `libtcmalloc_minimal.so.4`, where it is
  installed (Debian and Ubuntu: `apt install libtcmalloc-minimal4`).

The processes alternate, one per setting per round; each row is the round
with the least wall time per call, with that round's minor page faults and
kernel (system) CPU time per call. The report is printed and
written to `benchmarks/out/allocator.md` (git-ignored); `--write` writes
`benchmarks/results-allocator.md`.
"""

from __future__ import annotations

import argparse
import ctypes.util
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(_ROOT))

CHECKED_IN = Path(__file__).with_name("results-allocator.md")
DEFAULT_OUTPUT = Path(__file__).parent / "out" / "allocator.md"
# Freed memory kept by glibc (16 GiB: in practice never trimmed).
_NEVER_TRIM = str(16 * 2**30)
GLIBC_TUNED = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": _NEVER_TRIM,
}
_TCMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
)


def tcmalloc_path() -> str | None:
    """The path of `libtcmalloc_minimal.so.4`, or None if not installed."""
    for folder in _TCMALLOC_DIRS:
        path = os.path.join(folder, "libtcmalloc_minimal.so.4")
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("tcmalloc_minimal")
    return found if found and os.path.isabs(found) else None


def settings() -> dict[str, dict[str, str]]:
    """`{name: environment variables}` of each allocator setting found."""
    out = {"glibc": {}, "glibc, tuned": dict(GLIBC_TUNED)}
    path = tcmalloc_path()
    if path is not None:
        out["tcmalloc"] = {"LD_PRELOAD": path}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    from benchmarks.fit_step import parse_profile_args, profile_parser

    parser = profile_parser(
        "python -m benchmarks.allocator",
        __doc__,
        rounds=3,
        seconds=0.5,
        json_help="measure in this process and write the raw rows here; what "
        "each setting's subprocess is given.",
    )
    parser.add_argument("--backend", default="jax", choices=("jax",))
    return parse_profile_args(parser, argv, CHECKED_IN, DEFAULT_OUTPUT)


def measure(args) -> dict:
    """Times each workload's forward and gradient in this process."""
    import jax
    import jax.numpy as jnp

    from benchmarks._workloads import WORKLOADS

    rows = []
    for name in args.workloads:
        w = WORKLOADS[name]
        params = w.init(jax.random.key(0))
        x = jnp.asarray(w.data(1)[0])
        calls = {
            "fwd": jax.jit(w.apply),
            "grad": jax.jit(jax.grad(lambda p, x, apply=w.apply: jnp.sum(apply(p, x)))),
        }
        for kind, f in calls.items():
            for _ in range(3):
                jax.block_until_ready(f(params, x))
            n, start = 0, time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_SELF)
            while time.perf_counter() - start < args.seconds or n < 3:
                jax.block_until_ready(f(params, x))
                n += 1
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append(
                {
                    "workload": name,
                    "call": kind,
                    "ms": wall / n * 1e3,
                    "faults": (after.ru_minflt - before.ru_minflt) / n,
                    "sys_ms": (after.ru_stime - before.ru_stime) / n * 1e3,
                    "user_ms": (after.ru_utime - before.ru_utime) / n * 1e3,
                }
            )
    return {"rows": rows}


def run(args) -> dict[str, list[dict]]:
    """`{setting: rows}`: each setting's best round per row."""
    from benchmarks.fit_step import in_subprocess

    found = settings()
    argv = ["--workloads", ",".join(args.workloads), "--seconds", str(args.seconds)]
    best: dict[str, dict] = {name: {} for name in found}
    for _ in range(args.rounds):
        for name, env in found.items():
            result = in_subprocess("benchmarks.allocator", "jax", argv, env=env)
            if "error" in result:
                best[name] = {"error": result["error"]}
                continue
            for row in result["rows"]:
                key = (row["workload"], row["call"])
                kept = best[name].get(key)
                if isinstance(kept, dict) and kept["ms"] <= row["ms"]:
                    continue
                best[name][key] = row
    return {
        name: rows if "error" in rows else list(rows.values())
        for name, rows in best.items()
    }


def render(results: dict, args) -> str:
    """The markdown report."""
    from benchmarks.fit_step import _load, _machine, _versions

    machine = _machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    found = settings()
    lines = [
        "# XLA's CPU calls under each C allocator",
        "",
        "Generated by `python -m benchmarks.allocator` (`--write` for this "
        "file). Do not edit by hand.",
        "",
        f"- date: {now.isoformat(timespec='seconds')}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['os']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        f"- settings: {args.rounds} rounds, one fresh process per allocator per "
        f"round, each timing ~{args.seconds} s of calls; the round with the "
        f"least wall time per call; load average after: {_load()}",
    ]
    for name, env in found.items():
        described = " ".join(f"{k}={v}" for k, v in env.items()) or "nothing set"
        lines.append(f"- `{name}`: {described}")
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        "Per call of `jax.jit` on JAX arrays (no Keras): wall ms, minor page "
        "faults, and CPU ms spent in the kernel (`sys`, every thread). `fwd`: "
        "the forward; `grad`: the gradient of every parameter (loss: the sum "
        "of the outputs).",
        "",
    ]
    names = list(results)
    header = "| workload | call | " + " | ".join(
        f"{n}: ms / faults / sys ms" for n in names
    )
    lines += [header + " |", "|---|---|" + "---|" * len(names)]
    keys = []
    for rows in results.values():
        if isinstance(rows, list):
            keys = [(r["workload"], r["call"]) for r in rows]
            break
    for key in keys:
        cells = []
        for name in names:
            rows = results[name]
            row = None
            if isinstance(rows, list):
                row = next((r for r in rows if (r["workload"], r["call"]) == key), None)
            cells.append(
                "failed"
                if row is None
                else f"{row['ms']:.2f} / {row['faults']:.0f} / {row['sys_ms']:.2f}"
            )
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    """Runs every allocator setting (a subprocess each) and writes the report."""
    from benchmarks.fit_step import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.json:
        result = measure(args)
        Path(args.json).write_text(json.dumps(result))
        return result
    results = run(args)
    write_report(render(results, args), args.output)
    return results


if __name__ == "__main__":
    main()
