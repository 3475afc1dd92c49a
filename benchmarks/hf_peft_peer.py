"""The peer runner of ``peftkit bench`` for Hugging Face PEFT: the same grid point, built with HF PEFT.

Name it in a bench spec (``peer: benchmarks/hf_peft_peer.py``); every method HF PEFT also has then runs a
second time with HF PEFT, on the same base model, data order, seed and budget, in its own process. peftkit's
configs keep HF PEFT's field names and ``adapter_config.json`` layout, so a peftkit config becomes the HF
config of the same ``peft_type``; a field HF PEFT does not know must be at peftkit's default, or the run
is refused (the two would not be the same method). This file lives outside the library: peftkit never
imports HF PEFT itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

NAME = "hf_peft"
# peft_type values that name the same method in both libraries (peftkit's P_TUNING_V2, BOTTLENECK, BITFIT,
# FREEZE, fusion and the unified methods have no HF PEFT counterpart)
SHARED_TYPES = (
    "LORA",
    "ADALORA",
    "IA3",
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "ADAPTION_PROMPT",
    "MULTITASK_PROMPT_TUNING",
)


def available() -> bool:
    return importlib.util.find_spec("peft") is not None


def version() -> str:
    import peft

    return peft.__version__


def _peft_type(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def supports(config: Any) -> bool:
    if _peft_type(config) not in SHARED_TYPES:
        return False
    try:
        _hf_config(config)
    except ValueError:
        return False
    return True


def _hf_config(config: Any) -> Any:
    """HF PEFT's config for peftkit's ``config`` (same peft_type and fields)."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = _peft_type(config)
    hf_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    hf_fields = {f.name for f in dataclasses.fields(hf_cls)}
    values = config.to_dict()
    foreign = [
        name
        for name, value in values.items()
        if name not in hf_fields and name != "peft_type" and value != _field_default(type(config), name)
    ]
    if foreign:
        raise ValueError(f"HF PEFT's {hf_cls.__name__} has no field {', '.join(foreign)}: no peer run.")
    known = {name: value for name, value in values.items() if name in hf_fields}
    known.pop("peft_type", None)
    hf_config = hf_cls(**known)
    assert isinstance(hf_config, PeftConfig)
    return hf_config


def _field_default(config_cls: type, name: str) -> Any:
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def wrap(base_model: Any, config: Any) -> Any:
    """``peft.get_peft_model`` with the equivalent HF config. AdaLoRA's budget schedule is driven as HF
    PEFT asks (``update_and_allocate`` after each optimizer step), through the trainer's ``on_step_end``."""
    from peft import get_peft_model

    model = get_peft_model(base_model, _hf_config(config))
    update_and_allocate = getattr(model.base_model, "update_and_allocate", None)
    if callable(update_and_allocate):
        model.base_model.on_step_end = update_and_allocate
    return model


def load(base_model: Any, folder: str) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, folder)
