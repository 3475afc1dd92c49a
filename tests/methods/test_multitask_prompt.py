"""Multitask Prompt Tuning against HF PEFT and its formula: checkpoints both ways with the same logits
(per-row task_ids), the prompt P* ∘ (u_t v_tᵀ) computed by hand, per-task prompts, training on two tasks,
transfer to a new task from a saved source checkpoint, generation, and bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_model, model_inputs

import peftkit
from peftkit import MultitaskPromptTuningConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

P, TASKS, RANKS = 3, 3, 2
TASK_IDS = torch.tensor([2, 0, 1])


def _config(lib: Any, task_type: str, **kwargs: Any) -> Any:
    values = {"num_virtual_tokens": P, "num_tasks": TASKS, "num_ranks": RANKS, "task_type": task_type}
    return lib.MultitaskPromptTuningConfig(**{**values, **kwargs})


def _task(kind: str) -> str:
    return "SEQ_CLS" if kind == "bert_seq_cls" else "CAUSAL_LM"


def _inputs() -> dict[str, torch.Tensor]:
    inputs = model_inputs(batch_size=3, seq_len=7)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0
    return inputs


def _perturb(model: torch.nn.Module, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _logits(model: torch.nn.Module, task_ids: torch.Tensor = TASK_IDS, **inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or _inputs()), task_ids=task_ids).logits


def _encoder(model: PeftModel) -> Any:
    return model.base_model.prompt_encoder["default"]


# ------------------------------------------------------------------------------------- HF PEFT
@pytest.mark.parametrize("kind", ["llama", "bert_seq_cls"])
def test_fresh_adapter_equals_hf_peft_with_the_same_seed(kind: str) -> None:
    """Same parameter names, shapes, counts and (with the same seed) the same initial values as HF PEFT."""
    torch.manual_seed(0)
    hf = peft.get_peft_model(build_model(kind), _config(peft, _task(kind)))
    torch.manual_seed(0)
    ours = get_peft_model(build_model(kind), _config(peftkit, _task(kind)))
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    hf_params = {n.split(".default.")[-1]: p for n, p in hf.named_parameters() if "prompt_encoder" in n}
    our_params = {n.split(".default.")[-1]: p for n, p in ours.named_parameters() if "prompt_encoder" in n}
    assert (
        hf_params.keys() == our_params.keys() == {"embedding.weight", "prefix_task_cols", "prefix_task_rows"}
    )
    for name, param in hf_params.items():
        assert torch.equal(our_params[name], param), name
    torch.testing.assert_close(_logits(ours), _logits(hf), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert_seq_cls"])
def test_hf_checkpoint_loads_in_peftkit_with_same_logits(kind: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    hf_model = peft.get_peft_model(build_model(kind), _config(peft, _task(kind)))
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(build_model(kind), tmp_path)
    assert isinstance(ours.peft_config["default"], MultitaskPromptTuningConfig)
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert_seq_cls"])
def test_peftkit_checkpoint_loads_in_hf_with_same_logits(kind: str, tmp_path: Any) -> None:
    ours = get_peft_model(build_model(kind), _config(peftkit, _task(kind)))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(build_model(kind), tmp_path)
    torch.testing.assert_close(_logits(hf_model), _logits(ours), atol=1e-5, rtol=1e-5)
    # HF PEFT's tensor names and shapes, and the adapter changes the output
    hf_dir = tmp_path / "hf"
    peft.get_peft_model(build_model(kind), _config(peft, _task(kind))).save_pretrained(hf_dir)
    ours_sd = load_file(tmp_path / "adapter_model.safetensors")
    hf_sd = load_file(hf_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    assert ours_sd["prefix_task_cols"].shape == (TASKS, P, RANKS)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["num_tasks"], saved["num_ranks"]) == (
        "MULTITASK_PROMPT_TUNING",
        TASKS,
        RANKS,
    )
    with torch.no_grad(), ours.disable_adapter():
        base = ours(**_inputs(), task_ids=TASK_IDS).logits
    adapted = _logits(ours)
    adapted = adapted[:, P:] if adapted.dim() == 3 else adapted  # causal LM: drop the virtual positions
    assert not torch.allclose(adapted, base, atol=1e-3)


# ------------------------------------------------------------------------------------- formula
def test_prompt_is_the_shared_prompt_times_the_task_matrix_by_hand() -> None:
    model = get_peft_model(build_model("llama"), _config(peftkit, "CAUSAL_LM"))
    _perturb(model)
    encoder = _encoder(model)
    shared = encoder.embedding.weight  # P* (P, d)
    inputs = _inputs()
    base = build_model("llama")
    rows = []
    for b, task in enumerate(TASK_IDS.tolist()):
        u, v = encoder.prefix_task_cols[task], encoder.prefix_task_rows[task]  # (P, r), (r, d)
        task_matrix = torch.stack(
            [
                torch.stack([sum(u[i, k] * v[k, j] for k in range(RANKS)) for j in range(shared.shape[1])])
                for i in range(P)
            ]
        )
        prompt = shared * task_matrix
        embeds = torch.cat([prompt, base.get_input_embeddings()(inputs["input_ids"][b])], dim=0)
        mask = torch.cat([torch.ones(P, dtype=torch.long), inputs["attention_mask"][b]])
        with torch.no_grad():
            rows.append(base(inputs_embeds=embeds[None], attention_mask=mask[None]).logits[0])
    torch.testing.assert_close(_logits(model, **inputs), torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_each_row_gets_its_own_tasks_prompt() -> None:
    model = get_peft_model(build_model("llama"), _config(peftkit, "CAUSAL_LM"))
    _perturb(model)
    ids = model_inputs(batch_size=1, seq_len=6)["input_ids"].expand(TASKS, -1)  # the same text for every task
    logits = _logits(model, torch.arange(TASKS), input_ids=ids)
    for a in range(TASKS):
        for b in range(a + 1, TASKS):
            assert not torch.allclose(logits[a], logits[b], atol=1e-4), (a, b)
    # a row's output depends on its own task only, not on the other rows of the batch
    for task in range(TASKS):
        alone = _logits(model, torch.tensor([task]), input_ids=ids[:1])
        torch.testing.assert_close(alone[0], logits[task], atol=1e-5, rtol=1e-5)


def test_training_on_two_tasks_lowers_both_losses_and_separates_them() -> None:
    """The same texts continue with token 5 under task 0 and with token 9 under task 1: only the
    task-specific factors can tell the rows apart. (A base with larger weights than the default tiny model,
    whose logits barely move whatever the input, so that 30 steps show the effect.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base_config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        initializer_range=0.2,
    )
    base = LlamaForCausalLM(base_config).eval()
    model = get_peft_model(base, _config(peftkit, "CAUSAL_LM", num_tasks=2, num_ranks=2))
    ids = model_inputs(batch_size=4, seq_len=6)["input_ids"].repeat_interleave(2, dim=0)  # each text twice
    task_ids = torch.tensor([0, 1] * 4)
    targets = torch.where(task_ids == 0, 5, 9)
    labels = torch.full((8, 7), -100)
    labels[:, -1] = targets
    batch = {"input_ids": torch.cat([ids, targets[:, None]], dim=1), "labels": labels, "task_ids": task_ids}

    def last_logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, task_ids=task_ids).logits[:, -1]  # predicts the target

    def task_losses(logits: torch.Tensor) -> list[float]:
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return [float(losses[task_ids == t].mean()) for t in (0, 1)]

    before = task_losses(last_logits())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(30):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    logits = last_logits()
    after = task_losses(logits)
    assert after[0] < 0.6 * before[0] and after[1] < 0.6 * before[1], (before, after)
    margin = logits[:, 5] - logits[:, 9]  # same text, opposite preference by task
    assert (margin[task_ids == 0] > 0).all() and (margin[task_ids == 1] < 0).all(), margin


