"""Sliding-window replay filter for transport counters (RFC 6479 bitmap ring, as WireGuard does).

The ring holds RING_BLOCKS blocks of 64 bits; one block is always being recycled, so the window is
(RING_BLOCKS - 1) * 64 = 8128 counters behind the highest seen. `accept(counter)` must be
called only after the packet authenticated, so a forged counter cannot move the window.

In-order counters (the usual case) take a short path: a counter above the highest seen but in
the same 64-bit block needs no block cleared, and its bit cannot be set yet (bits above the
highest counter of a block are zero: the block was cleared when the window moved into it).
"""

from __future__ import annotations

from agent.proto.wireguard.constants import REJECT_AFTER_MESSAGES

__all__ = ["WINDOW_SIZE", "ReplayWindow"]

_BLOCK_BITS_LOG = 6
_RING_BLOCKS = 128
_RING_MASK = _RING_BLOCKS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * 64


class ReplayWindow:
    """Accepts each counter at most once, and none older than WINDOW_SIZE behind the newest."""

    __slots__ = ("_blocks", "_last")

    def __init__(self) -> None:
        self._blocks = [0] * _RING_BLOCKS
        self._last = 0

    def accept(self, counter: int) -> bool:
        """True and remember `counter` if it is new and inside the window; False if replayed/old."""
        last = self._last
        if last < counter < REJECT_AFTER_MESSAGES and counter ^ last < 64:
            # In order, same block as the highest seen: nothing to clear, the bit is free.
            self._last = counter
            self._blocks[(counter >> _BLOCK_BITS_LOG) & _RING_MASK] |= 1 << (counter & 63)
            return True
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        block = counter >> _BLOCK_BITS_LOG
        blocks = self._blocks
        if counter > last:
            current = last >> _BLOCK_BITS_LOG
            diff = min(block - current, _RING_BLOCKS)
            for i in range(current + 1, current + diff + 1):
                blocks[i & _RING_MASK] = 0
            self._last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        i = block & _RING_MASK
        bit = 1 << (counter & 63)
        old = blocks[i]
        if old & bit:
            return False
        blocks[i] = old | bit
        return True
