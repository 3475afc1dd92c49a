"""What peftkit knows about each architecture, in one place: per ``model.config.model_type``, which
modules play which role (attention projections, feed-forward layers, block sub-layers, encoder attention).

Methods read these tables for their defaults and placements; adding an architecture means adding its rows
here (and, for a method with a table of its own defaults, that table's row). The tables that mirror HF
PEFT's constants keep HF PEFT's entries, so a config without ``target_modules`` selects the same modules
in both libraries. Nothing here imports from peftkit.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------- LoRA-family default targets
# Default targets per ``model.config.model_type`` (the attention query/value projections, as in the
# LoRA paper), matching HF PEFT's table so configs without target_modules behave the same.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "stablelm": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


# ------------------------------------------------------------------------------------ IA3 defaults
# HF PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
# (peft/utils/constants.py, 0.21), keyed by ``model.config.model_type``.
IA3_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

IA3_DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


# --------------------------------------------------------------- Bottleneck adapters' module roles
_BERT_ROLES = {
    "attention_input": r".*\.layer\.\d+\.attention",
    "attention_output": r".*\.layer\.\d+\.attention\.output\.dense",
    "ffn_output": r".*\.layer\.\d+\.output\.dense",
    "ffn_input": r".*\.layer\.\d+\.intermediate",
}
_LLAMA_ROLES = {
    "attention_input": r".*\.layers\.\d+\.self_attn",
    "attention_output": r".*\.layers\.\d+\.self_attn\.o_proj",
    "ffn_output": r".*\.layers\.\d+\.mlp\.down_proj",
    "ffn_input": r".*\.layers\.\d+\.mlp",
}
_T5_ROLES = {
    "attention_input": r".*\.block\.\d+\.layer\.0\.SelfAttention",
    "attention_output": r".*\.block\.\d+\.layer\.0\.SelfAttention\.o",
    "ffn_output": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
    "ffn_input": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense",
}
_OPT_ROLES = {  # OPT, and BART's encoder and decoder (self-attention only, not the decoder's cross-attention)
    "attention_input": r".*\.layers\.\d+\.self_attn",
    "attention_output": r".*\.layers\.\d+\.self_attn\.out_proj",
    "ffn_output": r".*\.layers\.\d+\.fc2",
    "ffn_input": r".*\.layers\.\d+\.fc1",
}

#: Full-match regexes of the modules each role names, keyed by ``model.config.model_type``:
#: ``attention_output`` (the attention output projection), ``ffn_output`` (the feed-forward output
#: projection), ``ffn_input`` (the module whose input is the feed-forward sub-layer's input) and
#: ``attention_input`` (the module whose input is the self-attention sub-layer's input).
BOTTLENECK_ROLES: dict[str, dict[str, str]] = {
    "bert": _BERT_ROLES,
    "roberta": _BERT_ROLES,
    "xlm-roberta": _BERT_ROLES,
    "electra": _BERT_ROLES,
    "gpt2": {
        "attention_output": r".*\.h\.\d+\.attn\.c_proj",
        "ffn_output": r".*\.h\.\d+\.mlp\.c_proj",
        "ffn_input": r".*\.h\.\d+\.mlp",
        "attention_input": r".*\.h\.\d+\.attn",
    },
    "llama": _LLAMA_ROLES,
    "mistral": _LLAMA_ROLES,
    "qwen2": _LLAMA_ROLES,
    "qwen3": _LLAMA_ROLES,
    "gemma": _LLAMA_ROLES,
    "t5": _T5_ROLES,
    "mt5": _T5_ROLES,
    "opt": _OPT_ROLES,
    "bart": _OPT_ROLES,
    "mbart": _OPT_ROLES,
}


# ---------------------------------------------------------------------------- BitFit's bias groups
# Module-name patterns of the linear layers in each group, per ``model.config.model_type``: regexes that
# must match the end of the dotted module name. Other model types use ``_fallback_group``.
_BERT_BIAS_GROUPS = {
    "attention_qkv": r"attention\.self\.(query|key|value)",
    "attention_output": r"attention\.output\.dense",
    "mlp": r"intermediate\.dense|\d+\.output\.dense",  # the block's own output.dense, not attention's
}
_DECODER_BIAS_GROUPS = {  # llama and its descendants
    "attention_qkv": r"self_attn\.(q|k|v)_proj",
    "attention_output": r"self_attn\.o_proj",
    "mlp": r"mlp\.(gate|up|down)_proj",
}
_BART_BIAS_GROUPS = {
    "attention_qkv": r"(self_attn|encoder_attn)\.(q|k|v)_proj",
    "attention_output": r"(self_attn|encoder_attn)\.out_proj",
    "mlp": r"fc1|fc2",
}
_T5_BIAS_GROUPS = {
    "attention_qkv": r"(SelfAttention|EncDecAttention)\.(q|k|v)",
    "attention_output": r"(SelfAttention|EncDecAttention)\.o",
    "mlp": r"DenseReluDense\.(wi|wi_0|wi_1|wo)",
}
BIAS_GROUP_PATTERNS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_BIAS_GROUPS),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _DECODER_BIAS_GROUPS),
    **dict.fromkeys(("bart", "mbart"), _BART_BIAS_GROUPS),
    **dict.fromkeys(("t5", "mt5"), _T5_BIAS_GROUPS),
    "gpt2": {
        "attention_qkv": r"attn\.c_attn",
        "attention_output": r"attn\.c_proj",
        "mlp": r"mlp\.c_(fc|proj)",
    },
    "opt": {
        "attention_qkv": r"self_attn\.(q|k|v)_proj",
        "attention_output": r"self_attn\.out_proj",
        "mlp": r"fc1|fc2",
    },
    "bloom": {
        "attention_qkv": r"self_attention\.query_key_value",
        "attention_output": r"self_attention\.dense",
        "mlp": r"mlp\.dense_(h_to_4h|4h_to_h)",
    },
    "distilbert": {
        "attention_qkv": r"attention\.(q|k|v)_lin",
        "attention_output": r"attention\.out_lin",
        "mlp": r"ffn\.lin(1|2)",
    },
}


# ------------------------------------------------------ Attention modules (UniPELT's gated prefix)
_BERT_ATTENTION = r".*\.layer\.\d+\.attention\.self"
_LLAMA_ATTENTION = r".*\.layers\.\d+\.self_attn"

#: the attention module of each block, whose input the prefix gate reads and whose cache layer it scales
#: (full-match regexes keyed by ``model.config.model_type``)
ATTENTION_MODULES: dict[str, str] = {
    "bert": _BERT_ATTENTION,
    "roberta": _BERT_ATTENTION,
    "xlm-roberta": _BERT_ATTENTION,
    "electra": _BERT_ATTENTION,
    "gpt2": r".*\.h\.\d+\.attn",
    "llama": _LLAMA_ATTENTION,
    "mistral": _LLAMA_ATTENTION,
    "qwen2": _LLAMA_ATTENTION,
    "qwen3": _LLAMA_ATTENTION,
    "gemma": _LLAMA_ATTENTION,
}


# ------------------------------------------- Encoder self-attention calls (prefixes on an encoder)
@dataclass(frozen=True)
class EncoderAttention:
    """How one architecture's encoder self-attention modules are called (transformers 5.x)."""

    module_name: str  # the last path component of each encoder layer's self-attention module
    mask_arg: str  # the keyword its layer passes the attention mask under
    heads_attr: str
    head_dim_attr: str
    relative_bias: bool  # T5: the first layer computes a relative position bias over all keys


