"""pytest plugin (``-p peft_alias``): ``import peft`` and ``import peft.<sub>`` resolve to peftkit.

Loaded with ``-p``, it is imported before any conftest or test module, and installs, at import:

* an import hook for ``peft`` and every module name the reference peft has (``peft.tuners.lora.layer``,
  ``peft.utils.other``, ...). Each becomes an *alias module* whose attributes are looked up, by the
  same name, in the peftkit module(s) ``MODULE_MAP`` gives for it (``peft`` -> ``peftkit``,
  ``peft.tuners.lora.layer`` -> ``peftkit.methods.lora``, ...). An alias module has no attributes of
  its own: ``peft.LoraConfig is peftkit.LoraConfig``.
* for a name peftkit lacks (``from peft import LoHaConfig``), by default a *placeholder*: a class
  named like the missing object that nothing is an instance or subclass of, and that raises
  ``MissingInPeftkit`` (an ImportError) when called, indexed or iterated, and AttributeError for
  its attributes. While pytest collects (imports test modules, builds parameter lists) a call
  returns an *inert* object instead, which raises on any use, so that module-level code such as
  ``CASES = [(..., KasaConfig(r=8))]`` does not fail the collection of a whole file.
  ``isinstance(x, P)`` / ``issubclass(c, P)`` is False for a placeholder of another method's class
  (a ``*Config``, a class of ``peft.tuners.<method peftkit lacks>``, ``FOREIGN_NAMES``): the
  suite's skip helpers ask ``issubclass(config_cls, OSFConfig)`` of every config, and "not an OSF
  config" is the true answer. For any other placeholder (``BaseTunerLayer``, ...) it raises, so a
  test that checks modules against it fails instead of passing vacuously.
  So a test module that imports many names still collects, and only the tests that use a missing
  name fail. With ``PEFTKIT_ALIAS_MISSING=error`` a missing name is an ImportError at
  import instead, as a plain ``sys.modules["peft"] = peftkit`` would give.

Exceptions, environment probes the suite calls while importing (no adapter behaviour), so that
both runs collect and skip the same tests:
* ``peft.import_utils`` (``is_bnb_available``, ``is_transformers_ge_v5``, ...) is loaded from the
  reference peft's own file;
* ``infer_device`` (``torch_device = infer_device()`` in class bodies of the suite) is given by
  ``HARNESS_PROBES`` below when peftkit has none. ``PEFTKIT_ALIAS_PROBES=0`` turns this off (then
  most test files fail to collect).

Nothing is added to peftkit or changed in it: peftkit's own modules are imported untouched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

MISSING_MODE = os.environ.get("PEFTKIT_ALIAS_MISSING", "placeholder")  # or "error"

# peft module -> peftkit modules searched, in order, for its attributes. Submodules of a method
# package (peft.tuners.lora.layer, peft.tuners.ia3.model, ...) use their package's entry.
MODULE_MAP: dict[str, tuple[str, ...]] = {
    "peft": ("peftkit",),
    "peft.config": ("peftkit.core.config",),
    "peft.peft_model": ("peftkit.core.peft_model",),
    "peft.mapping": ("peftkit.core.registry",),
    "peft.mapping_func": ("peftkit.core.peft_model",),
    "peft.tuners": ("peftkit",),
    "peft.tuners.tuners_utils": ("peftkit.core.tuner", "peftkit.core.targeting", "peftkit.core.layer"),
    "peft.tuners.lora": ("peftkit.methods.lora",),
    "peft.tuners.adalora": ("peftkit.methods.adalora",),
    "peft.tuners.ia3": ("peftkit.methods.ia3",),
    "peft.tuners.prompt_tuning": ("peftkit.methods.prompt_tuning",),
    "peft.tuners.p_tuning": ("peftkit.methods.p_tuning",),
    "peft.tuners.prefix_tuning": ("peftkit.methods.prefix_tuning",),
    "peft.tuners.adaption_prompt": ("peftkit.methods.adaption_prompt",),
    "peft.tuners.multitask_prompt_tuning": ("peftkit.methods.multitask_prompt_tuning",),
    "peft.utils": (
        "peftkit.core.config",
        "peftkit.core.checkpoint",
        "peftkit.core.layer",
        "peftkit.core.quantization",
        "peftkit.core.tuner",
    ),
    "peft.utils.peft_types": ("peftkit.core.config",),
    "peft.utils.constants": ("peftkit.core.checkpoint", "peftkit.core.config"),
    "peft.utils.other": (
        "peftkit.core.layer",
        "peftkit.core.quantization",
        "peftkit.core.checkpoint",
        "peftkit.core.tuner",
    ),
    "peft.utils.save_and_load": ("peftkit.core.checkpoint",),
    "peft.utils.hotswap": ("peftkit.core.hotswap",),
    "peft.utils.quantization_utils": ("peftkit.core.quantization",),
    "peft.utils.merge_utils": ("peftkit.core.merge",),
}
FROM_REFERENCE = ("peft.import_utils",)
# Missing names of methods peftkit lacks, besides *Config and peft.tuners.<such method>.* (is_foreign).
FOREIGN_NAMES = frozenset(
    {"PeftMixedModel", "TrainableTokensWrapper", "TrainableTokensModel", "MontecloraSampler"}
)
GENERIC_TUNER_MODULES = frozenset({"tuners_utils", "_buffer_dict"})
# Module dunders looked up in the peftkit modules too (all other dunders are the alias module's own).
DELEGATED_DUNDERS = frozenset({"__version__", "__all__"})
USE_PROBES = os.environ.get("PEFTKIT_ALIAS_PROBES", "1") != "0"


def infer_device() -> str:
    """Same answer as ``peft.utils.other.infer_device`` for cuda / mps / xpu / cpu machines."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


