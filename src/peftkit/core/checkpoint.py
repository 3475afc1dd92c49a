"""Adapter checkpoints in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are the model's parameter names with the adapter name left out, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Loading is strict: a missing or
unexpected key, or a shape that does not fit (an adapter made for another base model), is an error that
names the keys, raised before anything is copied. Pickled ``adapter_model.bin`` files are only read with
``torch.load(weights_only=True)``; every write goes through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peftkit.core.io_utils import atomic_write
from peftkit.core.layer import BASE_ADAPTER_NAME, SAVED_PREFIX

if TYPE_CHECKING:
    from peftkit.core.peft_model import PeftModel

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PREFIX = SAVED_PREFIX
_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED_ADAPTER_NAMES = {BASE_ADAPTER_NAME}


def validate_adapter_name(
    adapter_name: Any, model: nn.Module, existing: Any = (), reserved: Iterable[str] = ()
) -> None:
    """Reject names that could escape the save folder or be confused with the model's own names.

    Raises:
        ValueError: the name is empty, has characters other than letters, digits, ``_`` and ``-``, is
            reserved, or equals a module/parameter name segment of ``model`` (``weight``, ``lora_A``, ...).
    """
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME_RE.match(adapter_name):
        raise ValueError(
            f"Invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-' only (the name becomes "
            f"a folder name and a part of parameter names, so '/', '.', '..' are not allowed)."
        )
    if adapter_name in RESERVED_ADAPTER_NAMES | set(reserved):
        raise ValueError(
            f"Adapter name {adapter_name!r} is reserved: it is an attribute of the adapter layers or means "
            f"'no adapter' in mixed batches. Pick another name."
        )
    segments = {seg for name, _ in model.named_parameters() for seg in name.split(".")}
    segments |= {seg for name, _ in model.named_modules() for seg in name.split(".") if name}
    if adapter_name in segments - set(existing):
        raise ValueError(
            f"Adapter name {adapter_name!r} is also the name of a module or parameter in the model; "
            f"parameter names would become ambiguous. Pick another name."
        )


#: Where :func:`peftkit.inject_adapter_in_model` leaves its tuner on the model it adapted (a plain
#: attribute, not a submodule), so that the state-dict functions below work on such a model too.
INJECTED_TUNER_ATTR = "_peftkit_injected_tuner"


def record_injected_tuner(model: nn.Module, tuner: nn.Module) -> None:
    object.__setattr__(model, INJECTED_TUNER_ATTR, tuner)


def _adapted(model: nn.Module) -> tuple[Any, str]:
    """The tuner holding ``model``'s adapters, and the prefix its on-disk names carry that ``model``'s own
    parameter names lack: ``""`` for a PeftModel, ``"base_model.model."`` for a model adapted in place by
    ``inject_adapter_in_model`` (HF PEFT names such a model's tensors without it)."""
    from peftkit.core.tuner import BaseTuner

    if isinstance(getattr(model, "base_model", None), BaseTuner):
        return model.base_model, ""
    tuner = model.__dict__.get(INJECTED_TUNER_ATTR)
    if tuner is None:
        raise ValueError(
            f"{type(model).__name__} has no peftkit adapters: make it with get_peft_model(...) or "
            f"inject_adapter_in_model(...) first."
        )
    return tuner, SAVED_PREFIX


def get_peft_model_state_dict(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT's on-disk names (for a model adapted in place by
    :func:`peftkit.inject_adapter_in_model`: its own parameter names, as HF PEFT gives them)."""
    tuner, prefix = _adapted(model)
    tensors = tuner.adapter_state_dict(adapter_name)
    return {key.removeprefix(prefix): _full_tensor(tensor) for key, tensor in tensors.items()}


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (FSDP2's ``DTensor``; a collective call every rank makes),
    or the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def adapter_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter's saved tensors (names, dtypes, shapes and bytes, in name order): equal
    fingerprints mean the same file contents, whatever the file format."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_peft_model_state_dict(
    model: PeftModel, state_dict: dict[str, torch.Tensor], adapter_name: str = "default", **_: Any
) -> nn.modules.module._IncompatibleKeys:
    """Copy ``state_dict`` (on-disk names) into adapter ``adapter_name``; strict, all-or-nothing.

    Keys that name a parameter of the base model itself (HF PEFT saves a resized embedding as
    ``...embed_tokens.base_layer.weight``) are loaded into it. ``model`` is a PeftModel or a model adapted
    in place by :func:`peftkit.inject_adapter_in_model` (keys without ``base_model.model.``).

    Returns HF PEFT's load result (``missing_keys`` / ``unexpected_keys``): both empty, since a checkpoint
    that lacks or adds a key is refused with ``ValueError`` instead (peftkit loads strictly).
    """
    tuner, prefix = _adapted(model)
    state_dict = {prefix + key: value for key, value in state_dict.items()}
    expected = tuner.adapter_load_targets(adapter_name)
    own = {prefix + k: v for k, v in model.named_parameters(remove_duplicate=False)}  # tied: each name
    own.update({prefix + k: v for k, v in model.named_buffers() if prefix + k not in own})
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in expected and k not in own)
    targets = {k: expected.get(k, own.get(k)) for k in state_dict if k in expected or k in own}
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(p.shape)}"
        for k, p in targets.items()
        if tuple(state_dict[k].shape) != tuple(p.shape)
    ]
    # a float parameter takes only float values: an int / bool / complex tensor is a damaged or foreign file
    wrong_dtype = [
        f"{k}: {state_dict[k].dtype}"
        for k, p in targets.items()
        if p.is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or mismatched or wrong_dtype:
        parts = [f"The checkpoint does not fit adapter {adapter_name!r} of this model."]
        if wrong_dtype:
            parts.append("Tensors that are not floating point: " + "; ".join(wrong_dtype[:10]))
        if mismatched:
            parts.append(
                "Shape mismatches (was the adapter made for another base model?): "
                + "; ".join(mismatched[:10])
            )
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        parts.append("Nothing was loaded.")
        raise ValueError(" ".join(parts))
    on_meta = {id(t) for t in targets.values() if t.device.type == "meta"}
    owners = _parameter_owners(model, on_meta) if on_meta else {}
    replaced: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for key, target in targets.items():
            if id(target) in owners:  # created with low_cpu_mem_usage: the loaded tensor takes its place
                holders = owners[id(target)]
                if id(target) not in replaced:  # a parameter held twice (tied) becomes one new parameter
                    value = state_dict[key].to(device=holders[0][2], dtype=target.dtype)
                    replaced[id(target)] = nn.Parameter(value.clone(), requires_grad=target.requires_grad)
                for module, attr, _ in holders:
                    module._parameters[attr] = replaced[id(target)]
            else:
                target.copy_(state_dict[key].to(device=target.device, dtype=target.dtype))
    if replaced:
        tuner.after_loading(adapter_name)  # ties between parameters that the replacement cut
    return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _parameter_owners(
    model: nn.Module, ids: set[int]
) -> dict[int, list[tuple[nn.Module, str, torch.device]]]:
    """For parameters (by id) on the meta device: every ``(module, attribute)`` holding one, with the device
    its values belong on (that of the nearest enclosing module with real parameters: the wrapped layer)."""
    owners: dict[int, list[tuple[nn.Module, str, torch.device]]] = {}
    fallback = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    seen: set[tuple[int, str]] = set()

    def visit(module: nn.Module, device: torch.device) -> None:
        own = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
        device = own or device
        for attr, param in module._parameters.items():
            if param is not None and id(param) in ids and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                owners.setdefault(id(param), []).append((module, attr, device))
        for child in module.children():
            visit(child, device)

    visit(model, fallback)
    return owners


def save_adapter_weights(
    tensors: dict[str, torch.Tensor], folder: str, safe_serialization: bool = True
) -> str:
    """Write the tensors atomically; returns the file path."""
    os.makedirs(folder, exist_ok=True)
    # safetensors refuses tensors that share memory; saved tensors are small, so copy them.
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))
    else:
        path = os.path.join(folder, WEIGHTS_NAME)
        atomic_write(path, lambda tmp: torch.save(data, tmp))
    return path


def load_adapter_weights(folder: str, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` (``weights_only``) from a
    local folder, or from the hub when ``folder`` is a hub id and the hub is reachable."""
    safetensors_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(safetensors_path) and not os.path.isfile(bin_path):
        if os.path.isdir(folder):
            raise FileNotFoundError(
                f"{folder} has no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}; is it an adapter folder "
                f"written by save_pretrained?"
            )
        from peftkit.core.config import _download_from_hub

        safetensors_path = _download_from_hub(folder, SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
    if os.path.isfile(safetensors_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{safetensors_path} is not a readable safetensors file ({err}); the file is corrupt or "
                f"truncated. Re-save or re-download the adapter."
            ) from None
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{bin_path} could not be read as plain tensors ({type(err).__name__}: {err}). peftkit only "
            f"loads .bin files with weights_only=True; convert it to safetensors."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{bin_path} does not hold a dict of tensors.")
    return state


def copy_saved_parameters(params: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Copy the tensors of the safetensors file ``path`` into ``params`` (same names), all or nothing:
    ``ValueError`` naming the first mismatched names or shapes (``what`` says what should fit) before
    anything is copied. Values are cast to each parameter's device and dtype."""
    from safetensors.torch import load_file

    saved = load_file(path)
    wrong = sorted(set(saved) ^ set(params)) + [
        f"{name} {tuple(saved[name].shape)} vs {tuple(p.shape)}"
        for name, p in params.items()
        if name in saved and saved[name].shape != p.shape
    ]
    if wrong:
        raise ValueError(f"{path} does not fit {what}: {', '.join(wrong[:5])}.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(device=param.device, dtype=param.dtype))


# ------------------------------------------------------------------ adapters no larger than their file
#: Elements an adapter may create beyond twice what its weight file holds (buffers and helpers a method
#: builds but does not save, such as a prompt encoder or a rank mask).
ALLOCATION_SLACK = 32 * 1024 * 1024

_SIZED_FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "randperm"}
_NEW_FACTORIES = {"new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full"}


def _requested_elements(name: str, args: tuple[Any, ...]) -> int:
    """How many elements a factory call is about to allocate (0 for any other operation)."""
    if name in _SIZED_FACTORIES and args:
        size = args[0]
    elif name in _NEW_FACTORIES and len(args) > 1:
        size = args[1]
    elif name == "eye" and args:
        return int(args[0]) * int(args[1] if len(args) > 1 and isinstance(args[1], int) else args[0])
    else:
        return 0
    if isinstance(size, int):
        return size
    try:
        return math.prod(int(d) for d in size)
    except TypeError:  # symbolic sizes: not an adapter being built
        return 0


class AdapterTooLargeError(ValueError):
    """An adapter config asks for far more memory than its saved weights could fill."""


class _AllocationBudget(TorchDispatchMode):
    def __init__(self, budget: int, source: str) -> None:
        super().__init__()
        self.budget, self.used, self.source = budget, 0, source

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        wanted = _requested_elements(func.overloadpacket.__name__, args)
        if wanted:
            self.used += wanted
            if self.used > self.budget:
                raise AdapterTooLargeError(
                    f"the adapter config of {self.source} asks for more than {self.budget:,} parameter "
                    f"elements but its weight file holds far fewer; the config does not belong to these "
                    f"weights (a wrong or tampered r / size field). Nothing was loaded."
                )
        return func(*args, **(kwargs or {}))


_LOADING_SAVED: ContextVar[bool] = ContextVar("loading_saved_adapter", default=False)


def loading_saved_adapter() -> bool:
    """True while an adapter is being built to receive saved tensors (``from_pretrained`` / ``load_adapter``):
    its initial values will be overwritten, so an initialisation that only fills the adapter's own tensors
    from data it cannot see here (LoftQ on an already quantized base) may be skipped."""
    return _LOADING_SAVED.get()


@contextlib.contextmanager
def sized_by(weights: Mapping[str, torch.Tensor], source: str) -> Iterator[None]:
    """Building an adapter inside this context may allocate at most about twice the elements that its
    saved ``weights`` hold: a config read from an untrusted folder (``r: 100000000``) is refused with
    :class:`AdapterTooLargeError` before the memory is taken, not after the machine runs out of it. Inside it,
    :func:`loading_saved_adapter` is true."""
    held = sum(t.numel() for t in weights.values())
    token = _LOADING_SAVED.set(True)
    try:
        with _AllocationBudget(2 * held + ALLOCATION_SLACK, source):
            yield
    finally:
        _LOADING_SAVED.reset(token)
