"""QLoRA and 8-bit bases: LoRA, DoRA and IA3 on bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

Each test loads one tiny llama, saved once per module, through transformers' ``BitsAndBytesConfig`` (4-bit
NF4 with double quantization and a float32 compute dtype, or 8-bit), exactly as a user would. Checked:

* a fresh adapter keeps the quantized model's output, disabling gives it back, only adapters get gradients;
* ``merge_and_unload()`` gives a full-precision model with the unmerged quantized model's logits;
  ``requantize=True`` keeps quantized layers (and warns); ``merge_adapter`` / ``unmerge_adapter`` restore
  the original quantized weight exactly; a failed ``safe_merge`` changes nothing;
* checkpoints have the full-precision format and load onto either base; HF PEFT reads ours and we read
  its, with bit-identical logits on the same quantized base;
* ``prepare_model_for_kbit_training`` and its deprecated alias; ``peftkit train ... model.load_in_4bit``.

bitsandbytes' other 4-bit layout (repacked for AVX512-BF16 CPUs) is covered in test_qlora_layouts.py.

Skipped where bitsandbytes cannot run.
"""

from __future__ import annotations

import copy
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from cli_fixtures import PYTHON, REPO, build_tokenizer, cli_env, tiny_bert_config, write_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import llama_for_4bit  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaForCausalLM,
)

import peftkit  # noqa: E402
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.core.layer import AdapterLayer  # noqa: E402

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def standard_4bit_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same numbers on every host: bitsandbytes' AVX512-BF16 CPU repacking (a bfloat16 kernel) stays
    off in the models built here, several of which run without adapters as the reference. The repacked
    layout is tested on every host in test_qlora_layouts.py; the command-line test below runs in its own
    process and gets whatever the host does."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama_for_4bit().save_pretrained(folder)
    return folder


