"""``peftkit bench``: every method on the same model, data, budget and seeds, one process per run.

A spec is a YAML file::

    base: {model: ..., data: ..., train: ...}          # a run config shared by every run (as for `train`)
    methods:   {lora: {method: {name: lora, r: 8}, train: {lr: 1.0e-3}}, ia3: {...}, ...}
    models:    {minilm: {model: {name_or_path: ...}}}  # optional axis (default: the base's model)
    tasks:     {cola: {metric: mcc, data: {...}}}      # optional axis (default: the base's data)
    precisions: [fp32, bf16, int8, int4]                # optional axis (default: [fp32])
    seeds: [0, 1, 2]
    metric: accuracy                                    # the score column (a task's own ``metric`` wins)
    peer: benchmarks/hf_peft_peer.py                    # optional: the same runs with another library
    threads: 1                                          # optional: torch threads of every run
    sweep: {lr_factors: [0.3, 1, 3], validation_split: 0.1, seed: 0}   # optional, see below
    inference: {batch_size: 32, repeats: 10}
    output_dir: outputs/bench

Each grid point is the deep merge ``base ← model ← task ← method ← precision ← {seed, output_dir}``,
checked like a ``train`` config before anything runs. Each run is a child process (``python -m
peftkit.bench.runner RUN.yaml RESULT.json``) so that its peak memory is its own. A row records:

* **trainable** parameters (receive gradients), **added** parameters (the adapted model's parameter
  count minus the base model's: new tensors, whether or not they merge away; a ``modules_to_save`` head
  counts its trained copy), **stored** parameters and bytes (the saved ``adapter_model.safetensors``);
* **mergeable**: ``merge_and_unload`` succeeded and the merged model's logits equal the adapted model's;
* peak memory (RSS on CPU, ``max_memory_allocated`` on GPU) of the training process, median step time,
  tokens/s, final training loss, the task metrics on the validation data, wall time;
* inference latency (median forward time of one batch) of the base model, the adapted model unmerged and,
  where it merges, merged (measured alternately, so that a change of machine load hits all alike).

**The peer column.** ``peer`` names a Python file (a *peer runner*) that builds the same run with another
PEFT library. peftkit itself never imports that library: the file does, in the child process of each peer
run. A peer runner defines ``NAME`` (the library column's value), ``available() -> bool``,
``supports(method_config) -> bool`` (given peftkit's config object of a method), ``wrap(base_model,
method_config) -> model`` (the counterpart of :func:`peftkit.get_peft_model`), ``load(base_model, folder)
-> model`` (of ``PeftModel.from_pretrained``) and ``version() -> str``. The repository ships
``benchmarks/hf_peft_peer.py`` for Hugging Face PEFT. Every method the peer supports runs twice per grid
point, once per library, with the same base model, data order, seed and budget.

**The learning-rate sweep.** With ``sweep``, each method first runs once per learning rate ``lr × factor``
(its own ``train.lr`` times each of ``lr_factors``), with one seed, scored on a validation split carved from
the *training* data (``validation_split`` of it; the configured validation set is not read), and the grid's
runs then use, per method, the rate that scored best there. The reported validation set never chooses
anything. Sweep rows are kept (``phase: sweep``) and tabled in the report. A peer library's runs use the
rate chosen for peftkit's (same settings, same budget).

The report (``report.md`` and PNG plots, see :func:`write_report`) is rewritten after every run and can be
rebuilt from the rows with ``peftkit bench --report OUTPUT_DIR``.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import yaml

from peftkit.core.io_utils import atomic_write, atomic_write_text
from peftkit.train.runconfig import RunConfigError, build_method_config, build_run_config, load_yaml_config

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
    "metric",
    "peer",
    "threads",
    "sweep",
    "inference",
    "output_dir",
    "timeout_s",
)
LIBRARY = "peftkit"
PEER_FUNCTIONS = ("available", "supports", "wrap", "load", "version")
PEER_ENV = "PEFTKIT_BENCH_PEER"
THREADS_ENV = "PEFTKIT_BENCH_THREADS"


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
    task_metrics: dict[str, str] = field(default_factory=dict)  # a task's own ``metric``
    peer: str | None = None  # path of a peer runner (see the module docstring)
    threads: int | None = None
    sweep: dict[str, Any] | None = None  # {lr_factors, validation_split, seed}; see the module docstring
    output_dir: str = "outputs/bench"
    timeout_s: int = 3600
    path: str | None = None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, recursively for mappings (lists and values are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_spec(path: str, only: list[str] | None = None, allow_code: bool = False) -> BenchSpec:
    """Read and check a bench spec. A ``peer`` runner is a Python file: it runs (it is imported here and in
    the peer runs) only with ``allow_code`` (``peftkit bench --allow-code``), never on a spec's word alone."""
    if not os.path.isfile(path):
        raise RunConfigError(f"bench spec {path} does not exist.")
    raw = load_yaml_config(path) or {}
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
    clashes = [name for name in raw["methods"] if "-" in str(name)]
    if clashes:
        raise RunConfigError(
            f"bench method name {clashes[0]!r} contains '-'; use '_' (run ids join axes with '-')."
        )
    spec = BenchSpec(base=raw.get("base") or {}, methods=raw["methods"], path=os.path.abspath(path))
    if raw.get("models"):
        spec.models = raw["models"]
    if raw.get("tasks"):
        spec.tasks = {}
        for name, entry in raw["tasks"].items():
            entry = dict(entry)
            if "metric" in entry:
                spec.task_metrics[name] = str(entry.pop("metric"))
            spec.tasks[name] = entry
    if "precisions" in raw:
        bad = [p for p in raw["precisions"] if p not in PRECISIONS]
        if bad:
            raise RunConfigError(f"bench precision {bad[0]!r} is unknown; allowed: {', '.join(PRECISIONS)}.")
        spec.precisions = list(raw["precisions"])
    if "seeds" in raw:
        if not isinstance(raw["seeds"], list) or not all(isinstance(s, int) for s in raw["seeds"]):
            raise RunConfigError("bench seeds must be a list of integers.")
        spec.seeds = list(raw["seeds"])
    if "inference" in raw:
        spec.inference = {**spec.inference, **raw["inference"]}
    if raw.get("metric") is not None:
        spec.metric = str(raw["metric"])
    for where, name in [("metric", spec.metric)] + [
        (f"tasks.{t}.metric", m) for t, m in spec.task_metrics.items()
    ]:
        if name is not None and name not in KNOWN_METRICS:
            raise RunConfigError(f"bench {where} {name!r} is unknown; allowed: {', '.join(KNOWN_METRICS)}.")
    if raw.get("peer") is not None:
        spec.peer = os.path.abspath(str(raw["peer"]))
        if not allow_code:
            raise RunConfigError(
                f"bench spec {path} names a peer runner ({raw['peer']}), a Python file that would run; a spec "
                f"cannot run code on its own: pass --allow-code to run it."
            )
        load_peer(spec.peer)  # a missing file or function is an error now, not after the first runs
    if raw.get("threads") is not None:
        if not isinstance(raw["threads"], int) or raw["threads"] < 1:
            raise RunConfigError(f"bench threads must be a positive integer, not {raw['threads']!r}.")
        spec.threads = raw["threads"]
    if raw.get("sweep") is not None:
        spec.sweep = _check_sweep(raw["sweep"], spec.seeds)
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


