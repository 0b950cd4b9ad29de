# Types of the compiled module built from native/ (see native/fastpath.h); the Python twins
# with the same signatures: agent/proto/wireguard/transport.py (Aead, ReplayWindow, seal,
# open_run), agent/proto/offload (segment, coalesce), agent/node/tun_batch.py (tun_read,
# tun_write), UdpSocket.send_batch in agent/node/udp.py (udp_send), agent/node/lanes.py
# (Sealer, Lane, fast_tx, fast_rx); Pump (the lanes' thread) has none: agent/node/lane_pump.py.
from collections.abc import Sequence

_Buffer = bytes | bytearray | memoryview

class Aead:
    def __init__(self, key: bytes) -> None: ...
    def encrypt(self, nonce: bytes, data: _Buffer, associated_data: _Buffer | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: _Buffer, associated_data: _Buffer | None) -> bytes: ...

class ReplayWindow:
    def accept(self, counter: int) -> bool: ...

def seal(
    aead: Aead, remote_index: int, counter: int, packets: Sequence[_Buffer]
) -> list[bytes]: ...
def open_run(
    aead: Aead, replay: ReplayWindow, datagrams: Sequence[_Buffer], start: int, index: int
) -> tuple[int, list[bytes], list[bytes], int, int, int, int, int, bool]: ...
def segment(hdr: bytes, packet: _Buffer) -> list[bytes]: ...
def coalesce(packets: Sequence[_Buffer], udp: bool) -> list[bytes]: ...
def tun_read(
    fd: int, max_reads: int, vnet_hdr: bool
) -> tuple[list[bytes], list[tuple[bytes, int]], int, int, int, OSError | None]: ...
def tun_write(
    fd: int, packets: Sequence[_Buffer], vnet_hdr: bool, udp: bool
) -> tuple[int, int]: ...
def sockaddr(family: int, host: str, port: int) -> bytes: ...
def udp_send(
    fd: int, sockaddr: bytes, datagrams: Sequence[_Buffer], gso: bool
) -> tuple[int, int, int, bool]: ...

class Sealer:
    counter: int
    def __init__(self, aead: Aead, remote_index: int) -> None: ...
    @property
    def remote_index(self) -> int: ...
    @property
    def aead(self) -> Aead: ...
    def seal(self, packets: Sequence[_Buffer]) -> list[bytes]: ...

class Lane:
    @property
    def tx_armed(self) -> bool: ...
    @property
    def rx_armed(self) -> bool: ...
    @property
    def rx_index(self) -> int | None: ...
    def arm_tx(self, sealer: Sealer, sockaddr: bytes, limit: int, deadline: float) -> None: ...
    def arm_rx(
        self, aead: Aead, replay: ReplayWindow, index: int, sockaddr: bytes, deadline: float
    ) -> None: ...
    def disarm_tx(self) -> None: ...
    def disarm_rx(self) -> None: ...
    def take(self) -> tuple[int, int, int, int, int, int, int, int, int, bool]: ...

_FastTx = tuple[
    list[bytes],
    list[tuple[bytes, int]],
    int,
    int,
    int,
    OSError | None,
    list[Lane],
    int,
    int,
    int,
    bool,
]
_Filter = (
    tuple[dict[int, dict[object, object]], dict[int, dict[object, object]], object, object] | None
)

def fast_tx(
    tun_fd: int,
    max_reads: int,
    vnet_hdr: bool,
    routes: dict[bytes, object],
    udp_fd: int,
    gso: bool,
    now: float,
    tcp_only: bool,
) -> _FastTx: ...
def fast_rx(
    udp_fd: int,
    max_datagrams: int,
    lanes: dict[int, Lane],
    routes: dict[bytes, object],
    tun_fd: int,
    vnet_hdr: bool,
    uso: bool,
    now: float,
    flt: _Filter,
    answer: tuple[int, bool, bool] | None,
) -> tuple[
    list[tuple[list[bytes], bytes]],
    list[Lane],
    int,
    list[tuple[Lane, bytes]],
    int,
    int,
    int,
    int,
    int,
    int,
    _FastTx | None,
]: ...

class Pump:
    def __init__(
        self,
        tun_fd: int,
        udp_fd: int,
        vnet_hdr: bool,
        uso: bool,
        max_reads: int,
        max_datagrams: int,
        sparse_gap: float,
        book_delay: float,
        queue_max: int,
    ) -> None: ...
    @property
    def wake_fd(self) -> int: ...
    @property
    def running(self) -> bool: ...
    def configure(
        self,
        routes: dict[bytes, object],
        lanes: dict[int, Lane],
        flt: _Filter,
        gso: bool,
        tcp_only: bool,
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def take(
        self,
    ) -> tuple[
        list[tuple[int, object]],
        tuple[int, int, int, int, int, int, int, int, int, int, int, bool],
        list[Lane],
    ]: ...
    def clock(self) -> float: ...
