"""Mixed precision: every conformance case under CPU autocast (bf16, fp16) and on a half-precision base.

CPU autocast runs the code path CUDA autocast takes (the same dispatch, other kernels), which is how
``Trainer(bf16=True)``, TRL and ``Accelerator(mixed_precision=...)`` run a model. For every case of the
conformance table (so every registered method) and each precision:

* a training forward and backward run, and every declared adapter parameter gets a finite gradient;
* under autocast the output stays close to the float32 output (the rounding of half precision);
* merging gives the unmerged output (within half precision's rounding) and keeps the base's dtype;
* save / load gives the same output in the same precision.

Where HF PEFT has the method (LoRA, DoRA, IA3, AdaLoRA, soft prompts, LLaMA-Adapter), the gradients under
autocast equal HF PEFT's for the same adapter on the same base.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_conformance import CASES, Case, _case_inputs
from tiny_models import build_model, model_inputs
from torch import nn

import peftkit
from peftkit import PeftModel, get_peft_model

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ["autocast-bf16", "autocast-fp16", "base-bf16", "base-fp16"]


def dtype_of(mode: str) -> torch.dtype:
    return HALF[mode.rsplit("-", 1)[1]]


def build(case: Case, mode: str) -> nn.Module:
    base = case.build_model(0)
    return base.to(dtype_of(mode)) if mode.startswith("base") else base


def run(model: nn.Module, case: Case, mode: str, grad: bool = False) -> torch.Tensor:
    with (
        torch.set_grad_enabled(grad),
        torch.autocast("cpu", dtype_of(mode), enabled=mode.startswith("autocast")),
    ):
        return model(**_case_inputs(model, case)).logits


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Seeded noise on every trainable parameter (a trained adapter, without an optimizer: AdamW's epsilon
    is zero in fp16, so training fp16 parameters in place needs float32 master weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_((torch.randn(param.shape, generator=gen) * 0.05).to(param.dtype))
    model.eval()


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.mark.parametrize("mode", MODES)
def test_train_step_gives_every_adapter_parameter_a_finite_gradient(case: Case, mode: str) -> None:
    model = get_peft_model(build(case, mode), case.config())
    model.train()
    run(model, case, mode, grad=True).float().pow(2).mean().backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained
    for name, param in trained.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in trained.values())


@pytest.mark.parametrize("mode", ["autocast-bf16", "autocast-fp16"])
def test_autocast_output_is_the_float32_output_rounded(case: Case, mode: str) -> None:
    model = get_peft_model(case.build_model(0), case.config())
    perturb(model)
    with torch.no_grad():
        exact = model(**_case_inputs(model, case)).logits
    rounded = run(model, case, mode)
    assert rounded.dtype in (dtype_of(mode), torch.float32)
    scale = exact.abs().max().item()
    # half precision keeps 8 (bf16) / 11 (fp16) significant bits; two small layers stay within a few %
    assert (rounded.float() - exact).abs().max().item() <= 0.05 * scale + 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_merge_in_half_precision_keeps_the_output_and_the_dtype(case: Case, mode: str) -> None:
    if not case.mergeable:
        pytest.skip("method cannot be merged")
    model = get_peft_model(build(case, mode), case.config())
    perturb(model)
    unmerged = run(model, case, mode).float()
    merged = copy.deepcopy(model).merge_and_unload()
    base_dtype = dtype_of(mode) if mode.startswith("base") else torch.float32
    for name, param in merged.named_parameters():
        assert param.dtype == base_dtype, name
    scale = unmerged.abs().max().item()
    assert (run(merged, case, mode).float() - unmerged).abs().max().item() <= 0.03 * scale + 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_save_load_in_half_precision_gives_the_same_output(case: Case, mode: str, tmp_path: Path) -> None:
    model = get_peft_model(build(case, mode), case.config())
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(case, mode), tmp_path)
    expected = run(model, case, mode)
    if case.saved_as_output and mode.startswith("autocast"):
        # the file holds the prompt encoder's float32 output; the live encoder computes it under autocast
        scale = expected.abs().max().item()
        assert (run(loaded, case, mode) - expected).abs().max().item() <= 0.03 * scale + 1e-3
    else:
        assert torch.equal(run(loaded, case, mode), expected)


# ------------------------------------------------------------------------------ HF PEFT as the reference
REFERENCE_CASES = {
    "lora-llama": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "dora-llama": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True)),
    "lora-gpt2-conv1d": ("gpt2", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "ia3-llama": ("llama", "IA3Config", dict()),
    "lora-bert-seq-cls": ("bert_seq_cls", "LoraConfig", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "adalora-llama": ("llama", "AdaLoraConfig", dict(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "v_proj"])),
    "prompt-tuning-llama": ("llama", "PromptTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "prefix-tuning-llama": ("llama", "PrefixTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "p-tuning-mlp-llama": ("llama", "PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM")),
    "llama-adapter": ("llama", "AdaptionPromptConfig", dict(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")),
}  # fmt: skip


def perturbed(lib: Any, model_name: str, config_name: str, kwargs: dict[str, Any]) -> nn.Module:
    model = lib.get_peft_model(build_model(model_name), getattr(lib, config_name)(**kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, without the adapter name (HF PEFT's LLaMA-Adapter leaves it out) and
    with soft prompts' encoders at the top (HF PEFT keeps them on its wrapper, peftkit on its tuner)."""
    names = {
        n: n.replace(".default", "").replace("base_model.prompt_encoder.", "prompt_encoder.")
        for n, _ in model.named_parameters()
    }
    return {names[n]: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("case_id", list(REFERENCE_CASES))
def test_gradients_under_autocast_equal_hf_peft(case_id: str, dtype: torch.dtype, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model_name, config_name, kwargs = REFERENCE_CASES[case_id]
    ours = perturbed(peftkit, model_name, config_name, kwargs)
    theirs = peft.get_peft_model(build_model(model_name), getattr(peft, config_name)(**kwargs))
    assert trainable(ours).keys() == trainable(theirs).keys()
    with torch.no_grad():  # the same adapter values in both
        for name, param in trainable(theirs).items():
            param.copy_(trainable(ours)[name])
    grads = []
    for model in (ours, theirs):
        model.eval()  # no dropout: the same function in both
        with torch.autocast("cpu", dtype=dtype):
            logits = model(**model_inputs()).logits
        logits.float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in trainable(model).items()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-3, msg=name)
