"""UniPELT: LoRA, prefix tuning and a bottleneck adapter at once, each behind a learned per-example gate.

Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", ACL 2022
(arXiv:2110.07577). The three methods are combined as in :mod:`peftkit.methods.combined`, and each
component's contribution is multiplied by a gate computed from what that component reads, one value per
example (the reference implementation averages the sigmoid over the sequence)::

    g(x) = mean_t σ(W_g x_t + b_g)          W_g: (1, d), one gate module per adapted module

    LoRA (query, value):   y = W x + g_L(x) · s·B A x                  x: the projection's input
    prefix (attention l):  P'_K = g_P(h) · P_K,  P'_V = g_P(h) · P_V   h: the attention's input hidden states
    adapter (after FFN):   y = h + g_A(h) · W_up act(W_down h)         h: the feed-forward output

    h ─► attention(Q=W_q h + g_L·ΔQ, [g_P P_K; K], [g_P P_V; V + g_L·ΔV]) ─► ... ─► FFN ─► h_F ─►(+ g_A·adapter(h_F))─►

The gates let the model learn, per example and per layer, how much of each method to use; after a
forward pass ``model.last_gates()`` returns them (``{component: {module path: (batch,) tensor}}``).

Defaults (paper §4 and the reference code): LoRA ``r=8`` on the architecture's query/value projections
with ``lora_alpha=8`` (``s = 1``: the reference replaces ``α/r`` by the gate), prefix tuning with 10
virtual tokens through the reparameterisation MLP (hidden 512, Li & Liang's width), and a Pfeiffer adapter
(after the feed-forward block, reduction factor 16: bottleneck 48 on BERT-base). Every gate starts as
``W_g ~ N(0, 0.02²)``, ``b_g = 0``, so ``g ≈ 0.5`` at creation (the reference initialises the adapter gate
this way and the others with torch's default). The mean runs over every position, padding included, as
in the reference. Under cached generation the prefix gate is computed once, from the prompt.

The gates are subclasses of the components' own layers and tuners, defined here: ``GatedLoraLinear``
(``lora_gate``), ``GatedBottleneckLayer`` (``adapter_gate``) and ``GatedPrefixTuningModel``, which scales
each layer's prefix in the key/value cache from a forward pre-hook on that layer's attention module.
``g_L(x)`` depends on each input, so gated LoRA is no weight update: UniPELT cannot be merged.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.architectures import ATTENTION_MODULES
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer, linear_fan_in_fan_out
from peftkit.core.registry import register_method
from peftkit.core.targeting import per_module_value
from peftkit.core.tuner import SAVED_PREFIX, BaseTuner
from peftkit.methods.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel, block_index
from peftkit.methods.combined import CombinedConfig, CombinedModel, ComponentsArg
from peftkit.methods.lora import Linear as LoraLinear
from peftkit.methods.lora import LoraConfig, LoraLayer, LoraModel
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PrefixTuningModel

GATED_LORA_CANNOT_MERGE = (
    "UniPELT's LoRA is gated: its change g(x)·s·B A x depends on each input through the gate "
    "g(x) = mean_t σ(W_g x_t), so it is not a fixed weight update and cannot be merged into the base weights "
    "(merge_adapter / merge_and_unload). Keep the PeftModel for inference."
)


def new_gate(in_features: int, reference: torch.Tensor) -> nn.Linear:
    """A gate ``x ↦ W_g x + b_g`` with ``W_g ~ N(0, 0.02²)``, ``b_g = 0`` (``g ≈ 0.5`` at creation), in the
    adapter's float dtype on the reference parameter's device."""
    dtype = reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32
    gate = nn.Linear(in_features, 1, device=reference.device, dtype=dtype)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02)
        nn.init.zeros_(gate.bias)
    return gate


def example_gate(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``g = mean_t σ(W_g x_t + b_g)``: one value per example, shaped ``(B, 1, …, 1)`` to scale a tensor
    shaped like ``x``; a 2-D ``x`` (no sequence) gives one gate per row."""
    g = torch.sigmoid(gate(x.to(gate.weight.dtype)))  # (B, T, 1)
    if g.dim() > 2:
        g = g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True)  # (B, 1, 1)
    return g


