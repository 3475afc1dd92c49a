"""Quantized base models (QLoRA, 8-bit): bitsandbytes weights read as floats, written back, prepared.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (arXiv:2305.14314): the
frozen base is stored in 4-bit NormalFloat (NF4, optionally with the quantization constants quantized
again, "double quantization") and dequantized block by block for each matmul; only the float adapters
train::

    x ──► dequant(W_nf4) x ──────────┐
    │                               (+)──► y
    └──► A ──► B ──► ·s ─────────────┘      (A, B in float32)

Adapters never see the packed integers: whatever needs the weight matrix itself (merging, DoRA's norms,
PiSSA) reads :func:`dequantize_weight`, and a merge that must stay quantized writes through
:func:`requantize_weight`. Nothing here names a method; ``bitsandbytes`` is imported only when a quantized
layer is met.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def is_quantized_weight(weight: Any) -> bool:
    """A bitsandbytes 4-bit (``Params4bit``) or 8-bit (``Int8Params``) weight."""
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def is_quantized_module(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or any module holding such a weight)."""
    return is_quantized_weight(getattr(module, "weight", None))


def is_quantized_model(model: nn.Module) -> bool:
    """The model holds at least one bitsandbytes-quantized layer."""
    return any(is_quantized_module(m) for m in model.modules())


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float ``(out, in)`` matrix a bitsandbytes linear computes with (a new tensor, no gradient).

    4-bit: ``dequantize_4bit`` with the layer's quantization state (in the dtype the weight had before
    quantization). 8-bit: int8 rows times their scales (``SCB / 127``), in float32.
    """
    import bitsandbytes as bnb

    weight = module.weight
    with torch.no_grad():
        if type(weight).__name__ == "Params4bit":
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        state = getattr(module, "state", None)
        # bitsandbytes moves the scales from the weight to the layer state at the first forward
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
        if scales is None:
            raise ValueError(f"{type(module).__name__} has no int8 scales (SCB); is it quantized yet?")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def requantize_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the float ``(out, in)`` matrix ``weight`` with the layer's own settings and make it the
    layer's weight (a new parameter object; the old one is left untouched)."""
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if type(old).__name__ == "Params4bit":
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", old.quant_state.dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(device)  # moving an unquantized Params4bit quantizes it
        module.quant_state = module.weight.quant_state
        return
    new = bnb.nn.Int8Params(
        weight.detach().to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False
    )
    module.weight = new.to(device)
    state = getattr(module, "state", None)
    if state is not None:  # the next forward copies the new CB / SCB into the state
        state.CB = state.SCB = None


def is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (its weight may still be unquantized: transformers
    leaves a newly initialised head of a quantized model in such a layer with a float weight)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") or is_quantized_module(module)


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A full-precision ``nn.Linear`` computing with the dequantized weight of a bitsandbytes linear (the
    bias object is shared)."""
    if is_quantized_weight(module.weight):
        weight = dequantize_weight(module)
    else:
        weight = module.weight.detach().clone()
    if dtype is not None:
        weight = weight.to(dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias
    return linear.train(module.training)


def forget_quantization(model: nn.Module) -> None:
    """Drop transformers' "this model is quantized" markers once no quantized layer is left, so that
    ``save_pretrained`` writes a plain full-precision model."""
    if any(is_quantized_module(m) for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a (4-bit / 8-bit) quantized transformers model ready for adapter training, as HF PEFT does.

    * every parameter is frozen (the adapters added afterwards are the trainable ones);
    * float16 / bfloat16 parameters that are not quantized (norms, embeddings, the output head) are
      upcast to float32, which keeps training stable (the packed integer weights are left alone);
    * with ``use_gradient_checkpointing`` (and a quantized model), gradient checkpointing is switched on
      (``gradient_checkpointing_kwargs`` passed through; ``use_reentrant`` defaults to ``True`` as in
      transformers) and, for reentrant checkpointing, the input embeddings' output requires grad: with
      every base parameter frozen, nothing else would make the checkpointed blocks backpropagate.

    Returns the same model object, changed in place.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    quantized = bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or is_quantized_model(model)
    )
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized_weight(param):
            param.data = param.data.to(torch.float32)
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                f"use_gradient_checkpointing=False."
            )
        enable(gradient_checkpointing_kwargs=kwargs) if kwargs else enable()
        if hasattr(getattr(model, "config", None), "use_cache"):
            model.config.use_cache = False  # the cache is incompatible with checkpointing in training
    return model


def _make_inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def require_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)


def prepare_model_for_int8_training(*args: Any, **kwargs: Any) -> nn.Module:
    """Deprecated alias of :func:`prepare_model_for_kbit_training` (older tutorials call it)."""
    warnings.warn(
        "prepare_model_for_int8_training is deprecated; use prepare_model_for_kbit_training (same arguments).",
        DeprecationWarning,
        stacklevel=2,
    )
    return prepare_model_for_kbit_training(*args, **kwargs)
