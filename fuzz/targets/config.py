"""The agent's TOML config: parse_config (agent/config).

Contract: a Config, or ConfigError listing the problems; nothing else. Key files are read
relative to a sandbox directory holding one good key file; during each input the harness
confines reads to that directory (a path outside it reads as "permission denied"), so fuzzed
paths never touch the host's files or block on a device such as /dev/zero.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PosixPath

import agent.config as config_mod
from agent.config import ConfigError, parse_config
from agent.keys import NodePrivate
from fuzz.common import REPO, Data, Seed, check, tag


class Harness:
    name = "config"
    contract = "ConfigError"
    dictionary = (b"[interface]\n", b"[[peers]]\n", b"[derp]\n", b"[[derp.regions]]\n",
                  b"[control]\n", b'private_key_file = "key"\n', b"addresses = [", b"= [",
                  b'"100.64.0.1/32"', b'"[::1]:1"', b"{ host = ", b"nodes = [", b"\n", b"=",
                  b'"', b"[", b"{", b"'''")  # fmt: skip

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-config-")
        self._dir = Path(self._tmp.name)
        (self._dir / "key").write_text(NodePrivate.from_hex("a8" * 31 + "40").to_b64() + "\n")
        (self._dir / "auth").write_text("agentkey-0123\n")
        root = self._dir

        class Sandboxed(PosixPath):
            def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
                if not self.resolve().is_relative_to(root):
                    raise PermissionError(13, "outside the fuzz sandbox")
                return super().read_text(encoding, errors)

        self._sandboxed = Sandboxed

    def close(self) -> None:
        self._tmp.cleanup()

    def run(self, data: bytes) -> str:
        d = Data(data)
        d.byte()
        text = d.rest().decode("utf-8", "replace")
        config_mod.Path = self._sandboxed  # type: ignore[attr-defined]
        try:
            cfg = parse_config(text, base_dir=self._dir)
        except ConfigError as exc:
            check(bool(exc.problems) or "TOML" in str(exc), "ConfigError without problems")
            return tag(exc)[:20]
        finally:
            config_mod.Path = Path  # type: ignore[attr-defined]
        check(cfg.interface is not None, "config without interface")
        return f"ok:{len(cfg.peers)}"

    def seeds(self) -> list[bytes]:
        example = (REPO / "agent.conf.example").read_bytes()
        minimal = (
            b'[interface]\nprivate_key_file = "key"\naddresses = ["100.64.0.1/32"]\n'
            b'[[peers]]\npublic_key = "pv3xaF61kkWFO9GXW4A27eB3xX2fXq1wc1iz7cslgDE="\n'
            b'allowed_ips = ["100.64.0.2/32"]\nendpoint = "[2001:db8::2]:41641"\n'
        )
        control = (
            b'[interface]\nprivate_key_file = "key"\n[control]\nurl = "https://c.example:8443"\n'
            b'auth_key_file = "auth"\nhostname = "h"\n'
        )
        return [Seed().byte(0).raw(x).build() for x in (example, minimal, control)]
