"""Reliability, class 4: untrusted adapter files and configs cannot hang or exhaust the machine.

An ``adapter_config.json`` from a hub and a YAML run config are input from strangers. Each test plants one
hostile value, loads it, and checks a clear ``ValueError`` (or exit code 2 with one line from the CLI)
within seconds, with the model and the files unchanged:

* regular expressions that backtrack for ever (``target_modules``, ``exclude_modules``, ``layers_pattern``,
  ``rank_pattern`` keys) are cut off after :data:`peftkit.core.targeting.REGEX_TIMEOUT_S`;
* a size field far larger than the weight file (``r``, ``rank_pattern``, ``num_virtual_tokens``) is refused
  before the memory is taken;
* fields of the wrong type are refused by name;
* YAML alias bombs, self-referencing aliases, deeply nested and oversized config files are refused.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_fixtures import PYTHON, cli_env
from model_state import assert_unchanged, snapshot
from tiny_models import build_model

from peftkit import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.core.io_utils import MAX_CONFIG_BYTES
from peftkit.core.targeting import REGEX_TIMEOUT_S, pattern_match
from peftkit.train.runconfig import RunConfigError, load_run_config

# each takes seconds to centuries with Python's `re` on a module name (the `regex` engine peftkit uses
# gives up on them at once)
BACKTRACKING = [r"(.*)*x", r"(\w+\.?)+!", r"((\w|\.)+)+!", r"(.?){45}.{45}", r"^(([a-z._0-9])+.?)+$!"]
# and these are slow even for `regex`: the time bound ends them
SLOW_EVEN_FOR_REGEX = [r"(.{0,20}){0,20}0\.\d", r"(.*?)*(.*?)*q_proj\b\d"]
NAME = "base_model.model.model.layers.0.self_attn.q_proj"


def saved_adapter(folder: Path, **config: Any) -> Path:
    model = get_peft_model(
        build_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config)
    )
    model.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def refused_quickly(folder: Path, match: str, seconds: float = 20.0) -> None:
    base = build_model("llama")
    before = snapshot(base)
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, folder)
    assert time.monotonic() - start < seconds
    assert_unchanged(base, before)


# ------------------------------------------------------------------------------------- regexes
@pytest.mark.parametrize("pattern", BACKTRACKING)
def test_a_backtracking_pattern_finishes_at_once(pattern: str) -> None:
    start = time.monotonic()
    pattern_match(pattern, NAME)  # a match or not: an answer
    assert time.monotonic() - start < REGEX_TIMEOUT_S


@pytest.mark.parametrize("pattern", SLOW_EVEN_FOR_REGEX)
def test_a_pattern_slower_than_the_bound_is_cut_off_with_a_clear_error(pattern: str) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match="took more than"):
        pattern_match(pattern, NAME)
    assert time.monotonic() - start < 10 * REGEX_TIMEOUT_S


@pytest.mark.parametrize("pattern", BACKTRACKING)
def test_a_backtracking_target_pattern_loads_in_no_time_as_no_match(tmp_path: Path, pattern: str) -> None:
    folder = saved_adapter(tmp_path)
    edit_config(folder, target_modules=pattern)
    refused_quickly(folder, "matched no module", seconds=10)


SLOW = SLOW_EVEN_FOR_REGEX[1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", SLOW),
        ("exclude_modules", SLOW),
        ("rank_pattern", {SLOW: 2}),
        ("alpha_pattern", {SLOW: 2}),
    ],
)
def test_a_slow_pattern_in_an_adapter_config_does_not_hang_loading(
    tmp_path: Path, field: str, value: Any
) -> None:
    folder = saved_adapter(tmp_path)
    edit_config(folder, **{field: value})
    refused_quickly(folder, "took more than")


def test_an_invalid_regex_is_a_clear_error(tmp_path: Path) -> None:
    folder = saved_adapter(tmp_path)
    edit_config(folder, target_modules="(q_proj")
    refused_quickly(folder, "not a valid regular expression")


# --------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "changes",
    [{"r": 10**9}, {"r": 300_000}, {"rank_pattern": {"q_proj": 10**8}}],
    ids=["1e9", "3e5", "pattern"],
)
def test_a_rank_far_beyond_the_weight_file_is_refused_before_allocating(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    folder = saved_adapter(tmp_path)
    edit_config(folder, **changes)
    refused_quickly(folder, "weight file holds far fewer", seconds=10)


def test_a_huge_prompt_length_is_refused_before_allocating(tmp_path: Path) -> None:
    model = get_peft_model(
        build_model("llama"), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, num_virtual_tokens=10**9)
    refused_quickly(tmp_path, "weight file holds far fewer", seconds=10)


def test_load_adapter_with_a_huge_rank_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    folder = saved_adapter(tmp_path / "a")
    model = PeftModel.from_pretrained(build_model("llama"), folder)
    edit_config(folder, r=10**9)
    before = snapshot(model)
    with pytest.raises(ValueError, match="far fewer"):
        model.load_adapter(folder, "second")
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


def test_an_honest_adapter_still_loads(tmp_path: Path) -> None:
    folder = saved_adapter(tmp_path, init_lora_weights=False)
    model = PeftModel.from_pretrained(build_model("llama"), folder)
    assert model.peft_config["default"].r == 4


# ------------------------------------------------------------------------------------ field types
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", 5),
        ("rank_pattern", [1]),
        ("layers_to_transform", "0"),
        ("fan_in_fan_out", "no"),
        ("lora_alpha", "16"),
        ("r", 4.5),
        ("modules_to_save", {"a": 1}),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_by_name(tmp_path: Path, field: str, value: Any) -> None:
    folder = saved_adapter(tmp_path)
    edit_config(folder, **{field: value})
    refused_quickly(folder, field)


def test_cli_commands_given_an_adapter_with_a_wrong_type_say_so_in_one_line(tmp_path: Path) -> None:
    folder = saved_adapter(tmp_path / "adapter")
    edit_config(folder, fan_in_fan_out="no")
    for command in (
        ["inspect", str(folder)],
        ["merge", "--adapter", str(folder), "--out", str(tmp_path / "m")],
    ):
        result = subprocess.run(
            [PYTHON, "-m", "peftkit", *command], env=cli_env(), capture_output=True, text=True, timeout=120
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and "fan_in_fan_out" in lines[0], result.stderr
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------- config files
def alias_bomb(depth: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, depth):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return "\n".join("    " + line for line in lines)


def test_a_yaml_alias_bomb_in_a_free_form_section_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nmodel:\n  from_config:\n    model_type: bert\n{alias_bomb()}\n"
    )
    start = time.monotonic()
    with pytest.raises(RunConfigError, match="expands to more than"):
        load_run_config(config)
    assert time.monotonic() - start < 10
    result = subprocess.run(
        [PYTHON, "-m", "peftkit", "train", str(config)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "expands to more than" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  from_config: &loop\n    model_type: bert\n    again: *loop\n")
    with pytest.raises(RunConfigError, match="contains itself"):
        load_run_config(config)


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    start = time.monotonic()
    with pytest.raises(RunConfigError, match="expands to more than"):
        load_run_config(None, ["model.from_config={" + ", ".join(levels) + "}"])
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("what", ["deep", "big"])
def test_a_deep_or_oversized_adapter_config_is_refused(tmp_path: Path, what: str) -> None:
    folder = saved_adapter(tmp_path)
    if what == "deep":
        (folder / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
        match = "not valid JSON"
    else:
        (folder / "adapter_config.json").write_text('{"pad": "' + "x" * (MAX_CONFIG_BYTES + 10) + '"}')
        match = "larger than"
    with pytest.raises(ValueError, match=match):
        PeftConfig.from_pretrained(folder)
