"""``peftkit bench`` on tiny models: one process per run, and the three parameter counts, mergeability and
the result files checked against independent counts of the model's tensors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from cli_fixtures import build_tokenizer, classification_config
from transformers import AutoModelForSequenceClassification

from peftkit.bench import deep_merge, expand, load_spec
from peftkit.cli import main
from peftkit.runconfig import RunConfigError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_spec(tmp_path: Path, tokenizer_dir: str, **extra) -> str:
    base = classification_config(tmp_path, tokenizer_dir, max_steps=2, eval_before=False)
    base.pop("output_dir")
    base["method"] = {}
    base["data"]["max_eval_samples"] = 8
    spec = {
        "base": base,
        "methods": {
            "lora": {
                "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
            },
            "bitfit": {"method": {"name": "bitfit"}, "train": {"lr": 1e-2}},
        },
        "seeds": [0],
        "inference": {"batch_size": 4, "repeats": 2},
        "output_dir": str(tmp_path / "bench"),
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_bench_rows_count_parameters_exactly(tmp_path, tokenizer_dir):
    assert main(["bench", write_spec(tmp_path, tokenizer_dir)]) == 0
    rows = {
        r["method"]: r
        for r in map(json.loads, (tmp_path / "bench" / "results.jsonl").read_text().splitlines())
    }
    assert set(rows) == {"lora", "bitfit"} and all(r["status"] == "ok" for r in rows.values()), rows

    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "bench" / "runs" / "lora-fp32-seed0" / "base_model"
    )
    params = dict(base.named_parameters())
    head = params["classifier.weight"].numel() + params["classifier.bias"].numel()
    lora = 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers × (query, value) × (A: r×in, B: out×r)
    assert rows["lora"]["trainable_params"] == lora + head
    assert rows["lora"]["added_params"] == lora + head  # the adapter plus the head's trained copy
    assert rows["lora"]["stored_params"] == lora + head
    assert rows["lora"]["mergeable"] is True and rows["lora"]["merge_max_abs_difference"] < 1e-4

    biases = sum(
        p.numel()
        for n, p in params.items()
        if n.endswith(".bias") and n.split(".")[0] == "bert" and ".pooler." not in n
    )
    assert rows["bitfit"]["trainable_params"] == biases + head
    assert rows["bitfit"]["added_params"] == head  # nothing but the head copy: the biases are the model's own
    assert rows["bitfit"]["stored_params"] == biases + head
    assert rows["bitfit"]["mergeable"] is True

    for row in rows.values():
        print(row)
        assert row["metric_name"] == "accuracy" and 0.0 <= row["metric"] <= 1.0
        assert (
            row["median_step_seconds"] > 0
            and row["tokens_per_second"] > 0
            and row["peak_memory_bytes"] > 2**20
        )
        assert row["latency_base_ms"] > 0 and row["latency_unmerged_ms"] > 0
    with open(tmp_path / "bench" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| lora |" in table and "| bitfit |" in table
    assert (tmp_path / "bench" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_grid_is_the_product_of_its_axes_and_checked_before_running(tmp_path, tokenizer_dir):
    spec = load_spec(write_spec(tmp_path, tokenizer_dir, seeds=[0, 1], precisions=["fp32", "bf16"]))
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 2
    assert {r.run_id for r in runs} >= {"lora-fp32-seed0", "bitfit-bf16-seed1"}
    bf16 = next(r for r in runs if r.run_id == "lora-bf16-seed1")
    assert bf16.raw["model"]["dtype"] == "bfloat16" and bf16.raw["train"]["seed"] == 1

    bad = write_spec(tmp_path, tokenizer_dir, methods={"x": {"method": {"name": "lora", "rank": 4}}})
    with pytest.raises(RunConfigError, match=r"bench run x-fp32-seed0: unknown key method\.rank"):
        expand(load_spec(bad))
    assert main(["bench", bad]) == 2
    assert not (tmp_path / "bench").exists()
    with pytest.raises(RunConfigError, match="precision 'fp8'"):
        load_spec(write_spec(tmp_path, tokenizer_dir, precisions=["fp8"]))


def test_deep_merge_replaces_values_and_lists_and_merges_mappings():
    base = {"train": {"lr": 1.0, "seed": 0}, "method": {"target_modules": ["a", "b"]}}
    merged = deep_merge(base, {"train": {"lr": 2.0}, "method": {"target_modules": ["c"]}})
    assert merged == {"train": {"lr": 2.0, "seed": 0}, "method": {"target_modules": ["c"]}}
    assert base["train"]["lr"] == 1.0
