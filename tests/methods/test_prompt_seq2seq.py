"""Soft prompts on encoder-decoder models (T5, BART) against HF PEFT and independent references: checkpoints
both ways with the same logits and loss, the prompt on the encoder input by hand, the decoder prefix against
the decoder's own cache of real tokens, generation with and without the KV cache, padded batches, and
HF PEFT's handling of labels and decoder masks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_model, tiny_bart, tiny_t5
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import peftkit
from peftkit import PeftModel, get_peft_model

peft = pytest.importorskip("peft")

P = 3
LAYERS = 3  # odd: HF PEFT's seq2seq prefix regrouping then gives every decoder layer its own rows
VOCAB = 60


BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {"t5": tiny_t5, "bart": tiny_bart}


def _configs(lib: Any) -> dict[str, Callable[[], Any]]:
    task = "SEQ_2_SEQ_LM"
    return {
        "prompt": lambda: lib.PromptTuningConfig(num_virtual_tokens=P, task_type=task),
        "ptuning-mlp": lambda: lib.PromptEncoderConfig(
            num_virtual_tokens=P, encoder_hidden_size=8, task_type=task
        ),
        "ptuning-lstm": lambda: lib.PromptEncoderConfig(
            num_virtual_tokens=P,
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=8,
            task_type=task,
        ),
        "prefix": lambda: lib.PrefixTuningConfig(num_virtual_tokens=P, task_type=task),
        "prefix-proj": lambda: lib.PrefixTuningConfig(
            num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8, task_type=task
        ),
    }


INTEROP = [(kind, method) for kind in BUILDERS for method in _configs(peftkit)]


def _inputs() -> dict[str, torch.Tensor]:
    """A right-padded encoder batch, labels and a decoder mask with a padded position."""
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    labels = torch.randint(3, VOCAB, (2, 4), generator=generator)
    decoder_attention_mask = torch.ones_like(labels)
    decoder_attention_mask[0, -1] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "decoder_attention_mask": decoder_attention_mask,
    }


def _perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Any:
    with torch.no_grad():
        return model(**(inputs if inputs is not None else _inputs()))


def _assert_same_outputs(a: Any, b: Any) -> None:
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- HF PEFT
@pytest.mark.parametrize(("kind", "method"), INTEROP)
def test_hf_checkpoint_loads_in_peftkit_with_same_logits(kind: str, method: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    hf_model = peft.get_peft_model(BUILDERS[kind](), _configs(peft)[method]())
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    _assert_same_outputs(_run(ours), _run(hf_model))
    # the adapter does change the output
    assert not torch.allclose(_run(ours).logits, _run(BUILDERS[kind]()).logits, atol=1e-4)


@pytest.mark.parametrize(("kind", "method"), INTEROP)
def test_peftkit_checkpoint_loads_in_hf_with_same_logits(kind: str, method: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    ours = get_peft_model(BUILDERS[kind](), _configs(peftkit)[method]())
    torch.manual_seed(0)
    hf_fresh = peft.get_peft_model(BUILDERS[kind](), _configs(peft)[method]())
    assert ours.get_nb_trainable_parameters() == hf_fresh.get_nb_trainable_parameters()
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    _assert_same_outputs(_run(hf_model), _run(ours))
    hf_dir = tmp_path / "hf"
    hf_fresh.save_pretrained(hf_dir)
    ours_sd = load_file(tmp_path / "adapter_model.safetensors")
    hf_sd = load_file(hf_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    hf_saved = json.loads((hf_dir / "adapter_config.json").read_text())
    for key in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert saved[key] == hf_saved[key], key
    assert saved["num_transformer_submodules"] == 2


# ---------------------------------------------------------------------------- independent checks
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_prompt_goes_before_the_encoder_input_by_hand(kind: str) -> None:
    """HF PEFT's seq2seq prompt: the first P of its 2P rows before the encoder input, the mask extended,
    labels and decoder inputs untouched."""
    model = get_peft_model(BUILDERS[kind](), peftkit.PromptTuningConfig(num_virtual_tokens=P))
    _perturb(model)
    table = model.base_model.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * P, 16)
    base = BUILDERS[kind]()
    inputs = _inputs()
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    by_hand = {
        **inputs,
        "input_ids": None,
        "inputs_embeds": torch.cat([table[:P].expand(2, -1, -1), embeds], dim=1),
        "attention_mask": torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], dim=1),
    }
    _assert_same_outputs(_run(model), _run(base, by_hand))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_decoder_prefix_equals_the_decoders_own_cache_of_real_tokens(kind: str) -> None:
    """Fill the prefix with the keys and values the decoder computes for P real decoder tokens (through HF
    PEFT's row layout); decoding the rest must give the full decoder sequence's logits. The encoder is
    untouched (HF PEFT gives it no prefix)."""
    base = BUILDERS[kind]()
    inputs = _inputs()
    decoder_ids = torch.randint(3, VOCAB, (2, P + 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = base(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            decoder_input_ids=decoder_ids,
            use_cache=True,
        )
    model = get_peft_model(BUILDERS[kind](), peftkit.PrefixTuningConfig(num_virtual_tokens=P))
    tuner = model.base_model
    dims = tuner.prompt_dims["default"]
    rows = [torch.zeros(P, dims.token_dim) for _ in range(2 * LAYERS)]  # (L·2) blocks of (P, H·d)
    self_cache = full.cache.self_attention_cache
    for layer, (key_row, value_row) in enumerate(tuner.prefix_rows(dims)):
        for row, tensor in (
            (key_row, self_cache.layers[layer].keys),
            (value_row, self_cache.layers[layer].values),
        ):
            rows[row] = tensor[0, :, :P].permute(1, 0, 2).reshape(P, -1)  # batch row 0's tokens, (P, H·d)
    assert sorted(r for pair in tuner.prefix_rows(dims) for r in pair) == list(range(2 * LAYERS))
    with torch.no_grad():
        tuner.prompt_encoder["default"].embedding.weight.copy_(torch.cat(rows, dim=1))
    out = _run(
        model,
        {
            "input_ids": inputs["input_ids"][:1],
            "attention_mask": inputs["attention_mask"][:1],
            "decoder_input_ids": decoder_ids[:1, P:],
        },
    )
    torch.testing.assert_close(out.logits, full.logits[:1, P:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.encoder_last_hidden_state, full.encoder_last_hidden_state[:1])


def test_hf_layout_leaves_half_the_prefix_unused_with_two_layers() -> None:
    """A documented quirk of HF PEFT's layout, kept for compatibility: with an even number of decoder layers
    some rows are never read (two layers: both read the first layer's rows), so they get no gradient."""
    torch.manual_seed(0)
    config = T5Config(
        d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0
    )
    model = get_peft_model(
        T5ForConditionalGeneration(config), peftkit.PrefixTuningConfig(num_virtual_tokens=P)
    )
    tuner = model.base_model
    assert tuner.prefix_rows(tuner.prompt_dims["default"]) == [(0, 1), (0, 1)]
    inputs = _inputs()
    model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss.backward()
    grad = tuner.prompt_encoder["default"].embedding.weight.grad.view(P, 4, -1)  # (P, L·2, H·d)
    assert grad[:, :2].abs().sum() > 0 and grad[:, 2:].abs().sum() == 0


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_labels_and_decoder_mask_are_handled_as_hf_peft_does(kind: str) -> None:
    """Prompt: labels as given, loss over the labels only. Prefix: the decoder mask gets P leading ones (a
    padded decoder position changes the other positions' logits only through that mask)."""
    for method in ("prompt", "prefix"):
        torch.manual_seed(0)
        model = get_peft_model(BUILDERS[kind](), _configs(peftkit)[method]())
        _perturb(model)
        inputs = _inputs()
        out = _run(model, inputs)
        assert out.logits.shape == (2, 4, VOCAB)
        expected = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, VOCAB), inputs["labels"].reshape(-1)
        )
        torch.testing.assert_close(out.loss, expected)
        without_mask = _run(model, {k: v for k, v in inputs.items() if k != "decoder_attention_mask"})
        torch.testing.assert_close(out.logits[1], without_mask.logits[1])  # row 1's decoder mask is all ones


