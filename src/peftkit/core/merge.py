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
