"""LoRA against its formulas and against HF PEFT's numbers (training, weighted combination, printing)."""

from __future__ import annotations

import copy
import math
import warnings

import peft
import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model


class TwoLayer(nn.Module):
    """A plain torch model (no transformers): the library wraps any nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.emb = nn.Embedding(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _ids(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(7))


QV = ["q_proj", "v_proj"]


def _randomize(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_is_wx_plus_scaled_bax(use_rslora: bool) -> None:
    model = get_peft_model(
        TwoLayer(),
        LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], init_lora_weights=False, use_rslora=use_rslora),
    )
    layer = model.base_model.model.lin
    x = torch.randn(4, 6)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = 6 / math.sqrt(3) if use_rslora else 6 / 3
    expected = x @ W.T + b + scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(model(x), expected)


def test_default_init_is_kaiming_a_and_zero_b() -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=4, target_modules=["lin"]))
    A = model.base_model.model.lin.lora_A["default"].weight
    assert torch.count_nonzero(model.base_model.model.lin.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(6)  # kaiming_uniform_(a=√5) on fan_in=6
    assert A.abs().max() <= bound and A.abs().max() > bound / 2
    gaussian = get_peft_model(
        TwoLayer(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights="gaussian")
    )
    assert torch.count_nonzero(gaussian.base_model.model.lin.lora_B["default"].weight) == 0


def test_dora_forward_matches_the_paper_formula() -> None:
    model = get_peft_model(
        TwoLayer(), LoraConfig(r=2, target_modules=["lin"], use_dora=True, init_lora_weights=False)
    )
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 5))
    x = torch.randn(4, 6)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    adapted = W + layer.scaling["default"] * B @ A
    expected = x @ (m.view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True)).T + b
    torch.testing.assert_close(model(x), expected)


def test_dora_magnitude_starts_at_row_norms() -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    layer = model.base_model.model.lin
    torch.testing.assert_close(
        layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1)
    )


def test_pissa_takes_the_top_singular_directions_and_keeps_w() -> None:
    base = TwoLayer()
    W = base.lin.weight.detach().clone()
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights="pissa")
    )
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    principal = B @ A * layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(principal, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight + principal, W, atol=1e-5, rtol=1e-5)


def test_orthogonal_init_matches_hf_peft_and_leaves_w() -> None:
    """HF PEFT's orthogonal init: the same factors for the same seed, the base weight untouched."""
    factors = {}
    for name, lib in (("peftkit", peftkit), ("peft", peft)):
        base = TwoLayer()
        W = base.lin.weight.detach().clone()
        torch.manual_seed(3)
        model = lib.get_peft_model(
            base, lib.LoraConfig(r=4, target_modules=["lin"], init_lora_weights="orthogonal")
        )
        layer = model.base_model.model.lin
        assert torch.equal(layer.base_layer.weight, W)
        factors[name] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    (A, B), (hf_A, hf_B) = factors["peftkit"], factors["peft"]
    torch.testing.assert_close(A, hf_A)
    torch.testing.assert_close(B, hf_B)
    assert B.abs().max() > 0  # not a no-op at the start (as HF PEFT)
    with pytest.raises(ValueError, match="rank to be even"):
        get_peft_model(TwoLayer(), LoraConfig(r=3, target_modules=["lin"], init_lora_weights="orthogonal"))


def test_olora_uses_qr_and_keeps_w() -> None:
    base = TwoLayer()
    W = base.lin.weight.detach().clone()
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights="olora")
    )
    layer = model.base_model.model.lin
    B = layer.lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(2), atol=1e-5, rtol=1e-5)  # orthonormal columns (Q)
    principal = B @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(layer.base_layer.weight + principal, W, atol=1e-5, rtol=1e-5)


def test_embedding_lora_formula_and_merge() -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    layer = model.base_model.model.emb
    ids = torch.tensor([[1, 4, 9], [0, 2, 2]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer.weight[ids] + layer.scaling["default"] * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected)
    layer.merge()
    torch.testing.assert_close(layer(ids), expected, atol=1e-6, rtol=1e-6)


def test_conv2d_lora_merge_equals_forward() -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    conv = model.base_model.model.conv
    x = torch.randn(2, 3, 5, 5)
    unmerged = conv(x)
    reference = nn.functional.conv2d(x, conv.base_layer.weight, conv.base_layer.bias, padding=1)
    lora = conv.lora_B["default"](conv.lora_A["default"](x)) * conv.scaling["default"]
    torch.testing.assert_close(unmerged, reference + lora)
    conv.merge()
    torch.testing.assert_close(conv(x), unmerged, atol=1e-5, rtol=1e-5)


def test_conv2d_checkpoint_loads_in_hf_peft(tmp_path) -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TwoLayer(), tmp_path)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(theirs.base_model.model.conv(x), model.base_model.model.conv(x))


