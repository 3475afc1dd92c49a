"""Multitask Prompt Tuning through ``peftkit train`` / ``eval``: ``data.task_id_column`` puts each row's task id
into its example and every batch (in row order, for every data format), a two-task run learns what only the
task id tells apart, the saved adapter reloads and ``peftkit eval`` repeats the end-of-training metrics, and the
ways to get it wrong (no such column, a task that is not an id or a listed name, an id beyond num_tasks, task
ids for a method that takes none, MPT without task ids) stop before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import (
    ALPACA_ROWS,
    SENTIMENT,
    build_tokenizer,
    classification_config,
    instruction_config,
    write_config,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftkit import PeftModel
from peftkit.cli import main
from peftkit.train.data import collate
from peftkit.train.loop import make_batch, prepare_task
from peftkit.train.models import load_tokenizer
from peftkit.train.runconfig import build_run_config

TASK_NAMES = ["zero", "one"]  # task "zero": every text is labelled 0; task "one": the same texts, labelled 1


def _texts(count: int, skip: int = 0) -> list[str]:
    with open(SENTIMENT / "train.csv", newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)][skip : skip + count]


def _two_task_rows(texts: list[str], by_name: bool) -> list[dict[str, Any]]:
    """Each text once per task, the label being the task's: only the task id separates the classes."""
    rows = []
    for text in texts:
        for task_id, name in enumerate(TASK_NAMES):
            rows.append({"text": text, "label": task_id, "task": name if by_name else task_id})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _mpt_config(tmp_path: Path, tokenizer: str, by_name: bool = False, **train: Any) -> dict[str, Any]:
    config = classification_config(tmp_path, tokenizer, lr=5e-2, epochs=6, **train)
    config["method"] = {
        "name": "multitask_prompt_tuning",
        "num_virtual_tokens": 4,
        "num_tasks": 2,
        "num_ranks": 1,
    }
    data = config["data"]
    data["train"] = _write_jsonl(tmp_path / "train.jsonl", _two_task_rows(_texts(12), by_name))
    data["validation"] = _write_jsonl(tmp_path / "dev.jsonl", _two_task_rows(_texts(6, skip=100), by_name))
    data["task_id_column"] = "task"
    if by_name:
        data["task_names"] = TASK_NAMES
    return config


