"""The method registry: each method file registers its config class and its tuner class here.

``get_peft_model``, checkpoint loading and the command line look methods up by ``peft_type``; the core
never names a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftkit.config import PeftConfig
    from peftkit.tuner import BaseTuner


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know about a method."""

    peft_type: str
    config_cls: type[PeftConfig]
    tuner_cls: type[BaseTuner]


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(peft_type: str, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Register a method under ``peft_type`` (e.g. ``"LORA"``). Registering a name twice is an error."""
    key = str(peft_type)
    if key in _REGISTRY and _REGISTRY[key].config_cls is not config_cls:
        raise ValueError(f"A method is already registered as {key!r} ({_REGISTRY[key].config_cls.__name__}).")
    _REGISTRY[key] = MethodSpec(key, config_cls, tuner_cls)


def get_method(peft_type: str) -> MethodSpec:
    """The spec registered for ``peft_type``; ``KeyError`` if none is."""
    _ensure_builtin_methods_loaded()
    return _REGISTRY[str(peft_type)]


def registered_methods() -> list[str]:
    _ensure_builtin_methods_loaded()
    return sorted(_REGISTRY)


def _ensure_builtin_methods_loaded() -> None:
    # Importing the package registers every built-in method (see peftkit/methods/__init__.py).
    import peftkit.methods  # noqa: F401
