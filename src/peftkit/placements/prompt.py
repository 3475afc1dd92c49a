"""The "attach to the embeddings or the attention keys and values" placement: soft prompts.

A soft-prompt method trains ``P`` virtual tokens instead of weights. Nothing in the model is wrapped: the
tuner changes the model's *inputs* on every call, through the arguments every transformers model takes::

    input_embeddings placement (Prompt Tuning, P-Tuning)      attention_prefix placement (Prefix Tuning)

    inputs_embeds = [ prompt (P, D) ; embed(input_ids) ]    cache[layer l] = (K_l prefix, V_l prefix), P each
    attention_mask = [ 1 … 1 ; attention_mask ]             attention_mask = [ 1 … 1 ; attention_mask ]
    labels = [ -100 … -100 ; labels ]  (per-token labels)    position_ids  = position_ids + P (when given)

Encoder-decoder models (T5, BART) follow HF PEFT: an embedding prompt is prepended to the *encoder's* input
(``labels`` and the decoder inputs are untouched); a prefix goes into the *decoder's* self-attention cache
(``decoder_attention_mask`` gets ``P`` ones), the encoder sees none, and cross-attention is computed from
the encoder output as usual. HF PEFT counts such models as two "transformer submodules": an embedding
table has ``2P`` rows of which the encoder takes the first ``P``, and a prefix table's rows are regrouped
as HF PEFT regroups them (see :meth:`PromptTuner.prefix_rows`).

A method subclasses :class:`PromptTuner`, sets ``placement`` and implements :meth:`PromptTuner.build_encoder`,
which returns a module whose ``forward()`` gives the prompt table: ``(rows, D)`` token embeddings, or
``(P, num_layers · 2 · kv_dim)`` keys and values laid out as HF PEFT lays them; a method whose prompt
differs per row (Multitask Prompt Tuning's ``task_ids``) names those arguments in ``prompt_forward_args``
and returns ``(batch, rows, width)``. The core knows no method by name: it prepends, builds the transformers
``Cache``, saves the table as HF PEFT's ``prompt_embeddings`` tensor (the encoder's *output*, as HF PEFT
saves it) and loads it back; a method that saves something else overrides :meth:`PromptTuner.prompt_state_dict`
and :meth:`PromptTuner.prompt_load_targets`.

``generate()`` runs the same input change as a forward pre-hook on the base model, so transformers' own
generation loop (KV cache, left padding, position ids from the attention mask) stays in charge: at the
first step the prompt is prepended (or the empty cache filled with the prefix); at later steps only the
attention mask and position ids are shifted by ``P``. An encoder-decoder model runs its encoder once, so
an embedding prompt is prepended once, before transformers' loop starts.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.tuner import BaseTuner

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
        num_transformer_submodules: 1 (decoder-only or encoder-only models) or 2 (encoder-decoder models, as
            HF PEFT counts them); derived when ``None``.
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

    def check_complete(self) -> None:
        if self.num_virtual_tokens is None:
            raise ValueError(
                "num_virtual_tokens must be a positive integer (the number of virtual tokens), got None; "
                "e.g. num_virtual_tokens=20."
            )

    def validate(self) -> None:
        n = self.num_virtual_tokens  # None: set later, checked by check_complete when the config is used
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
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
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules must be None (derived), 1 (decoder-only and encoder-only models) or 2 "
                f"(encoder-decoder models), got {self.num_transformer_submodules!r}."
            )


@dataclass(frozen=True)
class PromptDims:
    """The model sizes a prompt is built for (from the config's explicit values, else the model's config)."""

    num_virtual_tokens: int
    token_dim: int  # width of one virtual token (embeddings) or of one layer's keys (prefix)
    num_layers: int
    num_attention_heads: int  # heads the prefix is split into (key/value heads under grouped-query attention)
    num_transformer_submodules: int = 1  # 2 for encoder-decoder models (HF PEFT's count)

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

    supports_low_cpu_mem_usage = False  # built as usual (HF PEFT ignores the option for prompt learning)

    can_merge = False  # virtual tokens / prefixes have no weight to fold into
    cannot_merge_reason = (
        "Soft prompts cannot be merged into the weights: the virtual tokens are extra inputs. Keep the "
        "PeftModel for inference."
    )
    supports_mixed_batches = False
    no_mixed_batches_reason = (
        "Mixed-adapter batches (adapter_names=...) are not supported for soft prompts: every row of a batch "
        "gets the same virtual tokens. Run one batch per adapter."
    )

    #: ``"input_embeddings"`` (prepended to the token embeddings) or ``"attention_prefix"`` (prepended to
    #: every attention layer's keys and values through the cache)
    placement: ClassVar[str] = INPUT_EMBEDDINGS
    #: keyword arguments of ``forward`` / ``generate`` that the method consumes (one value per batch row, such
    #: as Multitask Prompt Tuning's ``task_ids``): taken out of the model's inputs and passed to the prompt
    #: encoder's ``forward``, which then returns one prompt per row
    prompt_forward_args: ClassVar[tuple[str, ...]] = ()

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

    def prompt_rows(self, dims: PromptDims) -> int:
        """Rows of the prompt table: ``P`` for a prefix; for embeddings ``P`` per transformer submodule (HF PEFT
        gives an encoder-decoder model ``2P`` rows and prepends the first ``P`` to the encoder input)."""
        if self.placement == ATTENTION_PREFIX:
            return dims.num_virtual_tokens
        return dims.num_virtual_tokens * dims.num_transformer_submodules

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

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def derive_dims(self, config: PromptLearningConfig) -> PromptDims:
        """HF PEFT's ``_prepare_prompt_learning_config``, without writing into the config."""
        model_config = getattr(self.model, "config", None)
        if model_config is None or self.model.get_input_embeddings() is None:
            raise ValueError(
                f"{type(self.model).__name__} has no transformers config or input embeddings; soft prompts need "
                f"a transformers model (get_input_embeddings(), inputs_embeds and attention_mask inputs)."
            )
        submodules = 2 if self.is_encoder_decoder else 1
        if config.num_transformer_submodules not in (None, submodules):
            kind = "an encoder-decoder" if submodules == 2 else "a decoder-only or encoder-only"
            raise ValueError(
                f"num_transformer_submodules={config.num_transformer_submodules} does not fit "
                f"{type(self.model).__name__}, {kind} model ({submodules}); leave it None to derive it."
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
            if submodules == 2:
                self._check_decoder_fits_prefix(text_config, num_layers, token_dim, num_heads)
        return PromptDims(config.num_virtual_tokens, token_dim, num_layers, num_heads, submodules)

    def _check_decoder_fits_prefix(
        self, text_config: Any, num_layers: int, token_dim: int, heads: int
    ) -> None:
        """The prefix of an encoder-decoder model fills the decoder's self-attention cache, with HF PEFT's
        sizes (read from the encoder side): the decoder must have as many layers, heads and head width."""
        decoder_layers = _first_attr(text_config, ("num_decoder_layers", "decoder_layers"))
        decoder_heads = _first_attr(text_config, ("decoder_attention_heads",))
        head_dim = _first_attr(text_config, ("d_kv",))  # T5's per-head width, not always d_model / heads
        problems = []
        if decoder_layers not in (None, num_layers):
            problems.append(f"{decoder_layers} decoder layers for a prefix of {num_layers} layers")
        if decoder_heads not in (None, heads):
            problems.append(f"{decoder_heads} decoder attention heads for a prefix of {heads} heads")
        if head_dim is not None and head_dim * heads != token_dim:
            problems.append(f"key width {head_dim}·{heads} for a prefix of token_dim {token_dim}")
        if problems:
            raise ValueError(
                f"The prefix does not fit {type(self.model).__name__}'s decoder ({'; '.join(problems)}); set "
                f"num_layers, token_dim and num_attention_heads to the decoder's sizes."
            )

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
    def adapters_disabled(self) -> Iterator[None]:
        previous = self.__dict__.get("_prompts_disabled", False)
        self.__dict__["_prompts_disabled"] = True
        try:
            with super().adapters_disabled():
                yield
        finally:
            self.__dict__["_prompts_disabled"] = previous

    @property
    def adapters_enabled(self) -> bool:
        return not self.__dict__.get("_prompts_disabled", False)

    # ----------------------------------------------------------------------------- checkpoints
    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        dims = self.prompt_dims[adapter_name]
        return {
            "token_dim": dims.token_dim,
            "num_layers": dims.num_layers,
            "num_attention_heads": dims.num_attention_heads,
            "num_transformer_submodules": dims.num_transformer_submodules,
        }

    def prompt_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The prompt's tensors on disk: HF PEFT's ``prompt_embeddings``, the encoder's output."""
        with torch.no_grad():
            return {SAVED_PROMPT_KEY: self.prompt_encoder[adapter_name]().detach()}

    def prompt_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Where the saved prompt tensors go. A reparameterised prompt (an encoder network) is replaced by a
        table holding the saved output: the file stores only that output, as HF PEFT's does."""
        encoder = self.prompt_encoder[adapter_name]
        if not isinstance(encoder, PromptTable):
            with torch.no_grad():
                output = encoder()
            table = PromptTable(*output.shape).to(output.device)
            trainable = any(p.requires_grad for p in encoder.parameters())
            table.requires_grad_(trainable)
            self.prompt_encoder[adapter_name] = encoder = table
        return {SAVED_PROMPT_KEY: encoder.embedding.weight}

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """HF PEFT's layout: the prompt tensors and ``base_model.<head>.<param>``."""
        tensors = self.prompt_state_dict(adapter_name)
        for path, wrapper in self.save_wrappers():
            for local, param in wrapper.adapter_parameters(adapter_name).items():
                tensors[f"base_model.{path}.{local}"] = param.detach()
        return tensors

    def adapter_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        targets = self.prompt_load_targets(adapter_name)
        for path, wrapper in self.save_wrappers():
            for local, param in wrapper.adapter_parameters(adapter_name).items():
                targets[f"base_model.{path}.{local}"] = param
        return targets

    # ---------------------------------------------------------------------------------- inputs
    def _active_prompt(self) -> str | None:
        if self.__dict__.get("_prompts_disabled", False) or not self.active_adapters:
            return None
        return self.active_adapters[0]

    def extra_forward_inputs(self) -> tuple[str, ...]:
        return self.prompt_forward_args if self._active_prompt() is not None else ()

    def check_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Run the prompt encoder once on the distinct values (its own checks name what is wrong)."""
        adapter = self._active_prompt()
        if adapter is None or not inputs:
            return
        distinct = {name: torch.unique(value) for name, value in inputs.items()}
        if len(distinct) > 1:
            return  # several per-row inputs: their distinct values no longer line up row by row
        with torch.no_grad():
            self.prompt_encoder[adapter](**distinct)

    def _take_prompt_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove the method's own inputs (``prompt_forward_args``) from ``kwargs`` and return them."""
        return {name: kwargs.pop(name) for name in self.prompt_forward_args if name in kwargs}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        prompt_args = self._take_prompt_args(kwargs)
        adapter = self._active_prompt()
        if adapter is None:
            return self.model(*args, **kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("Pass the model inputs by keyword (input_ids=..., attention_mask=...).")
            kwargs["input_ids"] = args[0]
        if self.placement == ATTENTION_PREFIX and self.training:
            self._check_attention_structure()
        return self.model(**self.add_prompt(kwargs, adapter, prompt_args))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the prompt added to every forward call it makes."""
        prompt_args = self._take_prompt_args(kwargs)
        adapter = self._active_prompt()
        if adapter is None:
            return self.model.generate(*args, **kwargs)
        if self.is_encoder_decoder and self.placement == INPUT_EMBEDDINGS:
            # the encoder runs once, before the decoding loop: prepend the prompt to its input here
            if args:
                kwargs["input_ids"], args = args[0], args[1:]
            return self.model.generate(*args, **self.add_prompt(kwargs, adapter, prompt_args))

        cache_arg = self._cache_argument()

        def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
            if hook_args:
                hook_kwargs["input_ids"], hook_args = hook_args[0], hook_args[1:]
            if hook_kwargs.get("use_cache") is False and cache_arg is not None:
                # each call recomputes the whole sequence; a model that returns the cache it was given (BART)
                # would otherwise get the previous call's prefix-and-tokens cache back from generate
                hook_kwargs.pop(cache_arg, None)
            batch_size = _batch_size(hook_kwargs)
            row_args = {name: _repeat_rows(value, batch_size) for name, value in prompt_args.items()}
            return hook_args, self.add_prompt(hook_kwargs, adapter, row_args)

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            handle.remove()

    def prompt_batch(
        self, adapter_name: str, batch_size: int, prompt_args: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """The prompt table of every row, ``(batch_size, rows, width)``."""
        prompt = self.prompt_encoder[adapter_name](**(prompt_args or {}))
        if prompt.dim() == 2:
            return prompt.unsqueeze(0).expand(batch_size, -1, -1)
        if prompt.shape[0] != batch_size:
            given = ", ".join(self.prompt_forward_args) or "prompt inputs"
            raise ValueError(
                f"The batch has {batch_size} rows but {given} gave prompts for {prompt.shape[0]}; pass one value "
                f"per row."
            )
        return prompt

    def add_prompt(
        self, kwargs: dict[str, Any], adapter_name: str, prompt_args: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The model inputs with adapter ``adapter_name``'s virtual tokens added (see module docstring)."""
        kwargs = dict(kwargs)
        if self.is_encoder_decoder:
            return self._add_prompt_encoder_decoder(kwargs, adapter_name, prompt_args)
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
            kwargs["attention_mask"] = _prepend_ones(mask, num_tokens)
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = positions + num_tokens
            if self.placement == INPUT_EMBEDDINGS and first_step:
                virtual = torch.arange(num_tokens, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([virtual.expand(*positions.shape[:-1], num_tokens), positions], dim=-1)
            kwargs["position_ids"] = positions

        if self.placement == ATTENTION_PREFIX:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                kwargs[cache_arg] = cache
            if first_step:
                self._fill_prefix(
                    cache, self.prompt_batch(adapter_name, batch_size, prompt_args), adapter_name
                )
            return kwargs

        if not first_step:
            return kwargs
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        seq_len = embeds.shape[1]
        prompt = self.prompt_batch(adapter_name, batch_size, prompt_args).to(embeds.dtype)
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

    def _add_prompt_encoder_decoder(
        self, kwargs: dict[str, Any], adapter_name: str, prompt_args: dict[str, Any] | None
    ) -> dict[str, Any]:
        """HF PEFT's seq2seq inputs: an embedding prompt before the encoder input, or a prefix in the decoder's
        self-attention cache. ``labels`` and ``decoder_input_ids`` are left as given."""
        num_tokens = self.prompt_dims[adapter_name].num_virtual_tokens
        if self.placement == ATTENTION_PREFIX:
            from transformers import DynamicCache, EncoderDecoderCache

            cache_arg = self._cache_argument()
            assert cache_arg is not None  # checked when the adapter was made
            cache = kwargs.get(cache_arg)
            mask = kwargs.get("decoder_attention_mask")
            if mask is not None:
                kwargs["decoder_attention_mask"] = _prepend_ones(mask, num_tokens)
            if cache is None:
                config = self.model.config
                cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
                kwargs[cache_arg] = cache
            if cache.get_seq_length() == 0:  # later decoding steps find the prefix in the cache
                prompt = self.prompt_batch(adapter_name, _batch_size(kwargs), prompt_args)
                self._fill_prefix(getattr(cache, "self_attention_cache", cache), prompt, adapter_name)
            return kwargs
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            return kwargs  # encoder_outputs given: the encoder already ran (on the prompted input)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.prompt_batch(adapter_name, embeds.shape[0], prompt_args)[:, :num_tokens]
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)  # (B, P + T, D)
        kwargs.pop("input_ids", None)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = _prepend_ones(mask, num_tokens)
        return kwargs

    def prefix_rows(self, dims: PromptDims) -> list[tuple[int, int]]:
        """For each layer, the rows of the ``(L·2, H, P, d)`` table that hold its keys and values.

        One submodule: layer ``l`` takes keys ``2l`` and values ``2l + 1``. Encoder-decoder models take HF
        PEFT's regrouping: it stacks the table twice (meaning self- and cross-attention pairs), cuts the stack
        into groups of four per decoder layer and keeps each group's first pair as the self-attention prefix
        (cross-attention is recomputed from the encoder output). Decoder layer ``l`` so reads rows ``4l`` and
        ``4l + 1`` modulo ``2L``: with two layers, both read the first layer's rows.
        """
        layers = dims.num_layers
        if dims.num_transformer_submodules == 1:
            return [(2 * layer, 2 * layer + 1) for layer in range(layers)]
        return [((4 * layer) % (2 * layers), (4 * layer + 1) % (2 * layers)) for layer in range(layers)]

    def _fill_prefix(self, cache: Any, prompt: torch.Tensor, adapter_name: str) -> None:
        """Write the prefix ``(B, P, L·2·H·d)`` into an empty cache, layer by layer, with HF PEFT's layout of
        the table: ``(B, P, L·2·H·d)`` → ``(L·2, B, H, P, d)``; the rows per layer come from :meth:`prefix_rows`."""
        dims = self.prompt_dims[adapter_name]
        dtype = self.model.get_input_embeddings().weight.dtype
        batch_size = prompt.shape[0]
        table = prompt.to(dtype).view(
            batch_size, dims.num_virtual_tokens, dims.num_layers * 2, dims.num_attention_heads, -1
        )
        table = table.permute(2, 0, 3, 1, 4)  # (L·2, B, H, P, d)
        for layer, (keys, values) in enumerate(self.prefix_rows(dims)):
            cache.update(table[keys], table[values], layer)


def _prepend_ones(mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[1 … 1 ; mask]``: the virtual tokens are always attended."""
    if mask.dim() != 2:
        raise ValueError(
            f"Soft prompts need a 2-D attention_mask (batch, sequence); got a {mask.dim()}-D one."
        )
    ones = torch.ones(mask.shape[0], num_tokens, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def _repeat_rows(value: Any, batch_size: int) -> Any:
    """A per-row input repeated as ``generate`` repeats the rows (``num_beams``, ``num_return_sequences``)."""
    if torch.is_tensor(value) and 0 < len(value) < batch_size and batch_size % len(value) == 0:
        return value.repeat_interleave(batch_size // len(value), dim=0)
    return value


def _batch_size(kwargs: dict[str, Any]) -> int:
    """The batch size of a model call, from whichever input it has."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = kwargs.get(name)
        if value is not None:
            return value.shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise ValueError("Soft prompts need input_ids or inputs_embeds.")
