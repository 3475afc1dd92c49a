"""Multitask Prompt Tuning: one shared prompt, rescaled per task by a low-rank matrix.

Wang, Panda, Karlinsky, Feris, Sun and Kim, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer
Learning", ICLR 2023 (arXiv:2303.02861). Prompt Tuning (``p`` virtual tokens prepended to the embedded
input) where task ``t``'s prompt is the Hadamard product of a prompt shared by all tasks and a rank-``r``
task matrix::

    P_t = P* ∘ (u_t v_tᵀ)        P* ∈ R^{p×d} shared,  u_t ∈ R^{p×r},  v_t ∈ R^{r×d}  (r = num_ranks)
    h = model([P_{task_ids[b]} ; embed(x_b)])   for every row b of the batch

    x ─► embed ─► [ P*∘(u_t v_tᵀ) ; e₁ … e_n ] ─► frozen transformer ─► head

Training on several source tasks at once (``num_tasks``, each row's task in ``task_ids``) learns ``P*``
and every ``(u_t, v_t)``; a new target task starts from them (§3.2: the paper distils ``P*`` from
single-task prompts first; HF PEFT, and so peftkit, train the decomposition directly):
``EXACT_SOURCE_TASK`` copies ``P*`` and task ``prompt_tuning_init_task``'s ``(u, v)``,
``AVERAGE_SOURCE_TASKS`` copies ``P*`` and the mean ``(ū, v̄)`` over the source tasks, ``ONLY_SOURCE_SHARED``
copies ``P*`` only. ``RANDOM`` / ``TEXT`` / ``SAMPLE_VOCAB`` start ``P*`` as Prompt Tuning does; ``u`` and
``v`` start at N(0, 0.02²) (HF PEFT's choice).

The checkpoint is HF PEFT's: ``prompt_embeddings`` (``P*``, ``(p, d)``), ``prefix_task_cols``
(``(num_tasks, p, r)``, the ``u_t``) and ``prefix_task_rows`` (``(num_tasks, r, d)``, the ``v_t``).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.methods.prompt_tuning import PromptTuningConfig, initial_prompt
from peftkit.placements.prompt import INPUT_EMBEDDINGS, SAVED_PROMPT_KEY, PromptDims, PromptTuner

TASK_COLS_KEY = "prefix_task_cols"  # HF PEFT's on-disk names of the u_t and v_t
TASK_ROWS_KEY = "prefix_task_rows"


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # Prompt Tuning's; HF PEFT accepts it through the same code path
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


SOURCE_INITS = (
    MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
    MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
    MultitaskPromptTuningInit.ONLY_SOURCE_SHARED,
)


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask Prompt Tuning settings (HF PEFT's names and defaults) on top of :class:`PromptTuningConfig`.

    Args:
        prompt_tuning_init: ``"RANDOM"``, ``"TEXT"``, ``"SAMPLE_VOCAB"`` (start the shared prompt as Prompt
            Tuning does) or a transfer from a source checkpoint: ``"EXACT_SOURCE_TASK"``,
            ``"AVERAGE_SOURCE_TASKS"``, ``"ONLY_SOURCE_SHARED"``.
        prompt_tuning_init_state_dict_path: the source checkpoint for the transfer inits: an
            ``adapter_model.safetensors`` / ``.bin`` file (HF PEFT's argument) or a folder holding one.
        prompt_tuning_init_task: the source task copied by ``EXACT_SOURCE_TASK``.
        num_ranks: ``r``, the rank of each task matrix ``u_t v_tᵀ``.
        num_tasks: the number of tasks (``task_ids`` take values ``0 … num_tasks - 1``); ``EXACT_SOURCE_TASK``
            and ``AVERAGE_SOURCE_TASKS`` initialise one target task, so they need ``num_tasks=1``.
    """

    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    init_choices: ClassVar[type[enum.Enum]] = MultitaskPromptTuningInit

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MULTITASK_PROMPT_TUNING

    def validate(self) -> None:
        super().validate()
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        task = self.prompt_tuning_init_task
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
            raise ValueError(f"prompt_tuning_init_task must be a source task index (>= 0), got {task!r}.")
        init = MultitaskPromptTuningInit(self.prompt_tuning_init)
        if init in SOURCE_INITS and not self.inference_mode:
            if not self.prompt_tuning_init_state_dict_path:
                raise ValueError(
                    f'prompt_tuning_init="{init.value}" needs prompt_tuning_init_state_dict_path (the source '
                    f"checkpoint, e.g. <folder>/adapter_model.safetensors of a multitask run)."
                )
            if init != MultitaskPromptTuningInit.ONLY_SOURCE_SHARED and self.num_tasks != 1:
                raise ValueError(
                    f'prompt_tuning_init="{init.value}" initialises one target task from the source, so it needs '
                    f"num_tasks=1 (got {self.num_tasks}); use ONLY_SOURCE_SHARED to start several tasks from the "
                    f"shared prompt."
                )


