"""`agent derper`: the relay program. Reads its files (server key, mesh key, allowed clients,
rate limit), makes or loads its certificate, serves until SIGTERM/SIGINT and reads the rate limit
again on SIGHUP. The serving itself is server.py; the mesh links mesh.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from agent.keys import NodePrivate, NodePublic
from agent.netio.certs import make_self_signed
from agent.netio.derp_dial import tls_client_context
from agent.netio.systemd import sd_notify
from agent.proto.endpoint import parse_listen_address
from agent.relay.mesh import load_mesh_key, parse_mesh_with
from agent.relay.server import RateLimit, RelayServer, serve_relay

__all__ = [
    "load_allowed_keys",
    "load_or_create_server_key",
    "load_rate_config",
    "parse_addr",
    "run_derper",
]


# --- key files ------------------------------------------------------------------------------------


def load_or_create_server_key(path: Path) -> bytes:
    """The relay's private key from derper's `-c` file (`{"PrivateKey": "privkey:<64 hex>"}`);
    a missing file is created (mode 0600) with a fresh key, so the key survives restarts."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        key = NodePrivate.generate().raw
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"PrivateKey": f"privkey:{key.hex()}"}, indent="\t") + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        return key
    try:
        value = json.loads(text)["PrivateKey"]
        prefix, _, hex_key = value.partition(":")
        key = bytes.fromhex(hex_key)
        if prefix != "privkey" or len(key) != 32:
            raise ValueError(value)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f'{path}: expected {{"PrivateKey": "privkey:<64 hex>"}}') from None
    return key


def load_allowed_keys(path: Path) -> frozenset[bytes]:
    """`--verify-clients-file`: one public key a line, WireGuard base64 or `nodekey:<64 hex>`;
    blank lines and `#` comments are ignored. ValueError names the first bad line."""
    keys: set[bytes] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.partition("#")[0].strip()
        if not text:
            continue
        try:
            if text.startswith("nodekey:"):
                keys.add(NodePublic.from_hex(text.removeprefix("nodekey:")).raw)
            else:
                keys.add(NodePublic.from_b64(text).raw)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a public key: {text!r}") from None
    return frozenset(keys)


def load_rate_config(path: Path) -> RateLimit:
    """derper's `--rate-config` file: `{"PerClientRateLimitBytesPerSec": N,
    "PerClientRateBurstBytes": M}` (names matched case-insensitively as Go's decoder does; a
    missing one is 0; N = 0 turns the limit off). ValueError names the problem."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    fields = {str(k).lower(): v for k, v in value.items()}
    numbers: list[int] = []
    for name in ("PerClientRateLimitBytesPerSec", "PerClientRateBurstBytes"):
        number = fields.get(name.lower(), 0)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{path}: {name} must be a non-negative integer, not {number!r}")
        numbers.append(number)
    return RateLimit(numbers[0], numbers[1])


def parse_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT` as derper's --addr; ValueError with the reason."""
    try:
        return parse_listen_address(text)
    except ValueError:
        raise ValueError(f"--addr {text!r}: expected HOST:PORT, :PORT or [V6]:PORT") from None


def run_derper(
    *,
    addr: str,
    hostname: str,
    cert_mode: str,
    cert_dir: Path,
    stun_port: int,
    log: FilteringBoundLogger,
    config: Path | None = None,
    mesh_key_file: Path | None = None,
    mesh_with: str = "",
    mesh_ca_file: Path | None = None,
    verify_clients_file: Path | None = None,
    rate_config: Path | None = None,
) -> int:
    """`agent derper`: serve until SIGTERM/SIGINT; returns the exit code. Bad files raise
    ValueError or OSError before anything listens. SIGHUP reads `rate_config` again (a bad
    file then keeps the limit in force and logs why)."""
    host, port = parse_addr(addr)
    if cert_mode == "self-signed":
        cert, key = make_self_signed(cert_dir, hostname)
    else:
        cert, key = cert_dir / f"{hostname}.crt", cert_dir / f"{hostname}.key"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    private_key = (
        load_or_create_server_key(config) if config is not None else NodePrivate.generate().raw
    )
    mesh_key = load_mesh_key(mesh_key_file) if mesh_key_file is not None else None
    peers = parse_mesh_with(mesh_with, own=[(hostname, port), (host, port)])
    if peers and mesh_key is None:
        raise ValueError("--mesh-with needs --mesh-key-file")
    mesh_ctx = tls_client_context(str(mesh_ca_file) if mesh_ca_file is not None else None)
    verify_client: Callable[[bytes], bool] | None = None
    if verify_clients_file is not None:
        allowed = load_allowed_keys(verify_clients_file)
        verify_client = allowed.__contains__
        log.info("derper verify-clients", keys=len(allowed), file=str(verify_clients_file))
    rate_limit = load_rate_config(rate_config) if rate_config is not None else None

    async def main() -> None:
        relay = await serve_relay(
            host,
            port,
            private_key=private_key,
            ssl_context=ctx,
            stun_port=stun_port or None,
            log=log,
            verify_client=verify_client,
            mesh_key=mesh_key,
            mesh_peers=peers,
            mesh_ssl_context=mesh_ctx,
            rate_limit=rate_limit,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if rate_config is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload_rate_config, relay, rate_config, log)
            log.info(
                "derper rate limit",
                bytes_per_sec=relay.core.rate_limit()[0],
                burst=relay.core.rate_limit()[1],
                file=str(rate_config),
            )
        log.info(
            "derper up",
            addr=f"{host}:{relay.port}",
            stun_port=relay.stun_port,
            cert=str(cert),
            public_key=relay.core.public_key.hex(),
            mesh_with=[p.name for p in peers],
        )
        sd_notify(f"READY=1\nSTATUS=serving on port {relay.port}")
        try:
            await stop.wait()
        finally:
            sd_notify("STOPPING=1")
            log.info("derper stopping")
            await relay.close()

    asyncio.run(main())
    return 0


def _reload_rate_config(relay: RelayServer, path: Path, log: FilteringBoundLogger) -> None:
    """SIGHUP: read `--rate-config` again and apply it; on a bad file keep the current limit."""
    try:
        limit = load_rate_config(path)
    except (OSError, ValueError) as exc:
        log.warning("derper rate limit reload failed", file=str(path), error=str(exc))
        return
    relay.set_rate_limit(limit)
    rate, burst = relay.core.rate_limit()
    log.info("derper rate limit reloaded", bytes_per_sec=rate, burst=burst, file=str(path))
