"""The "wrap a layer" placement: a module that owns a frozen base layer plus named adapters.

A method subclasses :class:`AdapterLayer` and declares, as class attributes, which of its attributes hold
per-adapter parameters (``nn.ModuleDict`` / ``nn.ParameterDict`` keyed by adapter name) and per-adapter
settings (plain dicts). From those declarations the core derives trainability, saving, loading,
deletion and merging, without knowing the method::

    x ──► base_layer ──────────────┐
    │                              (+)──► y = base_layer(x) + Σ_active adapter_delta(x, name)
    └──► adapter "a", adapter "b" ─┘

A method implements :meth:`AdapterLayer.adapter_delta` (the additive change of the output) and, when its
update can be folded into the base weight, :meth:`AdapterLayer.delta_weight`.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from peftkit.core.quantization import (
    dequantize_weight,
    dequantized_linear,
    is_bnb_linear,
    is_quantized_weight,
    requantize_weight,
)

BASE_ADAPTER_NAME = "__base__"  # the row label for "no adapter" in mixed-adapter batches
SAVED_PREFIX = "base_model.model."  # on-disk names of adapter tensors start with this (HF PEFT's layout)


_AUTOCAST_ADAPTER_DTYPE: ContextVar[bool] = ContextVar("autocast_adapter_dtype", default=True)


@contextlib.contextmanager
def adapter_dtype_policy(autocast_adapter_dtype: bool | None) -> Iterator[None]:
    """Within the block, :func:`adapter_dtype` follows HF PEFT's ``autocast_adapter_dtype`` option: True
    (the default) creates adapters over float16 / bfloat16 bases in float32, False in the base's dtype;
    None keeps the enclosing block's setting."""
    if autocast_adapter_dtype is None:
        yield
        return
    token = _AUTOCAST_ADAPTER_DTYPE.set(bool(autocast_adapter_dtype))
    try:
        yield
    finally:
        _AUTOCAST_ADAPTER_DTYPE.reset(token)


_META_LOCK = threading.Lock()
_META_ACTIVE: ContextVar[bool] = ContextVar("new_parameters_on_meta", default=False)
_META_PATCH: list[Any] = []  # [the original register_parameter, number of blocks open] while patched


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _META_PATCH[0](module, name, param)
    if _META_ACTIVE.get() and param is not None and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def new_parameters_on_meta(enabled: bool = True) -> Iterator[None]:
    """HF PEFT's ``low_cpu_mem_usage``: parameters registered inside the block (in this thread) are moved to
    the meta device (no memory, no values), for adapters whose values are about to be loaded from a file
    (:func:`peftkit.core.checkpoint.set_peft_model_state_dict` then puts real tensors in their place). The
    model's existing parameters, every buffer, and other threads' modules are left as they are.
    ``enabled=False``: nothing changes."""
    if not enabled:
        yield
        return
    with _META_LOCK:  # the class attribute is patched while any block is open, in any thread
        if not _META_PATCH:
            _META_PATCH[:] = [nn.Module.register_parameter, 0]
            nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign]
        _META_PATCH[1] += 1
    token = _META_ACTIVE.set(True)
    try:
        yield
    finally:
        _META_ACTIVE.reset(token)
        with _META_LOCK:
            _META_PATCH[1] -= 1
            if _META_PATCH[1] == 0:
                nn.Module.register_parameter = _META_PATCH[0]  # type: ignore[method-assign]
                _META_PATCH.clear()