# name -> harness stand-in, used only where the peftkit source modules have no such name.
HARNESS_PROBES: dict[str, Any] = {
    "peft.utils.infer_device": infer_device,
    "peft.utils.other.infer_device": infer_device,
}


class MissingInPeftkit(ImportError):
    """A test used a peft name that peftkit has no object for."""


_collecting = False  # True while pytest collects; see pytest_collection below


class Inert:
    """What calling a placeholder gives during collection: every use of it raises."""

    def __init__(self, peft_name: str) -> None:
        object.__setattr__(self, "_peft_name", peft_name)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise MissingInPeftkit(f"{self._peft_name}(...) is not provided by peftkit")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self._peft_name}(...).{name}: {self._peft_name} is not provided by peftkit")

    __setattr__ = __call__ = __getitem__ = __iter__ = __len__ = __bool__ = _fail

    def __repr__(self) -> str:
        return f"<{self._peft_name}(...), not provided by peftkit>"


class _MissingMeta(type):
    """Metaclass of placeholders: using one (call, index, iterate, attribute) raises."""

    _peft_name: str
    _foreign: bool

    def __instancecheck__(cls, obj: Any) -> bool:
        if cls._foreign:
            return False
        raise MissingInPeftkit(f"{cls._peft_name} is not provided by peftkit (isinstance)")

    def __subclasscheck__(cls, subclass: type) -> bool:
        if cls._foreign:
            return False
        raise MissingInPeftkit(f"{cls._peft_name} is not provided by peftkit (issubclass)")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if _collecting:
            return Inert(cls._peft_name)
        raise MissingInPeftkit(f"{cls._peft_name} is not provided by peftkit")

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{cls._peft_name}.{name}: {cls._peft_name} is not provided by peftkit")

    def __getitem__(cls, key: Any) -> Any:
        raise MissingInPeftkit(f"{cls._peft_name} is not provided by peftkit")

    def __iter__(cls) -> Any:
        raise MissingInPeftkit(f"{cls._peft_name} is not provided by peftkit")

    def __repr__(cls) -> str:
        return f"<not in peftkit: {cls._peft_name}>"


