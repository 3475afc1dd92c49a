"""HF PEFT's status report of an adapted model: ``get_layer_status`` (one record per adapter layer) and
``get_model_status`` (the records summed up), with HF PEFT's dataclasses and field meanings. A value that
differs between layers is reported as ``"irregular"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _agree(values: Iterable[Any]) -> Any:
    """The one value all of ``values`` share, else ``"irregular"``."""
    distinct = {v if not isinstance(v, list) else tuple(v) for v in values}
    if len(distinct) != 1:
        return "irregular"
    (value,) = distinct
    return list(value) if isinstance(value, tuple) else value


def _adapter_parameters(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Adapter name -> its parameters in this layer (or wrapper)."""
    found: dict[str, list[nn.Parameter]] = defaultdict(list)
    if isinstance(module, ModulesToSaveWrapper):
        for name, copy in module.modules_to_save.items():
            found[name] += list(copy.parameters())
        return found
    assert isinstance(module, AdapterLayer)
    for attr in module.adapter_param_containers:
        container = getattr(module, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            for name, value in container.items():
                found[name] += list(value.parameters()) if isinstance(value, nn.Module) else [value]
    return found


def _layer_record(name: str, module: nn.Module) -> TunerLayerStatus:
    params = _adapter_parameters(module)
    requires_grad = {key: _agree(p.requires_grad for p in ps) for key, ps in params.items() if ps}
    devices = {key: sorted({p.device.type for p in ps}) for key, ps in params.items()}
    if isinstance(module, ModulesToSaveWrapper):
        active = [module.active_adapter] if module.active_adapter is not None else []
        available, merged, quantized = sorted(module.modules_to_save), [], None
    else:
        active, available, merged = (
            list(module.active_adapters),
            sorted(module.adapter_names),
            list(module.merged_adapters),
        )
        quantized = _quantization_backend(module.get_base_layer()) if module.base_is_quantized else None
    kind = type(module)
    return TunerLayerStatus(
        name=name,
        module_type=f"{kind.__module__.rsplit('.', 1)[-1]}.{kind.__name__}",
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad=requires_grad,
        available_adapters=available,
        devices=devices,
        quantization_backend=quantized,
    )


def _quantization_backend(base: nn.Module) -> str:
    return "bnb 4bit" if type(base).__name__ == "Linear4bit" else "bnb 8bit"


def _tuner_of(model: nn.Module) -> nn.Module:
    from peftkit.core.peft_model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer and ``modules_to_save`` wrapper of ``model`` (a
    ``PeftModel``, or a model with adapters injected), in module order.

    Raises:
        ValueError: the model has no adapter layers.
    """
    records = [
        _layer_record(name, module)
        for name, module in _tuner_of(model).named_modules()
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
    ]
    if not records:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT "
            "adapters injected in the model."
        )
    return records


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter layers' states of ``model`` summed up (HF PEFT's ``get_model_status``): a field on which
    the layers disagree is ``"irregular"``; ``merged_adapters`` lists adapters merged in every layer that
    holds them."""
    from transformers import PreTrainedModel

    from peftkit.core.peft_model import PeftModel
    from peftkit.core.tuner import count_parameters

    trainable, total = count_parameters(model)
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        adapter_type = type(model.base_model).__name__
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
    else:
        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_type, peft_types = "None", {}
    layers = get_layer_status(model)
    merged_anywhere = sorted({name for layer in layers for name in layer.merged_adapters})
    unmerged_somewhere = any(
        set(merged_anywhere) & (set(layer.available_adapters) - set(layer.merged_adapters))
        for layer in layers
    )
    requires_grad: dict[str, list[Any]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for layer in layers:
        for key, value in layer.requires_grad.items():
            requires_grad[key].append(value)
        for key, value in layer.devices.items():
            devices[key] |= set(value)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agree(layer.enabled for layer in layers),
        active_adapters=_agree(layer.active_adapters for layer in layers),
        merged_adapters="irregular" if unmerged_somewhere else merged_anywhere,
        requires_grad={key: _agree(values) for key, values in requires_grad.items()},
        available_adapters=sorted({name for layer in layers for name in layer.available_adapters}),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=_agree(layer.quantization_backend for layer in layers),
    )
