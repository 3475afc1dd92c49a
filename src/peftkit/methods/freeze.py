"""Freeze (partial fine-tuning) and head-only training: the baselines every PEFT method is compared to.

Partial fine-tuning trains the top ``k`` transformer blocks and freezes everything below them, the
classic baseline of e.g. Lee, Tang and Lin, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning" (arXiv:1911.03090); with ``k = 0`` only the task head trains, the linear probe of Alain and
Bengio, "Understanding intermediate layers using linear classifier probes" (arXiv:1610.01644)::

    embeddings ─► block 0 ─► ... ─► block L-k-1 ─►│ block L-k ─► ... ─► block L-1 ─►│ head
    └──────────────── frozen ─────────────────────┘└────────── trained ────────────┘ trained (modules_to_save)

Nothing wraps a layer and nothing is copied: the chosen blocks' own parameters are selected through
:meth:`~peftkit.core.tuner.BaseTuner.select_base_parameters` and trained in place, so parameter counts and
memory are exactly those of partial fine-tuning. The checkpoint holds the trained tensors under their
own names (``base_model.model.<parameter name>``); loading copies them onto a fresh base; merging is the
identity and ``merge_and_unload`` returns the model carrying them.

Since no copy of the original values is kept (it would cost the memory of the trained blocks),
``disable_adapter()`` is an error, ``delete_adapter()`` leaves the trained values in the model, and a
model holds one such adapter at a time. Head-only adapters select nothing in place, so none of these
limits applies to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.registry import register_method
from peftkit.core.targeting import name_matches, pattern_match
from peftkit.core.tuner import BaseParameterSelection, BaseTuner

LayerSpec = int | list[int] | list[str] | str


@dataclass
class FreezeConfig(PeftConfig):
    """Partial fine-tuning settings.

    Args:
        trainable_layers: which blocks train: an int ``k`` (the top ``k`` blocks of every block stack; ``0``
            trains only the head), a list of block indices (``[0, 5]``), or module names whose parameters all
            train: a list (exact or dotted suffix, as ``target_modules``: ``["h.11", "ln_f"]``) or a
            full-match regex string.
        train_embeddings: also train the embedding tables outside the blocks (word, position, token type;
            a tied output head trains with them).
        train_norms: also train every normalisation layer outside the trained blocks (embedding norm,
            final norm such as ``ln_f`` / ``model.norm``, and the norms of frozen blocks).
        layers_pattern: the name(s) of the block lists (``"layers"``, ``"h"``, ``"block"``) when the
            automatic choice (every outermost ``nn.ModuleList``) is not the right one.
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter; the task's
            head (``classifier`` / ``score`` for sequence classification) is added by the task wrapper.
    """

    trainable_layers: LayerSpec = field(kw_only=True)
    train_embeddings: bool = False
    train_norms: bool = False
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.FREEZE
        super().__post_init__()

    def validate(self) -> None:
        spec = self.trainable_layers
        if isinstance(spec, bool) or not isinstance(spec, (int, list, str)):
            raise TypeError(
                f"trainable_layers must be an int (top k blocks), a list of block indices, a list of module "
                f"names or a regex string; got {spec!r}."
            )
        if isinstance(spec, int) and spec < 0:
            raise ValueError(f"trainable_layers={spec} must be >= 0 (0 trains only the head).")
        if isinstance(spec, list):
            if not spec:
                raise ValueError("trainable_layers is an empty list; use 0 to train only the head.")
            ints = all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
            if not ints and not all(isinstance(s, str) and s for s in spec):
                raise ValueError(
                    f"trainable_layers={spec!r} mixes block indices and module names; use one kind."
                )
            if ints and any(i < 0 for i in spec):
                raise ValueError(f"trainable_layers={spec} has a negative block index; count from 0.")
        if isinstance(spec, str):
            try:
                pattern_match(spec, "")
            except ValueError as err:
                raise ValueError(f"trainable_layers={spec!r} is not a valid regex ({err}).") from None
        if self.layers_pattern and not _counts_blocks(spec):
            raise ValueError(
                "layers_pattern only applies when trainable_layers counts blocks (an int or indices)."
            )


@dataclass
class HeadOnlyConfig(FreezeConfig):
    """Train only the task head (a linear probe): ``FreezeConfig(trainable_layers=0)``.

    Saved as a ``FREEZE`` adapter with ``trainable_layers: 0``; it loads back as that ``FreezeConfig``.
    """

    trainable_layers: LayerSpec = field(default=0, init=False)
    train_embeddings: bool = field(default=False, init=False)
    train_norms: bool = field(default=False, init=False)


def _counts_blocks(spec: Any) -> bool:
    return isinstance(spec, int) or (isinstance(spec, list) and all(isinstance(i, int) for i in spec))


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, norm_types) or type(module).__name__.endswith("Norm")


def block_stacks(
    modules: list[tuple[str, nn.Module]], layers_pattern: Any = None
) -> dict[str, nn.ModuleList]:
    """The model's stacks of transformer blocks: every outermost non-empty ``nn.ModuleList`` with
    parameters (``model.layers``; ``encoder.block`` and ``decoder.block`` in T5), or those named by
    ``layers_pattern``."""
    stacks: dict[str, nn.ModuleList] = {}
    for name, module in modules:
        if (
            not isinstance(module, nn.ModuleList)
            or len(module) == 0
            or next(module.parameters(), None) is None
        ):
            continue
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if patterns and not name_matches(name, patterns):
            continue
        if not any(name.startswith(f"{stack}.") for stack in stacks):
            stacks[name] = module
    return stacks


class FreezeModel(BaseTuner):
    """Selects the parameters of the chosen blocks (and embeddings / norms) for training in place."""

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        return []

    def select_base_parameters(self, adapter_name: str, config: PeftConfig) -> BaseParameterSelection:
        assert isinstance(config, FreezeConfig)
        modules = self.base_modules()
        stacks = block_stacks(modules, config.layers_pattern)
        chosen: list[nn.Module] = []
        spec = config.trainable_layers
        if _counts_blocks(spec):
            chosen += self._chosen_blocks(spec, stacks, config)
        else:
            matched = [m for n, m in modules if n and name_matches(n, spec)]
            if not matched:
                raise ValueError(
                    f"trainable_layers={spec!r} matches no module of {type(self.model).__name__}. Use module "
                    f"names as printed by model.named_modules() (a dotted suffix such as 'h.11' matches)."
                )
            chosen += matched
        in_blocks = {id(p) for stack in stacks.values() for p in stack.parameters()}
        if config.train_embeddings:
            chosen += [m for _, m in modules if isinstance(m, nn.Embedding) and id(m.weight) not in in_blocks]
        if config.train_norms:
            chosen += [m for _, m in modules if _is_norm(m)]
        # only parameters of the model's own modules (never a modules_to_save copy), in model order
        own = {id(p) for _, m in modules for p in m.parameters(recurse=False)}
        wanted = {id(p) for m in chosen for p in m.parameters()} & own
        names = [n for n, p in self.model.named_parameters() if id(p) in wanted]
        has_head = any(adapter_name in w.modules_to_save for _, w in self.save_wrappers())
        if not names and not has_head:
            raise ValueError(
                f"{type(config).__name__} selects nothing to train on {type(self.model).__name__}: no blocks and "
                f"no task head. Set modules_to_save (e.g. ['lm_head']), use a task_type with a head "
                f"(task_type='SEQ_CLS'), or train some blocks (trainable_layers=k)."
            )
        return BaseParameterSelection(names=names)

    def _chosen_blocks(
        self, spec: int | list[int], stacks: dict[str, nn.ModuleList], config: FreezeConfig
    ) -> list[nn.Module]:
        if spec == 0:
            return []
        if not stacks:
            raise ValueError(
                f"{type(self.model).__name__} has no stack of blocks (an nn.ModuleList) to count "
                f"trainable_layers={spec!r} in; name the modules instead, e.g. trainable_layers=['encoder']."
            )
        depths = {name: len(stack) for name, stack in stacks.items()}
        if isinstance(spec, int):
            too_deep = {n: d for n, d in depths.items() if spec > d}
            if too_deep:
                raise ValueError(
                    f"trainable_layers={spec} is out of range: the block stacks have {depths} blocks; use 0 to "
                    f"{min(depths.values())}."
                )
            return [block for stack in stacks.values() for block in list(stack)[len(stack) - spec :]]
        bad = sorted({i for i in spec for d in depths.values() if i >= d})
        if bad:
            raise ValueError(
                f"trainable_layers block indices {bad} are out of range: the block stacks have {depths} blocks "
                f"(indices count from 0)."
            )
        return [stack[i] for stack in stacks.values() for i in dict.fromkeys(spec)]


register_method("FREEZE", FreezeConfig, FreezeModel)
