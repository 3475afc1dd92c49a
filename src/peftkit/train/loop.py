"""The training loop behind ``peftkit train`` and the evaluation behind ``peftkit eval``.

One loop serves one process, DDP and FSDP2 (started by ``torchrun``; gloo on CPU, NCCL on GPU):

* **Data order** is a pure function of ``(seed, epoch)``: epoch ``e`` visits the examples in the order of
  ``torch.randperm(N, generator=seed + e)``, cut into global batches of ``batch_size × processes ×
  gradient_accumulation_steps``. Micro-batch ``m`` of a global batch is rows ``[m·b, (m+1)·b)``; process
  ``r`` takes micro-batches ``m = k·processes + r``.
* **The loss of a step is the mean over the whole global batch**, however it is split: each micro-batch's
  mean loss is weighted by ``units_local / units_global × processes`` (units are examples, or predicted
  tokens for language models; DDP then averages over processes). So 2 processes × batch 4 give the same
  update as 1 process × batch 8, and gradient accumulation is exact.
* **Checkpoints** (every ``save_every`` steps and at the end) hold the adapter, the optimizer, the
  scheduler, every process's RNG state and the data position. They are written to a temporary folder and
  renamed into place, so a killed process never leaves a half-written checkpoint; ``resume`` continues
  from the newest complete one and reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.core.io_utils import atomic_folder, atomic_write, atomic_write_text
from peftkit.core.quantization import is_quantized_model, prepare_model_for_kbit_training
from peftkit.core.tuner import BaseTuner
from peftkit.train.data import (
    ROW_INPUT_OPTIONS,
    Example,
    LabelSpace,
    build_examples,
    collate,
    label_space,
    load_splits,
    loss_units,
    row_inputs,
)
from peftkit.train.metrics import classification_metrics, lm_metrics, regression_metrics
from peftkit.train.models import load_base_model, load_tokenizer
from peftkit.train.runconfig import RunConfig, RunConfigError, build_method_config, dump_run_config

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
# The adapter's parameters as they are in memory, for resuming: the HF-format adapter file of a P-Tuning or
# projected-prefix adapter holds the prompt encoder's output, not the encoder that training updates.
TRAINABLE_PARAMETERS_FILE = "trainable_parameters.safetensors"
LOG_FILE = "log.jsonl"
# Fault injection for the kill-and-resume tests: SIGKILL this process after that optimizer step, or in the
# middle of writing that step's checkpoint (after the adapter file, before the rename).
KILL_AFTER_STEP_ENV = "PEFTKIT_TEST_KILL_AFTER_STEP"
KILL_DURING_SAVE_ENV = "PEFTKIT_TEST_KILL_DURING_SAVE"


# -------------------------------------------------------------------------------------- processes
@dataclass
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_processes(device_choice: str) -> ProcessGroup:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RunConfigError("train.device is cuda but no CUDA device is available.")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroup(rank, world_size, local_rank, device)


# ----------------------------------------------------------------------------------- the task
@dataclass
class Task:
    """Everything a run needs besides the model: tokenised data and what the labels mean."""

    train_examples: list[Example]
    eval_examples: list[Example]
    labels: LabelSpace
    task_type: str
    data_format: str
    pad_token_id: int
    #: per-row inputs besides the tokens that every example (and batch) carries, e.g. ``task_ids``
    row_inputs: tuple[str, ...] = ()


def prepare_task(config: RunConfig, tokenizer: Any) -> Task:
    train_rows, eval_rows = load_splits(config.data, config.train.seed)
    labels = label_space(config.data, train_rows)
    wanted = config.model.num_labels
    if labels.names is not None and wanted is not None and wanted < labels.num_labels:
        raise RunConfigError(
            f"model.num_labels is {wanted} but the data has {labels.num_labels} classes {labels.names[:20]}."
        )
    task_type = config.model.task_type
    train_examples = build_examples(train_rows, config.data, tokenizer, labels, task_type, "train")
    eval_examples = build_examples(eval_rows, config.data, tokenizer, labels, task_type, "validation")
    for examples in (train_examples, eval_examples):
        for example in examples:
            example["_units"] = _example_units(example, task_type)
    return Task(
        train_examples,
        eval_examples,
        labels,
        task_type,
        config.data.format,
        tokenizer.pad_token_id,
        row_inputs(config.data),
    )


def check_row_inputs(model: nn.Module, task: Task, method: str) -> None:
    """Before the first step: the data carries exactly the per-row inputs the adapted model takes
    (``task_ids`` for a method whose tuner declares it), with values it accepts.

    A peftkit model answers through its tuner's ``extra_forward_inputs`` / ``check_forward_inputs``; another
    library's model (``peftkit bench``'s peer column) through the parameters its ``forward`` names.

    Raises:
        RunConfigError: a data option the method cannot use, an input the method needs that the data
            lacks, or a value the method rejects (a task id beyond its number of tasks).
    """
    from peftkit.core.tuner import BaseTuner

    given = set(task.row_inputs)
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, BaseTuner):
        wanted = set(tuner.extra_forward_inputs())
    else:
        wanted = given & set(inspect.signature(model.forward).parameters)
    unused, missing = sorted(given - wanted), sorted(wanted - given)
    if unused:
        name = unused[0]
        raise RunConfigError(
            f"{ROW_INPUT_OPTIONS[name]} is set, but method {method} takes no {name}; remove "
            f"{ROW_INPUT_OPTIONS[name]} or pick a method that uses {name}."
        )
    if missing:
        name = missing[0]
        if name not in ROW_INPUT_OPTIONS:
            raise RunConfigError(
                f"method {method} needs the input {name} on every row, which no data option of peftkit train "
                f"provides; use the library API."
            )
        raise RunConfigError(
            f"method {method} needs {name} (one per row): set {ROW_INPUT_OPTIONS[name]} to the column that "
            f"holds each row's task."
        )
    if isinstance(tuner, BaseTuner) and given:
        examples = task.train_examples + task.eval_examples
        values = {name: torch.tensor([e[name] for e in examples]) for name in sorted(given)}
        try:
            tuner.check_forward_inputs(values)
        except ValueError as err:
            options = ", ".join(ROW_INPUT_OPTIONS[name] for name in sorted(given))
            raise RunConfigError(
                f"the data's {', '.join(sorted(given))} ({options}) do not fit method {method}: {err}"
            ) from None


def _example_units(example: Example, task_type: str) -> int:
    labels = example["labels"]
    if not isinstance(labels, list):
        return 1
    if task_type == "CAUSAL_LM":
        labels = labels[1:]
    return sum(1 for t in labels if t != -100)


def make_batch(
    examples: Sequence[Example], pad_token_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    batch = collate([{k: v for k, v in e.items() if k != "_units"} for e in examples], pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int, device: torch.device) -> dict[str, float]:
    """Metrics on the validation examples (every process evaluates all of them: FSDP needs every rank in
    each forward, and the data is small)."""
    if not task.eval_examples:
        return {}
    was_training = model.training
    model.eval()
    predictions: list[Any] = []
    references: list[Any] = []
    loss_sum, units = 0.0, 0
    for start in range(0, len(task.eval_examples), batch_size):
        chunk = task.eval_examples[start : start + batch_size]
        batch = make_batch(chunk, task.pad_token_id, device)
        out = model(**batch)
        n = loss_units(batch, task.task_type)
        loss_sum += float(out.loss) * n
        units += n
        if task.data_format == "classification":
            predictions += out.logits.argmax(dim=-1).tolist()
            references += batch["labels"].tolist()
        elif task.data_format == "regression":
            predictions += out.logits.squeeze(-1).float().tolist()
            references += batch["labels"].tolist()
    model.train(was_training)
    if task.data_format == "classification":
        metrics = classification_metrics(predictions, references, task.labels.num_labels)
        metrics["loss"] = loss_sum / units
        return metrics
    if task.data_format == "regression":
        metrics = regression_metrics(predictions, references)
        metrics["loss"] = loss_sum / units
        return metrics
    return lm_metrics(loss_sum, units)


# -------------------------------------------------------------------------------------- the model
def build_peft_model(
    config: RunConfig,
    task: Task,
    tokenizer: Any,
    save_base_to: str | None = None,
    wrap: Callable[[nn.Module, Any], nn.Module] | None = None,
) -> nn.Module:
    """Load the base model and wrap it with the configured method; with ``save_base_to``, first save the
    base model and tokenizer there (atomically), e.g. a randomly initialised model built from a config.
    ``wrap(base, method_config)`` replaces :func:`peftkit.get_peft_model` (``peftkit bench`` passes another
    library's equivalent for its peer column)."""
    from peftkit.core.peft_model import get_peft_model

    problem_type = None
    if config.model.task_type == "SEQ_CLS":
        problem_type = "regression" if task.data_format == "regression" else "single_label_classification"
    base = load_base_model(
        config.model,
        num_labels=task.labels.num_labels,
        problem_type=problem_type,
        seed=config.train.seed,
        tokenizer=tokenizer,
        label_names=task.labels.names,
    )
    if is_quantized_model(base):  # QLoRA / 8-bit: freeze, upcast half-precision norms and head to fp32
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if config.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base.config, "use_cache"):
            base.config.use_cache = False
    method_config = build_method_config(config)
    if save_base_to is not None:
        method_config = method_config.replace(base_model_name_or_path=os.path.abspath(save_base_to))
    # the base is written (atomically) only if the adapter can be built on it
    saving = save_base_to is not None and not os.path.isdir(save_base_to)
    with atomic_folder(save_base_to) if saving else contextlib.nullcontext() as tmp:  # type: ignore[arg-type]
        if tmp is not None:
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        torch.manual_seed(config.train.seed)  # adapter initialisation is part of the run's seed
        peft_model = (wrap or get_peft_model)(base, method_config)
        check_row_inputs(peft_model, task, str(config.method.get("name")))
    return peft_model


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the largest ``nn.ModuleList`` of same-class modules), the FSDP units."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            classes = {type(m) for m in module}
            if len(classes) == 1:
                best = list(module)
    return best


