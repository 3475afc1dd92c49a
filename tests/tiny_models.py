"""Tiny, offline, seeded Hugging Face models for tests.

Plain functions (not fixtures) so that any test module can ``from tiny_models import ...``;
``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` (rootdir-relative "prepend" import).

Every builder is deterministic: calling it twice with the same ``seed`` gives bit-identical weights,
which is how two PEFT libraries are made to start from the same base model.
"""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB_SIZE = 100


def llama_for_4bit(seed: int = 0) -> LlamaForCausalLM:
    """A tiny llama wide enough for bitsandbytes' 4-bit blocks (every in-features a multiple of 64, every
    out-features a multiple of 32)."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        tie_word_embeddings=tie_word_embeddings,
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


def tiny_llama_tied(seed: int = 0) -> LlamaForCausalLM:
    """:func:`tiny_llama` whose output head is the input embedding (``tie_word_embeddings=True``)."""
    return tiny_llama(seed, tie_word_embeddings=True)


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


def tiny_t5(
    seed: int = 0, eos: int | None = 1, lively: bool = False, layers: int = 3, vocab: int = 60
) -> T5ForConditionalGeneration:
    """A T5 of d_model 16, 2 heads of 8; ``lively`` scales the initialisation up so that small prompt
    changes move the greedy tokens."""
    torch.manual_seed(seed)
    config = T5Config(
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=layers,
        num_heads=2,
        vocab_size=vocab,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=eos,
        dropout_rate=0.0,
        initializer_factor=3.0 if lively else 1.0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(
    seed: int = 0, eos: int | None = 2, lively: bool = False, layers: int = 3, vocab: int = 60
) -> BartForConditionalGeneration:
    """A BART of d_model 16, 2 heads of 8 (see :func:`tiny_t5` for ``lively``)."""
    torch.manual_seed(seed)
    config = BartConfig(
        d_model=16,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=vocab,
        max_position_embeddings=64,
        eos_token_id=eos,
        forced_eos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=0.2 if lively else 0.02,
    )
    return BartForConditionalGeneration(config).eval()


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    """A 2-block Mixtral whose 4 experts per block are 3-D parameters ``(E, out, in)`` (transformers 5)."""
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config).eval()


def tiny_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """A 2-block gpt-oss whose experts are stored ``(E, in, out)`` (``is_transposed``)."""
    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
    )
    return GptOssForCausalLM(config).eval()


def build_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model ``kind`` (one of ``BUILDERS``) in eval mode, with weights fixed by ``seed``."""
    return BUILDERS[kind](seed)


def model_inputs(batch_size: int = 2, seq_len: int = 8, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Deterministic token ids (and an all-ones attention mask) valid for every tiny model."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
