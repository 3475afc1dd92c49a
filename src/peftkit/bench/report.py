"""The report of a ``peftkit bench`` grid: ``report.md`` with its tables and four PNG plots.

Built from the rows alone (``results.jsonl``), so ``peftkit bench --report OUTPUT_DIR`` rebuilds it at any
time. Over the seeds of one grid point the score is given as mean ± sample standard deviation; times and
memory as medians (this is a noisy, shared machine: a median ignores one disturbed run).

* one table per (model, task, precision): every method (and its peer run) with the three parameter counts,
  mergeability, peak memory, step time, tokens/s, final loss, latencies;
* the peer comparison: peftkit and the peer library side by side for each method both have, with ratios;
* the precision table (when the grid has several): score, memory and step time per precision;
* the size table (when the grid has several models): step time and memory against the base's size;
* plots: ``score_vs_trainable.png``, ``peak_memory.png``, ``step_time.png``, ``cost_vs_size.png`` and, when
  the runs evaluated along the way (``train.eval_every``), ``score_vs_step.png`` (each method's score against
  the step, mean over seeds, read from the runs' ``log.jsonl``: the plateau, or its absence, is visible).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.core.io_utils import atomic_write, atomic_write_text

Row = dict[str, Any]
PLOTS = (
    "score_vs_trainable.png",
    "peak_memory.png",
    "step_time.png",
    "cost_vs_size.png",
    "score_vs_step.png",
)


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") == "ok"]


def _ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values in order of first appearance (the spec's order)."""
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _group(rows: Sequence[Row], keys: Sequence[str]) -> dict[tuple[Any, ...], list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k, "peftkit" if k == "library" else None) for k in keys), []).append(
            row
        )
    return groups


def _median(rows: Sequence[Row], key: str, scale: float = 1.0) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) * scale if values else None


def _score(rows: Sequence[Row]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd or None, n) of the rows' metric."""
    scores = [r["metric"] for r in rows if r.get("metric") is not None]
    if not scores:
        return None, None, 0
    spread = statistics.stdev(scores) if len(scores) > 1 else None
    return statistics.mean(scores), spread, len(scores)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _score_text(rows: Sequence[Row]) -> str:
    mean, spread, n = _score(rows)
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {spread:.4f}" if spread is not None else "") + f" (n={n})"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def _library(row: Row) -> str:
    return str(row.get("library") or "peftkit")


# ------------------------------------------------------------------------------------------ tables
LOWER_IS_BETTER = ("perplexity", "loss")


def separated_from_best(rows: Sequence[Row]) -> dict[tuple[Any, Any], str]:
    """Per (method, library) of one group: ``"best"`` for the best mean score, ``"below"`` when the best mean
    exceeds this one by more than the two seed spreads together (sd_best + sd: a difference larger than the
    spread over seeds), ``"within"`` otherwise; ``""`` when there are not two seeds to measure a spread."""
    stats = {}
    for key, group in _group(_ok(rows), ("method", "library")).items():
        mean, spread, _ = _score(group)
        if mean is not None:
            stats[key] = (mean, spread)
    if not stats:
        return {}
    metric = next((r.get("metric_name") for r in rows if r.get("metric_name")), None)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best_key = max(stats, key=lambda k: sign * stats[k][0])
    best_mean, best_spread = stats[best_key]
    marks = {}
    for key, (mean, spread) in stats.items():
        if key == best_key:
            marks[key] = "best"
        elif spread is None or best_spread is None:
            marks[key] = ""
        else:
            marks[key] = "below" if sign * (best_mean - mean) > best_spread + spread else "within"
    return marks


