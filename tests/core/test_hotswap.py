"""Hot-swapping (``peftkit.hotswap_adapter``, ``prepare_model_for_compiled_hotswap``): a swapped-in adapter
gives what a fresh load of it gives, ranks are padded only after preparation, HF PEFT's files swap in, what
does not fit is refused with the model unchanged, and mixed batches see the swapped weights."""

from __future__ import annotations

import peft
import pytest
import torch

# the shared input, the per-row reference and the seeded LoRA values of the LoRA performance tests
from test_lora_perf import IDS, _per_row_reference, _randomize_lora
from tiny_models import tiny_llama

import peftkit


def _saved(tmp_path, name: str, seed: int, **config_kwargs) -> str:
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**config_kwargs))
    _randomize_lora(model, seed)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_hotswap_smaller_rank_equals_fresh_load(tmp_path) -> None:
    big = _saved(tmp_path, "big", 0, r=8, lora_alpha=16)
    small = _saved(tmp_path, "small", 1, r=4, lora_alpha=3, use_rslora=True, lora_dropout=0.1)
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), big)
    params_before = list(model.parameters())
    peftkit.hotswap_adapter(model, small, adapter_name="default")
    # in place: the same parameter tensors hold the new values (a compiled graph or an optimizer keeps them)
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    expected = _logits(peftkit.PeftModel.from_pretrained(tiny_llama(), small))
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    assert model.peft_config["default"].r == 4
    # saving writes the adapter at its own rank: HF PEFT reads it back to the same logits
    model.save_pretrained(tmp_path / "resaved")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "resaved"))
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-6)


def test_hotswap_larger_rank_needs_preparation(tmp_path) -> None:
    small = _saved(tmp_path, "small", 0, r=4)
    big = _saved(tmp_path, "big", 1, r=8, lora_alpha=32)
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), small)
    before = _logits(model)
    with pytest.raises(ValueError, match=r"rank 8 is larger .* prepare_model_for_compiled_hotswap"):
        peftkit.hotswap_adapter(model, big)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # nothing changed
    peftkit.prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # padding is exact
    peftkit.hotswap_adapter(model, big)
    torch.testing.assert_close(_logits(model), _logits(peftkit.PeftModel.from_pretrained(tiny_llama(), big)))
    with pytest.raises(ValueError, match="target_rank=2 is below"):
        peftkit.prepare_model_for_compiled_hotswap(model, target_rank=2)


def test_hotswap_of_an_hf_peft_adapter(tmp_path) -> None:
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=6, lora_alpha=7))
    _randomize_lora(theirs, 4)
    theirs.save_pretrained(tmp_path / "hf")
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), _saved(tmp_path, "ours", 0, r=6))
    peftkit.hotswap_adapter(model, str(tmp_path / "hf"))
    torch.testing.assert_close(_logits(model), _logits(theirs.eval()), rtol=1e-5, atol=1e-6)


def test_hotswap_refuses_what_does_not_fit(tmp_path) -> None:
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), _saved(tmp_path, "qv", 0, r=4))
    before = _logits(model)
    other_targets = _saved(tmp_path, "all", 1, r=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="same target modules"):
        peftkit.hotswap_adapter(model, other_targets)
    ia3 = peftkit.get_peft_model(tiny_llama(), peftkit.IA3Config())
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter"):
        peftkit.hotswap_adapter(model, str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        peftkit.hotswap_adapter(model, other_targets, adapter_name="nope")
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_hotswap_into_a_merged_adapter_is_refused(tmp_path) -> None:
    """New values would not reach weights the old ones were merged into: unmerge first."""
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), _saved(tmp_path, "a", 0, r=4))
    model.merge_adapter()
    before = _logits(model)
    with pytest.raises(ValueError, match="merged into the base weights"):
        peftkit.hotswap_adapter(model, _saved(tmp_path, "b", 1, r=4))
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    model.unmerge_adapter()
    peftkit.hotswap_adapter(model, _saved(tmp_path, "b", 1, r=4))
    fresh = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "b"))
    torch.testing.assert_close(_logits(model), _logits(fresh), rtol=0, atol=1e-6)


def test_hotswap_updates_mixed_batches(tmp_path) -> None:
    model = peftkit.PeftModel.from_pretrained(tiny_llama(), _saved(tmp_path, "one", 0, r=4))
    model.load_adapter(_saved(tmp_path, "two", 1, r=4), adapter_name="two")
    names = ["default", "two", "default"]
    with torch.no_grad():
        model(input_ids=IDS, adapter_names=names)
        peftkit.hotswap_adapter(model, _saved(tmp_path, "three", 2, r=2, lora_alpha=9))
        torch.testing.assert_close(
            model(input_ids=IDS, adapter_names=names).logits, _per_row_reference(model, names)
        )