# --------------------------------------------------------------------------- several adapters
def test_active_adapters_sum_their_updates() -> None:
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=3, target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(4, 6)
    with model.disable_adapter():
        base = model(x)
    first = model(x)
    model.set_adapter("second")
    second = model(x)
    model.set_adapter(["default", "second"])
    assert model.active_adapters == ["default", "second"]
    torch.testing.assert_close(model(x), base + (first - base) + (second - base))


def test_mixed_adapter_batch_rows_equal_single_adapter_outputs() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=2, use_dora=True, init_lora_weights=False))
    _randomize(model)
    ids = _ids(batch=4)
    names = ["default", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        per_adapter = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            per_adapter[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            per_adapter["__base__"] = model(input_ids=ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batch_through_generate() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _randomize(model, scale=0.5)
    ids = _ids(batch=2, length=4)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, adapter_names=["other", "default"], **kwargs)
    model.set_adapter("other")
    first = model.generate(input_ids=ids[:1], **kwargs)
    model.set_adapter("default")
    second = model.generate(input_ids=ids[1:], **kwargs)
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[1], second[0])


def test_mixed_batch_rejects_wrong_length_and_unknown_names() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="one adapter name"):
        model(input_ids=_ids(batch=3), adapter_names=["default"])
    with pytest.raises(ValueError, match="unknown adapters"):
        model(input_ids=_ids(batch=1), adapter_names=["nope"])


# ------------------------------------------------------------------------------ versus HF PEFT
def _two_adapter_models(tmp_path):
    """The same two random adapters loaded into peftkit and into HF PEFT."""
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    ours.set_adapter(["default", "b"])
    _randomize(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "b", "b")
    return ours, theirs


@pytest.mark.parametrize(
    ("combination", "svd_rank"), [("cat", None), ("linear", None), ("svd", None), ("svd", 3)]
)
def test_add_weighted_adapter_matches_hf_peft(tmp_path, combination: str, svd_rank: int | None) -> None:
    ours, theirs = _two_adapter_models(tmp_path)
    kwargs = {"svd_rank": svd_rank} if svd_rank else {}
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination, **kwargs)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination, **kwargs)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


SPARSIFYING = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.parametrize("combination", SPARSIFYING + [f"{c}_svd" for c in SPARSIFYING])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_sparsifying_combinations_match_hf_peft_for_the_same_seed(
    tmp_path, combination: str, sign_method: str
) -> None:
    """TIES / DARE / magnitude pruning: the same logits as HF PEFT, DARE's random masks included."""
    ours, theirs = _two_adapter_models(tmp_path)
    logits = {}
    for name, model in (("peftkit", ours), ("peft", theirs)):
        torch.manual_seed(7)
        model.add_weighted_adapter(
            ["default", "b"], [0.7, -0.4], "mix", combination_type=combination, density=0.4,
            majority_sign_method=sign_method,
        )  # fmt: skip
        model.set_adapter("mix")
        with torch.no_grad():
            logits[name] = model(input_ids=_ids()).logits
    torch.testing.assert_close(logits["peftkit"], logits["peft"], atol=1e-5, rtol=1e-5)


def test_ties_follows_the_paper_on_a_small_example() -> None:
    """Trim to the largest entries, elect the sign of the summed mass, average the agreeing entries."""
    from peftkit.core.merge import combine_tensors

    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -4.0], [2.0, 0.1]])
    # density 0.5 keeps 2 of 4 entries: t1 -> [[3, 0], [0, 2]], t2 -> [[0, -4], [2, 0]]
    # elected signs (sum of kept): [[+, -], [+, +]]; agreeing weighted entries averaged over their count
    got = combine_tensors("ties", [t1, t2], [1.0, 0.5], density=0.5)
    expected = torch.tensor([[3.0, -2.0], [1.0, 2.0]])
    torch.testing.assert_close(got, expected)
    torch.manual_seed(0)
    dare = combine_tensors("dare_linear", [t1], [1.0], density=0.5)
    kept = dare != 0
    torch.testing.assert_close(dare[kept], 2 * t1[kept])  # kept entries rescaled by 1 / density


