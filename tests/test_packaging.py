"""The systemd units, checked offline: `systemd-analyze verify`, the exposure score, privileges.

These need no root and no running systemd. The units running for real, installed from the .deb
on booted Debian machines, are tests/system/test_install.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
UNIT_NAMES = [
    "agent.service",
    "agent@.service",
    "agent-derper.service",
    "agent-coordinator.service",
]
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt-get install systemd)",
)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _directives(text: str, key: str) -> list[str]:
    """The values of `key=` in a unit, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{re.escape(key)}=(.*)$", text, re.M)]


# -- the unit files -------------------------------------------------------------------------------


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in before installing
    stub = tmp_path / "agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    names = []
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text().replace("/usr/bin/agent", str(stub))
        name = name.replace("@.", "@wg1.")  # a template is verified through an instance
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    res = _analyze("verify", *names)
    assert res.returncode == 0, res.stderr
    assert res.stdout + res.stderr == ""  # verify exits 0 even on unknown keys: no warning at all


@needs_analyze
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_exposure_at_most_2(name: str) -> None:
    res = _analyze("security", "--offline=true", str(UNITS / name))
    assert res.returncode == 0, res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m is not None, res.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_agent_service_is_the_template_for_agent_conf() -> None:
    def body(text: str) -> str:
        text = text.split("[Unit]", 1)[1]  # the header comments differ
        return "\n".join(
            line
            for line in text.splitlines()
            if not line.startswith(("Description=", "Conflicts="))
        )

    single = body((UNITS / "agent.service").read_text())
    template = body((UNITS / "agent@.service").read_text())
    assert single == template.replace("%i.", "agent.")


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_privileges(name: str) -> None:
    text = (UNITS / name).read_text()
    caps = {
        "agent.service": "CAP_NET_ADMIN",
        "agent@.service": "CAP_NET_ADMIN",
        "agent-derper.service": "CAP_NET_BIND_SERVICE",
        "agent-coordinator.service": "",
    }[name]
    assert _directives(text, "CapabilityBoundingSet") == [caps]
    assert _directives(text, "AmbientCapabilities") == [caps]
    assert _directives(text, "User") == [name.split("@")[0].removesuffix(".service")]
    assert _directives(text, "NoNewPrivileges") == ["yes"]
    assert _directives(text, "MemoryDenyWriteExecute") == ["yes"]
    assert _directives(text, "UMask") == ["0077"]




@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_needs_no_shell_and_no_root_step(name: str) -> None:
    # A root `ExecStartPre=+` shell made /run/wireguard too late: the mount namespace
    # (ReadWritePaths=) is set up before any Exec line runs (status=226/NAMESPACE).
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    for line in re.findall(r"^Exec\w+=(.*)$", text, re.M):
        assert not line.startswith(("+", "!")), line
        assert not re.match(r"[-@:]*/bin/(ba)?sh\b", line), line


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_paths_exist_before_the_namespace(name: str) -> None:
    # Every ReadWritePaths= entry is optional ("-") or made at boot by our tmpfiles.d file.
    made = {
        line.split()[1]
        for line in (REPO / "packaging/tmpfiles.conf").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for entry in " ".join(_directives((UNITS / name).read_text(), "ReadWritePaths")).split():
        assert entry.startswith("-"), entry
        assert entry.lstrip("-") in made, entry
