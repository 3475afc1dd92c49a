"""``Parallel(...)`` beyond plain inference: labels (the loss of the stacked batch is the mean of the tasks'
losses), ``generate`` (equal to generating once per task), encoder-decoder models (T5, BART: the lower
encoder blocks run once), heads that pick the last token from ``input_ids`` (GPT-2 / llama sequence
classification), and the calls a composition refuses. Every expectation comes from separate passes with
``set_adapter(name)``, which do not use the composition's hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_bottleneck import MODELS, inputs, randomize
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from peftkit import BottleneckConfig, Parallel, PeftModel, get_peft_model

NAMES = ["a", "b", "c"]


def task_model(build: Callable[[int], nn.Module], task_type: str | None = None, **kwargs: Any) -> PeftModel:
    """Three different (randomised) adapters a, b, c with ``drop_layers=1``; with ``task_type="SEQ_CLS"``
    each has its own classifier head, also randomised."""
    config = dict(drop_layers=1, task_type=task_type, **kwargs)
    model = get_peft_model(build(0), BottleneckConfig(**config), adapter_name="a")
    for name in NAMES[1:]:
        model.add_adapter(name, BottleneckConfig(**config, non_linearity="gelu"))
    randomize(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, wrapper in model.base_model.save_wrappers():
            for copy in wrapper.modules_to_save.values():
                for p in copy.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
    return model


def separately(model: PeftModel, call: Callable[[], Any]) -> list[Any]:
    out = []
    for name in NAMES:
        model.set_adapter(name)
        with torch.no_grad():
            out.append(call())
    model.set_adapter(Parallel(*NAMES))
    return out


def block_rows(model: PeftModel, stacks: list[str]) -> tuple[list[tuple[str, int]], list[Any]]:
    """Record (block path, rows of its output) for every block of the given stacks."""
    rows: list[tuple[str, int]] = []
    handles = []
    for stack in stacks:
        for i, block in enumerate(model.base_model.model.get_submodule(stack)):
            handles.append(
                block.register_forward_hook(
                    lambda m, a, o, n=f"{stack}.{i}": rows.append(
                        (n, (o[0] if isinstance(o, tuple) else o).shape[0])
                    )
                )
            )
    return rows, handles


# ------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("arch", ["bert", "llama", "t5", "bart"])
def test_labels_give_the_mean_of_the_tasks_losses_and_train_every_task(arch: str) -> None:
    seq_cls = arch == "bert"
    model = task_model(MODELS[arch], task_type="SEQ_CLS" if seq_cls else None)
    batch = inputs(arch, batch=3)
    batch["attention_mask"][1, 5:] = 0
    if seq_cls:
        labels = torch.tensor([0, 1, 0])
    elif arch in ("t5", "bart"):  # the model makes the decoder inputs from the (repeated) labels
        labels = batch.pop("decoder_input_ids")
        labels[1, 3:] = -100
    else:
        labels = batch["input_ids"].clone()
        labels[1, 5:] = -100
    separate = separately(model, lambda: model(**batch, labels=labels))
    out = model(**batch, labels=labels)
    torch.testing.assert_close(
        out.logits.detach(), torch.cat([s.logits for s in separate]), atol=1e-5, rtol=1e-5
    )
    # every copy has the same rows and labels, so the mean over K·B rows is the mean of the K losses
    expected = torch.stack([s.loss for s in separate]).mean()
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for name in NAMES:  # one backward reaches every task's adapter
        grads = [p.grad for p in model.base_model.adapter_parameter_map(name).values() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_equals_generating_once_per_task(arch: str) -> None:
    model = task_model(MODELS[arch])
    batch = inputs(arch, batch=2)
    batch.pop("decoder_input_ids", None)
    if arch != "t5":  # left padding for decoder-only models
        batch["attention_mask"][0, :2] = 0
    settings = dict(
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        use_cache=True,  # generate keeps its cache: every block runs on every copy
        output_scores=True,
        return_dict_in_generate=True,
    )
    separate = separately(model, lambda: model.generate(**batch, **settings))
    together = model.generate(**batch, **settings)
    assert together.sequences.shape[0] == 6
    assert torch.equal(together.sequences, torch.cat([s.sequences for s in separate]))
    for step, scores in enumerate(together.scores):  # (K·B, vocab) per generated token
        expected = torch.cat([s.scores[step] for s in separate])
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(separate[0].scores[0], separate[1].scores[0])  # the tasks really differ


# ----------------------------------------------------------------------------- encoder-decoder
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_runs_the_lower_encoder_blocks_once(arch: str) -> None:
    model = task_model(MODELS[arch], style="houlsby")
    batch = inputs(arch, batch=2)
    batch["attention_mask"][1, 4:] = 0
    separate = separately(model, lambda: model(**batch).logits)
    stacks = (
        ["encoder.block", "decoder.block"]
        if arch == "t5"
        else ["model.encoder.layers", "model.decoder.layers"]
    )
    rows, handles = block_rows(model, stacks)
    with torch.no_grad():
        together = model(**batch).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)
    # the encoder's block 0 (no adapter: drop_layers=1) once; the decoder reads task-specific encoder states
    assert rows == [
        (f"{stacks[0]}.0", 2),
        (f"{stacks[0]}.1", 6),
        (f"{stacks[1]}.0", 6),
        (f"{stacks[1]}.1", 6),
    ]


# ------------------------------------------------------------------------- last-token heads
def _gpt2_seq_cls(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, pad_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


def _llama_seq_cls(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("build", [_gpt2_seq_cls, _llama_seq_cls], ids=["gpt2", "llama"])
def test_heads_that_pick_the_last_token_from_input_ids(build: Callable[[int], nn.Module]) -> None:
    model = task_model(build, task_type="SEQ_CLS")
    batch = inputs("llama", batch=3)
    batch["input_ids"][0, 4:] = 0  # right padding: the head reads the last non-pad token of each row
    batch["attention_mask"][0, 4:] = 0
    separate = separately(model, lambda: model(**batch).logits)
    stack = "transformer.h" if build is _gpt2_seq_cls else "model.layers"
    rows, handles = block_rows(model, [stack])
    with torch.no_grad():
        together = model(**batch).logits
    for handle in handles:
        handle.remove()
    assert together.shape == (9, 2)
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)
    assert rows == [(f"{stack}.0", 3), (f"{stack}.1", 9)]


# ----------------------------------------------------------------------------------- refusals
def test_what_a_composition_refuses_is_a_clear_error() -> None:
    model = task_model(MODELS["llama"])
    model.set_adapter(Parallel(*NAMES))
    batch = inputs("llama")
    with pytest.raises(ValueError, match="use_cache=True"):
        model(**batch, use_cache=True)
    with torch.no_grad():
        cache = MODELS["llama"](0)(**batch, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cache="):
        model(**batch, cache=cache)
    for key in ("num_beams", "num_return_sequences"):
        with pytest.raises(ValueError, match=key):
            model.generate(**batch, max_new_tokens=2, **{key: 2}, do_sample=key != "num_beams")
    with pytest.raises(ValueError, match="mixed batches"):
        model.generate(**batch, max_new_tokens=2, adapter_names=["a", "b"])
    # nothing was left behind: plain calls still work and give K·B rows
    with torch.no_grad():
        assert model(**batch).logits.shape[0] == 6
    # a per-task module copy inside a block that the composition computes once cannot be shared
    shared_copy = get_peft_model(
        MODELS["llama"](0),
        BottleneckConfig(drop_layers=1, modules_to_save=["model.layers.0.mlp.up_proj"]),
        adapter_name="a",
    )
    shared_copy.add_adapter(
        "b", BottleneckConfig(drop_layers=1, modules_to_save=["model.layers.0.mlp.up_proj"])
    )
    shared_copy.set_adapter(Parallel("a", "b"))
    with pytest.raises(ValueError, match="computes once"):
        shared_copy(**batch)
