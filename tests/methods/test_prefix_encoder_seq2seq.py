"""Prefix Tuning with ``encoder_prefix=True`` on encoder-decoder models (T5, BART): every encoder
self-attention layer gets its own trained keys and values (peftkit only; HF PEFT prefixes the decoder alone).

Checks: each encoder attention layer against attention written out from the layer's own weights (eager and
sdpa, with padding); the option off is HF PEFT's behaviour bit for bit (same initial table, logits and files);
training reaches every layer's encoder prefix; save/load is exact; generation with the cache equals greedy
full forward passes and padded batches equal one input at a time; clear errors where the option cannot work.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_prompt_seq2seq import BUILDERS, LAYERS, VOCAB, _inputs, _perturb
from tiny_models import build_model, tiny_t5
from transformers import (
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    PegasusConfig,
    PegasusForConditionalGeneration,
)

import peftkit
from peftkit import PeftModel, get_peft_model
from peftkit.methods.prefix_tuning import ENCODER_PROMPT_KEY, EncoderDecoderPrefix

P = 3
HEADS, HEAD_DIM = 2, 8  # both tiny models: d_model 16, 2 heads of 8


def tiny_mt5(seed: int = 0) -> MT5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = MT5Config(
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=LAYERS,
        num_heads=2,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    return MT5ForConditionalGeneration(config).eval()


def tiny_mbart(seed: int = 0) -> MBartForConditionalGeneration:
    torch.manual_seed(seed)
    config = MBartConfig(
        d_model=16,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return MBartForConditionalGeneration(config).eval()


#: the same architectures' copies in transformers, checked layer by layer only
ALL_BUILDERS = {**BUILDERS, "mt5": tiny_mt5}


def _model(kind: str, seed: int = 0, **config: Any) -> PeftModel:
    torch.manual_seed(seed)
    peft_config = peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True, **config)
    return get_peft_model(ALL_BUILDERS[kind](), peft_config)


def _encoder_table(model: PeftModel) -> torch.Tensor:
    prompt = model.base_model.prompt_encoder["default"]
    assert isinstance(prompt, EncoderDecoderPrefix)
    return prompt.encoder()  # (P, L·2·H·d)


def _self_attention(base: torch.nn.Module, kind: str) -> list[torch.nn.Module]:
    encoder = base.get_encoder()
    if kind in ("t5", "mt5"):
        return [block.layer[0].SelfAttention for block in encoder.block]
    return [layer.self_attn for layer in encoder.layers]


def _attention_by_hand(
    kind: str,
    module: torch.nn.Module,
    hidden: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    mask: torch.Tensor,
    token_bias: torch.Tensor | None,
) -> torch.Tensor:
    """softmax(Q [K_prefix ; K]ᵀ·s + [0 ; B] + mask) [V_prefix ; V], then the output projection."""
    batch, seq_len, _ = hidden.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, seq_len, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, d)

    if kind in ("t5", "mt5"):  # no biases, no 1/√d (T5 folds it into the initialisation)
        q, k, v = (heads(hidden @ lin.weight.T) for lin in (module.q, module.k, module.v))
        scale, out = 1.0, module.o
    else:
        q, k, v = (heads(lin(hidden)) for lin in (module.q_proj, module.k_proj, module.v_proj))
        scale, out = HEAD_DIM**-0.5, module.out_proj
    k = torch.cat([prefix_keys.expand(batch, -1, -1, -1), k], dim=2)  # (B, H, P + T, d)
    v = torch.cat([prefix_values.expand(batch, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, T, P + T)
    if token_bias is not None:
        scores[..., P:] += token_bias  # prefix positions: no position bias
    keep = torch.cat([torch.ones(batch, P, dtype=torch.bool), mask.bool()], dim=1)[:, None, None, :]
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return out((weights @ v).transpose(1, 2).reshape(batch, seq_len, HEADS * HEAD_DIM))


# ---------------------------------------------------------------------------------- (1) by hand
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", list(ALL_BUILDERS))
def test_every_encoder_attention_layer_equals_attention_by_hand(kind: str, implementation: str) -> None:
    """Each encoder self-attention layer's output, from the input it was given, against the formula written
    out from the layer's weights and the encoder table (HF PEFT's layout: layer l's keys are block 2l)."""
    model = _model(kind)
    _perturb(model)
    base = model.get_base_model()
    base.set_attn_implementation(implementation)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = _self_attention(base, kind)
    handles = [
        module.register_forward_hook(
            lambda mod, args, output, layer=layer: seen.__setitem__(layer, (args[0], output[0]))
        )
        for layer, module in enumerate(modules)
    ]
    inputs = _inputs()  # row 1 is right-padded
    with torch.no_grad():
        out = model(**inputs)
        table = (
            _encoder_table(model).view(P, LAYERS * 2, HEADS, HEAD_DIM).permute(1, 2, 0, 3)
        )  # (L·2, H, P, d)
        seq_len = inputs["input_ids"].shape[1]
        # T5: the tokens keep the model's own relative bias (computed by layer 0, shared by all layers)
        bias = modules[0].compute_bias(seq_len, seq_len) if kind in ("t5", "mt5") else None
        for layer, module in enumerate(modules):
            hidden, output = seen[layer]
            expected = _attention_by_hand(
                kind, module, hidden, table[2 * layer], table[2 * layer + 1], inputs["attention_mask"], bias
            )
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    for handle in handles:
        handle.remove()
    assert not any(module._forward_pre_hooks for module in modules)  # hooks live only inside a forward
    with torch.no_grad():
        plain_out = ALL_BUILDERS[kind]()(**inputs)
    assert not torch.allclose(out.encoder_last_hidden_state, plain_out.encoder_last_hidden_state, atol=1e-3)


