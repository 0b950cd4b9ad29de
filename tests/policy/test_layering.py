"""agent/policy is pure computation: no clocks, sockets, threads, files or upper layers."""

from __future__ import annotations

from pathlib import Path

from tests.test_architecture import BANNED_IN_CORE, imports

POLICY = Path(__file__).resolve().parents[2] / "agent" / "policy"
ALLOWED_AGENT = ("agent.policy",)


def test_policy_is_sans_io() -> None:
    files = sorted(POLICY.rglob("*.py"))
    assert files
    bad = [
        f"{path.name}:{line}: imports {mod}"
        for path in files
        for mod, line in imports(path)
        if mod.split(".")[0] in BANNED_IN_CORE
        or (mod.startswith("agent.") and not mod.startswith(ALLOWED_AGENT))
    ]
    assert not bad, "\n".join(bad)
