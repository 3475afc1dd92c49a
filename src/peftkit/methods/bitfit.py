"""BitFit: train only the bias terms of a frozen model.

Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022 (arXiv:2106.10199). Every weight stays frozen; only the additive bias
terms (and the task head) train::

    y = W x + b          W frozen, b trained in place (b₀ → b₀ + Δb)

In a BERT block (the paper's §2 notation) the biases fall into the four groups of :class:`BitFitConfig`::

    x ─► Q,K,V ─► attention ─► dense ─► LN₁ ─► dense ─► GELU ─► dense ─► LN₂ ─► out
         b_q,b_k,b_v           b_m1     b_LN1   b_m2             b_m3     b_LN2

    attention_qkv: b_q, b_k, b_v     attention_output: b_m1     mlp: b_m2, b_m3
    layernorm: b_LN1, b_LN2 and every other normalisation bias (e.g. the embeddings' LayerNorm)

Nothing wraps a layer: the biases are the model's own parameters, selected through
:meth:`~peftkit.core.tuner.BaseTuner.select_base_parameters` and trained in place. The checkpoint holds them
under their own names (``base_model.model.<module>.bias``), loading copies them onto a fresh base,
merging is the identity and ``merge_and_unload`` returns the model carrying the trained biases. A copy of
the original biases (a fraction of a percent of the model) makes ``disable_adapter()`` and
``delete_adapter()`` give the base model back exactly.

Bias-free layers (llama, T5) are an error unless ``add_missing_biases=True``, which adds zero biases to
the linear (and LayerNorm) layers of the chosen groups: the output is unchanged at the start.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.architectures import BIAS_GROUP_PATTERNS as ROLE_PATTERNS
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.core.targeting import pattern_match
from peftkit.core.tuner import BaseParameterSelection, BaseTuner

BIAS_GROUPS = ("attention_qkv", "attention_output", "mlp", "layernorm")
LINEAR_GROUPS = BIAS_GROUPS[:3]


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit settings.

    Args:
        bias_groups: which biases train, any of ``"attention_qkv"`` (query/key/value; GPT-2's fused
            ``c_attn``), ``"attention_output"``, ``"mlp"`` (feed-forward layers) and ``"layernorm"`` (every
            normalisation layer's bias); default all four.
        add_missing_biases: give bias-free layers of the chosen groups a zero-initialised bias to train
            (llama, T5); otherwise such layers are an error.
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter.
    """

    bias_groups: list[str] = field(default_factory=lambda: list(BIAS_GROUPS))
    add_missing_biases: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BITFIT
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.bias_groups, list):
            raise TypeError(
                f"bias_groups must be a list such as ['attention_qkv', 'mlp'], got {self.bias_groups!r}."
            )
        unknown = [g for g in self.bias_groups if g not in BIAS_GROUPS]
        if unknown:
            raise ValueError(f"Unknown bias group(s) {unknown}; choose from {list(BIAS_GROUPS)}.")
        if not self.bias_groups:
            raise ValueError(f"bias_groups is empty; choose at least one of {list(BIAS_GROUPS)}.")
        if len(set(self.bias_groups)) != len(self.bias_groups):
            raise ValueError(f"bias_groups lists a group twice: {self.bias_groups}.")


_QKV_LEAVES = {
    *("q_proj", "k_proj", "v_proj", "qkv_proj", "qkv", "query", "key", "value", "query_key_value"),
    *("c_attn", "q", "k", "v", "q_lin", "k_lin", "v_lin", "Wqkv", "W_pack"),
}
_ATTENTION_OUTPUT_LEAVES = {"o_proj", "out_proj", "c_proj", "dense", "o", "out_lin", "proj"}
_MLP_LEAVES = {
    *("fc1", "fc2", "fc_in", "fc_out", "c_fc", "gate_proj", "up_proj", "down_proj", "gate_up_proj"),
    *("wi", "wi_0", "wi_1", "wo", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "lin1", "lin2"),
}
_MLP_SCOPES = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense")


