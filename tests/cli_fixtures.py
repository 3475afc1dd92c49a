"""Builders for the command-line tests: a word-level tokenizer made from the shipped data (no hub), tiny
model configs and small data files, written into a temporary folder."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SENTIMENT = REPO / "examples" / "data" / "sentiment"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer(folder: Path) -> str:
    """A fast word-level tokenizer over the shipped sentiment data's words and the instruction examples
    (plus specials and a chat template), saved to ``folder``; returns the folder."""
    return _save_tokenizer(folder)


def _save_tokenizer(folder: Path) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab_words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    texts = []
    for name in ("train.csv", "test.csv"):
        with open(SENTIMENT / name, newline="", encoding="utf-8") as f:
            texts += [row["text"].lower() for row in csv.DictReader(f)]
    texts += [ALPACA_TEXT.lower()]
    for text in texts:
        vocab_words.update(word for word, _ in pre.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(specials + sorted(vocab_words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Whitespace()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return str(folder)


ALPACA_TEXT = (
    "below is an instruction that describes a task paired with an input that provides further context . "
    "write a response that appropriately completes the request ### instruction : input : response : "
    "name a colour . red green blue translate to french hello bonjour add two numbers 2 3 5 the sum is "
    "say hi hi there what is the capital of france paris"
)

ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"instruction": "Translate to French", "input": "hello", "output": "bonjour"},
    {"instruction": "Add two numbers", "input": "2 3", "output": "the sum is 5"},
    {"instruction": "Say hi", "input": "", "output": "hi there"},
    {"instruction": "What is the capital of France", "input": "", "output": "paris"},
    {"instruction": "Name a colour.", "input": "", "output": "green"},
]


def tiny_bert_config() -> dict[str, Any]:
    return {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 1500,
        "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def tiny_llama_config() -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1500,
        "max_position_embeddings": 256,
    }


def classification_config(tmp: Path, tokenizer: str, **train: Any) -> dict[str, Any]:
    return {
        "model": {"from_config": tiny_bert_config(), "tokenizer": tokenizer, "task_type": "SEQ_CLS"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {
            "train": str(SENTIMENT / "train.csv"),
            "validation": str(SENTIMENT / "test.csv"),
            "max_train_samples": 64,
            "max_eval_samples": 32,
            "max_length": 32,
        },
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress_bar": False, "log_every": 1, **train},
        "output_dir": str(tmp / "run"),
    }


def instruction_config(tmp: Path, tokenizer: str, **train: Any) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    data_file = tmp / "alpaca.json"
    data_file.write_text(json.dumps(ALPACA_ROWS))
    return {
        "model": {"from_config": tiny_llama_config(), "tokenizer": tokenizer, "task_type": "CAUSAL_LM"},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "data": {
            "train": str(data_file),
            "format": "instruction",
            "validation_split": 0.34,
            "max_length": 64,
        },
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-2, "progress_bar": False, "log_every": 1, **train},
        "output_dir": str(tmp / "run"),
    }


def write_config(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PEFTKIT_TEST_KILL_AFTER_STEP", None)
    env.pop("PEFTKIT_TEST_KILL_DURING_SAVE", None)
    return env


PYTHON = sys.executable
