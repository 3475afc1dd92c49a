"""BitFit and Freeze / HeadOnly: the methods that train some of the model's own parameters in place.

The expected parameter sets are written out by hand per architecture, from ``named_parameters()`` and
the layer names of each model, independently of the role tables in ``peftkit/methods/bitfit.py``. All
models are tiny and built from configs (no hub access).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import llama_for_4bit, tiny_bert_seq_cls, tiny_gpt2, tiny_llama
from tiny_models import tiny_t5 as shared_tiny_t5
from torch import nn
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5ForConditionalGeneration,
)

from peftkit import (
    AdapterLayer,
    BitFitConfig,
    FreezeConfig,
    HeadOnlyConfig,
    ModulesToSaveWrapper,
    PeftModel,
    get_peft_model,
)
from peftkit.cli import main as cli_main

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(7))
HEAD = {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads (and other test processes share the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ models
def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """The shared tiny T5 with two layers (the layer-index tests below count on two)."""
    return shared_tiny_t5(seed, layers=2, vocab=100)


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    """GPT-NeoX has no entry in BitFit's role table: its groups come from the module-name fallback."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    return GPTNeoXForCausalLM(config).eval()


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "bert": tiny_bert_seq_cls,
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
    "t5": tiny_t5,
    "llama": tiny_llama,
    "neox": tiny_neox,
}


def inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    if model.config.model_type == "t5":
        return {"input_ids": IDS, "decoder_input_ids": IDS}
    return {"input_ids": IDS}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model)).logits


