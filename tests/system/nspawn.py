"""Booted Debian 12 machines for tests: systemd as PID 1 in `systemd-nspawn`, on one lab bridge.

    base = rootfs()                        # mmdebstrap'd once, then cached (see CACHE)
    with Lab() as lab:                     # a switch namespace with a bridge, 198.18.0.0/15
        r = lab.machine("r", "198.18.0.10", base)   # overlayfs upper layer over the shared base
        r.boot()
        r.sh("systemctl is-active dbus")

How a machine runs, and why:
- Its root is an overlayfs: the cached base read-only below, a fresh upper layer per machine,
  so a machine's changes (an installed package) survive its reboot and vanish with the lab.
- Its network namespace is made here (`ip netns add`) and handed to nspawn with
  `--network-namespace-path=`; a veth pair joins it to the lab bridge. nspawn grants
  CAP_NET_ADMIN only with networking it makes itself, so it is asked for by name.
- `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1` with `--system-call-filter=bpf --capability=CAP_BPF`:
  on a host with hybrid cgroups this lets the inner systemd enforce `DevicePolicy=`,
  `DeviceAllow=` and `IPAddressDeny=` (BPF programs), as on a real machine.
- `--register=no --keep-unit`: the host need not run systemd-machined or systemd. nspawn then
  makes its `payload`/`supervisor` cgroups below its own, so each machine's nspawn is first
  moved into a cgroup of its own (else two machines would share one `payload`).
- Commands run with `nsenter -t <PID 1> -a` (the machine's namespaces, a clean environment);
  `Machine.host_net()` keeps the host's network for apt.
- No udev: a tmpfiles rule in the base gives /dev/net/tun mode 0666, as udev does on Debian.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["CACHE", "Lab", "Machine", "NspawnUnavailable", "rootfs", "unavailable_reason"]

CACHE: Final = Path(os.environ.get("AGENT_TEST_CACHE", "/var/cache/agent-tests"))
SUITE: Final = "bookworm"
PACKAGES: Final = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "iproute2",
    "python3",
    "iputils-ping",
    "systemd-resolved",  # split DNS for the overlay's names (the agent's link)
    "polkitd",  # resolved asks polkit whether the agent's user may set DNS
)
TUN_RULE: Final = "z /dev/net/tun 0666 root root -\n"
LAB_PREFIX: Final = 15  # 198.18.0.0/15
ENV: Final = (
    "env",
    "-i",
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "SYSTEMD_PAGER=",
    "SYSTEMD_COLORS=0",
    "DEBIAN_FRONTEND=noninteractive",
)
CGROUP_ROOTS: Final = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))


class NspawnUnavailable(Exception):
    """This host cannot boot a machine; the message says why."""


def unavailable_reason() -> str | None:
    """Why booted machines cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to boot systemd-nspawn machines"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install systemd-container mmdebstrap)"
    if not Path("/sys/fs/cgroup/unified/cgroup.procs").exists() and not Path(
        "/sys/fs/cgroup/cgroup.procs"
    ).exists():
        return "no cgroup v2 hierarchy for systemd inside the machine"
    return None


def _run(
    cmd: Sequence[str], *, timeout: float = 120, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=check, input=stdin
    )


# -- the base root file system ------------------------------------------------------------------


def _apt_sources() -> list[str]:
    """The host's own apt sources, handed to mmdebstrap as its mirrors."""
    found = [Path("/etc/apt/sources.list")]
    found += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    found += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    return [str(p) for p in found if p.is_file() and p.stat().st_size > 0]


def rootfs() -> Path:
    """The cached base: `CACHE/rootfs-bookworm-<hash of what it holds>`, built when missing.

    About 25 s to build (mmdebstrap from the host's Debian mirror). A lock file serialises
    concurrent builders; a half-built tree never gets the final name.
    """
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} {TUN_RULE}".encode()).hexdigest()[:12]
    dest = CACHE / f"rootfs-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "lib/systemd/systemd").exists():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        res = _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(tmp),
                *_apt_sources(),
            ],
            timeout=600,
            check=False,
        )
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise NspawnUnavailable(f"mmdebstrap failed: {res.stderr.strip()[-2000:]}")
        (tmp / "etc/tmpfiles.d/tun.conf").write_text(TUN_RULE)
        (tmp / "etc/hostname").unlink(missing_ok=True)
        tmp.rename(dest)
    return dest


# -- the lab network ------------------------------------------------------------------------------