def _check_sweep(raw: Any, seeds: list[int]) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - {"lr_factors", "validation_split", "seed"}:
        raise RunConfigError("bench sweep must be a mapping with lr_factors (and validation_split, seed).")
    factors = raw.get("lr_factors")
    if (
        not isinstance(factors, list)
        or not factors
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)
    ):
        raise RunConfigError("bench sweep.lr_factors must be a non-empty list of positive numbers.")
    split = raw.get("validation_split", 0.1)
    if not isinstance(split, (int, float)) or not 0 < split < 1:
        raise RunConfigError(f"bench sweep.validation_split must be between 0 and 1, not {split!r}.")
    seed = raw.get("seed", seeds[0])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RunConfigError(f"bench sweep.seed must be an integer, not {seed!r}.")
    return {"lr_factors": [float(f) for f in factors], "validation_split": float(split), "seed": seed}


def load_peer(path: str) -> ModuleType:
    """Import a peer runner from its file (see the module docstring for what it defines)."""
    if not os.path.isfile(path):
        raise RunConfigError(
            f"bench peer {path} does not exist (a Python file, e.g. benchmarks/hf_peft_peer.py)."
        )
    module_spec = importlib.util.spec_from_file_location("peftkit_bench_peer", path)
    if module_spec is None or module_spec.loader is None:
        raise RunConfigError(f"bench peer {path} is not an importable Python file.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    missing = [name for name in ("NAME", *PEER_FUNCTIONS) if not hasattr(module, name)]
    if missing:
        raise RunConfigError(
            f"bench peer {path} does not define {', '.join(missing)} (needs NAME and {', '.join(PEER_FUNCTIONS)})."
        )
    return module


def _base_lr(raw: dict[str, Any]) -> float:
    from peftkit.train.runconfig import TrainSection

    return float((raw.get("train") or {}).get("lr", TrainSection.lr))


def expand_sweep(spec: BenchSpec) -> list[BenchRun]:
    """The learning-rate sweep's runs (see the module docstring): per model, task, method and precision, one
    run per factor, one seed, validated on a split carved from the training data."""
    assert spec.sweep is not None
    runs = []
    seed = spec.sweep["seed"]
    for (model, model_cfg), (task, task_cfg), (method, method_cfg), precision in itertools.product(
        spec.models.items(), spec.tasks.items(), spec.methods.items(), spec.precisions
    ):
        raw = spec.base
        for layer in (model_cfg, task_cfg, method_cfg, PRECISIONS[precision]):
            raw = deep_merge(raw, layer)
        for factor in spec.sweep["lr_factors"]:
            lr = _base_lr(raw) * factor
            run_raw = deep_merge(raw, {"train": {"seed": seed, "progress_bar": False, "lr": lr}})
            run_raw["data"] = {
                **run_raw.get("data", {}),
                "validation": None,
                "validation_split": spec.sweep["validation_split"],
            }
            parts = [model, task, method, precision, f"sweep-lr{lr:.3g}", f"seed{seed}"]
            run_id = "-".join(p for p in parts if p != "base")
            try:
                build_run_config(copy.deepcopy(run_raw))
            except RunConfigError as err:
                raise RunConfigError(f"bench run {run_id}: {err}") from None
            run_raw["output_dir"] = os.path.join(spec.output_dir, "runs", run_id)
            axes = {
                "model": model,
                "task": task,
                "method": method,
                "library": LIBRARY,
                "precision": precision,
                "seed": seed,
                "phase": "sweep",
                "lr": lr,
            }
            runs.append(BenchRun(run_id, axes, run_raw))
    return runs


LOWER_IS_BETTER = ("perplexity", "loss")


def choose_lrs(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], float]:
    """Per (model, task, method, precision), the sweep's learning rate with the best validation score (the
    lower rate on a tie); a point whose sweep runs all failed keeps its configured rate (absent here)."""
    best: dict[tuple[str, str, str, str], tuple[float, float]] = {}
    for row in rows:
        if row.get("phase") != "sweep" or row.get("status") != "ok" or row.get("metric") is None:
            continue
        key = (row["model"], row["task"], row["method"], row["precision"])
        sign = -1.0 if row.get("metric_name") in LOWER_IS_BETTER else 1.0
        candidate = (sign * float(row["metric"]), -float(row["lr"]))
        if key not in best or candidate > best[key]:
            best[key] = candidate
    return {key: -value[1] for key, value in best.items()}