def wrap_for_processes(model: nn.Module, group: ProcessGroup, fsdp: bool) -> nn.Module:
    if fsdp:
        if not group.distributed:
            raise RunConfigError(
                "train.fsdp needs several processes: start with torchrun --nproc_per_node N."
            )
        from torch.distributed.fsdp import fully_shard

        for block in _transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if group.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[group.device.index] if group.device.type == "cuda" else None
        )
    return model


# ------------------------------------------------------------------------------------ optimisation
# bitsandbytes' AdamW variants (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; paged
# states move to CPU memory under GPU memory pressure, as in QLoRA). Tensors below bitsandbytes'
# min_8bit_size (4096 elements) keep 32-bit states.
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD over the trainable parameters; weight decay on matrices only (not on biases,
    norms or DoRA magnitudes), as the HF Trainer does."""
    train = config.train
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise RunConfigError("the method left no trainable parameters.")
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr)
    if train.optimizer in BNB_OPTIMIZERS:
        try:
            import bitsandbytes
        except ImportError:
            raise RunConfigError(
                f"train.optimizer {train.optimizer} needs bitsandbytes: pip install 'peftkit[quant]'."
            ) from None
        cls = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[train.optimizer])
        return cls(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)


def make_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = config.train.warmup_steps or math.ceil(config.train.warmup_ratio * total_steps)
    return get_scheduler(
        config.train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


@dataclass
class Schedule:
    num_examples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, config: RunConfig, num_examples: int, world_size: int) -> Schedule:
        train = config.train
        global_batch = train.batch_size * world_size * train.gradient_accumulation_steps
        steps_per_epoch = math.ceil(num_examples / global_batch)
        total = train.max_steps if train.max_steps is not None else math.ceil(train.epochs * steps_per_epoch)
        return cls(num_examples, global_batch, steps_per_epoch, max(total, 1))

    def batch_indices(self, step: int, seed: int) -> list[int]:
        """The example indices of global step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        return order[position * self.global_batch : (position + 1) * self.global_batch].tolist()