def layer_features(layer: nn.Module) -> tuple[int | None, int | None]:
    """``(in_features, out_features)`` of a layer as HF PEFT's tuner layers report them: a linear layer's
    own, a convolution's channels, an embedding's rows and width, transformers ``Conv1D``'s weight
    ``(in, out)``; ``(None, None)`` for a layer of another kind."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels, layer.out_channels
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None:
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    if isinstance(layer, nn.MultiheadAttention):
        return layer.embed_dim, layer.embed_dim
    return None, None


_OVERRIDES_KEY = "_peftkit_parameter_overrides"  # module.__dict__ entry: name -> (original, active stack)
_OVERRIDES_LOCK = threading.Lock()
_NOT_SET = object()


@contextlib.contextmanager
def parameter_override(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module.<name>`` reads ``value`` (e.g. ``W + ΔW``, a tensor computed from the
    parameter) while the parameter itself stays registered and untouched: the placement of adapters that
    change a parameter which the module's own forward reads (fused expert weights, an attention block's
    packed projection). Gradients flow into whatever ``value`` was computed from.

    Overrides of one attribute form a stack, so that overlapping blocks (nested, or in two threads) always
    end with the attribute as it was before the first one (an attribute already in ``__dict__``, such as a
    view FSDP keeps there, is put back). Running one model from several threads with different active
    adapters is not supported: the module has one attribute for all of them."""
    token = [value]  # identity of this override in the stack
    with _OVERRIDES_LOCK:
        overrides = module.__dict__.setdefault(_OVERRIDES_KEY, {})
        if name not in overrides:
            overrides[name] = (module.__dict__.get(name, _NOT_SET), [])
        overrides[name][1].append(token)
        module.__dict__[name] = value  # found before nn.Module.__getattr__ looks in _parameters
    try:
        yield
    finally:
        with _OVERRIDES_LOCK:
            original, stack = overrides[name]
            stack[:] = [t for t in stack if t is not token]
            if stack:
                module.__dict__[name] = stack[-1][0]
            else:
                del overrides[name]
                if not overrides:
                    del module.__dict__[_OVERRIDES_KEY]
                if original is _NOT_SET:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = original


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter's parameters are created in on a base layer of ``base_dtype``: float32 over
    half-precision bases, so that training is stable (unless :func:`adapter_dtype_policy` turned that
    off: then the base's own), float32 over quantized (integer) bases, else the base's own."""
    if base_dtype in (torch.float32, torch.float64):
        return base_dtype
    if base_dtype.is_floating_point and not _AUTOCAST_ADAPTER_DTYPE.get():
        return base_dtype
    return torch.float32


class AdapterLayer(nn.Module):
    """Base class of layer wrappers. Subclasses set the class attributes below.

    Attributes:
        adapter_param_containers: names of ``ModuleDict``/``ParameterDict`` attributes keyed by adapter.
        adapter_settings: names of plain ``dict`` attributes keyed by adapter (rank, scaling, ...).
        saved_key_renames: on-disk spellings of local keys, e.g. ``{"m.weight": "m"}``.
    """

    adapter_param_containers: tuple[str, ...] = ()
    adapter_settings: tuple[str, ...] = ()
    saved_key_renames: dict[str, str] = {}  # noqa: RUF012 - read-only class constant

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by PeftModel for the duration of a forward with ``adapter_names=[...]`` (one per row).
        self.batch_adapter_names: Sequence[str] | None = None
        # A quantized base weight as it was before the first merge: unmerging puts it back exactly (a
        # plain list, so that it is not registered as a parameter of this module).
        self._weight_before_merge: list[nn.Parameter] = []
        # base parameters shared with other modules that a merge replaced by a private copy (see
        # BaseTuner._untie_merged_weights): put back when the last adapter is unmerged
        self._untied_originals: list[tuple[str, nn.Parameter]] = []
        # HF PEFT's layers expose their base layer's sizes (methods may set them more precisely)
        self.in_features, self.out_features = layer_features(self.get_base_layer())

    # ------------------------------------------------------------------------------- base access
    def get_base_layer(self) -> nn.Module:
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def tied_layer(self) -> AdapterLayer | None:
        """Another layer whose base weight is this layer's own (an output head tied to the embedding) and
        whose merge already writes the update of this layer's tied adapters into it (see
        :meth:`merges_through_tie`); merging those keeps such a weight shared (this layer's
        :meth:`merge_weight` must then leave it as it is). ``None``: no such layer."""
        return None

    def merges_through_tie(self, adapter_name: str) -> bool:
        """Whether adapter ``adapter_name`` of this layer is one update with the :attr:`tied_layer`'s (its
        merge writes nothing of its own into the shared weight). Default: every adapter, when there is a
        tied layer."""
        return self.tied_layer is not None

    @property
    def base_is_quantized(self) -> bool:
        """The base weight is a bitsandbytes 4-bit / 8-bit weight (packed integers, not the matrix)."""
        return is_quantized_weight(getattr(self.get_base_layer(), "weight", None))

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as a float tensor: the parameter itself, or for a quantized base the
        dequantized matrix (a new tensor). Code that needs the weight matrix (merging, norms) reads this."""
        base = self.get_base_layer()
        return dequantize_weight(base) if self.base_is_quantized else base.weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Make ``weight`` the base layer's weight (a quantized base quantizes it again: approximate)."""
        base = self.get_base_layer()
        if self.base_is_quantized:
            requantize_weight(base, weight)
        else:
            base.weight.data = weight

    # ------------------------------------------------------------------------ parameter declaration
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_param_containers:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The parameters of one adapter, keyed by their on-disk local name (adapter name left out)."""
        params: dict[str, nn.Parameter] = {}
        for attr in self.adapter_param_containers:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            if isinstance(container, nn.ParameterDict):
                params[self.saved_key_renames.get(attr, attr)] = container[adapter_name]
            else:
                for name, param in container[adapter_name].named_parameters():
                    local = f"{attr}.{name}"
                    params[self.saved_key_renames.get(local, local)] = param
        return params

    # ------------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        """Activate ``adapter_names`` (their parameters train when ``trainable``); freeze the others."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            for param in self.adapter_parameters(name).values():
                param.requires_grad_(trainable and name in names)
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def enable_adapters(self, enabled: bool) -> None:
        """HF PEFT's switch of one layer: on, the active adapters train and act; off, this layer runs its
        base layer alone and no adapter parameter trains."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self.adapter_names:
                for param in self.adapter_parameters(name).values():
                    param.requires_grad_(False)
        self.disable_adapters = not enabled

    def _all_available_adapter_names(self) -> list[str]:
        """HF PEFT's name: every adapter this layer holds, sorted."""
        return sorted(self.adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_param_containers:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        for attr in self.adapter_settings:
            getattr(self, attr).pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ---------------------------------------------------------------------------------- forward
    def adapter_delta(self, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor) -> torch.Tensor:
        """The adapter's additive change of the base layer's output for input ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                raise RuntimeError("Adapters are disabled while merged; unmerge before disabling.")
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output with the active adapters acting (not merged, one adapter set for the whole batch): the
        base layer's output plus each adapter's :meth:`adapter_delta`. A layer that computes its output
        another way (with a changed weight) overrides this."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype  # a float32 adapter on a bf16 base must not change the layer's output dtype
        for name in self.active_adapters:
            result = result + self.adapter_delta(x, name, result)
        return result.to(dtype)

    def rows_adapter_names(self, x: torch.Tensor) -> Sequence[str]:
        """The adapter name of each row of ``x`` in a mixed-adapter batch (checked against the batch)."""
        names = self.batch_adapter_names
        assert names is not None
        if len(names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows; give one "
                f"adapter name (or {BASE_ADAPTER_NAME!r}) per row."
            )
        return names

    def rows_replaced(
        self, x: torch.Tensor, result: torch.Tensor, forward_one: Callable[[torch.Tensor, str], torch.Tensor]
    ) -> torch.Tensor:
        """A mixed-adapter batch for a layer whose adapters replace its output (not add to it): ``result`` (the
        base output) with the rows of each adapter replaced by ``forward_one(x[rows], adapter_name)``."""
        names = self.rows_adapter_names(x)
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER_NAME or name not in self.adapter_names:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            result = result.index_copy(0, rows, forward_one(x[rows], name))
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.rows_adapter_names(x)
        result = self.base_layer(x, *args, **kwargs)
        delta = torch.zeros_like(result)
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER_NAME or name not in self.adapter_names:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            delta[rows] = self.adapter_delta(x[rows], name, result[rows]).to(delta.dtype)
        return result + delta

    # ---------------------------------------------------------------------------------- merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update in the base weight's layout: ``W_merged = W + delta_weight``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base weight.")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """HF PEFT's name for :meth:`delta_weight`."""
        return self.delta_weight(adapter_name)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The merged weight for one adapter (methods whose merge is not additive override this)."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The merged bias for one adapter: unchanged unless the method rescales outputs (IA3)."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return bias

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight.

        Args:
            safe_merge: compute the merged weight on a copy and refuse it if it has NaN or inf.
            adapter_names: which adapters; already merged ones are skipped with a warning.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        base = self.get_base_layer()
        weight = self.base_weight().detach()
        bias = base.bias.data if getattr(base, "bias", None) is not None else None
        newly_merged = []
        held = [n for n in names if n in self.adapter_names]
        if held and all(n in self.merged_adapters for n in held):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)  # HF PEFT's words
        elif any(n in self.merged_adapters for n in held):
            warnings.warn(
                f"Adapters {[n for n in held if n in self.merged_adapters]} are already merged; merging them "
                f"again changes nothing.",
                stacklevel=3,
            )
        for name in held:
            if name in self.merged_adapters:
                continue
            weight = self.merge_weight(weight, name)  # out of place: the base is untouched until the end
            if bias is not None:
                bias = self.merge_bias(bias, name)
            if safe_merge and not (
                torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            ):
                raise ValueError(
                    f"Merging adapter {name!r} would put NaN or inf into the base weight; the adapter is "
                    f"broken (check its training). Nothing was merged."
                )
            newly_merged.append(name)
        if not newly_merged:
            return
        if self.base_is_quantized:
            if not self._weight_before_merge:
                original = base.weight
                if getattr(original, "SCB", 0) is None:  # 8-bit after a forward: scales live in the state
                    original.CB, original.SCB = original.data, base.state.SCB
                self._weight_before_merge.append(original)
            warnings.warn(
                f"Merging into a quantized ({type(base).__name__}) weight quantizes the merged weight again, "
                f"so outputs change by the rounding (unmerging restores the original exactly). "
                f"merge_and_unload() without requantize=True gives a full-precision merged model instead.",
                stacklevel=3,
            )
        self.set_base_weight(weight)
        if bias is not None:
            base.bias.data = bias
        self.merged_adapters.extend(newly_merged)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        if not self.merged_adapters:
            return
        weight = self.base_weight().detach()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.unmerge_weight(weight, name)
            if getattr(base, "bias", None) is not None:
                base.bias.data = self.unmerge_bias(base.bias.data, name)
        if self._weight_before_merge:
            base.weight = self._weight_before_merge.pop()  # exact, unlike dequantize - delta - requantize
            if hasattr(base, "quant_state"):
                base.quant_state = getattr(base.weight, "quant_state", None)
            if getattr(base, "state", None) is not None and hasattr(base.state, "CB"):
                base.state.CB = base.state.SCB = None
        else:
            self.set_base_weight(weight)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


