"""``PeftModel``: the user-facing wrapper, with HF PEFT's names.

``get_peft_model(model, config)`` wraps a transformers (or any torch) model; the task subclass is chosen by
``config.task_type``. The wrapper delegates to a method's :class:`~peftkit.core.tuner.BaseTuner`
(``self.base_model``), which holds the original model as ``self.base_model.model``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from torch import nn

from peftkit.core.checkpoint import (
    INJECTED_TUNER_ATTR,
    adapter_fingerprint,
    get_peft_model_state_dict,
    load_adapter_weights,
    record_injected_tuner,
    save_adapter_weights,
    set_peft_model_state_dict,
    sized_by,
    validate_adapter_name,
)
from peftkit.core.config import CONFIG_NAME, PeftConfig, TaskType
from peftkit.core.layer import (
    SAVED_PREFIX,
    AdapterLayer,
    ModulesToSaveWrapper,
    adapter_dtype_policy,
    new_parameters_on_meta,
)
from peftkit.core.registry import get_method
from peftkit.core.targeting import name_matches
from peftkit.core.tuner import BaseTuner, count_parameters

_P = inspect.Parameter


class TaskForward:
    """``PeftModel.forward`` with named arguments, as tools read them.

    Training tools decide from ``inspect.signature(model.forward)`` what to feed the model: transformers'
    ``Trainer`` keeps only the dataset columns named there and looks for ``labels`` in the class's
    signature (``eval_loss``, ``label_names``). A bare ``forward(*args, **kwargs)`` names nothing. So the
    class's ``forward`` names HF PEFT's arguments for its task (``names``), and on an instance it names those
    plus every argument of the base model's own forward (``token_type_ids`` for BERT, ``pixel_values`` for
    a vision model...) and ``adapter_names``. Calls pass the arguments through; a named argument left at
    ``None`` is not passed (the base model's own default applies).
    """

    def __init__(self, *names: str) -> None:
        self.names = names
        self.function = self._implementation(names)
        self.function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_P("self", _P.POSITIONAL_OR_KEYWORD)]
            + [_P(n, _P.POSITIONAL_OR_KEYWORD, default=None) for n in names]
            + [_P("adapter_names", _P.KEYWORD_ONLY, default=None), _P("kwargs", _P.VAR_KEYWORD)]
        )
        self._per_base: dict[Any, Callable[..., Any]] = {}  # base forward -> function with its signature

    @staticmethod
    def _implementation(names: tuple[str, ...]) -> Callable[..., Any]:
        def forward(self: PeftModel, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
            if not names:  # the generic wrapper: everything goes to the base model as given
                with self.base_model.batch_adapter_names(adapter_names):
                    return self.base_model(*args, **kwargs)
            if len(args) > len(names):
                raise TypeError(
                    f"forward takes at most {len(names)} positional arguments ({', '.join(names)})."
                )
            for name, value in zip(names, args):
                if name in kwargs:
                    raise TypeError(f"forward got two values for argument {name!r}.")
                kwargs[name] = value
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in names}
            with self.base_model.batch_adapter_names(adapter_names):
                return self.base_model(**kwargs)

        return forward

    def __get__(self, obj: PeftModel | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self.function
        base_forward = getattr(obj.get_base_model(), "forward", None)
        key = getattr(base_forward, "__func__", base_forward)
        function = self._per_base.get(key)
        if function is None:
            function = self._per_base[key] = self._with_base_arguments(base_forward)
        return types.MethodType(function, obj)

    def _with_base_arguments(self, base_forward: Any) -> Callable[..., Any]:
        own = list(inspect.signature(self.function).parameters.values())
        try:
            base = inspect.signature(base_forward).parameters.values()
        except (TypeError, ValueError):
            base = []
        taken = {p.name for p in own}
        # after the task's own names the base's arguments are keyword-only; with no own names (the generic
        # wrapper) they keep their kinds, since positional arguments go to the base model as given
        extra = [
            p.replace(kind=_P.KEYWORD_ONLY) if self.names or p.kind == _P.KEYWORD_ONLY else p
            for p in base
            if p.name not in taken and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
        ]
        function = types.FunctionType(
            self.function.__code__,
            self.function.__globals__,
            self.function.__name__,
            self.function.__defaults__,
            self.function.__closure__,
        )
        function.__kwdefaults__ = self.function.__kwdefaults__
        function.__qualname__ = self.function.__qualname__
        function.__doc__ = self.function.__doc__
        function.__signature__ = inspect.Signature(own[:-2] + extra + own[-2:])  # type: ignore[attr-defined]
        return function


class PeftModel(nn.Module):
    """A base model with one or more named adapters.

    Args:
        model: the base model (its parameters are frozen).
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name (``"default"``).
    """

    #: modules trained in full and saved by default for this task (the classification head).
    default_modules_to_save: ClassVar[tuple[str, ...]] = ()
    #: transformers' "adapters are attached" flag: its Trainer refuses to train a quantized model without it
    _hf_peft_config_loaded: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool | None = None,
        low_cpu_mem_usage: bool = False,
        **_: Any,
    ):
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("The model is already a PeftModel; use model.add_adapter(name, config) instead.")
        wrapped = next(
            (n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))), None
        )
        if wrapped is not None:
            raise ValueError(
                f"You are trying to modify a model with PEFT for a second time: it still holds the adapter layers "
                f"of an earlier PeftModel (e.g. {wrapped}). Call .unload() or .merge_and_unload() on that one "
                f"first, or add another adapter to it with add_adapter(name, config)."
            )
        tuner_cls = _tuner_class_for(model, peft_config, adapter_name)
        on_meta = low_cpu_mem_usage and tuner_cls.supports_low_cpu_mem_usage
        with adapter_dtype_policy(autocast_adapter_dtype), new_parameters_on_meta(on_meta):
            self.base_model: BaseTuner = tuner_cls(
                model,
                {adapter_name: peft_config},
                adapter_name,
                default_modules_to_save=self.default_modules_to_save,
            )

    # ------------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    #: The base model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) runs each row of
    #: the batch through its own adapter. Its signature names the base model's arguments (TaskForward).
    forward = TaskForward()

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self.base_model.batch_adapter_names(adapter_names):
            return self.base_model.generate(*args, **kwargs)  # the model's own unless the tuner adds to it

    # ---------------------------------------------------------------------- adapter management
    def _check_new_adapter_name(self, adapter_name: Any) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        validate_adapter_name(
            adapter_name,
            self.get_base_model(),
            existing=self.peft_config,
            reserved=self.base_model.reserved_names(),
        )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        autocast_adapter_dtype: bool | None = None,
        low_cpu_mem_usage: bool = False,
        **_: Any,
    ) -> None:
        """Add an adapter (not activated: call :meth:`set_adapter`). Nothing changes on error.

        ``autocast_adapter_dtype`` (HF PEFT's option): over a float16 / bfloat16 base, create the adapter in
        float32 (True, the default) or in the base's dtype (False); None keeps the setting of an enclosing
        call (True outside any). ``low_cpu_mem_usage`` (HF PEFT's option): create the adapter's parameters
        on the meta device, for values that :func:`set_peft_model_state_dict` will load next (the model
        cannot run before)."""
        self._check_new_adapter_name(adapter_name)
        current = str(self.active_peft_config.peft_type)
        # methods registered with the same tuner share its layers (AdapterFusion next to bottleneck adapters)
        if str(peft_config.peft_type) != current and not _same_tuner(peft_config, self.base_model):
            raise ValueError(
                f"This model's adapters are {current}; a {peft_config.peft_type} adapter cannot be added to it."
            )
        self.peft_config[adapter_name] = peft_config
        try:
            on_meta = low_cpu_mem_usage and self.base_model.supports_low_cpu_mem_usage
            with adapter_dtype_policy(autocast_adapter_dtype), new_parameters_on_meta(on_meta):
                self.base_model.inject_adapter(adapter_name)
        except BaseException:
            del self.peft_config[adapter_name]
            raise
        if not self.training:  # the new adapter's modules (dropout) follow the model's mode
            self.eval()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the exact base model; the previous state returns."""
        with self.base_model.adapters_disabled():
            yield

    @property
    def has_active_enabled_adapter(self) -> bool:
        """HF PEFT's flag: the adapters act (not inside :meth:`disable_adapter`, not switched off by
        ``disable_adapter_layers()``)."""
        return self.base_model.adapters_enabled

    def get_layer_status(self) -> list[Any]:
        """HF PEFT's per-layer status records (see :func:`peftkit.get_layer_status`)."""
        from peftkit.core.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """HF PEFT's model status record (see :func:`peftkit.get_model_status`)."""
        from peftkit.core.status import get_model_status

        return get_model_status(self)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )
        for part, count in self.base_model.parameter_count_parts().items():  # a combination's components
            print(f"  {part}: {count:,d}")

    # ----------------------------------------------------------------------------- checkpoints
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool = True,
        save_embedding_layers: bool | str = "auto",
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **_: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``; the
        ``"default"`` adapter in ``save_directory``, others in ``save_directory/<name>/``.

        ``path_initial_model_for_weight_conversion`` (HF PEFT's option): the folder of the same adapter saved
        right after it was created. An adapter whose creation moved part of the base weight into it (PiSSA,
        OLoRA) is then written as the change since that start, an ordinary adapter for the original base
        model (LoRA: twice the rank, ``ΔW = s·(BA − B₀A₀)``); the method says how
        (:meth:`~peftkit.core.tuner.BaseTuner.relative_to_initial`).

        ``save_embedding_layers`` (HF PEFT's option): also store the base weights of adapted input/output
        embeddings, so an adapter trained after resizing the vocabulary carries its embeddings. ``"auto"``
        does so when ``target_modules`` names ``embed_tokens`` or ``lm_head``, as HF PEFT does.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; this model has {list(self.peft_config)}.")
        # Every process gathers (sharded parameters are assembled collectively); only the main one writes.
        tensors_by_name = {name: get_peft_model_state_dict(self, name) for name in names}
        config_changes: dict[str, dict[str, Any]] = {name: {} for name in names}
        if path_initial_model_for_weight_conversion is not None:
            initial = load_adapter_weights(os.fspath(path_initial_model_for_weight_conversion))
            for name in names:
                tensors_by_name[name], config_changes[name] = self.base_model.relative_to_initial(
                    name, tensors_by_name[name], initial
                )
        empty = [name for name in names if not tensors_by_name[name]]
        if empty:
            raise ValueError(
                f"Adapter {empty[0]!r} has no tensors in this model (were the adapters merged and unloaded, "
                f"or deleted?); saving it would write an empty adapter. Nothing was written."
            )
        if not is_main_process:
            return
        # All or nothing: every adapter is written into a temporary folder first, then moved into place.
        os.makedirs(save_directory, exist_ok=True)
        staged: list[tuple[str, str]] = []
        created: list[str] = []  # sub-folders made here (a name the file system refuses fails here)
        try:
            for name in names:
                folder = save_directory if name == "default" else os.path.join(save_directory, name)
                if not os.path.isdir(folder):
                    os.makedirs(folder)
                    created.append(folder)
                tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=save_directory)
                staged.append((tmp, folder))
                tensors = tensors_by_name[name]
                tensors.update(self._embedding_base_weights(name, save_embedding_layers))
                save_adapter_weights(tensors, tmp, safe_serialization)
                self.peft_config[name].save_pretrained(
                    tmp, **self._saved_config_fields(name), **config_changes[name]
                )
            card = tempfile.mkdtemp(prefix=".tmp-save-", dir=save_directory)
            staged.append((card, save_directory))
            self.create_or_update_model_card(card, existing=os.path.join(save_directory, "README.md"))
        except BaseException:
            for tmp, _ in staged:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise
        for tmp, folder in staged:
            for file in os.listdir(tmp):
                os.replace(os.path.join(tmp, file), os.path.join(folder, file))
            os.rmdir(tmp)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        **_: Any,
    ) -> Any:
        """Upload the adapters to the Hugging Face Hub repository ``repo_id`` (created if missing), as HF
        PEFT's ``push_to_hub`` does: exactly the files :meth:`save_pretrained` writes (adapter configs,
        weights, ``README.md`` model card), staged in a temporary folder that is removed afterwards, so
        nothing is left on disk. Returns ``huggingface_hub``'s commit info.

        Raises:
            huggingface_hub's errors (e.g. ``OfflineModeIsEnabled`` with ``HF_HUB_OFFLINE=1``, an
            authentication error without a token); the model is never changed.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="peftkit-push-") as staging:
            self.save_pretrained(
                staging, safe_serialization=safe_serialization, selected_adapters=selected_adapters
            )
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=staging,
                commit_message=commit_message or "Upload adapter (peftkit)",
                revision=revision,
                create_pr=create_pr,
            )

    def create_or_update_model_card(self, output_dir: str, existing: str | None = None) -> None:
        """Write ``output_dir/README.md`` as HF PEFT does: the model card of ``existing`` (default: the one in
        ``output_dir``) or a new one, with ``library_name: peft``, the base model, tags (``transformers``,
        the method (``lora``), ``base_model:adapter:<base>``), the pipeline tag of a causal LM, and peftkit's
        version under "Framework versions". Hub tools read the base model from it."""
        from importlib.metadata import version

        from huggingface_hub import ModelCard, ModelCardData
        from transformers import PreTrainedModel

        path = existing or os.path.join(output_dir, "README.md")
        card = ModelCard.load(path) if os.path.isfile(path) else ModelCard.from_template(ModelCardData())
        card.data["library_name"] = "peft"
        base = self.get_base_model()
        tags = set(getattr(base, "model_tags", None) or [])
        if isinstance(base, PreTrainedModel):
            tags.add("transformers")
        tags.add(str(self.active_peft_config.peft_type).lower())  # "lora", as HF PEFT tags LoRA adapters
        base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(
            base, "name_or_path", None
        )
        if base_name:
            tags.add(f"base_model:adapter:{base_name}")
            card.data["base_model"] = base_name
        if tags:
            card.data["tags"] = sorted(tags)
        if not card.data.pipeline_tag and isinstance(self, PeftModelForCausalLM):
            card.data.pipeline_tag = "text-generation"
        lines = card.text.splitlines()
        version_line = f"- peftkit {version('peftkit')}"
        if version_line not in lines:
            heading = "### Framework versions"
            if heading in lines:
                lines.insert(lines.index(heading) + 2, version_line)
            else:
                lines.append(f"{heading}\n\n{version_line}")
        card.text = "\n".join(lines)
        card.save(os.path.join(output_dir, "README.md"))

    def _embedding_base_weights(self, adapter_name: str, save_embedding_layers: bool | str) -> dict[str, Any]:
        if save_embedding_layers == "auto":
            config = self.peft_config[adapter_name]
            targets = getattr(config, "target_modules", None)
            save_embedding_layers = (
                isinstance(targets, list)
                and bool({"embed_tokens", "lm_head"} & set(targets))
                and self.base_model.auto_saves_embedding_weights(config)
            )
        if not save_embedding_layers:
            return {}
        base = self.get_base_model()
        embeddings = [
            getattr(base, f)() for f in ("get_input_embeddings", "get_output_embeddings") if hasattr(base, f)
        ]
        tensors = {}
        for path, module in base.named_modules():
            if (
                isinstance(module, AdapterLayer)
                and module in embeddings
                and adapter_name in module.adapter_names
            ):
                tensors[f"{SAVED_PREFIX}{path}.base_layer.weight"] = module.get_base_layer().weight.detach()
        return tensors

    def _saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        """Values recorded in the saved config (the in-memory config is left as the user made it)."""
        config = self.peft_config[adapter_name]
        fields: dict[str, Any] = {"inference_mode": True, **self.base_model.saved_config_fields(adapter_name)}
        if config.base_model_name_or_path is None:
            base = self.get_base_model()
            name = getattr(base, "name_or_path", None) or getattr(
                getattr(base, "config", None), "_name_or_path", None
            )
            fields["base_model_name_or_path"] = name or None
        if self.default_modules_to_save and hasattr(config, "modules_to_save"):
            # record the task's default heads that this model has, so the file says what it holds
            saved = list(config.modules_to_save or [])
            wrapped = [p for p, w in self.base_model.save_wrappers() if adapter_name in w.modules_to_save]
            present = [d for d in self.default_modules_to_save if any(name_matches(p, [d]) for p in wrapped)]
            fields["modules_to_save"] = saved + [d for d in present if d not in saved]
        return fields

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (a folder, or a hub id).

        An adapter that builds on others (an AdapterFusion) also loads those, from where ``save_pretrained``
        wrote them beside it, and is made the active adapter.

        Raises:
            ValueError: the checkpoint does not fit the model (keys and shapes are named); the base model
                is left as it was.
        """
        with adapter_dtype_policy(kwargs.pop("autocast_adapter_dtype", None)):
            return cls._from_pretrained(
                model, os.fspath(model_id), adapter_name, is_trainable, config, **kwargs
            )

    @classmethod
    def _from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str,
        is_trainable: bool,
        config: PeftConfig | None,
        **kwargs: Any,
    ) -> PeftModel:
        subfolder = kwargs.pop("subfolder", None)
        low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config = config.replace(inference_mode=not is_trainable)
        required = _required_adapters_saved_beside(config, folder, present={adapter_name})
        if required:
            first, *rest = required
            peft_model = cls.from_pretrained(model, required[first], adapter_name=first)
            try:
                for name in rest:
                    peft_model.load_adapter(required[name], name)
                peft_model._add_saved_adapter(folder, adapter_name, config, load_adapter_weights(folder))
                peft_model.set_adapter(adapter_name)
            except BaseException:
                peft_model.base_model.remove_all_adapters()
                raise
            if not is_trainable:
                peft_model.eval()
            return peft_model
        if cls is PeftModel:
            cls = TASK_TO_PEFT_MODEL.get(str(config.task_type), PeftModel)  # type: ignore[assignment]
        weights = load_adapter_weights(folder)  # read (and check) the file before touching the model
        with sized_by(weights, folder):
            peft_model = cls(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name)
        except BaseException:
            peft_model.base_model.remove_all_adapters()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> nn.modules.module._IncompatibleKeys:
        """Load a saved adapter under ``adapter_name`` (not activated). An adapter that builds on others (an
        AdapterFusion) first loads those the model lacks, from where ``save_pretrained`` wrote them beside it.
        Nothing changes on error. ``autocast_adapter_dtype``: as in :meth:`add_adapter`.

        Returns HF PEFT's load result; its key lists are empty (see :func:`set_peft_model_state_dict`)."""
        with adapter_dtype_policy(kwargs.pop("autocast_adapter_dtype", None)):
            self._load_adapter(os.fspath(model_id), adapter_name, is_trainable, **kwargs)
        if not is_trainable:
            self.eval()  # as HF PEFT: a loaded adapter is for inference (its dropout off)
        else:  # as HF PEFT: its parameters train although it is not active yet
            for param in self.base_model.adapter_parameter_map(adapter_name).values():
                param.requires_grad_(True)
        return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool, **kwargs: Any) -> None:
        self._check_new_adapter_name(adapter_name)
        subfolder = kwargs.pop("subfolder", None)
        low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder).replace(
            inference_mode=not is_trainable
        )
        weights = load_adapter_weights(folder)  # read (and check) the file before touching the model
        required = _required_adapters_saved_beside(config, folder, present={adapter_name, *self.peft_config})
        loaded: list[str] = []
        try:
            for name, path in required.items():
                self.load_adapter(path, name)
                loaded.append(name)
            self._add_saved_adapter(folder, adapter_name, config, weights, low_cpu_mem_usage)
        except BaseException:
            for name in reversed(loaded):
                self.delete_adapter(name)
            raise

    def _add_saved_adapter(
        self,
        folder: str,
        adapter_name: str,
        config: PeftConfig,
        weights: dict[str, Any],
        low_cpu_mem_usage: bool = False,
    ) -> None:
        with sized_by(weights, folder):
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            set_peft_model_state_dict(self, weights, adapter_name)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise


