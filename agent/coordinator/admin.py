"""`agent coordinator ...`: run the server, or manage its auth keys and nodes in its database.

    agent coordinator [-c FILE]                       serve (what the systemd unit runs)
    agent coordinator serve [-c FILE]                 the same
    agent coordinator keys create [--user NAME] [--tags tag:a,tag:b] [--reusable] [--expiry 24h]
                                                      print a new auth key (once)
    agent coordinator keys list [--json]
    agent coordinator keys revoke ID
    agent coordinator nodes [--json]                  list nodes (with their user or tags)
    agent coordinator nodes remove NAME|ID            delete: its token stops working at once
    agent coordinator nodes expire NAME|ID            end its key validity now (it may come
                                                      back with a new auth key, same addresses)
    agent coordinator policy set FILE | get | check FILE | clear [--yes] [--json]
                                                      the access policy (policy_admin.py)

Every command reads the database named in the config (`-c`, default
/etc/agent/coordinator.conf), so it works beside a running coordinator, which sees each change
within a second (it polls the database's version). Run it as root or as the service user;
root works on a SQLite database as the user owning its directory, so the files SQLite adds
beside it stay the service's.
Exit status: 0 done, 1 failed (the reason on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.coordinator.config import CoordinatorConfig
    from agent.coordinator.store import AuthKey, NodeRecord, Store

__all__ = ["add_parser"]

_DEFAULT_CONFIG = "/etc/agent/coordinator.conf"  # config.DEFAULT_COORDINATOR_CONFIG, kept light


def add_parser(sub: Any) -> None:
    """Add the `coordinator` command to `agent`'s subparsers (argparse's _SubParsersAction)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "coordinator",
        help="run the coordination server, or manage its auth keys, nodes and policy",
        description="Without a subcommand: serve (as `serve`).",
    )
    _common(p, _DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_serve)
    cmds = p.add_subparsers(dest="coordinator_command", metavar="SUBCOMMAND")

    s = cmds.add_parser("serve", help="run the coordinator in the foreground")
    _common(s)
    s.set_defaults(func=_cmd_serve)

    keys = cmds.add_parser("keys", help="auth keys: create, list, revoke")
    _common(keys)
    keys.set_defaults(func=_cmd_keys_list, json=False)
    kc = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    k = kc.add_parser("create", help="print a new auth key (shown only now)")
    _common(k)
    k.add_argument(
        "--user", default=None, help="the user nodes joining with it belong to (default: default)"
    )
    k.add_argument(
        "--tags", default="", help="tag:a,tag:b: nodes joining with it are tagged (no user)"
    )
    k.add_argument("--reusable", action="store_true", help="any number of nodes may use it")
    k.add_argument(
        "--expiry", default="24h", help="how long it can be used: 90m, 24h, 7d, 0 = never"
    )
    k.set_defaults(func=_cmd_keys_create)
    k = kc.add_parser("list", help="list auth keys (never the secrets)")
    _common(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_cmd_keys_list)
    k = kc.add_parser("revoke", help="stop an auth key from being used")
    _common(k)
    k.add_argument("id", type=int, metavar="ID")
    k.set_defaults(func=_cmd_keys_revoke)

    nodes = cmds.add_parser("nodes", help="list nodes; remove or expire one")
    _common(nodes)
    nodes.add_argument("--json", action="store_true", help="print the nodes as JSON")
    nodes.set_defaults(func=_cmd_nodes_list)
    nc = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    n = nc.add_parser("list", help="list nodes")
    _common(n)
    n.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    n.set_defaults(func=_cmd_nodes_list)
    n = nc.add_parser("remove", help="delete a node: its access ends at once")
    _common(n)
    n.add_argument("node", metavar="NAME|ID")
    n.set_defaults(func=_cmd_nodes_remove)
    n = nc.add_parser("expire", help="expire a node's key now")
    _common(n)
    n.add_argument("node", metavar="NAME|ID")
    n.set_defaults(func=_cmd_nodes_expire)

    from agent.coordinator.policy_admin import add_policy_parser

    add_policy_parser(cmds, _common, _with_store)


def _common(p: argparse.ArgumentParser, default: str = argparse.SUPPRESS) -> None:
    """-c/--config (and --log-level) at every level; only the top one carries the default, so
    `agent coordinator -c F nodes` and `agent coordinator nodes -c F` both work."""
    p.add_argument(
        "-c", "--config", default=default, help=f"coordinator config (default {_DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("AGENT_LOG_LEVEL", "info")
        if default != argparse.SUPPRESS
        else argparse.SUPPRESS,
        choices=("debug", "info", "warning", "error", "critical"),
    )


# -- helpers ---------------------------------------------------------------------------------------


def _err(msg: str) -> int:
    sys.stderr.write(f"agent coordinator: {msg}\n")
    return 1


def _config(args: argparse.Namespace) -> CoordinatorConfig | int:
    from agent.config import ConfigError, format_problems
    from agent.coordinator.config import load_coordinator_config

    try:
        return load_coordinator_config(args.config)
    except ConfigError as e:
        sys.stderr.write(format_problems(e, source=args.config) + "\n")
        return 1


def _with_store(args: argparse.Namespace, action: Callable[[Store], int]) -> int:
    from agent.coordinator.store import Store, StoreError

    config = _config(args)
    if isinstance(config, int):
        return config
    try:
        _become_database_owner(config.database)
    except OSError as e:
        return _err(f"cannot act as the database's owner: {e}")
    try:
        store = Store.open(config.database)
    except (StoreError, OSError) as e:
        return _err(f"cannot open the database: {e}")
    try:
        return action(store)
    except StoreError as e:
        return _err(str(e))
    finally:
        store.close()