class Lab:
    """A switch namespace with bridge `br0`; machines join it. Everything is removed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.suffix = secrets.token_hex(3)
        self.switch = f"sys-sw-{self.suffix}"
        self.workdir = workdir
        self.machines: list[Machine] = []

    def __enter__(self) -> Lab:
        _run(["ip", "netns", "add", self.switch])
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        return self

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.machines):
            with contextlib.suppress(Exception):
                m.destroy()
        with contextlib.suppress(subprocess.SubprocessError):
            _run(["ip", "netns", "del", self.switch], check=False)

    def machine(self, name: str, address: str, base: Path) -> Machine:
        """A machine (not booted yet) at `address` on the bridge, hostname `name`."""
        netns = f"sys-{name}-{self.suffix}"
        m = Machine(name, base, self.workdir / name, netns)
        self.machines.append(m)
        _run(["ip", "netns", "add", netns])
        peer = f"v{name}{self.suffix}"[:15]
        _run(["ip", "link", "add", peer, "netns", self.switch, "type", "veth", "peer", "eth0",
              "netns", netns])  # fmt: skip
        _run(["ip", "-n", self.switch, "link", "set", peer, "master", "br0", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/{LAB_PREFIX}", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        return m


# -- one machine ----------------------------------------------------------------------------------


class Machine:
    def __init__(self, name: str, base: Path, workdir: Path, netns: str) -> None:
        self.name = name
        self.base = base
        self.workdir = workdir
        self.netns = netns
        self.root = workdir / "root"
        self.log = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boots = 0
        self._cgroups = [r / f"agent-test-{netns}" for r in CGROUP_ROOTS if r.is_dir()]

    # -- life cycle

    def _mount(self) -> None:
        if os.path.ismount(self.root):
            return
        for d in ("upper", "work", "root"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        w = self.workdir
        opts = f"lowerdir={self.base},upperdir={w / 'upper'},workdir={w / 'work'}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)])
        (self.root / "etc/hostname").write_text(self.name + "\n")

    def _enter_cgroup(self) -> None:
        # Runs in the child between fork and exec: nspawn's cgroups go below this one.
        pid = str(os.getpid())
        for cg in self._cgroups:
            (cg / "cgroup.procs").write_text(pid)

    def boot(self, timeout: float = 60) -> None:
        """Start the machine and wait until systemd says the system is running."""
        self._mount()
        for cg in self._cgroups:
            cg.mkdir(exist_ok=True)
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        self.boots += 1
        with open(self.log, "ab") as log:
            log.write(f"\n=== boot {self.boots}\n".encode())
            log.flush()
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    f"--network-namespace-path=/run/netns/{self.netns}",
                    "--register=no",
                    "--keep-unit",
                    "--console=pipe",
                    "--system-call-filter=bpf",
                    "--capability=CAP_BPF,CAP_NET_ADMIN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=self._enter_cgroup,
            )
        deadline = time.monotonic() + timeout
        self.pid1 = 0
        while not self.pid1:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise NspawnUnavailable(f"{self.name} did not boot:\n{self.console()}")
            res = _run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"], check=False)
            if res.stdout.strip():
                self.pid1 = int(res.stdout.split()[0])
            else:
                time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            res = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)  # before dbus is up: "Failed to connect to bus"
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise NspawnUnavailable(f"{self.name} booted {state or 'nowhere'}: {failed}")

    def wait_stopped(self, timeout: float = 60) -> int:
        assert self.nspawn is not None
        rc = self.nspawn.wait(timeout=timeout)
        self.nspawn = None
        self.pid1 = 0
        return rc

    def reboot(self) -> None:
        """`systemctl reboot` inside; nspawn exits, the machine boots again on the same disk."""
        self.run("systemctl", "reboot", check=False)
        self.wait_stopped()
        self.boot()

    def destroy(self) -> None:
        """Power off (killed after 30 s), unmount, remove the namespace and cgroups."""
        if self.nspawn is not None:
            if self.pid1:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                self.wait_stopped(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.send_signal(signal.SIGKILL)
                self.wait_stopped(timeout=10)
        with contextlib.suppress(subprocess.SubprocessError):
            _run(["umount", str(self.root)], check=False)
        with contextlib.suppress(subprocess.SubprocessError):
            _run(["ip", "netns", "del", self.netns], check=False)
        for cg in self._cgroups:
            for d in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- commands

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`cmd` inside the machine (its namespaces and root), as root, clean environment."""
        assert self.pid1, f"{self.name} is not running"
        res = _run(
            ["nsenter", "-t", str(self.pid1), "-a", *ENV, *cmd],
            timeout=timeout,
            check=False,
            stdin=stdin,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(cmd)} exited {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> str:
        """A bash script inside (errexit, pipefail); its stdout."""
        return self.run(
            "bash", "-euo", "pipefail", "-c", script, check=check, timeout=timeout
        ).stdout

    def host_net(
        self, *cmd: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:  # pragma: no cover - apt from the network
        """`cmd` with the machine's files and PID 1 but the host's network (for apt)."""
        return _run(
            ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-p", "-C", *ENV, *cmd],
            timeout=timeout,
        )

    def path(self, inside: str) -> Path:
        """A path inside the machine, as seen from the host."""
        return self.root / inside.lstrip("/")

    def journal(self, unit: str) -> str:
        return self.run(
            "journalctl", "-b", "-u", unit, "--no-pager", "-o", "cat", check=False
        ).stdout

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, pid1={self.pid1})"
