"""Cryptokey routing: longest-prefix match from an IP address to the peer that owns it.

One table per address family: {prefix length: {address >> (bits - length): value}}, probed from the
longest length down. A prefix belongs to exactly one value; inserting it again moves it (as `wg set`
does). Lookups take the raw 4 or 16 address bytes straight from a packet header.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Generic, TypeVar

__all__ = ["AllowedIPs"]

T = TypeVar("T")
Network = IPv4Network | IPv6Network


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: tuple[int, ...] = ()

    def _reindex(self) -> None:
        self.lengths = tuple(sorted((n for n, t in self.tables.items() if t), reverse=True))

    def insert(self, length: int, key: int, value: T) -> None:
        self.tables.setdefault(length, {})[key] = value
        self._reindex()

    def remove(self, length: int, key: int) -> None:
        table = self.tables.get(length)
        if table is not None:
            table.pop(key, None)
        self._reindex()

    def lookup(self, address: int) -> T | None:
        bits = self.bits
        tables = self.tables
        for length in self.lengths:
            value = tables[length].get(address >> (bits - length))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[T]):
    """Longest-prefix table from IP prefixes to values (peers)."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def _family(self, network: Network) -> _Family[T]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: Network, value: T) -> None:
        fam = self._family(network)
        fam.insert(
            network.prefixlen, int(network.network_address) >> (fam.bits - network.prefixlen), value
        )

    def remove(self, network: Network) -> None:
        fam = self._family(network)
        fam.remove(
            network.prefixlen, int(network.network_address) >> (fam.bits - network.prefixlen)
        )

    def remove_value(self, value: T) -> None:
        for network in self.networks_of(value):
            self.remove(network)

    def lookup(self, address: bytes | bytearray | memoryview) -> T | None:
        """The value owning the longest prefix that contains `address` (4 or 16 raw bytes)."""
        n = len(address)
        if n == 4:
            return self._v4.lookup(int.from_bytes(address, "big"))
        if n == 16:
            return self._v6.lookup(int.from_bytes(address, "big"))
        return None

    def networks_of(self, value: T) -> list[Network]:
        """Every prefix currently mapped to `value`, v4 first, longest first."""
        out: list[Network] = []
        for fam, cls in ((self._v4, IPv4Network), (self._v6, IPv6Network)):
            for length in sorted(fam.tables, reverse=True):
                for key, v in fam.tables[length].items():
                    if v is value or v == value:
                        out.append(cls((key << (fam.bits - length), length)))
        return out
