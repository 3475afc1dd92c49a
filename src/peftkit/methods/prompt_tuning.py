"""Prompt Tuning: a few trainable virtual-token embeddings prepended to the input.

Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021
(arXiv:2104.08691). The model is frozen; only a prompt ``P ∈ R^{p×d}`` trains, prepended to the embedded
input ``X_e = embed(x) ∈ R^{n×d}``::

    h = model([P ; X_e])          attention_mask = [1_p ; mask],   labels = [-100_p ; labels]

    x ─► embed ─► [ P₁ … P_p  e₁ … e_n ] ─► frozen transformer ─► head

Initialisation (§3 of the paper): ``RANDOM`` (``nn.Embedding``'s N(0, 1), as HF PEFT),
``SAMPLE_VOCAB`` (embeddings of random vocabulary tokens) or ``TEXT`` (the embeddings of an init text such
as a task description, repeated to fill ``p`` tokens). The checkpoint is HF PEFT's: one
``prompt_embeddings`` tensor of shape ``(p, d)``. On an encoder-decoder model (T5, BART) the prompt is
prepended to the encoder input; HF PEFT's table then has ``2p`` rows (one block per transformer submodule)
of which the encoder takes the first ``p``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar

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


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt Tuning settings (HF PEFT's names and defaults).

    Args:
        prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` or ``"TEXT"``.
        prompt_tuning_init_text: the text whose token embeddings start the prompt (``TEXT`` only); it is
            repeated to fill ``num_virtual_tokens`` and must not be longer than that.
        tokenizer_name_or_path: the tokenizer for the init text (``TEXT`` only).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``trust_remote_code`` is refused).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    #: the accepted ``prompt_tuning_init`` values (Multitask Prompt Tuning adds its own)
    init_choices: ClassVar[type[enum.Enum]] = PromptTuningInit

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        try:
            self.prompt_tuning_init = self.init_choices(
                str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
            )
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init must be one of {[i.value for i in self.init_choices]}, got "
                f"{self.prompt_tuning_init!r}."
            ) from None
        if self.prompt_tuning_init.value == "TEXT" and not self.inference_mode:
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    'prompt_tuning_init="TEXT" needs prompt_tuning_init_text (the text to start from).'
                )
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    'prompt_tuning_init="TEXT" needs tokenizer_name_or_path (the tokenizer of the base model) to '
                    "turn prompt_tuning_init_text into token embeddings."
                )
        if self.tokenizer_kwargs and self.prompt_tuning_init.value != "TEXT":
            raise ValueError('tokenizer_kwargs is only used with prompt_tuning_init="TEXT".')


def initial_prompt(
    config: PromptTuningConfig, word_embeddings: nn.Module, num_tokens: int
) -> torch.Tensor | None:
    """The starting prompt ``(num_tokens, d)`` for ``SAMPLE_VOCAB`` / ``TEXT``, or ``None`` otherwise
    (``RANDOM``; other inits are the calling method's)."""
    value = str(getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init))
    if (
        value not in (PromptTuningInit.SAMPLE_VOCAB.value, PromptTuningInit.TEXT.value)
        or config.inference_mode
    ):
        return None
    init = PromptTuningInit(value)
    device = word_embeddings.weight.device
    if init == PromptTuningInit.SAMPLE_VOCAB:
        token_ids = torch.randint(0, word_embeddings.num_embeddings, (num_tokens,), dtype=torch.long)
    else:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        if kwargs.pop("trust_remote_code", False):
            raise ValueError(
                "tokenizer_kwargs may not set trust_remote_code (a saved config must not run code)."
            )
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        virtual = config.num_virtual_tokens or num_tokens
        if len(ids) > virtual:
            raise ValueError(
                f"prompt_tuning_init_text is {len(ids)} tokens long but num_virtual_tokens is {virtual}; "
                f"shorten the text or raise num_virtual_tokens to at least {len(ids)}."
            )
        token_ids = torch.tensor((ids * math.ceil(num_tokens / len(ids)))[:num_tokens], dtype=torch.long)
    with torch.no_grad():
        return word_embeddings(token_ids.to(device)).detach().float()


class PromptTuningModel(PromptTuner):
    """Prompt Tuning: a table of virtual-token embeddings prepended to the input embeddings."""

    placement = INPUT_EMBEDDINGS

    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        assert isinstance(config, PromptTuningConfig)
        rows = self.prompt_rows(dims)
        init = initial_prompt(config, self.model.get_input_embeddings(), rows)
        if init is not None and init.shape[1] != dims.token_dim:
            raise ValueError(f"token_dim {dims.token_dim} differs from the word embeddings' {init.shape[1]}.")
        return PromptTable(rows, dims.token_dim, init)


register_method("PROMPT_TUNING", PromptTuningConfig, PromptTuningModel)
