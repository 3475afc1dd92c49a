"""``AutoPeftModel*.from_pretrained(adapter_folder)`` loads the base model its config names, as HF PEFT's."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import model_inputs, tiny_bert_seq_cls, tiny_llama

import peftkit


@pytest.fixture
def saved(tmp_path):
    """A tiny llama saved as a base model, and a trained-looking LoRA adapter on it that names it."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = peftkit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        peftkit.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path


def test_auto_causal_lm_equals_hf_peft(saved) -> None:
    ours = peftkit.AutoPeftModelForCausalLM.from_pretrained(saved / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(saved / "adapter")
    assert isinstance(ours, peftkit.PeftModelForCausalLM) and not ours.training
    with torch.no_grad():
        torch.testing.assert_close(ours(**model_inputs()).logits, theirs(**model_inputs()).logits)


def test_the_wrong_auto_class_or_the_generic_one_is_a_clear_error(saved) -> None:
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
        peftkit.AutoPeftModelForSequenceClassification.from_pretrained(saved / "adapter")
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        peftkit.AutoPeftModel.from_pretrained(saved / "adapter")
    with pytest.raises(OSError, match="from_pretrained"):
        peftkit.AutoPeftModelForCausalLM()


def test_auto_sequence_classification_loads_the_head(tmp_path) -> None:
    tiny_bert_seq_cls().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    model = peftkit.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
        peftkit.LoraConfig(task_type="SEQ_CLS"),
    )
    with torch.no_grad():
        next(model.base_model.save_wrappers()[0][1].modules_to_save["default"].parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**model_inputs()).logits, model(**model_inputs()).logits)
