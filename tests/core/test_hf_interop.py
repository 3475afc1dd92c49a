"""Checkpoint interop between peftkit and Hugging Face PEFT (the reference).

Every case in ``CASES`` is run through the same generic checks:

* ``test_roundtrip_logits``: an adapter made (and randomised, so it is not a no-op) in one library is saved,
  loaded by the other library onto an identical fresh base model, and gives the same logits, in both
  directions and for every adapter in the checkpoint.
* ``test_safetensors_keys_identical``: both libraries write the same tensor names, shapes and dtypes.
* ``test_adapter_config_json``: peftkit's ``adapter_config.json`` loads with ``peft.PeftConfig`` /
  ``peft.LoraConfig.from_pretrained``, has no keys peft does not know, and says the same thing as peft's.
* ``test_nb_trainable_parameters``: ``get_nb_trainable_parameters()`` agrees.
* ``test_merge_and_unload``: merging the same checkpoint in either library gives the same plain model.

Set ``PEFTKIT_INTEROP_REFERENCE_ONLY=1`` to run peft on both sides (validates the test logic itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_model, model_inputs

if os.environ.get("PEFTKIT_INTEROP_REFERENCE_ONLY"):
    peftkit = peft
else:
    import peftkit

LIBS: dict[str, ModuleType] = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5  # same weights, same maths: only float re-association may differ
MERGE_ATOL = 1e-4  # merged vs. unmerged forward of the same adapter (different op order)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a key of tiny_models.BUILDERS
    lora: dict[str, Any]  # LoraConfig kwargs of the "default" adapter; task_type given by name
    extra_adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> LoraConfig kwargs

    def adapters(self) -> dict[str, dict[str, Any]]:
        return {"default": self.lora, **self.extra_adapters}


# init_lora_weights=False makes B non-zero; every trainable parameter is perturbed on top of that.
QV = ["q_proj", "v_proj"]
CASES = [
    Case(
        "lora-llama",
        "llama",
        dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV, init_lora_weights=False,
             task_type="CAUSAL_LM"),
    ),
    Case(
        "rslora-llama",
        "llama",
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True,
             init_lora_weights=False),
    ),
    Case(
        "dora-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
             init_lora_weights=False),
    ),
    Case(
        "dora-gpt2-conv1d",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True,
             init_lora_weights=False, task_type="CAUSAL_LM"),
    ),
    Case(
        "rank-alpha-pattern-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
             rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 8}, alpha_pattern={"v_proj": 32}),
    ),
    Case(
        "bias-all-gpt2",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all",
             init_lora_weights=False),
    ),
    Case(
        "all-linear-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    ),
    Case(
        "all-linear-gpt2",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    ),
    Case(
        "embedding-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    ),
    Case(
        "layers-to-transform-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV, layers_to_transform=[1], init_lora_weights=False),
    ),
    Case(
        "modules-to-save-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"], init_lora_weights=False),
    ),
    Case(
        "seq-cls-bert",
        "bert_seq_cls",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
             init_lora_weights=False),
    ),
    Case(
        "two-adapters-llama",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False),
        extra_adapters={
            "other": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"],
                          use_rslora=True, init_lora_weights=False),
        },
    ),
]  # fmt: skip
CASE_IDS = [c.id for c in CASES]
DIRECTIONS = [
    pytest.param("peft", "peftkit", id="peft->peftkit"),
    pytest.param("peftkit", "peft", id="peftkit->peft"),
]
LIB_NAMES = list(LIBS)


# ----------------------------------------------------------------------------------------------- helpers


def lora_config(lib: ModuleType, kwargs: dict[str, Any]):
    kwargs = dict(kwargs)
    if "task_type" in kwargs:
        kwargs["task_type"] = getattr(lib.TaskType, kwargs["task_type"])
    return lib.LoraConfig(**kwargs)


def make_peft_model(lib: ModuleType, case: Case):
    """Fresh base model (seed 0) wrapped by ``lib`` with all of the case's adapters; "default" active."""
    pm = lib.get_peft_model(build_model(case.model), lora_config(lib, case.lora))
    for name, kwargs in case.extra_adapters.items():
        pm.add_adapter(name, lora_config(lib, kwargs))
    return pm


@torch.no_grad()
def perturb(pm, case: Case, seed: int = 0) -> None:
    """Add seeded noise to every trainable parameter of every adapter (LoRA A/B, DoRA magnitude, biases
    under bias="all", modules_to_save copies)."""
    gen = torch.Generator().manual_seed(seed)
    for name in case.adapters():
        pm.set_adapter(name)  # makes exactly this adapter's parameters trainable
        for _, param in pm.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)
    pm.set_adapter("default")


