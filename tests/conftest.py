"""Fixtures shared by every test, and the `netns` / `interop` / `system` marker skips."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tls_pair import Tls, make_tls

FAKE_CLOCK_START = 1000.0
RANDBYTES_SEED = 0x5EED


class FakeClock:
    """A clock the test drives: read `now`, move it with `advance()` (or assign `now`)."""

    __slots__ = ("now",)

    def __init__(self, now: float = FAKE_CLOCK_START) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds
        return self.now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock() -> FakeClock:
    """Starts at 1000.0 s (not 0, so "never happened" sentinels cannot pass by accident)."""
    return FakeClock()


@pytest.fixture
def seeded_randbytes() -> Callable[[int], bytes]:
    """A deterministic stand-in for `secrets.token_bytes`, the same sequence in every test."""
    return random.Random(RANDBYTES_SEED).randbytes


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """A self-signed certificate for 127.0.0.1, the server context and a client trusting it."""
    return make_tls(tmp_path / "certs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    not_root = os.geteuid() != 0
    missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
    skip_netns = pytest.mark.skip(reason="needs root for network namespaces")
    skip_interop = pytest.mark.skip(
        reason=f"{' and '.join(missing)} missing: apt-get install wireguard-go wireguard-tools"
    )
    from tests.system.nspawn import unavailable_reason

    no_system = unavailable_reason()
    skip_system = pytest.mark.skip(reason=f"system tests: {no_system}")
    for item in items:
        if no_system and item.get_closest_marker("system") is not None:
            item.add_marker(skip_system)
        if not_root and item.get_closest_marker("netns") is not None:
            item.add_marker(skip_netns)
        if missing and item.get_closest_marker("interop") is not None:
            item.add_marker(skip_interop)
