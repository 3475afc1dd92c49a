"""AdaLoRA: the config, the SVD-form update, the budget schedule, the importance scores against HF PEFT's
``update_and_allocate`` step for step, the orthogonal regulariser, pruned checkpoints in both directions,
and ``peftkit train`` driving the allocation through the generic ``on_step_end`` hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import build_tokenizer, instruction_config, write_config
from safetensors.torch import load_file
from tiny_models import build_model, model_inputs

import peftkit
from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.methods.adalora import AdaLoraLayer

INPUTS = model_inputs()
LABELS = INPUTS["input_ids"]
TARGETS = ["q_proj", "v_proj"]
N_LAYERS = 4  # q_proj and v_proj of the tiny llama's two blocks


def schedule(**changes) -> dict:
    kwargs = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, target_modules=TARGETS)
    kwargs.update(changes)
    return kwargs


def expected_budget(step: int, init: int, target: int, tinit: int, tfinal: int, total: int) -> int:
    """The paper's cubic schedule (eq. 12), written out independently of the implementation."""
    if step <= tinit:
        return init
    if step >= total - tfinal:
        return target
    progress = (step - tinit) / (total - tfinal - tinit)
    return int((init - target) * (1 - progress) ** 3 + target)


def kept_ranks(model) -> int:
    """Triplets whose singular value is not masked (Λ_i ≠ 0)."""
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLayer)]
    return sum(int((layer.lora_E["default"] != 0).sum()) for layer in layers)


def train_step(model, optimizer, step: int) -> float:
    model.train()
    loss = model(**INPUTS, labels=LABELS).loss
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
    return loss.item()


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_step": None}, "total_step"),
        ({"total_step": 0}, "total_step"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, "no steps to cut"),
        ({"use_dora": True}, "DoRA"),
        ({"beta1": 1.0}, "beta1"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
        ({"target_r": 0}, "target_r"),
    ],
)
def test_config_rejects_inconsistent_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**schedule(**kwargs))


def test_layer_computes_the_svd_form_update():
    model = get_peft_model(build_model("llama"), AdaLoraConfig(**schedule(init_lora_weights=False)))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert A.shape == (6, 32) and E.shape == (6, 1) and B.shape == (32, 6)
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + (x @ (B @ torch.diag(E.view(-1)) @ A).T) * 8 / (6 + 1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_orthogonal_regulariser_is_added_to_the_loss_when_labels_are_given():
    config = AdaLoraConfig(**schedule(orth_reg_weight=0.3))
    model = get_peft_model(build_model("llama"), config)
    with torch.no_grad():
        plain = model.base_model.model(**INPUTS, labels=LABELS).loss
        with_reg = model(**INPUTS, labels=LABELS).loss
    terms = []
    for layer in (m for m in model.modules() if isinstance(m, AdaLoraLayer)):
        Q, P = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        terms.append(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(6)))
        terms.append(torch.linalg.matrix_norm(P.T @ P - torch.eye(6)))
    torch.testing.assert_close(with_reg, plain + 0.3 * torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no labels: no loss, nothing added
        assert model(**INPUTS).loss is None


# ---------------------------------------------------------------------------------------------- schedule
def test_budget_follows_the_cubic_schedule_and_ends_at_target_r_per_layer():
    config = AdaLoraConfig(**schedule())
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama"), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    init, target = 6 * N_LAYERS, 2 * N_LAYERS
    seen = {}
    for step in range(config.total_step):
        train_step(model, optimizer, step)
        seen[step] = kept_ranks(model)
        budget = expected_budget(step, init, target, config.tinit, config.tfinal, config.total_step)
        assert seen[step] == budget, f"step {step}: {seen[step]} ranks kept, the schedule says {budget}"
    assert seen[config.tinit] == init  # nothing is cut up to tinit
    between = [s for s in range(config.tinit + 1, config.total_step - config.tfinal)]
    assert all(target < seen[s] < init for s in between[:2])  # cut gradually ...
    assert [seen[s] for s in between] == sorted((seen[s] for s in between), reverse=True)
    final = config.total_step - config.tfinal
    assert all(seen[s] == target for s in range(final, config.total_step))  # ... and fixed after tfinal
    pattern = model.base_model.rank_pattern()
    assert set(pattern) == {f"model.layers.{i}.self_attn.{m}.lora_E" for i in (0, 1) for m in TARGETS}
    assert sum(sum(kept) for kept in pattern.values()) == target
    assert model.peft_config["default"].rank_pattern is None  # the config is not changed behind one's back


def test_update_and_allocate_equals_hf_peft_step_for_step(tmp_path):
    """Same start, same batches: the losses, every Λ and the rank pattern match HF PEFT bit for bit."""
    peft = pytest.importorskip("peft")
    kwargs = schedule(task_type="CAUSAL_LM", total_step=10, tinit=1, tfinal=2, deltaT=2)
    reference = peft.get_peft_model(build_model("llama"), peft.AdaLoraConfig(**kwargs))
    reference.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(build_model("llama"), tmp_path, is_trainable=True)
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, ours)
    ]
    for step in range(kwargs["total_step"]):
        losses = [train_step(m, o, step) for m, o in zip((reference, ours), optimizers)]
        assert losses[0] == losses[1], f"step {step}"
        for (name, p), (name_ours, q) in zip(
            ((n, p) for n, p in reference.named_parameters() if "lora_" in n),
            ((n, p) for n, p in ours.named_parameters() if "lora_" in n),
        ):
            assert name == name_ours and torch.equal(p, q), f"step {step}: {name}"
    hf_pattern = {
        k.removesuffix(".default"): v for k, v in reference.peft_config["default"].rank_pattern.items()
    }
    assert ours.base_model.rank_pattern() == hf_pattern


