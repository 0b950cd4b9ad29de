"""The UAPI text protocol: get formatting, set semantics, the UNIX server, and the stock `wg`."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import structlog

from agent.keys import NodePrivate, NodePublic, PresharedKey
from agent.node.uapi import EINVAL, apply_set, format_get, remove_uapi, serve_uapi
from agent.proto.wireguard.device import Device

PRIV = NodePrivate(bytes(range(1, 33)))
K1 = NodePrivate(bytes([7] * 32)).public()
K2 = NodePrivate(bytes([9] * 32)).public()
K3 = NodePrivate(bytes([11] * 32)).public()
PSK = PresharedKey(bytes([0xAB] * 32))
ZERO = "0" * 64
LOG = structlog.get_logger()


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


def make_device() -> Device:
    dev = Device(PRIV)
    p1 = dev.add_peer(
        K1,
        preshared_key=PSK,
        endpoint=("198.18.0.2", 51820),
        allowed_ips=nets("100.64.0.2/32", "fd7a::2/128"),
        persistent_keepalive=25,
    )
    p1.last_handshake = 1795527867.054578762
    p1.rx_bytes, p1.tx_bytes = 476, 564
    dev.add_peer(K2, endpoint=("fd00::5", 41641), allowed_ips=nets("100.64.1.0/24"))
    return dev


def allowed(dev: Device, key: NodePublic) -> set[str]:
    return {str(n) for n in dev.allowed_ips.networks_of(dev.peers[key])}


def test_format_get_line_by_line() -> None:
    text = format_get(make_device(), 51820, fwmark=0)
    assert text.endswith("\nerrno=0\n\n")
    lines = text[:-2].split("\n")
    assert lines[:2] == [f"private_key={PRIV.to_hex()}", "listen_port=51820"]
    p1 = lines[2:15]
    assert p1[:4] == [
        f"public_key={K1.to_hex()}",
        f"preshared_key={PSK.to_hex()}",
        "protocol_version=1",
        "endpoint=198.18.0.2:51820",
    ]
    assert p1[4] == "last_handshake_time_sec=1795527867"
    assert 54_000_000 < int(p1[5].removeprefix("last_handshake_time_nsec=")) < 55_000_000
    assert p1[6:11] == [
        "tx_bytes=564",
        "rx_bytes=476",
        "persistent_keepalive_interval=25",
        "allowed_ip=100.64.0.2/32",
        "allowed_ip=fd7a::2/128",
    ]
    assert lines[13:] == [
        f"public_key={K2.to_hex()}",
        f"preshared_key={ZERO}",
        "protocol_version=1",
        "endpoint=[fd00::5]:41641",
        "last_handshake_time_sec=0",
        "last_handshake_time_nsec=0",
        "tx_bytes=0",
        "rx_bytes=0",
        "persistent_keepalive_interval=0",
        "allowed_ip=100.64.1.0/24",
        "errno=0",
    ]
    assert "fwmark=66\n" in format_get(make_device(), 51820, fwmark=66)


def test_setconf_style_replaces_everything() -> None:
    dev = make_device()
    body = [
        f"private_key={PRIV.to_hex()}",
        "listen_port=51820",
        "fwmark=0",
        "replace_peers=true",
        f"public_key={K1.to_hex()}",
        "endpoint=198.18.0.9:51821",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
        f"public_key={K3.to_hex()}",
        "endpoint=[fd00::7]:7",
        "allowed_ip=100.64.3.3/32",
    ]
    assert apply_set(dev, body, listen_port=51820, now=1.0) == (0, [])
    assert set(dev.peers) == {K1, K3}
    assert dev.peers[K1].endpoint == ("198.18.0.9", 51821)
    assert dev.peers[K1].preshared_key == PSK  # not named: unchanged
    assert allowed(dev, K1) == {"100.64.0.2/32"}
    assert dev.peers[K3].endpoint == ("fd00::7", 7)
    assert allowed(dev, K3) == {"100.64.3.3/32"}


def test_set_peer_fields_and_remove() -> None:
    dev = make_device()
    body = [
        "listen_port=0",
        f"public_key={K2.to_hex()}",
        f"preshared_key={PSK.to_hex()}",
        "protocol_version=1",
        "allowed_ip=100.64.2.0/24",
    ]
    assert apply_set(dev, body, listen_port=51820, now=1.0) == (0, [])
    assert dev.peers[K2].preshared_key == PSK
    assert allowed(dev, K2) == {"100.64.1.0/24", "100.64.2.0/24"}  # appended, not replaced
    body = [f"public_key={K2.to_hex()}", f"preshared_key={ZERO}", "replace_allowed_ips=true"]
    assert apply_set(dev, body, listen_port=51820, now=1.0)[0] == 0
    assert dev.peers[K2].preshared_key is None
    assert allowed(dev, K2) == set()
    assert (
        apply_set(dev, [f"public_key={K2.to_hex()}", "remove=true"], listen_port=1, now=1.0)[0] == 0
    )
    assert set(dev.peers) == {K1}
    assert dev.route(ipaddress.ip_address("100.64.1.1").packed) is None


def test_update_only_and_keepalive_sends() -> None:
    dev = make_device()
    body = [f"public_key={K3.to_hex()}", "update_only=true", "allowed_ip=100.64.3.0/24"]
    assert apply_set(dev, body, listen_port=1, now=1.0) == (0, [])
    assert K3 not in dev.peers
    body = [f"public_key={K2.to_hex()}", "persistent_keepalive_interval=25"]
    errno, out = apply_set(dev, body, listen_port=1, now=1.0)
    assert errno == 0
    assert dev.peers[K2].persistent_keepalive == 25
    assert out  # no session yet: an initiation goes to the endpoint
    assert all(ep == ("fd00::5", 41641) and d[0] == 1 for d, ep in out)
    body = [f"public_key={K2.to_hex()}", "persistent_keepalive_interval=0"]
    assert apply_set(dev, body, listen_port=1, now=2.0) == (0, [])
    assert dev.peers[K2].persistent_keepalive is None


@pytest.mark.parametrize(
    "bad",
    [
        "public_key=zz",
        f"public_key={K1.to_hex()[:-2]}",
        f"preshared_key={'g' * 64}",
        "endpoint=host.example:51820",
        "endpoint=fd00::1:51820",
        "endpoint=198.18.0.1:70000",
        "allowed_ip=100.64.0.0",
        "allowed_ip=100.64.0.300/32",
        "persistent_keepalive_interval=-1",
        "protocol_version=2",
        "remove=yes",
        "bogus_key=1",
        "no equals sign",
    ],
)
def test_bad_line_changes_nothing(bad: str) -> None:
    dev = make_device()
    before = format_get(dev, 51820)
    body = [
        "replace_peers=true",
        f"public_key={K3.to_hex()}",
        "allowed_ip=100.64.9.0/24",
        f"public_key={K1.to_hex()}",
        "replace_allowed_ips=true",
        bad,
    ]
    assert apply_set(dev, body, listen_port=51820, now=1.0) == (EINVAL, [])
    assert format_get(dev, 51820) == before


@pytest.mark.parametrize(
    "bad",
    [
        f"private_key={NodePrivate(bytes([3] * 32)).to_hex()}",
        "listen_port=51821",
        "listen_port=notanumber",
        "fwmark=66",
        "replace_peers=false",
        f"public_key={PRIV.public().to_hex()}",
    ],
)
def test_interface_changes_we_cannot_make(bad: str) -> None:
    dev = make_device()
    before = format_get(dev, 51820)
    assert apply_set(dev, [bad], listen_port=51820, now=1.0) == (EINVAL, [])
    assert format_get(dev, 51820) == before


async def _exchange(path: str, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(request)
    await writer.drain()
    data = await reader.read()  # until the server closes or half-closes
    writer.close()
    await writer.wait_closed()
    return data


async def _ask(path: str, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(request)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


@pytest.mark.asyncio
async def test_server_probe_get_set(tmp_path: Path) -> None:
    dev = make_device()
    path = str(tmp_path / "run" / "wireguard" / "wgt0.sock")
    sent: list[tuple[bytes, tuple[str, int]]] = []
    Path(path).parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    server = await serve_uapi(
        path,
        dev,
        listen_port=51820,
        clock=lambda: 5.0,
        send=lambda d, ep: sent.append((d, ep)),
        log=LOG,
    )
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)
        probe.close()
        assert (await _ask(path, b"get=1\n\n")).decode() == format_get(dev, 51820)
        body = f"set=1\npublic_key={K3.to_hex()}\nendpoint=198.18.0.3:1\n"
        body += "persistent_keepalive_interval=10\nallowed_ip=100.64.3.3/32\n\n"
        assert await _ask(path, body.encode() + b"get=1\n\n") == (
            b"errno=0\n\n" + format_get(dev, 51820).encode()
        )
        assert K3 in dev.peers
        assert sent
        assert sent[0][1] == ("198.18.0.3", 1)
        assert await _ask(path, b"set=1\npublic_key=zz\n\n") == b"errno=-22\n\n"
        assert await _exchange(path, b"frob=1\n\n") == b""  # closed, no reply
        assert await _ask(path, b"get=1\n") == b""  # truncated request: nothing
        with pytest.raises(OSError, match="in use"):
            await serve_uapi(
                path, dev, listen_port=1, clock=float, send=lambda d, ep: None, log=LOG
            )
    finally:
        server.close()
        await server.wait_closed()
        remove_uapi(path)
    assert not Path(path).exists()  # noqa: ASYNC240 - a test's final check
    remove_uapi(path)  # idempotent


@pytest.mark.netns
@pytest.mark.asyncio
async def test_stock_wg_tool() -> None:
    wg = shutil.which("wg")
    if wg is None or os.geteuid() != 0:
        pytest.skip("needs root and wireguard-tools' wg")
    name = f"uapit{os.getpid() % 100000}"
    path = f"/var/run/wireguard/{name}.sock"
    dev = make_device()
    server = await serve_uapi(
        path, dev, listen_port=51820, clock=lambda: 5.0, send=lambda d, ep: None, log=LOG
    )
    try:

        def run(*args: str) -> str:
            done = subprocess.run(
                [wg, *args], capture_output=True, text=True, timeout=10, check=False
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        dump = await asyncio.to_thread(run, "show", name, "dump")
        rows = [r.split("\t") for r in dump.splitlines()]
        assert rows[0] == [PRIV.to_b64(), PRIV.public().to_b64(), "51820", "off"]
        assert rows[1][:4] == [K1.to_b64(), PSK.to_b64(), "198.18.0.2:51820", rows[1][3]]
        assert set(rows[1][3].split(",")) == {"100.64.0.2/32", "fd7a::2/128"}
        assert rows[1][4:] == ["1795527867", "476", "564", "25"]
        assert rows[2][:4] == [K2.to_b64(), "(none)", "[fd00::5]:41641", "100.64.1.0/24"]
        await asyncio.to_thread(
            run, "set", name, "peer", K2.to_b64(), "allowed-ips", "100.64.9.9/32"
        )
        assert allowed(dev, K2) == {"100.64.9.9/32"}
    finally:
        server.close()
        await server.wait_closed()
        remove_uapi(path)
    assert not Path(path).exists()  # noqa: ASYNC240 - a test's final check


def test_fwmark_is_reported_and_only_the_current_one_accepted() -> None:
    dev = make_device()
    assert format_get(dev, 51820, fwmark=0x42).split("\n")[2] == "fwmark=66"
    assert apply_set(dev, ["fwmark=66"], listen_port=51820, now=1.0, fwmark=66)[0] == 0
    assert apply_set(dev, ["fwmark=0"], listen_port=51820, now=1.0, fwmark=66)[0] == EINVAL
