"""`agent demo`: a self-contained tour on one machine (root).

Two network namespaces joined by a veth pair, one agent in each, pings across the overlay in both
directions, the status of one side, then everything is removed again (also on failure or Ctrl-C):

    ns agt-demo-<hex>-a                          ns agt-demo-<hex>-b
    agent 100.64.0.1  <-- WireGuard/UDP -->  agent 100.64.0.2
    veth0 198.18.0.1/24 --------------------- veth0 198.18.0.2/24

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
        self.nodes = [
            _Node(
                tag=tag,
                ns=f"agt-demo-{suffix}-{tag}",
                ifname=f"demo{suffix}{tag}",
                underlay=f"198.18.0.{i}",
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
        _say(f"Creating namespaces {a.ns} and {b.ns}, joined by a veth pair")
        self.build_network()
        _say(f"  {a.tag}: underlay {a.underlay}/24   {b.tag}: underlay {b.underlay}/24")
        _say("Generating keys and writing configs")
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
        _say(f"Status of {a.tag} (agent status):")
        self.status(a)
        _say("Stopping both agents")
        for node in self.nodes:
            rc = self.stop(node)
            _say(f"  {node.tag}: exited with status {rc}")
            ok = ok and rc == 0
        _say("Done: the overlay works." if ok else "Done, but something failed (see above).")
        return 0 if ok else 1

    def build_network(self) -> None:
        a, b = self.nodes
        for node in self.nodes:
            _run("ip", "netns", "add", node.ns)
            self.namespaces.append(node.ns)
            _run("ip", "-n", node.ns, "link", "set", "lo", "up")
        _run(
            *f"ip link add veth0 netns {a.ns} type veth peer name veth0 netns {b.ns}".split(),
        )
        for node in self.nodes:
            _run("ip", "-n", node.ns, "addr", "add", f"{node.underlay}/24", "dev", "veth0")
            _run("ip", "-n", node.ns, "link", "set", "veth0", "up")

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
                "[[peers]]",
                f"name = {q(peer.tag)}",
                f"public_key = {q(peer.key.public().to_b64())}",
                f"allowed_ips = [{q(peer.overlay4 + '/32')}, {q(peer.overlay6 + '/128')}]",
                f"endpoint = {q(f'{peer.underlay}:{_LISTEN_PORT}')}",
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
            if "bytes from" in line or line.startswith(("rtt", "3 packets")):
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
        proc = node.proc
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

    def cleanup(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.stop(node)
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
