"""Combinations of methods (methods/combined.py), MAM Adapter (mam.py) and UniPELT (unipelt.py).

The generic promises (fresh output, trainability, exact save/load, disabling, deleting) are in
tests/methods/test_conformance.py; here: UniPELT's gates against hand computations, the on-disk format and its
placement order, per-component parameter counts against hand-computed numbers, merge refusals, a few
training steps, generation, and the errors for bad combinations.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from tiny_models import model_inputs, tiny_bert_seq_cls, tiny_llama
from torch import nn

from peftkit import (
    AdapterLayer,
    BitFitConfig,
    BottleneckConfig,
    CombinedConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    UniPELTConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.core.inspection import inspect_adapter

# ----------------------------------------------------------------------------------------- helpers


def _tuner(model: PeftModel, component: str, adapter: str = "default") -> Any:
    return model.base_model.component_tuners[adapter][component]


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _hand_gate(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mean_t σ(W_g x_t + b_g)`` per example, written out: ``(B,)``."""
    return torch.sigmoid(x @ gate.weight.T + gate.bias).mean(dim=1).reshape(-1)


# ------------------------------------------------------------------------------------------- gates


def test_lora_gate_scales_the_lora_change_per_example() -> None:
    model = get_peft_model(tiny_llama(0), UniPELTConfig(components={"lora": LoraConfig(r=4, lora_alpha=8)}))
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    name = "default__lora"
    with torch.no_grad():  # a trained-looking B (it starts at zero) and a gate that differs per example
        layer.lora_B[name].weight.normal_()
        layer.lora_gate[name].weight.normal_(std=0.5)
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0], y=out))
    _logits(model, model_inputs(batch_size=3, seq_len=5))
    handle.remove()
    x, y = captured["x"], captured["y"]  # (3, 5, 32), (3, 5, 16)

    gate = _hand_gate(layer.lora_gate[name], x)  # (3,)
    W, A, B = layer.get_base_layer().weight, layer.lora_A[name].weight, layer.lora_B[name].weight
    expected = x @ W.T + gate.view(3, 1, 1) * (8 / 4) * (x @ A.T @ B.T)  # y = W x + g(x)·(α/r)·B A x
    torch.testing.assert_close(y, expected)
    gates = model.last_gates()["lora"]
    assert set(gates) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")}
    torch.testing.assert_close(gates["model.layers.1.self_attn.v_proj"], gate)
    assert gate.shape == (3,) and gate.std() > 1e-3  # one gate per example, and they differ


def test_adapter_gate_scales_the_adapter_output_per_example() -> None:
    config = UniPELTConfig(
        components={"adapter": BottleneckConfig(style="pfeiffer", reduction_factor=4, scaling=2.0)},
        task_type="SEQ_CLS",
    )
    model = get_peft_model(tiny_bert_seq_cls(0), config)
    layer = model.get_base_model().bert.encoder.layer[1].output.dense
    name = "default__adapter"
    with torch.no_grad():
        layer.adapter_up[name].weight.normal_(std=0.3)  # the up-projection starts at zero
        layer.adapter_gate[name].weight.normal_(std=0.5)
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, args, out: captured.update(z=args[0], y=out))
    _logits(model, model_inputs(batch_size=4, seq_len=6))
    handle.remove()

    base = layer.get_base_layer()
    h = captured["z"] @ base.weight.T + base.bias  # the feed-forward output the adapter reads, (4, 6, 32)
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    adapter = torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    gate = _hand_gate(layer.adapter_gate[name], h)
    torch.testing.assert_close(captured["y"], h + gate.view(4, 1, 1) * 2.0 * adapter)  # h + g(h)·s·adapter(h)
    torch.testing.assert_close(model.last_gates()["adapter"]["bert.encoder.layer.1.output.dense"], gate)


def _llama_attention(model: nn.Module, layer: int) -> tuple[str, nn.Module]:
    return f"model.layers.{layer}.self_attn", model.model.layers[layer].self_attn


def _bert_attention(model: nn.Module, layer: int) -> tuple[str, nn.Module]:
    return f"bert.encoder.layer.{layer}.attention.self", model.bert.encoder.layer[layer].attention.self


