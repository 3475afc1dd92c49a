"""Conformance suite: generic promises every registered method keeps, run over a table of cases.

A new method joins by adding its cases to ``CASES``; ``test_every_registered_method_has_a_case`` fails
until it does. Each case builds a tiny model from a seeded config, so "a freshly initialised base" is
the same builder called again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tiny_models import tiny_bart, tiny_bert_seq_cls, tiny_gpt2, tiny_llama, tiny_llama_tied, tiny_t5
from torch import nn

import peftkit
from peftkit import (
    AdapterLayer,
    BitFitConfig,
    FreezeConfig,
    HeadOnlyConfig,
    LoraConfig,
    ModulesToSaveWrapper,
    PeftModel,
    get_peft_model,
)


def tiny_bert_cls(seed: int = 0) -> nn.Module:
    return tiny_bert_seq_cls(seed, num_labels=2)


def conformance_t5(seed: int = 0) -> nn.Module:
    return tiny_t5(seed, layers=2, vocab=100)


def conformance_bart(seed: int = 0) -> nn.Module:
    return tiny_bart(seed, layers=2, vocab=100)


@dataclass
class Case:
    """One method on one model."""

    id: str
    peft_type: str
    build_model: Callable[[int], nn.Module]
    config: Callable[[], peftkit.PeftConfig]
    identity_at_init: bool = True  # the method promises an unchanged output right after creation
    mergeable: bool = True
    # the adapter lives only in its own parameters (not so for bias="all", which trains base biases in
    # place, or PiSSA, which moves the principal part of W into the adapter at creation)
    base_untouched: bool = True
    # False when disable_adapter() is a clear error instead (an in-place method that keeps no copy of the
    # original values, such as Freeze)
    disable_supported: bool = True
    # True for methods that train the model's own parameters in place: a second adapter is a clear error
    one_adapter_per_model: bool = False
    # the config of a second adapter beside the first (default: the same config); LoRA's bias="all" trains
    # the shared biases, which only one adapter may do (as in HF PEFT)
    second_config: Callable[[], peftkit.PeftConfig] | None = None
    # the checkpoint holds a computed tensor (a prompt encoder's output, as HF PEFT saves P-Tuning and
    # projected prefixes), not the parameters: the round trip compares outputs and saved tensors
    saved_as_output: bool = False
    # extra inputs of the adapted model only (Multitask Prompt Tuning's task_ids)
    inputs: dict[str, Any] = field(default_factory=dict)
    # extra inputs of every model, base or adapted (an encoder-decoder model's decoder_input_ids)
    model_inputs: dict[str, Any] = field(default_factory=dict)


def _ids(vocab: int = 100) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return {"input_ids": torch.randint(0, vocab, (3, 9), generator=generator)}


CASES = [
    Case("lora-llama", "LORA", tiny_llama, lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    Case("lora-llama-all-linear", "LORA", tiny_llama, lambda: LoraConfig(r=4, target_modules="all-linear")),
    Case(
        "lora-rslora-dropout", "LORA", tiny_llama, lambda: LoraConfig(r=4, use_rslora=True, lora_dropout=0.1)
    ),
    Case(
        "dora-llama", "LORA", tiny_llama, lambda: LoraConfig(r=4, use_dora=True, target_modules="all-linear")
    ),
    Case("lora-gpt2-conv1d", "LORA", tiny_gpt2, lambda: LoraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    Case("dora-gpt2-conv1d", "LORA", tiny_gpt2, lambda: LoraConfig(r=4, use_dora=True)),
    Case(
        "dora-embedding",
        "LORA",
        tiny_llama,
        lambda: LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens", "v_proj"]),
    ),
    Case(
        "lora-embedding",
        "LORA",
        tiny_llama,
        lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
    ),
    Case(
        "lora-bias-all",
        "LORA",
        tiny_bert_cls,
        lambda: LoraConfig(r=4, bias="all", task_type="SEQ_CLS"),
        base_untouched=False,
        second_config=lambda: LoraConfig(r=4, task_type="SEQ_CLS"),
    ),
    Case("lora-bert-seq-cls", "LORA", tiny_bert_cls, lambda: LoraConfig(r=4, task_type="SEQ_CLS")),
    Case(
        "lora-pissa",
        "LORA",
        tiny_llama,
        lambda: LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "o_proj"]),
        base_untouched=False,
    ),
    Case(
        "lora-trainable-tokens-tied",
        "LORA",
        tiny_llama_tied,
        lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 5, 9]),
        second_config=lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[2, 6]),
    ),
    Case("ln-tuning-llama", "LN_TUNING", tiny_llama, lambda: peftkit.LNTuningConfig()),
    Case(
        "ln-tuning-bert-seq-cls",
        "LN_TUNING",
        tiny_bert_cls,
        lambda: peftkit.LNTuningConfig(target_modules=["LayerNorm"], task_type="SEQ_CLS"),
    ),
    Case(
        "trainable-tokens-llama",
        "TRAINABLE_TOKENS",
        tiny_llama,
        lambda: peftkit.TrainableTokensConfig(token_indices=[0, 4, 50]),
    ),
    Case(
        "trainable-tokens-llama-tied",
        "TRAINABLE_TOKENS",
        tiny_llama_tied,
        lambda: peftkit.TrainableTokensConfig(token_indices=[0, 4, 50]),
        second_config=lambda: peftkit.TrainableTokensConfig(token_indices=[1, 7]),
    ),
]

# In-place methods (they train some of the model's own parameters; see tests/methods/test_selective.py). BitFit
# keeps a copy of the original biases, so disabling and deleting give the base model back.
CASES += [
    Case(
        "bitfit-bert-seq-cls",
        "BITFIT",
        tiny_bert_cls,
        lambda: BitFitConfig(task_type="SEQ_CLS"),
        one_adapter_per_model=True,
    ),
    Case(
        "bitfit-gpt2-qkv-mlp",
        "BITFIT",
        tiny_gpt2,
        lambda: BitFitConfig(bias_groups=["attention_qkv", "mlp"]),
        one_adapter_per_model=True,
    ),
    Case(
        "bitfit-llama-added-biases",
        "BITFIT",
        tiny_llama,
        lambda: BitFitConfig(
            bias_groups=["attention_qkv", "attention_output", "mlp"], add_missing_biases=True
        ),
        one_adapter_per_model=True,
    ),
    Case(
        "freeze-gpt2-top1",
        "FREEZE",
        tiny_gpt2,
        lambda: FreezeConfig(trainable_layers=1),
        base_untouched=False,
        disable_supported=False,
        one_adapter_per_model=True,
    ),
    Case(
        "freeze-bert-seq-cls-norms",
        "FREEZE",
        tiny_bert_cls,
        lambda: FreezeConfig(trainable_layers=[1], train_norms=True, task_type="SEQ_CLS"),
        base_untouched=False,
        disable_supported=False,
        one_adapter_per_model=True,
    ),
    Case("head-only-bert", "FREEZE", tiny_bert_cls, lambda: HeadOnlyConfig(task_type="SEQ_CLS")),
    Case(
        "full-bert-seq-cls",
        "FULL",
        tiny_bert_cls,
        lambda: peftkit.FullConfig(task_type="SEQ_CLS"),
        base_untouched=False,
        disable_supported=False,
        one_adapter_per_model=True,
    ),
    Case(
        "full-llama",
        "FULL",
        tiny_llama_tied,
        lambda: peftkit.FullConfig(),
        base_untouched=False,
        disable_supported=False,
        one_adapter_per_model=True,
    ),
]

# AdaLoRA: SVD-form updates P Λ Q with Λ = 0 at init (a no-op); GPT-2 exercises Conv1D (fan_in_fan_out).
CASES += [
    Case(
        "adalora-llama",
        "ADALORA",
        tiny_llama,
        lambda: peftkit.AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]
        ),
    ),
    Case(
        "adalora-gpt2-conv1d-dropout",
        "ADALORA",
        tiny_gpt2,
        lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_dropout=0.1),
    ),
]

# IA3: vectors that rescale outputs (keys, values) or inputs (feed-forward); architecture defaults.
CASES += [
    Case("ia3-llama", "IA3", tiny_llama, lambda: peftkit.IA3Config()),
    Case(
        "ia3-llama-all-linear",
        "IA3",
        tiny_llama,
        lambda: peftkit.IA3Config(target_modules="all-linear", feedforward_modules=["up_proj", "down_proj"]),
    ),
    Case("ia3-gpt2-conv1d", "IA3", tiny_gpt2, lambda: peftkit.IA3Config()),
    Case("ia3-bert-seq-cls", "IA3", tiny_bert_cls, lambda: peftkit.IA3Config(task_type="SEQ_CLS")),
]


# Bottleneck adapters (not mergeable): every style, a tapped feed-forward input (bert's parallel adapter
# reads the input of ``intermediate``), near-identity init and AdapterDrop's drop_layers.
CASES += [
    Case(
        "bottleneck-houlsby-bert-seq-cls",
        "BOTTLENECK",
        tiny_bert_cls,
        lambda: peftkit.BottleneckConfig(style="houlsby", reduction_factor=4, task_type="SEQ_CLS"),
        mergeable=False,
    ),
    Case(
        "bottleneck-pfeiffer-gpt2",
        "BOTTLENECK",
        tiny_gpt2,
        lambda: peftkit.BottleneckConfig(),
        mergeable=False,
    ),
    Case(
        "bottleneck-parallel-llama",
        "BOTTLENECK",
        tiny_llama,
        lambda: peftkit.BottleneckConfig(style="parallel", scaling=4.0, non_linearity="gelu"),
        mergeable=False,
    ),
    Case(
        "bottleneck-parallel-bert-seq-cls",
        "BOTTLENECK",
        tiny_bert_cls,
        lambda: peftkit.BottleneckConfig(style="parallel", bottleneck_size=3, task_type="SEQ_CLS"),
        mergeable=False,
    ),
    Case(
        "bottleneck-parallel-attention-gpt2",
        "BOTTLENECK",
        tiny_gpt2,
        lambda: peftkit.BottleneckConfig(style="parallel", parallel_placement="both", scaling=2.0),
        mergeable=False,
    ),
    Case(
        "bottleneck-houlsby-init-drop-llama",
        "BOTTLENECK",
        tiny_llama,
        lambda: peftkit.BottleneckConfig(
            style="houlsby", init="houlsby", drop_layers=1, non_linearity="tanh"
        ),
        identity_at_init=False,
        mergeable=False,
    ),
]
# Methods that cannot wrap a bare model, with the file that tests their promises instead: a fusion needs
# trained adapters to fuse.
COVERED_ELSEWHERE = {"ADAPTER_FUSION": "tests/methods/test_bottleneck_fusion.py"}


# Soft prompts (virtual tokens / key-value prefixes): they change the output from the start and cannot merge.
_PROMPT = {"identity_at_init": False, "mergeable": False}
CASES += [
    Case(
        "prompt-tuning-llama",
        "PROMPT_TUNING",
        tiny_llama,
        lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4),
        **_PROMPT,
    ),
    Case(
        "prompt-tuning-bert-seq-cls",
        "PROMPT_TUNING",
        tiny_bert_cls,
        lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"),
        **_PROMPT,
    ),
    Case(
        "prefix-llama-gqa",
        "PREFIX_TUNING",
        tiny_llama,
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=4),
        **_PROMPT,
    ),
    Case(
        "prefix-projection-gpt2",
        "PREFIX_TUNING",
        tiny_gpt2,
        lambda: peftkit.PrefixTuningConfig(
            num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
        ),
        saved_as_output=True,
        **_PROMPT,
    ),
    Case(
        "p-tuning-mlp-gpt2",
        "P_TUNING",
        tiny_gpt2,
        lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
        saved_as_output=True,
        **_PROMPT,
    ),
    Case(
        "p-tuning-lstm-bert-seq-cls",
        "P_TUNING",
        tiny_bert_cls,
        lambda: peftkit.PromptEncoderConfig(
            num_virtual_tokens=4,
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=8,
            task_type="SEQ_CLS",
        ),
        saved_as_output=True,
        **_PROMPT,
    ),
    Case(
        "p-tuning-v2-bert-seq-cls",
        "P_TUNING_V2",
        tiny_bert_cls,
        lambda: peftkit.PTuningV2Config(num_virtual_tokens=4),
        **_PROMPT,
    ),
]

# Encoder-decoder models (T5, BART): a prefix fills the decoder's self-attention cache (HF PEFT's placement);
# with encoder_prefix=True every encoder self-attention layer gets its own trained prefix too (peftkit only).
_DECODER_IDS = {
    "decoder_input_ids": torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(5))
}
_SEQ2SEQ_PROMPT = {**_PROMPT, "model_inputs": _DECODER_IDS}
CASES += [
    Case(
        "prefix-t5-decoder",
        "PREFIX_TUNING",
        conformance_t5,
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"),
        **_SEQ2SEQ_PROMPT,
    ),
    Case(
        "prefix-t5-encoder_prefix",
        "PREFIX_TUNING",
        conformance_t5,
        lambda: peftkit.PrefixTuningConfig(
            num_virtual_tokens=3, encoder_prefix=True, task_type="SEQ_2_SEQ_LM"
        ),
        **_SEQ2SEQ_PROMPT,
    ),
    Case(
        "prefix-bart-encoder_prefix",
        "PREFIX_TUNING",
        conformance_bart,
        lambda: peftkit.PrefixTuningConfig(
            num_virtual_tokens=3, encoder_prefix=True, task_type="SEQ_2_SEQ_LM"
        ),
        **_SEQ2SEQ_PROMPT,
    ),
    Case(
        "prefix-bart-encoder_prefix-projection",
        "PREFIX_TUNING",
        conformance_bart,
        lambda: peftkit.PrefixTuningConfig(
            num_virtual_tokens=3,
            encoder_prefix=True,
            prefix_projection=True,
            encoder_hidden_size=8,
            task_type="SEQ_2_SEQ_LM",
        ),
        saved_as_output=True,
        **_SEQ2SEQ_PROMPT,
    ),
]

# Multitask Prompt Tuning: each row's task prompt P* ∘ (u_t v_tᵀ); task_ids (one per row of _ids()) reach
# the adapted model only, and cover both tasks so that every task factor trains.
CASES += [
    Case(
        "multitask-prompt-llama",
        "MULTITASK_PROMPT_TUNING",
        tiny_llama,
        lambda: peftkit.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2, num_ranks=2),
        inputs={"task_ids": torch.tensor([0, 1, 0])},
        **_PROMPT,
    ),
    Case(
        "multitask-prompt-bert-seq-cls",
        "MULTITASK_PROMPT_TUNING",
        tiny_bert_cls,
        lambda: peftkit.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2, task_type="SEQ_CLS"),
        inputs={"task_ids": torch.tensor([1, 0, 1])},
        **_PROMPT,
    ),
]

# Adaption prompts (LLaMA-Adapter): gated prompts in the top attention layers; a zero gate makes a fresh
# adapter the identity. Not mergeable (the prompt term depends on the queries).
CASES += [
    Case(
        "adaption-prompt-llama-gqa",
        "ADAPTION_PROMPT",
        tiny_llama,
        lambda: peftkit.AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
        mergeable=False,
    ),
    Case(
        "adaption-prompt-llama-top1-causal-lm",
        "ADAPTION_PROMPT",
        tiny_llama,
        lambda: peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM"),
        mergeable=False,
    ),
]

# Combinations (methods/combined.py, mam.py, unipelt.py): several methods as one adapter. With a prefix
# component the output changes from the start; a projected prefix is saved as its output (as alone).
# Only a combination of mergeable methods on disjoint modules merges (LoRA on q_proj + IA3 on k, v, down).
CASES += [
    Case(
        "mam-bert-seq-cls-paper-defaults",
        "MAM",
        tiny_bert_cls,
        lambda: peftkit.MAMConfig(task_type="SEQ_CLS"),
        saved_as_output=True,
        **_PROMPT,
    ),
    Case(
        "mam-llama-gqa-table-prefix",
        "MAM",
        tiny_llama,
        lambda: peftkit.MAMConfig().with_component(
            "prefix", peftkit.PrefixTuningConfig(num_virtual_tokens=4)
        ),
        **_PROMPT,
    ),
    Case(
        "unipelt-bert-seq-cls-paper-defaults",
        "UNIPELT",
        tiny_bert_cls,
        lambda: peftkit.UniPELTConfig(task_type="SEQ_CLS"),
        saved_as_output=True,
        **_PROMPT,
    ),
    Case(
        "unipelt-llama-gqa-table-prefix",
        "UNIPELT",
        tiny_llama,
        lambda: peftkit.UniPELTConfig().with_component(
            "prefix", peftkit.PrefixTuningConfig(num_virtual_tokens=4)
        ),
        **_PROMPT,
    ),
    Case(
        "unipelt-ap-no-lora-gpt2",
        "UNIPELT",
        tiny_gpt2,
        lambda: (
            peftkit.UniPELTConfig()
            .with_component("lora", None)
            .with_component("prefix", peftkit.PrefixTuningConfig(num_virtual_tokens=3))
        ),
        **_PROMPT,
    ),
    Case(
        "combined-prefix-parallel-llama",
        "COMBINED",
        tiny_llama,
        lambda: peftkit.CombinedConfig(
            components={
                "prefix": peftkit.PrefixTuningConfig(num_virtual_tokens=4),
                "adapter": peftkit.BottleneckConfig(style="parallel", scaling=4.0),
            }
        ),
        **_PROMPT,
    ),
    Case(
        "combined-lora-bottleneck-bert-seq-cls",
        "COMBINED",
        tiny_bert_cls,
        lambda: peftkit.CombinedConfig(
            components={
                "lora": LoraConfig(r=4, target_modules=["query", "value"]),
                "adapter": peftkit.BottleneckConfig(style="houlsby", reduction_factor=4),
            },
            task_type="SEQ_CLS",
        ),
        mergeable=False,
    ),
    Case(
        "combined-lora-ia3-llama-mergeable",
        "COMBINED",
        tiny_llama,
        lambda: peftkit.CombinedConfig(
            components={"lora": LoraConfig(r=4, target_modules=["q_proj"]), "ia3": peftkit.IA3Config()}
        ),
    ),
]


def _case_inputs(model: nn.Module, case: Case) -> dict[str, Any]:
    """``_ids()``, the case's model inputs and, for an adapted model, its adapter's extra inputs (a plain base
    model takes none)."""
    return {**_ids(), **case.model_inputs, **(case.inputs if isinstance(model, PeftModel) else {})}


def _output(model: nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return model(**_case_inputs(model, case)).logits


def _train(model: nn.Module, case: Case, steps: int = 3) -> None:
    """A few AdamW steps on a loss that every output position feeds (B starts at zero, so A only moves
    from the second step on)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits = model(**_case_inputs(model, case)).logits
        loss = (logits.float() ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _adapter_param_names(model: PeftModel) -> set[str]:
    declared = set()
    for _, param in model.base_model.adapter_parameter_map("default").items():
        declared.add(id(param))
    return {name for name, param in model.named_parameters() if id(param) in declared}


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def test_every_registered_method_has_a_case() -> None:
    covered = {c.peft_type for c in CASES}
    missing = set(peftkit.registered_methods()) - covered - set(COVERED_ELSEWHERE)
    assert not missing, f"add conformance cases for {sorted(missing)}"


def test_fresh_adapter_keeps_output(case: Case) -> None:
    base = case.build_model(0)
    expected = _output(base, case)
    model = get_peft_model(case.build_model(0), case.config())
    if case.identity_at_init:
        torch.testing.assert_close(_output(model, case), expected, atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_train_and_all_of_them_change(case: Case) -> None:
    model = get_peft_model(case.build_model(0), case.config())
    declared = _adapter_param_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == declared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, case)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == declared, (
        f"unchanged: {sorted(declared - changed)}; extra: {sorted(changed - declared)}"
    )


def test_save_load_round_trip_is_exact(case: Case, tmp_path: Any) -> None:
    model = get_peft_model(case.build_model(0), case.config())
    _train(model, case)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build_model(0), tmp_path)
    assert torch.equal(_output(loaded, case), _output(model, case))
    original = model.base_model.adapter_parameter_map("default")
    reloaded = loaded.base_model.adapter_parameter_map("default")
    if case.saved_as_output:
        original = peftkit.get_peft_model_state_dict(model)
        reloaded = peftkit.get_peft_model_state_dict(loaded)
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False
    trainable = PeftModel.from_pretrained(case.build_model(0), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == _adapter_param_names(trainable)


def test_low_cpu_mem_usage_loading_gives_the_same_model(case: Case, tmp_path: Any) -> None:
    """HF PEFT's ``low_cpu_mem_usage=True``: adapters built on the meta device, then the file's tensors take
    their place; the result is the same model as an ordinary load, every parameter on the base's device."""
    model = get_peft_model(case.build_model(0), case.config())
    _train(model, case)
    model.save_pretrained(tmp_path)
    expected = _output(PeftModel.from_pretrained(case.build_model(0), tmp_path), case)
    loaded = PeftModel.from_pretrained(case.build_model(0), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(_output(loaded, case), expected)
    if case.one_adapter_per_model or case.second_config is not None or not case.base_untouched:
        return
    loaded.load_adapter(tmp_path, "again", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("again")
    assert torch.equal(_output(loaded, case), expected)


def test_merge_equals_unmerged_and_unmerge_restores(case: Case) -> None:
    if not case.mergeable:
        pytest.skip("method cannot be merged")
    model = get_peft_model(case.build_model(0), case.config())
    _train(model, case)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = _output(model, case)
    model.merge_adapter()
    torch.testing.assert_close(_output(model, case), unmerged, atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(_output(model, case), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights_before[name], atol=1e-5, rtol=1e-5, msg=name)
    merged_model = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged_model.modules())
    assert type(merged_model) is type(case.build_model(0))
    torch.testing.assert_close(_output(merged_model, case), unmerged, atol=1e-4, rtol=1e-4)


def test_disable_adapter_gives_base_output(case: Case) -> None:
    if not case.disable_supported:
        model = get_peft_model(case.build_model(0), case.config())
        _train(model, case)
        trained = _output(model, case)
        with pytest.raises(ValueError, match="disable_adapter"), model.disable_adapter():
            pass
        assert torch.equal(_output(model, case), trained)
        return
    if not case.base_untouched:
        pytest.skip("the method changes base parameters, so 'disabled' is not the original model")
    reference = case.build_model(0)
    model = get_peft_model(case.build_model(0), case.config())
    _train(model, case)
    trained = _output(model, case)
    with model.disable_adapter():
        torch.testing.assert_close(_output(model, case), _output(reference, case), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_output(model, case), trained)
    if case.mergeable:  # a merged model is unmerged inside the block and merged again after it
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(_output(model, case), _output(reference, case), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_output(model, case), trained, atol=1e-4, rtol=1e-4)


def test_delete_adapter_removes_every_trace(case: Case) -> None:
    model = get_peft_model(case.build_model(0), case.config())
    reference_keys = set(case.build_model(0).state_dict())
    if case.one_adapter_per_model:
        with pytest.raises(ValueError, match="only adapter"):
            model.add_adapter("other", case.config())
    else:
        model.add_adapter("other", (case.second_config or case.config)())
    _train(model, case)
    if "other" in model.peft_config:
        model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any("other" in name.split(".") for name, _ in model.named_parameters())
    model.delete_adapter("default")
    assert model.peft_config == {}
    base = model.get_base_model()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in base.modules())
    if case.base_untouched:
        assert set(base.state_dict()) == reference_keys
        torch.testing.assert_close(_output(base, case), _output(case.build_model(0), case))


def test_duplicate_adapter_name_raises_and_changes_nothing(case: Case) -> None:
    model = get_peft_model(case.build_model(0), case.config())
    _train(model, case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", case.config())
    assert [type(m) for m in model.modules()] == modules
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_inject_with_low_cpu_mem_usage_leaves_meta_parameters_that_loading_fills(tmp_path: Any) -> None:
    """``inject_adapter_in_model(..., low_cpu_mem_usage=True)`` allocates nothing for the adapter (HF PEFT's
    meta-device layers); ``set_peft_model_state_dict`` then gives every parameter its saved value."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    trained = get_peft_model(tiny_llama(0), config)
    case = CASES[0]
    _train(trained, case)
    expected = _output(trained, case)
    model = peftkit.inject_adapter_in_model(config, tiny_llama(0), low_cpu_mem_usage=True)
    on_meta = {part for n, p in model.named_parameters() if p.device.type == "meta" for part in n.split(".")}
    assert on_meta >= {"lora_A", "lora_B", "lora_magnitude_vector"}
    saved = peftkit.get_peft_model_state_dict(
        trained
    )  # keys of a PeftModel; an injected model's lack the prefix
    peftkit.set_peft_model_state_dict(
        model, {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    )
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(_output(model, case), expected, atol=0, rtol=0)


def test_low_cpu_mem_usage_leaves_other_threads_alone() -> None:
    """The meta-device block acts in its own thread only: a module another thread builds meanwhile is real."""
    import threading

    from peftkit.core.layer import new_parameters_on_meta

    inside, built = threading.Event(), threading.Event()
    devices = {}

    def other() -> None:
        inside.wait(5)
        devices["other"] = nn.Linear(4, 4).weight.device.type
        built.set()

    thread = threading.Thread(target=other)
    thread.start()
    with new_parameters_on_meta():
        devices["inside"] = nn.Linear(4, 4).weight.device.type
        inside.set()
        built.wait(5)
    thread.join()
    assert devices == {"inside": "meta", "other": "cpu"}
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # and nothing stays patched
