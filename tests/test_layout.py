"""The tree shows the architecture, and imports run one way: applications -> library, methods -> core.

Every ``import`` / ``from ... import`` statement of every module under ``src/peftkit`` (also those inside
functions) is read with ``ast``; a module of a layer may import only from the layers it is allowed to see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "peftkit"

# what each layer may import from peftkit (itself always)
ALLOWED = {
    "core": {"core", "architectures"},
    "placements": {"core", "placements", "architectures"},
    "methods": {"core", "placements", "methods", "architectures"},
    "architectures": set(),
    "integrations": {"core"},
    "train": {"core", "placements", "methods", "architectures", "train", "integrations", "__init__"},
    "bench": {"core", "methods", "train", "bench", "__init__"},
    "cli": {"core", "methods", "train", "bench", "integrations", "__init__"},
}


def layer_of(module: str) -> str:
    """``peftkit.core.layer`` -> ``core``; ``peftkit`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def peftkit_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "peftkit"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peftkit":
            if node.module == "peftkit":  # `from peftkit import x`: x may be a subpackage
                found += [f"peftkit.{a.name}" if a.name in ALLOWED else "peftkit" for a in node.names]
            else:
                found.append(node.module)
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_from_applications_to_the_library_only(path: Path) -> None:
    relative = path.relative_to(SRC)
    if relative.parts == ("__init__.py",):
        return  # the public namespace gathers everything
    layer = relative.parts[0].removesuffix(".py")
    assert layer in ALLOWED, f"{relative}: a new top-level module or package; give it a place in ALLOWED"
    wrong = [m for m in peftkit_imports(path) if layer_of(m) not in ALLOWED[layer] | {layer}]
    assert not wrong, f"{relative} ({layer}) imports {wrong}"


def test_core_names_no_method() -> None:
    """No core code branches on a method: no string constant equal to a registered type name and no
    ``PeftType.<NAME>`` (examples in docstrings and messages are fine)."""
    from peftkit.core.registry import registered_methods

    names = set(registered_methods())
    for path in sorted((SRC / "core").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        spelled = [
            node.value if isinstance(node, ast.Constant) else node.attr
            for node in ast.walk(tree)
            if (isinstance(node, ast.Constant) and node.value in names)
            or (isinstance(node, ast.Attribute) and node.attr in names)
        ]
        assert not spelled, f"core/{path.name} names {spelled}"
