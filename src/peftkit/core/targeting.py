"""Which modules of a model an adapter attaches to.

The rules are HF PEFT's, so one ``adapter_config.json`` selects the same modules in both libraries:

* ``target_modules`` as a **list**: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
* as a **string**: a regular expression that must match the full name (``re.fullmatch``; a pattern is given at most
  :data:`REGEX_TIMEOUT_S` per name, so a pathological one from an untrusted config cannot hang);
* ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head (``lm_head``) and, for
  sequence classification, the classifier;
* ``exclude_modules`` (same list / regex forms) removes matches;
* ``layers_to_transform`` (+ ``layers_pattern``) keeps only modules inside the given layer indices;
* with no ``target_modules`` the architecture's default is used: the config class's
  ``default_target_modules`` table when it has one, else :data:`DEFAULT_TARGET_MODULES`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import regex
from torch import nn

from peftkit.architectures import DEFAULT_TARGET_MODULES

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


#: Longest a user's pattern may take on one module name. Patterns come from adapter configs (untrusted
#: files from a hub), and some regexes backtrack for ever (``(a+)+$``); a sane pattern takes microseconds.
REGEX_TIMEOUT_S = 0.5


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> Any:
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError) as err:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({err}).") from None


def check_module_names(field: str, value: Any, allow_empty: bool = False) -> None:
    """The checks every method's ``target_modules``-like field shares: a list or a string (a set or tuple
    would not serialise reproducibly: ``TypeError``), and not an empty list unless ``allow_empty``."""
    if isinstance(value, (set, tuple)):
        raise TypeError(f"{field} must be a list or a string (sets do not serialise reproducibly).")
    if not allow_empty and isinstance(value, list) and not value:
        raise ValueError(f"{field} is an empty list; name at least one module or use 'all-linear'.")


def pattern_match(pattern: str, text: str, how: str = "fullmatch") -> Any:
    """``re.<how>(pattern, text)`` (``how`` is ``fullmatch``, ``match`` or ``search``) for a pattern from
    a config, bounded in time: a pattern that takes longer than :data:`REGEX_TIMEOUT_S` on a name raises
    ``ValueError`` instead of hanging the process."""
    compiled = _compile(pattern)
    try:
        return getattr(compiled, how)(text, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(
            f"the regular expression {pattern!r} took more than {REGEX_TIMEOUT_S} s on the module name "
            f"{text!r} (catastrophic backtracking); simplify it or list the module names."
        ) from None


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _layer_index_ok(key: str, layers_to_transform: int | Sequence[int] | None, layers_pattern: Any) -> bool:
    if layers_to_transform is None or (
        isinstance(layers_to_transform, (list, tuple)) and not layers_to_transform
    ):
        return True
    # lazy ".*?": the first index in the name is the block (T5 nests "block.1.layer.0")
    if not layers_pattern:
        match = pattern_match(r".*?\.[^.]*\.(\d+)\.", key, "match")
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = pattern_match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key, "match")
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group(1))
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def name_matches(key: str, patterns: str | Iterable[str]) -> bool:
    """HF PEFT's rule: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return pattern_match(patterns, key) is not None
    patterns = list(patterns)
    return key in patterns or any(key.endswith(f".{p}") for p in patterns)