def expand(spec: BenchSpec, lrs: dict[tuple[str, str, str, str], float] | None = None) -> list[BenchRun]:
    """Every grid point, each checked as a run config (all errors surface before anything runs); with a
    peer runner, a second run per grid point whose method the peer supports. ``lrs``: the learning rate
    the sweep chose per (model, task, method, precision)."""
    peer = load_peer(spec.peer) if spec.peer else None
    if peer is not None and not peer.available():
        print(f"bench: the peer library {peer.NAME} is not installed: no peer column.")
        peer = None
    runs = []
    # seed outermost: a grid cut short holds every method for the seeds it finished
    for seed, (model, model_cfg), (task, task_cfg), (method, method_cfg), precision in itertools.product(
        spec.seeds, spec.models.items(), spec.tasks.items(), spec.methods.items(), spec.precisions
    ):
        raw = spec.base
        for layer in (model_cfg, task_cfg, method_cfg, PRECISIONS[precision]):
            raw = deep_merge(raw, layer)
        raw = deep_merge(raw, {"train": {"seed": seed, "progress_bar": False}})
        chosen_lr = (lrs or {}).get((model, task, method, precision))
        if chosen_lr is not None:
            raw = deep_merge(raw, {"train": {"lr": chosen_lr}})
        libraries = [LIBRARY]
        try:
            run_config = build_run_config(copy.deepcopy(raw))
            if peer is not None and peer.supports(build_method_config(run_config)):
                libraries.append(str(peer.NAME))
        except RunConfigError as err:
            run_id = "-".join(p for p in (model, task, method, precision, f"seed{seed}") if p != "base")
            raise RunConfigError(f"bench run {run_id}: {err}") from None
        for library in libraries:
            library_part = None if library == LIBRARY else library
            parts = [model, task, method, library_part, precision, f"seed{seed}"]
            run_id = "-".join(p for p in parts if p is not None and p != "base")
            run_raw = dict(raw, output_dir=os.path.join(spec.output_dir, "runs", run_id))
            axes = {
                "model": model,
                "task": task,
                "method": method,
                "library": library,
                "precision": precision,
                "seed": seed,
            }
            if spec.sweep is not None:
                axes.update({"phase": "final", "lr": _base_lr(raw)})
            runs.append(BenchRun(run_id, axes, run_raw))
    return runs


