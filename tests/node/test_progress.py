"""What `agent up` prints (node/progress.py): lines for what it got, one waiting line rewritten in
place with its age and detail, the ticker on the event loop; JSON once up; nothing elsewhere."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from agent.node import progress as progress_module
from agent.node.progress import (
    JsonProgress,
    Progress,
    TerminalProgress,
    for_up,
    names_line,
    peers_line,
)

ERASE = "\r\x1b[K"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def screen(raw: str) -> list[str]:
    """What a terminal shows: every erase-and-rewrite replaces the current row."""
    rows = [""]
    for part in raw.split("\n"):
        rows[-1] = part.split(ERASE)[-1] if ERASE in part else rows[-1] + part
        rows.append("")
    rows.pop()
    return [r for r in rows if r]


def test_a_wait_shows_then_ages_then_gives_way_to_its_result() -> None:
    out, clock = Tty(), Clock()
    p = TerminalProgress(out, clock, width=200)
    p.wait("control", "the coordinator at https://198.18.0.30:8443")
    assert out.getvalue() == ERASE + "waiting for the coordinator at https://198.18.0.30:8443..."
    clock.now += 1
    p.tick()
    assert p.line() == "waiting for the coordinator at https://198.18.0.30:8443..."  # not slow yet
    clock.now += 5
    p.detail("control", "unreachable (timed out), retrying")
    assert p.line() == (
        "waiting for the coordinator at https://198.18.0.30:8443... 6s, "
        "unreachable (timed out), retrying"
    )
    p.done("control", "registered as a, 100.64.0.1, fd7a:115c:a1e0::1")
    assert screen(out.getvalue()) == ["registered as a, 100.64.0.1, fd7a:115c:a1e0::1"]
    assert out.getvalue().endswith(ERASE + "registered as a, 100.64.0.1, fd7a:115c:a1e0::1\n")
    assert p.line() == ""


def test_lines_stay_above_the_waits_and_two_waits_share_the_line() -> None:
    out, clock = Tty(), Clock()
    p = TerminalProgress(out, clock, width=200)
    p.done(None, "interface agent0 up, mtu 1280")
    p.ready({"interface": "agent0"})
    p.wait("relay", "relay lab")
    p.wait("netmap", "the network map")
    clock.now += 3
    p.tick()
    assert screen(out.getvalue()) == [
        "interface agent0 up, mtu 1280",
        "agent0 is up; Ctrl-C stops it",
        "waiting for relay lab... 3s; the network map... 3s",
    ]
    p.done("relay", "connected to relay lab in 31 ms")
    p.drop("netmap")
    p.close()
    assert screen(out.getvalue()) == [
        "interface agent0 up, mtu 1280",
        "agent0 is up; Ctrl-C stops it",
        "connected to relay lab in 31 ms",
    ]
    assert out.getvalue().endswith(f"31 ms\n{ERASE}waiting for the network map... 3s{ERASE}")


def test_the_waiting_line_never_wraps_and_a_log_line_clears_it() -> None:
    out = Tty()
    p = TerminalProgress(out, Clock(), width=30)
    p.wait("control", "the coordinator at https://a-very-long-name.example:8443")
    drawn = out.getvalue().split(ERASE)[-1]
    assert len(drawn) == 29
    assert drawn.endswith("...")
    p.clear()  # what the log hook calls before a warning goes to the terminal
    assert out.getvalue().endswith(ERASE)
    p.clear()  # nothing shown: nothing written
    assert out.getvalue().count(ERASE) == 2


@pytest.mark.asyncio
async def test_the_line_ticks_on_the_event_loop_while_something_is_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(progress_module, "TICK", 0.01)
    out, clock = Tty(), Clock()
    p = TerminalProgress(out, clock, width=100)
    p.wait("relay", "relay lab")
    clock.now += 4
    await asyncio.sleep(0.05)  # the ticker (due after 0.01) redraws before this returns
    assert out.getvalue().endswith(ERASE + "waiting for relay lab... 4s")
    p.done("relay", "connected to relay lab in 4000 ms")
    written = out.getvalue()
    await asyncio.sleep(0.05)
    assert out.getvalue() == written  # nothing awaited: no more ticks


def test_json_says_up_once_and_nothing_else() -> None:
    out = io.StringIO()
    p = JsonProgress(out)
    p.wait("control", "the coordinator")
    p.done("control", "registered")
    p.ready({"interface": "agent0", "name": "a", "addresses": ["100.64.0.1/10"]})
    p.close()
    (line,) = out.getvalue().splitlines()
    assert json.loads(line) == {"interface": "agent0", "name": "a", "addresses": ["100.64.0.1/10"]}


def test_the_choice_for_up() -> None:
    assert type(for_up(io.StringIO(), json=False)) is Progress
    assert type(for_up(Tty(), json=False)) is TerminalProgress
    assert type(for_up(Tty(), json=True)) is JsonProgress
    quiet = Progress()
    quiet.wait("x", "y")
    quiet.done("x", "z")  # says nothing, raises nothing


def test_names_and_peers_lines() -> None:
    dns = {"enabled": True, "domain": "mesh.internal", "service": ["100.100.100.100"]}
    assert names_line(dns) == (
        "names under mesh.internal at 100.100.100.100, not used by the system resolver "
        "(see agent status)"
    )
    assert names_line({**dns, "resolved": "applied"}) == (
        "names under mesh.internal at 100.100.100.100, through systemd-resolved"
    )
    assert names_line({"enabled": False}) is None
    assert peers_line("configured", ["c", "b"]) == "2 peers configured: b, c"
    assert peers_line("in the network map", ["b"]) == "1 peer in the network map: b"
    assert peers_line("in the network map", []) == "no peers in the network map"
