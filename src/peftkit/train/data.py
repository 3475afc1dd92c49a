"""Data for ``peftkit train``: read local files (or a ``datasets`` name), turn rows into token ids and
labels for the chosen format, and pad batches.

Every example becomes a dict of plain Python lists (``input_ids``, ``attention_mask``, ``labels``), so a
dataset is a list that can be indexed by a seeded permutation: the order of examples is a pure function
of the seed and the epoch, which is what makes an interrupted run resume to the same result.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.train.runconfig import DataSection, RunConfigError

Row = dict[str, Any]
Example = dict[str, Any]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Stanford Alpaca prompt (with or without an input), ending where the response begins."""
    if input_text:
        return ALPACA_PROMPT.format(
            context=", paired with an input that provides further context",
            instruction=instruction,
            input_block=f"### Input:\n{input_text}\n\n",
        )
    return ALPACA_PROMPT.format(context="", instruction=instruction, input_block="")


# ---------------------------------------------------------------------------------------- reading
def read_rows(path: str, columns: Sequence[str] | None = None) -> list[Row]:
    """Rows of a CSV, TSV, JSON (a list of objects, or ``{"data": [...]}``) or JSONL file."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".csv", ".tsv", ".txt"):
            delimiter = "," if ext == ".csv" else "\t"
            # utf-8-sig: a byte-order mark (as Excel writes) is not part of the first column's name
            with open(path, newline="", encoding="utf-8-sig") as f:
                if columns:
                    reader = csv.reader(
                        f,
                        delimiter=delimiter,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
                    )
                    rows = []
                    for line in reader:
                        if not line:
                            continue
                        if len(line) != len(columns):
                            raise RunConfigError(
                                f"{path}: a row has {len(line)} fields but data.columns names {len(columns)}."
                            )
                        rows.append(dict(zip(columns, line, strict=True)))
                    return rows
                quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
                return [dict(r) for r in csv.DictReader(f, delimiter=delimiter, quoting=quoting)]
        if ext == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                return _objects(
                    path, [json.loads(line) for line in f if line.strip()], "row {i} of the JSONL file"
                )
        if ext == ".json":
            with open(path, encoding="utf-8-sig") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
                loaded = loaded["data"]
            if not isinstance(loaded, list):
                raise RunConfigError(
                    f'{path}: a JSON data file must hold a list of objects (or {{"data": [...]}}), '
                    f"found {type(loaded).__name__}."
                )
            return _objects(path, loaded, "row {i} of the JSON list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, RecursionError) as err:
        raise RunConfigError(f"{path} could not be read ({str(err)[:200]}).") from None
    raise RunConfigError(f"{path}: unknown data file type {ext!r}; use .csv, .tsv, .json or .jsonl.")


def _objects(path: str, rows: list[Any], where: str) -> list[Row]:
    """``rows`` if every one is an object (a row with named columns), else one clear error."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RunConfigError(
                f"{path}: {where.format(i=i)} is a {type(row).__name__}, not an object with named columns."
            )
    return rows


def load_splits(data: DataSection, seed: int) -> tuple[list[Row], list[Row]]:
    """Train and validation rows: from the files, or a ``datasets`` name, with an optional seeded split."""
    if data.dataset is not None:
        train_rows, validation_rows = _load_hf_dataset(data)
    else:
        assert data.train is not None
        train_rows = read_rows(data.train, data.columns)
        validation_rows = read_rows(data.validation, data.columns) if data.validation else []
    if data.validation_split > 0:
        if validation_rows:
            raise RunConfigError("data.validation_split is set but data.validation is given too; use one.")
        order = list(range(len(train_rows)))
        random.Random(seed if data.split_seed is None else data.split_seed).shuffle(order)
        n_val = max(1, round(len(train_rows) * data.validation_split))
        validation_rows = [train_rows[i] for i in sorted(order[:n_val])]
        train_rows = [train_rows[i] for i in sorted(order[n_val:])]
    if data.max_train_samples is not None:
        train_rows = train_rows[: data.max_train_samples]
    if data.max_eval_samples is not None:
        validation_rows = validation_rows[: data.max_eval_samples]
    if not train_rows:
        raise RunConfigError("the training data is empty.")
    return train_rows, validation_rows


