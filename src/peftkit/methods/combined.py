"""Combining methods on one model: one adapter made of several methods, configured as data.

The idea of AdapterHub's ``ConfigUnion`` (Pfeiffer et al., "AdapterHub: A Framework for Adapting
Transformers", EMNLP 2020 demos), which is how He et al. 2022 (MAM Adapter, ``methods/mam.py``) and Mao
et al. 2022 (UniPELT, ``methods/unipelt.py``) describe their methods: a combination lists *component*
configs, and each component is placed by its own method file, exactly as if it were alone::

    CombinedConfig(components={
        "prefix": PrefixTuningConfig(num_virtual_tokens=30),             # keys/values in every attention
        "adapter": BottleneckConfig(style="parallel", scaling=4.0),      # beside every feed-forward block
    })

    h ─► attention(Q, [P_K; K], [P_V; V]) ─► + ─► FFN(x) + s·adapter(x) ─► + ─►       (both at once)

The components' changes simply coexist: nothing is shared but the frozen base model.

How it is built, without a single method-specific branch:

* every component gets its own tuner, of the class its method registered (``LoraModel``,
  ``PrefixTuningModel``, ...), on the same model, under the internal adapter name
  ``<adapter>__<component>`` (component names never contain ``__``, so the split is unique);
* the combination's forward runs the components' tuners as a chain of stages, like middleware: a component
  tuner sees, as its ``model``, a :class:`_Stage`: the model itself for every attribute (modules,
  config, hooks), except that *calling* it (or its ``generate``) runs the next component's tuner, the last
  one calling the model::

      PeftModel ─► prefix tuner (adds the prefix cache) ─► adapter tuner (AdapterDrop contexts) ─► model

* activation, trainability, disabling, deleting and merging work from the layers' own declarations, with
  the internal names; the combination owns only its ``modules_to_save`` copies (a classification head is
  trained once, not once per component, so components may not set ``modules_to_save``).

On disk: one ``adapter_config.json`` (``peft_type`` ``COMBINED``, ``MAM`` or ``UNIPELT``) whose
``components`` is a list of ``{"name": ..., "config": {...}}`` in placement order (each component's config
as its method saves it, derived values included), and one ``adapter_model.safetensors`` in which each
component's tensors carry its own on-disk names behind ``<component>.`` (``prefix.prompt_embeddings``,
``adapter.base_model.model.<module>.adapter_down.weight``) and the combination's head its usual
``base_model.model.<head>...`` name.

Limits (clear errors): one combination active at a time; no mixed-adapter batches; components that train
the model's own parameters in place (BitFit, Freeze) or that are themselves combinations; merging when a
component cannot merge or when two components wrap the same module.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.checkpoint import validate_adapter_name
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import get_method, register_method
from peftkit.core.tuner import SAVED_PREFIX, BaseTuner

SEPARATOR = "__"  # internal adapter name of a component: <adapter>__<component>
#: letters and digits in groups joined by single underscores: never ``__``, never a leading ``_``
COMPONENT_NAME = re.compile(r"^[A-Za-z0-9]+(_[A-Za-z0-9]+)*$")
RESERVED_COMPONENT_NAMES = {
    "base_model"
}  # component tensors are saved as <name>.<key>; own ones base_model.*

ComponentsArg = dict[str, Any] | list[Any]


def internal_adapter_name(adapter_name: str, component: str) -> str:
    """The adapter name a component's tuner and layers know the component by."""
    return f"{adapter_name}{SEPARATOR}{component}"


