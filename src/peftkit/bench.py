"""``peftkit bench``: every method on the same model, data, budget and seeds, one process per run.

A spec is a YAML file::

    base: {model: ..., data: ..., train: ...}          # a run config shared by every run (as for `train`)
    methods:   {lora: {method: {name: lora, r: 8}, train: {lr: 1.0e-3}}, ia3: {...}, ...}
    models:    {minilm: {model: {name_or_path: ...}}}  # optional axis (default: the base's model)
    tasks:     {sst2: {data: {...}}}                   # optional axis (default: the base's data)
    precisions: [fp32, bf16, int8, int4]                # optional axis (default: [fp32])
    seeds: [0, 1, 2]
    inference: {batch_size: 32, repeats: 10}
    output_dir: outputs/bench

Each grid point is the deep merge ``base ← model ← task ← method ← precision ← {seed, output_dir}``,
checked like a ``train`` config before anything runs. Each run is a child process (``python -m
peftkit.bench RUN.yaml RESULT.json``) so that its peak memory is its own. A row records:

* **trainable** parameters (receive gradients), **added** parameters (the adapted model's parameter
  count minus the base model's: new tensors, whether or not they merge away; a ``modules_to_save`` head
  counts its trained copy), **stored** parameters and bytes (the saved ``adapter_model.safetensors``);
* **mergeable**: ``merge_and_unload`` succeeded and the merged model's logits equal the adapted model's;
* peak memory (RSS on CPU, ``max_memory_allocated`` on GPU) of the training process, median step time,
  tokens/s, final training loss, the task metrics on the validation data, wall time;
* inference latency (median forward time of one batch) of the base model, the adapted model unmerged and,
  where it merges, merged.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from peftkit.io_utils import atomic_write_text
from peftkit.runconfig import RunConfigError, build_run_config

PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {"model": {"dtype": "float32"}},
    "bf16": {"model": {"dtype": "bfloat16"}},
    "int8": {"model": {"load_in_8bit": True}},
    "int4": {"model": {"load_in_4bit": True}},
}
SPEC_KEYS = (
    "base",
    "methods",
    "models",
    "tasks",
    "precisions",
    "seeds",
    "inference",
    "output_dir",
    "timeout_s",
)


@dataclass
class BenchRun:
    run_id: str
    axes: dict[str, Any]
    raw: dict[str, Any]


@dataclass
class BenchSpec:
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {"base": {}})
    tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"base": {}})
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    seeds: list[int] = field(default_factory=lambda: [0])
    inference: dict[str, int] = field(default_factory=lambda: {"batch_size": 32, "repeats": 10})
    metric: str | None = None  # the score column; default: accuracy, pearson or perplexity, as measured
    output_dir: str = "outputs/bench"
    timeout_s: int = 3600


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, recursively for mappings (lists and values are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_spec(path: str, only: list[str] | None = None) -> BenchSpec:
    if not os.path.isfile(path):
        raise RunConfigError(f"bench spec {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise RunConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path} must hold a mapping with keys {', '.join(SPEC_KEYS)}.")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise RunConfigError(f"unknown bench key {unknown[0]!r}; allowed: {', '.join(SPEC_KEYS)}.")
    if not isinstance(raw.get("methods"), dict) or not raw["methods"]:
        raise RunConfigError("bench spec: methods must map run names to partial run configs (method: ...).")
    for axis in ("methods", "models", "tasks"):
        if axis in raw and not all(isinstance(v, dict) for v in raw[axis].values()):
            raise RunConfigError(
                f"bench spec: every entry of {axis} must be a mapping (a partial run config)."
            )
    spec = BenchSpec(base=raw.get("base") or {}, methods=raw["methods"])
    for key in ("models", "tasks"):
        if raw.get(key):
            setattr(spec, key, raw[key])
    if "precisions" in raw:
        bad = [p for p in raw["precisions"] if p not in PRECISIONS]
        if bad:
            raise RunConfigError(f"bench precision {bad[0]!r} is unknown; allowed: {', '.join(PRECISIONS)}.")
        spec.precisions = list(raw["precisions"])
    if "seeds" in raw:
        if not all(isinstance(s, int) for s in raw["seeds"]):
            raise RunConfigError("bench seeds must be a list of integers.")
        spec.seeds = list(raw["seeds"])
    if "inference" in raw:
        spec.inference = {**spec.inference, **raw["inference"]}
    spec.metric = raw.get("metric")
    spec.output_dir = raw.get("output_dir", spec.output_dir)
    spec.timeout_s = int(raw.get("timeout_s", spec.timeout_s))
    if only:
        missing = [m for m in only if m not in spec.methods]
        if missing:
            raise RunConfigError(
                f"--only names {missing[0]!r}, which the spec does not have; methods: {', '.join(spec.methods)}."
            )
        spec.methods = {m: spec.methods[m] for m in only}
    return spec


def expand(spec: BenchSpec) -> list[BenchRun]:
    """Every grid point, each checked as a run config (all errors surface before anything runs)."""
    runs = []
    for (model, model_cfg), (task, task_cfg), (method, method_cfg), precision, seed in itertools.product(
        spec.models.items(), spec.tasks.items(), spec.methods.items(), spec.precisions, spec.seeds
    ):
        parts = [part for part in (model, task, method, precision, f"seed{seed}") if part != "base"]
        run_id = "-".join(parts)
        raw = spec.base
        for layer in (model_cfg, task_cfg, method_cfg, PRECISIONS[precision]):
            raw = deep_merge(raw, layer)
        raw = deep_merge(raw, {"train": {"seed": seed, "progress_bar": False}})
        raw["output_dir"] = os.path.join(spec.output_dir, "runs", run_id)
        try:
            build_run_config(copy.deepcopy(raw))
        except RunConfigError as err:
            raise RunConfigError(f"bench run {run_id}: {err}") from None
        axes = {"model": model, "task": task, "method": method, "precision": precision, "seed": seed}
        runs.append(BenchRun(run_id, axes, raw))
    return runs


# ----------------------------------------------------------------------------------- the parent
def run_bench(spec: BenchSpec, dry_run: bool = False, resume: bool = False) -> list[dict[str, Any]]:
    """Run every grid point; with ``resume``, a run whose folder already holds a result for the same
    config is reused instead of run again."""
    runs = expand(spec)
    print(f"bench: {len(runs)} runs -> {spec.output_dir}")
    if dry_run:
        for run in runs:
            print(f"  {run.run_id}")
        return []
    os.makedirs(os.path.join(spec.output_dir, "runs"), exist_ok=True)
    rows: list[dict[str, Any]] = []
    for index, run in enumerate(runs, 1):
        run_dir = run.raw["output_dir"]
        os.makedirs(run_dir, exist_ok=True)
        config_path = os.path.join(run_dir, "bench_run.yaml")
        result_path = os.path.join(run_dir, "bench_result.json")
        config_text = yaml.safe_dump(run.raw, sort_keys=False)
        reusable = resume and os.path.isfile(result_path) and _read(config_path) == config_text
        row: dict[str, Any] = {"run": run.run_id, **run.axes}
        if reusable:
            with open(result_path, encoding="utf-8") as f:
                row.update(json.load(f))
            row["status"] = "ok"
            _choose_metric(row, spec)
            print(f"[{index}/{len(runs)}] {run.run_id}: reused\n    {_row_line(row)}", flush=True)
            rows.append(row)
            write_results(spec.output_dir, rows)
            continue
        atomic_write_text(config_path, config_text)
        if os.path.exists(result_path):
            os.remove(result_path)
        print(f"[{index}/{len(runs)}] {run.run_id} ...", flush=True)
        started = time.perf_counter()
        env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "PEFTKIT_BENCH_REPEATS": str(spec.inference["repeats"]),
            "PEFTKIT_BENCH_BATCH": str(spec.inference["batch_size"]),
        }
        with open(os.path.join(run_dir, "bench.log"), "w", encoding="utf-8") as log:
            try:
                process = subprocess.run(
                    [sys.executable, "-m", "peftkit.bench", config_path, result_path],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=spec.timeout_s,
                )
                returncode = process.returncode
            except subprocess.TimeoutExpired:
                returncode = -1
        wall_seconds = time.perf_counter() - started
        if returncode == 0 and os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                row.update(json.load(f))
            row["status"] = "ok"
            _choose_metric(row, spec)
        else:
            row["status"] = "failed" if returncode != -1 else "timeout"
            row["error"] = _last_error_line(os.path.join(run_dir, "bench.log"))
        row["wall_seconds"] = wall_seconds
        print(f"    {_row_line(row)}", flush=True)
        rows.append(row)
        write_results(spec.output_dir, rows)
    print(f"results: {os.path.join(spec.output_dir, 'results.md')} (and .csv, .jsonl, .png)")
    return rows


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _choose_metric(row: dict[str, Any], spec: BenchSpec) -> None:
    metrics = row["metrics"]
    name = spec.metric or next((m for m in MAIN_METRIC if m in metrics), None)
    row["metric_name"], row["metric"] = name, metrics.get(name)


def _last_error_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _row_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    metric = row.get("metric_name")
    return (
        f"{metric} {row.get('metric', float('nan')):.4f}, trainable {row['trainable_params']:,}, "
        f"step {row['median_step_seconds'] * 1000:.0f} ms, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


MAIN_METRIC = ("accuracy", "pearson", "perplexity", "loss")
COLUMNS = [
    "run", "model", "task", "method", "precision", "seed", "status", "metric_name", "metric",
    "trainable_params", "added_params", "stored_params", "stored_bytes", "mergeable", "peak_memory_bytes",
    "median_step_seconds", "tokens_per_second", "final_train_loss", "latency_base_ms",
    "latency_unmerged_ms", "latency_merged_ms", "wall_seconds", "error",
]  # fmt: skip


def write_results(folder: str, rows: list[dict[str, Any]]) -> None:
    """results.jsonl (everything), results.csv (the columns above), results.md (a table with the mean and
    spread over seeds) and results.png (score against trainable parameters)."""
    atomic_write_text(os.path.join(folder, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    tmp = os.path.join(folder, "results.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(folder, "results.csv"))
    atomic_write_text(os.path.join(folder, "results.md"), results_table(rows))
    ok = [r for r in rows if r["status"] == "ok" and r.get("metric") is not None]
    if ok:
        _plot(os.path.join(folder, "results.png"), ok)


def results_table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["method"], row["precision"]), []).append(row)
    lines = [
        "| model | task | method | precision | metric (mean ± sd over seeds) | trainable | added | stored | "
        "mergeable | peak MiB | step ms | tokens/s | latency base / unmerged / merged ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, task, method, precision), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        if not ok:
            lines.append(
                f"| {model} | {task} | {method} | {precision} | {group[0]['status']}: {group[0].get('error', '')} |||||||||"
            )
            continue
        scores = [r["metric"] for r in ok]
        spread = f" ± {statistics.stdev(scores):.4f}" if len(scores) > 1 else ""
        first = ok[0]
        merged = f"{statistics.median(r['latency_merged_ms'] for r in ok):.1f}" if first["mergeable"] else "–"
        lines.append(
            f"| {model} | {task} | {method} | {precision} | {first['metric_name']} {statistics.mean(scores):.4f}{spread} "
            f"(n={len(ok)}) | {first['trainable_params']:,} | {first['added_params']:,} | {first['stored_params']:,} "
            f"({first['stored_bytes'] / 1024:.0f} KiB) | {'yes' if first['mergeable'] else 'no'} | "
            f"{statistics.median(r['peak_memory_bytes'] for r in ok) / 2**20:.0f} | "
            f"{statistics.median(r['median_step_seconds'] for r in ok) * 1000:.0f} | "
            f"{statistics.median(r['tokens_per_second'] for r in ok):.0f} | "
            f"{statistics.median(r['latency_base_ms'] for r in ok):.1f} / "
            f"{statistics.median(r['latency_unmerged_ms'] for r in ok):.1f} / {merged} |"
        )
    return "\n".join(lines) + "\n"


def _plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(f"{row['method']} ({row['precision']})", []).append(row)
    for label, group in by_method.items():
        ax.scatter([max(r["trainable_params"], 1) for r in group], [r["metric"] for r in group], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(rows[0]["metric_name"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ the child
def run_one(config_path: str, result_path: str) -> None:
    """Train one grid point, then measure stored size, mergeability and inference latency."""
    from transformers import logging as hf_logging

    from peftkit.runconfig import load_run_config
    from peftkit.training import train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = load_run_config(config_path)
    summary = train(config)
    result = {
        "trainable_params": summary["trainable_params"],
        "all_params": summary["all_params"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "median_step_seconds": summary["median_step_seconds"],
        "tokens_per_second": summary["tokens_per_second"],
        "final_train_loss": summary["final_train_loss"],
        "train_seconds": summary["seconds"],
        "metrics": summary["metrics"],
    }
    result.update(_probe(config, summary))
    atomic_write_text(result_path, json.dumps(result, indent=1))


def _probe(config: Any, summary: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    import torch
    from safetensors import safe_open

    from peftkit.loading import load_base_model, load_tokenizer
    from peftkit.peft_model import PeftModel
    from peftkit.training import make_batch, prepare_task
    from peftkit.tuner import count_parameters

    folder = config.output_dir
    weights = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as f:
        stored = 0
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            stored += n
    model_section = config.model
    if model_section.from_config is not None:
        model_section = dataclasses.replace(
            model_section, from_config=None, name_or_path=os.path.join(folder, "base_model"), tokenizer=None
        )
    tokenizer = load_tokenizer(model_section)
    task = prepare_task(config, tokenizer)
    problem_type = "regression" if task.data_format == "regression" else None
    num_labels = task.labels.num_labels

    def fresh_base() -> Any:
        return load_base_model(
            model_section, num_labels=num_labels, problem_type=problem_type, tokenizer=tokenizer
        ).eval()

    base = fresh_base()
    base_params = count_parameters(base)[1]
    examples = (task.eval_examples or task.train_examples)[: int(config_batch(config))]
    batch = make_batch(examples, tokenizer.pad_token_id, torch.device("cpu"))
    batch.pop("labels", None)
    repeats = int(os.environ.get("PEFTKIT_BENCH_REPEATS", "10"))

    def latency_ms(model: Any) -> float:
        times = []
        with torch.no_grad():
            model(**batch)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    result: dict[str, Any] = {
        "stored_params": stored,
        "stored_bytes": os.path.getsize(weights),
        "added_params": summary["all_params"] - base_params,
        "latency_base_ms": latency_ms(base),
    }
    adapted = PeftModel.from_pretrained(base, folder).eval()
    result["latency_unmerged_ms"] = latency_ms(adapted)
    with torch.no_grad():
        unmerged_logits = adapted(**batch).logits.float()
    try:
        merged = adapted.merge_and_unload(safe_merge=True).eval()
        with torch.no_grad():
            difference = float((merged(**batch).logits.float() - unmerged_logits).abs().max())
        result["merge_max_abs_difference"] = difference
        result["mergeable"] = difference < 1e-3
        result["latency_merged_ms"] = latency_ms(merged) if result["mergeable"] else None
    except (ValueError, NotImplementedError, RuntimeError) as err:
        result.update(mergeable=False, latency_merged_ms=None, merge_error=str(err)[:200])
    return result


def config_batch(config: Any) -> int:
    return int(os.environ.get("PEFTKIT_BENCH_BATCH", config.train.eval_batch_size))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m peftkit.bench RUN.yaml RESULT.json (started by peftkit bench)")
    run_one(sys.argv[1], sys.argv[2])
