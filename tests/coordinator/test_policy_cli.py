"""`agent coordinator keys|nodes|policy` in-process: users and tags on keys and nodes, and a
policy set, read back, checked, refused (syntax, meaning, failing tests) without change, and
cleared (asked first on a terminal)."""

from __future__ import annotations

import io
import json
import sys
import time
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from agent.cli import main
from agent.coordinator.store import Store
from agent.keys import DiscoPrivate, NodePrivate
from tests.coordinator.test_policy_netmaps import POLICY


@pytest.fixture
def conf(tmp_path: Path) -> str:
    path = tmp_path / "coordinator.conf"
    path.write_text(f'[coordinator]\ndatabase = "{tmp_path / "c.db"}"\n')
    return str(path)


def run(capsys: pytest.CaptureFixture[str], conf: str, *args: str) -> tuple[int, str, str]:
    rc = main(["coordinator", "-c", conf, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _join(conf: str, key: str, hostname: str) -> None:
    database = conf.replace("coordinator.conf", "c.db")
    store = Store.open(database)
    try:
        store.register_node(
            auth_key=key,
            node_key=NodePrivate.generate().public(),
            disco_key=DiscoPrivate.generate().public(),
            hostname=hostname,
            endpoints=(),
            home_region=None,
            timestamp=time.time(),
            key_lifetime=None,
            ipv4_range=IPv4Network("100.64.0.0/10"),
            ipv6_range=IPv6Network("fd7a:115c:a1e0::/48"),
            now=time.time(),
        )
    finally:
        store.close()


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_keys_and_nodes_show_users_and_tags(capsys: pytest.CaptureFixture[str], conf: str) -> None:
    rc, alice, _ = run(capsys, conf, "keys", "create", "--user", "alice", "--reusable")
    assert rc == 0
    assert alice.startswith("agentkey-")
    rc, web, _ = run(capsys, conf, "keys", "create", "--user", "alice", "--tags", "tag:web")
    assert rc == 0
    rc, _, err = run(capsys, conf, "keys", "create", "--tags", "web")
    assert (rc, err) == (1, "agent coordinator: --tags: 'web' is not a tag (tag:NAME)\n")
    rc, _, err = run(capsys, conf, "keys", "create", "--user", "two words")
    assert rc == 1
    assert "--user: 'two words' is not a user name" in err
    rc, out, _ = run(capsys, conf, "keys", "list", "--json")
    assert [(k["user"], k["tags"]) for k in json.loads(out)] == [
        ("alice", []), ("alice", ["tag:web"])
    ]  # fmt: skip
    rc, out, _ = run(capsys, conf, "keys", "list")
    assert out.splitlines()[0].split()[:4] == ["ID", "KEY", "USER", "TAGS"]
    assert out.splitlines()[2].split()[2:4] == ["alice", "tag:web"]
    _join(conf, alice.strip(), "laptop")
    _join(conf, web.strip(), "web")
    rc, out, _ = run(capsys, conf, "nodes", "--json")
    assert [(n["name"], n["user"], n["tags"]) for n in json.loads(out)] == [
        ("laptop", "alice", []), ("web", None, ["tag:web"])
    ]  # fmt: skip
    rc, out, _ = run(capsys, conf, "nodes")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0][:4] == ["ID", "NAME", "USER", "TAGS"]
    assert lines[1][1:4] == ["laptop", "alice", "-"]
    assert lines[2][1:4] == ["web", "-", "tag:web"]


def test_policy_set_get_check_and_refusals(
    capsys: pytest.CaptureFixture[str], conf: str, tmp_path: Path
) -> None:
    for user in ("alice", "bob"):
        assert run(capsys, conf, "keys", "create", "--user", user)[0] == 0
    rc, _, err = run(capsys, conf, "policy", "get")
    assert rc == 1
    assert "no policy is set" in err

    good = _file(tmp_path, "good.hujson", POLICY)
    rc, out, _ = run(capsys, conf, "policy", "check", good)
    assert (rc, out) == (0, "policy OK: 3 rule(s), 2 test(s) passed\n")
    assert run(capsys, conf, "policy", "get")[0] == 1  # check stores nothing

    syntax = _file(tmp_path, "syntax.hujson", POLICY.replace('"groups":', '"groups"'))
    semantic = _file(tmp_path, "semantic.hujson", POLICY.replace("tag:db:5432", "tag:dbb:5432", 1))
    denies_web = POLICY.replace('"deny": ["tag:db:5432"', '"deny": ["tag:web:80"')
    failing = _file(tmp_path, "failing.hujson", denies_web)
    carol = POLICY.replace('"alice@", "bob@"', '"alice", "carol"')  # carol has no key or node
    unknown = _file(tmp_path, "unknown.hujson", carol)
    expected = {
        syntax: f"{syntax}:3:12: ",
        semantic: f"{semantic}: acls[1].dst[0]: unknown tag 'tag:dbb' (line 7,",
        failing: f"{failing}: 1 policy test(s) failed:\ntests[0].deny[0]: "
        "alice@ should not reach tag:web:80",
        unknown: f"{unknown}: groups.group:dev[1]: a group can contain only users, not 'carol'",
    }
    for action in ("check", "set"):
        for path, message in expected.items():
            rc, out, err = run(capsys, conf, "policy", action, path)
            assert rc == 1, (action, path)
            assert out == ""
            assert err.startswith("agent coordinator: policy refused, nothing changed:\n"), err
            assert message in err, err
    assert run(capsys, conf, "policy", "get")[0] == 1  # nothing was stored

    rc, out, _ = run(capsys, conf, "policy", "set", good)
    assert rc == 0
    assert out.startswith("policy set (network version ")
    rc, out, _ = run(capsys, conf, "policy", "get")
    assert (rc, out) == (0, POLICY + "\n")
    # a refused file leaves the stored policy as it was
    assert run(capsys, conf, "policy", "set", failing)[0] == 1
    assert run(capsys, conf, "policy", "get")[1] == POLICY + "\n"
    # with the policy in place, tagOwners decide who may make tagged keys
    rc, _, err = run(capsys, conf, "keys", "create", "--user", "carol", "--tags", "tag:web")
    assert rc == 1
    assert "'carol' may not assign tag:web" in err
    assert run(capsys, conf, "keys", "create", "--user", "bob", "--tags", "tag:web")[0] == 0
    rc, _, err = run(capsys, conf, "policy")
    assert rc == 2
    assert "ACTION is required" in err
    rc, _, err = run(capsys, conf, "policy", "set", str(tmp_path / "missing.hujson"))
    assert rc == 1
    assert "cannot read the policy" in err


class _Terminal(io.StringIO):
    """Standard input as a terminal, holding what the user types."""

    def isatty(self) -> bool:
        return True


def test_policy_clear(
    capsys: pytest.CaptureFixture[str],
    conf: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no question
    for user in ("alice", "bob"):
        assert run(capsys, conf, "keys", "create", "--user", user)[0] == 0
    rc, out, _ = run(capsys, conf, "policy", "clear")
    assert (rc, out) == (0, "no policy was set: every node already reaches every other\n")
    rc, out, _ = run(capsys, conf, "policy", "clear", "--json")
    version = json.loads(out)["version"]
    assert (rc, json.loads(out)) == (0, {"cleared": False, "version": version})

    good = _file(tmp_path, "good.hujson", POLICY)
    assert run(capsys, conf, "policy", "set", good)[0] == 0
    # on a terminal it asks, and anything but yes changes nothing
    for answer in ("\n", "n\n", "no\n", ""):
        monkeypatch.setattr(sys, "stdin", _Terminal(answer))
        rc, out, err = run(capsys, conf, "policy", "clear")
        assert (rc, out) == (1, "")
        assert err.startswith("Clear the access policy? Every node will reach every other")
        assert err.endswith(
            "[y/N] agent coordinator: policy clear: not confirmed, nothing changed\n"
        )
        assert run(capsys, conf, "policy", "get")[1] == POLICY + "\n"
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    rc, out, err = run(capsys, conf, "policy", "clear")
    assert rc == 0
    assert err.endswith("[y/N] ")
    assert out.startswith("policy cleared (network version ")
    assert out.endswith("): every node reaches every other\n")
    assert run(capsys, conf, "policy", "get")[0] == 1
    # without a policy, tags need no owner again
    assert run(capsys, conf, "keys", "create", "--user", "carol", "--tags", "tag:web")[0] == 0

    # --yes does not ask, even on a terminal; --json tells what happened
    assert run(capsys, conf, "policy", "set", good)[0] == 0
    monkeypatch.setattr(sys, "stdin", _Terminal(""))
    rc, out, err = run(capsys, conf, "policy", "clear", "--yes", "--json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == {"cleared": True, "version": version + 4}  # two sets, two clears
    assert run(capsys, conf, "policy", "get")[0] == 1
