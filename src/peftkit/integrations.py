"""peftkit models inside Hugging Face's training tools: transformers ``Trainer`` and TRL's trainers.

Those tools recognise a PEFT model by ``isinstance(model, peft.PeftModel)``, which a peftkit model is not
(peftkit never imports ``peft``). What they do differently for a PEFT model is small, and this module does
it for a peftkit model, as a mixin for any ``Trainer`` subclass:

* checkpoints and ``save_model()`` hold the adapters only (``adapter_config.json`` +
  ``adapter_model.safetensors``, other adapters in sub-folders, as ``save_pretrained`` writes them), never
  the base model; a checkpoint also keeps the adapter's parameters as trained
  (``trainable_parameters.safetensors``), so resuming is exact for the methods whose adapter file holds a
  computed tensor (P-Tuning, projected prefixes);
* ``resume_from_checkpoint`` and ``load_best_model_at_end`` load those back into the model's adapters;
* TRL's ``SFTTrainer`` and ``DPOTrainer`` see the model as a PEFT model (their fused LM head patches the
  base model, DPO's reference is the base with the adapter disabled: no second copy of the model).

An HF PEFT script changes its imports only::

    from peftkit import LoraConfig, get_peft_model          # was: from peft import ...
    from peftkit.integrations import Trainer                # was: from transformers import Trainer
    from peftkit.integrations import SFTTrainer, DPOTrainer  # was: from trl import ...

``transformers.Trainer`` itself also trains a peftkit model (its forward names its arguments, so columns
and ``labels`` are found, bf16 autocast works), but writes whole-model checkpoints.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import transformers

from peftkit.core.checkpoint import copy_saved_parameters, load_adapter_weights, set_peft_model_state_dict
from peftkit.core.peft_model import PeftModel

TRAINABLE_PARAMETERS_FILE = "trainable_parameters.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME


def is_peftkit_model(model: Any) -> bool:
    return isinstance(model, PeftModel)


class PeftkitTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class T(PeftkitTrainerMixin, SomeTrainer)``."""

    _peftkit_saving_checkpoint = False

    def _peftkit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        return model if is_peftkit_model(model) else None

    # ------------------------------------------------------------------------------------- saving
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._peftkit_saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._peftkit_saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, is_main_process=args.should_save)
        if not args.should_save:
            return
        if self._peftkit_saving_checkpoint:
            from safetensors.torch import save_file

            parameters = model.base_model.adapter_parameter_map(model.active_adapter)
            tensors = {name: p.detach().to("cpu").contiguous() for name, p in parameters.items()}
            save_file(tensors, os.path.join(output_dir, TRAINABLE_PARAMETERS_FILE))
        processing_class = getattr(self, "processing_class", None)
        collator_tokenizer = getattr(getattr(self, "data_collator", None), "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        elif collator_tokenizer is not None:
            collator_tokenizer.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    # ------------------------------------------------------------------------------------ loading
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft_model = self._peftkit_model() if model is None else model
        if is_peftkit_model(peft_model) and _holds_adapter(resume_from_checkpoint):
            load_adapters_in_place(peft_model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        peft_model = self._peftkit_model()
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if peft_model is not None and best is not None and _holds_adapter(best):
            load_adapters_in_place(peft_model, best)
            return
        super()._load_best_model()  # type: ignore[misc]


def _holds_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_FILE))


def load_adapters_in_place(model: PeftModel, folder: str) -> None:
    """Load the adapters saved in ``folder`` (by ``save_pretrained`` or a checkpoint) into the model's
    adapters of the same names, keeping their trainability. With the checkpoint's
    ``trainable_parameters.safetensors``, the active adapter's parameters are restored exactly as trained.

    Raises:
        ValueError: the files do not fit the adapters (keys and shapes are named); nothing is changed.
    """
    exact = os.path.join(folder, TRAINABLE_PARAMETERS_FILE)
    for name in model.peft_config:
        sub = folder if name == "default" else os.path.join(folder, name)
        if name == model.active_adapter and os.path.isfile(exact):
            copy_saved_parameters(model.base_model.adapter_parameter_map(name), exact, f"adapter {name!r}")
        elif _holds_adapter(sub):
            set_peft_model_state_dict(model, load_adapter_weights(sub), name)


class Trainer(PeftkitTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves and loads a peftkit model's adapters (see the module docstring)."""


# ------------------------------------------------------------------------------------------------- TRL
# TRL asks ``accelerate.utils.is_peft_model`` (imported by name into its trainer modules) whether a model is
# a PEFT model. While one of the classes below runs, that name also answers yes for a peftkit model.
# Without HF PEFT installed, TRL's modules lack the peft classes they test a PEFT model against; stand-ins
# that nothing is an instance of take their place meanwhile.
class _NoPeftClass:
    pass


_PEFT_CLASSES_TRL_TESTS = ("BaseTunerLayer", "LoraConfig")


@contextlib.contextmanager
def _seen_as_peft(module_name: str) -> Iterator[None]:
    module = importlib.import_module(module_name)
    original = module.is_peft_model
    missing = [name for name in _PEFT_CLASSES_TRL_TESTS if not hasattr(module, name)]
    module.is_peft_model = lambda model: is_peftkit_model(model) or original(model)
    for name in missing:
        setattr(module, name, _NoPeftClass)
    try:
        yield
    finally:
        module.is_peft_model = original
        for name in missing:
            delattr(module, name)


def _trl_trainer(name: str, module_name: str, methods: tuple[str, ...]) -> type:
    trl = importlib.import_module("trl")
    base = getattr(trl, name)

    def wrap(method_name: str) -> Any:
        method = getattr(base, method_name)

        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _seen_as_peft(module_name):
                return method(self, *args, **kwargs)

        wrapped.__name__ = method_name
        wrapped.__doc__ = method.__doc__
        return wrapped

    namespace = {m: wrap(m) for m in methods}
    namespace["__doc__"] = f"TRL's ``{name}`` for peftkit models (see peftkit.integrations)."
    namespace["__module__"] = __name__
    return type(name, (PeftkitTrainerMixin, base), namespace)


def __getattr__(name: str) -> Any:
    """``SFTTrainer`` / ``DPOTrainer``, built when first asked for (TRL is optional)."""
    if name == "SFTTrainer":
        cls = _trl_trainer("SFTTrainer", "trl.trainer.sft_trainer", ("__init__", "compute_loss"))
    elif name == "DPOTrainer":
        cls = _trl_trainer(
            "DPOTrainer",
            "trl.trainer.dpo_trainer",
            ("__init__", "compute_loss", "compute_ref_log_probs", "prediction_step", "evaluate"),
        )
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls
