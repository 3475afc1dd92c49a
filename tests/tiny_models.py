"""Tiny, offline, seeded Hugging Face models for tests.

Plain functions (not fixtures) so that any test module can ``from tiny_models import ...``;
``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` (rootdir-relative "prepend" import).

Every builder is deterministic: calling it twice with the same ``seed`` gives bit-identical weights,
which is how two PEFT libraries are made to start from the same base model.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB_SIZE = 100


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_seq_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert_seq_cls": tiny_bert_seq_cls,
}


def build_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model ``kind`` (one of ``BUILDERS``) in eval mode, with weights fixed by ``seed``."""
    return BUILDERS[kind](seed)


def model_inputs(batch_size: int = 2, seq_len: int = 8, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Deterministic token ids (and an all-ones attention mask) valid for every tiny model."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
