"""Memory and step time of LoRA on an fp32, a bf16 and a 4-bit (QLoRA) base: peftkit and HF PEFT.

The model is llama-style, built from a config (hidden 768, 12 layers, intermediate 2048, vocab 32000,
untied head: 134M parameters, 85M of them in the decoder's linear layers; no download) and saved once to
a temporary folder, from which each variant loads it the way a user would:

* ``fp32``: ``from_pretrained(dtype=float32)``;
* ``bf16``: ``from_pretrained(dtype=bfloat16)`` (LoRA factors in float32, as both libraries make them);
* ``4bit``: ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, NF4, double
  quantization, compute dtype float32))`` then ``prepare_model_for_kbit_training(use_gradient_checkpointing
  =False)`` (no checkpointing anywhere, so the variants differ only in the base weights).

LoRA ``r=16, lora_alpha=32`` on every linear layer of the decoder ("all-linear"). A step is forward, causal-LM
loss (labels = input_ids), backward, AdamW step, ``zero_grad`` on batch 2 x seq 128 of random token ids.

Each (library, precision) pair runs in its own subprocess. Reported per variant:

* ``linear weight MiB``: the bytes the base's decoder linear layers hold (a 4-bit weight: its packed bytes
  plus its quantization statistics, the double-quantized absmax included);
* ``peak RSS MiB``: the process's high-water mark while training (reset after loading through
  ``/proc/self/clear_refs``, so loading a checkpoint does not count);
* ``median step s``.

    python benchmarks/qlora_memory.py                  # every variant
    python benchmarks/qlora_memory.py --variants peftkit:4bit peftkit:fp32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = [f"{lib}:{precision}" for precision in ("fp32", "bf16", "4bit") for lib in ("peftkit", "hf_peft")]
BATCH, SEQ_LEN = 2, 128
SRC_DIR = Path(__file__).resolve().parent.parent / "src"


def model_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        vocab_size=32000,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def save_model(folder: str) -> int:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def linear_weight_bytes(model: Any) -> int:
    """Bytes of the decoder's linear weights (packed data + quantization statistics when quantized)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if ".layers." not in name or not isinstance(module, torch.nn.Linear):  # Linear4bit is one too
            continue
        weight = module.weight
        total += weight.data.numel() * weight.data.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None:
                total += nested.absmax.numel() * nested.absmax.element_size() + nested.code.numel() * 4
    return total


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(variant: str, folder: str, warmup: int, steps: int) -> dict[str, Any]:
    import gc

    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    lib_name, precision = variant.split(":")
    if lib_name == "peftkit":
        import peftkit as lib
    else:
        import peft as lib
    kwargs: dict[str, Any] = {}
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        kwargs["dtype"] = torch.float32 if precision == "fp32" else torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(folder, **kwargs)
    if precision == "4bit":
        model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    weight_bytes = linear_weight_bytes(model)
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = lib.get_peft_model(model, config)
    trainable = model.get_nb_trainable_parameters()[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (BATCH, SEQ_LEN), generator=generator)
    model.train()
    gc.collect()
    _reset_peak_rss()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "linear_weight_mib": weight_bytes / 2**20,
        "peak_rss_mib": _peak_rss_mib(),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "trainable": trainable,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.warmup, args.steps)))
        return
    env = dict(os.environ, PYTHONPATH=f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as folder:
        n_params = save_model(folder)
        print(f"model: {n_params / 1e6:.1f}M parameters (llama-style, from config)")
        rows = []
        for variant in args.variants:
            command = [sys.executable, __file__, "--child", variant, "--folder", folder]
            command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"variant": variant, "error": last})
                print(f"{variant}: FAILED ({last})")
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    # the base's bytes do not depend on the library: any fp32 row is the reference
    fp32_rows = [r["linear_weight_mib"] for r in rows if r["variant"].endswith("fp32") and "error" not in r]
    fp32 = fp32_rows[0] if fp32_rows else None
    print()
    print(
        "| variant | linear weight MiB | vs fp32 | peak RSS MiB (training) | median step s | trainable params |"
    )
    print(
        "| ------- | ----------------: | ------: | ----------------------: | ------------: | ---------------: |"
    )
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | FAILED | | | | |")
            continue
        ratio = r["linear_weight_mib"] / fp32 if fp32 else float("nan")
        print(
            f"| {r['variant']} | {r['linear_weight_mib']:.1f} | {ratio:.3f} | {r['peak_rss_mib']:.0f} | "
            f"{r['median_step_s']:.2f} | {r['trainable']:,} |"
        )
    for r in rows:
        if r["variant"].endswith("4bit") and "error" not in r and fp32:
            ratio = r["linear_weight_mib"] / fp32
            assert ratio < 0.3, f"{r['variant']}: 4-bit linear weights are {ratio:.3f}x the fp32 bytes"
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
