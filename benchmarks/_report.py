"""The markdown report of one or more backend runs of `benchmarks.fit_step`."""

from __future__ import annotations

import copy
import statistics

from benchmarks._names import (
    CONTENDERS,
    JAXLAYER,
    KERAS_JAXLAYER,
    NATIVE,
    PURE_JAX,
)

# The targets the report checks (issue #12, and the jax one of the issue
# before it): per backend, `(spe or None for every spe, reference, limit,
# strict)`; jaxlayer's fit time over the reference's must be <= limit (< limit
# when strict).
JAX_TARGET_SPE = 25
TARGETS = {
    "jax": (
        (None, NATIVE, 1.02, False),
        (None, KERAS_JAXLAYER, 1.02, False),
        (JAX_TARGET_SPE, PURE_JAX, 1.02, False),
    ),
    "tensorflow": (
        (None, NATIVE, 1.00, False),
        (None, KERAS_JAXLAYER, 1.00, True),
    ),
    # Keras runs only steps_per_execution=1 on torch.
    "torch": ((1, NATIVE, 1.00, False),),
}


def _stat(value):
    """`(min, median)` of a list of timings, or None for an error/empty."""
    if isinstance(value, list) and value:
        return min(value), statistics.median(value)
    return None


def _ms(value) -> str:
    stat = _stat(value)
    if stat is None:
        return value if isinstance(value, str) else "—"
    return f"{_num(stat[0])} / {_num(stat[1])}"


