"""Full fine-tuning as a method: every parameter of the model trains (the baseline every PEFT paper reports).

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding" (NAACL 2019)
fine-tune all weights for each task; PEFT methods are measured against it::

    embeddings ─► block 0 ─► ... ─► block L-1 ─► pooler ─► head
    └───────────────────────── all trained ──────────────────┘

Nothing is wrapped or copied: every parameter of the model's own modules is selected through
:meth:`~peftkit.core.tuner.BaseTuner.select_base_parameters` and trained in place, pooler, norms and tied
embeddings included (a tied head trains with its embedding: one tensor). A task head of a task wrapper
(``classifier`` / ``score``) trains as a ``modules_to_save`` copy, as with every method, so the checkpoint
is complete: it holds every trained tensor under its own name (``base_model.model.<parameter name>``), the
size of the model. As with Freeze, no copy of the original values is kept (it would double the memory):
``disable_adapter()`` is an error, merging is the identity, and a model holds one such adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.core.tuner import BaseParameterSelection, BaseTuner


@dataclass
class FullConfig(PeftConfig):
    """Full fine-tuning settings.

    Args:
        modules_to_save: modules trained as a saved copy (the task's head is added by the task wrapper);
            everything else trains in place.
    """

    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.FULL
        super().__post_init__()


class FullModel(BaseTuner):
    """Selects every parameter of the model's own modules for training in place."""

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        return []

    def select_base_parameters(self, adapter_name: str, config: PeftConfig) -> BaseParameterSelection:
        # the model's own modules only (never a modules_to_save copy or the original it stands in for)
        own = {id(p) for _, module in self.base_modules() for p in module.parameters(recurse=False)}
        names = [n for n, p in self.model.named_parameters() if id(p) in own]
        if not names:
            raise ValueError(f"{type(self.model).__name__} has no parameters of its own to train.")
        return BaseParameterSelection(names=names)


register_method("FULL", FullConfig, FullModel)
