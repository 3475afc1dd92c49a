"""Adaption prompts (LLaMA-Adapter): gated prompts attended by the top attention layers.

Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
2023 (arXiv:2303.16199). Each of the top ``adapter_layers`` decoder layers gets ``adapter_len`` learned
prompt vectors ``P_l ∈ R^{adapter_len×d}`` and a scalar gate ``g_l`` initialised to zero. The layer's
attention runs unchanged; its queries additionally attend over the prompt, whose keys and values come
from the layer's own (frozen) key and value projections, and the gated result is added::

    Q = RoPE(W_q h)          K_p = W_k P_l        V_p = W_v P_l        (no positions on the prompt)
    out = Attn(h) + W_o · g_l · softmax(Q K_pᵀ / √d_head) V_p

    h ──► attention (the model's own) ──────────────┐
    │                                              (+)──► out
    └──► W_q, RoPE ──► softmax(· K_pᵀ/√d) V_p · g ──► W_o (no bias) ─┘

The prompt gets its own softmax (the "zero-init attention" of the paper), so with ``g = 0`` a fresh
adapter adds exact zeros: the output is the base output bit for bit. Under grouped-query attention
(``num_key_value_heads < num_attention_heads``) each key/value head of the prompt serves its group of
query heads, as in the model's own attention.

The wrapper calls the wrapped attention module as it is and adds the prompt term; it never re-implements
the model's attention. The prompt keys and values are recomputed on every call, so transformers' KV cache
only ever holds the model's own keys and values (``generate`` works unchanged).

Decisions:

- Tensor names, shapes and config JSON are HF PEFT's (``...self_attn.adaption_prompt`` of shape
  ``(1, adapter_len, hidden_size)``, ``...self_attn.adaption_gate`` of shape ``(1,)``), so checkpoints
  move both ways.
- Supported: llama, mistral (as HF PEFT) and qwen2 (same attention layout; HF PEFT refuses it).
  GPT-2, which HF PEFT also supports, is not.
- ``W_o`` is applied without its bias (HF PEFT calls the module, adding a bias twice on models whose
  ``o_proj`` has one, so its fresh adapter is not the identity there); identical for the supported
  models' default configurations, which have no ``o_proj`` bias.
- Several active adapters add up (HF PEFT activates one at a time); mixed-adapter batches work.
- Not mergeable: the prompt term depends on the queries. ``merge_adapter`` is a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.architectures import ROTARY_QKVO_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer
from peftkit.core.registry import register_method
from peftkit.core.tuner import BaseTuner

DEFAULT_TARGET = "self_attn"


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Adaption prompt settings; field names and JSON keys are HF PEFT's ``AdaptionPromptConfig``.

    Args:
        target_modules: the attribute name of the attention module in each decoder layer
            (``"self_attn"`` when ``None``).
        adapter_len: prompt vectors per adapted layer (required, > 0).
        adapter_layers: how many decoder layers, counted from the top, get a prompt (required, > 0, at
            most the model's number of layers).

    Raises:
        ValueError: a missing or non-positive ``adapter_len`` / ``adapter_layers``, or a
            ``target_modules`` that is not one attribute name.
    """

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTION_PROMPT
        super().__post_init__()

    def validate(self) -> None:
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)  # None: set later, checked by check_complete when the config is used
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        target = self.target_modules
        if target is not None and (not isinstance(target, str) or not target or "." in target):
            raise ValueError(
                f"target_modules must be the attribute name of the attention module in each decoder layer "
                f"(e.g. 'self_attn'), got {target!r}."
            )

    def check_complete(self) -> None:
        for name in ("adapter_len", "adapter_layers"):
            if getattr(self, name) is None:
                raise ValueError(f"AdaptionPromptConfig needs {name} (a positive integer).")

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer):
    """Wraps one attention module; adds each active adapter's gated prompt attention to its output."""

    adapter_param_containers = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def update_layer(self, adapter_name: str, adapter_len: int) -> None:
        attn = self.get_base_layer()
        weight = attn.q_proj.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        hidden = attn.q_proj.in_features
        # standard normal prompts (the paper's nn.Embedding init, as HF PEFT), a zero gate: the identity
        prompt = torch.randn(1, adapter_len, hidden, device=weight.device, dtype=dtype)
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    # ------------------------------------------------------------------------------------ forward
    def prompt_output(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        adapter_name: str,
    ) -> torch.Tensor:
        """``W_o · g · softmax(Q K_pᵀ / √d) V_p`` for one adapter, shaped like the attention output."""
        attn = self.get_base_layer()
        config = attn.config
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        groups = n_heads // n_kv
        head_dim = attn.head_dim
        batch, q_len, _ = hidden_states.shape
        dtype = hidden_states.dtype

        query = attn.q_proj(hidden_states).view(batch, q_len, n_heads, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1).to(query.dtype), sin.unsqueeze(1).to(query.dtype)
        query = query * cos + _rotate_half(query) * sin  # (b, heads, q, d)

        prompt = self.adaption_prompt[adapter_name].to(dtype)
        length = prompt.shape[1]
        # (1, kv heads, 1, P, d): each key/value head serves its group of query heads
        key = attn.k_proj(prompt).view(1, length, n_kv, head_dim).transpose(1, 2).unsqueeze(2)
        value = attn.v_proj(prompt).view(1, length, n_kv, head_dim).transpose(1, 2).unsqueeze(2)
        query = query.reshape(batch, n_kv, groups, q_len, head_dim)

        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        probs = self.adaption_gate[adapter_name].to(dtype) * probs
        out = torch.matmul(probs, value)  # (b, kv heads, groups, q, d)
        out = out.reshape(batch, n_heads, q_len, head_dim).transpose(1, 2).reshape(batch, q_len, -1)
        o_proj = attn.o_proj
        if getattr(o_proj, "bias", None) is None:
            return o_proj(out)
        return F.linear(out, o_proj.weight)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        outputs = self.base_layer(*args, **kwargs)
        if isinstance(outputs, tuple):
            result, rest = outputs[0], outputs[1:]
        else:
            result, rest = outputs, None
        names = self.batch_adapter_names
        candidates = list(dict.fromkeys(names)) if names is not None else self.active_adapters
        active = [n for n in candidates if n in self.adaption_prompt]
        if active and position_embeddings is None:
            raise ValueError(
                "The attention module was called without position_embeddings (cos, sin); adaption prompts "
                "need the model's rotary embeddings for the queries (transformers >= 4.48 passes them)."
            )
        dtype = result.dtype
        if names is None:
            for name in active:
                result = result + self.prompt_output(hidden_states, position_embeddings, name)
        else:
            result = result + self._mixed_delta(hidden_states, position_embeddings, active, result)
        result = result.to(dtype)
        return result if rest is None else (result, *rest)

    def _mixed_delta(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        active: Sequence[str],
        result: torch.Tensor,
    ) -> torch.Tensor:
        names = self.rows_adapter_names(hidden_states)
        delta = torch.zeros_like(result)
        cos, sin = position_embeddings
        for name in active:
            if name == BASE_ADAPTER_NAME:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            row_pe = (
                cos[rows] if cos.shape[0] > 1 else cos,
                sin[rows] if sin.shape[0] > 1 else sin,
            )
            delta[rows] = self.prompt_output(hidden_states[rows], row_pe, name).to(delta.dtype)
        return delta

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "AdaptedAttention needs the rotary position embeddings; it computes its term in forward()."
        )

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise ValueError(
            "Adaption prompts cannot be merged into the base weights: the prompt attention depends on each "
            "token's query. Keep the adapter unmerged (merge_and_unload() / merge_adapter() are not "
            "available for ADAPTION_PROMPT)."
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            # code that reads e.g. ``self_attn.layer_idx`` or ``.config`` sees the wrapped module's
            return getattr(self._modules["base_layer"], name)


class AdaptionPromptModel(BaseTuner):
    """Wraps the attention modules of the top ``adapter_layers`` decoder layers in :class:`AdaptedAttention`."""

    layer_cls = AdaptedAttention
    can_merge = False  # the prompt term depends on the queries (see mergeable_methods in bottleneck.py)
    cannot_merge_reason = (
        "Adaption prompts cannot be merged into the base weights: the prompt attention depends on each "
        "token's query. Keep the adapter unmerged (merge_and_unload() / merge_adapter() are not available "
        "for ADAPTION_PROMPT)."
    )

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        assert isinstance(config, AdaptionPromptConfig)
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Adaption prompts support the model types {list(SUPPORTED_MODEL_TYPES)} (llama-family "
                f"attention with q_proj/k_proj/v_proj/o_proj and rotary embeddings); this model is "
                f"{model_type!r}."
            )
        target = config.target_modules or DEFAULT_TARGET
        names = [
            name
            for name, module in self.model.named_modules()
            if name.split(".")[-1] == target and ".base_layer" not in f".{name}"
        ]
        assert config.adapter_layers is not None
        if config.adapter_layers > len(names):
            raise ValueError(
                f"adapter_layers={config.adapter_layers} but the model has only {len(names)} decoder layers "
                f"with a {target!r} module; use at most {len(names)}."
            )
        return names[-config.adapter_layers :]

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, AdaptionPromptConfig) and config.adapter_len is not None
        if isinstance(target, AdaptedAttention):
            target.update_layer(adapter_name, config.adapter_len)
            return None
        missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(target, p)]
        if missing or not hasattr(target, "head_dim"):
            raise ValueError(
                f"{target_name} ({type(target).__name__}) is not a llama-style attention module (it lacks "
                f"{missing or ['head_dim']}); adaption prompts cannot attach to it."
            )
        layer = AdaptedAttention(target)
        layer.update_layer(adapter_name, config.adapter_len)
        return layer

    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        config = self.peft_config[adapter_name]
        assert isinstance(config, AdaptionPromptConfig)
        return {"target_modules": config.target_modules or DEFAULT_TARGET}


register_method("ADAPTION_PROMPT", AdaptionPromptConfig, AdaptionPromptModel)