def train(model: nn.Module, steps: int = 2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = (model(**inputs(model)).logits.float() ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trainable(model: nn.Module) -> set[str]:
    return {n.removeprefix(PREFIX) for n, p in model.named_parameters() if p.requires_grad}


def state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave alone."""
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same_state(model: nn.Module, before: dict[str, Any]) -> None:
    after = state(model)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name


# ------------------------------------------------------------------- BitFit: expected selections
def _biases(model: nn.Module, keep: Callable[[str], bool]) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith(".bias") and keep(n)}


# Per architecture and group: which of the model's own ``*.bias`` parameters BitFit must select.
EXPECTED_GROUPS: dict[str, dict[str, Callable[[str], bool]]] = {
    "bert": {
        "attention_qkv": lambda n: ".attention.self." in n,
        "attention_output": lambda n: n.endswith(".attention.output.dense.bias"),
        "mlp": lambda n: n.endswith(
            (".intermediate.dense.bias", ".0.output.dense.bias", ".1.output.dense.bias")
        ),
        "layernorm": lambda n: "LayerNorm" in n,  # embeddings.LayerNorm too
    },
    "gpt2": {
        "attention_qkv": lambda n: n.endswith(".attn.c_attn.bias"),  # q, k, v fused in one tensor
        "attention_output": lambda n: n.endswith(".attn.c_proj.bias"),
        "mlp": lambda n: ".mlp." in n,
        "layernorm": lambda n: ".ln_" in n,  # ln_1, ln_2, ln_f
    },
    "opt": {
        "attention_qkv": lambda n: n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")),
        "attention_output": lambda n: n.endswith("out_proj.bias"),
        "mlp": lambda n: n.endswith(("fc1.bias", "fc2.bias")),
        "layernorm": lambda n: "layer_norm" in n,  # the blocks' two and the decoder's final one
    },
    "neox": {
        "attention_qkv": lambda n: n.endswith("attention.query_key_value.bias"),
        "attention_output": lambda n: n.endswith("attention.dense.bias"),
        "mlp": lambda n: ".mlp." in n,
        "layernorm": lambda n: "layernorm" in n or "final_layer_norm" in n,
    },
}


def expected_biases(arch: str, groups: list[str], model: nn.Module) -> set[str]:
    rules = EXPECTED_GROUPS[arch]
    return set().union(*(_biases(model, rules[g]) for g in groups))


@pytest.mark.parametrize("arch", sorted(EXPECTED_GROUPS))
def test_expected_groups_partition_the_biases(arch: str) -> None:
    """The hand-written expectations are disjoint and cover every bias but the BERT pooler's."""
    model = BUILDERS[arch](0)
    rules = EXPECTED_GROUPS[arch]
    sets = [_biases(model, rule) for rule in rules.values()]
    assert all(sets) and sum(len(s) for s in sets) == len(set().union(*sets))
    left = _biases(model, lambda n: True) - set().union(*sets)
    assert left == ({"bert.pooler.dense.bias", "classifier.bias"} if arch == "bert" else set())


GROUP_CASES = [
    (arch, groups)
    for arch in sorted(EXPECTED_GROUPS)
    for groups in [["attention_qkv"], ["attention_output"], ["mlp"], ["layernorm"], None]
]


@pytest.mark.parametrize(("arch", "groups"), GROUP_CASES, ids=lambda v: "all" if v is None else str(v))
def test_bitfit_trains_exactly_the_chosen_biases_and_counts_them(arch: str, groups: list[str] | None) -> None:
    base = BUILDERS[arch](0)
    groups_or_all = groups or ["attention_qkv", "attention_output", "mlp", "layernorm"]
    expected = expected_biases(arch, groups_or_all, base)
    seq_cls = arch == "bert"
    config = BitFitConfig(task_type="SEQ_CLS" if seq_cls else None)
    if groups is not None:
        config = config.replace(bias_groups=groups)
    model = get_peft_model(BUILDERS[arch](0), config)
    head = HEAD if seq_cls else set()
    assert trainable(model) == expected | head
    on_disk = {"classifier.weight", "classifier.bias"} if seq_cls else set()  # the head copy's saved names
    assert set(model.base_model.adapter_parameter_map("default")) == expected | on_disk
    # counts: trainable = the selected biases (+ head); nothing is added but the head's trained copy
    base_params = dict(base.named_parameters())
    head_numel = base.classifier.weight.numel() + base.classifier.bias.numel() if seq_cls else 0
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == sum(base_params[n].numel() for n in expected) + head_numel
    assert n_all == sum(p.numel() for p in base.parameters()) + head_numel
    assert torch.equal(logits(model), logits(base))  # nothing changes until training


@pytest.mark.parametrize("arch", ["bert", "gpt2", "opt"])
def test_bitfit_training_changes_exactly_the_selected_biases(arch: str) -> None:
    model = get_peft_model(BUILDERS[arch](0), BitFitConfig(task_type="SEQ_CLS" if arch == "bert" else None))
    selected = {PREFIX + n for n in trainable(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= selected
    # A separate key bias adds q·b_k to every score of a query row, which softmax ignores: its gradient
    # is zero up to rounding, so whether rounding moves it is not part of the promise.
    key_biases = {n for n in selected if n.endswith(("key.bias", "k_proj.bias"))}
    assert selected - changed <= key_biases, sorted(selected - changed)


def test_bitfit_checkpoint_holds_the_biases_under_their_own_names(tmp_path: Path) -> None:
    model = get_peft_model(tiny_gpt2(), BitFitConfig(bias_groups=["attention_qkv", "layernorm"]))
    train(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = expected_biases("gpt2", ["attention_qkv", "layernorm"], tiny_gpt2())
    assert set(tensors) == {PREFIX + n for n in expected}
    trained = dict(model.get_base_model().named_parameters())
    for name, tensor in tensors.items():
        assert torch.equal(tensor, trained[name.removeprefix(PREFIX)])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["bias_groups"] == ["attention_qkv", "layernorm"]


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("bert", BitFitConfig(task_type="SEQ_CLS")),
        ("opt", BitFitConfig(bias_groups=["mlp", "layernorm"])),
        ("llama", BitFitConfig(bias_groups=["attention_qkv", "mlp"], add_missing_biases=True)),
        ("t5", BitFitConfig(bias_groups=["attention_output", "mlp"], add_missing_biases=True)),
        ("gpt2", FreezeConfig(trainable_layers=1, train_embeddings=True)),
        ("t5", FreezeConfig(trainable_layers=[0])),
        ("bert", HeadOnlyConfig(task_type="SEQ_CLS")),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_save_load_onto_a_fresh_base_reproduces_the_logits_exactly(
    arch: str, config: Any, tmp_path: Path
) -> None:
    model = get_peft_model(BUILDERS[arch](0), config)
    train(model)
    expected = logits(model)
    assert not torch.equal(expected, logits(BUILDERS[arch](0)))  # training did something
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path, is_trainable=True)
    assert trainable(resumed) == trainable(model)


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("bert", BitFitConfig(task_type="SEQ_CLS")),
        ("llama", BitFitConfig(bias_groups=["attention_qkv", "mlp"], add_missing_biases=True)),
        ("gpt2", FreezeConfig(trainable_layers=1)),
    ],
    ids=["bitfit-bert", "bitfit-llama-added", "freeze-gpt2"],
)
def test_merge_and_unload_returns_the_plain_model_with_the_trained_values(arch: str, config: Any) -> None:
    model = get_peft_model(BUILDERS[arch](0), config)
    train(model)
    trained = {
        n.removeprefix(PREFIX): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    expected = logits(model)
    merged = model.merge_and_unload()
    assert type(merged) is type(BUILDERS[arch](0))
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged.modules())
    own = dict(merged.named_parameters())
    for name, value in trained.items():
        name = name.replace("modules_to_save.default.", "")  # the head's trained copy takes its place
        assert torch.equal(own[name], value), name
    assert torch.equal(logits(merged), expected)


# ------------------------------------------------------------------------ BitFit: bias-free models
def test_bitfit_on_bias_free_llama_is_a_clear_error_that_changes_nothing() -> None:
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"no bias to train.*q_proj.*add_missing_biases=True"):
        get_peft_model(model, BitFitConfig())
    assert_same_state(model, before)


def test_bitfit_on_t5_names_every_bias_free_group() -> None:
    model = tiny_t5()
    before = state(model)
    with pytest.raises(
        ValueError, match=r"attention_qkv: encoder\.block\.0.*layernorm: .*add_missing_biases"
    ):
        get_peft_model(model, BitFitConfig())
    assert_same_state(model, before)


def test_bitfit_added_biases_keep_the_output_then_train_and_delete_removes_them() -> None:
    base = tiny_llama()
    model = get_peft_model(
        tiny_llama(), BitFitConfig(bias_groups=["attention_qkv", "mlp"], add_missing_biases=True)
    )
    added = {
        f"model.layers.{i}.{m}.bias"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert trainable(model) == added
    assert all(not torch.any(model.get_base_model().get_parameter(n)) for n in added)  # zero-initialised
    assert torch.equal(logits(model), logits(base))
    n_trainable, n_all = model.get_nb_trainable_parameters()
    added_numel = sum(model.get_base_model().get_parameter(n).numel() for n in added)
    assert n_trainable == added_numel
    assert n_all == sum(p.numel() for p in base.parameters()) + added_numel
    train(model)
    changed = {n for n in added if torch.any(model.get_base_model().get_parameter(n))}
    assert changed >= added - {f"model.layers.{i}.self_attn.k_proj.bias" for i in range(2)}
    with model.disable_adapter():  # the added biases are taken out: exactly the base model
        assert torch.equal(logits(model), logits(base))
    model.delete_adapter("default")
    assert set(dict(model.get_base_model().named_parameters())) == set(dict(base.named_parameters()))
    assert torch.equal(logits(model.get_base_model()), logits(base))


def test_bitfit_warns_about_norms_without_a_bias_term() -> None:
    with pytest.warns(UserWarning, match=r"LlamaRMSNorm.*no bias term"):
        model = get_peft_model(tiny_llama(), BitFitConfig(add_missing_biases=True))
    assert not any("norm" in n for n in trainable(model))


def test_bitfit_disable_and_delete_give_the_base_model_back_exactly() -> None:
    base = tiny_bert_seq_cls()
    model = get_peft_model(tiny_bert_seq_cls(), BitFitConfig(task_type="SEQ_CLS"))
    train(model)
    trained = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), trained)
    model.delete_adapter("default")
    for name, param in base.named_parameters():
        assert torch.equal(model.get_base_model().get_parameter(name), param), name


