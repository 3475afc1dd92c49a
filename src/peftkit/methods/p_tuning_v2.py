"""P-Tuning v2: deep prompts (a prefix in every layer) for understanding tasks.

Liu, Ji, Fu, Tam, Du, Yang and Tang, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks", ACL 2022 (arXiv:2110.07602). The mechanism is Prefix Tuning's:
every layer ``l`` of a frozen encoder (BERT, RoBERTa, ...) attends over ``p`` trained key/value
positions, and the randomly initialised classification head trains with them::

    head_l = softmax(Q [K_prompt,l ; K]ᵀ / √d) [V_prompt,l ; V]         ŷ = classifier(h_[CLS])

What the paper changes against Prefix Tuning are the defaults for natural-language-understanding tasks
(§3): no reparameterisation (``prefix_projection=False``, the MLP "brings no consistent improvement"),
prompt length 20 for simple classification (the paper sweeps 4-128 and uses 100+ for hard sequence
labelling), a trained linear head on [CLS] or on every token rather than a verbaliser, and encoder tasks
(``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``). The tensors are saved exactly as Prefix Tuning's
(``prompt_embeddings``); ``peft_type`` is peftkit's own ``P_TUNING_V2`` (HF PEFT has no such name: its
``PREFIX_TUNING`` reads the same file).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.core.config import PeftType, TaskType
from peftkit.core.registry import register_method
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PrefixTuningModel

ENCODER_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS, TaskType.FEATURE_EXTRACTION)


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-Tuning v2 settings: Prefix Tuning's fields with the paper's defaults.

    Args:
        num_virtual_tokens: prompt length per layer (default 20, the paper's choice for simple
            classification such as SST-2).
        task_type: an encoder task (default ``SEQ_CLS``); the task head is trained and saved.
        prefix_projection: off by default (the paper's finding); ``True`` adds Prefix Tuning's MLP.
    """

    num_virtual_tokens: int | None = 20
    task_type: TaskType | str | None = TaskType.SEQ_CLS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING_V2

    def validate(self) -> None:
        super().validate()
        if self.task_type is not None and TaskType(str(self.task_type)) not in ENCODER_TASKS:
            raise ValueError(
                f"P-Tuning v2 is for encoder tasks ({', '.join(t.value for t in ENCODER_TASKS)}), got task_type="
                f"{self.task_type}; use PrefixTuningConfig for generation."
            )


class PTuningV2Model(PrefixTuningModel):
    """The prefix machinery of :class:`~peftkit.methods.prefix_tuning.PrefixTuningModel`."""


register_method("P_TUNING_V2", PTuningV2Config, PTuningV2Model)
