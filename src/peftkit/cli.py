"""The ``peftkit`` command line. Subcommands: ``inspect`` (more arrive with the training issue)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def inspect_adapter(folder: str) -> dict[str, Any]:
    """Describe a saved adapter folder without loading a model: method, config, adapted modules,
    parameter counts and tensor sizes. Reads only the safetensors header for shapes."""
    from safetensors import safe_open

    from peftkit.checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights
    from peftkit.config import CONFIG_NAME, PeftConfig
    from peftkit.registry import get_method

    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; pass a folder written by save_pretrained.")
    config = PeftConfig.from_json_file(config_path)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    weights_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(weights_path):
        try:
            with safe_open(weights_path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor_slice = f.get_slice(key)
                    shapes[key] = tuple(tensor_slice.get_shape())
                    dtypes[key] = str(tensor_slice.get_dtype())
        except Exception as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err}).") from None
    elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        for key, tensor in load_adapter_weights(folder).items():
            shapes[key] = tuple(tensor.shape)
            dtypes[key] = str(tensor.dtype).removeprefix("torch.")
    else:
        raise FileNotFoundError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}.")

    containers = set(get_method(str(config.peft_type)).tuner_cls.layer_cls.adapter_param_containers)
    adapted: dict[str, int] = defaultdict(int)
    other: dict[str, int] = {}
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I64": 8, "I32": 4}
    total_bytes = 0
    for key, shape in shapes.items():
        numel = 1
        for dim in shape:
            numel *= dim
        dtype = (
            dtypes[key]
            .upper()
            .replace("FLOAT32", "F32")
            .replace("FLOAT16", "F16")
            .replace("BFLOAT16", "BF16")
        )
        total_bytes += numel * itemsize.get(dtype, 4)
        segments = key.removeprefix("base_model.model.").split(".")
        cut = next((i for i, seg in enumerate(segments) if seg in containers), None)
        if cut is None:
            other[key] = numel
        else:
            adapted[".".join(segments[:cut])] += numel
    return {
        "folder": folder,
        "peft_type": str(config.peft_type),
        "task_type": str(config.task_type) if config.task_type else None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "config": config.to_dict(),
        "adapted_modules": dict(sorted(adapted.items())),
        "other_tensors": other,
        "num_tensors": len(shapes),
        "num_parameters": sum(adapted.values()) + sum(other.values()),
        "size_bytes": total_bytes,
        "dtypes": sorted(set(dtypes.values())),
        "subadapters": sorted(
            d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME))
        ),
    }


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
    print("config         : " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
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
    if args.command == "inspect":
        try:
            info = inspect_adapter(args.folder)
        except (FileNotFoundError, ValueError) as err:
            print(f"peftkit inspect: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_inspection(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