@pytest.mark.parametrize(
    ("build", "task", "attention"),
    [(tiny_llama, None, _llama_attention), (tiny_bert_seq_cls, "SEQ_CLS", _bert_attention)],
    ids=["llama-gqa", "bert-seq-cls"],
)
def test_prefix_gate_equals_prefix_tuning_with_the_prefix_scaled_by_the_gate(
    build: Any, task: str | None, attention: Any
) -> None:
    """The gate from each attention's input, by hand; and per example, the gated model computes what plain
    prefix tuning computes with each layer's keys and values of the table multiplied by that gate."""
    P = 3
    gated = get_peft_model(
        build(0),
        UniPELTConfig(components={"prefix": PrefixTuningConfig(num_virtual_tokens=P)}, task_type=task),
    )
    tuner, name = _tuner(gated, "prefix"), "default__prefix"
    with torch.no_grad():
        for gate in tuner.prefix_gates[name].values():
            gate.weight.normal_(std=0.5)
    hidden: dict[str, torch.Tensor] = {}
    handles = []
    for layer in (0, 1):
        path, module = attention(gated.get_base_model(), layer)

        def hook(m: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            hidden[path] = args[0] if args else kwargs["hidden_states"]

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    inputs = model_inputs(batch_size=2, seq_len=6)
    logits = _logits(gated, inputs)
    for handle in handles:
        handle.remove()

    gates = gated.last_gates()["prefix"]
    assert set(gates) == set(hidden)
    for layer in (0, 1):
        path, _ = attention(gated.get_base_model(), layer)
        torch.testing.assert_close(
            gates[path], _hand_gate(tuner.prefix_gates[name][str(layer)], hidden[path])
        )

    with torch.no_grad():
        table = tuner.prompt_encoder[name]()  # (P, L·2·d_kv): row = [K_0 V_0 K_1 V_1]
    for row in range(2):
        plain = get_peft_model(build(0), PrefixTuningConfig(num_virtual_tokens=P, task_type=task))
        scale = torch.stack([gates[attention(plain.get_base_model(), layer)[0]][row] for layer in (0, 1)])
        scaled = (table.view(P, 2, 2, -1) * scale.view(1, 2, 1, 1)).reshape(P, -1)
        with torch.no_grad():
            plain.base_model.prompt_encoder["default"].embedding.weight.copy_(scaled)
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        torch.testing.assert_close(_logits(plain, one), logits[row : row + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert_seq_cls], ids=["llama", "bert"])
def test_unipelt_gates_are_readable_after_each_forward(build: Any) -> None:
    model = get_peft_model(build(0), UniPELTConfig())
    assert model.last_gates() == {"lora": {}, "prefix": {}, "adapter": {}}  # nothing ran yet
    for batch in (2, 5):
        _logits(model, model_inputs(batch_size=batch, seq_len=4))
        gates = model.last_gates()
        assert [len(gates[c]) for c in ("lora", "prefix", "adapter")] == [
            4,
            2,
            2,
        ]  # q, v × 2 layers; 2 blocks
        for per_module in gates.values():
            for value in per_module.values():
                assert value.shape == (batch,) and ((value > 0) & (value < 1)).all()
    # W_g ~ N(0, 0.02²), b_g = 0: every gate starts near one half
    fresh = [v for per_module in gates.values() for v in per_module.values()]
    assert all((v - 0.5).abs().max() < 0.05 for v in fresh)
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.last_gates("nope")


# ------------------------------------------------------------------------------------- on disk


def _train_a_little(model: PeftModel, inputs: dict[str, torch.Tensor], steps: int = 2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        (model(**inputs).logits.float() ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_unipelt_round_trip_gives_the_same_logits_and_gates(tmp_path: Any) -> None:
    inputs = model_inputs(batch_size=2, seq_len=5)
    model = get_peft_model(tiny_bert_seq_cls(0), UniPELTConfig(task_type="SEQ_CLS"))
    _train_a_little(model, inputs)
    logits = _logits(model, inputs)
    gates = model.last_gates()
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "UNIPELT" and saved["modules_to_save"] == ["classifier"]
    assert [c["name"] for c in saved["components"]] == ["lora", "prefix", "adapter"]
    assert saved["components"][1]["config"]["token_dim"] == 32  # the prefix's derived sizes are recorded
    keys = set(get_peft_model_state_dict(model))
    assert {k.split(".")[0] for k in keys} == {"lora", "prefix", "adapter", "base_model"}
    assert "prefix.prompt_embeddings" in keys
    assert "prefix.base_model.model.bert.encoder.layer.1.attention.self.prefix_gate.weight" in keys
    assert "lora.base_model.model.bert.encoder.layer.0.attention.self.query.lora_gate.weight" in keys
    assert "adapter.base_model.model.bert.encoder.layer.0.output.dense.adapter_gate.weight" in keys
    assert "base_model.model.classifier.weight" in keys

    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path)
    assert torch.equal(_logits(loaded, inputs), logits)
    reloaded_gates = loaded.last_gates()
    for component, per_module in gates.items():
        for path, value in per_module.items():
            assert torch.equal(reloaded_gates[component][path], value), (component, path)


def test_placement_order_survives_saving(tmp_path: Any) -> None:
    """Components that wrap the same module nest in the order given (here the LoRA wraps the adapter, so
    it adds s·BAx to the adapted output); adapter_config.json keeps that order although its keys are sorted."""
    config = CombinedConfig(
        components={
            "zz_adapter": BottleneckConfig(reduction_factor=4),
            "aa_lora": LoraConfig(r=2, target_modules=r".*\.layer\.\d+\.output\.dense"),
        },
        task_type="SEQ_CLS",
    )
    inputs = model_inputs(batch_size=2, seq_len=5)
    model = get_peft_model(tiny_bert_seq_cls(0), config)
    _train_a_little(model, inputs)
    dense = model.get_base_model().bert.encoder.layer[0].output.dense
    assert "lora_A" in dense._modules and "adapter_down" in dense.base_layer._modules
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(saved, CombinedConfig) and list(saved.components) == ["zz_adapter", "aa_lora"]
    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_config_dict_round_trip_and_with_component() -> None:
    config = CombinedConfig(
        components={"prefix": PrefixTuningConfig(num_virtual_tokens=5), "lora": LoraConfig(r=2)},
        modules_to_save=["score"],
    )
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and list(again.components) == ["prefix", "lora"]
    assert isinstance(again.components["lora"], LoraConfig) and again.components["lora"].r == 2

    mam = MAMConfig()
    assert PeftConfig.from_dict(mam.to_dict()) == mam
    smaller = mam.with_component(
        "adapter", BottleneckConfig(style="parallel", bottleneck_size=8, scaling=4.0)
    )
    assert (
        smaller.components["adapter"].bottleneck_size == 8
        and mam.components["adapter"].bottleneck_size == 512
    )
    assert smaller.components["prefix"] == mam.components["prefix"]
    no_lora = UniPELTConfig().with_component("lora", None)
    assert list(no_lora.components) == ["prefix", "adapter"] and no_lora.peft_type == "UNIPELT"


def test_paper_defaults() -> None:
    mam = MAMConfig().components
    assert (
        mam["prefix"].num_virtual_tokens,
        mam["prefix"].prefix_projection,
        mam["prefix"].encoder_hidden_size,
    ) == (
        30,
        True,
        800,
    )
    adapter = mam["adapter"]
    assert (adapter.style, adapter.bottleneck_size, adapter.scaling) == ("parallel", 512, 4.0)
    uni = UniPELTConfig().components
    assert (uni["lora"].r, uni["lora"].lora_alpha, uni["lora"].target_modules) == (8, 8, None)
    assert uni["prefix"].num_virtual_tokens == 10
    assert (uni["adapter"].style, uni["adapter"].reduction_factor) == ("pfeiffer", 16)


# --------------------------------------------------------------------------------------- counts
# Tiny BERT: hidden 32, 2 blocks, intermediate 64, 3 labels (head 32·3 + 3 = 99).

MAM_BERT_PARTS = {
    # 30×32 embedding + Linear(32→800) + Linear(800→2 layers·2·32): 960 + 26,400 + 102,528
    "default.prefix (PREFIX_TUNING)": 129_888,
    # per block: down Linear(32→512) 16,896 + up Linear(512→32) 16,416
    "default.adapter (BOTTLENECK)": 2 * 33_312,
    "default (modules_to_save)": 99,
}
UNIPELT_BERT_PARTS = {
    # query and value of 2 blocks: A 8×32 + B 32×8 + gate 32 + 1
    "default.lora (LORA + gate)": 4 * 545,
    # 10×32 + Linear(32→512) 16,896 + Linear(512→128) 65,664 + 2 gates × 33
    "default.prefix (PREFIX_TUNING + gate)": 320 + 16_896 + 65_664 + 66,
    # bottleneck round(32/16) = 2 per block: down 66 + up 96 + gate 33
    "default.adapter (BOTTLENECK + gate)": 2 * 195,
    "default (modules_to_save)": 99,
}


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        (MAMConfig(task_type="SEQ_CLS"), MAM_BERT_PARTS),
        (UniPELTConfig(task_type="SEQ_CLS"), UNIPELT_BERT_PARTS),
    ],
    ids=["mam", "unipelt"],
)
def test_print_trainable_parameters_breaks_counts_down_per_component(
    config: PeftConfig, parts: dict[str, int], capsys: Any
) -> None:
    model = get_peft_model(tiny_bert_seq_cls(0), config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(parts.values())
    model.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")
    assert lines[1:] == [f"  {label}: {count:,d}" for label, count in parts.items()]


def test_inspect_breaks_saved_tensors_down_per_component(tmp_path: Any) -> None:
    get_peft_model(tiny_bert_seq_cls(0), UniPELTConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    info = inspect_adapter(str(tmp_path))
    # the projected prefix is saved as its output: 10 rows × (2 layers · 2 · 32), plus the 2 gates
    assert info["components"] == {
        "lora (LORA + gate)": 2_180,
        "prefix (PREFIX_TUNING + gate)": 10 * 128 + 66,
        "adapter (BOTTLENECK + gate)": 390,
    }
    assert info["num_parameters"] == 2_180 + 1_346 + 390 + 99
    assert info["adapted_modules"]["lora: bert.encoder.layer.1.attention.self.value"] == 545
    assert info["adapted_modules"]["adapter: bert.encoder.layer.0.output.dense"] == 195
    assert info["other_tensors"]["base_model.model.classifier.weight"] == 96


def test_one_component_method_has_no_breakdown(tmp_path: Any, capsys: Any) -> None:
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2))
    model.print_trainable_parameters()
    assert len(capsys.readouterr().out.splitlines()) == 1
    model.save_pretrained(tmp_path)
    assert inspect_adapter(str(tmp_path))["components"] == {}