# ------------------------------------------------------------------------------------ the run
def test_train_mpt_on_two_tasks_through_the_cli_then_reload_and_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    config_path = write_config(tmp_path / "run.yaml", _mpt_config(tmp_path, tokenizer, by_name=True))
    assert main(["train", config_path]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    losses = [
        r["loss"]
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    # the labels depend on the task alone: without the task id no model beats chance (loss ln 2, accuracy 1/2)
    assert summary["metrics_before"]["accuracy"] == pytest.approx(0.5, abs=0.2)
    assert losses[-1] < 0.5 * losses[0]
    assert summary["metrics"]["accuracy"] == 1.0

    # the adapter reloads onto the saved base and tells the tasks apart row by row
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MULTITASK_PROMPT_TUNING" and saved["num_tasks"] == 2
    base = AutoModelForSequenceClassification.from_pretrained(run / "base_model")
    model = PeftModel.from_pretrained(base, str(run)).eval()
    tok = AutoTokenizer.from_pretrained(run / "base_model")
    inputs = tok(_texts(3, skip=100), padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs, task_ids=torch.tensor([1, 0, 1])).logits.argmax(-1)
    assert predicted.tolist() == [1, 0, 1]

    # peftkit eval reads the task names from the same config and repeats the end-of-training metrics
    capsys.readouterr()
    assert main(["eval", config_path, "--adapter", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics.keys() == summary["metrics"].keys()
    for key, value in summary["metrics"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_train_mpt_on_instruction_data_with_integer_task_ids(tmp_path: Path) -> None:
    """A causal LM (the ``instruction`` format), task ids written as integers in a JSON file."""
    tokenizer = build_tokenizer(tmp_path / "tok")
    config = instruction_config(tmp_path, tokenizer, epochs=8, lr=0.1)
    rows = [{**row, "task": i % 2} for i, row in enumerate(ALPACA_ROWS)]
    # evaluated on its own training rows: the loss on the same examples before and after
    data = config["data"]
    data["train"] = data["validation"] = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    data["validation_split"] = 0.0
    data["task_id_column"] = "task"
    config["method"] = {"name": "multitask_prompt_tuning", "num_virtual_tokens": 3, "num_tasks": 2}
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # a random tiny llama moves little under a 3-token prompt; the fall is small but deterministic (seeded)
    assert summary["metrics"]["loss"] < summary["metrics_before"]["loss"] - 0.01


# ------------------------------------------------------------------------------------ batches
def test_collate_keeps_task_ids_in_row_order() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1, "task_ids": 2},
        {"input_ids": [5], "attention_mask": [1], "labels": 0, "task_ids": 0},
        {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": 1, "task_ids": 1},
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["task_ids"].dtype == torch.long
    assert batch["task_ids"].tolist() == [2, 0, 1]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0], [8, 9, 0]]


@pytest.mark.parametrize("data_format", ["classification", "regression", "text", "instruction", "chat"])
def test_every_format_puts_each_rows_task_into_its_example_and_batch(
    tmp_path: Path, data_format: str
) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    tasks = ["b", "a", "c", "a", "b"]  # named tasks; ids are positions in data.task_names
    names = ["a", "b", "c"]
    rows: list[dict[str, Any]] = []
    for i, task in enumerate(tasks):
        row: dict[str, Any] = {"task": task}
        if data_format in ("classification", "regression", "text"):
            row.update(text=f"word {i}", label=i % 2)
        elif data_format == "instruction":
            row.update(ALPACA_ROWS[i])
        else:
            row["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"x {i}"}]
        rows.append(row)
    task_type = "SEQ_CLS" if data_format in ("classification", "regression") else "CAUSAL_LM"
    config = build_run_config(
        {
            "model": {"name_or_path": tokenizer, "task_type": task_type},
            "method": {"name": "multitask_prompt_tuning", "num_virtual_tokens": 2, "num_tasks": 3},
            "data": {
                "train": _write_jsonl(tmp_path / "rows.jsonl", rows),
                "format": data_format,
                "task_id_column": "task",
                "task_names": names,
            },
        }
    )
    task = prepare_task(config, load_tokenizer(config.model))
    expected = [names.index(t) for t in tasks]
    assert [e["task_ids"] for e in task.train_examples] == expected
    batch = make_batch(task.train_examples[::-1], task.pad_token_id, torch.device("cpu"))
    assert batch["task_ids"].tolist() == expected[::-1]
    assert task.row_inputs == ("task_ids",)


# ------------------------------------------------------------------------------------- errors
def _fails(tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``peftkit train``; it must fail with exit code 2 and write nothing. Returns the message."""
    capsys.readouterr()
    assert main(["train", write_config(tmp_path / "bad.yaml", config)]) == 2
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().err


def test_a_task_id_column_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"))
    config["data"]["task_id_column"] = "task_name"
    err = _fails(tmp_path, config, capsys)
    assert "data.task_id_column 'task_name' is not a column of the data; columns: text, label, task" in err


@pytest.mark.parametrize("value", ["first", -1, 1.5])
def test_a_task_that_is_not_an_integer_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"))
    rows = _two_task_rows(_texts(4), by_name=False)
    rows[3]["task"] = value
    config["data"]["train"] = _write_jsonl(tmp_path / "train.jsonl", rows)
    err = _fails(tmp_path, config, capsys)
    assert f"train row 3: task {value!r} in data.task_id_column 'task' is not a task id" in err
    assert "data.task_names" in err


def test_a_task_name_that_is_not_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"), by_name=True)
    rows = _two_task_rows(_texts(6, skip=100), by_name=True)
    rows[5]["task"] = "two"
    config["data"]["validation"] = _write_jsonl(tmp_path / "dev.jsonl", rows)
    err = _fails(tmp_path, config, capsys)
    assert (
        "validation row 5: task 'two' (data.task_id_column 'task') is not one of data.task_names ['zero', 'one']"
        in err
    )


def test_a_task_id_beyond_num_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"))
    rows = _two_task_rows(_texts(4), by_name=False)
    rows[1]["task"] = 2
    rows[2]["task"] = 5
    config["data"]["train"] = _write_jsonl(tmp_path / "train.jsonl", rows)
    err = _fails(tmp_path, config, capsys)
    assert "do not fit method multitask_prompt_tuning" in err
    assert "task_ids must lie in [0, 1] (num_tasks=2), got 2, 5; set num_tasks" in err


def test_task_ids_for_a_method_that_takes_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"))
    config["method"] = {"name": "lora", "r": 2, "target_modules": ["query", "value"]}
    err = _fails(tmp_path, config, capsys)
    assert "data.task_id_column is set, but method lora takes no task_ids; remove data.task_id_column" in err


def test_mpt_without_a_task_id_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"))
    del config["data"]["task_id_column"]
    err = _fails(tmp_path, config, capsys)
    assert "method multitask_prompt_tuning needs task_ids (one per row): set data.task_id_column" in err


def test_task_names_without_a_task_id_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _mpt_config(tmp_path, build_tokenizer(tmp_path / "tok"), by_name=True)
    del config["data"]["task_id_column"]
    err = _fails(tmp_path, config, capsys)
    assert "data.task_names is set but data.task_id_column is not" in err


def test_peftkit_bench_runs_mpt_with_task_ids_and_probes_the_base_without_them(tmp_path: Path) -> None:
    """A bench grid point of MPT: trains with the task ids, and the latency probe runs the base model on
    the same batch without them (the base model takes no task_ids)."""
    import yaml

    tokenizer = build_tokenizer(tmp_path / "tok")
    base = _mpt_config(tmp_path, tokenizer, max_steps=2, eval_before=False)
    base.pop("output_dir")
    method = base.pop("method")
    spec = {
        "base": base,
        "methods": {"mpt": {"method": method}},
        "inference": {"batch_size": 4, "repeats": 1},
        "output_dir": str(tmp_path / "bench"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(path)]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and row["latency_base_ms"] > 0 and row["latency_unmerged_ms"] > 0
    # trainable: the shared prompt, the task-specific rank-1 factors and the head copy (hidden 32, 2 labels)
    assert row["trainable_params"] == 4 * 32 + 2 * (4 * 1 + 1 * 32) + (32 * 2 + 2)
