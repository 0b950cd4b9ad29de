"""`agent join` (agent/join.py) and `agent genkey --out`: the config edit, the unit, the key file.

The service side (systemctl, a real coordinator) runs in tests/system/test_install.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent import cli
from agent.join import JoinError, control_section, read_auth_key, run_join, unit_for, with_control
from agent.keys import NodePrivate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "agent.conf.example").read_text()
URL = "https://198.18.0.10:8443"


def _without_control(doc: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in doc.items() if k != "control"}


def test_control_is_added_after_interface_and_nothing_else_changes() -> None:
    section = control_section(URL, "agentkey-1", "/etc/agent/lab-ca.pem", "laptop")
    out = with_control(EXAMPLE, section)
    doc = tomllib.loads(out)
    assert doc["control"] == {
        "url": URL,
        "auth_key": "agentkey-1",
        "ca_file": "/etc/agent/lab-ca.pem",
        "hostname": "laptop",
    }
    assert _without_control(doc) == tomllib.loads(EXAMPLE)
    # Every line of the original is still there, comments included, in order.
    at = out.index(section)
    rest = out[:at] + out[at + len(section) :]
    assert [s for s in rest.splitlines() if s] == [s for s in EXAMPLE.splitlines() if s]
    assert out.index("[control]") < out.index("[derp]")
    assert out.index("[interface]") < out.index("[control]")


def test_joining_again_replaces_control_in_place() -> None:
    once = with_control(EXAMPLE, control_section(URL, "agentkey-1", None, None))
    twice = with_control(once, control_section("https://coord:1", "agentkey-2", None, None))
    doc = tomllib.loads(twice)
    assert doc["control"] == {"url": "https://coord:1", "auth_key": "agentkey-2"}
    assert _without_control(doc) == tomllib.loads(EXAMPLE)
    assert sum(line.startswith("[control]") for line in twice.splitlines()) == 1
    assert len(twice.splitlines()) == len(once.splitlines())


def test_control_as_the_last_table_and_a_config_without_interface() -> None:
    text = '[interface]\nprivate_key_file = "k"\n\n[control]\nurl = "https://old:1"\n'
    out = with_control(text, control_section(URL, "k2", None, None))
    assert tomllib.loads(out)["control"]["url"] == URL
    assert out.startswith('[interface]\nprivate_key_file = "k"\n')
    bare = with_control("", control_section(URL, "k", None, None))
    assert tomllib.loads(bare) == {"control": {"url": URL, "auth_key": "k"}}


def test_strings_are_escaped() -> None:
    key = 'agentkey-"quoted"\\ and \u00e9'
    doc = tomllib.loads(with_control("", control_section(URL, key, None, 'host "x"')))
    assert doc["control"]["auth_key"] == key
    assert doc["control"]["hostname"] == 'host "x"'


def test_bad_input_is_refused() -> None:
    with pytest.raises(JoinError, match="not an https:// URL"):
        control_section("http://coord:8443", "k", None, None)
    with pytest.raises(JoinError, match="not valid TOML"):
        with_control("[interface\n", control_section(URL, "k", None, None))


def test_unit_for_config_path() -> None:
    assert unit_for(Path("/etc/agent/agent.conf")) == "agent.service"
    assert unit_for(Path("/etc/agent/wg1.conf")) == "agent@wg1.service"
    assert unit_for(Path("/tmp/agent.conf")) is None


def test_auth_key_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "auth.key"
    f.write_text("agentkey-abc\n")
    assert read_auth_key(f"file:{f}") == "agentkey-abc"
    assert read_auth_key("agentkey-xyz") == "agentkey-xyz"
    with pytest.raises(JoinError, match="No such file"):
        read_auth_key(f"file:{tmp_path / 'missing'}")
    f.write_text("\n")
    with pytest.raises(JoinError, match="empty"):
        read_auth_key(f"file:{f}")


def test_run_join_without_systemd_writes_and_tells(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(EXAMPLE)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    said: list[str] = []

    def never(config: Path, wait: float) -> list[str]:
        raise AssertionError("nothing was started")

    got = run_join(
        conf, url=URL, auth_key="agentkey-1", ca_file=str(ca), hostname=None, start=False,
        addresses=never, say=said.append,
    )  # fmt: skip
    assert got == []
    assert conf.stat().st_mode & 0o777 == 0o640
    assert tomllib.loads(conf.read_text())["control"]["ca_file"] == str(ca)
    assert said[-1] == f"start the agent with: agent up -c {conf}"
    with pytest.raises(JoinError, match="no such file"):
        run_join(
            conf, url=URL, auth_key="k", ca_file=str(tmp_path / "none.pem"), hostname=None,
            start=False, addresses=never,
        )  # fmt: skip
    with pytest.raises(JoinError, match="no such config"):
        run_join(
            tmp_path / "missing.conf", url=URL, auth_key="k", ca_file=None, hostname=None,
            start=False, addresses=never,
        )  # fmt: skip


def test_cli_join_no_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(EXAMPLE)
    rc = cli.main(["join", URL, "--auth-key", "agentkey-1", "-c", str(conf), "--no-start"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "start the agent with" in err
    rc = cli.main(["join", "http://x", "--auth-key", "k", "-c", str(conf), "--no-start"])
    _, err = capsys.readouterr()
    assert rc == 1
    assert err == "agent: join: 'http://x' is not an https:// URL\n"


# -- agent genkey --out ---------------------------------------------------------------------------


def test_genkey_out_writes_a_private_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "agent.key"
    assert cli.main(["genkey", "--out", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_text()
    NodePrivate.from_b64(first)
    assert capsys.readouterr().out == ""
    # again: refused without --if-missing, kept with it
    assert cli.main(["genkey", "--out", str(key)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["genkey", "--out", str(key), "--if-missing"]) == 0
    assert key.read_text() == first
    assert not (tmp_path / "agent.key.new").exists()


def test_genkey_if_missing_never_replaces_something_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "agent.key"
    key.write_text("not a key\n")
    assert cli.main(["genkey", "--out", str(key), "--if-missing"]) == 1
    assert "holds no private key" in capsys.readouterr().err
    assert key.read_text() == "not a key\n"
