"""Soft prompts (Prompt Tuning, P-Tuning, Prefix Tuning, P-Tuning v2) against HF PEFT and independent
formulas: checkpoints both ways with the same logits, the prefix mechanism against the model's own cache,
generation with and without the KV cache, left padding, labels, gradient checkpointing and bad input."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_model, model_inputs, tiny_llama

import peftkit
from peftkit import PeftModel, get_peft_model

peft = pytest.importorskip("peft")

P = 3


def _configs(lib: Any, task: str) -> dict[str, Callable[[], Any]]:
    return {
        "prompt": lambda: lib.PromptTuningConfig(num_virtual_tokens=P, task_type=task),
        "prefix": lambda: lib.PrefixTuningConfig(num_virtual_tokens=P, task_type=task),
        "prefix-proj": lambda: lib.PrefixTuningConfig(
            num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16, task_type=task
        ),
        "ptuning-mlp": lambda: lib.PromptEncoderConfig(
            num_virtual_tokens=P, encoder_hidden_size=16, task_type=task
        ),
        "ptuning-lstm": lambda: lib.PromptEncoderConfig(
            num_virtual_tokens=P,
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=8,
            task_type=task,
        ),
    }


INTEROP = [(kind, method) for kind in ("llama", "gpt2") for method in _configs(peftkit, "CAUSAL_LM")] + [
    ("bert_seq_cls", "prompt"),
    ("bert_seq_cls", "ptuning-mlp"),
]


def _inputs() -> dict[str, torch.Tensor]:
    inputs = model_inputs(batch_size=2, seq_len=8)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0
    return inputs


def _task(kind: str) -> str:
    return "SEQ_CLS" if kind == "bert_seq_cls" else "CAUSAL_LM"


def _perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor away from its initialisation (as training would)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("kind", "method"), INTEROP)
def test_hf_checkpoint_loads_in_peftkit_with_same_logits(kind: str, method: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    hf_model = peft.get_peft_model(build_model(kind), _configs(peft, _task(kind))[method]())
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(build_model(kind), tmp_path)
    torch.testing.assert_close(_logits(ours, _inputs()), _logits(hf_model, _inputs()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "method"), INTEROP)
def test_peftkit_checkpoint_loads_in_hf_with_same_logits(kind: str, method: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    ours = get_peft_model(build_model(kind), _configs(peftkit, _task(kind))[method]())
    torch.manual_seed(0)
    hf_fresh = peft.get_peft_model(build_model(kind), _configs(peft, _task(kind))[method]())
    assert ours.get_nb_trainable_parameters() == hf_fresh.get_nb_trainable_parameters()
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(build_model(kind), tmp_path)
    torch.testing.assert_close(_logits(hf_model, _inputs()), _logits(ours, _inputs()), atol=1e-5, rtol=1e-5)
    # the same tensor names and shapes as HF PEFT writes
    hf_dir = tmp_path / "hf"
    hf_fresh.save_pretrained(hf_dir)
    ours_sd, hf_sd = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(hf_dir / "adapter_model.safetensors"),
    )
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    hf_saved = json.loads((hf_dir / "adapter_config.json").read_text())
    for key in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert saved[key] == hf_saved[key], key


def test_saved_ptuning_tensor_is_the_encoder_output(tmp_path: Any) -> None:
    model = get_peft_model(
        build_model("gpt2"), peftkit.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16)
    )
    encoder = model.base_model.prompt_encoder["default"]
    head = encoder.mlp_head
    expected = head[4](torch.relu(head[2](torch.relu(head[0](encoder.embedding.weight)))))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(
        load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"], expected
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_equals_the_models_own_cache_of_real_tokens(kind: str) -> None:
    """Independent check of the prefix layout (GQA included): a prefix holding the keys and values the model
    computes for P real tokens makes the rest of the sequence give the full sequence's logits."""
    base = build_model(kind)
    ids = model_inputs(batch_size=1, seq_len=8)["input_ids"]
    with torch.no_grad():
        full = base(input_ids=ids, use_cache=True)
    model = get_peft_model(build_model(kind), peftkit.PrefixTuningConfig(num_virtual_tokens=P))
    dims = model.base_model.prompt_dims["default"]
    columns = []
    for layer in range(dims.num_layers):
        for tensor in (full.cache.layers[layer].keys, full.cache.layers[layer].values):  # (1, H_kv, T, d)
            columns.append(tensor[0, :, :P].permute(1, 0, 2).reshape(P, -1))  # (P, H_kv·d)
    with torch.no_grad():
        model.base_model.prompt_encoder["default"].embedding.weight.copy_(torch.cat(columns, dim=1))
    torch.testing.assert_close(
        _logits(model, {"input_ids": ids[:, P:]}), full.logits[:, P:], atol=1e-5, rtol=1e-5
    )


