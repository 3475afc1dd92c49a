"""Soft prompts through ``peftkit train``: prefix tuning (and P-Tuning v2) built from the YAML ``method:``
section, trained on a tiny BERT classifier, saved in HF PEFT's layout and reloaded with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import build_tokenizer, classification_config, write_config
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftkit import PeftModel
from peftkit.cli import main


@pytest.mark.parametrize(
    "method",
    [
        {"name": "prefix_tuning", "num_virtual_tokens": 4},
        {"name": "p_tuning_v2", "num_virtual_tokens": 4},
    ],
    ids=lambda m: m["name"],
)
def test_train_prefix_through_the_cli(tmp_path: Path, method: dict) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    config = classification_config(tmp_path, tokenizer, lr=5e-2)
    config["method"] = method
    config["data"]["max_train_samples"] = 16
    config["data"]["max_eval_samples"] = 8
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    run = tmp_path / "run"
    saved_config = json.loads((run / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == method["name"].upper()
    tensors = load_file(str(run / "adapter_model.safetensors"))
    assert tensors["prompt_embeddings"].shape == (4, 2 * 2 * 32)  # layers · (K, V) · hidden
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= set(tensors)
    # the folder reloads onto the saved base model with the stored prefix, which changes the output
    base_dir = Path(saved_config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), run)
    assert torch.equal(
        loaded.base_model.prompt_encoder["default"].embedding.weight, tensors["prompt_embeddings"]
    )
    batch = AutoTokenizer.from_pretrained(tokenizer)(
        ["a great movie", "bad"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = loaded(**batch).logits
        with loaded.disable_adapter():
            base_logits = loaded(**batch).logits
    assert logits.shape == (2, 2) and not torch.allclose(logits, base_logits)
