"""Merge algebra for low-rank updates ``ΔW = B A`` (A: r × in, B: out × r).

These functions combine several adapters' factors into one adapter; they know nothing of any method,
so every low-rank method can reuse them. ``coefficients`` already include each adapter's own scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B)


def combine_cat(factors: Sequence[Factors], coefficients: Sequence[float]) -> Factors:
    """Stack the factors: ``[c₁A₁; c₂A₂; …]`` and ``[B₁ B₂ …]``, so ``B A = Σ cᵢ Bᵢ Aᵢ`` exactly
    (rank ``Σ rᵢ``)."""
    A = torch.cat([c * A for (A, _), c in zip(factors, coefficients)], dim=0)
    B = torch.cat([B for _, B in factors], dim=1)
    return A, B


def combine_linear(factors: Sequence[Factors], coefficients: Sequence[float]) -> Factors:
    """Average the factors (HF PEFT's ``"linear"``): ``A = Σ sign(cᵢ)√|cᵢ| Aᵢ``, ``B = Σ √|cᵢ| Bᵢ``.

    This keeps the rank but is not ``Σ cᵢ Bᵢ Aᵢ``: cross terms ``Bᵢ Aⱼ`` appear. Ranks must agree.
    """
    A = sum(math.copysign(math.sqrt(abs(c)), c) * A for (A, _), c in zip(factors, coefficients))
    B = sum(math.sqrt(abs(c)) * B for (_, B), c in zip(factors, coefficients))
    return A, B  # type: ignore[return-value]


def combine_svd(
    deltas: Sequence[torch.Tensor], coefficients: Sequence[float], rank: int, clamp: float | None = None
) -> Factors:
    """The best rank-``rank`` approximation (Eckart-Young) of ``Σ cᵢ ΔWᵢ``: ``B = U_r S_r``, ``A = Vh_r``.

    Args:
        clamp: if set, clip the entries of ``A`` and ``B`` to this quantile of their absolute values.
    """
    delta = sum(c * d.to(torch.float32) for d, c in zip(deltas, coefficients))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # type: ignore[arg-type]
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


# ---------------------------------------------------------------------------- sparsifying merges
# TIES (Yadav et al. 2023, arXiv:2306.01708): keep each task tensor's largest entries, elect one sign per
# entry across tasks, and average only the entries that agree with it. DARE (Yu et al. 2023,
# arXiv:2311.03099): keep a random fraction ``density`` of each task tensor's entries, scaled by
# ``1 / density``. The functions below apply to any stack of same-shaped tensors (factors or ΔW).
SPARSIFYING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density · numel)`` entries of largest magnitude (``density >= 1``: all kept)."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def prune_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability ``density`` (torch's global generator) and divide by ``density``,
    so the expectation is unchanged (``density >= 1``: all kept, no random numbers drawn)."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def elected_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, whether each task agrees with the elected sign: the sign of the entries' sum
    (``"total"``) or of the count of positive minus negative entries (``"frequency"``); ties elect +."""
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={method!r}; use 'total' or 'frequency'.")
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def combine_tensors(
    kind: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One tensor from same-shaped task tensors: ``"linear"`` (``Σ wᵢ tᵢ``), ``"magnitude_prune"`` and
    ``"dare_linear"`` (the same after pruning each ``tᵢ``), ``"ties"`` and ``"dare_ties"`` (after pruning,
    ``Σ wᵢ tᵢ`` over the tasks that agree with the elected sign, divided by their number)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [prune_at_random(t, density) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"Unknown combination {kind!r}.")
    stacked = torch.stack(list(tensors), dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *(1,) * (stacked.dim() - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agree = elected_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
