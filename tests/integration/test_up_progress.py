"""`agent up` on a terminal says what it waits for and what it got; into a pipe it says nothing.
The terminal is a pseudo-terminal the test reads (root only).

    ns b ──┐  (a pipe: stdout must stay empty)
    ns a ──┼── ns r: the coordinator (stopped while a starts, then started again), the relay
           │  (a pseudo-terminal: the waiting line ages and names the failure, then the results)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from .lab import Lab, Proc, _netns_argv
from .test_coordinator_agents import COORD_IP, ENV, _site

pytestmark = pytest.mark.netns

ERASE = "\r\x1b[K"


class Terminal:
    """The reading end of a pseudo-terminal (200 columns) and everything read from it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.raw = ""

    def read_until(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.raw):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the other side is closed
                    return bool(re.search(pattern, self.raw))
                if not chunk:
                    return bool(re.search(pattern, self.raw))
                self.raw += chunk.decode(errors="replace").replace("\r\n", "\n")
        return True

    def rows(self) -> list[str]:
        """What the screen shows: an erase-and-rewrite replaces the current row."""
        rows = [""]
        for part in self.raw.split("\n"):
            rows[-1] = part.split(ERASE)[-1] if ERASE in part else rows[-1] + part
            rows.append("")
        return [r for r in rows if r]

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_up_on_a_terminal_says_what_it_waits_for_and_got(lab: Lab) -> None:
    site = _site(lab)
    b = site.agent("b", 2, "100.64.0.1/10")
    b.start()
    assert site.coordinator is not None
    site.coordinator.stop()  # a starts while the coordinator is away

    a = site.agent("a", 1, "100.64.0.2/10")
    a.config_path.write_text(a.config_text())
    a.config_path.chmod(0o600)
    term = Terminal()
    argv = _netns_argv(a.ns, [sys.executable, "-m", "agent", "up", "-c", str(a.config_path)])
    out, err = lab.tmp / "a-up.out", lab.tmp / "a-up.err"
    out.write_text("(a pseudo-terminal)\n")
    with err.open("wb") as fe:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=term.slave, stderr=fe, env={**os.environ, **ENV}
        )
    proc = Proc(a.ns, argv, popen, out, err)
    lab.procs.append(proc)  # stopped by the lab whatever happens
    try:
        url = f"https://{COORD_IP}:8443"
        waiting = rf"waiting for the coordinator at {re.escape(url)}\.\.\. \d+s, unreachable"
        assert term.read_until(waiting, 20), (term.raw, proc.describe())
        site.start_coordinator()
        ifname = a.ifname
        assert term.read_until("1 peer in the network map: b\n", 40), (term.raw, proc.describe())
        assert term.read_until(r"connected to relay lab in \d+ ms\n", 10), term.raw
        popen.send_signal(signal.SIGINT)  # Ctrl-C
        assert popen.wait(15) == 0, proc.describe()
        term.read_until(f"stopping: removing {ifname}\n", 5)
    finally:
        term.close()
    rows = term.rows()
    expected = [
        "registered as a, 100.64.0.2, fd7a:115c:a1e0::2",
        f"interface {ifname} up, mtu 1280",
        "names under mesh.internal at 100.100.100.100, not used by the system resolver "
        "(see agent status)",
        f"{ifname} is up; Ctrl-C stops it",
    ]
    assert rows[:4] == expected, term.raw
    assert sorted(rows[4:6]) == sorted(
        [r for r in rows if r.startswith("connected to relay lab in ")]
        + ["1 peer in the network map: b"]
    ), term.raw
    assert rows[6:] == [f"stopping: removing {ifname}"], term.raw
    # a pipe gets nothing on stdout; the logs are JSON lines on stderr
    assert b.proc is not None
    assert b.proc.stdout_text() == ""
    assert b.proc.stderr_text().lstrip().startswith("{")
