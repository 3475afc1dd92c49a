"""What a failed call must leave alone: a model's snapshot (module types, train/eval mode, every
parameter and buffer, ``requires_grad``) and the check that nothing in it changed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Everything about a model that a failed call must leave alone."""
    return {
        "types": {name: type(module) for name, module in model.named_modules()},
        "training": {name: module.training for name, module in model.named_modules()},
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
    }


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (NaN equals NaN), same shape and dtype."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    return (a.double().nan_to_num() - b.double().nan_to_num()).abs().max().item()


def assert_unchanged(model: nn.Module, before: dict[str, dict[str, Any]]) -> None:
    after = snapshot(model)
    added = sorted(set(after["types"]) - set(before["types"]))
    removed = sorted(set(before["types"]) - set(after["types"]))
    assert not added and not removed, f"modules added {added[:5]}, removed {removed[:5]}"
    retyped = [n for n, t in before["types"].items() if after["types"][n] is not t]
    assert not retyped, f"module types changed: {retyped[:5]}"
    assert after["training"] == before["training"], "train/eval mode changed"
    assert after["params"].keys() == before["params"].keys(), "the set of parameters changed"
    flipped = [n for n, g in before["requires_grad"].items() if after["requires_grad"][n] != g]
    assert not flipped, f"requires_grad changed: {flipped[:5]}"
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys(), f"the set of {kind} changed"
        changed = {
            name: _max_abs_diff(t, after[kind][name])
            for name, t in before[kind].items()
            if not _same_tensor(t, after[kind][name])
        }
        assert not changed, f"{kind} changed (name: max |difference|): {changed}"


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every trainable parameter off its initial value by seeded noise of ``scale`` (so that zero
    ``B`` factors and unit magnitudes do not make an adapter trivial in a test)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def assert_mixed_batch_equals_each_adapter(model: nn.Module, ids: torch.Tensor, names: list[str]) -> None:
    """A mixed-adapter batch (``adapter_names=names``, one per row of ``ids``; ``"__base__"`` for none) gives
    each row what the model gives it with that adapter active alone (or with the adapters disabled)."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
