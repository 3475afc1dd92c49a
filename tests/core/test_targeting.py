"""peftkit selects exactly the modules HF PEFT (the reference) selects.

Every test builds the same tiny, offline transformers model twice (once per library), wraps it with a
``LoraConfig`` made from the same keyword arguments, and compares the sorted targeted module names:
peftkit's ``pm.base_model.module_targets_by_adapter["default"]`` against HF's
``pm.base_model.targeted_module_names``.

Covered, on llama, mistral, qwen2, gemma, gpt2, opt, bloom, falcon, bert, roberta, t5 and bart:

* the per-architecture default (``target_modules=None``);
* ``"all-linear"`` on the LM model and on the sequence-classification model (output head / classifier
  left out);
* a full-match regex string, a suffix list with ``exclude_modules``, ``modules_to_save`` never targeted;
* ``layers_to_transform`` with and without ``layers_pattern``;
* ``rank_pattern`` / ``alpha_pattern`` giving the same per-module ``r`` and ``scaling``;
* configs HF rejects, and target lists matching nothing: a ``ValueError`` that names the pattern and
  suggests close names, with the model left exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit

VOCAB = 100

# HF PEFT notes that GPT-2's Conv1D needs fan_in_fan_out=True and sets it itself: irrelevant to targeting.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


# ------------------------------------------------------------------------------------------ tiny models
def _decoder_config(config_cls: type, **extra: Any) -> Callable[[], Any]:
    """Llama-style decoder configs (llama, mistral, qwen2, gemma) share their argument names."""
    return lambda: config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **extra,
    )


def _bert_like_config(config_cls: type) -> Callable[[], Any]:
    # is_decoder=True so that the *ForCausalLM / *LMHeadModel classes accept the config without a warning
    return lambda: config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        is_decoder=True,
    )


@dataclass(frozen=True)
class Arch:
    config: Callable[[], Any]
    lm_cls: type  # *ForCausalLM, or *ForConditionalGeneration for encoder-decoders
    lm_task: str  # TaskType name for lm_cls
    cls_cls: type  # *ForSequenceClassification
    cls_head: str  # attribute of cls_cls holding the classification head
    targets: tuple[str, ...]  # a representative suffix list for this architecture


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        _decoder_config(tf.LlamaConfig),
        tf.LlamaForCausalLM,
        "CAUSAL_LM",
        tf.LlamaForSequenceClassification,
        "score",
        ("q_proj", "v_proj", "down_proj"),
    ),
    "mistral": Arch(
        _decoder_config(tf.MistralConfig),
        tf.MistralForCausalLM,
        "CAUSAL_LM",
        tf.MistralForSequenceClassification,
        "score",
        ("k_proj", "o_proj", "up_proj"),
    ),
    "qwen2": Arch(
        _decoder_config(tf.Qwen2Config),
        tf.Qwen2ForCausalLM,
        "CAUSAL_LM",
        tf.Qwen2ForSequenceClassification,
        "score",
        ("q_proj", "v_proj", "gate_proj"),
    ),
    "gemma": Arch(
        _decoder_config(tf.GemmaConfig, head_dim=8),
        tf.GemmaForCausalLM,
        "CAUSAL_LM",
        tf.GemmaForSequenceClassification,
        "score",
        ("q_proj", "v_proj", "down_proj"),
    ),
    "gpt2": Arch(
        lambda: tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        tf.GPT2LMHeadModel,
        "CAUSAL_LM",
        tf.GPT2ForSequenceClassification,
        "score",
        ("c_attn", "c_fc"),
    ),
    "opt": Arch(
        lambda: tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        tf.OPTForCausalLM,
        "CAUSAL_LM",
        tf.OPTForSequenceClassification,
        "score",
        ("q_proj", "v_proj", "fc1"),
    ),
    "bloom": Arch(
        lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
        tf.BloomForCausalLM,
        "CAUSAL_LM",
        tf.BloomForSequenceClassification,
        "score",
        ("query_key_value", "dense_4h_to_h"),
    ),
    "falcon": Arch(
        lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
        tf.FalconForCausalLM,
        "CAUSAL_LM",
        tf.FalconForSequenceClassification,
        "score",
        ("query_key_value", "dense_h_to_4h"),
    ),
    "bert": Arch(
        _bert_like_config(tf.BertConfig),
        tf.BertLMHeadModel,
        "CAUSAL_LM",
        tf.BertForSequenceClassification,
        "classifier",
        ("query", "value", "output.dense"),
    ),
    "roberta": Arch(
        _bert_like_config(tf.RobertaConfig),
        tf.RobertaForCausalLM,
        "CAUSAL_LM",
        tf.RobertaForSequenceClassification,
        "classifier",
        ("query", "key", "intermediate.dense"),
    ),
    "t5": Arch(
        lambda: tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB),
        tf.T5ForConditionalGeneration,
        "SEQ_2_SEQ_LM",
        tf.T5ForSequenceClassification,
        "classification_head",
        ("q", "v", "wo"),
    ),
    "bart": Arch(
        lambda: tf.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        tf.BartForConditionalGeneration,
        "SEQ_2_SEQ_LM",
        tf.BartForSequenceClassification,
        "classification_head",
        ("q_proj", "v_proj", "fc2"),
    ),
}

# (arch, "lm" | "cls") for every architecture: the LM model and the sequence-classification model
MODEL_KINDS = [pytest.param(a, k, id=f"{a}-{k}") for a in ARCHS for k in ("lm", "cls")]


def build(arch: str, kind: str = "lm") -> nn.Module:
    spec = ARCHS[arch]
    torch.manual_seed(0)
    return (spec.lm_cls if kind == "lm" else spec.cls_cls)(spec.config()).eval()


def task_of(arch: str, kind: str) -> str:
    return ARCHS[arch].lm_task if kind == "lm" else "SEQ_CLS"


# ------------------------------------------------------------------------------------------- helpers
def hf_wrap(model: nn.Module, task: str | None = None, **lora: Any) -> tuple[Any, list[str]]:
    lora = copy.deepcopy(lora)  # HF extends modules_to_save lists in place
    if task is not None:
        lora["task_type"] = peft.TaskType[task]
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    return pm, sorted(pm.base_model.targeted_module_names)


def kit_wrap(model: nn.Module, task: str | None = None, **lora: Any) -> tuple[Any, list[str]]:
    lora = copy.deepcopy(lora)
    if task is not None:
        lora["task_type"] = peftkit.TaskType[task]
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora))
    return pm, sorted(pm.base_model.module_targets_by_adapter["default"])


def targets_of_both(build_fn: Callable[[], nn.Module], task: str | None = None, **lora: Any):
    """Sorted targeted names (HF, peftkit) for two fresh copies of the same model."""
    _, hf = hf_wrap(build_fn(), task, **lora)
    _, kit = kit_wrap(build_fn(), task, **lora)
    return hf, kit


def assert_same(hf: list[str], kit: list[str]) -> None:
    assert hf, "the reference selected nothing: the test case is wrong"
    assert kit == hf, (
        f"peftkit selects different modules than HF PEFT.\n"
        f"  only HF:      {sorted(set(hf) - set(kit))}\n"
        f"  only peftkit: {sorted(set(kit) - set(hf))}"
    )


def snapshot(model: nn.Module) -> tuple[list[type], list[str], dict[str, bool], list[str]]:
    return (
        [type(m) for m in model.modules()],
        [n for n, _ in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
        list(model.state_dict()),
    )


# ------------------------------------------------------------------------------ (1) default targets
@pytest.mark.parametrize(("arch", "kind"), MODEL_KINDS)
def test_default_targets(arch: str, kind: str) -> None:
    hf, kit = targets_of_both(lambda: build(arch, kind), task_of(arch, kind))
    assert_same(hf, kit)
    defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[arch]
    assert all(name.rsplit(".", 1)[-1] in defaults for name in kit)


# ----------------------------------------------------------------------------------- (2) all-linear
@pytest.mark.parametrize(("arch", "kind"), MODEL_KINDS)
def test_all_linear(arch: str, kind: str) -> None:
    hf, kit = targets_of_both(lambda: build(arch, kind), task_of(arch, kind), target_modules="all-linear")
    assert_same(hf, kit)

    model = build(arch, kind)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], (nn.Linear, Conv1D)) for n in kit)
    linear = {n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))}
    head = model.get_output_embeddings()
    if head is not None:  # the LM head (lm_head; cls.predictions.decoder for bert/roberta) is never targeted
        head_name = next(n for n, m in modules.items() if m is head)
        assert head_name in linear and head_name not in kit
        assert set(kit) == linear - {head_name}
    if kind == "cls":
        head_name = ARCHS[arch].cls_head
        in_head = [n for n in kit if n == head_name or n.startswith(f"{head_name}.")]
        if head_name in ("classifier", "score"):
            assert not in_head, f"the classification head is targeted: {in_head}"
        else:
            # HF quirk, mirrored on purpose: t5/bart name their head `classification_head`, which is neither
            # in HF's SEQ_CLS_HEAD_NAMES ("classifier", "score") nor in the SEQ_CLS default modules_to_save,
            # so HF puts LoRA on classification_head.dense / .out_proj. Equality with HF is asserted above.
            assert in_head


@pytest.mark.parametrize(
    ("arch", "kind", "exclude"),
    [
        pytest.param("qwen2", "lm", ["mlp.down_proj", "model.layers.0.self_attn.q_proj"], id="qwen2-lm-list"),
        pytest.param("t5", "lm", r"decoder\..*", id="t5-lm-regex"),
        pytest.param("bert", "cls", ["pooler.dense", "attention.output.dense"], id="bert-cls-list"),
    ],
)
def test_all_linear_with_exclude_modules(arch: str, kind: str, exclude: Any) -> None:
    hf, kit = targets_of_both(
        lambda: build(arch, kind), task_of(arch, kind), target_modules="all-linear", exclude_modules=exclude
    )
    assert_same(hf, kit)


# ------------------------------------------------------------------------------------ (3) regex string
@pytest.mark.parametrize(
    ("arch", "regex"),
    [
        pytest.param("llama", r".*\.layers\.\d+\.self_attn\.(q|k)_proj", id="llama-qk"),
        pytest.param("mistral", r"model\.layers\.1\.mlp\..*_proj", id="mistral-layer1-mlp"),
        pytest.param("gpt2", r"transformer\.h\.1\.(attn|mlp)\.c_proj", id="gpt2-c_proj-h1"),
        pytest.param("bert", r"bert\.encoder\.layer\.0\..*\.(query|key)", id="bert-layer0-qk"),
        pytest.param("t5", r".*(SelfAttention|EncDecAttention)\.(q|k)", id="t5-attn-qk"),
        pytest.param("bart", r"model\.decoder\..*_attn\.(k|out)_proj", id="bart-decoder-k-out"),
    ],
)
def test_regex_string(arch: str, regex: str) -> None:
    hf, kit = targets_of_both(lambda: build(arch), ARCHS[arch].lm_task, target_modules=regex)
    assert_same(hf, kit)


# -------------------------------------------------------------------- (4) suffix list + exclude_modules
@pytest.mark.parametrize(
    ("arch", "targets", "exclude"),
    [
        pytest.param(
            "llama",
            ["q_proj", "v_proj", "self_attn.o_proj", "mlp.down_proj"],
            ["model.layers.0.self_attn.q_proj", "down_proj"],
            id="llama-list-exclude",
        ),
        pytest.param("llama", ["q_proj", "v_proj"], r".*\.1\..*", id="llama-regex-exclude"),
        pytest.param("llama", ["model.layers.0.self_attn.q_proj"], None, id="llama-full-name"),
        pytest.param("gpt2", ["c_attn", "c_proj"], ["mlp.c_proj"], id="gpt2-conv1d-exclude"),
        pytest.param("opt", ["q_proj", "v_proj", "fc1", "fc2"], ["layers.1.fc2", "v_proj"], id="opt-exclude"),
        pytest.param("bart", ["q_proj", "v_proj", "fc1"], ["encoder_attn.q_proj"], id="bart-exclude"),
        pytest.param("t5", ["q", "v", "DenseReluDense.wo"], ["EncDecAttention.v"], id="t5-exclude"),
        pytest.param("falcon", ["query_key_value", "dense"], ["mlp.dense_h_to_4h"], id="falcon-exclude"),
    ],
)
def test_suffix_list_with_exclude_modules(arch: str, targets: list[str], exclude: Any) -> None:
    hf, kit = targets_of_both(
        lambda: build(arch), ARCHS[arch].lm_task, target_modules=targets, exclude_modules=exclude
    )
    assert_same(hf, kit)


@pytest.mark.parametrize(("arch", "kind"), MODEL_KINDS)
def test_representative_suffix_list(arch: str, kind: str) -> None:
    hf, kit = targets_of_both(
        lambda: build(arch, kind), task_of(arch, kind), target_modules=list(ARCHS[arch].targets)
    )
    assert_same(hf, kit)


@pytest.mark.parametrize(
    ("arch", "kind", "targets", "modules_to_save"),
    [
        pytest.param("llama", "lm", ["q_proj", "v_proj"], ["v_proj"], id="llama-lm-explicit"),
        pytest.param("bert", "cls", ["query", "value", "dense"], None, id="bert-cls-default-heads"),
        pytest.param("roberta", "cls", ["query", "value", "dense"], None, id="roberta-cls-default-heads"),
    ],
)
def test_modules_to_save_are_never_targeted(
    arch: str, kind: str, targets: list[str], modules_to_save: list[str] | None
) -> None:
    """HF's ``check_target_module_exists`` skips every module inside a ``modules_to_save`` entry (the
    SEQ_CLS defaults "classifier"/"score" included: roberta's classifier.dense is a ``dense``)."""
    hf, kit = targets_of_both(
        lambda: build(arch, kind),
        task_of(arch, kind),
        target_modules=targets,
        modules_to_save=modules_to_save,
    )
    assert_same(hf, kit)


