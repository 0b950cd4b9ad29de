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
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple, Protocol

from agent.node.tun import OFFLOAD_TSO_USO
from agent.node.tun_batch import batch_from_frames
from agent.proto.offload import Buffer, coalesce
from agent.proto.offload.vnet import VirtioNetHdr
from agent.proto.wireguard.transport import PYTHON, OpenedRun, Transport

__all__ = [
    "DataPlaneImpl",
    "select",
    "native_module",
    "native_transport",
    "NativeUnavailable",
    "TunRead",
    "TunIo",
    "PythonTunIo",
    "NativeTunIo",
]

MODES = ("auto", "native", "python")


class NativeUnavailable(RuntimeError):
    """`dataplane = "native"` but the compiled module does not load."""


class TunRead(NamedTuple):
    """One drain of the TUN: wire-size IP packets with complete checksums, in read order."""

    packets: list[bytes]
    runs: list[tuple[bytes, int]]  # (destination address, count): consecutive packets, in order
    reads: int  # successful reads
    not_ip: int  # reads dropped: not IPv4/IPv6, or shorter than the header
    malformed: int  # reads dropped: a super-packet segmentation refused
    error: OSError | None  # what stopped the reads, other than EAGAIN (fatal for the TUN)


class TunLike(Protocol):
    """The TUN as the Python twin uses it (node/tun.py)."""

    vnet_hdr: bool
    offload: str

    def fileno(self) -> int: ...

    def read_frames(
        self, max_packets: int
    ) -> tuple[list[tuple[VirtioNetHdr, memoryview]], OSError | None]: ...

    def write_packets(self, packets: Sequence[Buffer]) -> int: ...

    def write_coalesced(self, items: Sequence[tuple[bytes, list[Buffer]]]) -> int: ...


class TunIo(Protocol):
    """The TUN batches the data plane runs."""

    def read(self, max_reads: int) -> TunRead:
        """Up to `max_reads` reads until EAGAIN, segmented and checksummed."""
        ...

    def write(self, packets: Sequence[Buffer]) -> tuple[int, int]:
        """Write IP packets (coalesced where the TUN takes it): (writes, packets that failed)."""
        ...


class PythonTunIo:
    """The reference twin over a `Tun` (or a test's stand-in): node/tun_batch.py's batches."""

    def __init__(self, tun: TunLike) -> None:
        self.tun = tun

    def read(self, max_reads: int) -> TunRead:
        return TunRead._make(batch_from_frames(*self.tun.read_frames(max_reads)))

    def write(self, packets: Sequence[Buffer]) -> tuple[int, int]:
        tun = self.tun
        if tun.vnet_hdr and len(packets) > 1:
            items = coalesce(packets, udp=tun.offload == OFFLOAD_TSO_USO)
            return len(items), tun.write_coalesced(items)
        return len(packets), tun.write_packets(packets)


class NativeTunIo:
    """The same batches in agent._fastpath (native/io.c, native/offload.c): one call each."""

    def __init__(self, tun: TunLike, mod: ModuleType) -> None:
        self._fd = tun.fileno()
        self._vnet = tun.vnet_hdr
        self._uso = tun.offload == OFFLOAD_TSO_USO
        self._read = mod.tun_read
        self._write = mod.tun_write

    def read(self, max_reads: int) -> TunRead:
        return TunRead._make(self._read(self._fd, max_reads, self._vnet))

    def write(self, packets: Sequence[Buffer]) -> tuple[int, int]:
        writes, failed = self._write(self._fd, packets, self._vnet, self._uso)
        return int(writes), int(failed)


@dataclass(frozen=True, slots=True)
class DataPlaneImpl:
    """The implementation the daemon runs, and why."""

    name: str  # "native" or "python"
    transport: Transport
    reason: str  # "" when the configured mode got what it asked for

    module: ModuleType | None = None  # agent._fastpath when native

    def describe(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name

    def tun_io(self, tun: TunLike) -> TunIo:
        mod = self.module
        if mod is not None and hasattr(mod, "tun_read"):
            return NativeTunIo(tun, mod)
        return PythonTunIo(tun)


def native_module() -> ModuleType:
    """agent._fastpath, or ImportError with the loader's reason."""
    return importlib.import_module("agent._fastpath")


def native_transport(mod: ModuleType) -> Transport:
    raw_open = mod.open_run

    def open_run(
        aead: object, replay: object, datagrams: object, start: int, index: int
    ) -> OpenedRun:
        return OpenedRun._make(raw_open(aead, replay, datagrams, start, index))

    return Transport("native", mod.Aead, mod.ReplayWindow, mod.seal, open_run, mod.Sealer)


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
    return DataPlaneImpl("native", native_transport(mod), "", mod)
