"""TrainableTokens: train a few rows of the embedding matrix, leave the rest frozen.

HF PEFT's method for new or re-trained tokens (e.g. special tokens added to a tokenizer) without training the
whole vocabulary: the adapter holds a copy of the selected rows, and the layer computes with the embedding
matrix in which those rows are *replaced* (not shifted) by the copy::

    W' = W with rows i ∈ token_indices replaced by Δ[i]          Δ: (len(token_indices), d), starts as W[i]
    y  = embedding(x, W')                                         (a tied LM head: y = x W'ᵀ + b)

    ids ──► [ W  ] rows 0 … V-1, frozen
              ▲
              └── rows i₁, i₂, … come from Δ (trained)

A fresh adapter is the identity (``init_weights=True``). Replacing rather than adding keeps a token that was
added by resizing the vocabulary well defined: its trained row does not depend on the random values the
resize put there. When the model ties its output head to the input embedding (``tie_word_embeddings``), the
head is wrapped too and reads the same Δ, so the head stays tied during training and after merging.

The same layer serves LoRA's ``trainable_token_indices`` option (:class:`TokenAdapterLayer`, whose tensors
are saved under HF PEFT's ``token_adapter.`` names). Config, tensor names (``...embed_tokens.
trainable_tokens_delta``) and file layout are HF PEFT's ``TrainableTokensConfig`` / ``TrainableTokensModel``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.architectures import input_embeddings_name, modules_tied_to_input_embeddings
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.core.tuner import BaseTuner


@dataclass
class TrainableTokensConfig(PeftConfig):
    """TrainableTokens settings; field names and defaults are HF PEFT's ``TrainableTokensConfig``.

    Args:
        token_indices: the vocabulary ids whose embedding rows train (the fewer, the cheaper).
        target_modules: the embedding module(s) to wrap (names or a full-match regex); ``None`` means the
            model's input embedding (``get_input_embeddings()``; ``"embed_tokens"`` for a model without it).
        init_weights: ``True`` starts the trained rows as copies of the embedding's (a no-op until trained);
            ``False`` draws them from N(0, 1) (for tests).
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.TRAINABLE_TOKENS
        super().__post_init__()

    def validate(self) -> None:
        check_token_indices("token_indices", self.token_indices)

    def check_complete(self) -> None:
        if not self.token_indices:
            raise ValueError(
                "TrainableTokensConfig needs token_indices: the vocabulary ids whose rows train."
            )


def check_token_indices(what: str, indices: Any) -> None:
    """Token ids must be a list of non-negative integers."""
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
    ):
        raise ValueError(f"{what}={indices!r} must be a list of non-negative integer token ids.")


