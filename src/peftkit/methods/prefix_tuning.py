"""Prefix Tuning: trainable keys and values prepended in every attention layer.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021 (arXiv:2101.00190).
Each layer ``l`` attends over ``p`` extra positions whose keys and values are trained; the model is
frozen::

    head = softmax(Q [K_prefix,l ; K]ᵀ / √d) [V_prefix,l ; V]

    the table  (p, L·2·d_kv):  row i = [K₁ᵢ V₁ᵢ K₂ᵢ V₂ᵢ … K_Lᵢ V_Lᵢ]

The prefix reaches the layers as a prefilled transformers ``DynamicCache`` (the model's own
``cache`` / ``past_key_values`` input); the attention mask gets ``p`` leading ones and given position ids
move by ``p``. Under grouped-query attention the table holds the key/value heads only (``d_kv =
num_key_value_heads · head_dim``), as HF PEFT does.

With ``prefix_projection=True`` (the paper's reparameterisation, §4.3) the table is
``MLP(E) = W₂ tanh(W₁ E)``, ``E ∈ R^{p×d}``. The checkpoint holds the table (the MLP's output, as HF PEFT
saves it) as ``prompt_embeddings``. A cache that gradient checkpointing would recompute cannot carry a
prefix: that combination is a clear error.

Encoder-decoder models (T5, BART) get, as in HF PEFT, a prefix in the decoder's self-attention only. With
``encoder_prefix=True`` (peftkit only; Li and Liang's seq2seq setting) every encoder self-attention layer
gets a second, separate prefix as well::

    encoder layer l:  head = softmax(Q [K_enc,l ; K]ᵀ / √d + [0 ; B] + [0 ; M]) [V_enc,l ; V]

    the encoder table  (p, L_enc·2·H·d):  row i = [K₁ᵢ V₁ᵢ … K_Lᵢ V_Lᵢ]   (saved as encoder_prompt_embeddings)

``B`` is the model's own position bias (T5's relative bias; BART has none, its positions are in the
embeddings), ``M`` its padding mask: prefix positions are always attended and carry no position bias, so
they are the same for every query and every amount of padding. The encoder takes no cache, so forward
pre-hooks on its self-attention modules, active only inside this tuner's ``forward`` / ``generate``, hand
each one a fresh cache holding its prefix (the attention appends its own keys and values after it), the
mask with ``p`` attended positions in front and, for T5's first layer, the relative bias with ``p`` zero
columns in front (the later layers reuse it, as T5 does).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.architectures import ENCODER_ATTENTION, EncoderAttention
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.placements.prompt import (
    ATTENTION_PREFIX,
    SAVED_PROMPT_KEY,
    PromptDims,
    PromptLearningConfig,
    PromptTable,
    PromptTuner,
)

ENCODER_PROMPT_KEY = "encoder_prompt_embeddings"  # on-disk name of the encoder prefix table (peftkit only)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix Tuning settings (HF PEFT's names and defaults, plus ``encoder_prefix``).

    Args:
        encoder_hidden_size: the projection MLP's hidden width (``prefix_projection=True``); the model's
            hidden size when ``None``.
        prefix_projection: train the prefix through an MLP over ``p`` embeddings instead of directly.
        init_weights: ``None`` (random, ``nn.Embedding``'s N(0, 1)) or ``"zero"`` (a zero prefix; with the
            projection, a zero last layer).
        encoder_prefix: encoder-decoder models (T5, BART) only: also give every encoder self-attention layer
            its own ``p`` trained keys and values (Li and Liang's seq2seq setting). HF PEFT has no such
            option: a config with it on is peftkit-only (HF PEFT would ignore the key and the extra tensor and
            run the decoder prefix alone). With it off (the default) config and checkpoint are exactly HF
            PEFT's; the key is not even written.
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    encoder_prefix: bool = False

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f'init_weights must be None or "zero", got {self.init_weights!r}.')
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")
        if not isinstance(self.encoder_prefix, bool):
            raise ValueError(f"encoder_prefix must be True or False, got {self.encoder_prefix!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not self.encoder_prefix:
            del data["encoder_prefix"]  # HF PEFT has no such field: the file stays exactly HF PEFT's
        return data


class PrefixEncoder(nn.Module):
    """HF PEFT's projected ``PrefixEncoder`` (``embedding`` then ``transform``): ``(p, L·2·d_kv)``."""

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, width: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class EncoderDecoderPrefix(nn.Module):
    """Both prefixes of an ``encoder_prefix=True`` adapter. ``forward()`` gives the decoder's table (HF PEFT's
    ``prompt_embeddings``, used by the generic prompt machinery); ``encoder()`` the encoder's."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder

    def forward(self) -> torch.Tensor:
        return self.decoder()


#: attention implementations whose masks the hooks know how to extend (flex attention's block masks are not
#: tensors; flash attention is untested)
ENCODER_PREFIX_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class EncoderPrefixDims:
    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Columns of the encoder table: keys and values of every layer."""
        return self.num_layers * 2 * self.num_heads * self.head_dim