def _load_hf_dataset(data: DataSection) -> tuple[list[Row], list[Row]]:
    try:
        import datasets
    except ImportError:
        raise RunConfigError("data.dataset needs the `datasets` package: pip install datasets.") from None
    try:
        loaded = datasets.load_dataset(data.dataset, data.dataset_config)
    except Exception as err:  # the datasets library raises many types (hub, network, file format)
        raise RunConfigError(
            f"data.dataset {data.dataset!r} could not be loaded ({type(err).__name__}: {err})."
        ) from None
    if "train" not in loaded:
        raise RunConfigError(
            f"data.dataset {data.dataset!r} has no train split; splits: {', '.join(loaded)}."
        )
    train_rows = [dict(r) for r in loaded["train"]]
    split = next((s for s in ("validation", "dev", "test") if s in loaded), None)
    validation_rows = [dict(r) for r in loaded[split]] if split and data.validation_split == 0 else []
    return train_rows, validation_rows


# ------------------------------------------------------------------------------------ tokenising
@dataclass
class LabelSpace:
    """Class names in id order (classification) or ``None`` (regression / language modelling)."""

    names: list[str] | None

    @property
    def num_labels(self) -> int:
        return len(self.names) if self.names is not None else 1

    def describe(self) -> str:
        """One line for the run's output: which id is which class, and which class F1 is about."""
        if self.names is None:
            return ""
        shown = ", ".join(f"{i} = {name!r}" for i, name in enumerate(self.names[:10]))
        more = f", ... ({len(self.names)} classes)" if len(self.names) > 10 else ""
        f1 = (
            f"f1 is of class {self.names[1]!r} (id 1)"
            if len(self.names) == 2
            else f"f1 is the macro average over {len(self.names)} classes"
        )
        return f"labels: {shown}{more}; {f1}"


_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_CANONICAL_INTEGER = re.compile(r"-?\d{1,4000}")


def label_key(value: Any) -> str:
    """The canonical spelling of a class label: surrounding spaces dropped, and an integer however it is
    written (``1``, ``1.0``, ``+1``, a JSON number) spelled as its digits, so that ``1`` and ``1.0`` are one
    class. Anything else is its text."""
    text = str(value).strip()
    if isinstance(value, bool):
        return text
    if _INTEGER.fullmatch(text):
        try:
            return str(int(text.split(".")[0]))
        except ValueError:  # more digits than Python converts: keep the text
            return text
    return text


def _row_label(row: Row, column: str, split: str, i: int) -> str:
    value = row[column]
    key = "" if value is None else label_key(value)
    if not key:
        raise RunConfigError(f"{split} row {i}: the label ({column!r}) is empty.")
    return key


def label_space(data: DataSection, rows: Sequence[Row]) -> LabelSpace:
    """The classes of a classification run: ``data.labels`` when given, otherwise the labels of the
    training ``rows`` (never of the validation data, which must only use them). Integer labels ``0..K-1``
    keep their ids; any other set of labels is numbered in sorted order (numbers by value)."""
    if data.format != "classification":
        return LabelSpace(None)
    if data.labels is not None:
        names = [label_key(n) for n in data.labels]
        if len(set(names)) != len(names) or "" in names:
            raise RunConfigError(f"data.labels must name distinct, non-empty classes, got {data.labels}.")
        return LabelSpace(names)
    _require_column(rows, data.label_column, "data.label_column")
    values = {_row_label(r, data.label_column, "train", i) for i, r in enumerate(rows)}
    if len(values) < 2:
        raise RunConfigError(
            f"the training data has {len(values)} label value(s) ({', '.join(sorted(values))}); "
            "classification needs two or more: list the classes in data.labels."
        )
    if all(_CANONICAL_INTEGER.fullmatch(v) for v in values):
        return LabelSpace(sorted(values, key=int))
    return LabelSpace(sorted(values))