_T5_ENCODER = EncoderAttention("SelfAttention", "mask", "n_heads", "key_value_proj_dim", relative_bias=True)
_BART_ENCODER = EncoderAttention("self_attn", "attention_mask", "num_heads", "head_dim", relative_bias=False)
#: architectures whose encoder can take a prefix (keyed by ``model.config.model_type``)
#: (mBART's encoder attention has no layer_idx, so it cannot read a cache: not supported)
ENCODER_ATTENTION: dict[str, EncoderAttention] = {
    "t5": _T5_ENCODER,
    "mt5": _T5_ENCODER,
    "bart": _BART_ENCODER,
}


# ------------------------------------------------------------------------- LN Tuning default targets
#: The normalisation layers LN Tuning trains per ``model.config.model_type`` (HF PEFT's table).
LN_TUNING_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}  # fmt: skip


# ------------------------ Attention with q/k/v/o projections and rotary embeddings (LLaMA-Adapter)
#: ``model.config.model_type`` values whose attention modules have ``q_proj``/``k_proj``/``v_proj``/
#: ``o_proj`` and rotary position embeddings passed as ``position_embeddings``.
ROTARY_QKVO_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------- The stack of blocks (layers)
#: Where the list of transformer blocks lives, tried in order below the outermost ``.model`` chain (HF
#: PEFT's rule for ``layer_replication``): llama-like ``layers``, BERT's ``encoder.layer``, Falcon's ``h``.
BLOCK_LIST_PATHS: tuple[str, ...] = ("layers", "encoder.layer", "h")


