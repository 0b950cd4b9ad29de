"""`agent join URL --auth-key KEY`: point this machine's agent at a coordinator and start it.

What `tailscale up --login-server URL --authkey KEY` is to Tailscale, in three steps:

1. The `[control]` section of the config (default /etc/agent/agent.conf) is written: an
   existing one is replaced where it stands, otherwise it goes after `[interface]`. Every
   other line, comments included, stays as it was. The file is replaced atomically, mode 0640,
   owned by root and the group `agent` (the service's) when that group exists.
2. When systemd runs, the config's unit (`agent.service` for /etc/agent/agent.conf,
   `agent@NAME.service` for /etc/agent/NAME.conf) is enabled and (re)started; `systemctl`
   returns once the agent has registered and its interface is up (the unit is Type=notify).
   Without systemd, or for a config elsewhere, the command to run is printed instead.
3. The running agent is asked for its addresses over its control socket, and they are
   printed: "joined: agent0 has 100.64.0.3, fd7a:115c:a1e0::3".

The text edits are pure functions (`control_section`, `with_control`), tested without a
system; `run_join` does the file and process work.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["JoinError", "control_section", "unit_for", "with_control", "run_join"]

_HEADER: Final = re.compile(r"^\s*\[(\[)?\s*([^\]\s#]+)\s*\]\]?\s*(#.*)?$")
_SERVICE_GROUP: Final = "agent"
_SYSTEMD_CONFIG_DIR: Final = Path("/etc/agent")
_STATUS_WAIT: Final = 30.0


class JoinError(Exception):
    """Something `agent join` cannot do; the message is the one line it prints."""


def _toml_string(s: str) -> str:
    # A JSON string is a TOML basic string for everything json.dumps emits with
    # ensure_ascii (escapes \" \\ \b \f \n \r \t \uXXXX).
    return json.dumps(s, ensure_ascii=True)


def control_section(url: str, auth_key: str, ca_file: str | None, hostname: str | None) -> str:
    """The `[control]` table for these settings, as config text (ends with a newline)."""
    if not url.startswith("https://"):
        raise JoinError(f"{url!r} is not an https:// URL")
    lines = [
        "[control]                                     # written by `agent join`",
        f"url = {_toml_string(url)}",
        f"auth_key = {_toml_string(auth_key)}",
    ]
    if ca_file:
        lines.append(f"ca_file = {_toml_string(ca_file)}")
    if hostname:
        lines.append(f"hostname = {_toml_string(hostname)}")
    return "\n".join(lines) + "\n"


def _tables(lines: list[str]) -> list[tuple[int, str]]:
    """(line index, table name) of every `[table]` / `[[array]]` header outside strings.

    Multi-line strings are not tracked: the agent's config has none, and the result is
    checked by parsing it before anything is written.
    """
    out = []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            out.append((i, m.group(2).strip('"')))
    return out


def with_control(text: str, section: str) -> str:
    """`text` with its `[control]` table replaced by `section` (or added after `[interface]`).

    Raises JoinError when the input or the result is not valid TOML.
    """
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JoinError(f"the config is not valid TOML: {e}") from e
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    headers = _tables(lines)
    new = section.splitlines(keepends=True)
    start = next((i for i, (_, name) in enumerate(headers) if name == "control"), None)
    if start is not None:
        begin = headers[start][0]
        end = headers[start + 1][0] if start + 1 < len(headers) else len(lines)
        # Comments and blank lines just before the next table belong to it.
        while end > begin + 1 and lines[end - 1].strip()[:1] in ("", "#"):
            end -= 1
        out = [*lines[:begin], *new, *lines[end:]]
    else:
        after = next((i for i, (_, name) in enumerate(headers) if name == "interface"), None)
        at = len(lines)
        if after is not None and after + 1 < len(headers):
            at = headers[after + 1][0]
        out = [*lines[:at]]
        if out and out[-1].strip():
            out.append("\n")
        out += [*new, "\n", *lines[at:]]
        while out and out[-1] == "\n":
            out.pop()
    result = "".join(out)
    try:
        tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:  # a header we could not see, e.g. in a string
        raise JoinError(f"cannot add [control] to this config safely ({e}); edit it by hand") from e
    return result


def unit_for(config: Path) -> str | None:
    """The packaged unit that runs `agent up -c config`, or None for a config elsewhere."""
    config = config.absolute()
    if config.parent != _SYSTEMD_CONFIG_DIR or config.suffix != ".conf":
        return None
    name = config.stem
    return "agent.service" if name == "agent" else f"agent@{name}.service"


def read_auth_key(value: str) -> str:
    """`--auth-key KEY` or `--auth-key file:PATH` (keeps the key out of `ps`)."""
    if value.startswith("file:"):
        path = value[len("file:") :]
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise JoinError(f"--auth-key {path}: {e.strerror or e}") from e
    if not value:
        raise JoinError("--auth-key is empty")
    return value


def _write_config(path: Path, text: str) -> None:
    """Replace `path` atomically: mode 0640, its owner kept, else root and the service group."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    uid, gid = (st.st_uid, st.st_gid) if st is not None else (os.geteuid(), os.getegid())
    if st is None:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(_SERVICE_GROUP).gr_gid
    tmp = path.with_name(f".{path.name}.join")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o640)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except PermissionError as e:
        tmp.unlink(missing_ok=True)
        raise JoinError(f"cannot write {path}: permission denied (run as root)") from e
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise JoinError(f"cannot write {path}: {e.strerror or e}") from e


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise JoinError(
            f"systemctl {' '.join(args)} failed: {detail[0] if detail else proc.returncode}"
        )


def run_join(
    config: Path,
    *,
    url: str,
    auth_key: str,
    ca_file: str | None,
    hostname: str | None,
    start: bool,
    addresses: Callable[[Path, float], list[str]],
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),  # noqa: T201
) -> list[str]:
    """Write the config, start its unit, return the agent's addresses ([] when not started)."""
    if ca_file is not None:
        ca_path = Path(ca_file).absolute()
        if not ca_path.is_file():
            raise JoinError(f"--ca-file {ca_file}: no such file")
        ca_file = str(ca_path)
    section = control_section(url, read_auth_key(auth_key), ca_file, hostname)
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise JoinError(f"{config}: no such config (install the package, or write one)") from e
    except OSError as e:
        raise JoinError(f"cannot read {config}: {e.strerror or e}") from e
    _write_config(config, with_control(text, section))
    say(f"{config}: [control] now points at {url}")
    unit = unit_for(config)
    if unit is None or not start or not _systemd_running():
        say(f"start the agent with: agent up -c {config}")
        return []
    say(f"starting {unit} (it registers with the coordinator first)")
    _systemctl("enable", "--quiet", unit)
    try:
        _systemctl("restart", unit)
    except JoinError as e:
        raise JoinError(f"{e}; see `journalctl -u {unit}`") from e
    return addresses(config, _STATUS_WAIT)


def wait_for_addresses(wait: float, ask: Callable[[str], list[str]], socket_path: str) -> list[str]:
    """Ask the daemon behind `socket_path` for its addresses until it answers or `wait` ends."""
    deadline = time.monotonic() + wait
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return ask(socket_path)
        except Exception as e:  # noqa: BLE001 -- any failure means "not yet"; the last is shown
            last = e
            time.sleep(0.2)
    raise JoinError(f"the agent started but did not answer on {socket_path}: {last}")
