"""DoRA on ``nn.Embedding`` and ``nn.Conv2d``: against the formula and against HF PEFT.

DoRA (Liu et al., arXiv:2402.09353) rescales the LoRA-updated weight per output feature::

    W' = m · (W + ΔW) / ‖W + ΔW‖        ΔW = s · BA

* Conv2d: one magnitude per output channel, the norm over ``in × kh × kw``; ``m`` is stored ``(1, out, 1, 1)``.
* Embedding: one magnitude per embedding dimension, the norm of each column of the ``(vocab, dim)`` table.

Models: a plain torch module with an embedding and three convolutions (3×3 with bias, 1×1, strided
3×3 without bias), a tiny transformers ResNet (every ``convolution``) and a tiny llama (``embed_tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from model_state import perturb_trainable
from safetensors.torch import load_file
from tiny_models import tiny_llama
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

import peftkit
from peftkit import LoraConfig, get_peft_model

LIBS: dict[str, ModuleType] = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5  # same weights, same maths
MERGE_ATOL = 1e-4  # merged vs. unmerged forward (different op order)


class EmbedConvNet(nn.Module):
    """Token ids and an image, each through its own layers, summed into a small head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 8)
        self.conv1 = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, kernel_size=1)
        self.conv3 = nn.Conv2d(8, 8, kernel_size=3, stride=2, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.conv3(F.relu(self.conv2(F.relu(self.conv1(pixel_values)))))  # (N, 8, h, w)
        tokens = self.embed(input_ids)  # (N, T, 8)
        return self.head(image.mean(dim=(2, 3)) + tokens.mean(dim=1))  # (N, 5)


def tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config).eval()


def _inputs(seed: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 20, (3, 6), generator=generator),
        "pixel_values": torch.randn(3, 3, 9, 9, generator=generator),
    }


def _pixels(seed: int = 5) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def _ids(seed: int = 5) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))}


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# model builder, adapter settings, inputs; init_lora_weights=False makes B (conv) / A (embedding) non-zero
SETUPS: dict[str, tuple[Callable[[int], nn.Module], dict[str, Any], Callable[[], dict]]] = {
    "embed-conv-net": (
        EmbedConvNet,
        dict(r=2, lora_alpha=4, target_modules=["embed", "conv1", "conv2", "conv3"], init_lora_weights=False),
        _inputs,
    ),
    "resnet": (
        tiny_resnet,
        dict(r=2, lora_alpha=8, target_modules=["convolution"], init_lora_weights=False, use_rslora=True),
        _pixels,
    ),
    "llama-embed-tokens": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False),
        _ids,
    ),
}


def _make(lib: ModuleType, setup: str, seed: int = 0) -> Any:
    """A DoRA adapter made by ``lib`` on ``setup``'s model, every trainable parameter moved off its init
    (so that ``B`` and ``m`` are not trivial)."""
    build, kwargs, _ = SETUPS[setup]
    model = lib.get_peft_model(build(0), lib.LoraConfig(use_dora=True, **kwargs))
    perturb_trainable(model, seed)
    return model.eval()


def _layer(model: nn.Module, name: str) -> Any:
    return model.get_submodule(f"base_model.model.{name}")


# -------------------------------------------------------------------------------------- formulas
def test_embedding_dora_forward_matches_the_formula() -> None:
    model = _make(peftkit, "embed-conv-net")
    layer = _layer(model, "embed")
    ids = _inputs()["input_ids"]
    W = layer.base_layer.weight  # (vocab, dim)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (r, vocab), (dim, r)
    m = layer.lora_magnitude_vector["default"].weight  # (dim,)
    assert m.shape == (8,)
    adapted = W + 2.0 * (B @ A).T  # s = α / r = 4 / 2
    expected = (m * adapted / adapted.norm(dim=0))[ids]
    torch.testing.assert_close(layer(ids), expected)


@pytest.mark.parametrize("name", ["conv1", "conv2", "conv3"])
def test_conv2d_dora_forward_matches_the_formula(name: str) -> None:
    model = _make(peftkit, "embed-conv-net")
    layer = _layer(model, name)
    base = layer.base_layer
    x = torch.randn(2, base.in_channels, 9, 9)
    W, b = base.weight, base.bias  # (out, in, kh, kw)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in, kh, kw), (out, r, 1, 1)
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (1, base.out_channels, 1, 1)
    adapted = W + 2.0 * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
    norm = adapted.flatten(1).norm(dim=1)  # one per output channel
    kernel = m.view(-1, 1, 1, 1) * adapted / norm.view(-1, 1, 1, 1)
    expected = F.conv2d(x, kernel, b, base.stride, base.padding)
    torch.testing.assert_close(layer(x), expected)


