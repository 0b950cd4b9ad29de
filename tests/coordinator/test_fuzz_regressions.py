"""Inputs the fuzzers (fuzz/) found that escaped the coordinator's error contract."""

from __future__ import annotations

import gc
import types
from pathlib import Path

import pytest

from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.service import Reply, Service
from agent.coordinator.store import Store
from agent.proto import coordinator_messages as netmap
from agent.proto.coordinator_messages import BadMessage

DEEP = b"[" * 5000  # deeper than Python's recursion limit: json.loads raised RecursionError


@pytest.mark.parametrize(
    "cls",
    [netmap.SealedRequest, netmap.RegisterRequest, netmap.UpdateRequest, netmap.NetMap],
)
def test_deeply_nested_body_is_a_bad_message(cls: type[netmap.NetMap]) -> None:
    with pytest.raises(BadMessage):
        cls.parse(DEEP)
    with pytest.raises(BadMessage):
        cls.parse(b'{"a":' * 3000)


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 400])
def test_register_timestamp_must_be_a_finite_number(value: bytes) -> None:
    # NaN passed the clock-skew and replay checks, then failed SQLite's NOT NULL (a 503);
    # a huge integer raised OverflowError.
    body = (
        b'{"auth_key":"k","disco_key":"pv3xaF61kkWFO9GXW4A27eB3xX2fXq1wc1iz7cslgDE=",'
        b'"hostname":"h","endpoints":[],"home_region":null,"timestamp":%s}' % value
    )
    with pytest.raises(BadMessage, match="timestamp: not a finite number"):
        netmap.RegisterRequest.parse(body)


def _tracebacks() -> int:
    return sum(isinstance(o, types.TracebackType) for o in gc.get_objects())


def test_refused_tokens_do_not_pile_up_tracebacks(tmp_path: Path) -> None:
    # A shared ServiceError instance was raised for every unknown token: each raise grew its
    # traceback by two entries, keeping every frame (and request body) alive for good.
    store = Store.open(str(tmp_path / "db.sqlite"))
    try:
        service = Service(store, CoordinatorConfig(database=str(tmp_path / "db.sqlite")))

        def refused(n: int) -> None:
            for _ in range(n):
                for target in ("/api/v1/update", "/api/v1/netmap"):
                    method = "POST" if target.endswith("update") else "GET"
                    reply = service.handle(method, target, "Bearer nope", b"{}" * 500, 1e9)
                    assert isinstance(reply, Reply)
                    assert reply.status == 401

        refused(20)
        gc.collect()
        before = _tracebacks()
        refused(300)
        gc.collect()
        assert _tracebacks() - before < 50
    finally:
        store.close()


@pytest.mark.parametrize("cls", [netmap.SealedRequest, netmap.SealedResponse])
def test_non_ascii_base64_is_a_bad_message(cls: type[netmap.SealedResponse]) -> None:
    # base64.b64decode raised a plain ValueError for characters outside ASCII
    body = '{"node_key":"pv3xaF61kkWFO9GXW4A27eB3xX2fXq1wc1iz7cslgDE=","nonce":"é","sealed":"AA"}'
    with pytest.raises(BadMessage):
        cls.parse(body.encode())
