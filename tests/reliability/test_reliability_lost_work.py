"""Reliability, class 2: a run or a save that fails never destroys earlier work.

A finished run's folder is the earlier work. Each attempt fails on purpose (settings out of range, a second
run into the same folder, a data error found after loading, an adapter that cannot be saved) and the test
compares every file of that folder, name and bytes, before and after. Successful runs still replace an
earlier run's checkpoints, once they have one of their own.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_fixtures import PYTHON, build_tokenizer, classification_config, cli_env, write_config
from tiny_models import build_model

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.train.loop import LOCK_FILE, output_dir_lock


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train(config_path: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "peftkit", "train", config_path, *overrides],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run (tiny BERT, 8 steps, a checkpoint every 4): its folder is the work to protect."""
    tmp = tmp_path_factory.mktemp("finished")
    tokenizer = build_tokenizer(tmp / "tokenizer")
    config = classification_config(tmp, tokenizer, save_every=4, save_total_limit=5)
    path = write_config(tmp / "run.yaml", config)
    result = train(path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp / "run" / "checkpoint-8").is_dir() and (tmp / "run" / "checkpoint-4").is_dir()
    return tmp


@pytest.fixture
def earlier(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run (folder ``run``) with its config (``run.yaml``)."""
    shutil.copytree(finished_run, tmp_path / "copy")
    folder = tmp_path / "copy"
    text = (folder / "run.yaml").read_text().replace(str(finished_run), str(folder))
    (folder / "run.yaml").write_text(text)
    return folder


@pytest.mark.parametrize(
    "override",
    [
        "train.adam_beta1=2",
        "train.adam_beta2=-0.1",
        "train.lr=nan",
        "train.lr=inf",
        "train.lr=-1",
        "train.max_grad_norm=-1",
        "train.warmup_steps=-5",
        "train.weight_decay=-0.01",
        "train.adam_epsilon=0",
        "train.save_total_limit=0",
        "train.seed=-1",
        "model.num_labels=0",
        "method.lora_alpha=nan",
        "method.lora_alpha=inf",
        "method.r=0",
    ],
)
def test_settings_out_of_range_fail_before_anything_is_touched(earlier: Path, override: str) -> None:
    before = snapshot(earlier / "run")
    result = train(str(earlier / "run.yaml"), override)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    key = override.split("=")[0].split(".")[-1]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in lines[0], result.stderr
    assert snapshot(earlier / "run") == before


def test_a_second_run_into_a_folder_in_use_fails_and_changes_nothing(earlier: Path) -> None:
    before = snapshot(earlier / "run")
    with output_dir_lock(str(earlier / "run")):  # the first run, still going
        result = train(str(earlier / "run.yaml"))
    assert result.returncode == 2 and "in use by another peftkit run" in result.stderr
    after = snapshot(earlier / "run")
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE
    }


def test_a_run_failing_after_it_started_keeps_the_earlier_checkpoints(earlier: Path) -> None:
    """The label column is missing: found when the data is read, inside the run."""
    before = snapshot(earlier / "run")
    result = train(str(earlier / "run.yaml"), "data.label_column=no_such_column")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    after = snapshot(earlier / "run")
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE
    }


def test_a_new_run_replaces_the_earlier_checkpoints_once_it_has_one(earlier: Path) -> None:
    result = train(str(earlier / "run.yaml"), "train.max_steps=2", "train.save_every=2")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoints = sorted(p.name for p in (earlier / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # the earlier run's checkpoint-4 and -8 are gone


def test_a_killed_runs_temporary_files_are_removed_at_the_next_start(earlier: Path) -> None:
    run = earlier / "run"
    (run / ".tmp-checkpoint-12").mkdir()
    (run / ".tmp-checkpoint-12" / "adapter_model.safetensors").write_bytes(b"half")
    (run / "adapter_model.safetensors.tmp").write_bytes(b"half")
    result = train(str(earlier / "run.yaml"), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run / ".tmp-checkpoint-12").exists() and not (run / "adapter_model.safetensors.tmp").exists()


def test_output_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "run").write_text("not a folder")
    path = write_config(tmp_path / "run.yaml", classification_config(tmp_path, tokenizer))
    result = train(path)
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "run").read_text() == "not a folder"


# -------------------------------------------------------------------------------------- the library
def trained(adapters: tuple[str, ...] = ("default",)) -> PeftModel:
    model = get_peft_model(
        build_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    for name in adapters[1:]:
        model.add_adapter(name, LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_saving_after_unloading_is_refused_and_the_saved_adapter_stays(tmp_path: Path, how: str) -> None:
    model = trained()
    model.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    getattr(model, how)()
    with pytest.raises(ValueError, match="no tensors in this model"):
        model.save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before


def test_saving_several_adapters_is_all_or_nothing(tmp_path: Path) -> None:
    model = trained(("default", "second"))
    (tmp_path / "second").write_text("a file where the second adapter's folder would go")
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second"]  # the default adapter was not written
    (tmp_path / "second").unlink()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    assert set(loaded.peft_config) == {"default", "second"}
