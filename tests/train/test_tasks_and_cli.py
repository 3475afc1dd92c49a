"""Task wrappers (chosen by task_type, with their default trained heads), generate() pass-through, and
the ``peftkit`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
from cli_fixtures import REPO
from tiny_models import tiny_llama
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    T5Config,
    T5ForConditionalGeneration,
)

import peftkit
from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.cli import main


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bert(cls: type, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return cls(config).eval()


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (TaskType.CAUSAL_LM, peftkit.PeftModelForCausalLM),
        ("SEQ_CLS", peftkit.PeftModelForSequenceClassification),
        (TaskType.SEQ_2_SEQ_LM, peftkit.PeftModelForSeq2SeqLM),
        (TaskType.TOKEN_CLS, peftkit.PeftModelForTokenClassification),
        (TaskType.QUESTION_ANS, peftkit.PeftModelForQuestionAnswering),
        (TaskType.FEATURE_EXTRACTION, peftkit.PeftModelForFeatureExtraction),
        (None, PeftModel),
    ],
)
def test_task_type_picks_the_wrapper(task, expected) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, task_type=task))
    assert type(model) is expected
    assert (
        type(model).__name__
        == type(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, task_type=task))).__name__
    )


@pytest.mark.parametrize(
    ("model_cls", "task", "head"),
    [
        (BertForTokenClassification, "TOKEN_CLS", "classifier"),
        (BertForQuestionAnswering, "QUESTION_ANS", "qa_outputs"),
    ],
)
def test_task_heads_train_and_match_hf_counts(model_cls, task, head) -> None:
    ours = get_peft_model(tiny_bert(model_cls), LoraConfig(r=2, task_type=task))
    theirs = peft.get_peft_model(tiny_bert(model_cls), peft.LoraConfig(r=2, task_type=task))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {f"base_model.model.{head}.modules_to_save.default.weight"} <= trainable
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_seq2seq_generate_matches_hf_peft(tmp_path) -> None:
    ours = get_peft_model(tiny_t5(), LoraConfig(r=4, task_type="SEQ_2_SEQ_LM", init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), theirs.generate(input_ids=ids, **kwargs))
    with ours.disable_adapter():
        base_tokens = ours.generate(input_ids=ids, **kwargs)
    assert torch.equal(base_tokens, tiny_t5().generate(input_ids=ids, **kwargs))


# ---------------------------------------------------------------------------------------- CLI
def test_version_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftkit {peftkit.__version__}"


@pytest.mark.parametrize("library", ["peftkit", "peft"])
def test_inspect_reports_the_saved_adapter(tmp_path, capsys, library) -> None:
    lib = peftkit if library == "peftkit" else peft
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("extra", lib.LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert info["peft_type"] == "LORA"
    assert info["num_parameters"] == sum(t.numel() for t in tensors.values())
    assert info["num_tensors"] == len(tensors)
    expected_modules = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert set(info["adapted_modules"]) == expected_modules
    assert info["subadapters"] == ["extra"]
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "method         : LORA" in text and "model.layers.1.self_attn.v_proj" in text


def test_inspect_missing_folder_is_a_clean_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peftkit", "inspect", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "error" in result.stderr and "adapter_config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_split_seed_fixes_the_validation_draw_across_training_seeds():
    """``data.split_seed`` keeps one validation split for every training seed (a benchmark's seeds then
    differ in initialisation and order only); without it the split follows the training seed."""

    from peftkit.train.data import load_splits
    from peftkit.train.runconfig import DataSection

    train = str(REPO / "examples" / "data" / "sentiment" / "train.csv")
    fixed = DataSection(train=train, validation_split=0.25, split_seed=7)
    follows = DataSection(train=train, validation_split=0.25)
    val_a = load_splits(fixed, seed=0)[1]
    val_b = load_splits(fixed, seed=1)[1]
    assert val_a == val_b and val_a == load_splits(follows, seed=7)[1]
    assert load_splits(follows, seed=0)[1] != load_splits(follows, seed=1)[1]
    train_rows, val_rows = load_splits(fixed, seed=0)
    assert len(val_rows) == round(0.25 * (len(train_rows) + len(val_rows)))
    assert not {tuple(r.items()) for r in val_rows} & {tuple(r.items()) for r in train_rows}
