"""AdapterFusion: attention over the outputs of several trained bottleneck adapters.

Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", EACL 2021
(arXiv:2005.00247). Task adapters are trained separately (``BottleneckConfig``) and kept frozen; a fusion
layer at every module that carries all of them learns, per token, how much of each to use. With ``h`` the
sub-layer's output and ``z_i = h + adapter_i(h)`` the output of fused adapter ``i``::

    q = W_q h + b_q          k_i = W_k z_i + b_k          v_i = W_v z_i + b_v
    α = softmax_i(q · k_i / T)                           y = Σ_i α_i v_i

    h ──► adapter_1 ──► z_1 ─┐
    ├───► adapter_2 ──► z_2 ─┼─► keys, values ─► softmax(q · k) ─► Σ α v ─► y (replaces h + adapter(h))
    └──────────────── query ─┘

``W_v`` starts as the identity (and ``b_v`` at zero), so at creation ``y`` is a convex combination of the
adapters' outputs (with equal adapters: exactly their output); ``W_q``, ``W_k`` start from N(0, 0.02²).
``model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))`` adds it and
``set_adapter("fusion")`` trains only the fusion (and ``modules_to_save``) parameters; the fused adapters stay
frozen. ``model.fusion_weights("fusion")`` gives each layer's last ``α``. A saved fusion holds only its own
tensors; its config names its adapters and records a fingerprint of each. ``PeftModel.from_pretrained(base,
"out/fusion")`` also loads the fused adapters that ``save_pretrained`` wrote beside it (checked against the
fingerprints); without them, loading is an error that says what to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.methods.bottleneck import BottleneckModel


@dataclass
class AdapterFusionConfig(PeftConfig):
    """AdapterFusion settings.

    Args:
        adapters: the names of the (bottleneck) adapters to fuse, at least two; they must be in the model.
        temperature: ``T`` in ``softmax(q · k / T)``.
        modules_to_save: modules (e.g. a new head) trained in full and saved with the fusion.
        adapter_fingerprints: written by ``save_pretrained``: per fused adapter, the SHA-256 of its saved
            tensors (:func:`peftkit.core.checkpoint.adapter_fingerprint`). Loading the fusion together with the
            adapters saved beside it checks them, so a stale or different adapter folder is an error.

    Raises:
        ValueError: fewer than two distinct adapter names, or a non-positive temperature.
    """

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0
    modules_to_save: list[str] | None = None
    adapter_fingerprints: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTER_FUSION
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.adapters, list) or not all(isinstance(a, str) for a in self.adapters):
            raise ValueError(f"adapters={self.adapters!r} must be a list of adapter names.")
        if len(set(self.adapters)) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(
                f"adapters={self.adapters!r} must name at least two different adapters, once each."
            )
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be a positive number.")
        prints = self.adapter_fingerprints
        if prints is not None and (
            not isinstance(prints, dict) or not all(isinstance(v, str) for v in prints.values())
        ):
            raise ValueError(
                f"adapter_fingerprints={prints!r} must map adapter names to strings (or be None)."
            )


class AdapterFusion(nn.Module):
    """Query, key and value projections of one fusion layer."""

    def __init__(self, features: int, temperature: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.query = nn.Linear(features, features, device=device, dtype=dtype)
        self.key = nn.Linear(features, features, device=device, dtype=dtype)
        self.value = nn.Linear(features, features, device=device, dtype=dtype)
        self.temperature = float(temperature)
        with torch.no_grad():
            for linear in (self.query, self.key):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            self.value.weight.copy_(torch.eye(features, device=device, dtype=dtype))
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: (..., d) the sub-layer output; ``outputs``: (..., N, d) the adapters' outputs. Returns the
        fused output (..., d) and the weights α (..., N)."""
        query = self.query(h).unsqueeze(-1)  # (..., d, 1)
        keys = self.key(outputs)  # (..., N, d)
        weights = ((keys @ query).squeeze(-1) / self.temperature).softmax(dim=-1)  # (..., N)
        fused = (weights.unsqueeze(-1) * self.value(outputs)).sum(dim=-2)  # (..., d)
        return fused, weights


# A fusion lives in the same layers as the adapters it fuses, so it shares their tuner.
register_method("ADAPTER_FUSION", AdapterFusionConfig, BottleneckModel)
