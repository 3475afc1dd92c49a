"""Bad input gets a clear error and loses nothing.

Every test feeds peftkit one kind of bad input and checks three things:

1. the exception type (``ValueError`` / ``TypeError`` / ``FileNotFoundError``),
2. key words of the message (what was wrong, and how to fix it),
3. that nothing changed: the model (module types, every parameter's value and ``requires_grad``,
   buffers, train/eval mode) and the files on disk are exactly as before the call.

The models are tiny and built from configs (no hub access).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.core.layer import AdapterLayer

INPUT_IDS = torch.tensor([[1, 5, 9, 42, 7, 3]])


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy machine thread hand-offs can make a
    2 ms forward take half a second; the previous setting is restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(hidden_size: int = 32, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    ).eval()


def lora_config(**changes: Any) -> LoraConfig:
    """A LoRA config on the attention projections; B is random so adapters are not no-ops."""
    settings: dict[str, Any] = {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    settings.update(changes)
    return LoraConfig(**settings)


def peft_llama(seed: int = 1, **changes: Any) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), lora_config(**changes))


def save_adapter(folder: Path, hidden_size: int = 32, seed: int = 1, **changes: Any) -> Path:
    """Save a LoRA adapter of a llama with ``hidden_size`` into ``folder`` and return it."""
    torch.manual_seed(seed)
    get_peft_model(tiny_llama(hidden_size), lora_config(**changes)).save_pretrained(folder)
    return folder


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def assert_plain_model(model: nn.Module) -> None:
    """No peftkit wrapper (adapter layer, modules_to_save wrapper) is left inside ``model``."""
    leftovers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peftkit")]
    assert not leftovers, f"peftkit modules left in the base model: {leftovers[:5]}"


def peft_state(peft_model: PeftModel, outputs: bool = False) -> dict[str, Any]:
    """``snapshot`` plus the adapter bookkeeping of a PeftModel (and, if asked, its outputs)."""
    return {
        "snapshot": snapshot(peft_model),
        "configs": {name: config.to_dict() for name, config in peft_model.peft_config.items()},
        "active": peft_model.active_adapters,
        "logits": logits(peft_model) if outputs else None,
    }


def assert_peft_model_unchanged(peft_model: PeftModel, before: dict[str, Any]) -> None:
    assert list(peft_model.peft_config) == list(before["configs"]), "the set of adapters changed"
    assert {n: c.to_dict() for n, c in peft_model.peft_config.items()} == before["configs"]
    assert peft_model.active_adapters == before["active"]
    assert_unchanged(peft_model, before["snapshot"])
    if before["logits"] is not None:
        assert torch.equal(logits(peft_model), before["logits"]), "the model's outputs changed"


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def base_with_some_frozen() -> LlamaForCausalLM:
    """A llama where the user froze some parameters: a failed call must restore exactly this."""
    model = tiny_llama()
    model.lm_head.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- LoraConfig
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"r": 0}, r"r=0 must be a positive integer", id="r=0"),
        pytest.param({"r": -1}, r"r=-1 must be a positive integer", id="r=-1"),
        pytest.param({"r": 2.5}, r"r=2\.5 must be a positive integer", id="r=2.5"),
        pytest.param({"lora_alpha": 0}, r"lora_alpha=0 must be a positive number", id="lora_alpha=0"),
        pytest.param({"lora_alpha": -1}, r"lora_alpha=-1 must be a positive number", id="lora_alpha=-1"),
        pytest.param({"bias": "some"}, r"bias='some'.*'none', 'all', 'lora_only'", id="bias=some"),
        pytest.param({"lora_dropout": 1.0}, r"lora_dropout=1\.0 must be in \[0, 1\)", id="dropout=1"),
        pytest.param(
            {"init_lora_weights": "nope"}, r"init_lora_weights='nope' is not supported; use True", id="init"
        ),
        pytest.param(
            {"rank_pattern": {"q_proj": 0}},
            r"rank_pattern\['q_proj'\]=0 must be a positive integer",
            id="rank_pattern=0",
        ),
        pytest.param(
            {"target_modules": []}, r"target_modules is an empty list.*'all-linear'", id="target_modules=[]"
        ),
        pytest.param(
            {"layers_pattern": "layers"},
            r"layers_pattern only applies together with layers_to_transform",
            id="layers_pattern-alone",
        ),
    ],
)
def test_lora_config_rejects_bad_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_config_replace_with_bad_value_leaves_config_unchanged() -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"])
    before = config.to_dict()
    with pytest.raises(ValueError, match=r"r=0 must be a positive integer"):
        config.replace(r=0)
    assert config.to_dict() == before


# ---------------------------------------------------------------------------------- targeting
@pytest.mark.parametrize(
    ("target_modules", "match"),
    [
        pytest.param(["qq_proj"], r"target_modules=\['qq_proj'\] matched no module.*q_proj", id="list"),
        pytest.param(r".*\.nothing_here", r"target_modules='.*nothing_here' matched no module", id="regex"),
    ],
)
def test_target_modules_matching_nothing_names_pattern_and_leaves_model_unchanged(
    target_modules: Any, match: str
) -> None:
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(target_modules=target_modules))
    assert_unchanged(model, before)
    assert_plain_model(model)


def test_unsupported_layer_type_after_partial_injection_leaves_model_unchanged() -> None:
    # q_proj of layer 0 is wrapped before the RMSNorm fails: that wrapping must be undone.
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"LoRA cannot wrap .*input_layernorm \(LlamaRMSNorm\)"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert_unchanged(model, before)
    assert_plain_model(model)


# ------------------------------------------------------------------ adapter for another architecture
def test_llama_adapter_on_gpt2_is_rejected_and_gpt2_unchanged(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "llama_adapter")
    files = files_under(tmp_path)
    gpt2 = tiny_gpt2()
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\] matched no module of GPT2LMHeadModel"):
        PeftModel.from_pretrained(gpt2, folder)
    assert_unchanged(gpt2, before)
    assert_plain_model(gpt2)
    assert files_under(tmp_path) == files


def test_adapter_for_other_hidden_size_names_keys_and_shapes_and_base_unchanged(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "adapter32", hidden_size=32)
    files = files_under(tmp_path)
    model = tiny_llama(hidden_size=64)
    model.lm_head.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Shape mismatches") as info:
        PeftModel.from_pretrained(model, folder)
    message = str(info.value)
    assert (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: checkpoint (8, 32) vs model (8, 64)"
        in message
    )
    assert "v_proj.lora_B.weight: checkpoint (16, 8) vs model (32, 8)" in message
    assert "Nothing was loaded" in message
    assert_unchanged(model, before)
    assert_plain_model(model)
    assert files_under(tmp_path) == files


def test_load_adapter_with_shape_mismatch_leaves_peft_model_unchanged(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "adapter64", hidden_size=64)
    files = files_under(tmp_path)
    peft_model = peft_llama()
    before = peft_state(peft_model, outputs=True)
    with pytest.raises(ValueError, match=r"adapter 'other'.*Shape mismatches.*q_proj\.lora_A\.weight"):
        peft_model.load_adapter(folder, adapter_name="other")
    assert_peft_model_unchanged(peft_model, before)
    assert files_under(tmp_path) == files


def test_load_adapter_with_key_mismatch_leaves_peft_model_unchanged(tmp_path: Path) -> None:
    # The config says q_proj/v_proj, the weights are those of a k_proj adapter.
    folder = save_adapter(tmp_path / "qv")
    save_adapter(tmp_path / "k", target_modules=["k_proj"])
    (folder / "adapter_model.safetensors").write_bytes(
        (tmp_path / "k/adapter_model.safetensors").read_bytes()
    )
    peft_model = peft_llama()
    before = peft_state(peft_model, outputs=True)
    with pytest.raises(ValueError, match=r"Missing keys \(8\): .*q_proj.*Unexpected keys \(4\): .*k_proj"):
        peft_model.load_adapter(folder, adapter_name="other")
    assert_peft_model_unchanged(peft_model, before)


# ------------------------------------------------------------------------------ damaged files
def _corrupt(path: Path, how: str) -> None:
    if how == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["random-bytes", "truncated"])
def test_corrupt_safetensors_is_rejected_and_model_unchanged(tmp_path: Path, how: str) -> None:
    folder = save_adapter(tmp_path / "adapter")
    _corrupt(folder / "adapter_model.safetensors", how)
    files = files_under(tmp_path)
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"adapter_model\.safetensors is not a readable.*corrupt or truncated"
    ):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert_plain_model(model)
    assert files_under(tmp_path) == files


@pytest.mark.parametrize("how", ["random-bytes", "truncated"])
def test_load_adapter_with_corrupt_safetensors_leaves_peft_model_unchanged(tmp_path: Path, how: str) -> None:
    folder = save_adapter(tmp_path / "adapter")
    _corrupt(folder / "adapter_model.safetensors", how)
    peft_model = peft_llama()
    before = peft_state(peft_model, outputs=True)
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        peft_model.load_adapter(folder, adapter_name="other")
    assert_peft_model_unchanged(peft_model, before)


def test_missing_weights_file_is_file_not_found_and_model_unchanged(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "adapter")
    (folder / "adapter_model.safetensors").unlink()
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model\.safetensors or adapter_model\.bin"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert_plain_model(model)


def test_missing_config_file_is_file_not_found(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "adapter")
    (folder / "adapter_config.json").unlink()
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"No adapter_config\.json in the local folder"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------ adapter_config.json
def _rewrite_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")


def _config_dict(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        pytest.param(lambda d: "{ not json", r"adapter_config\.json is not valid JSON", id="invalid-json"),
        pytest.param(lambda d: "[1, 2]", r"must hold a JSON object, found list", id="json-list"),
        pytest.param(
            lambda d: json.dumps({k: v for k, v in d.items() if k != "peft_type"}),
            r"no 'peft_type' key.*\"peft_type\": \"LORA\"",
            id="no-peft_type",
        ),
        pytest.param(
            lambda d: json.dumps({**d, "peft_type": "FOO"}),
            r"Unknown peft_type 'FOO' in the adapter config; peftkit knows: .*LORA",
            id="unknown-peft_type",
        ),
        pytest.param(
            lambda d: json.dumps({**d, "r": 0}), r"r=0 must be a positive integer", id="invalid-value"
        ),
    ],
)
def test_bad_adapter_config_is_rejected_and_model_unchanged(tmp_path: Path, edit: Any, match: str) -> None:
    folder = save_adapter(tmp_path / "adapter")
    _rewrite_config(folder, edit(_config_dict(folder)))
    files = files_under(tmp_path)
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(model, folder)
    with pytest.raises(ValueError, match=match):
        PeftConfig.from_pretrained(folder)
    assert_unchanged(model, before)
    assert_plain_model(model)
    assert files_under(tmp_path) == files


def test_unknown_extra_config_key_loads_with_warning_naming_it(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path / "adapter")
    _rewrite_config(folder, json.dumps({**_config_dict(folder), "some_future_option": 3}))
    with pytest.warns(
        UserWarning, match=r"Unexpected keyword arguments \['some_future_option'\] for class LoraConfig"
    ):
        peft_model = PeftModel.from_pretrained(tiny_llama(), folder)
    saved = load_file(folder / "adapter_model.safetensors")
    loaded = dict(peft_model.base_model.adapter_parameter_map("default"))
    assert {"base_model.model." + k for k in loaded} == set(saved)
    for key, param in loaded.items():
        assert torch.equal(param.detach(), saved["base_model.model." + key])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_qalora", True),
        ("alora_invocation_tokens", [3, 4]),
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}),
    ],
)
def test_config_key_of_an_unimplemented_hf_feature_is_an_error_and_loads_nothing(
    tmp_path: Path, key: str, value: object
) -> None:
    """HF PEFT options peftkit lacks that change the outputs: an error naming the key, model unchanged. The
    same key at HF PEFT's "feature unused" default loads silently."""
    folder = save_adapter(tmp_path / "adapter")
    config = _config_dict(folder)
    _rewrite_config(folder, json.dumps({**config, key: value}))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"sets {key}=.*does not implement"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert_plain_model(model)
    _rewrite_config(folder, json.dumps({**config, key: None if key != "use_qalora" else False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(tiny_llama(), folder)


# --------------------------------------------------------------------------------- adapter names
BAD_ADAPTER_NAMES = {
    "../x": r"Invalid adapter name '\.\./x': use letters, digits",
    "a/b": r"Invalid adapter name 'a/b': use letters, digits",
    "a.b": r"Invalid adapter name 'a\.b': use letters, digits",
    "": r"Invalid adapter name '': use letters, digits",
    "__base__": r"'__base__' is reserved",
    "weight": r"Adapter name 'weight' is also the name of a module or parameter",
    "lora_A": r"Adapter name 'lora_A' is reserved: it is an attribute of the adapter layers",
    "q_proj": r"Adapter name 'q_proj' is also the name of a module or parameter",
    "base_layer": r"Adapter name 'base_layer' is reserved: it is an attribute of the adapter layers",
}
bad_names = pytest.mark.parametrize(
    ("name", "match"), [pytest.param(n, m, id=repr(n)) for n, m in BAD_ADAPTER_NAMES.items()]
)


@bad_names
def test_get_peft_model_rejects_bad_adapter_name(name: str, match: str) -> None:
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, lora_config(), adapter_name=name)
    assert_unchanged(model, before)
    assert_plain_model(model)


@bad_names
def test_from_pretrained_rejects_bad_adapter_name(tmp_path: Path, name: str, match: str) -> None:
    folder = save_adapter(tmp_path / "adapter")
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(model, folder, adapter_name=name)
    assert_unchanged(model, before)
    assert_plain_model(model)


@bad_names
def test_add_adapter_rejects_bad_adapter_name(name: str, match: str) -> None:
    peft_model = peft_llama()
    before = peft_state(peft_model)
    with pytest.raises(ValueError, match=match):
        peft_model.add_adapter(name, lora_config())
    assert_peft_model_unchanged(peft_model, before)


@bad_names
def test_load_adapter_rejects_bad_adapter_name(tmp_path: Path, name: str, match: str) -> None:
    folder = save_adapter(tmp_path / "adapter", seed=2)
    files = files_under(tmp_path)
    peft_model = peft_llama()
    before = peft_state(peft_model)
    with pytest.raises(ValueError, match=match):
        peft_model.load_adapter(folder, adapter_name=name)
    assert_peft_model_unchanged(peft_model, before)
    assert files_under(tmp_path) == files


@bad_names
def test_save_pretrained_with_bad_adapter_name_writes_nothing(tmp_path: Path, name: str, match: str) -> None:
    peft_model = peft_llama()
    before = peft_state(peft_model)
    out = tmp_path / "sandbox" / "out"
    out.mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"Unknown adapters {[name]}; this model has ['default']")):
        peft_model.save_pretrained(out, selected_adapters=[name])
    # nothing anywhere below tmp_path, so in particular nothing outside ``out``
    assert files_under(tmp_path) == {}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "sandbox"]
    assert_peft_model_unchanged(peft_model, before)


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
@pytest.mark.parametrize("existing", ["default", "second"])
def test_duplicate_adapter_name_is_rejected_and_existing_weights_unchanged(
    tmp_path: Path, how: str, existing: str
) -> None:
    folder = save_adapter(tmp_path / "adapter", seed=3)
    peft_model = peft_llama()
    peft_model.add_adapter("second", lora_config(target_modules=["q_proj", "k_proj"]))
    before = peft_state(peft_model, outputs=True)
    with pytest.raises(ValueError, match=rf"An adapter named '{existing}' already exists; pick another name"):
        if how == "add_adapter":
            peft_model.add_adapter(existing, lora_config())
        else:
            peft_model.load_adapter(folder, adapter_name=existing)
    assert_peft_model_unchanged(peft_model, before)


