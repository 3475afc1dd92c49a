"""P-Tuning: virtual-token embeddings produced by a small trainable prompt encoder.

Liu, Zheng, Du, Ding, Qian, Yang and Tang, "GPT Understands, Too" (arXiv:2103.10385, 2021). Like Prompt
Tuning, ``p`` virtual tokens are prepended to the embedded input, but the prompt is the output of an
encoder over trainable embeddings ``E ∈ R^{p×d}`` (a reparameterisation that makes optimisation smoother,
§3.2)::

    MLP:   P = W₃ ReLU(W₂ ReLU(W₁ E))                       (d → h → h → d)
    LSTM:  P = W₂ ReLU(W₁ BiLSTM(E))                         (d → 2h → 2h → d)
    h = model([P ; embed(x)])

Only ``P`` is needed at inference, so the checkpoint holds the encoder's *output* under HF PEFT's name
``prompt_embeddings`` (``(p, d)``); a loaded adapter is that table (training it further trains the table
directly). On an encoder-decoder model (T5, BART) the encoder runs over HF PEFT's ``2p`` embeddings (one
block per transformer submodule) and the first ``p`` outputs are prepended to the encoder input.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.placements.prompt import (
    INPUT_EMBEDDINGS,
    PromptDims,
    PromptLearningConfig,
    PromptTable,
    PromptTuner,
)


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-Tuning settings (HF PEFT's names and defaults).

    Args:
        encoder_reparameterization_type: ``"MLP"`` (three linear layers) or ``"LSTM"`` (a bidirectional LSTM
            and a two-layer MLP).
        encoder_hidden_size: the encoder's hidden width ``h``; the model's hidden size when ``None``.
        encoder_num_layers: LSTM layers (the MLP always has its three layers).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        value = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(str(value))
        except ValueError:
            raise ValueError(
                f'encoder_reparameterization_type must be "MLP" or "LSTM", got {value!r}.'
            ) from None
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")
        if self.encoder_num_layers <= 0:
            raise ValueError(f"encoder_num_layers must be positive, got {self.encoder_num_layers}.")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}.")


class PromptEncoder(nn.Module):
    """HF PEFT's ``PromptEncoder`` (same submodule names: ``embedding``, ``mlp_head``, ``lstm_head``)."""

    def __init__(self, config: PromptEncoderConfig, num_tokens: int, token_dim: int) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or token_dim
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(num_tokens, token_dim)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "encoder_num_layers is ignored for the MLP encoder (it has 3 layers).", stacklevel=6
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )

    def forward(self) -> torch.Tensor:
        embeds = self.embedding.weight.unsqueeze(0)  # (1, P, d)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            # The LSTM runs in its own dtype with autocast off: CPU autocast has no bf16/fp16 LSTM kernel
            # (HF PEFT fails there), and this few-row encoder costs nothing in float32.
            with torch.autocast(embeds.device.type, enabled=False):
                embeds = self.lstm_head(embeds)[0]  # (1, P, 2h)
        return self.mlp_head(embeds)[0]  # (P, d)


class PromptEncoderModel(PromptTuner):
    """P-Tuning: prepends the prompt encoder's output to the input embeddings."""

    placement = INPUT_EMBEDDINGS

    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        assert isinstance(config, PromptEncoderConfig)
        rows = self.prompt_rows(dims)
        if config.inference_mode:  # a loaded adapter: the file holds the encoder's output
            return PromptTable(rows, dims.token_dim)
        return PromptEncoder(config, rows, dims.token_dim)


register_method("P_TUNING", PromptEncoderConfig, PromptEncoderModel)