def parse_components(value: Any) -> dict[str, PeftConfig]:
    """Components as an ordered ``{name: config}``, from a dict, a list of ``(name, config)`` pairs or the
    saved list of ``{"name": ..., "config": {...}}``; configs may be given as their saved dicts.

    Raises:
        TypeError: not a dict or list, or a component that is not a config.
        ValueError: a bad or repeated name, an unknown ``peft_type``, or a component that is itself a
            combination.
    """
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for entry in value:
            if isinstance(entry, dict) and set(entry) == {"name", "config"}:
                items.append((entry["name"], entry["config"]))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append((entry[0], entry[1]))
            else:
                raise TypeError(
                    f"A components list holds (name, config) pairs or {{'name': ..., 'config': ...}} dicts, "
                    f"got {entry!r}."
                )
    else:
        raise TypeError(
            f"components must be a dict {{name: config}} (e.g. {{'lora': LoraConfig(r=8)}}), got "
            f"{type(value).__name__}."
        )
    parsed: dict[str, PeftConfig] = {}
    for name, config in items:
        if not isinstance(name, str) or not COMPONENT_NAME.match(name) or name in RESERVED_COMPONENT_NAMES:
            raise ValueError(
                f"Component name {name!r} is not allowed: use letters and digits joined by single underscores "
                f"(e.g. 'lora', 'ffn_adapter'; no '__', not 'base_model')."
            )
        if name in parsed:
            raise ValueError(f"Component name {name!r} appears twice; give each component its own name.")
        if isinstance(config, dict):
            config = PeftConfig.from_dict(config)  # ValueError for an unknown or missing peft_type
        if not isinstance(config, PeftConfig):
            raise TypeError(
                f"Component {name!r} must be a method config (e.g. LoraConfig(...)) or its saved dict, got "
                f"{type(config).__name__}."
            )
        if isinstance(config, CombinedConfig):
            inner = ", ".join(config.components)
            raise ValueError(
                f"Component {name!r} is itself a combination ({config.peft_type}); combinations do not nest. "
                f"List its components ({inner}) directly in this combination."
            )
        parsed[name] = config
    return parsed


