"""4-bit bases in both of bitsandbytes' CPU layouts: standard, and repacked for AVX512-BF16.

On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight the first time it runs in eval
mode (``bitsandbytes.functional._convert_weight_packed_for_cpu``): other code order, bfloat16 scales, a
bfloat16 kernel without backward. Every test here runs with the layers in the standard layout and with
them repacked by that same bitsandbytes function, on any host, so a machine without AVX512-BF16 tests the
repacked path too. The expectations come from bitsandbytes' own ``dequantize_4bit`` on the standard
layout, with the scales rounded to bfloat16 as the repacking rounds them (the weight the repacked kernel
computes with), put into a plain float model: never from peftkit's decoding of the repacked layout.

No test runs bitsandbytes' repacked kernel itself (it needs the instruction set); the last test does, on
hosts that have it, and is skipped elsewhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import (  # noqa: E402
    _convert_weight_packed_for_cpu,
    dequantize_4bit,
    dequantize_blockwise,
    has_avx512bf16,
)
from tiny_models import llama_for_4bit  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from peftkit import (  # noqa: E402
    IA3Config,
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.core.layer import AdapterLayer  # noqa: E402
from peftkit.core.quantization import (  # noqa: E402
    dequantize_weight,
    is_cpu_repacked,
    restore_standard_layout,
)

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
LAYOUTS = ["standard", "cpu_repacked"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True
    ),
    "ia3": lambda: IA3Config(),
}


@pytest.fixture(autouse=True)
def no_automatic_repacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers built here never repack by themselves (on an AVX512-BF16 host they would at the first eval
    forward); the tests choose the layout."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-layouts")
    llama_for_4bit().save_pretrained(folder)
    return folder


def linears_4bit(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def load_4bit(folder: Path, double_quant: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype)
    return model.eval()


def expected_weight(layer: nn.Module) -> torch.Tensor:
    """What the layer computes with once repacked, from the standard layout through bitsandbytes' own
    ``dequantize_4bit``: its (double-quantized) scales, rounded to bfloat16."""
    state = copy.deepcopy(layer.weight.quant_state)
    if state.nested:
        state.absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested, state.state2, state.offset = False, None, None
    state.absmax = state.absmax.to(torch.bfloat16).float()
    return dequantize_4bit(layer.weight.data, state)


def repack(model: nn.Module) -> None:
    """Repack every 4-bit linear exactly as ``Linear4bit.forward`` does on an AVX512-BF16 CPU."""
    for layer in linears_4bit(model).values():
        layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
        assert is_cpu_repacked(layer.weight)


def prepare(folder: Path, layout: str, double_quant: bool = True, dtype: torch.dtype = torch.float32):
    """The 4-bit model in ``layout`` and a plain float model with the weights it computes with."""
    model = load_4bit(folder, double_quant, dtype)
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    for name, layer in linears_4bit(model).items():
        weight = (
            expected_weight(layer)
            if layout == "cpu_repacked"
            else dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        )
        reference.get_submodule(name).weight.data = weight.to(dtype)
    if layout == "cpu_repacked":
        repack(model)
    return model, reference


def perturb(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def adapted_pair(folder: Path, layout: str, method: str, double_quant: bool = True):
    """The same (perturbed) adapter on the 4-bit model in ``layout`` and on the float reference."""
    model, reference = prepare(folder, layout, double_quant)
    quantized = get_peft_model(model, CONFIGS[method]())
    perturb(quantized)
    plain = get_peft_model(reference, CONFIGS[method]())
    set_peft_model_state_dict(plain, get_peft_model_state_dict(quantized))
    return quantized, plain


# ------------------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantize_weight_reads_either_layout_in_the_original_dtype(llama_dir, layout, double_quant, dtype):
    model, reference = prepare(llama_dir, layout, double_quant, dtype)
    for name, layer in linears_4bit(model).items():
        weight = dequantize_weight(layer)
        assert weight.dtype == dtype and weight.shape == (layer.out_features, layer.in_features)
        assert torch.equal(weight, reference.get_submodule(name).weight), name


@pytest.mark.parametrize("double_quant", [True, False])
def test_restoring_the_standard_layout_is_lossless_and_bitsandbytes_repacks_it_identically(
    llama_dir, double_quant
):
    model, reference = prepare(llama_dir, "cpu_repacked", double_quant)
    for name, layer in linears_4bit(model).items():
        packed = layer.weight.data.clone()
        scales = layer.weight.quant_state.absmax.clone()
        restore_standard_layout(layer)
        assert not is_cpu_repacked(layer.weight) and layer.weight.quant_state.dtype == torch.float32
        # bitsandbytes' own standard-layout dequantization now gives the weight the repacked kernel used
        assert torch.equal(
            dequantize_4bit(layer.weight.data, layer.weight.quant_state), reference.get_submodule(name).weight
        )
        layer.weight.data, state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(layer.weight.data, packed) and torch.equal(state.absmax, scales)
        for _ in range(2):  # the second call finds the standard layout and leaves it alone
            restore_standard_layout(layer)
            assert torch.equal(dequantize_weight(layer), reference.get_submodule(name).weight)


# ------------------------------------------------------------------------- wrapping, training, eval
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapters_keep_the_standard_layout_and_removing_them_lets_bitsandbytes_repack(llama_dir, layout):
    model, _ = prepare(llama_dir, layout)
    layers = linears_4bit(model)
    for layer in layers.values():  # as bitsandbytes sets it on an AVX512-BF16 CPU
        layer.support_avx512bf16_for_cpu = True
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj"]))
    assert not any(is_cpu_repacked(layer.weight) for layer in layers.values())
    assert not any(
        layer.support_avx512bf16_for_cpu for layer in layers.values()
    )  # every layer, adapted or not
    unloaded = peft_model.unload()
    assert unloaded is model and all(layer.support_avx512bf16_for_cpu for layer in layers.values())


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_and_eval_after_repacking_give_the_reference_numbers(llama_dir, layout, method):
    """The repacked kernel has no backward: every adapter tensor gets the gradient it has on the float model
    with the same weights, and eval computes the same function."""
    quantized, plain = adapted_pair(llama_dir, layout, method)
    with torch.no_grad():
        torch.testing.assert_close(
            quantized(input_ids=IDS).logits, plain(input_ids=IDS).logits, atol=1e-5, rtol=0
        )
    for model in (quantized, plain):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    expected = dict(plain.named_parameters())
    trained = [(n, p) for n, p in quantized.named_parameters() if p.requires_grad]
    assert trained
    for name, param in trained:
        torch.testing.assert_close(param.grad, expected[name].grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_and_unload_gives_the_float_model_in_its_own_dtype(llama_dir, layout, method):
    quantized, plain = adapted_pair(llama_dir, layout, method)
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    merged = quantized.merge_and_unload()
    assert not linears_4bit(merged)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_into_the_4bit_weight_then_unmerge_restores_it_exactly(llama_dir, layout, method):
    quantized, plain = adapted_pair(llama_dir, layout, method)
    layers = [m for m in quantized.modules() if isinstance(m, AdapterLayer)]
    before = [(m.get_base_layer().weight, m.get_base_layer().weight.data.clone()) for m in layers]
    scales = [w.quant_state.absmax.clone() for w, _ in before]
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        quantized.merge_adapter()
    merged_plain = copy.deepcopy(plain).merge_and_unload()
    for layer in layers:
        base = layer.get_base_layer()
        assert not is_cpu_repacked(base.weight) and base.weight.quant_state.dtype == torch.float32
        # quantized once more from the exactly merged weight: in each block of 64, within half of NF4's
        # widest step (0.304 of the block's largest magnitude) of it, plus the 8-bit rounding of the scales
        target = merged_plain.get_submodule(layer_name(quantized, layer)).weight.reshape(-1, 64)
        error = (dequantize_weight(base).reshape(-1, 64) - target).abs().amax(dim=1)
        assert (error <= 0.16 * target.abs().amax(dim=1) + 0.02 * target.abs().max()).all()
    quantized.unmerge_adapter()
    for layer, (weight, data), absmax in zip(layers, before, scales):
        base = layer.get_base_layer()
        assert base.weight is weight and torch.equal(weight.data, data) and not is_cpu_repacked(weight)
        assert torch.equal(weight.quant_state.absmax, absmax)
    with torch.no_grad():
        torch.testing.assert_close(
            quantized(input_ids=IDS).logits, plain(input_ids=IDS).logits, atol=1e-5, rtol=0
        )


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is layer)
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dora_magnitudes_are_the_norms_of_the_weight_the_layer_computes_with(llama_dir, layout):
    model, reference = prepare(llama_dir, layout)
    quantized = get_peft_model(model, CONFIGS["dora"]())
    for layer in (m for m in quantized.modules() if isinstance(m, AdapterLayer)):
        weight = reference.get_submodule(layer_name(quantized, layer)).weight
        delta = layer.delta_weight("default")
        norms = (weight + delta).norm(dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, norms, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- the real kernel, if here
@pytest.mark.skipif(
    not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_on_an_avx512_bf16_cpu_a_model_evaluated_before_wrapping_trains_and_merges_exactly(
    llama_dir, monkeypatch
):
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = load_4bit(llama_dir)
    with torch.no_grad():
        model(input_ids=IDS)  # bitsandbytes repacks here
    assert all(is_cpu_repacked(layer.weight) for layer in linears_4bit(model).values())
    _, plain = adapted_pair(llama_dir, "cpu_repacked", "lora")
    quantized = get_peft_model(model, CONFIGS["lora"]())
    set_peft_model_state_dict(quantized, get_peft_model_state_dict(plain))
    quantized.train()
    plain.train()
    for m in (quantized, plain):
        m(input_ids=IDS, labels=IDS).loss.backward()
    expected_grads = dict(plain.named_parameters())
    for name, param in quantized.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected_grads[name].grad, atol=1e-5, rtol=1e-4)
    quantized.eval()
    plain.eval()
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
        torch.testing.assert_close(quantized(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            quantized.merge_and_unload()(input_ids=IDS).logits, expected, atol=1e-5, rtol=0
        )
