"""The ``peftkit`` command line: ``train``, ``eval``, ``merge``, ``generate``, ``bench`` and ``inspect``.

Every error that comes from the user's input (a config key, a file, a method name) is one line on stderr
starting with ``peftkit <command>: error:`` and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print_inspection(info: dict[str, Any]) -> None:
    print(f"adapter folder : {info['folder']}")
    print(f"method         : {info['peft_type']}")
    print(f"task           : {info['task_type']}")
    print(f"base model     : {info['base_model_name_or_path']}")
    print(
        f"parameters     : {info['num_parameters']:,d} in {info['num_tensors']} tensors ({', '.join(info['dtypes'])})"
    )
    print(f"size on disk   : {_human_bytes(info['size_bytes'])} of tensor data")
    skip = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}
    settings = {k: v for k, v in info["config"].items() if k not in skip and v not in (None, {}, [])}
    if info.get("components"):
        settings.pop("components", None)  # printed per component below
    print("config         : " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    if info.get("components"):
        print(f"components     : {len(info['components'])}")
        saved = info["config"].get("components") or []
        for index, (label, numel) in enumerate(info["components"].items()):
            print(f"  {label:<60} {numel:>12,d}")
            if index < len(saved):
                sub = {
                    k: v
                    for k, v in saved[index]["config"].items()
                    if k not in skip and v not in (None, {}, [])
                }
                print("      " + ", ".join(f"{k}={v}" for k, v in sorted(sub.items())))
    print(f"adapted modules: {len(info['adapted_modules'])}")
    for name, numel in info["adapted_modules"].items():
        print(f"  {name:<60} {numel:>12,d}")
    if info["other_tensors"]:
        print(f"other tensors  : {len(info['other_tensors'])} (modules_to_save, biases, embeddings)")
        for name, numel in info["other_tensors"].items():
            print(f"  {name:<60} {numel:>12,d}")
    if info["subadapters"]:
        print(f"more adapters  : {', '.join(info['subadapters'])} (sub-folders)")


def build_parser() -> argparse.ArgumentParser:
    from peftkit import __version__

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="fine-tune a model with any registered method (YAML config)")
    train.add_argument("config", help="a YAML run config (see examples/*.yaml)")
    train.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. method.r=16 train.lr=2e-4"
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    evaluate = sub.add_parser("eval", help="evaluate a saved adapter on the config's validation data")
    evaluate.add_argument("config", help="the YAML run config (its model and data sections are used)")
    evaluate.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    evaluate.add_argument("--adapter", required=True, help="the adapter folder")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    merge = sub.add_parser("merge", help="merge an adapter into its base model and save a plain model")
    merge.add_argument("--adapter", required=True, help="the adapter folder")
    merge.add_argument(
        "--base", help="base model (hub id, folder or package:<module>); default: the adapter's"
    )
    merge.add_argument("--out", required=True, help="output folder for the merged model (must not exist)")
    merge.add_argument("--task", help="task type (default: the adapter's task_type)")
    merge.add_argument("--num-labels", type=int, help="classification labels (default: from the saved head)")

    generate = sub.add_parser("generate", help="generate text with a causal or seq2seq model and an adapter")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--adapter", help="the adapter folder (omit for the base model alone)")
    generate.add_argument("--base", help="base model; default: the adapter's base_model_name_or_path")
    generate.add_argument("--template", choices=["none", "alpaca"], default="none", help="wrap the prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    generate.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser(
        "bench", help="run methods x models x tasks x precisions x seeds, one process each"
    )
    bench.add_argument("spec", nargs="?", help="a bench spec YAML (see examples/bench_sst2.yaml)")
    bench.add_argument(
        "--report",
        metavar="OUTPUT_DIR",
        help="rebuild report.md and the plots of a finished grid from its rows",
    )
    bench.add_argument("--only", help="comma-separated method names of the spec to run")
    bench.add_argument("--dry-run", action="store_true", help="check the spec and list the runs")
    bench.add_argument("--resume", action="store_true", help="reuse finished runs of the same config")
    bench.add_argument("--seeds", help="comma-separated seeds, replacing the spec's")
    bench.add_argument(
        "--allow-code", action="store_true", help="run the Python peer runner the spec names (peer:)"
    )

    inspect = sub.add_parser("inspect", help="describe a saved adapter folder")
    inspect.add_argument("folder", help="a folder written by save_pretrained (peftkit or HF PEFT)")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {
        "train": _train,
        "eval": _eval,
        "merge": _merge,
        "generate": _generate,
        "bench": _bench,
        "inspect": _inspect,
    }
    try:
        return handlers[args.command](args)
    except (OSError, ValueError) as err:  # bad input, a missing file, a full disk: one line, exit 2
        print(f"peftkit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _inspect(args: argparse.Namespace) -> int:
    from peftkit.core.inspection import inspect_adapter

    info = inspect_adapter(args.folder)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_inspection(info)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from peftkit.bench.runner import load_spec, rebuild_report, run_bench

    if args.report:
        if args.spec:
            raise ValueError(
                "pass a spec to run a grid, or --report OUTPUT_DIR to rebuild a report; not both."
            )
        print(f"report: {rebuild_report(args.report)}")
        return 0
    if not args.spec:
        raise ValueError("peftkit bench needs a spec YAML (or --report OUTPUT_DIR).")
    spec = load_spec(args.spec, args.only.split(",") if args.only else None, allow_code=args.allow_code)
    if args.seeds:
        try:
            spec.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r} must be comma-separated integers.") from None
    rows = run_bench(spec, dry_run=args.dry_run, resume=args.resume)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _quiet_transformers() -> None:
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. the expected "classifier weights newly initialized" report
    hf_logging.disable_progress_bar()


def _train(args: argparse.Namespace) -> int:
    from peftkit.train.loop import train
    from peftkit.train.runconfig import load_run_config

    config = load_run_config(args.config, args.overrides)
    _quiet_transformers()
    train(config, resume=True if args.resume else None)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from peftkit.train.loop import evaluate_adapter
    from peftkit.train.runconfig import load_run_config

    config = load_run_config(args.config, args.overrides)
    _quiet_transformers()
    metrics = evaluate_adapter(config, args.adapter)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:<12} {value:.4f}")
    return 0


def _adapter_config(folder: str) -> Any:
    from peftkit.core.config import CONFIG_NAME, PeftConfig

    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; pass a folder written by save_pretrained.")
    return PeftConfig.from_pretrained(folder)


def _head_labels(folder: str) -> int | None:
    """The number of labels of a saved classification head: the smallest first dimension among the saved
    2-D ``modules_to_save`` weights (BERT's ``classifier``, RoBERTa's ``classifier.out_proj``, ``score``)."""
    from peftkit.core.checkpoint import load_adapter_weights

    sizes = [
        t.shape[0]
        for k, t in load_adapter_weights(folder).items()
        if ".modules_to_save." in k or k.endswith((".classifier.weight", ".score.weight", ".out_proj.weight"))
        if t.dim() == 2 and k.endswith("weight")
    ]
    return min(sizes) if sizes else None


def _load_adapted(
    adapter: str | None, base: str | None, task: str | None, num_labels: int | None = None
) -> tuple[Any, Any]:
    """(model with the adapter loaded, tokenizer) for merge and generate."""
    from peftkit.core.peft_model import PeftModel
    from peftkit.train.models import load_base_model, load_tokenizer
    from peftkit.train.runconfig import ModelSection, RunConfigError

    config = _adapter_config(adapter) if adapter else None
    base = base or (config.base_model_name_or_path if config else None)
    if base is None:
        raise RunConfigError(
            "no base model: pass --base (the adapter does not record base_model_name_or_path)."
        )
    task_type = task or (str(config.task_type) if config and config.task_type else None) or "CAUSAL_LM"
    if task_type == "SEQ_CLS" and num_labels is None and adapter:
        num_labels = _head_labels(adapter)
    section = ModelSection(name_or_path=base, task_type=task_type, num_labels=num_labels)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(section)
    model = load_base_model(section, tokenizer=tokenizer)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def _merge(args: argparse.Namespace) -> int:
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; choose a new folder (nothing is overwritten).")
    _quiet_transformers()
    model, tokenizer = _load_adapted(args.adapter, args.base, args.task, args.num_labels)
    merged = model.merge_and_unload(safe_merge=True)
    from peftkit.core.io_utils import atomic_folder

    with atomic_folder(args.out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(
        f"merged model written to {args.out} (loads with transformers {type(merged).__name__}.from_pretrained)"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from peftkit.train.data import alpaca_prompt

    _quiet_transformers()
    if args.adapter is None and args.base is None:
        raise ValueError("pass --adapter, --base or both.")
    task = None
    if args.adapter:
        config = _adapter_config(args.adapter)
        task = str(config.task_type) if config.task_type else None
        if task not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise ValueError(f"generate needs a causal or seq2seq adapter; this one is for {task}.")
    model, tokenizer = _load_adapted(args.adapter, args.base, task)
    prompt = alpaca_prompt(args.prompt) if args.template == "alpaca" else args.prompt
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # BERT-style tokenizers add them; generative models take none
    torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=sampling,
            temperature=args.temperature if sampling else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    is_seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    new_tokens = output[0] if is_seq2seq else output[0, inputs["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
