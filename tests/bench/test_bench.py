"""``peftkit bench`` on tiny models: one process per run, and the three parameter counts, mergeability and
the result files checked against independent counts of the model's tensors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from cli_fixtures import REPO, classification_config
from transformers import AutoModelForSequenceClassification

from peftkit.bench.report import write_report
from peftkit.bench.runner import deep_merge, expand, load_spec, rebuild_report
from peftkit.cli import main
from peftkit.train.runconfig import RunConfigError


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
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "| lora | peftkit |" in report and "| bitfit | peftkit |" in report
    for plot in ("score_vs_trainable.png", "peak_memory.png", "step_time.png"):
        assert (tmp_path / "bench" / plot).read_bytes()[:4] == b"\x89PNG"
        assert f"]({plot})" in report

    # the report is rebuilt from the rows alone
    (tmp_path / "bench" / "report.md").unlink()
    assert main(["bench", "--report", str(tmp_path / "bench")]) == 0
    assert (tmp_path / "bench" / "report.md").read_text() == report


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


PEER = str(REPO / "benchmarks" / "hf_peft_peer.py")


def test_peer_column_runs_the_same_grid_point_with_hf_peft_and_gets_the_same_numbers(tmp_path, tokenizer_dir):
    """The peer run uses HF PEFT for the method on the same base, data order and seed: LoRA's losses and
    scores must then agree with peftkit's to float precision (the libraries compute the same function from
    the same initialisation), and the counts must be equal."""
    pytest.importorskip("peft")
    spec = write_spec(tmp_path, tokenizer_dir, peer=PEER, threads=1)
    runs = expand(load_spec(spec, allow_code=True))
    # bitfit has no HF PEFT counterpart: no peer run for it
    assert sorted(r.run_id for r in runs) == [
        "bitfit-fp32-seed0",
        "lora-fp32-seed0",
        "lora-hf_peft-fp32-seed0",
    ]
    assert main(["bench", spec, "--only", "lora", "--allow-code"]) == 0
    rows = {
        r["library"]: r
        for r in map(json.loads, (tmp_path / "bench" / "results.jsonl").read_text().splitlines())
    }
    ours, theirs = rows["peftkit"], rows["hf_peft"]
    import peft

    assert theirs["library_version"] == peft.__version__ and ours["threads"] == theirs["threads"] == 1
    for key in ("trainable_params", "added_params", "stored_params", "base_params", "mergeable"):
        assert ours[key] == theirs[key], key
    assert ours["final_train_loss"] == pytest.approx(theirs["final_train_loss"], abs=1e-5)
    assert ours["metrics"]["loss"] == pytest.approx(theirs["metrics"]["loss"], abs=1e-5)
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## peftkit next to the peer library" in report and "| lora | hf_peft |" in report


def test_peer_runner_and_threads_are_checked_when_the_spec_is_read(tmp_path, tokenizer_dir):
    with pytest.raises(RunConfigError, match="does not exist"):
        load_spec(write_spec(tmp_path, tokenizer_dir, peer=str(tmp_path / "missing.py")), allow_code=True)
    incomplete = tmp_path / "peer.py"
    incomplete.write_text("NAME = 'other'\ndef available():\n    return True\n")
    with pytest.raises(RunConfigError, match="does not define supports, wrap, load, version"):
        load_spec(write_spec(tmp_path, tokenizer_dir, peer=str(incomplete)), allow_code=True)
    with pytest.raises(RunConfigError, match="threads must be a positive integer"):
        load_spec(write_spec(tmp_path, tokenizer_dir, threads=0))
    with pytest.raises(RunConfigError, match="contains '-'"):
        load_spec(write_spec(tmp_path, tokenizer_dir, methods={"lo-ra": {"method": {"name": "lora"}}}))
    with pytest.raises(RunConfigError, match=r"no results\.jsonl"):
        rebuild_report(str(tmp_path))
    assert main(["bench", "--report", str(tmp_path)]) == 2


def test_a_task_names_its_own_metric(tmp_path, tokenizer_dir):
    spec = load_spec(
        write_spec(
            tmp_path,
            tokenizer_dir,
            metric="f1",
            tasks={"a": {"metric": "mcc", "data": {"max_length": 16}}, "b": {}},
        )
    )
    assert spec.task_metrics == {"a": "mcc"} and "metric" not in spec.tasks["a"]
    from peftkit.bench.runner import _choose_metric

    row = {"task": "a", "metrics": {"accuracy": 0.5, "mcc": 0.1, "f1": 0.4}}
    _choose_metric(row, spec)
    assert (row["metric_name"], row["metric"]) == ("mcc", 0.1)
    row = {"task": "b", "metrics": {"accuracy": 0.5, "mcc": 0.1, "f1": 0.4}}
    _choose_metric(row, spec)
    assert (row["metric_name"], row["metric"]) == ("f1", 0.4)


def _row(
    model: str, method: str, library: str, precision: str, seed: int, metric: float, step: float
) -> dict:
    return {
        "run": f"{model}-{method}-{library}-{precision}-seed{seed}", "model": model, "task": "t",
        "method": method, "library": library, "precision": precision, "seed": seed, "status": "ok",
        "metric_name": "accuracy", "metric": metric, "trainable_params": 10, "added_params": 10,
        "stored_params": 10, "stored_bytes": 40, "base_params": {"s": 1000, "m": 8000}[model], "mergeable": True,
        "peak_memory_bytes": 100 * 2**20, "median_step_seconds": step, "tokens_per_second": 1.0,
        "final_train_loss": 0.5, "latency_base_ms": 1.0, "latency_unmerged_ms": 2.0, "latency_merged_ms": 1.0,
    }  # fmt: skip


def test_report_aggregates_seeds_and_lays_out_peer_precision_and_size_tables(tmp_path):
    rows = [
        _row("s", "lora", "peftkit", "fp32", 0, 0.70, 0.010),
        _row("s", "lora", "peftkit", "fp32", 1, 0.80, 0.030),
        _row("s", "lora", "peftkit", "fp32", 2, 0.90, 0.020),
        _row("s", "lora", "hf_peft", "fp32", 0, 0.60, 0.050),
        _row("s", "lora", "peftkit", "bf16", 0, 0.50, 0.040),
        _row("m", "lora", "peftkit", "fp32", 0, 0.75, 0.080),
        {"run": "s-ia3-peftkit-fp32-seed0", "model": "s", "task": "t", "method": "ia3", "library": "peftkit",
         "precision": "fp32", "seed": 0, "status": "failed", "error": "boom"},
    ]  # fmt: skip
    report = Path(write_report(str(tmp_path), rows)).read_text()
    # mean and sample sd over the three seeds: 0.8 ± 0.1; median step of 10, 30, 20 ms
    assert (
        "| lora | peftkit | 0.8000 ± 0.1000 (n=3) | best | – | 10 | 10 | 10 (0) | yes | 100 | 20 |" in report
    )
    assert "| s | t | fp32 | lora | 0.8000 / 0.6000 | 20 / 50 (2.50×) |" in report
    assert "| s | t | lora | 0.800 · 100 MiB · 20 ms | 0.500 · 100 MiB · 40 ms |" in report  # precisions
    assert "| t | fp32 | lora | 20 ms · 100 MiB · 10 tr. | 80 ms · 100 MiB · 10 tr. |" in report  # sizes
    assert "`s-ia3-peftkit-fp32-seed0`: failed: boom" in report
    assert (tmp_path / "cost_vs_size.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "spec_path",
    sorted(str(p) for p in (REPO / "examples").glob("bench*.yaml"))
    + sorted(str(p) for p in (REPO / "docs" / "benchmarks").glob("*.yaml")),
)
def test_shipped_bench_specs_expand_into_valid_run_configs(spec_path, monkeypatch):
    """Every spec in the repository (examples/, docs/benchmarks/) checks out as run configs."""
    monkeypatch.chdir(REPO)  # their paths are relative to the root
    runs = expand(load_spec(spec_path, allow_code=True))  # the published specs name the HF PEFT peer
    assert runs and len({r.run_id for r in runs}) == len(runs)


def test_an_unknown_metric_name_is_refused(tmp_path, tokenizer_dir):
    with pytest.raises(RunConfigError, match="metric 'matthews' is unknown"):
        load_spec(write_spec(tmp_path, tokenizer_dir, tasks={"a": {"metric": "matthews"}}))


def test_separation_from_the_best_is_judged_against_the_seed_spread():
    from peftkit.bench.report import separated_from_best

    def rows(method, scores, metric="accuracy"):
        return [
            {
                "method": method,
                "library": "peftkit",
                "status": "ok",
                "metric": v,
                "metric_name": metric,
                "seed": i,
            }
            for i, v in enumerate(scores)
        ]

    # best 0.90 ± 0.01; b: 0.85 ± 0.01 (gap 0.05 > 0.02: below); c: 0.89 ± 0.02 (gap 0.01 < 0.03: within)
    marks = separated_from_best(
        rows("a", [0.89, 0.90, 0.91]) + rows("b", [0.84, 0.85, 0.86]) + rows("c", [0.87, 0.89, 0.91])
    )
    assert marks == {("a", "peftkit"): "best", ("b", "peftkit"): "below", ("c", "peftkit"): "within"}
    # perplexity: lower is better
    marks = separated_from_best(rows("a", [10.0, 10.1], "perplexity") + rows("b", [12.0, 12.1], "perplexity"))
    assert marks[("a", "peftkit")] == "best" and marks[("b", "peftkit")] == "below"
    assert (
        separated_from_best(rows("a", [0.9]) + rows("b", [0.8]))[("b", "peftkit")] == ""
    )  # one seed: no spread


def test_sweep_chooses_each_method_s_rate_on_a_split_of_the_training_data(tmp_path, tokenizer_dir):
    path = write_spec(
        tmp_path, tokenizer_dir, sweep={"lr_factors": [0.1, 10], "validation_split": 0.25, "seed": 5}
    )
    assert main(["bench", path, "--only", "lora"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    sweep = [r for r in rows if r.get("phase") == "sweep"]
    final = [r for r in rows if r.get("phase") == "final"]
    assert len(sweep) == 2 and len(final) == 1 and all(r["status"] == "ok" for r in rows)
    assert {r["seed"] for r in sweep} == {5}
    for method, base_lr in (("lora", 1e-2),):  # the base config's train.lr
        tried = {r["lr"]: r["metric"] for r in sweep if r["method"] == method}
        assert sorted(tried) == pytest.approx([base_lr * 0.1, base_lr * 10])
        best = max(sorted(tried), key=lambda lr: tried[lr])  # the lower rate on a tie
        (row,) = [r for r in final if r["method"] == method]
        assert row["lr"] == pytest.approx(best)
        run_config = yaml.safe_load((tmp_path / "bench" / "runs" / row["run"] / "bench_run.yaml").read_text())
        assert run_config["train"]["lr"] == pytest.approx(best)
    # the sweep never reads the configured validation set: its runs score a split of the training file
    swept = yaml.safe_load((tmp_path / "bench" / "runs" / sweep[0]["run"] / "bench_run.yaml").read_text())
    assert swept["data"]["validation"] is None and swept["data"]["validation_split"] == 0.25
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## Learning-rate sweep" in report and "**" in report


def test_score_against_step_comes_from_each_run_s_log(tmp_path):
    from peftkit.bench.report import _curves

    rows = []
    for seed in (0, 1):
        run = f"lora-seed{seed}"
        (tmp_path / "runs" / run).mkdir(parents=True)
        records = [{"kind": "train", "step": 50, "loss": 1.0}]
        records += [{"kind": "eval", "step": s, "eval_accuracy": s / 1000 + seed / 10} for s in (100, 200)]
        (tmp_path / "runs" / run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rows.append(_row("s", "lora", "peftkit", "fp32", seed, 0.9, 0.01) | {"run": run})
    curves = _curves(str(tmp_path), rows)
    assert set(curves) == {"lora"} and sorted(curves["lora"]) == [100, 200]
    assert curves["lora"][100] == pytest.approx([0.1, 0.2]) and curves["lora"][200] == pytest.approx(
        [0.2, 0.3]
    )
    report = Path(write_report(str(tmp_path), rows)).read_text()
    assert "![score_vs_step](score_vs_step.png)" in report
    assert (tmp_path / "score_vs_step.png").read_bytes()[:4] == b"\x89PNG"
