"""The layering of agent/, enforced by walking every import (function-level ones too) with `ast`.

    cli, __main__, demo          the `agent` command
    node | relay | coordinator   the three programs: never import each other
    netio                        I/O the programs share (TLS streams, certificates, Prometheus)
    engine                       sans-I/O: path selection, netcheck          -> proto, keys
    config, api                  pure data and parsing                       -> proto, keys, log
    proto                        sans-I/O protocol cores                     -> keys
    keys, log                    leaves

- proto and engine import no I/O module (clocks, sockets, threads, OS, TUN) and nothing above them;
  proto's siblings (wireguard, derp, disco, stun, dns, offload, coordinator_messages) share only its
  helpers (errors, deadlines, endpoint, derpmap).
- No import cycle anywhere in agent/ (strongly connected components of the module graph).
- Every module and package these rules name exists: a missing one fails, it is never skipped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "agent"

BANNED_IN_CORE = {
    "asyncio", "socket", "ssl", "selectors", "threading", "multiprocessing", "subprocess",
    "signal", "os", "time", "random", "pytun", "pyroute2",
}  # fmt: skip

PROGRAMS = ("agent.node", "agent.relay", "agent.coordinator")
PROTO_HELPERS = ("errors", "deadlines", "endpoint", "derpmap")

# What each part of agent/ may import from agent/ (besides itself).
ALLOWED: dict[str, tuple[str, ...]] = {
    "agent.keys": (),
    "agent.log": (),
    "agent.proto": ("agent.keys", "agent.policy"),  # the netmap carries compiled filter rules
    "agent.policy": (),  # access control: pure, like proto; the coordinator and the node use it
    "agent.api": ("agent.keys", "agent.log"),
    "agent.config": ("agent.keys", "agent.log", "agent.proto", "agent.policy"),
    "agent.engine": ("agent.keys", "agent.proto"),
    "agent.netio": ("agent.keys", "agent.log", "agent.proto"),
    "agent.node": (
        "agent.keys", "agent.log", "agent.proto", "agent.engine", "agent.config", "agent.api",
        "agent.netio", "agent.policy",
    ),
    "agent.relay": ("agent.keys", "agent.log", "agent.proto", "agent.netio"),
    "agent.coordinator": (
        "agent.keys", "agent.log", "agent.proto", "agent.config", "agent.netio", "agent.policy",
    ),
    "agent.demo": ("agent.keys",),
    "agent.join": (),
    "agent.cli_text": ("agent.api",),
    "agent.cli": (
        "agent", "agent.keys", "agent.log", "agent.config", "agent.api", "agent.demo",
        "agent.join", "agent.cli_text",
        *PROGRAMS,
    ),
    "agent.__main__": ("agent.cli",),
    "agent": (),
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


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


def _part(mod: str) -> str:
    """The entry of ALLOWED that a module of agent/ belongs to (the longest that matches)."""
    return max((p for p in ALLOWED if _is(mod, p)), key=len)


def _where(path: Path, line: int, mod: str) -> str:
    return f"{path.relative_to(PKG.parent)}:{line}: imports {mod}"


def _report(bad: list[str]) -> str:
    """One line per offending import statement (file:line), however many names it brings."""
    first: dict[str, str] = {}
    for entry in bad:
        first.setdefault(entry.partition(": imports")[0], entry)
    return "\n".join(first.values())


def _agent_imports(path: Path) -> Iterator[tuple[str, int]]:
    """Imports of agent modules from `path`, each resolved to the module it names: `from a.b
    import c` is a.b.c when that is a module, else a.b (c is a name defined in a.b)."""
    for mod, line in imports(path):
        if _is(mod, "agent") and mod in MODULES:
            yield mod, line


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for mod, _ in _agent_imports(path):
            if mod != name:
                graph[name].add(mod)
    return graph


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


# --- the modules the rules name exist --------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        *ALLOWED,
        *(f"agent.proto.{h}" for h in PROTO_HELPERS),
        "agent.proto.wireguard",
        "agent.proto.derp",
        "agent.proto.disco",
        "agent.proto.stun",
        "agent.proto.dns",
        "agent.proto.portmap",
        "agent.engine.portmap",
        "agent.node.portmap_io",
    ],
)
def test_named_module_exists(module: str) -> None:
    assert module in MODULES, f"{module} is named by the architecture rules but does not exist"


def test_every_module_has_a_part() -> None:
    """Every module of agent/ falls under a rule; a new top-level module needs one."""
    orphans = [m for m in MODULES if not any(_is(m, p) for p in ALLOWED if p != "agent")]
    assert orphans == ["agent"], f"modules no rule covers: {orphans[1:]}"


# --- the edges ----------------------------------------------------------------------------------


def test_cores_are_sans_io() -> None:
    cores = ("agent.proto", "agent.engine", "agent.policy")
    files = [p for m, p in MODULES.items() if any(_is(m, c) for c in cores)]
    assert files, "agent/proto, agent/engine and agent/policy hold no modules"
    bad = [
        _where(path, line, mod)
        for path in files
        for mod, line in imports(path)
        if mod.split(".")[0] in BANNED_IN_CORE
    ]
    assert not bad, _report(bad)


def test_every_import_follows_the_layers() -> None:
    bad: list[str] = []
    for name, path in MODULES.items():
        part = _part(name)
        allowed = (part, *ALLOWED[part])
        for mod, line in _agent_imports(path):
            target = _part(mod)
            if target != "agent" and not any(_is(mod, a) for a in allowed):
                bad.append(_where(path, line, mod))
    assert not bad, _report(bad)


def test_programs_never_import_each_other() -> None:
    bad = [
        _where(path, line, mod)
        for name, path in MODULES.items()
        for own in PROGRAMS
        if _is(name, own)
        for mod, line in imports(path)
        if any(_is(mod, other) for other in PROGRAMS if other != own)
    ]
    assert not bad, _report(bad)


def test_proto_siblings_are_independent() -> None:
    helpers = tuple(f"agent.proto.{h}" for h in PROTO_HELPERS)
    siblings = {
        ".".join(m.split(".")[:3])
        for m in MODULES
        if _is(m, "agent.proto") and m != "agent.proto" and not any(_is(m, h) for h in helpers)
    }
    assert {"agent.proto.wireguard", "agent.proto.derp", "agent.proto.disco"} <= siblings
    bad = [
        _where(path, line, mod)
        for name, path in MODULES.items()
        for sib in siblings
        if _is(name, sib)
        for mod, line in imports(path)
        if any(_is(mod, other) for other in siblings if other != sib)
    ]
    assert not bad, _report(bad)


def test_no_import_cycles() -> None:
    cycles = strongly_connected(module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# --- the checker itself -------------------------------------------------------------------------


def test_the_walker_resolves_relative_imports() -> None:
    src = "from ... import config\nfrom ..derp import frames\nimport os.path\nfrom . import x\n"
    found = set(imports_of(src, "agent.proto.wireguard"))
    assert ("agent.config", 1) in found
    assert ("agent.proto.derp.frames", 2) in found
    assert ("os.path", 3) in found
    assert ("agent.proto.wireguard.x", 4) in found


def test_the_walker_sees_function_level_imports() -> None:
    src = "def f():\n    if True:\n        from agent.node import main\n"
    assert ("agent.node.main", 3) in set(imports_of(src, "agent.relay"))


def test_cycle_finder() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_part_picks_the_longest_rule() -> None:
    assert _part("agent.node.main") == "agent.node"
    assert _part("agent.proto.wireguard.peer") == "agent.proto"
    assert _part("agent.cli") == "agent.cli"
    assert _part("agent") == "agent"
