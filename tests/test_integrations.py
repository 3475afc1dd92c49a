"""peftkit models in transformers' ``Trainer`` and TRL's ``SFTTrainer``, run for real on tiny models.

HF PEFT, driven by the same tools with the same adapter, is the reference: the losses of every step agree.
Checked: a plain ``transformers.Trainer`` with default arguments keeps the base model's columns, reports
``eval_loss`` and trains in bf16; ``peftkit.integrations.Trainer`` writes adapter-only checkpoints that
both libraries load, resumes from them bitwise and loads the best checkpoint at the end; TRL's SFT
trainer (its defaults: bf16, gradient checkpointing, its fused LM head) trains a peftkit model as it
trains an HF PEFT model.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_model

import peftkit
from peftkit import LoraConfig, get_peft_model

datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")
from transformers import Trainer as HFTrainer  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from peftkit.integrations import Trainer  # noqa: E402

SEQ_CLS = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
CAUSAL = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def cls_dataset(rows: int = 32) -> Any:
    """Token ids, BERT's token types, a label and a text column the model does not take."""
    ids = torch.randint(0, 100, (rows, 8), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * 8] * rows,
            "token_type_ids": [[0] * 4 + [1] * 4] * rows,
            "label": (ids[:, 0] % 3).tolist(),
            "text": ["unused"] * rows,
        }
    )


def lm_dataset(rows: int = 32) -> Any:
    ids = torch.randint(0, 100, (rows, 8), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def arguments(output_dir: Path, **kwargs: Any) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def losses(trainer: Any) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(model).items()}


# ------------------------------------------------------------------------------ transformers.Trainer
def test_forward_names_the_task_arguments_and_the_base_models_own() -> None:
    model = get_peft_model(build_model("bert_seq_cls"), LoraConfig(**SEQ_CLS))
    on_class = inspect.signature(type(model).forward).parameters
    on_model = inspect.signature(model.forward).parameters
    assert "labels" in on_class and "token_type_ids" not in on_class  # HF PEFT's names for the task
    assert {"input_ids", "attention_mask", "labels", "token_type_ids", "position_ids"} <= set(on_model)
    inputs = {k: torch.tensor(v[:2]) for k, v in cls_dataset()[:2].items() if k != "text"}
    inputs["labels"] = inputs.pop("label")
    positional = model(inputs["input_ids"], inputs["attention_mask"]).logits
    torch.testing.assert_close(
        positional, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    )
    assert model(**inputs).loss is not None


def test_plain_trainer_with_default_arguments_trains_in_bf16_and_reports_eval_loss(tmp_path: Path) -> None:
    model = get_peft_model(build_model("bert_seq_cls"), LoraConfig(**SEQ_CLS))
    before = adapter_state(model)
    trainer = HFTrainer(
        model=model,
        args=arguments(tmp_path, num_train_epochs=1, bf16=True),
        train_dataset=cls_dataset(),
        eval_dataset=cls_dataset(16),
    )
    trainer.train()
    assert "token_type_ids" in trainer._signature_columns  # the base model's column is kept
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _pair(kind: str, config: dict[str, Any], tmp_path: Path) -> tuple[Any, Any]:
    """The same adapter (B non-zero) on two copies of one base: peftkit's and HF PEFT's."""
    peft = pytest.importorskip("peft")
    ours = get_peft_model(build_model(kind), LoraConfig(**config, init_lora_weights=False))
    ours.save_pretrained(tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(build_model(kind), str(tmp_path / "start"), is_trainable=True)
    return ours, theirs


def test_trainer_losses_in_bf16_equal_hf_peft_step_for_step(tmp_path: Path) -> None:
    ours, theirs = _pair("llama", CAUSAL, tmp_path)
    runs = []
    for name, model, trainer_cls in (("ours", ours, Trainer), ("theirs", theirs, HFTrainer)):
        trainer = trainer_cls(
            model=model, args=arguments(tmp_path / name, max_steps=4, bf16=True), train_dataset=lm_dataset()
        )
        trainer.train()
        runs.append(losses(trainer))
    assert len(runs[0]) == 4
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-4, rtol=1e-4)


