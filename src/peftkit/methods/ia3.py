"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
NeurIPS 2022 (arXiv:2205.05638). Learned vectors rescale activations elementwise; nothing else changes.
On an attention projection the vector scales the layer's *output*, on a feed-forward projection its
*input*::

    keys / values:   y = l ⊙ (W x + b)          l: (out,), initialised to ones
    feed-forward:    y = W (l ⊙ x) + b          l: (in,),  initialised to ones

    x ──► W_k ──► ⊙ l_k ──► K          h = act(W_1 x) ──► ⊙ l_ff ──► W_2 ──► y

A fresh adapter is the identity. Several active adapters multiply (``l = l_a ⊙ l_b``), as in HF PEFT,
so the layers compute the scaled forward directly (one base call, exact) instead of summing additive
deltas; :meth:`IA3Layer.adapter_delta` still gives the equivalent additive form for one adapter
(``(l - 1) ⊙ y`` on outputs, ``W ((l - 1) ⊙ x)`` on inputs). Merging scales the weight's output rows
(and the bias) or its input columns.

Which modules are targeted and which of them count as feed-forward defaults per architecture (HF PEFT's
tables below). Supported layers: ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``), ``nn.Conv2d``,
``nn.Conv3d``. Parameter names (``...k_proj.ia3_l``), vector shapes and the config JSON are HF PEFT's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.architectures import IA3_DEFAULT_FEEDFORWARD_MODULES, IA3_DEFAULT_TARGET_MODULES
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer, adapter_dtype, linear_fan_in_fan_out
from peftkit.core.registry import register_method
from peftkit.core.targeting import check_module_names, pattern_match
from peftkit.core.tuner import BaseTuner


@dataclass
class IA3Config(PeftConfig):
    """IA3 settings; field names, order and defaults are HF PEFT's ``IA3Config``.

    Args:
        target_modules: module names (list: exact or dotted suffix), a full-match regex, ``"all-linear"``,
            or ``None`` for the architecture's default (:data:`IA3_DEFAULT_TARGET_MODULES`).
        exclude_modules: modules to leave alone (same forms).
        feedforward_modules: which targeted modules scale their *input* (the others scale their output).
            A list entry marks every targeted module whose name ends with it (a plain suffix test, as in
            HF PEFT); a string is a full-match regex. With both as lists, each entry must be a
            ``target_modules`` entry or a suffix of one.
            ``None``: the architecture's default (:data:`IA3_DEFAULT_FEEDFORWARD_MODULES`); ``[]``: none.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``; detected automatically).
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter.
        init_ia3_weights: ``True`` starts every vector at ones (the identity); ``False`` draws them from
            N(0, 1) (not a no-op, for tests).

    Raises:
        ValueError: ``feedforward_modules`` names modules that ``target_modules`` does not, an empty
            ``target_modules`` list, or a non-boolean ``init_ia3_weights`` / ``fan_in_fan_out``.
        TypeError: a set or tuple where a list is expected.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    #: targeting reads this instead of LoRA's table when ``target_modules`` is ``None``
    default_target_modules: ClassVar[dict[str, list[str]]] = IA3_DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3
        super().__post_init__()

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            check_module_names(name, getattr(self, name), allow_empty=name != "target_modules")
        for name in ("init_ia3_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            # HF PEFT demands a subset; an entry that is a suffix of a target is accepted too, since HF
            # PEFT saves "all-linear" expanded into full names next to e.g. feedforward_modules=["down_proj"]
            extra = [
                m for m in self.feedforward_modules if not any(t.endswith(m) for t in self.target_modules)
            ]
            if extra:
                raise ValueError(
                    f"feedforward_modules {extra} are not in target_modules {self.target_modules}; every "
                    f"feed-forward module must also be a target. Add them to target_modules (spelled the "
                    f"same way) or remove them from feedforward_modules."
                )


def is_feedforward_module(module_name: str, feedforward_modules: list[str] | str) -> bool:
    """HF PEFT's rule: a regex must match the full name; a list entry matches as a plain suffix (so
    ``"output.dense"`` marks both ``attention.output.dense`` and the feed-forward ``output.dense``)."""
    if isinstance(feedforward_modules, str):
        return pattern_match(feedforward_modules, module_name) is not None
    return any(module_name.endswith(m) for m in feedforward_modules)


class IA3Layer(AdapterLayer):
    """The vectors of each adapter and, per adapter, whether it scales this layer's input or output.

    Subclasses give the vector shape (HF PEFT's: ``(out, 1)`` / ``(1, in)`` for linear layers,
    ``(1, C, 1, 1)`` for convolutions), where the feature axis of an activation is, and the vector as a
    factor of the base weight.
    """

    adapter_param_containers = ("ia3_l",)
    adapter_settings = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.in_features = self.out_features = 0  # set by the subclass

    def vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool) -> None:
        """Add adapter ``adapter_name``: a vector over the inputs (feed-forward) or the outputs."""
        weight = self.get_base_layer().weight
        # drawn even when unused and rounded through the base dtype, so a seed gives HF PEFT's vectors
        rounding = weight.dtype if weight.dtype.is_floating_point else torch.float32  # quantized: ints
        vector = torch.randn(self.vector_shape(is_feedforward)).to(rounding)
        if init_ia3_weights:
            vector = torch.ones_like(vector)
        self.ia3_l[adapter_name] = nn.Parameter(
            vector.to(device=weight.device, dtype=adapter_dtype(weight.dtype))
        )
        self.is_feedforward[adapter_name] = is_feedforward

    # ---------------------------------------------------------------------------------- forward
    def _broadcastable(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        """``scale`` of shape ``(features,)`` or ``(batch, features)`` (one row per sample) viewed to
        broadcast against an activation with ``ndim`` dimensions."""
        raise NotImplementedError

    def _combined_scales(self, names: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The products of the input-side and of the output-side vectors of ``names`` (flat)."""
        scales: dict[bool, torch.Tensor | None] = {True: None, False: None}
        for name in names:
            if name not in self.ia3_l:
                continue
            ff = self.is_feedforward[name]
            vector = self.ia3_l[name].flatten()
            scales[ff] = vector if scales[ff] is None else scales[ff] * vector
        return scales[True], scales[False]

    def _row_scales(self, names: Sequence[str], feedforward: bool) -> torch.Tensor | None:
        """``(batch, features)``: row i scaled by the vector of adapter ``names[i]`` (ones for
        ``"__base__"`` and adapters this layer lacks), or ``None`` when no row needs scaling."""
        vectors = {
            n: self.ia3_l[n].flatten()
            for n in dict.fromkeys(names)
            if n in self.ia3_l and self.is_feedforward[n] == feedforward
        }
        if not vectors:
            return None
        like = next(iter(vectors.values()))
        ones = torch.ones_like(like)
        return torch.stack([vectors.get(n, ones) for n in names])

    def _scaled_forward(
        self,
        x: torch.Tensor,
        in_scale: torch.Tensor | None,
        out_scale: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``out_scale ⊙ base(in_scale ⊙ x)`` in HF PEFT's dtypes (vectors in their own dtype, the
        activations cast back to the input's / base output's dtype)."""
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * self._broadcastable(in_scale, x.ndim)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * self._broadcastable(out_scale, result.ndim)).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or self.batch_adapter_names is not None:
            return super().forward(x, *args, **kwargs)  # base output, or _mixed_batch_forward below
        in_scale, out_scale = self._combined_scales(self.active_adapters)
        return self._scaled_forward(x, in_scale, out_scale, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.rows_adapter_names(x)
        in_scale, out_scale = self._row_scales(names, True), self._row_scales(names, False)
        return self._scaled_forward(x, in_scale, out_scale, *args, **kwargs)

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        """The additive form of one adapter: ``(l - 1) ⊙ y`` or ``W ((l - 1) ⊙ x)`` (no bias)."""
        vector = self.ia3_l[adapter_name].flatten()
        if not self.is_feedforward[adapter_name]:
            return base_output * self._broadcastable(vector - 1, base_output.ndim)
        weight = self.base_weight()
        shifted = x.to(vector.dtype) * self._broadcastable(vector - 1, x.ndim)
        return self._weight_only_forward(shifted.to(weight.dtype))

    def _weight_only_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer without its bias."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- merging
    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to multiply the base weight: along its output rows or input columns."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        factor = self.weight_factor(adapter_name).detach()
        if (factor == 0).any():
            warnings.warn(
                f"IA3 adapter {adapter_name!r} has zero entries; unmerging cannot restore the weights they "
                f"multiply (they stay zero).",
                stacklevel=4,
            )
        return (weight * factor).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        factor = self.weight_factor(adapter_name).detach()
        return (weight / torch.where(factor == 0, torch.ones_like(factor), factor)).to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.is_feedforward[adapter_name]:
            return bias  # W (l ⊙ x) + b: the bias is not scaled
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape)
        return (bias * vector).to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.is_feedforward[adapter_name]:
            return bias
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape)
        return (bias / torch.where(vector == 0, torch.ones_like(vector), vector)).to(bias.dtype)


class Linear(IA3Layer):
    """IA3 on ``nn.Linear`` or on GPT-2's ``Conv1D`` (weight stored ``(in, out)``: ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        base = self.get_base_layer()
        if self.base_is_quantized:  # a 4-bit weight is stored packed: its shape is not (out, in)
            self.out_features, self.in_features = base.out_features, base.in_features
        else:
            self.out_features, self.in_features = self._weight_out_in().shape

    def _weight_out_in(self) -> torch.Tensor:
        weight = self.base_weight()  # dequantized for a quantized base
        return weight.T if self.fan_in_fan_out else weight

    def vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if is_feedforward else (self.out_features, 1)

    def _broadcastable(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        if scale.dim() == 1:
            return scale  # features are the last axis
        return scale.view(scale.shape[0], *([1] * (ndim - 2)), scale.shape[1])  # (B, 1, ..., F)

    def _weight_only_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_out_in())

    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]  # (out, 1) scales rows, (1, in) columns of the (out, in) weight
        return vector.T if self.fan_in_fan_out else vector


