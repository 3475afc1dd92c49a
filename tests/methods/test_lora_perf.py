"""The performance work on LoRA keeps the numbers: the fused linear kernel, batched mixed-adapter
forwards and DoRA's cached norms (hot-swapping: tests/core/test_hotswap.py), each against an independent reference (HF PEFT's
numbers, autograd's numerical gradients, per-adapter forward passes, or the formula)."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_gpt2, tiny_llama

import peftkit
from peftkit.methods.lora import Linear as LoraLinear
from peftkit.methods.lora_ops import DoraLinearFunction, LoraLinearFunction

IDS = torch.randint(0, VOCAB_SIZE, (3, 9), generator=torch.Generator().manual_seed(5))


def _randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every LoRA factor with seeded values, in name order (the same values in both libraries)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------- fused linear kernel
@pytest.mark.parametrize(
    ("builder", "config_kwargs"),
    [
        (tiny_llama, {"target_modules": "all-linear"}),
        (tiny_llama, {"target_modules": "all-linear", "lora_dropout": 0.2}),
        (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "lora_only"}),
    ],
    ids=["llama", "llama-dropout", "gpt2-conv1d-bias"],
)
def test_training_step_equals_hf_peft(builder, config_kwargs) -> None:
    """Loss and every gradient of a training step equal HF PEFT's (same weights, same dropout draws)."""
    _assert_step_equals_hf_peft(builder, dict(r=8, lora_alpha=16, **config_kwargs), grad_rtol=1e-5)


def _assert_step_equals_hf_peft(builder, config_kwargs: dict, grad_rtol: float) -> None:
    results = []
    for library in (peftkit, peft):
        model = library.get_peft_model(builder(), library.LoraConfig(**config_kwargs))
        _randomize_lora(model)
        model.train()
        torch.manual_seed(7)  # the same dropout masks in both libraries (same modules, same order)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        results.append((loss.detach(), _lora_grads(model)))
    (ours_loss, ours), (ref_loss, ref) = results
    assert ours.keys() == ref.keys() and len(ours) > 0
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=grad_rtol, atol=1e-6, msg=name)


