"""IA3 against its formula and against HF PEFT (the reference).

* the layers (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d`` also grouped) compute ``l ⊙ (W x + b)`` /
  ``W (l ⊙ x) + b``; their additive form, merge and unmerge agree with that; vector shapes are HF's;
* the default targets and feed-forward modules are HF's, table and selection (12 architectures);
* checkpoints move both ways between the libraries on tiny llama, T5, BERT and GPT-2 with the same
  logits (randomised vectors, so a no-op adapter cannot pass), identical tensor names and configs
  that HF PEFT reads; merged models equal HF's;
* two active adapters multiply as in HF PEFT; mixed-adapter batches equal per-adapter runs;
* three training steps give HF PEFT's gradients and parameters;
* bad configs and targets are clear errors that leave the model as it was.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB_SIZE, model_inputs, tiny_bert_seq_cls, tiny_gpt2, tiny_llama
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import AdapterLayer, IA3Config, get_peft_model
from peftkit.methods import ia3 as pk_ia3

# HF PEFT sets fan_in_fan_out itself for GPT-2's Conv1D (and warns); peftkit detects it per layer.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
DIRECTIONS = [
    pytest.param("peft", "peftkit", id="peft->peftkit"),
    pytest.param("peftkit", "peft", id="peftkit->peft"),
]


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    config = T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        vocab_size=VOCAB_SIZE,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def with_random_biases(builder: Any) -> Any:
    """Transformers initialise biases to zero, which would hide a wrong bias merge; randomise them."""

    def build(seed: int = 0) -> nn.Module:
        model = builder(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        return model

    return build


BUILDERS = {
    "llama": tiny_llama,
    "t5": tiny_t5,
    "bert": with_random_biases(tiny_bert_seq_cls),
    "gpt2": with_random_biases(tiny_gpt2),
}


def batch(kind: str, labels: bool = False) -> dict[str, torch.Tensor]:
    inputs = model_inputs(batch_size=3, seq_len=8)
    if kind == "t5":
        target = inputs["input_ids"][:, :5].flip(1)
        if labels:
            inputs["labels"] = target
        else:
            inputs["decoder_input_ids"] = target
    elif labels:
        inputs["labels"] = torch.tensor([0, 1, 2]) if kind == "bert" else inputs["input_ids"]
    return inputs


def logits(model: nn.Module, kind: str, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(kind), **kwargs).logits


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Every IA3 vector (and trainable head) to values in [0.5, 1.5): far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad or ".ia3_l." in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def make(lib: str, kind: str, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    model = LIBS[lib].get_peft_model(BUILDERS[kind](0), LIBS[lib].IA3Config(**kwargs))
    randomise(model, seed)
    return model.eval()


# ------------------------------------------------------------------------------------------ layers
def _wrap(base: nn.Module, feedforward: bool, seed: int = 0) -> pk_ia3.IA3Layer:
    if isinstance(base, nn.Conv2d):
        layer: pk_ia3.IA3Layer = pk_ia3.Conv(base)
    else:
        layer = pk_ia3.Linear(base, fan_in_fan_out=isinstance(base, Conv1D))
    torch.manual_seed(seed)
    layer.update_layer("a", feedforward, init_ia3_weights=False)
    layer.set_adapter("a")
    return layer


def _layer_cases() -> list[Any]:
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    conv1d = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs; weight (6, 5)
    nn.init.normal_(conv1d.bias)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x_lin, x_conv = torch.randn(3, 7, 6), torch.randn(2, 4, 5, 5)
    return [
        pytest.param(linear, x_lin, id="linear"),
        pytest.param(conv1d, x_lin, id="conv1d"),
        pytest.param(conv, x_conv, id="conv2d"),
        pytest.param(grouped, x_conv, id="conv2d-grouped"),
    ]


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize(("base", "x"), _layer_cases())
def test_layer_formula_delta_merge(base: nn.Module, x: torch.Tensor, feedforward: bool) -> None:
    layer = _wrap(base, feedforward)
    vector = layer.ia3_l["a"]
    channel = (1, -1) + (1,) * (x.ndim - 2) if isinstance(base, nn.Conv2d) else (-1,)
    with torch.no_grad():
        expected = base(x * vector.view(channel)) if feedforward else base(x) * vector.view(channel)
        got = layer(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        # the additive form of the same adapter
        torch.testing.assert_close(
            base(x) + layer.adapter_delta(x, "a", base(x)), expected, atol=1e-5, rtol=0
        )
        weight, bias = base.weight.clone(), base.bias.clone()
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        if feedforward:  # W (l ⊙ x) + b: the bias stays
            assert torch.equal(base.bias, bias)
        else:
            torch.testing.assert_close(base.bias, bias * vector.flatten())
        layer.unmerge()
        torch.testing.assert_close(base.weight, weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(base.bias, bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize(("base", "x"), _layer_cases())
def test_vector_shapes_and_init_are_hf(base: nn.Module, x: torch.Tensor, feedforward: bool) -> None:
    config = peft.IA3Config(target_modules=["m"], fan_in_fan_out=isinstance(base, Conv1D))
    hf_cls = peft.tuners.ia3.Conv2d if isinstance(base, nn.Conv2d) else peft.tuners.ia3.Linear
    reference = hf_cls(base, "a", config=config, is_feedforward=feedforward)
    layer = _wrap(base, feedforward)
    assert layer.ia3_l["a"].shape == reference.ia3_l["a"].shape
    layer.update_layer("b", feedforward, init_ia3_weights=True)
    assert torch.equal(layer.ia3_l["b"], torch.ones_like(layer.ia3_l["b"]))


def test_several_active_adapters_multiply_and_may_disagree_on_the_side() -> None:
    """peftkit keeps the input/output choice per adapter: ``out_b ⊙ base(l_a ⊙ x)`` on one layer."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = _wrap(base, feedforward=True)
    layer.update_layer("b", False, init_ia3_weights=False)
    layer.update_layer("c", True, init_ia3_weights=False)
    layer.set_adapter(["a", "b", "c"])
    x = torch.randn(4, 6)
    l_a, l_b, l_c = (layer.ia3_l[n].flatten() for n in "abc")
    with torch.no_grad():
        expected = base(x * l_a * l_c) * l_b
        torch.testing.assert_close(layer(x), expected)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_init_and_half_precision_match_hf(dtype: torch.dtype) -> None:
    """``init_ia3_weights=False`` draws HF PEFT's vectors for a seed; over a bfloat16 base the vectors
    are float32 and the outputs (plain and merged) are HF PEFT's bit for bit."""
    models = {}
    for lib in LIBS:
        torch.manual_seed(5)
        models[lib] = LIBS[lib].get_peft_model(
            tiny_llama(0).to(dtype), LIBS[lib].IA3Config(init_ia3_weights=False)
        )
    ours, theirs = (LIBS[lib].get_peft_model_state_dict(models[lib]) for lib in LIBS)
    assert ours.keys() == theirs.keys() and all(v.dtype == torch.float32 for v in ours.values())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits(models["peftkit"], "llama"), logits(models["peft"], "llama"))
    for model in models.values():
        model.merge_adapter()
    assert torch.equal(logits(models["peftkit"], "llama"), logits(models["peft"], "llama"))


