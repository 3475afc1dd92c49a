"""``AutoPeftModel*``: load an adapter folder together with the base model its config names, as HF PEFT's
auto classes do (``AutoPeftModelForCausalLM.from_pretrained("adapter-folder")``).

The base model class comes from the class (``...ForCausalLM``) or, for ``AutoPeftModel`` on a config
without a task type, from the config's ``auto_mapping`` — a class of ``transformers`` only: a config names no
other package to import (HF PEFT imports from an allow-list; peftkit imports nothing a file names).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.peft_model import (
    TASK_TO_PEFT_MODEL,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    #: the transformers auto class of the base model (``None``: from the config's ``auto_mapping``)
    _target_class: ClassVar[str | None] = None
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named by the adapter's config, then the adapter onto it. ``kwargs`` go to the
        base model's ``from_pretrained`` (``dtype``, ``device_map``, ...).

        Raises:
            ValueError: the class does not fit the config's task type, or the base model class cannot be
                told from the config.
        """
        import transformers

        path = os.fspath(pretrained_model_name_or_path)
        kwargs.pop(
            "import_allowlist", None
        )  # HF PEFT's allow-list; peftkit imports no package a config names
        peft_config = PeftConfig.from_pretrained(path)
        task_type = peft_config.task_type
        if cls._target_class is None and task_type is not None:
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
            )
        if task_type is not None:
            expected = TASK_TO_PEFT_MODEL.get(str(task_type), PeftModel)
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    f"task type."
                )
        target = cls._base_model_class(peft_config, transformers)
        base = target.from_pretrained(
            peft_config.base_model_name_or_path, revision=peft_config.revision, **kwargs
        )
        _resize_to_saved_tokenizer(base, path, kwargs.get("trust_remote_code", False))
        return cls._target_peft_class.from_pretrained(
            base, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )

    @classmethod
    def _base_model_class(cls, peft_config: PeftConfig, transformers: Any) -> Any:
        if cls._target_class is not None:
            return getattr(transformers, cls._target_class)
        mapping = getattr(peft_config, "auto_mapping", None) or {}
        library, name = mapping.get("parent_library"), mapping.get("base_model_class")
        if library is None or name is None:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct "
                "model for your task type."
            )
        if library != "transformers" and not str(library).startswith("transformers."):
            raise ValueError(
                f"The adapter config asks for a base model class from {library!r}; peftkit loads base model classes "
                f"from transformers only (a config never makes it import a package). Load the base model yourself "
                f"and use PeftModel.from_pretrained(model, path)."
            )
        found = getattr(transformers, str(name), None)
        if found is None:
            raise ValueError(
                f"transformers has no class {name!r} (named by the adapter config's auto_mapping)."
            )
        return found


def _resize_to_saved_tokenizer(base: nn.Module, folder: str, trust_remote_code: bool) -> None:
    """A tokenizer saved with the adapter that has more tokens than the base model's embeddings: resize them
    (as HF PEFT does; the adapter was trained with the larger vocabulary)."""
    if not os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME)) or not hasattr(
        base, "get_input_embeddings"
    ):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