class Conv(IA3Layer):
    """IA3 on ``nn.Conv2d`` / ``nn.Conv3d``: one factor per output channel, or per input channel."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels

    def vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        spatial = (1,) * (self.get_base_layer().weight.dim() - 2)
        return (1, self.in_features if is_feedforward else self.out_features, *spatial)

    def _broadcastable(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        spatial = self.get_base_layer().weight.dim() - 2
        return scale.view(*scale.shape, *([1] * spatial))  # (C, 1, 1) or (B, C, 1, 1)

    def _weight_only_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return base._conv_forward(x, base.weight, None)

    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]  # (1, C, 1, 1)
        if not self.is_feedforward[adapter_name]:
            return vector.transpose(0, 1)  # (C_out, 1, 1, 1)
        base = self.get_base_layer()
        if base.groups == 1:
            return vector  # (1, C_in, 1, 1)
        # grouped: the weight is (C_out, C_in / groups, ...); output channel o sees input group o // (C_out / g)
        groups, spatial = base.groups, vector.shape[2:]
        in_per_group, out_per_group = base.in_channels // groups, base.out_channels // groups
        grouped = vector.reshape(groups, 1, in_per_group, *spatial)
        grouped = grouped.expand(groups, out_per_group, in_per_group, *spatial)
        return grouped.reshape(base.out_channels, in_per_group, *spatial)


class IA3Model(BaseTuner):
    """Injects IA3 layers; decides per module whether its vector scales the input or the output."""

    layer_cls = IA3Layer
    prefix = "ia3_"
    supports_quantized_layers = True  # bitsandbytes Linear4bit / Linear8bitLt: merging dequantizes

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, IA3Config)
        is_ff = is_feedforward_module(target_name, self.feedforward_modules(config))
        if isinstance(target, IA3Layer):
            target.update_layer(adapter_name, is_ff, config.init_ia3_weights)
            return None
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        new_module = _new_ia3_layer(base, target, target_name, config)
        new_module.update_layer(adapter_name, is_ff, config.init_ia3_weights)
        return new_module

    def feedforward_modules(self, config: IA3Config) -> list[str] | str:
        """The config's ``feedforward_modules``, or the architecture's default when it is ``None``."""
        if config.feedforward_modules is not None:
            return config.feedforward_modules
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in IA3_DEFAULT_FEEDFORWARD_MODULES:
            raise ValueError(
                f"feedforward_modules is not set and peftkit has no default for model_type {model_type!r}. "
                f"Pass feedforward_modules explicitly: the targeted modules whose input IA3 should scale "
                f"(e.g. ['down_proj']), or [] for none."
            )
        return list(IA3_DEFAULT_FEEDFORWARD_MODULES[model_type])


def _new_ia3_layer(base: nn.Module, target: nn.Module, target_name: str, config: IA3Config) -> IA3Layer:
    fan_in_fan_out = linear_fan_in_fan_out(base, target_name, config.fan_in_fan_out)
    if fan_in_fan_out is not None:
        return Linear(target, fan_in_fan_out=fan_in_fan_out)
    if isinstance(base, (nn.Conv2d, nn.Conv3d)):
        return Conv(target)
    raise ValueError(
        f"IA3 cannot wrap {target_name} ({type(base).__name__}); supported layers are torch.nn.Linear, "
        f"transformers Conv1D, torch.nn.Conv2d and torch.nn.Conv3d. Narrow target_modules."
    )


register_method("IA3", IA3Config, IA3Model)
