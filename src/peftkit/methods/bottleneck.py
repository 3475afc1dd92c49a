"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and AdapterDrop.

A bottleneck adapter is a small two-layer network with a residual connection::

    adapter(h) = s · W_up act(W_down h + b_down) + b_up        W_down: (m, d), W_up: (d, m), m = d / reduction

* ``style="houlsby"`` (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
  arXiv:1902.00751): two serial adapters per block, one on the attention output projection and one on the
  feed-forward output projection, each before dropout, the residual add and the LayerNorm:
  ``y = h + adapter(h)`` with ``h`` the projection's output.
* ``style="pfeiffer"`` (Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer
  Learning", EACL 2021, arXiv:2005.00247): one serial adapter per block, on the feed-forward output.
* ``style="parallel"`` (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning",
  ICLR 2022, arXiv:2110.04366): the adapter reads the feed-forward sub-layer's *input* ``x`` and its output
  is added to the sub-layer's output: ``y = FFN(x) + s · adapter(x)`` (He et al. use ``s = 4``). With
  ``parallel_placement="attention"`` it sits beside the self-attention sub-layer instead:
  ``y = Attn(x) + s · adapter(x)`` (added at the attention output projection); ``"both"`` puts one at each.

Where they sit in a (pre-LN) block; the adapter wraps the named module, nothing of the model's forward is
copied::

    x ─┬─► LN ─┬─► attn … o_proj ─►[houlsby]─►(+)─►(+)─┬─► LN ─┬─► FFN … down_proj ─►[houlsby|pfeiffer]─►(+)─►(+)─►
       │       └──►[parallel, "attention"]─────┘    ▲  │       └──►[parallel, "ffn"]──────────────────────┘    ▲
       └───────────────── residual ─────────────────┘  └────────────────────── residual ───────────────────────┘

The placement is a small role map per architecture (:data:`BOTTLENECK_ROLES`): the attention output
projection, the feed-forward output projection, and the modules whose *input* is the feed-forward input and
the self-attention input (read by a forward pre-hook for parallel adapters). Other models name the modules
with ``attention_output_modules`` / ``ffn_output_modules`` / ``ffn_input_modules`` /
``attention_input_modules``.

The up-projection starts at zero (``init="zero"``; the down-projection has torch's Kaiming-uniform weight),
so a fresh adapter leaves the model's output exactly unchanged; ``init="houlsby"`` draws both projections
from a truncated normal with std 1e-2 (near identity). Biases start at zero.

AdapterDrop (Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers", EMNLP 2021,
arXiv:2010.11918): ``drop_layers=n`` puts no adapter into the first ``n`` blocks; ``robust_drop_layers=k``
skips, at each training forward, the adapters of the lowest ``n ~ U{0..k}`` blocks (nothing is skipped in
eval mode); ``set_adapter(Parallel("a", "b"))`` runs one batch through several task adapters at once: the
blocks below the first adapter run once, then the hidden states are repeated once per task and each copy
goes through its own adapters. The outputs come back stacked along the batch dimension
(``[task a rows; task b rows; ...]``); ``labels`` are repeated too (the loss is the mean over the tasks'
copies), ``generate`` runs the copies as one mixed-adapter batch, and on encoder-decoder models the lower
encoder blocks are shared.

Bottleneck adapters add a non-linear function of the activations, so they cannot be merged into weights.
AdapterFusion (``methods/fusion.py``) combines several trained bottleneck adapters on the same layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.architectures import BOTTLENECK_ROLES
from peftkit.core.checkpoint import adapter_fingerprint
from peftkit.core.config import PeftConfig, PeftType
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper, adapter_dtype
from peftkit.core.registry import get_method, register_method, registered_methods
from peftkit.core.targeting import name_matches
from peftkit.core.tuner import BaseTuner

STYLES = ("houlsby", "pfeiffer", "parallel")
ROLE_FIELDS = (
    "attention_output_modules",
    "ffn_output_modules",
    "ffn_input_modules",
    "attention_input_modules",
)
INITS = ("zero", "houlsby")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}


#: which roles carry an adapter in each style (parallel adapters also read the ``ffn_input`` role); with
#: ``parallel_placement`` other than ``"ffn"`` see :data:`PARALLEL_PLACEMENTS`
STYLE_ROLES = {
    "houlsby": ("attention_output", "ffn_output"),
    "pfeiffer": ("ffn_output",),
    "parallel": ("ffn_output",),
}
#: where a parallel adapter sits: (role of the wrapped output module, role of the module whose input it reads)
PARALLEL_PLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "ffn": (("ffn_output", "ffn_input"),),
    "attention": (("attention_output", "attention_input"),),
    "both": (("attention_output", "attention_input"), ("ffn_output", "ffn_input")),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapter settings.

    Args:
        style: ``"houlsby"`` (after attention and feed-forward), ``"pfeiffer"`` (after feed-forward) or
            ``"parallel"`` (beside a sub-layer, see ``parallel_placement``).
        parallel_placement: for ``style="parallel"``: beside the feed-forward sub-layer (``"ffn"``, He et al.'s
            choice), beside the self-attention sub-layer (``"attention"``: reads the attention input, adds to
            the attention output projection) or ``"both"`` (one adapter at each).
        reduction_factor: bottleneck size = input features / ``reduction_factor`` (at least 1).
        bottleneck_size: the bottleneck size itself; overrides ``reduction_factor``.
        non_linearity: ``"relu"``, ``"gelu"``, ``"swish"`` / ``"silu"`` or ``"tanh"``.
        scaling: ``s`` in ``s · W_up act(W_down h)`` (He et al. use 4 for parallel adapters).
        init: ``"zero"`` (up-projection zero: the identity at creation) or ``"houlsby"`` (both projections
            from a truncated normal with std 1e-2: near identity).
        drop_layers: AdapterDrop: no adapter in the first ``drop_layers`` blocks.
        robust_drop_layers: robust AdapterDrop: at each forward in training mode, skip the adapters of the
            lowest ``n`` blocks, ``n`` drawn uniformly from ``0..robust_drop_layers`` (torch's RNG).
        attention_output_modules, ffn_output_modules, ffn_input_modules, attention_input_modules: the modules
            of each role (a list: exact names or dotted suffixes; a string: a full-match regex); ``None`` uses
            :data:`BOTTLENECK_ROLES` for the model's ``model_type``.
        modules_to_save: modules (e.g. a new head) trained in full and saved with the adapter.

    Raises:
        ValueError: an unknown style / non-linearity / init / placement, a non-positive size, negative drop
            counts.
    """

    style: str = "pfeiffer"
    parallel_placement: str = "ffn"
    reduction_factor: float = 16.0
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    init: str = "zero"
    drop_layers: int = 0
    robust_drop_layers: int = 0
    attention_output_modules: list[str] | str | None = None
    ffn_output_modules: list[str] | str | None = None
    ffn_input_modules: list[str] | str | None = None
    attention_input_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOTTLENECK
        super().__post_init__()

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r} is unknown; use one of {', '.join(STYLES)}.")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity={self.non_linearity!r} is unknown; use one of {', '.join(NON_LINEARITIES)}."
            )
        if self.parallel_placement not in PARALLEL_PLACEMENTS:
            raise ValueError(
                f"parallel_placement={self.parallel_placement!r} is unknown; use one of "
                f"{', '.join(PARALLEL_PLACEMENTS)}."
            )
        if self.parallel_placement != "ffn" and self.style != "parallel":
            raise ValueError(
                f"parallel_placement={self.parallel_placement!r} places parallel adapters; it needs "
                f"style='parallel' (style={self.style!r} places serial adapters by its own rule)."
            )
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; use one of {', '.join(INITS)}.")
        if not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be a positive number.")
        if self.bottleneck_size is not None and (
            not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer or None.")
        for name in ("drop_layers", "robust_drop_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0.")
        for name in ROLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                raise TypeError(f"{name} must be a list or a string (sets do not serialise reproducibly).")
            if isinstance(value, list) and not value:
                raise ValueError(f"{name} is an empty list; name at least one module or leave it None.")


class Parallel(tuple):
    """Several task adapters run on one input: ``model.set_adapter(Parallel("a", "b"))``.

    The blocks below the first adapter run once; then the batch is repeated once per adapter and row group
    ``k`` goes through adapter ``k``. The model returns the outputs stacked along the batch dimension
    (``out.view(len(names), batch, ...)``). ``labels`` are repeated for every task (the model's loss is then
    the mean over all copies); ``generate`` returns each task's sequences stacked the same way (greedy or
    sampling, one sequence per row; no block is shared there, since the tasks' tokens differ).
    """

    def __new__(cls, *adapter_names: str) -> Parallel:
        if not adapter_names or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"Parallel needs adapter names (strings), got {adapter_names!r}.")
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"Parallel got a name twice: {adapter_names!r}.")
        return super().__new__(cls, adapter_names)

    def __repr__(self) -> str:
        return f"Parallel({', '.join(map(repr, self))})"


def block_index(module_name: str) -> int | None:
    """The transformer block a module belongs to: the first all-digit segment of its name."""
    return next((int(s) for s in module_name.split(".") if s.isdigit()), None)


def _features(module: nn.Module, side: str) -> int:
    """Input (``side="in"``) or output features of a linear layer, or of the first / last linear layer
    inside a block (e.g. ``mlp``: ``gate_proj`` in, ``down_proj`` out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        raise ValueError(
            f"Cannot tell the feature size of {type(module).__name__}: it has no linear layer. Name a linear "
            f"layer (or a block containing one) in the *_modules fields of BottleneckConfig."
        )
    if side == "in":
        first = linears[0]
        return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]
    last = linears[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.nf


class BottleneckLayer(AdapterLayer):
    """Wraps a sub-layer's output module; adds each active adapter's output to the module's output.

    Serial adapters read the module's output ``h``; parallel adapters read the sub-layer's input, which a
    forward pre-hook on ``input_source`` (installed by :class:`BottleneckModel`) hands over as
    ``tapped_input``. AdapterFusion layers (``adapter_fusion``) live here too.
    """

    adapter_param_containers = ("adapter_down", "adapter_up", "adapter_fusion")
    adapter_settings = ("non_linearity", "scaling", "reads_input", "fused_adapters", "fusion_weights")

    def __init__(self, base_layer: nn.Module, layer_index: int | None) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.reads_input: dict[str, bool] = {}  # parallel adapters read the sub-layer's input
        self.fused_adapters: dict[str, list[str]] = {}
        self.fusion_weights: dict[str, torch.Tensor] = {}  # the last forward's attention over adapters
        self.layer_index = layer_index
        self.input_source: str | None = None  # module (path in the model) whose input parallel adapters read
        self.tapped_input: torch.Tensor | None = None
        self.skipped_adapters: set[str] = set()  # robust AdapterDrop, set for one forward

    def _reference_parameter(self) -> torch.Tensor:
        return next(self.get_base_layer().parameters())

    def update_layer(
        self, adapter_name: str, in_features: int, out_features: int, config: BottleneckConfig
    ) -> None:
        size = config.bottleneck_size or max(1, round(in_features / config.reduction_factor))
        ref = self._reference_parameter()
        kwargs = {"device": ref.device, "dtype": adapter_dtype(ref.dtype)}
        down = nn.Linear(in_features, size, **kwargs)  # weight: torch's default (Kaiming-uniform) init
        up = nn.Linear(size, out_features, **kwargs)
        with torch.no_grad():
            if config.init == "zero":
                nn.init.zeros_(up.weight)
            else:  # Houlsby et al.: zero-mean normal, std 1e-2, truncated at two standard deviations
                for linear in (down, up):
                    nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            # zero biases: a random negative down bias could leave every ReLU unit dead from the start
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.non_linearity[adapter_name] = config.non_linearity
        self.scaling[adapter_name] = float(config.scaling)
        self.reads_input[adapter_name] = config.style == "parallel"

    def update_fusion(self, fusion_name: str, adapters: Sequence[str], temperature: float) -> None:
        from peftkit.methods.fusion import AdapterFusion

        features = self.adapter_up[adapters[0]].out_features
        ref = self.adapter_up[adapters[0]].weight
        self.adapter_fusion[fusion_name] = AdapterFusion(
            features, temperature, device=ref.device, dtype=ref.dtype
        )
        self.fused_adapters[fusion_name] = list(adapters)

    # ---------------------------------------------------------------------------------- forward
    def bottleneck(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``s · W_up act(W_down h + b_down) + b_up`` in the adapter's dtype."""
        down = self.adapter_down[adapter_name]
        act = NON_LINEARITIES[self.non_linearity[adapter_name]]
        return self.scaling[adapter_name] * self.adapter_up[adapter_name](act(down(h.to(down.weight.dtype))))

    def _delta(
        self, adapter_name: str, base_output: torch.Tensor, ffn_input: torch.Tensor | None
    ) -> torch.Tensor:
        if adapter_name in self.adapter_fusion:
            return self._fusion_delta(adapter_name, base_output, ffn_input)
        if not self.reads_input[adapter_name]:
            return self.bottleneck(adapter_name, base_output)
        if ffn_input is None:
            raise RuntimeError(
                f"Parallel adapter {adapter_name!r} reads the input of {self.input_source}, which did not run "
                f"before this layer in this forward; check ffn_input_modules."
            )
        return self.bottleneck(adapter_name, ffn_input)

    def _fusion_delta(
        self, fusion_name: str, base_output: torch.Tensor, ffn_input: torch.Tensor | None
    ) -> torch.Tensor:
        fusion = self.adapter_fusion[fusion_name]
        h = base_output.to(fusion.value.weight.dtype)
        outputs = torch.stack(
            [h + self._delta(a, base_output, ffn_input) for a in self.fused_adapters[fusion_name]], dim=-2
        )  # (..., N, d): each fused adapter's output (the sub-layer output plus its change)
        fused, weights = fusion(h, outputs)
        self.fusion_weights[fusion_name] = weights.detach()
        return fused - h

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        """One adapter's change of the output; for a parallel adapter ``x`` is the sub-layer's input."""
        return self._delta(adapter_name, base_output, x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        tapped, self.tapped_input = self.tapped_input, None
        if self.disable_adapters:
            return result
        if self.batch_adapter_names is None:
            active = [n for n in self.active_adapters if n not in self.skipped_adapters]
            if not active:
                return result
            # several active adapters each read the sub-layer's own output; their changes add up
            delta = sum(self._delta(n, result, tapped) for n in active)
            return (result + delta).to(result.dtype)
        names = self.rows_adapter_names(result)
        delta = torch.zeros_like(result)
        for name in dict.fromkeys(names):
            if name not in self.adapter_names or name in self.skipped_adapters:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            part = None if tapped is None else tapped[rows]
            delta[rows] = self._delta(name, result[rows], part).to(delta.dtype)
        return result + delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.layer_index}, input_source={self.input_source}"


def _tap_input(layer: BottleneckLayer, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the sub-layer's input module: hand its input to the parallel adapter."""
    layer.tapped_input = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def mergeable_methods() -> list[str]:
    """Registered methods whose adapters can be merged into the base weights."""
    return [m for m in registered_methods() if get_method(m).tuner_cls.can_merge]


class BottleneckModel(BaseTuner):
    """Places bottleneck adapters (and AdapterFusion layers) per the role map; runs AdapterDrop and
    :class:`Parallel` composition."""

    layer_cls = BottleneckLayer
    can_merge = False
    parallel: Parallel | None = None  # set by set_adapter(Parallel(...))
    _tap_handles: list = []  # noqa: RUF012 - replaced per instance by _sync_taps
    _pending_sources: dict = {}  # noqa: RUF012 - replaced per injection

    # ------------------------------------------------------------------------------- placement
    def _module_names(self) -> list[str]:
        """Module names that may carry an adapter: not inside an adapter layer or a modules_to_save copy."""
        skipped: list[str] = []
        names = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(p) for p in skipped):
                continue
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                skipped.append(f"{name}.")
            if not isinstance(module, ModulesToSaveWrapper):
                names.append(name)
        return names

    def _role_names(self, config: BottleneckConfig, role: str) -> list[str]:
        patterns = getattr(config, f"{role}_modules")
        if patterns is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in BOTTLENECK_ROLES:
                known = ", ".join(sorted(BOTTLENECK_ROLES))
                raise ValueError(
                    f"peftkit has no bottleneck placement for model_type {model_type!r} (it has: {known}). "
                    f"Name the modules: set {role}_modules (style={config.style!r} needs "
                    f"{', '.join(r + '_modules' for r in _needed_roles(config))})."
                )
            patterns = BOTTLENECK_ROLES[model_type][role]
        names = [n for n in self._module_names() if name_matches(n, patterns)]
        if not names:
            raise ValueError(
                f"{role}_modules={patterns!r} matched no module of {type(self.model).__name__}; use names "
                f"printed by model.named_modules() (a list entry matches as a dotted suffix, a string is a "
                f"full-match regex)."
            )
        return names

    def target_names(self, config: PeftConfig, modules_to_save: Sequence[str]) -> list[str]:
        from peftkit.methods.fusion import AdapterFusionConfig

        if isinstance(config, AdapterFusionConfig):
            return self._fusion_targets(config)
        assert isinstance(config, BottleneckConfig)
        sources: dict[str, str | None] = {}  # wrapped module -> the module whose input its adapter reads
        for output_role, input_role in _placements(config):
            outputs = self._role_names(config, output_role)
            if input_role is None:
                sources.update(dict.fromkeys(outputs))
            else:
                inputs = self._role_names(config, input_role)
                sources.update({n: _pair_input(n, inputs, input_role) for n in outputs})
        names = list(sources)
        if config.drop_layers:
            unindexed = [n for n in names if block_index(n) is None]
            if unindexed:
                raise ValueError(
                    f"drop_layers needs block indices in module names, but {unindexed[0]} has none."
                )
            names = [n for n in names if block_index(n) >= config.drop_layers]  # type: ignore[operator]
            if not names:
                raise ValueError(
                    f"drop_layers={config.drop_layers} removes every adapter of this model; use a smaller value."
                )
        self._pending_sources = {n: sources[n] for n in names}
        return names

    def _fusion_targets(self, config: Any) -> list[str]:
        missing = [a for a in config.adapters if a not in self.peft_config]
        if missing:
            raise ValueError(
                f"AdapterFusion fuses adapters {config.adapters}, but this model lacks {missing} (it has "
                f"{list(self.peft_config)}). Load or add the fused adapters first, under these names, e.g. "
                f"model = PeftModel.from_pretrained(base, 'dir/{config.adapters[0]}', "
                f"adapter_name='{config.adapters[0]}'); model.load_adapter('dir/{config.adapters[-1]}', "
                f"'{config.adapters[-1]}'); then model.load_adapter('dir/<fusion>', '<fusion>'). (Loading a "
                f"fusion finds its adapters by itself when save_pretrained wrote them beside it.)"
            )
        wrong = [a for a in config.adapters if not isinstance(self.peft_config[a], BottleneckConfig)]
        if wrong:
            raise ValueError(f"AdapterFusion fuses bottleneck adapters only; {wrong} are not.")
        names = [
            path
            for path, layer in self.adapter_layers()
            if isinstance(layer, BottleneckLayer) and all(a in layer.adapter_down for a in config.adapters)
        ]
        if not names:
            raise ValueError(f"The adapters {config.adapters} share no module, so there is nothing to fuse.")
        return names

    def create_or_update_layer(
        self, target: nn.Module, target_name: str, config: PeftConfig, adapter_name: str
    ) -> nn.Module | None:
        from peftkit.methods.fusion import AdapterFusionConfig

        if isinstance(config, AdapterFusionConfig):
            assert isinstance(target, BottleneckLayer)
            target.update_fusion(adapter_name, config.adapters, config.temperature)
            return None
        assert isinstance(config, BottleneckConfig)
        layer = (
            target
            if isinstance(target, BottleneckLayer)
            else BottleneckLayer(target, block_index(target_name))
        )
        source = self._pending_sources.get(target_name)
        out_features = _features(layer, "out")
        in_features = out_features
        if source is not None:
            if layer.input_source not in (None, source):
                raise ValueError(
                    f"{target_name} already reads the input of {layer.input_source}; a parallel adapter on it "
                    f"cannot read {source}."
                )
            layer.input_source = source
            in_features = _features(self.model.get_submodule(source), "in")
        layer.update_layer(adapter_name, in_features, out_features, config)
        return None if layer is target else layer

    # ------------------------------------------------------------------------------ tap hooks
    def _sync_taps(self) -> None:
        """One forward pre-hook per layer with a parallel adapter, on the module whose input it reads."""
        for handle in self._tap_handles:
            handle.remove()
        self._tap_handles = []
        for _, layer in self.adapter_layers():
            if isinstance(layer, BottleneckLayer) and layer.input_source and any(layer.reads_input.values()):
                source = self.model.get_submodule(layer.input_source)
                hook = functools.partial(_tap_input, layer)
                self._tap_handles.append(source.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(layer, BottleneckLayer) and not any(layer.reads_input.values()):
                layer.input_source = None

    def inject_adapter(self, adapter_name: str) -> None:
        try:
            super().inject_adapter(adapter_name)
        finally:
            self._pending_sources = {}
            self._sync_taps()

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        super()._remove_adapter_modules(adapter_name)
        self._sync_taps()

    def unload(self) -> nn.Module:
        for handle in self._tap_handles:
            handle.remove()
        self._tap_handles = []
        return super().unload()

    # ------------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate adapters; a :class:`Parallel` runs each on its own copy of the batch."""
        parallel = adapter_names if isinstance(adapter_names, Parallel) else None
        if (
            parallel is None
            and self.parallel is not None
            and not isinstance(adapter_names, str)
            and list(adapter_names) == list(self.parallel)
        ):
            parallel = self.parallel  # re-activation by the core (after add / delete) keeps the composition
        if parallel is None:
            super().set_adapter(adapter_names)
            self.parallel = None
            return
        names = list(parallel)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        for _, wrapper in self.save_wrappers():  # each task's head copy is routed per row in forward
            wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
        for _, layer in self.adapter_layers():
            layer.set_adapter(names)
        self.active_adapters = names
        self.parallel = parallel
        self._update_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        users = [
            name
            for name, config in self.peft_config.items()
            if adapter_name in getattr(config, "adapters", ()) and name != adapter_name
        ]
        if users:
            raise ValueError(
                f"Adapter {adapter_name!r} is fused by {users}; delete the fusion adapter(s) first."
            )
        if self.parallel is not None and adapter_name in self.parallel:
            rest = [n for n in self.parallel if n != adapter_name]
            if rest:
                self.set_adapter(Parallel(*rest))
            else:
                self.parallel = None
        super().delete_adapter(adapter_name)

    @classmethod
    def required_adapters(cls, config: PeftConfig) -> dict[str, str | None]:
        """A fusion needs the adapters it fuses (with the fingerprints recorded when it was saved)."""
        from peftkit.methods.fusion import AdapterFusionConfig

        if not isinstance(config, AdapterFusionConfig):
            return {}
        prints = config.adapter_fingerprints or {}
        return {name: prints.get(name) for name in config.adapters}

    def saved_config_fields(self, adapter_name: str) -> dict[str, Any]:
        """A saved fusion records a fingerprint of each fused adapter's tensors (as ``save_pretrained``
        writes them), which one-call loading checks."""
        from peftkit.methods.fusion import AdapterFusionConfig

        fields = super().saved_config_fields(adapter_name)
        config = self.peft_config[adapter_name]
        if isinstance(config, AdapterFusionConfig):
            tensors = {name: self.adapter_state_dict(name) for name in config.adapters}
            # sharded (FSDP) tensors would need a collective call, which only the main process makes here
            if not any(hasattr(t, "full_tensor") for state in tensors.values() for t in state.values()):
                fields["adapter_fingerprints"] = {n: adapter_fingerprint(t) for n, t in tensors.items()}
        return fields

    def fusion_weights(self, fusion_name: str) -> dict[str, torch.Tensor]:
        """Per layer (module path), the last forward's attention weights of fusion ``fusion_name`` over its
        adapters: ``(batch, seq, n_adapters)``, rows summing to one."""
        return {
            path: layer.fusion_weights[fusion_name]
            for path, layer in self.adapter_layers()
            if isinstance(layer, BottleneckLayer) and fusion_name in layer.fusion_weights
        }

    # ---------------------------------------------------------------------------------- merging
    @property
    def cannot_merge_reason(self) -> str:  # type: ignore[override]
        return (
            "Bottleneck adapters and AdapterFusion apply a non-linear function to the activations, so they "
            "cannot be merged into the base weights (merge_adapter / merge_and_unload). Keep the adapter "
            f"model, or use a method that can merge: {', '.join(mergeable_methods())}."
        )

    # ---------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._robust_drop():
            if self.parallel is None:
                return self.model(*args, **kwargs)
            batch = self._check_parallel_call(args, kwargs, generating=False)
            args, kwargs = _repeat_inputs(args, kwargs, batch, len(self.parallel))
            if kwargs.get("use_cache") is None and "use_cache" in _parameters(self.model):
                kwargs["use_cache"] = False  # the blocks below the first adapter would cache one copy only
            with self._parallel_composition(batch):
                return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate``. Under :class:`Parallel` the inputs are repeated once per task and
        generated as one mixed-adapter batch: the sequences come back stacked ``[task 1 rows; task 2 rows;
        ...]``. Every block runs on every copy (the tasks' tokens differ after the first step, so no block can
        be shared)."""
        if self.parallel is None:
            return self.model.generate(*args, **kwargs)
        batch = self._check_parallel_call(args, kwargs, generating=True)
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        for key in ("num_beams", "num_return_sequences"):
            value = kwargs.get(key, getattr(config, key, 1))
            if value is not None and value > 1:
                raise ValueError(
                    f"generate() under a Parallel composition makes one sequence per input row and task; "
                    f"{key}={value} is not supported. Call set_adapter(name) and generate once per task."
                )
        names = list(self.parallel)
        args, kwargs = _repeat_inputs(args, kwargs, batch, len(names))
        with self.batch_adapter_names([n for n in names for _ in range(batch)]):
            return self.model.generate(*args, **kwargs)

    def _bottleneck_layers(self) -> list[tuple[str, BottleneckLayer]]:
        return [(p, m) for p, m in self.adapter_layers() if isinstance(m, BottleneckLayer)]

    @contextlib.contextmanager
    def _robust_drop(self) -> Iterator[None]:
        """Robust AdapterDrop: in training mode skip the adapters of the lowest ``n ~ U{0..k}`` blocks."""
        touched: list[BottleneckLayer] = []
        if self.model.training:  # the wrapped model's flag: the wrapper is created in training mode
            for name in self.active_adapters:
                k = getattr(self.peft_config[name], "robust_drop_layers", 0)
                if not k:
                    continue
                n = int(torch.randint(0, k + 1, ()).item())
                for _, layer in self._bottleneck_layers():
                    if layer.layer_index is not None and layer.layer_index < n:
                        layer.skipped_adapters.add(name)
                        touched.append(layer)
        try:
            yield
        finally:
            for layer in touched:
                layer.skipped_adapters.clear()

    def _check_parallel_call(self, args: tuple, kwargs: dict, generating: bool) -> int:
        """The batch size of a call under :class:`Parallel`; errors for what a composition cannot run."""
        if any(layer.batch_adapter_names is not None for _, layer in self._bottleneck_layers()):
            raise ValueError("adapter_names= (mixed batches) cannot be combined with a Parallel composition.")
        given = [k for k in ("cache", "past_key_values", "encoder_outputs") if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"A Parallel composition runs the model from its inputs; {given[0]}= (computed for one copy "
                f"of the batch) is not supported. Call set_adapter(name) to continue one task."
            )
        if kwargs.get("use_cache") and not generating:
            raise ValueError(
                "use_cache=True is not supported under a Parallel composition (the blocks below the first "
                "adapter run on one copy of the batch, so the cache would not fit the outputs)."
            )
        for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(value, torch.Tensor) and value.ndim >= 2:
                return int(value.shape[0])
        raise ValueError("A Parallel composition needs input_ids or inputs_embeds of shape (batch, ...).")

    @contextlib.contextmanager
    def _parallel_composition(self, batch: int) -> Iterator[None]:
        """Run the model on inputs already repeated once per task (``K · B`` rows): the blocks below the first
        block with one of the tasks' adapters get the first copy only (``B`` rows: computed once for all
        tasks), that block repeats its input once per task, and row group ``k`` goes through adapter ``k`` (and
        head ``k``). Later block stacks (an encoder-decoder's decoder) read task-specific encoder states, so
        they run on every copy."""
        names = list(self.parallel or ())
        layers = self._bottleneck_layers()
        first_block: dict[
            str, int
        ] = {}  # stack (the module holding the numbered blocks) -> first adapted block
        for path, layer in layers:
            where = _block_of(path)
            if not set(names) & set(layer.adapter_names):
                continue
            if where is None:
                raise ValueError(
                    f"Parallel composition needs adapters inside numbered transformer blocks; {path} is in none."
                )
            first_block[where[0]] = min(first_block.get(where[0], where[1]), where[1])
        if not first_block:
            raise ValueError("Parallel composition needs adapters inside numbered transformer blocks.")
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        stacks = sorted(first_block, key=lambda name: order[name])  # the order the model runs them in
        shared = {(stacks[0], i) for i in range(first_block[stacks[0]])}
        route = [n for n in names for _ in range(batch)]
        routed: list[Any] = []
        for path, module in [*layers, *self.save_wrappers()]:
            if _block_of(path) not in shared:
                routed.append(module)
            elif isinstance(module, ModulesToSaveWrapper) and set(names) & set(module.adapter_names):
                raise ValueError(
                    f"{path} has a per-task copy (modules_to_save) below the first adapter, in a block that "
                    f"Parallel computes once for all tasks; it cannot be shared."
                )
        total = batch * len(names)

        def first_copy(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _map_rows(args, total, lambda t: t[:batch]), _map_rows(kwargs, total, lambda t: t[:batch])

        def every_copy(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            def repeat(t: torch.Tensor) -> torch.Tensor:
                return t.repeat(len(names), *([1] * (t.ndim - 1)))  # (K * B, ...)

            return _map_rows(args, batch, repeat), _map_rows(kwargs, batch, repeat)

        handles = []
        for stack_path in stacks:
            stack = self.model.get_submodule(stack_path)
            for index, block in stack.named_children():
                if index.isdigit():
                    hook = first_copy if (stack_path, int(index)) in shared else every_copy
                    handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        for module in routed:
            module.batch_adapter_names = route
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in routed:
                module.batch_adapter_names = None


def _block_of(module_path: str) -> tuple[str, int] | None:
    """(path of the module holding the numbered blocks, block number) of a module: its first all-digit name
    segment (``bert.encoder.layer.3.output.dense`` -> ``("bert.encoder.layer", 3)``)."""
    segments = module_path.split(".")
    index = next((i for i, s in enumerate(segments) if s.isdigit()), None)
    return None if index is None else (".".join(segments[:index]), int(segments[index]))


def _map_rows(value: Any, rows: int, fn: Any) -> Any:
    """``fn`` applied to every tensor in ``value`` (through tuples, lists and dicts) whose first dimension is
    ``rows`` and that has at least two dimensions (batch-first hidden states, masks, position tensors; not
    1-D ``cache_position``)."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.ndim >= 2 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_map_rows(v, rows, fn) for v in value)
    if type(value) is dict:
        return {k: _map_rows(v, rows, fn) for k, v in value.items()}
    return value


def _repeat_inputs(args: tuple, kwargs: dict, batch: int, times: int) -> tuple[tuple, dict]:
    """The model's inputs with every batch-first tensor (and 1-D ``labels``) repeated ``times``:
    ``[copy 1; copy 2; ...]``, so that the model's own code (masks, heads that pick the last token from
    ``input_ids``, the loss against ``labels``) sees one copy per task."""

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(times, *([1] * (t.ndim - 1)))

    kwargs = {
        k: repeat(v)
        if k == "labels" and isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == batch
        else _map_rows(v, batch, repeat)
        for k, v in kwargs.items()
    }
    return _map_rows(args, batch, repeat), kwargs


def _parameters(model: nn.Module) -> frozenset[str]:
    """The names of ``model.forward``'s parameters."""
    return _signature_names(getattr(type(model), "forward", None))  # the class's function: no model kept


@functools.lru_cache(maxsize=64)
def _signature_names(function: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _placements(config: BottleneckConfig) -> tuple[tuple[str, str | None], ...]:
    """(role of the wrapped module, role of the module whose input the adapter reads or ``None``: the
    wrapped module's output) for each adapter position of ``config``."""
    if config.style == "parallel":
        return PARALLEL_PLACEMENTS[config.parallel_placement]
    return tuple((role, None) for role in STYLE_ROLES[config.style])


def _needed_roles(config: BottleneckConfig) -> list[str]:
    return [role for pair in _placements(config) for role in pair if role is not None]


def _pair_input(output_name: str, input_names: list[str], input_role: str = "ffn_input") -> str:
    """The input module of the block that ``output_name`` is in: the one sharing the longest dotted prefix
    with it (``...layer.3.output.dense`` pairs with ``...layer.3.intermediate``)."""

    def shared(name: str) -> int:
        count = 0
        for a, b in zip(name.split("."), output_name.split("."), strict=False):
            if a != b:
                break
            count += 1
        return count

    scores = {name: shared(name) for name in input_names}
    best = max(scores.values())
    winners = [n for n, s in scores.items() if s == best]
    if best == 0 or len(winners) > 1:
        raise ValueError(
            f"Cannot tell which {input_role} module belongs to {output_name} (candidates: {winners}); name "
            f"{input_role}_modules so that each block has one."
        )
    return winners[0]


register_method("BOTTLENECK", BottleneckConfig, BottleneckModel)