# -------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (UniPELTConfig(), r"UniPELT cannot be merged\. UniPELT's LoRA is gated"),
        (MAMConfig(), r"'prefix' \(PREFIX_TUNING\), 'adapter' \(BOTTLENECK\) do not fold into the base"),
        (
            CombinedConfig(components={"lora": LoraConfig(r=2), "adapter": BottleneckConfig()}),
            r"component\(s\) 'adapter' \(BOTTLENECK\) do not fold",
        ),
        (
            CombinedConfig(
                components={
                    "lora": LoraConfig(r=2, target_modules=["q_proj"]),
                    "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
                }
            ),
            r"q_proj is wrapped by two components",
        ),
    ],
    ids=["unipelt-gated-lora", "mam", "lora+bottleneck", "nested-lora-ia3"],
)
def test_merging_a_combination_that_cannot_merge_is_a_clear_error(config: PeftConfig, message: str) -> None:
    model = get_peft_model(tiny_llama(0), config)
    inputs = model_inputs()
    _train_a_little(model, inputs)
    before = _logits(model, inputs)
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=message):
        model.merge_adapter()
    assert torch.equal(_logits(model, inputs), before)  # nothing changed
    assert any(isinstance(m, AdapterLayer) for m in model.modules())


def test_gated_lora_layer_refuses_to_merge_on_its_own() -> None:
    model = get_peft_model(tiny_llama(0), UniPELTConfig(components={"lora": LoraConfig(r=2)}))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="gated"):
        layer.merge()


