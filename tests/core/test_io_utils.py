"""``peftkit.core.io_utils``: atomic writes and bounded reads of untrusted config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.core.io_utils import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    atomic_write,
    atomic_write_text,
    check_config_size,
    read_config_text,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_config_text_is_bounded(tmp_path: Path) -> None:
    small = tmp_path / "small.json"
    small.write_text("{}")
    assert read_config_text(small) == "{}"
    big = tmp_path / "big.json"
    big.write_text("x" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_config_text(big)


def test_structure_size_counts_shared_values_each_time_they_are_reached() -> None:
    leaf = list(range(10))
    level = [leaf] * 10
    for _ in range(4):
        level = [level] * 10  # 10^6 leaves reached through shared lists
    with pytest.raises(ValueError, match="expands to more than"):
        check_config_size({"bomb": level}, "config")
    check_config_size({"fine": [leaf] * 10}, "config")


def test_a_structure_that_contains_itself_is_refused() -> None:
    loop: dict = {}
    loop["again"] = loop
    with pytest.raises(ValueError, match="contains itself"):
        check_config_size(loop, "config")
    assert MAX_CONFIG_NODES >= 100_000  # real configs hold far fewer values
