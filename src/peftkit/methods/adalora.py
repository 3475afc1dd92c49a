"""AdaLoRA: adaptive budget allocation of LoRA ranks.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv:2303.10512). Each adapted weight gets an update in SVD form, and ranks move during training from
where they matter little to where they matter most::

    y = W x + s / r₀ · P Λ Q x      Q = lora_A: r × in,  Λ = lora_E: r × 1,  P = lora_B: out × r
                                    s = lora_alpha, r₀ = init_r (HF PEFT's ``ranknum``)

    x ──► W ─────────────────────────┐
    │                               (+)──► y
    └──► Q ──► ⊙Λ ──► P ──► ·s/r₀ ───┘

* Importance of a triplet ``i`` (paper eq. 7-9): per entry ``I = |w · ∂L/∂w|``, smoothed
  ``Ī ← β₁ Ī + (1-β₁) I`` and its uncertainty ``Ū ← β₂ Ū + (1-β₂) |I - Ī|``; score ``s = Ī · Ū``;
  ``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.
* Budget (eq. 12), ``b₀ = Σ init_r``, ``b_T = target_r × layers``: ``b₀`` up to step ``tinit``, then
  ``b_T + (b₀ - b_T) (1 - (t - tinit) / (T - tfinal - tinit))³`` (every ``deltaT`` steps), and ``b_T``
  from step ``T - tfinal`` on (``T = total_step``). The lowest-scoring triplets get ``Λ_i = 0``.
* Orthogonality (eq. 4): ``R = mean over P, Q of ‖PᵀP - I‖_F`` / ``‖QQᵀ - I‖_F``, added to the model's loss
  as ``orth_reg_weight × R`` whenever the model returns one (labels given), as HF PEFT does.

Call ``model.base_model.update_and_allocate(global_step)`` after each ``optimizer.step()`` and before
``zero_grad()`` (``peftkit train`` does, through the generic ``on_step_end`` hook). After ``T - tfinal`` the
allocation is fixed; it is saved as ``rank_pattern`` in ``adapter_config.json`` (one bool per initial rank,
keyed ``<module>.lora_E``) and the saved tensors keep only the surviving ranks, exactly as HF PEFT does.
Supported layers: ``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes 4-bit / 8-bit linears, ``nn.Conv2d``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import SAVED_PREFIX, AdapterLayer, adapter_dtype
from peftkit.core.registry import register_method
from peftkit.core.tuner import BaseTuner
from peftkit.methods.lora import LoraConfig, bias_parameters, check_one_bias_adapter


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings: HF PEFT's ``AdaLoraConfig`` (LoRA's fields plus the schedule below).

    Args:
        target_r: the average rank per layer at the end (the budget is ``target_r × layers``).
        init_r: the rank every layer starts with (``r`` is not used, as in HF PEFT).
        tinit: steps of warm-up before ranks are cut.
        tfinal: steps at the end with the final allocation fixed.
        deltaT: steps between two allocations in the cutting phase.
        beta1 / beta2: the EMA factors of the importance and of its uncertainty, in ``(0, 1)``.
        orth_reg_weight: weight of the orthogonality regulariser (``>= 0``).
        total_step: the number of training steps (required, ``> 0``).
        rank_pattern: the allocation of a trained adapter (written at save time; ``None`` before).

    Raises:
        ValueError: no ``total_step``, a schedule with no cutting phase (``tinit >= total_step -
            tfinal``), ``use_dora``, betas outside ``(0, 1)``, a negative ``orth_reg_weight``, or
            ``target_r`` / ``init_r`` / ``deltaT`` not positive.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADALORA

    def validate(self) -> None:
        pattern, self.rank_pattern = self.rank_pattern, {}  # LoRA's check reads ints; ours are bool lists
        try:
            super().validate()
        finally:
            self.rank_pattern = pattern
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA (use_dora=True); use LoraConfig for DoRA.")
        for name in ("target_r", "init_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(  # HF PEFT's words, then why
                "AdaLoRA does not work when `total_step` is None, supply a value > 0. (It is the number of "
                "training steps, which schedules the rank budget.)"
            )
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} must be >= 0.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"The supplied schedule values don't allow for a budgeting phase: tinit={self.tinit}, "
                f"tfinal={self.tfinal} and total_step={self.total_step} leave no steps to cut ranks in; decrease "
                f"tinit / tfinal or increase total_step."
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1).")
        if self.target_parameters:
            raise ValueError("AdaLoRA does not support target_parameters; use LoraConfig for parameters.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0.")
        if self.r != 8:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored. If you intended to set the initial "
                "rank, use `init_r` instead.",
                stacklevel=3,
            )


class AdaLoraLayer(AdapterLayer):
    """SVD-form update ``P Λ Q`` on a linear layer, with HF PEFT's parameter names and shapes."""

    adapter_param_containers = ("lora_A", "lora_B", "lora_E", "lora_dropout")
    adapter_settings = ("r", "lora_alpha", "scaling", "ranknum")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if self.base_is_quantized:
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            out_features, in_features = base.weight.shape[::-1] if fan_in_fan_out else base.weight.shape
            self.in_features, self.out_features = in_features, out_features
        self._init_containers(fan_in_fan_out)

    def _init_containers(self, fan_in_fan_out: bool) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # r₀ + 1e-5 as a 0-d float32 tensor (HF PEFT's ``ranknum`` parameter, which is not saved)
        self.ranknum: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, r: int, config: AdaLoraConfig) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` (``init_r``, or fewer for a pruned checkpoint)."""
        weight = self.get_base_layer().weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = torch.tensor(float(config.init_r)) + 1e-5
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.factor_in_features).to(**kwargs))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1).to(**kwargs))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r).to(**kwargs))
        if config.init_lora_weights:  # Λ = 0: a new adapter changes nothing
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    @property
    def factor_in_features(self) -> int:
        """Columns of ``Q`` (``lora_A``): the base weight's input features."""
        return self.in_features

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        x = x.to(A.dtype)
        # HF PEFT's expression and order of operations, so both libraries agree to the bit
        dropped = self.lora_dropout[adapter_name](x)
        return (dropped @ (A * E).T @ B.T) * self.scaling[adapter_name] / self.ranknum[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s / r₀ · P (Λ ⊙ Q)`` in the base weight's layout."""
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = B @ (A * E) * self.scaling[adapter_name] / self.ranknum[adapter_name]
        return delta.T if self.fan_in_fan_out else delta


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA on ``nn.Conv2d`` (HF PEFT's ``SVDConv2d``): ``Q`` has ``in × kh × kw`` columns, and the update
    ``s / r₀ · P (Λ ⊙ Q)``, reshaped to the ``(out, in, kh, kw)`` kernel, is applied as a convolution with
    the base layer's stride, padding and dilation::

        x ──► W ⋆ x ─────────────────────────────┐
        └──► (s/r₀ · P(Λ⊙Q)).view(W.shape) ⋆ x ──(+)──► y
    """

    def __init__(self, base_layer: nn.Module) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, AdapterLayer) else base_layer
        if base.groups != 1:
            raise ValueError(f"AdaLoRA on grouped convolutions (groups={base.groups}) is not supported.")
        AdapterLayer.__init__(self, base_layer)  # in_features / out_features: the channels
        self._init_containers(fan_in_fan_out=False)

    @property
    def factor_in_features(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return self.in_features * kh * kw

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        A, base = self.lora_A[adapter_name], self.get_base_layer()
        # HF PEFT's order of operations: the kernel first, then one convolution
        kernel = self.delta_weight(adapter_name)
        dropped = self.lora_dropout[adapter_name](x.to(A.dtype))
        return base._conv_forward(dropped, kernel, None)  # the base's stride, padding (and mode), dilation

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = B @ (A * E) * self.scaling[adapter_name] / self.ranknum[adapter_name]
        return delta.reshape(self.get_base_layer().weight.shape)


class RankAllocator:
    """The importance EMAs and the budget schedule of one adapter (HF PEFT's ``RankAllocator``)."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLayer], adapter_name: str) -> None:
        self.config = config
        self.layers = layers  # module path -> layer holding the adapter, in model order
        self.adapter_name = adapter_name
        self.init_budget = sum(layer.r[adapter_name] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self.importance: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, cut now)`` at ``step`` (paper eq. 12)."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % c.deltaT == 0

    def _params(self, layer: AdaLoraLayer) -> dict[str, nn.Parameter]:
        name = self.adapter_name
        return {"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name], "lora_E": layer.lora_E[name]}

    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of the sensitivity ``|w · ∂L/∂w|`` and its uncertainty, per entry."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for kind, param in self._params(layer).items():
                if param.grad is None:
                    raise ValueError(
                        f"update_and_allocate needs the gradients of {path}.{kind}; call it after "
                        f"loss.backward() and optimizer.step(), before optimizer.zero_grad()."
                    )
                key = (path, kind)
                if key not in self.importance:
                    self.importance[key] = torch.zeros_like(param)
                    self.uncertainty[key] = torch.zeros_like(param)
                sensitivity = (param * param.grad).abs().detach()
                self.importance[key] = beta1 * self.importance[key] + (1 - beta1) * sensitivity
                self.uncertainty[key] = (
                    beta2 * self.uncertainty[key] + (1 - beta2) * (sensitivity - self.importance[key]).abs()
                )

    def _score(self, path: str, kind: str) -> torch.Tensor:
        return self.importance[(path, kind)] * self.uncertainty[(path, kind)]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero ``Λ`` of the lowest-scoring triplets so that ``budget`` remain; the kept ranks per layer."""
        triplet_scores = {}
        for path in self.layers:
            score_A = torch.mean(self._score(path, "lora_A"), dim=1, keepdim=True)  # (r, 1)
            score_B = torch.mean(self._score(path, "lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            score_AB = torch.cat([score_A, score_B], dim=1).sum(dim=1, keepdim=False)
            triplet_scores[path] = self._score(path, "lora_E").view(-1) + score_AB.view(-1)
        to_cut = self.init_budget - budget
        if to_cut <= 0:
            threshold = -float("inf")
        else:
            threshold = torch.kthvalue(torch.cat(list(triplet_scores.values())), k=to_cut)[0].item()
        pattern = {}
        for path, layer in self.layers.items():
            cut = triplet_scores[path] <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(cut.view(-1, 1), 0.0)
            pattern[path] = (~cut).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for path, layer in self.layers.items():
            E = layer.lora_E[self.adapter_name]
            keep = torch.tensor(pattern[path], dtype=torch.bool, device=E.device).view(-1, 1)
            E.masked_fill_(~keep, 0.0)


class AdaLoraModel(BaseTuner):
    """Injects AdaLoRA layers; owns the rank allocation (``update_and_allocate``) and the regulariser."""

    layer_cls = AdaLoraLayer
    prefix = "lora_"  # as HF PEFT (its AdaLoraModel is a LoraModel)
    supports_quantized_layers = True  # the update is added to the base output; merging dequantizes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # per adapter: the allocator (created at the first update) and the kept ranks (module path ->
        # one bool per initial rank), written into the saved config as ``rank_pattern``
        self.rank_allocators: dict[str, RankAllocator] = {}
        self.rank_patterns: dict[str, dict[str, list[bool]]] = {}
        super().__init__(*args, **kwargs)

    def check_new_adapter_config(self, config: PeftConfig) -> None:
        check_one_bias_adapter(self)

    def extra_adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return bias_parameters(self, adapter_name, AdaLoraLayer)  # LoRA's ``bias`` option, as in HF PEFT

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, AdaLoraConfig)
        r = config.init_r
        saved = _pattern_by_module(config.rank_pattern or {}, adapter_name)
        if target_name in saved:  # a checkpoint saved after allocation holds only the kept ranks
            r = sum(saved[target_name])
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, r, config)
            return None
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        from transformers.pytorch_utils import Conv1D

        if isinstance(base, Conv1D):
            layer = AdaLoraLayer(target, fan_in_fan_out=True)
        elif isinstance(base, nn.Linear):
            layer = AdaLoraLayer(target, fan_in_fan_out=False)
        elif isinstance(base, nn.Conv2d):
            layer = SVDConv2d(target)
        else:
            raise ValueError(
                f"AdaLoRA cannot wrap {target_name} ({type(base).__name__}); supported layers are "
                f"torch.nn.Linear (also bitsandbytes 4-bit / 8-bit), transformers Conv1D and torch.nn.Conv2d. "
                f"Narrow target_modules."
            )
        layer.update_layer(adapter_name, r, config)
        return layer

    # ------------------------------------------------------------------------------ training
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self._trainable_adapter(required=False)
        if isinstance(loss, torch.Tensor) and name is not None:
            weight = self.peft_config[name].orth_reg_weight
            outputs.loss = loss + weight * self.orthogonal_regularizer(name)
        return outputs

    def orthogonal_regularizer(self, adapter_name: str) -> torch.Tensor | float:
        """``mean over every P and Q of ‖PᵀP - I‖_F`` / ``‖QQᵀ - I‖_F`` (0 without layers)."""
        total: torch.Tensor | float = 0
        count = 0
        for _, layer in self._layers(adapter_name).items():
            for P_or_Q, covariance in (
                (layer.lora_A[adapter_name], lambda q: q @ q.T),
                (layer.lora_B[adapter_name], lambda p: p.T @ p),
            ):
                cov = covariance(P_or_Q)
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else 0

    def _layers(self, adapter_name: str) -> dict[str, AdaLoraLayer]:
        return {
            path: layer
            for path, layer in self.adapter_layers()
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.adapter_names
        }

    def _trainable_adapter(self, required: bool = True) -> str | None:
        names = [n for n in self.active_adapters if not self.peft_config[n].inference_mode]
        if len(names) == 1:
            return names[0]
        if required:
            raise ValueError(
                f"update_and_allocate allocates the ranks of one trainable adapter; the active trainable "
                f"adapters are {names}. Activate exactly one (set_adapter) or load it with is_trainable=True."
            )
        return None

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and cut ranks to the step's budget (HF PEFT's semantics).

        Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``: the scores use the
        gradients. Up to ``total_step - tfinal`` the scores are updated and, on allocation steps, the
        lowest triplets are masked; at ``total_step - tfinal`` the final allocation (``target_r`` per
        layer on average) is made and kept; after it, the kept pattern is re-applied (the optimizer would
        otherwise move the masked ``Λ`` entries again).
        """
        name = self._trainable_adapter()
        assert name is not None
        config = self.peft_config[name]
        assert isinstance(config, AdaLoraConfig) and config.total_step is not None
        if name not in self.rank_allocators:
            self.rank_allocators[name] = RankAllocator(config, self._layers(name), name)
        allocator = self.rank_allocators[name]
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            allocator.update_importance()
            budget, cut = allocator.budget(global_step)
            if cut:
                self.rank_patterns[name] = allocator.mask_to_budget(budget)
        elif global_step == final_step:
            self.rank_patterns[name] = allocator.mask_to_budget(allocator.target_budget)
            allocator.reset_importance()
        elif name in self.rank_patterns:
            allocator.apply_pattern(self.rank_patterns[name])

    def on_step_end(self, global_step: int) -> None:
        """The trainer's per-step hook: :meth:`update_and_allocate` for the trainable adapter."""
        if self._trainable_adapter(required=False) is not None:
            self.update_and_allocate(global_step)

    def rank_pattern(self, adapter_name: str = "default") -> dict[str, list[bool]] | None:
        """The current allocation in the saved spelling (``<module>.lora_E`` -> kept ranks), or ``None``."""
        pattern = self.rank_patterns.get(adapter_name)
        if pattern is None:
            return self.peft_config[adapter_name].rank_pattern  # type: ignore[attr-defined]
        return {f"{path}.lora_E": kept for path, kept in pattern.items()}

    # ---------------------------------------------------------------------------- checkpoints
    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        fields = super().saved_config_fields(adapter_name)
        if adapter_name in self.rank_patterns:
            fields["rank_pattern"] = self.rank_pattern(adapter_name)
        return fields

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors with the cut ranks left out (HF PEFT's ``resize_state_dict_by_rank_pattern``)."""
        tensors = super().adapter_state_dict(adapter_name)
        pattern = _pattern_by_module(self.rank_pattern(adapter_name) or {}, adapter_name)
        for path, kept in pattern.items():
            keep = torch.tensor(kept, dtype=torch.bool)
            for kind, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{SAVED_PREFIX}{path}.{kind}"
                if key in tensors and tensors[key].shape[dim] != int(keep.sum()):
                    tensor = tensors[key]
                    tensors[key] = (
                        tensor[keep.to(tensor.device)] if dim == 0 else tensor[:, keep.to(tensor.device)]
                    )
        return tensors

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AdaLoRA adapters cannot be combined with add_weighted_adapter; use LoRA.")


def _pattern_by_module(rank_pattern: dict[str, Any], adapter_name: str) -> dict[str, list[bool]]:
    """``rank_pattern`` keyed by module path: HF PEFT writes ``<module>.lora_E`` (in memory
    ``<module>.lora_E.<adapter>``)."""
    by_module = {}
    for key, kept in rank_pattern.items():
        path = key.removesuffix(f".{adapter_name}").removesuffix(".lora_E")
        by_module[path] = [bool(k) for k in (kept.view(-1).tolist() if torch.is_tensor(kept) else kept)]
    return by_module


register_method("ADALORA", AdaLoraConfig, AdaLoraModel)
