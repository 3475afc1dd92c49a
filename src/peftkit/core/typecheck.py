"""Checking a value against a type annotation: the one check behind configs (``PeftConfig`` fields, the
command line's run configs), so a wrong type or a NaN is refused by name wherever a setting comes from
(Python, an ``adapter_config.json`` from a hub, a YAML file)."""

from __future__ import annotations

import enum
import math
import types
from typing import Any, Literal, Union, get_args, get_origin


def fits(value: Any, annotation: Any, text_numbers: bool = False) -> tuple[bool, Any]:
    """``(True, value)`` if ``value`` fits ``annotation`` (converted: ints to float for float fields, list
    items, enum members), else ``(False, value)``. A float field takes only finite numbers; with
    ``text_numbers``, also numbers written as strings (``"2e-4"``, which YAML 1.1 reads as text)."""
    if annotation is Any or annotation is object:
        return True, value
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = fits(value, arg, text_numbers)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        for allowed in args:
            if value == allowed or (
                isinstance(value, str) and isinstance(allowed, str) and value.lower() == allowed.lower()
            ):
                return True, allowed
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, str) and text_numbers:
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return True, annotation(value)
        except ValueError:
            return False, value
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return False, value
        if not args:
            return True, list(value)
        item_type = args[0]
        out = []
        for item in value:
            ok, converted = fits(item, item_type, text_numbers)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return False, value
        if len(args) != 2:
            return True, value
        out_dict = {}
        for k, v in value.items():
            ok_k, ck = fits(k, args[0], text_numbers)
            ok_v, cv = fits(v, args[1], text_numbers)
            if not (ok_k and ok_v):
                return False, value
            out_dict[ck] = cv
        return True, out_dict
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value  # an annotation we cannot check (e.g. a forward reference): let the config validate


def describe(annotation: Any) -> str:
    """The annotation in words, for error messages."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is float:
        return "a finite number"
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, set):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}" if len(args) == 2 else "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))
