"""AdapterFusion: initialisation (identity value matrix), the formula against a hand computation, which
parameters train, the inspectable weights, save/load with the fused adapters, and the errors. (The generic
conformance suite cannot wrap a bare model with a fusion, so its promises are checked here.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_bert_seq_cls, tiny_llama

from peftkit import AdapterFusionConfig, BottleneckConfig, LoraConfig, Parallel, PeftModel, get_peft_model
from peftkit.methods.bottleneck import BottleneckLayer


def ids(batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 100, (batch, length), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model: torch.nn.Module, **extra: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids(), **extra).logits


def two_adapter_model(build=tiny_llama, style: str = "pfeiffer", seed: int = 11) -> PeftModel:
    """A model with two different (randomised, i.e. 'trained') bottleneck adapters sst2 and cola."""
    task = "SEQ_CLS" if build is tiny_bert_seq_cls else None  # each adapter with its own classifier head
    model = get_peft_model(
        build(0), BottleneckConfig(style=style, reduction_factor=4, task_type=task), adapter_name="sst2"
    )
    model.add_adapter(
        "cola", BottleneckConfig(style=style, reduction_factor=4, non_linearity="gelu", task_type=task)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():
            for container in (layer.adapter_down, layer.adapter_up):
                for module in container.values():
                    for p in module.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def fusion_params(model: PeftModel, name: str = "fusion") -> dict[str, torch.nn.Parameter]:
    return model.base_model.adapter_parameter_map(name)


def test_fusion_layers_sit_where_the_adapters_are_and_value_starts_at_identity() -> None:
    model = two_adapter_model(style="houlsby")
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))
    paths = {p for p, m in model.base_model.adapter_layers() if "fusion" in m.adapter_fusion}
    assert paths == {p for p, _ in model.base_model.adapter_layers()} and len(paths) == 4
    for path in paths:
        fusion = model.base_model.model.get_submodule(path).adapter_fusion["fusion"]
        assert torch.equal(fusion.value.weight, torch.eye(32)) and not fusion.value.bias.any()
        assert 0.01 < fusion.query.weight.std() < 0.03 and not fusion.key.bias.any()


def test_with_equal_adapters_the_fusion_output_equals_the_adapter_output() -> None:
    model = two_adapter_model()
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():
            layer.adapter_down["cola"].load_state_dict(layer.adapter_down["sst2"].state_dict())
            layer.adapter_up["cola"].load_state_dict(layer.adapter_up["sst2"].state_dict())
            layer.non_linearity["cola"] = layer.non_linearity["sst2"]
    model.set_adapter("sst2")
    single = logits(model)
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))
    model.set_adapter("fusion")
    fused = logits(model)
    # whatever the attention weights, Σ α_i I z = z when every z_i is the same
    torch.testing.assert_close(fused, single, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(tiny_llama(0)))


def test_fusion_formula_and_inspectable_weights() -> None:
    model = two_adapter_model()
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"], temperature=0.5))
    model.set_adapter("fusion")
    with torch.no_grad():  # a value matrix away from the identity, so that every part of the formula counts
        for _, layer in model.base_model.adapter_layers():
            layer.adapter_fusion["fusion"].value.weight.add_(torch.randn(32, 32) * 0.1)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    seen = {}
    handles = [
        layer.base_layer.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o)),
        layer.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o)),
    ]
    logits(model)
    for handle in handles:
        handle.remove()
    h = seen["h"]

    def adapter(name: str, act) -> torch.Tensor:
        down, up = layer.adapter_down[name], layer.adapter_up[name]
        return h + F.linear(act(F.linear(h, down.weight, down.bias)), up.weight, up.bias)

    z = torch.stack([adapter("sst2", F.relu), adapter("cola", F.gelu)], dim=-2)  # (B, T, 2, d)
    f = layer.adapter_fusion["fusion"]
    q = F.linear(h, f.query.weight, f.query.bias)
    k = F.linear(z, f.key.weight, f.key.bias)
    v = F.linear(z, f.value.weight, f.value.bias)
    alpha = torch.softmax(torch.einsum("btd,btnd->btn", q, k) / 0.5, dim=-1)
    torch.testing.assert_close(seen["y"], torch.einsum("btn,btnd->btd", alpha, v), atol=1e-5, rtol=1e-5)
    weights = model.fusion_weights("fusion")
    assert set(weights) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    torch.testing.assert_close(weights["model.layers.1.mlp.down_proj"], alpha)
    assert weights["model.layers.0.mlp.down_proj"].shape == (2, 6, 2)


def test_only_fusion_parameters_and_the_head_train() -> None:
    model = two_adapter_model(build=tiny_bert_seq_cls, style="houlsby")
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"], task_type="SEQ_CLS"))
    model.set_adapter("fusion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    declared = {id(p) for p in fusion_params(model).values()}
    assert trainable == {n for n, p in model.named_parameters() if id(p) in declared}
    assert any(".adapter_fusion.fusion.query." in n for n in trainable)
    assert any("classifier.modules_to_save.fusion" in n for n in trainable)
    assert not any(".sst2" in n or ".cola" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = (model(**ids()).logits ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_mixed_batch_rows_can_use_the_fusion() -> None:
    model = two_adapter_model()
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))
    mixed = logits(model, adapter_names=["fusion", "cola"])
    model.set_adapter("fusion")
    first = logits(model)[0]
    model.set_adapter("cola")
    second = logits(model)[1]
    torch.testing.assert_close(mixed[0], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], second, atol=1e-5, rtol=1e-5)


def saved_fusion_model(tmp_path: Path, fusion_name: str = "fusion") -> tuple[PeftModel, torch.Tensor]:
    """A bert model with adapters sst2, cola and a trained-looking fusion, saved to ``tmp_path``; and its
    logits with the fusion active."""
    model = two_adapter_model(build=tiny_bert_seq_cls, style="parallel")
    model.add_adapter(fusion_name, AdapterFusionConfig(adapters=["sst2", "cola"], task_type="SEQ_CLS"))
    model.set_adapter(fusion_name)
    with torch.no_grad():
        for p in fusion_params(model, fusion_name).values():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model, logits(model)


def test_one_call_loads_the_fusion_with_the_adapters_saved_beside_it(tmp_path: Path) -> None:
    model, expected = saved_fusion_model(tmp_path)
    saved = json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTER_FUSION" and saved["adapters"] == ["sst2", "cola"]
    assert set(saved["adapter_fingerprints"]) == {"sst2", "cola"}

    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path / "fusion", adapter_name="fusion")
    assert list(loaded.peft_config) == ["sst2", "cola", "fusion"] and loaded.active_adapters == ["fusion"]
    assert torch.equal(logits(loaded), expected)
    for name in ("sst2", "cola"):  # the fused adapters came back bit for bit, heads included
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded), logits(model))
    assert not any(p.requires_grad for p in loaded.parameters())

    # load_adapter on a model that has one of the adapters loads the other one too
    partial = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path / "sst2", adapter_name="sst2")
    partial.load_adapter(tmp_path / "fusion", "fusion")
    assert list(partial.peft_config) == ["sst2", "cola", "fusion"]
    partial.set_adapter("fusion")
    assert torch.equal(logits(partial), expected)

    # to train further: only the fusion (and its head) train, its adapters stay frozen
    trainable = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path / "fusion", is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert trainable.active_adapters == ["default"]  # from_pretrained's default name, as for any adapter
    assert names and all(".default." in n for n in names)


def test_a_fusion_saved_as_default_finds_its_adapters_in_subfolders(tmp_path: Path) -> None:
    _, expected = saved_fusion_model(tmp_path, fusion_name="default")
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "sst2" / "adapter_config.json"
    ).is_file()
    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(0), tmp_path)
    assert loaded.active_adapters == ["default"] and torch.equal(logits(loaded), expected)


def test_loading_a_fusion_without_its_adapters_is_a_clear_error(tmp_path: Path) -> None:
    model, expected = saved_fusion_model(tmp_path / "all")
    model.save_pretrained(tmp_path / "alone", selected_adapters=["fusion"])
    base = tiny_bert_seq_cls(0)
    with pytest.raises(ValueError, match=r"lacks \['sst2', 'cola'\].*load_adapter"):
        PeftModel.from_pretrained(base, tmp_path / "alone" / "fusion", adapter_name="fusion")
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    loaded = PeftModel.from_pretrained(base, tmp_path / "all" / "sst2", adapter_name="sst2")
    with pytest.raises(ValueError, match=r"lacks \['cola'\]"):
        loaded.load_adapter(tmp_path / "alone" / "fusion", "fusion")
    assert list(loaded.peft_config) == ["sst2"]
    # the adapters loaded by hand, then the fusion: the same model
    loaded.load_adapter(tmp_path / "all" / "cola", "cola")
    loaded.load_adapter(tmp_path / "alone" / "fusion", "fusion")
    loaded.set_adapter("fusion")
    assert torch.equal(logits(loaded), expected)


def test_a_changed_adapter_beside_the_fusion_is_refused(tmp_path: Path) -> None:
    model, _ = saved_fusion_model(tmp_path)
    with torch.no_grad():  # sst2 trained further and saved again, alone: the fusion was made for the old one
        model.base_model.model.bert.encoder.layer[1].output.dense.adapter_up["sst2"].weight.add_(0.1)
    model.save_pretrained(tmp_path, selected_adapters=["sst2"])
    base = tiny_bert_seq_cls(0)
    with pytest.raises(ValueError, match=r"adapter 'sst2' other than the one"):
        PeftModel.from_pretrained(base, tmp_path / "fusion")
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    partial = PeftModel.from_pretrained(base, tmp_path / "cola", adapter_name="cola")
    with pytest.raises(ValueError, match="other than the one"):
        partial.load_adapter(tmp_path / "fusion", "fusion")
    assert list(partial.peft_config) == ["cola"]


def test_fusion_errors() -> None:
    for adapters in ([], ["a"], ["a", "a"]):
        with pytest.raises(ValueError, match="at least two"):
            AdapterFusionConfig(adapters=adapters)
    with pytest.raises(ValueError, match="temperature"):
        AdapterFusionConfig(adapters=["a", "b"], temperature=0)
    model = two_adapter_model()
    with pytest.raises(ValueError, match="lacks"):
        model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "mnli"]))
    assert list(model.peft_config) == ["sst2", "cola"]
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))
    with pytest.raises(ValueError, match="fused by"):
        model.delete_adapter("cola")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    model.delete_adapter("fusion")
    assert not any(len(m.adapter_fusion) for _, m in model.base_model.adapter_layers())
    model.delete_adapter("cola")
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=2))
    with pytest.raises(ValueError, match="cannot be added"):
        lora.add_adapter("fusion", AdapterFusionConfig(adapters=["default", "x"]))


def test_a_fusion_inside_parallel_equals_separate_passes() -> None:
    model = two_adapter_model()
    model.add_adapter("fusion", AdapterFusionConfig(adapters=["sst2", "cola"]))
    separate = []
    for name in ("fusion", "sst2"):
        model.set_adapter(name)
        separate.append(logits(model))
    model.set_adapter(Parallel("fusion", "sst2"))
    torch.testing.assert_close(logits(model), torch.cat(separate), atol=1e-5, rtol=1e-5)