def _require_column(rows: Sequence[Row], column: str, key: str) -> None:
    missing = next((i for i, row in enumerate(rows) if column not in row), None)
    if missing == 0:
        raise RunConfigError(
            f"{key} {column!r} is not a column of the data; columns: {', '.join(map(str, rows[0]))}."
        )
    if missing is not None:
        raise RunConfigError(f"row {missing} of the data has no {column!r} ({key}).")


def build_examples(
    rows: Sequence[Row], data: DataSection, tokenizer: Any, labels: LabelSpace, task_type: str, split: str
) -> list[Example]:
    """Tokenise ``rows`` into examples for ``data.format`` (one per row, in order), each with its row's
    ``task_ids`` when ``data.task_id_column`` is set."""
    examples = _format_examples(rows, data, tokenizer, labels, task_type, split)
    if data.task_id_column is not None:
        for example, task_id in zip(examples, task_ids_of(rows, data, split), strict=True):
            example["task_ids"] = task_id
    return examples


#: per-row model inputs that a data option adds beside the tokens: input name -> the option that sets it
ROW_INPUT_OPTIONS = {"task_ids": "data.task_id_column"}


def row_inputs(data: DataSection) -> tuple[str, ...]:
    """The per-row inputs (keys of :data:`ROW_INPUT_OPTIONS`) that ``data`` puts into every example."""
    return ("task_ids",) if data.task_id_column is not None else ()


def task_ids_of(rows: Sequence[Row], data: DataSection, split: str) -> list[int]:
    """Each row's task id: the integer in ``data.task_id_column`` (a number, or digits in a CSV/TSV
    cell), or the position of its task name in ``data.task_names``."""
    column = data.task_id_column
    assert column is not None
    _require_column(rows, column, "data.task_id_column")
    index = {name: i for i, name in enumerate(data.task_names or [])}
    ids = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None:
            raise RunConfigError(f"{split} row {i} has no task in data.task_id_column {column!r}.")
        if data.task_names is not None:
            name = str(value).strip()
            if name not in index:
                raise RunConfigError(
                    f"{split} row {i}: task {name!r} (data.task_id_column {column!r}) is not one of "
                    f"data.task_names {data.task_names}."
                )
            ids.append(index[name])
            continue
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):  # rejects -1, 1.5, 1.0 and True as well
            raise RunConfigError(
                f"{split} row {i}: task {value!r} in data.task_id_column {column!r} is not a task id (an "
                f"integer 0, 1, ...); to use task names, list them in id order in data.task_names."
            )
        ids.append(int(text))
    return ids


def _format_examples(
    rows: Sequence[Row], data: DataSection, tokenizer: Any, labels: LabelSpace, task_type: str, split: str
) -> list[Example]:
    fmt = data.format
    if fmt in ("classification", "regression"):
        return _classification_examples(rows, data, tokenizer, labels, split)
    if fmt == "text":
        _require_column(rows, data.text_column, "data.text_column")
        return [
            _lm_example(tokenizer, "", str(r[data.text_column]), data, train_on_prompt=True) for r in rows
        ]
    if fmt == "instruction":
        if data.prompt_template != "alpaca":
            raise RunConfigError(
                f"data.prompt_template {data.prompt_template!r} is unknown; allowed: alpaca."
            )
        for column in ("instruction", "output"):
            _require_column(rows, column, "instruction data column")
        pairs = [
            (alpaca_prompt(str(r["instruction"]), str(r.get("input") or "")), str(r["output"])) for r in rows
        ]
        if task_type == "SEQ_2_SEQ_LM":
            return [_seq2seq_example(tokenizer, p, o, data) for p, o in pairs]
        return [_lm_example(tokenizer, p, o, data, data.train_on_prompt) for p, o in pairs]
    if fmt == "chat":
        _require_column(rows, data.messages_column, "data.messages_column")
        return [_chat_example(tokenizer, r[data.messages_column], data) for r in rows]
    raise RunConfigError(f"data.format {fmt!r} is unknown.")


