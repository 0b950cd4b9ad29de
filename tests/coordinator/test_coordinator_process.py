"""`agent coordinator -c FILE` as the systemd unit runs it: a process on loopback, managed by the
admin CLI, stopped by SIGTERM and restarted without losing anything."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.keys import DiscoPrivate, NodePrivate
from agent.node.coordinator_client import CoordinatorClient, CoordinatorUnavailable, NotAuthorized

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "coordinator", "-c", str(conf), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Coordinator:
    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "coordinator", "-c", str(self.conf)],
            cwd=REPO,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err.decode()


async def _connect(
    url: str, ca: str, coord: Coordinator, token: str | None = None
) -> CoordinatorClient:
    """A client once the coordinator answers (its self-signed certificate is made at start)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            client = CoordinatorClient(url, ca_file=ca, token=token)
            await client.server_key()
            return client
        except (ValueError, CoordinatorUnavailable):
            assert coord.proc is not None
            assert coord.proc.poll() is None, "the coordinator exited early"
            assert time.monotonic() < deadline, "the coordinator did not start"
            await asyncio.sleep(0.1)


def test_coordinator_process_cli_and_restart(tmp_path: Path) -> None:
    port = _free_port()
    conf = tmp_path / "coordinator.conf"
    conf.write_text(
        f"""
[coordinator]
listen = "127.0.0.1:{port}"
hostname = "127.0.0.1"
database = "state/coordinator.db"
[tls]
cert_dir = "certs"
[[derp.regions]]
id = 900
code = "lab"
nodes = [{{ host = "127.0.0.1", port = 8443 }}]
"""
    )
    key = _cli(conf, "keys", "create", "--reusable", "--expiry", "1h")
    assert key.returncode == 0, key.stderr
    auth_key = key.stdout.strip()
    coord = Coordinator(conf)
    coord.start()
    try:
        tokens = asyncio.run(_first_run(tmp_path, port, auth_key, coord))
        rc, log = coord.stop()
        assert rc == 0, log
        assert "coordinator up" in log
        listed = _cli(conf, "nodes", "--json")
        assert listed.returncode == 0, listed.stderr
        nodes = json.loads(listed.stdout)
        assert [n["name"] for n in nodes] == ["one", "two"]
        assert nodes[0]["addresses"] == ["100.64.0.1", "fd7a:115c:a1e0::1"]
        assert nodes[1]["endpoints"] == ["198.18.0.2:41641"]
        keys = _cli(conf, "keys", "list")
        assert "agentkey-" in keys.stdout
        assert auth_key not in keys.stdout  # the secret is never shown again
        coord.start()
        asyncio.run(_second_run(tmp_path, port, conf, coord, tokens))
    finally:
        if coord.proc is not None and coord.proc.poll() is None:
            coord.stop()


async def _first_run(
    tmp_path: Path, port: int, auth_key: str, coord: Coordinator
) -> dict[str, str]:
    ca = str(tmp_path / "certs" / "127.0.0.1.crt")
    one = await _connect(f"https://127.0.0.1:{port}", ca, coord)
    two = CoordinatorClient(f"https://127.0.0.1:{port}", ca_file=ca)
    disco = DiscoPrivate.generate().public()
    await one.register(
        node_key=NodePrivate.generate(), disco_key=disco, hostname="one", auth_key=auth_key
    )
    await two.register(
        node_key=NodePrivate.generate(),
        disco_key=disco,
        hostname="two",
        auth_key=auth_key,
        endpoints=[("198.18.0.2", 41641)],
        home_region=900,
    )
    netmap = await one.poll_netmap()
    assert [p.name for p in netmap.peers] == ["two"]
    assert netmap.derp.regions[0].id == 900
    assert one.token is not None
    assert two.token is not None
    return {"one": one.token, "two": two.token, "version": str(netmap.version)}


async def _second_run(
    tmp_path: Path, port: int, conf: Path, coord: Coordinator, tokens: dict[str, str]
) -> None:
    ca = str(tmp_path / "certs" / "127.0.0.1.crt")
    one = await _connect(f"https://127.0.0.1:{port}", ca, coord, tokens["one"])
    two = CoordinatorClient(f"https://127.0.0.1:{port}", ca_file=ca, token=tokens["two"])
    netmap = await one.poll_netmap()
    assert netmap.version == int(tokens["version"])
    assert [p.name for p in netmap.peers] == ["two"]
    waiting = asyncio.create_task(one.poll_netmap(netmap.version))
    removed = await asyncio.to_thread(_cli, conf, "nodes", "remove", "two")
    assert removed.returncode == 0, removed.stderr
    after = await asyncio.wait_for(waiting, 5)
    assert after.peers == ()
    with pytest.raises(NotAuthorized):
        await two.poll_netmap()
    missing = await asyncio.to_thread(_cli, conf, "nodes", "remove", "two")
    assert missing.returncode == 1
    assert "no node 'two'" in missing.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "coordinator.conf"
    conf.write_text('[coordinator]\nnode_key_expiry = "forever"\n')
    res = _cli(conf, "nodes")
    assert res.returncode == 1
    assert "coordinator.node_key_expiry: 'forever' is not a duration" in res.stderr
    res = _cli(tmp_path / "missing.conf", "serve")
    assert res.returncode == 1
    assert "cannot read the config" in res.stderr
