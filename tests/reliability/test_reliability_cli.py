"""Reliability, class 5: every failure of ``peftkit train`` on bad data is one line and exit code 2.

Data files in the shapes real exports take: a CSV with a UTF-8 byte-order mark (Excel) trains; JSON that
is not rows, JSONL with a line that is not an object, a row without the label column, a label cell that
is empty, a validation label the training data lacks, all fail before the output folder is created, in
one line that names the file or row. (Settings out of range, an output folder that is a file and
``num_labels: 0``: tests/reliability/test_reliability_lost_work.py. The log after a resume:
tests/train/test_train_cli.py::test_sigkill_and_resume_reproduce_an_uninterrupted_run_bitwise.)
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from cli_fixtures import PYTHON, SENTIMENT, build_tokenizer, classification_config, cli_env, write_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def sentiment_rows(n: int = 24) -> list[dict[str, str]]:
    with open(SENTIMENT / "train.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def train(
    tmp_path: Path, tokenizer: str, train_file: Path, validation: Path | None = None
) -> subprocess.CompletedProcess:
    config = classification_config(tmp_path, tokenizer, max_steps=2)
    config["data"]["train"] = str(train_file)
    if validation is None:
        del config["data"]["validation"]
    else:
        config["data"]["validation"] = str(validation)
    return subprocess.run(
        [PYTHON, "-m", "peftkit", "train", write_config(tmp_path / "run.yaml", config)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in lines[0], result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_csv_with_a_byte_order_mark_trains(tmp_path: Path, tokenizer: str) -> None:
    rows = sentiment_rows()
    text = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows)
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = train(tmp_path, tokenizer, tmp_path / "excel.csv")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "labels: 0 = '0', 1 = '1'; f1 is of class '1' (id 1)" in result.stdout


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[1, 2, 3]", ["row 0 of the JSON list", "int"]),
        ('[{"text": "a", "label": 1}, "b"]', ["row 1 of the JSON list", "str"]),
        ('{"rows": []}', ["list of objects", "dict"]),
        ('"just text"', ["list of objects", "str"]),
        ("[" * 50_000 + "]" * 50_000, ["could not be read"]),
    ],
)
def test_json_that_is_not_rows_is_one_line(
    tmp_path: Path, tokenizer: str, content: str, words: list[str]
) -> None:
    (tmp_path / "data.json").write_text(content)
    result = train(tmp_path, tokenizer, tmp_path / "data.json")
    assert_one_line_error(result, "data.json", *words)
    assert not (tmp_path / "run").exists()


def test_jsonl_with_a_line_that_is_not_an_object_is_one_line(tmp_path: Path, tokenizer: str) -> None:
    lines = [json.dumps({"text": r["text"], "label": r["label"]}) for r in sentiment_rows(4)]
    (tmp_path / "data.jsonl").write_text("\n".join([*lines[:2], "[1, 2]", *lines[2:]]))
    result = train(tmp_path, tokenizer, tmp_path / "data.jsonl")
    assert_one_line_error(result, "row 2 of the JSONL file", "list")


def test_a_row_without_the_label_column_is_one_line(tmp_path: Path, tokenizer: str) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in sentiment_rows(6)]
    del rows[3]["label"]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    result = train(tmp_path, tokenizer, tmp_path / "data.json")
    assert_one_line_error(result, "row 3", "'label'")


def test_an_empty_label_cell_is_one_line(tmp_path: Path, tokenizer: str) -> None:
    rows = sentiment_rows(6)
    rows[4]["label"] = ""
    text = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows)
    (tmp_path / "data.csv").write_text(text)
    result = train(tmp_path, tokenizer, tmp_path / "data.csv")
    assert_one_line_error(result, "train row 4", "empty")


def test_a_label_only_in_the_validation_data_is_one_line(tmp_path: Path, tokenizer: str) -> None:
    rows = sentiment_rows(8)
    text = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows)
    (tmp_path / "train.csv").write_text(text)
    (tmp_path / "validation.csv").write_text(text + '"an unseen class",7\n')
    result = train(tmp_path, tokenizer, tmp_path / "train.csv", tmp_path / "validation.csv")
    assert_one_line_error(result, "validation row 8", "'7'", "data.labels")
