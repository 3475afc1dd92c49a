"""LoRA: Low-Rank Adaptation, with rsLoRA, DoRA, PiSSA and OLoRA initialisations.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv:2106.09685).
A frozen weight ``W (out × in)`` gets a trainable low-rank update::

    y = W x + s · B A x        A: r × in (random init), B: out × r (zero init), s = α / r

    x ──► W ─────────────┐
    │                   (+)──► y
    └──► A ──► B ──► ·s ─┘

* rsLoRA (Kalajievska, arXiv:2312.03732): ``s = α / √r`` keeps updates stable at high rank.
* DoRA (Liu et al., ICML 2024, arXiv:2402.09353): the weight is split into magnitude and direction,
  ``W' = m · (W + s·BA) / ‖W + s·BA‖`` with a trainable magnitude vector ``m`` initialised to ``‖W‖``,
  the norm taken per output feature: per row of a Linear weight, per output channel of a Conv2d kernel
  (over ``in × kh × kw``), per embedding dimension of an Embedding table (over the vocabulary). The norm is
  treated as a constant in backward, as in the paper (§4.3).
* PiSSA (Meng et al., arXiv:2404.02948): ``A, B`` from the top-r singular triplets of ``W``, and the
  residual ``W - s·BA`` becomes the frozen base. OLoRA (Büyükakyüz, arXiv:2406.01775): the same with a QR
  decomposition.

In a transformer block LoRA wraps the attention projections (and, with ``"all-linear"``, the MLP).
Supported layers: ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``), ``nn.Embedding``, ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Conv3d`` (grouped ones too, without merging), ``nn.MultiheadAttention``, and any 2-D or
3-D parameter named in ``target_parameters`` (mixture-of-experts weights; :class:`ParamWrapper`).
Parameter names and the checkpoint format are HF PEFT's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.architectures import (
    EMBEDDING_LAYER_NAMES,
    find_block_list,
    input_embeddings_name,
    modules_tied_to_input_embeddings,
)
from peftkit.core.checkpoint import loading_saved_adapter, validate_adapter_name
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer, adapter_dtype, linear_fan_in_fan_out, parameter_override
from peftkit.core.merge import SPARSIFYING, combine_cat, combine_linear, combine_svd, combine_tensors
from peftkit.core.registry import register_method
from peftkit.core.targeting import check_module_names, name_matches, pattern_match, per_module_value
from peftkit.core.tuner import SAVED_PREFIX, UNTIED_ADAPTER_WARNING, BaseTuner
from peftkit.methods.lora_ops import DoraLinearFunction, LoraLinearFunction
from peftkit.methods.trainable_tokens import (
    TokenAdapterLayer,
    add_token_layer,
    check_token_indices,
    token_targets,
)

InitKind = bool | Literal["gaussian", "pissa", "olora"] | str


@dataclass
class LoftQConfig:
    """LoftQ's settings (HF PEFT's ``LoftQConfig``), for ``LoraConfig(init_lora_weights="loftq",
    loftq_config=LoftQConfig(...))``.

    Args:
        loftq_bits: 4 (NF4) or 8 (int8, per row), the precision the base will be loaded in.
        loftq_iter: alternating steps (quantize the residual, refit the low-rank part).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings; field names and defaults are HF PEFT's ``LoraConfig``.

    Args:
        r: rank of the update (> 0).
        target_modules: module names (list: exact or dotted suffix), a full-match regex, ``"all-linear"``,
            or ``None`` for the architecture's default.
        exclude_modules: modules to leave alone (same forms).
        lora_alpha: the scale numerator α (> 0); ``s = α / r`` (or ``α / √r`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``; detected automatically).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of wrapped layers).
        use_rslora: rank-stabilised scaling ``α / √r``.
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter.
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r²)),
            ``False`` (random B: not a no-op, for tests), ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``,
            ``"orthogonal"``, ``"loftq"`` (with ``loftq_config``; see :func:`loftq_decomposition`).
        loftq_config: LoftQ's settings as a dict or :class:`LoftQConfig` (``init_lora_weights="loftq"``).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha`` keyed by regex suffix.
        use_dora: weight-decomposed LoRA (every supported layer type).
        lora_bias: give ``B`` a bias (HF PEFT's option; not with DoRA, embeddings, or PiSSA / OLoRA init);
            merging adds ``s · b_B`` to the base layer's bias, which must exist.
        target_parameters: parameters to adapt directly, by name or dotted suffix (``"experts.gate_up_proj"``):
            the 3-D expert weights of MoE blocks, which ``target_modules`` cannot reach (see
            :class:`ParamWrapper`). With it, ``target_modules=None`` targets no module.
        layer_replication: build the block stack from ``[start, end)`` ranges of the original blocks, repeated
            blocks sharing their base weights (each gets its own adapter): ``[[0, 4], [2, 5]]`` makes blocks
            ``0 1 2 3 2 3 4`` (HF PEFT's option, as in LLaMA-Pro style expansion). Done once, by the first
            adapter; it stays after unloading.
        trainable_token_indices: also train these rows of the input embedding (a list of token ids), or of
            the named embeddings (``{"embed_tokens": [0, 1]}``), as HF PEFT's TrainableTokens does (see
            :mod:`peftkit.methods.trainable_tokens`); an output head tied to the embedding follows them.
        ensure_weight_tying: on a model whose output head is tied to the input embedding, keep the adapter
            tied too: a ``modules_to_save`` copy of the embedding is also the head's, and a LoRA on the
            embedding (or on the head) is one LoRA for both. Without it such an adapter unties them (a
            warning says so), as in HF PEFT.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: InitKind = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    layer_replication: list[list[int]] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    loftq_config: dict[str, int] = field(default_factory=dict)

    foreign_defaults: ClassVar[dict[str, Any]] = {"megatron_core": "megatron.core", "qalora_group_size": 16}
    # HF PEFT options that change the layers or the forward (init-time-only options such as loftq_config or
    # eva_config are not here: a trained adapter's file already holds their effect)
    unsupported_fields: ClassVar[tuple[str, ...]] = (
        "megatron_config",
        "alora_invocation_tokens",
        "use_qalora",
        "monteclora_config",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
    )

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LORA
        if isinstance(self.loftq_config, LoftQConfig):  # HF PEFT stores the sub-config as a dict
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if self.loftq_config and _init_kind(self.init_lora_weights) != "loftq":
            warnings.warn(  # HF PEFT's words (it then drops the setting; here the config stays as written)
                "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                stacklevel=3,
            )
        super().__post_init__()

    def validate(self) -> None:
        _check_positive("r", self.r, integer=True)
        _check_positive("lora_alpha", self.lora_alpha)
        for key, value in self.rank_pattern.items():
            _check_positive(f"rank_pattern[{key!r}]", value, integer=True)
        for key, value in self.alpha_pattern.items():
            _check_positive(f"alpha_pattern[{key!r}]", value)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r} is not one of 'none', 'all', 'lora_only'.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1).")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights} instead."
            )
        if self.lora_bias and self.use_dora:
            raise ValueError(
                "The argument lora_bias=True is not supported for DoRA, please pass use_dora=False"
            )
        if self.layer_replication is not None and (
            not isinstance(self.layer_replication, (list, tuple))
            or not self.layer_replication
            or not all(
                isinstance(r, (list, tuple))
                and len(r) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
                and 0 <= r[0] < r[1]
                for r in self.layer_replication
            )
        ):
            raise ValueError(
                f"layer_replication={self.layer_replication!r}: give a list of [start, end) ranges of block "
                f"indices with 0 <= start < end, e.g. [[0, 4], [2, 5]]."
            )
        if self.target_parameters is not None and (
            not isinstance(self.target_parameters, (list, tuple))
            or not all(isinstance(t, str) for t in self.target_parameters)
        ):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        init = _init_kind(self.init_lora_weights)
        if not (
            isinstance(init, bool)
            or init in ("gaussian", "pissa", "olora", "orthogonal", "loftq")
            or _pissa_niter(init) is not None
        ):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                f"'pissa_niter_K', 'olora', 'orthogonal' or 'loftq'."
            )
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            settings = {**dataclasses.asdict(LoftQConfig()), **self.loftq_config}
            unknown = sorted(set(settings) - {"loftq_bits", "loftq_iter"})
            if (
                unknown
                or settings["loftq_bits"] not in (4, 8)
                or not (isinstance(settings["loftq_iter"], int) and settings["loftq_iter"] >= 1)
            ):
                raise ValueError(
                    f"loftq_config={self.loftq_config!r}: give loftq_bits 4 or 8 and loftq_iter >= 1 (no other keys)."
                )
        if isinstance(self.target_modules, str):
            for option in ("layers_to_transform", "layers_pattern"):
                if getattr(self, option) is not None and getattr(self, option) != []:
                    raise ValueError(  # HF PEFT's words, then how
                        f"`{option}` cannot be used when `target_modules` is a str. Put the layer index into the "
                        f"regex (or use 'all-linear' without it), or list module names instead."
                    )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform; set both.")
        check_module_names("target_modules", self.target_modules)
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            for key, indices in tokens.items():
                check_token_indices(f"trainable_token_indices[{key!r}]", indices)
        elif tokens is not None:
            check_token_indices("trainable_token_indices", tokens)


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        need = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}={value!r} must be {need}.")


def _init_kind(init: Any) -> Any:
    """``init_lora_weights`` as the layers compare it: ``"gaussian"`` and ``"olora"`` in any case (HF PEFT
    lower-cases those two); PiSSA names and booleans as written. The config keeps what the user wrote."""
    if isinstance(init, str) and init.lower() in ("gaussian", "olora"):
        return init.lower()
    return init


def _pissa_niter(init: Any) -> int | None:
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        suffix = init.removeprefix("pissa_niter_")
        if suffix.isdigit():
            return int(suffix)
    return None


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude ``m`` (one value per output feature); saved as ``lora_magnitude_vector``."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(AdapterLayer):
    """State shared by the LoRA layer types: ranks, scalings, dropout and the DoRA switch."""

    adapter_param_containers = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_dropout",
    )
    adapter_settings = ("r", "lora_alpha", "scaling", "use_dora", "lora_bias", "_dora_norm_at_merge")
    saved_key_renames = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}  # noqa: RUF012

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}  # B has a bias (HF PEFT's lora_bias)
        self._dora_norm_at_merge: dict[str, torch.Tensor] = {}
        # Linear's stacked factors for mixed-adapter batches: (key, factor versions, stacks)
        self._stack_cache: tuple | None = None
        # ensure_weight_tying: the embedding layer whose factors this head's adapters share (a list: not a
        # submodule), and which adapters do
        self._tied_to: list[LoraLayer] = []
        self._tied_adapters: set[str] = set()

    @property
    def tied_layer(self) -> AdapterLayer | None:
        return self._tied_to[0] if self._tied_to else None

    def tie_factors(self, adapter_name: str, embedding: nn.Module) -> None:
        """Make this head's factors for ``adapter_name`` the tied embedding's, transposed (the same tensors:
        ``A = B_embᵀ``, ``B = A_embᵀ``, as HF PEFT's ``ensure_weight_tying``)."""
        if not isinstance(self, Linear) or not isinstance(embedding, Embedding):
            raise ValueError(
                f"ensure_weight_tying ties a linear head to an embedding; got {type(self).__name__} and "
                f"{type(embedding).__name__}."
            )
        emb_A, emb_B = embedding.lora_embedding_A[adapter_name], embedding.lora_embedding_B[adapter_name]
        for factor, source in ((self.lora_A[adapter_name], emb_B), (self.lora_B[adapter_name], emb_A)):
            factor.weight = nn.Parameter(source.detach().t(), requires_grad=factor.weight.requires_grad)
        self._tied_to[:] = [embedding]
        self._tied_adapters.add(adapter_name)

    def merges_through_tie(self, adapter_name: str) -> bool:
        return adapter_name in self._tied_adapters and self.tied_layer is not None

    def _merges_through_tie(self, adapter_name: str) -> bool:
        tied = self.tied_layer
        return (
            self.merges_through_tie(adapter_name)
            and tied is not None
            and tied.get_base_layer().weight is self.get_base_layer().weight
        )

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, target_name: str
    ) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` and scale numerator ``lora_alpha``."""
        self._stack_cache = None  # (Linear's mixed-batch stacks) a new adapter changes them
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        self.create_factors(adapter_name, r)
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                f"has no bias. This means that merging LoRA weights won't be possible.",
                stacklevel=2,
            )
        init = _init_kind(config.init_lora_weights)
        if init == "loftq":
            self.loftq_init(adapter_name, config.loftq_config, target_name)
        else:
            self.init_factors(adapter_name, init, target_name)
        if config.use_dora:
            self.create_dora_magnitude(adapter_name)

    # Each layer type fills these in.
    def create_factors(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError

    def loftq_init(self, adapter_name: str, settings: dict[str, int], target_name: str) -> None:
        """LoftQ's initialisation (``Linear`` implements it)."""
        raise ValueError(
            f"init_lora_weights='loftq' needs a Linear or Conv1D layer; {target_name} is "
            f"{type(self.get_base_layer()).__name__}."
        )

    def init_factors(self, adapter_name: str, init: InitKind, target_name: str) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init is False:
            return  # keep the layers' default random init: B ≠ 0, so the adapter is not a no-op
        if init in ("pissa", "olora", "orthogonal") or _pissa_niter(init) is not None:
            raise ValueError(
                f"init_lora_weights={init!r} needs a Linear or Conv1D layer; {target_name} is "
                f"{type(self.get_base_layer()).__name__}."
            )
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
        if self.lora_bias.get(adapter_name):
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    # ---------------------------------------------------------------------------------- lora_bias
    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.lora_bias.get(adapter_name):
            return super().merge_bias(bias, adapter_name)
        return bias + self.lora_B[adapter_name].bias.detach().to(bias.dtype) * self.scaling[adapter_name]

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.lora_bias.get(adapter_name):
            return super().unmerge_bias(bias, adapter_name)
        return bias - self.lora_B[adapter_name].bias.detach().to(bias.dtype) * self.scaling[adapter_name]

    # ------------------------------------------------------------------------------------- DoRA
    # A layer type supports DoRA by saying which way its weight's output features lie (the two methods
    # below); the magnitude, the scale in forward and the merge are the same for every layer type.
    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``‖W + ΔW‖`` per output feature, shaped like the magnitude ``m`` (which broadcasts against the
        layer's output); ``W`` and ``ΔW`` in the base weight's layout."""
        raise NotImplementedError

    def _to_weight_layout(self, per_feature: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ``m``, reshaped to broadcast against the base weight."""
        raise NotImplementedError

    def create_dora_magnitude(self, adapter_name: str) -> None:
        """``m = ‖W + s·BA‖``: at creation DoRA's output equals LoRA's (the same as W's when ``B = 0``)."""
        with torch.no_grad():
            delta = self.delta_weight(adapter_name)
            # on the meta device (low_cpu_mem_usage) only the shape is computed; the values are loaded next
            norm = self._dora_norm(self.base_weight().to(delta.device, delta.dtype), delta)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.contiguous())

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ‖W + s·BA‖``, shaped like ``m``; the norm is a constant in backward (paper §4.3)."""
        with torch.no_grad():
            delta = self.delta_weight(adapter_name)
            # a quantized base is dequantized here on every call, as HF PEFT does
            norm = self._dora_norm(self.base_weight().to(delta.dtype), delta)
        return self.lora_magnitude_vector[adapter_name].weight / norm

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """DoRA: ``W' = m / ‖W₀ + ΔW‖ · (weight + ΔW)``, ``W₀`` the base without merged adapters (as in forward)."""
        if self.lora_bias.get(adapter_name) and getattr(self.get_base_layer(), "bias", None) is None:
            raise RuntimeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
            )
        if self._merges_through_tie(adapter_name):
            return weight  # the tied embedding's merge writes the shared weight
        if not self.use_dora[adapter_name]:
            return super().merge_weight(weight, adapter_name)
        delta = self.delta_weight(adapter_name).detach()
        norm = self._dora_norm(self._weight_without_merged_adapters().to(delta.dtype), delta)
        # kept for unmerge: the norm cannot be recomputed from the merged weight
        self._dora_norm_at_merge[adapter_name] = norm
        factor = self._to_weight_layout(self.lora_magnitude_vector[adapter_name].weight.detach() / norm)
        return (factor * (weight + delta)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._merges_through_tie(adapter_name):
            return weight
        if not self.use_dora[adapter_name]:
            return super().unmerge_weight(weight, adapter_name)
        unmerged = self._dora_unmerged(weight, adapter_name)
        del self._dora_norm_at_merge[adapter_name]
        return unmerged

    def _dora_unmerged(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        norm = self._dora_norm_at_merge[adapter_name]
        factor = self._to_weight_layout(self.lora_magnitude_vector[adapter_name].weight.detach() / norm)
        return (weight / factor - self.delta_weight(adapter_name).detach()).to(weight.dtype)

    def _weight_without_merged_adapters(self) -> torch.Tensor:
        """The base weight with the adapters merged so far taken out again (merging several DoRA adapters:
        each one's norm is taken on the plain base weight, as forward does)."""
        weight = self.base_weight().detach()
        for name in reversed(self.merged_adapters):
            if self.use_dora[name]:
                weight = self._dora_unmerged(weight, name)
            else:
                weight = super().unmerge_weight(weight, name)
        return weight


def _fusable_bases() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


_FUSABLE_BASES = _fusable_bases()


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks that the fused kernel would skip (it does not call ``module``)."""
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
    )


def _with_rank(param: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """A tensor shaped like ``param`` but with ``rank`` along ``dim`` (only its shape is read)."""
    shape = list(param.shape)
    shape[dim] = rank
    return param.new_empty(shape)


class Linear(LoraLayer):
    """LoRA on ``nn.Linear`` or on GPT-2's ``Conv1D`` (weight stored ``(in, out)``: ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        base = self.get_base_layer()
        if self.base_is_quantized:  # a 4-bit weight is stored packed: its shape is not (out, in)
            in_features, out_features = base.in_features, base.out_features
        else:
            out_features, in_features = base.weight.shape[::-1] if fan_in_fan_out else base.weight.shape
        self.in_features, self.out_features = in_features, out_features
        # DoRA: ‖wᵢ‖² of the frozen base rows, keyed by the weight's identity and version
        self._weight_row_sq_norms: tuple[tuple, torch.Tensor] | None = None

    def _base_weight_out_in(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (dequantized for a quantized base)."""
        weight = self.base_weight()
        return (weight.T if self.fan_in_fan_out else weight).detach()

    def create_factors(self, adapter_name: str, r: int) -> None:
        base_weight = self.get_base_layer().weight
        kwargs = {"device": base_weight.device, "dtype": adapter_dtype(base_weight.dtype)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kwargs)
        self.lora_B[adapter_name] = nn.Linear(
            r, self.out_features, bias=self.lora_bias[adapter_name], **kwargs
        )

    def init_factors(self, adapter_name: str, init: InitKind, target_name: str) -> None:
        if init == "olora" or init == "pissa" or _pissa_niter(init) is not None:
            self._decomposition_init(adapter_name, init)
        elif init == "orthogonal":
            self._orthogonal_init(adapter_name)
        else:
            super().init_factors(adapter_name, init, target_name)

    def _set_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Give the factors these values (factors on the meta device, created for a file's values with
        ``low_cpu_mem_usage``, keep their place: the file fills them)."""
        for factor, value in (
            (self.lora_A[adapter_name].weight, lora_A),
            (self.lora_B[adapter_name].weight, lora_B),
        ):
            if factor.device.type != "meta":
                factor.data = value.contiguous().to(factor.dtype)

    @torch.no_grad()
    def loftq_init(self, adapter_name: str, settings: dict[str, int], target_name: str) -> None:
        """LoftQ on a full-precision base: the base weight becomes its quantized-then-dequantized version ``Q``
        (what the 4-bit / 8-bit base will hold) and ``A, B`` the low-rank fit of what quantizing lost."""
        base = self.get_base_layer()
        if self.base_is_quantized and loading_saved_adapter():
            # a saved LoftQ adapter loaded onto its quantized base: the factors come from the file
            self.init_factors(adapter_name, True, target_name)
            return
        if self.base_is_quantized:
            raise ValueError(
                f"init_lora_weights='loftq' quantizes the base weight itself, and {target_name} is already "
                f"quantized ({type(base).__name__}); load the base in full precision, or use "
                f"replace_lora_weights_loftq on a quantized model."
            )
        bits, iterations = settings.get("loftq_bits", 4), settings.get("loftq_iter", 1)
        dtype = base.weight.dtype
        weight = self._base_weight_out_in().to(torch.float32)
        quantized, lora_A, lora_B = loftq_decomposition(
            weight, bits, self.r[adapter_name], iterations, self.scaling[adapter_name]
        )
        self._set_factors(adapter_name, lora_A, lora_B)
        self._weight_row_sq_norms = None
        base.weight.data = (quantized.T if self.fan_in_fan_out else quantized).to(dtype).contiguous()

    @torch.no_grad()
    def _orthogonal_init(self, adapter_name: str) -> None:
        """HF PEFT's ``"orthogonal"``: the rows of a random r × r orthogonal ``Q`` split in two, A from the odd
        rows and B from the even ones (each times a random projection / 10), so that ``A`` has orthogonal
        directions and ``BA`` starts small but non-zero; the base weight is untouched. The same random draws
        as HF PEFT (needs an even ``r``)."""
        r = self.r[adapter_name]
        if r % 2:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        A = torch.randn(self.in_features, r // 2).mm(Q[0::2, :]).T / 10.0
        B = torch.randn(r // 2, self.out_features).T.mm(Q[1::2, :]) / 10.0
        self.lora_A[adapter_name].weight.copy_(A)
        self.lora_B[adapter_name].weight.copy_(B)

    @torch.no_grad()
    def _decomposition_init(self, adapter_name: str, init: str) -> None:
        """PiSSA / OLoRA: start ``A, B`` on the principal part of ``W`` and freeze the residual."""
        base = self.get_base_layer()
        if self.base_is_quantized:
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight, which is quantized "
                f"({type(base).__name__}) here; initialise PiSSA / OLoRA on a full-precision base."
            )
        dtype = base.weight.dtype
        weight = self._base_weight_out_in().to(torch.float32)  # (out, in)
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init == "olora":
            Q, R = torch.linalg.qr(weight)
            lora_B, lora_A = Q[:, :r], R[:r]
        else:
            niter = _pissa_niter(init)
            if niter is None:
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            else:
                U, S, V = torch.svd_lowrank(weight, r, niter=niter)
                Vh = V.T
            sqrt_s = torch.sqrt(S[:r] / scaling)
            lora_A = torch.diag(sqrt_s) @ Vh[:r]  # (r, in)
            lora_B = U[:, :r] @ torch.diag(sqrt_s)  # (out, r)
        self._set_factors(adapter_name, lora_A, lora_B)
        residual = weight - scaling * lora_B @ lora_A
        self._weight_row_sq_norms = None
        base.weight.data = (residual.T if self.fan_in_fan_out else residual).to(dtype).contiguous()

    @torch.no_grad()
    def _dora_row_norms(self, adapter_name: str) -> torch.Tensor:
        """``‖W + s·BA‖`` per output row without forming the ``(out, in)`` matrix: with ``wᵢ`` a row of W
        and ``bᵢ`` a row of B, ``‖wᵢ + s·bᵢA‖² = ‖wᵢ‖² + 2s·bᵢ·(A wᵢ) + s²·bᵢ (A Aᵀ) bᵢᵀ``.

        ``‖wᵢ‖²`` is cached (the base is frozen; the key holds the weight's version, so an in-place change
        invalidates it), leaving one ``(out, in) × (in, r)`` product per forward instead of building
        ``W + s·BA`` and its norms (three passes over an ``(out, in)`` matrix)."""
        weight = self.get_base_layer().weight
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        key = (weight.data_ptr(), weight._version, weight.shape)
        if self._weight_row_sq_norms is None or self._weight_row_sq_norms[0] != key:
            rows = weight.T if self.fan_in_fan_out else weight  # (out, in)
            self._weight_row_sq_norms = (key, rows.to(A.dtype).pow(2).sum(1))
        weight_sq = self._weight_row_sq_norms[1]  # (out,)
        s = self.scaling[adapter_name]
        # A Wᵀ with the small factor on the left (faster here, see lora_ops), as (r, out)
        A_Wt = A @ weight.to(A.dtype) if self.fan_in_fan_out else A @ weight.to(A.dtype).T
        cross = (B * A_Wt.T).sum(1)  # bᵢ·(A wᵢ)
        lora_sq = ((B @ (A @ A.T)) * B).sum(1)  # bᵢ (A Aᵀ) bᵢᵀ
        return (weight_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self._weight_row_sq_norms = None  # a swapped-in weight may reuse the old one's address
        super().set_base_weight(weight)

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        if self.base_is_quantized:  # the dequantized weight is a new tensor each call: nothing to cache
            return super()._dora_scale(adapter_name)
        return self.lora_magnitude_vector[adapter_name].weight / self._dora_row_norms(adapter_name)

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ over each output row: shape ``(out,)``."""
        return torch.linalg.norm(weight + delta, dim=0 if self.fan_in_fan_out else 1)

    def _to_weight_layout(self, per_feature: torch.Tensor) -> torch.Tensor:
        return per_feature.view(1, -1) if self.fan_in_fan_out else per_feature.view(-1, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        dropped = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
        if self.use_dora[name]:
            return DoraLinearFunction.apply(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                self.fan_in_fan_out,
                self.lora_magnitude_vector[name].weight,
                self._dora_row_norms(name),
            )
        return LoraLinearFunction.apply(
            x,
            dropped,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            self.fan_in_fan_out,
        )

    @property
    def _plain_delta(self) -> bool:
        """This layer's delta is LoRA's own (a subclass that changes it, e.g. with a gate, gets the generic
        forward, which calls its ``adapter_delta``)."""
        return type(self).adapter_delta is Linear.adapter_delta

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The active adapter when the fused kernel (:mod:`peftkit.methods.lora_ops`) computes this forward
        exactly: one LoRA or DoRA adapter (DoRA without active dropout), unmerged, on a plain full-precision
        ``Linear`` / ``Conv1D`` without hooks, all tensors of one dtype, autocast off. Anything else takes
        the generic path (under autocast: each matmul in the autocast dtype, as HF PEFT computes it)."""
        if (
            torch.is_autocast_enabled(x.device.type)
            or len(self.active_adapters) != 1
            or self.lora_bias.get(self.active_adapters[0])  # the kernel has no term for B's bias
            or not self._plain_delta
            or self.disable_adapters
            or self.merged_adapters
            or self.batch_adapter_names is not None
            or args
            or kwargs
        ):
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        dora_dropout = (
            self.use_dora[name] and self.training and not isinstance(self.lora_dropout[name], nn.Identity)
        )
        if dora_dropout or type(base) not in _FUSABLE_BASES or _has_hooks(base):
            return None  # (DoRA with dropout: both of its terms see the dropped input; the generic path)
        dtype = base.weight.dtype
        if x.dtype != dtype or self.lora_A[name].weight.dtype != dtype or x.device != base.weight.device:
            return None
        return name

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row through its own adapter with one gather and two batched matmuls (as S-LoRA / Punica),
        whatever the number of distinct adapters in the batch::

            A_row = A_stack[slot(row)]   (rows, r_max, in)    B_row = s·B_stack[slot(row)]   (rows, out, r_max)
            y_row = base(x_row) + (A_row x_rowᵀ)ᵀ B_rowᵀ

        Ranks below ``r_max`` are zero-padded (exact: the padding adds zeros), the scaling is folded into
        ``B``, and rows without an adapter (``"__base__"``, or an adapter not on this layer) use an all-zero
        slot. DoRA, dropout in training and mixed dtypes take the generic per-adapter path.
        """
        names = self.rows_adapter_names(x)
        present = [n for n in dict.fromkeys(names) if n in self.lora_A]
        result = self.base_layer(x, *args, **kwargs)
        if not present:
            return result
        if (
            not self._plain_delta
            or any(self.use_dora[n] or self.lora_bias[n] for n in present)
            or (self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in present))
            or any(not x.dtype == result.dtype == A.weight.dtype for A in self.lora_A.values())
        ):
            return super()._mixed_batch_forward(x, *args, **kwargs)
        # serving: one stack of every adapter on this layer, kept across batches whatever their mix;
        # training: the batch's adapters, rebuilt each call so that gradients reach them
        stacked = present if torch.is_grad_enabled() else list(self.lora_A)
        A_stack, Bt_stack = self._stacked_factors(stacked)  # (K+1, r_max, in), (K+1, r_max, out)
        slot_of = {name: i for i, name in enumerate(stacked)}
        zero_slot = len(stacked)
        slots = torch.tensor([slot_of.get(n, zero_slot) for n in names], device=x.device)
        rows = x.shape[0]
        x_3d = x.reshape(rows, -1, x.shape[-1])  # (rows, T, in)
        # the small factor on the left and index_select for the gathers: both several times faster here
        after_A_t = torch.bmm(A_stack.index_select(0, slots), x_3d.transpose(1, 2))  # (rows, r_max, T)
        Bt_rows = Bt_stack.index_select(0, slots)  # (rows, r_max, out)
        out_3d = result.reshape(rows, -1, result.shape[-1])  # (rows, T, out)
        if torch.is_grad_enabled():  # out of place: autograd may hold the base output
            return torch.baddbmm(out_3d, after_A_t.transpose(1, 2), Bt_rows).view(result.shape)
        return out_3d.baddbmm_(after_A_t.transpose(1, 2), Bt_rows).view(result.shape)

    def delete_adapter(self, adapter_name: str) -> None:
        self._stack_cache = None  # release the deleted adapter's factors
        super().delete_adapter(adapter_name)
        self._tied_adapters.discard(adapter_name)
        if not self._tied_adapters:
            self._tied_to.clear()

    def _stacked_factors(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``(s·B)ᵀ`` of ``names`` stacked and zero-padded to the largest rank, plus a zero slot:
        ``(K+1, r_max, in)`` and ``(K+1, r_max, out)``.

        Without gradients (serving) the stacks are cached until a factor changes; with gradients they are
        rebuilt so that autograd reaches every adapter's factors.
        """
        scalings = tuple(self.scaling[n] for n in names)
        grad = torch.is_grad_enabled() and any(
            self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad for n in names
        )
        cache = self._stack_cache
        # the entry's tensors are the adapters' factors (adding, deleting or padding adapters clears it);
        # their versions and data pointers catch every in-place write
        if (
            not grad
            and cache is not None
            and cache[0] == (tuple(names), scalings)
            and all(t._version == v and t.data_ptr() == p for t, v, p in cache[1])
        ):
            return cache[2]
        factors = [(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in names]
        r_max = max(A.shape[0] for A, _, _ in factors)
        A_stack = torch.stack([F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A, _, _ in factors])
        Bt_stack = torch.stack([F.pad((B * s).t(), (0, 0, 0, r_max - B.shape[1])) for _, B, s in factors])
        A_stack = torch.cat([A_stack, A_stack.new_zeros(1, *A_stack.shape[1:])])
        Bt_stack = torch.cat([Bt_stack, Bt_stack.new_zeros(1, *Bt_stack.shape[1:])])
        if grad:
            self._stack_cache = None
        else:
            tensors = tuple((t, t._version, t.data_ptr()) for A, B, _ in factors for t in (A, B))
            self._stack_cache = ((tuple(names), scalings), tensors, (A_stack, Bt_stack))
        return A_stack, Bt_stack

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout, scaling = self.lora_dropout[adapter_name], self.scaling[adapter_name]
        x = x.to(lora_A.weight.dtype)
        if not self.use_dora[adapter_name]:
            return lora_B(lora_A(dropout(x))) * scaling
        # DoRA: y = m/‖W+sBA‖ · (W x + s·BAx) + b, returned as a change of the base output.
        mag_norm_scale = self._dora_scale(adapter_name)  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.bias
            base_no_bias = base_output if bias is None else base_output - bias
            dropped = x
        else:
            dropped = dropout(x)
            base_no_bias = F.linear(dropped, self._base_weight_out_in().to(x.dtype))
        lora_out = lora_B(lora_A(dropped))
        return (mag_norm_scale - 1) * base_no_bias + mag_norm_scale * lora_out * scaling

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` in the base weight's layout."""
        delta = (
            self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight * self.scaling[adapter_name]
        )
        return delta.T if self.fan_in_fan_out else delta


class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``E' = E + s · (B A)ᵀ`` with ``A: r × vocab`` (zero init), ``B: dim × r``.

    With DoRA the output features are the embedding dimensions: ``m`` has one entry per dimension and
    ``E' = (E + s·(BA)ᵀ) · m / ‖E + s·(BA)ᵀ‖_col``, the norm of each column taken over the vocabulary.
    No dropout on this layer type (the input is token ids), as in HF PEFT.
    """

    def create_factors(self, adapter_name: str, r: int) -> None:
        if self.lora_bias[adapter_name]:
            raise ValueError(f"lora_bias=True is not supported for {type(self).__name__}.")
        base = self.get_base_layer()
        kwargs = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, base.num_embeddings, **kwargs))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(base.embedding_dim, r, **kwargs))

    def init_factors(self, adapter_name: str, init: InitKind, target_name: str) -> None:
        if init is False:
            nn.init.normal_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
        elif init in (True, "gaussian"):
            # A = 0 and B ~ N(0, 1), as microsoft/LoRA's Embedding
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
        else:
            super().init_factors(adapter_name, init, target_name)

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        after_A = F.embedding(
            x,
            self.lora_embedding_A[adapter_name].T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )  # (..., r)
        lora_out = after_A @ self.lora_embedding_B[adapter_name].T  # (..., dim)
        scaling = self.scaling[adapter_name]
        if not self.use_dora[adapter_name]:
            return lora_out * scaling
        # DoRA: y = m/‖E+s(BA)ᵀ‖ · (E[x] + s·(BA)ᵀ[x]), returned as a change of the base output.
        mag_norm_scale = self._dora_scale(adapter_name)  # (dim,)
        return (mag_norm_scale - 1) * base_output + mag_norm_scale * lora_out * scaling

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        B, A = self.lora_embedding_B[adapter_name], self.lora_embedding_A[adapter_name]
        return (B @ A).T * self.scaling[adapter_name]

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖E + ΔE‖ over the vocabulary, for each embedding dimension: shape ``(dim,)``."""
        return torch.linalg.norm(weight + delta, dim=0)

    def _to_weight_layout(self, per_feature: torch.Tensor) -> torch.Tensor:
        return per_feature.view(1, -1)  # (1, dim) against the (vocab, dim) table


class _ConvNd(LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: A is a convolution with the base kernel (to
    rank r), B a 1×1(×1) convolution back out, so ``ΔW[o, i, k…] = s · Σ_r B[o, r] · A[r, i, k…]``::

        x ──► W ⋆ x ──────────────────────┐
        └──► A ⋆ x (r channels) ──► B ⋆ · ─(+ s·)──► y

    A grouped base (``groups = g``) gets a grouped B (HF PEFT's layout: ``r`` must be divisible by ``g``);
    the update then mixes channels across groups, which a grouped kernel cannot hold, so such adapters do
    not merge (and DoRA, which needs the merged kernel's norm, is refused).

    With DoRA ``m`` has one entry per output channel, stored as ``(1, out, 1, …)`` (HF PEFT's shape, which
    broadcasts against the ``(N, out, …)`` output), and the norm of each output channel's kernel is taken
    over ``in × k…``.
    """

    def create_factors(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        if r % base.groups:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support "
                f"is limited to conv layers where the rank is divisible by groups. Either choose a different "
                f"rank or do not target this specific layer."
            )
        if base.groups > 1:
            if self.use_dora[adapter_name]:
                raise ValueError(
                    f"DoRA on a grouped convolution (groups={base.groups}) is not supported: its update mixes "
                    f"the groups, so the norm of the adapted kernel is not defined."
                )
            warnings.warn(
                "LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", stacklevel=2
            )
        conv = _CONV_BY_DIM[base.weight.dim()]
        ones = (1,) * (base.weight.dim() - 2)
        kwargs = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        # A sees the input as the base kernel does (stride, padding and its mode, dilation), so that the
        # merged kernel W + ΔW gives the same output as the two paths
        self.lora_A[adapter_name] = conv(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            **kwargs,
        )
        self.lora_B[adapter_name] = conv(
            r, base.out_channels, ones, ones, groups=base.groups, bias=self.lora_bias[adapter_name], **kwargs
        )

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout, scaling = self.lora_dropout[adapter_name], self.scaling[adapter_name]
        x = x.to(lora_A.weight.dtype)
        if not self.use_dora[adapter_name]:
            return lora_B(lora_A(dropout(x))) * scaling
        # DoRA: y = m/‖W+ΔW‖ · (W ⋆ x + s·B ⋆ A ⋆ x) + b, returned as a change of the base output.
        mag_norm_scale = self._dora_scale(adapter_name)  # (1, out, 1, …)
        base = self.get_base_layer()
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.bias
            per_channel = (1, -1) + (1,) * (base_output.dim() - 2)
            base_no_bias = base_output if bias is None else base_output - bias.view(per_channel)
            dropped = x
        else:
            # both terms of the change see the dropped-out input: W ⋆ x is recomputed on it
            dropped = dropout(x)
            base_no_bias = base._conv_forward(dropped, base.weight.to(x.dtype), None)
        lora_out = lora_B(lora_A(dropped))  # (N, out, …)
        return (mag_norm_scale - 1) * base_no_bias + mag_norm_scale * lora_out * scaling

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        groups = self.get_base_layer().groups
        if groups > 1:
            raise ValueError(
                f"Merging is not supported for LoRA on a grouped convolution (groups={groups}): the update "
                f"mixes channels across groups, which the grouped kernel cannot hold."
            )
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        # composing the two convolutions: B is 1×1, so the product is a per-kernel-position matmul
        delta = torch.einsum("or,ri...->oi...", B.flatten(1), A)
        return delta * self.scaling[adapter_name]

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ over ``in × k…`` for each output channel: shape ``(1, out, 1, …)``."""
        dims = tuple(range(1, weight.dim()))
        return torch.linalg.vector_norm(weight + delta, dim=dims, keepdim=True).transpose(0, 1)

    def _to_weight_layout(self, per_feature: torch.Tensor) -> torch.Tensor:
        # (out, 1, …) against the (out, in, k…) kernel
        return per_feature.reshape(-1, *(1,) * (self.get_base_layer().weight.dim() - 1))


class Conv1d(_ConvNd):
    """LoRA on ``nn.Conv1d`` (see :class:`_ConvNd`)."""


class Conv2d(_ConvNd):
    """LoRA on ``nn.Conv2d`` (see :class:`_ConvNd`)."""


class Conv3d(_ConvNd):
    """LoRA on ``nn.Conv3d`` (see :class:`_ConvNd`)."""


class ParamWrapper(LoraLayer):
    """LoRA on a parameter that a module's own forward reads (``target_parameters``): the fused expert
    weights of mixture-of-experts blocks (transformers 5 stores Mixtral's, Qwen-MoE's, gpt-oss's experts as
    3-D parameters, which ``target_modules`` cannot reach), or any 2-D weight. During the forward the module
    sees ``W + ΔW`` in place of its parameter (:func:`~peftkit.core.layer.parameter_override`)::

        experts.gate_up_proj  W (E, out, in)          ΔW[e] = s · B_e A_e,  A_e: r × in,  B_e: out × r
        x ──► experts.forward(x) reading W + ΔW

    HF PEFT's layout: ``lora_A`` is ``Linear(in, r·E)`` (rows ``e·r + k``), ``lora_B`` is
    ``Linear(r·E, out)`` (columns ``k·E + e``). A 3-D parameter is stored ``(E, out, in)`` unless its module
    says ``is_transposed`` (then ``(E, in, out)``). Several parameters of one module nest wrappers, the first
    registered innermost (HF PEFT's tensor names: ``experts.base_layer.lora_A.weight``, ...). Dropout,
    DoRA, ``lora_bias`` and mixed-adapter batches do not apply (x cannot be factored out of the module).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.get_param().shape
        if len(shape) == 3:
            self.num_experts, first, second = shape
            transposed = getattr(self.get_base_layer(), "is_transposed", False)
            self.in_features, self.out_features = (first, second) if transposed else (second, first)
            self.stored_out_in = not transposed
        elif len(shape) == 2:
            self.num_experts = 1
            self.out_features, self.in_features = shape
            self.stored_out_in = True
        else:
            raise ValueError(
                f"target_parameters: {parameter_name} has {len(shape)} dimensions; only 2-D and 3-D "
                f"parameters are supported."
            )

    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"

    def create_factors(self, adapter_name: str, r: int) -> None:
        param = self.get_param()
        kwargs = {"device": param.device, "dtype": adapter_dtype(param.dtype)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, **kwargs)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, **kwargs)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        scaling = self.scaling[adapter_name]
        if self.num_experts == 1 and self.get_param().dim() == 2:
            return (B @ A) * scaling
        A = A.reshape(self.num_experts, -1, A.shape[-1])  # (E, r, in)
        B = B.reshape(B.shape[0], -1, self.num_experts)  # (out, r, E)
        layout = "e o i" if self.stored_out_in else "e i o"
        return torch.einsum(f"o r e, e r i -> {layout}", B, A) * scaling

    # the parameter plays the base weight's part in merging
    def base_weight(self) -> torch.Tensor:
        return self.get_param()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.get_param().data = weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None  # the module's biases are not this adapter's business (no lora_bias here)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            raise ValueError(
                f"Mixed-adapter batches (adapter_names=...) are not supported for adapters on parameters "
                f"(target_parameters: {self.parameter_name}): the module mixes the rows of its input."
            )
        active = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)  # the base module as it is
        param = self.get_param()
        delta = sum(self.delta_weight(n) for n in active)
        with parameter_override(self.get_base_layer(), self.parameter_name, param + delta.to(param.dtype)):
            return self.base_layer(x, *args, **kwargs)


class MultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` (query, key and value of one width): one adapter on the packed input
    projection ``in_proj_weight`` (``3E × E``) and, nested as a :class:`Linear` at ``base_layer.out_proj``
    (HF PEFT's tensor names), one on the output projection. PyTorch's attention reads both weights directly
    (``out_proj``'s forward is never called), so during the forward the module sees ``W + ΔW`` in place of
    each (:func:`~peftkit.core.layer.parameter_override`)::

        x ──► multi_head_attention(x; W_in + s·B_in A_in, W_out + s·B_out A_out)

    No dropout on the adapter's input (there is no separate adapter path to drop it on), no DoRA, no
    ``lora_bias``, no mixed-adapter batches.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not base._qkv_same_embed_dim:
            raise ValueError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention (LoRA on "
                "separate q/k/v projection weights is not implemented)."
            )
        self.in_features, self.out_features = base.embed_dim, 3 * base.embed_dim
        # nn.TransformerEncoderLayer's fused inference path reads the attention's weights itself and never
        # calls its forward (so it would miss the adapter); it steps aside for modules with hooks
        self.register_forward_pre_hook(_keeps_fused_paths_off)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # embed_dim, batch_first, ...: what code around an attention block reads
            if name.startswith("__") or name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.get_base_layer(), name)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, target_name: str
    ) -> None:
        if config.use_dora or config.lora_bias:
            raise ValueError(
                f"MultiheadAttention does not support {'DoRA' if config.use_dora else 'lora_bias'} (yet); "
                f"{target_name}: set {'use_dora' if config.use_dora else 'lora_bias'}=False."
            )
        if config.lora_dropout:
            warnings.warn(
                f"lora_dropout is not applied on MultiheadAttention ({target_name}): the adapter acts through "
                f"the attention's weights, with no separate path to drop its input on.",
                stacklevel=2,
            )
        super().update_layer(adapter_name, r, lora_alpha, config, target_name)
        base = self.get_base_layer()
        if not isinstance(base.out_proj, Linear):
            base.out_proj = Linear(base.out_proj)
        base.out_proj.update_layer(adapter_name, r, lora_alpha, config, f"{target_name}.out_proj")

    def create_factors(self, adapter_name: str, r: int) -> None:
        weight = self.get_base_layer().in_proj_weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kwargs)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **kwargs)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (B @ A) * self.scaling[adapter_name]

    def base_weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.get_base_layer().in_proj_weight.data = weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None  # in_proj_bias is the attention's own (no lora_bias here)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            raise ValueError(
                "LoRA on MultiheadAttention does not support mixed adapter batches (adapter_names)."
            )
        active = [n for n in self.active_adapters if n in self.lora_A]
        base = self.get_base_layer()
        out_proj = base.out_proj
        if self.disable_adapters or self.merged or not active:  # the weights as they are
            return base(query, *args, **kwargs)
        w_in = base.in_proj_weight
        delta_in = sum(self.delta_weight(n) for n in active)
        out_linear = out_proj.get_base_layer()
        delta_out = sum(out_proj.delta_weight(n) for n in active if n in out_proj.lora_A)
        with (
            parameter_override(base, "in_proj_weight", w_in + delta_in.to(w_in.dtype)),
            parameter_override(out_linear, "weight", out_linear.weight + delta_out.to(w_in.dtype)),
        ):
            return base(query, *args, **kwargs)


def _keeps_fused_paths_off(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing (see :class:`MultiheadAttention`)."""


def _replicated_blocks(blocks: nn.ModuleList, layout: Sequence[Sequence[int]]) -> nn.ModuleList:
    """The blocks of ``layout``'s ranges in order, each a copy whose parameters are the original block's own
    tensors (shared, not copied); attention modules get their new position as ``layer_idx`` (the KV cache
    slot), as in HF PEFT."""
    new = []
    for start, end in layout:
        for index in range(start, end):
            shared = {id(param): param for param in blocks[index].parameters()}  # deepcopy keeps these
            clone = copy.deepcopy(blocks[index], memo=shared)
            for module in clone.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new)
            new.append(clone)
    return nn.ModuleList(new)


def check_one_bias_adapter(tuner: BaseTuner) -> None:
    """Biases are the model's own and shared: only one adapter may train them (as HF PEFT)."""
    if sum(getattr(c, "bias", "none") != "none" for c in tuner.peft_config.values()) > 1:
        raise ValueError(
            f"{type(tuner).__name__} supports only 1 adapter with bias. When using multiple adapters, set "
            f"bias to 'none' for all adapters."
        )


def bias_parameters(
    tuner: BaseTuner, adapter_name: str, layer_type: type[AdapterLayer]
) -> dict[str, nn.Parameter]:
    """The model's biases that adapter ``adapter_name`` trains and saves (LoRA's ``bias`` option):
    ``"lora_only"``, the biases of the ``layer_type`` layers it wraps; ``"all"``, every bias (except
    inside ``modules_to_save`` wrappers, whose copies belong to the wrapper)."""
    bias = getattr(tuner.peft_config[adapter_name], "bias", "none")
    if bias == "none":
        return {}
    if bias == "lora_only":
        return {
            f"{path}.base_layer.bias": layer.get_base_layer().bias
            for path, layer in tuner.adapter_layers()
            if isinstance(layer, layer_type)
            and adapter_name in layer.adapter_names
            and layer.bias is not None
        }
    return {
        name: param
        for name, param in tuner.model.named_parameters()
        if name.rsplit(".", 1)[-1] == "bias"
        and ".modules_to_save." not in name
        and ".original_module." not in name
    }


_CONV_BY_DIM: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
_LORA_CONV_BY_DIM: dict[int, type[_ConvNd]] = {3: Conv1d, 4: Conv2d, 5: Conv3d}


class LoraModel(BaseTuner):
    """Injects LoRA layers; adds LoRA's ``bias`` handling and :meth:`add_weighted_adapter`."""

    layer_cls = LoraLayer
    prefix = "lora_"
    supports_quantized_layers = True  # bitsandbytes Linear4bit / Linear8bitLt (QLoRA), DoRA included

    def check_new_adapter_config(self, config: PeftConfig) -> None:
        check_one_bias_adapter(self)
        # adapters on parameters nest per parameter: all of them must target the same parameters (HF PEFT)
        target_sets = {
            name: sorted(set(c.target_parameters))
            for name, c in self.peft_config.items()
            if getattr(c, "target_parameters", None)
        }
        new = sorted(set(getattr(config, "target_parameters", None) or ()))
        for name, targets in target_sets.items():
            if new and targets != new:
                raise ValueError(
                    f"When using multiple adapters with `target_parameters`, all adapters must target the same "
                    f"set of parameters, but got {new} for the new adapter and {targets} for adapter {name!r}."
                )

    def inject_adapter(self, adapter_name: str) -> None:
        """``layer_replication`` rebuilds the block stack before the first adapter's layers are placed (undone
        if injection fails)."""
        config = self.peft_config[adapter_name]
        layout = getattr(config, "layer_replication", None)
        applied = self.__dict__.get("_layer_replication")
        if not layout or applied is not None:
            if layout and [list(r) for r in layout] != applied:
                raise ValueError(
                    f"This model's blocks were already replicated as {applied}; adapter {adapter_name!r} asks for "
                    f"{layout}. All adapters of a model share one layer_replication."
                )
            return super().inject_adapter(adapter_name)
        owner, path = find_block_list(self.model)
        parent_path, _, attr = path.rpartition(".")
        parent = owner.get_submodule(parent_path) if parent_path else owner
        original = getattr(parent, attr)
        if max(end for _, end in layout) > len(original):
            raise ValueError(f"layer_replication={layout} reaches past the model's {len(original)} blocks.")
        config_obj = getattr(self.model, "config", None)
        old_count = getattr(config_obj, "num_hidden_layers", None)
        # per-layer settings of the config follow their blocks (HF PEFT leaves them, and models that read
        # config.layer_types[i], e.g. Gemma 2, then fail on the added blocks)
        old_types = getattr(config_obj, "layer_types", None)
        setattr(parent, attr, _replicated_blocks(original, layout))
        if old_count is not None:
            config_obj.num_hidden_layers = len(getattr(parent, attr))
        if isinstance(old_types, (list, tuple)) and len(old_types) == len(original):
            config_obj.layer_types = [old_types[i] for start, end in layout for i in range(start, end)]
        self.__dict__["_layer_replication"] = [list(r) for r in layout]
        try:
            super().inject_adapter(adapter_name)
        except BaseException:
            setattr(parent, attr, original)
            if old_count is not None:
                config_obj.num_hidden_layers = old_count
            if old_types is not None:
                config_obj.layer_types = old_types
            del self.__dict__["_layer_replication"]
            raise

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        """The LoRA targets, then the embeddings of ``trainable_token_indices`` (and heads tied to them)."""
        assert isinstance(config, LoraConfig)
        names = self._tied_lora_targets(config, self._lora_target_names(config, modules_to_save))
        self._token_plan: dict[str, tuple[list[int], str | None]] = {}
        if config.trainable_token_indices is None:
            return names
        plan = token_targets(
            self.model, config.trainable_token_indices, config.modules_to_save, config.ensure_weight_tying
        )
        clash = [name for name, _, _ in plan if name in names]
        if clash:
            raise ValueError(
                f"{clash} are both LoRA targets and trainable_token_indices targets; train an embedding's tokens "
                f"one way only (drop it from target_modules, or from trainable_token_indices)."
            )
        self._token_plan = {name: (ids, tied_to) for name, ids, tied_to in plan}
        return names + list(self._token_plan)

    def _tied_lora_targets(self, config: LoraConfig, names: list[str]) -> list[str]:
        """``ensure_weight_tying`` with the embedding or its tied head among the targets: both get LoRA, the
        head's factors being the embedding's transposed (``A_head = B_embᵀ``, ``B_head = A_embᵀ``: the same
        update, as HF PEFT ties them); the heads come last so that the embedding's layer exists first."""
        self._lora_tied: dict[str, str] = {}
        tied = modules_tied_to_input_embeddings(self.model)
        embedding = input_embeddings_name(self.model)
        # as HF PEFT: only a target_modules entry named like an embedding layer counts ("all-linear" reaching
        # the head, or BART's `shared` under its short name, does not); also the input embedding's full name,
        # which HF PEFT writes into the configs it saves in place of the tied modules' names
        named = _names_embedding_layer(config.target_modules) or (
            isinstance(config.target_modules, (list, set, tuple)) and embedding in config.target_modules
        )
        involved = (
            bool(tied) and embedding is not None and named and any(n in names for n in (embedding, *tied))
        )
        if not config.ensure_weight_tying:
            if involved:
                warnings.warn(UNTIED_ADAPTER_WARNING, stacklevel=4)
            return names
        if not tied and not config.modules_to_save:
            warnings.warn(
                "You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                stacklevel=4,
            )  # HF PEFT's words
        if not involved:
            saved = [
                p
                for p in config.modules_to_save or ()
                if any(name_matches(n, [p]) for n in (embedding, *tied))
            ]
            if tied and not saved:
                warnings.warn(
                    "You have requested `ensure_weight_tying`, but no tied modules are added in either "
                    "`modules_to_save` or `target_modules`",
                    stacklevel=4,
                )  # HF PEFT's words
            return names
        if config.use_dora:
            raise ValueError(
                "ensure_weight_tying ties LoRA factors of the embedding and its head; not with DoRA."
            )
        assert embedding is not None
        # heads share the embedding's factors; embeddings tied to it (an encoder-decoder's stacks) get LoRA of
        # their own, as in HF PEFT (merging then gives each its own copy of the shared weight)
        heads = [n for n in tied if not isinstance(_unwrapped(self.model.get_submodule(n)), nn.Embedding)]
        self._lora_tied = dict.fromkeys(heads, embedding)
        return [n for n in names if n not in tied and n != embedding] + [embedding, *tied]

    def _lora_target_names(self, config: LoraConfig, modules_to_save: Sequence[str]) -> list[str]:
        if not config.target_parameters:
            return super().target_names(config, modules_to_save)
        if not config.target_modules:  # only parameters are targeted (HF PEFT: None means none here)
            return []
        try:
            return super().target_names(config, modules_to_save)
        except ValueError:  # as HF PEFT: the parameters may still match
            warnings.warn(
                f"target_modules={set(config.target_modules)} were set but no module was matched.",
                RuntimeWarning,
                stacklevel=3,
            )
            return []

    def inject_parameters(self, adapter_name: str, config: PeftConfig) -> list[str]:
        """``target_parameters``: wrap each matching parameter's module in a :class:`ParamWrapper` (nested
        for several parameters of one module, in registration order, as HF PEFT). Also warns when the model
        keeps weights as 3-D parameters that this adapter leaves out (MoE experts that ``target_modules``,
        ``"all-linear"`` included, cannot reach)."""
        assert isinstance(config, LoraConfig)
        targets = sorted(set(config.target_parameters or ()))
        matched: list[str] = []
        if targets:
            for option, value in (
                ("lora_dropout", config.lora_dropout),
                ("fan_in_fan_out", config.fan_in_fan_out),
                ("lora_bias", config.lora_bias),
                ("use_dora", config.use_dora),
            ):
                if value:
                    raise ValueError(
                        f"lora.ParamWrapper (target_parameters) does not work with {option}={value}."
                    )
            matched = self._wrap_parameters(adapter_name, config, targets)
            if not matched:
                raise ValueError(f"target_parameters={targets} were set but no parameter was matched.")
        self._warn_unreached_expert_parameters(matched)
        targeted = self.module_targets_by_adapter.get(adapter_name, []) + matched
        for option in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(config, option) or {}
            unmatched = sorted(
                k for k in patterns if all(per_module_value(t, {k: 0}, None) is None for t in targeted)
            )
            if unmatched:  # a typo would otherwise leave every layer at the default silently
                warnings.warn(
                    f"The following {option} keys did not match any targeted module and were ignored: "
                    f"{unmatched}.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return matched

    def _wrap_parameters(self, adapter_name: str, config: LoraConfig, targets: list[str]) -> list[str]:
        matched = []
        for module_name, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer) or ".modules_to_save." in f".{module_name}.":
                continue
            owner = ".".join(part for part in module_name.split(".") if part != "base_layer")
            for param_name, _ in list(module.named_parameters(recurse=False)):
                key = f"{owner}.{param_name}" if owner else param_name
                if key not in targets and not any(key.endswith(f".{t}") for t in targets):
                    continue
                r = per_module_value(key, config.rank_pattern, config.r)
                alpha = per_module_value(key, config.alpha_pattern, config.lora_alpha)
                top = self.model.get_submodule(owner) if owner else self.model
                wrapper = top
                while isinstance(wrapper, ParamWrapper) and wrapper.parameter_name != param_name:
                    wrapper = wrapper.base_layer
                if isinstance(wrapper, ParamWrapper):  # a later adapter on the same parameter
                    wrapper.update_layer(adapter_name, r, alpha, config, key)
                else:
                    new = ParamWrapper(top, param_name)
                    new.update_layer(adapter_name, r, alpha, config, key)
                    parent_name, _, child_name = owner.rpartition(".")
                    setattr(self.model.get_submodule(parent_name), child_name, new)
                matched.append(key)
        return matched

    def _warn_unreached_expert_parameters(self, matched: list[str]) -> None:
        unreached = [
            (f"{name}.{param_name}", tuple(param.shape))
            for name, module in self.base_modules()
            for param_name, param in module.named_parameters(recurse=False)
            if param.dim() == 3 and param.is_floating_point() and f"{name}.{param_name}" not in matched
        ]
        if unreached:
            suffixes = sorted({".".join(key.split(".")[-2:]) for key, _ in unreached})
            warnings.warn(
                f"{len(unreached)} weight(s) of this model are 3-D parameters (mixture-of-experts experts, e.g. "
                f"{unreached[0][0]} {unreached[0][1]}), which target_modules cannot adapt: they get no adapter. "
                f"To adapt them, add target_parameters={suffixes}.",
                stacklevel=4,
            )

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, LoraConfig)
        if target_name in self.__dict__.get("_token_plan", {}):
            ids, tied_to = self._token_plan[target_name]
            return add_token_layer(
                self.model, target_name, adapter_name, ids, True, TokenAdapterLayer, tied_to
            )
        tied_to = self.__dict__.get("_lora_tied", {}).get(target_name)
        rank_of = tied_to or target_name  # a tied head takes the embedding's rank and scale
        r = per_module_value(rank_of, config.rank_pattern, config.r)
        alpha = per_module_value(rank_of, config.alpha_pattern, config.lora_alpha)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, alpha, config, target_name)
            new_module = None
            layer = target
        else:
            base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
            new_module = layer = _new_lora_layer(base, target, target_name, config)
            new_module.update_layer(adapter_name, r, alpha, config, target_name)
        if tied_to is not None:
            layer.tie_factors(adapter_name, self.model.get_submodule(tied_to))
        return new_module

    def extra_adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return bias_parameters(self, adapter_name, LoraLayer)

    def auto_saves_embedding_weights(self, config: PeftConfig) -> bool:
        return getattr(config, "trainable_token_indices", None) is None  # HF PEFT's rule

    def after_loading(self, adapter_name: str) -> None:
        """Heads tied by ``ensure_weight_tying`` take the loaded embedding factors again (as views)."""
        for _, layer in self.adapter_layers():
            if (
                isinstance(layer, LoraLayer)
                and adapter_name in layer._tied_adapters
                and layer.tied_layer is not None
            ):
                layer.tie_factors(adapter_name, layer.tied_layer)

    def relative_to_initial(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """PiSSA / OLoRA to plain LoRA (HF PEFT's conversion): ``W = W_res + s·B₀A₀`` at the start and
        ``W_res + s·BA`` after training, so ``ΔW = s·(BA − B₀A₀) = s·[B | −B₀][A ; A₀]``: factors of twice the
        rank with the same scale (``lora_alpha`` doubled, or times √2 with rsLoRA), on the original base."""
        config = self.peft_config[adapter_name]
        assert isinstance(config, LoraConfig)
        if config.use_dora:
            raise ValueError("Converting a DoRA adapter relative to its initial values is not supported.")
        if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
            raise ValueError(  # HF PEFT's words
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
                "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
            )
        factors = [k for k in tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))]
        missing = [k for k in factors if k not in initial or initial[k].shape != tensors[k].shape]
        if missing:
            raise ValueError(
                f"The initial adapter does not match this one (e.g. {missing[0]}); pass the folder it was saved to "
                f"right after creation."
            )
        converted = dict(tensors)
        for key in factors:
            if key.endswith(".lora_A.weight"):
                converted[key] = torch.cat([tensors[key], initial[key].to(tensors[key])], dim=0)
            else:
                converted[key] = torch.cat([tensors[key], -initial[key].to(tensors[key])], dim=1)
        changes: dict[str, Any] = {
            "init_lora_weights": True,
            "r": 2 * config.r,
            "lora_alpha": config.lora_alpha * (2**0.5 if config.use_rslora else 2),
            "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()},
        }
        return converted, changes

    # ------------------------------------------------------------------------------- hot-swapping
    # The rank dimension of each factor, by the end of its on-disk key: A is (r, in...), B is (out, r...).
    _RANK_DIM: ClassVar[dict[str, int]] = {
        "lora_A.weight": 0,
        "lora_B.weight": 1,
        "lora_embedding_A": 0,
        "lora_embedding_B": 1,
    }

    def hotswap_tensor(self, key: str, param: nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
        """A factor of a smaller rank is zero-padded to the parameter's rank (``B A`` is unchanged)."""
        dim = next((d for suffix, d in self._RANK_DIM.items() if key.endswith(suffix)), None)
        same_elsewhere = (
            dim is not None
            and tensor.dim() == param.dim()
            and all(a == b for i, (a, b) in enumerate(zip(tensor.shape, param.shape)) if i != dim)
        )
        if not same_elsewhere or tensor.shape[dim] == param.shape[dim]:
            return super().hotswap_tensor(key, param, tensor)
        if tensor.shape[dim] > param.shape[dim]:
            raise ValueError(
                f"{key}: rank {tensor.shape[dim]} is larger than the model's {param.shape[dim]}; call "
                f"prepare_model_for_compiled_hotswap(model, target_rank={tensor.shape[dim]}) first"
            )
        padding = [0, 0] * tensor.dim()  # F.pad lists (left, right) pairs from the last dimension back
        padding[2 * (tensor.dim() - 1 - dim) + 1] = param.shape[dim] - tensor.shape[dim]
        return F.pad(tensor, padding)

    def after_hotswap(self, adapter_name: str, config: PeftConfig) -> None:
        """Ranks, scalings and dropout from the new config (the factors keep their padded shapes)."""
        assert isinstance(config, LoraConfig)
        super().after_hotswap(adapter_name, config)
        for path, layer in self.adapter_layers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                r = per_module_value(path, config.rank_pattern, config.r)
                alpha = per_module_value(path, config.alpha_pattern, config.lora_alpha)
                layer.r[adapter_name], layer.lora_alpha[adapter_name] = r, alpha
                layer.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
                p = config.lora_dropout
                layer.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    @torch.no_grad()
    def pad_ranks(self, target_rank: int) -> None:
        """Zero-pad every adapter's factors to ``target_rank`` (see ``prepare_model_for_compiled_hotswap``);
        the true rank stays in ``layer.r`` and saving writes the unpadded factors."""
        _check_positive("target_rank", target_rank, integer=True)
        for path, layer in self.adapter_layers():
            if not isinstance(layer, LoraLayer):
                continue
            if isinstance(layer, ParamWrapper):
                raise ValueError(
                    f"Hot-swap rank padding is not supported for adapters on parameters (target_parameters: "
                    f"{path}.{layer.parameter_name}): their factors interleave the experts."
                )
            for name in layer.r:
                params = layer.adapter_parameters(name)
                for local, dim in self._RANK_DIM.items():
                    if local not in params:
                        continue
                    param = params[local]
                    if param.shape[dim] > target_rank:
                        raise ValueError(
                            f"target_rank={target_rank} is below the rank {param.shape[dim]} of adapter "
                            f"{name!r} at {path}."
                        )
                    padded = nn.Parameter(
                        self.hotswap_tensor(local, _with_rank(param, dim, target_rank), param.detach()),
                        requires_grad=param.requires_grad,
                    )
                    layer._stack_cache = None
                    owner_name, _, attr = local.rpartition(".")
                    if local.startswith("lora_embedding"):
                        getattr(layer, local)[name] = padded
                    else:
                        setattr(getattr(layer, owner_name)[name], attr, padded)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Factors padded for hot-swapping are saved at the adapter's true rank."""
        tensors = super().adapter_state_dict(adapter_name)
        for path, layer in self.adapter_layers():
            if (
                not isinstance(layer, LoraLayer)
                or adapter_name not in layer.r
                or isinstance(layer, ParamWrapper)
            ):
                continue  # (a ParamWrapper's factors are r · experts wide, never padded)
            r = layer.r[adapter_name]
            for local, tensor in layer.adapter_parameters(adapter_name).items():
                dim = self._RANK_DIM.get(local)
                if dim is not None and tensor.shape[dim] > r:
                    tensors[f"{SAVED_PREFIX}{path}.{local}"] = tensor.detach().narrow(dim, 0, r)
        return tensors

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new adapter from a weighted combination of existing ones (HF PEFT's semantics and random draws).

        * ``"cat"``: ``ΔW = Σ wᵢ ΔWᵢ`` exactly, with rank ``Σ rᵢ`` (factors stacked).
        * ``"linear"``: ``A = Σ √wᵢ sᵢ Aᵢ``, ``B = Σ √wᵢ Bᵢ``; all ranks must be equal.
        * ``"svd"``: the best rank-``svd_rank`` (default ``max rᵢ``) approximation of ``Σ wᵢ ΔWᵢ``.
        * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"``, each factor
          combined by :func:`~peftkit.core.merge.combine_tensors` (pruned to ``density``, DARE's draws from
          torch's global generator; TIES elects signs by ``majority_sign_method``); equal ranks.
        * ``"<that>_svd"``: the same combination of the ``ΔWᵢ``, then the rank-``svd_rank`` SVD.

        The new adapter has scaling exactly 1 (``lora_alpha = r``, and ``use_rslora=False``: HF PEFT keeps the
        first adapter's ``use_rslora`` and so scales an rsLoRA combination by ``√r``). With ``rank_pattern``
        adapters, ``"cat"`` takes the largest per-layer sum of ranks and zero-pads the other layers (HF PEFT
        sums the default ranks only and fails on such layers). DoRA adapters cannot be combined.
        """
        del svd_full_matrices, svd_driver  # the leading singular vectors do not depend on them
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick a new name.")
        validate_adapter_name(adapter_name, self.model, existing=self.peft_config)
        adapters = self.known_adapter_names(list(adapters) if isinstance(adapters, tuple) else adapters)
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("Give one weight per adapter (and at least one adapter).")
        if not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(f"Adapter weights must be finite numbers, got {list(weights)}.")
        if svd_rank is not None and (
            isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1
        ):
            raise ValueError(f"svd_rank must be a positive integer (or None), got {svd_rank!r}.")
        configs = []
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Unknown adapter {name!r}; this model has {list(self.peft_config)}.")
            configs.append(self.peft_config[name])
        if any(c.use_dora for c in configs):
            raise ValueError("DoRA adapters cannot be combined with add_weighted_adapter.")
        ranks = [c.r for c in configs] + [v for c in configs for v in c.rank_pattern.values()]
        kind = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
        if combination_type not in _COMBINATIONS:
            raise ValueError(f"combination_type={combination_type!r}; use one of {', '.join(_COMBINATIONS)}.")
        if kind in SPARSIFYING and (
            isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1
        ):
            raise ValueError(
                f"combination_type={combination_type!r} needs density in [0, 1], got {density!r}."
            )
        if combination_type == "cat":
            new_rank = max(
                sum(layer.r[a] for a in adapters if a in layer.r)
                for _, layer in self.adapter_layers()
                if isinstance(layer, LoraLayer)
            )
        elif combination_type.endswith("svd"):
            new_rank = svd_rank or max(ranks)
        else:  # the factors themselves are combined
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"combination_type={combination_type!r} needs equal ranks, got {sorted(set(ranks))}."
                )
            new_rank = ranks[0]
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, list) for t in targets):
            new_targets: Any = sorted({m for t in targets for m in t})
        elif len({str(t) for t in targets}) == 1:
            new_targets = targets[0]
        else:
            new_targets = "|".join(f"({t})" for t in targets if isinstance(t, str))
            if any(isinstance(t, list) for t in targets):
                raise ValueError("Cannot combine adapters whose target_modules mix lists and regex strings.")
        self.peft_config[adapter_name] = configs[0].replace(
            r=new_rank,
            lora_alpha=new_rank,
            use_rslora=False,
            target_modules=new_targets,
            rank_pattern={},
            alpha_pattern={},
        )
        try:
            self.inject_adapter(adapter_name)
            for _, layer in self.adapter_layers():
                if isinstance(layer, LoraLayer) and adapter_name in layer.adapter_names:
                    _combine_into(
                        layer,
                        adapters,
                        weights,
                        adapter_name,
                        combination_type,
                        svd_clamp,
                        density if density is not None else 1.0,
                        majority_sign_method,
                    )
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self.set_adapter(self.active_adapters)


@torch.no_grad()
def _combine_into(
    layer: LoraLayer,
    adapters: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    combination_type: str,
    svd_clamp: float | None,
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> None:
    """Write the combination of ``adapters`` into the factors of ``new_name`` on one layer."""
    if isinstance(layer, ParamWrapper):
        raise ValueError(
            "add_weighted_adapter does not support adapters on parameters (target_parameters): their factors "
            "interleave the experts."
        )
    if isinstance(layer, _ConvNd) and layer.get_base_layer().groups > 1:
        raise ValueError(
            "add_weighted_adapter does not support LoRA on grouped convolutions (groups > 1): their update "
            "is not a product of the two factors' matrices."
        )
    embedding = isinstance(layer, Embedding)
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]

    def factors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A: r × in and B: out × r in every layer type; conv kernels flattened into in."""
        if embedding:
            return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        return A.flatten(1), B.flatten(1)

    if embedding:
        new_A, new_B = layer.lora_embedding_A[new_name], layer.lora_embedding_B[new_name]
    else:
        new_A, new_B = layer.lora_A[new_name].weight, layer.lora_B[new_name].weight
    if not present:
        new_A.zero_()
        new_B.zero_()
        return
    scaled = [(factors(a), w, layer.scaling[a]) for a, w in present]
    if combination_type == "cat":
        A, B = combine_cat([(A, B) for (A, B), _, _ in scaled], [w * s for _, w, s in scaled])
    elif combination_type == "linear":
        A, B = combine_linear([(A, B) for (A, B), _, _ in scaled], [w * s for _, w, s in scaled])
    elif combination_type == "svd":
        deltas = [B @ A for (A, B), _, _ in scaled]
        A, B = combine_svd(deltas, [w * s for _, w, s in scaled], rank=new_A.shape[0], clamp=svd_clamp)
    elif combination_type.endswith("_svd"):  # the sparsifying combination of the scaled ΔWᵢ, then SVD
        kind = combination_type.removesuffix("_svd")
        deltas = [s * (B @ A) for (A, B), _, s in scaled]
        delta = combine_tensors(kind, deltas, [w for _, w, _ in scaled], density, majority_sign_method)
        A, B = combine_svd([delta], [1.0], rank=new_A.shape[0], clamp=svd_clamp)
    else:  # the sparsifying combination of each factor, with HF PEFT's split of wᵢ·sᵢ into √ parts
        coefficients = [w * s for _, w, s in scaled]
        weights_A = [math.copysign(math.sqrt(abs(c)), c) for c in coefficients]
        weights_B = [math.sqrt(abs(c)) for c in coefficients]
        args = (combination_type, density, majority_sign_method)
        A = combine_tensors(args[0], [A for (A, _), _, _ in scaled], weights_A, *args[1:])
        B = combine_tensors(args[0], [B for (_, B), _, _ in scaled], weights_B, *args[1:])
    new_A.zero_()
    new_B.zero_()
    new_A.view(new_A.shape[0], -1)[: A.shape[0]] = A.to(new_A.dtype)
    new_B.view(new_B.shape[0], -1)[:, : B.shape[1]] = B.to(new_B.dtype)


_COMBINATIONS = (
    "svd",
    "linear",
    "cat",
    *SPARSIFYING,
    *(f"{kind}_svd" for kind in SPARSIFYING),
)


def _names_embedding_layer(targets: list[str] | str | None) -> bool:
    """HF PEFT's test: a list entry ending with an embedding layer's name, or a regex matching one."""
    if isinstance(targets, str):
        return targets != "all-linear" and any(pattern_match(targets, name) for name in EMBEDDING_LAYER_NAMES)
    return any(str(t).split(".")[-1] in EMBEDDING_LAYER_NAMES for t in targets or ())


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def _new_lora_layer(base: nn.Module, target: nn.Module, target_name: str, config: LoraConfig) -> LoraLayer:
    fan_in_fan_out = linear_fan_in_fan_out(base, target_name, config.fan_in_fan_out)
    if fan_in_fan_out is not None:
        return Linear(target, fan_in_fan_out=fan_in_fan_out)
    if isinstance(base, nn.Embedding):
        return Embedding(target)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _LORA_CONV_BY_DIM[base.weight.dim()](target)
    if isinstance(base, nn.MultiheadAttention):
        return MultiheadAttention(target)
    raise ValueError(
        f"LoRA cannot wrap {target_name} ({type(base).__name__}); supported layers are torch.nn.Linear, "
        f"transformers Conv1D, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d and torch.nn.MultiheadAttention. "
        f"Narrow target_modules."
    )


# ----------------------------------------------------------------------------------------------- LoftQ
def _quantization_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` quantized as bitsandbytes stores it and dequantized again: NF4 in blocks of 64 without
    double quantization (``bits=4``, as HF PEFT's LoftQ) or int8 per row (``bits=8``)."""
    import bitsandbytes as bnb

    weight = weight.contiguous()
    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        return bnb.functional.dequantize_4bit(packed, state).to(weight.dtype)
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight)
    return bnb.functional.int8_vectorwise_dequant(codes, scales).to(weight.dtype)


def _low_rank_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r × in), B (out × r)`` with ``scaling · B A`` the best rank-``r`` approximation of ``residual``
    (its truncated SVD, ``√(σ / scaling)`` on each side)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    return (root[:, None] * Vh[:rank]).contiguous(), (U[:, :rank] * root).contiguous()


def loftq_decomposition(
    weight: torch.Tensor, bits: int, rank: int, iterations: int = 1, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", ICLR 2024,
    arXiv:2310.08659): alternate ``Q = dequant(quant(W − s·BA))`` and ``s·BA = SVD_r(W − Q)``, starting from
    ``BA = 0``, so that the quantized base plus the adapter starts close to ``W``.

    Returns ``(Q, A, B)``. HF PEFT's LoftQ leaves the scale ``s = lora_alpha / r`` out (its ``BA`` is the
    fit itself, exact only for ``lora_alpha = r``); here ``s·BA`` is the fit for every ``lora_alpha``.
    """
    target = weight
    for step in range(iterations):
        quantized = _quantization_roundtrip(target, bits)
        lora_A, lora_B = _low_rank_factors(weight - quantized, rank, scaling)
        if step + 1 < iterations:
            target = weight - scaling * lora_B @ lora_A
    return quantized, lora_A, lora_B


def _safetensors_weights(folder_or_file: str) -> dict[str, str]:
    """Tensor name -> file holding it, for a model saved as safetensors (one file or shards with
    ``model.safetensors.index.json``)."""
    from safetensors import safe_open

    path = folder_or_file
    if os.path.isdir(path):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            path = single
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            files = {}
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or os.path.basename(shard) != shard:
                    raise ValueError(f"{index}: shard {shard!r} is not a file name in that folder.")
                files[name] = os.path.join(path, shard)
            return files
        else:
            raise FileNotFoundError(
                f"{folder_or_file} holds no model.safetensors (or sharded index); LoftQ reads the full-precision "
                f"weights from a safetensors checkpoint."
            )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No safetensors checkpoint at {folder_or_file}.")
    with safe_open(path, framework="pt") as f:
        return dict.fromkeys(f.keys(), path)


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Any = None,
) -> None:
    """LoftQ on a model already loaded in 4-bit (HF PEFT's ``replace_lora_weights_loftq``): for every LoRA
    layer on a bitsandbytes 4-bit linear, set ``A, B`` so that ``s·BA`` is the best rank-r fit of
    ``W − dequant(Q)``, ``W`` read from the full-precision safetensors checkpoint at ``model_path`` (a file or
    folder; default: the base model's own folder). Runs on CPU as well (HF PEFT's needs a GPU).

    ``callback(model, module_name) -> bool`` is called after each layer; ``False`` puts that layer's previous
    factors back (e.g. keep a layer only if it brings the logits closer to the full-precision model's).

    Raises:
        ValueError: no LoRA layer on a 4-bit base, or no checkpoint to read.
    """
    from safetensors import safe_open

    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, LoraModel):
        raise ValueError("replace_lora_weights_loftq needs a PeftModel with LoRA adapters.")
    base = tuner.model
    if model_path is None:
        model_path = getattr(base, "name_or_path", None) or getattr(
            getattr(base, "config", None), "_name_or_path", ""
        )
        if not model_path or not os.path.isdir(model_path):
            raise ValueError(
                "The base model was not loaded from a local folder; pass model_path, the folder (or file) of its "
                "full-precision safetensors checkpoint."
            )
    layers = [
        (name, layer)
        for name, layer in tuner.adapter_layers()
        if isinstance(layer, Linear)
        and adapter_name in layer.r
        and layer.base_is_quantized
        and type(layer.get_base_layer()).__name__ == "Linear4bit"
    ]
    if not layers:
        raise ValueError("No bnb LoRA module found on the model")  # HF PEFT's words
    files = _safetensors_weights(model_path)
    prefix = getattr(base, "base_model_prefix", "") or ""
    for name, layer in layers:
        key = f"{name}.weight"
        if key not in files and prefix and key.startswith(f"{prefix}."):
            key = key[len(prefix) + 1 :]
        if key not in files:
            raise ValueError(f"{model_path} has no tensor {name}.weight for the LoRA layer {name}.")
        with safe_open(files[key], framework="pt") as f:
            weight = f.get_tensor(key).to(torch.float32)
        dequantized = layer.base_weight().to(torch.float32)
        if weight.shape != dequantized.shape:
            raise ValueError(f"{key}: checkpoint {tuple(weight.shape)} vs model {tuple(dequantized.shape)}")
        lora_A, lora_B = _low_rank_factors(
            weight - dequantized, layer.r[adapter_name], layer.scaling[adapter_name]
        )
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (A.detach().clone(), B.detach().clone())
        A.copy_(lora_A.to(A.dtype))
        B.copy_(lora_B.to(B.dtype))
        if callback is not None and not callback(peft_model, name):
            A.copy_(before[0])
            B.copy_(before[1])


register_method("LORA", LoraConfig, LoraModel)
