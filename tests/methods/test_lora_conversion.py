"""``save_pretrained(path_initial_model_for_weight_conversion=...)``: a PiSSA / OLoRA adapter written as a plain
LoRA of twice the rank for the original base model, tested against HF PEFT's conversion and by the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

import peftkit

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


SETTINGS = {
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "pissa-rslora": {"init_lora_weights": "pissa", "use_rslora": True},
    "pissa-patterns": {
        "init_lora_weights": "pissa",
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_converted_adapter_is_hf_peft_s_and_gives_the_trained_model_on_the_original_base(
    setting: str, tmp_path: Path
) -> None:
    outputs = {}
    for name, lib in {"peft": peft, "peftkit": peftkit}.items():
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **SETTINGS[setting])
        model = lib.get_peft_model(tiny_llama(0), config)
        model.peft_config["default"].init_lora_weights = True  # HF PEFT's recipe for the initial folder
        model.save_pretrained(tmp_path / name / "init")
        model.peft_config["default"].init_lora_weights = SETTINGS[setting]["init_lora_weights"]
        _perturb(model)  # "training"
        outputs[name] = _logits(model)
        model.save_pretrained(
            tmp_path / name / "lora", path_initial_model_for_weight_conversion=tmp_path / name / "init"
        )
    torch.testing.assert_close(outputs["peftkit"], outputs["peft"], atol=1e-5, rtol=1e-5)
    files = {n: load_file(tmp_path / n / "lora" / "adapter_model.safetensors") for n in ("peft", "peftkit")}
    assert files["peft"].keys() == files["peftkit"].keys()
    for key, tensor in files["peft"].items():
        torch.testing.assert_close(files["peftkit"][key], tensor, atol=1e-5, rtol=1e-5, msg=key)
    configs = {
        n: json.loads((tmp_path / n / "lora" / "adapter_config.json").read_text())
        for n in ("peft", "peftkit")
    }
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert configs["peftkit"][field] == pytest.approx(configs["peft"][field]), field
    for reader in (peft, peftkit):  # a plain LoRA on the unmodified base gives the trained model
        loaded = reader.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peftkit" / "lora")
        torch.testing.assert_close(_logits(loaded), outputs["peftkit"], atol=1e-5, rtol=1e-5)


def test_conversion_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    model = peftkit.get_peft_model(
        tiny_llama(0), peftkit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    other = peftkit.get_peft_model(tiny_llama(0), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="initial adapter does not match"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    ia3 = peftkit.get_peft_model(
        tiny_llama(0), peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="cannot be converted"):
        ia3.save_pretrained(tmp_path / "ia3-out", path_initial_model_for_weight_conversion=tmp_path / "ia3")
