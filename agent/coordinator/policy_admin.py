"""`agent coordinator policy set FILE | get | check FILE | clear`: the access policy in the
database.

    set FILE    check the file (HuJSON, Tailscale's policy syntax) against the users and nodes
                the database knows, run its `tests`, and store it; every coordinator sends new
                netmaps within a second (the version is bumped)
    check FILE  the same checks, storing nothing
    get         print the stored policy as it was set
    clear       remove the policy: no policy, every node reaches every other again (netmaps
                without a packet filter). On a terminal it asks first (`--yes` does not);
                `--json` prints {"cleared": bool, "version": N}

A refused file changes nothing and is reported as `FILE:LINE:COLUMN: message` for syntax, or
`FILE: acls[2].dst[0]: message (line L, column C)` for meaning, and every failing test by its
path (`tests[0].deny[1]: alice@ should not reach tag:db:5432`). No policy: every node reaches
every other (`get` exits 1 saying so).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept light: `agent` builds this parser on every run
    from agent.coordinator.store import Store
    from agent.policy.model import Policy

__all__ = ["add_policy_parser", "policy_check", "policy_clear", "policy_get", "policy_set"]

WithStore = Callable[[argparse.Namespace, Callable[["Store"], int]], int]


def add_policy_parser(
    cmds: Any, common: Callable[[argparse.ArgumentParser], None], with_store: WithStore
) -> None:
    """`policy set|get|check` under admin.py's subcommands (`common` adds -c and --log-level,
    `with_store` opens the configured database around an action)."""
    pol: argparse.ArgumentParser = cmds.add_parser(
        "policy", help="the access policy: set, get, check, clear"
    )
    common(pol)
    pol.set_defaults(func=lambda _args: _usage(pol))
    actions = pol.add_subparsers(dest="policy_command", metavar="ACTION")
    p = actions.add_parser("set", help="check a policy file, run its tests and store it")
    common(p)
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=lambda a: with_store(a, lambda store: policy_set(store, a.file)))
    p = actions.add_parser("get", help="print the stored policy")
    common(p)
    p.set_defaults(func=lambda a: with_store(a, policy_get))
    p = actions.add_parser("check", help="check a policy file and run its tests; store nothing")
    common(p)
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=lambda a: with_store(a, lambda store: policy_check(store, a.file)))
    p = actions.add_parser("clear", help="remove the policy: every node reaches every other")
    common(p)
    p.add_argument("--yes", action="store_true", help="clear without asking on a terminal")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(
        func=lambda a: with_store(a, lambda store: policy_clear(store, yes=a.yes, as_json=a.json))
    )


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_usage(sys.stderr)
    sys.stderr.write(f"{p.prog}: an ACTION is required (set, get, check or clear)\n")
    return 2


def _fail(msg: str) -> int:
    sys.stderr.write(f"agent coordinator: {msg}\n")
    return 1


def _checked(store: Store, path: str) -> tuple[str, Policy] | int:
    """The file's text and policy when every check and test passes; else 1, reported."""
    from agent.coordinator.identity import policy_nodes
    from agent.policy.checks import check_policy
    from agent.policy.errors import PolicyError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read the policy {path}: {e}")
    try:
        policy = check_policy(
            text, known_users=store.known_users(), nodes=policy_nodes(store.list_nodes())
        )
    except PolicyError as e:
        where = f"{path}:" if e.position is not None and not e.path else f"{path}: "
        return _fail(f"policy refused, nothing changed:\n{where}{e}")
    return text, policy


def _summary(policy: Policy) -> str:
    text = f"{len(policy.acls)} rule(s), {len(policy.tests)} test(s) passed"
    if policy.ignored:
        text += f"; not enforced here: {', '.join(policy.ignored)}"
    return text


def policy_check(store: Store, path: str) -> int:
    checked = _checked(store, path)
    if isinstance(checked, int):
        return checked
    sys.stdout.write(f"policy OK: {_summary(checked[1])}\n")
    return 0


def policy_set(store: Store, path: str) -> int:
    checked = _checked(store, path)
    if isinstance(checked, int):
        return checked
    text, policy = checked
    version = store.set_policy(text)
    sys.stdout.write(f"policy set (network version {version}): {_summary(policy)}\n")
    return 0


def policy_get(store: Store) -> int:
    text = store.policy()
    if text is None:
        return _fail("no policy is set: every node reaches every other (policy set FILE)")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


_QUESTION = (
    "Clear the access policy? Every node will reach every other on every port, and see every "
    "node as a peer. [y/N] "
)


def _confirmed() -> bool:
    """Asked on the terminal: whether the user answers yes (anything else, or EOF, is no)."""
    sys.stderr.write(_QUESTION)
    sys.stderr.flush()
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def policy_clear(store: Store, *, yes: bool = False, as_json: bool = False) -> int:
    if store.policy() is not None and not yes and sys.stdin.isatty() and not _confirmed():
        return _fail("policy clear: not confirmed, nothing changed")
    version = store.clear_policy()
    if as_json:
        shown = store.version() if version is None else version
        sys.stdout.write(json.dumps({"cleared": version is not None, "version": shown}) + "\n")
    elif version is None:
        sys.stdout.write("no policy was set: every node already reaches every other\n")
    else:
        sys.stdout.write(
            f"policy cleared (network version {version}): every node reaches every other\n"
        )
    return 0
