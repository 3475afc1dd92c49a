"""LoRA (and DoRA) on ``nn.Conv1d``, ``nn.Conv3d`` and grouped ``nn.Conv2d``: against HF PEFT and the formula.

A is a convolution with the base kernel (to rank r), B a 1×1(×1) convolution back out, so
``ΔW[o, i, k…] = s · Σ_r B[o, r] · A[r, i, k…]``. A grouped base gets a grouped B (HF PEFT's layout); its
update mixes channels across groups, so it does not merge.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from model_state import perturb_trainable
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoraConfig, get_peft_model

LIBS: dict[str, ModuleType] = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
MERGE_ATOL = 1e-4


class ConvNet(nn.Module):
    """A sequence, a volume and an image, each through its own convolution, summed into a small head."""

    def __init__(self, seed: int = 0, dilation: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.conv3d = nn.Conv3d(2, 6, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(4, 6, 3, padding=2, groups=2, dilation=dilation, padding_mode=padding_mode)
        self.head = nn.Linear(6, 3)

    def forward(self, seq: torch.Tensor, vol: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        pooled = self.conv1d(seq).mean(-1) + self.conv3d(vol).mean((2, 3, 4)) + self.grouped(img).mean((2, 3))
        return self.head(pooled)


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "seq": torch.randn(2, 4, 7, generator=g),
        "vol": torch.randn(2, 2, 4, 5, 3, generator=g),
        "img": torch.randn(2, 4, 6, 6, generator=g),
    }


# target modules and options per setup; grouped convolutions need a rank divisible by the groups
SETUPS: dict[str, dict[str, Any]] = {
    "conv1d-conv3d": dict(r=2, lora_alpha=4, target_modules=["conv1d", "conv3d"]),
    "conv1d-conv3d-dora": dict(r=2, lora_alpha=4, target_modules=["conv1d", "conv3d"], use_dora=True),
    "grouped": dict(r=4, lora_alpha=8, target_modules=["grouped"]),
    "all-rslora-bias": dict(
        r=4, lora_alpha=8, target_modules=["conv1d", "conv3d", "grouped"], use_rslora=True, lora_bias=True
    ),
}
MERGEABLE = ["conv1d-conv3d", "conv1d-conv3d-dora"]


def _make(lib: ModuleType, setup: str, seed: int = 0) -> Any:
    """``lib``'s adapter on a fresh ConvNet, every trainable parameter moved off its init."""
    with pytest.warns(UserWarning) if "grouped" in str(SETUPS[setup]["target_modules"]) else _nothing():
        model = lib.get_peft_model(ConvNet(), lib.LoraConfig(**SETUPS[setup]))
    perturb_trainable(model, seed)
    return model.eval()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_checkpoint_round_trip_between_libraries(setup: str, src: str, dst: str, tmp_path: Path) -> None:
    made = _make(LIBS[src], setup)
    made.save_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftModel.from_pretrained(ConvNet(), str(tmp_path)).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected, got, base = made(**inputs), loaded(**inputs), ConvNet()(**inputs)
    assert (expected - base).abs().max() > 1e-3, "the adapter is a no-op; the test would prove nothing"
    assert (got - expected).abs().max() <= ATOL


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_tensor_names_and_shapes_as_hf_peft(setup: str, tmp_path: Path) -> None:
    specs = {}
    for name, lib in LIBS.items():
        _make(lib, setup).save_pretrained(str(tmp_path / name))
        tensors = load_file(tmp_path / name / "adapter_model.safetensors")
        specs[name] = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert specs["peftkit"] == specs["peft"]
    if setup == "grouped":  # B is grouped: r/groups input channels per output channel
        assert specs["peftkit"]["base_model.model.grouped.lora_B.weight"][0] == (6, 2, 1, 1)
    if setup == "conv1d-conv3d-dora":
        assert specs["peftkit"]["base_model.model.conv3d.lora_magnitude_vector"][0] == (1, 6, 1, 1, 1)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_step_gradients_equal_hf_peft(setup: str) -> None:
    """Same weights, batch and dropout masks: the same gradient for every trainable parameter."""
    kwargs = {**SETUPS[setup], "lora_dropout": 0.1}
    with pytest.warns(UserWarning) if "grouped" in str(kwargs["target_modules"]) else _nothing():
        ours = get_peft_model(ConvNet(), LoraConfig(**kwargs))
    with pytest.warns(UserWarning) if "grouped" in str(kwargs["target_modules"]) else _nothing():
        theirs = peft.get_peft_model(ConvNet(), peft.LoraConfig(**kwargs))
    perturb_trainable(ours, 1)
    theirs.load_state_dict(ours.state_dict())
    grads = {}
    for name, model in (("peftkit", ours), ("peft", theirs)):
        model.train()
        torch.manual_seed(21)
        model(**_inputs()).square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["peftkit"].keys() == grads["peft"].keys()
    for name, grad in grads["peftkit"].items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads["peft"][name], atol=1e-6, rtol=1e-4, msg=name)


