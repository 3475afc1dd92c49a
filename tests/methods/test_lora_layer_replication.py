"""LoRA's ``layer_replication``: the block stack rebuilt from ranges of the original blocks, repeated blocks
sharing their base weights and each getting its own adapter (HF PEFT's option). Checked against HF PEFT
(files and logits both ways, greedy generation with the KV cache) and for structure and rollback."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from tiny_models import model_inputs, tiny_llama

import peftkit
from peftkit import LoraConfig, get_peft_model

LAYOUT = [[0, 2], [1, 2]]  # the tiny llama's blocks 0 1 1
KWARGS = dict(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False, layer_replication=LAYOUT)


def test_blocks_are_replicated_with_shared_weights_and_own_adapters() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(**KWARGS))
    blocks = model.base_model.model.model.layers
    assert len(blocks) == 3 and model.base_model.model.config.num_hidden_layers == 3
    assert blocks[1].self_attn.q_proj.base_layer.weight is blocks[2].self_attn.q_proj.base_layer.weight
    assert blocks[1].mlp.up_proj.weight is blocks[2].mlp.up_proj.weight
    assert (
        blocks[1].self_attn.q_proj.lora_A["default"].weight
        is not blocks[2].self_attn.q_proj.lora_A["default"].weight
    )
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2]  # each block its own KV cache slot
    shared = sum(p.numel() for p in blocks[1].parameters() if not p.requires_grad)
    total_before = sum(p.numel() for p in tiny_llama().parameters())
    frozen_now = sum(
        p.numel() for p in {id(p): p for p in model.parameters() if not p.requires_grad}.values()
    )
    assert frozen_now == total_before and shared > 0  # no base weight was copied


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
def test_round_trip_and_generation_equal_hf_peft(src: str, dst: str, tmp_path: Path) -> None:
    libs = {"peft": peft, "peftkit": peftkit}
    torch.manual_seed(0)
    made = libs[src].get_peft_model(tiny_llama(), libs[src].LoraConfig(**KWARGS)).eval()
    made.save_pretrained(str(tmp_path))
    loaded = libs[dst].PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    inputs = model_inputs()
    with torch.no_grad():
        expected, got = made(**inputs).logits, loaded(**inputs).logits
    assert (expected - tiny_llama()(**inputs).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    prompt = inputs["input_ids"][:1, :4]
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        made.generate(input_ids=prompt, **options), loaded.generate(input_ids=prompt, **options)
    )


def test_merge_and_unload_keeps_the_replicated_stack() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(**KWARGS)).eval()
    inputs = model_inputs()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with pytest.warns(UserWarning, match="each merged layer gets its own copy"):
            merged = model.merge_and_unload()  # blocks 1 and 2 shared q_proj / v_proj: now each has its own
        assert len(merged.model.layers) == 3
        assert (
            merged.model.layers[1].self_attn.q_proj.weight
            is not merged.model.layers[2].self_attn.q_proj.weight
        )
        assert merged.model.layers[1].mlp.up_proj.weight is merged.model.layers[2].mlp.up_proj.weight
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_refusals_leave_the_model_unchanged() -> None:
    base = tiny_llama()
    state = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="reaches past the model's 2 blocks"):
        get_peft_model(base, LoraConfig(**{**KWARGS, "layer_replication": [[0, 3]]}))
    with pytest.raises(ValueError, match="q_prj"):  # a failure after replicating puts the blocks back
        get_peft_model(base, LoraConfig(**{**KWARGS, "target_modules": ["q_prj"]}))
    assert len(base.model.layers) == 2 and base.config.num_hidden_layers == 2
    assert base.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="layer_replication"):
        LoraConfig(layer_replication=[[2, 1]])
    model = get_peft_model(base, LoraConfig(**KWARGS))
    with pytest.raises(ValueError, match="share one layer_replication"):
        model.add_adapter("other", LoraConfig(**{**KWARGS, "layer_replication": [[0, 2]]}))
    model.add_adapter("same", LoraConfig(**KWARGS))  # the same layout: no second replication
    assert len(model.base_model.model.model.layers) == 3


def test_per_layer_config_follows_the_replicated_blocks() -> None:
    """Gemma 2 reads ``config.layer_types[i]`` (sliding or full attention) per block: the replicated stack
    equals a 5-block model built with the repeated blocks' weights and types (HF PEFT fails there)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def config(layers: int, types: list[str] | None = None) -> Gemma2Config:
        return Gemma2Config(
            num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=100, sliding_window=4, layer_types=types,
        )  # fmt: skip

    torch.manual_seed(0)
    base = Gemma2ForCausalLM(config(3)).eval()
    order = [0, 1, 2, 1, 2]
    types = [base.config.layer_types[i] for i in order]
    expected_model = Gemma2ForCausalLM(config(5, types)).eval()
    state = {k: v for k, v in base.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(order):
        prefix = f"model.layers.{old}."
        state.update(
            {
                k.replace(prefix, f"model.layers.{new}.", 1): v
                for k, v in base.state_dict().items()
                if k.startswith(prefix)
            }
        )
    expected_model.load_state_dict(state)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3], [1, 3]]))
    assert model.base_model.model.config.layer_types == types
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected_model(input_ids=ids).logits)
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