_placeholders: dict[str, type] = {}


def is_foreign(module: str, name: str) -> bool:
    """Whether a missing peft name belongs to a method peftkit does not have."""
    if name.endswith("Config") or name in FOREIGN_NAMES:
        return True
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "tuners" or parts[2] in GENERIC_TUNER_MODULES:
        return False
    return ".".join(parts[:3]) not in MODULE_MAP


def placeholder(module: str, name: str) -> type:
    full = f"{module}.{name}"
    if full not in _placeholders:
        namespace = {
            "_peft_name": full,
            "_foreign": is_foreign(module, name),
            "__module__": module,
            "__qualname__": name,
        }
        _placeholders[full] = _MissingMeta(name, (), namespace)
    return _placeholders[full]


def _reference_modules() -> set[str]:
    """Module names of the installed reference peft, found on disk without importing it."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return set()
    root = Path(next(iter(spec.submodule_search_locations)))
    names = {"peft"}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(("peft", *parts)))
    return names


def _sources(fullname: str) -> tuple[str, ...]:
    name = fullname
    while name:
        if name in MODULE_MAP:
            is_method_package = name.startswith("peft.tuners.") and name.count(".") == 2
            if name == fullname or is_method_package:
                return MODULE_MAP[name]
            return ()
        name = name.rpartition(".")[0]
    return ()


class AliasModule(types.ModuleType):
    """A ``peft...`` module whose attributes are peftkit's (see module docstring)."""

    def __init__(self, name: str, sources: Sequence[str], known: set[str]) -> None:
        super().__init__(name, f"alias of {', '.join(sources) or '(nothing in peftkit)'}")
        self.__path__: list[str] = []
        self._sources = tuple(sources)
        self._known = known

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__") and name not in DELEGATED_DUNDERS:
            raise AttributeError(name)
        child = f"{self.__name__}.{name}"
        if child in self._known:
            return importlib.import_module(child)
        for source in self._sources:
            module = importlib.import_module(source)
            if hasattr(module, name):
                return getattr(module, name)
        if name in DELEGATED_DUNDERS:
            raise AttributeError(f"module {self.__name__!r} (peftkit alias) has no attribute {name!r}")
        if USE_PROBES and child in HARNESS_PROBES:
            return HARNESS_PROBES[child]
        if MISSING_MODE == "error":
            raise AttributeError(f"module {self.__name__!r} (peftkit alias) has no attribute {name!r}")
        value = placeholder(self.__name__, name)
        setattr(self, name, value)
        return value


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, known: set[str]) -> None:
        self.known = known

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.known or fullname in FROM_REFERENCE:
            return None
        sources = ", ".join(_sources(fullname)) or "nothing"
        return importlib.machinery.ModuleSpec(
            fullname, self, origin=f"peftkit alias of {sources}", is_package=True
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return AliasModule(spec.name, _sources(spec.name), self.known)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _load_from_reference(fullname: str, reference_root: Path) -> None:
    relative = Path(*fullname.split(".")[1:]).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(fullname, reference_root / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = module
    spec.loader.exec_module(module)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Generator[None, object, object]:
    global _collecting
    _collecting = True
    try:
        return (yield)
    finally:
        _collecting = False


def install() -> None:
    if any(name == "peft" or name.startswith("peft.") for name in sys.modules):
        raise RuntimeError("the reference peft was imported before the peftkit alias was installed")
    spec = importlib.util.find_spec("peft")
    known = _reference_modules() | set(MODULE_MAP)
    sys.meta_path.insert(0, AliasFinder(known))
    import peft  # noqa: F401 - the alias of peftkit

    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        for fullname in FROM_REFERENCE:
            _load_from_reference(fullname, root)


install()