def test_combinations_of_rslora_and_rank_pattern_adapters_are_exact(tmp_path) -> None:
    """The combined adapter has scaling 1 whatever the inputs' use_rslora (HF PEFT scales an rsLoRA
    combination by √r), and "cat" keeps every rank of rank_pattern layers (HF PEFT sums the default ranks)."""
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=QV))
    ours.add_adapter("b", LoraConfig(r=2, rank_pattern={"q_proj": 6}, target_modules=QV))
    _randomize(ours)
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "cat", combination_type="cat")
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=10)
    assert ours.peft_config["cat"].r == 10 and not ours.peft_config["cat"].use_rslora
    for name in ("q_proj", "v_proj"):
        layer = getattr(ours.base_model.model.model.layers[0].self_attn, name)
        expected = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
        assert layer.scaling["cat"] == 1.0
        torch.testing.assert_close(layer.delta_weight("cat"), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.delta_weight("svd"), expected, atol=1e-5, rtol=1e-4)


def test_sparsifying_combination_needs_density_and_equal_ranks(tmp_path) -> None:
    ours, _ = _two_adapter_models(tmp_path)
    with pytest.raises(ValueError, match="needs density"):
        ours.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="ties")
    ours.add_adapter("r2", LoraConfig(r=2, target_modules=QV))
    with pytest.raises(ValueError, match="needs equal ranks"):
        ours.add_weighted_adapter(
            ["default", "r2"], [1.0, 1.0], "mix", combination_type="dare_ties", density=0.5
        )
    assert "mix" not in ours.peft_config


