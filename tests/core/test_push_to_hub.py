"""``PeftModel.push_to_hub``: HF PEFT's upload of an adapter to the Hugging Face Hub.

The Hub cannot be reached from here, so the real ``huggingface_hub`` client is used in offline mode (its
own error, nothing left on disk) and, for what would be uploaded, with its two network calls recorded: the
recorded folder must be what ``save_pretrained`` writes, and HF PEFT must load it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub
import peft
import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled
from tiny_models import build_model, model_inputs

from peftkit import LoraConfig, get_peft_model


def _adapter() -> Any:
    model = get_peft_model(
        build_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    return model.eval()


def _leftovers() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("peftkit-push-")}


def test_offline_push_raises_the_hub_clients_error_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = _adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    leftovers = _leftovers()
    with pytest.raises(OfflineModeIsEnabled):
        model.push_to_hub("someone/tiny-lora", token="hf_not_a_token")
    assert _leftovers() == leftovers
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_pushed_files_are_the_saved_adapter_and_hf_peft_loads_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: dict[str, Any] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> Any:
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: Any, **kwargs: Any) -> str:
        calls["upload_folder"] = kwargs
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = _adapter()
    assert model.push_to_hub("someone/tiny-lora", private=True, commit_message="first") == "commit"
    assert calls["create_repo"] == (
        "someone/tiny-lora",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls["upload_folder"]["repo_id"] == "someone/tiny-lora"
    assert calls["upload_folder"]["commit_message"] == "first"
    assert not os.path.exists(calls["upload_folder"]["folder_path"])  # the staging folder is gone
    model.save_pretrained(str(tmp_path / "saved"))
    uploaded = sorted(p.name for p in (tmp_path / "uploaded").iterdir())
    assert uploaded == sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "README.md" in uploaded and "adapter_model.safetensors" in uploaded
    theirs = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "uploaded")).eval()
    inputs = model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