# ------------------------------------------------------------------------------- default targeting
def test_default_tables_are_hf() -> None:
    from peft.utils import constants

    assert IA3Config.default_target_modules == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert (
        pk_ia3.IA3_DEFAULT_FEEDFORWARD_MODULES
        == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    )


def _selection(lib: str, model: nn.Module, **kwargs: Any) -> dict[str, bool]:
    """Targeted module name -> scales the input (feed-forward)."""
    pm = LIBS[lib].get_peft_model(model, LIBS[lib].IA3Config(**kwargs))
    found = {}
    for name, module in pm.base_model.model.named_modules():
        if lib == "peftkit" and isinstance(module, AdapterLayer):
            found[name] = module.is_feedforward["default"]
        elif lib == "peft" and isinstance(module, peft.tuners.ia3.IA3Layer):
            found[name] = module.is_feedforward
    return found


ARCHS = [
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gpt2",
    "opt",
    "bloom",
    "falcon",
    "bert",
    "roberta",
    "t5",
    "bart",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_selection_equals_hf(arch: str) -> None:
    from test_targeting import ARCHS as SPECS

    spec = SPECS[arch]
    config = spec.config()
    selections = {}
    for lib in LIBS:
        torch.manual_seed(0)
        selections[lib] = _selection(lib, spec.lm_cls(config))
    assert selections["peftkit"] == selections["peft"]
    assert any(selections["peftkit"].values()) and not all(selections["peftkit"].values())


# ---------------------------------------------------------------------------------------- interop
INTEROP = {
    "llama-default": ("llama", dict(task_type="CAUSAL_LM")),
    "llama-regex": ("llama", dict(target_modules=r".*\.(k_proj|up_proj|down_proj)",
                                  feedforward_modules=r".*\.(up_proj|down_proj)")),
    "llama-all-linear": ("llama", dict(target_modules="all-linear", feedforward_modules=["down_proj"])),
    "t5-default": ("t5", dict(task_type="SEQ_2_SEQ_LM")),
    "t5-list": ("t5", dict(target_modules=["q", "v", "wi", "wo"], feedforward_modules=["wi", "wo"])),
    "bert-seq-cls": ("bert", dict(task_type="SEQ_CLS")),
    "gpt2-conv1d": ("gpt2", dict(task_type="CAUSAL_LM")),
}  # fmt: skip


@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
@pytest.mark.parametrize("case", list(INTEROP))
def test_checkpoint_moves_between_libraries(case: str, src: str, dst: str, tmp_path: Path) -> None:
    kind, kwargs = INTEROP[case]
    made = make(src, kind, kwargs)
    made.save_pretrained(tmp_path)
    loaded = LIBS[dst].PeftModel.from_pretrained(BUILDERS[kind](0), tmp_path)
    expected = logits(made, kind)
    assert (expected - logits(BUILDERS[kind](0), kind)).abs().max() > 1e-3  # not a no-op
    torch.testing.assert_close(logits(loaded, kind), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", list(INTEROP))
def test_tensor_names_and_config_json_match_hf(case: str, tmp_path: Path) -> None:
    kind, kwargs = INTEROP[case]
    counts = {}
    for lib in LIBS:
        model = make(lib, kind, kwargs)
        counts[lib] = model.get_nb_trainable_parameters()
        model.save_pretrained(tmp_path / lib)
    assert counts["peftkit"] == counts["peft"]
    specs = {
        lib: {
            k: (tuple(v.shape), v.dtype)
            for k, v in load_file(tmp_path / lib / "adapter_model.safetensors").items()
        }
        for lib in LIBS
    }
    assert specs["peftkit"] == specs["peft"]
    assert all(k.endswith((".ia3_l", ".weight", ".bias")) for k in specs["peftkit"])
    ours = json.loads((tmp_path / "peftkit" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs), f"keys HF PEFT does not write: {set(ours) - set(theirs)}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword arguments" from HF PEFT
        hf_config = peft.PeftConfig.from_pretrained(tmp_path / "peftkit")
        pk_config = peftkit.PeftConfig.from_pretrained(tmp_path / "peft")
    assert isinstance(hf_config, peft.IA3Config) and isinstance(pk_config, IA3Config)
    for key in ("init_ia3_weights", "task_type", "exclude_modules"):
        assert ours[key] == theirs[key], key
    # HF PEFT rewrites fan_in_fan_out to True for GPT-2's Conv1D; peftkit keeps the config as written
    assert ours["fan_in_fan_out"] == theirs["fan_in_fan_out"] or kind == "gpt2"


@pytest.mark.parametrize("case", ["llama-default", "t5-list", "bert-seq-cls", "gpt2-conv1d"])
def test_merge_equals_unmerged_and_hf_merge(case: str, tmp_path: Path) -> None:
    kind, kwargs = INTEROP[case]
    make("peft", kind, kwargs).save_pretrained(tmp_path)
    merged = {}
    for lib in LIBS:
        pm = LIBS[lib].PeftModel.from_pretrained(BUILDERS[kind](0), tmp_path)
        unmerged = logits(pm, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HF PEFT: "Unmerge result can be inaccurate"
            merged[lib] = pm.merge_and_unload()
        assert not any(
            isinstance(m, (AdapterLayer, peft.tuners.tuners_utils.BaseTunerLayer))
            for m in merged[lib].modules()
        )
        torch.testing.assert_close(logits(merged[lib], kind), unmerged, atol=1e-4, rtol=1e-4)
    ours, theirs = merged["peftkit"].state_dict(), merged["peft"].state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6, msg=key)


def test_unmerge_restores_weights_and_biases() -> None:
    pm = make("peftkit", "bert", dict(task_type="SEQ_CLS"))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    trained = logits(pm, "bert")
    pm.merge_adapter()
    changed = {k for k, v in pm.state_dict().items() if not torch.equal(v, before[k])}
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.base_layer.bias" in changed
    assert "base_model.model.bert.encoder.layer.0.output.dense.base_layer.bias" not in changed  # feed-forward
    pm.unmerge_adapter()
    for key, value in pm.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(logits(pm, "bert"), trained, atol=1e-5, rtol=1e-5)


def test_failed_safe_merge_restores_weights_and_biases_exactly() -> None:
    pm = make("peftkit", "bert", dict(task_type="SEQ_CLS"))
    with torch.no_grad():  # the last targeted layer is broken: earlier layers merge first, then roll back
        pm.base_model.model.bert.encoder.layer[1].output.dense.ia3_l["default"][0, 0] = float("inf")
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        pm.merge_adapter(safe_merge=True)
    for key, value in pm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(layer.merged for _, layer in pm.base_model.adapter_layers())


# ------------------------------------------------------------------------------- several adapters
# The second adapter targets other modules too. A module both adapters target must be on the same side
# for HF PEFT (its layers keep the first adapter's side); t5's "o" also marks "wo" (plain suffix rule).
TWO = {
    "llama": (
        dict(),
        dict(target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"]),
    ),
    "t5": (dict(), dict(target_modules=["k", "o", "wo"], feedforward_modules=["o"])),
}


def _two_adapter_model(lib: str, kind: str, root: Path) -> nn.Module:
    for seed, (name, kwargs) in enumerate(zip(("a", "b"), TWO[kind])):
        if not (root / name).exists():
            make("peft", kind, kwargs, seed=seed).save_pretrained(root / name)
    pm = LIBS[lib].PeftModel.from_pretrained(BUILDERS[kind](0), root / "a", adapter_name="a")
    pm.load_adapter(root / "b", adapter_name="b")
    return pm


@pytest.mark.parametrize("kind", list(TWO))
def test_two_active_adapters_equal_hf(kind: str, tmp_path: Path) -> None:
    models = {lib: _two_adapter_model(lib, kind, tmp_path) for lib in LIBS}
    for pm in models.values():
        pm.base_model.set_adapter(["a", "b"])
    expected = logits(models["peft"], kind)
    torch.testing.assert_close(logits(models["peftkit"], kind), expected, atol=ATOL, rtol=ATOL)
    models["peft"].set_adapter("a")
    assert (logits(models["peft"], kind) - expected).abs().max() > 1e-2  # b matters
    merged = models["peftkit"].merge_and_unload()
    torch.testing.assert_close(logits(merged, kind), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(TWO))
def test_mixed_batch_rows_equal_per_adapter_runs(kind: str, tmp_path: Path) -> None:
    pm = _two_adapter_model("peftkit", kind, tmp_path)
    names = ["b", "__base__", "a"]
    mixed = logits(pm, kind, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                reference = logits(pm, kind)
        else:
            pm.set_adapter(name)
            reference = logits(pm, kind)
        torch.testing.assert_close(mixed[row], reference[row], atol=ATOL, rtol=ATOL, msg=name)


def test_per_adapter_side_checkpoint_loads_in_hf(tmp_path: Path) -> None:
    """Two adapters treating ``down_proj`` differently: each keeps its own vector shape, and the second
    one alone is exactly what HF PEFT builds from its config."""
    pm = get_peft_model(
        tiny_llama(0), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])
    )
    pm.add_adapter("out", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    randomise(pm)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert layer.ia3_l["default"].shape == (1, 64) and layer.ia3_l["out"].shape == (32, 1)
    pm.set_adapter("out")
    pm.save_pretrained(tmp_path, selected_adapters=["out"])
    hf = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    torch.testing.assert_close(logits(hf, "llama"), logits(pm, "llama"), atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["llama-default", "t5-default", "bert-seq-cls", "gpt2-conv1d"])
def test_training_steps_equal_hf(case: str, tmp_path: Path) -> None:
    kind, kwargs = INTEROP[case]
    make("peft", kind, kwargs).save_pretrained(tmp_path)
    models = {
        lib: LIBS[lib].PeftModel.from_pretrained(BUILDERS[kind](0), tmp_path, is_trainable=True)
        for lib in LIBS
    }
    optimizers = {
        lib: torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        for lib, pm in models.items()
    }
    for _ in range(3):
        grads = {}
        for lib, pm in models.items():
            loss = pm(**batch(kind, labels=True)).loss
            loss.backward()
            grads[lib] = {
                n.replace(".default", ""): p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad
            }
            optimizers[lib].step()
            optimizers[lib].zero_grad()
        assert grads["peftkit"].keys() == grads["peft"].keys()
        assert any(".ia3_l" in k for k in grads["peftkit"])
        for key, grad in grads["peftkit"].items():
            torch.testing.assert_close(grad, grads["peft"][key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(
        logits(models["peftkit"], kind), logits(models["peft"], kind), atol=ATOL, rtol=ATOL
    )


# ----------------------------------------------------------------------------------------- errors
def test_feedforward_modules_must_be_targets() -> None:
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["k_proj", "down_proj"])
    with pytest.raises(ValueError):  # the reference agrees
        peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["k_proj", "down_proj"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_modules={"k_proj"}), TypeError, "list or a string"),
        (dict(target_modules=[]), ValueError, "empty list"),
        (dict(init_ia3_weights="ones"), ValueError, "init_ia3_weights"),
    ],
)
def test_bad_config_values(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        IA3Config(**kwargs)


def _assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(target_modules=["kproj"], feedforward_modules=[]),
            r"matched no module.*Closest module names: k_proj",
        ),
        (
            dict(target_modules=["embed_tokens", "k_proj"], feedforward_modules=[]),
            "IA3 cannot wrap model.embed_tok",
        ),
    ],
)
def test_bad_targets_are_clear_errors_and_change_nothing(kwargs: dict[str, Any], match: str) -> None:
    model = tiny_llama(0).train()
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, IA3Config(**kwargs))
    _assert_untouched(model, tiny_llama(0))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_unknown_architecture_needs_explicit_modules() -> None:
    model = _Custom()
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_peft_model(model, IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        get_peft_model(model, IA3Config(target_modules=["up", "down"]))
    _assert_untouched(model, _Custom())
    pm = get_peft_model(model, IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    assert pm.base_model.model.down.ia3_l["default"].shape == (1, 8)
    assert pm.base_model.model.up.ia3_l["default"].shape == (8, 1)
