"""The "attach to the embeddings or the attention keys and values" placement: soft prompts.

A soft-prompt method trains ``P`` virtual tokens instead of weights. Nothing in the model is wrapped: the
tuner changes the model's *inputs* on every call, through the arguments every transformers model takes::

    input_embeddings placement (Prompt Tuning, P-Tuning)      attention_prefix placement (Prefix Tuning)

    inputs_embeds = [ prompt (P, D) ; embed(input_ids) ]    cache[layer l] = (K_l prefix, V_l prefix), P each
    attention_mask = [ 1 … 1 ; attention_mask ]             attention_mask = [ 1 … 1 ; attention_mask ]
    labels = [ -100 … -100 ; labels ]  (per-token labels)    position_ids  = position_ids + P (when given)

A method subclasses :class:`PromptTuner`, sets ``placement`` and implements :meth:`PromptTuner.build_encoder`,
which returns a module whose ``forward()`` (no arguments) gives the prompt table: ``(P, D)`` token
embeddings, or ``(P, num_layers · 2 · kv_dim)`` keys and values laid out as HF PEFT lays them. The core
knows no method by name: it prepends, builds the transformers ``Cache``, saves the table as HF PEFT's
``prompt_embeddings`` tensor (the encoder's *output*, as HF PEFT saves it) and loads it back.

``generate()`` runs the same input change as a forward pre-hook on the base model, so transformers' own
generation loop (KV cache, left padding, position ids from the attention mask) stays in charge: at the
first step the prompt is prepended (or the empty cache filled with the prefix); at later steps only the
attention mask and position ids are shifted by ``P``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.config import PeftConfig
from peftkit.tuner import BaseTuner

SAVED_PROMPT_KEY = "prompt_embeddings"  # HF PEFT's on-disk name of the prompt table
INPUT_EMBEDDINGS = "input_embeddings"
ATTENTION_PREFIX = "attention_prefix"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every soft-prompt method shares (HF PEFT's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: ``P``, the number of virtual tokens (> 0).
        token_dim: the width of one virtual token; derived from the model when ``None`` (hidden size, or for a
            prefix the key/value width ``num_key_value_heads · head_dim``).
        num_transformer_submodules: 1 (decoder-only or encoder-only models); derived when ``None``.
        num_attention_heads: the heads a prefix is split into (the key/value heads); derived when ``None``.
        num_layers: the transformer layers a prefix reaches; derived when ``None``.
        modules_to_save: modules trained in full and saved with the prompt (a classification head).

    Derived values are recorded in the saved ``adapter_config.json`` (HF PEFT needs them to rebuild the
    prompt) but the config object is never changed.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (the number of virtual tokens), got {n!r}; "
                f"e.g. num_virtual_tokens=20."
            )
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(
                    f"{name} must be a positive integer or None (derived from the model), got {value!r}."
                )
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules}: peftkit's soft prompts support "
                f"decoder-only and encoder-only models (1 submodule); encoder-decoder models are not supported yet."
            )


@dataclass(frozen=True)
class PromptDims:
    """The model sizes a prompt is built for (from the config's explicit values, else the model's config)."""

    num_virtual_tokens: int
    token_dim: int  # width of one virtual token (embeddings) or of one layer's keys (prefix)
    num_layers: int
    num_attention_heads: int  # heads the prefix is split into (key/value heads under grouped-query attention)

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads


def _first_attr(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


class PromptTable(nn.Module):
    """A plain table of ``num_tokens`` prompt vectors: Prompt Tuning's prompt, an un-projected prefix, and
    the form a reparameterised prompt takes once saved (its encoder's output)."""

    def __init__(self, num_tokens: int, width: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, width)
        if init is not None:
            self.embedding.weight = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (P, width)


class PromptTuner(BaseTuner):
    """Generic tuner of the soft-prompt placement; methods set ``placement`` and ``build_encoder``."""

    can_merge = False  # virtual tokens / prefixes have no weight to fold into

    #: ``"input_embeddings"`` (prepended to the token embeddings) or ``"attention_prefix"`` (prepended to
    #: every attention layer's keys and values through the cache)
    placement: ClassVar[str] = INPUT_EMBEDDINGS

    # BaseTuner.__init__ injects the first adapter, so the containers below are created on first use.
    @property
    def prompt_encoder(self) -> nn.ModuleDict:
        """Adapter name -> the module whose ``forward()`` gives the prompt table."""
        if "prompt_encoder" not in self._modules:
            self._modules["prompt_encoder"] = nn.ModuleDict()
        return self._modules["prompt_encoder"]  # type: ignore[return-value]

    @property
    def prompt_dims(self) -> dict[str, PromptDims]:
        return self.__dict__.setdefault("_prompt_dims", {})

    # ------------------------------------------------------------------------------ method hooks
    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        """A module whose ``forward()`` returns the prompt table for this adapter (see module docstring)."""
        raise NotImplementedError

    def prompt_width(self, dims: PromptDims) -> int:
        """Columns of the prompt table."""
        if self.placement == ATTENTION_PREFIX:
            return dims.num_layers * 2 * dims.token_dim
        return dims.token_dim

    # ------------------------------------------------------------------------------ injection
    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        return []  # nothing is wrapped; the prompt lives in ``self.prompt_encoder``

    def select_base_parameters(self, adapter_name: str, config: PeftConfig) -> None:
        # Called by BaseTuner.inject_adapter after the modules_to_save wrappers exist: the place to build the
        # prompt (a failure here is rolled back by inject_adapter).
        assert isinstance(config, PromptLearningConfig)
        dims = self.derive_dims(config)
        encoder = self.build_encoder(config, dims)
        reference = self.model.get_input_embeddings().weight
        self.prompt_encoder[adapter_name] = encoder.to(reference.device)
        self.prompt_dims[adapter_name] = dims
        return None

    def derive_dims(self, config: PromptLearningConfig) -> PromptDims:
        """HF PEFT's ``_prepare_prompt_learning_config``, without writing into the config."""
        model_config = getattr(self.model, "config", None)
        if model_config is None or self.model.get_input_embeddings() is None:
            raise ValueError(
                f"{type(self.model).__name__} has no transformers config or input embeddings; soft prompts need "
                f"a transformers model (get_input_embeddings(), inputs_embeds and attention_mask inputs)."
            )
        if getattr(model_config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self.model).__name__} is an encoder-decoder model; peftkit's soft prompts support "
                f"decoder-only (llama, gpt2, ...) and encoder-only (bert, roberta, ...) models for now."
            )
        text_config = (
            model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        )
        num_layers = config.num_layers or _first_attr(
            text_config, ("num_hidden_layers", "num_layers", "n_layer")
        )
        hidden = _first_attr(text_config, ("hidden_size", "n_embd", "d_model"))
        heads = _first_attr(text_config, ("num_attention_heads", "n_head", "num_heads"))
        if num_layers is None or hidden is None or heads is None:
            raise ValueError(
                f"Cannot read the number of layers, hidden size and attention heads from {type(model_config).__name__}; "
                f"set num_layers, token_dim and num_attention_heads in the config."
            )
        token_dim, num_heads = config.token_dim or hidden, config.num_attention_heads or heads
        kv_heads = getattr(text_config, "num_key_value_heads", None)
        if self.placement == ATTENTION_PREFIX:
            self._check_attention_structure()
            if kv_heads is not None and config.token_dim is None and config.num_attention_heads is None:
                # grouped-query attention: the cache holds num_key_value_heads heads of head_dim each
                head_dim = getattr(text_config, "head_dim", None) or hidden // heads
                token_dim, num_heads = head_dim * kv_heads, kv_heads
            if token_dim % num_heads:
                raise ValueError(
                    f"token_dim {token_dim} is not divisible by num_attention_heads {num_heads}."
                )
        return PromptDims(config.num_virtual_tokens, token_dim, num_layers, num_heads)

    def _check_attention_structure(self) -> None:
        if self._cache_argument() is None:
            raise ValueError(
                f"{type(self.model).__name__}.forward takes no key/value cache ('cache' or 'past_key_values'), so "
                f"a prefix cannot reach its attention layers. Use an input-embedding prompt (PromptTuningConfig, "
                f"PromptEncoderConfig) for this model."
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ValueError(
                "Prefixes travel in the key/value cache, which gradient checkpointing recomputes (it would append "
                "the prefix twice); disable gradient checkpointing (model.gradient_checkpointing_disable()) or "
                "use an input-embedding prompt (PromptTuningConfig, PromptEncoderConfig)."
            )

    def _cache_argument(self) -> str | None:
        """The name under which the model takes a key/value cache: its own forward argument, or its
        backbone's when the task model hands ``**kwargs`` on (BERT's heads do)."""
        top = inspect.signature(self.model.forward).parameters
        backbone = getattr(self.model, "base_model", self.model)
        passes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in top.values())
        for params in (top, inspect.signature(backbone.forward).parameters if passes_kwargs else {}):
            for name in ("cache", "past_key_values"):
                if name in params:
                    return name
        return None

    # ----------------------------------------------------------------------------- bookkeeping
    def extra_adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        if adapter_name not in self.prompt_encoder:
            return {}
        return {
            f"prompt_encoder.{adapter_name}.{name}": p
            for name, p in self.prompt_encoder[adapter_name].named_parameters()
        }

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        super()._remove_adapter_modules(adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.prompt_dims.pop(adapter_name, None)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(
                f"Soft prompts cannot be summed: only one prompt adapter can be active at a time, got {names}."
            )
        super().set_adapter(names)

    @contextlib.contextmanager
    def batch_adapter_names(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is not None:
            raise ValueError(
                "Mixed-adapter batches (adapter_names=...) are not supported for soft prompts: every row of a "
                "batch gets the same virtual tokens. Run one batch per adapter."
            )
        yield

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        previous = self.__dict__.get("_prompts_disabled", False)
        self.__dict__["_prompts_disabled"] = True
        try:
            with super().adapters_disabled():
                yield
        finally:
            self.__dict__["_prompts_disabled"] = previous

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(
            "Soft prompts cannot be merged into the weights: the virtual tokens are extra inputs. Keep the "
            "PeftModel for inference."
        )

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------------------- checkpoints
    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        dims = self.prompt_dims[adapter_name]
        return {
            "token_dim": dims.token_dim,
            "num_layers": dims.num_layers,
            "num_attention_heads": dims.num_attention_heads,
            "num_transformer_submodules": 1,
        }

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """HF PEFT's layout: ``prompt_embeddings`` (the encoder's output) and ``base_model.<head>.<param>``."""
        with torch.no_grad():
            tensors = {SAVED_PROMPT_KEY: self.prompt_encoder[adapter_name]().detach()}
        for path, wrapper in self.save_wrappers():
            for local, param in wrapper.adapter_parameters(adapter_name).items():
                tensors[f"base_model.{path}.{local}"] = param.detach()
        return tensors

    def adapter_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Where each saved tensor goes. A reparameterised prompt (an encoder network) is replaced by a table
        holding the saved output: the file stores only that output, as HF PEFT's does."""
        encoder = self.prompt_encoder[adapter_name]
        if not isinstance(encoder, PromptTable):
            with torch.no_grad():
                output = encoder()
            table = PromptTable(*output.shape).to(output.device)
            trainable = any(p.requires_grad for p in encoder.parameters())
            table.requires_grad_(trainable)
            self.prompt_encoder[adapter_name] = encoder = table
        targets: dict[str, nn.Parameter] = {SAVED_PROMPT_KEY: encoder.embedding.weight}
        for path, wrapper in self.save_wrappers():
            for local, param in wrapper.adapter_parameters(adapter_name).items():
                targets[f"base_model.{path}.{local}"] = param
        return targets

    # ---------------------------------------------------------------------------------- inputs
    def _active_prompt(self) -> str | None:
        if self.__dict__.get("_prompts_disabled", False) or not self.active_adapters:
            return None
        return self.active_adapters[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter = self._active_prompt()
        if adapter is None:
            return self.model(*args, **kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("Pass the model inputs by keyword (input_ids=..., attention_mask=...).")
            kwargs["input_ids"] = args[0]
        if self.placement == ATTENTION_PREFIX and self.training:
            self._check_attention_structure()
        return self.model(**self.add_prompt(kwargs, adapter))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the prompt added to every forward call it makes."""
        adapter = self._active_prompt()
        if adapter is None:
            return self.model.generate(*args, **kwargs)

        def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
            if hook_args:
                hook_kwargs["input_ids"], hook_args = hook_args[0], hook_args[1:]
            return hook_args, self.add_prompt(hook_kwargs, adapter)

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            handle.remove()

    def add_prompt(self, kwargs: dict[str, Any], adapter_name: str) -> dict[str, Any]:
        """The model inputs with adapter ``adapter_name``'s virtual tokens added (see module docstring)."""
        kwargs = dict(kwargs)
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        reference = embeds if embeds is not None else input_ids
        if reference is None:
            raise ValueError("Soft prompts need input_ids or inputs_embeds.")
        batch_size, device = reference.shape[0], reference.device
        num_tokens = self.prompt_dims[adapter_name].num_virtual_tokens
        cache_arg = self._cache_argument()
        cache = kwargs.get(cache_arg) if cache_arg else None
        first_step = cache is None or cache.get_seq_length() == 0  # later steps find the prompt in the cache

        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"Soft prompts need a 2-D attention_mask (batch, sequence); got a {mask.dim()}-D one."
                )
            ones = torch.ones(batch_size, num_tokens, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = positions + num_tokens
            if self.placement == INPUT_EMBEDDINGS and first_step:
                virtual = torch.arange(num_tokens, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([virtual.expand(*positions.shape[:-1], num_tokens), positions], dim=-1)
            kwargs["position_ids"] = positions

        prompt = self.prompt_encoder[adapter_name]()  # (P, width)
        if self.placement == ATTENTION_PREFIX:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                kwargs[cache_arg] = cache
            if first_step:
                self._fill_prefix(cache, prompt, adapter_name, batch_size)
            return kwargs

        if not first_step:
            return kwargs
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        seq_len = embeds.shape[1]
        prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, P + T, D)
        kwargs.pop("input_ids", None)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == seq_len:  # per-token labels
            ignore = torch.full((batch_size, num_tokens), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([ignore, labels], dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            zeros = torch.zeros(batch_size, num_tokens, dtype=token_types.dtype, device=device)
            kwargs["token_type_ids"] = torch.cat([zeros, token_types], dim=1)
        return kwargs

    def _fill_prefix(self, cache: Any, prompt: torch.Tensor, adapter_name: str, batch_size: int) -> None:
        """Write the prefix into an empty cache, layer by layer, with HF PEFT's layout of the table:
        ``(P, L·2·H·d)`` → ``(L·2, H, P, d)``; layer ``l`` takes keys ``2l`` and values ``2l + 1``."""
        dims = self.prompt_dims[adapter_name]
        dtype = self.model.get_input_embeddings().weight.dtype
        table = prompt.to(dtype).view(
            dims.num_virtual_tokens, dims.num_layers * 2, dims.num_attention_heads, -1
        )
        table = table.permute(1, 2, 0, 3)  # (L·2, H, P, d)
        for layer in range(dims.num_layers):
            keys = table[2 * layer].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H, P, d)
            values = table[2 * layer + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
            cache.update(keys, values, layer)