# ----------------------------------------------------------------------------------- generation
GENERATE = [(kind, method) for kind in BUILDERS for method in ("prompt", "ptuning-mlp", "prefix")]


def _trained(kind: str, method: str) -> PeftModel:
    torch.manual_seed(0)
    # no eos: fixed lengths; larger weights than the default, whose greedy decoding mostly repeats one token
    model = get_peft_model(BUILDERS[kind](eos=None, lively=True), _configs(peftkit)[method]())
    _perturb(model, scale=2.0)
    return model.eval()


def _greedy_without_cache(
    model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    start = model.get_base_model().config.decoder_start_token_id
    decoded = torch.full((ids.shape[0], 1), start)
    for _ in range(steps):
        logits = _run(model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoded}).logits
        decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
    return decoded


@pytest.mark.parametrize(("kind", "method"), GENERATE)
def test_generate_with_cache_equals_full_forward_passes(kind: str, method: str) -> None:
    model = _trained(kind, method)
    ids = torch.tensor([[5, 17, 42, 8, 9, 23]])
    mask = torch.ones_like(ids)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    expected = _greedy_without_cache(model, ids, mask, 6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        with model.disable_adapter():
            base_tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    plain = BUILDERS[kind](eos=None, lively=True)
    assert torch.equal(base_tokens, plain.generate(input_ids=ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize(("kind", "method"), GENERATE)
def test_padded_batch_generates_as_one_input_at_a_time(kind: str, method: str) -> None:
    model = _trained(kind, method)
    sources = [[5, 17, 42, 8, 9], [33, 12, 51]]
    width = max(map(len, sources))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sources])  # encoder inputs are right-padded
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        singles = [model.generate(input_ids=torch.tensor([s]), **kwargs)[0] for s in sources]
    assert [row.tolist() for row in batched] == [s.tolist() for s in singles]


# ------------------------------------------------------------------------------------- bad input
def test_sizes_that_do_not_fit_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_transformer_submodules=1 does not fit"):
        get_peft_model(
            tiny_t5(), peftkit.PromptTuningConfig(num_virtual_tokens=P, num_transformer_submodules=1)
        )
    with pytest.raises(ValueError, match="num_transformer_submodules=2 does not fit"):
        get_peft_model(
            build_model("gpt2"),
            peftkit.PromptTuningConfig(num_virtual_tokens=P, num_transformer_submodules=2),
        )
    torch.manual_seed(0)
    uneven = BartForConditionalGeneration(
        BartConfig(
            d_model=16,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            vocab_size=VOCAB,
        )
    )
    with pytest.raises(ValueError, match="3 decoder layers for a prefix of 2 layers"):
        get_peft_model(uneven, peftkit.PrefixTuningConfig(num_virtual_tokens=P))
    wide_heads = T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2, vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match="key width 4·2"):
        get_peft_model(wide_heads, peftkit.PrefixTuningConfig(num_virtual_tokens=P))
    # an embedding prompt does not depend on the decoder's sizes
    get_peft_model(uneven, peftkit.PromptTuningConfig(num_virtual_tokens=P))