def resolve_target_modules(model: nn.Module, config: Any) -> str | list[str]:
    """The effective ``target_modules`` for ``model``: the config's, the architecture default, or the
    expansion of ``"all-linear"`` into full module names. The config is not modified."""
    targets = getattr(config, "target_modules", None)
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        # a method whose defaults differ from LoRA's (e.g. IA3 adds a feed-forward layer) brings its table
        defaults = getattr(config, "default_target_modules", None) or DEFAULT_TARGET_MODULES
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is not set and peftkit has no default for model_type {model_type!r}. "
                f"Pass target_modules explicitly, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
            )
        return list(defaults[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear_names(model, getattr(config, "task_type", None))
    if isinstance(targets, str):
        return targets
    return list(targets)


def _all_linear_names(model: nn.Module, task_type: Any) -> list[str]:
    from peftkit.core.layer import AdapterLayer

    excluded: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_head = get_output() if callable(get_output) else None
    if output_head is not None:
        excluded |= {name for name, module in model.named_modules() if module is output_head}
    elif str(task_type) == "SEQ_CLS":
        for head_name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, head_name, None)
            if head is not None:
                excluded |= {name for name, module in model.named_modules() if module is head}
                break
    names = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            # an already-wrapped linear layer stays a target; its adapter sub-modules never are
            if _is_linear(module.get_base_layer()):
                names.append(name)
            excluded |= {f"{name}.{sub}" for sub, _ in module.named_modules() if sub}
        elif _is_linear(module):
            names.append(name)
    return [n for n in names if n not in excluded]


def find_target_names(model: nn.Module, config: Any, modules_to_save: Sequence[str] = ()) -> list[str]:
    """Full names of the modules ``config`` selects in ``model``.

    Modules at or under a ``modules_to_save`` entry (the config's and the task's default heads) are
    never targeted: they are trained in full instead.

    Raises:
        ValueError: when nothing matches; the message names the patterns and the closest module names.
    """
    targets = resolve_target_modules(model, config)
    exclude = getattr(config, "exclude_modules", None)
    layers_to_transform = getattr(config, "layers_to_transform", None)
    from peftkit.core.layer import AdapterLayer

    adapter_internal: set[str] = set()
    matched = []
    for name, module in model.named_modules():
        if not name or name in adapter_internal:
            continue
        if isinstance(module, AdapterLayer):
            adapter_internal |= {f"{name}.{sub}" for sub, _ in module.named_modules() if sub}
        if check_target_module_exists(config, name, targets=targets, modules_to_save=modules_to_save):
            matched.append(name)
    if not matched:
        raise ValueError(_no_match_message(model, targets, exclude, layers_to_transform))
    return matched


def check_target_module_exists(
    config: Any, key: str, *, targets: Any = None, modules_to_save: Sequence[str] | None = None
) -> bool:
    """Whether module ``key`` is one ``config`` adapts (HF PEFT's function of this name): it matches
    ``targets`` (default: the config's ``target_modules``; a string is a full-match regex, a list matches
    exactly or as a dotted suffix), is not excluded by ``exclude_modules``, is not at or under a
    ``modules_to_save`` entry (default: the config's), and, for a suffix match, its layer index passes
    ``layers_to_transform`` / ``layers_pattern``."""
    targets = getattr(config, "target_modules", None) if targets is None else targets
    if targets is None:
        return False
    exclude = getattr(config, "exclude_modules", None)
    if exclude and name_matches(key, exclude):
        return False
    if modules_to_save is None:
        modules_to_save = getattr(config, "modules_to_save", None) or ()
    if any(pattern_match(rf"(^|.*\.){m}($|\..*)", key, "match") for m in modules_to_save):
        return False
    if not name_matches(key, targets):
        return False
    if isinstance(targets, str) or key in targets:
        return True
    layers_to_transform = getattr(config, "layers_to_transform", None)
    return _layer_index_ok(key, layers_to_transform, getattr(config, "layers_pattern", None))


def _no_match_message(model: nn.Module, targets: Any, exclude: Any, layers_to_transform: Any) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close: list[str] = []
    for pattern in wanted:
        close += difflib.get_close_matches(str(pattern).rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})
    lines = [f"target_modules={targets!r} matched no module of {type(model).__name__}."]
    if exclude:
        lines.append(
            f"(exclude_modules={exclude!r} and layers_to_transform={layers_to_transform!r} also apply.)"
        )
    if close:
        lines.append(f"Closest module names: {', '.join(dict.fromkeys(close))}.")
    lines.append(f"Linear layers in this model: {', '.join(linear_leaves) or 'none'}.")
    lines.append("Use names from that list (a dotted suffix matches), a regex string, or 'all-linear'.")
    return " ".join(lines)


def per_module_value(key: str, pattern: dict[str, Any], default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern (a regex searched as a dotted
    suffix of ``key``, as HF PEFT does) that matches gives the value, else ``default``."""
    for pat, value in pattern.items():
        if pattern_match(rf"(.*\.)?({pat})$", key, "match"):
            return value
    return default
