"""``get_layer_status`` / ``get_model_status`` report what HF PEFT's report for the same model and steps."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from tiny_models import tiny_bert_seq_cls, tiny_llama

import peftkit


def both(build, config_kwargs: dict, steps) -> tuple:
    reports = []
    for lib in (peftkit, peft):
        model = lib.get_peft_model(build(), lib.LoraConfig(**config_kwargs))
        steps(lib, model)
        reports.append((lib.get_layer_status(model), lib.get_model_status(model)))
    return reports


def comparable(record: object) -> dict:
    fields = dataclasses.asdict(record)  # type: ignore[call-overload]
    fields.pop("module_type", None)  # class names are each library's own
    fields.pop("adapter_model_type", None)
    return fields


def add_second_and_merge(lib: object, model: object) -> None:
    model.add_adapter("other", lib.LoraConfig(target_modules=["q_proj"]))  # type: ignore[attr-defined]
    model.merge_adapter()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("build", "config_kwargs", "steps"),
    [
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}, lambda lib, m: None),
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}, add_second_and_merge),
        (
            tiny_llama,
            {"target_modules": ["q_proj"]},
            lambda lib, m: None,
        ),
        (tiny_bert_seq_cls, {"task_type": "SEQ_CLS"}, lambda lib, m: m.eval()),
    ],
    ids=["one", "two-merged-on-some", "q-only", "seq-cls-head"],
)
def test_status_equals_hf_peft(build, config_kwargs: dict, steps) -> None:
    (ours_layers, ours_model), (ref_layers, ref_model) = both(build, config_kwargs, steps)
    assert [comparable(r) for r in ours_layers] == [comparable(r) for r in ref_layers]
    assert comparable(ours_model) == comparable(ref_model)
    assert ours_layers[0].module_type == "lora.Linear"


def test_a_model_without_adapters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="No adapter layers found"):
        peftkit.get_layer_status(tiny_llama())