# --------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_into_existing_file_is_rejected_and_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "not_a_dir"
    target.write_bytes(b"precious data")
    peft_model = peft_llama()
    with pytest.raises(ValueError, match=r"not_a_dir is a file; save_pretrained needs a directory"):
        peft_model.save_pretrained(target)
    assert files_under(tmp_path) == {"not_a_dir": b"precious data"}


# ----------------------------------------------------------------------------- pickled .bin files
class _RunsCodeWhenUnpickled:
    """Unpickling this object calls ``os.mkdir(marker)``: the marker proves that its code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def _bin_adapter(folder: Path, write: Any) -> Path:
    """An adapter folder whose weights are an ``adapter_model.bin`` written by ``write(path)``."""
    save_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    write(folder / "adapter_model.bin")
    return folder


def _torch_save_payload(marker: Path) -> Any:
    return lambda path: torch.save({"x": torch.zeros(2), "evil": _RunsCodeWhenUnpickled(marker)}, path)


def _pickle_payload(marker: Path) -> Any:
    return lambda path: path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker), protocol=2))


def test_the_pickle_payload_really_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    # Control for the tests below: the payload does create its marker when unpickled without protection.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [_torch_save_payload, _pickle_payload], ids=["torch.save", "pickle"])
def test_pickled_bin_with_code_is_refused_and_never_runs(tmp_path: Path, payload: Any) -> None:
    marker = tmp_path / "code_ran"
    folder = _bin_adapter(tmp_path / "adapter", payload(marker))
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"(?s)adapter_model\.bin could not be read as plain tensors.*weights_only=True"
    ):
        PeftModel.from_pretrained(model, folder)
    assert not marker.exists(), "the pickled object's code ran"
    assert_unchanged(model, before)
    assert_plain_model(model)

    peft_model = peft_llama()
    state = peft_state(peft_model)
    with pytest.raises(
        ValueError, match=r"(?s)could not be read as plain tensors.*convert it to safetensors"
    ):
        peft_model.load_adapter(folder, adapter_name="other")
    assert not marker.exists(), "the pickled object's code ran"
    assert_peft_model_unchanged(peft_model, state)


def test_bin_without_a_dict_of_tensors_is_refused(tmp_path: Path) -> None:
    folder = _bin_adapter(tmp_path / "adapter", lambda path: torch.save({"x": 3}, path))
    model = base_with_some_frozen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model\.bin does not hold a dict of tensors"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert_plain_model(model)


# ------------------------------------------------------------------------------------ safe merge
def _adapter_layers(peft_model: PeftModel) -> list[AdapterLayer]:
    return [m for _, m in peft_model.base_model.adapter_layers()]


def _put_nan(layer: AdapterLayer, adapter_name: str) -> None:
    with torch.no_grad():
        layer.lora_B[adapter_name].weight[0, 0] = float("nan")


def _peft_model_with_nan_in_last_layer() -> PeftModel:
    peft_model = peft_llama()
    layers = _adapter_layers(peft_model)
    assert len(layers) == 4  # q_proj and v_proj of two decoder layers; the first three merge fine
    _put_nan(layers[-1], "default")
    return peft_model


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_with_nan_raises_and_base_weights_unchanged(call: str) -> None:
    peft_model = _peft_model_with_nan_in_last_layer()
    before = snapshot(peft_model)
    with pytest.raises(
        ValueError, match=r"Merging adapter 'default' would put NaN or inf into the base weight"
    ):
        getattr(peft_model, call)(safe_merge=True)
    assert [layer.merged_adapters for layer in _adapter_layers(peft_model)] == [[]] * 4
    assert_unchanged(peft_model, before)  # also the three layers merged before the broken one


def test_safe_merge_with_nan_in_second_active_adapter_unmerges_the_first() -> None:
    # Two active adapters on every layer; the second one is broken in the first layer, so that layer
    # has already merged "default" when the NaN is found.
    peft_model = peft_llama()
    peft_model.add_adapter("second", lora_config())
    peft_model.set_adapter(["default", "second"])
    _put_nan(_adapter_layers(peft_model)[0], "second")
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match=r"Merging adapter 'second' would put NaN or inf"):
        peft_model.merge_adapter(safe_merge=True)
    assert [layer.merged_adapters for layer in _adapter_layers(peft_model)] == [[]] * 4
    assert_unchanged(peft_model, before)


@pytest.mark.parametrize("bits", [4, 8])
def test_methods_without_quantized_support_refuse_bitsandbytes_layers(tmp_path, bits):
    """A 4-bit / 8-bit linear holds packed integers: wrapping it as a float linear would compute nonsense,
    so a method that does not support quantized layers says so, and the model is left as it was. (LoRA and
    IA3 support them, tests/methods/test_qlora.py; the tuner here is LoRA's with the support switched off, which
    is what a method that does not declare it gets.)"""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from peftkit import LoraModel

    class NoQuantizedLoraModel(LoraModel):
        supports_quantized_layers = False

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(
        ValueError,
        match=r"q_proj is a quantized Linear(4bit|8bitLt).*NoQuantizedLoraModel does not support quantized",
    ):
        NoQuantizedLoraModel(
            model, {"default": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])}, "default"
        )
    assert [type(m).__name__ for m in model.modules()] == before
    assert get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # LoRA supports them


def test_wrapping_a_model_that_still_holds_adapter_layers_is_refused() -> None:
    """get_peft_model twice on one base would put a second PeftModel over the first one's layers."""
    base = tiny_llama()
    first = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"for a second time.*model\.layers\.0\.self_attn\.q_proj"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    assert_unchanged(base, before)
    first.unload()
    get_peft_model(base, LoraConfig(target_modules=["q_proj"]))  # fine once the first adapter is gone
