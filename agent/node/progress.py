"""What `agent up` tells a person while it starts: what it waits for, and what it got.

On a terminal (stdout is a TTY, no `--json`), one line per thing that happened, and below them
one line, rewritten in place, saying what is still awaited and for how long:

    registered as a, 100.64.0.1, fd7a:115c:a1e0::1
    interface agent0 up, mtu 1280
    names under mesh.internal at 100.100.100.100, through systemd-resolved
    agent0 is up; Ctrl-C stops it
    connected to relay lab in 31 ms
    2 peers in the network map: b, c
    waiting for the coordinator at https://coord:8443... 6s, unreachable (timed out), retrying

A wait shows its age once it has lasted SLOW seconds, and the line ticks every TICK seconds on
the running event loop. A log line written meanwhile (warnings and errors: on a terminal
`agent up` logs from `warning` unless told otherwise) first clears the waiting line
(`clear`, hooked into the log configuration), which comes back at the next tick.

Anywhere else nothing is printed (`Progress`): under systemd stdout goes to the journal, where
the JSON log lines already say it all. With `--json` one object on stdout says the node is up
(`JsonProgress`). The daemon (node/main.py) calls the same methods in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "Progress",
    "TerminalProgress",
    "JsonProgress",
    "for_up",
    "names_line",
    "peers_line",
    "SLOW",
    "TICK",
]

SLOW: Final = 2.0  # seconds a wait lasts before its age is shown
TICK: Final = 1.0  # seconds between rewrites of the waiting line
_ERASE: Final = "\r\x1b[K"


class TextStream(Protocol):
    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...

    def fileno(self) -> int: ...


class Progress:
    """Says nothing. Each method is one thing the daemon does while it starts."""

    terminal = False

    def wait(self, key: str, what: str) -> None:
        """Waiting for `what` ("the coordinator at URL"); `done(key, ...)` ends it."""

    def detail(self, key: str, text: str) -> None:
        """What is known about an ongoing wait (the last error, a retry)."""

    def done(self, key: str | None, line: str) -> None:
        """The wait `key` (None: no wait) ended with `line`."""

    def drop(self, key: str) -> None:
        """The wait `key` ends without a result (a failure the logs report)."""

    def ready(self, info: Mapping[str, Any]) -> None:
        """The node is up: interface, name, addresses."""

    def clear(self) -> None:
        """Something else is about to write to the terminal."""

    def close(self) -> None:
        """The daemon is done; nothing more comes."""


@dataclass(slots=True)
class _Wait:
    what: str
    since: float
    detail: str = ""


class TerminalProgress(Progress):
    """Lines for a person at a terminal, and one waiting line rewritten in place."""

    terminal = True

    def __init__(
        self,
        stream: TextStream,
        clock: Callable[[], float] = time.monotonic,
        *,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.width = width
        self._waits: dict[str, _Wait] = {}
        self._shown = False
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_loop: asyncio.AbstractEventLoop | None = None

    def wait(self, key: str, what: str) -> None:
        self._waits[key] = _Wait(what, self.clock())
        self._draw()

    def detail(self, key: str, text: str) -> None:
        if (entry := self._waits.get(key)) is not None:
            entry.detail = text
            self._draw()

    def done(self, key: str | None, line: str) -> None:
        if key is not None:
            self._waits.pop(key, None)
        self.clear()
        self.stream.write(line + "\n")
        self._draw()

    def drop(self, key: str) -> None:
        if self._waits.pop(key, None) is not None:
            self._draw()

    def ready(self, info: Mapping[str, Any]) -> None:
        self.done(None, f"{info.get('interface')} is up; Ctrl-C stops it")

    def clear(self) -> None:
        if self._shown:
            self.stream.write(_ERASE)
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        self._waits.clear()
        self.clear()
        self._stop_ticker()

    def tick(self) -> None:
        """Rewrite the waiting line (the ticker calls this every TICK seconds)."""
        self._draw()

    # -- the waiting line --------------------------------------------------------------------

    def line(self) -> str:
        """The waiting line as it would be drawn now ("" when nothing is awaited)."""
        now = self.clock()
        parts = []
        for entry in self._waits.values():
            age = now - entry.since
            extra = [f"{age:.0f}s"] if age >= SLOW else []
            if entry.detail:
                extra.append(entry.detail)
            parts.append(f"{entry.what}...{' ' if extra else ''}{', '.join(extra)}")
        return f"waiting for {'; '.join(parts)}" if parts else ""

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns or 80  # a pseudo-terminal nobody sized says 0

    def _draw(self) -> None:
        text = self.line()
        if not text:
            self.clear()
            self.stream.flush()
            self._stop_ticker()
            return
        limit = max(self._columns() - 1, 10)  # never wrap: \r only returns within one row
        if len(text) > limit:
            text = text[: limit - 3] + "..."
        self.stream.write(_ERASE + text)
        self.stream.flush()
        self._shown = True
        self._start_ticker()

    def _start_ticker(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (yet): the next call on one starts it
        if self._ticker is not None and self._ticker_loop is loop:
            return
        self._stop_ticker()
        self._ticker_loop = loop
        self._ticker = loop.call_later(TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._ticker = None
        self._draw()

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            with contextlib.suppress(RuntimeError):
                self._ticker.cancel()
        self._ticker = self._ticker_loop = None


class JsonProgress(Progress):
    """`agent up --json`: one JSON object on stdout once the node is up, nothing else."""

    def __init__(self, stream: TextStream) -> None:
        self.stream = stream

    def ready(self, info: Mapping[str, Any]) -> None:
        self.stream.write(json.dumps(dict(info)) + "\n")
        self.stream.flush()


def for_up(stream: TextStream, *, json: bool) -> Progress:
    """What `agent up` prints on `stream`: JSON, terminal lines, or nothing."""
    if json:
        return JsonProgress(stream)
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return TerminalProgress(stream) if terminal else Progress()


def names_line(dns: Mapping[str, Any]) -> str | None:
    """Where the name service answers and whether the system uses it (DnsService.status())."""
    if not dns.get("enabled"):
        return None
    where = f"names under {dns.get('domain')} at {(dns.get('service') or ['-'])[0]}"
    if dns.get("resolved") == "applied":
        return f"{where}, through systemd-resolved"
    return f"{where}, not used by the system resolver (see agent status)"


def peers_line(where: str, names: Sequence[str]) -> str:
    """'2 peers configured: b, c', '1 peer in the network map: b', 'no peers in ...'."""
    if not names:
        return f"no peers {where}"
    return f"{len(names)} peer{'' if len(names) == 1 else 's'} {where}: {', '.join(sorted(names))}"