class TrainableTokensLayer(AdapterLayer):
    """An embedding (or the LM head tied to it) with some rows replaced by trained copies.

    A layer built with ``tied_to`` computes with the other layer's rows: it holds the same
    ``trainable_tokens_delta`` container and adds or removes nothing itself.
    """

    adapter_param_containers = ("trainable_tokens_delta",)
    adapter_settings = ("token_indices",)
    #: whether a tied layer lists the shared rows among its own parameters (saved twice, as HF PEFT's
    #: TrainableTokensModel writes them); LoRA's token adapter saves them once
    tied_saves_rows: bool = True

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
        self._rows_before_merge: dict[str, torch.Tensor] = {}

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        """HF PEFT's name: the layer whose rows this one reads, or ``None``."""
        return self._tied_to[0] if self._tied_to else None

    @property
    def tied_layer(self) -> AdapterLayer | None:
        """A tied head's weight is the embedding's: merging the embedding's rows merges both."""
        return self.tied_adapter

    def update_layer(
        self, adapter_name: str, token_indices: Sequence[int], init_weights: bool = True
    ) -> None:
        if self.tied_adapter is not None:
            return  # the layer tied to follows the other one
        base = self.get_base_layer()
        weight = base.weight
        rows = weight.shape[0]
        out_of_range = [i for i in token_indices if i >= rows]
        if out_of_range:
            raise ValueError(
                f"token ids {out_of_range[:5]} are out of range: the embedding has {rows} rows. Resize the "
                f"model's embeddings (model.resize_token_embeddings) before adding the adapter."
            )
        if len(set(token_indices)) != len(token_indices):
            raise ValueError(f"token_indices {list(token_indices)} name a token more than once.")
        indices = list(token_indices)
        with torch.no_grad():
            originals = weight[indices].detach().clone()
            values = originals if init_weights else torch.randn_like(originals)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone())

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        if self.tied_adapter is not None and not self.tied_saves_rows:
            return {}
        return super().adapter_parameters(adapter_name)

    # ---------------------------------------------------------------------------------- forward
    def _check_disjoint(self, names: Sequence[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(names):
            indices = set(self.token_indices[name])
            if seen & indices:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined "
                    f"merging behavior. Only disjunct token indices are currently supported."
                )  # HF PEFT's words
            seen |= indices

    def _weight_with(self, names: Sequence[str], weight: torch.Tensor) -> torch.Tensor:
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def get_merged_weights(self, active_adapters: Sequence[str]) -> torch.Tensor:
        """HF PEFT's name: the base weight with the rows of ``active_adapters`` replaced."""
        names = [n for n in active_adapters if n in self.token_indices]
        self._check_disjoint(names)
        return self._weight_with(names, self.get_base_layer().weight)

    def _forward_with(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self.get_merged_weights(names)
        if isinstance(base, nn.Embedding):
            result = F.embedding(
                x,
                weight,
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
            if scale is not None:
                result = result * (scale.to(result.dtype) if isinstance(scale, torch.Tensor) else scale)
            return result
        if isinstance(base, nn.Linear):  # an output head tied to the embedding
            return F.linear(x, weight, base.bias)
        raise ValueError(
            f"TrainableTokens wraps {type(base).__name__}, which it cannot compute with; target the embedding "
            f"layer (torch.nn.Embedding)."
        )

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_with(x, self.active_adapters, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return self.rows_replaced(
            x, result, lambda rows, name: self._forward_with(rows, [name], *args, **kwargs)
        )

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        return self._forward_with(x, [adapter_name]) - base_output

    # ---------------------------------------------------------------------------------- merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return self._weight_with([adapter_name], weight) - weight

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self._check_disjoint(self.merged_adapters + [n for n in names if n in self.token_indices])
        super().merge(safe_merge=safe_merge, adapter_names=names)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.tied_adapter is not None and self.tied_adapter.get_base_layer().weight is self.weight:
            return weight  # the embedding's merge writes the shared weight
        self._rows_before_merge[adapter_name] = weight[self.token_indices[adapter_name]].detach().clone()
        return self._weight_with([adapter_name], weight)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name not in self._rows_before_merge:  # a tied head: the embedding restores the rows
            return weight
        index = torch.tensor(self.token_indices[adapter_name], device=weight.device)
        rows = self._rows_before_merge.pop(adapter_name)
        return weight.index_copy(0, index, rows.to(weight.dtype))


class TokenAdapterLayer(TrainableTokensLayer):
    """LoRA's ``trainable_token_indices``: the same layer, its tensors saved under HF PEFT's names for the
    wrapper it uses there (``embed_tokens.token_adapter.trainable_tokens_delta``), and a tied head saving
    nothing of its own."""

    saved_key_renames = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}  # noqa: RUF012
    tied_saves_rows = False

    @property
    def token_adapter(self) -> TokenAdapterLayer:
        """HF PEFT's attribute path (``model.embed_tokens.token_adapter.trainable_tokens_delta``)."""
        return self


def token_targets(
    model: nn.Module,
    spec: list[int] | dict[str, list[int]],
    modules_to_save: Sequence[str] | None,
    ensure_weight_tying: bool,
) -> list[tuple[str, list[int], str | None]]:
    """Where LoRA's ``trainable_token_indices`` puts token layers, by HF PEFT's rules: ``(module name, token
    ids, name of the layer it is tied to or None)``, layers tied to others last. A list means the input
    embedding; a dict names embeddings (exact name or dotted suffix). Heads tied to the input embedding
    follow it, unless the dict gives them other ids (then each trains its own rows; with
    ``ensure_weight_tying`` that is an error).

    Raises:
        ValueError: a name matches no module, an embedding is also in ``modules_to_save``, or tied layers
            are given different ids under ``ensure_weight_tying``.
    """
    if isinstance(spec, dict):
        requested = {key: list(ids) for key, ids in spec.items()}
    else:
        requested = {input_embeddings_name(model, "embed_tokens") or "embed_tokens": list(spec)}
    resolved: dict[str, list[int]] = {}
    module_names = [n for n, _ in model.named_modules() if n]
    for key, ids in requested.items():
        found = [n for n in module_names if n == key or n.endswith(f".{key}")]
        if not found:
            raise ValueError(
                f"trainable_token_indices names {key!r}, which matches no module of the model; give the "
                f"embedding's module name (e.g. 'embed_tokens')."
            )
        resolved.update(dict.fromkeys(found, ids))
        for saved in modules_to_save or ():
            if any(n == saved or n.endswith(f".{saved}") for n in found):
                raise ValueError(  # HF PEFT's words
                    f"The embedding layer is already marked to be trained fully, either specify "
                    f"`modules_to_save=[..., \"{saved}\", ...]` or `trainable_tokens={{'{key}': x}}` but not "
                    f"both."
                )
    embedding = input_embeddings_name(model)
    tied = modules_tied_to_input_embeddings(model)
    if not tied and ensure_weight_tying:
        warnings.warn(  # HF PEFT's words
            "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
            "Weight tying will not be applied for trainable_token_indices.",
            stacklevel=4,
        )
    if embedding not in resolved:
        return [(name, ids, None) for name, ids in resolved.items()]
    listed = [n for n in tied if n in resolved]
    mismatch = any(resolved[n] != resolved[embedding] for n in listed)
    if mismatch and ensure_weight_tying:
        layers = ", ".join(f"{n}: {resolved[n]}" for n in [embedding, *listed])
        raise ValueError(
            f"Cannot ensure weight tying when different token indices are specified for tied layers. "
            f"Conflicting layers: {layers}. Please use the same indices for all tied layers or set "
            f"ensure_weight_tying=False."
        )  # HF PEFT's words
    if mismatch:
        return [(name, ids, None) for name, ids in resolved.items()]
    plan: list[tuple[str, list[int], str | None]] = [
        (name, ids, None) for name, ids in resolved.items() if name not in tied
    ]
    return plan + [(name, resolved[embedding], embedding) for name in tied]


def tied_token_targets(model: nn.Module, wrapped: Sequence[str]) -> list[str]:
    """The modules tied to the input embedding, when the input embedding is among ``wrapped`` (module
    names); these get a layer tied to the embedding's."""
    embedding = input_embeddings_name(model)
    if embedding is None or embedding not in wrapped:
        return []
    return modules_tied_to_input_embeddings(model)


def add_token_layer(
    model: nn.Module,
    name: str,
    adapter_name: str,
    token_indices: Sequence[int],
    init_weights: bool,
    layer_cls: type[TrainableTokensLayer],
    tied_to: str | None = None,
) -> nn.Module | None:
    """Add adapter ``adapter_name`` at module ``name``: a new layer to put there, or ``None`` when the module
    already is one (the adapter was added to it). ``tied_to`` names the layer whose rows a tied one reads."""
    target = model.get_submodule(name)
    if tied_to is not None:
        owner = model.get_submodule(tied_to)
        assert isinstance(owner, TrainableTokensLayer)
        if isinstance(target, TrainableTokensLayer):
            if target.tied_adapter is owner:
                return None
            target = target.base_layer  # explicitly targeted too: tie it instead (as HF PEFT)
        return layer_cls(target, tied_to=owner)
    if isinstance(target, TrainableTokensLayer):
        if target.tied_adapter is not None:
            raise ValueError(
                f"{name} is tied to the input embedding and already reads the embedding's trained rows; train "
                f"its tokens through the embedding (the same ids act in both)."
            )
        target.update_layer(adapter_name, token_indices, init_weights)
        return None
    if isinstance(target, AdapterLayer):
        raise ValueError(
            f"{name} already has a {type(target).__name__}; train its tokens with one method only (target the "
            f"embedding with LoRA or with trainable tokens, not both)."
        )
    if not isinstance(target, (nn.Embedding, nn.Linear)):
        raise ValueError(
            f"Trainable tokens need an embedding layer (or an output head, nn.Linear); {name} is a "
            f"{type(target).__name__}. Name the embedding module (e.g. 'embed_tokens')."
        )
    layer = layer_cls(target)
    layer.update_layer(adapter_name, token_indices, init_weights)
    return layer


class TrainableTokensModel(BaseTuner):
    """Wraps the input embedding (or the named embeddings) and the layers tied to it."""

    layer_cls = TrainableTokensLayer
    prefix = "trainable_tokens_"

    def _embedding_config(self, config: TrainableTokensConfig) -> TrainableTokensConfig:
        if config.target_modules is not None:
            return config
        name = input_embeddings_name(self.model)
        if name is None:
            if not any(n.split(".")[-1] == "embed_tokens" for n, _ in self.model.named_modules()):
                raise ValueError(
                    "TrainableTokensConfig has no target_modules and the model has no get_input_embeddings() "
                    "or 'embed_tokens' module; name the embedding layer in target_modules."
                )
            name = "embed_tokens"
        return dataclasses.replace(config, target_modules=[name])

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        assert isinstance(config, TrainableTokensConfig)
        names = super().target_names(self._embedding_config(config), modules_to_save)
        self._tied_names = tied_token_targets(self.model, names)
        return [n for n in names if n not in self._tied_names] + self._tied_names

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, TrainableTokensConfig)
        tied = target_name in getattr(self, "_tied_names", ())
        tied_to = input_embeddings_name(self.model) if tied else None
        return add_token_layer(
            self.model,
            target_name,
            adapter_name,
            config.token_indices,
            config.init_weights,
            TrainableTokensLayer,
            tied_to=tied_to,
        )

    def auto_saves_embedding_weights(self, config: PeftConfig) -> bool:
        return False  # the file holds the trained rows themselves

    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        config = self.peft_config[adapter_name]
        assert isinstance(config, TrainableTokensConfig)
        if config.target_modules is not None:
            return {}
        return {"target_modules": self._embedding_config(config).target_modules}


register_method("TRAINABLE_TOKENS", TrainableTokensConfig, TrainableTokensModel)