# ----------------------------------------------------------------------------------------- checkpoints
def _trained(lib, tmp_path: Path):
    """An AdaLoRA adapter trained through the whole schedule by ``lib`` and saved to ``tmp_path``."""
    torch.manual_seed(0)
    model = lib.get_peft_model(build_model("llama"), lib.AdaLoraConfig(**schedule(task_type="CAUSAL_LM")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        train_step(model, optimizer, step)
    model.eval().save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
def test_pruned_checkpoint_interop_with_hf_peft(tmp_path, src, dst):
    peft = pytest.importorskip("peft")
    libs = {"peft": peft, "peftkit": peftkit}
    made = _trained(libs[src], tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and sum(sum(k) for k in saved["rank_pattern"].values()) == 8
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, kept in saved["rank_pattern"].items():
        prefix = "base_model.model." + key.removesuffix(".lora_E")
        rank = sum(kept)
        assert tensors[f"{prefix}.lora_A"].shape[0] == rank and tensors[f"{prefix}.lora_B"].shape[1] == rank
        assert tensors[f"{prefix}.lora_E"].shape == (rank, 1)
    loaded = libs[dst].PeftModel.from_pretrained(build_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        expected, got = made(**INPUTS).logits, loaded(**INPUTS).logits
        base = build_model("llama")(**INPUTS).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("src", "dst"), [("peft", "peftkit"), ("peftkit", "peft")])
def test_unallocated_checkpoint_interop_with_hf_peft(tmp_path, src, dst):
    peft = pytest.importorskip("peft")
    libs = {"peft": peft, "peftkit": peftkit}
    made = libs[src].get_peft_model(
        build_model("llama"), libs[src].AdaLoraConfig(**schedule(init_lora_weights=False))
    )
    made.eval().save_pretrained(str(tmp_path))
    loaded = libs[dst].PeftModel.from_pretrained(build_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**INPUTS).logits, made(**INPUTS).logits, atol=1e-5, rtol=0)
    trainable = {name: lib.get_peft_model(build_model("llama"), lib.AdaLoraConfig(**schedule()))
                 for name, lib in libs.items()}  # fmt: skip
    counts = {name: m.get_nb_trainable_parameters()[0] for name, m in trainable.items()}
    assert counts["peft"] == counts["peftkit"]


def test_merge_and_unload_after_allocation(tmp_path):
    model = _trained(peftkit, tmp_path)
    with torch.no_grad():
        unmerged = model(**INPUTS).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**INPUTS).logits, unmerged, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------- command line
def test_peftkit_train_runs_the_allocation_through_on_step_end(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    config = instruction_config(tmp_path, tokenizer)
    # 4 training rows, batch 2, 2 epochs: 4 optimizer steps
    config["method"] = {
        "name": "adalora",
        "init_r": 4,
        "target_r": 2,
        "tinit": 0,
        "tfinal": 1,
        "total_step": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["train", path]) == 0
    run = Path(config["output_dir"])
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA"
    assert sum(sum(kept) for kept in saved["rank_pattern"].values()) == 2 * N_LAYERS
    tensors = load_file(run / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_E")) == 2 * N_LAYERS


# ------------------------------------------------------------------------------------------- Conv2d
class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 4, 3, stride=2, bias=False)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(pixels))).mean((2, 3)))


