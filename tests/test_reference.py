"""docs/reference.md against the code: every command, flag and config key, both ways.

The commands come from walking `agent.cli._parser()` (the coordinator's subcommands included);
the config schema from recording every key set the config checker accepts while it parses a
node config and a coordinator config that contain every table. A flag or key that is in the
code but not in the docs fails, and so does one in the docs that the code no longer has.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import agent.config
from agent.cli import _parser
from agent.config import parse_config
from agent.coordinator.config import parse_coordinator_config
from agent.keys import NodePrivate

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reference.md"

# (table heading, e.g. "[[peers]]") -> keys; the top level is "" and lists table names
Schema = dict[str, set[str]]


# -- reading the docs -----------------------------------------------------------------------------


def _split(text: str, level: int) -> dict[str, str]:
    """Heading title -> body, for the headings of exactly `level` #s (body ends at the next
    heading of this level or above)."""
    out: dict[str, str] = {}
    title: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^(#+) (.*)$", line)
        if m and len(m.group(1)) <= level:
            if title is not None:
                out[title] = "\n".join(body)
            title = m.group(2).strip() if len(m.group(1)) == level else None
            body = []
        elif title is not None:
            body.append(line)
    if title is not None:
        out[title] = "\n".join(body)
    return out


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _chapter(word: str) -> str:
    """The body of the one `## ` chapter whose title contains `word`."""
    found = [body for title, body in _split(_doc(), 2).items() if word in title]
    assert len(found) == 1, f"docs/reference.md: expected one '## ...{word}...' chapter"
    return found[0]


def _headed(chapter: str) -> dict[str, str]:
    """`### `x`` sections of a chapter: x -> body."""
    return {t.strip("`"): body for t, body in _split(chapter, 3).items() if t.startswith("`")}


def _first_cells(body: str) -> list[str]:
    """The first cell of every table row (not headers or rules), backticks off, `\\|` unescaped."""
    lines = body.splitlines()
    rule = re.compile(r"^\|[-:| ]+\|$")
    cells = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or rule.match(line):
            continue
        if i + 1 < len(lines) and rule.match(lines[i + 1]):
            continue  # a header row
        cell = re.split(r"(?<!\\)\|", line)[1].strip().replace("\\|", "|")
        cells.append(cell.strip("`"))
    return cells


# -- the commands ---------------------------------------------------------------------------------


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("agent",)
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string and positional metavar of `parser` (not -h/--help)."""
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            names += action.option_strings
        else:
            metavar = action.metavar or action.dest
            names.append(metavar if isinstance(metavar, str) else " ".join(metavar))
    return names


COMMANDS = dict(_commands(_parser()))


def _command_sections() -> dict[str, str]:
    return {t: b for t, b in _headed(_chapter("Commands")).items() if t.startswith("agent")}


def test_every_command_has_a_section() -> None:
    missing = sorted(set(COMMANDS) - set(_command_sections()))
    assert missing == [], f"docs/reference.md has no '### `...`' section for: {missing}"


def test_every_documented_command_exists() -> None:
    stale = sorted(set(_command_sections()) - set(COMMANDS))
    assert stale == [], f"docs/reference.md documents commands the parser does not have: {stale}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_argument_is_documented(command: str) -> None:
    body = _command_sections().get(command)
    if body is None:
        pytest.fail(f"docs/reference.md has no section for `{command}`")
    tokens = {tok for cell in _first_cells(body) for tok in re.split(r"[,\s]+", cell) if tok}
    missing = [a for a in _arguments(COMMANDS[command]) if a not in tokens]
    options = {s for a in COMMANDS[command]._actions for s in a.option_strings}
    stale = sorted(t for t in tokens if t.startswith("-") and t not in options)
    problems = [f"no table row for {missing}"] if missing else []
    problems += [f"lists flags it does not have: {stale}"] if stale else []
    assert problems == [], f"`{command}` in docs/reference.md: {'; '.join(problems)}"


def test_help_is_documented_once() -> None:
    assert "`-h, --help`" in _chapter("Commands")


# -- the config schema ----------------------------------------------------------------------------


def _checker_class() -> type[Any]:
    """The config checker: the class in agent.config with `known(self, path, table, allowed)`."""
    for obj in vars(agent.config).values():
        if isinstance(obj, type) and "known" in vars(obj):
            params = list(inspect.signature(vars(obj)["known"]).parameters)
            if params == ["self", "path", "table", "allowed"]:
                return obj
    raise AssertionError("agent.config has no class with known(self, path, table, allowed)")