#: HF PEFT's name for the base class of adapter layers (``peft.tuners.tuners_utils.BaseTunerLayer``), so
#: that code written for HF PEFT (``isinstance(module, BaseTunerLayer)``) finds peftkit's layers.
BaseTunerLayer = AdapterLayer


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and, per adapter, a trainable full copy (e.g. a classifier head).

    Key layout matches HF PEFT: ``<name>.original_module.*`` and ``<name>.modules_to_save.<adapter>.*``.
    """

    def __init__(self, module_to_save: nn.Module) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.batch_adapter_names: Sequence[str] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    def enable_adapters(self, enabled: bool) -> None:
        """As :meth:`AdapterLayer.enable_adapters`: off, the original module runs and no copy trains."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            self.modules_to_save.requires_grad_(False)
        self.disable_adapters = not enabled

    def add_adapter(self, adapter_name: str) -> None:
        import copy

        copy_ = copy.deepcopy(self.original_module)
        # packed 4-bit / 8-bit weights cannot train: the trained copy of a quantized module (e.g. a
        # classifier head quantized with the rest) holds the dequantized weights in full precision
        for name, module in list(copy_.named_modules()):
            if is_bnb_linear(module):
                replacement = dequantized_linear(module)
                if name:
                    copy_.set_submodule(name, replacement)
                else:
                    copy_ = replacement
        copy_.requires_grad_(False)
        self.modules_to_save[adapter_name] = copy_

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].named_parameters())

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"Adapters {present} each have their own copy of this module (modules_to_save); only one "
                f"of them can be active at a time."
            )
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in present)
        self.active_adapter = present[0] if present else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters or (self.active_adapter is None and self.batch_adapter_names is None):
            return self.original_module(x, *args, **kwargs)
        if self.batch_adapter_names is None:
            return self.modules_to_save[self.active_adapter](x, *args, **kwargs)
        names = self.batch_adapter_names
        rows_by_module: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            key = name if name in self.modules_to_save else BASE_ADAPTER_NAME
            rows_by_module.setdefault(key, []).append(i)
        outputs = []
        order = []
        for key, rows in rows_by_module.items():
            module = self.original_module if key == BASE_ADAPTER_NAME else self.modules_to_save[key]
            index = torch.tensor(rows, device=x.device)
            outputs.append(module(x[index], *args, **kwargs))
            order += rows
        result = torch.cat(outputs)
        inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
        inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
        return result[inverse]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Code that reads e.g. ``model.classifier.weight`` sees the active copy's attribute.
            modules = self._modules
            active = self.__dict__.get("active_adapter")
            if active is not None and active in modules["modules_to_save"]:
                return getattr(modules["modules_to_save"][active], name)
            return getattr(modules["original_module"], name)


#: HF PEFT's base class of the wrappers that train a copy of a module (``peft.utils.AuxiliaryTrainingWrapper``);
#: peftkit has one such wrapper.
AuxiliaryTrainingWrapper = ModulesToSaveWrapper


def linear_fan_in_fan_out(base: nn.Module, target_name: str, requested: bool) -> bool | None:
    """The weight layout of a linear-like layer: ``False`` for ``nn.Linear`` (out × in; a requested
    ``fan_in_fan_out=True`` is corrected with a warning), ``True`` for GPT-2's ``Conv1D`` (in × out), and
    ``None`` for any other layer."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, nn.Linear):
        if requested:
            warnings.warn(
                f"fan_in_fan_out=True but {target_name} is nn.Linear (weight stored out × in); using False.",
                stacklevel=5,
            )
        return False
    if isinstance(base, Conv1D):
        return True
    return None
