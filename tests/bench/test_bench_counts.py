"""The three parameter counts of a ``peftkit bench`` row, for every registered method, against counts
computed by hand from the tiny models' dimensions.

``bench.parameter_counts`` counts tensors; the expected numbers here are written as formulas in the
model's sizes (``layers × modules × r × (d_in + d_out)`` and so on), each with a comment saying which
tensors it stands for, so that a method that adds, trains or saves something other than what it claims
shows up as a difference. The sizes are small and pairwise different (hidden 32, intermediate 48, 2
layers, 3 labels; llama: hidden 24, key/value width 12, intermediate 40, 3 layers), so that a formula
with a wrong term cannot pass by coincidence.

The three counts (docs/bench.md, "What a row holds"):

* trainable: parameters with ``requires_grad``;
* added: the adapted model's parameters minus the base model's (a ``modules_to_save`` head counts its
  trained copy; parameters trained in place add nothing);
* stored: the parameters in ``adapter_model.safetensors`` (and its size in bytes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import (
    AdaLoraConfig,
    AdapterFusionConfig,
    AdaptionPromptConfig,
    BitFitConfig,
    BottleneckConfig,
    CombinedConfig,
    FreezeConfig,
    HeadOnlyConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PTuningV2Config,
    UniPELTConfig,
    get_peft_model,
)
from peftkit.bench.runner import parameter_counts
from peftkit.core.tuner import count_parameters

# ------------------------------------------------------------------------------- the tiny models
# BERT for sequence classification
H = 32  # hidden size
I = 48  # intermediate (feed-forward) size  # noqa: E741
L = 2  # layers
V = 100  # vocabulary
POS = 64  # position embeddings
TYPES = 2  # token type embeddings (BERT's default)
LABELS = 3
HEAD = H * LABELS + LABELS  # the classifier's trained copy (modules_to_save): weight (labels × H) + bias

# llama (causal LM, grouped-query attention: 4 query heads, 2 key/value heads of width 6)
LH = 24  # hidden size
LHEADS, LKV_HEADS = 4, 2
KV = LH // LHEADS * LKV_HEADS  # = 12, the width of k_proj / v_proj outputs
LI = 40  # intermediate size
LL = 3  # layers


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=POS,
        type_vocab_size=TYPES,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=LH,
        intermediate_size=LI,
        num_hidden_layers=LL,
        num_attention_heads=LHEADS,
        num_key_value_heads=LKV_HEADS,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def linear(d_in: int, d_out: int, bias: bool = True) -> int:
    """Parameters of ``nn.Linear(d_in, d_out)``."""
    return d_in * d_out + (d_out if bias else 0)


# one BERT block: query, key, value, attention output (H → H, with biases), attention LayerNorm (weight +
# bias), intermediate (H → I), output (I → H), output LayerNorm
BERT_BLOCK = 4 * linear(H, H) + 2 * H + linear(H, I) + linear(I, H) + 2 * H
# one llama block: q, o (LH → LH), k, v (LH → KV), gate, up (LH → LI), down (LI → LH), all bias-free;
# two RMSNorms (weight only)
LLAMA_BLOCK = (
    2 * linear(LH, LH, False)
    + 2 * linear(LH, KV, False)
    + 2 * linear(LH, LI, False)
    + linear(LI, LH, False)
    + 2 * LH
)


def test_the_tiny_models_have_the_sizes_the_formulas_assume() -> None:
    # embeddings (word, position, token type, LayerNorm) + blocks + pooler (H → H) + classifier
    bert = V * H + POS * H + TYPES * H + 2 * H + L * BERT_BLOCK + linear(H, H) + HEAD
    assert count_parameters(tiny_bert()) == (bert, bert)
    # embeddings + blocks + final RMSNorm + untied lm_head (LH → V, no bias)
    llama = V * LH + LL * LLAMA_BLOCK + LH + linear(LH, V, False)
    assert count_parameters(tiny_llama()) == (llama, llama)


# ----------------------------------------------------------------------------- hand-counted parts
def lora(n_modules: int, r: int, d_in: int, d_out: int) -> int:
    """LoRA on ``n_modules`` linear layers ``d_in → d_out``: A (r × d_in) and B (d_out × r), no biases."""
    return n_modules * r * (d_in + d_out)


def bottleneck(n_adapters: int, d: int, m: int) -> int:
    """Bottleneck adapters of width ``d`` and bottleneck ``m``: down (d → m) and up (m → d), with biases;
    no layer norms of their own."""
    return n_adapters * (linear(d, m) + linear(m, d))


def gate(n_gates: int, d: int) -> int:
    """UniPELT's gates ``σ(W_g x + b_g)``: ``nn.Linear(d, 1)`` each."""
    return n_gates * linear(d, 1)