def test_prompt_tuning_equals_prepending_embeddings_by_hand() -> None:
    model = get_peft_model(build_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=P))
    base = build_model("llama")
    ids = model_inputs(batch_size=2, seq_len=6)["input_ids"]
    prompt = model.base_model.prompt_encoder["default"].embedding.weight
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    torch.testing.assert_close(_logits(model, {"input_ids": ids}), _logits(base, {"inputs_embeds": embeds}))


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp"])
def test_labels_are_extended_with_ignored_positions(method: str) -> None:
    model = get_peft_model(build_model("gpt2"), _configs(peftkit, "CAUSAL_LM")[method]())
    ids = model_inputs(batch_size=2, seq_len=6)["input_ids"]
    out = model(input_ids=ids, labels=ids)
    # the last virtual token predicts the first real token; the virtual tokens themselves have no target
    logits = out.logits[:, P - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------------------- generation
GENERATE = [(kind, method) for kind in ("llama", "gpt2") for method in ("prompt", "prefix", "ptuning-mlp")]


def _trained(kind: str, method: str) -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(build_model(kind), _configs(peftkit, "CAUSAL_LM")[method]())
    _perturb(model)
    return model.eval()


def _greedy_without_cache(model: PeftModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize(("kind", "method"), GENERATE)
def test_generate_with_cache_equals_full_forward_passes(kind: str, method: str) -> None:
    model = _trained(kind, method)
    ids = model_inputs(batch_size=1, seq_len=5)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = _greedy_without_cache(model, ids, 6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        uncached = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs
        )
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    with torch.no_grad(), model.disable_adapter():
        base_tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(
        base_tokens, build_model(kind).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    )


@pytest.mark.parametrize(("kind", "method"), GENERATE)
def test_left_padded_batch_generates_as_one_prompt_at_a_time(kind: str, method: str) -> None:
    model = _trained(kind, method)
    prompts = [[5, 17, 42, 8, 9], [33, 2, 71]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row, prompt in enumerate(prompts):
            single = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
            assert batched[row, width:].tolist() == single[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------ training, options
def test_gradient_checkpointing_gives_the_same_prompt_gradient() -> None:
    grads = []
    for checkpointing in (False, True):
        base = build_model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = get_peft_model(base, peftkit.PromptTuningConfig(num_virtual_tokens=P)).train()
        ids = model_inputs(batch_size=2, seq_len=6)["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.base_model.prompt_encoder["default"].embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_prefix_with_gradient_checkpointing_is_a_clear_error() -> None:
    base = build_model("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(base, peftkit.PrefixTuningConfig(num_virtual_tokens=P))
    assert not any(p.requires_grad is False for p in base.parameters())  # nothing was frozen


def test_text_init_uses_the_texts_token_embeddings(tmp_path: Any) -> None:
    from cli_fixtures import build_tokenizer
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = build_tokenizer(tmp_path / "tok")
    text = "great movie"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text)["input_ids"]  # [CLS] great movie [SEP]

    def gpt2() -> Any:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=len(tokenizer))).eval()

    base = gpt2()
    config = peftkit.PromptTuningConfig(
        num_virtual_tokens=6,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=folder,
    )
    model = get_peft_model(base, config)
    expected = base.get_input_embeddings().weight[torch.tensor((ids * 2)[:6])]
    torch.testing.assert_close(model.base_model.prompt_encoder["default"].embedding.weight, expected)
    too_long = config.replace(num_virtual_tokens=2)
    with pytest.raises(ValueError, match="prompt_tuning_init_text is 4 tokens long"):
        get_peft_model(gpt2(), too_long)


def test_sample_vocab_init_rows_are_vocabulary_embeddings() -> None:
    base = build_model("llama")
    model = get_peft_model(
        base, peftkit.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    )
    vocab = base.get_input_embeddings().weight
    for row in model.base_model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


def test_ptuning_v2_defaults_follow_the_paper_and_train_the_head() -> None:
    config = peftkit.PTuningV2Config()
    assert (config.num_virtual_tokens, config.prefix_projection, str(config.task_type)) == (
        20,
        False,
        "SEQ_CLS",
    )
    model = get_peft_model(build_model("bert_seq_cls"), peftkit.PTuningV2Config(num_virtual_tokens=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("prompt_encoder" in n for n in trainable)
    # the prefix changes the output, and a zero prefix with an all-masked... keeps the attention well defined
    inputs = _inputs()
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(**inputs).logits
    assert not torch.allclose(_logits(model, inputs), base_logits)
    with pytest.raises(ValueError, match="encoder tasks"):
        peftkit.PTuningV2Config(task_type="CAUSAL_LM")


def test_ptuning_v2_token_classification_with_hf_prefix_layout(tmp_path: Any) -> None:
    from transformers import BertConfig, BertForTokenClassification

    def bert_tok() -> Any:
        torch.manual_seed(0)
        return BertForTokenClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=100,
            )
        ).eval()

    model = get_peft_model(bert_tok(), peftkit.PTuningV2Config(num_virtual_tokens=4, task_type="TOKEN_CLS"))
    inputs = model_inputs(batch_size=2, seq_len=7)
    labels = torch.randint(0, 2, (2, 7))
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, 7, 2)  # a prefix adds keys and values, not positions
    out.loss.backward()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    loaded = PeftModel.from_pretrained(bert_tok(), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs))


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_num_virtual_tokens(n: Any) -> None:
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftkit.PromptTuningConfig(num_virtual_tokens=n)


@pytest.mark.parametrize(
    "config_cls",
    [
        peftkit.PromptTuningConfig,
        peftkit.PrefixTuningConfig,
        peftkit.PromptEncoderConfig,
        peftkit.AdaptionPromptConfig,
    ],
)
def test_configs_build_without_arguments_and_are_checked_when_used(config_cls: type) -> None:
    """As in HF PEFT, ``PromptTuningConfig()`` builds; the missing size is an error once the config is used,
    and the model is left as it was."""
    config = config_cls(task_type="CAUSAL_LM")
    getattr(peft, config_cls.__name__)(task_type="CAUSAL_LM")  # the reference builds it too
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be a positive integer|needs adapter_len"):
        peftkit.get_peft_model(model, config)
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_text_init_without_tokenizer_or_text() -> None:
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peftkit.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"
        )
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        peftkit.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"
        )


