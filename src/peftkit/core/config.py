"""Configuration base class, the method and task enums, and JSON I/O.

Every method's config is a dataclass that subclasses :class:`PeftConfig`. Configs are validated on
construction (``__post_init__`` calls :meth:`PeftConfig.validate`), serialised to the JSON that HF PEFT
writes (``adapter_config.json``), and never changed behind the user's back: derived values such as the
expanded ``"all-linear"`` target list live on the injected model, not on the config.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from peftkit.core.io_utils import atomic_write_text, read_config_text
from peftkit.core.typecheck import describe, fits

CONFIG_NAME = "adapter_config.json"

ConfigT = TypeVar("ConfigT", bound="PeftConfig")


class _OpenEnumType(type):
    """Iteration, membership and a clear error for an unknown name, over the members defined so far."""

    _members: dict[str, Any]

    def __iter__(cls) -> Iterator[Any]:
        return iter(list(cls._members.values()))

    def __len__(cls) -> int:
        return len(cls._members)

    def __contains__(cls, item: object) -> bool:
        return str(item) in cls._members

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return cls._members[name]
        except KeyError:
            raise AttributeError(
                f"PeftType has no {name!r}: no loaded method defines it; known: {', '.join(cls._members)}."
            ) from None

    @property
    def __members__(cls) -> dict[str, Any]:
        return dict(cls._members)


class PeftType(str, metaclass=_OpenEnumType):
    """Method identifiers, spelled as HF PEFT spells them in ``adapter_config.json`` (``PeftType.LORA ==
    "LORA"``).

    HF PEFT's ``PeftType`` is an enum that lists every method; here the list is open: each method file
    defines its own member with :meth:`define` (``PEFT_TYPE = PeftType.define("LORA")``), so the core
    names no method. Members are strings; ``PeftType("LORA")`` returns the member, ``.name`` / ``.value``
    are the name, and the class iterates over the members defined so far, as an enum does.
    """

    _members: ClassVar[dict[str, PeftType]] = {}

    def __new__(cls, value: str) -> PeftType:
        try:
            return cls._members[str(value)]
        except KeyError:
            raise ValueError(f"{value!r} is not a PeftType; known: {', '.join(cls._members)}.") from None

    @classmethod
    def define(cls, name: str) -> PeftType:
        """The member ``name`` (created on first use; defining a name twice returns the same member)."""
        if name not in cls._members:
            if not name.isidentifier() or name.upper() != name:
                raise ValueError(f"PeftType names are upper-case identifiers, got {name!r}.")
            cls._members[name] = str.__new__(cls, name)
        return cls._members[name]

    @property
    def name(self) -> str:
        return str.__str__(self)

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"<PeftType.{self.name}: {self.name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PeftType, (self.name,))


class TaskType(str, enum.Enum):
    """What the wrapped model is for; picks the :class:`~peftkit.PeftModel` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A config class's resolved field annotations (``{}`` if they cannot be resolved: nothing checked)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _to_json_value(value: Any) -> Any:
    """Turn config values into plain JSON: enums to strings, sets and tuples to sorted/plain lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(_to_json_value(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    return value


@dataclass
class PeftConfig:
    """Fields every method shares.

    Args:
        peft_type: which method; each subclass sets its own (a value passed in is accepted and replaced,
            as in HF PEFT).
        task_type: a :class:`TaskType` (or its string value) or ``None`` for a bare model.
        base_model_name_or_path: the hub id or path of the base model, recorded at save time.
        revision: the base model's revision, if any.
        inference_mode: ``True`` freezes the adapter (as after ``from_pretrained(is_trainable=False)``).
    """

    peft_type: PeftType | str | None = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    #: keys HF PEFT writes that this config does not have, with the HF default meaning "feature unused";
    #: they are dropped silently when they hold that value.
    foreign_defaults: ClassVar[dict[str, Any]] = {}
    #: keys HF PEFT writes for features this config does not implement and that change what the adapter
    #: computes (``use_qalora``, ``trainable_token_indices``, ...): loading a file that sets one (to anything but
    #: "feature unused") is an error naming it, since dropping it would give other outputs.
    unsupported_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                allowed = ", ".join(t.value for t in TaskType)
                raise ValueError(  # HF PEFT's words
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: {allowed}."
                ) from None
        try:
            self.validate()  # the method's own, more specific messages first
        except (AttributeError, KeyError, IndexError):
            # a field of the wrong type tripped the method's checks (its own TypeErrors name the field)
            self._check_field_types()
            raise
        self._check_field_types()

    def _check_field_types(self) -> None:
        """Every field against its annotation (an ``adapter_config.json`` is untrusted input: ``r: "8"``,
        ``fan_in_fan_out: "no"`` or a NaN ``lora_alpha`` must not be misread); floats must be finite."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            if not f.init or f.name not in hints:
                continue
            value = getattr(self, f.name)
            if not fits(value, hints[f.name])[0]:
                raise ValueError(
                    f"{type(self).__name__}: {f.name}={value!r} has the wrong type; expected "
                    f"{describe(hints[f.name])}."
                )

    # ----------------------------------------------------------------------------------------- API
    def check_complete(self) -> None:
        """Settings a config may leave unset when it is built (as HF PEFT allows, e.g.
        ``PromptTuningConfig()``) but that an adapter needs: checked when an adapter is created from the
        config (and by ``peftkit train`` before it starts).

        Raises:
            ValueError: a needed setting is still unset.
        """

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings. Subclasses extend it."""

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """A validated copy with some fields changed (the config itself is never modified)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update(changes)
        return type(self)(**values)

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``adapter_config.json`` (atomically) into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(extra)
        atomic_write_text(
            os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True)
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the right config class from a dict read from ``adapter_config.json``.

        Called on :class:`PeftConfig` it dispatches on ``peft_type`` through the registry; called on a
        subclass it checks that the type matches. Keys the class does not know (newer HF PEFT fields,
        typos) are dropped with one warning that names them.
        """
        from peftkit.core.registry import get_method, registered_methods

        peft_type = data.get("peft_type")
        if peft_type is None:
            raise ValueError(
                "The adapter config has no 'peft_type' key, so the method is unknown. Add e.g. "
                '"peft_type": "LORA" to adapter_config.json.'
            )
        try:
            spec = get_method(peft_type)
        except KeyError:
            names = ", ".join(registered_methods())
            raise ValueError(
                f"Unknown peft_type {peft_type!r} in the adapter config; peftkit knows: {names}."
            ) from None
        target_cls = spec.config_cls
        if cls is not PeftConfig and not issubclass(target_cls, cls):
            raise ValueError(
                f"This adapter config is for peft_type {peft_type!r} ({target_cls.__name__}), "
                f"not {cls.__name__}; load it with PeftConfig.from_pretrained or {target_cls.__name__}."
            )
        known = {f.name for f in dataclasses.fields(target_cls) if f.init}
        unknown = sorted(k for k in data if k not in known and k != "peft_type")
        # Book-keeping keys HF PEFT writes that carry no setting for peftkit.
        silent = {"peft_version", "auto_mapping"}
        reported = [
            k
            for k in unknown
            if k not in silent
            and data[k] not in (None, {}, [], False)
            and data[k] != target_cls.foreign_defaults.get(k, object())
        ]
        unsupported = [k for k in reported if k in target_cls.unsupported_fields]
        if unsupported:
            raise ValueError(
                f"This adapter config sets {', '.join(f'{k}={data[k]!r}' for k in unsupported)}, which peftkit's "
                f"{target_cls.__name__} does not implement; ignoring it would give different outputs. Load the "
                f"adapter with HF PEFT instead."
            )
        if reported:  # keys nobody here knows (a newer HF PEFT's?): HF PEFT's forward-compatible warning
            warnings.warn(
                f"Unexpected keyword arguments {reported} for class {target_cls.__name__}, these are ignored. "
                f"This probably means that you're loading a configuration file that was saved using a higher "
                f"version of the library and additional parameters have been introduced since.",
                stacklevel=2,
            )
        return target_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """HF PEFT's constructor by type: the config class registered for ``kwargs["peft_type"]`` (this
        class when there is none) built from ``kwargs``; keys that class does not know are dropped with one
        warning naming them, as when loading a file."""
        from peftkit.core.registry import get_method, registered_methods

        if "peft_type" in kwargs:
            return cls.from_dict(kwargs)
        own = [name for name in registered_methods() if get_method(name).config_cls is cls]
        return cls.from_dict({**kwargs, "peft_type": own[0]}) if own else cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        try:
            data = json.loads(read_config_text(path))
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} is not valid JSON ({str(err)[:200]}); is the adapter folder damaged?"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Read ``adapter_config.json`` from a local folder (or a hub id when the hub is reachable)."""
        folder = os.path.join(path, subfolder) if subfolder else str(path)
        config_file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_file):
            config_file = _download_from_hub(str(path), CONFIG_NAME, subfolder=subfolder, **kwargs)
        return cls.from_json_file(config_file)


def _download_from_hub(repo_id: str, filename: str, subfolder: str | None = None, **kwargs: Any) -> str:
    """Fetch one file of an adapter from the Hugging Face hub; a clear error when that is impossible."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, subfolder=subfolder, **kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"No {filename} in the local folder {repo_id!r}, and it could not be fetched from the hub "
            f"({type(err).__name__}: {err}). Pass the path of a folder written by save_pretrained."
        ) from None