PIXELS = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(7))


def test_conv2d_adapter_is_the_reshaped_svd_form_applied_as_a_convolution():
    model = get_peft_model(
        _ConvNet(), AdaLoraConfig(**schedule(target_modules=["conv1", "conv2"], init_lora_weights=False))
    )
    layer = model.base_model.model.conv2
    A, B, E = (getattr(layer, k)["default"] for k in ("lora_A", "lora_B", "lora_E"))
    assert A.shape == (6, 6 * 3 * 3) and B.shape == (4, 6) and E.shape == (6, 1)
    kernel = (B @ (A * E)).reshape(4, 6, 3, 3) * layer.scaling["default"] / (6 + 1e-5)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + torch.nn.functional.conv2d(x, kernel, stride=2)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_update_and_allocate_equals_hf_peft_step_for_step(tmp_path):
    peft = pytest.importorskip("peft")
    kwargs = schedule(target_modules=["conv1", "conv2"], total_step=8, tinit=1, tfinal=2, deltaT=2)
    reference = peft.get_peft_model(_ConvNet(), peft.AdaLoraConfig(**kwargs))
    reference.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_ConvNet(), tmp_path, is_trainable=True)
    models = (reference, ours)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(kwargs["total_step"]):
        losses = []
        for model, optimizer in zip(models, optimizers):
            model.train()
            loss = model(PIXELS).square().mean()
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7), f"step {step}"
    for (name, p), (name_ours, q) in zip(
        ((n, p) for n, p in reference.named_parameters() if "lora_" in n),
        ((n, p) for n, p in ours.named_parameters() if "lora_" in n),
    ):
        assert name == name_ours
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    hf_pattern = {
        k.removesuffix(".default"): v for k, v in reference.peft_config["default"].rank_pattern.items()
    }
    assert ours.base_model.rank_pattern() == hf_pattern
    ours.eval().save_pretrained(str(tmp_path / "ours"))
    reloaded = peft.PeftModel.from_pretrained(_ConvNet(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PIXELS), ours(PIXELS), atol=1e-5, rtol=0)
        unmerged = ours(PIXELS)
        torch.testing.assert_close(ours.merge_and_unload()(PIXELS), unmerged, atol=1e-5, rtol=1e-5)


def test_grouped_conv2d_is_refused_and_the_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"grouped convolutions \(groups=2\)"):
        get_peft_model(model, AdaLoraConfig(**schedule(target_modules=["0"])))
    assert type(model[0]) is torch.nn.Conv2d


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_option_trains_and_saves_what_hf_peft_does(bias):
    """LoRA's ``bias`` option applies to AdaLoRA as in HF PEFT (the same trainable biases and saved keys);
    a second adapter with a bias is refused, since biases are shared."""
    peft = pytest.importorskip("peft")
    kwargs = schedule(target_modules=["c_attn"], bias=bias)
    ours = get_peft_model(build_model("gpt2"), AdaLoraConfig(**kwargs))
    theirs = peft.get_peft_model(build_model("gpt2"), peft.AdaLoraConfig(**kwargs))
    trainable = [sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1] and any(n.endswith("bias") for n in trainable[0])
    saved = [sorted(lib.get_peft_model_state_dict(m)) for lib, m in ((peftkit, ours), (peft, theirs))]
    assert saved[0] == saved[1]
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        ours.add_adapter("other", AdaLoraConfig(**kwargs))
    assert list(ours.peft_config) == ["default"]
