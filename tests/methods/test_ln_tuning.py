"""LN Tuning against HF PEFT: the same trainable norms, files both ways with equal logits, equal gradients,
merging by swapping the trained copy in, one adapter at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_state import assert_mixed_batch_equals_each_adapter
from tiny_models import tiny_bert_seq_cls, tiny_llama

import peftkit

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
SETTINGS = {
    "llama-defaults": (tiny_llama, {}),
    "bert-layernorm": (tiny_bert_seq_cls, {"target_modules": ["LayerNorm"], "task_type": "SEQ_CLS"}),
}


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_files_logits_and_gradients_equal_hf_peft(setting: str, tmp_path: Path) -> None:
    build, kwargs = SETTINGS[setting]
    models = {
        lib.__name__: lib.get_peft_model(build(0), lib.LNTuningConfig(**kwargs)) for lib in (peft, peftkit)
    }
    trainable = {
        name: sorted(n for n, p in m.named_parameters() if p.requires_grad) for name, m in models.items()
    }
    assert trainable["peft"] == trainable["peftkit"] and trainable["peft"]
    for name, model in models.items():
        _perturb(model)
        model.eval()  # gradients without dropout, whose draws differ between the libraries
        model(
            input_ids=IDS, labels=IDS if setting.startswith("llama") else torch.tensor([0, 2])
        ).loss.backward()
        model.save_pretrained(tmp_path / name)
    for key in trainable["peft"]:
        param = dict(models["peftkit"].named_parameters())[key]
        torch.testing.assert_close(
            param.grad, dict(models["peft"].named_parameters())[key].grad, atol=1e-6, rtol=1e-5
        )
    for writer, model in models.items():
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=IDS).logits
        for reader in (peft, peftkit):
            loaded = reader.PeftModel.from_pretrained(build(0), tmp_path / writer)
            with torch.no_grad():
                torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-6, rtol=1e-6)


def test_one_adapter_acts_and_merges_at_a_time() -> None:
    model = peftkit.get_peft_model(tiny_llama(0), peftkit.LNTuningConfig())
    model.add_adapter("other", peftkit.LNTuningConfig())
    _perturb(model)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        model(input_ids=IDS)
    model.set_adapter("other")
    norm = model.base_model.model.model.norm
    trained = norm.ln_tuning_layers["other"].weight.detach().clone()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    merged = model.merge_and_unload()
    assert isinstance(merged.model.norm, torch.nn.Module) and torch.equal(merged.model.norm.weight, trained)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected)


def test_mixed_batch_routes_each_row_to_its_adapter_s_norms() -> None:
    model = peftkit.get_peft_model(tiny_llama(0), peftkit.LNTuningConfig())
    model.add_adapter("other", peftkit.LNTuningConfig())
    _perturb(model)
    assert_mixed_batch_equals_each_adapter(model, torch.cat([IDS, IDS[:1]]), ["default", "other", "__base__"])
