"""Which data plane runs: the compiled module (agent._fastpath, built from native/) or its
pure-Python twin, chosen by `[interface] dataplane`.

    "native"  the compiled module; the daemon refuses to start when it does not load
    "python"  the reference twin (agent/proto/wireguard/transport.py, agent/proto/offload,
              agent/node/tun.py, udp.py)
    "auto"    native where it loads, else Python; `reason` says why Python runs

The twins take the same inputs and give the same outputs (tests/native/ checks it byte for
byte), so nothing above this module knows which runs: the Device gets a `Transport`, the data
plane the batch functions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from agent.proto.wireguard.transport import PYTHON, OpenedRun, Transport

__all__ = ["DataPlaneImpl", "select", "native_module", "NativeUnavailable"]

MODES = ("auto", "native", "python")


class NativeUnavailable(RuntimeError):
    """`dataplane = "native"` but the compiled module does not load."""


@dataclass(frozen=True, slots=True)
class DataPlaneImpl:
    """The implementation the daemon runs, and why."""

    name: str  # "native" or "python"
    transport: Transport
    reason: str  # "" when the configured mode got what it asked for

    def describe(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


def native_module() -> ModuleType:
    """agent._fastpath, or ImportError with the loader's reason."""
    return importlib.import_module("agent._fastpath")


def native_transport(mod: ModuleType) -> Transport:
    raw_open = mod.open_run

    def open_run(
        aead: object, replay: object, datagrams: object, start: int, index: int
    ) -> OpenedRun:
        return OpenedRun._make(raw_open(aead, replay, datagrams, start, index))

    return Transport("native", mod.Aead, mod.ReplayWindow, mod.seal, open_run)


def select(mode: str) -> DataPlaneImpl:
    """The implementation for `[interface] dataplane = mode`."""
    if mode not in MODES:
        raise ValueError(f"dataplane must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "python":
        return DataPlaneImpl("python", PYTHON, "")
    try:
        mod = native_module()
    except ImportError as e:
        if mode == "native":
            raise NativeUnavailable(
                f"dataplane = 'native' but the compiled module does not load: {e}"
            ) from e
        return DataPlaneImpl("python", PYTHON, f"auto: the compiled module does not load: {e}")
    return DataPlaneImpl("native", native_transport(mod), "")
