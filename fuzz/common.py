"""What every fuzz harness shares: the input reader, the seed writer and the harness contract.

A harness module in `fuzz/targets/` defines one class `Harness` with

    name: str                     the target name (`python fuzz/run.py --target NAME`)
    contract: str                 what the target may raise, from the module's docstring
    dictionary: tuple[bytes, ...] tokens the random engine splices into inputs
    __init__()                    expensive set-up (keys, sessions), once per process
    close()                       optional: release loops, files, databases
    run(data: bytes) -> str       one input: swallows the target's documented errors, raises
                                  anything else (a crash) or `InvariantViolation`; returns a
                                  short outcome tag (the random engine keeps inputs whose tag
                                  it has not seen: cheap feedback without coverage)
    seeds() -> list[bytes]        seed inputs in the harness's own input format

The same `run` is called by atheris (coverage-guided), by the random mutation engine of
`fuzz/run.py` and by hypothesis in tests/test_fuzz_smoke.py. `Data` reads structured values
from the fuzz bytes the way atheris' FuzzedDataProvider does, but in plain Python and with a
writer (`Seed`) producing the same layout, so seed corpora are built by code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = [
    "REPO",
    "VECTORS",
    "InvariantViolation",
    "Harness",
    "Data",
    "Seed",
    "check",
    "close",
    "tag",
    "load_vector",
]

REPO: Final = Path(__file__).resolve().parents[1]
VECTORS: Final = REPO / "tests" / "vectors"


class InvariantViolation(AssertionError):
    """A harness's own check failed: the target misbehaved without raising."""


class Harness(Protocol):
    name: str
    contract: str
    dictionary: tuple[bytes, ...]

    def run(self, data: bytes) -> str: ...

    def seeds(self) -> list[bytes]: ...


def close(harness: object) -> None:
    """Release what a harness holds (event loop, temp directory, database), if anything."""
    closer = getattr(harness, "close", None)
    if closer is not None:
        closer()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def tag(exc: BaseException) -> str:
    """An outcome tag for an expected error: its type and the start of its message."""
    return f"{type(exc).__name__}:{str(exc)[:24]}"


def load_vector(relative: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / relative).read_text())
    return doc


class Data:
    """Reads values off the front of a fuzz input; past the end every read gives zeros/empty."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def byte(self) -> int:
        pos = self.pos
        if pos >= len(self.buf):
            return 0
        self.pos = pos + 1
        return self.buf[pos]

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "big")

    def bool(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, options: tuple[Any, ...] | list[Any]) -> Any:
        return options[self.byte() % len(options)]

    def take(self, n: int) -> bytes:
        out = self.buf[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.buf[self.pos :]
        self.pos = len(self.buf)
        return out

    def chunks(self, limit: int = 64) -> list[bytes]:
        """Up to `limit` pieces, each a u16 big-endian length then that many bytes (the last
        piece takes what is left when the length runs past the end)."""
        out: list[bytes] = []
        while self.remaining() > 0 and len(out) < limit:
            n = self.uint(2)
            out.append(self.take(n))
        return out

    def stream_split(self, payload: bytes) -> list[bytes]:
        """Cut `payload` into stream reads: one byte k, then pieces of k bytes (0 = whole)."""
        k = self.byte()
        if k == 0 or k >= len(payload):
            return [payload]
        return [payload[i : i + k] for i in range(0, len(payload), k)]


class Seed:
    """Writes an input in `Data`'s layout: `Seed().byte(1).chunks([a, b]).raw(c).build()`."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def byte(self, value: int) -> Seed:
        self._parts.append(bytes([value & 0xFF]))
        return self

    def uint(self, value: int, nbytes: int) -> Seed:
        self._parts.append(value.to_bytes(nbytes, "big"))
        return self

    def raw(self, data: bytes) -> Seed:
        self._parts.append(bytes(data))
        return self

    def chunks(self, pieces: list[bytes]) -> Seed:
        for piece in pieces:
            self._parts.append(len(piece).to_bytes(2, "big") + piece)
        return self

    def build(self) -> bytes:
        return b"".join(self._parts)