# ------------------------------------------------------------------------------------- transfer
@pytest.fixture
def source_dir(tmp_path: Any) -> Any:
    """A trained-looking source run over TASKS tasks, saved in HF PEFT's format."""
    source = get_peft_model(build_model("llama"), _config(peftkit, "CAUSAL_LM"))
    _perturb(source)
    source.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_exact_source_task_starts_the_target_as_that_source_task(source_dir: Any) -> None:
    source = PeftModel.from_pretrained(build_model("llama"), source_dir)
    path = str(source_dir / "adapter_model.safetensors")
    target = get_peft_model(
        build_model("llama"),
        _config(
            peftkit,
            "CAUSAL_LM",
            num_tasks=1,
            prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path=path,
            prompt_tuning_init_task=1,
        ),
    )
    ids = model_inputs(batch_size=2, seq_len=5)["input_ids"]
    torch.testing.assert_close(
        _logits(target, torch.tensor([0, 0]), input_ids=ids),
        _logits(source, torch.tensor([1, 1]), input_ids=ids),
    )
    # HF PEFT makes the same start from the same file
    hf_target = peft.get_peft_model(
        build_model("llama"),
        _config(
            peft,
            "CAUSAL_LM",
            num_tasks=1,
            prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path=path,
            prompt_tuning_init_task=1,
        ),
    )
    hf_encoder = hf_target.prompt_encoder["default"]
    for name, param in _encoder(target).named_parameters():
        assert torch.equal(param, hf_encoder.get_parameter(name)), name
    assert all(p.requires_grad for p in _encoder(target).parameters())  # the target trains from there


