"""Namespace-test fixtures: a fresh `Lab` per test; leftovers removed at session end."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from .lab import Lab, cleanup_all, dump_logs


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_labs() -> Iterator[None]:
    yield
    cleanup_all()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab removed after the test; process logs go to captured stderr (shown on failure)."""
    with Lab() as lb:
        try:
            yield lb
        finally:
            dump_logs(lb, sys.stderr)