def trained_adapter(lib: ModuleType, case: Case, seed: int = 0):
    pm = make_peft_model(lib, case)
    perturb(pm, case, seed)
    return pm.eval()


def adapter_dir(root: Path, adapter_name: str) -> Path:
    return root if adapter_name == "default" else root / adapter_name


def load(lib: ModuleType, case: Case, path: Path):
    """Load every adapter of ``case`` saved under ``path`` onto a fresh base, with ``lib``."""
    pm = lib.PeftModel.from_pretrained(build_model(case.model), str(path))
    for name in case.extra_adapters:
        pm.load_adapter(str(adapter_dir(path, name)), adapter_name=name)
    return pm.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**model_inputs()).logits


@torch.no_grad()
def logits_per_adapter(pm, case: Case) -> dict[str, torch.Tensor]:
    out = {}
    for name in case.adapters():
        pm.set_adapter(name)
        out[name] = logits(pm)
    pm.set_adapter("default")
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max abs logit difference {diff:.3g} > {atol}"


def tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(path / WEIGHTS).items()}


def describe_key_diff(got: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    return (
        f"missing (peft writes, peftkit does not): {missing}\n"
        f"extra (peftkit writes, peft does not): {extra}\n"
        f"shape/dtype mismatch: {[(k, got[k], expected[k]) for k in wrong]}"
    )


def _as_set(value):
    return set(value) if isinstance(value, (list, tuple, set)) else value


# The semantically relevant LoraConfig fields; list-valued ones compared as sets.
CONFIG_FIELDS = [
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out",
    "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save",
    "layers_to_transform", "layers_pattern",
]  # fmt: skip


# peft adds these heads to modules_to_save whenever it wraps a model for the task, saved or not.
TASK_HEADS = {"SEQ_CLS": {"classifier", "score"}}


def config_summary(cfg, case_kwargs: dict[str, Any], expanded_targets: Any) -> dict[str, Any]:
    """The CONFIG_FIELDS of a loaded config, normalised so that spellings peft treats alike compare equal:
    a literal "all-linear" (peft expands it again on load; the roundtrip test proves the same modules are
    chosen), a task head missing from modules_to_save (peft adds it again on load), and fan_in_fan_out
    when the case does not set it (peft forces it per layer: True for Conv1D, False for nn.Linear, and
    writes whatever the last layer forced back into the config)."""
    out = {f: _as_set(getattr(cfg, f)) for f in CONFIG_FIELDS}
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    if out["task_type"] is not None:
        out["task_type"] = str(getattr(out["task_type"], "value", out["task_type"]))
    if case_kwargs.get("target_modules") == "all-linear" and out["target_modules"] == "all-linear":
        out["target_modules"] = expanded_targets
    if "fan_in_fan_out" not in case_kwargs:
        del out["fan_in_fan_out"]
    heads = TASK_HEADS.get(out["task_type"])
    if heads:
        out["modules_to_save"] = set(out["modules_to_save"] or ()) | heads
    return out


# ----------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_roundtrip_logits(case: Case, src: str, dst: str, tmp_path: Path) -> None:
    made = trained_adapter(LIBS[src], case)
    made.save_pretrained(str(tmp_path))
    loaded = load(LIBS[dst], case, tmp_path)

    assert set(loaded.peft_config) == set(case.adapters())
    expected, got = logits_per_adapter(made, case), logits_per_adapter(loaded, case)
    base = logits(build_model(case.model))
    for name in case.adapters():
        effect = (expected[name] - base).abs().max().item()
        assert effect > 1e-3, (
            f"adapter {name!r} is a no-op (effect {effect:.2g}); the test would prove nothing"
        )
        assert_close(got[name], expected[name], f"{src}->{dst}, adapter {name!r}")
    if len(expected) > 1:
        assert (expected["default"] - expected["other"]).abs().max() > 1e-3, "set_adapter did not switch"


@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
def test_seq_cls_head_travels(src: str, dst: str, tmp_path: Path) -> None:
    """The SEQ_CLS head is in modules_to_save by default: it is trained, saved under the plain module name,
    and restored by the other library."""
    case = next(c for c in CASES if c.id == "seq-cls-bert")
    made = trained_adapter(LIBS[src], case)
    made.save_pretrained(str(tmp_path))
    loaded = load(LIBS[dst], case, tmp_path)

    feats = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        original = build_model(case.model).classifier(feats)
        trained = made.get_base_model().classifier(feats)
        restored = loaded.get_base_model().classifier(feats)
    assert (trained - original).abs().max() > 1e-3, "the classifier head was not trainable/perturbed"
    assert_close(restored, trained, f"classifier head {src}->{dst}")

    tensors = load_file(tmp_path / WEIGHTS)
    head_keys = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert head_keys <= set(tensors), sorted(tensors)
    from_file = torch.nn.functional.linear(
        feats, tensors["base_model.model.classifier.weight"], tensors["base_model.model.classifier.bias"]
    )
    assert_close(from_file, trained, "classifier head as stored in the safetensors file")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_safetensors_keys_identical(case: Case, tmp_path: Path) -> None:
    written = {}
    for lib_name, lib in LIBS.items():
        make_peft_model(lib, case).save_pretrained(str(tmp_path / lib_name))
        written[lib_name] = {
            name: tensor_specs(adapter_dir(tmp_path / lib_name, name)) for name in case.adapters()
        }
    for name in case.adapters():
        got, expected = written["peftkit"][name], written["peft"][name]
        assert got == expected, f"adapter {name!r}:\n" + describe_key_diff(got, expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_adapter_config_json(case: Case, tmp_path: Path) -> None:
    make_peft_model(peftkit, case).save_pretrained(str(tmp_path / "peftkit"))
    make_peft_model(peft, case).save_pretrained(str(tmp_path / "peft"))
    known_keys = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    for name in case.adapters():
        ours = adapter_dir(tmp_path / "peftkit", name)
        raw = json.loads((ours / CONFIG).read_text())
        assert not set(raw) - known_keys, (
            f"keys peft's LoraConfig does not know: {sorted(set(raw) - known_keys)}"
        )

        generic = peft.PeftConfig.from_pretrained(str(ours))
        assert isinstance(generic, peft.LoraConfig)
        cfg = peft.LoraConfig.from_pretrained(str(ours))
        ref = peft.LoraConfig.from_pretrained(str(adapter_dir(tmp_path / "peft", name)))
        kwargs = case.adapters()[name]
        expected = config_summary(ref, kwargs, _as_set(ref.target_modules))
        got = config_summary(cfg, kwargs, expected["target_modules"])
        diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        assert not diff, f"adapter {name!r}: field: (peftkit, peft): {diff}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nb_trainable_parameters(case: Case) -> None:
    counts = {
        lib_name: tuple(make_peft_model(lib, case).get_nb_trainable_parameters())
        for lib_name, lib in LIBS.items()
    }
    assert counts["peftkit"] == counts["peft"], "(trainable, total)"


@pytest.mark.parametrize("maker", LIB_NAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_and_unload(case: Case, maker: str, tmp_path: Path) -> None:
    """One checkpoint (made by ``maker``) merged by each library: same plain transformers model."""
    made = trained_adapter(LIBS[maker], case)
    made.save_pretrained(str(tmp_path))
    unmerged = logits(made)  # "default" is active

    merged = {}
    for lib_name, lib in LIBS.items():
        model = load(lib, case, tmp_path).merge_and_unload()
        assert not isinstance(model, lib.PeftModel), f"{lib_name}: merge_and_unload returned a PeftModel"
        leftovers = [n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
        assert not leftovers, f"{lib_name}: adapter parameters left after merge_and_unload: {leftovers[:5]}"
        merged[lib_name] = logits(model.eval())
        assert_close(merged[lib_name], unmerged, f"{lib_name}: merged vs unmerged", atol=MERGE_ATOL)
    assert_close(merged["peftkit"], merged["peft"], "merged peftkit vs merged peft")


def test_save_pretrained_writes_a_model_card_as_hf_peft(tmp_path) -> None:
    """README.md with HF PEFT's metadata (tools read the base model and library from it); an existing card
    keeps its text."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = tmp_path / "base"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    ).save_pretrained(base_dir)
    cards = {}
    for lib in (peft, peftkit):
        model = lib.get_peft_model(
            LlamaForCausalLM.from_pretrained(base_dir),
            lib.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )
        model.save_pretrained(tmp_path / lib.__name__)
        text = (tmp_path / lib.__name__ / "README.md").read_text()
        cards[lib.__name__] = yaml.safe_load(text.split("---")[1])
    assert cards["peftkit"] == cards["peft"]
    assert cards["peftkit"]["base_model"] == str(base_dir) and cards["peftkit"]["library_name"] == "peft"

    card = tmp_path / "peftkit" / "README.md"
    card.write_text(card.read_text() + "\nMy notes.\n")
    model.save_pretrained(tmp_path / "peftkit")
    assert "My notes." in card.read_text() and card.read_text().count("- peftkit ") == 1
