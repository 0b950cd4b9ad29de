"""The coordinator API over real TLS on loopback: the in-process server, the agent's client, and
admin changes made from another Store handle or by the `agent coordinator` CLI in a process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.server import CoordinatorServer, serve_coordinator, server_ssl_context
from agent.coordinator.store import Store
from agent.keys import DiscoPrivate, DiscoPublic, NodePrivate
from agent.log import get_logger
from agent.node.coordinator_client import (
    CoordinatorClient,
    CoordinatorRejected,
    NotAuthorized,
)
from agent.proto.coordinator_messages import NetMap, RegisterRequest, SealedRequest, seal

pytestmark = pytest.mark.asyncio

DERP = DerpConfig(
    regions=(DerpRegion(id=900, code="lab", nodes=(DerpNode(host="127.0.0.1", port=8443),)),)
)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Coord:
    server: CoordinatorServer
    store: Store
    config: CoordinatorConfig
    ca_file: str
    admin: Store  # a second handle on the database: changes as another process would make them

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.url, ca_file=self.ca_file, timeout=5.0)

    def key(self, *, reusable: bool = True, expires: float | None = None) -> str:
        secret, _ = self.admin.create_auth_key(reusable=reusable, expires=expires, now=time.time())
        return secret


def _config(database: str, tmp_path: Path, **kw: object) -> CoordinatorConfig:
    base = CoordinatorConfig(
        listen=("127.0.0.1", 0),
        hostname="127.0.0.1",
        database=database,
        cert_dir=str(tmp_path / "certs"),
        derp=DERP,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    config: CoordinatorConfig, *, long_poll: float = 25.0, port: int = 0
) -> AsyncIterator[Coord]:
    config = replace(config, listen=("127.0.0.1", port))
    store = Store.open(config.database)
    admin = Store.open(config.database)
    server = await serve_coordinator(
        config,
        store,
        get_logger("test.coordinator"),
        ssl_context=server_ssl_context(config),
        long_poll=long_poll,
    )
    try:
        yield Coord(server, store, config, str(Path(config.cert_dir) / "127.0.0.1.crt"), admin)
    finally:
        await server.close()
        store.close()
        admin.close()


async def _join(
    coord: Coord, auth_key: str, hostname: str = "node"
) -> tuple[CoordinatorClient, NodePrivate, DiscoPublic]:
    client = coord.client()
    priv, disco = NodePrivate.generate(), DiscoPrivate.generate().public()
    await client.register(
        node_key=priv,
        disco_key=disco,
        hostname=hostname,
        auth_key=auth_key,
        endpoints=[("198.18.0.1", 41641)],
        home_region=900,
    )
    return client, priv, disco


async def test_register_with_valid_invalid_used_and_expired_keys(
    database: str, tmp_path: Path
) -> None:
    async with running(_config(database, tmp_path)) as coord:
        one_off = coord.key(reusable=False)
        expired = coord.key(expires=time.time() - 1)
        client = coord.client()
        priv = NodePrivate.generate()
        disco = DiscoPrivate.generate().public()
        reg = await client.register(
            node_key=priv, disco_key=disco, hostname="alpha", auth_key=one_off, home_region=900
        )
        assert reg.node.name == "alpha"
        assert reg.node.node_key == priv.public()
        assert str(reg.addresses()[0]) == "100.64.0.1/10"
        assert str(reg.addresses()[1]) == "fd7a:115c:a1e0::1/48"
        assert reg.derp == DERP
        assert reg.node.key_expiry is not None
        assert client.token == reg.token
        assert reg.token not in repr(reg)
        assert reg.token not in repr(client)

        for key, code in [
            (one_off, "auth_key_used"),
            (expired, "auth_key_expired"),
            ("agentkey-nonsense", "invalid_auth_key"),
            ("", "invalid_auth_key"),
        ]:
            with pytest.raises(NotAuthorized) as err:
                await coord.client().register(
                    node_key=NodePrivate.generate(), disco_key=disco, hostname="b", auth_key=key
                )
            assert (err.value.status, err.value.code) == (401, code)

        # the registered node comes back without an auth key, with the same addresses
        again = coord.client()
        reg2 = await again.register(node_key=priv, disco_key=disco, hostname="alpha")
        assert (reg2.node.id, reg2.node.ipv4) == (reg.node.id, reg.node.ipv4)
        with pytest.raises(NotAuthorized):
            await client.poll_netmap()  # the old token was replaced
        assert (await again.poll_netmap()).self_node.id == reg.node.id


async def test_allocation_unique_under_concurrent_registration(
    database: str, tmp_path: Path
) -> None:
    async with running(_config(database, tmp_path)) as coord:
        key = coord.key()
        joined = await asyncio.gather(*(_join(coord, key, "same") for _ in range(12)))
        netmap = await joined[0][0].poll_netmap()
        nodes = [netmap.self_node, *netmap.peers]
        assert len(nodes) == 12
        assert len({n.ipv4 for n in nodes}) == 12
        assert len({n.ipv6 for n in nodes}) == 12
        assert len({n.name for n in nodes}) == 12
        assert {int(n.ipv4) & 0xFF for n in nodes} == set(range(1, 13))


async def test_a_node_updates_only_itself(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path)) as coord:
        key = coord.key()
        (a, a_priv, _), (b, b_priv, b_disco) = (
            await _join(coord, key, "a"),
            await _join(coord, key, "b"),
        )
        before = await b.poll_netmap()
        new_disco = DiscoPrivate.generate().public()
        changed = await a.update(
            disco_key=new_disco, endpoints=[("198.18.5.5", 1234), ("::1", 5)], home_region=901
        )
        assert changed
        assert not await a.update(
            disco_key=new_disco, endpoints=[("198.18.5.5", 1234), ("::1", 5)], home_region=901
        )
        after = await b.poll_netmap(before.version)
        assert after.version > before.version
        (peer_a,) = after.peers
        assert peer_a.node_key == a_priv.public()
        assert peer_a.disco_key == new_disco
        assert peer_a.endpoints == (("198.18.5.5", 1234), ("::1", 5))
        assert peer_a.home_region == 901
        assert after.self_node.disco_key == b_disco  # b is untouched
        assert after.self_node.endpoints == (("198.18.0.1", 41641),)

        # registering b's node key without b's private key: the seal does not open
        key_info = await a.server_key()
        forged = SealedRequest(
            b_priv.public(),
            b"\0" * 24,
            seal(
                a_priv,
                key_info.public_key.raw,
                RegisterRequest(key, b_disco, "b", (), None, key_info.time).encode(),
                b"\0" * 24,
            ),
        )
        with pytest.raises(NotAuthorized) as err:
            await a._request("POST", "/register", forged.encode())
        assert err.value.code == "bad_seal"
        with pytest.raises(NotAuthorized):
            await CoordinatorClient(coord.url, ca_file=coord.ca_file, token="x" * 64).update(
                disco_key=b_disco, endpoints=[], home_region=None
            )


async def test_replayed_or_mistimed_registration_refused(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path)) as coord:
        key = coord.key()
        client = coord.client()
        priv = NodePrivate.generate()
        info = await client.server_key()

        def sealed(timestamp: float) -> bytes:
            req = RegisterRequest(key, DiscoPrivate.generate().public(), "r", (), None, timestamp)
            nonce = os.urandom(24)
            box = seal(priv, info.public_key.raw, req.encode(), nonce)
            return SealedRequest(priv.public(), nonce, box).encode()

        body = sealed(info.time)
        await client._request("POST", "/register", body)
        with pytest.raises(CoordinatorRejected) as err:
            await client._request("POST", "/register", body)
        assert (err.value.status, err.value.code) == (409, "replayed")
        with pytest.raises(CoordinatorRejected) as err:
            await client._request("POST", "/register", sealed(info.time - 3600))
        assert (err.value.status, err.value.code) == (400, "bad_timestamp")


async def test_http_errors(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path)) as coord:
        client = coord.client()
        for method, path, status, code in [
            ("GET", "/nothing", 404, "not_found"),
            ("POST", "/key", 405, "method_not_allowed"),
            ("POST", "/register", 400, "bad_request"),
        ]:
            with pytest.raises(CoordinatorRejected) as err:
                await client._request(method, path, b"{}")
            assert (err.value.status, err.value.code) == (status, code)
        with pytest.raises(CoordinatorRejected) as err:
            await client._request("POST", "/register", b"x" * (100 << 10))
        assert err.value.status == 413
        with pytest.raises(NotAuthorized, match="register"):
            await client.poll_netmap()  # no token yet: refused before any request
        client.token = "not-a-token"
        with pytest.raises(NotAuthorized) as err:
            await client.poll_netmap()
        assert err.value.code == "unauthorized"


async def test_long_poll_times_out_with_the_same_version(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path), long_poll=0.6) as coord:
        client, _, _ = await _join(coord, coord.key())
        first = await client.poll_netmap()
        started = time.monotonic()
        again = await client.poll_netmap(first.version)
        waited = time.monotonic() - started
        assert again.version == first.version
        assert 0.5 <= waited < 2.0
        # a stale or unknown `since` answers at once
        started = time.monotonic()
        assert (await client.poll_netmap(first.version + 1000)).version == first.version
        assert time.monotonic() - started < 0.5


async def _wait_change(client: CoordinatorClient, since: NetMap) -> tuple[NetMap, float]:
    netmap = await client.poll_netmap(since.version)
    return netmap, time.monotonic()


async def test_admin_cli_removal_wakes_long_polls_and_revokes_access(
    database: str, tmp_path: Path
) -> None:
    config = _config(database, tmp_path)
    conf = tmp_path / "coordinator.conf"
    conf.write_text(f'[coordinator]\ndatabase = "{database}"\n')
    async with running(config) as coord:
        key = coord.key()
        (a, _, _), (b, _, _), (c, _, _) = [await _join(coord, key, n) for n in "abc"]
        base_a, base_c = await a.poll_netmap(), await c.poll_netmap()
        assert sorted(p.name for p in base_a.peers) == ["b", "c"]
        wait_a = asyncio.create_task(_wait_change(a, base_a))
        wait_c = asyncio.create_task(c.poll_netmap(base_c.version))
        await asyncio.sleep(0.3)  # both are waiting now
        assert not wait_a.done()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "coordinator",
            "-c",
            str(conf),
            "nodes",
            "remove",
            "c",
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        cli_done = time.monotonic()
        assert proc.returncode == 0, err.decode()
        assert b"removed" in out
        netmap, woke = await asyncio.wait_for(wait_a, 3.0)
        latency = woke - cli_done
        sys.stderr.write(f"long-poll woke {latency * 1000:.0f} ms after the CLI exited\n")
        assert latency < 1.0
        assert [p.name for p in netmap.peers] == ["b"]
        with pytest.raises(NotAuthorized) as gone:
            await asyncio.wait_for(wait_c, 3.0)
        assert gone.value.status == 401
        with pytest.raises(NotAuthorized):
            await c.update(disco_key=DiscoPrivate.generate().public(), endpoints=[], home_region=1)
        with pytest.raises(NotAuthorized):
            await c.poll_netmap()
        assert [p.name for p in (await b.poll_netmap()).peers] == ["a"]


async def test_admin_expire_gives_403_and_hides_the_node(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path)) as coord:
        key = coord.key()
        (a, _, _), (b, _, _) = await _join(coord, key, "a"), await _join(coord, key, "b")
        base = await a.poll_netmap()
        node_b = coord.admin.find_node("b")
        coord.admin.expire_node(node_b.id, time.time())
        netmap = await asyncio.wait_for(a.poll_netmap(base.version), 3.0)
        assert netmap.peers == ()
        with pytest.raises(NotAuthorized) as err:
            await b.poll_netmap()
        assert (err.value.status, err.value.code) == (403, "node_expired")


async def test_node_key_expiry_time_passing_reaches_peers(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path, node_key_expiry=1.5)) as coord:
        key = coord.key()
        (a, _, _), _ = await _join(coord, key, "a"), await _join(coord, key, "b")
        base = await a.poll_netmap()
        assert len(base.peers) == 1
        a2 = CoordinatorClient(coord.url, ca_file=coord.ca_file, token=a.token)
        with pytest.raises(NotAuthorized) as err:
            await asyncio.wait_for(a2.poll_netmap(base.version), 4.0)
        assert err.value.code == "node_expired"  # a expired too (both joined with 1.5 s keys)


async def test_restart_keeps_state(database: str, tmp_path: Path) -> None:
    config = _config(database, tmp_path)
    async with running(config) as coord:
        key = coord.key(reusable=False)
        client, priv, disco = await _join(coord, key, "keeper")
        await _join(coord, coord.key(), "other")
        before = await client.poll_netmap()
        server_key = (await client.server_key()).public_key
        port = coord.server.port
    async with running(config, port=port) as coord:
        assert (await client.server_key()).public_key == server_key
        after = await client.poll_netmap()  # the old token still works
        assert after.version == before.version
        assert after.self_node == before.self_node
        assert after.peers == before.peers
        reg = await coord.client().register(node_key=priv, disco_key=disco, hostname="keeper")
        assert reg.node.ipv4 == before.self_node.ipv4
        with pytest.raises(NotAuthorized):  # the one-off key stays used
            await coord.client().register(
                node_key=NodePrivate.generate(), disco_key=disco, hostname="x", auth_key=key
            )


async def test_a_slow_first_connection_does_not_make_the_next_registration_a_replay(
    database: str, tmp_path: Path
) -> None:
    """The register timestamp is the coordinator's clock when it handed out its key plus the
    time since: the connection set-up before that (here 1.5 s) must not count, or a node that
    registers again at once is refused as replayed."""
    async with running(_config(database, tmp_path)) as coord:
        key = coord.key()
        slow = coord.client()
        send = slow._request

        async def slow_request(method: str, path: str, body: bytes = b"", **kw: Any) -> Any:
            if path == "/key":
                await asyncio.sleep(1.5)  # a slow TLS handshake before the server sees it
            return await send(method, path, body, **kw)

        slow._request = slow_request  # type: ignore[method-assign]
        priv = NodePrivate.generate()
        disco = DiscoPrivate.generate().public()
        first = await slow.register(node_key=priv, disco_key=disco, hostname="n", auth_key=key)
        again = await coord.client().register(node_key=priv, disco_key=disco, hostname="n")
        assert again.node.id == first.node.id