def _heading(path: str) -> str:
    """A checker path as the TOML header it is written under: `peers[0]` -> `[[peers]]`,
    `derp.regions[0].nodes[0]` -> `[[derp.regions.nodes]]`, `interface` -> `[interface]`."""
    if not path:
        return ""
    name = re.sub(r"\[\d+\]", "", path)
    return f"[[{name}]]" if path.endswith("]") else f"[{name}]"


def _record(monkeypatch: pytest.MonkeyPatch, parse: Any) -> Schema:
    cls = _checker_class()
    original = cls.known
    seen: Schema = {}

    def known(self: Any, path: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        seen.setdefault(_heading(path), set()).update(allowed)
        original(self, path, table, allowed)

    monkeypatch.setattr(cls, "known", known)
    parse()
    monkeypatch.undo()
    return seen


_REGION = """
[[derp.regions]]
id = 900
code = "lab"
nodes = [{ host = "198.18.0.10" }]
"""

NODE_CONF = f"""
[interface]
private_key = "{NodePrivate.generate().to_b64()}"
addresses = ["100.64.0.1/32"]

[control]
url = "https://coord.example.net:8443"
auth_key = "agentkey-x"

[derp]
{_REGION}

[[peers]]
public_key = "{NodePrivate.generate().public().to_b64()}"
allowed_ips = ["100.64.0.2/32"]
"""

COORDINATOR_CONF = f"""
[coordinator]
[tls]
[addresses]
[dns]
{_REGION}
"""


def _check_schema(schema: Schema, chapter_word: str) -> None:
    sections = {t: b for t, b in _headed(_chapter(chapter_word)).items() if t.startswith("[")}
    where = f"docs/reference.md, {chapter_word} chapter"
    # every top-level table the checker accepts was in the config parsed above
    unexercised = sorted(
        name for name in schema.get("", set()) if not any(h.strip("[]") == name for h in schema)
    )
    assert unexercised == [], f"extend the test config with the tables {unexercised}"
    tables = {h: keys for h, keys in schema.items() if h}
    problems = []
    if missing_tables := sorted(set(tables) - set(sections)):
        problems.append(f"no '### `...`' section for {missing_tables}")
    if stale_tables := sorted(set(sections) - set(tables)):
        problems.append(f"sections for tables the checker does not have: {stale_tables}")
    for heading, keys in sorted(tables.items()):
        cells = _first_cells(sections.get(heading, ""))
        documented = {c for c in cells if re.fullmatch(r"[a-z_0-9]+", c)}
        if heading in sections and (missing := sorted(keys - documented)):
            problems.append(f"`{heading}` does not list the keys {missing}")
        if stale := sorted(documented - keys):
            problems.append(f"`{heading}` lists keys the checker refuses: {stale}")
    assert problems == [], f"{where}: " + "; ".join(problems)


def test_node_config_keys_are_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = _record(monkeypatch, lambda: parse_config(NODE_CONF))
    assert {"[interface]", "[[peers]]", "[[derp.regions.nodes]]"} <= set(schema)
    _check_schema(schema, "agent.conf")


def test_coordinator_config_keys_are_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = _record(monkeypatch, lambda: parse_coordinator_config(COORDINATOR_CONF))
    assert {"[coordinator]", "[tls]", "[[derp.regions.nodes]]"} <= set(schema)
    _check_schema(schema, "coordinator.conf")


# -- the environment ------------------------------------------------------------------------------


def test_environment_variables_are_documented() -> None:
    used: set[str] = set()
    for source in (REPO / "agent").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        used |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["']([A-Z0-9_]+)["']""", text))
        used |= set(re.findall(r"""getenv\(\s*["']([A-Z0-9_]+)["']""", text))
    unit = (REPO / "systemd" / "agent-derper.service").read_text(encoding="utf-8")
    used |= set(re.findall(r"\b(DERPER_[A-Z0-9_]+)", unit))
    assert used, "found no environment variables: has the way they are read changed?"
    documented = set(_first_cells(_chapter("Environment")))
    missing = sorted(used - documented)
    assert missing == [], f"docs/reference.md, Environment: no row for {missing}"