# ------------------------------------------------------------------------------------------- LoRA
class GatedLoraLinear(LoraLinear):
    """LoRA on a linear layer with UniPELT's gate: ``y = W x + g(x) · s·B A x`` (``lora_gate`` holds ``W_g``)."""

    adapter_param_containers = (*LoraLayer.adapter_param_containers, "lora_gate")
    adapter_settings = (*LoraLayer.adapter_settings, "last_gate")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.lora_gate = nn.ModuleDict()
        self.last_gate: dict[str, torch.Tensor] = {}  # the last forward's gates, (batch,) per adapter

    def add_gate(self, adapter_name: str) -> None:
        self.lora_gate[adapter_name] = new_gate(self.in_features, self.lora_A[adapter_name].weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the generic path: LoRA's fused kernel knows no gate
        return AdapterLayer.forward(self, x, *args, **kwargs)

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        delta = super().adapter_delta(x, adapter_name, base_output)  # s·B A x, (B, T, out)
        gate = example_gate(self.lora_gate[adapter_name], x)  # (B, 1, 1)
        self.last_gate[adapter_name] = gate.detach().reshape(-1)
        return gate * delta

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise ValueError(GATED_LORA_CANNOT_MERGE)


class GatedLoraModel(LoraModel):
    """LoRA tuner placing :class:`GatedLoraLinear` layers (UniPELT's LoRA component)."""

    layer_cls = GatedLoraLinear
    can_merge = False
    cannot_merge_reason = GATED_LORA_CANNOT_MERGE

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        assert isinstance(config, LoraConfig)
        created = None
        if not isinstance(target, GatedLoraLinear):
            base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
            fan_in_fan_out = linear_fan_in_fan_out(base, target_name, config.fan_in_fan_out)
            if fan_in_fan_out is None:
                raise ValueError(
                    f"UniPELT's gated LoRA wraps linear layers (torch.nn.Linear, transformers Conv1D); "
                    f"{target_name} is {type(base).__name__}. Narrow the LoRA component's target_modules."
                )
            target = created = GatedLoraLinear(target, fan_in_fan_out=fan_in_fan_out)
        assert isinstance(target, GatedLoraLinear)
        r = per_module_value(target_name, config.rank_pattern, config.r)
        alpha = per_module_value(target_name, config.alpha_pattern, config.lora_alpha)
        target.update_layer(adapter_name, r, alpha, config, target_name)
        target.add_gate(adapter_name)
        return created

    def gate_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Module path -> the last forward's gates ``(batch,)``."""
        return _layer_gates(self, GatedLoraLinear, adapter_name)


def _layer_gates(tuner: BaseTuner, layer_cls: type, adapter_name: str) -> dict[str, torch.Tensor]:
    return {
        path: layer.last_gate[adapter_name]
        for path, layer in tuner.adapter_layers()
        if isinstance(layer, layer_cls) and adapter_name in layer.last_gate
    }


# ----------------------------------------------------------------------------------- adapter
class GatedBottleneckLayer(BottleneckLayer):
    """Bottleneck adapter with UniPELT's gate on its output: ``g(h) · W_up act(W_down h)`` (``adapter_gate``)."""

    adapter_param_containers = (*BottleneckLayer.adapter_param_containers, "adapter_gate")
    adapter_settings = (*BottleneckLayer.adapter_settings, "last_gate")

    def __init__(self, base_layer: nn.Module, layer_index: int | None) -> None:
        super().__init__(base_layer, layer_index)
        self.adapter_gate = nn.ModuleDict()
        self.last_gate: dict[str, torch.Tensor] = {}

    def add_gate(self, adapter_name: str) -> None:
        down = self.adapter_down[adapter_name]
        self.adapter_gate[adapter_name] = new_gate(down.in_features, down.weight)

    def bottleneck(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        out = super().bottleneck(adapter_name, h)  # s · W_up act(W_down h), (B, T, d)
        if adapter_name not in self.adapter_gate:
            return out
        gate = example_gate(self.adapter_gate[adapter_name], h)  # (B, 1, 1): from the adapter's input
        self.last_gate[adapter_name] = gate.detach().reshape(-1)
        return gate * out


class GatedBottleneckModel(BottleneckModel):
    """Bottleneck tuner placing :class:`GatedBottleneckLayer` layers (UniPELT's adapter component)."""

    layer_cls = GatedBottleneckLayer

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        if not isinstance(config, BottleneckConfig):
            raise ValueError(
                f"UniPELT's adapter component is a BottleneckConfig, got {type(config).__name__}."
            )
        created = None
        if not isinstance(target, GatedBottleneckLayer):
            target = created = GatedBottleneckLayer(target, block_index(target_name))
        # the parent adds the adapter to an existing bottleneck layer in place (and returns None)
        super().create_or_update_layer(target, target_name, config, adapter_name)
        assert isinstance(target, GatedBottleneckLayer)
        target.add_gate(adapter_name)
        return created

    def gate_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Module path -> the last forward's gates ``(batch,)``."""
        return _layer_gates(self, GatedBottleneckLayer, adapter_name)


# ------------------------------------------------------------------------------------ prefix


class GatedPrefixTuningModel(PrefixTuningModel):
    """Prefix tuning whose prefix in layer ``l`` is scaled by ``g_l(h)``, ``h`` the attention's input.

    A forward pre-hook on each attention module computes the gate and scales that layer's entry of the
    key/value cache while it still holds just the prefix (the layer appends its own keys after). Hooks act
    only inside this tuner's forward / generate while its prompt is on.
    """

    @property
    def prefix_gates(self) -> nn.ModuleDict:
        """Adapter name -> ``ModuleDict`` of cache layer index -> the gate ``nn.Linear(hidden, 1)``."""
        if "prefix_gates" not in self._modules:
            self._modules["prefix_gates"] = nn.ModuleDict()
        return self._modules["prefix_gates"]  # type: ignore[return-value]

    @property
    def _gate_state(self) -> dict[str, Any]:
        # plain bookkeeping (not modules): attention paths, hook handles, last gates, the armed adapter
        return self.__dict__.setdefault(
            "_gate_state_dict", {"paths": {}, "hooks": {}, "values": {}, "armed": None, "off": False}
        )

    def inject_adapter(self, adapter_name: str) -> None:
        super().inject_adapter(adapter_name)
        try:
            self._add_gates(adapter_name)
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            raise
        self._update_requires_grad()

    def _add_gates(self, adapter_name: str) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in ATTENTION_MODULES:
            raise ValueError(
                f"UniPELT's gated prefix knows the attention modules of {sorted(ATTENTION_MODULES)}, not of "
                f"model_type {model_type!r}; leave the prefix component out for this model "
                f"(UniPELTConfig().with_component('prefix', None))."
            )
        pattern = ATTENTION_MODULES[model_type]
        found = [(n, m) for n, m in self.model.named_modules() if re.fullmatch(pattern, n)]
        if not found:
            raise ValueError(
                f"No module of {type(self.model).__name__} matches the attention pattern {pattern!r}."
            )
        reference = self.model.get_input_embeddings().weight
        hidden = reference.shape[1]
        gates = nn.ModuleDict()
        paths: dict[int, str] = {}
        hooks = []
        self.prefix_gates[adapter_name] = gates
        self._gate_state["hooks"][adapter_name] = hooks
        self._gate_state["paths"][adapter_name] = paths
        for name, module in found:
            layer = getattr(module, "layer_idx", None)
            layer = block_index(name) if layer is None else layer
            if layer is None or layer in paths:
                raise ValueError(f"Cannot tell which cache layer {name} uses (no layer_idx, no block index).")
            gates[str(layer)] = new_gate(hidden, reference)
            paths[layer] = name
            hook = functools.partial(self._gate_prefix, adapter_name, layer, name)
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _gate_prefix(
        self, adapter_name: str, layer: int, path: str, module: nn.Module, args: tuple, kwargs: dict
    ) -> None:
        """Forward pre-hook on attention ``layer``: ``P'_K, P'_V = g(h)·P_K, g(h)·P_V`` in the cache."""
        from transformers.cache_utils import Cache

        state = self._gate_state
        if state["armed"] != adapter_name or state["off"]:
            return
        cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
        cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache's decoder part
        entries = getattr(cache, "layers", None)
        if entries is None or layer >= len(entries):
            return
        entry = entries[layer]
        keys = getattr(entry, "keys", None)
        num_tokens = self.prompt_dims[adapter_name].num_virtual_tokens
        # only a fresh prefix (the first step of generation, or a plain forward) is gated, exactly once
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[-2] != num_tokens:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        gate = example_gate(self.prefix_gates[adapter_name][str(layer)], hidden)  # (B, 1, 1)
        state["values"].setdefault(adapter_name, {})[path] = gate.detach().reshape(-1)
        gate = gate.reshape(-1, 1, 1, 1).to(keys.dtype)  # against (B, heads, P, head_dim)
        entry.keys = keys * gate
        entry.values = entry.values * gate

    @contextlib.contextmanager
    def _armed(self) -> Iterator[None]:
        state = self._gate_state
        previous, state["armed"] = state["armed"], self.active_adapters[0] if self.active_adapters else None
        try:
            yield
        finally:
            state["armed"] = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._armed():
            return super().forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._armed():
            return super().generate(*args, **kwargs)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        state = self._gate_state
        previous, state["off"] = state["off"], True
        try:
            with super().adapters_disabled():
                yield
        finally:
            state["off"] = previous

    def gate_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Attention module path -> the last forward's gates ``(batch,)``."""
        return dict(self._gate_state["values"].get(adapter_name, {}))

    # ------------------------------------------------------------------------ bookkeeping
    def _gate_parameters(self, adapter_name: str, prefix: str) -> dict[str, nn.Parameter]:
        """The gates' parameters, keyed ``<prefix><attention path>.prefix_gate.<weight|bias>``."""
        if adapter_name not in self.prefix_gates:
            return {}
        paths = self._gate_state["paths"][adapter_name]
        return {
            f"{prefix}{paths[int(layer)]}.prefix_gate.{name}": param
            for layer, gate in self.prefix_gates[adapter_name].items()
            for name, param in gate.named_parameters()
        }

    def extra_adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {**super().extra_adapter_parameters(adapter_name), **self._gate_parameters(adapter_name, "")}

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        gates = {k: p.detach() for k, p in self._gate_parameters(adapter_name, SAVED_PREFIX).items()}
        return {**super().adapter_state_dict(adapter_name), **gates}

    def adapter_load_targets(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {
            **super().adapter_load_targets(adapter_name),
            **self._gate_parameters(adapter_name, SAVED_PREFIX),
        }

    def _remove_gates(self, adapter_name: str) -> None:
        state = self._gate_state
        for handle in state["hooks"].pop(adapter_name, []):
            handle.remove()
        state["paths"].pop(adapter_name, None)
        state["values"].pop(adapter_name, None)
        if adapter_name in self.prefix_gates:
            del self.prefix_gates[adapter_name]

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        super()._remove_adapter_modules(adapter_name)
        self._remove_gates(adapter_name)

    def unload(self) -> nn.Module:
        for name in list(self._gate_state["hooks"]):
            for handle in self._gate_state["hooks"].pop(name):
                handle.remove()
        return super().unload()


# ------------------------------------------------------------------------------------ UniPELT
GATED_TUNERS: dict[str, type[BaseTuner]] = {
    str(PeftType.LORA): GatedLoraModel,
    str(PeftType.PREFIX_TUNING): GatedPrefixTuningModel,
    str(PeftType.BOTTLENECK): GatedBottleneckModel,
}


def unipelt_components() -> dict[str, PeftConfig]:
    """UniPELT's three components with the paper's settings (see the module docstring)."""
    return {
        "lora": LoraConfig(r=8, lora_alpha=8),
        "prefix": PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512),
        "adapter": BottleneckConfig(style="pfeiffer", reduction_factor=16),
    }


@dataclass
class UniPELTConfig(CombinedConfig):
    """UniPELT: gated LoRA + gated prefix tuning + gated bottleneck adapter (see the module docstring).

    ``components`` defaults to the paper's three; ``with_component(name, config)`` replaces one and
    ``with_component(name, None)`` drops one (the paper's UniPELT (AP) has no LoRA).

    Raises:
        ValueError: a component that is not a LoraConfig, PrefixTuningConfig or BottleneckConfig, or a
            DoRA LoRA (UniPELT gates plain LoRA).
    """

    components: ComponentsArg = field(default_factory=unipelt_components)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.UNIPELT
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name, config in self.components.items():  # type: ignore[union-attr]
            if str(config.peft_type) not in GATED_TUNERS:
                raise ValueError(
                    f"UniPELT gates LoRA, prefix tuning and bottleneck adapters; component {name!r} is "
                    f"{config.peft_type}. For other mixes use CombinedConfig (no gates)."
                )
            if getattr(config, "use_dora", False):
                raise ValueError(
                    f"Component {name!r}: UniPELT gates plain LoRA; use_dora=True is not supported."
                )


class UniPELTModel(CombinedModel):
    """A combination whose components are the gated tuners of this file; gates readable after a forward."""

    cannot_merge_reason = (
        f"UniPELT cannot be merged. {GATED_LORA_CANNOT_MERGE} (Its prefix and adapter do not merge either.)"
    )

    def check_can_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """No UniPELT adapter merges: say so once, rather than per gated component."""
        raise ValueError(self.cannot_merge_reason)

    @classmethod
    def component_tuner_cls(cls, component: str, config: PeftConfig) -> type[BaseTuner]:
        return GATED_TUNERS[str(config.peft_type)]

    @classmethod
    def component_label(cls, config: PeftConfig) -> str:
        return f"{config.peft_type} + gate"

    def last_gates(self, adapter_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The gates of the last forward pass: ``{component: {module path: (batch,) tensor}}`` (the active
        adapter's by default); module paths are relative to the base model."""
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; this model has {list(self.peft_config)}.")
        return {
            component: tuner.gate_values(internal)  # type: ignore[operator]
            for component, internal, tuner in self.components_of(name)
        }


register_method("UNIPELT", UniPELTConfig, UniPELTModel)
