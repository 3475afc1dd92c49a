"""Soft prompts through ``peftkit train``: prefix tuning (and P-Tuning v2) built from the YAML ``method:``
section, trained on a tiny BERT classifier, saved in HF PEFT's layout and reloaded with the same logits;
killed and resumed runs of reparameterised prompts (P-Tuning, projected prefixes) equal uninterrupted ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_fixtures import PYTHON, build_tokenizer, classification_config, cli_env, write_config
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


@pytest.mark.parametrize(
    "method",
    [
        {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
        {
            "name": "prefix_tuning",
            "num_virtual_tokens": 4,
            "prefix_projection": True,
            "encoder_hidden_size": 16,
        },
    ],
    ids=lambda m: m["name"],
)
def test_sigkill_and_resume_of_a_reparameterised_prompt_is_bitwise_exact(
    tmp_path: Path, method: dict
) -> None:
    """The HF-format adapter file holds the prompt encoder's output; the training checkpoint also keeps the
    encoder's own weights, so a resumed run continues training the encoder (not a table of its output) with
    the saved optimizer state, and ends exactly where an uninterrupted run ends."""
    tokenizer = build_tokenizer(tmp_path / "tok")

    def config_for(name: str) -> str:
        config = classification_config(
            tmp_path / name, tokenizer, save_every=2, max_steps=6, save_total_limit=None, lr=5e-2
        )
        config["method"] = method
        config["data"]["max_train_samples"] = 32
        config["data"]["max_eval_samples"] = 8
        (tmp_path / name).mkdir()
        return write_config(tmp_path / name / "run.yaml", config)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        command = [PYTHON, "-m", "peftkit", "train", *args]
        return subprocess.run(command, env={**cli_env(), **env}, capture_output=True, text=True, timeout=300)

    reference = config_for("reference")
    assert run(reference).returncode == 0
    want = load_file(str(tmp_path / "reference" / "run" / "adapter_model.safetensors"))
    killed = config_for("killed")
    assert run(killed, PEFTKIT_TEST_KILL_AFTER_STEP="3").returncode == -9
    checkpoint = tmp_path / "killed" / "run" / "checkpoint-2"
    encoder_weights = load_file(str(checkpoint / "trainable_parameters.safetensors"))
    assert "prompt_encoder.default.embedding.weight" in encoder_weights
    assert len(encoder_weights) > 3  # the encoder's layers, not just one table (plus the classifier head)
    resumed = run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    got = load_file(str(tmp_path / "killed" / "run" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    logs = [
        [json.loads(x) for x in (tmp_path / name / "run" / "log.jsonl").read_text().splitlines()]
        for name in ("reference", "killed")
    ]
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])
    train_losses = [r["loss"] for r in logs[0] if r["kind"] == "train"]
    assert len(set(train_losses)) == len(train_losses) == 6  # it trained, step by step
