"""Many LoRA adapters in one batch, and hot-swapping adapters: peftkit vs. HF PEFT, in one process.

Model: llama-style from a config (hidden 512, 4 layers, intermediate 1376, 8 heads, vocab 8000; no
download), fp32, inference mode. 64 LoRA adapters, ``r=8``, ``lora_alpha=16`` on the attention projections
(``q_proj, k_proj, v_proj, o_proj``), with random ``B`` so that every adapter changes the output.

**Mixed batches.** 64 rows of 16 (and 64) tokens; the rows are spread over K = 1, 4, 16, 64 distinct
adapters (``adapter_names=`` one per row). Compared with the same batch through a single active adapter
(``set_adapter``, no ``adapter_names``) and through the base model alone. All variants run in this one
process, their calls interleaved round by round (the machine's load changes over seconds; interleaving
exposes every variant to the same conditions), and we report medians. Before timing, each library's
mixed-batch output is checked against per-adapter forward passes of the same rows.

**Hot-swapping.** Time to replace the active adapter's weights with another saved adapter:
``peftkit.hotswap_adapter`` (in place, same modules) against HF PEFT's ``load_adapter`` + ``set_adapter``
(and its own ``hotswap_adapter`` when available), plus the time of ``set_adapter`` between two loaded
adapters.

    python benchmarks/mixed_adapters.py                       # defaults: 10 timed rounds
    python benchmarks/mixed_adapters.py --rounds 20 --threads 2 --json out.json
    python benchmarks/mixed_adapters.py --threads 1 --cpu-time     # on a busy machine: CPU time, 1 thread
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SRC_DIR = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC_DIR))  # benchmark the checkout, installed or not

import torch  # noqa: E402

NUM_ADAPTERS, ROWS, VOCAB = 64, 64, 8000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=4,
        intermediate_size=1376,
        vocab_size=VOCAB,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def add_adapters(library: str, base: Any, count: int) -> Any:
    """``count`` adapters named ``a0 ... a{count-1}`` with seeded random B (A has LoRA's default init)."""
    if library == "peftkit":
        from peftkit import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the same values in both libraries: parameters are filled by name
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()


def row_adapters(distinct: int) -> list[str]:
    return [f"a{i % distinct}" for i in range(ROWS)]


@torch.no_grad()
def check_mixed(model: Any, input_ids: torch.Tensor, names: list[str]) -> float:
    """Largest |mixed-batch logits - per-adapter logits| over the rows."""
    mixed = model(input_ids=input_ids, adapter_names=names).logits
    worst = 0.0
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        single = model(input_ids=input_ids[rows]).logits
        worst = max(worst, (mixed[rows] - single).abs().max().item())
    model.set_adapter("a0")
    return worst


def time_mixed(models: dict[str, Any], base: Any, seq_len: int, rounds: int, clock: Any) -> dict[str, Any]:
    input_ids = torch.randint(0, VOCAB, (ROWS, seq_len), generator=torch.Generator().manual_seed(3))
    calls: dict[str, Any] = {"base": lambda: base(input_ids=input_ids)}
    for library, model in models.items():
        calls[f"{library} single"] = lambda m=model: m(input_ids=input_ids)
        for distinct in (1, 4, 16, 64):
            names = row_adapters(distinct)
            calls[f"{library} K={distinct}"] = lambda m=model, n=names: m(
                input_ids=input_ids, adapter_names=n
            )
    errors = {
        f"{library} K={k}": check_mixed(model, input_ids, row_adapters(k))
        for library, model in models.items()
        for k in (4, 64)
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for round_ in range(rounds + 2):  # 2 warm-up rounds
            for name, call in calls.items():
                start = clock()
                call()
                if round_ >= 2:
                    times[name].append(clock() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"seq_len": seq_len, "median_ms": medians, "max_abs_error": errors}


def time_hotswap(base: Any, rounds: int) -> dict[str, float]:
    """Median ms of: peftkit hotswap_adapter; HF load_adapter + set_adapter (+ delete, to keep one
    adapter loaded); HF hotswap_adapter; set_adapter between two loaded adapters, in both libraries."""
    import peft

    import peftkit

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        saved = []
        for i in range(2):
            model = add_adapters("peftkit", base, 1)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ".lora_" in name:
                        param.add_(0.01 * (i + 1))
            path = f"{folder}/adapter{i}"
            model.save_pretrained(path)  # an adapter not named "default" is saved in a subfolder
            saved.append(f"{path}/a0")
        ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), saved[0])
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), saved[0])
        ours.load_adapter(saved[1], adapter_name="other")
        theirs.load_adapter(saved[1], adapter_name="other")
        try:
            from peft.utils.hotswap import hotswap_adapter as hf_hotswap
        except ImportError:  # older HF PEFT
            hf_hotswap = None

        def hf_load_and_set(i: int) -> None:
            theirs.load_adapter(saved[i % 2], adapter_name="swap")
            theirs.set_adapter("swap")
            theirs.set_adapter("default")
            theirs.delete_adapter("swap")

        def timed(name: str, call: Any) -> None:
            start = time.perf_counter()
            call()
            results.setdefault(name, []).append(time.perf_counter() - start)

        for i in range(rounds):
            timed(
                "peftkit hotswap_adapter", lambda i=i: peftkit.hotswap_adapter(ours, saved[i % 2], "default")
            )
            timed("HF load_adapter + set_adapter", lambda i=i: hf_load_and_set(i))
            if hf_hotswap is not None:
                timed("HF hotswap_adapter", lambda i=i: hf_hotswap(theirs, saved[i % 2], "default"))
            timed("peftkit set_adapter", lambda i=i: ours.set_adapter(("default", "other")[i % 2]))
            timed("HF set_adapter", lambda i=i: theirs.set_adapter(("default", "other")[i % 2]))
    return {name: statistics.median(t) * 1e3 for name, t in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time forwards by process CPU time (use with --threads 1 on a busy machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_base()
    models = {library: add_adapters(library, base, NUM_ADAPTERS) for library in ("peftkit", "hf_peft")}
    report: dict[str, Any] = {"mixed": [], "threads": args.threads, "rounds": args.rounds}
    for seq_len in args.seq_lens:
        clock = time.process_time if args.cpu_time else time.perf_counter
        result = time_mixed(models, base, seq_len, args.rounds, clock)
        report["mixed"].append(result)
        medians = result["median_ms"]
        print(f"\n{ROWS} rows x {seq_len} tokens, {NUM_ADAPTERS} adapters loaded; median ms per forward")
        print(f"  base model alone: {medians['base']:.1f}")
        for library in models:
            single = medians[f"{library} single"]
            print(f"  {library}: single active adapter {single:.1f}")
            for k in (1, 4, 16, 64):
                t = medians[f"{library} K={k}"]
                print(
                    f"    K={k:<3} {t:8.1f}   / own single {t / single:5.2f}   / base {t / medians['base']:5.2f}"
                )
        for k in (1, 4, 16, 64):
            ratio = medians[f"hf_peft K={k}"] / medians[f"peftkit K={k}"]
            print(f"  throughput peftkit / HF PEFT at K={k}: {ratio:.2f}x")
        for name, error in result["max_abs_error"].items():
            print(f"  max |mixed - per-adapter| {name}: {error:.2e}")
    swap = time_hotswap(base, args.rounds)
    report["hotswap_ms"] = swap
    print("\nadapter swap on the same model, median ms")
    for name, value in swap.items():
        print(f"  {name:<32} {value:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