# ---------------------------------------------------------------------------- Freeze / HeadOnly
def _under(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


FREEZE_CASES = [
    ("gpt2-top1", "gpt2", FreezeConfig(trainable_layers=1), lambda m: _under(m, "transformer.h.1.")),
    ("gpt2-top2", "gpt2", FreezeConfig(trainable_layers=2), lambda m: _under(m, "transformer.h.")),
    (
        "gpt2-patterns",
        "gpt2",
        FreezeConfig(trainable_layers=["h.1", "ln_f"]),
        lambda m: _under(m, "transformer.h.1.", "transformer.ln_f."),
    ),
    (
        "gpt2-embeddings",  # lm_head is tied to wte, so it trains with it
        "gpt2",
        FreezeConfig(trainable_layers=1, train_embeddings=True),
        lambda m: _under(m, "transformer.h.1.", "transformer.wte.", "transformer.wpe."),
    ),
    (
        "gpt2-norms",
        "gpt2",
        FreezeConfig(trainable_layers=1, train_norms=True),
        lambda m: _under(m, "transformer.h.1.", "transformer.h.0.ln_", "transformer.ln_f."),
    ),
    ("llama-index-0", "llama", FreezeConfig(trainable_layers=[0]), lambda m: _under(m, "model.layers.0.")),
    ("opt-top1", "opt", FreezeConfig(trainable_layers=1), lambda m: _under(m, "model.decoder.layers.1.")),
    (  # the top block of each stack
        "t5-top1",
        "t5",
        FreezeConfig(trainable_layers=1),
        lambda m: _under(m, "encoder.block.1.", "decoder.block.1."),
    ),
    (
        "t5-layers-pattern",
        "t5",
        FreezeConfig(trainable_layers=1, layers_pattern="block"),
        lambda m: _under(m, "encoder.block.1.", "decoder.block.1."),
    ),
    (
        "bert-top1-head",
        "bert",
        FreezeConfig(trainable_layers=1, task_type="SEQ_CLS"),
        lambda m: _under(m, "bert.encoder.layer.1.") | HEAD,
    ),
    ("bert-top0-head", "bert", FreezeConfig(trainable_layers=0, task_type="SEQ_CLS"), lambda m: HEAD),
    ("bert-head-only", "bert", HeadOnlyConfig(task_type="SEQ_CLS"), lambda m: HEAD),
    (
        "gpt2-head-only-lm-head",
        "gpt2",
        HeadOnlyConfig(modules_to_save=["lm_head"]),
        lambda m: {"lm_head.modules_to_save.default.weight"},
    ),
]


@pytest.mark.parametrize(
    ("arch", "config", "expected"), [c[1:] for c in FREEZE_CASES], ids=[c[0] for c in FREEZE_CASES]
)
def test_freeze_trains_exactly_the_chosen_blocks_and_head(arch: str, config: Any, expected: Any) -> None:
    base = BUILDERS[arch](0)
    want = expected(base)
    model = get_peft_model(BUILDERS[arch](0), config)
    assert trainable(model) == want
    # exact accounting: the chosen tensors' sizes; nothing added but a trained head copy; no copies kept
    own = dict(base.named_parameters())
    head_copy = {n for n in want if ".modules_to_save." in n}
    head_numel = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == sum(own[n].numel() for n in want - head_copy) + head_numel
    assert n_all == sum(p.numel() for p in base.parameters()) + head_numel
    assert model.base_model.base_selections["default"].original == {}
    assert torch.equal(logits(model), logits(base))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    changed = {n.removeprefix(PREFIX) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= want
    assert want - changed <= {n for n in want if n.endswith("key.bias")}  # see the BitFit test above


def test_freeze_refuses_disable_adapter_and_a_second_adapter_and_mixed_batches() -> None:
    model = get_peft_model(tiny_gpt2(), FreezeConfig(trainable_layers=1))
    train(model)
    before = state(model)
    with pytest.raises(ValueError, match=r"keeps no copy.*disable_adapter"), model.disable_adapter():
        pass
    with pytest.raises(ValueError, match="only adapter"):
        model.add_adapter("other", FreezeConfig(trainable_layers=1))
    with pytest.raises(ValueError, match="only adapter"):
        model.add_adapter("probe", HeadOnlyConfig(modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="in place"):
        model(input_ids=IDS, adapter_names=["default", "__base__"])
    assert list(model.peft_config) == ["default"]
    assert_same_state(model, before)


def test_head_only_adapters_can_share_a_model() -> None:
    model = get_peft_model(tiny_bert_seq_cls(), HeadOnlyConfig(task_type="SEQ_CLS"))
    model.add_adapter("other", HeadOnlyConfig(task_type="SEQ_CLS"))
    train(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny_bert_seq_cls()))
    model.set_adapter("other")
    assert trainable(model) == {n.replace(".default.", ".other.") for n in HEAD}


def test_freeze_delete_keeps_the_trained_values_and_freezes_them() -> None:
    model = get_peft_model(tiny_gpt2(), FreezeConfig(trainable_layers=1))
    train(model)
    trained = logits(model)
    model.delete_adapter("default")
    base = model.get_base_model()
    assert not any(p.requires_grad for p in base.parameters())
    assert torch.equal(logits(base), trained)  # no copy of the originals was kept


def test_bitfit_from_pretrained_onto_a_wrong_base_changes_nothing(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), BitFitConfig(bias_groups=["mlp"], add_missing_biases=True))
    model.save_pretrained(tmp_path)
    other = llama_for_4bit().eval()  # a wider llama than tiny_llama()
    before = state(other)
    with pytest.raises(ValueError, match="Shape mismatches"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_same_state(other, before)  # the zero biases added for loading are gone again


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trainable_layers": -1}, ValueError, ">= 0"),
        ({"trainable_layers": []}, ValueError, "empty list"),
        ({"trainable_layers": [0, "h.1"]}, ValueError, "mixes"),
        ({"trainable_layers": [-1]}, ValueError, "negative"),
        ({"trainable_layers": True}, TypeError, "must be an int"),
        ({"trainable_layers": (1, 2)}, TypeError, "must be an int"),
        ({"trainable_layers": "h.(1"}, ValueError, "not a valid regex"),
        ({"trainable_layers": ["h.1"], "layers_pattern": "h"}, ValueError, "layers_pattern"),
    ],
)
def test_freeze_config_rejects_bad_values(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FreezeConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bias_groups": ["attention_qkv", "attention"]}, ValueError, r"Unknown bias group.*'attention'"),
        ({"bias_groups": []}, ValueError, "empty"),
        ({"bias_groups": "mlp"}, TypeError, "must be a list"),
        ({"bias_groups": ["mlp", "mlp"]}, ValueError, "twice"),
    ],
)
def test_bitfit_config_rejects_bad_values(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BitFitConfig(**kwargs)


@pytest.mark.parametrize(
    ("build", "config", "match"),
    [
        (
            tiny_gpt2,
            FreezeConfig(trainable_layers=3),
            r"trainable_layers=3 is out of range.*'transformer\.h': 2",
        ),
        (tiny_t5, FreezeConfig(trainable_layers=[0, 2]), r"indices \[2\] are out of range"),
        (tiny_gpt2, FreezeConfig(trainable_layers=["h.7"]), "matches no module"),
        (tiny_gpt2, FreezeConfig(trainable_layers=1, layers_pattern="layers"), "no stack of blocks"),
        (tiny_gpt2, HeadOnlyConfig(), "selects nothing to train"),
        (tiny_gpt2, FreezeConfig(trainable_layers=1, modules_to_save=["nohead"]), "match no module"),
    ],
    ids=[
        "k-too-large",
        "index-too-large",
        "pattern-matches-nothing",
        "wrong-layers-pattern",
        "no-head",
        "bad-save",
    ],
)
def test_bad_freeze_target_is_a_clear_error_that_changes_nothing(build: Any, config: Any, match: str) -> None:
    model = build(0)
    before = state(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert_same_state(model, before)


# ---------------------------------------------------------------------------- reporting the counts
def test_print_trainable_parameters_and_inspect_report_the_selection(tmp_path: Path, capsys: Any) -> None:
    model = get_peft_model(tiny_bert_seq_cls(), BitFitConfig(task_type="SEQ_CLS"))
    n_trainable, n_all = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert (
        line
        == f"trainable params: {n_trainable:,d} || all params: {n_all:,d} || trainable%: {100 * n_trainable / n_all:.4f}"
    )
    model.save_pretrained(tmp_path)
    assert cli_main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["peft_type"] == "BITFIT"
    assert info["num_parameters"] == n_trainable  # the file holds exactly the trained tensors
    assert cli_main(["inspect", str(tmp_path)]) == 0
    assert "bert.encoder.layer.1.attention.self.query.bias" in capsys.readouterr().out


def test_full_fine_tuning_equals_plain_pytorch_training(tmp_path: Path) -> None:
    """``FullConfig``: the same steps as training every parameter of the bare model with the same optimizer
    (pooler included), and the checkpoint gives that model back on a fresh base."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 100, (4, 8), generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(3)
    ]

    def train(model: nn.Module) -> None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()

    plain = tiny_bert_seq_cls(0)
    train(plain)
    from peftkit import FullConfig

    adapted = get_peft_model(tiny_bert_seq_cls(0), FullConfig(task_type="SEQ_CLS"))
    assert adapted.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in tiny_bert_seq_cls(0).parameters()
    )
    train(adapted)
    probe = batches[0]["input_ids"]
    with torch.no_grad():
        expected = plain(input_ids=probe).logits
        torch.testing.assert_close(adapted(input_ids=probe).logits, expected, atol=1e-6, rtol=1e-6)
    adapted.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, expected, atol=1e-6, rtol=1e-6)
    assert "base_model.model.bert.pooler.dense.weight" in load_file(tmp_path / "adapter_model.safetensors")


def test_full_through_the_cli_with_threads_and_a_log_at_every_step(tmp_path: Path) -> None:
    """``method: {name: full}`` trains every parameter from the YAML config; ``train.threads`` sets torch's
    threads; ``log.jsonl`` grows at every logging step, also between checkpoints (a run killed before its
    first checkpoint has logged every step it took)."""
    import subprocess

    from cli_fixtures import PYTHON, build_tokenizer, classification_config, cli_env, write_config

    tokenizer = build_tokenizer(tmp_path / "tok")
    config = classification_config(tmp_path, tokenizer, threads=1, save_every=100, eval_before=False)
    config["method"] = {"name": "full"}
    path = write_config(tmp_path / "run.yaml", config)
    env = {**cli_env(), "PEFTKIT_TEST_KILL_AFTER_STEP": "5"}
    killed = subprocess.run(
        [PYTHON, "-m", "peftkit.cli", "train", path], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    threads = torch.get_num_threads()
    assert cli_main(["train", path]) == 0
    assert torch.get_num_threads() == threads  # the run's setting does not outlive it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["threads"] == 1
    # every parameter trains; the only frozen ones are the classifier's original, replaced by its trained copy
    assert summary["all_params"] - summary["trainable_params"] == 32 * 2 + 2
