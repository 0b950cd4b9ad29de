"""The package on real systemd: README's "Install as a service" walkthrough, then its promises.

Three booted Debian 12 machines (systemd as PID 1, tests/system/nspawn.py) on one lab bridge:
r (198.18.0.10) runs the relay and the coordinator, a and b are nodes. The .deb is built from
this tree by packaging/build-deb.sh (beside the base root file system, which is cached).

The walkthrough is not retold here: its shell blocks are read from README.md, each marked with
the machines it runs on (`<!-- walkthrough: r a b -->`), and run in order, as a user would.
Then: every unit's exposure on the live system, JSON in the journal, a restart and a reboot of b
keeping its addresses and the tunnel, and `apt purge` leaving nothing behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.system.nspawn import Lab, Machine, NspawnUnavailable, rootfs

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH = re.compile(r"<!-- walkthrough: ([a-z ]+) -->\s*```sh\n(.*?)```", re.S)
ADDRESSES = {"r": "198.18.0.10", "a": "198.18.0.11", "b": "198.18.0.12"}
# What the walkthrough's prose asks the reader to copy from r to the nodes.
COPIED_FROM_R = ("/root/auth.key", "/root/lab-ca.pem")
MAX_EXPOSURE = 2.0
B_V4, B_V6 = "100.64.0.2", "fd7a:115c:a1e0::2"


@dataclass(frozen=True)
class Step:
    machines: tuple[str, ...]
    script: str


def walkthrough() -> list[Step]:
    steps = [
        Step(tuple(m.group(1).split()), m.group(2))
        for m in WALKTHROUGH.finditer((REPO / "README.md").read_text())
    ]
    assert steps, "README.md has no walkthrough blocks"
    return steps


def _build_deb(out: Path) -> Path:
    res = subprocess.run(
        ["bash", str(REPO / "packaging/build-deb.sh")],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "AGENT_DEB_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (deb,) = out.glob("agent_*.deb")
    return deb


@dataclass
class Cluster:
    machines: dict[str, Machine]
    timings: dict[str, float]

    def __getitem__(self, name: str) -> Machine:
        return self.machines[name]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agent-system-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(2) as pool:
            base_f = pool.submit(rootfs)
            deb_f = pool.submit(_build_deb, work / "dist")
            try:
                base = base_f.result()
            except NspawnUnavailable as e:
                pytest.fail(str(e))
            deb = deb_f.result()
        timings["deb and rootfs"] = time.monotonic() - t0
        with Lab(work / "machines") as lab:
            machines = {n: lab.machine(n, a, base) for n, a in ADDRESSES.items()}
            t = time.monotonic()
            for m in machines.values():
                m.boot()
                (m.path("/root/agent.deb")).write_bytes(deb.read_bytes())
            timings["boot 3 machines"] = time.monotonic() - t
            t = time.monotonic()
            for i, step in enumerate(walkthrough()):
                for name in step.machines:
                    res = machines[name].run(
                        "bash", "-euxo", "pipefail", "-c", step.script, check=False, timeout=180
                    )
                    assert res.returncode == 0, (
                        f"walkthrough block {i + 1} on {name} exited {res.returncode}\n"
                        f"{step.script}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                        f"agent journal:\n{machines[name].journal('agent')[-3000:]}"
                    )
                _copy_from_r(machines)
            timings["walkthrough"] = time.monotonic() - t
            yield Cluster(machines, timings)
    timings["total"] = time.monotonic() - t0
    print("system test timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def _copy_from_r(machines: dict[str, Machine]) -> None:
    r = machines["r"]
    for path in COPIED_FROM_R:
        src = r.path(path)
        if src.exists():
            for name in ("a", "b"):
                dst = machines[name].path(path)
                dst.write_bytes(src.read_bytes())
                dst.chmod(0o600)


def _status(m: Machine) -> dict[str, object]:
    out = m.run("agent", "status", "--json").stdout
    result: dict[str, object] = json.loads(out)
    return result


def _addresses(m: Machine) -> list[str]:
    """The agent's overlay addresses, without prefix lengths."""
    addresses = _status(m)["addresses"]
    assert isinstance(addresses, list)
    return [str(a).partition("/")[0] for a in addresses]


