"""Prefix Tuning: trainable keys and values prepended in every attention layer.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021 (arXiv:2101.00190).
Each layer ``l`` attends over ``p`` extra positions whose keys and values are trained; the model is
frozen::

    head = softmax(Q [K_prefix,l ; K]ᵀ / √d) [V_prefix,l ; V]

    the table  (p, L·2·d_kv):  row i = [K₁ᵢ V₁ᵢ K₂ᵢ V₂ᵢ … K_Lᵢ V_Lᵢ]

The prefix reaches the layers as a prefilled transformers ``DynamicCache`` (the model's own
``cache`` / ``past_key_values`` input); the attention mask gets ``p`` leading ones and given position ids
move by ``p``. Under grouped-query attention the table holds the key/value heads only (``d_kv =
num_key_value_heads · head_dim``), as HF PEFT does.

With ``prefix_projection=True`` (the paper's reparameterisation, §4.3) the table is
``MLP(E) = W₂ tanh(W₁ E)``, ``E ∈ R^{p×d}``. The checkpoint holds the table (the MLP's output, as HF PEFT
saves it) as ``prompt_embeddings``. A cache that gradient checkpointing would recompute cannot carry a
prefix: that combination is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.config import PeftConfig, PeftType
from peftkit.prompt import ATTENTION_PREFIX, PromptDims, PromptLearningConfig, PromptTable, PromptTuner
from peftkit.registry import register_method


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix Tuning settings (HF PEFT's names and defaults).

    Args:
        encoder_hidden_size: the projection MLP's hidden width (``prefix_projection=True``); the model's
            hidden size when ``None``.
        prefix_projection: train the prefix through an MLP over ``p`` embeddings instead of directly.
        init_weights: ``None`` (random, ``nn.Embedding``'s N(0, 1)) or ``"zero"`` (a zero prefix; with the
            projection, a zero last layer).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f'init_weights must be None or "zero", got {self.init_weights!r}.')
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")


class PrefixEncoder(nn.Module):
    """HF PEFT's projected ``PrefixEncoder`` (``embedding`` then ``transform``): ``(p, L·2·d_kv)``."""

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, width: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class PrefixTuningModel(PromptTuner):
    """Prefix Tuning: a prefilled key/value cache in every attention layer."""

    placement = ATTENTION_PREFIX

    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        assert isinstance(config, PrefixTuningConfig)
        width = self.prompt_width(dims)
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or dims.token_dim
            return PrefixEncoder(
                dims.num_virtual_tokens, dims.token_dim, hidden, width, config.init_weights == "zero"
            )
        table = PromptTable(dims.num_virtual_tokens, width)
        if config.init_weights == "zero":
            nn.init.zeros_(table.embedding.weight)
        return table


register_method(PeftType.PREFIX_TUNING, PrefixTuningConfig, PrefixTuningModel)