def test_eager_and_sdpa_agree() -> None:
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = _model("t5")
        _perturb(model)
        model.get_base_model().set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(**_inputs()).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- (2) option off
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_option_off_is_hf_peft_bit_for_bit(kind: str, tmp_path: Any) -> None:
    """Off (the default): the same initial table as HF PEFT from one seed, the same logits bit for bit, the
    encoder untouched, and a saved config and file with exactly HF PEFT's keys and values."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = get_peft_model(
        BUILDERS[kind](), peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=False)
    )
    torch.manual_seed(0)
    hf = peft.get_peft_model(
        BUILDERS[kind](), peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="SEQ_2_SEQ_LM")
    )
    assert type(ours.base_model.prompt_encoder["default"]).__name__ == "PromptTable"
    assert torch.equal(
        ours.base_model.prompt_encoder["default"].embedding.weight,
        hf.prompt_encoder["default"].embedding.weight,
    )
    inputs = _inputs()
    with torch.no_grad():
        ours_out, hf_out, plain_out = ours(**inputs), hf(**inputs), BUILDERS[kind]()(**inputs)
    assert torch.equal(ours_out.logits, hf_out.logits)
    assert torch.equal(ours_out.encoder_last_hidden_state, plain_out.encoder_last_hidden_state)

    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    hf_saved = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert "encoder_prefix" not in saved and set(saved) <= set(hf_saved)
    shared = ("peft_type", "num_virtual_tokens", "prefix_projection", "inference_mode", "token_dim")
    for key in (*shared, "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert saved[key] == hf_saved[key], key
    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    hf_sd = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    assert ours_sd.keys() == hf_sd.keys() == {"prompt_embeddings"}
    assert torch.equal(ours_sd["prompt_embeddings"], hf_sd["prompt_embeddings"])


def test_option_on_keeps_the_decoder_table_of_the_same_seed() -> None:
    """The encoder table is drawn after the decoder's: one seed gives the same decoder prefix on or off."""
    on = _model("t5").base_model.prompt_encoder["default"]
    torch.manual_seed(0)
    off = get_peft_model(tiny_t5(), peftkit.PrefixTuningConfig(num_virtual_tokens=P)).base_model
    assert torch.equal(on.decoder.embedding.weight, off.prompt_encoder["default"].embedding.weight)
    assert on.encoder.embedding.weight.shape == (P, LAYERS * 2 * HEADS * HEAD_DIM)
    assert "encoder_prefix" not in peftkit.PrefixTuningConfig(num_virtual_tokens=P).to_dict()
    assert peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True).to_dict()["encoder_prefix"]


# ------------------------------------------------------------------------------- (3) training
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_training_reaches_every_layers_encoder_prefix(kind: str) -> None:
    model = _model(kind, prefix_projection=True, encoder_hidden_size=8)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder.default." in n for n in trainable)
    assert any(".encoder.transform." in n for n in trainable)
    encoder_part = model.base_model.prompt_encoder["default"].encoder
    tables: list[torch.Tensor] = []  # the MLP's output, the encoder table this forward uses

    def keep_table(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        tables.append(output)

    handle = encoder_part.register_forward_hook(keep_table)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = _inputs()
    loss = model(**inputs).loss
    handle.remove()
    loss.backward()
    assert len(tables) == 1  # computed once per forward, not once per layer
    per_block = tables[0].grad.view(P, LAYERS * 2, -1).abs().sum(dim=(0, 2))
    assert (per_block > 0).all(), per_block  # every layer's keys and values
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_part.parameters())
    optimizer.step()
    with torch.no_grad():
        assert model(**inputs).loss < loss


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_disabled_adapter_gives_the_base_model(kind: str) -> None:
    model = _model(kind)
    _perturb(model)
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**_inputs())
    with torch.no_grad():
        plain = BUILDERS[kind]()(**_inputs())
    assert torch.equal(disabled.logits, plain.logits)


