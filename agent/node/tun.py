"""The TUN device: /dev/net/tun with virtio-net offloads, link setup through pyroute2.

Opened as IFF_TUN|IFF_NO_PI|IFF_VNET_HDR with TUNSETOFFLOAD = CSUM|TSO4|TSO6|USO4|USO6, so the
kernel hands us up to 64 KB TCP/UDP super-packets (one read per ~45 segments) and takes
coalesced GSO packets back. When the kernel refuses USO we keep TSO; when it refuses that too
the device is reopened without a vnet header and every read is one plain IP packet.

python-pytun has no TUNSETOFFLOAD/TUNSETVNETHDRSZ, so the device is opened with raw
`fcntl.ioctl`. Link configuration (MTU, addresses, routes, up/down) goes through pyroute2,
wrapped here behind typed functions so its untyped API does not leak.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Sequence
from typing import Final

from pyroute2 import IPRoute, NetlinkError

from agent.proto.offload import (
    NO_OFFLOAD,
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
    Buffer,
    VirtioNetHdr,
)

__all__ = [
    "IPInterface",
    "IPNetwork",
    "READ_SIZE",
    "Tun",
    "open_tun",
    "link_exists",
    "read_frames",
    "write_packets",
    "write_coalesced",
]

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# linux/if_tun.h
TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_USO4: Final = 0x20
TUN_F_USO6: Final = 0x40

OFFLOAD_TSO_USO: Final = "tso+uso"
OFFLOAD_TSO: Final = "tso"
OFFLOAD_NONE: Final = "none"

_OFFLOAD_CHOICES: Final = (
    (OFFLOAD_TSO_USO, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6),
    (OFFLOAD_TSO, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
)

# A read holds at most one 64 KB IP packet plus the vnet header.
READ_SIZE: Final = 0xFFFF + VNET_HDR_LEN
IFA_F_NODAD: Final = 0x02


class Tun:
    """An open TUN device (non-blocking fd). `offload` is "tso+uso", "tso" or "none"."""

    def __init__(self, name: str, fd: int, offload: str) -> None:
        self.name = name
        self.fd = fd
        self.offload = offload
        self.vnet_hdr = offload != OFFLOAD_NONE
        self._closed = False
        self._hdr_cache: dict[bytes, VirtioNetHdr] = {}

    def fileno(self) -> int:
        return self.fd

    # ------------------------------------------------------------------ packets

    def read_frames(
        self, max_packets: int
    ) -> tuple[list[tuple[VirtioNetHdr, memoryview]], OSError | None]:
        """Up to `max_packets` reads: the frames, and the error other than EAGAIN that ended
        them (the frames read before it are kept)."""
        return read_frames(self.fd, max_packets, self.vnet_hdr, self._hdr_cache)

    def read_batch(self, max_packets: int) -> list[tuple[VirtioNetHdr, memoryview]]:
        """Up to `max_packets` reads, stopping at EAGAIN: (vnet header, IP packet) each.

        Without a vnet header every packet comes with `NO_OFFLOAD`. An error other than EAGAIN
        is raised (the frames read before it are lost).
        """
        frames, error = read_frames(self.fd, max_packets, self.vnet_hdr, self._hdr_cache)
        if error is not None:
            raise error
        return frames

    def write_packets(self, packets: Sequence[Buffer]) -> int:
        """Write plain IP packets, one syscall each; returns how many failed (OSError)."""
        return write_packets(self.fd, packets, self.vnet_hdr)

    def write_coalesced(self, items: Sequence[tuple[bytes, list[Buffer]]]) -> int:
        """Write `offload.coalesce()` output (vnet header mode only), one `writev` per item.

        Returns the number of IP segments lost to failed writes.
        """
        if not self.vnet_hdr:
            raise ValueError("coalesced writes need a TUN opened with a vnet header")
        return write_coalesced(self.fd, items)

    # ------------------------------------------------------------------ link

    def configure(
        self,
        addresses: Sequence[IPInterface],
        mtu: int,
        routes: Sequence[IPNetwork],
        *,
        txqueuelen: int | None = None,
    ) -> None:
        """Set MTU, transmit queue length (None: the kernel's 500) and addresses, bring the link
        up, and route each network to the device.

        Routes already covered by one of the interface's own prefixes are skipped (the kernel
        adds those itself).
        """
        with IPRoute() as ipr:
            index = _link_index(ipr, self.name)
            _link_set(ipr, index, mtu=mtu, txqlen=txqueuelen)
            for iface in addresses:
                _addr_add(ipr, index, iface)
            _link_set(ipr, index, state="up")
            for net in routes:
                if any(
                    iface.version == net.version and net.subnet_of(iface.network)  # type: ignore[arg-type]
                    for iface in addresses
                ):
                    continue
                _route_replace(ipr, index, net)

    def close(self) -> None:
        """Close the fd (a non-persistent TUN then disappears) and delete the link if left."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError, NetlinkError), IPRoute() as ipr:
            indexes = _link_lookup(ipr, self.name)
            for index in indexes:
                ipr.link("del", index=index)

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- packets, on a bare fd


