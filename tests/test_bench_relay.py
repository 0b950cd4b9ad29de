"""bench/relay.py's pure helpers: frame splitting for the ping pair and RTT percentiles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.proto.derp.frames import KEY_LEN, FrameType, RecvPacket, SendPacket


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "relay.py"
    spec = importlib.util.spec_from_file_location("bench_relay", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_relay", module)
    spec.loader.exec_module(module)
    return module


relay = _load()


def test_split_frames_keeps_the_partial_tail() -> None:
    src = bytes(range(KEY_LEN))
    one = RecvPacket(src, b"abc").encode()
    two = SendPacket(src, b"defg").encode()
    buf = bytearray(one + two + two[:7])
    frames = relay.split_frames(buf)
    assert frames == [
        (FrameType.RECV_PACKET, src + b"abc"),
        (FrameType.SEND_PACKET, src + b"defg"),
    ]
    assert bytes(buf) == two[:7]
    buf += two[7:]
    assert relay.split_frames(buf) == [(FrameType.SEND_PACKET, src + b"defg")]
    assert buf == bytearray()


def test_split_frames_needs_a_whole_header() -> None:
    buf = bytearray(b"\x05\x00\x00")
    assert relay.split_frames(buf) == []
    assert bytes(buf) == b"\x05\x00\x00"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert relay.percentile(values, 50) == 50.0
    assert relay.percentile(values, 99) == 99.0
    assert relay.percentile(values, 100) == 100.0
    assert relay.percentile([7.0], 99) == 7.0
    assert relay.percentile([1.0, 2.0, 3.0], 0) == 1.0


def test_rtt_summary_in_milliseconds() -> None:
    rtts = [0.001] * 98 + [0.002, 0.010]
    summary = relay.rtt_summary(rtts)
    assert summary["p50"] == pytest.approx(1.0)
    assert summary["p99"] == pytest.approx(2.0)
    assert summary["max"] == pytest.approx(10.0)
    assert summary["mean"] == pytest.approx((98 + 2 + 10) / 100)
    assert relay.rtt_summary([]) == {}