# ------------------------------------------------------------------------------------ checkpoints
def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (``checkpoint-<step>`` folders holding a trainer state), oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            step = name[len(CHECKPOINT_PREFIX) :]
            if (
                name.startswith(CHECKPOINT_PREFIX)
                and step.isdigit()
                and os.path.isfile(os.path.join(path, STATE_FILE))
            ):
                found.append((int(step), path))
    return sorted(found)


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizer_state(optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The optimizer state with whole tensors (FSDP2 shards are gathered; every process must call)."""
    state = optimizer.state_dict()
    if fsdp:
        state["state"] = {
            index: {k: _full(v) for k, v in per_param.items()} for index, per_param in state["state"].items()
        }
    return state


def _full(value: Any) -> Any:
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else value


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool) -> None:
    """Load a state saved by :func:`_optimizer_state`; under FSDP2 each whole tensor is sharded like its
    parameter."""
    if fsdp:
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, per_param in state["state"].items():
            param = params[int(index)]
            mesh = getattr(param, "device_mesh", None)
            for key, value in per_param.items():
                if mesh is not None and isinstance(value, torch.Tensor) and value.shape == param.shape:
                    per_param[key] = distribute_tensor(value.to(param.device), mesh, param.placements)
    optimizer.load_state_dict(state)


def save_checkpoint(
    output_dir: str,
    step: int,
    peft_model: nn.Module,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    group: ProcessGroup,
    fsdp: bool,
    save_total_limit: int | None,
    replaces: Sequence[str] = (),
) -> str:
    """Write ``checkpoint-<step>`` atomically: everything goes to a temporary folder that is renamed into
    place only when complete. Every process takes part (sharded tensors are gathered); rank 0 writes.
    ``replaces``: an earlier run's checkpoint folders, removed once this one is in place."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    optimizer_state = _optimizer_state(optimizer, fsdp)
    rng_states: list[Any] = [_rng_state()]
    if group.distributed:
        rng_states = [None] * group.world_size
        dist.all_gather_object(rng_states, _rng_state())
    if group.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp, is_main_process=group.is_main)
    parameters = _trainable_parameters(peft_model)  # every process: sharded tensors are gathered
    if group.is_main:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        from safetensors.torch import save_file

        save_file(parameters, os.path.join(tmp, TRAINABLE_PARAMETERS_FILE))
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states},
            os.path.join(tmp, TRAINING_STATE_FILE),
        )
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)
        _fsync_tree(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in replaces:
            if os.path.abspath(old) != os.path.abspath(final):
                shutil.rmtree(old, ignore_errors=True)
        if save_total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    group.barrier()
    return final


def load_checkpoint(path: str, peft_model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the adapter of a checkpoint into ``peft_model``; return (trainer state, training state)."""
    from peftkit.core.checkpoint import load_adapter_weights, set_peft_model_state_dict

    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        trainer_state = json.load(f)
    if os.path.isfile(os.path.join(path, TRAINABLE_PARAMETERS_FILE)):
        _load_trainable_parameters(peft_model, os.path.join(path, TRAINABLE_PARAMETERS_FILE))
    else:  # a checkpoint written before the parameters were kept separately
        set_peft_model_state_dict(peft_model, load_adapter_weights(path), "default")
    training_state = torch.load(
        os.path.join(path, TRAINING_STATE_FILE), map_location="cpu", weights_only=True
    )
    return trainer_state, training_state


def _adapter_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The default adapter's parameters by their in-memory names; for a model wrapped by another library
    (``peftkit bench``'s peer runs), every parameter that requires gradients."""
    adapter_parameter_map = getattr(peft_model.base_model, "adapter_parameter_map", None)
    if adapter_parameter_map is None:
        return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    return adapter_parameter_map("default")


def _trainable_parameters(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The default adapter's parameters by their in-memory names (whole tensors, on the CPU)."""
    params = _adapter_parameters(peft_model)
    return {name: _full(p.detach()).to("cpu").contiguous().clone() for name, p in params.items()}


def _load_trainable_parameters(peft_model: nn.Module, path: str) -> None:
    """Copy a checkpoint's :data:`TRAINABLE_PARAMETERS_FILE` back into the adapter, all or nothing."""
    from peftkit.core.checkpoint import copy_saved_parameters

    try:
        copy_saved_parameters(_adapter_parameters(peft_model), path, "this run's adapter")
    except ValueError as err:
        raise RunConfigError(f"{err} (was the method changed since the checkpoint?)") from None


# ------------------------------------------------------------------------------------ reporting
def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_losses(path: str, history: Sequence[dict[str, Any]]) -> None:
    """Training loss (and validation loss where evaluated) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("kind") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key} {value:.1%}" if key in ("accuracy",) else f"{key} {value:.4f}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------- the loop
def train(
    config: RunConfig,
    resume: bool | None = None,
    wrap: Callable[[nn.Module, Any], nn.Module] | None = None,
) -> dict[str, Any]:
    """Run ``config``; returns the summary (also written to ``output_dir/summary.json``). ``wrap``: see
    :func:`build_peft_model`."""

    started = time.perf_counter()
    resume = config.train.resume if resume is None else resume
    group = setup_processes(config.train.device)
    threads = torch.get_num_threads()
    try:
        with output_dir_lock(config.output_dir) if group.is_main else contextlib.nullcontext():
            return _train(config, resume, wrap, group, started)
    finally:
        torch.set_num_threads(threads)  # train.threads holds for the run only (a caller's setting comes back)


LOCK_FILE = ".peftkit.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` for a run: a second run into the same folder fails at
    once (two runs would mix their files). The lock dies with the process, so a killed run leaves no stale
    lock. Leftover temporary files of a killed run are removed here. A folder this run created and left
    empty (it failed before writing anything) is removed again."""
    import fcntl

    created = not os.path.exists(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunConfigError(f"output_dir {output_dir} is a file, not a folder.")
    os.makedirs(output_dir, exist_ok=True)
    lock_path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunConfigError(
            f"output_dir {output_dir} is in use by another peftkit run; wait for it to end or pick another "
            f"output_dir."
        ) from None
    try:
        for name in os.listdir(output_dir):  # a killed run's half-written files (never a finished one)
            path = os.path.join(output_dir, name)
            if name.startswith(f".tmp-{CHECKPOINT_PREFIX}") or name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        yield
    finally:
        if created and os.listdir(output_dir) == [LOCK_FILE]:
            os.remove(lock_path)
            os.rmdir(output_dir)
        os.close(fd)


@dataclass
class _Run:
    """What the steps of one run share: set up by :func:`_start`, advanced by :func:`_train_steps`."""

    config: RunConfig
    group: ProcessGroup
    say: Callable[..., None]
    task: Task
    peft_model: nn.Module
    model: nn.Module  # peft_model, or its DDP / FSDP2 wrapping
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainer_state: dict[str, Any]
    stale: list[str]  # an earlier run's checkpoints, replaced once this run writes one
    trainable: int
    total: int
    metrics_before: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # this process's steps (after a resume: the rest)
    step_tokens: list[int] = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer_state["history"]


def _train(
    config: RunConfig,
    resume: bool,
    wrap: Callable[[nn.Module, Any], nn.Module] | None,
    group: Any,
    started: float,
) -> dict[str, Any]:
    run = _start(config, resume, wrap, group)
    _evaluate_before(run)
    _train_steps(run)
    return _finish(run, started)


def _start(
    config: RunConfig, resume: bool, wrap: Callable[[nn.Module, Any], nn.Module] | None, group: Any
) -> _Run:
    """Data, model, schedule, optimizer; the last checkpoint's state when resuming; the run's first lines."""
    output_dir = config.output_dir
    say = print if group.is_main else (lambda *a, **k: None)
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)

    tokenizer = load_tokenizer(config.model)
    task = prepare_task(config, tokenizer)
    # a base built from a config is part of the result: keep it so that eval / merge / generate can load it
    save_base_to = (
        os.path.join(output_dir, "base_model")
        if config.model.from_config is not None and group.is_main
        else None
    )
    peft_model = build_peft_model(config, task, tokenizer, save_base_to, wrap)
    schedule = Schedule.of(config, len(task.train_examples), group.world_size)

    checkpoints = list_checkpoints(output_dir) if resume else []
    # an earlier run's checkpoints stay until this run has written one of its own (a run that fails
    # early destroys nothing)
    stale = [] if resume else [path for _, path in list_checkpoints(output_dir)]
    if stale:
        say(
            f"note: {output_dir} holds checkpoints of an earlier run; they are replaced once this run writes "
            f"its first checkpoint (pass --resume to continue instead)."
        )
    trainer_state: dict[str, Any] = {"global_step": 0, "history": []}
    training_state: dict[str, Any] | None = None
    if checkpoints:
        trainer_state, training_state = load_checkpoint(checkpoints[-1][1], peft_model)
        say(
            f"resuming from {checkpoints[-1][1]} (step {trainer_state['global_step']} of {schedule.total_steps})"
        )
    elif resume:
        say(f"no complete checkpoint in {output_dir}; starting from the beginning.")

    peft_model.to(group.device)
    model = wrap_for_processes(peft_model, group, config.train.fsdp)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, schedule.total_steps)
    if training_state is not None:
        _load_optimizer_state(optimizer, training_state["optimizer"], config.train.fsdp)
        scheduler.load_state_dict(training_state["scheduler"])
        rng_states = training_state["rng"]
        _set_rng_state(rng_states[group.rank] if group.rank < len(rng_states) else rng_states[0])
    else:
        torch.manual_seed(config.train.seed + group.rank)
        random.seed(config.train.seed + group.rank)

    trainable, total = _count(peft_model)
    if group.is_main:
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_text(os.path.join(output_dir, "run_config.yaml"), dump_run_config(config))
        write_jsonl(os.path.join(output_dir, LOG_FILE), trainer_state["history"])
    say(
        f"data: {len(task.train_examples)} train / {len(task.eval_examples)} validation examples; "
        f"{schedule.total_steps} steps of {schedule.global_batch} examples on {group.world_size} process(es)"
        + (" with FSDP2" if config.train.fsdp else "")
    )
    say(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    if task.labels.names is not None:
        say(task.labels.describe())
    return _Run(
        config,
        group,
        say,
        task,
        peft_model,
        model,
        schedule,
        optimizer,
        scheduler,
        trainer_state,
        stale,
        trainable,
        total,
        metrics_before=trainer_state.get("metrics_before", {}),
    )


def _evaluate_before(run: _Run) -> None:
    """The validation metrics of the untrained adapter (once, not again after a resume)."""
    config, task = run.config, run.task
    if run.trainer_state["global_step"] == 0 and config.train.eval_before and task.eval_examples:
        run.metrics_before = evaluate(run.model, task, config.train.eval_batch_size, run.group.device)
        run.trainer_state["metrics_before"] = run.metrics_before
        run.say(f"before training: {_format_metrics(run.metrics_before)}")


def _train_steps(run: _Run) -> None:
    """The optimizer steps from the current one to the end: log windows, evaluations and checkpoints."""
    from tqdm.auto import tqdm

    config, task, schedule, group = run.config, run.task, run.schedule, run.group
    history = run.history
    eval_every = config.train.eval_every or schedule.steps_per_epoch
    save_every = config.train.save_every or schedule.steps_per_epoch
    start_step = run.trainer_state["global_step"]
    bar = tqdm(
        total=schedule.total_steps,
        initial=start_step,
        disable=not (group.is_main and config.train.progress_bar),
        desc="train",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    run.model.train()
    # the open logging window (steps since the last train record) travels in checkpoints, so a resumed
    # run logs the same window losses as an uninterrupted one
    window = run.trainer_state.get("log_window", {})
    logged_loss, logged_units = float(window.get("loss", 0.0)), int(window.get("units", 0))
    logged_tokens, logged_seconds = int(window.get("tokens", 0)), float(window.get("seconds", 0.0))
    kill_after = os.environ.get(KILL_AFTER_STEP_ENV)
    for step in range(start_step, schedule.total_steps):
        step_start = time.perf_counter()
        step_loss, step_units, step_tokens = _train_step(
            run.model, task, schedule, step, config, group, run.optimizer
        )
        run.scheduler.step()
        # a tuner that adapts itself during training (e.g. reallocates ranks from the gradients) does it
        # here, after the optimizer step, before the gradients are cleared (a peer library's model: not ours)
        if isinstance(run.peft_model.base_model, BaseTuner):
            run.peft_model.base_model.on_step_end(step)
        run.optimizer.zero_grad(set_to_none=True)
        run.step_seconds.append(time.perf_counter() - step_start)
        run.step_tokens.append(step_tokens)
        logged_seconds += run.step_seconds[-1]
        done = step + 1
        logged_loss += step_loss
        logged_units += step_units
        logged_tokens += step_tokens
        if done % config.train.log_every == 0 or done == schedule.total_steps:
            record = {
                "kind": "train",
                "step": done,
                "epoch": round(done / schedule.steps_per_epoch, 4),
                "loss": logged_loss / max(logged_units, 1),
                "lr": run.scheduler.get_last_lr()[0],
                "tokens_per_s": logged_tokens / logged_seconds if logged_seconds > 0 else 0.0,
            }
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            logged_loss, logged_units, logged_tokens, logged_seconds = 0.0, 0, 0, 0.0
            if group.is_main:  # at every logging step, so that a slow run can be told from a hung one
                write_jsonl(os.path.join(config.output_dir, LOG_FILE), history)
        if task.eval_examples and (done % eval_every == 0 or done == schedule.total_steps):
            run.last_metrics = evaluate(run.model, task, config.train.eval_batch_size, group.device)
            history.append(
                {"kind": "eval", "step": done, **{f"eval_{k}": v for k, v in run.last_metrics.items()}}
            )
            if group.is_main:
                bar.write(f"step {done}: {_format_metrics(run.last_metrics)}")
                write_jsonl(os.path.join(config.output_dir, LOG_FILE), history)
        bar.update(1)
        if done % save_every == 0 or done == schedule.total_steps:
            run.trainer_state["global_step"] = done
            run.trainer_state["log_window"] = {
                "loss": logged_loss,
                "units": logged_units,
                "tokens": logged_tokens,
                "seconds": logged_seconds,
            }
            save_checkpoint(
                config.output_dir,
                done,
                run.peft_model,
                run.model,
                run.optimizer,
                run.scheduler,
                run.trainer_state,
                group,
                config.train.fsdp,
                config.train.save_total_limit,
                replaces=run.stale,
            )
            run.stale = []
            if group.is_main:
                write_jsonl(os.path.join(config.output_dir, LOG_FILE), history)
        if kill_after == str(done):
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def _finish(run: _Run, started: float) -> dict[str, Any]:
    """The final evaluation, the adapter, the summary, the log and the loss plot."""
    config, task, group = run.config, run.task, run.group
    output_dir = config.output_dir
    if not run.last_metrics and task.eval_examples:
        run.last_metrics = evaluate(run.model, task, config.train.eval_batch_size, group.device)
    run.peft_model.save_pretrained(output_dir, is_main_process=group.is_main)
    history = run.history
    summary = {
        "method": str(config.method.get("name")),
        "trainable_params": run.trainable,
        "all_params": run.total,
        "steps": run.schedule.total_steps,
        "processes": group.world_size,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(group.device),
        "metrics_before": run.metrics_before,
        "metrics": run.last_metrics,
        "final_train_loss": next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None),
        "median_step_seconds": statistics.median(run.step_seconds) if run.step_seconds else None,
        "tokens_per_second": sum(run.step_tokens) / sum(run.step_seconds) if run.step_seconds else None,
    }
    if group.is_main:
        write_jsonl(os.path.join(output_dir, LOG_FILE), history)
        atomic_write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=1))
        plot_losses(os.path.join(output_dir, "loss.png"), history)
        run.say(
            f"after training:  {_format_metrics(run.last_metrics)}" if run.last_metrics else "training done"
        )
        run.say(
            f"saved adapter to {output_dir} (adapter_config.json, adapter_model.safetensors; log {LOG_FILE}, "
            f"loss.png, summary.json); {summary['seconds']:.1f} s, peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    if group.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _count(model: nn.Module) -> tuple[int, int]:
    from peftkit.core.tuner import count_parameters

    return count_parameters(model)


def _micro_batches(
    indices: list[int], batch_size: int, accumulation: int, group: ProcessGroup
) -> Iterator[tuple[list[int], bool]]:
    """This process's micro-batches of a global batch: (rows, is_real); an empty slot (the last, short
    global batch) yields one row with weight zero so that every process runs the same collectives."""
    for k in range(accumulation):
        m = k * group.world_size + group.rank
        rows = indices[m * batch_size : (m + 1) * batch_size]
        yield (rows, True) if rows else (indices[:1], False)


def _train_step(
    model: nn.Module,
    task: Task,
    schedule: Schedule,
    step: int,
    config: RunConfig,
    group: ProcessGroup,
    optimizer: torch.optim.Optimizer,
) -> tuple[float, int, int]:
    """One optimizer step over global batch ``step``; returns (loss × units, units, tokens) summed over
    all processes."""
    indices = schedule.batch_indices(step, config.train.seed)
    examples = task.train_examples
    global_units = sum(examples[i]["_units"] for i in indices)
    accumulation = config.train.gradient_accumulation_steps
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for k, (rows, real) in enumerate(_micro_batches(indices, config.train.batch_size, accumulation, group)):
        batch = make_batch([examples[i] for i in rows], task.pad_token_id, group.device)
        local_units = sum(examples[i]["_units"] for i in rows) if real else 0
        weight = local_units / max(global_units, 1) * group.world_size
        sync = k == accumulation - 1
        no_sync = getattr(model, "no_sync", None)
        context = no_sync() if (not sync and callable(no_sync) and not config.train.fsdp) else nullcontext()
        with context:
            out = model(**batch)
            (out.loss * weight).backward()
        if real:
            loss_sum += float(out.loss.detach()) * local_units
            tokens += (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
    if config.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], config.train.max_grad_norm
        )
    optimizer.step()
    if group.distributed:
        packed = torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64, device=group.device)
        dist.all_reduce(packed)
        loss_sum, tokens = packed[0], int(packed[1])
    return float(loss_sum), global_units, tokens