# ----------------------------------------------------------------------------------- the parent
def run_bench(spec: BenchSpec, dry_run: bool = False, resume: bool = False) -> list[dict[str, Any]]:
    """Run every grid point; with ``resume``, a run whose folder already holds a result for the same
    config is reused instead of run again (an interrupted grid goes on where it stopped)."""
    sweep = expand_sweep(spec) if spec.sweep is not None else []
    runs = expand(spec)
    print(f"bench: {len(sweep) + len(runs)} runs -> {spec.output_dir}")
    if dry_run:
        for run in sweep:
            print(f"  {run.run_id}")
        for run in runs:
            print(f"  {run.run_id}" + ("  (at the learning rate the sweep chooses)" if sweep else ""))
        return []
    os.makedirs(os.path.join(spec.output_dir, "runs"), exist_ok=True)
    meta = _bench_meta(spec)
    atomic_write_text(os.path.join(spec.output_dir, "bench_meta.json"), json.dumps(meta, indent=1))
    rows: list[dict[str, Any]] = []
    total = len(sweep) + len(runs)
    for index, run in enumerate(sweep, 1):
        _execute(spec, run, rows, meta, f"{index}/{total}", resume)
    if sweep:
        chosen = choose_lrs(rows)
        for key, lr in chosen.items():
            print(f"sweep: {'-'.join(p for p in key if p not in ('base', 'fp32'))} -> lr {lr:.3g}")
        runs = expand(spec, chosen)
    for index, run in enumerate(runs, len(sweep) + 1):
        _execute(spec, run, rows, meta, f"{index}/{total}", resume)
    print(f"report: {os.path.join(spec.output_dir, 'report.md')} (rows in results.jsonl and results.csv)")
    return rows