class MultitaskPromptEmbedding(nn.Module):
    """``P_t = P* ∘ (u_t v_tᵀ)`` for each row's task (HF PEFT's ``MultitaskPromptEmbedding`` names)."""

    def __init__(self, rows: int, token_dim: int, num_tasks: int, num_ranks: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, token_dim)  # P*; N(0, 1) as Prompt Tuning's RANDOM
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(num_tasks, rows, num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(num_tasks, num_ranks, token_dim)))

    def forward(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        num_tasks = self.prefix_task_cols.shape[0]
        if task_ids is None:
            raise ValueError(
                "Multitask Prompt Tuning needs task_ids: pass task_ids=torch.tensor([...]) (one task index per "
                "batch row) to forward() and generate()."
            )
        if not torch.is_tensor(task_ids) or task_ids.dim() != 1 or task_ids.is_floating_point():
            raise ValueError(
                f"task_ids must be a 1-D integer tensor with one task index per batch row, got {task_ids!r}."
            )
        if len(task_ids) and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
            bad = sorted({int(t) for t in task_ids.tolist() if not 0 <= int(t) < num_tasks})
            raise ValueError(
                f"task_ids must lie in [0, {num_tasks - 1}] (num_tasks={num_tasks}), got {', '.join(map(str, bad))}; "
                f"set num_tasks to the number of tasks, or fix the task ids."
            )
        task_ids = task_ids.to(self.prefix_task_cols.device)
        task_matrix = (
            self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]
        )  # (B, p, r) @ (B, r, d)
        return self.embedding.weight * task_matrix  # (B, p, d)


def load_source_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a source checkpoint: a ``.safetensors`` / ``.bin`` file or an adapter folder."""
    from peftkit.core.checkpoint import load_adapter_weights

    if os.path.isdir(path):
        return load_adapter_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"prompt_tuning_init_state_dict_path {path!r} does not exist; point it at the source run's "
            f"adapter_model.safetensors (or its folder)."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class MultitaskPromptTuningModel(PromptTuner):
    """Multitask Prompt Tuning: a per-row task prompt prepended to the input embeddings."""

    placement = INPUT_EMBEDDINGS
    prompt_forward_args = ("task_ids",)

    def build_encoder(self, config: PeftConfig, dims: PromptDims) -> nn.Module:
        assert isinstance(config, MultitaskPromptTuningConfig)
        if dims.num_transformer_submodules != 1:
            raise ValueError(
                "Multitask Prompt Tuning supports decoder-only and encoder-only models. On encoder-decoder models "
                "HF PEFT prepends a second prompt to the decoder input in forward() but not in generate(), so the "
                "two disagree; use PromptTuningConfig there."
            )
        assert config.num_tasks is not None and config.num_ranks is not None
        rows = self.prompt_rows(dims)
        encoder = MultitaskPromptEmbedding(rows, dims.token_dim, config.num_tasks, config.num_ranks)
        init = MultitaskPromptTuningInit(config.prompt_tuning_init)
        start = initial_prompt(config, self.model.get_input_embeddings(), rows)  # TEXT / SAMPLE_VOCAB
        if start is not None:
            if start.shape[1] != dims.token_dim:
                raise ValueError(
                    f"token_dim {dims.token_dim} differs from the word embeddings' {start.shape[1]}."
                )
            encoder.embedding.weight = nn.Parameter(start)
        if init in SOURCE_INITS and not config.inference_mode:
            assert config.prompt_tuning_init_state_dict_path is not None
            source = load_source_tensors(config.prompt_tuning_init_state_dict_path)
            _copy_from_source(encoder, source, init, config.prompt_tuning_init_task or 0)
        return encoder

    # HF PEFT saves the decomposition itself, not the prompt of some task
    def prompt_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {key: p.detach() for key, p in self.prompt_load_targets(adapter_name).items()}

    def prompt_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        encoder = self.prompt_encoder[adapter_name]
        return {
            SAVED_PROMPT_KEY: encoder.embedding.weight,
            TASK_COLS_KEY: encoder.prefix_task_cols,
            TASK_ROWS_KEY: encoder.prefix_task_rows,
        }


def _copy_from_source(
    encoder: MultitaskPromptEmbedding,
    source: dict[str, torch.Tensor],
    init: MultitaskPromptTuningInit,
    source_task: int,
) -> None:
    """HF PEFT's transfer: ``P*`` from the source, and for EXACT / AVERAGE one task's or the mean ``(u, v)``."""
    wanted = [SAVED_PROMPT_KEY]
    if init != MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
        wanted += [TASK_COLS_KEY, TASK_ROWS_KEY]
    missing = [k for k in wanted if k not in source]
    if missing:
        raise ValueError(
            f"The source checkpoint has no {missing}; {init.value} needs a Multitask Prompt Tuning checkpoint "
            f"(prompt_embeddings, prefix_task_cols, prefix_task_rows)."
        )
    values = {"embedding.weight": source[SAVED_PROMPT_KEY]}
    if init != MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
        cols, rows = source[TASK_COLS_KEY], source[TASK_ROWS_KEY]
        if init == MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS:
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            if source_task >= cols.shape[0]:
                raise ValueError(
                    f"prompt_tuning_init_task={source_task}, but the source checkpoint has {cols.shape[0]} tasks."
                )
            cols, rows = cols[source_task : source_task + 1], rows[source_task : source_task + 1]
        values.update({TASK_COLS_KEY: cols, TASK_ROWS_KEY: rows})
    own = dict(encoder.named_parameters())
    mismatched = [
        f"{name}: source {tuple(value.shape)} vs target {tuple(own[name].shape)}"
        for name, value in values.items()
        if tuple(value.shape) != tuple(own[name].shape)
    ]
    if mismatched:
        raise ValueError(
            "The source checkpoint does not fit this prompt (num_virtual_tokens, num_ranks and the model's "
            f"hidden size must match the source run's): {'; '.join(mismatched)}."
        )
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value.to(device=own[name].device, dtype=own[name].dtype))


register_method("MULTITASK_PROMPT_TUNING", MultitaskPromptTuningConfig, MultitaskPromptTuningModel)