def find_block_list(model: object) -> tuple[object, str]:
    """``(owner, path)`` of ``model``'s list of transformer blocks: ``owner`` is the innermost ``.model``
    (or a BERT model's ``.bert``), ``path`` one of :data:`BLOCK_LIST_PATHS` under it.

    Raises:
        ValueError: no block list is found there.
    """
    owner = model
    while hasattr(owner, "model"):
        owner = owner.model
    if hasattr(owner, "bert"):
        owner = owner.bert
    for path in BLOCK_LIST_PATHS:
        found = owner
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None and type(found).__name__ == "ModuleList":
            return owner, path
    raise ValueError(
        "Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon compatible "
        "architectures (a ModuleList at .layers, .encoder.layer or .h)."
    )


# -------------------------------------------------------------------------------- Tied embeddings
#: HF PEFT's names of embedding layers: ``ensure_weight_tying`` acts (and its warnings speak) only when a
#: ``target_modules`` / ``modules_to_save`` entry ends with one of them
EMBEDDING_LAYER_NAMES: tuple[str, ...] = ("embed_tokens", "lm_head")


def input_embeddings_name(model: object, default: str | None = None) -> str | None:
    """The full module name of ``model.get_input_embeddings()`` (HF PEFT's rule), ``default`` when the
    model has no such method or the embedding is not one of its modules."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return default
    try:
        embedding = getter()
    except (AttributeError, NotImplementedError):
        return default
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if module is embedding:
            return name
    return default


def modules_tied_to_input_embeddings(model: object) -> list[str]:
    """Full names of the modules whose ``weight`` is the input embedding's own parameter (an LM head tied
    to the embedding), found by identity rather than by name; ``[]`` when the model's config says
    ``tie_word_embeddings=False`` or nothing shares the weight. Adapter wrappers are looked through (the
    names are those of the outermost module)."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", None) is False:
        return []
    embedding_name = input_embeddings_name(model)
    if embedding_name is None:
        return []

    def own_weight(module: object) -> object:
        while hasattr(module, "base_layer"):
            module = module.base_layer
        return getattr(module, "weight", None)

    weight = own_weight(model.get_submodule(embedding_name))  # type: ignore[attr-defined]
    if weight is None:
        return []
    tied = []
    inner: list[str] = []  # modules inside an already found one (its base layer)
    for name, module in model.named_modules(remove_duplicate=False):  # type: ignore[attr-defined]
        if not name or name == embedding_name or name.startswith(f"{embedding_name}."):
            continue
        if any(name.startswith(f"{outer}.") for outer in inner):
            continue
        if own_weight(module) is weight:
            tied.append(name)
            inner.append(name)
    return tied
