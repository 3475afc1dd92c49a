"""LoRA's ``ensure_weight_tying`` on a model whose head is tied to its input embedding, against HF PEFT: a
``modules_to_save`` copy of the embedding is the head's too, and LoRA on the embedding or the head is one
update for both (the head's factors are the embedding's, transposed)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama, tiny_llama_tied

import peftkit

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 2, 50, 0, 7], [3, 9, 9, 1, 4, 6, 99]])
LIBS = {"peft": peft, "peftkit": peftkit}


def _randomize(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.1)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


SETTINGS = {
    "save-embedding": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
    "save-head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "lora-embedding": {"target_modules": ["q_proj", "embed_tokens"]},
    "lora-head": {"target_modules": ["q_proj", "lm_head"]},
    "lora-both": {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
}


def _model(lib: object, setting: str) -> torch.nn.Module:
    config = lib.LoraConfig(r=4, ensure_weight_tying=True, **SETTINGS[setting])  # type: ignore[attr-defined]
    return lib.get_peft_model(tiny_llama_tied(0), config)  # type: ignore[attr-defined]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_tied_adapters_equal_hf_peft_both_ways(setting: str, tmp_path: Path) -> None:
    outputs = {}
    for name, lib in LIBS.items():
        model = _model(lib, setting)
        _randomize(model)
        base = model.base_model.model
        # the head still computes with the embedding's (trained) weight and update
        assert sorted(
            n for n, p in model.named_parameters() if p.requires_grad and "q_proj" not in n
        ) == sorted(
            n for n, p in _model(peft, setting).named_parameters() if p.requires_grad and "q_proj" not in n
        )
        if "save" in setting:
            assert base.lm_head.weight is base.model.embed_tokens.weight
        model.save_pretrained(tmp_path / name)
        outputs[name] = _logits(model)
    torch.testing.assert_close(outputs["peftkit"], outputs["peft"], atol=1e-5, rtol=1e-5)
    for writer in LIBS:
        for reader in LIBS.values():
            loaded = reader.PeftModel.from_pretrained(tiny_llama_tied(0), tmp_path / writer)
            torch.testing.assert_close(_logits(loaded), outputs[writer], atol=1e-5, rtol=1e-5)
    saved = {n: set(load_file(tmp_path / n / "adapter_model.safetensors")) for n in LIBS}
    if setting != "lora-head":  # HF PEFT leaves the base embedding weights out of that one file
        assert saved["peft"] == saved["peftkit"]


@pytest.mark.parametrize("setting", ["save-embedding", "lora-embedding"])
def test_one_training_step_has_hf_peft_gradients(setting: str) -> None:
    grads = {}
    for name, lib in LIBS.items():
        model = _model(lib, setting)
        _randomize(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["peft"].keys() == grads["peftkit"].keys()
    for key, grad in grads["peft"].items():
        torch.testing.assert_close(grads["peftkit"][key], grad, atol=1e-5, rtol=1e-4, msg=key)


def test_merging_a_tied_lora_keeps_one_weight_and_the_outputs() -> None:
    model = _model(peftkit, "lora-both")
    _randomize(model)
    expected = _logits(model)
    original = tiny_llama_tied(0).model.embed_tokens.weight
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    merged.unmerge_adapter()
    torch.testing.assert_close(merged.base_model.model.model.embed_tokens.weight, original)
    unloaded = copy.deepcopy(model).merge_and_unload()
    assert unloaded.lm_head.weight is unloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(unloaded), expected, atol=1e-5, rtol=1e-5)


def test_without_the_option_a_warning_says_the_adapter_unties_the_head() -> None:
    for setting in ("save-embedding", "lora-embedding"):
        with pytest.warns(UserWarning, match="ensure_weight_tying` is not set to True"):
            peftkit.get_peft_model(tiny_llama_tied(0), peftkit.LoraConfig(r=4, **SETTINGS[setting]))
    with pytest.warns(UserWarning, match="no tied modules were found"):
        peftkit.get_peft_model(
            tiny_llama(0), peftkit.LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untied model with an embedding in the adapter: nothing to say
        peftkit.get_peft_model(tiny_llama(0), peftkit.LoraConfig(r=4, **SETTINGS["lora-embedding"]))


def test_encoder_decoder_shared_embedding(tmp_path: Path) -> None:
    """BART ties the encoder's and decoder's embeddings and the head to ``shared``: the head shares the LoRA
    of ``shared``; the stacks' embeddings get LoRA of their own (as in HF PEFT), so merging gives them their own
    copies of the weight. HF PEFT's file loads here with HF PEFT's outputs before saving."""
    from tiny_models import tiny_bart

    vocab = tiny_bart(0).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, vocab, (2, 6), generator=generator),
        "decoder_input_ids": torch.randint(0, vocab, (2, 5), generator=generator),
    }

    def out(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits

    expected = {}
    for name, lib in LIBS.items():
        config = lib.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)
        model = lib.get_peft_model(tiny_bart(0), config)
        _randomize(model)
        model.save_pretrained(tmp_path / name)
        expected[name] = out(model)
        if lib is peftkit:
            base = model.base_model.model
            head, shared = base.lm_head, base.model.shared
            assert head.lora_A["default"].weight.data_ptr() == shared.lora_embedding_B["default"].data_ptr()
            assert head.lora_B["default"].weight.data_ptr() == shared.lora_embedding_A["default"].data_ptr()
            merged = copy.deepcopy(model).merge_and_unload()
            torch.testing.assert_close(out(merged), expected[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected["peftkit"], expected["peft"], atol=1e-5, rtol=1e-5)
    for writer in LIBS:
        loaded = peftkit.PeftModel.from_pretrained(tiny_bart(0), tmp_path / writer)
        torch.testing.assert_close(out(loaded), expected[writer], atol=1e-5, rtol=1e-5)
    loaded = peft.PeftModel.from_pretrained(tiny_bart(0), tmp_path / "peftkit")
    torch.testing.assert_close(out(loaded), expected["peftkit"], atol=1e-5, rtol=1e-5)


def test_an_untied_adapter_beside_a_tied_one_merges_into_its_own_copy() -> None:
    """Adapter "a" ties the head to the embedding; "b" is a plain LoRA on the head. Merging "b" alone must not
    write into the embedding the head shares."""
    model = _model(peftkit, "lora-embedding")  # adapter "default": tied, on embed_tokens and lm_head
    model.add_adapter("b", peftkit.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    model.set_adapter("b")
    embedding = model.base_model.model.model.embed_tokens
    expected, before = _logits(model), embedding(IDS).detach()
    with pytest.warns(UserWarning, match="share"):
        model.merge_adapter(["b"])
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedding(IDS), before, atol=0, rtol=0)


@pytest.mark.parametrize("setting", ["save-embedding", "lora-embedding"])
def test_low_cpu_mem_usage_loading_keeps_the_tie(setting: str, tmp_path: Path) -> None:
    model = _model(peftkit, setting)
    _randomize(model)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(
        tiny_llama_tied(0), tmp_path, low_cpu_mem_usage=True, is_trainable=True
    )
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
    loaded(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    base = loaded.base_model.model
    if setting == "save-embedding":
        assert base.lm_head.weight is base.model.embed_tokens.weight
    else:
        head_A = base.lm_head.lora_A["default"].weight
        assert torch.equal(head_A, base.model.embed_tokens.lora_embedding_B["default"].T)
        assert head_A.data_ptr() == base.model.embed_tokens.lora_embedding_B["default"].data_ptr()


def test_the_tie_follows_hf_peft_s_naming_rule() -> None:
    """HF PEFT ties only when a target names an embedding layer ("embed_tokens" / "lm_head"): BART's `shared`
    targeted by its own name gets LoRA alone, as in HF PEFT."""
    from tiny_models import tiny_bart

    for lib in LIBS.values():
        config = lib.LoraConfig(r=4, target_modules=["shared"], ensure_weight_tying=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(tiny_bart(0), config)
        wrapped = [
            n for n, m in model.named_modules() if hasattr(m, "lora_embedding_A") or hasattr(m, "lora_A")
        ]
        assert [n for n in wrapped if not n.endswith(("lora_A", "lora_B"))] == [
            "base_model.model.model.shared"
        ]
