"""Shared test set-up: the tree of tests mirrors ``src/peftkit`` (``core/``, ``methods/``, ``train/``,
``bench/``) plus ``reliability/`` (one module per class of failure, across the tree).

Helpers that any test imports by name live beside this file (``tiny_models``: the tiny seeded models;
``cli_fixtures``: a tokenizer, run configs and the CLI environment; ``model_state``: "nothing changed"
snapshots). Test modules share cases by importing each other by basename (``from test_conformance import
CASES``), so every test folder is on the import path. Fixtures here build the tiny models every folder
uses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
for folder in sorted(p for p in TESTS.iterdir() if p.is_dir() and p.name.isidentifier()):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402  (the path above first)


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Builds the tiny llama of ``tiny_models`` (``tiny_llama(seed=1)`` for other weights)."""
    return tiny_models.tiny_llama


@pytest.fixture
def tiny_gpt2() -> Callable[..., torch.nn.Module]:
    return tiny_models.tiny_gpt2


@pytest.fixture
def tiny_bert_seq_cls() -> Callable[..., torch.nn.Module]:
    return tiny_models.tiny_bert_seq_cls


@pytest.fixture
def tiny_t5() -> Callable[..., torch.nn.Module]:
    return tiny_models.tiny_t5


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A word-level tokenizer over the shipped example data (``cli_fixtures.build_tokenizer``), built once."""
    from cli_fixtures import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