# HF PEFT's named forward arguments per task (the same names, in the same order)
_OUTPUTS = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")


class PeftModelForCausalLM(PeftModel):
    forward = TaskForward("input_ids", "attention_mask", "inputs_embeds", "labels", *_OUTPUTS)


class PeftModelForSeq2SeqLM(PeftModel):
    forward = TaskForward(
        "input_ids",
        "attention_mask",
        "inputs_embeds",
        "decoder_input_ids",
        "decoder_attention_mask",
        "decoder_inputs_embeds",
        "labels",
        *_OUTPUTS,
    )


class PeftModelForSequenceClassification(PeftModel):
    default_modules_to_save = ("classifier", "score")
    forward = TaskForward("input_ids", "attention_mask", "inputs_embeds", "labels", *_OUTPUTS)


class PeftModelForTokenClassification(PeftModel):
    default_modules_to_save = ("classifier", "score")
    forward = TaskForward("input_ids", "attention_mask", "inputs_embeds", "labels", *_OUTPUTS)


class PeftModelForQuestionAnswering(PeftModel):
    default_modules_to_save = ("qa_outputs",)
    forward = TaskForward(
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "inputs_embeds",
        "start_positions",
        "end_positions",
        *_OUTPUTS,
    )


class PeftModelForFeatureExtraction(PeftModel):
    forward = TaskForward("input_ids", "attention_mask", "inputs_embeds", *_OUTPUTS)


