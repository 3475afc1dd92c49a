"""Reliability, class 3: numbers that cannot be right are refused, and no number changes silently.

* every float field of every registered method's config refuses NaN and infinities (one generic check,
  tried on each method's conformance config);
* combining adapters refuses non-finite weights and a rank below one;
* the label space of a classification run is explicit and checked: labels come from the training data
  only, ``1`` and ``1.0`` are one class, an empty label or a label the training data lacks is an error, a
  huge integer label is one class (not a head of that many), and the run says which class F1 is about;
* switching or disabling adapters on a merged model gives the outputs of what is active;
* ``safe_merge`` sees a NaN in a ``modules_to_save`` copy; adapter files with integer, bool or complex
  tensors are refused.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_state import assert_unchanged, snapshot
from safetensors.torch import save_file
from test_conformance import CASES
from tiny_models import build_model, model_inputs

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.train.data import LabelSpace, build_examples, label_key, label_space
from peftkit.train.runconfig import DataSection, RunConfigError

NON_FINITE = [math.nan, math.inf, -math.inf]


# ------------------------------------------------------------------------------------ config floats
def _float_fields(config: object) -> list[str]:
    hints = typing.get_type_hints(type(config))
    return [
        f.name
        for f in dataclasses.fields(config)  # type: ignore[arg-type]
        if hints[f.name] is float
        or (
            typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
            and float in typing.get_args(hints[f.name])
        )
    ]


def _constructor_fields(config: object) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}  # type: ignore[arg-type]


FLOAT_CASES = [(case.id, name) for case in CASES for name in _float_fields(case.config())]


def test_the_float_field_table_covers_several_methods() -> None:
    assert len({case_id.split("-")[0] for case_id, _ in FLOAT_CASES}) >= 5


@pytest.mark.parametrize(("case_id", "field"), FLOAT_CASES)
def test_every_float_field_of_every_method_refuses_non_finite_values(case_id: str, field: str) -> None:
    config = next(case for case in CASES if case.id == case_id).config()
    before = dataclasses.asdict(config)
    for value in NON_FINITE:
        with pytest.raises(ValueError, match=field):
            config.replace(**{field: value})
        with pytest.raises(ValueError, match=field):
            type(config)(**{**_constructor_fields(config), field: value})
    assert dataclasses.asdict(config) == before


# ------------------------------------------------------------------------------- combining adapters
def two_adapters() -> PeftModel:
    model = get_peft_model(
        build_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [math.nan, 1.0]}, "finite"),
        ({"weights": [1.0, math.inf]}, "finite"),
        ({"weights": [1.0, -math.inf]}, "finite"),
        ({"weights": [1.0, 1.0], "svd_rank": 0}, "svd_rank"),
        ({"weights": [1.0, 1.0], "svd_rank": -2}, "svd_rank"),
        ({"weights": [1.0, 1.0], "adapter_name": None}, "Invalid adapter name"),
        ({"weights": [1.0, 1.0], "adapters": ["default", None]}, "Unknown adapter"),
    ],
)
def test_add_weighted_adapter_refuses_impossible_numbers_and_changes_nothing(
    kwargs: dict, match: str
) -> None:
    model = two_adapters()
    before = snapshot(model)
    call = {"adapters": ["default", "other"], "adapter_name": "mix", "combination_type": "svd", **kwargs}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**call)
    assert set(model.peft_config) == {"default", "other"}
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------ label spaces
@given(st.integers(min_value=-(10**30), max_value=10**30), st.sampled_from(["{}", "{}.0", " {} ", "{}.000"]))
def test_an_integer_label_has_one_spelling_however_it_is_written(value: int, spelling: str) -> None:
    assert label_key(spelling.format(value)) == str(value)
    assert label_key(value) == str(value)


@given(
    st.text(min_size=1).filter(
        lambda t: t.strip() and not t.strip().lstrip("+-").replace(".", "", 1).isdigit()
    )
)
@settings(max_examples=200)
def test_a_label_that_is_not_an_integer_keeps_its_text(text: str) -> None:
    assert label_key(text) == text.strip()


def classification(**kwargs: object) -> DataSection:
    return DataSection(format="classification", **kwargs)  # type: ignore[arg-type]


def rows(*labels: object) -> list[dict]:
    return [{"text": f"row {i}", "label": label} for i, label in enumerate(labels)]


def test_one_and_one_point_zero_are_one_class() -> None:
    space = label_space(classification(), rows("0", "1", "1.0", 1, 0.0, " 1 "))
    assert space.names == ["0", "1"]


@pytest.mark.parametrize("empty", ["", "  ", None])
def test_an_empty_label_cell_is_an_error_naming_the_row(empty: object) -> None:
    with pytest.raises(RunConfigError, match=r"train row 2: the label \('label'\) is empty"):
        label_space(classification(), rows("0", "1", empty, "1"))


def test_a_huge_integer_label_is_one_class_not_a_head_of_that_many() -> None:
    space = label_space(classification(), rows("0", "1", str(10**12)))
    assert space.num_labels == 3 and space.names == ["0", "1", str(10**12)]


def test_integer_labels_zero_to_k_keep_their_ids_and_others_are_numbered_by_value() -> None:
    assert label_space(classification(), rows("2", "0", "1")).names == ["0", "1", "2"]
    assert label_space(classification(), rows("10", "9", "-1")).names == ["-1", "9", "10"]


def test_a_single_training_label_is_an_error() -> None:
    with pytest.raises(RunConfigError, match="needs two or more"):
        label_space(classification(), rows("1", "1.0"))


def test_the_label_space_comes_from_the_training_data_only(tokenizer: object) -> None:
    section = classification()
    space = label_space(section, rows("neg", "pos"))
    with pytest.raises(RunConfigError, match=r"validation row 1: label 'neutral' is not one of"):
        build_examples(rows("pos", "neutral"), section, tokenizer, space, "SEQ_CLS", "validation")
    listed = classification(labels=["neg", "neutral", "pos"])
    space = label_space(listed, rows("neg", "pos"))
    examples = build_examples(rows("pos", "neutral"), listed, tokenizer, space, "SEQ_CLS", "validation")
    assert [e["labels"] for e in examples] == [2, 1]


def test_explicit_labels_must_be_distinct_after_spelling() -> None:
    with pytest.raises(RunConfigError, match="distinct"):
        label_space(classification(labels=[1, "1.0"]), rows("1"))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "", "high"])
def test_a_regression_label_must_be_a_finite_number(tokenizer: object, bad: str) -> None:
    section = DataSection(format="regression")
    with pytest.raises(RunConfigError, match="train row 1"):
        build_examples(rows("0.5", bad), section, tokenizer, LabelSpace(None), "SEQ_CLS", "train")


def test_the_run_says_which_class_f1_is_about() -> None:
    assert "f1 is of class 'pos' (id 1)" in LabelSpace(["neg", "pos"]).describe()
    assert "macro average over 3 classes" in LabelSpace(["a", "b", "c"]).describe()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from cli_fixtures import build_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


# --------------------------------------------------------------------------- merged adapters' outputs
def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs()).logits


def test_set_adapter_on_a_merged_model_unmerges_first_and_gives_the_new_adapters_output() -> None:
    model = two_adapters()
    model.set_adapter("other")
    want = logits(model)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("other")
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)


def test_disable_adapter_on_a_merged_model_gives_the_base_output() -> None:
    """As HF PEFT, the merged layers are unmerged inside the block (W + ΔW − ΔW: equal to the base weight
    up to one float rounding per entry; keeping a copy of every merged weight for bitwise equality would
    double their memory) and merged again after it."""
    base = build_model("llama")
    want = logits(base)
    model = two_adapters()
    model.merge_adapter()
    merged = logits(model)
    with model.disable_adapter():
        got = logits(model)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
    assert (merged - want).abs().max().item() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(logits(model), merged, rtol=0, atol=1e-6)
    assert all(layer.merged for _, layer in model.base_model.adapter_layers())


def test_safe_merge_sees_nan_in_a_modules_to_save_copy() -> None:
    model = get_peft_model(
        build_model("bert_seq_cls"), LoraConfig(r=4, task_type="SEQ_CLS", init_lora_weights=False)
    )
    head = next(w for _, w in model.base_model.save_wrappers())
    with torch.no_grad():
        next(head.modules_to_save["default"].parameters()).view(-1)[0] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- tensor dtypes in files
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_adapter_tensors_that_are_not_floats_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    model = get_peft_model(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.ones_like(tensors[key], dtype=dtype)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = build_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=str(dtype).replace("torch.", "")):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