# ------------------------------------------------------------------------------- (4) save/load
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_save_and_load_round_trip_is_exact(kind: str, projection: bool, tmp_path: Any) -> None:
    model = _model(kind, prefix_projection=projection, encoder_hidden_size=8 if projection else None)
    _perturb(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["encoder_prefix"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (P, LAYERS * 2 * 16),
        ENCODER_PROMPT_KEY: (P, LAYERS * 2 * HEADS * HEAD_DIM),
    }
    with torch.no_grad():
        assert torch.equal(tensors[ENCODER_PROMPT_KEY], _encoder_table(model))
        expected = model(**_inputs())
    loaded = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    assert loaded.peft_config["default"].encoder_prefix is True
    with torch.no_grad():
        got = loaded(**_inputs())
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.encoder_last_hidden_state, expected.encoder_last_hidden_state)
    trainable = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {
        "base_model.prompt_encoder.default.decoder.embedding.weight",
        "base_model.prompt_encoder.default.encoder.embedding.weight",
    }


# ------------------------------------------------------------------------------ (5) generation
def _trained(kind: str) -> PeftModel:
    torch.manual_seed(0)
    # no eos: fixed lengths; larger weights than the default, whose greedy decoding mostly repeats one token
    base = BUILDERS[kind](eos=None, lively=True)
    model = get_peft_model(base, peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True))
    _perturb(model, scale=2.0)
    return model.eval()


def _greedy_without_cache(
    model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    decoded = torch.full((ids.shape[0], 1), model.get_base_model().config.decoder_start_token_id)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded).logits
        decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
    return decoded


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_generate_with_cache_equals_full_forward_passes(kind: str) -> None:
    model = _trained(kind)
    ids = torch.tensor([[5, 17, 42, 8, 9, 23]])
    mask = torch.ones_like(ids)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    expected = _greedy_without_cache(model, ids, mask, 6)
    cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    without_encoder_prefix = _trained(kind)
    without_encoder_prefix.base_model.prompt_encoder["default"] = model.base_model.prompt_encoder[
        "default"
    ].decoder
    other = without_encoder_prefix.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert not torch.equal(other, cached)  # the encoder prefix does change what is generated


@pytest.mark.parametrize(("kind", "side"), [("t5", "right"), ("t5", "left"), ("bart", "right")])
def test_padded_batch_generates_as_one_input_at_a_time(kind: str, side: str) -> None:
    """Prefix positions carry no position bias, so T5 rows give the same tokens with either padding side
    (BART's absolute positions make its encoder right-padded only, as without a prefix)."""
    model = _trained(kind)
    sources = [[5, 17, 42, 8, 9], [33, 12, 51]]
    width = max(map(len, sources))

    def pad(row: list[int], value: int) -> list[int]:
        padding = [value] * (width - len(row))
        return row + padding if side == "right" else padding + row

    ids = torch.tensor([pad(s, 0) for s in sources])
    mask = torch.tensor([pad([1] * len(s), 0) for s in sources])
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    singles = [model.generate(input_ids=torch.tensor([s]), **kwargs)[0] for s in sources]
    assert [row.tolist() for row in batched] == [s.tolist() for s in singles]


# ------------------------------------------------------------------------------------ (6) errors
def test_the_option_where_it_cannot_work_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="encoder_prefix=True is for encoder-decoder models"):
        get_peft_model(
            build_model("gpt2"), peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True)
        )
    torch.manual_seed(0)
    pegasus = PegasusForConditionalGeneration(
        PegasusConfig(
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match="not 'pegasus'"):
        get_peft_model(pegasus, peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True))
    get_peft_model(pegasus, peftkit.PrefixTuningConfig(num_virtual_tokens=P))  # HF PEFT's prefix still works
    with pytest.raises(ValueError, match="not 'mbart'"):  # its encoder attention has no layer_idx
        get_peft_model(tiny_mbart(), peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True))
    with pytest.raises(ValueError, match="encoder_prefix must be True or False"):
        peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix="yes")  # type: ignore[arg-type]