@dataclass
class CombinedConfig(PeftConfig):
    """Several methods on one model, as one adapter.

    Args:
        components: ``{name: config}`` in placement order (components wrapping the same module nest in this
            order: a later one wraps an earlier one). Names: letters and digits joined by single
            underscores. Each config is any registered method's config except in-place methods (BitFit,
            Freeze) and combinations.
        modules_to_save: modules (a new head) trained in full and saved with the combination; the
            task's default head (``classifier`` / ``score``) is added by the task wrapper, as for any method.

    Raises:
        ValueError / TypeError: see :func:`parse_components`; no components; an unregistered method; a
            component that sets ``modules_to_save``.
    """

    components: ComponentsArg = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.peft_type is None:  # subclasses (MAM, UniPELT) set their own type first
            self.peft_type = PeftType.COMBINED
        self.components = parse_components(self.components)
        super().__post_init__()

    def validate(self) -> None:
        assert isinstance(self.components, dict)
        if not self.components:
            raise ValueError(
                "A combination needs at least one component, e.g. components={'lora': LoraConfig(r=8), "
                "'adapter': BottleneckConfig()}."
            )
        for name, config in self.components.items():
            try:
                get_method(str(config.peft_type))
            except KeyError:
                raise ValueError(
                    f"Component {name!r} has peft_type {config.peft_type!r}, which is not a registered method."
                ) from None
            if getattr(config, "modules_to_save", None):
                raise ValueError(
                    f"Component {name!r} sets modules_to_save={config.modules_to_save}; a combination trains "
                    f"one copy of such modules for all its components: set modules_to_save on the "
                    f"{type(self).__name__} instead."
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        assert isinstance(self.components, dict)
        # a list keeps the placement order (adapter_config.json is written with sorted keys)
        data["components"] = [{"name": n, "config": c.to_dict()} for n, c in self.components.items()]
        return data

    def with_component(self, name: str, config: PeftConfig | None) -> CombinedConfig:
        """A copy with component ``name`` replaced (or appended) by ``config``, or removed when ``None``."""
        components = dict(self.components)  # type: ignore[arg-type]
        if config is None:
            if name not in components:
                raise ValueError(f"No component named {name!r}; this config has {list(components)}.")
            del components[name]
        else:
            components[name] = config
        return self.replace(components=components)


class _Stage:
    """What a component's tuner sees as its ``model``: the model for every attribute (named modules,
    config, hooks, setattr), except that calling it, or its ``generate``, runs the next component.

    Instances are made by :func:`_make_stage` with a subclass named after the model's class, so that the
    tuners' messages read ``LlamaForCausalLM has no ...``.
    """

    __slots__ = ("_key", "_model", "_owner")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner.run_after(self._key, "forward", args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner.run_after(self._key, "generate", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _Stage.__slots__:
            raise AttributeError(name)
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._model, name)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # deepcopy / pickle
        return _make_stage, (self._model, self._owner, self._key)

    def __repr__(self) -> str:
        return f"_Stage(component={self._key}, model={type(self._model).__name__})"


_STAGE_CLASSES: dict[str, type[_Stage]] = {}


def _make_stage(model: nn.Module, owner: CombinedModel, key: tuple[str, str]) -> _Stage:
    name = type(model).__name__
    if name not in _STAGE_CLASSES:
        _STAGE_CLASSES[name] = type(name, (_Stage,), {"__slots__": ()})
    cls = _STAGE_CLASSES[name]
    stage = object.__new__(cls)
    for attr, value in (("_model", model), ("_owner", owner), ("_key", key)):
        object.__setattr__(stage, attr, value)
    return stage


class CombinedModel(BaseTuner):
    """Builds one tuner per component (the class its method registered) and chains their forwards."""

    supports_low_cpu_mem_usage = False  # built as usual (HF PEFT ignores the option for prompt learning)

    #: as a class: combinations in general do not merge; an instance says whether all its components do
    #: (kept up to date on every add and delete; merge_adapter checks the adapters it is asked to merge)
    can_merge = False
    supports_mixed_batches = False
    no_mixed_batches_reason = (
        "Mixed-adapter batches (adapter_names=...) are not supported for combinations of methods; run one "
        "batch per adapter."
    )

    # ------------------------------------------------------------------------------ components
    @classmethod
    def component_tuner_cls(cls, component: str, config: PeftConfig) -> type[BaseTuner]:
        """The tuner class that places ``component`` (UniPELT substitutes gated subclasses here)."""
        return get_method(str(config.peft_type)).tuner_cls

    @property
    def component_tuners(self) -> nn.ModuleDict:
        """Adapter name -> ``ModuleDict`` of component name -> that component's tuner."""
        # created on first use: BaseTuner.__init__ injects the first adapter before a subclass could set it
        if "component_tuners" not in self._modules:
            self._modules["component_tuners"] = nn.ModuleDict()
        return self._modules["component_tuners"]  # type: ignore[return-value]

    def components_of(self, adapter_name: str) -> list[tuple[str, str, BaseTuner]]:
        """``(component, internal adapter name, tuner)`` of one combination, in placement order."""
        if adapter_name not in self.component_tuners:
            return []
        return [
            (component, internal_adapter_name(adapter_name, component), tuner)
            for component, tuner in self.component_tuners[adapter_name].items()
        ]

    # ------------------------------------------------------------------------------- injection
    def inject_adapter(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, CombinedConfig):
            raise TypeError(
                f"{type(self).__name__} holds combinations; adapter {adapter_name!r} is a "
                f"{type(config).__name__}. Wrap it: CombinedConfig(components={{'name': config}})."
            )
        self.component_tuners[adapter_name] = nn.ModuleDict()
        try:
            for component, component_config in config.components.items():  # type: ignore[union-attr]
                self._add_component(adapter_name, component, component_config, config.inference_mode)
            self._wrap_modules_to_save(adapter_name, config)
            self.module_targets_by_adapter[adapter_name] = [
                name
                for _, internal, tuner in self.components_of(adapter_name)
                for name in tuner.module_targets_by_adapter.get(internal, [])
            ]
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            raise
        self._update_can_merge()
        self.set_adapter(self.active_adapters)

    def _update_can_merge(self) -> None:
        self.can_merge = all(
            tuner.can_merge for name in self.peft_config for _, _, tuner in self.components_of(name)
        )

    def _add_component(
        self, adapter_name: str, component: str, config: PeftConfig, inference_mode: bool
    ) -> None:
        internal = internal_adapter_name(adapter_name, component)
        tuner_cls = self.component_tuner_cls(component, config)
        validate_adapter_name(internal, self.model, reserved=tuner_cls.reserved_names())
        stage = _make_stage(self.model, self, (adapter_name, component))
        # the component follows the combination's inference_mode (a loaded, frozen combination builds
        # frozen components); the user's config object is not changed
        tuner = tuner_cls(stage, {internal: config.replace(inference_mode=inference_mode)}, internal)  # type: ignore[arg-type]
        self.component_tuners[adapter_name][component] = tuner
        selection = tuner.base_selections.get(internal)
        if selection is not None and selection.names:
            raise ValueError(
                f"Component {component!r} ({config.peft_type}) trains the model's own parameters in place, so "
                f"it cannot share the model with other components. Use it alone, or pick a method that adds "
                f"its own parameters."
            )

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        for _, internal, tuner in reversed(self.components_of(adapter_name)):
            tuner._remove_adapter_modules(internal)
        super()._remove_adapter_modules(adapter_name)  # the combination's modules_to_save copies
        if adapter_name in self.component_tuners:
            del self.component_tuners[adapter_name]
        self._update_can_merge()

    # ---------------------------------------------------------------------- activity & training
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate one combination: its components' layers, its head copy, and the training of both."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(
                f"Unknown adapter(s) {unknown or names}; this model has {list(self.peft_config)}."
            )
        if len(names) > 1:
            raise ValueError(
                f"Only one combination can be active at a time, got {names}: each already combines several "
                f"methods. Put all the components you want into one combination."
            )
        layer_names = [internal for _, internal, _ in self.components_of(names[0])]
        for _, wrapper in self.save_wrappers():
            wrapper.set_adapter(names)
        for _, layer in self.adapter_layers():
            layer.set_adapter(layer_names)
        self.active_adapters = names
        self._update_requires_grad()

    def adapter_parameter_map(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Every component's parameters under ``<component>.<its own key>``, plus the combination's
        ``modules_to_save`` copies under their usual keys."""
        params: dict[str, nn.Parameter] = {}
        for component, internal, tuner in self.components_of(adapter_name):
            for key, param in tuner.adapter_parameter_map(internal).items():
                params[f"{component}.{key}"] = param
        params.update(self._own_parameters(adapter_name))
        return params

    def _own_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return BaseTuner.adapter_parameter_map(self, adapter_name)  # only the head copies carry this name

    def parameter_count_parts(self) -> dict[str, int]:
        """Parameter counts of the active combination's parts (each component, the head copies)."""
        parts: dict[str, int] = {}
        for name in self.active_adapters:
            config = self.peft_config[name]
            for component, internal, tuner in self.components_of(name):
                kind = self.component_label(config.components[component])  # type: ignore[union-attr]
                count = sum(p.numel() for p in tuner.adapter_parameter_map(internal).values())
                parts[f"{name}.{component} ({kind})"] = count
            own = self._own_parameters(name)
            if own:
                parts[f"{name} (modules_to_save)"] = sum(p.numel() for p in own.values())
        return parts

    @classmethod
    def component_label(cls, config: PeftConfig) -> str:
        return str(config.peft_type)

    @classmethod
    def saved_tensor_parts(cls, config: PeftConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
        assert isinstance(config, CombinedConfig)
        return {
            f"{component} ({cls.component_label(sub)})": (
                f"{component}.",
                tuple(cls.component_tuner_cls(component, sub).layer_cls.adapter_param_containers),
            )
            for component, sub in config.components.items()  # type: ignore[union-attr]
        }

    def extra_forward_inputs(self) -> tuple[str, ...]:
        """The components' extra inputs (each component takes its own out of the inputs on the way)."""
        names: list[str] = []
        for _, _, tuner in self._chain():
            names += [n for n in tuner.extra_forward_inputs() if n not in names]
        return tuple(names)

    def check_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        for _, _, tuner in self._chain():
            own = {k: v for k, v in inputs.items() if k in tuner.extra_forward_inputs()}
            if own:
                tuner.check_forward_inputs(own)

    def on_step_end(self, global_step: int) -> None:
        """The trainer's per-step hook, passed on to the components that adapt during training (AdaLoRA)."""
        for _, _, tuner in self._chain():
            tuner.on_step_end(global_step)

    # ---------------------------------------------------------------------------- checkpoints
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for component, internal, tuner in self.components_of(adapter_name):
            for key, tensor in tuner.adapter_state_dict(internal).items():
                tensors[f"{component}.{key}"] = tensor
        for key, param in self._own_parameters(adapter_name).items():
            tensors[SAVED_PREFIX + key] = param.detach()
        return tensors

    def adapter_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        targets: dict[str, nn.Parameter] = {}
        for component, internal, tuner in self.components_of(adapter_name):
            for key, param in tuner.adapter_load_targets(internal).items():
                targets[f"{component}.{key}"] = param
        for key, param in self._own_parameters(adapter_name).items():
            targets[SAVED_PREFIX + key] = param
        return targets

    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        """The components as saved: each config with the values its method derived from the model."""
        config = self.peft_config[adapter_name]
        assert isinstance(config, CombinedConfig)
        entries = []
        for component, internal, tuner in self.components_of(adapter_name):
            data = config.components[component].to_dict()  # type: ignore[union-attr]
            data.update(tuner.saved_config_fields(internal))
            entries.append({"name": component, "config": data})
        return {"components": entries}

    # ---------------------------------------------------------------------------------- forward
    def _chain(self) -> list[tuple[str, str, BaseTuner]]:
        """``(adapter, component, tuner)`` of the active combination, in placement order."""
        return [
            (name, component, tuner)
            for name in self.active_adapters
            for component, _, tuner in self.components_of(name)
        ]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_from(0, "forward", args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_from(0, "generate", args, kwargs)

    def run_after(self, key: tuple[str, str], kind: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run the stage after component ``key = (adapter, component)`` (called by its :class:`_Stage`)."""
        keys = [(name, component) for name, component, _ in self._chain()]
        index = keys.index(key) + 1 if key in keys else len(keys)  # an inactive component: the model
        return self._run_from(index, kind, args, kwargs)

    def _run_from(self, index: int, kind: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        chain = self._chain()
        if index >= len(chain):
            call = self.model if kind == "forward" else self.model.generate
        else:
            tuner = chain[index][2]
            # a tuner without its own generate reaches its stage's generate through BaseTuner.__getattr__
            call = tuner if kind == "forward" else tuner.generate
        return call(*args, **kwargs)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Every component's own disabling (layers off, soft prompts off), and the head copies."""
        with contextlib.ExitStack() as stack:
            for name in self.peft_config:
                for _, _, tuner in self.components_of(name):
                    stack.enter_context(tuner.adapters_disabled())
            stack.enter_context(super().adapters_disabled())
            yield

    # ---------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge every component, which needs every component to merge and no module wrapped twice."""
        self.check_can_merge(adapter_names)
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        internal = [i for name in names for _, i, _ in self.components_of(name)]
        self._merge_layers(internal, safe_merge)

    def check_can_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        refused = [
            f"{component!r} ({self.component_label(self.peft_config[name].components[component])})"  # type: ignore[union-attr]
            for name in names
            for component, _, tuner in self.components_of(name)
            if not tuner.can_merge
        ]
        if refused:
            raise ValueError(
                f"Cannot merge {names}: component(s) {', '.join(refused)} do not fold into the base weights "
                f"(soft prompts are extra inputs, bottleneck adapters non-linear functions). Keep the "
                f"PeftModel for inference, or combine only methods that merge (LoRA, IA3, ...)."
            )
        nested = [path for path, layer in self.adapter_layers() if isinstance(layer.base_layer, AdapterLayer)]
        if nested:
            raise ValueError(
                f"Cannot merge: {nested[0]} is wrapped by two components, and merging nested adapters into one "
                f"weight would change what the model computes. Target disjoint modules to merge."
            )

    def unload(self) -> nn.Module:
        for name in list(self.peft_config):
            for _, _, tuner in self.components_of(name):
                tuner.unload()  # a component's own clean-up (forward hooks), then the generic unwrapping
        return super().unload()


register_method("COMBINED", CombinedConfig, CombinedModel)
