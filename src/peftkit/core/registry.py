"""The method registry: each method file registers its config class and its tuner class here.

The built-in methods register when ``peftkit`` is imported (``peftkit/__init__.py`` imports
``peftkit.methods``); the core itself never imports a method.

``get_peft_model``, checkpoint loading and the command line look methods up by ``peft_type``; the core
never names a method.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftkit.core.config import PeftConfig
    from peftkit.core.tuner import BaseTuner


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know about a method."""

    peft_type: str
    config_cls: type[PeftConfig]
    tuner_cls: type[BaseTuner]


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(peft_type: str, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Register a method under ``peft_type`` (e.g. ``"LORA"``), which also becomes a member of
    :class:`~peftkit.PeftType` (``PeftType.LORA``). Registering a name twice for another config class is an
    error."""
    from peftkit.core.config import PeftType

    key = str(PeftType.define(str(peft_type)))
    if key in _REGISTRY and _REGISTRY[key].config_cls is not config_cls:
        raise ValueError(f"A method is already registered as {key!r} ({_REGISTRY[key].config_cls.__name__}).")
    _REGISTRY[key] = MethodSpec(key, config_cls, tuner_cls)


def get_method(peft_type: str) -> MethodSpec:
    """The spec registered for ``peft_type``; ``KeyError`` if none is."""
    return _REGISTRY[str(peft_type)]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


class _RegistryView(Mapping[str, type]):
    """A live, read-only ``peft_type -> class`` view of the registry (HF PEFT's mapping names)."""

    def __init__(self, attribute: str) -> None:
        self._attribute = attribute

    def __getitem__(self, peft_type: object) -> type:
        return getattr(_REGISTRY[str(peft_type)], self._attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(registered_methods())

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {self[k].__name__}' for k in self)}}}"


#: HF PEFT's ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING``: every
#: registered method's config class / tuner class by ``peft_type``.
PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type] = _RegistryView("config_cls")
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[str, type] = _RegistryView("tuner_cls")
