"""Inputs the fuzzers (fuzz/) found that escaped a protocol core's error contract."""

from __future__ import annotations

import pytest
from nacl.public import Box, PrivateKey

from agent.proto.derp.frames import ClientInfo, open_client_info, open_server_info
from agent.proto.derp.server import CloseConnection, RelayCore
from agent.proto.errors import MalformedPacket, RemoteProtocolError

SERVER_PRIV = bytes([0x11]) * 32
CLIENT_PRIV = bytes([0x22]) * 32
SERVER_PUB = bytes(PrivateKey(SERVER_PRIV).public_key)
CLIENT_PUB = bytes(PrivateKey(CLIENT_PRIV).public_key)
NONCE = bytes(range(24))
DEEP = b"[" * 5000  # deeper than Python's recursion limit: json.loads raised RecursionError


def _sealed(sender: bytes, receiver_pub: bytes, plaintext: bytes) -> bytes:
    from nacl.public import PublicKey

    return bytes(Box(PrivateKey(sender), PublicKey(receiver_pub)).encrypt(plaintext, NONCE))


@pytest.mark.parametrize("plaintext", [DEEP, b'{"a":' * 3000])
def test_deeply_nested_info_json_is_malformed(plaintext: bytes) -> None:
    with pytest.raises(MalformedPacket):
        open_client_info(SERVER_PRIV, CLIENT_PUB, _sealed(CLIENT_PRIV, SERVER_PUB, plaintext))
    with pytest.raises(MalformedPacket):
        open_server_info(CLIENT_PRIV, SERVER_PUB, _sealed(SERVER_PRIV, CLIENT_PUB, plaintext))


def test_relay_closes_only_the_client_with_a_nested_client_info() -> None:
    core = RelayCore(SERVER_PRIV, randbytes=lambda n: bytes(n))
    core.connection_made(1, 0.0)
    frame = ClientInfo(CLIENT_PUB, _sealed(CLIENT_PRIV, SERVER_PUB, DEEP)).encode()
    with pytest.raises(RemoteProtocolError):
        core.receive_data(1, frame, 0.0)
    assert any(isinstance(e, CloseConnection) and e.conn_id == 1 for e in core.events())
    assert core.clients() == {}


def test_client_that_sent_to_itself_can_disconnect() -> None:
    # A SendPacket to the sender's own key put it among its own key's listeners; its
    # connection_lost then looked itself up after removing itself: KeyError, and the rest of
    # the clean-up (other keys' listeners) was skipped.
    from agent.proto.derp.frames import SendPacket, seal_client_info

    core = RelayCore(SERVER_PRIV, randbytes=lambda n: bytes(n))
    other_priv = bytes([0x33]) * 32
    other_pub = bytes(PrivateKey(other_priv).public_key)
    for conn_id, priv, pub in ((1, CLIENT_PRIV, CLIENT_PUB), (2, other_priv, other_pub)):
        core.connection_made(conn_id, 0.0)
        info = seal_client_info(priv, SERVER_PUB, {"version": 2}, NONCE)
        core.receive_data(conn_id, ClientInfo(pub, info).encode(), 0.0)
    core.receive_data(1, SendPacket(CLIENT_PUB, b"me").encode(), 0.0)
    core.receive_data(1, SendPacket(other_pub, b"you").encode(), 0.0)
    core.receive_data(2, SendPacket(CLIENT_PUB, b"hi").encode(), 0.0)
    core.take_output()
    core.connection_lost(1)
    assert set(core.clients()) == {other_pub}
    out = core.data_to_send(2)
    assert b"\x08\x00\x00\x00\x21" + CLIENT_PUB in out  # PeerGone(Disconnected) to the listener
    core.connection_lost(2)
    assert core.clients() == {}