def test_models_without_the_needed_structure_are_clear_errors() -> None:
    # (encoder-decoder models are supported: tests/methods/test_prompt_seq2seq.py)
    with pytest.raises(ValueError, match="transformers config or input embeddings"):
        get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), peftkit.PrefixTuningConfig(num_virtual_tokens=2)
        )


def test_merge_mixed_batches_and_two_active_prompts_are_clear_errors() -> None:
    model = get_peft_model(build_model("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="Mixed-adapter batches"):
        model(**_inputs(), adapter_names=["default", "default"])
    model.add_adapter("other", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="only one prompt adapter"):
        model.set_adapter(["default", "other"])
    model.set_adapter("other")  # a second prompt can be switched to
    assert _logits(model, _inputs()).shape == (2, 8 + 2, 100)
    with pytest.raises(ValueError, match="a LORA adapter cannot be added"):
        model.add_adapter("lora", peftkit.LoraConfig(r=2))


def test_inspect_shows_the_stored_prompt(tmp_path: Any, capsys: Any) -> None:
    from peftkit.cli import main

    model = get_peft_model(
        build_model("gpt2"), peftkit.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16)
    )
    model.print_trainable_parameters()
    trainable = model.get_nb_trainable_parameters()[0]
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert trainable == P * 32 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32)  # embedding + MLP
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert "prompt_embeddings" in out and f"{P * 32:,d}" in out