# ------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class CountCase:
    """One method on one tiny model, and its three counts by hand."""

    id: str
    peft_type: str
    build: Callable[[], nn.Module]
    # the adapted model (from the base model), and the folder under save_pretrained's directory that holds
    # the adapter whose counts the row reports
    adapt: Callable[[nn.Module], PeftModel]
    trainable: int
    added: int
    stored: int
    folder: str = "."


def plain(config: Callable[[], peftkit.PeftConfig]) -> Callable[[nn.Module], PeftModel]:
    return lambda base: get_peft_model(base, config())


def adalora_after_final_allocation(base: nn.Module) -> PeftModel:
    """AdaLoRA trained to its final step: ``target_r`` ranks per module on average survive, so the file
    (HF PEFT's format) keeps only those, while the model keeps every ``init_r`` rank."""
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=2, init_lora_weights=False, task_type="SEQ_CLS")
    model = get_peft_model(base, config)  # random Λ (init_lora_weights=False): every rank has a score
    model.train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (4, 7), generator=generator)
    model(input_ids=input_ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    model.base_model.update_and_allocate(1)
    model.base_model.update_and_allocate(2)  # the final allocation: the budget is target_r × modules
    return model.eval()


def fusion_of_two_adapters(base: nn.Module) -> PeftModel:
    """Two bottleneck adapters (each with its own head, as when trained for two tasks) and an
    AdapterFusion over them, the fusion active and trainable."""
    model = get_peft_model(
        base, BottleneckConfig(bottleneck_size=5, task_type="SEQ_CLS"), adapter_name="sst2"
    )
    model.add_adapter("cola", BottleneckConfig(bottleneck_size=5, task_type="SEQ_CLS"))
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"], task_type="SEQ_CLS"))
    model.set_adapter("fusion")
    return model


def _cases() -> list[CountCase]:
    cases: list[CountCase] = []

    def case(id: str, peft_type: str, build, adapt, trainable: int, added: int, stored: int, **kw):
        cases.append(CountCase(id, peft_type, build, adapt, trainable, added, stored, **kw))

    # --- LoRA: A (r × in) + B (out × r) on query and value (H → H) of every layer
    lora_qv = lora(L * 2, 4, H, H)
    case(
        "lora-bert", "LORA", tiny_bert,
        plain(lambda: LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
        lora_qv + HEAD, lora_qv + HEAD, lora_qv + HEAD,
    )  # fmt: skip
    case(  # rsLoRA changes the scaling only
        "rslora-bert", "LORA", tiny_bert,
        plain(lambda: LoraConfig(r=4, use_rslora=True, target_modules=["query", "value"], task_type="SEQ_CLS")),
        lora_qv + HEAD, lora_qv + HEAD, lora_qv + HEAD,
    )  # fmt: skip
    # bias="lora_only": the wrapped layers' own biases (H each) train and are saved, but are not new
    case(
        "lora-bias-lora-only-bert", "LORA", tiny_bert,
        plain(lambda: LoraConfig(r=4, bias="lora_only", target_modules=["query", "value"], task_type="SEQ_CLS")),
        lora_qv + L * 2 * H + HEAD, lora_qv + HEAD, lora_qv + L * 2 * H + HEAD,
    )  # fmt: skip
    # DoRA: plus one magnitude per output feature (H) of each wrapped layer
    case(
        "dora-bert", "LORA", tiny_bert,
        plain(lambda: LoraConfig(r=4, use_dora=True, target_modules=["query", "value"], task_type="SEQ_CLS")),
        lora_qv + L * 2 * H + HEAD, lora_qv + L * 2 * H + HEAD, lora_qv + L * 2 * H + HEAD,
    )  # fmt: skip
    # LoRA on the input embeddings (A: r × V, B: LH × r) and q_proj (LH → LH); save_embedding_layers="auto"
    # also stores the base embedding table (V × LH) because target_modules names embed_tokens (HF PEFT's rule)
    lora_embed = 4 * (V + LH) + lora(LL, 4, LH, LH)
    case(
        "lora-embedding-llama", "LORA", tiny_llama,
        plain(lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
        lora_embed, lora_embed, lora_embed + V * LH,
    )  # fmt: skip

    # --- AdaLoRA: Q (r × in), Λ (r × 1), P (out × r) on query and value (the default for bert); ranknum is a
    # plain tensor, not a parameter
    adalora_init = L * 2 * 6 * (H + 1 + H)
    case(
        "adalora-bert", "ADALORA", tiny_bert,
        plain(lambda: AdaLoraConfig(init_r=6, target_r=2, total_step=10, task_type="SEQ_CLS")),
        adalora_init + HEAD, adalora_init + HEAD, adalora_init + HEAD,
    )  # fmt: skip
    # after the final allocation: target_r × modules ranks in the file (each rank is H + 1 + H numbers)
    case(
        "adalora-allocated-bert", "ADALORA", tiny_bert, adalora_after_final_allocation,
        adalora_init + HEAD, adalora_init + HEAD, 2 * (L * 2) * (H + 1 + H) + HEAD,
    )  # fmt: skip

    # --- IA3 on bert's defaults: key, value (scale outputs: H each) and every "output.dense", which are all
    # feed-forward modules and so scale their input: attention.output.dense (H) and output.dense (I)
    ia3_bert = L * (H + H + H + I)
    case(
        "ia3-bert", "IA3", tiny_bert, plain(lambda: IA3Config(task_type="SEQ_CLS")),
        ia3_bert + HEAD, ia3_bert + HEAD, ia3_bert + HEAD,
    )  # fmt: skip
    # llama's defaults: k_proj, v_proj (outputs: KV each), down_proj (feed-forward: its input, LI)
    ia3_llama = LL * (KV + KV + LI)
    case(
        "ia3-llama", "IA3", tiny_llama, plain(lambda: IA3Config()),
        ia3_llama, ia3_llama, ia3_llama,
    )  # fmt: skip
    # --- LN Tuning on llama's defaults: a trained copy of each block's two RMSNorms and the final one (LH each)
    ln_llama = (2 * LL + 1) * LH
    case(
        "ln-tuning-llama", "LN_TUNING", tiny_llama, plain(lambda: peftkit.LNTuningConfig()),
        ln_llama, ln_llama, ln_llama,
    )  # fmt: skip
    # --- TrainableTokens: 5 rows of the (untied) input embedding, LH wide each
    case(
        "trainable-tokens-llama", "TRAINABLE_TOKENS", tiny_llama,
        plain(lambda: peftkit.TrainableTokensConfig(token_indices=[0, 3, 7, 11, 99])),
        5 * LH, 5 * LH, 5 * LH,
    )  # fmt: skip

    # --- bottleneck adapters (width H): Houlsby two per layer (attention and feed-forward output), reduction
    # factor 4 → m = 8; Pfeiffer one per layer (feed-forward output) with m = 5; parallel one per layer (reads
    # the feed-forward input, H wide) with m = 3
    houlsby = bottleneck(2 * L, H, H // 4)
    case(
        "bottleneck-houlsby-bert", "BOTTLENECK", tiny_bert,
        plain(lambda: BottleneckConfig(style="houlsby", reduction_factor=4, task_type="SEQ_CLS")),
        houlsby + HEAD, houlsby + HEAD, houlsby + HEAD,
    )  # fmt: skip
    pfeiffer = bottleneck(L, H, 5)
    case(
        "bottleneck-pfeiffer-bert", "BOTTLENECK", tiny_bert,
        plain(lambda: BottleneckConfig(style="pfeiffer", bottleneck_size=5, task_type="SEQ_CLS")),
        pfeiffer + HEAD, pfeiffer + HEAD, pfeiffer + HEAD,
    )  # fmt: skip
    parallel = bottleneck(LL, LH, 3)
    case(
        "bottleneck-parallel-llama", "BOTTLENECK", tiny_llama,
        plain(lambda: BottleneckConfig(style="parallel", bottleneck_size=3)),
        parallel, parallel, parallel,
    )  # fmt: skip

    # --- AdapterFusion over two Pfeiffer adapters: per layer query, key, value (H → H, with biases). Only the
    # fusion and its head train and are saved (the fused adapters go to their own folders); the model gained
    # both adapters, the fusion and three head copies (one per adapter)
    fusion = L * 3 * linear(H, H)
    case(
        "fusion-bert", "ADAPTER_FUSION", tiny_bert, fusion_of_two_adapters,
        fusion + HEAD, 2 * pfeiffer + fusion + 3 * HEAD, fusion + HEAD, folder="fusion",
    )  # fmt: skip

    # --- soft prompts
    prompt = 7 * H  # 7 virtual tokens of width H
    case(
        "prompt-tuning-bert", "PROMPT_TUNING", tiny_bert,
        plain(lambda: PromptTuningConfig(num_virtual_tokens=7, task_type="SEQ_CLS")),
        prompt + HEAD, prompt + HEAD, prompt + HEAD,
    )  # fmt: skip
    # P-Tuning, MLP encoder of width 20: embedding (7 × H), H → 20 → 20 → H with biases. The file holds the
    # encoder's output only (7 × H), HF PEFT's format: stored < trainable
    mlp_encoder = prompt + linear(H, 20) + linear(20, 20) + linear(20, H)
    case(
        "p-tuning-mlp-bert", "P_TUNING", tiny_bert,
        plain(lambda: PromptEncoderConfig(num_virtual_tokens=7, encoder_hidden_size=20, task_type="SEQ_CLS")),
        mlp_encoder + HEAD, mlp_encoder + HEAD, prompt + HEAD,
    )  # fmt: skip
    # LSTM encoder, hidden h = 8, 2 layers, bidirectional: per direction and layer 4h × (input + h) weights
    # and two 4h biases (layer 0 reads H, layer 1 reads 2h); then 2h → 2h → H with biases
    h = 8
    lstm = 2 * (4 * h * (H + h) + 2 * 4 * h) + 2 * (4 * h * (2 * h + h) + 2 * 4 * h)
    lstm_encoder = prompt + lstm + linear(2 * h, 2 * h) + linear(2 * h, H)
    case(
        "p-tuning-lstm-bert", "P_TUNING", tiny_bert,
        plain(lambda: PromptEncoderConfig(
            num_virtual_tokens=7, encoder_reparameterization_type="LSTM", encoder_hidden_size=h,
            task_type="SEQ_CLS",
        )),
        lstm_encoder + HEAD, lstm_encoder + HEAD, prompt + HEAD,
    )  # fmt: skip
    # Prefix Tuning on llama: 6 tokens × (layers × 2 (key, value) × KV), the key/value heads only (GQA)
    prefix_llama = 6 * LL * 2 * KV
    case(
        "prefix-llama", "PREFIX_TUNING", tiny_llama,
        plain(lambda: PrefixTuningConfig(num_virtual_tokens=6)),
        prefix_llama, prefix_llama, prefix_llama,
    )  # fmt: skip
    # with the projection: embedding (6 × KV, a token is one layer's key width), KV → 20 (tanh) → LL·2·KV,
    # with biases; the file holds the projection's output (the table above)
    projected = 6 * KV + linear(KV, 20) + linear(20, LL * 2 * KV)
    case(
        "prefix-projection-llama", "PREFIX_TUNING", tiny_llama,
        plain(lambda: PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=True, encoder_hidden_size=20)),
        projected, projected, prefix_llama,
    )  # fmt: skip
    # P-Tuning v2 on bert with its defaults: 20 tokens × (layers × 2 × H), and the head
    v2 = 20 * L * 2 * H
    case(
        "p-tuning-v2-bert", "P_TUNING_V2", tiny_bert, plain(lambda: PTuningV2Config()),
        v2 + HEAD, v2 + HEAD, v2 + HEAD,
    )  # fmt: skip
    # Multitask Prompt Tuning: shared prompt P* (5 × H), per task u (5 × r) and v (r × H); 2 tasks, r = 3
    multitask = 5 * H + 2 * 5 * 3 + 2 * 3 * H
    case(
        "multitask-prompt-bert", "MULTITASK_PROMPT_TUNING", tiny_bert,
        plain(lambda: MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=2, num_ranks=3, task_type="SEQ_CLS")),
        multitask + HEAD, multitask + HEAD, multitask + HEAD,
    )  # fmt: skip
    # Adaption prompts in the top 2 of 3 layers: a prompt (5 × LH) and a scalar gate each
    adaption = 2 * (5 * LH + 1)
    case(
        "adaption-prompt-llama", "ADAPTION_PROMPT", tiny_llama,
        plain(lambda: AdaptionPromptConfig(adapter_len=5, adapter_layers=2)),
        adaption, adaption, adaption,
    )  # fmt: skip

    # --- in place: BitFit's biases are the model's own (trainable and stored, not added). Per bert layer:
    # query, key, value (3H), attention output (H), intermediate (I), output (H), two LayerNorms (2H); plus
    # the embeddings' LayerNorm (H). The pooler's bias is in no group.
    biases = L * (3 * H + H + I + H + 2 * H) + H
    case(
        "bitfit-bert", "BITFIT", tiny_bert, plain(lambda: BitFitConfig(task_type="SEQ_CLS")),
        biases + HEAD, HEAD, biases + HEAD,
    )  # fmt: skip
    # llama has no biases: add_missing_biases adds zero ones (new parameters: added too), per layer q (LH),
    # k, v (KV each), o (LH), gate, up (LI each), down (LH)
    new_biases = LL * (LH + 2 * KV + LH + 2 * LI + LH)
    case(
        "bitfit-added-biases-llama", "BITFIT", tiny_llama,
        plain(lambda: BitFitConfig(bias_groups=["attention_qkv", "attention_output", "mlp"], add_missing_biases=True)),
        new_biases, new_biases, new_biases,
    )  # fmt: skip
    # Freeze: the top block trains in place (trainable, stored, not added)
    case(
        "freeze-top1-bert", "FREEZE", tiny_bert,
        plain(lambda: FreezeConfig(trainable_layers=1, task_type="SEQ_CLS")),
        BERT_BLOCK + HEAD, HEAD, BERT_BLOCK + HEAD,
    )  # fmt: skip
    # block 0 and every norm outside it: the embeddings' LayerNorm (2H) and block 1's two (2 × 2H)
    freeze_norms = BERT_BLOCK + 2 * H + 2 * 2 * H
    case(
        "freeze-block0-norms-bert", "FREEZE", tiny_bert,
        plain(lambda: FreezeConfig(trainable_layers=[0], train_norms=True, task_type="SEQ_CLS")),
        freeze_norms + HEAD, HEAD, freeze_norms + HEAD,
    )  # fmt: skip
    case(
        "head-only-bert", "FREEZE", tiny_bert, plain(lambda: HeadOnlyConfig(task_type="SEQ_CLS")),
        HEAD, HEAD, HEAD,
    )  # fmt: skip
    # Full fine-tuning: every parameter of the model trains (the head as its saved copy, the rest in place):
    # embeddings (word, position, token type, LayerNorm), every block, the pooler and the head
    full_bert = V * H + POS * H + TYPES * H + 2 * H + L * BERT_BLOCK + linear(H, H)
    case(
        "full-bert", "FULL", tiny_bert, plain(lambda: peftkit.FullConfig(task_type="SEQ_CLS")),
        full_bert + HEAD, HEAD, full_bert + HEAD,
    )  # fmt: skip

    # --- combinations: the sum of the components, one head copy for the combination
    combined = lora_qv + houlsby
    case(
        "combined-lora-houlsby-bert", "COMBINED", tiny_bert,
        plain(lambda: CombinedConfig(
            components={
                "lora": LoraConfig(r=4, target_modules=["query", "value"]),
                "adapter": BottleneckConfig(style="houlsby", reduction_factor=4),
            },
            task_type="SEQ_CLS",
        )),
        combined + HEAD, combined + HEAD, combined + HEAD,
    )  # fmt: skip
    # MAM, the paper's defaults: a projected prefix (30 tokens; embedding 30 × H, H → 800 (tanh) → L·2·H) and
    # a parallel adapter with bottleneck 512 per layer; the file holds the prefix table (30 × L·2·H)
    mam_prefix = 30 * H + linear(H, 800) + linear(800, L * 2 * H)
    mam_adapter = bottleneck(L, H, 512)
    case(
        "mam-bert", "MAM", tiny_bert, plain(lambda: MAMConfig(task_type="SEQ_CLS")),
        mam_prefix + mam_adapter + HEAD, mam_prefix + mam_adapter + HEAD, 30 * L * 2 * H + mam_adapter + HEAD,
    )  # fmt: skip
    # UniPELT, the paper's defaults, each part with its gates (H → 1): LoRA r = 8 on query and value, one gate
    # per wrapped layer; a projected prefix (10 tokens, MLP 512), one gate per attention layer; a Pfeiffer
    # adapter (reduction 16 → m = 2) with one gate per adapter. The file holds the prefix table (10 × L·2·H)
    uni_lora = lora(L * 2, 8, H, H) + gate(L * 2, H)
    uni_prefix = 10 * H + linear(H, 512) + linear(512, L * 2 * H)
    uni_rest = gate(L, H) + bottleneck(L, H, H // 16) + gate(L, H)  # prefix gates, adapter and its gates
    uni = uni_lora + uni_prefix + uni_rest
    case(
        "unipelt-bert", "UNIPELT", tiny_bert, plain(lambda: UniPELTConfig(task_type="SEQ_CLS")),
        uni + HEAD, uni + HEAD, uni_lora + 10 * L * 2 * H + uni_rest + HEAD,
    )  # fmt: skip
    return cases


CASES = _cases()


def test_every_registered_method_has_a_hand_count() -> None:
    missing = set(peftkit.registered_methods()) - {c.peft_type for c in CASES}
    assert not missing, f"add hand-counted cases to tests/bench/test_bench_counts.py for {sorted(missing)}"


def _safetensors_header_length(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        json.loads(f.read(length))  # the header is the JSON it claims to be
    return length


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bench_counts_equal_the_hand_counts(case: CountCase, tmp_path: Path) -> None:
    base = case.build()
    base_params = count_parameters(base)[1]  # as bench takes it: the base model before adapting
    model = case.adapt(base)
    model.save_pretrained(tmp_path)
    folder = tmp_path / case.folder
    counts = parameter_counts(model, base_params, str(folder))

    expected = {"trainable_params": case.trainable, "added_params": case.added, "stored_params": case.stored}
    assert {k: counts[k] for k in expected} == expected
    # every saved tensor is float32: the file is the 8-byte length, the JSON header and 4 bytes a parameter
    weights = folder / "adapter_model.safetensors"
    header = _safetensors_header_length(weights)
    assert counts["stored_bytes"] == weights.stat().st_size == 8 + header + 4 * case.stored