def _fallback_group(name: str) -> str | None:
    """The group of a linear layer in a model type without a table entry, from its own and its parent's
    names (``...attn.c_proj`` is the attention output, ``...mlp.c_proj`` a feed-forward layer)."""
    *scopes, leaf = name.split(".")
    parent = scopes[-1].lower() if scopes else ""
    if leaf in _QKV_LEAVES:
        return "attention_qkv"
    if any(s in parent for s in _MLP_SCOPES) or leaf in _MLP_LEAVES:
        return "mlp"
    if ("attn" in parent or "attention" in parent) and leaf in _ATTENTION_OUTPUT_LEAVES:
        return "attention_output"
    return None


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, GroupNorm and the models' own classes (LlamaRMSNorm, T5LayerNorm, ...)
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, norm_types) or type(module).__name__.endswith("Norm")


def group_members(
    model: nn.Module, modules: list[tuple[str, nn.Module]]
) -> dict[str, list[tuple[str, nn.Module]]]:
    """The modules whose bias forms each group, resolved by ``model.config.model_type`` (see
    :data:`ROLE_PATTERNS`) with a module-name fallback for other models."""
    patterns = ROLE_PATTERNS.get(getattr(getattr(model, "config", None), "model_type", None))
    members: dict[str, list[tuple[str, nn.Module]]] = {g: [] for g in BIAS_GROUPS}
    for name, module in modules:
        if not name:
            continue
        if _is_norm(module):
            members["layernorm"].append((name, module))
        elif _is_linear(module):
            if patterns is None:
                group = _fallback_group(name)
            else:
                group = next(
                    (g for g, p in patterns.items() if pattern_match(rf"(^|\.)({p})$", name, "search")), None
                )
            if group is not None:
                members[group].append((name, module))
    return members


def _can_add_bias(module: nn.Module) -> bool:
    """Linear and LayerNorm layers built with ``bias=False`` use a bias once one is set."""
    return isinstance(module, (nn.Linear, nn.LayerNorm)) and module._parameters.get("bias", 0) is None


def _zero_bias(module: nn.Module) -> nn.Parameter:
    size = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.get_default_dtype()
    device = weight.device if weight is not None else None
    return nn.Parameter(torch.zeros(size, dtype=dtype, device=device))


def _short_list(names: list[str], limit: int = 3) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class BitFitModel(BaseTuner):
    """Selects the biases of the chosen groups of the model for training (nothing is wrapped)."""

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        return []

    def select_base_parameters(self, adapter_name: str, config: PeftConfig) -> BaseParameterSelection:
        assert isinstance(config, BitFitConfig)
        param_names = {id(p): n for n, p in self.model.named_parameters()}
        members = group_members(self.model, self.base_modules())
        model_name = type(self.model).__name__
        empty = [g for g in config.bias_groups if not members[g]]
        if empty:
            raise ValueError(
                f"BitFit bias group(s) {empty} match no layer of {model_name}. Choose other bias_groups, or "
                f"use modules_to_save for the layers you want to train."
            )
        names: list[str] = []
        new: dict[str, nn.Parameter] = {}
        lacking: dict[str, list[str]] = {}  # group -> modules without a bias
        no_bias_term: list[str] = []  # norms that have no bias in their formula (RMSNorm)
        for group in config.bias_groups:
            for name, module in members[group]:
                bias = module._parameters.get("bias")
                if bias is not None:
                    names.append(param_names[id(bias)])
                    continue
                lacking.setdefault(group, []).append(name)
                if not _can_add_bias(module):
                    no_bias_term.append(f"{name} ({type(module).__name__})")
                elif config.add_missing_biases:
                    new[f"{name}.bias"] = _zero_bias(module)
        if lacking and not config.add_missing_biases:
            detail = "; ".join(f"{g}: {_short_list(mods)}" for g, mods in lacking.items())
            raise ValueError(
                f"BitFit: these layers of {model_name} have no bias to train ({detail}). Choose bias_groups "
                f"whose layers have biases, or pass add_missing_biases=True to add zero-initialised biases "
                f"(the output is unchanged at the start)."
            )
        if no_bias_term:
            warnings.warn(
                f"BitFit: {_short_list(no_bias_term)} have no bias term in their formula, so no bias can be "
                f"added there; they stay frozen.",
                stacklevel=6,
            )
        names += list(new)
        if not names:
            raise ValueError(
                f"BitFit found no bias to train or add in bias_groups={config.bias_groups} of {model_name}."
            )
        return BaseParameterSelection(
            names=list(dict.fromkeys(names)), new_parameters=new, keep_original=True
        )


register_method("BITFIT", BitFitConfig, BitFitModel)