# --------------------------------------------------------------------------- (5) layers_to_transform
# (arch, layers_pattern) with a pattern that names the layer container of that architecture
LAYER_PATTERNS = {
    "llama": "layers",
    "gpt2": "h",
    "opt": "layers",
    "bloom": "h",
    "falcon": "h",
    "bert": "layer",
    "t5": "block",
    "bart": "layers",
}


@pytest.mark.parametrize("with_pattern", [False, True], ids=["no-pattern", "pattern"])
@pytest.mark.parametrize("arch", list(LAYER_PATTERNS))
def test_layers_to_transform(arch: str, with_pattern: bool) -> None:
    lora: dict[str, Any] = {"target_modules": list(ARCHS[arch].targets), "layers_to_transform": [1]}
    if with_pattern:
        lora["layers_pattern"] = LAYER_PATTERNS[arch]
    hf, kit = targets_of_both(lambda: build(arch), ARCHS[arch].lm_task, **lora)
    assert_same(hf, kit)


@pytest.mark.parametrize(
    ("arch", "lora"),
    [
        pytest.param("llama", {"layers_to_transform": 1}, id="llama-int"),
        pytest.param("gpt2", {"layers_to_transform": 0, "layers_pattern": ["h"]}, id="gpt2-int-pattern-list"),
        pytest.param(
            "bart", {"layers_to_transform": [0], "layers_pattern": ["nope", "layers"]}, id="bart-2-patterns"
        ),
        pytest.param("t5", {"layers_to_transform": [0], "layers_pattern": "layer"}, id="t5-inner-layer-0"),
        pytest.param("llama", {"layers_to_transform": [], "layers_pattern": None}, id="llama-empty-list"),
    ],
)
def test_layers_to_transform_variants(arch: str, lora: dict[str, Any]) -> None:
    hf, kit = targets_of_both(lambda: build(arch), ARCHS[arch].lm_task, **lora)
    assert_same(hf, kit)