def method_table(rows: Sequence[Row]) -> list[str]:
    """One line per method and library of one (model, task, precision) group."""
    marks = separated_from_best(rows)
    lines = [
        "| method | library | score (mean ± sd) | vs best | lr | trainable | added | stored (KiB) | merges | "
        "peak MiB | step ms | tokens/s | final loss | latency base / unmerged / merged ms |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for (method, library), group in _group(rows, ("method", "library")).items():
        ok = _ok(group)
        if not ok:
            error = (group[0].get("error") or "").replace("|", "/")
            lines.append(f"| {method} | {library} | {group[0].get('status')}: {error} |||||||||||")
            continue
        first = ok[0]
        merged = _median(ok, "latency_merged_ms") if first.get("mergeable") else None
        lr = _fmt(first.get("lr"), ".2g") if first.get("lr") is not None else "–"
        lines.append(
            f"| {method} | {library} | {_score_text(ok)} | {marks.get((method, library), '')} | {lr} | "
            f"{first['trainable_params']:,} | "
            f"{first['added_params']:,} | {first['stored_params']:,} ({first['stored_bytes'] / 1024:.0f}) | "
            f"{'yes' if first.get('mergeable') else 'no'} | {_fmt(_median(ok, 'peak_memory_bytes', 2**-20), '.0f')} | "
            f"{_fmt(_median(ok, 'median_step_seconds', 1000), '.0f')} | {_fmt(_median(ok, 'tokens_per_second'), '.0f')} | "
            f"{_fmt(_median(ok, 'final_train_loss'), '.3f')} | {_fmt(_median(ok, 'latency_base_ms'))} / "
            f"{_fmt(_median(ok, 'latency_unmerged_ms'))} / {_fmt(merged)} |"
        )
    return lines


def peer_table(rows: Sequence[Row]) -> list[str]:
    """peftkit and each peer library side by side, for the grid points both ran."""
    ok = _ok(rows)
    peers = [lib for lib in _ordered([_library(r) for r in ok]) if lib != "peftkit"]
    if not peers:
        return []
    lines = []
    for peer in peers:
        lines += [
            f"| model | task | precision | method | score peftkit / {peer} | step ms peftkit / {peer} "
            f"({peer} ÷ peftkit) | peak MiB peftkit / {peer} (÷) | latency unmerged ms peftkit / {peer} | "
            f"trainable peftkit / {peer} | stored peftkit / {peer} |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = _group(ok, ("model", "task", "precision", "method", "library"))
        for (model, task, precision, method, library), mine in groups.items():
            theirs = groups.get((model, task, precision, method, peer))
            if library != "peftkit" or not theirs:
                continue
            step_a, step_b = (
                _median(mine, "median_step_seconds", 1000),
                _median(theirs, "median_step_seconds", 1000),
            )
            mem_a, mem_b = (
                _median(mine, "peak_memory_bytes", 2**-20),
                _median(theirs, "peak_memory_bytes", 2**-20),
            )
            lines.append(
                f"| {model} | {task} | {precision} | {method} | {_fmt(_score(mine)[0], '.4f')} / "
                f"{_fmt(_score(theirs)[0], '.4f')} | {_fmt(step_a, '.0f')} / {_fmt(step_b, '.0f')} "
                f"({_ratio(step_b, step_a)}) | {_fmt(mem_a, '.0f')} / {_fmt(mem_b, '.0f')} ({_ratio(mem_b, mem_a)}) | "
                f"{_fmt(_median(mine, 'latency_unmerged_ms'))} / {_fmt(_median(theirs, 'latency_unmerged_ms'))} | "
                f"{mine[0]['trainable_params']:,} / {theirs[0]['trainable_params']:,} | "
                f"{mine[0]['stored_params']:,} / {theirs[0]['stored_params']:,} |"
            )
        lines.append("")
    return lines


def pivot_table(
    rows: Sequence[Row],
    axis: str,
    columns: Sequence[Any],
    cell: Callable[[list[Row]], str],
    fixed: Sequence[str],
) -> list[str]:
    """Rows keyed by ``fixed`` (+ method), one column per value of ``axis``."""
    header = "| " + " | ".join([*fixed, "method"] + [str(c) for c in columns]) + " |"
    lines = [header, "|" + "---|" * (len(fixed) + 1 + len(columns))]
    groups = _group(_ok(rows), (*fixed, "method", axis))
    keys = _ordered([k[:-1] for k in groups])
    for key in keys:
        cells = [cell(groups[(*key, c)]) if (*key, c) in groups else "–" for c in columns]
        lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    return lines


def _cost_cell(rows: list[Row]) -> str:
    return (
        f"{_fmt(_score(rows)[0], '.3f')} · {_fmt(_median(rows, 'peak_memory_bytes', 2**-20), '.0f')} MiB · "
        f"{_fmt(_median(rows, 'median_step_seconds', 1000), '.0f')} ms"
    )


def _size_cell(rows: list[Row]) -> str:
    return (
        f"{_fmt(_median(rows, 'median_step_seconds', 1000), '.0f')} ms · "
        f"{_fmt(_median(rows, 'peak_memory_bytes', 2**-20), '.0f')} MiB · {rows[0]['trainable_params']:,} tr."
    )


# ------------------------------------------------------------------------------------------ report
def sweep_table(rows: Sequence[Row]) -> list[str]:
    """The learning-rate sweep: one line per grid point, the validation score at each rate, the chosen one
    in bold."""
    sweep = [r for r in rows if r.get("phase") == "sweep"]
    if not sweep:
        return []
    lines = [
        "| model | task | precision | method | validation score at each learning rate |",
        "|---|---|---|---|---|",
    ]
    for (model, task, precision, method), group in _group(
        sweep, ("model", "task", "precision", "method")
    ).items():
        metric = next((r.get("metric_name") for r in group if r.get("metric_name")), None)
        scored = [
            (r["lr"], r.get("metric"))
            for r in group
            if r.get("status") == "ok" and r.get("metric") is not None
        ]
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        best = max(scored, key=lambda x: (sign * x[1], -x[0]))[0] if scored else None
        cells = []
        for row in sorted(group, key=lambda r: r["lr"]):
            text = f"{row['lr']:.2g}: " + (
                f"{row['metric']:.4f}" if row.get("metric") is not None else row.get("status", "?")
            )
            cells.append(f"**{text}**" if row["lr"] == best else text)
        lines.append(f"| {model} | {task} | {precision} | {method} | {', '.join(cells)} |")
    return lines


def write_report(folder: str, rows: Sequence[Row], meta: dict[str, Any] | None = None) -> str:
    """Write ``folder/report.md`` and its plots; returns the report's path."""
    rows = list(rows)
    sweep = sweep_table(rows)
    rows = [r for r in rows if r.get("phase") != "sweep"]  # the tables below: the reported runs
    ok = _ok(rows)
    lines = ["# peftkit bench report", ""]
    if meta:
        if meta.get("command"):
            lines.append(f"Command: `{meta['command']}`  ")
        lines.append(
            f"Started {meta.get('started', '?')}; peftkit {meta.get('peftkit', '?')}, torch {meta.get('torch', '?')}, "
            f"transformers {meta.get('transformers', '?')}, Python {meta.get('python', '?')}; {meta.get('machine', '?')}"
            + (f"; {meta['threads']} torch thread(s) per run" if meta.get("threads") else "")
            + "."
        )
        lines.append("")
    failed = [r for r in rows if r.get("status") != "ok"]
    lines.append(
        f"{len(rows)} runs ({len(ok)} finished, {len(failed)} failed). Score: mean ± sample standard deviation over "
        "seeds; \"vs best\": *below* when the best method's mean exceeds this one's by more than the two seed spreads "
        "together (sd + sd), *within* otherwise; memory, times and latencies: medians over seeds. Counts (trainable "
        "/ added / stored) as defined in docs/bench.md; peak MiB is the training process's peak resident memory; "
        "step ms the median optimizer step; latency the median forward pass of one inference batch (base / adapted "
        "unmerged / merged)."
    )
    lines.append("")
    if sweep:
        lines += [
            "## Learning-rate sweep",
            "",
            "Each method's rate was chosen on a validation split carved from the training data (one seed); the "
            "reported runs below use the rate in bold.",
            "",
            *sweep,
            "",
        ]
    models = _ordered([r["model"] for r in rows])
    precisions = _ordered([r["precision"] for r in rows])
    for (model, task, precision), group in _group(rows, ("model", "task", "precision")).items():
        metric = next((r.get("metric_name") for r in group if r.get("metric_name")), "score")
        base = next((r.get("base_params") for r in group if r.get("base_params")), None)
        size = f", base {base / 1e6:.1f}M parameters" if base else ""
        lines += [f"## {model} · {task} · {precision} (score: {metric}{size})", ""]
        lines += [*method_table(group), ""]
    peers = peer_table(rows)
    if peers:
        lines += ["## peftkit next to the peer library", ""]
        lines += [
            "Same base model, data, order, seed and budget; only the library differs. Ratios > 1 mean the peer "
            "takes more.",
            "",
        ]
        lines += peers
    if len(precisions) > 1:
        lines += ["## Precision of the base model", "", "Each cell: score · peak MiB · step ms.", ""]
        lines += pivot_table(
            [r for r in rows if _library(r) == "peftkit"],
            "precision",
            precisions,
            _cost_cell,
            ("model", "task"),
        )
        lines.append("")
    if len(models) > 1:
        lines += [
            "## Cost against model size",
            "",
            "Each cell: step ms · peak MiB · trainable parameters.",
            "",
        ]
        lines += pivot_table(
            [r for r in rows if _library(r) == "peftkit"], "model", models, _size_cell, ("task", "precision")
        )
        sizes = {r["model"]: r.get("base_params") for r in ok if r.get("base_params")}
        if sizes:
            lines += ["", "Base sizes: " + ", ".join(f"{m} {n / 1e6:.1f}M" for m, n in sizes.items()) + "."]
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{r['run']}`: {r.get('status')}: {r.get('error', '')}" for r in failed]
        lines.append("")
    written = _plots(folder, ok)
    if written:
        lines += ["## Plots", ""] + [f"![{name[:-4]}]({name})" for name in written] + [""]
    path = os.path.join(folder, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------- plots
def _plots(folder: str, rows: list[Row]) -> list[str]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _group(rows, ("model", "task", "precision"))
    keys = list(groups)
    for name, draw in (
        ("score_vs_trainable.png", _draw_score),
        (
            "peak_memory.png",
            lambda ax, g: _draw_bars(ax, g, "peak_memory_bytes", 2**-20, "peak memory (MiB)"),
        ),
        ("step_time.png", lambda ax, g: _draw_bars(ax, g, "median_step_seconds", 1000, "median step (ms)")),
    ):
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 4.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            draw(ax, groups[key])
            ax.set_title(" · ".join(map(str, key)), fontsize=9)
        _save(fig, os.path.join(folder, name))
        written.append(name)
    models = _ordered([r["model"] for r in rows])
    if len(models) > 1 and all(r.get("base_params") for r in rows):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (method, library), group in _group(rows, ("method", "library")).items():
            by_model = _group(group, ("model",))
            sizes = [by_model[(m,)][0]["base_params"] for m in models if (m,) in by_model]
            label = method if library == "peftkit" else f"{method} ({library})"
            style = "-o" if library == "peftkit" else "--x"
            for ax, key, scale in ((left, "median_step_seconds", 1000), (right, "peak_memory_bytes", 2**-20)):
                values = [_median(by_model[(m,)], key, scale) for m in models if (m,) in by_model]
                ax.plot(sizes, values, style, label=label)
        for ax, ylabel in ((left, "median step (ms)"), (right, "peak memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("base model parameters")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        right.legend(fontsize=7)
        _save(fig, os.path.join(folder, "cost_vs_size.png"))
        written.append("cost_vs_size.png")
    curves = {key: _curves(folder, groups[key]) for key in keys}
    if any(curves.values()):
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 4.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            metric = next((r.get("metric_name") for r in groups[key] if r.get("metric_name")), "score")
            for label, points in curves[key].items():
                steps = sorted(points)
                ax.plot(steps, [statistics.mean(points[s]) for s in steps], "-o", markersize=3, label=label)
            ax.set_title(" · ".join(map(str, key)), fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"{metric} (mean over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        _save(fig, os.path.join(folder, "score_vs_step.png"))
        written.append("score_vs_step.png")
    return written


def _curves(folder: str, rows: list[Row]) -> dict[str, dict[int, list[float]]]:
    """Per method (and library), step -> the evaluated scores of its seeds, read from each run's
    ``log.jsonl`` (``runs/<run>/log.jsonl``; runs evaluated only at the end give a single point)."""
    import json

    curves: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        path = os.path.join(folder, "runs", str(row.get("run")), "log.jsonl")
        metric = row.get("metric_name")
        if not metric or not os.path.isfile(path):
            continue
        label = row["method"] if _library(row) == "peftkit" else f"{row['method']} ({_library(row)})"
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                value = record.get(f"eval_{metric}") if isinstance(record, dict) else None
                if record.get("kind") == "eval" and isinstance(value, (int, float)):
                    curves.setdefault(label, {}).setdefault(int(record["step"]), []).append(float(value))
    return {label: points for label, points in curves.items() if len(points) > 1}


def _draw_score(ax: Any, rows: list[Row]) -> None:
    import matplotlib

    methods = _ordered([r["method"] for r in rows])
    palette = matplotlib.colormaps["tab20"]
    for (method, library), group in _group(rows, ("method", "library")).items():
        mean, spread, _ = _score(group)
        if mean is None:
            continue
        x = max(group[0]["trainable_params"], 1)
        label = method if library == "peftkit" else f"{method} ({library})"
        color = palette(methods.index(method) % 20)
        ours = library == "peftkit"
        ax.errorbar(
            [x], [mean], yerr=[spread or 0.0], fmt="o" if ours else "x", capsize=3, label=label, color=color,
            markersize=7 if ours else 10,
        )  # fmt: skip
        if ours:
            ax.annotate(method, (x, mean), textcoords="offset points", xytext=(5, 4), fontsize=6, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(next((r.get("metric_name") for r in rows if r.get("metric_name")), "score"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)


def _draw_bars(ax: Any, rows: list[Row], key: str, scale: float, label: str) -> None:
    groups = _group(rows, ("method", "library"))
    names = [m if lib == "peftkit" else f"{m} ({lib})" for m, lib in groups]
    values = [_median(g, key, scale) or 0.0 for g in groups.values()]
    colors = ["tab:blue" if lib == "peftkit" else "tab:orange" for _, lib in groups]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