def _execute(
    spec: BenchSpec,
    run: BenchRun,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    position: str,
    resume: bool,
) -> None:
    """Run (or, with ``resume``, reuse) one grid point and add its row to ``rows`` (the results are rewritten)."""
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
        print(f"[{position}] {run.run_id}: reused\n    {_row_line(row)}", flush=True)
        rows.append(row)
        write_results(spec.output_dir, rows, meta)
        return
    atomic_write_text(config_path, config_text)
    if os.path.exists(result_path):
        os.remove(result_path)
    print(f"[{position}] {run.run_id} ...", flush=True)
    started = time.perf_counter()
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "PEFTKIT_BENCH_REPEATS": str(spec.inference["repeats"]),
        "PEFTKIT_BENCH_BATCH": str(spec.inference["batch_size"]),
    }
    env.pop(PEER_ENV, None)
    if run.axes["library"] != LIBRARY:
        env[PEER_ENV] = str(spec.peer)
    if spec.threads is not None:
        env.update({THREADS_ENV: str(spec.threads), "OMP_NUM_THREADS": str(spec.threads)})
    with open(os.path.join(run_dir, "bench.log"), "w", encoding="utf-8") as log:
        try:
            process = subprocess.run(
                [sys.executable, "-m", "peftkit.bench.runner", config_path, result_path],
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
            result = json.load(f)
        result["wall_seconds"] = wall_seconds  # kept with the result, so that --resume reports it too
        atomic_write_text(result_path, json.dumps(result, indent=1))
        row.update(result)
        row["status"] = "ok"
        _choose_metric(row, spec)
    else:
        row["status"] = "failed" if returncode != -1 else "timeout"
        row["error"] = _last_error_line(os.path.join(run_dir, "bench.log"))
    row["wall_seconds"] = wall_seconds
    print(f"    {_row_line(row)}", flush=True)
    rows.append(row)
    write_results(spec.output_dir, rows, meta)


def _bench_meta(spec: BenchSpec) -> dict[str, Any]:
    import torch
    import transformers

    import peftkit

    return {
        "spec": spec.path,
        "command": "peftkit bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "peftkit": getattr(peftkit, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (", CUDA" if torch.cuda.is_available() else ""),
        "threads": spec.threads,
        "seeds": spec.seeds,
        "inference": spec.inference,
    }


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


MAIN_METRIC = ("accuracy", "pearson", "perplexity", "loss")
KNOWN_METRICS = (
    "accuracy",
    "f1",
    "mcc",
    "pearson",
    "spearman",
    "perplexity",
    "loss",
)  # see peftkit.train.metrics


def _choose_metric(row: dict[str, Any], spec: BenchSpec) -> None:
    metrics = row["metrics"]
    name = spec.task_metrics.get(row["task"]) or spec.metric
    if name is None:
        name = next((m for m in MAIN_METRIC if m in metrics), None)
    row["metric_name"], row["metric"] = name, metrics.get(name)


def _last_error_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _row_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    metric = row.get("metric")
    return (
        f"{row.get('metric_name')} {metric if metric is not None else float('nan'):.4f}, "
        f"trainable {row['trainable_params']:,}, step {row['median_step_seconds'] * 1000:.0f} ms, "
        f"peak {row['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


COLUMNS = [
    "run", "model", "task", "method", "library", "precision", "seed", "status", "metric_name", "metric",
    "trainable_params", "added_params", "stored_params", "stored_bytes", "base_params", "mergeable",
    "peak_memory_bytes", "median_step_seconds", "tokens_per_second", "final_train_loss", "latency_base_ms",
    "latency_unmerged_ms", "latency_merged_ms", "wall_seconds", "error",
]  # fmt: skip


def write_results(folder: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """results.jsonl (everything), results.csv (the columns above), then the report (report.md and its
    plots, :func:`write_report`)."""
    atomic_write_text(os.path.join(folder, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(os.path.join(folder, "results.csv"), write_csv)
    from peftkit.bench.report import write_report

    write_report(folder, rows, meta)


def rebuild_report(folder: str) -> str:
    """``peftkit bench --report FOLDER``: the report again from ``results.jsonl`` (and ``bench_meta.json``)."""
    from peftkit.bench.report import write_report

    rows_path = os.path.join(folder, "results.jsonl")
    if not os.path.isfile(rows_path):
        raise RunConfigError(f"{folder} holds no results.jsonl (the output_dir of a peftkit bench run?).")
    rows = []
    with open(rows_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RunConfigError(f"{rows_path} line {number} is not JSON: {err}") from None
    meta_text = _read(os.path.join(folder, "bench_meta.json"))
    meta = json.loads(meta_text) if meta_text else None
    return write_report(folder, rows, meta)


# ------------------------------------------------------------------------------------ the child
def run_one(config_path: str, result_path: str) -> None:
    """Train one grid point, then measure stored size, mergeability and inference latency. With
    ``PEFTKIT_BENCH_PEER`` set, the peer runner named there builds and loads the adapted model."""
    import torch
    from transformers import logging as hf_logging

    import peftkit
    from peftkit.core.peft_model import PeftModel
    from peftkit.train.loop import train
    from peftkit.train.runconfig import load_run_config

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    config = load_run_config(config_path)
    peer_path = os.environ.get(PEER_ENV)
    if peer_path:
        peer = load_peer(peer_path)
        wrap, load, library, version = peer.wrap, peer.load, str(peer.NAME), str(peer.version())
    else:
        wrap, load = None, PeftModel.from_pretrained
        library, version = LIBRARY, str(getattr(peftkit, "__version__", "?"))
    summary = train(config, wrap=wrap)
    result = {
        "library": library,
        "library_version": version,
        "threads": torch.get_num_threads(),
        "trainable_params": summary["trainable_params"],
        "all_params": summary["all_params"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "median_step_seconds": summary["median_step_seconds"],
        "tokens_per_second": summary["tokens_per_second"],
        "final_train_loss": summary["final_train_loss"],
        "train_seconds": summary["seconds"],
        "metrics": summary["metrics"],
    }
    result.update(_probe(config, summary, load))
    atomic_write_text(result_path, json.dumps(result, indent=1))


def _probe(config: Any, summary: dict[str, Any], load: Any) -> dict[str, Any]:
    """Stored size, base parameter count, mergeability and latencies of the trained adapter in
    ``config.output_dir`` (``load(base, folder)`` loads it onto a fresh base model)."""
    import dataclasses

    import torch

    from peftkit.core.tuner import count_parameters
    from peftkit.train.loop import make_batch, prepare_task
    from peftkit.train.models import load_base_model, load_tokenizer

    folder = config.output_dir
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
    result: dict[str, Any] = {
        "base_params": base_params,
        **counts_of(summary["trainable_params"], summary["all_params"], base_params, folder),
    }
    adapted = load(fresh_base(), folder).eval()
    # per-row inputs of the method (task ids) are for the adapted model only
    base_batch = {k: v for k, v in batch.items() if k not in task.row_inputs}
    inputs = {"base": base_batch, "unmerged": batch, "merged": base_batch}
    times = latencies({"base": base, "unmerged": adapted}, inputs, repeats)
    with torch.no_grad():
        unmerged_logits = adapted(**batch).logits.float()
    try:
        merged = adapted.merge_and_unload(safe_merge=True).eval()
        with torch.no_grad():
            difference = float((merged(**base_batch).logits.float() - unmerged_logits).abs().max())
        result["merge_max_abs_difference"] = difference
        result["mergeable"] = difference < 1e-3
        if result["mergeable"]:
            times_merged = latencies({"base": base, "merged": merged}, inputs, repeats)
            times["merged"] = times_merged["merged"]
            times["base"] += times_merged["base"]
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as err:
        result.update(mergeable=False, merge_error=str(err)[:200])
    result["latency_base_ms"] = statistics.median(times["base"]) * 1000
    result["latency_unmerged_ms"] = statistics.median(times["unmerged"]) * 1000
    result["latency_merged_ms"] = statistics.median(times["merged"]) * 1000 if "merged" in times else None
    return result


def latencies(
    models: dict[str, Any], inputs: dict[str, dict[str, Any]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` forward passes of each model on its batch (``inputs[name]``), the models
    taking turns (one warm-up pass each first), so that a change in the machine's load hits every model
    alike."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model(**inputs[name])
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs[name])
                times[name].append(time.perf_counter() - start)
    return times


def stored_size(adapter_dir: str) -> tuple[int, int]:
    """``(parameters, bytes)`` of the saved ``adapter_model.safetensors`` in ``adapter_dir`` (parameters
    counted from the tensor shapes in the file's header)."""
    from safetensors import safe_open

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    stored = 0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            stored += n
    return stored, os.path.getsize(weights)


def parameter_counts(adapted: Any, base_params: int, adapter_dir: str) -> dict[str, int]:
    """The three counts of a bench row for an adapted model, its base model's parameter count (taken
    before adapting) and the folder it was saved to:

    * ``trainable_params``: parameters with ``requires_grad`` (what the optimizer updates);
    * ``added_params``: the adapted model's parameters minus the base model's (new tensors, mergeable or
      not; a ``modules_to_save`` copy counts);
    * ``stored_params`` / ``stored_bytes``: what ``adapter_model.safetensors`` holds.

    ``peftkit bench`` computes exactly these (trainable and all parameters during training, the base
    model's count and the file afterwards)."""
    from peftkit.core.tuner import count_parameters

    trainable, total = count_parameters(adapted)
    return counts_of(trainable, total, base_params, adapter_dir)


def counts_of(trainable: int, total: int, base_params: int, adapter_dir: str) -> dict[str, int]:
    """The three counts from the adapted model's trainable and total parameter counts (taken during
    training, by :func:`peftkit.core.tuner.count_parameters`), the base model's count and the saved folder."""
    stored, stored_bytes = stored_size(adapter_dir)
    return {
        "trainable_params": trainable,
        "added_params": total - base_params,
        "stored_params": stored,
        "stored_bytes": stored_bytes,
    }


def config_batch(config: Any) -> int:
    return int(os.environ.get("PEFTKIT_BENCH_BATCH", config.train.eval_batch_size))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(
            "usage: python -m peftkit.bench.runner RUN.yaml RESULT.json (started by peftkit bench)"
        )
    run_one(sys.argv[1], sys.argv[2])