@pytest.mark.parametrize(
    ("model_cls", "arch", "targets", "pattern"),
    [
        pytest.param(tf.LlamaModel, "llama", ["q_proj", "v_proj"], "layers", id="LlamaModel-layers"),
        pytest.param(tf.GPT2Model, "gpt2", ["c_attn"], "h", id="GPT2Model-h"),
    ],
)
def test_layers_pattern_at_start_of_name(
    model_cls: type, arch: str, targets: list[str], pattern: str
) -> None:
    """A bare backbone's module names start with the layer container (``layers.1.self_attn.q_proj``); HF
    matches ``layers_pattern`` there too (``(?:^|.*?\\.)pattern\\.(\\d+)\\.``)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return model_cls(ARCHS[arch].config())

    hf, kit = targets_of_both(
        make, None, target_modules=targets, layers_to_transform=[1], layers_pattern=pattern
    )
    assert_same(hf, kit)


# ------------------------------------------------------------------------ (6) rank / alpha patterns
@pytest.mark.parametrize(
    ("arch", "lora"),
    [
        pytest.param(
            "llama",
            {
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "rank_pattern": {"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2},
                "alpha_pattern": {"v_proj": 32, r"model\.layers\.0\..*": 3},
            },
            id="llama",
        ),
        pytest.param(
            "llama",
            {
                "target_modules": ["q_proj", "v_proj"],
                "rank_pattern": {"q_proj": 8, r"layers\.1\.self_attn\.q_proj": 2},  # first match wins
                "alpha_pattern": {"proj": 5},  # not a dotted suffix of anything: no effect
            },
            id="llama-first-match-wins",
        ),
        pytest.param(
            "qwen2",
            {
                "target_modules": ["q_proj", "v_proj"],
                "use_rslora": True,
                "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 8},
                "alpha_pattern": {"model.layers.0.self_attn.v_proj": 7},
            },
            id="qwen2-rslora",
        ),
        pytest.param(
            "t5",
            {
                "target_modules": ["q", "v", "wo"],
                "rank_pattern": {"q": 6, r"decoder\..*\.v": 2},
                "alpha_pattern": {"wo": 1, "EncDecAttention.q": 12},
            },
            id="t5",
        ),
        pytest.param(
            "gpt2",
            {
                "target_modules": ["c_attn", "c_proj"],
                "fan_in_fan_out": True,
                "rank_pattern": {"mlp.c_proj": 2},
                "alpha_pattern": {r"h\.1\..*": 16},
            },
            id="gpt2-conv1d",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning")
def test_rank_and_alpha_pattern(arch: str, lora: dict[str, Any]) -> None:
    lora = {"r": 4, "lora_alpha": 8, **lora}
    task = ARCHS[arch].lm_task
    hf_pm, hf = hf_wrap(build(arch), task, **lora)
    kit_pm, kit = kit_wrap(build(arch), task, **lora)
    assert_same(hf, kit)

    def per_module(pm: Any, names: list[str]) -> dict[str, tuple[int, float, int]]:
        modules = dict(pm.base_model.model.named_modules())
        out = {}
        for name in names:
            layer = modules[name]
            out[name] = (
                layer.r["default"],
                layer.scaling["default"],
                layer.lora_A["default"].weight.shape[0],
            )
        return out

    hf_values, kit_values = per_module(hf_pm, hf), per_module(kit_pm, kit)
    assert kit_values.keys() == hf_values.keys()
    for name, (r, scaling, rows) in hf_values.items():
        kit_r, kit_scaling, kit_rows = kit_values[name]
        assert (kit_r, kit_rows) == (r, rows), name
        assert kit_scaling == pytest.approx(scaling, rel=1e-12), name
    assert len({v[0] for v in hf_values.values()}) > 1, "the case should give different ranks"


# ------------------------------------------------------------------- configs HF rejects up front
@pytest.mark.parametrize(
    "lora",
    [
        pytest.param(
            {"target_modules": r".*q_proj", "layers_to_transform": [1]}, id="regex+layers_to_transform"
        ),
        pytest.param(
            {"target_modules": "all-linear", "layers_to_transform": [1]}, id="all-linear+layers_to_transform"
        ),
        pytest.param(
            {"target_modules": r".*q_proj", "layers_to_transform": [1], "layers_pattern": "layers"},
            id="regex+layers_pattern",
        ),
        pytest.param({"target_modules": ["q_proj"], "layers_pattern": "layers"}, id="layers_pattern-alone"),
    ],
)
def test_layer_options_hf_rejects(lora: dict[str, Any]) -> None:
    """HF refuses these in ``LoraConfig.__post_init__`` rather than silently ignoring the layer filter;
    peftkit must refuse them too (at config time or in get_peft_model), and leave the model untouched."""
    with pytest.raises(ValueError):
        hf_wrap(build("llama"), "CAUSAL_LM", **lora)
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError):
        kit_wrap(model, "CAUSAL_LM", **lora)
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("arch", "regex"),
    [
        pytest.param("mistral", r"model\.layers\.1\.mlp\..*", id="mistral-act_fn"),
        pytest.param("bert", r".*\.layer\.0\.attention\.output\..*", id="bert-LayerNorm-dropout"),
    ],
)
def test_target_of_unsupported_type_raises(arch: str, regex: str) -> None:
    """A regex that also matches a non-Linear module (an activation, a LayerNorm): HF raises ValueError
    ("Target module ... is not supported"); peftkit must raise the same type and leave the model as it was."""
    task = ARCHS[arch].lm_task
    with pytest.raises(ValueError, match="not supported"):
        hf_wrap(build(arch), task, target_modules=regex)
    model = build(arch)
    before = snapshot(model)
    with pytest.raises(ValueError):
        kit_wrap(model, task, target_modules=regex)
    assert snapshot(model) == before


# ---------------------------------------------------------------------------------- nothing matches
NO_MATCH = [
    pytest.param("llama", {"target_modules": ["q_prj"]}, id="llama-typo"),
    pytest.param("llama", {"target_modules": ["proj"]}, id="llama-not-a-dotted-suffix"),
    pytest.param("llama", {"target_modules": "q_proj"}, id="llama-regex-must-fullmatch"),
    pytest.param(
        "llama", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, id="llama-all-excluded"
    ),
    pytest.param(
        "llama", {"target_modules": ["q_proj"], "layers_to_transform": [5]}, id="llama-no-such-layer"
    ),
    pytest.param("gpt2", {"target_modules": ["c_atn", "c_fcc"]}, id="gpt2-typos"),
    pytest.param("t5", {"target_modules": ["SelfAttention.qq"]}, id="t5-typo"),
]


@pytest.mark.parametrize(("arch", "lora"), NO_MATCH)
def test_no_match_raises_and_leaves_model_unchanged(arch: str, lora: dict[str, Any]) -> None:
    task = ARCHS[arch].lm_task
    with pytest.raises(ValueError):  # the reference agrees that nothing matches
        hf_wrap(build(arch), task, **lora)

    model = build(arch)
    # a mixed trainability pattern, so that "restored" and "all set to True/False" differ
    for i, param in enumerate(model.parameters()):
        param.requires_grad_(i % 3 != 0)
    before = snapshot(model)
    with pytest.raises(ValueError):
        kit_wrap(model, task, **lora)
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("arch", "typo", "suggestion"),
    [
        pytest.param("llama", "q_prj", "q_proj", id="llama-q_prj"),
        pytest.param("llama", "embed_tokns", "embed_tokens", id="llama-embed_tokns"),
        pytest.param("gpt2", "c_atn", "c_attn", id="gpt2-c_atn"),
        pytest.param("bert", "qurey", "query", id="bert-qurey"),
        pytest.param("bart", "self_attn.k_prj", "k_proj", id="bart-dotted-typo"),
    ],
)
def test_no_match_message_names_pattern_and_suggests(arch: str, typo: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        kit_wrap(build(arch), ARCHS[arch].lm_task, target_modules=[typo])
    message = str(excinfo.value)
    assert typo in message
    assert suggestion in message


def test_failed_add_adapter_leaves_model_unchanged() -> None:
    pm, _ = kit_wrap(build("llama"), "CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    before = snapshot(pm)
    with pytest.raises(ValueError, match="q_prj"):
        pm.add_adapter(
            "other", peftkit.LoraConfig(target_modules=["k_proj", "q_prj"], exclude_modules=["k_proj"])
        )
    assert snapshot(pm) == before
    assert list(pm.peft_config) == ["default"]
    assert pm.base_model.module_targets_by_adapter["default"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_targeted_module_names_is_hf_peft_list_over_all_adapters() -> None:
    """``base_model.targeted_module_names`` is HF PEFT's flat list (each name once, every adapter's)."""
    models = {}
    for name, lib in (("peft", peft), ("peftkit", peftkit)):
        pm = lib.get_peft_model(build("llama"), lib.LoraConfig(target_modules=["q_proj", "v_proj"]))
        pm.add_adapter("other", lib.LoraConfig(target_modules=["v_proj", "o_proj"]))
        models[name] = pm.base_model.targeted_module_names
    assert isinstance(models["peftkit"], list)
    assert sorted(models["peftkit"]) == sorted(models["peft"])
    assert len(models["peftkit"]) == len(set(models["peftkit"])) == 6