def _ping_until(m: Machine, address: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        res = m.run("ping", "-c", "1", "-W", "1", address, check=False)
        if res.returncode == 0:
            return
        last = res.stdout + res.stderr
    raise AssertionError(f"{m.name} cannot ping {address} within {timeout}s: {last}")


# -- the walkthrough's own result ---------------------------------------------------------------


def test_the_package_runs_the_compiled_data_plane(cluster: Cluster) -> None:
    """The .deb built agent._fastpath against Debian's libssl3 and the hardened unit loads it."""
    for name in ("a", "b"):
        dataplane = _status(cluster[name])["dataplane"]
        assert isinstance(dataplane, dict)
        assert (dataplane["impl"], dataplane["impl_reason"]) == ("native", ""), dataplane


def test_the_lanes_thread_carries_pings_under_the_hardened_unit(cluster: Cluster) -> None:
    """The compiled lanes' own thread (eventfd, ppoll, a thread under the unit's system-call
    filter) starts in the packaged daemon and carries a known peer's pings on both nodes."""
    a = cluster["a"]
    _ping_until(a, B_V4)
    a.run("ping", "-c", "5", "-i", "0.2", "-W", "1", B_V4)
    for name in ("a", "b"):
        dataplane = _status(cluster[name])["dataplane"]
        assert isinstance(dataplane, dict)
        assert dataplane["pump_batches"] > 0, dataplane
        assert dataplane["lane_tx_packets"] > 0, dataplane
        assert dataplane["lane_rx_packets"] > 0, dataplane


def test_walkthrough_joins_both_nodes(cluster: Cluster) -> None:
    assert _addresses(cluster["a"]) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert _addresses(cluster["b"]) == [B_V4, B_V6]
    assert _status(cluster["a"])["name"] == "a"
    out = (
        cluster["a"]
        .run(
            "agent",
            "join",
            "https://198.18.0.10:8443",
            "--auth-key",
            "file:/root/auth.key",
            "--ca-file",
            "/etc/agent/lab-ca.pem",
        )
        .stdout
    )
    assert out == "joined as a, 100.64.0.1, fd7a:115c:a1e0::1\n", out  # joining again: same
    nodes = cluster["r"].run("agent", "coordinator", "nodes", "--json").stdout
    assert sorted(n["name"] for n in json.loads(nodes)) == ["a", "b"]


def test_every_unit_scores_at_most_2(cluster: Cluster) -> None:
    units = {
        "r": ("agent-derper.service", "agent-coordinator.service"),
        "a": ("agent.service", "agent@wg1.service"),
    }
    for name, names in units.items():
        for unit in names:
            out = cluster[name].run("systemd-analyze", "security", "--no-pager", unit).stdout
            m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
            assert m is not None, out
            assert float(m.group(1)) <= MAX_EXPOSURE, f"{unit}: {m.group(0)}"


def test_services_run_as_their_users(cluster: Cluster) -> None:
    for name, unit, user in (
        ("a", "agent.service", "agent"),
        ("r", "agent-derper.service", "agent-derper"),
        ("r", "agent-coordinator.service", "agent-coordinator"),
    ):
        m = cluster[name]
        pid = m.run("systemctl", "show", "-P", "MainPID", unit).stdout.strip()
        assert pid not in ("", "0"), f"{unit} is not running"
        owner = m.run("ps", "-o", "user=", "-p", pid, check=False).stdout.strip()
        if owner:  # procps is not in the minimal base; systemd's view is enough then
            assert owner == user
        assert m.run("systemctl", "show", "-P", "User", unit).stdout.strip() == user


def test_journal_holds_json_lines(cluster: Cluster) -> None:
    out = (
        cluster["a"]
        .run("journalctl", "-b", "_SYSTEMD_UNIT=agent.service", "-o", "json", "--no-pager")
        .stdout
    )
    lines = [
        json.loads(e)["MESSAGE"]
        for e in out.splitlines()
        if json.loads(e).get("SYSLOG_IDENTIFIER") == "agent"
    ]
    assert lines, out[-2000:]
    for line in lines:
        event = json.loads(line)
        assert {"event", "level", "timestamp"} <= event.keys(), line
    assert any(json.loads(line)["event"] == "joined" for line in lines)


def test_names_resolve_through_systemd_resolved(cluster: Cluster) -> None:
    """The agent (user `agent`, allowed by the package's polkit rule) gives resolved the
    overlay's domain on its link; names resolve (over UDP and TCP) and bare names work;
    stopping the agent takes the domain away again."""
    a = cluster["a"]
    out = a.run("resolvectl", "query", "b.mesh.internal").stdout
    assert B_V4 in out, out
    assert B_V6 in out, out
    assert "b.mesh.internal" in a.run("getent", "ahosts", "b").stdout  # the search domain
    # over TCP too (what resolvers fall back to for truncated answers), from the agent's own
    # Python: a kernel TCP socket to 100.100.100.100, answered by the unit's userspace TCP
    ask_tcp = (
        "import dns.message, dns.query; "
        "m = dns.query.tcp(dns.message.make_query('b.mesh.internal', 'A'), '{}', timeout=5); "
        "print(*sorted(rd.to_text() for rrset in m.answer for rd in rrset))"
    )
    for server in ("100.100.100.100", "fd7a:115c:a1e0::53"):
        out = a.run("/usr/lib/agent/bin/python", "-c", ask_tcp.format(server)).stdout
        assert out.split() == [B_V4], (server, out)
    _ping_until(a, "b")
    status = a.run("resolvectl", "status", "agent0").stdout
    assert "mesh.internal" in status
    assert "100.100.100.100" in status
    dns = _status(a)["dns"]
    assert isinstance(dns, dict)
    assert dns["resolved"] == "applied", dns
    a.run("systemctl", "stop", "agent")
    assert "mesh.internal" not in a.run("resolvectl", "status", check=False).stdout
    assert a.run("resolvectl", "query", "b.mesh.internal", check=False).returncode != 0
    a.run("systemctl", "start", "agent")
    _ping_until(a, B_V4)


def test_restart_keeps_addresses(cluster: Cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    before = _addresses(b)
    b.run("systemctl", "restart", "agent")
    assert _addresses(b) == before == [B_V4, B_V6]
    _ping_until(a, B_V4)
    _ping_until(a, B_V6)


def test_reboot_brings_the_agent_back(cluster: Cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    t = time.monotonic()
    b.reboot()
    assert b.run("systemctl", "is-active", "agent", check=False).stdout.strip() == "active", (
        b.journal("agent")
    )
    assert _addresses(b) == [B_V4, B_V6]
    _ping_until(a, B_V4)
    _ping_until(b, "100.64.0.1")
    cluster.timings["reboot b until ping"] = time.monotonic() - t


def test_purge_leaves_nothing(cluster: Cluster) -> None:
    a = cluster["a"]
    a.run("apt-get", "purge", "-y", "agent", timeout=180)
    assert a.run("ip", "link", "show", "agent0", check=False).returncode != 0
    for path in ("/etc/agent", "/var/lib/agent", "/usr/lib/agent", "/usr/bin/agent"):
        assert not a.path(path).exists(), path
    assert a.run("systemctl", "is-active", "agent", check=False).stdout.strip() != "active"