def test_cat_combination_is_the_exact_weighted_sum(tmp_path) -> None:
    ours, _ = _two_adapter_models(tmp_path)
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=1e-6)
    only_b = ours.base_model.model.model.layers[0].self_attn.o_proj  # only adapter "b" targets o_proj
    torch.testing.assert_close(
        only_b.delta_weight("mix"), -0.4 * only_b.delta_weight("b"), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_steps_match_hf_peft(use_dora: bool) -> None:
    """Same init, same data, same optimiser: the adapters stay equal step after step."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": use_dora}
    ours = get_peft_model(tiny_llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    theirs.load_state_dict(ours.state_dict())  # same names in memory: copy our random A into theirs
    models = (ours, theirs)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(3):
        ids = _ids(length=5 + step)
        for model, optimizer in zip(models, optimizers):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs_params[name], atol=1e-5, rtol=1e-4, msg=name)


def test_print_trainable_parameters_matches_hf_peft(capsys) -> None:
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_dora": False}
    get_peft_model(tiny_llama(), LoraConfig(**config)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert ours.startswith("trainable params: ")


def test_unload_returns_the_base_without_merging() -> None:
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False))
    base = model.unload()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_from_pretrained_round_trip_with_selected_adapters(tmp_path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("extra", LoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(tmp_path, selected_adapters=["extra"])
    assert not (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "extra" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "extra", adapter_name="extra")
    model.set_adapter("extra")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert copy.deepcopy(loaded).active_adapter == "extra"


@pytest.mark.parametrize("spelling", ["Gaussian", "GAUSSIAN", "OLoRA"])
def test_init_lora_weights_names_in_any_case_as_hf_peft(spelling: str) -> None:
    """HF PEFT lower-cases "gaussian" and "olora"; the config keeps what was written."""
    torch.manual_seed(0)
    ours = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=spelling, target_modules=["q_proj"]))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(init_lora_weights=spelling, target_modules=["q_proj"])
    )
    assert ours.peft_config["default"].init_lora_weights == spelling
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    ref = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert mine.keys() == ref.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("first", "second", "refused"),
    [("all", "lora_only", True), ("none", "all", False), ("all", "none", False)],
)
def test_only_one_adapter_may_train_biases_as_in_hf_peft(first: str, second: str, refused: bool) -> None:
    for lib in (peft, __import__("peftkit")):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], bias=first))
        if refused:
            with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
                model.add_adapter("second", lib.LoraConfig(target_modules=["q_proj"], bias=second))
            assert list(model.peft_config) == ["default"]
        else:
            model.add_adapter("second", lib.LoraConfig(target_modules=["q_proj"], bias=second))
            assert list(model.peft_config) == ["default", "second"]


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], ["c_attn"]], ids=["llama-linear", "gpt2-conv1d"])
def test_lora_bias_equals_hf_peft_in_forward_gradients_merge_and_files(tmp_path, target: list[str]) -> None:
    """lora_bias=True: B has a bias; outputs, gradients, the merged model and the saved tensors are HF PEFT's."""
    from tiny_models import model_inputs, tiny_gpt2

    build = tiny_llama if target[0] == "q_proj" else tiny_gpt2
    if build is tiny_llama:  # llama has no biases: add some so that merging has one to fold into

        def build():  # type: ignore[no-redef]
            model = tiny_llama()
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                    proj.bias = nn.Parameter(
                        torch.randn(proj.out_features, generator=torch.Generator().manual_seed(3))
                    )
            return model

    models = []
    for lib in (peft, __import__("peftkit")):
        model = lib.get_peft_model(
            build(), lib.LoraConfig(target_modules=target, lora_bias=True, init_lora_weights=False)
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        models.append(model)
    ref, ours = models
    batch = model_inputs()
    assert {k for k in ours.state_dict() if "lora_B" in k and k.endswith("bias")}
    for model in (ref, ours):
        model.eval()  # gradients still flow; the base's own dropout stays off (its masks differ per library)
        model(**batch).logits.square().mean().backward()
    for (n, p), (_, q) in zip(sorted(ours.named_parameters()), sorted(ref.named_parameters()), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        want = ref(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, want, rtol=1e-5, atol=1e-6)
        ours.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=1e-5, atol=1e-6)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-5)


def test_lora_bias_is_refused_where_hf_peft_refuses_it() -> None:
    with pytest.raises(ValueError, match="not supported for DoRA"):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="only supported with init_lora_weights=True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="not supported for Embedding"):
        get_peft_model(tiny_llama(), LoraConfig(lora_bias=True, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="has no bias"):
        model = get_peft_model(tiny_llama(), LoraConfig(lora_bias=True, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        model.merge_adapter()
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())


def test_merging_into_a_tied_weight_leaves_the_other_module_alone() -> None:
    """GPT-2's lm_head is tied to its input embedding: merging a LoRA on lm_head must not change the
    embedding (the merged layer gets its own copy, with a warning)."""
    base = tiny_gpt2()
    assert base.lm_head.weight is base.transformer.wte.weight
    embedding = base.transformer.wte.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(target_modules=["lm_head"], init_lora_weights=False)).eval()
    ids = _ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="own copy"):
            merged = model.merge_and_unload()
        assert torch.equal(merged.transformer.wte.weight, embedding)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


def test_rank_and_alpha_pattern_keys_that_match_nothing_are_reported() -> None:
    """A misspelt rank_pattern key would leave every layer at the default rank: HF PEFT's warning says so."""
    config = LoraConfig(
        target_modules=QV,
        rank_pattern={"q_proj": 2, "q_prj": 3},
        alpha_pattern={"layers.0.self_attn.v_proj": 4},
    )
    with pytest.warns(
        RuntimeWarning, match=r"rank_pattern keys did not match any targeted module .*\['q_prj'\]"
    ):
        model = get_peft_model(tiny_llama(), config)
    assert model.base_model.model.model.layers[1].self_attn.q_proj.r["default"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tiny_llama(), LoraConfig(target_modules=QV, rank_pattern={"q_proj": 2}))


def test_unmerging_ties_the_shared_weight_again() -> None:
    """A merge gives the merged layer its own copy of a tied weight; unmerging puts the tie back exactly."""
    base = tiny_gpt2()
    embedding = base.transformer.wte.weight
    before = embedding.detach().clone()
    model = get_peft_model(base, LoraConfig(target_modules=["lm_head", "c_attn"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="own copy"):
        model.merge_adapter()
    assert base.lm_head.weight is not embedding
    model.unmerge_adapter()
    assert base.lm_head.weight is embedding and torch.equal(embedding, before)
    with pytest.warns(UserWarning, match="own copy"):  # and again, after a second merge
        model.merge_adapter()
    model.unmerge_adapter()
    assert base.lm_head.weight is embedding


def test_trainability_follows_hf_peft_through_loading_and_disabling(tmp_path) -> None:
    """HF PEFT's rules (its issue #2759): an adapter loaded with is_trainable=True trains although it is not
    active, loading another adapter leaves that as it is, and nothing trains inside disable_adapter()."""
    peftkit.get_peft_model(tiny_llama(0), peftkit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    model = peftkit.PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)

    def trainable() -> set[str]:
        return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {"default"}
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert trainable() == {"default", "other"}
    model.load_adapter(tmp_path, adapter_name="frozen", is_trainable=False)
    assert trainable() == {"default", "other"}
    with model.disable_adapter():
        assert trainable() == set()
    assert trainable() == {"default", "other"}
