"""LoRA on parameters (``target_parameters``): the fused expert weights of mixture-of-experts blocks.

transformers 5 keeps the experts of Mixtral and gpt-oss as 3-D parameters, ``(E, out, in)`` (Mixtral) or
``(E, in, out)`` with ``is_transposed`` (gpt-oss). Checked against HF PEFT (tensor names and shapes, logits
both ways, gradients, merged models) and against the formula ``ΔW[e] = s · B_e A_e`` with HF PEFT's factor
layout (rows ``e·r + k`` of A, columns ``k·E + e`` of B).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from model_state import perturb_trainable
from safetensors.torch import load_file
from tiny_models import tiny_gpt_oss, tiny_llama, tiny_mixtral
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora import ParamWrapper

LIBS: dict[str, ModuleType] = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


MODELS = {"mixtral": tiny_mixtral, "gpt-oss": tiny_gpt_oss}
KWARGS: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)


def _make(lib: ModuleType, model: str, seed: int = 0, **changes: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF PEFT's own notices about parameter targeting
        adapted = lib.get_peft_model(MODELS[model](), lib.LoraConfig(**{**KWARGS, **changes}))
    perturb_trainable(adapted, seed)
    return adapted.eval()


@pytest.mark.parametrize("model", list(MODELS))
def test_same_tensor_names_and_shapes_as_hf_peft(model: str, tmp_path: Path) -> None:
    specs = {}
    for name, lib in LIBS.items():
        _make(lib, model).save_pretrained(str(tmp_path / name))
        tensors = load_file(tmp_path / name / "adapter_model.safetensors")
        specs[name] = {k: tuple(v.shape) for k, v in tensors.items()}
    assert specs["peftkit"] == specs["peft"]
    # the first registered parameter (gate_up_proj) is wrapped innermost
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert specs["peftkit"][inner] == (2 * 4, 16)


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
@pytest.mark.parametrize("model", list(MODELS))
def test_checkpoint_round_trip_between_libraries(model: str, src: str, dst: str, tmp_path: Path) -> None:
    made = _make(LIBS[src], model)
    made.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = LIBS[dst].PeftModel.from_pretrained(MODELS[model](), str(tmp_path)).eval()
    with torch.no_grad():
        expected, got, base = made(IDS).logits, loaded(IDS).logits, MODELS[model]()(IDS).logits
    assert (expected - base).abs().max() > 1e-3, "the adapter is a no-op; the test would prove nothing"
    assert (got - expected).abs().max() <= ATOL


@pytest.mark.parametrize("model", list(MODELS))
def test_delta_is_per_expert_product_in_the_parameters_layout(model: str) -> None:
    adapted = _make(peftkit, model)
    experts = adapted.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamWrapper) and experts.parameter_name == "down_proj"
    for wrapper in (experts, experts.base_layer):
        A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        param = wrapper.get_param()
        E, r, s = param.shape[0], wrapper.r["default"], wrapper.scaling["default"]
        transposed = getattr(wrapper.get_base_layer(), "is_transposed", False)
        for e in range(E):
            A_e = A[e * r : (e + 1) * r]  # (r, in)
            B_e = B[:, [k * E + e for k in range(r)]]  # (out, r)
            expected = s * B_e @ A_e  # (out, in)
            got = wrapper.delta_weight("default")[e]
            torch.testing.assert_close(got, expected.T if transposed else expected)
            assert got.shape == param.shape[1:]


@pytest.mark.parametrize("model", list(MODELS))
def test_forward_equals_a_model_with_the_updated_expert_weights(model: str) -> None:
    """Independent of the wrapper's forward: add ΔW to a copy of the base model's parameters."""
    adapted = _make(peftkit, model, target_modules=None)
    reference = MODELS[model]()
    with torch.no_grad():
        for layer_index, layer in enumerate(adapted.base_model.model.model.layers):
            outer = layer.mlp.experts
            for wrapper in (outer, outer.base_layer):
                target = getattr(reference.model.layers[layer_index].mlp.experts, wrapper.parameter_name)
                target.add_(wrapper.delta_weight("default"))
        torch.testing.assert_close(adapted(IDS).logits, reference(IDS).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model", list(MODELS))
def test_training_step_gradients_equal_hf_peft(model: str) -> None:
    ours, theirs = _make(peftkit, model), _make(peft, model)
    theirs.load_state_dict(ours.state_dict())
    grads = {}
    for name, adapted in (("peftkit", ours), ("peft", theirs)):
        adapted.train()
        adapted(IDS, labels=IDS).loss.backward()
        grads[name] = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert grads["peftkit"].keys() == grads["peft"].keys()
    assert any("experts.base_layer.lora_A" in n for n in grads["peftkit"])
    for name, grad in grads["peftkit"].items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads["peft"][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model", list(MODELS))
def test_merge_unmerge_and_merge_and_unload_equal_hf_peft(model: str, tmp_path: Path) -> None:
    adapted = _make(peftkit, model)
    adapted.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    with torch.no_grad():
        unmerged = adapted(IDS).logits
        adapted.merge_adapter()
        torch.testing.assert_close(adapted(IDS).logits, unmerged, atol=ATOL, rtol=0)
        adapted.unmerge_adapter()
        for key, value in adapted.state_dict().items():
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = {
                n: lib.PeftModel.from_pretrained(MODELS[model](), str(tmp_path)).merge_and_unload()
                for n, lib in LIBS.items()
            }
        experts = merged["peftkit"].model.layers[0].mlp.experts
        assert type(experts).__name__.endswith("Experts")  # the plain module is back
        torch.testing.assert_close(merged["peftkit"](IDS).logits, unmerged, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            merged["peftkit"](IDS).logits, merged["peft"](IDS).logits, atol=ATOL, rtol=0
        )


def test_two_adapters_switch_and_delete_back_to_the_base_module() -> None:
    adapted = _make(peftkit, "mixtral", target_modules=None)
    second = LoraConfig(**{**KWARGS, "target_modules": None, "init_lora_weights": False})
    adapted.add_adapter("other", second)
    with torch.no_grad():
        first_out = adapted(IDS).logits
        adapted.set_adapter("other")
        other_out = adapted(IDS).logits
        assert (first_out - other_out).abs().max() > 1e-3
        adapted.delete_adapter("default")
        adapted.delete_adapter("other")
        assert not adapted.peft_config
        assert type(adapted.base_model.model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
        torch.testing.assert_close(adapted(IDS).logits, tiny_mixtral()(IDS).logits, atol=0, rtol=0)


def test_refusals_name_the_problem_and_change_nothing() -> None:
    model = tiny_mixtral()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="must be a list of strings"):
        LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ValueError, match=r"lora_dropout=0\.1"):
        get_peft_model(model, LoraConfig(**{**KWARGS, "lora_dropout": 0.1}))
    with pytest.raises(ValueError, match="no parameter was matched"):
        get_peft_model(model, LoraConfig(target_parameters=["experts.nope"]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    adapted = _make(peftkit, "mixtral")
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        adapted.add_adapter("other", LoraConfig(target_parameters=["experts.down_proj"]))
    assert list(adapted.peft_config) == ["default"]
    with pytest.raises(ValueError, match="Mixed-adapter batches"):
        adapted(IDS, adapter_names=["default", "default"])


def test_experts_left_out_by_target_modules_are_reported() -> None:
    with pytest.warns(
        UserWarning,
        match=r"3-D parameters .*target_parameters=\['experts.down_proj', 'experts.gate_up_proj'\]",
    ):
        get_peft_model(tiny_mixtral(), LoraConfig(target_modules="all-linear"))
    for model, config in (
        (tiny_mixtral(), LoraConfig(**KWARGS)),
        (tiny_llama(), LoraConfig(target_modules="all-linear")),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            get_peft_model(model, config)


def test_only_parameters_when_target_modules_is_none_and_config_round_trips(tmp_path: Path) -> None:
    adapted = _make(peftkit, "mixtral", target_modules=None)
    assert not adapted.base_model.module_targets_by_adapter["default"]
    assert len(adapted.base_model.parameter_targets_by_adapter["default"]) == 4  # 2 layers x 2 parameters
    assert not any(
        isinstance(m, nn.Linear) and "lora" in n for n, m in adapted.named_modules() if "q_proj" in n
    )
    adapted.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_mixtral(), str(tmp_path))
    assert loaded.peft_config["default"].target_parameters == EXPERTS
