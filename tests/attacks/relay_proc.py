"""Test helper process: `serve_relay` on 127.0.0.1 with short head and login timeouts, so a test
can measure the relay's memory (VmRSS) from outside while it attacks it.

    python -m tests.attacks.relay_proc CERT KEY HEAD_TIMEOUT LOGIN_TIMEOUT

prints the TLS port on stdout, then serves until its stdin is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import sys

import structlog

from agent.relay.server import serve_relay


async def _main(cert: str, key: str, head_timeout: float, login_timeout: float) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    log = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    relay = await serve_relay(
        "127.0.0.1",
        0,
        private_key=secrets.token_bytes(32),
        ssl_context=ctx,
        stun_port=None,
        log=log,
        head_timeout=head_timeout,
        client_info_timeout=login_timeout,
    )
    sys.stdout.write(f"{relay.port}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    stdin = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            done.set()

    loop.add_reader(stdin, readable)
    await done.wait()
    await relay.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
