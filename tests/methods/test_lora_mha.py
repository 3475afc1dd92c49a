"""LoRA on ``nn.MultiheadAttention``: an adapter on the packed input projection and one on ``out_proj``.

Checked against the formula (a plain attention block whose weights are ``W + s·BA``), against HF PEFT's
tensor names and shapes, and against HF PEFT's outputs where HF PEFT 0.21.2 is right: it applies the
``out_proj`` update twice (``W + 2·ΔW``; huggingface/peft#3774), so adapters are compared both ways with
the ``out_proj`` update at zero. peftkit applies it once.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import MultiheadAttention

LIBS: dict[str, ModuleType] = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0])


def _make(lib: ModuleType = peftkit, zero_out_proj: bool = False, **kwargs: Any) -> Any:
    model = lib.get_peft_model(
        AttentionNet(), lib.LoraConfig(**{"target_modules": ["mha"], "r": 2, "lora_alpha": 4, **kwargs})
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
                if zero_out_proj and "out_proj.lora_B" in name:
                    param.zero_()
    return model.eval()


def _reference_weights(model: Any) -> dict[str, torch.Tensor]:
    """``W + s·BA`` for both projections, from the factors (HF PEFT's names)."""
    wrapper = model.base_model.model.mha
    scaling = wrapper.scaling["default"]
    out_proj = wrapper.base_layer.out_proj
    inner = wrapper.get_base_layer()
    return {
        "in_proj_weight": inner.in_proj_weight
        + scaling * wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight,
        "out_proj.weight": out_proj.get_base_layer().weight
        + scaling * out_proj.lora_B["default"].weight @ out_proj.lora_A["default"].weight,
    }


def _reference_output(model: Any, x: torch.Tensor) -> torch.Tensor:
    plain = AttentionNet()
    attn = functional_call(plain.mha, _reference_weights(model), (x, x, x))[0]
    return plain.head(attn)


def test_forward_equals_attention_with_updated_weights() -> None:
    model = _make()
    with torch.no_grad():
        got, expected, base = model(X), _reference_output(model, X), AttentionNet()(X)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_gradients_equal_those_of_the_formula() -> None:
    model = _make()
    model.train()
    model(X).square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _reference_output(model, X).square().mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert ours[name].abs().max() > 0, name
            torch.testing.assert_close(ours[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_same_tensor_names_and_shapes_as_hf_peft(tmp_path: Path) -> None:
    specs = {}
    for name, lib in LIBS.items():
        _make(lib).save_pretrained(str(tmp_path / name))
        specs[name] = {
            k: tuple(v.shape) for k, v in load_file(tmp_path / name / "adapter_model.safetensors").items()
        }
    assert specs["peftkit"] == specs["peft"]
    assert specs["peftkit"]["base_model.model.mha.lora_B.weight"] == (24, 2)
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in specs["peftkit"]


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
def test_checkpoint_round_trip_with_hf_peft(src: str, dst: str, tmp_path: Path) -> None:
    made = _make(LIBS[src], zero_out_proj=True)  # where HF PEFT 0.21.2 computes the same function
    made.save_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftModel.from_pretrained(AttentionNet(), str(tmp_path)).eval()
    with torch.no_grad():
        expected, got = made(X), loaded(X)
    assert (expected - AttentionNet()(X)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_merge_unmerge_disable_and_unload() -> None:
    model = _make()
    with torch.no_grad():
        adapted = model(X)
        model.merge_adapter()
        torch.testing.assert_close(model(X), adapted, atol=ATOL, rtol=0)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(X), AttentionNet()(X), atol=1e-6, rtol=0)
        torch.testing.assert_close(model(X), adapted, atol=1e-6, rtol=0)
        merged = copy.deepcopy(model).merge_and_unload()
        assert type(merged.mha) is nn.MultiheadAttention
        assert isinstance(merged.mha.in_proj_weight, nn.Parameter)
        assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        torch.testing.assert_close(merged(X), adapted, atol=ATOL, rtol=0)
        model.delete_adapter("default")
        assert type(model.base_model.model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        torch.testing.assert_close(model(X), AttentionNet()(X), atol=1e-6, rtol=0)


def test_inside_a_transformer_encoder_layer_in_training_and_eval() -> None:
    """The encoder layer reads the attention's attributes (batch_first, ...) through the wrapper."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer_copy = copy.deepcopy(layer).eval()
    model = get_peft_model(layer, LoraConfig(target_modules=["self_attn"], init_lora_weights=False))
    assert isinstance(model.base_model.model.self_attn, MultiheadAttention)
    assert model.base_model.model.self_attn.batch_first
    model.train()
    model(X).sum().backward()
    assert model.base_model.model.self_attn.lora_A["default"].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(X)
        assert (out - layer_copy(X)).abs().max() > 1e-3  # the adapter acts in inference too
        model.merge_adapter()
        torch.testing.assert_close(model(X), out, atol=ATOL, rtol=0)


def test_refusals_leave_the_model_unchanged() -> None:
    model = AttentionNet()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="does not support DoRA"):
        get_peft_model(model, LoraConfig(target_modules=["mha"], use_dora=True))
    separate = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="Only same embed for query/key/value"):
        get_peft_model(separate, LoraConfig(target_modules=["0"]))
    assert type(model.mha) is nn.MultiheadAttention and type(separate[0]) is nn.MultiheadAttention
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = _make()
    adapted.add_adapter("other", LoraConfig(target_modules=["mha"]))
    with pytest.raises(ValueError, match="mixed adapter batches"):
        adapted(X, adapter_names=["default", "other"])
