"""The layering of STYLE.md §9.1/§10.2, enforced by walking every import with `ast`.

- agent/proto and agent/engine are sans-I/O: no clocks, sockets, threads, OS or TUN modules, and
  no imports of config, api, log, daemon or cli.
- proto siblings (wireguard, derp, disco, stun, ippacket) never import each other.
- config/api import only keys/log; keys/log import nothing above them.
- nothing under agent/ imports agent.cli except agent/__main__.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "agent"

BANNED_IN_CORE = {
    "asyncio", "socket", "ssl", "selectors", "threading", "multiprocessing", "subprocess",
    "signal", "os", "time", "random", "pytun", "pyroute2",
}  # fmt: skip
ABOVE_CORE = ("agent.config", "agent.api", "agent.log", "agent.daemon", "agent.cli")
PROTO_SIBLINGS = ("wireguard", "derp", "disco", "stun", "ippacket")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import in the file, relative ones resolved."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return list(imports_of(path.read_text(), package, str(path)))


def imports_of(source: str, package: str, filename: str = "<src>") -> Iterator[tuple[str, int]]:
    """Imports in `source` as if it sat in `package`; `from a.b import c` gives a.b and a.b.c."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for alias in node.names:
                yield f"{mod}.{alias.name}", node.lineno


def _is(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def _files(*subdirs: str) -> list[Path]:
    return sorted(p for d in subdirs if (PKG / d).is_dir() for p in (PKG / d).rglob("*.py"))


def _where(path: Path, line: int, mod: str) -> str:
    return f"{path.relative_to(PKG.parent)}:{line}: imports {mod}"


def _report(bad: list[str]) -> str:
    """One line per offending import statement (file:line), however many names it brings."""
    first: dict[str, str] = {}
    for entry in bad:
        first.setdefault(entry.partition(": imports")[0], entry)
    return "\n".join(first.values())


def test_cores_are_sans_io() -> None:
    files = _files("proto", "engine")
    if not files:
        pytest.skip("no agent/proto or agent/engine modules yet")
    bad = [
        _where(path, line, mod)
        for path in files
        for mod, line in imports(path)
        if mod.split(".")[0] in BANNED_IN_CORE or any(_is(mod, up) for up in ABOVE_CORE)
    ]
    assert not bad, _report(bad)


def test_proto_siblings_are_independent() -> None:
    bad: list[str] = []
    for sib in PROTO_SIBLINGS:
        own = f"agent.proto.{sib}"
        others = [f"agent.proto.{o}" for o in PROTO_SIBLINGS if o != sib]
        single = PKG / "proto" / f"{sib}.py"
        for path in _files(f"proto/{sib}") + ([single] if single.exists() else []):
            bad += [
                _where(path, line, mod)
                for mod, line in imports(path)
                if any(_is(mod, o) for o in others) and not _is(mod, own)
            ]
    assert not bad, _report(bad)


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("config", ("agent.keys", "agent.log", "agent.proto")),
        ("api", ("agent.keys", "agent.log")),
        ("keys", ()),
        ("log", ()),
    ],
)
def test_low_layers_import_only_below(module: str, allowed: tuple[str, ...]) -> None:
    path = PKG / f"{module}.py"
    if not path.exists():
        pytest.skip(f"agent/{module}.py not written yet")
    bad = [
        _where(path, line, mod)
        for mod, line in imports(path)
        if _is(mod, "agent") and mod != "agent" and not any(_is(mod, a) for a in allowed)
    ]
    assert not bad, _report(bad)


def test_only_main_imports_the_cli() -> None:
    bad = [
        _where(path, line, mod)
        for path in sorted(PKG.rglob("*.py"))
        if path not in (PKG / "__main__.py", PKG / "cli.py")
        for mod, line in imports(path)
        if _is(mod, "agent.cli")
    ]
    assert not bad, _report(bad)


def test_the_walker_resolves_relative_imports() -> None:
    src = "from ... import config\nfrom ..derp import frames\nimport os.path\nfrom . import x\n"
    found = set(imports_of(src, "agent.proto.wireguard"))
    assert ("agent.config", 1) in found
    assert ("agent.proto.derp.frames", 2) in found
    assert ("os.path", 3) in found
    assert ("agent.proto.wireguard.x", 4) in found