@pytest.mark.parametrize("weight_in_out", [False, True])
@pytest.mark.parametrize("separate_dropout", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_kernel_gradients_match_numerical(weight_in_out, separate_dropout, train_base) -> None:
    """torch.autograd.gradcheck (finite differences, float64) for every input the kernel differentiates."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x = tensor(2, 3, 5)
    dropped = tensor(2, 3, 5) if separate_dropout else None
    weight = tensor(5, 4, grad=train_base) if weight_in_out else tensor(4, 5, grad=train_base)
    bias = tensor(4, grad=train_base)
    lora_A, lora_B = tensor(3, 5), tensor(4, 3)

    def function(*args: torch.Tensor) -> torch.Tensor:
        x_, dropped_, weight_, bias_, A_, B_ = args
        return LoraLinearFunction.apply(x_, dropped_, weight_, bias_, A_, B_, 1.7, weight_in_out)

    assert torch.autograd.gradcheck(function, (x, dropped, weight, bias, lora_A, lora_B))
    # and the forward is the formula: x W^T + b + s (x_A A^T) B^T
    with torch.no_grad():
        w = weight.T if weight_in_out else weight
        adapter_in = x if dropped is None else dropped
        expected = x @ w.T + bias + 1.7 * (adapter_in @ lora_A.T) @ lora_B.T
        torch.testing.assert_close(function(x, dropped, weight, bias, lora_A, lora_B), expected)


@pytest.mark.parametrize("weight_in_out", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_dora_kernel_gradients_match_numerical(weight_in_out, train_base) -> None:
    """gradcheck of the DoRA kernel; the norm is an input without gradient (a constant, paper §4.3)."""
    generator = torch.Generator().manual_seed(1)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x = tensor(2, 3, 5)
    weight = tensor(5, 4, grad=train_base) if weight_in_out else tensor(4, 5, grad=train_base)
    bias, lora_A, lora_B, magnitude = tensor(4, grad=train_base), tensor(3, 5), tensor(4, 3), tensor(4)
    norm = tensor(4, grad=False).abs() + 0.5

    def function(x_, weight_, bias_, A_, B_, m_):
        return DoraLinearFunction.apply(x_, weight_, bias_, A_, B_, 0.7, weight_in_out, m_, norm)

    assert torch.autograd.gradcheck(function, (x, weight, bias, lora_A, lora_B, magnitude))
    with torch.no_grad():  # the formula: m / n ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b
        w = weight.T if weight_in_out else weight
        expected = magnitude / norm * (x @ w.T + 0.7 * (x @ lora_A.T) @ lora_B.T) + bias
        torch.testing.assert_close(function(x, weight, bias, lora_A, lora_B, magnitude), expected)


def test_fused_kernel_only_where_it_is_exact() -> None:
    """The fused path serves one adapter; DoRA with active dropout, several active adapters, a merged adapter, forward
    hooks on the base layer and mixed dtypes take the generic path (whose outputs the other tests check)."""
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    x = torch.randn(2, 3, 32)
    assert layer._fused_adapter(x, (), {}) == "default"
    assert layer._fused_adapter(x.double(), (), {}) is None
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert layer._fused_adapter(x, (), {}) is None
    handle.remove()
    model.add_adapter(
        "dora", peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, lora_dropout=0.1)
    )
    model.set_adapter("dora")
    layer.train()
    assert layer._fused_adapter(x, (), {}) is None  # DoRA with dropout: both terms see the dropped input
    layer.eval()
    assert layer._fused_adapter(x, (), {}) == "dora"  # without active dropout DoRA has its own kernel
    model.base_model.set_adapter(["default", "dora"])
    assert layer._fused_adapter(x, (), {}) is None
    model.set_adapter("default")
    model.merge_adapter()
    assert layer._fused_adapter(x, (), {}) is None


# ------------------------------------------------------------------------------------ mixed batches
def _many_adapters() -> peftkit.PeftModel:
    """Adapters with different ranks, scalings (rsLoRA included) and targets, all non-zero."""
    model = peftkit.get_peft_model(
        tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", peftkit.LoraConfig(r=8, lora_alpha=3, target_modules=["q_proj", "o_proj"]))
    model.add_adapter(
        "c", peftkit.LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules="all-linear")
    )
    _randomize_lora(model)
    return model.eval()


def _per_row_reference(model: peftkit.PeftModel, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=IDS[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=IDS[i : i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("names", [["a", "b", "c"], ["c", "__base__", "b"], ["b", "b", "b"]])
def test_mixed_batch_equals_per_adapter_passes(names) -> None:
    model = _many_adapters()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
        torch.testing.assert_close(mixed, _per_row_reference(model, names), rtol=1e-5, atol=1e-5)


def test_mixed_batch_matches_hf_peft() -> None:
    """The same adapters in HF PEFT give the same mixed-batch logits."""
    outputs = []
    names = ["x", "__base__", "y"]
    for library in (peftkit, peft):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=4, lora_alpha=8), adapter_name="x")
        model.add_adapter("y", library.LoraConfig(r=6, lora_alpha=2, target_modules=["v_proj", "up_proj"]))
        _randomize_lora(model)
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=IDS, adapter_names=names).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_mixed_batch_training_gradients() -> None:
    """Gradients of a mixed batch equal the sum of the per-adapter passes' gradients."""
    names = ["a", "b", "c"]
    model = _many_adapters()
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)  # every adapter trains (set_adapter would freeze the others)
    logits = model(input_ids=IDS, adapter_names=names).logits
    logits.square().mean(dim=(1, 2)).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(names):
        model.base_model.set_adapter(name)
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
        model(input_ids=IDS[i : i + 1]).logits.square().mean().backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and len(mixed) > 0
    for name in mixed:
        torch.testing.assert_close(mixed[name], separate[name], rtol=1e-5, atol=1e-7, msg=name)


def test_mixed_batch_sees_new_weights() -> None:
    """The stacked factors kept between serving calls follow in-place updates, deletions and additions."""
    model = _many_adapters()
    names = ["a", "b", "c"]
    with torch.no_grad():
        model(input_ids=IDS, adapter_names=names)  # fills the cache
        _randomize_lora(model, seed=3)  # in place
        torch.testing.assert_close(
            model(input_ids=IDS, adapter_names=names).logits, _per_row_reference(model, names)
        )
        model.delete_adapter("b")
        model.add_adapter("b", peftkit.LoraConfig(r=3, init_lora_weights=False, target_modules=["k_proj"]))
        torch.testing.assert_close(
            model(input_ids=IDS, adapter_names=names).logits, _per_row_reference(model, names)
        )


# --------------------------------------------------------------------------------------------- DoRA
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_dora_row_norms_formula(builder) -> None:
    """The expanded norm equals ‖W + s·BA‖ computed on the matrix, also after the base weight changes."""
    target = ["q_proj"] if builder is tiny_llama else ["c_attn"]
    model = peftkit.get_peft_model(builder(), peftkit.LoraConfig(r=4, target_modules=target, use_dora=True))
    _randomize_lora(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))

    def direct() -> torch.Tensor:
        weight = layer.get_base_layer().weight.detach().double()
        delta = layer.delta_weight("default").detach().double()
        return torch.linalg.norm(weight + delta, dim=0 if layer.fan_in_fan_out else 1)

    torch.testing.assert_close(layer._dora_row_norms("default").double(), direct(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(2.0)  # in place: the cached ‖W‖² must not be reused
    torch.testing.assert_close(layer._dora_row_norms("default").double(), direct(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["fused-kernel", "generic-with-dropout"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_dora_training_step_equals_hf_peft(builder, dropout) -> None:
    target = "all-linear" if builder is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    config = dict(r=4, lora_alpha=8, target_modules=target, use_dora=True, lora_dropout=dropout)
    _assert_step_equals_hf_peft(builder, config, grad_rtol=1e-4)
