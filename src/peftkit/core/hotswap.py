"""Hot-swapping: load another saved adapter's values into an existing adapter, in place.

Serving many adapters on one base often means replacing the adapter in memory rather than adding one
more: :func:`hotswap_adapter` copies a checkpoint's tensors into the parameters of an adapter the model
already has (same method, same target modules), so no module is created or replaced and code holding
the model (or a compiled graph of it) keeps working. A method decides which shapes fit through
:meth:`~peftkit.core.tuner.BaseTuner.hotswap_tensor` (LoRA zero-pads a smaller rank, which leaves its output
exact) and recomputes its settings in :meth:`~peftkit.core.tuner.BaseTuner.after_hotswap` (LoRA's scalings).
:func:`prepare_model_for_compiled_hotswap` pads an adapter up front so that later swaps of any rank up to
``target_rank`` fit. The names and arguments are HF PEFT's (``peft.utils.hotswap``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from peftkit.core.checkpoint import load_adapter_weights
from peftkit.core.config import PeftConfig


def hotswap_adapter(
    model: Any,
    model_name_or_path: str | os.PathLike,
    adapter_name: str = "default",
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace the values of ``adapter_name`` with those saved in ``model_name_or_path``, in place.

    Args:
        model: a :class:`~peftkit.PeftModel` that has ``adapter_name``.
        model_name_or_path: an adapter folder written by ``save_pretrained`` (or a hub id).
        adapter_name: the adapter to overwrite; it keeps its name and active state.
        torch_device: accepted for HF PEFT compatibility; tensors go to each parameter's own device.

    Raises:
        ValueError: no such adapter, another method, other target modules, or a tensor that does not fit
            (a larger LoRA rank: call :func:`prepare_model_for_compiled_hotswap` first). Nothing changes.
    """
    del torch_device  # every tensor is copied onto the device of the parameter it replaces
    subfolder = kwargs.pop("subfolder", None)
    path = os.fspath(model_name_or_path)
    config = PeftConfig.from_pretrained(path, subfolder=subfolder)
    state_dict = load_adapter_weights(os.path.join(path, subfolder) if subfolder else path)
    tuner = model.base_model
    if adapter_name not in tuner.peft_config:
        raise ValueError(
            f"No adapter named {adapter_name!r} to hot-swap into; this model has {list(tuner.peft_config)}. "
            f"Use load_adapter to add a new one."
        )
    merged = [path for path, layer in tuner.adapter_layers() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]}); new values would not "
            f"reach them. Unmerge it (model.unmerge_adapter()) before hot-swapping."
        )
    current = tuner.peft_config[adapter_name]
    if config.peft_type != current.peft_type:
        raise ValueError(
            f"Cannot hot-swap a {config.peft_type} adapter into {adapter_name!r}, which is "
            f"{current.peft_type}; use load_adapter to add it beside."
        )
    targets = tuner.adapter_load_targets(adapter_name)
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    problems = []
    if missing or unexpected:
        problems.append(
            f"the checkpoint's tensors name other modules (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); hot-swapping needs the same target modules"
        )
    values = {}
    for key in sorted(set(targets) & set(state_dict)):
        try:
            values[key] = tuner.hotswap_tensor(key, targets[key], state_dict[key])
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError(
            f"Cannot hot-swap {path} into adapter {adapter_name!r}: "
            + "; ".join(problems[:10])
            + ". Nothing was changed."
        )
    with torch.no_grad():
        for key, value in values.items():
            targets[key].copy_(value.to(device=targets[key].device, dtype=targets[key].dtype))
    tuner.after_hotswap(adapter_name, config.replace(inference_mode=current.inference_mode))


def prepare_model_for_compiled_hotswap(
    model: Any, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Pad every adapter of ``model`` to rank ``target_rank`` with zeros (outputs unchanged), so that
    adapters of any rank up to it can be hot-swapped in without a shape change.

    Call it before ``torch.compile``. ``config`` and ``check_compiled`` are accepted for HF PEFT
    compatibility (their other uses concern compiled graphs only).

    Raises:
        ValueError: the method has no rank to pad, or ``target_rank`` is below an adapter's rank.
    """
    del config, check_compiled
    if target_rank is not None:
        model.base_model.pad_ranks(target_rank)
