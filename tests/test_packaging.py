"""The systemd units and the .deb: `systemd-analyze verify`, the exposure score, a real install.

Without root: every unit passes `systemd-analyze verify` and scores at most 2.0 with
`systemd-analyze security --offline=true` (both work without systemd running).

With root (`netns`): packaging/build-deb.sh builds the package, `dpkg -i` installs it, the
installed `agent` runs, and the services run the way their units say. systemd is not PID 1 on the
CI machine, so a unit's sandbox is rebuilt around its ExecStartPre/ExecStart lines: its user and
capabilities (setpriv), its seccomp policy (SystemCallFilter, MemoryDenyWriteExecute,
RestrictAddressFamilies, through Debian's python3-seccomp), its UMask, its directories, a network
namespace, and a notify socket for Type=notify. Mount namespacing (ProtectSystem, ...) is not
rebuilt. Then `dpkg -r` with the agent running, `dpkg -P`: no process, interface or file remains.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
UNIT_NAMES = [
    "agent.service",
    "agent@.service",
    "agent-derper.service",
    "agent-coordinator.service",
]
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt-get install systemd)",
)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _directives(text: str, key: str) -> list[str]:
    """The values of `key=` in a unit, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{re.escape(key)}=(.*)$", text, re.M)]


# -- the unit files -------------------------------------------------------------------------------


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in before installing
    stub = tmp_path / "agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    names = []
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text().replace("/usr/bin/agent", str(stub))
        name = name.replace("@.", "@wg1.")  # a template is verified through an instance
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    res = _analyze("verify", *names)
    assert res.returncode == 0, res.stderr
    assert res.stdout + res.stderr == ""  # verify exits 0 even on unknown keys: no warning at all


@needs_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_exposure_at_most_2(name: str) -> None:
    res = _analyze("security", "--offline=true", str(UNITS / name))
    assert res.returncode == 0, res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m is not None, res.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_agent_service_is_the_template_for_agent_conf() -> None:
    def body(text: str) -> str:
        text = text.split("[Unit]", 1)[1]  # the header comments differ
        return "\n".join(
            line
            for line in text.splitlines()
            if not line.startswith(("Description=", "Conflicts="))
        )

    single = body((UNITS / "agent.service").read_text())
    template = body((UNITS / "agent@.service").read_text())
    assert single == template.replace("%i.", "agent.")


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_privileges(name: str) -> None:
    text = (UNITS / name).read_text()
    caps = {
        "agent.service": "CAP_NET_ADMIN",
        "agent@.service": "CAP_NET_ADMIN",
        "agent-derper.service": "CAP_NET_BIND_SERVICE",
        "agent-coordinator.service": "",
    }[name]
    assert _directives(text, "CapabilityBoundingSet") == [caps]
    assert _directives(text, "AmbientCapabilities") == [caps]
    assert _directives(text, "User") == [name.split("@")[0].removesuffix(".service")]
    assert _directives(text, "NoNewPrivileges") == ["yes"]
    assert _directives(text, "MemoryDenyWriteExecute") == ["yes"]
    assert _directives(text, "UMask") == ["0077"]


# -- the package, installed (root) ----------------------------------------------------------------

_SANDBOX = r'''
"""Apply a unit's seccomp policy and umask, then exec: sandbox.py FAMILIES UMASK PROGRAM ARGS..."""
import errno, os, socket, subprocess, sys
import seccomp

out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                     check=True).stdout
groups, cur = {}, None
for line in out.splitlines():
    s = line.strip()
    if not s or s.startswith("#"):
        continue
    if line.startswith("@"):
        cur = groups.setdefault(s, [])
    elif cur is not None:
        cur.append(s)

def expand(name):
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(x) for x in groups[name]))

# MemoryDenyWriteExecute and RestrictAddressFamilies (first: the allow-list forbids seccomp())
W, X, SHM_EXEC = 0x2, 0x4, 0o100000
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "shmat",
           seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
families = {int(getattr(socket, a)) for a in sys.argv[1].split()}
for fam in range(64):
    if fam not in families:
        f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
f.load()
# SystemCallFilter=@system-service, then ~@privileged @resources; SystemCallErrorNumber=EPERM
allowed = expand("@system-service") - expand("@privileged") - expand("@resources")
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in sorted(allowed):
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        pass  # not a syscall of this architecture
f.load()
os.umask(int(sys.argv[2], 8))
os.execv(sys.argv[3], sys.argv[3:])
'''