def test_conv2d_dora_with_dropout_feeds_the_dropped_input_to_the_adapter_terms() -> None:
    """In training with dropout the base output keeps ``x``; the magnitude rescaling of ``W ⋆ ·`` and the
    LoRA term see ``dropout(x)`` (HF PEFT's DoRA)::

        y = W ⋆ x + b + (m/‖W+ΔW‖ − 1) · W ⋆ d(x) + m/‖W+ΔW‖ · s · B ⋆ A ⋆ d(x)
    """
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1"], use_dora=True, lora_dropout=0.5)
    model = get_peft_model(EmbedConvNet(), config)
    perturb_trainable(model, 0)
    layer = _layer(model, "conv1").train()
    x = torch.randn(2, 3, 9, 9)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    dropped = F.dropout(x, 0.5, training=True)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    adapted = base.weight + 2.0 * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
    scale = layer.lora_magnitude_vector["default"].weight / adapted.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    lora = F.conv2d(F.conv2d(dropped, A, padding=1), B) * 2.0
    expected = base(x) + (scale - 1) * F.conv2d(dropped, base.weight, padding=1) + scale * lora
    torch.testing.assert_close(got, expected)


def test_magnitude_starts_at_the_norms_of_the_base_weight() -> None:
    model = get_peft_model(
        EmbedConvNet(), LoraConfig(r=2, target_modules=["embed", "conv1", "conv3"], use_dora=True)
    )
    embed, conv = _layer(model, "embed"), _layer(model, "conv1")
    torch.testing.assert_close(
        embed.lora_magnitude_vector["default"].weight, embed.base_layer.weight.norm(dim=0)
    )
    torch.testing.assert_close(
        conv.lora_magnitude_vector["default"].weight.flatten(),
        conv.base_layer.weight.flatten(1).norm(dim=1),
    )
    inputs = _inputs()
    with torch.no_grad():  # B = 0 (conv) and A = 0 (embedding): a fresh adapter keeps the output
        torch.testing.assert_close(_output(model, inputs), _output(EmbedConvNet(), inputs))


