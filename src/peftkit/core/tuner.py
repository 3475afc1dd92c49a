"""The generic tuner: injects a method's layers into a model and manages named adapters.

``PeftModel.base_model`` is a :class:`BaseTuner` subclass registered by a method (e.g. ``LoraModel``); it
holds the transformers model as ``self.model``, so parameter names read
``base_model.model.<module path>.<adapter attr>.<adapter name>.weight`` exactly as in HF PEFT.

A method supplies :meth:`BaseTuner.create_or_update_layer` (how to wrap one matched module) and may add
:meth:`BaseTuner.extra_adapter_parameters` (parameters outside its layers that an adapter trains, such as
LoRA's ``bias="all"``). Everything else (matching, trainability, deletion, merging, unloading, the
state-dict map used by checkpoints) is here and works from the layers' own declarations.

Methods that wrap nothing but train some of the model's own parameters in place (BitFit, partial
fine-tuning) return ``[]`` from :meth:`BaseTuner.target_names` and describe those parameters in
:meth:`BaseTuner.select_base_parameters`; see "Selecting base parameters" in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.architectures import (
    EMBEDDING_LAYER_NAMES,
    input_embeddings_name,
    modules_tied_to_input_embeddings,
)
from peftkit.core.config import PeftConfig
from peftkit.core.layer import BASE_ADAPTER_NAME, SAVED_PREFIX, AdapterLayer, ModulesToSaveWrapper
from peftkit.core.quantization import (
    dequantized_linear,
    forget_quantization,
    is_quantized_module,
    pause_cpu_repacking,
    resume_cpu_repacking,
)
from peftkit.core.targeting import find_target_names, name_matches


def split_module_name(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute name, module)`` for a dotted module name."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child_name, getattr(parent, child_name)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """HF PEFT's helper (``peft.utils._get_submodules``): ``(parent, module, child name)`` of ``key``; the
    order differs from :func:`split_module_name`'s."""
    if not key:  # the model itself (HF PEFT walks every name of named_modules(), the root's "" included)
        return model, model, ""
    parent, child_name, module = split_module_name(model, key)
    return parent, module, child_name


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear (its weight holds packed integers, not the float matrix)."""
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    return is_quantized_module(module)


@dataclass
class BaseParameterSelection:
    """The model's own parameters that an in-place adapter trains (returned by
    :meth:`BaseTuner.select_base_parameters`); the core makes them trainable, saves and loads them, and
    undoes them on delete.

    Attributes:
        names: parameter names in the tuner's ``model`` (``named_parameters()`` spelling); saved on disk as
            ``base_model.model.<name>``.
        new_parameters: parameters the method adds to the model's modules (e.g. zero biases), keyed by a
            name that is also in ``names``; the core registers them, and removes them on delete.
        keep_original: keep a copy of the original values so that ``disable_adapter()`` and
            ``delete_adapter()`` give the base model back exactly (costs the memory of the selection).
    """

    names: list[str]
    new_parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    keep_original: bool = False
    # filled in by the core
    original: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    merged: bool = False


#: HF PEFT's words when an adapter on a tied embedding or head unties them (``ensure_weight_tying`` off)
UNTIED_ADAPTER_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is "
    "not set to True. This can lead to complications, for example when merging the adapter or converting your "
    "model to formats other than safetensors."
)


class BaseTuner(nn.Module):
    """Method-independent adapter injection and management (HF PEFT's ``LoraModel`` & co.)."""

    #: the method's layer wrapper class; its declared containers name the adapter tensors on disk.
    layer_cls: type[AdapterLayer] = AdapterLayer
    #: HF PEFT's ``prefix``: the start of the method's parameter names (``"lora_"``), which HF PEFT's users
    #: and tests filter parameters by; ``""`` when the method has none
    prefix: str = ""
    #: whether the method's layers handle bitsandbytes' quantized linears (4-bit / 8-bit weights)
    supports_quantized_layers: bool = False
    #: whether the method's adapters fold into the base weights (merge_adapter / merge_and_unload); when
    #: not, the core refuses both with the message ``cannot_merge_reason``
    can_merge: bool = True
    cannot_merge_reason: str = ""
    #: whether rows of one batch may use different adapters (``adapter_names=`` in forward / generate);
    #: when not, the core refuses it with the message ``no_mixed_batches_reason``
    supports_mixed_batches: bool = True
    no_mixed_batches_reason: str = ""
    #: HF PEFT's flag for methods whose adapters share state across layers (a shared random projection):
    #: they need the PeftModel around them, so inject_adapter_in_model refuses them
    uses_shared_state: bool = False
    #: whether ``low_cpu_mem_usage=True`` builds this method's adapters on the meta device (their values then
    #: come from a file); a method whose adapters are computed from the model when created (soft prompts
    #: drawn from the vocabulary) builds them as usual, as HF PEFT does for prompt learning
    supports_low_cpu_mem_usage: bool = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: dict[str, PeftConfig],
        adapter_name: str,
        default_modules_to_save: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config = peft_config
        self.active_adapters: list[str] = [adapter_name]
        self.default_modules_to_save = list(default_modules_to_save)
        # what each adapter wraps: module names, and parameter names (see inject_parameters)
        self.module_targets_by_adapter: dict[str, list[str]] = {}
        self.parameter_targets_by_adapter: dict[str, list[str]] = {}
        self.base_selections: dict[str, BaseParameterSelection] = {}  # in-place adapters only
        # restored if the first injection fails or the adapters are removed again
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        for param in self.model.parameters():
            param.requires_grad_(False)
        # 4-bit layers stay in bitsandbytes' standard layout while adapters are on (peftkit.core.quantization)
        self._repacking_paused = pause_cpu_repacking(model)
        try:
            self.inject_adapter(adapter_name)
        except BaseException:
            self._restore_requires_grad()
            resume_cpu_repacking(self._repacking_paused)
            raise

    def _restore_requires_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self._requires_grad_before:
                param.requires_grad_(self._requires_grad_before[name])

    def remove_all_adapters(self) -> None:
        """Undo the wrapping entirely (no merge): the base model is as it was before injection."""
        for name in list(self.peft_config):
            self._remove_adapter_modules(name)
        self._restore_requires_grad()
        self._resume_cpu_repacking()

    def _resume_cpu_repacking(self) -> None:
        resume_cpu_repacking(self._repacking_paused)
        self._repacking_paused = []

    # ------------------------------------------------------------------------------ method hooks
    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        """Add adapter ``adapter_name`` at ``target``: return a new wrapping module, or ``None`` after
        adding the adapter in place to an existing wrapper of this method."""
        raise NotImplementedError

    def extra_adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Parameters outside the adapter layers that this adapter trains and saves, keyed by their name
        in ``self.model``."""
        return {}

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        """Full names of the modules to wrap (HF PEFT's ``target_modules`` rules); a method that wraps
        nothing returns ``[]``."""
        return find_target_names(self.model, config, modules_to_save=modules_to_save)

    def inject_parameters(self, adapter_name: str, config: PeftConfig) -> list[str]:
        """Adapters placed on parameters rather than on modules (LoRA's ``target_parameters``): wrap what the
        config selects, after the module targets, and return the parameters' full names. The default
        places nothing. Whatever it wraps is an :class:`AdapterLayer`, so rollback, deletion and saving
        need nothing more."""
        return []

    def select_base_parameters(self, adapter_name: str, config: PeftConfig) -> BaseParameterSelection | None:
        """In-place methods: the model's own parameters this adapter trains. Called after the
        ``modules_to_save`` wrappers exist; it must not change the model (the core registers
        ``new_parameters``). ``None`` (the default): the adapter trains only its own layers."""
        return None

    def base_modules(self) -> list[tuple[str, nn.Module]]:
        """The model's own modules, none inside a ``modules_to_save`` wrapper or an adapter layer (what an
        in-place method selects from)."""
        skipped: list[str] = []
        modules = []
        for name, module in self.model.named_modules():
            if any(name.startswith(prefix) for prefix in skipped):
                continue
            if isinstance(module, (ModulesToSaveWrapper, AdapterLayer)):
                skipped.append(f"{name}.")
                continue
            modules.append((name, module))
        return modules

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their on-disk names (``base_model.model.`` + the parameter map's keys).
        A method whose file holds something other than its parameters (a soft prompt saves its encoder's
        output) overrides this and :meth:`adapter_load_targets`."""
        return {SAVED_PREFIX + key: p.detach() for key, p in self.adapter_parameter_map(adapter_name).items()}

    def adapter_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """On-disk name -> the parameter a loaded tensor is copied into (the inverse of
        :meth:`adapter_state_dict`)."""
        return {SAVED_PREFIX + key: p for key, p in self.adapter_parameter_map(adapter_name).items()}

    def hotswap_tensor(self, key: str, param: nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
        """The value that checkpoint tensor ``key`` takes when hot-swapped into ``param`` (see
        :func:`peftkit.core.hotswap.hotswap_adapter`): the tensor itself, which must have ``param``'s shape. A
        method that can fit other shapes (LoRA pads smaller ranks with zeros) overrides this.

        Raises:
            ValueError: the tensor cannot take ``param``'s place.
        """
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
        return tensor

    def after_hotswap(self, adapter_name: str, config: PeftConfig) -> None:
        """Adopt the hot-swapped adapter's config (a method recomputes settings derived from it here)."""
        self.peft_config[adapter_name] = config

    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        """Values derived from the model that the saved ``adapter_config.json`` records (the in-memory
        config stays as the user wrote it)."""
        return {}

    def extra_forward_inputs(self) -> tuple[str, ...]:
        """Keyword inputs beyond the base model's own that the active adapter(s) take out of ``forward`` /
        ``generate`` and need on every call, one value per batch row (Multitask Prompt Tuning's
        ``task_ids``). A training loop passes data columns with these names through and checks, before the
        first step, that the data carries exactly these. ``()``: none."""
        return ()

    def check_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Check values of :meth:`extra_forward_inputs` (e.g. every task id of a data set) before they reach
        ``forward``, so that a bad value is reported before training starts.

        Raises:
            ValueError: a value the active adapter(s) cannot take.
        """

    def parameter_count_parts(self) -> dict[str, int]:
        """Parameter counts of the parts of the active adapter(s), for a method made of parts (a
        combination's components); ``print_trainable_parameters`` prints them under the total. ``{}``: one
        part."""
        return {}

    def check_new_adapter_config(self, config: PeftConfig) -> None:
        """Refuse an adapter that cannot live beside the ones the model has (``self.peft_config`` already
        holds it), before anything is injected (HF PEFT's ``_check_new_adapter_config``). The default
        accepts every config.

        Raises:
            ValueError: the combination of adapters is not supported.
        """

    def on_step_end(self, global_step: int) -> None:
        """Called by a training loop after each optimizer step, before the gradients are cleared, for a
        method that adapts itself during training (AdaLoRA reallocates ranks from the gradients). The
        default does nothing."""

    def pad_ranks(self, target_rank: int) -> None:
        """Pad every adapter to rank ``target_rank`` with zeros (outputs unchanged), so that adapters of any
        rank up to it hot-swap without a shape change
        (:func:`peftkit.core.hotswap.prepare_model_for_compiled_hotswap`).

        Raises:
            ValueError: the method has no rank (the default), or ``target_rank`` is below an adapter's rank.
        """
        raise ValueError(
            f"{type(self).__name__} adapters have no rank to pad; hot-swapping them needs equal shapes."
        )

    def relative_to_initial(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """For ``save_pretrained(path_initial_model_for_weight_conversion=...)``: the adapter's saved tensors
        rewritten as the change from ``initial`` (the same adapter's tensors when it was created), for the
        original base model, and the config fields that change with them. The default refuses.

        Raises:
            ValueError: the method (or this adapter) cannot be converted, or ``initial`` does not match.
        """
        raise ValueError(
            f"{type(self).__name__} adapters cannot be converted relative to an initial adapter "
            f"(path_initial_model_for_weight_conversion is for LoRA adapters initialised with PiSSA or OLoRA)."
        )

    def after_loading(self, adapter_name: str) -> None:
        """Called after saved tensors replaced adapter parameters built on the meta device
        (``low_cpu_mem_usage``): restore what tied parameters to each other (views of one storage). The
        default has nothing to restore."""

    def auto_saves_embedding_weights(self, config: PeftConfig) -> bool:
        """Whether ``save_pretrained(save_embedding_layers="auto")`` stores the base weights of the adapted
        embeddings beside the adapter (HF PEFT does, for a vocabulary that may have been resized). A method
        that saves whole trained rows (trainable tokens) needs no base weights and returns ``False``."""
        return True

    @classmethod
    def required_adapters(cls, config: PeftConfig) -> dict[str, str | None]:
        """Adapters that an adapter with ``config`` builds on (AdapterFusion: the adapters it fuses), each with
        the fingerprint of its saved tensors (:func:`peftkit.core.checkpoint.adapter_fingerprint`) or ``None``.
        ``PeftModel.from_pretrained`` / ``load_adapter`` load the ones the model lacks from where
        ``save_pretrained`` wrote them beside it. ``{}``: none."""
        return {}

    @classmethod
    def saved_tensor_parts(cls, config: PeftConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
        """For ``peftkit inspect``: part label -> (on-disk key prefix, that part's layer containers), for a
        method whose file holds several parts. ``{}``: one part, described by ``layer_cls``."""
        return {}

    # ------------------------------------------------------------------------------- plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @classmethod
    def reserved_names(cls) -> set[str]:
        """Names an adapter may not take: they are attributes of the wrapper modules."""
        layer = cls.layer_cls
        return (
            {"base_layer", "original_module", "modules_to_save"}
            | set(layer.adapter_param_containers)
            | set(layer.adapter_settings)
        )

    @property
    def targeted_module_names(self) -> list[str]:
        """HF PEFT's list of the modules the adapters wrap (every adapter's, each name once)."""
        return list(dict.fromkeys(n for names in self.module_targets_by_adapter.values() for n in names))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """HF PEFT's list of the parameters adapted directly (``target_parameters``), each name once."""
        return list(dict.fromkeys(n for names in self.parameter_targets_by_adapter.values() for n in names))

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        return self._walk(AdapterLayer)

    def save_wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return self._walk(ModulesToSaveWrapper)

    def _walk(self, kind: type) -> list:
        cache = self.__dict__.get("_module_walk")
        if cache is not None and kind in cache:
            return cache[kind]
        found = [(n, m) for n, m in self.model.named_modules() if isinstance(m, kind)]
        if cache is not None:
            cache[kind] = found
        return found

    # ------------------------------------------------------------------------------- injection
    def inject_adapter(self, adapter_name: str) -> None:
        """Wrap every module the adapter's config selects; on any error, undo everything."""
        config = self.peft_config[adapter_name]
        config.check_complete()
        self.check_new_adapter_config(config)
        holder = next((n for n, s in self.base_selections.items() if s.names), None)
        if holder is not None:
            raise ValueError(
                f"Adapter {holder!r} trains the model's own parameters in place, so it must be the only adapter "
                f"on this model (another adapter would share those tensors). Delete it first, or wrap a fresh "
                f"base model for {adapter_name!r}."
            )
        try:
            saved = list(getattr(config, "modules_to_save", None) or []) + self.default_modules_to_save
            names = self.target_names(config, saved)
            for name in names:
                parent, child_name, target = split_module_name(self.model, name)
                if not self.supports_quantized_layers and is_quantized_layer(target):
                    raise ValueError(
                        f"{name} is a quantized {type(target).__name__} (bitsandbytes); "
                        f"{type(self).__name__} does not support quantized layers yet. Load the base model "
                        f"without load_in_4bit / load_in_8bit."
                    )
                new_module = self.create_or_update_layer(target, name, config, adapter_name)
                if new_module is not None:
                    setattr(parent, child_name, new_module)
            self.module_targets_by_adapter[adapter_name] = names
            self.parameter_targets_by_adapter[adapter_name] = self.inject_parameters(adapter_name, config)
            self._wrap_modules_to_save(adapter_name, config)
            selection = self.select_base_parameters(adapter_name, config)
            if selection is not None:
                self._add_selection(adapter_name, selection)
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            self.module_targets_by_adapter.pop(adapter_name, None)
            self.parameter_targets_by_adapter.pop(adapter_name, None)
            raise
        # the other adapters keep their trainability (HF PEFT: an inactive adapter loaded as trainable stays so)
        kept = {
            id(p): p.requires_grad
            for n in self.peft_config
            if n != adapter_name
            for p in self.adapter_parameter_map(n).values()
        }
        self.set_adapter(self.active_adapters)
        for name in self.peft_config:
            if name != adapter_name:
                for param in self.adapter_parameter_map(name).values():
                    param.requires_grad_(kept.get(id(param), param.requires_grad))

    def _add_selection(self, adapter_name: str, selection: BaseParameterSelection) -> None:
        others = [n for n in self.peft_config if n != adapter_name]
        if selection.names and others:
            raise ValueError(
                f"Adapter {adapter_name!r} trains the model's own parameters in place, so it must be the only "
                f"adapter on this model, which already has {others}. Delete those first, or wrap a fresh base "
                f"model."
            )
        self.base_selections[adapter_name] = selection
        for name, param in selection.new_parameters.items():
            parent, attr, _ = split_module_name(self.model, name)
            setattr(parent, attr, param)
        if selection.keep_original:
            selection.original = {
                n: self.model.get_parameter(n).detach().clone()
                for n in selection.names
                if n not in selection.new_parameters
            }

    def _wrap_modules_to_save(self, adapter_name: str, config: PeftConfig) -> None:
        requested = list(getattr(config, "modules_to_save", None) or [])
        patterns = requested + [d for d in self.default_modules_to_save if d not in requested]
        if not patterns:
            return
        tied_copies = self._tied_modules_to_save(config, patterns)
        if tied_copies:
            embedding = next(iter(tied_copies.values()))
            patterns = [p for p in patterns if not any(name_matches(t, [p]) for t in tied_copies)]
            patterns.append(embedding)
        # a requested head that is tied is saved through the embedding's copy
        found = {p for p in requested if any(name_matches(t, [p]) for t in tied_copies)}
        wrapped_ids = {id(m.original_module) for _, m in self.save_wrappers()}
        for name, module in list(self.model.named_modules()):
            if not name or id(module) in wrapped_ids:
                continue
            hit = [p for p in patterns if name_matches(name, [p])]
            if not hit or isinstance(module, AdapterLayer):
                continue
            if ".modules_to_save." in f".{name}." or ".original_module." in f".{name}.":
                continue
            found.update(hit)
            parent, child_name, _ = split_module_name(self.model, name)
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            if wrapper is not module:
                setattr(parent, child_name, wrapper)
            wrapper.add_adapter(adapter_name)
        # also the case of a module already wrapped by an earlier adapter
        for name, wrapper in self.save_wrappers():
            hit = [p for p in patterns if name_matches(name, [p])]
            if hit and adapter_name not in wrapper.modules_to_save:
                wrapper.add_adapter(adapter_name)
            found.update(hit)
        for name, embedding in tied_copies.items():
            self._tie_saved_copy(name, embedding, adapter_name)
        # HF PEFT writes every task default head name (e.g. "classifier" and "score"); those may be absent
        missing = [p for p in requested if p not in found and p not in self.default_modules_to_save]
        if missing:
            raise ValueError(
                f"modules_to_save entries {missing} match no module of the model. Use module names as "
                f"printed by model.named_modules() (a dotted suffix such as 'classifier' matches)."
            )

    def _tied_modules_to_save(self, config: PeftConfig, patterns: Sequence[str]) -> dict[str, str]:
        """HF PEFT's ``ensure_weight_tying`` for ``modules_to_save``: when the model ties its output head to
        the input embedding and either of them is to be saved, the head's trained copy is the embedding's
        (``{head name: embedding name}``). Without the option (a config that has it), a warning says that the
        copy unties them, as HF PEFT's does."""
        tied = modules_tied_to_input_embeddings(self.model)
        embedding = input_embeddings_name(self.model)
        if not tied or embedding is None:
            if getattr(config, "ensure_weight_tying", False):
                warnings.warn(
                    "You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                    stacklevel=4,
                )  # HF PEFT's words
            return {}
        involved = [n for n in (embedding, *tied) if any(name_matches(n, [p]) for p in patterns)]
        # HF PEFT's rule: only an entry named like an embedding layer ("embed_tokens", "lm_head") counts
        if not involved or not any(str(p).split(".")[-1] in EMBEDDING_LAYER_NAMES for p in patterns):
            return {}
        if not getattr(config, "ensure_weight_tying", False):
            if hasattr(config, "ensure_weight_tying"):
                warnings.warn(UNTIED_ADAPTER_WARNING, stacklevel=4)
            return {}
        return dict.fromkeys(tied, embedding)

    def _tie_saved_copy(self, name: str, embedding: str, adapter_name: str) -> None:
        """Wrap the head ``name`` so that its copy for ``adapter_name`` holds the embedding copy's weight."""
        source = self.model.get_submodule(embedding)
        assert isinstance(source, ModulesToSaveWrapper)
        parent, child_name, module = split_module_name(self.model, name)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        if wrapper is not module:
            setattr(parent, child_name, wrapper)
        if adapter_name not in wrapper.modules_to_save:
            wrapper.add_adapter(adapter_name)
        # the same parameter object (set directly: a low_cpu_mem_usage block would re-register a copy)
        wrapper.modules_to_save[adapter_name]._parameters["weight"] = source.modules_to_save[
            adapter_name
        ].weight

    # ---------------------------------------------------------------------- activity & training
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make ``adapter_names`` the active adapters (outputs of several are summed)."""
        names = self.known_adapter_names(adapter_names)
        merged = [layer for _, layer in self.adapter_layers() if layer.merged]
        if merged and set(names) != set(self.active_adapters):
            # as HF PEFT: a merged adapter would keep acting under the new one, so it is unmerged first
            warnings.warn(
                "Adapters are merged; unmerging them before switching the active adapter.", stacklevel=2
            )
            self.unmerge_adapter()
        with self.module_walk_cached():
            for _, wrapper in self.save_wrappers():
                wrapper.set_adapter(names)  # may raise before anything changes elsewhere
            for _, layer in self.adapter_layers():
                layer.set_adapter(names)
            self.active_adapters = names
            self._update_requires_grad()

    def known_adapter_names(self, adapter_names: Any) -> list[str]:
        """``adapter_names`` (a name, or a non-empty list of names) as a list, each one an adapter of this
        model; ``ValueError`` names what is wrong otherwise."""
        if isinstance(adapter_names, str):
            names = [adapter_names]
        elif isinstance(adapter_names, (list, tuple)) and adapter_names:
            names = list(adapter_names)
        else:
            raise ValueError(
                f"Give an adapter name or a non-empty list of names, got {adapter_names!r}; this model has "
                f"{list(self.peft_config)}."
            )
        unknown = [n for n in names if not isinstance(n, str) or n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        return names

    def _update_requires_grad(self) -> None:
        with self.module_walk_cached():
            for name in self.peft_config:
                trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
                for param in self.adapter_parameter_map(name).values():
                    param.requires_grad_(trainable)

    @contextlib.contextmanager
    def module_walk_cached(self) -> Iterator[None]:
        """Inside the block :meth:`adapter_layers` and :meth:`save_wrappers` walk the model once and reuse
        the result (switching adapters on a model with many of them would otherwise walk it once per
        adapter). Nothing may add or remove adapter modules inside the block."""
        if self.__dict__.get("_module_walk") is not None:
            yield
            return
        self.__dict__["_module_walk"] = {}
        try:
            yield
        finally:
            self.__dict__["_module_walk"] = None

    def adapter_parameter_map(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Every parameter adapter ``adapter_name`` owns, keyed by its on-disk name relative to
        ``self.model`` (the adapter name left out, as in HF PEFT's files)."""
        params: dict[str, nn.Parameter] = {}
        for path, layer in self.adapter_layers():
            for local, param in layer.adapter_parameters(adapter_name).items():
                params[f"{path}.{local}"] = param
        for path, wrapper in self.save_wrappers():
            for local, param in wrapper.adapter_parameters(adapter_name).items():
                params[f"{path}.{local}"] = param
        params.update(self.extra_adapter_parameters(adapter_name))
        selection = self.base_selections.get(adapter_name)
        if selection is not None:
            params.update({name: self.model.get_parameter(name) for name in selection.names})
        return params

    # ---------------------------------------------------------------------------------- deletion
    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name} does not exist; this model has {list(self.peft_config)}."
            )
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapter_layers()):
            # as HF PEFT: unmerging here would also unmerge the other merged adapters of each layer
            raise ValueError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Please unmerge them first."
            )
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name]
        self.module_targets_by_adapter.pop(adapter_name, None)
        self.parameter_targets_by_adapter.pop(adapter_name, None)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        """Delete the adapter from every layer; a layer left with no adapter is replaced by its base."""
        for name, layer in reversed(self.adapter_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                parent, child_name, _ = split_module_name(self.model, name)
                setattr(parent, child_name, layer.base_layer)
        for name, wrapper in reversed(self.save_wrappers()):
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapter_names:
                parent, child_name, _ = split_module_name(self.model, name)
                setattr(parent, child_name, wrapper.original_module)
        selection = self.base_selections.pop(adapter_name, None)
        if selection is not None:
            self._release_selection(selection)

    def _release_selection(self, selection: BaseParameterSelection) -> None:
        """Freeze the selected parameters, put back their original values where a copy was kept (without
        one, the trained values stay), and remove the parameters the method added."""
        with torch.no_grad():
            for name in selection.names:
                if name not in selection.new_parameters:
                    param = self.model.get_parameter(name)
                    param.requires_grad_(False)
                    if name in selection.original:
                        param.copy_(selection.original[name])
        for name in selection.new_parameters:
            parent, attr = split_module_name(self.model, name)[:2]
            setattr(parent, attr, None)

    @contextlib.contextmanager
    def _original_base_values(self) -> Iterator[None]:
        """Inside the block, in-place adapters' parameters hold their original values (added ones are
        taken out); the trained values return afterwards, bit for bit."""
        trained: list[tuple[nn.Parameter, torch.Tensor]] = []
        added: list[tuple[nn.Module, str, nn.Parameter]] = []
        with torch.no_grad():
            for selection in self.base_selections.values():
                for name in selection.names:
                    if name in selection.new_parameters:
                        parent, attr, param = split_module_name(self.model, name)
                        added.append((parent, attr, param))
                        setattr(parent, attr, None)
                    else:
                        param = self.model.get_parameter(name)
                        trained.append((param, param.detach().clone()))
                        param.copy_(selection.original[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in trained:
                    param.copy_(value)
            for parent, attr, param in added:
                setattr(parent, attr, param)

    # ------------------------------------------------------------------------------ enable/disable
    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Every adapter off (merged ones are unmerged for the duration); the previous state returns."""
        no_copy = [n for n, s in self.base_selections.items() if s.names and not s.keep_original]
        if no_copy:
            raise ValueError(
                f"Adapter {no_copy[0]!r} trains the model's own parameters in place and keeps no copy of their "
                f"original values (a copy would cost the memory of the trained parameters), so "
                f"disable_adapter() cannot run the base model. Load a separate base model to compare against."
            )
        layers = self.adapter_layers()
        wrappers = self.save_wrappers()
        merged = [(layer, list(layer.merged_adapters)) for _, layer in layers if layer.merged]
        for layer, _ in merged:
            layer.unmerge()
        previous = [(m, m.disable_adapters) for _, m in layers] + [
            (m, m.disable_adapters) for _, m in wrappers
        ]
        # as HF PEFT: nothing of the adapters trains inside the block (their flags come back after it)
        trainable = [
            p for n in self.peft_config for p in self.adapter_parameter_map(n).values() if p.requires_grad
        ]
        try:
            for module, _ in previous:
                module.disable_adapters = True
            for param in trainable:
                param.requires_grad_(False)
            with self._original_base_values():
                yield
        finally:
            for module, state in previous:
                module.disable_adapters = state
            for param in trainable:
                param.requires_grad_(True)
            for layer, names in merged:
                layer.merge(adapter_names=names)

    def enable_adapter_layers(self) -> None:
        """HF PEFT's switch back on after :meth:`disable_adapter_layers` (every layer, every wrapper)."""
        self._enable_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """HF PEFT's in-place switch: every adapter layer and ``modules_to_save`` copy off, so the model
        runs its base layers (trained biases, ``bias="all"``, stay: a warning says so)."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                    f"the same output as the base model would without adaption.",
                    stacklevel=2,
                )
        self._enable_adapter_layers(False)

    def _enable_adapter_layers(self, enabled: bool) -> None:
        with self.module_walk_cached():
            for _, module in [*self.adapter_layers(), *self.save_wrappers()]:
                module.enable_adapters(enabled)
            if enabled:
                self._update_requires_grad()

    @property
    def adapters_enabled(self) -> bool:
        """Whether the adapters act: not inside ``disable_adapter()`` nor switched off by
        :meth:`disable_adapter_layers` (a model without adapter layers counts as enabled)."""
        modules = [m for _, m in [*self.adapter_layers(), *self.save_wrappers()]]
        return not modules or not all(m.disable_adapters for m in modules)

    # ---------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights; with ``safe_merge`` a NaN/inf result changes nothing."""
        self.check_can_merge(adapter_names)
        self._merge_layers(adapter_names, safe_merge)

    def _merge_layers(self, adapter_names: Sequence[str] | None, safe_merge: bool) -> None:
        """Merge ``adapter_names`` (default: the active ones) in every adapter layer, all or nothing."""
        if adapter_names is not None:  # names of this model's adapters, or of adapters on its layers
            in_layers = {n for _, layer in self.adapter_layers() for n in layer.adapter_names}
            unknown = [
                n for n in adapter_names if not isinstance(n, str) or n not in {*self.peft_config, *in_layers}
            ]
            if isinstance(adapter_names, str) or unknown:
                raise ValueError(
                    f"Unknown adapter(s) {unknown or adapter_names!r} (give a list of names); this model has "
                    f"{list(self.peft_config)}."
                )
        # Merging replaces each base weight (and bias) tensor (out of place), so keeping the old tensors
        # makes the rollback exact (no (W + Δ) - Δ rounding) and free.
        # A quantized base gets a new weight parameter object, so the objects are kept too.
        before = [
            (
                layer,
                {n: (p, p.data) for n, p in layer.get_base_layer().named_parameters(recurse=False)},
                list(layer.merged_adapters),
                list(layer._weight_before_merge),
                list(layer._untied_originals),
            )
            for _, layer in self.adapter_layers()
        ]
        if safe_merge:  # a modules_to_save copy is part of what a merged model computes
            for path, wrapper in self.save_wrappers():
                for name in self.active_adapters if adapter_names is None else adapter_names:
                    copy_ = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else None  # noqa: SIM401 (ModuleDict)
                    if copy_ is not None and not all(torch.isfinite(p).all() for p in copy_.parameters()):
                        raise ValueError(
                            f"Merging adapter {name!r} would put NaN or inf into the model ({path} holds "
                            f"non-finite values); the adapter is broken (check its training). Nothing was "
                            f"merged."
                        )
        try:
            self._untie_merged_weights(adapter_names)
            for layer, *_ in before:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        except BaseException:
            for layer, tensors, merged, weight_before_merge, untied_originals in before:
                base = layer.get_base_layer()
                for name, (param, tensor) in tensors.items():
                    setattr(base, name, param)
                    param.data = tensor
                layer._untied_originals[:] = untied_originals
                layer.merged_adapters = merged
                layer._weight_before_merge[:] = weight_before_merge
            raise
        # An in-place adapter's values already live in the model: merging it is the identity.
        for name in self.active_adapters if adapter_names is None else adapter_names:
            selection = self.base_selections.get(name)
            if selection is not None and selection.merged:
                warnings.warn(
                    f"Adapter {name!r} is already merged; merging it again changes nothing.", stacklevel=2
                )
            elif selection is not None:
                selection.merged = True

    def _untie_merged_weights(self, adapter_names: Sequence[str] | None) -> None:
        """Give each layer about to merge its own copy of a base parameter it shares with another module
        (tied embeddings, blocks repeated by ``layer_replication``): merging into the shared tensor would add
        this layer's update to every module that holds it. The rollback of a failed merge ties them again."""
        counts: dict[int, int] = {}
        for _, param in self.model.named_parameters(remove_duplicate=False):
            counts[id(param)] = counts.get(id(param), 0) + 1
        names = self.active_adapters if adapter_names is None else adapter_names

        def pending(layer: AdapterLayer) -> list[str]:
            return [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]

        # A weight held only by a layer and the layers tied to it stays shared when every adapter about to
        # merge there is one update across the group (it is written once); otherwise each layer gets a copy.
        groups: dict[int, tuple[AdapterLayer, list[AdapterLayer]]] = {}
        for _, layer in self.adapter_layers():
            owner = layer.tied_layer
            if owner is not None:
                own = {id(p) for p in layer.get_base_layer().parameters(recurse=False)}
                for param in owner.get_base_layer().parameters(recurse=False):
                    if id(param) in own:
                        groups.setdefault(id(param), (owner, []))[1].append(layer)
        kept_shared = {
            pid
            for pid, (owner, heads) in groups.items()
            if 1 + len(heads) == counts.get(pid, 0)
            and all(head.merges_through_tie(n) for head in heads for n in pending(head))
            and all(
                n in head.adapter_names and head.merges_through_tie(n)
                for n in pending(owner)
                for head in heads
            )
        }
        untied = []
        for path, layer in self.adapter_layers():
            if not any(n in layer.adapter_names and n not in layer.merged_adapters for n in names):
                continue
            base = layer.get_base_layer()
            for name, param in list(base.named_parameters(recurse=False)):
                if (
                    counts.get(id(param), 0) > 1
                    and type(param) is nn.Parameter
                    and id(param) not in kept_shared
                ):
                    setattr(
                        base, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    )
                    layer._untied_originals.append((name, param))
                    untied.append(f"{path}.{name}")
        if untied:
            warnings.warn(
                f"Merging into {len(untied)} weight(s) that other modules share (tied or replicated layers, e.g. "
                f"{untied[0]}): each merged layer gets its own copy, so the others keep their weights.",
                stacklevel=4,
            )

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()
            if not layer.merged:  # tie again what merging untied (the original tensors were never changed)
                base = layer.get_base_layer()
                for name, original in layer._untied_originals:
                    setattr(base, name, original)
                layer._untied_originals.clear()
        for selection in self.base_selections.values():
            selection.merged = False

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge the active (or given) adapters and return the plain base model.

        On a quantized (bitsandbytes 4-bit / 8-bit) base, every quantized linear of the model is first
        replaced by a full-precision ``nn.Linear`` holding its dequantized weight, and the adapters are
        merged into that: the result computes exactly what the unmerged adapter model did (up to float
        rounding) and is a plain float model. ``requantize=True`` instead quantizes each merged weight
        again (small, quantized, but off by the rounding of the second quantization).
        """
        self.check_can_merge(adapter_names)
        restore: list[tuple[nn.Module, str, nn.Module]] = []
        remerged: list[AdapterLayer] = []
        if not requantize:
            restore, remerged = self._dequantize_quantized_layers()
        try:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        except BaseException:
            for parent, attr, module in reversed(restore):
                setattr(parent, attr, module)
            for layer in remerged:  # their original quantized weights are back: unmerged
                layer.merged_adapters = []
            raise
        model = self.unload()
        if restore:
            forget_quantization(model)
        return model

    def check_can_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Raise ``ValueError`` (``cannot_merge_reason``) when the adapters (default: the active ones) do not
        fold into the base weights. ``merge_adapter`` and ``merge_and_unload`` call it before changing
        anything; a method made of parts overrides it to ask each part."""
        if not self.can_merge:
            raise ValueError(
                self.cannot_merge_reason
                or f"{type(self).__name__} adapters cannot be merged into the base weights "
                f"(merge_adapter / merge_and_unload)."
            )

    def _dequantize_quantized_layers(
        self,
    ) -> tuple[list[tuple[nn.Module, str, nn.Module]], list[AdapterLayer]]:
        """Replace each quantized linear by a full-precision copy (an adapter layer merged into a
        quantized weight is unmerged first and merged again after); ``(parent, name, original)`` for undo
        and the layers merged again."""
        remerge = []
        for _, layer in self.adapter_layers():
            if layer.merged and layer.base_is_quantized:
                remerge.append((layer, list(layer.merged_adapters)))
                layer.unmerge()
        replaced = []
        for name, module in list(self.model.named_modules()):
            if is_quantized_layer(module) and not isinstance(module, AdapterLayer):
                parent, attr, _ = split_module_name(self.model, name)
                setattr(parent, attr, dequantized_linear(module))
                replaced.append((parent, attr, module))
        for layer, names in remerge:
            layer.merge(adapter_names=names)
        return replaced, [layer for layer, _ in remerge]

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging (merged weights stay) and return the base model.
        A ``modules_to_save`` wrapper is replaced by the active adapter's trained copy; parameters trained
        in place keep their trained values."""
        for name, layer in reversed(self.adapter_layers()):
            parent, child_name, _ = split_module_name(self.model, name)
            setattr(parent, child_name, layer.get_base_layer())
        for name, wrapper in reversed(self.save_wrappers()):
            parent, child_name, _ = split_module_name(self.model, name)
            active = wrapper.active_adapter
            kept = wrapper.modules_to_save[active] if active is not None else wrapper.original_module
            setattr(parent, child_name, kept)
        self._resume_cpu_repacking()
        return self.model

    # ---------------------------------------------------------------------------- mixed batches
    @contextlib.contextmanager
    def batch_adapter_names(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Route each batch row through its own adapter (``"__base__"`` for none) inside the block."""
        if adapter_names is None:
            yield
            return
        if not self.supports_mixed_batches:
            raise ValueError(
                self.no_mixed_batches_reason
                or f"Mixed-adapter batches (adapter_names=...) are not supported by {type(self).__name__}."
            )
        known = set(self.peft_config) | {BASE_ADAPTER_NAME}
        unknown = sorted({n for n in adapter_names if n not in known})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(known)}.")
        in_place = [n for n, s in self.base_selections.items() if s.names]
        if in_place:
            raise ValueError(
                f"Mixed-adapter batches need adapters that live in their own parameters; adapter "
                f"{in_place[0]!r} trains the model's own parameters in place, so every row sees it."
            )
        layers = [m for _, m in self.adapter_layers()] + [m for _, m in self.save_wrappers()]
        if any(isinstance(m, AdapterLayer) and m.merged for m in layers):
            raise ValueError("Mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        for module in layers:
            module.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for module in layers:
                module.batch_adapter_names = None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts as HF PEFT computes them (4-bit packed weights counted
    at their unpacked size)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            itemsize = getattr(getattr(param, "quant_storage", None), "itemsize", 1)
            n = n * 2 * itemsize
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def state_dict_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in params.items()}
