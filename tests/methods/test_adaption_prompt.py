"""Adaption prompts (LLaMA-Adapter) against HF PEFT and against their promises: checkpoints both ways with
the same logits (grouped-query attention), exact identity at init, training, generation with the KV
cache, several adapters and mixed batches, and clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB_SIZE, build_model, model_inputs
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import peftkit
from peftkit import AdaptionPromptConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 64,
}


def tiny_mistral(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**_SMALL)).eval()


def tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_SMALL)).eval()


BUILD = {"llama": lambda: build_model("llama"), "mistral": tiny_mistral, "qwen2": tiny_qwen2}


def _config(lib: Any = peftkit, layers: int = 2, length: int = 3) -> Any:
    return lib.AdaptionPromptConfig(adapter_len=length, adapter_layers=layers, task_type="CAUSAL_LM")


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor (prompts and gates) away from its initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def _inputs() -> dict[str, torch.Tensor]:
    inputs = model_inputs(batch_size=2, seq_len=8)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0
    return inputs


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or _inputs())).logits


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_checkpoint_loads_in_peftkit_with_same_logits(kind: str, tmp_path: Any) -> None:
    hf_model = peft.get_peft_model(BUILD[kind](), _config(peft))
    _perturb(hf_model)
    base_logits = _logits(BUILD[kind]())
    hf_logits = _logits(hf_model)
    assert not torch.allclose(hf_logits, base_logits, atol=1e-3)  # the prompts do something
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(BUILD[kind](), tmp_path)
    assert isinstance(ours.peft_config["default"], AdaptionPromptConfig)
    torch.testing.assert_close(_logits(ours), hf_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_peftkit_checkpoint_loads_in_hf_with_same_logits(kind: str, tmp_path: Any) -> None:
    ours = get_peft_model(BUILD[kind](), _config())
    hf_fresh = peft.get_peft_model(BUILD[kind](), _config(peft))
    assert ours.get_nb_trainable_parameters() == hf_fresh.get_nb_trainable_parameters()
    _perturb(ours)
    ours_logits = _logits(ours)
    assert not torch.allclose(ours_logits, _logits(BUILD[kind]()), atol=1e-3)
    ours.save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(BUILD[kind](), tmp_path)
    torch.testing.assert_close(_logits(hf_model), ours_logits, atol=1e-5, rtol=1e-5)
    # the same tensor names, shapes and config keys as HF PEFT writes
    hf_dir = tmp_path / "hf"
    hf_fresh.save_pretrained(hf_dir)
    ours_sd = load_file(tmp_path / "adapter_model.safetensors")
    hf_sd = load_file(hf_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    top = BUILD[kind]().config.num_hidden_layers - 1
    assert f"base_model.model.model.layers.{top}.self_attn.adaption_gate" in ours_sd
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    hf_saved = json.loads((hf_dir / "adapter_config.json").read_text())
    for key in ("peft_type", "target_modules", "adapter_len", "adapter_layers"):
        assert saved[key] == hf_saved[key], key


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fresh_adapter_is_exactly_the_identity(kind: str) -> None:
    expected = _logits(BUILD[kind]())
    model = get_peft_model(BUILD[kind](), _config())
    assert torch.equal(_logits(model), expected)
    _perturb(model)
    assert not torch.allclose(_logits(model), expected, atol=1e-3)


def test_prompt_term_matches_an_independent_formula() -> None:
    """The added term is W_o · g · softmax(RoPE(W_q h) (W_k P)ᵀ / √d) W_v P, key/value heads shared per group."""
    model = get_peft_model(BUILD["qwen2"](), _config(layers=1))
    _perturb(model)
    layer = model.base_model.model.model.layers[-1].self_attn
    attn = layer.base_layer
    hidden = torch.randn(2, 5, 32)
    position_ids = torch.arange(5).expand(2, -1)
    cos, sin = model.base_model.model.model.rotary_emb(hidden, position_ids)
    with torch.no_grad():
        got = layer(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        base = attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        prompt, gate = layer.adaption_prompt["default"][0], layer.adaption_gate["default"]
        q = attn.q_proj(hidden).view(2, 5, 4, 8).transpose(1, 2)
        rotated = torch.cat((-q[..., 4:], q[..., :4]), dim=-1)
        q = q * cos[:, None] + rotated * sin[:, None]
        k = attn.k_proj(prompt).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # (4, P, d)
        v = attn.v_proj(prompt).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)
        probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        heads = (gate * probs) @ v  # (2, 4, 5, 8)
        expected = base + heads.transpose(1, 2).reshape(2, 5, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_training_changes_prompts_and_gates_only() -> None:
    model = get_peft_model(BUILD["llama"](), _config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.model.layers.{i}.self_attn.{kind}.default"
        for i in (0, 1)
        for kind in ("adaption_prompt", "adaption_gate")
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = model_inputs()
    model.train()
    for _ in range(3):  # the gate starts at 0, so the prompts move from the second step on
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def _greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generate_with_cache_equals_full_forward_passes() -> None:
    model = get_peft_model(BUILD["llama"](), _config())
    _perturb(model)
    ids = model_inputs(batch_size=1, seq_len=5)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = _greedy_without_cache(model, ids, 6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(cached, expected)
    with torch.no_grad(), model.disable_adapter():
        base_tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    reference = BUILD["llama"]().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(base_tokens, reference)


def test_two_adapters_add_up_and_mixed_batches_route_rows() -> None:
    model = get_peft_model(BUILD["llama"](), _config(layers=2))
    model.add_adapter("top", _config(layers=1, length=2))
    _perturb(model)  # only "default" trains (it is active)
    model.set_adapter("top")
    _perturb(model, seed=8)
    inputs = model_inputs()
    with torch.no_grad():
        model.set_adapter("default")
        only_default = model(**inputs).logits
        model.set_adapter("top")
        only_top = model(**inputs).logits
        mixed = model(**inputs, adapter_names=["default", "top"]).logits
        base_rows = model(**inputs, adapter_names=["__base__", "top"]).logits
    torch.testing.assert_close(mixed[0], only_default[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_top[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_rows[0], _logits(BUILD["llama"](), inputs)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(only_default, only_top, atol=1e-3)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="model types"):
        get_peft_model(build_model("gpt2"), _config())
    for bad in ({"adapter_len": 0}, {"adapter_len": -1}, {"adapter_layers": 0}):
        with pytest.raises(ValueError, match="positive integer"):
            AdaptionPromptConfig(**{"adapter_len": 3, "adapter_layers": 1, **bad})
    with pytest.raises(ValueError, match="needs adapter_len"):  # built as in HF PEFT; refused when used
        get_peft_model(build_model("llama"), AdaptionPromptConfig(adapter_layers=1))
    with pytest.raises(ValueError, match="attribute name"):
        AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="model.layers.0.self_attn")
    llama = build_model("llama")
    with pytest.raises(ValueError, match="adapter_layers=3 but the model has only 2"):
        get_peft_model(llama, _config(layers=3))
    assert all(p.requires_grad for p in llama.parameters())  # rolled back
    assert not any("adaption" in n for n, _ in llama.named_parameters())
    model = get_peft_model(BUILD["llama"](), _config())
    _perturb(model)
    before = _logits(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(_logits(model), before)