def evaluate_adapter(config: RunConfig, adapter_dir: str) -> dict[str, float]:
    """``peftkit eval``: load the base model of ``config`` with the adapter in ``adapter_dir`` and return the
    metrics on the validation data. A base built ``from_config`` is read from where the training run saved
    it (the adapter's ``base_model_name_or_path``)."""
    import dataclasses

    from peftkit.core.config import PeftConfig
    from peftkit.core.peft_model import PeftModel

    adapter_config = PeftConfig.from_pretrained(adapter_dir)
    model_section = config.model
    saved_base = adapter_config.base_model_name_or_path
    if model_section.from_config is not None:
        if not saved_base or not os.path.isdir(saved_base):
            raise RunConfigError(
                f"the model is built from a config; its trained base should be at {saved_base!r}, which does not exist."
            )
        model_section = dataclasses.replace(
            model_section, from_config=None, name_or_path=saved_base, tokenizer=None
        )
    tokenizer = load_tokenizer(model_section)
    task = prepare_task(config, tokenizer)
    if not task.eval_examples:
        raise RunConfigError("no validation data: set data.validation or data.validation_split.")
    problem_type = "regression" if task.data_format == "regression" else None
    base = load_base_model(
        model_section, num_labels=task.labels.num_labels, problem_type=problem_type, tokenizer=tokenizer
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    check_row_inputs(model, task, str(adapter_config.peft_type).lower())
    device = setup_processes(config.train.device).device
    model.to(device)
    return evaluate(model, task, config.train.eval_batch_size, device)
