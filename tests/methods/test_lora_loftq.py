"""LoftQ: ``init_lora_weights="loftq"`` on a full-precision base and ``replace_lora_weights_loftq`` on a
4-bit base, against bitsandbytes' own quantization (the way HF PEFT's LoftQ calls it) and HF PEFT's low-rank
decomposition. (HF PEFT's LoftQ itself needs a GPU, so its end-to-end functions cannot run here.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft.utils.loftq_utils import _low_rank_decomposition  # noqa: E402
from tiny_models import llama_for_4bit  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

import peftkit  # noqa: E402

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def standard_4bit_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)  # same numbers on every host


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama_for_4bit().save_pretrained(folder)
    return folder


def _fp(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder).eval()


def _4bit(folder: Path) -> LlamaForCausalLM:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization).eval()


def _logit_error(model: torch.nn.Module, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=IDS).logits - reference).abs().mean().item()


def _nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """As HF PEFT's loftq_init quantizes: a Params4bit (NF4, no double quantization) moved to the device."""
    param = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4"
    )
    param = param.to("cpu")
    return bnb.functional.dequantize_4bit(param.data, param.quant_state)


def _factors(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@pytest.mark.parametrize("alpha", [8, 16])
def test_loftq_init_quantizes_the_base_and_fits_the_residual(llama_dir: Path, alpha: int) -> None:
    original = _fp(llama_dir)
    config = peftkit.LoraConfig(
        r=8,
        lora_alpha=alpha,
        target_modules="all-linear",
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4},
    )
    model = peftkit.get_peft_model(_fp(llama_dir), config)
    scaling = alpha / 8
    for name, module in original.named_modules():
        if not name.endswith(("q_proj", "down_proj")):
            continue
        layer = model.base_model.model.get_submodule(name)
        weight = module.weight.detach()
        quantized = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(quantized, _nf4_roundtrip(weight), atol=0, rtol=0)
        A, B = _factors(layer)
        hf = _low_rank_decomposition(weight - quantized, reduced_rank=8)  # L R: HF PEFT's fit (its s = 1)
        torch.testing.assert_close(scaling * B @ A, hf["L"] @ hf["R"], atol=1e-5, rtol=1e-4)
        assert (weight - quantized - scaling * B @ A).norm() < (weight - quantized).norm()


def test_more_loftq_iterations_fit_the_weight_at_least_as_well(llama_dir: Path) -> None:
    reference = _fp(llama_dir)
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    errors = []
    for iterations in (1, 4):
        config = peftkit.LoraConfig(
            r=8,
            target_modules="all-linear",
            init_lora_weights="loftq",
            loftq_config=peftkit.LoftQConfig(loftq_iter=iterations),
        )
        model = peftkit.get_peft_model(_fp(llama_dir), config)
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        A, B = _factors(layer)
        weight = reference.model.layers[0].mlp.down_proj.weight.detach()
        errors.append(
            ((weight - layer.get_base_layer().weight - B @ A).norm().item(), _logit_error(model, expected))
        )
    assert errors[1][0] <= errors[0][0] * 1.01
    plain = peftkit.get_peft_model(_4bit(llama_dir), peftkit.LoraConfig(r=8, target_modules="all-linear"))
    assert errors[0][1] < _logit_error(plain, expected)  # closer to the full-precision model than plain QLoRA


def test_replace_lora_weights_loftq_on_a_4bit_base(llama_dir: Path, tmp_path: Path) -> None:
    reference = _fp(llama_dir)
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    model = peftkit.get_peft_model(
        _4bit(llama_dir), peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    before = _logit_error(model, expected)
    peftkit.replace_lora_weights_loftq(model)  # the base model's own folder
    after = _logit_error(model, expected)
    assert after < 0.8 * before
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    residual = reference.model.layers[1].self_attn.v_proj.weight.detach() - layer.base_weight().detach()
    hf = _low_rank_decomposition(residual, reduced_rank=8)
    A, B = _factors(layer)
    torch.testing.assert_close(2.0 * B @ A, hf["L"] @ hf["R"], atol=1e-5, rtol=1e-4)
    # the adapter is an ordinary LoRA file: HF PEFT gives the same logits on the same 4-bit base
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
        theirs = peft.PeftModel.from_pretrained(_4bit(llama_dir), tmp_path / "adapter")(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_replace_lora_weights_loftq_callback_and_errors(llama_dir: Path, tmp_path: Path) -> None:
    model = peftkit.get_peft_model(
        _4bit(llama_dir), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []

    def keep_only_q(peft_model: torch.nn.Module, name: str) -> bool:
        seen.append(name)
        return name.endswith("q_proj")

    peftkit.replace_lora_weights_loftq(
        model, model_path=str(llama_dir / "model.safetensors"), callback=keep_only_q
    )
    assert len(seen) == 4
    for name, param in model.named_parameters():
        if name in start:
            assert torch.equal(param, start[name]) == ("v_proj" in name), name
    with pytest.raises(ValueError, match="No bnb LoRA module"):
        peftkit.replace_lora_weights_loftq(peftkit.get_peft_model(_fp(llama_dir), peftkit.LoraConfig(r=4)))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        peftkit.replace_lora_weights_loftq(model, model_path=str(tmp_path))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"model.layers.0.self_attn.q_proj.weight": "../x.safetensors"}})
    )
    with pytest.raises(ValueError, match="not a file name"):
        peftkit.replace_lora_weights_loftq(model, model_path=str(tmp_path))


def test_loftq_config_checks_and_file_format(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loftq_config` must be specified"):
        peftkit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits 4 or 8"):
        peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.warns(UserWarning, match="will be ignored"):
        peftkit.LoraConfig(loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="already quantized"):
        peftkit.get_peft_model(
            _4bit(llama_dir),
            peftkit.LoraConfig(r=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
        )
    config = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(loftq_bits=8))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}  # HF PEFT's layout
    assert peft.LoraConfig.from_pretrained(tmp_path).loftq_config == saved["loftq_config"]


def test_loftq_workflow_quantized_base_saved_then_loaded_in_4bit(llama_dir: Path, tmp_path: Path) -> None:
    """LoftQ's recipe: initialise on the full-precision model, save the quantized-then-dequantized base and
    the adapter, load the base in 4-bit and the adapter on it: the same model (the base weights lie on the
    NF4 grid, so quantizing them again changes nothing)."""
    config = peftkit.LoraConfig(
        r=8, target_modules="all-linear", init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
    )
    model = peftkit.get_peft_model(_fp(llama_dir), config)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    import copy

    copy.deepcopy(model).unload().save_pretrained(tmp_path / "base")
    loaded = peftkit.PeftModel.from_pretrained(_4bit(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
