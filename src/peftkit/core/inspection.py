"""Describe a saved adapter folder without building a model (``peftkit inspect``)."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any


def inspect_adapter(folder: str) -> dict[str, Any]:
    """Describe a saved adapter folder without loading a model: method, config, adapted modules,
    parameter counts and tensor sizes. Reads only the safetensors header for shapes."""
    from safetensors import safe_open

    from peftkit.core.checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights
    from peftkit.core.config import CONFIG_NAME, PeftConfig
    from peftkit.core.layer import SAVED_PREFIX
    from peftkit.core.registry import get_method

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

    tuner_cls = get_method(str(config.peft_type)).tuner_cls
    containers = set(tuner_cls.layer_cls.adapter_param_containers)
    # a method made of parts (a combination's components): each part's keys start with its own prefix
    parts = tuner_cls.saved_tensor_parts(config)
    part_counts: dict[str, int] = dict.fromkeys(parts, 0)
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
        part = next((label for label, (prefix, _) in parts.items() if key.startswith(prefix)), None)
        local, part_containers, shown = key, containers, ""
        if part is not None:
            prefix, part_containers_list = parts[part]
            part_counts[part] += numel
            local, part_containers, shown = key.removeprefix(prefix), set(part_containers_list), prefix
        segments = local.removeprefix(SAVED_PREFIX).split(".")
        cut = next((i for i, seg in enumerate(segments) if seg in part_containers), None)
        if cut is None:
            other[key] = numel
        else:
            adapted[shown.replace(".", ": ") + ".".join(segments[:cut])] += numel
    return {
        "folder": folder,
        "peft_type": str(config.peft_type),
        "task_type": str(config.task_type) if config.task_type else None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "config": config.to_dict(),
        "components": part_counts,
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