PKG_PATHS = [
    "/usr/bin/agent",
    "/usr/lib/agent",
    "/etc/agent",
    "/var/lib/agent",
    "/var/lib/agent-derper",
    "/var/lib/agent-coordinator",
    "/run/agent",
    "/lib/systemd/system/agent.service",
    "/lib/systemd/system/agent@.service",
    "/lib/systemd/system/agent-derper.service",
    "/lib/systemd/system/agent-coordinator.service",
    "/usr/lib/sysusers.d/agent.conf",
    "/usr/share/doc/agent",
]
VENV_PYTHON = "/usr/lib/agent/bin/python"


def _run(
    *cmd: str, timeout: float = 120, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, input=stdin, env=env
    )


def _installed() -> bool:
    res = _run("dpkg-query", "-W", "-f=${Status}", "agent")
    return res.returncode == 0 and "installed" in res.stdout


def _our_pids() -> list[int]:
    """Processes of the package's interpreter (what prerm stops)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            first = (d / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if first == VENV_PYTHON.encode():
            pids.append(int(d.name))
    return pids


def _link_exists(netns: str, name: str) -> bool:
    return _run("ip", "-n", netns, "link", "show", name).returncode == 0


class Installed:
    """The installed package and a unit launcher that rebuilds the unit's sandbox."""

    def __init__(self, tmp: Path, netns: str) -> None:
        self.tmp = tmp
        self.netns = netns
        self.sandbox = tmp / "sandbox.py"
        self.sandbox.write_text(_SANDBOX)
        # udev makes /dev/net/tun 0666 on a systemd machine; this machine has no udev
        self.tun = tmp / "tun"
        os.mknod(self.tun, 0o666 | 0o020000, os.makedev(10, 200))
        self.tun.chmod(0o666)
        self.wgdir = tmp / "wireguard"  # stands for /run/wireguard, which the host uses too
        self.wgdir.mkdir(mode=0o755)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, unit: str, command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """The unit's main process; its output goes to a log file in the temporary directory."""
        with (self.tmp / f"{unit}.log").open("wb") as log:
            proc = subprocess.Popen(
                self.sandboxed(unit, f"exec {command}", env), stdout=log, stderr=log
            )
        self.procs.append(proc)
        return proc

    def log(self, unit: str) -> str:
        return (self.tmp / f"{unit}.log").read_text(errors="replace")

    def unit(self, name: str) -> str:
        return Path("/lib/systemd/system", name).read_text()

    def sandboxed(self, unit: str, command: str, env: dict[str, str]) -> list[str]:
        """argv running `command` as the unit would; a "+" command runs as root, unconfined."""
        if command.startswith("+"):
            return self._in_mount_ns(["/bin/sh", "-c", command[1:]])
        text = self.unit(unit)
        (user,) = _directives(text, "User")
        (caps,) = _directives(text, "AmbientCapabilities")
        (families,) = _directives(text, "RestrictAddressFamilies")
        (umask,) = _directives(text, "UMask")
        capset = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps.split()])
        argv = [
            "ip", "netns", "exec", self.netns,
            "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            f"--inh-caps={capset}", f"--ambient-caps={capset}", f"--bounding-set={capset}",
            "--no-new-privs",
            "/usr/bin/python3", str(self.sandbox), families, umask,
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
            "/bin/sh", "-c", command,
        ]  # fmt: skip
        return self._in_mount_ns(argv)

    def _in_mount_ns(self, argv: list[str]) -> list[str]:
        mounts = (
            f"mount --bind {self.tun} /dev/net/tun && "
            f"mount --bind {self.wgdir} /run/wireguard && exec {shlex.join(argv)}"
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts]

    def state_dir(self, name: str, user: str) -> str:
        """StateDirectory=: created by systemd, owned by the unit's user, mode 0700."""
        path = Path("/var/lib", name)
        path.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(path, user, user)
        return str(path)

    def exec_lines(self, unit: str, key: str, env: dict[str, str]) -> list[str]:
        out = []
        for line in _directives(self.unit(unit), key):
            line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
            out.append(line.replace("$$", "$").replace("%H", socket.gethostname()))
        return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.skip("needs root to install a package")
    for tool in ("dpkg-deb", "dpkg-shlibdeps", "setpriv", "unshare", "ip", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing")
    if _run("/usr/bin/python3", "-c", "import seccomp").returncode != 0:
        pytest.skip("Debian's python3-seccomp is missing (apt-get install python3-seccomp)")
    if _installed() or any(os.path.lexists(p) for p in PKG_PATHS):
        pytest.skip("an agent package or its files are already on this machine: not touching them")
    # not under pytest's 0700 base directory: the services' users read the sandbox script and
    # write the notify socket in here
    tmp = Path(tempfile.mkdtemp(prefix="agent-pkgtest."))
    tmp.chmod(0o755)
    netns = f"agentpkg{os.getpid()}"
    made_wg_run = not os.path.lexists("/run/wireguard")
    inst: Installed | None = None
    try:
        t0 = time.monotonic()
        env = {**os.environ, "AGENT_DEB_OUT": str(tmp)}
        res = _run("bash", str(REPO / "packaging/build-deb.sh"), timeout=600, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        print(f"build-deb.sh: {time.monotonic() - t0:.0f} s")
        (deb,) = tmp.glob("agent_*.deb")
        res = _run("dpkg", "-i", str(deb))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _run("ip", "netns", "add", netns, timeout=10).returncode == 0
        if made_wg_run:
            os.mkdir("/run/wireguard", 0o755)  # a mount point for the stand-in
        inst = Installed(tmp, netns)
        yield inst
    finally:
        for proc in inst.procs if inst is not None else []:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if _installed() or os.path.lexists("/usr/lib/agent"):
            _run("dpkg", "-P", "agent")
        _run("ip", "netns", "del", netns, timeout=10)
        if made_wg_run:
            shutil.rmtree("/run/wireguard", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.netns
def test_installed_files_and_commands(installed: Installed) -> None:
    res = _run("/usr/bin/agent", "--version")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"agent \d+\.\d+\.\d+\n", res.stdout)
    key = _run("/usr/bin/agent", "genkey")
    assert key.returncode == 0, key.stderr
    pub = _run("/usr/bin/agent", "pubkey", stdin=key.stdout)
    assert pub.returncode == 0, pub.stderr
    assert len(pub.stdout.strip()) == 44
    # the private interpreter is Debian's, isolated from the caller's environment
    res = _run("/usr/bin/agent", "--version", env={"PYTHONPATH": "/nonexistent", "PATH": "/bin"})
    assert res.returncode == 0, res.stderr
    assert Path(VENV_PYTHON).resolve().parent == Path("/usr/bin")

    agent_gid = grp.getgrnam("agent").gr_gid
    conf = Path("/etc/agent/agent.conf")
    for path, mode in ((conf, 0o640), (conf.parent, 0o750)):
        st = path.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 0, agent_gid), path
    res = _run("dpkg-query", "-W", "-f=${Conffiles}", "agent")
    assert "/etc/agent/agent.conf" in res.stdout
    for user in ("agent", "agent-derper", "agent-coordinator"):
        entry = pwd.getpwnam(user)
        assert entry.pw_uid < 1000, entry  # system users
        assert entry.pw_shell.endswith("nologin"), entry
    # nothing the package ships names the build directory
    res = _run("grep", "-rlI", "agent-deb.", "/usr/lib/agent")
    assert res.stdout == ""
    res = _analyze(
        "verify", "agent.service", "agent@wg1.service", "agent-derper.service",
        "agent-coordinator.service",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout + res.stderr == ""


def _notify_socket(tmp: Path) -> socket.socket:
    path = tmp / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o666)
    return sock


def _wait_notify(
    sock: socket.socket, proc: subprocess.Popen[bytes], what: str, log: Callable[[], str]
) -> str:
    deadline = time.monotonic() + 30
    got = ""
    while time.monotonic() < deadline:
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            got += sock.recv(4096).decode() + "\n"
        if what in got.split("\n"):
            return got
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {log()}"
    raise AssertionError(f"no {what} in 30 s: {got!r} {log()}")


@pytest.mark.netns
def test_agent_service_runs_in_its_sandbox(installed: Installed) -> None:
    """What `systemctl start agent` does with the packaged default config."""
    unit = "agent.service"
    state = installed.state_dir("agent", "agent")
    run = Path("/run/agent")  # RuntimeDirectory=agent (kept: RuntimeDirectoryPreserve=yes)
    run.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(run, "agent", "agent")
    notify = _notify_socket(installed.tmp)
    env = {"STATE_DIRECTORY": state, "RUNTIME_DIRECTORY": "/run/agent:/run/wireguard",
           "NOTIFY_SOCKET": notify.getsockname(), "PATH": "/usr/bin:/bin"}  # fmt: skip
    with notify:
        for _ in range(2):  # the key is created once, then kept
            for pre in installed.exec_lines(unit, "ExecStartPre", env):
                res = _run(*installed.sandboxed(unit, pre, env))
                assert res.returncode == 0, res.stderr
        # /run/wireguard: root's, the agent may add its own sockets
        st = installed.wgdir.stat()
        assert (st.st_mode & 0o7777, st.st_uid) == (0o1775, 0)
        assert st.st_gid == grp.getgrnam("agent").gr_gid
        key = Path(state, "agent.key")
        st = key.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, pwd.getpwnam("agent").pw_uid)
        first = key.read_text()
        assert len(first.strip()) == 44

        (start,) = installed.exec_lines(unit, "ExecStart", env)
        proc = installed.start(unit, start, env)
        status = _wait_notify(notify, proc, "READY=1", lambda: installed.log(unit))
    assert "STATUS=up: agent0" in status
    assert key.read_text() == first
    assert _link_exists(installed.netns, "agent0")
    res = _run("/usr/bin/agent", "status")  # the default config names the control socket
    assert res.returncode == 0, res.stderr
    pub = _run("/usr/bin/agent", "pubkey", stdin=first).stdout.strip()
    assert f"public key: {pub}" in res.stdout
    uapi = installed.wgdir / "agent0.sock"
    assert uapi.is_socket()
    assert uapi.stat().st_mode & 0o777 == 0o600
    # the daemon keeps running for the removal test


