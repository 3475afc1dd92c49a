"""``peftkit.core.config``: HF PEFT's ways of building a config."""

from __future__ import annotations

import peft
import pytest

from peftkit import IA3Config, LoraConfig, PeftConfig, PeftType, PromptTuningConfig


def test_peft_type_is_accepted_by_the_constructor_and_set_by_the_class_as_in_hf_peft() -> None:
    assert LoraConfig(peft_type=PeftType.LORA, r=4).peft_type is PeftType.LORA
    assert peft.LoraConfig(peft_type=peft.PeftType.LORA, r=4).peft_type == "LORA"  # the reference agrees
    assert LoraConfig(peft_type="IA3").peft_type is PeftType.LORA  # replaced, as HF PEFT does


@pytest.mark.parametrize(
    ("kwargs", "cls", "checks"),
    [
        ({"peft_type": "LORA", "r": 16, "target_modules": ["q"]}, LoraConfig, {"r": 16}),
        ({"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": []}, IA3Config, {}),
        (
            {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM"},
            PromptTuningConfig,
            {"num_virtual_tokens": 3},
        ),
    ],
)
def test_from_peft_type_builds_the_registered_class(kwargs: dict, cls: type, checks: dict) -> None:
    config = PeftConfig.from_peft_type(**kwargs)
    reference = peft.PeftConfig.from_peft_type(**kwargs)
    assert type(config) is cls and type(reference).__name__ == cls.__name__
    for key, value in checks.items():
        assert getattr(config, key) == value == getattr(reference, key)


def test_from_peft_type_on_a_subclass_without_a_type_builds_that_class() -> None:
    assert LoraConfig.from_peft_type(r=2).r == 2


def test_from_peft_type_drops_unknown_keys_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="some_future_option"):
        config = PeftConfig.from_peft_type(peft_type="LORA", some_future_option=3)
    assert isinstance(config, LoraConfig)