def quantization(bits: int, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load(folder: Path, bits: int | None, **kwargs: Any) -> nn.Module:
    """The tiny llama in full precision (``bits=None``), 4-bit or 8-bit."""
    if bits is None:
        return LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization(bits), **kwargs).eval()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> None:
    """Seeded noise on every trainable parameter (so the adapter is not a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True
    ),
    "ia3": lambda: IA3Config(),
}
# int8 matmuls (fp16 inputs, outlier threshold) differ from a float matmul with the dequantized weight
MERGE_ATOL = {4: 1e-4, 8: 2e-2}


def quantized_layer_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}


# --------------------------------------------------------------------------------- wrapping, training
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_on_quantized_base_is_identity_then_trains_only_adapters(llama_dir, bits, method):
    base_logits = logits(load(llama_dir, bits))
    model = get_peft_model(load(llama_dir, bits), CONFIGS[method]())
    wrapped = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert wrapped and all(m.base_is_quantized for m in wrapped)
    torch.testing.assert_close(logits(model), base_logits, atol=1e-6, rtol=0)

    declared = {id(p) for p in model.base_model.adapter_parameter_map("default").values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == declared
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert (logits(model) - base_logits).abs().max() > 1e-4, "training did not change the output"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_logits, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_and_unload_gives_full_precision_model_with_the_quantized_adapter_logits(
    llama_dir, bits, method
):
    model = get_peft_model(load(llama_dir, bits), CONFIGS[method]())
    perturb(model)
    unmerged = logits(model)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not quantized_layer_types(merged), "quantized layers left in the full-precision merged model"
    assert type(merged.model.layers[0].self_attn.v_proj) is nn.Linear
    assert not hasattr(merged.config, "quantization_config") and not getattr(merged, "is_quantized", False)
    torch.testing.assert_close(logits(merged), unmerged, atol=MERGE_ATOL[bits], rtol=0)
    assert (unmerged - logits(load(llama_dir, bits))).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_requantize_keeps_quantized_layers_and_warns(llama_dir, bits):
    model = get_peft_model(load(llama_dir, bits), CONFIGS["lora"]())
    perturb(model)
    unmerged = logits(model)
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        merged = model.merge_and_unload(requantize=True)
    assert quantized_layer_types(merged) == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    # approximately the adapter model (the merged weights were rounded to 4 / 8 bits once more)
    difference = (logits(merged) - unmerged).abs().max().item()
    assert difference < 0.5 * (unmerged - logits(load(llama_dir, bits))).abs().max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_adapter_then_unmerge_restores_quantized_weight_exactly(llama_dir, bits, method):
    model = get_peft_model(load(llama_dir, bits), CONFIGS[method]())
    perturb(model)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    packed_before = layer.get_base_layer().weight.data.clone()
    unmerged = logits(model)
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        model.merge_adapter()
    assert layer.merged and layer.base_is_quantized
    assert not torch.equal(layer.get_base_layer().weight.data, packed_before)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight.data, packed_before)
    assert torch.equal(logits(model), unmerged)


def test_failed_safe_merge_on_quantized_base_changes_nothing(llama_dir):
    model = get_peft_model(load(llama_dir, 4), CONFIGS["lora"]())
    perturb(model)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")
    weights = [layer.get_base_layer().weight for layer in layers]
    packed = [w.data.clone() for w in weights]
    for call, kwargs in (
        ("merge_adapter", {}),
        ("merge_and_unload", {}),
        ("merge_and_unload", {"requantize": True}),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="NaN or inf"):
                getattr(model, call)(safe_merge=True, **kwargs)
        assert all(not layer.merged for layer in layers)
        for layer, weight, data in zip(layers, weights, packed):
            assert layer.get_base_layer().weight is weight and torch.equal(weight.data, data)
        assert quantized_layer_types(model) == {"Linear4bit"}


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", list(CONFIGS))
def test_checkpoint_format_is_the_full_precision_one_and_loads_onto_either_base(llama_dir, tmp_path, method):
    quantized = get_peft_model(load(llama_dir, 4), CONFIGS[method]())
    perturb(quantized)
    quantized.save_pretrained(tmp_path / "q")
    get_peft_model(load(llama_dir, None), CONFIGS[method]()).save_pretrained(tmp_path / "fp")
    specs = {
        kind: {
            k: (tuple(v.shape), v.dtype)
            for k, v in load_file(tmp_path / kind / "adapter_model.safetensors").items()
        }
        for kind in ("q", "fp")
    }
    assert specs["q"] == specs["fp"]
    saved = load_file(tmp_path / "q" / "adapter_model.safetensors")

    onto_fp = PeftModel.from_pretrained(load(llama_dir, None), tmp_path / "q")
    onto_q = PeftModel.from_pretrained(load(llama_dir, 4), tmp_path / "q")
    for loaded in (onto_fp, onto_q):
        from peftkit import get_peft_model_state_dict

        state = get_peft_model_state_dict(loaded)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits(onto_q), logits(quantized), atol=0, rtol=0)
    # the full-precision base differs from the quantized one by the 4-bit rounding, the adapter is the same
    assert (logits(onto_fp) - logits(onto_q)).abs().max() < 0.5


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_hf_peft_interop_on_4bit_base(llama_dir, tmp_path, src, dst, method):
    peft = pytest.importorskip("peft")
    libs = {"peft": peft, "peftkit": peftkit}

    def config(lib):
        kwargs = CONFIGS[method]().to_dict()
        cls = lib.IA3Config if method == "ia3" else lib.LoraConfig
        names = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}
        return cls(**{k: v for k, v in kwargs.items() if k not in names})

    made = libs[src].get_peft_model(load(llama_dir, 4), config(libs[src]))
    perturb(made)
    made.save_pretrained(str(tmp_path))
    loaded = libs[dst].PeftModel.from_pretrained(load(llama_dir, 4), str(tmp_path)).eval()
    expected = logits(made.eval())
    assert (expected - logits(load(llama_dir, 4))).abs().max() > 1e-2
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)
    assert tuple(made.get_nb_trainable_parameters())[1] == tuple(loaded.get_nb_trainable_parameters())[1]


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_model_for_kbit_training(llama_dir):
    model = load(llama_dir, 4, dtype=torch.bfloat16)
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.bfloat16
    packed_dtype = model.model.layers[0].self_attn.q_proj.weight.dtype
    assert peftkit.prepare_model_for_kbit_training(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == packed_dtype  # packed weights untouched
    assert model.is_gradient_checkpointing
    # reentrant checkpointing (the default) needs the embeddings' output to require grad
    assert model.get_input_embeddings()(IDS[:, :2]).requires_grad

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads[1::2])  # every lora_B


def test_prepare_model_for_int8_training_is_a_deprecated_alias(llama_dir):
    model = load(llama_dir, 8)
    with pytest.warns(DeprecationWarning, match="prepare_model_for_kbit_training"):
        returned = peftkit.prepare_model_for_int8_training(model, use_gradient_checkpointing=False)
    assert returned is model and not model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------- command line
def test_cli_train_in_4bit(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    config = AutoModelForSequenceClassification.from_config(
        __import__("transformers").AutoConfig.for_model(**tiny_bert_config(), num_labels=2)
    )
    base_dir = tmp_path / "base"
    config.save_pretrained(base_dir)
    run_config = {
        "model": {
            "name_or_path": str(base_dir),
            "tokenizer": tokenizer,
            "task_type": "SEQ_CLS",
            "load_in_4bit": False,  # switched on by the dotted override below
        },
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {
            "train": str(REPO / "examples/data/sentiment/train.csv"),
            "validation": str(REPO / "examples/data/sentiment/test.csv"),
            "max_train_samples": 32,
            "max_eval_samples": 16,
            "max_length": 32,
        },
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress_bar": False, "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    path = write_config(tmp_path / "run.yaml", run_config)
    result = subprocess.run(
        [PYTHON, "-m", "peftkit", "train", path, "model.load_in_4bit=true"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary
    tensors = load_file(run / "adapter_model.safetensors")
    assert any(".lora_A." in k for k in tensors) and any("classifier" in k for k in tensors)
    # the adapter trained on the 4-bit base loads onto it again
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, quantization_config=quantization(4))
    loaded = PeftModel.from_pretrained(base, run)
    assert quantized_layer_types(loaded) == {"Linear4bit"}