def test_checkpoints_hold_the_adapter_only_and_both_libraries_load_them(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = get_peft_model(build_model("bert_seq_cls"), LoraConfig(**SEQ_CLS))
    trainer = Trainer(
        model=model, args=arguments(tmp_path, max_steps=2, save_steps=2), train_dataset=cls_dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & files
        assert set(load_file(folder / "adapter_model.safetensors")) == set(
            peftkit.get_peft_model_state_dict(model)
        )
    inputs = {"input_ids": torch.tensor(cls_dataset()[:3]["input_ids"])}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        for lib in (peftkit, peft):
            loaded = lib.PeftModel.from_pretrained(
                build_model("bert_seq_cls"), str(tmp_path / "checkpoint-2")
            )
            torch.testing.assert_close(loaded.eval()(**inputs).logits, expected, atol=1e-6, rtol=0)


class StopAt(TrainerCallback):
    """Ends training after ``step`` (its checkpoint written), as a killed job would have."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_from_an_adapter_checkpoint_is_bitwise(tmp_path: Path) -> None:
    def run(folder: Path, resume: str | None = None, stop: int | None = None) -> Any:
        torch.manual_seed(0)
        model = get_peft_model(build_model("llama"), LoraConfig(**CAUSAL, lora_dropout=0.1))
        trainer = Trainer(
            model=model,
            args=arguments(folder, max_steps=4, save_steps=2, bf16=True),
            train_dataset=lm_dataset(),
            callbacks=[StopAt(stop)] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "stopped", stop=2)
    resumed = run(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "checkpoint-2"))
    assert len(losses(straight)) == 4 and losses(resumed) == losses(
        straight
    )  # its history includes steps 1-2
    expected, got = adapter_state(straight.model), adapter_state(resumed.model)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path: Path) -> None:
    model = get_peft_model(build_model("bert_seq_cls"), LoraConfig(**SEQ_CLS))
    trainer = Trainer(
        model=model,
        args=arguments(
            tmp_path,
            max_steps=6,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            load_best_model_at_end=True,
            learning_rate=0.3,  # large enough that the evaluation loss moves between checkpoints
        ),
        train_dataset=cls_dataset(),
        eval_dataset=cls_dataset(16),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(Path(best) / "adapter_model.safetensors")
    now = peftkit.get_peft_model_state_dict(model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(
        min(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------- TRL
def _sft_run(trainer_cls: Any, model: Any, tokenizer: Any, folder: Path) -> Any:
    trl = pytest.importorskip("trl")
    texts = ["a great movie with good acting", "a bad film and boring", "the story was fine"] * 8
    args = trl.SFTConfig(
        output_dir=str(folder), per_device_train_batch_size=8, max_steps=3, report_to=[], use_cpu=True,
        logging_steps=1, seed=0, learning_rate=1e-2, disable_tqdm=True, save_steps=3,
    )  # fmt: skip
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, kept
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def _tokenizer_and_pair(tmp_path: Path) -> tuple[Any, Any, Any]:
    """A word-level tokenizer and the same adapter (B non-zero) on a tiny llama, peftkit's and HF PEFT's."""
    peft = pytest.importorskip("peft")
    from cli_fixtures import build_tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tokenizer"))

    def base() -> Any:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    ours = get_peft_model(base(), LoraConfig(**CAUSAL, init_lora_weights=False))
    ours.save_pretrained(tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "start"), is_trainable=True)
    return tokenizer, ours, theirs


def test_trl_sft_trainer_trains_a_peftkit_model_as_it_trains_hf_peft(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from peftkit.integrations import SFTTrainer

    tokenizer, ours, theirs = _tokenizer_and_pair(tmp_path)
    ours_run = _sft_run(SFTTrainer, ours, tokenizer, tmp_path / "ours")
    theirs_run = _sft_run(trl.SFTTrainer, theirs, tokenizer, tmp_path / "theirs")
    assert len(losses(ours_run)) == 3
    torch.testing.assert_close(
        torch.tensor(losses(ours_run)), torch.tensor(losses(theirs_run)), atol=1e-4, rtol=1e-4
    )
    files = set(os.listdir(tmp_path / "ours" / "checkpoint-3"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # the fused LM head was put on the transformers model, not on peftkit's wrapper
    assert type(ours_run.model).forward is type(ours).forward


def test_trl_sft_trainer_without_hf_peft_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's trainer module as it is on a machine without ``peft``: no peft names imported."""
    trl = pytest.importorskip("trl")
    import accelerate.utils
    from trl.trainer import sft_trainer

    from peftkit.integrations import SFTTrainer

    for name in ("peft", "PeftConfig", "PeftModel", "PrefixTuningConfig", "get_peft_model", "BaseTunerLayer"):
        monkeypatch.delattr(sft_trainer, name, raising=False)
    monkeypatch.setattr(sft_trainer, "is_peft_available", lambda: False)
    monkeypatch.setattr(sft_trainer, "is_peft_model", lambda model: False)
    assert accelerate.utils.is_peft_model is not None and trl
    tokenizer, ours, _ = _tokenizer_and_pair(tmp_path)
    before = adapter_state(ours)
    _sft_run(SFTTrainer, ours, tokenizer, tmp_path / "ours")
    after = adapter_state(ours)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(sft_trainer, "BaseTunerLayer")  # the stand-in is gone again


def test_trl_dpo_trainer_uses_the_adapter_as_its_own_reference_as_with_hf_peft(tmp_path: Path) -> None:
    """No reference model is passed: TRL keeps a frozen copy of the starting adapter ("ref") beside the
    trained one, on the same base, for a peftkit model as for an HF PEFT one."""
    trl = pytest.importorskip("trl")
    from peftkit.integrations import DPOTrainer

    tokenizer, ours, theirs = _tokenizer_and_pair(tmp_path)
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["the movie was"] * 16,
            "chosen": [" great and good"] * 16,
            "rejected": [" bad and boring"] * 16,
        }
    )
    runs = []
    for name, trainer_cls, model in (("ours", DPOTrainer, ours), ("theirs", trl.DPOTrainer, theirs)):
        args = trl.DPOConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=8, max_steps=3, report_to=[],
            use_cpu=True, logging_steps=1, seed=0, learning_rate=1e-2, disable_tqdm=True, save_steps=3,
        )  # fmt: skip
        assert args.bf16 and args.gradient_checkpointing
        trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        assert trainer.ref_model is None
        trainer.train()
        runs.append(losses(trainer))
    assert set(ours.peft_config) == {"default", "ref"}
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".ref." in n)
    assert len(runs[0]) == 3 and runs[0][1] != runs[0][0]
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-4, rtol=1e-4)
    files = set(os.listdir(tmp_path / "ours" / "checkpoint-3"))
    assert {"adapter_model.safetensors", "ref"} <= files and "model.safetensors" not in files