class PrefixTuningModel(PromptTuner):
    """Prefix Tuning: a prefilled key/value cache in every attention layer (and, with ``encoder_prefix``,
    hooks that give every encoder self-attention layer its own prefix)."""

    placement = ATTENTION_PREFIX

    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        assert isinstance(config, PrefixTuningConfig)
        decoder = self._prefix_table(config, dims, self.prompt_width(dims))
        if not config.encoder_prefix:
            return decoder
        encoder_dims = self.encoder_prefix_dims()
        # built after the decoder's table, so that one seed gives the same decoder table with the option on or off
        return EncoderDecoderPrefix(decoder, self._prefix_table(config, dims, encoder_dims.width))

    @staticmethod
    def _prefix_table(config: PrefixTuningConfig, dims: PromptDims, width: int) -> nn.Module:
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or dims.token_dim
            return PrefixEncoder(
                dims.num_virtual_tokens, dims.token_dim, hidden, width, config.init_weights == "zero"
            )
        table = PromptTable(dims.num_virtual_tokens, width)
        if config.init_weights == "zero":
            nn.init.zeros_(table.embedding.weight)
        return table

    # ------------------------------------------------------------------------------ encoder prefix
    def _encoder_attention_spec(self) -> EncoderAttention:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if not self.is_encoder_decoder:
            raise ValueError(
                f"encoder_prefix=True is for encoder-decoder models (T5, BART), but {type(self.model).__name__} "
                f"(model_type {model_type!r}) is not one; its prefix already reaches every attention layer. "
                f"Leave encoder_prefix off."
            )
        if model_type not in ENCODER_ATTENTION:
            raise ValueError(
                f"encoder_prefix=True knows the encoder attention of model types {sorted(ENCODER_ATTENTION)}, not "
                f"{model_type!r}; leave encoder_prefix off (HF PEFT's decoder-only prefix) for this model."
            )
        return ENCODER_ATTENTION[model_type]

    def encoder_attention_modules(self) -> list[nn.Module]:
        """The encoder's self-attention modules, by layer; a clear error where the model has none we know."""
        spec = self._encoder_attention_spec()
        encoder = self.model.get_encoder()
        found = [m for n, m in encoder.named_modules() if n.rsplit(".", 1)[-1] == spec.module_name]
        # named_modules() walks the layers in order; the cache each one reads is the one at its layer_idx
        layers = [getattr(m, "layer_idx", None) for m in found]
        cache_args = [self._module_cache_argument(m) for m in found]
        if not found or layers != list(range(len(found))) or None in cache_args:
            raise ValueError(
                f"{type(self.model).__name__}'s encoder does not have the self-attention modules encoder_prefix "
                f"expects ('{spec.module_name}', numbered by layer_idx, taking a key/value cache); this "
                f"transformers version may have changed them. Leave encoder_prefix off."
            )
        return found

    def encoder_prefix_dims(self) -> EncoderPrefixDims:
        spec = self._encoder_attention_spec()
        modules = self.encoder_attention_modules()
        heads = {getattr(m, spec.heads_attr) for m in modules}
        head_dims = {getattr(m, spec.head_dim_attr) for m in modules}
        if len(heads) != 1 or len(head_dims) != 1:
            raise ValueError(
                "encoder_prefix needs encoder layers that all have the same heads and head width."
            )
        return EncoderPrefixDims(len(modules), heads.pop(), head_dims.pop())

    @staticmethod
    def _module_cache_argument(module: nn.Module) -> str | None:
        params = inspect.signature(module.forward).parameters
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    @contextlib.contextmanager
    def _encoder_prefix_hooks(self, grad: bool = True) -> Iterator[None]:
        """Inside this block, every encoder self-attention layer sees the active adapter's encoder prefix
        (its table computed once, on entry; without gradients when ``grad`` is off)."""
        adapter = self._active_prompt()
        prompt = self.prompt_encoder[adapter] if adapter is not None else None
        if not isinstance(prompt, EncoderDecoderPrefix):
            yield
            return
        spec = self._encoder_attention_spec()
        modules = self.encoder_attention_modules()
        dims = self.encoder_prefix_dims()
        num_tokens = self.prompt_dims[adapter].num_virtual_tokens
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            table = prompt.encoder()
        table = table.view(num_tokens, dims.num_layers * 2, dims.num_heads, dims.head_dim)
        table = table.permute(1, 2, 0, 3)  # (L·2, H, P, d)
        handles = []
        try:
            for layer, module in enumerate(modules):
                hook = functools.partial(
                    self._add_encoder_prefix, spec, table[2 * layer], table[2 * layer + 1]
                )
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _add_encoder_prefix(
        self,
        spec: EncoderAttention,
        keys: torch.Tensor,
        values: torch.Tensor,
        module: nn.Module,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook on one encoder self-attention module: its prefix ``keys`` / ``values`` ``(H, P, d)``."""
        from transformers import DynamicCache

        config = getattr(module, "config", None) or self.model.config  # T5's encoder has a copy of its own
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in ENCODER_PREFIX_ATTENTION:
            raise ValueError(
                f"encoder_prefix supports the attention implementations {ENCODER_PREFIX_ATTENTION}, not "
                f"{implementation!r}; load the model with attn_implementation='sdpa' or 'eager'."
            )
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        batch_size, seq_len = hidden.shape[:2]
        num_tokens = keys.shape[1]
        cache = DynamicCache()  # a fresh one per call: the attention appends its own keys and values to it
        cache.update(
            keys.to(hidden.dtype).expand(batch_size, -1, -1, -1),  # (B, H, P, d)
            values.to(hidden.dtype).expand(batch_size, -1, -1, -1),
            module.layer_idx,
        )
        cache_arg = self._module_cache_argument(module)
        assert cache_arg is not None  # checked by encoder_attention_modules
        kwargs[cache_arg] = cache
        mask = kwargs.get(spec.mask_arg)
        if mask is not None:
            kwargs[spec.mask_arg] = _attend_prefix(mask, num_tokens)
        if spec.relative_bias and kwargs.get("position_bias") is None and module.has_relative_attention_bias:
            # T5's first layer would compute the bias over P + T keys as if the prefix were P tokens before
            # the input (so a padded row would see it elsewhere); the prefix gets zero bias instead, the tokens
            # exactly their own (later layers reuse this bias, as T5 does)
            bias = module.compute_bias(seq_len, seq_len, device=hidden.device)  # (1, H, T, T)
            kwargs["position_bias"] = nn.functional.pad(bias, (num_tokens, 0))  # (1, H, T, P + T)
        return args, kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._encoder_prefix_hooks():
            return super().forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._encoder_prefix_hooks(grad=False):  # transformers' generate runs without gradients
            return super().generate(*args, **kwargs)

    # ----------------------------------------------------------------------------- checkpoints
    def prompt_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        prompt = self.prompt_encoder[adapter_name]
        if not isinstance(prompt, EncoderDecoderPrefix):
            return super().prompt_state_dict(adapter_name)
        with torch.no_grad():  # both tables as their encoders' outputs, as HF PEFT saves a projected prefix
            return {
                SAVED_PROMPT_KEY: prompt.decoder().detach(),
                ENCODER_PROMPT_KEY: prompt.encoder().detach(),
            }

    def prompt_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        prompt = self.prompt_encoder[adapter_name]
        if not isinstance(prompt, EncoderDecoderPrefix):
            return super().prompt_load_targets(adapter_name)
        prompt.decoder, prompt.encoder = _as_table(prompt.decoder), _as_table(prompt.encoder)
        return {
            SAVED_PROMPT_KEY: prompt.decoder.embedding.weight,
            ENCODER_PROMPT_KEY: prompt.encoder.embedding.weight,
        }


def _as_table(module: nn.Module) -> PromptTable:
    """A projected prefix replaced by a table of its output (the file holds only that), as
    :meth:`PromptTuner.prompt_load_targets` does for the decoder's prefix alone."""
    if isinstance(module, PromptTable):
        return module
    with torch.no_grad():
        output = module()
    table = PromptTable(*output.shape).to(output.device)
    table.requires_grad_(any(p.requires_grad for p in module.parameters()))
    return table


def _attend_prefix(mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The attention mask ``[..., T]`` with ``num_tokens`` always-attended key positions in front, in the
    mask's own convention: ``True`` (boolean), ``0`` (additive float) or ``1`` (a 0/1 padding mask)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"encoder_prefix cannot extend an attention mask of type {type(mask).__name__}; use "
            f"attn_implementation='sdpa' or 'eager'."
        )
    if mask.dtype == torch.bool:
        value: bool | float | int = True
    elif mask.is_floating_point():
        value = 0.0
    else:
        value = 1
    attended = torch.full((*mask.shape[:-1], num_tokens), value, dtype=mask.dtype, device=mask.device)
    return torch.cat([attended, mask], dim=-1)


register_method("PREFIX_TUNING", PrefixTuningConfig, PrefixTuningModel)