def _num(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _environment(env: dict | None) -> str:
    """The tuning variables a run was made under, or that none was set."""
    if not env:
        return "no tuning variable set (XLA_FLAGS, PJRT_NPROC, GOMP_SPINCOUNT, ...)"
    return ", ".join(f"`{k}={v}`" for k, v in sorted(env.items()))


def _min_ratio(value, reference) -> float | None:
    """The ratio of the mins of two timing lists; None if either has none."""
    a, b = _stat(value), _stat(reference)
    if a is None or b is None:
        return None
    return a[0] / b[0]


def _ratio(value, reference) -> str:
    ratio = _min_ratio(value, reference)
    return "—" if ratio is None else f"{ratio:.2f}x"


def _bytes(n) -> str:
    if isinstance(n, str):
        return n
    return f"{n / 2**20:.2f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def _short(text: str) -> str:
    return text.replace("|", "\\|")


def _backend_table(run: dict) -> list[str]:
    spes = run["settings"]["spe"]
    head = ["workload", "contender"]
    for spe in spes:
        head += [f"fit spe={spe} ms/step min / med", "vs JAX", "vs Keras"]
    head += ["predict ms/batch min / med", "samples/s (best)", "vs JAX", "vs Keras"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in run["workloads"]:
        res = w["results"]
        for kind in CONTENDERS:
            r = res[kind]
            cells = [w["name"], kind]
            for spe in spes:
                key = f"fit_{spe}"
                if isinstance(r[key], str):
                    cells += [_short(r[key]), "", ""]
                    continue
                cells += [
                    _ms(r[key]),
                    _ratio(r[key], res[PURE_JAX][key]),
                    _ratio(r[key], res[NATIVE][key]),
                ]
            p = r["predict"]
            if isinstance(p, str):
                cells += [_short(p), "", "", ""]
            else:
                stat = _stat(p)
                rate = f"{1e3 * w['batch_size'] / stat[0]:.0f}" if stat else "—"
                cells += [
                    _ms(p),
                    rate,
                    _ratio(p, res[PURE_JAX]["predict"]),
                    _ratio(p, res[NATIVE]["predict"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets(runs: list[dict]) -> list[str]:
    lines = [
        "| backend | workload | target | measured (ratio of mins) | "
        "per run (min-max) | status |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        if "error" in run:
            continue
        backend = run["backend"]
        spes = run["settings"]["spe"]
        for w in run["workloads"]:
            res = w["results"]
            for spe, ref, limit, strict in TARGETS.get(backend, ()):
                for s in spes if spe is None else [spe]:
                    lines += _target_row(run, w, res, s, ref, limit, strict)
    return lines


def _target_row(run, w, res, spe, ref, limit, strict):
    key = f"fit_{spe}"
    sign = "<" if strict else "<="
    target = f"{JAXLAYER} fit spe={spe} {sign} {limit:.2f}x {ref}"
    if key not in res[JAXLAYER] or key not in res[ref]:
        return []
    head = f"| {run['backend']} | {w['name']} | {target} |"
    ratio = _min_ratio(res[JAXLAYER][key], res[ref][key])
    if ratio is None:
        mine = res[JAXLAYER][key]
        status = mine if _stat(mine) is None else res[ref][key]
        return [f"{head} — | — | {_short(str(status))} |"]
    met = ratio < limit if strict else ratio <= limit
    status = "met" if met else "**not met**"
    per_run = _per_run(run, w["name"], key, ref)
    spread = (
        f"{min(per_run):.3f}-{max(per_run):.3f}x ({len(per_run)} runs)"
        if len(per_run) > 1
        else "—"
    )
    return [f"{head} {ratio:.3f}x | {spread} | {status} |"]


def _per_run(run, workload, key, ref) -> list[float]:
    """jaxlayer's ratio to `ref` in each run merged into `run` (`merge`)."""
    out = []
    for rep in run.get("reps", ()):
        res = rep.get(workload)
        if res is None:
            continue
        ratio = _min_ratio(res[JAXLAYER].get(key), res[ref].get(key))
        if ratio is not None:
            out.append(ratio)
    return out


def merge(reps: list[list[dict]]) -> list[dict]:
    """Runs of the same backends repeated (`--runs`), merged into one per
    backend: each timing list holds every run's rounds (so min and median
    are over all of them), and `reps` keeps each run's own results for the
    per-run ratios.

    Args:
        reps: one list of backend runs per repetition.

    Returns:
        One run per backend, in the order of the first repetition.
    """
    if len(reps) == 1:
        return reps[0]
    merged: dict = {}
    for runs in reps:
        for run in runs:
            backend = run["backend"]
            if "error" in run:
                merged.setdefault(backend, run)
                continue
            into = merged.get(backend)
            if into is None or "error" in into:
                into = merged[backend] = copy.deepcopy(run)
                into["reps"] = []
                into["load_all"] = []
            else:
                _extend(into, run)
            into["reps"].append({w["name"]: w["results"] for w in run["workloads"]})
            into["load_all"].append((run.get("load_before"), run.get("load_after")))
    for run in merged.values():
        if "reps" in run:
            run["settings"] = dict(run["settings"], runs=len(run["reps"]))
            run["load_after"] = run["load_all"][-1][1]
    return list(merged.values())


def _extend(into, run):
    by_name = {w["name"]: w for w in into["workloads"]}
    for w in run["workloads"]:
        target = by_name.get(w["name"])
        if target is None:
            into["workloads"].append(copy.deepcopy(w))
            continue
        for kind, res in w["results"].items():
            mine = target["results"][kind]
            for key, value in res.items():
                if isinstance(mine.get(key), list) and isinstance(value, list):
                    mine[key] = mine[key] + value
                elif isinstance(value, str):
                    mine[key] = value  # an error in any run is shown


def _memory(runs: list[dict]) -> list[str]:
    rows = []
    for run in runs:
        for w in run.get("workloads", []):
            mem = w.get("memory")
            if not mem:
                continue
            pure, mine = mem[PURE_JAX], mem[JAXLAYER]
            ratio = (
                f"{mine / pure:.3f}x"
                if isinstance(mine, int) and isinstance(pure, int) and pure
                else "—"
            )
            rows.append(
                f"| {run['backend']} | {w['name']} | {_bytes(w['param_bytes'])} | "
                f"{_bytes(pure)} | {_bytes(mine)} | {ratio} | "
                f"{_short(_bytes(mem[KERAS_JAXLAYER]))} | {_bytes(mem[NATIVE])} |"
            )
    if not rows:
        return []
    return [
        "## Memory: live `jax.Array` bytes after build + one fit step",
        "",
        "Growth of `sum(x.nbytes for x in jax.live_arrays())` while each "
        "contender is alive, built from scratch (the caller keeps no "
        "reference to the initial parameters). Adam keeps two slots per "
        "parameter, so params + optimizer state is about 3x the parameter "
        "bytes; a layer holding a second copy of its parameters would be "
        "near 4x.",
        "",
        f"| backend | workload | params | {PURE_JAX} | {JAXLAYER} | "
        f"{JAXLAYER} / pure JAX | {KERAS_JAXLAYER} | {NATIVE} |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def render(runs: list[dict], note: str | None = None) -> str:
    """The markdown report of `runs` (one dict per backend run)."""
    ok = [r for r in runs if "error" not in r]
    first = ok[0] if ok else {}
    machine = first.get("machine", {})
    versions = first.get("versions", {})
    out = [
        "# jaxlayer benchmarks: fit and predict cost, side by side",
        "",
        "Generated by `python -m benchmarks.fit_step` "
        "(`bash benchmarks/run_all.sh --runs 3 --write` for the checked-in "
        "copy). Do not edit by hand.",
        "",
        f"- date: {first.get('date', '?')}",
        f"- machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} "
        f"cores, {machine.get('os', '?')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    if ok:
        s = first["settings"]
        out.append(
            f"- settings: {s['rounds']} rounds"
            + (f" in each of {s['runs']} runs" if s.get("runs", 1) > 1 else "")
            + ", steps_per_execution "
            f"{', '.join(map(str, s['spe']))}, "
            f"{s['predict_batches']} predict batches per timing, Keras "
            f"`jit_compile={s.get('jit_compile', 'auto')}`"
            + (" (**--quick: the numbers mean nothing**)" if s["quick"] else "")
        )
        out.append(f"- environment: {_environment(s.get('environment'))}")
    for run in runs:
        if "error" in run:
            out.append(f"- {run['backend']}: failed ({run['error']})")
            continue
        steps = ", ".join(f"{w['name']} {w['steps']}" for w in run["workloads"])
        if "load_all" in run:
            load = "; ".join(
                f"run {i}: before {b}, after {a}"
                for i, (b, a) in enumerate(run["load_all"], 1)
            )
        else:
            load = f"before {run['load_before']}, after {run['load_after']}"
        out.append(
            f"- {run['backend']} backend: steps per timed fit: {steps}; load "
            f"average (1, 5, 15 min) {load}"
        )
    if note:
        out.append(f"- note: {note}")
    out += [
        "",
        "How to read it: every contender does the same training (same "
        "architecture, Adam, softmax cross-entropy, same synthetic data; pure "
        "JAX and both JaxLayers start from the same weights), timed in "
        "interleaved rounds in one process per backend (and, with several runs, "
        "one fresh process per backend per run). `min / med` are over "
        "rounds (of every run); ratios are of the mins, against the pure JAX "
        "loop (`vs JAX`) "
        "and against native Keras layers (`vs Keras`) in the same process. "
        "`fit` is timed in steady state (from the end of the first execution "
        "to the end of the epoch, or the whole epoch when it is one execution; "
        "compile excluded). Pure JAX keeps its batches on the device and runs "
        "one jitted step per call whatever `steps_per_execution` is (the same "
        "timing appears in every spe column); Keras feeds NumPy batches. "
        "`predict` includes copying the outputs to NumPy. Only "
        "ratios measured side by side are meaningful: the machine may be "
        "shared (see the load averages).",
        "",
        "## Targets",
        "",
        *_targets(runs),
        "",
    ]
    for run in ok:
        out += [
            f"## {run['backend']} backend",
            "",
            *_backend_table(run),
            "",
        ]
    out += _memory(runs)
    workloads = {w["name"]: w["description"] for r in ok for w in r["workloads"]}
    out += ["## Workloads", ""]
    out += [f"- `{name}`: {desc}" for name, desc in workloads.items()]
    out.append("")
    return "\n".join(out)


# The summary and the chart: jaxlayer's fit time over each other contender's.
_OTHERS = (
    (NATIVE, "native Keras"),
    (KERAS_JAXLAYER, "Keras JaxLayer"),
    (PURE_JAX, "pure JAX"),
)


def _ratios(runs: list[dict]) -> list[tuple[str, int, str, list]]:
    """`(backend, spe, workload, [ratio or reason per other])` per fit row.

    A ratio is jaxlayer's min ms/step over the other's; where either could
    not run, a short reason instead. Rows where jaxlayer and native Keras
    both could not run (torch with spe > 1) are left out.
    """
    rows = []
    for run in runs:
        if "error" in run:
            continue
        for spe in run["settings"]["spe"]:
            key = f"fit_{spe}"
            for w in run["workloads"]:
                res = w["results"]
                mine = _stat(res[JAXLAYER][key])
                if mine is None and _stat(res[NATIVE][key]) is None:
                    continue
                cells = []
                for kind, _ in _OTHERS:
                    theirs = _stat(res[kind][key])
                    if mine is None:
                        cells.append("jaxlayer failed")
                    elif theirs is None:
                        cells.append("unsupported")
                    else:
                        cells.append(mine[0] / theirs[0])
                rows.append((run["backend"], spe, w["name"], cells))
    return rows


def summary(runs: list[dict]) -> str:
    """A one-screen text summary: jaxlayer's fit time over the others'."""
    head = f"{'backend':<11}{'spe':>4}  {'workload':<12}" + "".join(
        f"{label:>16}" for _, label in _OTHERS
    )
    lines = [
        "",
        "Summary: jaxlayer.JaxLayer fit ms/step / each contender's (ratio of "
        "mins; below 1.00x jaxlayer is faster)",
        head,
        "-" * len(head),
    ]
    for backend, spe, workload, cells in _ratios(runs):
        text = "".join(
            f"{(f'{c:.2f}x' if isinstance(c, float) else c):>16}" for c in cells
        )
        lines.append(f"{backend:<11}{spe:>4}  {workload:<12}{text}")
    lines += [f"{r['backend']}: failed ({r['error']})" for r in runs if "error" in r]
    if any(r.get("settings", {}).get("quick") for r in runs):
        lines.append("(--quick: a smoke run, the numbers mean nothing)")
    return "\n".join(lines)


def write_chart(runs: list[dict], path) -> str | None:
    """Writes a bar chart of `summary`'s ratios, one panel per backend.

    The format follows the suffix (`.svg`, `.png`, ...). matplotlib is
    imported here only (the `bench` extra).

    Returns:
        None when written; a one-line note when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    rows = _ratios(runs)
    backends = list(dict.fromkeys(r[0] for r in rows)) or ["(no results)"]
    fig = Figure(figsize=(4.2 * len(backends), 4.1), layout="constrained")
    axes = fig.subplots(1, len(backends), sharey=True, squeeze=False)[0]
    colors = ("#4c72b0", "#dd8452", "#55a868")
    width = 0.26
    top = max([c for r in rows for c in r[3] if isinstance(c, float)] + [1.0])
    for ax, backend in zip(axes, backends, strict=True):
        mine = [r for r in rows if r[0] == backend]
        spes = {r[1] for r in mine}
        labels = [r[2] + (f"\nspe={r[1]}" if len(spes) > 1 else "") for r in mine]
        for i, (_, label) in enumerate(_OTHERS):
            xs = [j + (i - 1) * width for j in range(len(mine))]
            ys = [r[3][i] if isinstance(r[3][i], float) else 0.0 for r in mine]
            bars = ax.bar(xs, ys, width, label=f"vs {label}", color=colors[i])
            for bar, r in zip(bars, mine, strict=True):
                if not isinstance(r[3][i], float):
                    ax.text(
                        bar.get_x() + width / 2,
                        0.02,
                        "n/a",
                        ha="center",
                        va="bottom",
                        rotation=90,
                        fontsize=7,
                    )
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        title = backend if len(spes) != 1 else f"{backend} (spe={min(spes)})"
        ax.set_title(title)
        ax.set_ylim(0, top * 1.12)
    axes[0].set_ylabel("jaxlayer fit time / contender's\n(below 1: jaxlayer faster)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    quick = any(r.get("settings", {}).get("quick") for r in runs)
    fig.suptitle(
        "jaxlayer.JaxLayer fit step, ratio of min ms/step"
        + (" (--quick: numbers mean nothing)" if quick else "")
    )
    # Reproducible SVG: no date, fixed ids.
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "jaxlayer", "svg.fonttype": "none"}):
        fig.savefig(
            path, metadata={"Date": None} if str(path).endswith(".svg") else None
        )
    return None