@pytest.mark.netns
def test_derper_service_runs_in_its_sandbox(installed: Installed) -> None:
    unit = "agent-derper.service"
    state = installed.state_dir("agent-derper", "agent-derper")
    env = dict(e.split("=", 1) for e in _directives(installed.unit(unit), "Environment")[0].split())
    env |= {"STATE_DIRECTORY": state, "PATH": "/usr/bin:/bin"}
    (start,) = installed.exec_lines(unit, "ExecStart", env)
    proc = installed.start(unit, start, env)
    deadline = time.monotonic() + 30
    while True:
        tcp = _run("ip", "netns", "exec", installed.netns, "ss", "-Hltn", "sport = :443").stdout
        udp = _run("ip", "netns", "exec", installed.netns, "ss", "-Hlun", "sport = :3478").stdout
        if tcp.strip() and udp.strip():
            break
        assert proc.poll() is None, installed.log(unit)
        assert time.monotonic() < deadline, "the relay did not listen on 443 and 3478/udp"
        time.sleep(0.2)
    certs = sorted(Path(state).iterdir())
    assert [p.suffix for p in certs] == [".crt", ".key"]
    uid = pwd.getpwnam("agent-derper").pw_uid
    for p in certs:
        assert (p.stat().st_mode & 0o777, p.stat().st_uid) == (0o600, uid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, installed.log(unit)


@pytest.mark.netns
def test_remove_then_purge_leaves_nothing(installed: Installed) -> None:
    (daemon,) = _our_pids()  # the agent of test_agent_service_runs_in_its_sandbox
    res = _run("dpkg", "-r", "agent")
    assert res.returncode == 0, res.stdout + res.stderr
    proc = installed.procs[0]
    assert proc.wait(5) == 0  # prerm's SIGTERM: a clean exit
    assert not Path(f"/proc/{daemon}").exists()
    assert _our_pids() == []
    assert not _link_exists(installed.netns, "agent0")
    assert not (installed.wgdir / "agent0.sock").exists()
    assert not os.path.lexists("/usr/bin/agent")
    assert not os.path.lexists("/usr/lib/agent")
    assert not os.path.lexists("/run/agent")
    assert Path("/etc/agent/agent.conf").exists()  # remove keeps the config and the keys
    assert Path("/var/lib/agent/agent.key").exists()

    res = _run("dpkg", "-P", "agent")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not _installed()
    left = [p for p in PKG_PATHS if os.path.lexists(p)]
    assert left == []
