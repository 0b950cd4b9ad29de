"""Random bytes for the packet path, drawn from the OS a block at a time."""

from __future__ import annotations

import secrets

__all__ = ["RandomPool"]


class RandomPool:
    """secrets.token_bytes served from a 4 KiB block: the timers draw jitter on every data
    send, and one getrandom() per block instead of per call is measurable on the packet path.
    Bytes are never handed out twice."""

    def __init__(self, block: int = 4096) -> None:
        self._block = block
        self._buf = b""
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        if n > self._block:
            return secrets.token_bytes(n)
        if self._pos + n > len(self._buf):
            self._buf = secrets.token_bytes(self._block)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out