def _become_database_owner(database: str) -> None:
    """As root, act as the user owning the SQLite database's directory (the service's user).

    SQLite creates files beside the database (`-wal`, `-shm`, journals); made by root they
    would lock the coordinator, running as its own user, out of its own database. So root
    works on it as that user does, as `sudo -u agent-coordinator` would. Nothing changes for
    other users, for PostgreSQL, or where root owns the directory.
    """
    if os.geteuid() != 0 or "://" in database:
        return
    try:
        st = os.stat(os.path.dirname(os.path.abspath(database)))
    except FileNotFoundError:
        return  # Store.open says what is missing
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# -- commands --------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    from agent.coordinator.server import run_coordinator
    from agent.coordinator.store import StoreError
    from agent.log import configure_logging, get_logger

    config = _config(args)
    if isinstance(config, int):
        return config
    configure_logging(args.log_level)
    try:
        return run_coordinator(config, get_logger("agent.coordinator"))
    except StoreError as e:
        return _err(f"database: {e}")
    except (OSError, ssl.SSLError) as e:  # certificate files, the listen address
        return _err(str(e))
    except KeyboardInterrupt:
        return 130


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from agent.coordinator.config import parse_duration
    from agent.coordinator.identity import check_user, parse_tags
    from agent.coordinator.store import DEFAULT_USER

    try:
        lifetime = parse_duration(args.expiry)
    except ValueError as e:
        return _err(f"--expiry: {e}")
    try:
        user = check_user(args.user or DEFAULT_USER)
    except ValueError as e:
        return _err(f"--user: {e}")
    try:
        tags = parse_tags(args.tags)
    except ValueError as e:
        return _err(f"--tags: {e}")

    def create(store: Store) -> int:
        now = time.time()
        secret, _ = store.create_auth_key(
            reusable=args.reusable,
            expires=now + lifetime if lifetime else None,
            now=now,
            user=user,
            tags=tags,
        )
        sys.stdout.write(secret + "\n")
        return 0

    return _with_store(args, create)


def _key_json(k: AuthKey, now: float) -> dict[str, Any]:
    return {
        "id": k.id,
        "prefix": k.prefix,
        "user": k.user,
        "tags": list(k.tags),
        "reusable": k.reusable,
        "uses": k.uses,
        "created": _when(k.created),
        "expires": _when(k.expires),
        "state": k.state(now),
    }


def _cmd_keys_list(args: argparse.Namespace) -> int:
    def show(store: Store) -> int:
        now = time.time()
        keys = [_key_json(k, now) for k in store.list_auth_keys()]
        if args.json:
            sys.stdout.write(json.dumps(keys, indent=2) + "\n")
            return 0
        rows = [["ID", "KEY", "USER", "TAGS", "REUSABLE", "USES", "EXPIRES", "STATE"]]
        rows += [
            [
                str(k["id"]),
                f"{k['prefix']}...",
                k["user"],
                ",".join(k["tags"]) or "-",
                "yes" if k["reusable"] else "no",
                str(k["uses"]),
                k["expires"],
                k["state"],
            ]
            for k in keys
        ]
        sys.stdout.write(_table(rows) + "\n")
        return 0

    return _with_store(args, show)


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    def revoke(store: Store) -> int:
        store.revoke_auth_key(args.id)
        sys.stdout.write(f"auth key {args.id} revoked\n")
        return 0

    return _with_store(args, revoke)


def _node_json(n: NodeRecord, now: float) -> dict[str, Any]:
    from agent.proto.endpoint import format_endpoint

    return {
        "id": n.id,
        "name": n.name,
        "user": n.user,
        "tags": list(n.tags),
        "node_key": n.node_key.to_b64(),
        "disco_key": n.disco_key.to_b64(),
        "addresses": [str(n.ipv4), str(n.ipv6)],
        "endpoints": [format_endpoint(e) for e in n.endpoints],
        "home_region": n.home_region,
        "created": _when(n.created),
        "updated": _when(n.updated),
        "key_expiry": _when(n.key_expiry),
        "expired": n.expired(now),
    }


def _cmd_nodes_list(args: argparse.Namespace) -> int:
    def show(store: Store) -> int:
        now = time.time()
        nodes = [_node_json(n, now) for n in store.list_nodes()]
        if args.json:
            sys.stdout.write(json.dumps(nodes, indent=2) + "\n")
            return 0
        head = "ID NAME USER TAGS ADDRESSES NODE_KEY HOME KEY_EXPIRY ENDPOINTS"
        rows = [[h.replace("_", " ") for h in head.split()]]
        rows += [
            [
                str(n["id"]),
                n["name"],
                n["user"] or "-",
                ",".join(n["tags"]) or "-",
                " ".join(n["addresses"]),
                n["node_key"][:10] + "...",
                str(n["home_region"] or "-"),
                "expired" if n["expired"] else n["key_expiry"],
                " ".join(n["endpoints"]) or "-",
            ]
            for n in nodes
        ]
        sys.stdout.write(_table(rows) + "\n")
        return 0

    return _with_store(args, show)


def _cmd_nodes_remove(args: argparse.Namespace) -> int:
    def remove(store: Store) -> int:
        node = store.find_node(args.node)
        store.remove_node(node.id)
        sys.stdout.write(f"node {node.name} (id {node.id}) removed\n")
        return 0

    return _with_store(args, remove)


def _cmd_nodes_expire(args: argparse.Namespace) -> int:
    def expire(store: Store) -> int:
        node = store.find_node(args.node)
        store.expire_node(node.id, time.time())
        sys.stdout.write(f"node {node.name} (id {node.id}) expired\n")
        return 0

    return _with_store(args, expire)