def test_average_and_shared_only_inits(source_dir: Any) -> None:
    tensors = load_file(source_dir / "adapter_model.safetensors")
    average = get_peft_model(
        build_model("llama"),
        _config(
            peftkit,
            "CAUSAL_LM",
            num_tasks=1,
            prompt_tuning_init="AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=str(source_dir),  # a folder works too
        ),
    )
    encoder = _encoder(average)
    assert torch.equal(encoder.embedding.weight, tensors["prompt_embeddings"])
    torch.testing.assert_close(encoder.prefix_task_cols[0], tensors["prefix_task_cols"].mean(0))
    torch.testing.assert_close(encoder.prefix_task_rows[0], tensors["prefix_task_rows"].mean(0))
    torch.manual_seed(3)
    shared = get_peft_model(
        build_model("llama"),
        _config(
            peftkit,
            "CAUSAL_LM",
            num_tasks=5,
            prompt_tuning_init="ONLY_SOURCE_SHARED",
            prompt_tuning_init_state_dict_path=str(source_dir / "adapter_model.safetensors"),
        ),
    )
    encoder = _encoder(shared)
    assert torch.equal(encoder.embedding.weight, tensors["prompt_embeddings"])
    assert encoder.prefix_task_cols.shape == (5, P, RANKS)
    assert float(encoder.prefix_task_cols.detach().std()) < 0.05  # fresh N(0, 0.02²) factors