TASK_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def _required_adapters_saved_beside(config: PeftConfig, folder: str, present: set[str]) -> dict[str, str]:
    """The adapters that ``config``'s adapter builds on (its method's ``required_adapters``) and that are not
    in ``present``, each with the folder ``save_pretrained`` wrote it to: ``<folder>/<name>`` (this adapter
    saved as ``"default"``) or ``<folder>/../<name>`` (saved beside it). ``{}`` when none is needed or one
    of them is not there (the method then says what is missing).

    Raises:
        ValueError: a folder holds a different adapter than the one recorded when this one was saved.
    """
    try:
        needed = get_method(str(config.peft_type)).tuner_cls.required_adapters(config)
    except KeyError:
        return {}
    missing = {name: fingerprint for name, fingerprint in needed.items() if name not in present}
    if not missing or not os.path.isdir(folder):
        return {}
    here = os.path.normpath(folder)
    parent = os.path.dirname(here)
    found = {}
    for name, fingerprint in missing.items():
        candidates = [os.path.join(here, name), parent if name == "default" else os.path.join(parent, name)]
        path = next((c for c in candidates if os.path.isfile(os.path.join(c, CONFIG_NAME))), None)
        if path is None:
            return {}
        if fingerprint is not None and adapter_fingerprint(load_adapter_weights(path)) != fingerprint:
            raise ValueError(
                f"{path} holds an adapter {name!r} other than the one {folder} was saved with (its tensors "
                f"differ). Load the right {name!r} first (model.load_adapter(path, {name!r})), then {folder}."
            )
        found[name] = path
    return found


