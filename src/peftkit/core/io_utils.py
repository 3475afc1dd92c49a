"""Atomic file writes (a crash mid-write never leaves a half-written checkpoint behind) and bounded reads
of small untrusted files (configs), which can neither exhaust memory nor expand without end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

#: Largest config file (adapter_config.json, a run config, a bench spec) read; real ones hold kilobytes.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: Most values (after YAML aliases are expanded) a config may hold.
MAX_CONFIG_NODES = 1_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    ``os.replace`` is atomic on POSIX and Windows, so readers see either the old file or the new one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``final`` (``.tmp-<name>``) to write a whole folder into. When the
    block ends normally, the files are synced and the folder is renamed to ``final`` (which must not exist);
    when it raises, the temporary folder is removed, and so is ``final``'s parent if this call created it.
    Readers never see a half-written ``final``."""
    final = os.path.abspath(os.fspath(final))
    parent = os.path.dirname(final)
    created_parent = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier attempt's leftovers
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):  # only if still empty
                os.rmdir(parent)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_config_text(path: str | os.PathLike) -> str:
    """The text of a config file of at most :data:`MAX_CONFIG_BYTES` (``ValueError`` if larger)."""
    with open(path, encoding="utf-8") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MB; it is not a config file.")
    return text


def check_config_size(value: Any, source: str) -> None:
    """Refuse a parsed config whose values, counted as a reader that walks it sees them (YAML aliases
    expanded), exceed :data:`MAX_CONFIG_NODES`: an alias bomb, or a structure that refers to itself."""
    seen, stack = 0, [value]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ValueError(
                f"{source} expands to more than {MAX_CONFIG_NODES:,} values (nested YAML aliases or a "
                f"structure that contains itself); it is not a config."
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)
