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

Two 4-bit layouts. On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight the first time
it runs in eval mode without gradients: the 4-bit codes are reordered in blocks of 32 output rows, the
(double-quantized) scales become one bfloat16 matrix of shape ``(in / blocksize, out)``, and a bfloat16
kernel computes the layer. Everything here reads and writes both layouts:

* :func:`dequantize_weight` decodes the repacked layout too (code value × bfloat16 scale: the weight that
  kernel computes with), in the dtype the weight had before quantization, never bfloat16 by accident;
* a model with adapters stays in the standard layout (:func:`pause_cpu_repacking`, called by the tuner):
  layers already repacked are put back losslessly (:func:`restore_standard_layout`) and bitsandbytes
  repacks none while the adapters are on (the reasons are in that function); removing the adapters lets
  it repack again.
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


def is_cpu_repacked(weight: Any) -> bool:
    """A 4-bit weight in bitsandbytes' AVX512-BF16 CPU layout (see the module docstring)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def original_dtype(weight: Any) -> torch.dtype:
    """The dtype a 4-bit weight had before quantization (the CPU repacking relabels its state bfloat16)."""
    state = weight.quant_state
    return getattr(state, "original_dtype", state.dtype) if is_cpu_repacked(weight) else state.dtype


# bitsandbytes' CPU layout interleaves the codes of this many output rows (its ``block_n``)
_REPACK_ROWS = 32


def _repacked_codes(data: torch.Tensor, state: Any) -> torch.Tensor:
    """The ``(out, in)`` 4-bit codes (uint8, 0..15) of a weight in the CPU layout.

    That layout stores, for each block of 32 output rows and each pair of input columns, 64 codes as 32
    bytes: byte ``i`` holds code ``i`` in its low nibble and code ``32 + i`` in its high nibble, the 64
    codes running over (row in block, column in pair)."""
    out_features, in_features = state.shape
    packed = data.view(torch.uint8).reshape(-1, _REPACK_ROWS)  # (out/32 · in/2, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (out/32 · in/2, 64)
    codes = codes.reshape(out_features // _REPACK_ROWS, in_features // 2, _REPACK_ROWS, 2)
    return codes.transpose(1, 2).reshape(out_features, in_features)


def _repacked_scales(state: Any) -> torch.Tensor:
    """The ``(out, in / blocksize)`` float32 scales of a weight in the CPU layout (stored transposed, bf16)."""
    return state.absmax.float().t()


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float ``(out, in)`` matrix a bitsandbytes linear computes with (a new tensor, no gradient).

    4-bit: ``dequantize_4bit`` with the layer's quantization state, or for the CPU layout the code values
    times their bfloat16 scales; either way in the dtype the weight had before quantization. 8-bit: int8
    rows times their scales (``SCB / 127``), in float32.
    """
    import bitsandbytes as bnb

    weight = module.weight
    with torch.no_grad():
        if type(weight).__name__ == "Params4bit":
            state = weight.quant_state
            if is_cpu_repacked(weight):
                values = state.code.float()[_repacked_codes(weight.data, state).long()]  # (out, in)
                scales = _repacked_scales(state).repeat_interleave(state.blocksize, dim=1)  # (out, in)
                return (values * scales).to(original_dtype(weight))
            return bnb.functional.dequantize_4bit(weight.data, state)
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
            weight.detach().to("cpu", original_dtype(old)).contiguous(),
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


def restore_standard_layout(module: nn.Module) -> None:
    """Put a 4-bit weight in bitsandbytes' CPU layout back into the standard layout, in place and
    losslessly: the same codes in the standard order, and the bfloat16 scales as float32 scales (not
    double-quantized again, unlike bitsandbytes' own inverse, so the layer computes the same weight). A
    weight in the standard layout is left alone."""
    weight = module.weight
    if not is_cpu_repacked(weight):
        return
    state = weight.quant_state
    codes = _repacked_codes(weight.data, state).reshape(-1)
    data = ((codes[0::2] << 4) | codes[1::2]).reshape(state.original_qshape)  # first code in the high nibble
    storage = getattr(state, "original_storage_type", None)
    state.absmax = _repacked_scales(state).reshape(-1).contiguous()
    state.nested, state.state2, state.offset = False, None, None
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False
    weight.data = data.view(storage) if storage is not None else data


def pause_cpu_repacking(model: nn.Module) -> list[nn.Module]:
    """Keep every bitsandbytes 4-bit linear of ``model`` in the standard layout while adapters are on it:
    put back the ones bitsandbytes already repacked (losslessly) and stop it repacking (it would at the next
    eval forward on an AVX512-BF16 CPU). Returns the layers to give to :func:`resume_cpu_repacking`.

    Why, for a model being adapted: the repacked kernel has no backward, so a layer repacked during an
    evaluation would pass no gradient to the adapters in front of it; it computes in bfloat16 whatever the
    compute dtype, so evaluation, training and the merged model would compute three different functions;
    and bitsandbytes cannot repack a layer narrower than one quantization block. Every layer of the model
    is covered, adapted or not: a gradient flows back through all of them.
    """
    paused = []
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ != "Params4bit":
            continue
        restore_standard_layout(module)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            paused.append(module)
    return paused


def resume_cpu_repacking(layers: list[nn.Module]) -> None:
    """Let bitsandbytes repack ``layers`` again (what :func:`pause_cpu_repacking` returned)."""
    for module in layers:
        module.support_avx512bf16_for_cpu = True


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