def _same_tuner(config: PeftConfig, tuner: BaseTuner) -> bool:
    """Whether ``config``'s method is registered with the tuner class that already wraps the model."""
    try:
        return get_method(str(config.peft_type)).tuner_cls is type(tuner)
    except KeyError:
        return False


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (HF PEFT's entry point).

    The base model's parameters are frozen; only the adapter (and ``modules_to_save``) train. On error
    (e.g. ``target_modules`` matching nothing) the model is left unchanged.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}."
        )
    cls = TASK_TO_PEFT_MODEL.get(str(peft_config.task_type), PeftModel)
    return cls(model, peft_config, adapter_name, **kwargs)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Add the adapter layers of ``peft_config`` to ``model`` in place and return ``model`` itself (no
    ``PeftModel`` around it), as HF PEFT's ``inject_adapter_in_model``. Methods that act on the inputs (soft
    prompts, LLaMA-Adapter's prompts) need the wrapper: use :func:`get_peft_model` for them.
    ``low_cpu_mem_usage``: the adapter's parameters are created on the meta device, for values that
    :func:`set_peft_model_state_dict` loads next (HF PEFT's option). Targeting by ``state_dict`` keys is not
    supported (give ``target_modules``).

    Raises:
        ValueError: a prompt method, a ``state_dict``, or what :func:`get_peft_model` refuses; the model is
            left unchanged.
    """
    if peft_config.is_prompt_learning or getattr(peft_config, "is_adaption_prompt", False):
        raise ValueError(
            "`create_and_replace` does not support prompt learning, adaption prompt and shadow yet."
        )
    if state_dict is not None:
        raise ValueError(
            "inject_adapter_in_model(state_dict=...) is not supported by peftkit; set target_modules instead."
        )
    existing = model.__dict__.get(INJECTED_TUNER_ATTR)
    if existing is not None and adapter_name in existing.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick a new name.")
    tuner_cls = _tuner_class_for(model, peft_config, adapter_name)
    if tuner_cls.uses_shared_state:
        raise ValueError(
            f"{tuner_cls.__name__} keeps shared state across layers, which a model without the PeftModel "
            f"around it cannot hold; use get_peft_model instead."
        )
    if existing is not None:  # a later adapter joins the first one's tuner (HF PEFT's multi-adapter use)
        if type(existing) is not tuner_cls:
            raise ValueError(
                f"This model already holds {type(existing).__name__} adapters {list(existing.peft_config)} "
                f"injected in place; a {peft_config.peft_type} adapter cannot join them. Use get_peft_model "
                f"for other methods."
            )
        existing.peft_config[adapter_name] = peft_config
        try:
            with new_parameters_on_meta(low_cpu_mem_usage and tuner_cls.supports_low_cpu_mem_usage):
                existing.inject_adapter(adapter_name)
        except BaseException:
            del existing.peft_config[adapter_name]
            raise
        return model
    with new_parameters_on_meta(low_cpu_mem_usage and tuner_cls.supports_low_cpu_mem_usage):
        tuner = tuner_cls(model, {adapter_name: peft_config}, adapter_name)
    record_injected_tuner(model, tuner)  # for get_/set_peft_model_state_dict(model)
    return model


def _tuner_class_for(model: nn.Module, peft_config: PeftConfig, adapter_name: str) -> type[BaseTuner]:
    """The registered tuner class of ``peft_config``'s method, after checking ``adapter_name`` against
    ``model`` and the tuner's reserved names (``ValueError`` for an unknown method or a bad name)."""
    try:
        spec = get_method(str(peft_config.peft_type))
    except KeyError:
        raise ValueError(f"peft_type {peft_config.peft_type!r} is not a registered method.") from None
    validate_adapter_name(adapter_name, model, reserved=spec.tuner_cls.reserved_names())
    return spec.tuner_cls


def _original_key(key: str, wrappers: list[tuple[str, nn.Module]]) -> str | None:
    """``key`` of an adapted model's state dict as the model had it before adapters were added, or
    ``None`` for a tensor that adapters brought (their parameters, ``modules_to_save`` copies).
    ``wrappers``: the adapter layers and ``modules_to_save`` wrappers, deepest first, so that nested ones (a
    combination's components) peel off from the inside out."""
    for path, module in wrappers:
        prefix = f"{path}." if path else ""
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        inner = "original_module." if isinstance(module, ModulesToSaveWrapper) else "base_layer."
        if not rest.startswith(inner):
            return None
        key = prefix + rest[len(inner) :]
    return key


def _base_key_map(model: PeftModel) -> dict[str, str]:
    """Original key -> key in the adapted base model, for every tensor the base model had."""
    base = model.get_base_model()
    wrappers = sorted(
        ((n, m) for n, m in base.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))),
        key=lambda item: -len(item[0]),
    )
    added = {
        name
        for selection in getattr(model.base_model, "base_selections", {}).values()
        for name in selection.new_parameters
    }
    mapping = {}
    for key in base.state_dict():
        original = _original_key(key, wrappers)
        if original is not None and original not in added:
            mapping[original] = key
    return mapping


def get_base_model_state_dict(model: PeftModel) -> dict[str, Any]:
    """The base model's state dict under its original keys (no ``base_layer`` / ``original_module`` infixes,
    no adapter tensors), as HF PEFT's ``get_base_model_state_dict``."""
    state = model.get_base_model().state_dict()
    return {original: state[key] for original, key in _base_key_map(model).items()}


def set_base_model_state_dict(model: PeftModel, state_dict: dict[str, Any], strict: bool = True) -> Any:
    """Load ``state_dict`` (original keys) into the base model of ``model`` (HF PEFT's
    ``set_base_model_state_dict``); returns ``(missing_keys, unexpected_keys)``.

    Raises:
        RuntimeError: with ``strict``, a missing or unexpected key (nothing is loaded).
    """
    from collections import namedtuple

    mapping = _base_key_map(model)
    missing = [k for k in mapping if k not in state_dict]
    unexpected = [k for k in state_dict if k not in mapping]
    if strict and (missing or unexpected):
        messages = []
        if missing:
            messages.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            messages.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    renamed = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
    model.get_base_model().load_state_dict(renamed, strict=False)
    return namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])(missing, unexpected)
