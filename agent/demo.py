"""`agent demo`: a self-contained tour on one machine (root).

Three network namespaces: two agents behind a router that also runs a DERP relay. First the
router drops UDP between them (a firewall), so the agents reach each other through the relay over
TLS; then UDP is allowed again and traffic moves to the direct path by itself. Pings across the
overlay in both directions and `agent status` show each step; everything is removed again at the
end (also on failure or Ctrl-C):

    ns ...-a                  ns ...-r (router)                       ns ...-b
    agent 100.64.0.1          agent derper 198.18.0.10:443 (TLS)      agent 100.64.0.2
    veth 198.18.1.1 --------- 198.18.1.2 | 198.18.2.2 --------------- veth 198.18.2.1
                              nftables: UDP forward dropped, then allowed

This module is I/O at the top layer: it drives `ip`, `ping` and the agent itself as subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.keys import NodePrivate

__all__ = ["run_demo"]

_PKG_PARENT = Path(__file__).resolve().parents[1]
_WG_RUN_DIR = Path("/run/wireguard")
_LISTEN_PORT = 41641
_RELAY_IP = "198.18.0.10"
_REGION = 900
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run(
    *cmd: str, timeout: float = 30.0, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired as e:
        raise DemoError(f"timed out: {' '.join(cmd)}") from e
    if check and res.returncode != 0:
        raise DemoError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM a process we started (by PID), SIGKILL after a grace period; its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@dataclass
class _Node:
    tag: str
    ns: str
    ifname: str
    underlay: str
    overlay4: str
    overlay6: str
    key: NodePrivate
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


class _Demo:
    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"agt-demo-{suffix}-"))
        self.namespaces: list[str] = []
        self.router = f"agt-demo-{suffix}-r"
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_log = self.tmp / "derper.log"
        self.cert_dir = self.tmp / "derper-certs"
        self.nodes = [
            _Node(
                tag=tag,
                ns=f"agt-demo-{suffix}-{tag}",
                ifname=f"demo{suffix}{tag}",
                underlay=f"198.18.{i}.1",
                overlay4=f"100.64.0.{i}",
                overlay6=f"fd7a:115c:a1e0::{i}",
                key=NodePrivate.generate(),
                config=self.tmp / f"{tag}.toml",
                log=self.tmp / f"{tag}.log",
            )
            for i, tag in ((1, "a"), (2, "b"))
        ]

    # -- steps ------------------------------------------------------------------------------

    def run(self) -> int:
        a, b = self.nodes
        _say(f"Creating namespaces {a.ns} and {b.ns} behind a router {self.router}")
        self.build_network()
        _say(f"  {a.tag}: underlay {a.underlay}/24   {b.tag}: underlay {b.underlay}/24")
        _say(f"Starting a DERP relay on the router: agent derper on {_RELAY_IP}:443 (TLS)")
        self.start_relay()
        blocking = shutil.which("nft") is not None
        if blocking:
            _say("The router drops UDP between the two sides (a firewall): no direct path")
            self.block_udp(True)
        else:
            _say("(nft not installed: UDP stays open, so the relay is only the first path)")
        _say("Generating keys and writing configs (peers know each other's key and address)")
        for node, peer in ((a, b), (b, a)):
            self.write_config(node, peer)
            _say(f"  {node.tag}: public key {node.key.public().to_b64()}  overlay {node.overlay4}")
        _say("Starting two agents")
        for node in self.nodes:
            self.start(node)
        for node in self.nodes:
            self.wait_up(node)
            _say(f"  {node.tag}: interface {node.ifname} is up (pid {self.pid(node)})")
        ok = True
        for src, dst in ((a, b), (b, a)):
            _say(f"Pinging {dst.overlay4} ({dst.tag}) from {src.tag} through the tunnel")
            ok = self.ping(src, dst.overlay4) and ok
        _say(f"Path from {a.tag} to {b.tag}: {self.path(a, b)}")
        if blocking:
            _say("The router allows UDP again; the agents move to the direct path by themselves")
            self.block_udp(False)
            path = self.wait_direct(a, b)
            _say(f"Path from {a.tag} to {b.tag}: {path}")
            ok = ok and path.startswith("direct")
        _say(f"Status of {a.tag} (agent status):")
        self.status(a)
        _say("Stopping both agents and the relay")
        for node in self.nodes:
            rc = self.stop(node)
            _say(f"  {node.tag}: exited with status {rc}")
            ok = ok and rc == 0
        _say(f"  relay: exited with status {self.stop_relay()}")
        _say("Done: the overlay works." if ok else "Done, but something failed (see above).")
        return 0 if ok else 1

    def build_network(self) -> None:
        r = self.router
        for ns in (*(n.ns for n in self.nodes), r):
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for i, node in enumerate(self.nodes, start=1):
            gateway = f"198.18.{i}.2"
            dev = f"veth{i}"
            _run(*f"ip link add {dev} netns {node.ns} type veth peer name {dev} netns {r}".split())
            _run("ip", "-n", node.ns, "addr", "add", f"{node.underlay}/24", "dev", dev)
            _run("ip", "-n", r, "addr", "add", f"{gateway}/24", "dev", dev)
            for ns in (node.ns, r):
                _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", node.ns, "route", "add", "default", "via", gateway)
        _run("ip", "-n", r, "addr", "add", f"{_RELAY_IP}/32", "dev", "lo")
        _run("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def start_relay(self) -> None:
        cmd = ["ip", "netns", "exec", self.router, sys.executable, "-m", "agent", "derper"]
        cmd += ["--addr", f"{_RELAY_IP}:443", "--hostname", _RELAY_IP, "--cert-mode"]
        cmd += ["self-signed", "--cert-dir", str(self.cert_dir), "--stun-port", "3478"]
        with self.relay_log.open("wb") as log:
            self.relay = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self._env()
            )
        cert = self.cert_dir / f"{_RELAY_IP}.crt"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.relay.poll() is not None:
                raise DemoError(f"agent derper exited: {self.relay_log.read_text()[-2000:]}")
            listening = _run("ip", "netns", "exec", self.router, "ss", "-Htln", check=False)
            if cert.exists() and f"{_RELAY_IP}:443" in listening.stdout:
                return
            time.sleep(0.1)
        raise DemoError("agent derper did not start listening")

    def block_udp(self, block: bool) -> None:
        ns = self.router
        if block:
            rules = (
                "add table inet agtdemo; "
                "add chain inet agtdemo blockudp { type filter hook forward priority 0; }; "
                "add rule inet agtdemo blockudp meta l4proto udp drop"
            )
            _run("ip", "netns", "exec", ns, "nft", rules)
        else:
            _run("ip", "netns", "exec", ns, "nft", "delete table inet agtdemo")

    def path(self, node: _Node, peer: _Node) -> str:
        cmd = ("ip", "netns", "exec", node.ns, sys.executable, "-m", "agent", "status", "--json")
        res = _run(*cmd, "-c", str(node.config), check=False, env=self._env())
        try:
            st = json.loads(res.stdout)
            (p,) = [p for p in st["peers"] if p["public_key"] == peer.key.public().to_b64()]
        except (ValueError, KeyError):
            return "unknown"
        if p["path"] == "derp":
            return f"derp (region {p['derp_region']}, through the relay)"
        if p["path"] == "direct":
            return f"direct ({p['endpoint']})"
        return str(p["path"])

    def wait_direct(self, node: _Node, peer: _Node) -> str:
        deadline = time.monotonic() + 30
        path = self.path(node, peer)
        while time.monotonic() < deadline and not path.startswith("direct"):
            cmd = f"ip netns exec {node.ns} ping -n -q -c 1 -W 1 {peer.overlay4}".split()
            _run(*cmd, timeout=5, check=False)
            path = self.path(node, peer)
        return path

    def write_config(self, node: _Node, peer: _Node) -> None:
        q = json.dumps  # a JSON string of printable ASCII is a valid TOML string
        text = "\n".join(
            [
                "[interface]",
                f"name = {q(node.ifname)}",
                f"private_key = {q(node.key.to_b64())}",
                f"addresses = [{q(node.overlay4 + '/32')}, {q(node.overlay6 + '/128')}]",
                f"listen_port = {_LISTEN_PORT}",
                f"control_socket = {q(str(self.tmp / (node.tag + '.sock')))}",
                "",
                "[derp]",
                f"home_region = {_REGION}",
                "",
                "[[derp.regions]]",
                f"id = {_REGION}",
                'code = "demo"',
                f"nodes = [{{ host = {q(_RELAY_IP)}, port = 443, "
                f"ca_file = {q(str(self.cert_dir / (_RELAY_IP + '.crt')))} }}]",
                "",
                "[[peers]]",
                f"name = {q(peer.tag)}",
                f"public_key = {q(peer.key.public().to_b64())}",
                f"allowed_ips = [{q(peer.overlay4 + '/32')}, {q(peer.overlay6 + '/128')}]",
                f"endpoint = {q(f'{peer.underlay}:{_LISTEN_PORT}')}",
                f"derp_region = {_REGION}",
                "",
            ]
        )
        node.config.write_text(text)
        node.config.chmod(0o600)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{_PKG_PARENT}{os.pathsep}{old}" if old else str(_PKG_PARENT)
        return env

    def start(self, node: _Node) -> None:
        cmd = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "agent", "up"]
        with node.log.open("wb") as log:
            node.proc = subprocess.Popen(
                [*cmd, "-c", str(node.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env(),
            )

    def pid(self, node: _Node) -> int:
        return node.proc.pid if node.proc is not None else 0

    def log_tail(self, node: _Node, lines: int = 15) -> str:
        try:
            text = node.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def wait_up(self, node: _Node) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if node.proc is None or node.proc.poll() is not None:
                rc = node.proc.returncode if node.proc is not None else None
                raise DemoError(
                    f"agent {node.tag} exited with status {rc} while starting; its log:\n"
                    + self.log_tail(node)
                )
            res = _run("ip", "-n", node.ns, "addr", "show", "dev", node.ifname, check=False)
            if res.returncode == 0 and node.overlay4 in res.stdout:
                return
            time.sleep(0.1)
        raise DemoError(
            f"agent {node.tag} did not bring up {node.ifname} within {_START_TIMEOUT:.0f}s; "
            f"its log:\n{self.log_tail(node)}"
        )

    def ping(self, src: _Node, addr: str) -> bool:
        cmd = f"ip netns exec {src.ns} ping -n -c 3 -i 0.3 -w 10 {addr}".split()
        res = _run(*cmd, timeout=20, check=False)
        for line in res.stdout.splitlines():
            if "bytes from" in line or "packets transmitted" in line or line.startswith("rtt"):
                _say(f"  {line}")
        if res.returncode != 0:
            _say(f"  no answer from {addr}; log of {src.tag}:\n{self.log_tail(src)}")
            return False
        return True

    def status(self, node: _Node) -> None:
        cmd = ("ip", "netns", "exec", node.ns, sys.executable, "-m", "agent", "status")
        res = _run(*cmd, "-c", str(node.config), check=False, env=self._env())
        for line in (res.stdout or res.stderr).splitlines():
            _say(f"  {line}")

    def stop(self, node: _Node) -> int | None:
        return _stop(node.proc)

    def stop_relay(self) -> int | None:
        return _stop(self.relay)

    def cleanup(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.stop(node)
        with contextlib.suppress(Exception):
            self.stop_relay()
        for ns in reversed(self.namespaces):
            _run("ip", "netns", "del", ns, check=False)
        for node in self.nodes:
            with contextlib.suppress(FileNotFoundError):
                (_WG_RUN_DIR / f"{node.ifname}.sock").unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> int:
    """Run the tour; 0 when every ping was answered and both agents stopped cleanly."""
    del args  # no options yet
    if os.geteuid() != 0:
        sys.stderr.write("agent demo needs root (it creates network namespaces): run it as root\n")
        return 1
    missing = [tool for tool in ("ip", "ping") if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(
            f"agent demo needs {', '.join(missing)}: apt-get install iproute2 iputils-ping\n"
        )
        return 1
    demo = _Demo()
    try:
        return demo.run()
    except DemoError as e:
        sys.stderr.write(f"demo failed: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        _say("Removing namespaces and files")
        demo.cleanup()