def _classification_examples(
    rows: Sequence[Row], data: DataSection, tokenizer: Any, labels: LabelSpace, split: str
) -> list[Example]:
    if not rows:  # no validation data (the tokenizer cannot encode an empty batch)
        return []
    _require_column(rows, data.text_column, "data.text_column")
    _require_column(rows, data.label_column, "data.label_column")
    if data.text_pair_column:
        _require_column(rows, data.text_pair_column, "data.text_pair_column")
    texts = [str(r[data.text_column]) for r in rows]
    pairs = [str(r[data.text_pair_column]) for r in rows] if data.text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=data.max_length)
    index = {name: i for i, name in enumerate(labels.names or [])}
    examples = []
    for i, row in enumerate(rows):
        raw = _row_label(row, data.label_column, split, i)
        if labels.names is None:
            try:
                label: float | int = float(raw)
            except ValueError:
                label = math.nan
            if not math.isfinite(label):
                raise RunConfigError(
                    f"{split} row {i}: label {raw!r} is not a finite number (data.format regression)."
                )
        else:
            if raw not in index:
                where = "data.labels" if data.labels is not None else "the training data's labels"
                raise RunConfigError(
                    f"{split} row {i}: label {raw!r} is not one of {where} {labels.names[:20]}"
                    + ("" if data.labels is not None else "; list every class in data.labels")
                    + "."
                )
            label = index[raw]
        examples.append(
            {
                "input_ids": encoded["input_ids"][i],
                "attention_mask": encoded["attention_mask"][i],
                **({"token_type_ids": encoded["token_type_ids"][i]} if "token_type_ids" in encoded else {}),
                "labels": label,
            }
        )
    return examples


def _lm_example(
    tokenizer: Any, prompt: str, response: str, data: DataSection, train_on_prompt: bool
) -> Example:
    """Causal LM example: prompt + response (+ EOS); the loss covers the response unless ``train_on_prompt``."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True)
        else []
    )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (bos + prompt_ids + response_ids + eos)[: data.max_length]
    n_prompt = len(bos) + len(prompt_ids)
    labels = [(-100 if (i < n_prompt and not train_on_prompt) else t) for i, t in enumerate(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _seq2seq_example(tokenizer: Any, prompt: str, response: str, data: DataSection) -> Example:
    source = tokenizer(prompt, truncation=True, max_length=data.max_length)
    target = tokenizer(text_target=response, truncation=True, max_length=data.max_length)
    return {
        "input_ids": source["input_ids"],
        "attention_mask": source["attention_mask"],
        "labels": target["input_ids"],
    }


def _chat_example(tokenizer: Any, messages: Any, data: DataSection) -> Example:
    """Render with the chat template; tokens whose characters belong to an assistant turn are trained."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise RunConfigError("chat data: every row needs a list of {role, content} messages.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise RunConfigError("chat data needs a tokenizer with a chat template; set model.chat_template.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise RunConfigError(
                "the chat template does not render conversations prefix by prefix; cannot mask turns."
            )
        spans.append((len(before), len(upto)))
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=True,
        max_length=data.max_length,
    )
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(token if inside else -100)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


# ------------------------------------------------------------------------------------------ batches
def collate(
    examples: Sequence[Example], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of examples into tensors (labels padded with -100); a per-row number (a class or
    regression label, a task id) becomes a 1-D tensor in row order."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if not isinstance(values[0], list):
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
            continue
        pad = {"input_ids": pad_token_id, "labels": -100}.get(key, 0)
        width = max(len(v) for v in values) if key == "labels" else length
        rows = []
        for v in values:
            filler = [pad] * (width - len(v))
            rows.append(filler + list(v) if padding_side == "left" else list(v) + filler)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def loss_units(batch: dict[str, torch.Tensor], task_type: str) -> int:
    """How many terms the model's mean loss averages over: examples for classification, predicted tokens
    for language modelling (causal models shift labels by one)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    if task_type == "CAUSAL_LM":
        return int((labels[:, 1:] != -100).sum())
    return int((labels != -100).sum())