def test_delta_weight_is_the_composed_kernel() -> None:
    """ΔW[o, i, k…] = s · Σ_r B[o, r] A[r, i, k…], computed here by convolving a one-hot input basis."""
    model = _make(peftkit, "conv1d-conv3d")
    layer = model.base_model.model.conv3d
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = torch.einsum("or,ridhw->oidhw", B[:, :, 0, 0, 0], A) * layer.scaling["default"]
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    # independent of the einsum: the adapter path equals a convolution with ΔW
    x = _inputs()["vol"]
    with torch.no_grad():
        via_factors = layer.adapter_delta(x, "default", layer.get_base_layer()(x))
        via_kernel = nn.functional.conv3d(x, layer.delta_weight("default"), padding=1)
    torch.testing.assert_close(via_factors, via_kernel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setup", MERGEABLE)
def test_merge_equals_unmerged_and_equals_hf_peft(setup: str, tmp_path: Path) -> None:
    made = _make(peftkit, setup)
    made.save_pretrained(str(tmp_path))
    inputs = _inputs()
    with torch.no_grad():
        unmerged = made(**inputs)
        merged = {
            n: lib.PeftModel.from_pretrained(ConvNet(), str(tmp_path)).merge_and_unload()
            for n, lib in LIBS.items()
        }
        ours, theirs = merged["peftkit"](**inputs), merged["peft"](**inputs)
    assert type(merged["peftkit"]) is ConvNet
    assert (ours - unmerged).abs().max() <= MERGE_ATOL
    assert (ours - theirs).abs().max() <= ATOL


def test_grouped_convolution_refuses_to_merge_and_changes_nothing() -> None:
    model = _make(peftkit, "grouped")
    inputs = _inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        output = model(**inputs)
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=2\)"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=2\)"):
        model.merge_and_unload()
    assert not model.base_model.model.grouped.merged
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(**inputs), output)


def test_grouped_convolution_rank_must_divide_by_groups_and_dora_is_refused() -> None:
    model = ConvNet()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="groups=2 and rank 3"):
        get_peft_model(model, LoraConfig(r=3, target_modules=["grouped"]))
    with pytest.raises(ValueError, match="DoRA on a grouped convolution"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["grouped"], use_dora=True))
    assert isinstance(model.grouped, nn.Conv2d)  # left unchanged
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_dilated_reflect_padded_convolution_merges_exactly() -> None:
    """A sees the input as the base kernel does (dilation, padding mode), so W + ΔW gives the same output.
    (HF PEFT builds A without the dilation, so a dilated base fails there with a shape mismatch.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect")
    model = get_peft_model(
        nn.Sequential(conv), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        base = conv(x)
        unmerged = model(x)
        merged = model.merge_and_unload()(x)
    assert (unmerged - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=0)