def test_norm_is_a_constant_in_backward() -> None:
    """Paper §4.3: gradients treat ‖W + ΔW‖ as a constant (the formula with the norm detached)."""
    model = _make(peftkit, "embed-conv-net")
    layer = _layer(model, "conv1").train()
    x = torch.randn(2, 3, 9, 9)
    layer(x).square().sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    A2, B2, m2 = (t.detach().clone().requires_grad_() for t in (A, B, m))
    adapted = layer.base_layer.weight + 2.0 * torch.einsum("or,rihw->oihw", B2[:, :, 0, 0], A2)
    norm = adapted.flatten(1).norm(dim=1).detach().view(-1, 1, 1, 1)
    out = F.conv2d(x, m2.view(-1, 1, 1, 1) * adapted / norm, layer.base_layer.bias, padding=1)
    out.square().sum().backward()
    for ours, expected in ((A, A2), (B, B2), (m, m2)):
        torch.testing.assert_close(ours.grad, expected.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- HF PEFT interop
DIRECTIONS = [
    pytest.param("peft", "peftkit", id="peft->peftkit"),
    pytest.param("peftkit", "peft", id="peftkit->peft"),
]


def _load(lib: ModuleType, setup: str, path: Path) -> Any:
    return lib.PeftModel.from_pretrained(SETUPS[setup][0](0), str(path)).eval()


@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_checkpoint_round_trip_between_libraries(setup: str, src: str, dst: str, tmp_path: Path) -> None:
    made = _make(LIBS[src], setup)
    made.save_pretrained(str(tmp_path))
    loaded = _load(LIBS[dst], setup, tmp_path)
    inputs = SETUPS[setup][2]()
    with torch.no_grad():
        expected, got = _output(made, inputs), _output(loaded, inputs)
        base = _output(SETUPS[setup][0](0), inputs)
    assert (expected - base).abs().max() > 1e-3, "the adapter is a no-op; the test would prove nothing"
    assert (got - expected).abs().max() <= ATOL
    magnitudes = {
        k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "magnitude" in k
    }
    assert magnitudes, "no DoRA magnitude was saved"


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_tensor_names_and_shapes_as_hf_peft(setup: str, tmp_path: Path) -> None:
    specs = {}
    for lib_name, lib in LIBS.items():
        _make(lib, setup).save_pretrained(str(tmp_path / lib_name))
        tensors = load_file(tmp_path / lib_name / "adapter_model.safetensors")
        specs[lib_name] = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert specs["peftkit"] == specs["peft"]
    if setup == "embed-conv-net":
        assert specs["peftkit"]["base_model.model.embed.lora_magnitude_vector"][0] == (8,)
        assert specs["peftkit"]["base_model.model.conv1.lora_magnitude_vector"][0] == (1, 6, 1, 1)


# ------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("setup", list(SETUPS))
def test_merge_equals_unmerged_and_unmerge_restores(setup: str) -> None:
    model = _make(peftkit, setup)
    inputs = SETUPS[setup][2]()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = _output(model, inputs)
        model.merge_adapter()
        assert (_output(model, inputs) - unmerged).abs().max() <= MERGE_ATOL
        model.unmerge_adapter()
        assert (_output(model, inputs) - unmerged).abs().max() <= ATOL
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("maker", list(LIBS))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_merge_and_unload_equals_hf_peft(setup: str, maker: str, tmp_path: Path) -> None:
    """One checkpoint, merged by each library: the same plain model."""
    made = _make(LIBS[maker], setup)
    made.save_pretrained(str(tmp_path))
    inputs = SETUPS[setup][2]()
    with torch.no_grad():
        unmerged = _output(made, inputs)
    merged = {name: _load(lib, setup, tmp_path).merge_and_unload() for name, lib in LIBS.items()}
    assert type(merged["peftkit"]) is type(SETUPS[setup][0](0))
    with torch.no_grad():
        ours, theirs = _output(merged["peftkit"], inputs), _output(merged["peft"], inputs)
    assert (ours - unmerged).abs().max() <= MERGE_ATOL
    assert (ours - theirs).abs().max() <= ATOL
    their_state = merged["peft"].state_dict()
    for key, value in merged["peftkit"].state_dict().items():
        torch.testing.assert_close(value, their_state[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_two_active_dora_adapters_merge_like_forward(lib_name: str, tmp_path: Path) -> None:
    """Each DoRA adapter's norm is taken on the plain base weight, also when merged after another one,
    in one call or in two; peftkit merges to the same weights as HF PEFT."""
    kwargs = dict(
        r=2, target_modules=["embed", "conv1", "conv3", "head"], use_dora=True, init_lora_weights=False
    )
    models = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(EmbedConvNet(), lib.LoraConfig(**kwargs))
        model.add_adapter("other", lib.LoraConfig(**{**kwargs, "lora_alpha": 16}))
        models[name] = model
    perturb_trainable(models["peftkit"], 3)
    models["peft"].load_state_dict(models["peftkit"].state_dict())
    inputs = _inputs()
    merged = {}
    for name, model in models.items():
        model.base_model.set_adapter(["default", "other"])
        with torch.no_grad():
            unmerged = _output(model, inputs)
            if name == lib_name:  # one adapter at a time
                model.merge_adapter(adapter_names=["default"])
                model.merge_adapter(adapter_names=["other"])
            else:
                model.merge_adapter()
            merged[name] = _output(model, inputs)
        assert (merged[name] - unmerged).abs().max() <= MERGE_ATOL, name
    assert (merged["peftkit"] - merged["peft"]).abs().max() <= ATOL
    with torch.no_grad():
        models["peftkit"].unmerge_adapter()
        assert (_output(models["peftkit"], inputs) - unmerged).abs().max() <= MERGE_ATOL


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_step_gradients_equal_hf_peft(setup: str) -> None:
    """Same adapter weights, same batch, same dropout mask: the same gradient for every parameter."""
    build, kwargs, make_inputs = SETUPS[setup]
    kwargs = {**kwargs, "use_dora": True, "lora_dropout": 0.1}
    ours = get_peft_model(build(0), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(0), peft.LoraConfig(**kwargs))
    perturb_trainable(ours, 1)
    theirs.load_state_dict(ours.state_dict())  # the same in-memory names in both libraries
    inputs = make_inputs()
    grads = {}
    for name, model in (("peftkit", ours), ("peft", theirs)):
        model.train()
        torch.manual_seed(21)  # the same dropout masks, drawn in the same order
        _output(model, inputs).float().square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["peftkit"].keys() == grads["peft"].keys()
    assert any("lora_magnitude_vector" in n for n in grads["peftkit"])
    for name, grad in grads["peftkit"].items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads["peft"][name], atol=1e-6, rtol=1e-4, msg=name)


def test_dora_embedding_scale_is_per_dimension() -> None:
    """A magnitude entry scales exactly one embedding dimension (of every token)."""
    model = _make(peftkit, "embed-conv-net")
    layer = _layer(model, "embed")
    ids = torch.arange(20)
    with torch.no_grad():
        before = layer(ids)
        layer.lora_magnitude_vector["default"].weight[3] *= 2
        after = layer(ids)
    torch.testing.assert_close(after[:, 3], 2 * before[:, 3])
    torch.testing.assert_close(after[:, [0, 1, 2, 4, 5, 6, 7]], before[:, [0, 1, 2, 4, 5, 6, 7]])
    assert math.isfinite(after.sum().item())


# --------------------------------------------------------------------------- adapter management
def test_mixed_adapter_batch_rows_equal_single_adapter_outputs() -> None:
    """peftkit runs DoRA in mixed-adapter batches (HF PEFT refuses ``adapter_names`` with DoRA)."""
    kwargs = dict(target_modules=["embed", "conv1", "conv3"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(EmbedConvNet(), LoraConfig(r=2, **kwargs))
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=12, **kwargs))
    perturb_trainable(model, 2)
    inputs = _inputs()
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names)
        single = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            single[name] = model(**inputs)
        with model.disable_adapter():
            single["__base__"] = model(**inputs)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], atol=1e-5, rtol=1e-5)


def test_disable_and_delete_give_the_base_model_back() -> None:
    model = _make(peftkit, "embed-conv-net")
    inputs = _inputs()
    with torch.no_grad():
        reference = EmbedConvNet()(**inputs)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs), reference)
        model.delete_adapter("default")
        base = model.get_base_model()
        assert set(base.state_dict()) == set(EmbedConvNet().state_dict())
        torch.testing.assert_close(base(**inputs), reference)