# ---------------------------------------------------------------------------------------- accelerate
def test_accelerate_bf16_training_and_save_state_round_trip(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")

    def setup() -> tuple[Any, Any, Any, Any]:
        torch.manual_seed(0)
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        model = get_peft_model(build_model("llama"), LoraConfig(**CAUSAL, init_lora_weights=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        data = torch.utils.data.DataLoader(lm_dataset().with_format("torch"), batch_size=8)
        return accelerator, *accelerator.prepare(model, optimizer, data)

    def step(accelerator: Any, model: Any, optimizer: Any, batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    accelerator, model, optimizer, data = setup()
    batches = list(data)
    assert "input_ids" in inspect.signature(model.forward).parameters  # still named once wrapped for autocast
    with torch.no_grad():
        assert model(**batches[0]).logits.dtype == torch.float32  # autocast inside, float32 outputs
    first = [step(accelerator, model, optimizer, batches[i]) for i in range(2)]
    accelerator.save_state(str(tmp_path / "state"))
    expected = [step(accelerator, model, optimizer, batches[i]) for i in range(2, 4)]

    accelerator, model2, optimizer2, _ = setup()
    accelerator.load_state(str(tmp_path / "state"))
    resumed = [step(accelerator, model2, optimizer2, batches[i]) for i in range(2, 4)]
    assert first[0] != first[1] and resumed == expected
    ours, theirs = adapter_state(model), adapter_state(model2)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_trainer_trains_a_4bit_base_with_adapters(tmp_path: Path) -> None:
    """transformers refuses to train a quantized model without adapters; a peftkit model has them."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    build_model("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)
    model = get_peft_model(peftkit.prepare_model_for_kbit_training(base), LoraConfig(**CAUSAL))
    before = adapter_state(model)
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2), train_dataset=lm_dataset())
    trainer.train()
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
