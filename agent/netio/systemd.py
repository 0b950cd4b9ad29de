"""systemd's readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET.

A unit with Type=notify is "started" only when the program says READY=1, so `systemctl start`
and units ordered after it wait until it really serves. Outside systemd this does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["sd_notify"]


def sd_notify(message: str) -> None:
    """Send `message` (e.g. "READY=1\\nSTATUS=...") to systemd; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())
