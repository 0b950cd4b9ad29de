"""Prometheus text exposition and the loopback metrics server."""

from __future__ import annotations

import asyncio
import re

import pytest

from agent.node.metrics import Exposition, PeerMetrics, Snapshot, render, serve_metrics

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? -?[0-9.e+Na]+$')

SNAP = Snapshot(
    peers=(
        PeerMetrics(
            name='b "quoted"',
            public_key="pk+/=",
            rx_bytes=476,
            tx_bytes=564,
            handshakes=2,
            last_handshake=1795527867,
            path="derp",
            path_switches=3,
        ),
    ),
    drops={"replay": 4, "no_route": 1},
    dataplane={"tx_packets": 10, "rx_packets": 9},
    derp_connected={900: True, 901: False},
    derp={"tx_packets": 7},
    disco={"sent_ping": 12, "silence_probes": 2},
    impl="python",
    impl_reason="auto: the compiled module does not load",
)


def test_exposition_is_valid_text_format() -> None:
    text = render(SNAP)
    assert text.endswith("\n")
    families: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            families.append(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[3] in ("counter", "gauge")
        else:
            assert SAMPLE.match(line), line
    assert len(families) == len(set(families)), "a family's HELP appears twice"


def test_exposition_values_and_escaping() -> None:
    text = render(SNAP)
    who = 'peer="b \\"quoted\\"",public_key="pk+/="'
    assert f"agent_peer_rx_bytes_total{{{who}}} 476\n" in text
    assert f"agent_peer_handshakes_total{{{who}}} 2\n" in text
    assert f'agent_peer_path{{{who},path="derp"}} 1\n' in text
    assert f'agent_peer_path{{{who},path="direct"}} 0\n' in text
    assert f"agent_peer_path_switches_total{{{who}}} 3\n" in text
    assert 'agent_drops_total{reason="replay"} 4\n' in text
    assert "agent_dataplane_tx_packets_total 10\n" in text
    assert (
        'agent_dataplane_info{impl="python",reason="auto: the compiled module does not load"} 1\n'
        in text
    )
    assert 'agent_derp_connected{region="901"} 0\n' in text
    assert "agent_derp_tx_packets_total 7\n" in text
    assert "agent_disco_sent_ping_total 12\n" in text
    assert "agent_disco_silence_probes_total 2\n" in text
    assert "agent_up 1\n" in text


def test_exposition_numbers() -> None:
    e = Exposition()
    e.add("x", "gauge", "h", 1.5)
    e.add("x", "gauge", "h", float("inf"), {"a": "b\nc"})
    assert e.text() == '# HELP x h\n# TYPE x gauge\nx 1.5\nx{a="b\\nc"} +Inf\n'


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


@pytest.mark.asyncio
async def test_server_answers_get_metrics_only() -> None:
    server = await serve_metrics("127.0.0.1", 0, lambda: render(SNAP))
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"text/plain; version=0.0.4" in head
        assert body.decode() == render(SNAP)
        assert (await _get(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        post = await _get(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405")
        assert await _get(port, b"\x16\x03\x01garbage\r\n\r\n") == b""  # dropped, no crash
    finally:
        server.close()
        await server.wait_closed()
