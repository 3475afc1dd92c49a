"""``peftkit.core.registry`` and the open ``PeftType``: methods register themselves; the core lists none."""

from __future__ import annotations

import copy
import pickle

import pytest

import peftkit
from peftkit import PeftType
from peftkit.core.registry import get_method, register_method, registered_methods


def test_every_built_in_method_is_registered_with_its_classes() -> None:
    for name in registered_methods():
        spec = get_method(name)
        assert spec.peft_type == name and name in PeftType
    assert get_method("LORA").config_cls is peftkit.LoraConfig


def test_peft_type_members_behave_like_hf_peft_enum_members() -> None:
    lora = PeftType.LORA
    assert lora == "LORA" and str(lora) == "LORA" and lora.value == "LORA" and lora.name == "LORA"
    assert PeftType("LORA") is lora and PeftType.__members__["LORA"] is lora
    assert set(PeftType) >= {PeftType.LORA, PeftType.IA3} and len(PeftType) == len(registered_methods())
    assert pickle.loads(pickle.dumps(lora)) is lora and copy.deepcopy(lora) is lora
    assert peftkit.LoraConfig().peft_type is lora


def test_unknown_peft_types_are_clear_errors() -> None:
    with pytest.raises(AttributeError, match="no loaded method defines it"):
        _ = PeftType.NOT_A_METHOD
    with pytest.raises(ValueError, match="is not a PeftType"):
        PeftType("NOT_A_METHOD")
    with pytest.raises(ValueError, match="upper-case identifiers"):
        PeftType.define("lower case")


def test_registering_a_name_for_another_config_class_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("LORA", peftkit.IA3Config, get_method("IA3").tuner_cls)
    assert get_method("LORA").config_cls is peftkit.LoraConfig


def test_tuners_carry_hf_peft_parameter_prefixes() -> None:
    import peft

    for ours, theirs in (("LORA", peft.LoraModel), ("IA3", peft.IA3Model), ("ADALORA", peft.AdaLoraModel)):
        assert get_method(ours).tuner_cls.prefix == theirs.prefix
