"""End-to-end tests of ``peftkit train | eval | merge | generate``: the loop's arithmetic against an
independent computation, exact resumption after SIGKILL, 2-process DDP / FSDP2 against one process, and
bad configs rejected with exit code 2 and nothing written."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from cli_fixtures import (
    PYTHON,
    SENTIMENT,
    classification_config,
    cli_env,
    instruction_config,
    write_config,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.train.data import collate, read_rows


def run_cli(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "peftkit", *args],
        env={**cli_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "peftkit", *args], env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------ one run
def test_train_writes_adapter_log_plot_and_eval_reproduces_metrics(tmp_path, tokenizer_dir, capsys):
    config = classification_config(tmp_path, tokenizer_dir, save_every=4)
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["train", path]) == 0
    run = Path(config["output_dir"])
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "log.jsonl",
        "summary.json",
        "run_config.yaml",
    ):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not list(run.glob(".tmp-*"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))
    summary = json.loads((run / "summary.json").read_text())

    # the trainable count is the adapter's tensors plus the classifier head, as saved
    saved = adapter_tensors(run)
    assert summary["trainable_params"] == sum(t.numel() for t in saved.values())

    # `peftkit eval` on the saved adapter reproduces the metrics the run reported at its end
    capsys.readouterr()
    assert main(["eval", path, "--adapter", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics.keys() == summary["metrics"].keys()
    for key, value in metrics.items():
        assert value == pytest.approx(summary["metrics"][key], abs=1e-6), key


def test_one_sgd_step_equals_an_independent_computation(tmp_path, tokenizer_dir):
    """w_1 = w_0 − lr · ∇L(w_0) on the first global batch, whose rows are the seeded permutation's first 8."""
    lr, seed = 0.5, 7
    config = classification_config(
        tmp_path,
        tokenizer_dir,
        max_steps=1,
        optimizer="sgd",
        scheduler="constant",
        lr=lr,
        seed=seed,
        max_grad_norm=None,
        eval_before=False,
    )
    config["method"]["lora_dropout"] = 0.0
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    run = Path(config["output_dir"])

    base = AutoModelForSequenceClassification.from_pretrained(run / "base_model")
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
    rows = read_rows(str(SENTIMENT / "train.csv"))[:64]
    order = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:8].tolist()
    encoded = tokenizer(
        [rows[i]["text"] for i in order], truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    loss = model(**encoded, labels=torch.tensor([int(rows[i]["label"]) for i in order])).loss
    loss.backward()
    expected = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                expected[name] = param - lr * param.grad
    model.load_state_dict({k: v for k, v in expected.items()}, strict=False)
    from peftkit import get_peft_model_state_dict

    want = get_peft_model_state_dict(model)
    got = adapter_tensors(run)
    assert max_difference(got, want) < 1e-6
    # the step really moved the adapter (B starts at zero)
    assert any(float(t.abs().max()) > 0 for k, t in got.items() if "lora_B" in k)


def test_gradient_accumulation_and_batch_split_give_the_same_update(tmp_path, tokenizer_dir):
    """Language modelling weights every micro-batch by its number of predicted tokens, so splitting a
    global batch of 4 into 2×2 or 4×1 changes nothing."""
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        folder = tmp_path / f"b{batch_size}"
        # SGD: Adam's normalised steps would magnify float rounding near zero gradients
        config = instruction_config(
            folder,
            tokenizer_dir,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            epochs=3,
            optimizer="sgd",
            lr=1.0,
        )
        config["data"]["validation_split"] = 0.0
        assert main(["train", write_config(folder / "run.yaml", config)]) == 0
        results.append(adapter_tensors(Path(config["output_dir"])))
    assert max_difference(results[0], results[1]) < 1e-5
    assert max_difference(results[0], results[2]) < 1e-5


# ----------------------------------------------------------------------------- kill and resume
def test_sigkill_and_resume_reproduce_an_uninterrupted_run_bitwise(tmp_path, tokenizer_dir):
    def config_for(name: str) -> str:
        config = classification_config(
            tmp_path / name, tokenizer_dir, save_every=2, max_steps=6, save_total_limit=None, log_every=3
        )
        config["method"]["lora_dropout"] = 0.2  # exercises the saved RNG state
        config["data"]["max_eval_samples"] = 8
        (tmp_path / name).mkdir()
        return write_config(tmp_path / name / "run.yaml", config)

    reference = config_for("reference")
    assert run_cli(["train", reference]).returncode == 0
    want = adapter_tensors(tmp_path / "reference" / "run")
    want_log = [
        json.loads(x) for x in (tmp_path / "reference" / "run" / "log.jsonl").read_text().splitlines()
    ]

    # killed between checkpoints (after step 3), then resumed from checkpoint-2
    killed = config_for("killed")
    result = run_cli(["train", killed], PEFTKIT_TEST_KILL_AFTER_STEP="3")
    assert result.returncode == -9, result.stderr[-2000:]
    run = tmp_path / "killed" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "adapter_model.safetensors").exists()
    resumed = run_cli(["train", killed, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    got = adapter_tensors(run)
    assert all(torch.equal(got[k], want[k]) for k in want)
    got_log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]  # noqa: E731
    assert strip(got_log) == strip(want_log)

    # killed while writing checkpoint-4: the half-written folder is never taken for a checkpoint
    torn = config_for("torn")
    result = run_cli(["train", torn], PEFTKIT_TEST_KILL_DURING_SAVE="4")
    assert result.returncode == -9
    run = tmp_path / "torn" / "run"
    assert (run / ".tmp-checkpoint-4" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert run_cli(["train", torn, "train.resume=true"]).returncode == 0
    got = adapter_tensors(run)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------- two processes
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tokenizer_dir, fsdp):
    single = classification_config(
        tmp_path / "one", tokenizer_dir, batch_size=8, max_steps=4, eval_before=False
    )
    single["data"]["max_eval_samples"] = 8
    (tmp_path / "one").mkdir()
    assert main(["train", write_config(tmp_path / "one" / "run.yaml", single)]) == 0

    double = classification_config(
        tmp_path / "two", tokenizer_dir, batch_size=4, max_steps=4, eval_before=False, fsdp=fsdp
    )
    double["data"]["max_eval_samples"] = 8
    (tmp_path / "two").mkdir()
    result = run_torchrun(["train", write_config(tmp_path / "two" / "run.yaml", double)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    one, two = adapter_tensors(tmp_path / "one" / "run"), adapter_tensors(tmp_path / "two" / "run")
    assert max_difference(one, two) < 1e-5
    assert max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k) > 1e-3  # it did train


# ----------------------------------------------------------------------------- merge, generate
def test_merge_writes_a_plain_model_with_the_adapter_folded_in(tmp_path, tokenizer_dir):
    config = classification_config(tmp_path, tokenizer_dir, max_steps=3, eval_before=False)
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    run = Path(config["output_dir"])
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(run / "base_model"), run
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["a fine day", "the worst film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-5)
        plain = AutoModelForSequenceClassification.from_pretrained(run / "base_model").eval()
        assert not torch.allclose(plain(**inputs).logits, adapted(**inputs).logits, atol=1e-5)
    assert main(["merge", "--adapter", str(run), "--out", str(out)]) == 2  # never overwrites


def test_generate_prints_the_adapted_models_greedy_continuation(tmp_path, tokenizer_dir, capsys):
    # a BERT-style tokenizer that also returns token_type_ids, which a causal LM's generate() refuses
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "bert_style")
    settings_file = tmp_path / "bert_style" / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    settings_file.write_text(json.dumps(settings))
    assert "token_type_ids" in AutoTokenizer.from_pretrained(tmp_path / "bert_style")("a b")
    config = instruction_config(
        tmp_path, str(tmp_path / "bert_style"), max_steps=4, eval_before=False, lr=5e-2
    )
    assert main(["train", write_config(tmp_path / "run.yaml", config)]) == 0
    run = Path(config["output_dir"])
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run), "--max-new-tokens", "6", "name a colour"]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), run).eval()
    inputs = tokenizer("name a colour", return_tensors="pt", return_token_type_ids=False)
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert (
        printed
        == tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    )


