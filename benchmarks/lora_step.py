"""Time one LoRA training step: peftkit vs. HF PEFT vs. a frozen-model lower bound.

One step is forward, causal-LM loss (labels = input_ids), backward, AdamW step and zero_grad on a small
llama-style model built from a config (hidden 512, 8 layers, vocab 8000; no download), fp32, batch 4 x seq
256 of random token ids, LoRA r=8, lora_alpha=16 on all linear layers.

Variants, each run in its own subprocess so that imports, allocator state and peak RSS do not leak between
them:

* ``peftkit``: ``peftkit.get_peft_model`` with ``peftkit.LoraConfig``.
* ``hf_peft``: ``peft.get_peft_model`` with ``peft.LoraConfig`` (the reference implementation).
* ``peftkit-dora`` / ``hf_peft-dora``: the same with ``use_dora=True`` (DoRA's overhead over LoRA).
* ``frozen``: the plain model, every parameter frozen, but the input embeddings' output requires grad
  (``enable_input_require_grads``). Backward therefore still runs through every layer and computes every
  activation gradient, exactly the work LoRA cannot avoid, but no weight gradient, no adapter matmul and no
  optimizer step. No LoRA implementation can be faster, so it is the lower bound; ``X / frozen`` is the
  overhead of adapters plus optimizer.

Each child does ``--warmup`` untimed steps, then ``--steps`` steps timed with ``time.perf_counter``, and
prints one JSON line. Peak RSS is the child process's high-water mark (ru_maxrss), model build included.

    python benchmarks/lora_step.py                        # all three variants
    python benchmarks/lora_step.py --variants hf_peft frozen --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

VARIANTS = ("peftkit", "hf_peft", "frozen", "peftkit-dora", "hf_peft-dora")
DEFAULT_VARIANTS = ("peftkit", "hf_peft", "frozen")
BATCH, SEQ_LEN = 4, 256
RATIOS = (
    ("peftkit", "hf_peft"),
    ("peftkit", "frozen"),
    ("hf_peft", "frozen"),
    ("peftkit-dora", "hf_peft-dora"),
    ("peftkit-dora", "peftkit"),
    ("hf_peft-dora", "hf_peft"),
)
SRC_DIR = Path(__file__).resolve().parent.parent / "src"


def build_model(variant: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1376,
        vocab_size=8000,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    if variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model.train()
    library, _, flavour = variant.partition("-")
    if library == "peftkit":
        sys.path.insert(0, str(SRC_DIR))  # benchmark the checkout, installed or not
        from peftkit import LoraConfig, get_peft_model
    elif library == "hf_peft":
        from peft import LoraConfig, get_peft_model
    else:
        raise ValueError(f"unknown variant {variant!r}")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=flavour == "dora")
    return get_peft_model(model, lora).train()


def peak_rss_mib() -> float:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux


def run_child(variant: str, threads: int, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(variant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    input_ids = torch.randint(0, 8000, (BATCH, SEQ_LEN))

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_times_s": times,
        "peak_rss_mib": peak_rss_mib(),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }


def run_paired(variants: list[str], threads: int, warmup: int, steps: int, cpu_time: bool) -> dict[str, Any]:
    """All variants in this one process, their steps interleaved (A, B, C, A, B, C, ...).

    Load from other processes changes over seconds; interleaving step by step exposes every variant to
    the same conditions, so the per-round ratios are far steadier than ratios of separate runs. Memory is
    not measured here (the models share one process): use the separate-process mode for that.

    With ``cpu_time`` each step is timed by this process's CPU time (``time.process_time``) instead of
    the wall clock: with one thread that is the work done, which other processes on the machine barely
    change (they still share caches and memory bandwidth).
    """
    clock = time.process_time if cpu_time else time.perf_counter
    import torch

    torch.set_num_threads(threads)
    input_ids = torch.randint(0, 8000, (BATCH, SEQ_LEN))
    steps_by_variant = {}
    for variant in variants:
        torch.manual_seed(0)
        model = build_model(variant)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

        def step(model: Any = model, optimizer: Any = optimizer) -> None:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps_by_variant[variant] = step
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(warmup + steps):
        for variant, step in steps_by_variant.items():
            start = clock()
            step()
            if round_ >= warmup:
                times[variant].append(clock() - start)
    ratios = {}
    for num, den in RATIOS:
        if num in times and den in times:
            per_round = [a / b for a, b in zip(times[num], times[den])]
            ratios[f"{num} / {den}"] = statistics.median(per_round)
    return {"median_s": {v: statistics.median(t) for v, t in times.items()}, "ratios": ratios, "times": times}


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; never raises, a failure is returned as ``{"error": ...}``."""
    cmd = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    stderr_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error = stderr_lines[-1].strip() if stderr_lines else f"exit code {proc.returncode}, no result"
    return {"variant": variant, "error": error}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the step times of all repeats of one variant; any failed repeat marks the variant failed."""
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        return {"error": errors[0]}
    times = [t for run in runs for t in run["step_times_s"]]
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "trainable_params": runs[0]["trainable_params"],
    }


def ratio(summary: dict[str, dict[str, Any]], num: str, den: str) -> float | None:
    if "median_s" in summary.get(num, {}) and "median_s" in summary.get(den, {}):
        return summary[num]["median_s"] / summary[den]["median_s"]
    return None


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run as the child
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds over the variants")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="time all variants in one process, steps interleaved (steadier ratios, no memory column)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --paired: time steps by process CPU time (use with --threads 1 on a busy machine)",
    )
    args = parser.parse_args()

    if args.paired:
        result = run_paired(args.variants, args.threads, args.warmup, args.steps, args.cpu_time)
        for variant, median in result["median_s"].items():
            print(f"{variant:<13} median step {median:.3f} s")
        for name, value in result["ratios"].items():
            print(f"{name:<28} {value:.3f}  (median of per-round ratios)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.variant:
        print(json.dumps(run_child(args.variant, args.threads, args.warmup, args.steps)), flush=True)
        return

    runs: list[dict[str, Any]] = []
    for round_ in range(args.repeats):
        for variant in args.variants:
            print(f"[round {round_ + 1}/{args.repeats}] {variant} ...", file=sys.stderr, flush=True)
            runs.append(spawn(variant, args))
    summary = {v: summarize([run for run in runs if run["variant"] == v]) for v in args.variants}
    ratios = {f"{num} / {den}": ratio(summary, num, den) for num, den in RATIOS}

    print(f"{'variant':<13} {'median step s':>14} {'min step s':>11} {'peak RSS MiB':>13} {'trainable':>11}")
    for variant, s in summary.items():
        if "error" in s:
            print(f"{variant:<13} FAILED: {s['error']}")
        else:
            print(
                f"{variant:<13} {s['median_s']:>14.3f} {s['min_s']:>11.3f} "
                f"{s['peak_rss_mib']:>13.0f} {s['trainable_params']:>11,}"
            )
    for name, value in ratios.items():
        if value is not None:
            print(f"{name:<28} {value:.3f}")

    if args.json:
        env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
        for package in ("torch", "transformers", "peft"):
            try:
                env[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                env[package] = None
        settings = {k: getattr(args, k) for k in ("variants", "threads", "warmup", "steps", "repeats")}
        result = {"env": env, "settings": settings, "summary": summary, "ratios": ratios, "runs": runs}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