def test_combination_of_mergeable_methods_merges_exactly() -> None:
    config = CombinedConfig(
        components={"lora": LoraConfig(r=2, target_modules=["q_proj"]), "ia3": IA3Config()}
    )
    model = get_peft_model(tiny_llama(0), config)
    assert model.base_model.can_merge and not type(model.base_model).can_merge
    inputs = model_inputs()
    _train_a_little(model, inputs)
    expected = _logits(model, inputs)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- training


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def _fit(
    model: PeftModel, batch: dict[str, torch.Tensor], steps: int = 30, lr: float = 2e-2
) -> tuple[float, float]:
    before = _loss(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, _loss(model, batch)


COMBINATIONS = {
    "mam": lambda task: MAMConfig(task_type=task),
    "unipelt": lambda task: UniPELTConfig(task_type=task),
    "prefix+parallel": lambda task: CombinedConfig(
        components={
            "prefix": PrefixTuningConfig(num_virtual_tokens=4),
            "adapter": BottleneckConfig(style="parallel", scaling=4.0),
        },
        task_type=task,
    ),
    "lora+bottleneck": lambda task: CombinedConfig(
        components={"lora": LoraConfig(r=4), "adapter": BottleneckConfig(reduction_factor=4)}, task_type=task
    ),
}


@pytest.mark.parametrize("method", list(COMBINATIONS))
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_few_training_steps_reduce_the_loss(kind: str, method: str) -> None:
    torch.manual_seed(0)
    if kind == "bert":
        model = get_peft_model(tiny_bert_seq_cls(0), COMBINATIONS[method]("SEQ_CLS"))
        batch = {**model_inputs(batch_size=6, seq_len=7), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    else:
        model = get_peft_model(tiny_llama(0), COMBINATIONS[method]("CAUSAL_LM"))
        inputs = model_inputs(batch_size=1, seq_len=8)
        batch = {**inputs, "labels": inputs["input_ids"]}
    before, after = _fit(model, batch)
    # memorising random tokens from ln(100) ≈ 4.6 is slower than separating 6 sentences into 3 classes
    assert after < {"bert": 0.8, "llama": 0.95}[kind] * before, (before, after)


# ----------------------------------------------------------------------------------- generation


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generate_runs_every_component_and_equals_full_forward_passes() -> None:
    config = CombinedConfig(
        components={
            "prefix": PrefixTuningConfig(num_virtual_tokens=3),
            "lora": LoraConfig(r=4),
            "adapter": BottleneckConfig(style="parallel", scaling=4.0),
        },
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_llama(0), config)
    ids = model_inputs(batch_size=1, seq_len=5)["input_ids"]
    _train_a_little(model, {"input_ids": ids})
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = _greedy_without_cache(model, ids, 6)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        with model.disable_adapter():
            base_tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(generated, expected)
    reference = tiny_llama(0).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(base_tokens, reference)
    assert not torch.equal(generated, reference)  # the adapters changed what is generated


def test_unipelt_generate_first_token_is_the_forward_pass_argmax() -> None:
    """Under cached generation the prefix gate is computed from the prompt, as in one forward pass."""
    model = get_peft_model(tiny_llama(0), UniPELTConfig(task_type="CAUSAL_LM"))
    ids = model_inputs(batch_size=2, seq_len=5)["input_ids"]
    _train_a_little(model, {"input_ids": ids})
    first = _logits(model, {"input_ids": ids})[:, -1].argmax(-1)
    forward_gates = model.last_gates()["prefix"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8) and torch.equal(out[:, 5], first)
    for path, value in model.last_gates()["prefix"].items():  # the prefix was gated once, at the first step
        torch.testing.assert_close(value, forward_gates[path])


# ------------------------------------------------------------------------------ several adapters


def test_switching_between_combinations() -> None:
    inputs = model_inputs()
    first_config = CombinedConfig(components={"lora": LoraConfig(r=2), "adapter": BottleneckConfig()})
    model = get_peft_model(tiny_llama(0), first_config)
    _train_a_little(model, inputs)
    first = _logits(model, inputs)
    # MAM is placed by the same tuner class as any combination, so it can sit next to one
    model.add_adapter("other", MAMConfig().with_component("prefix", PrefixTuningConfig(num_virtual_tokens=2)))
    assert torch.equal(_logits(model, inputs), first)  # added, not active
    model.set_adapter("other")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.base_model.adapter_parameter_map("other").values()}
    assert not torch.equal(_logits(model, inputs), first)
    model.set_adapter("default")
    assert torch.equal(_logits(model, inputs), first)
    with pytest.raises(ValueError, match="Only one combination can be active"):
        model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="Mixed-adapter batches"):
        model(**inputs, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="adapters are COMBINED; a LORA adapter cannot be added"):
        model.add_adapter("plain", LoraConfig(r=2))
    uni = get_peft_model(tiny_llama(0), UniPELTConfig())
    uni.add_adapter(
        "second", UniPELTConfig().with_component("prefix", PrefixTuningConfig(num_virtual_tokens=2))
    )
    with pytest.raises(ValueError, match="adapters are UNIPELT; a MAM adapter cannot be added"):
        uni.add_adapter("mam", MAMConfig())


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: CombinedConfig(components=[("a", LoraConfig(r=2)), ("a", BottleneckConfig())]),
            ValueError,
            "Component name 'a' appears twice",
        ),
        (
            lambda: CombinedConfig(components={"inner": MAMConfig(), "lora": LoraConfig()}),
            ValueError,
            "is itself a combination .MAM.; combinations do not nest. List its components .prefix, adapter.",
        ),
        (
            lambda: CombinedConfig(components={"x": {"peft_type": "NOT_A_METHOD", "r": 2}}),
            ValueError,
            "Unknown peft_type 'NOT_A_METHOD'",
        ),
        (lambda: CombinedConfig(components={"x": "lora"}), TypeError, "must be a method config"),
        (lambda: CombinedConfig(components={}), ValueError, "at least one component"),
        (lambda: CombinedConfig(components=LoraConfig()), TypeError, "components must be a dict"),
        (lambda: CombinedConfig(components={"a__b": LoraConfig()}), ValueError, "not allowed"),
        (lambda: CombinedConfig(components={"base_model": LoraConfig()}), ValueError, "not allowed"),
        (lambda: CombinedConfig(components={"a.b": LoraConfig()}), ValueError, "not allowed"),
        (
            lambda: CombinedConfig(components={"lora": LoraConfig(modules_to_save=["classifier"])}),
            ValueError,
            "set modules_to_save on the CombinedConfig instead",
        ),
        (
            lambda: MAMConfig(components={"lora": LoraConfig(), "adapter": BottleneckConfig()}),
            ValueError,
            "one PrefixTuningConfig and one BottleneckConfig",
        ),
        (
            lambda: UniPELTConfig().with_component("ia3", IA3Config()),
            ValueError,
            "UniPELT gates LoRA, prefix",
        ),
        (lambda: UniPELTConfig().with_component("lora", LoraConfig(use_dora=True)), ValueError, "plain LoRA"),
        (lambda: UniPELTConfig().with_component("nope", None), ValueError, "No component named 'nope'"),
    ],
    ids=[
        "duplicate-name",
        "nested-combination",
        "unknown-type",
        "not-a-config",
        "empty",
        "not-a-dict",
        "double-underscore",
        "reserved-name",
        "dotted-name",
        "component-modules-to-save",
        "mam-wrong-parts",
        "unipelt-ungated-type",
        "unipelt-dora",
        "remove-missing",
    ],
)
def test_bad_combinations_are_clear_errors(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_in_place_component_is_refused_and_the_model_is_left_as_it_was() -> None:
    base = tiny_bert_seq_cls(0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = CombinedConfig(
        components={"lora": LoraConfig(r=2), "bitfit": BitFitConfig()}, task_type="SEQ_CLS"
    )
    with pytest.raises(
        ValueError, match=re.escape("Component 'bitfit' (BITFIT) trains the model's own parameters")
    ):
        get_peft_model(base, config)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())


def test_a_component_that_does_not_fit_the_model_rolls_everything_back() -> None:
    base = tiny_llama(0)
    keys = set(base.state_dict())
    config = CombinedConfig(
        components={
            "lora": LoraConfig(r=2),
            "adapter": BottleneckConfig(ffn_output_modules=["no_such_module"]),
        }
    )
    with pytest.raises(ValueError, match=r"ffn_output_modules=.*matched no module"):
        get_peft_model(base, config)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert set(base.state_dict()) == keys


# ------------------------------------------------------------------------------- peftkit train
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ({"name": "mam"}, MAMConfig(task_type="SEQ_CLS")),
        ({"name": "unipelt"}, UniPELTConfig(task_type="SEQ_CLS")),
        (
            {
                "name": "combined",
                "components": {
                    "lora": {"peft_type": "LORA", "r": 4},
                    "adapter": {"peft_type": "BOTTLENECK", "style": "parallel", "scaling": 4.0},
                },
            },
            CombinedConfig(
                components={
                    "lora": LoraConfig(r=4),
                    "adapter": BottleneckConfig(style="parallel", scaling=4.0),
                },
                task_type="SEQ_CLS",
            ),
        ),
    ],
    ids=["mam", "unipelt", "combined"],
)
def test_run_configs_build_combinations(method: dict[str, Any], expected: PeftConfig) -> None:
    """The ``method`` section of ``peftkit train`` / ``peftkit bench`` configs (YAML) reaches the same
    configs as the Python API."""
    from peftkit.train.runconfig import RunConfigError, build_method_config, build_run_config

    raw = {
        "model": {"name_or_path": "unused", "task_type": "SEQ_CLS"},
        "data": {"train": "examples/data/sentiment/train.csv"},
        "method": method,
    }
    assert build_method_config(build_run_config(raw)) == expected
    bad = {**raw, "method": {"name": "combined", "components": {"x": {"peft_type": "NOPE"}}}}
    with pytest.raises(RunConfigError, match="Unknown peft_type 'NOPE'"):
        build_run_config(bad)