# ---------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lrr=1e-3", "train.lrr"),
        ("train.batch_size=eight", "train.batch_size"),
        ("train.optimizer=lion", "train.optimizer"),
        ("method.name=nosuch", "nosuch"),
        ("method.rr=4", "method.rr"),
        ("method.r=0", "r"),
        ("method.task_type=CAUSAL_LM", "method.task_type"),
        ("data.train=/no/such/file.csv", "data.train"),
        ("data.text_column=sentence", "sentence"),
        ("model.task_type=TRANSLATION", "model.task_type"),
        ("colour=blue", "colour"),
        ("train.lr", "key=value"),
    ],
)
def test_a_bad_config_is_one_clear_line_exit_2_and_nothing_written(
    tmp_path, tokenizer_dir, capsys, override, named
):
    config = classification_config(tmp_path, tokenizer_dir)
    path = write_config(tmp_path / "run.yaml", config)
    capsys.readouterr()
    assert main(["train", path, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit train: error:") and len(err.splitlines()) == 1, err
    assert named in err
    assert not Path(config["output_dir"]).exists()


def test_the_error_for_an_unknown_method_lists_the_registered_ones(tmp_path, tokenizer_dir, capsys):
    from peftkit.core.registry import registered_methods

    path = write_config(tmp_path / "run.yaml", classification_config(tmp_path, tokenizer_dir))
    assert main(["train", path, "method.name=nosuch"]) == 2
    err = capsys.readouterr().err
    assert all(name.lower() in err for name in registered_methods())


def test_a_console_script_error_exits_2(tmp_path):
    result = run_cli(["train", str(tmp_path / "missing.yaml")])
    assert result.returncode == 2 and "does not exist" in result.stderr


# ------------------------------------------------------------------------------ data and config
def test_overrides_are_parsed_as_yaml_and_typed(tmp_path, tokenizer_dir):
    from peftkit.train.runconfig import load_run_config

    path = write_config(tmp_path / "run.yaml", classification_config(tmp_path, tokenizer_dir))
    config = load_run_config(
        path, ["method.r=16", "train.lr=2e-4", "method.target_modules=[query, key]", "train.eval_every=3"]
    )
    assert config.method["r"] == 16 and config.train.lr == 2e-4 and config.train.eval_every == 3
    assert config.method["target_modules"] == ["query", "key"]


def test_instruction_examples_train_on_the_response_only(tokenizer_dir):
    from peftkit.train.data import alpaca_prompt, build_examples
    from peftkit.train.runconfig import DataSection

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [{"instruction": "Translate to French", "input": "hello", "output": "bonjour"}]
    # a tokenizer that does not add BOS (GPT-2 style) gets none; one that does (llama style) gets it first
    tokenizer.add_bos_token = False
    (plain,) = build_examples(rows, DataSection(format="instruction"), tokenizer, None, "CAUSAL_LM", "train")
    tokenizer.add_bos_token = True
    (example,) = build_examples(
        rows, DataSection(format="instruction"), tokenizer, None, "CAUSAL_LM", "train"
    )
    assert plain["input_ids"] == example["input_ids"][1:] and plain["labels"] == example["labels"][1:]
    prompt_ids = tokenizer(alpaca_prompt("Translate to French", "hello"), add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer("bonjour", add_special_tokens=False)["input_ids"]
    n_prompt = 1 + len(prompt_ids)  # BOS + prompt
    assert example["input_ids"] == [
        tokenizer.bos_token_id,
        *prompt_ids,
        *response_ids,
        tokenizer.eos_token_id,
    ]
    assert example["labels"] == [-100] * n_prompt + [*response_ids, tokenizer.eos_token_id]


def test_chat_examples_train_on_assistant_turns_only(tokenizer_dir):
    from peftkit.train.data import build_examples
    from peftkit.train.runconfig import DataSection

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "red"},
    ]
    (example,) = build_examples(
        [{"messages": messages}], DataSection(format="chat"), tokenizer, None, "CAUSAL_LM", "train"
    )
    trained = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(trained) == "hi there </s> red </s>"


def test_classification_reads_tsv_without_header_and_named_labels(tmp_path, tokenizer_dir):
    from peftkit.train.data import build_examples, label_space, load_splits
    from peftkit.train.runconfig import DataSection

    path = tmp_path / "cola.tsv"
    path.write_text("src1\t1\t\tthe film was great\nsrc2\t0\t*\tgreat was film the\n")
    section = DataSection(
        train=str(path), columns=["source", "label", "original", "sentence"], text_column="sentence"
    )
    rows, _ = load_splits(section, seed=0)
    labels = label_space(section, rows)
    assert labels.names == ["0", "1"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = build_examples(rows, section, tokenizer, labels, "SEQ_CLS", "train")
    assert [e["labels"] for e in examples] == [1, 0]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]

    words = tmp_path / "words.csv"
    words.write_text("text,label\ngood,positive\nbad,negative\nfine,neutral\n")
    section = DataSection(train=str(words))
    rows, _ = load_splits(section, seed=0)
    assert label_space(section, rows).names == ["negative", "neutral", "positive"]


def test_metrics_match_their_textbook_definitions():
    from peftkit.train.metrics import f1_score, matthews_corrcoef, spearman

    predictions = [1, 1, 0, 0, 1, 0, 1, 1]
    labels = [1, 0, 0, 1, 1, 0, 1, 0]
    tp, tn, fp, fn = 3, 2, 2, 1
    binary_mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(predictions, labels, 2) == pytest.approx(binary_mcc)
    assert f1_score(predictions, labels, 2) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # Spearman with ties: ranks of x = [1, 2.5, 2.5, 4], of y = [1, 2, 3, 4]
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = sum(rx) / 4, sum(ry) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    expected = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([0.1, 0.5, 0.5, 0.9], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(expected)


def test_a_datasets_name_or_folder_is_read_through_the_datasets_library(tmp_path, tokenizer_dir):
    """``data.dataset`` goes through ``datasets.load_dataset``: here a local folder with train and
    validation files (a hub name works the same where the hub is reachable)."""
    pytest.importorskip("datasets")
    from peftkit.train.data import load_splits
    from peftkit.train.runconfig import DataSection, RunConfigError

    folder = tmp_path / "sentiment"
    folder.mkdir()
    rows = read_rows(str(SENTIMENT / "train.csv"))
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:30]))
    train_rows, validation_rows = load_splits(DataSection(dataset=str(folder)), seed=0)
    assert train_rows == rows[:20] and validation_rows == rows[20:30]
    with pytest.raises(RunConfigError, match="could not be loaded"):
        load_splits(DataSection(dataset=str(tmp_path / "nothing-here")), seed=0)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_are_wired_with_the_run_hyperparameters(tmp_path, tokenizer_dir, optimizer):
    """The tiny adapter's tensors are below bitsandbytes' 8-bit threshold, where its AdamW keeps 32-bit
    states: one step must then equal torch's AdamW with the same lr, betas, eps and weight decay."""
    pytest.importorskip("bitsandbytes")
    results = {}
    for name in ("adamw", optimizer):
        folder = tmp_path / name
        config = classification_config(
            folder,
            tokenizer_dir,
            max_steps=1,
            optimizer=name,
            scheduler="constant",
            lr=0.05,
            weight_decay=0.1,
            adam_beta1=0.8,
            adam_epsilon=1e-6,
            max_grad_norm=None,
            eval_before=False,
        )
        config["method"]["lora_dropout"] = 0.0
        config["data"]["max_eval_samples"] = 4
        folder.mkdir()
        assert main(["train", write_config(folder / "run.yaml", config)]) == 0
        results[name] = adapter_tensors(Path(config["output_dir"]))
    assert max_difference(results["adamw"], results[optimizer]) < 1e-6
    assert max(float(t.abs().max()) for k, t in results[optimizer].items() if "lora_B" in k) > 1e-3