def test_bad_transfer_settings_are_clear_errors(source_dir: Any, tmp_path: Any) -> None:
    path = str(source_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_state_dict_path"):
        MultitaskPromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ValueError, match="needs num_tasks=1"):
        MultitaskPromptTuningConfig(
            num_virtual_tokens=P,
            num_tasks=2,
            prompt_tuning_init="AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=path,
        )
    with pytest.raises(ValueError, match="prompt_tuning_init_task=7, but the source checkpoint has 3 tasks"):
        get_peft_model(
            build_model("llama"),
            MultitaskPromptTuningConfig(
                num_virtual_tokens=P,
                num_ranks=RANKS,
                prompt_tuning_init="EXACT_SOURCE_TASK",
                prompt_tuning_init_state_dict_path=path,
                prompt_tuning_init_task=7,
            ),
        )
    with pytest.raises(ValueError, match="does not fit this prompt"):
        get_peft_model(
            build_model("llama"),
            MultitaskPromptTuningConfig(
                num_virtual_tokens=P + 1,
                num_ranks=RANKS,
                prompt_tuning_init="EXACT_SOURCE_TASK",
                prompt_tuning_init_state_dict_path=path,
            ),
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_peft_model(
            build_model("llama"),
            MultitaskPromptTuningConfig(
                num_virtual_tokens=P,
                prompt_tuning_init="ONLY_SOURCE_SHARED",
                prompt_tuning_init_state_dict_path=str(tmp_path / "missing.safetensors"),
            ),
        )
    base = build_model("llama")
    lora_dir = tmp_path / "lora"
    get_peft_model(base, peftkit.LoraConfig(r=2)).save_pretrained(lora_dir)
    with pytest.raises(ValueError, match="needs a Multitask Prompt Tuning checkpoint"):
        get_peft_model(
            build_model("llama"),
            MultitaskPromptTuningConfig(
                num_virtual_tokens=P,
                prompt_tuning_init="ONLY_SOURCE_SHARED",
                prompt_tuning_init_state_dict_path=str(lora_dir),
            ),
        )


# ------------------------------------------------------------------------------------ generation
def test_generate_with_task_ids_equals_full_forward_passes_and_batches() -> None:
    model = get_peft_model(build_model("llama"), _config(peftkit, "CAUSAL_LM"))
    _perturb(model, scale=3.0)
    model.eval()
    prompts = [[5, 17, 42, 8, 9], [33, 2, 71]]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    outputs = {}
    for task in range(TASKS):
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            expected = ids
            for _ in range(5):  # greedy by full forward passes, no cache
                with torch.no_grad():
                    logits = model(input_ids=expected, task_ids=torch.tensor([task])).logits
                expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
            with torch.no_grad():
                got = model.generate(input_ids=ids, task_ids=torch.tensor([task]), **kwargs)
            assert torch.equal(got, expected), (task, row)
            outputs[task, row] = got[0, len(prompt) :].tolist()
    assert len({tuple(outputs[t, 0]) for t in range(TASKS)}) > 1  # the task changes the continuation
    # a left-padded batch with a different task per row gives each row's own continuation
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([2, 1]), **kwargs)
        # beam search repeats each row num_beams times; task_ids must follow that repetition
        beams = model.generate(
            input_ids=ids, attention_mask=mask, task_ids=torch.tensor([2, 1]), num_beams=3, **kwargs
        )
        beams_alone = [
            model.generate(input_ids=torch.tensor([p]), task_ids=torch.tensor([t]), num_beams=3, **kwargs)[0]
            for p, t in zip(prompts, (2, 1), strict=True)
        ]
    assert batched[0, width:].tolist() == outputs[2, 0]
    assert batched[1, width:].tolist() == outputs[1, 1]
    assert [beams[row, width:].tolist() for row in range(2)] == [
        alone[len(p) :].tolist() for alone, p in zip(beams_alone, prompts, strict=True)
    ]


# ------------------------------------------------------------------------------------- bad input
def test_task_ids_are_required_and_checked() -> None:
    model = get_peft_model(build_model("llama"), _config(peftkit, "CAUSAL_LM"))
    inputs = _inputs()
    with pytest.raises(ValueError, match="needs task_ids"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        model(**inputs, task_ids=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(**inputs, task_ids=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="The batch has 3 rows but task_ids gave prompts for 2"):
        model(**inputs, task_ids=torch.tensor([0, 1]))
    with torch.no_grad(), model.disable_adapter():  # the base model never sees task_ids
        torch.testing.assert_close(
            model(**inputs, task_ids=TASK_IDS).logits, build_model("llama")(**inputs).logits
        )
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        MultitaskPromptTuningConfig(num_virtual_tokens=P, num_tasks=0)
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        MultitaskPromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="SOURCE")


def test_encoder_decoder_models_are_a_clear_error() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50, d_kv=8)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_peft_model(t5, MultitaskPromptTuningConfig(num_virtual_tokens=P, task_type="SEQ_2_SEQ_LM"))
    assert all(p.requires_grad for p in t5.parameters())  # nothing was frozen
