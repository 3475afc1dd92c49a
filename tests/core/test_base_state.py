"""``inject_adapter_in_model`` and ``get_/set_base_model_state_dict`` against HF PEFT."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import model_inputs, tiny_bert_seq_cls, tiny_llama

import peftkit
from peftkit import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict


def test_inject_adapter_in_model_adds_layers_in_place_as_hf_peft() -> None:
    ours, ref = tiny_llama(), tiny_llama()
    returned = peftkit.inject_adapter_in_model(
        peftkit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), ours
    )
    torch.manual_seed(0)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), ref)
    assert returned is ours
    assert {k for k in ours.state_dict() if "lora_" in k} == {k for k in ref.state_dict() if "lora_" in k}
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in ref.named_parameters() if p.requires_grad
    ]


def test_inject_adapter_in_model_refuses_prompt_methods_and_leaves_the_model() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not support prompt learning"):
        peftkit.inject_adapter_in_model(
            peftkit.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), model
        )
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [(tiny_llama, {"target_modules": ["q_proj", "v_proj"]}), (tiny_bert_seq_cls, {"task_type": "SEQ_CLS"})],
    ids=["llama", "bert-with-head"],
)
def test_base_model_state_dict_has_the_original_keys_and_values(build, kwargs: dict) -> None:
    original = build().state_dict()
    ours = peftkit.get_peft_model(build(), peftkit.LoraConfig(**kwargs))
    ref = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    got = peftkit.get_base_model_state_dict(ours)
    assert got.keys() == original.keys() == peft.get_base_model_state_dict(ref).keys()
    assert all(torch.equal(got[k], original[k]) for k in original)


def test_set_base_model_state_dict_loads_base_weights_and_keeps_the_adapter() -> None:
    model = peftkit.get_peft_model(
        tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    adapter = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(model).items()}
    other = tiny_llama(seed=1)
    result = peftkit.set_base_model_state_dict(model, other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(**model_inputs()).logits, other(**model_inputs()).logits)
    assert all(torch.equal(v, peftkit.get_peft_model_state_dict(model)[k]) for k, v in adapter.items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        peftkit.set_base_model_state_dict(model, {**other.state_dict(), "nope.weight": torch.zeros(1)})
    loose = peftkit.set_base_model_state_dict(model, {"nope.weight": torch.zeros(1)}, strict=False)
    assert loose.unexpected_keys == ["nope.weight"] and len(loose.missing_keys) == len(other.state_dict())


def test_overlapping_parameter_overrides_leave_the_parameter_as_it_was() -> None:
    """Overrides that end out of order (as two threads would) must not leave a stale value behind."""
    from peftkit.core.layer import parameter_override

    layer = torch.nn.Linear(2, 2)
    first = parameter_override(layer, "weight", torch.zeros(2, 2))
    second = parameter_override(layer, "weight", torch.ones(2, 2))
    first.__enter__()
    second.__enter__()
    assert torch.equal(layer.weight, torch.ones(2, 2))
    first.__exit__(None, None, None)
    assert torch.equal(layer.weight, torch.ones(2, 2))  # the still-active override stays visible
    second.__exit__(None, None, None)
    assert isinstance(layer.weight, torch.nn.Parameter) and "weight" not in layer.__dict__
    assert not any(k.startswith("_peftkit") for k in layer.__dict__)


def test_a_second_inject_adapter_in_model_adds_to_the_first() -> None:
    """transformers' multi-adapter pattern: two injected adapters, both saved and loaded by name."""
    model = tiny_llama()
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), model, "a")
    inject_adapter_in_model(LoraConfig(target_modules=["v_proj"], init_lora_weights=False), model, "b")
    a, b = get_peft_model_state_dict(model, "a"), get_peft_model_state_dict(model, "b")
    assert a and b and all("q_proj" in k for k in a) and all("v_proj" in k for k in b)
    set_peft_model_state_dict(model, {k: torch.zeros_like(v) for k, v in b.items()}, "b")
    assert all(not v.any() for v in get_peft_model_state_dict(model, "b").values())
    with pytest.raises(ValueError, match="cannot join"):
        inject_adapter_in_model(
            peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), model, "c"
        )