def read_frames(
    fd: int, max_reads: int, vnet_hdr: bool, cache: dict[bytes, VirtioNetHdr]
) -> tuple[list[tuple[VirtioNetHdr, memoryview]], OSError | None]:
    """Up to `max_reads` reads from a non-blocking TUN fd, until EAGAIN or an empty read.

    Each read gives (vnet header, IP packet); without a vnet header the header is `NO_OFFLOAD`.
    A read too short to hold the vnet header gives an empty packet (not IP). `cache` keeps each
    distinct header parsed once (bounded). An error other than EAGAIN ends the batch and is
    returned with the frames read before it.
    """
    out: list[tuple[VirtioNetHdr, memoryview]] = []
    read = os.read
    for _ in range(max_reads):
        try:
            data = read(fd, READ_SIZE)
        except BlockingIOError:
            break
        except OSError as e:
            return out, e
        if not data:
            break
        view = memoryview(data)
        if not vnet_hdr:
            out.append((NO_OFFLOAD, view))
        elif len(data) < VNET_HDR_LEN:
            out.append((NO_OFFLOAD, view[len(data) :]))
        elif data[0] == 0 and data[1] == 0:
            out.append((NO_OFFLOAD, view[VNET_HDR_LEN:]))
        else:
            # Headers repeat (same flow, same MSS): parse each distinct one once.
            key = data[:VNET_HDR_LEN]
            hdr = cache.get(key)
            if hdr is None:
                if len(cache) >= 256:
                    cache.clear()
                hdr = cache[key] = VirtioNetHdr.parse(view)
            out.append((hdr, view[VNET_HDR_LEN:]))
    return out, None


def write_packets(fd: int, packets: Sequence[Buffer], vnet_hdr: bool) -> int:
    """Plain IP packets, one syscall each (behind a zero vnet header when `vnet_hdr`); returns
    how many failed (OSError, BlockingIOError included: the fd never blocks)."""
    failed = 0
    if vnet_hdr:
        writev = os.writev
        for pkt in packets:
            try:
                writev(fd, (ZERO_VNET_HDR, pkt))
            except OSError:
                failed += 1
    else:
        write = os.write
        for pkt in packets:
            try:
                write(fd, pkt)
            except OSError:
                failed += 1
    return failed


def write_coalesced(fd: int, items: Sequence[tuple[bytes, list[Buffer]]]) -> int:
    """`offload.coalesce()` output, one `writev` per item; returns the IP segments lost."""
    failed = 0
    writev = os.writev
    for head, bufs in items:
        try:
            writev(fd, [head, *bufs])
        except OSError:
            failed += len(bufs)
    return failed


CAP_NET_ADMIN: Final = 12  # linux/capability.h


def effective_capabilities() -> int:
    """This process's effective capability set (CapEff of /proc/self/status); 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _tunsetiff(name: str, flags: int) -> tuple[int, str]:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as e:
        raise PermissionError(
            e.errno,
            "cannot open /dev/net/tun: permission denied (udev makes it mode 0666 on Debian; "
            "a systemd unit needs DeviceAllow=/dev/net/tun rw)",
        ) from e
    try:
        ifr = struct.pack("16sH22x", name.encode(), flags)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except PermissionError as e:
        os.close(fd)
        # The kernel checks CAP_NET_ADMIN in the user namespace owning the network namespace.
        # Seen when a container's capability bounding set lacks it: systemd's
        # AmbientCapabilities= cannot grant what the bounding set has dropped.
        caps = effective_capabilities()
        has = "has it" if caps >> CAP_NET_ADMIN & 1 else "lacks it"
        raise PermissionError(
            e.errno,
            f"creating TUN device {name!r} needs CAP_NET_ADMIN, which this process {has} "
            f"(effective capabilities {caps:#x}); run as root or with "
            "AmbientCapabilities=CAP_NET_ADMIN, on a system that grants it",
        ) from e
    except OSError:
        os.close(fd)
        raise
    actual = res[:16].rstrip(b"\0").decode()
    return fd, actual


def open_tun(name: str, *, offload: bool = True) -> Tun:
    """Create (or attach to) TUN `name`, non-blocking, with the best offload the kernel takes."""
    if len(name.encode()) > 15:
        raise ValueError(f"interface name too long: {name!r}")
    if offload:
        fd, actual = _tunsetiff(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            for mode, flags in _OFFLOAD_CHOICES:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
                        raise
                    continue
                return Tun(actual, fd, mode)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    fd, actual = _tunsetiff(name, IFF_TUN | IFF_NO_PI)
    return Tun(actual, fd, OFFLOAD_NONE)


# ---------------------------------------------------------------------- pyroute2, typed


def _link_lookup(ipr: IPRoute, name: str) -> list[int]:
    return [int(i) for i in ipr.link_lookup(ifname=name)]


def _link_index(ipr: IPRoute, name: str) -> int:
    indexes = _link_lookup(ipr, name)
    if not indexes:
        raise OSError(errno.ENODEV, f"no such interface: {name}")
    return indexes[0]


def _link_set(
    ipr: IPRoute,
    index: int,
    *,
    mtu: int | None = None,
    txqlen: int | None = None,
    state: str | None = None,
) -> None:
    attrs = {"mtu": mtu, "txqlen": txqlen, "state": state}
    ipr.link("set", index=index, **{k: v for k, v in attrs.items() if v is not None})


def _addr_add(ipr: IPRoute, index: int, iface: IPInterface) -> None:
    kwargs: dict[str, object] = {
        "index": index,
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        kwargs["flags"] = IFA_F_NODAD
    try:
        ipr.addr("add", **kwargs)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def _route_replace(ipr: IPRoute, index: int, net: IPNetwork) -> None:
    family = 10 if net.version == 6 else 2
    ipr.route("replace", dst=str(net), oif=index, family=family)


def link_exists(name: str) -> bool:
    """Whether an interface of that name exists in this namespace."""
    with IPRoute() as ipr:
        return bool(_link_lookup(ipr, name))
