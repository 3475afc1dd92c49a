"""TrainableTokens (standalone and LoRA's ``trainable_token_indices``) against HF PEFT: saved files both ways,
outputs, gradients, merging with tied heads, mixed batches, resized vocabularies and the errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from model_state import assert_mixed_batch_equals_each_adapter
from safetensors.torch import load_file
from tiny_models import tiny_llama, tiny_llama_tied

import peftkit

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 2, 50, 0, 7], [3, 9, 9, 1, 4, 6, 99]])


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn_like(param))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


CONFIGS = {
    "standalone": lambda lib: lib.TrainableTokensConfig(token_indices=[1, 9, 50]),
    "standalone-named": lambda lib: lib.TrainableTokensConfig(
        token_indices=[9, 2], target_modules=["embed_tokens"]
    ),
    "lora-list": lambda lib: lib.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices=[1, 9, 50]
    ),
    "lora-dict-same": lambda lib: lib.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 9], "lm_head": [1, 9]}
    ),
    "lora-dict-different": lambda lib: lib.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 9], "lm_head": [2, 50]}
    ),
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("writer", ["peft", "peftkit"])
def test_files_move_both_ways_with_equal_outputs(kind: str, tied: bool, writer: str, tmp_path: Path) -> None:
    if kind.startswith("lora-dict") and not tied:
        pytest.skip("an untied model has no lm_head rows tied to the embedding")
    build = tiny_llama_tied if tied else tiny_llama
    libs = {"peft": peft, "peftkit": peftkit}
    files = {}
    for name, lib in libs.items():
        model = lib.get_peft_model(build(0), CONFIGS[kind](lib))
        _randomize(model)
        model.save_pretrained(tmp_path / name)
        files[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert files["peft"].keys() == files["peftkit"].keys()  # the same tensors under the same names

    lib = libs[writer]
    written = lib.get_peft_model(build(0), CONFIGS[kind](lib))
    _randomize(written)
    expected = _logits(written)
    for reader in libs.values():
        loaded = reader.PeftModel.from_pretrained(build(0), tmp_path / writer)
        torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["standalone", "lora-list"])
def test_one_training_step_has_hf_peft_gradients(kind: str) -> None:
    grads = {}
    for lib in (peft, peftkit):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_llama_tied(0), CONFIGS[kind](lib))
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[lib.__name__] = {
            n.replace(".token_adapter", ""): p.grad
            for n, p in model.named_parameters()
            if "tokens_delta" in n
        }
    assert grads["peft"].keys() == grads["peftkit"].keys() and grads["peft"]
    for name, grad in grads["peft"].items():
        torch.testing.assert_close(grads["peftkit"][name], grad, atol=1e-6, rtol=1e-5)


def test_tied_head_reads_the_trained_rows_and_merge_keeps_it_tied() -> None:
    model = peftkit.get_peft_model(tiny_llama_tied(0), peftkit.TrainableTokensConfig(token_indices=[1, 9]))
    delta = model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.copy_(torch.randn_like(delta))
    # the head computes with the same rows: logit of token 9 = h · Δ[1]
    hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    logits = _logits(model)
    torch.testing.assert_close(logits[..., 9], hidden.detach() @ delta[1].detach(), atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still one tensor
    torch.testing.assert_close(merged.model.embed_tokens.weight[[1, 9]], delta.detach())
    torch.testing.assert_close(_logits(merged), logits, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), logits, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(
        model.base_model.model.model.embed_tokens.weight, tiny_llama_tied(0).model.embed_tokens.weight
    )


def test_mixed_batch_equals_each_adapter_alone() -> None:
    model = peftkit.get_peft_model(tiny_llama_tied(0), peftkit.TrainableTokensConfig(token_indices=[1, 9]))
    model.add_adapter("other", peftkit.TrainableTokensConfig(token_indices=[5, 7]))
    _randomize(model)
    for name in ("default", "other"):
        model.base_model.set_adapter(name)
        _randomize(model, seed=2 if name == "other" else 1)
    assert_mixed_batch_equals_each_adapter(model, torch.cat([IDS, IDS[:1]]), ["default", "other", "__base__"])


def test_a_token_added_by_resizing_is_defined_by_the_adapter_alone(tmp_path: Path) -> None:
    def resized(seed: int) -> torch.nn.Module:
        model = tiny_llama(0)
        torch.manual_seed(seed)  # the new row's random values differ between the two bases
        model.resize_token_embeddings(101, mean_resizing=False)
        return model

    model = peftkit.get_peft_model(resized(1), peftkit.TrainableTokensConfig(token_indices=[100]))
    _randomize(model)
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[100, 3, 100, 4]])
    other_base = resized(2)
    assert not torch.equal(
        other_base.model.embed_tokens.weight[100], resized(1).model.embed_tokens.weight[100]
    )
    for lib in (peftkit, peft):
        loaded = lib.PeftModel.from_pretrained(resized(2), tmp_path)
        # (the untied head's new row is random too: compare the logits of the original vocabulary)
        torch.testing.assert_close(
            _logits(loaded, ids)[..., :100], _logits(model, ids)[..., :100], atol=1e-5, rtol=1e-5
        )


def test_errors_are_clear_and_leave_the_model_as_it_was() -> None:
    base = tiny_llama(0)
    with pytest.raises(ValueError, match="out of range"):
        peftkit.get_peft_model(base, peftkit.TrainableTokensConfig(token_indices=[100]))
    assert type(base.model.embed_tokens) is torch.nn.Embedding
    with pytest.raises(ValueError, match="non-negative integer"):
        peftkit.TrainableTokensConfig(token_indices=[-1])
    with pytest.raises(ValueError, match="needs token_indices"):
        peftkit.get_peft_model(tiny_llama(0), peftkit.TrainableTokensConfig())
    with pytest.raises(ValueError, match="but not both"):
        peftkit.get_peft_model(
            tiny_llama(0),
            peftkit.LoraConfig(
                target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[1]
            ),
        )
    with pytest.raises(ValueError, match="different token indices"):
        peftkit.get_peft_model(
            tiny_llama_tied(0),
            peftkit.LoraConfig(
                target_modules=["q_proj"],
                trainable_token_indices={"embed_tokens": [1], "lm_head": [2]},
                ensure_weight_tying=True,
            ),
        )
    tied = peftkit.get_peft_model(tiny_llama_tied(0), peftkit.TrainableTokensConfig(token_indices=[1, 2]))
    with pytest.raises(ValueError, match="tied to the input embedding"):  # the head already reads those rows
        tied.add_adapter("head", peftkit.TrainableTokensConfig(token_indices=[3], target_modules=["lm_head"]))
    assert list(tied.peft_config) == ["default"]
    model = peftkit.get_peft_model(tiny_llama(0), peftkit.TrainableTokensConfig(token_indices=[1, 9]))
    model.add_adapter("overlap", peftkit.TrainableTokensConfig(token_indices=[9]))
    model.base_model.set_adapter(["default", "overlap"])
    with pytest.raises(ValueError, match="disjunct token indices"):
        model(input_ids=IDS)
