"""LN Tuning: train only the normalisation layers (each adapter its own copy of them).

Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning" (ICLR 2024,
arXiv:2312.11420): fine-tuning just the LayerNorm (or RMSNorm) scales and shifts of a transformer is a strong,
tiny adapter. As HF PEFT's ``LNTuningModel`` does, each targeted norm keeps its original and, per adapter, a
trained copy, which replaces it in forward::

    h ──► norm (frozen original)          adapter off
    h ──► norm_a (trained copy: γ_a, β_a)  adapter "a" active:  y = γ_a ⊙ (h − μ) / σ + β_a

A fresh copy equals the original, so a new adapter is the identity. One adapter acts at a time (a copy
replaces the norm; two cannot); mixed batches route each row to its adapter's copy. Merging swaps the copy in
for the original (unmerging swaps back): the merged model carries the trained norm. Tensor names
(``...input_layernorm.ln_tuning_layers.weight``), config and default targets per architecture are HF PEFT's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.architectures import LN_TUNING_DEFAULT_TARGET_MODULES
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.core.targeting import check_module_names
from peftkit.core.tuner import BaseTuner


@dataclass
class LNTuningConfig(PeftConfig):
    """LN Tuning settings; field names and defaults are HF PEFT's ``LNTuningConfig``.

    Args:
        target_modules: the normalisation modules to train (list: exact or dotted suffix; a string: full-match
            regex); ``None``: the architecture's default (:data:`LN_TUNING_DEFAULT_TARGET_MODULES`).
        exclude_modules: modules to leave alone (same forms).
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    default_target_modules: ClassVar[dict[str, list[str]]] = LN_TUNING_DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LN_TUNING
        super().__post_init__()

    def validate(self) -> None:
        check_module_names("target_modules", self.target_modules)


class LNTuningLayer(AdapterLayer):
    """A module whose trained copy (one per adapter) takes its place in forward."""

    adapter_param_containers = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def update_layer(self, adapter_name: str) -> None:
        trained = copy.deepcopy(self.get_base_layer())
        trained.requires_grad_(False)  # set_adapter decides what trains
        self.ln_tuning_layers[adapter_name] = trained

    def _single_active(self) -> str | None:
        names = [n for n in self.active_adapters if n in self.ln_tuning_layers]
        if len(names) > 1:
            raise ValueError(  # HF PEFT's words
                f"Trying to run forward with {len(names)} active adapters, but LN tuning does not allow inference "
                f"with more than one adapter at a time"
            )
        return names[0] if names else None

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._single_active()
        module = self.base_layer if name is None else self.ln_tuning_layers[name]
        return module(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return self.rows_replaced(
            x, result, lambda rows, name: self.ln_tuning_layers[name](rows, *args, **kwargs)
        )

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        return self.ln_tuning_layers[adapter_name](x) - base_output

    # ---------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Swap the adapter's trained copy in for the original module (as HF PEFT); one adapter at a time."""
        names = [
            n
            for n in (self.active_adapters if adapter_names is None else adapter_names)
            if n in self.ln_tuning_layers
        ]
        if not names:
            return
        if len(names) > 1:
            raise ValueError(  # HF PEFT's words
                f"Trying to merge {len(names)} adapters, but LN tuning does not allow merging more than one adapter "
                f"at a time"
            )
        if names[0] in self.merged_adapters:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)  # HF PEFT's words
            return
        if safe_merge and not all(
            torch.isfinite(p).all() for p in self.ln_tuning_layers[names[0]].parameters()
        ):
            raise ValueError(
                f"Merging adapter {names[0]!r} would put NaN or inf into the model. Nothing was merged."
            )
        if self.merged_adapters:
            self.unmerge()
        self.base_layer, self.ln_tuning_layers[names[0]] = self.ln_tuning_layers[names[0]], self.base_layer
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        name = self.merged_adapters.pop()
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer


class LNTuningModel(BaseTuner):
    """Wraps the targeted normalisation modules in :class:`LNTuningLayer`."""

    layer_cls = LNTuningLayer
    prefix = "ln_tuning_"

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        if isinstance(target, LNTuningLayer):
            target.update_layer(adapter_name)
            return None
        if isinstance(target, AdapterLayer):
            raise ValueError(
                f"{target_name} already has a {type(target).__name__}; LN Tuning wraps plain modules."
            )
        layer = LNTuningLayer(target)
        layer.update_layer(adapter_name)
        return layer


register_method("LN_TUNING", LNTuningConfig, LNTuningModel)
