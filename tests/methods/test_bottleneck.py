"""Bottleneck adapters: placement per architecture against hand-written module lists and an independent
recording of each sub-layer's input / output, the formula, identity at init, save/load, merge errors,
mixed batches, AdapterDrop (drop_layers, robust training, Parallel) and ``peftkit train``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from peftkit import BottleneckConfig, Parallel, PeftModel, get_peft_model
from peftkit.methods.bottleneck import BottleneckLayer

V = 100


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def builder(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build().eval()

    return builder


def _llama_like(config_cls: Any, model_cls: Any) -> Callable[[int], nn.Module]:
    return _seeded(
        lambda: model_cls(
            config_cls(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=V,
                max_position_embeddings=64,
            )
        )
    )


_bert_kw = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V
)
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "bert": _seeded(
        lambda: BertForSequenceClassification(BertConfig(**_bert_kw, max_position_embeddings=64))
    ),
    "roberta": _seeded(
        lambda: RobertaForSequenceClassification(RobertaConfig(**_bert_kw, max_position_embeddings=70))
    ),
    "gpt2": _seeded(
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64))
    ),
    "llama": _llama_like(LlamaConfig, LlamaForCausalLM),
    "mistral": _llama_like(MistralConfig, MistralForCausalLM),
    "qwen2": _llama_like(Qwen2Config, Qwen2ForCausalLM),
    "t5": _seeded(
        lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=V,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        )
    ),
    "bart": _seeded(
        lambda: BartForConditionalGeneration(
            BartConfig(
                vocab_size=V,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
            )
        )
    ),
    "opt": _seeded(
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=V,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        )
    ),
}


def blocks(arch: str) -> list[tuple[str, str, str]]:
    """Hand-written expectation, per block: (attention output projection, feed-forward output projection,
    the module whose *output* is the feed-forward input)."""
    if arch in ("bert", "roberta"):
        p = f"{arch}.encoder.layer"
        return [
            (f"{p}.{i}.attention.output.dense", f"{p}.{i}.output.dense", f"{p}.{i}.attention.output")
            for i in (0, 1)
        ]
    if arch == "gpt2":
        return [
            (f"transformer.h.{i}.attn.c_proj", f"transformer.h.{i}.mlp.c_proj", f"transformer.h.{i}.ln_2")
            for i in (0, 1)
        ]
    if arch in ("llama", "mistral", "qwen2"):
        p = "model.layers"
        return [
            (f"{p}.{i}.self_attn.o_proj", f"{p}.{i}.mlp.down_proj", f"{p}.{i}.post_attention_layernorm")
            for i in (0, 1)
        ]
    if arch == "t5":
        enc = [
            (
                f"encoder.block.{i}.layer.0.SelfAttention.o",
                f"encoder.block.{i}.layer.1.DenseReluDense.wo",
                f"encoder.block.{i}.layer.1.layer_norm",
            )
            for i in (0, 1)
        ]
        dec = [
            (
                f"decoder.block.{i}.layer.0.SelfAttention.o",
                f"decoder.block.{i}.layer.2.DenseReluDense.wo",
                f"decoder.block.{i}.layer.2.layer_norm",
            )
            for i in (0, 1)
        ]
        return enc + dec
    if arch == "bart":  # post-LN: the feed-forward input is the output of the LayerNorm before fc1
        return [
            (
                f"model.{stack}.layers.{i}.self_attn.out_proj",
                f"model.{stack}.layers.{i}.fc2",
                f"model.{stack}.layers.{i}.{norm}",
            )
            for stack, norm in (("encoder", "self_attn_layer_norm"), ("decoder", "encoder_attn_layer_norm"))
            for i in (0, 1)
        ]
    assert arch == "opt"
    p = "model.decoder.layers"
    return [(f"{p}.{i}.self_attn.out_proj", f"{p}.{i}.fc2", f"{p}.{i}.final_layer_norm") for i in (0, 1)]


def attention_inputs(arch: str) -> dict[str, tuple[str, str]]:
    """Hand-written expectation, per attention output projection: where the self-attention sub-layer's input
    can be seen independently of peftkit's hooks: ``("output", m)``: the output of module ``m`` (the
    pre-LN norm), ``("input", m)``: the input of block ``m`` (post-LN blocks attend over the block input)."""
    attention_output = {a: a for a, _, _ in blocks(arch)}
    if arch in ("bert", "roberta"):
        return {a: ("input", a.split(".attention.")[0]) for a in attention_output}
    if arch == "bart":
        return {a: ("input", a.split(".self_attn.")[0]) for a in attention_output}
    norm = {
        "gpt2": lambda a: a.replace("attn.c_proj", "ln_1"),
        "t5": lambda a: a.replace("SelfAttention.o", "layer_norm"),
        "opt": lambda a: a.replace("self_attn.out_proj", "self_attn_layer_norm"),
    }.get(arch, lambda a: a.replace("self_attn.o_proj", "input_layernorm"))  # llama, mistral, qwen2
    return {a: ("output", norm(a)) for a in attention_output}


def record_attention_inputs(model: nn.Module, arch: str) -> tuple[dict[str, Any], list[Any]]:
    """Record, under each attention output projection's name, the input of its self-attention sub-layer."""
    seen: dict[str, Any] = {}
    handles = []
    for name, (kind, module_name) in attention_inputs(arch).items():
        module = model.get_submodule(module_name)
        if kind == "output":
            hook = module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
        else:
            hook = module.register_forward_pre_hook(
                lambda m, a, kw, n=name: seen.__setitem__(n, a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            )
        handles.append(hook)
    return seen, handles


def inputs(arch: str, batch: int = 2, length: int = 7, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("t5", "bart"):
        out["decoder_input_ids"] = torch.randint(3, V, (batch, 5), generator=g)
    return out


def randomize(model: PeftModel, std: float = 0.2, seed: int = 7) -> None:
    """Give every adapter tensor random values, so that each adapter visibly changes its layer's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():
            for container in (layer.adapter_down, layer.adapter_up):
                for module in container.values():
                    for p in module.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def record_outputs(model: nn.Module, names: list[str]) -> tuple[dict[str, Any], list[Any]]:
    seen: dict[str, Any] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o)))
    return seen, handles


# -------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
def test_placement_and_formula_per_architecture(arch: str, style: str) -> None:
    config = BottleneckConfig(style=style, reduction_factor=4, non_linearity="gelu", scaling=1.5)
    model = get_peft_model(MODELS[arch](0), config)
    wrapped = {n for n, m in model.base_model.model.named_modules() if isinstance(m, BottleneckLayer)}
    expected = {f for _, f, _ in blocks(arch)} | (
        {a for a, _, _ in blocks(arch)} if style == "houlsby" else set()
    )
    assert wrapped == expected
    randomize(model)
    inner = model.base_model.model
    bases = [f"{n}.base_layer" for n in sorted(wrapped)]
    producers = [p for _, _, p in blocks(arch)]
    seen, handles = record_outputs(inner, sorted(wrapped) + bases + producers)
    logits(model, inputs(arch))
    for handle in handles:
        handle.remove()
    ffn_input_of = {f: p for _, f, p in blocks(arch)}
    for name in wrapped:
        layer = inner.get_submodule(name)
        h = seen[f"{name}.base_layer"]
        source = seen[ffn_input_of[name]] if style == "parallel" else h
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        expected_out = h + 1.5 * F.linear(
            F.gelu(F.linear(source, down.weight, down.bias)), up.weight, up.bias
        )
        torch.testing.assert_close(seen[name], expected_out, atol=1e-5, rtol=1e-5, msg=name)
        assert down.out_features == 8 and down.in_features == 32 and up.out_features == 32


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("placement", ["attention", "both"])
def test_parallel_adapter_beside_attention_reads_the_attention_input(arch: str, placement: str) -> None:
    config = BottleneckConfig(
        style="parallel", parallel_placement=placement, reduction_factor=4, non_linearity="gelu", scaling=1.5
    )
    model = get_peft_model(MODELS[arch](0), config)
    inner = model.base_model.model
    wrapped = {n for n, m in inner.named_modules() if isinstance(m, BottleneckLayer)}
    attention = set(attention_inputs(arch))
    ffn_input_of = {f: p for _, f, p in blocks(arch)}
    assert wrapped == (attention if placement == "attention" else attention | set(ffn_input_of))
    randomize(model)
    seen, handles = record_outputs(inner, sorted(wrapped) + [f"{n}.base_layer" for n in wrapped])
    producers, more = record_outputs(inner, list(ffn_input_of.values()))
    read, more_handles = record_attention_inputs(inner, arch)
    logits(model, inputs(arch))
    for handle in handles + more + more_handles:
        handle.remove()
    for name in wrapped:
        layer = inner.get_submodule(name)
        source = read[name] if name in attention else producers[ffn_input_of[name]]
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        expected_out = seen[f"{name}.base_layer"] + 1.5 * F.linear(
            F.gelu(F.linear(source, down.weight, down.bias)), up.weight, up.bias
        )
        torch.testing.assert_close(seen[name], expected_out, atol=1e-5, rtol=1e-5, msg=name)


STYLES = ["houlsby", "pfeiffer", "parallel", "parallel/attention", "parallel/both"]


def style_config(style: str, **kwargs: Any) -> BottleneckConfig:
    """``"parallel/attention"`` -> ``BottleneckConfig(style="parallel", parallel_placement="attention")``."""
    name, _, placement = style.partition("/")
    return BottleneckConfig(style=name, parallel_placement=placement or "ffn", **kwargs)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_fresh_adapter_is_exactly_the_base(arch: str, style: str) -> None:
    batch = inputs(arch)
    expected = logits(MODELS[arch](0), batch)
    model = get_peft_model(MODELS[arch](0), style_config(style))
    assert torch.equal(logits(model, batch), expected)


def test_houlsby_init_is_near_identity_but_not_exact() -> None:
    batch = inputs("llama")
    expected = logits(MODELS["llama"](0), batch)
    model = get_peft_model(MODELS["llama"](0), BottleneckConfig(style="houlsby", init="houlsby"))
    out = logits(model, batch)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=0)
    for _, layer in model.base_model.adapter_layers():
        for linear in (layer.adapter_down["default"], layer.adapter_up["default"]):
            assert linear.weight.abs().max() <= 2e-2 and linear.weight.std() < 1.5e-2
            assert not linear.bias.any()


@pytest.mark.parametrize(
    "name,fn",
    [("relu", torch.relu), ("gelu", F.gelu), ("swish", F.silu), ("silu", F.silu), ("tanh", torch.tanh)],
)
def test_non_linearities(name: str, fn: Callable) -> None:
    model = get_peft_model(
        MODELS["llama"](0), BottleneckConfig(non_linearity=name, bottleneck_size=5, scaling=2.0)
    )
    randomize(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    h = torch.randn(3, 32)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert down.out_features == 5
    expected = 2.0 * (fn(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    torch.testing.assert_close(layer.adapter_delta(h, "default", h), expected)


def test_user_named_modules_for_an_unknown_architecture() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.relu(self.up(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    with pytest.raises(ValueError, match="ffn_output_modules"):
        get_peft_model(Net(), BottleneckConfig())
    torch.manual_seed(0)
    net = Net()
    model = get_peft_model(
        net,
        BottleneckConfig(
            style="parallel", ffn_output_modules=["down"], ffn_input_modules=["up"], bottleneck_size=2
        ),
    )
    randomize(model)
    x = torch.randn(4, 8)
    layer = model.base_model.model.blocks[0].down
    assert layer.input_source == "blocks.0.up"
    with torch.no_grad():
        # block 0: x + down(relu(up(x))) + adapter(x), the adapter reading the input of ``up``
        expected = (
            x + layer.base_layer(torch.relu(net.blocks[0].up(x))) + layer.adapter_delta(x, "default", None)
        )
        torch.testing.assert_close(model.base_model.model.blocks[0](x), expected)


# ------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("style", ["houlsby", "parallel"])
def test_save_load_is_exact_and_in_peftkit_format(style: str, tmp_path: Path) -> None:
    model = get_peft_model(
        MODELS["bert"](0), BottleneckConfig(style=style, task_type="SEQ_CLS", non_linearity="tanh")
    )
    randomize(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["style"] == style
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(MODELS["bert"](0), tmp_path)
    batch = inputs("bert")
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_merge_is_a_clear_error_naming_mergeable_methods() -> None:
    model = get_peft_model(MODELS["llama"](0), BottleneckConfig())
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=r"cannot be merged.*LORA.*"):
            call()
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj, BottleneckLayer)
    plain = model.unload()  # removing without merging works
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    assert all(not m._forward_pre_hooks for m in plain.modules())


@pytest.mark.parametrize("arch,style", [("bert", "parallel"), ("llama", "houlsby"), ("gpt2", "parallel")])
def test_mixed_adapter_batches_equal_per_adapter_runs(arch: str, style: str) -> None:
    model = get_peft_model(MODELS[arch](0), BottleneckConfig(style=style))
    model.add_adapter("other", BottleneckConfig(style=style, non_linearity="gelu"))
    randomize(model)
    batch = inputs(arch, batch=3)
    mixed = logits(model, {**batch, "adapter_names": ["default", "__base__", "other"]})
    model.set_adapter("default")
    first = logits(model, batch)[0]
    model.set_adapter("other")
    third = logits(model, batch)[2]
    with model.disable_adapter():
        second = logits(model, batch)[1]
    for got, want in ((mixed[0], first), (mixed[1], second), (mixed[2], third)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_delete_removes_tap_hooks() -> None:
    model = get_peft_model(MODELS["bert"](0), BottleneckConfig(style="parallel"))
    model.add_adapter("serial", BottleneckConfig(style="pfeiffer"))
    inner = model.base_model.model
    assert len(inner.bert.encoder.layer[0].intermediate._forward_pre_hooks) == 1
    model.delete_adapter("default")  # the remaining serial adapter reads no feed-forward input
    assert not any(m._forward_pre_hooks for m in inner.modules())
    assert inner.bert.encoder.layer[0].output.dense.input_source is None


# ------------------------------------------------------------------------------- AdapterDrop
def test_drop_layers_leaves_the_lowest_blocks_without_adapters() -> None:
    model = get_peft_model(MODELS["t5"](0), BottleneckConfig(style="houlsby", drop_layers=1))
    wrapped = {n for n, m in model.base_model.model.named_modules() if isinstance(m, BottleneckLayer)}
    assert wrapped == {n for triple in blocks("t5") for n in triple[:2] if ".block.1." in n}
    with pytest.raises(ValueError, match="removes every adapter"):
        get_peft_model(MODELS["llama"](0), BottleneckConfig(drop_layers=2))


def test_robust_drop_samples_how_many_lower_layers_to_skip() -> None:
    model = get_peft_model(MODELS["llama"](0), BottleneckConfig(robust_drop_layers=2))
    randomize(model)
    batch = inputs("llama")
    layers = [m.mlp.down_proj for m in model.base_model.model.model.layers]

    def skipping(n: int) -> torch.Tensor:
        # reference: the adapters of the lowest n blocks set to zero (an adapter with zero up-projection adds
        # nothing), in eval mode
        saved = [
            (lay.adapter_up["default"].weight.clone(), lay.adapter_up["default"].bias.clone())
            for lay in layers
        ]
        with torch.no_grad():
            for lay in layers[:n]:
                lay.adapter_up["default"].weight.zero_()
                lay.adapter_up["default"].bias.zero_()
        out = logits(model, batch)
        with torch.no_grad():
            for lay, (w, b) in zip(layers, saved, strict=True):
                lay.adapter_up["default"].weight.copy_(w)
                lay.adapter_up["default"].bias.copy_(b)
        return out

    references = [skipping(n) for n in range(3)]
    assert not torch.equal(references[0], references[1]) and not torch.equal(references[1], references[2])
    torch.testing.assert_close(logits(model, batch), references[0])  # eval: nothing skipped
    model.train()  # the tiny llama has no dropout, so training mode changes nothing else
    torch.manual_seed(0)
    seen = []
    for _ in range(30):
        out = logits(model, batch)
        matches = [n for n, ref in enumerate(references) if torch.allclose(out, ref, atol=1e-6)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == {0, 1, 2}
    model.eval()
    torch.testing.assert_close(logits(model, batch), references[0])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("style", ["pfeiffer", "parallel", "houlsby", "parallel/attention"])
def test_parallel_equals_separate_passes_and_runs_lower_blocks_once(arch: str, style: str) -> None:
    kw = {"task_type": "SEQ_CLS"} if arch == "bert" else {}
    names = ["a", "b", "c"]
    model = get_peft_model(MODELS[arch](0), style_config(style, drop_layers=1, **kw), adapter_name="a")
    for name in names[1:]:
        model.add_adapter(name, style_config(style, drop_layers=1, non_linearity="gelu", **kw))
    randomize(model)
    if arch == "bert":  # each task has its own classifier head
        with torch.no_grad():
            for name in names:
                model.base_model.model.classifier.modules_to_save[name].weight.normal_()
    batch = inputs(arch, batch=3)
    batch["attention_mask"][1, 5:] = 0  # padding
    separate = []
    for name in names:
        model.set_adapter(name)
        separate.append(logits(model, batch))
    model.set_adapter(Parallel(*names))
    stack = model.base_model.model.get_submodule(
        {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}[arch]
    )
    rows: list[tuple[int, int]] = []
    handles = [
        block.register_forward_hook(
            lambda m, a, o, i=i: rows.append((i, (o[0] if isinstance(o, tuple) else o).shape[0]))
        )
        for i, block in enumerate(stack)
    ]
    together = logits(model, batch)
    for handle in handles:
        handle.remove()
    assert rows == [(0, 3), (1, 9)]  # block 0 once for all tasks, block 1 once per task
    assert together.shape[0] == 9
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)
    # the composition survives adding an adapter and ends when another set_adapter call replaces it
    model.add_adapter("d", style_config(style, drop_layers=1, **kw))
    assert logits(model, batch).shape[0] == 9
    model.set_adapter("a")
    torch.testing.assert_close(logits(model, batch), separate[0])


def test_parallel_errors() -> None:
    with pytest.raises(ValueError, match="twice"):
        Parallel("a", "a")
    model = get_peft_model(MODELS["llama"](0), BottleneckConfig(), adapter_name="a")
    model.add_adapter("b", BottleneckConfig())
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_adapter(Parallel("a", "zzz"))
    model.set_adapter(Parallel("a", "b"))
    batch = inputs("llama")
    with pytest.raises(ValueError, match="mixed batches"):
        model(**batch, adapter_names=["a", "b"])
    assert logits(model, batch).shape[0] == 4  # the failed call left nothing behind
    model.delete_adapter("b")
    assert logits(model, batch).shape[0] == 2


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"style": "serial"}, "style"),
        ({"non_linearity": "softmax"}, "non_linearity"),
        ({"init": "xavier"}, "init"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"drop_layers": -1}, "drop_layers"),
        ({"ffn_output_modules": []}, "empty"),
        ({"style": "parallel", "parallel_placement": "mlp"}, "parallel_placement"),
        ({"style": "houlsby", "parallel_placement": "attention"}, "style='parallel'"),
    ],
)
def test_bad_configs(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**kwargs)


def test_modules_that_match_nothing_name_the_field() -> None:
    before = {n: p.clone() for n, p in MODELS["llama"](0).named_parameters()}
    base = MODELS["llama"](0)
    with pytest.raises(ValueError, match="ffn_output_modules"):
        get_peft_model(base, BottleneckConfig(ffn_output_modules=["nope"]))
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


# ------------------------------------------------------------------------------------- CLI
def test_peftkit_train_trains_a_bottleneck_adapter(tmp_path: Path) -> None:
    from cli_fixtures import build_tokenizer, classification_config, write_config

    from peftkit.cli import main

    tokenizer = build_tokenizer(tmp_path / "tok")
    config = classification_config(tmp_path, tokenizer)
    config["method"] = {
        "name": "bottleneck",
        "style": "houlsby",
        "reduction_factor": 4,
        "non_linearity": "gelu",
    }
    config["data"]["max_train_samples"] = 16
    config["data"]["max_eval_samples"] = 8
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    run = Path(config["output_dir"])
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["style"] == "houlsby"
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter_model.safetensors"))
    ups = [v for k, v in tensors.items() if k.endswith("adapter_up.weight")]
    assert len(ups) == 4 and all(u.abs().sum() > 0 for u in ups)  # trained away from the zero init
