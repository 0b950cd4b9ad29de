"""agent.cli: key tools, `up` refusing bad configs, `status` against no daemon and a fake one."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent import cli
from agent.api import ApiError, DerpStatus, PeerStatus, Request, Response, Status
from agent.cli_text import format_pong, format_status
from agent.config import Config
from agent.keys import NodePrivate
from agent.log import configure_logging, get_logger
from agent.node.progress import JsonProgress, Progress, TerminalProgress

WG = shutil.which("wg")


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        rc = cli.main(list(argv))
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return rc, out, err


# -- keys -----------------------------------------------------------------------------------------


def test_genkey_pubkey_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "genkey")
    assert (rc, err) == (0, "")
    priv = NodePrivate.from_b64(out)
    assert out.endswith("\n")
    assert len(out.strip()) == 44
    rc, pub, err = run(capsys, "pubkey", stdin=out)
    assert (rc, err) == (0, "")
    assert pub.strip() == priv.public().to_b64()


def test_genpsk(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "genpsk")
    assert rc == 0
    assert len(out.strip()) == 44


@pytest.mark.skipif(WG is None, reason="wg (wireguard-tools) not installed")
def test_keys_interchangeable_with_wg(capsys: pytest.CaptureFixture[str]) -> None:
    assert WG is not None
    _, ours, _ = run(capsys, "genkey")
    wg_pub = subprocess.run([WG, "pubkey"], input=ours, capture_output=True, text=True, check=True)
    _, our_pub, _ = run(capsys, "pubkey", stdin=ours)
    assert our_pub == wg_pub.stdout
    theirs = subprocess.run([WG, "genkey"], capture_output=True, text=True, check=True).stdout
    wg_pub = subprocess.run(
        [WG, "pubkey"], input=theirs, capture_output=True, text=True, check=True
    )
    _, our_pub, _ = run(capsys, "pubkey", stdin=theirs)
    assert our_pub == wg_pub.stdout


@pytest.mark.parametrize("bad", ["", "hello", "YWJj\n", "A" * 200])
def test_pubkey_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    rc, out, err = run(capsys, "pubkey", stdin=bad)
    assert rc == 1
    assert out == ""
    assert err.startswith("agent: pubkey: the input is not a private key (")
    assert err.count("\n") == 1


def test_python_dash_m_agent_has_no_traceback() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent", "pubkey"],
        input="nonsense",
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=30,
        check=False,
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("agent: pubkey:")


def test_no_command_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys)
    assert rc == 2
    assert "usage: agent" in err
    rc, out, _ = run(capsys, "--version")
    assert rc == 0
    assert out.startswith("agent ")
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2
    assert "invalid choice" in err


# -- up -------------------------------------------------------------------------------------------


class FakeUp:
    """What `up` handed to the stand-in daemon: configs, progress reporters, logging setups."""

    def __init__(self) -> None:
        self.configs: list[Config] = []
        self.progress: list[Progress] = []
        self.logging: list[tuple[str, dict[str, Any]]] = []

    def __eq__(self, other: object) -> bool:  # `fake_daemon == []`: nothing was started
        return self.configs == other


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> FakeUp:
    """Stand-in for agent.node.main: records what `up` hands over; no logging set up."""
    fake = FakeUp()

    def run_daemon(config: Config, progress: Progress) -> int:
        fake.configs.append(config)
        fake.progress.append(progress)
        return 0

    module = types.ModuleType("agent.node.main")
    module.run_daemon = run_daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "agent.node.main", module)
    monkeypatch.setattr(cli, "configure_logging", lambda lvl, **k: fake.logging.append((lvl, k)))
    return fake


GOOD = f"""
[interface]
private_key = "{NodePrivate(bytes(range(1, 33))).to_b64()}"
addresses = ["100.64.0.1/32"]
"""


def test_up_with_bad_config_prints_every_problem_and_touches_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_daemon: FakeUp
) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(GOOD + 'mtu = 10\n[[peers]]\npublic_key = "x"\nallowed_ips = ["1.2.3.4/8"]\n')
    rc, out, err = run(capsys, "up", "-c", str(conf))
    assert rc == 1
    assert out == ""
    assert err.splitlines() == [
        f"{conf}: interface.mtu: 10 is out of range 576..65535",
        f"{conf}: peers[0].public_key: not a base64 key (not valid base64)",
        f"{conf}: peers[0].allowed_ips[0]: '1.2.3.4/8' has host bits set (did you mean 1.0.0.0/8?)",
    ]
    assert fake_daemon == []


def test_up_with_missing_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_daemon: FakeUp
) -> None:
    conf = tmp_path / "nope.conf"
    rc, _, err = run(capsys, "up", "-c", str(conf))
    assert rc == 1
    assert err == f"{conf}: cannot read the config: No such file or directory\n"
    assert fake_daemon == []


def test_up_hands_the_config_to_the_daemon(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_daemon: FakeUp
) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(GOOD)
    rc, _, _ = run(capsys, "up", "-c", str(conf), "--log-level", "debug")
    assert rc == 0
    (config,) = fake_daemon.configs
    assert str(config.interface.addresses[0]) == "100.64.0.1/32"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_up_shows_progress_only_on_a_terminal_and_never_with_json(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fake_daemon: FakeUp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(GOOD)
    monkeypatch.delenv("AGENT_LOG_LEVEL", raising=False)
    run(capsys, "up", "-c", str(conf))  # stdout captured: not a terminal
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    run(capsys, "up", "-c", str(conf))
    run(capsys, "up", "-c", str(conf), "--log-level", "debug")
    run(capsys, "up", "-c", str(conf), "--json")
    kinds = [type(p) for p in fake_daemon.progress]
    assert kinds == [Progress, TerminalProgress, TerminalProgress, JsonProgress]
    levels = [(level, kw["json"]) for level, kw in fake_daemon.logging]
    # a terminal: progress lines, logs from warning on (unless asked); --json: JSON logs
    assert levels == [("info", None), ("warning", None), ("debug", None), ("info", True)]
    assert fake_daemon.logging[1][1]["before_write"] is None  # stderr is not the terminal
    monkeypatch.setattr(sys, "stderr", terminal)
    run(capsys, "up", "-c", str(conf))
    assert fake_daemon.logging[4][1]["before_write"] == fake_daemon.progress[4].clear
    assert terminal.getvalue() == ""  # the stand-in daemon said nothing


# -- status ---------------------------------------------------------------------------------------

STATUS = Status(
    interface="agent0",
    public_key="A" * 43 + "=",
    listen_port=41641,
    addresses=("100.64.0.1/32",),
    derp=DerpStatus(home_region=900, connected_regions=(900,)),
    peers=(
        PeerStatus(
            name="b",
            public_key="B" * 43 + "=",
            allowed_ips=("100.64.0.2/32", "fd7a:115c:a1e0::2/128"),
            path="direct",
            endpoint="198.18.0.2:41641",
            derp_region=900,
            latest_handshake=1_000_000 - 65,
            rx_bytes=476,
            tx_bytes=3 * 1024 * 1024 + 1,
            latency_ms=0.4,
            persistent_keepalive=25,
            user="alice",
        ),
        PeerStatus(name="c", public_key="C" * 43 + "=", tags=("tag:web",)),
    ),
    drops={"replayed_counter": 2},
    dataplane={
        "impl": "python",
        "impl_reason": "auto: the compiled module does not load: no module",
        "offload": "tso+gso",
        "disco": {"sent_ping": 3, "received_pong": 2},
    },
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for UNIX socket paths (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="agt-cli-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FakeDaemon:
    """Answers each connection on a UNIX socket with `answer(request)`; records the requests."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.requests: list[Request] = []
        self.answer = answer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.sock.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\n" not in buf and (chunk := conn.recv(4096)):
                    buf += chunk
                self.requests.append(Request.parse(buf))
                conn.sendall(self.answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def daemon_at(short_dir: Path) -> Iterator[Any]:
    made: list[FakeDaemon] = []

    def start(answer: bytes) -> tuple[str, FakeDaemon]:
        path = short_dir / f"d{len(made)}.sock"
        made.append(FakeDaemon(path, answer))
        return str(path), made[-1]

    yield start
    for d in made:
        d.close()


def test_api_schema_round_trips_and_rejects() -> None:
    line = STATUS.to_json()
    assert "\n" not in line
    assert Status.from_json(line) == STATUS
    newer = {**STATUS.to_dict(), "added_later": 1}  # fields may be added: old readers ignore them
    assert Status.from_dict(newer) == STATUS
    assert Request.parse(b'{"op": "ping", "peer": "b"}\n') == Request("ping", {"peer": "b"})
    assert Request("status").encode() == b'{"op":"status"}\n'
    assert Response.parse(Response.failure("no").encode()) == Response(False, {}, "no")
    with pytest.raises(ApiError, match="unknown op 'frob'"):
        Request.parse(b'{"op": "frob"}')
    with pytest.raises(ApiError, match="'path'"):
        PeerStatus.from_dict({"name": "b", "public_key": "k", "path": "sideways"})
    with pytest.raises(ApiError, match="'rx_bytes'"):
        PeerStatus.from_dict({"name": "b", "public_key": "k", "rx_bytes": "many"})


def test_status_with_no_daemon(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    path = short_dir / "none.sock"
    rc, out, err = run(capsys, "status", "--socket", str(path))
    assert rc == 1
    assert out == ""
    assert err == f"agent: cannot reach the daemon at {path} (is `agent up` running?)\n"


def test_status_finds_the_socket_through_the_config(
    capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    conf = short_dir / "agent.conf"
    conf.write_text('[interface]\ncontrol_socket = "ctl.sock"\n')
    rc, _, err = run(capsys, "status", "-c", str(conf))
    assert rc == 1
    assert (
        err
        == f"agent: cannot reach the daemon at {short_dir / 'ctl.sock'} (is `agent up` running?)\n"
    )


def test_status_prints_a_table(
    capsys: pytest.CaptureFixture[str], daemon_at: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, daemon = daemon_at(Response.success(STATUS.to_dict()).encode())
    monkeypatch.setattr("time.time", lambda: 1_000_000.0)
    rc, out, err = run(capsys, "status", "--socket", path)
    assert (rc, err) == (0, "")
    assert daemon.requests == [Request("status", {})]
    assert out == (
        "agent0  100.64.0.1  port 41641  home relay 900\n"
        "  data plane: python (auto: the compiled module does not load: no module)\n"
        "\n"
        "100.64.0.2  b  alice@   direct 198.18.0.2:41641  handshake 1m ago  rx 476 B, tx 3.0 MiB\n"
        "-           c  tag:web  idle                     handshake -       rx 0 B, tx 0 B\n"
    )


def test_status_verbose_flattens_counters(
    capsys: pytest.CaptureFixture[str], daemon_at: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = daemon_at(Response.success(STATUS.to_dict()).encode())
    monkeypatch.setattr("time.time", lambda: 1_000_000.0)
    rc, out, err = run(capsys, "status", "--socket", path, "-v")
    assert (rc, err) == (0, "")
    assert out.splitlines()[:11] == [
        "agent0  100.64.0.1  port 41641  home relay 900",
        "  data plane: python (auto: the compiled module does not load: no module)",
        f"  public key {'A' * 43}=",
        "  relays connected: 900",
        "  data plane:",
        "    disco.received_pong 2",
        "    disco.sent_ping 3",
        "    impl python",
        "    offload tso+gso",
        "  drops:",
        "    replayed_counter 2",
    ]
    assert "    allowed ips 100.64.0.2/32, fd7a:115c:a1e0::2/128" in out
    assert "    latency 0.4 ms" in out
    assert "    keepalive every 25 seconds" in out


def test_status_json(capsys: pytest.CaptureFixture[str], daemon_at: Any) -> None:
    path, _ = daemon_at(Response.success(STATUS.to_dict()).encode())
    rc, out, _ = run(capsys, "status", "--socket", path, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert Status.from_dict(doc) == STATUS
    assert doc["peers"][0]["path"] == "direct"
    assert doc["derp"] == {"home_region": 900, "connected_regions": [900], "stats": {}}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Response.failure("busy").encode(), "busy"),
        (b"not json\n", "not a JSON line"),
        (Response.success({"interface": "x"}).encode(), "status field 'public_key' is missing"),
    ],
)
def test_status_bad_answer(
    capsys: pytest.CaptureFixture[str], daemon_at: Any, answer: bytes, message: str
) -> None:
    path, _ = daemon_at(answer)
    rc, _, err = run(capsys, "status", "--socket", path)
    assert rc == 1
    assert err.startswith(f"agent: bad answer from the daemon at {path}: ")
    assert message in err
    assert err.count("\n") == 1


def test_status_daemon_closes_without_answer(
    capsys: pytest.CaptureFixture[str], daemon_at: Any
) -> None:
    path, _ = daemon_at(b"")
    rc, _, err = run(capsys, "status", "--socket", path)
    assert rc == 1
    assert err == f"agent: the daemon at {path} closed without answering\n"


def test_format_status_units() -> None:
    peer = PeerStatus(
        name="p", public_key="k", latest_handshake=1000, rx_bytes=1023, tx_bytes=5 * 2**40
    )
    st = Status(interface="i", public_key="k", listen_port=1, peers=(peer,))
    text = format_status(st, 1000 + 2 * 86400 + 3601)
    assert "handshake 2d ago" in text
    assert "rx 1023 B, tx 5.0 TiB" in text
    assert text.startswith("i  no address  port 1  no relay\n")
    assert format_status(Status(interface="i", public_key="k", listen_port=1), 0).endswith(
        "\nno peers"
    )
    named = Status(interface="agent0", public_key="k", listen_port=1, name="laptop")
    assert format_status(named, 0).startswith("agent0 (laptop)  no address")


DNS = {
    "enabled": True,
    "domain": "mesh.internal",
    "names": 3,
    "service": ["100.100.100.100", "fd7a:115c:a1e0::53"],
    "upstreams": ["192.0.2.53:53"],
    "resolved": "unavailable",
    "hint": "systemd-resolved is not running: send mesh.internal to 100.100.100.100",
    "answered": 7,
    "forwarded": 2,
    "tcp": {"connections": 1, "queries": 3},
    "dropped": {"queue_full": 5},
}


def test_format_status_dns_says_where_names_are_and_how_to_use_them() -> None:
    st = Status(interface="i", public_key="k", listen_port=1, dns=DNS)
    lines = format_status(st, 0).splitlines()
    assert lines[1] == (
        "  dns mesh.internal at 100.100.100.100, 3 names, not used by the system resolver"
    )
    assert lines[2] == "    systemd-resolved is not running: send mesh.internal to 100.100.100.100"
    verbose = format_status(st, 0, verbose=True)
    assert "    answered 7, forwarded 2, over TCP 3, dropped: queue_full 5" in verbose
    assert "    upstreams 192.0.2.53:53" in verbose
    applied = Status(
        interface="i", public_key="k", listen_port=1, dns={**DNS, "resolved": "applied"}
    )
    assert (
        format_status(applied, 0)
        .splitlines()[1]
        .endswith(", used by systemd-resolved for mesh.internal (search domain)")
    )
    off = Status(interface="i", public_key="k", listen_port=1, dns={"enabled": False})
    assert format_status(off, 0).splitlines()[1] == "  dns off"
    assert Status.from_json(st.to_json()).dns == DNS
def test_format_status_port_mapping() -> None:
    pm = {"protocol": "upnp", "external": "198.18.1.1:41641", "lifetime": 7200}
    st = Status(interface="i", public_key="k", listen_port=1, portmap=pm)
    assert "\n  port mapped: 198.18.1.1:41641 (upnp, lifetime 7200 s)\n" in format_status(st, 0)
    assert Status.from_json(st.to_json()).portmap == pm
    assert Status.from_json(Status(interface="i", public_key="k", listen_port=1).to_json()) == (
        Status(interface="i", public_key="k", listen_port=1)
    )
    assert "port mapped" not in format_status(
        Status(interface="i", public_key="k", listen_port=1), 0
    )


# -- logging (configured only by cli.main) --------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("test")  # made before configuring: still follows the configuration
    configure_logging("info", json=True)
    log.debug("hidden")
    log.info("hello", peer="b")
    logging.getLogger("somelib").warning("from %s", "stdlib")
    out, err = capsys.readouterr()
    assert out == ""
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(d["event"], d["level"], d["logger"]) for d in lines] == [
        ("hello", "info", "test"),
        ("from stdlib", "warning", "somelib"),
    ]
    assert lines[0]["peer"] == "b"
    assert lines[0]["timestamp"].endswith("Z")
    configure_logging("warning", json=False)  # reconfiguring replaces, never duplicates
    log.warning("once")
    _, err = capsys.readouterr()
    assert err.count("once") == 1
    assert "[warning" in err
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud")
    hooked: list[int] = []
    configure_logging("info", json=True, before_write=lambda: hooked.append(1))
    log.info("one")
    logging.getLogger("somelib").warning("two")
    log.debug("filtered out: no hook")
    assert len(hooked) == 2


def test_status_without_any_config_tries_the_default_socket(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if Path("/run/agent/agent0.sock").exists():
        pytest.skip("a daemon is running with the default socket")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))
    rc, _, err = run(capsys, "status")
    assert rc == 1
    assert err == (
        "agent: cannot reach the daemon at /run/agent/agent0.sock (is `agent up` running?)\n"
    )


def test_format_pong_lines_like_tailscale_ping() -> None:
    who = {"peer": "b", "address": "100.64.0.2", "pong": True}
    relayed = {**who, "via": "derp", "derp_region": 900, "derp_code": "lab", "latency_ms": 3.14}
    direct = {**who, "via": "direct", "endpoint": "198.18.0.2:41641", "latency_ms": 0.4}
    assert format_pong(relayed) == "pong from b (100.64.0.2) via DERP(lab) in 3.1ms"
    assert format_pong(direct) == "pong from b (100.64.0.2) via 198.18.0.2:41641 in 0.4ms"
    assert format_pong({**who, "pong": False}) == ("timeout waiting for pong from b (100.64.0.2)")


def test_ping_rejects_a_bad_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ping", "b", "-n", "0"]) == 2
    assert "0 is not a positive count" in capsys.readouterr().err


def test_ping_and_metrics_without_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "none.sock")
    assert cli.main(["ping", "b", "--socket", sock, "-n", "1"]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err
    assert cli.main(["metrics", "--socket", sock]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err


# -- ip, whois, completion; no Python repr in any human output ----------------------------------


def test_ip_prints_our_addresses_or_a_peers(
    capsys: pytest.CaptureFixture[str], daemon_at: Any
) -> None:
    path, _ = daemon_at(Response.success(STATUS.to_dict()).encode())
    assert run(capsys, "ip", "--socket", path) == (0, "100.64.0.1\n", "")
    assert run(capsys, "ip", "b", "--socket", path) == (
        0,
        "100.64.0.2\nfd7a:115c:a1e0::2\n",
        "",
    )
    assert run(capsys, "ip", "b", "-6", "--socket", path) == (0, "fd7a:115c:a1e0::2\n", "")
    rc, out, err = run(capsys, "ip", "zz", "--socket", path)
    assert (rc, out) == (1, "")
    assert err == "agent: ip: no peer named 'zz' (`agent status` lists them)\n"


def test_whois_names_the_owner(capsys: pytest.CaptureFixture[str], daemon_at: Any) -> None:
    path, _ = daemon_at(Response.success(STATUS.to_dict()).encode())
    rc, out, _ = run(capsys, "whois", "fd7a:115c:a1e0::2", "--socket", path)
    assert rc == 0
    assert out == f"fd7a:115c:a1e0::2: b\n  user: alice\n  key: {'B' * 43}=\n"
    rc, out, _ = run(capsys, "whois", "100.64.0.1", "--socket", path)
    assert out.startswith("100.64.0.1: agent0 (this node)\n")
    rc, out, _ = run(capsys, "whois", "100.64.0.2", "--socket", path, "--json")
    assert json.loads(out)["user"] == "alice"
    assert run(capsys, "whois", "100.64.0.9", "--socket", path)[2] == (
        "agent: whois: no node has 100.64.0.9\n"
    )
    assert run(capsys, "whois", "nonsense", "--socket", path)[2] == (
        "agent: whois: 'nonsense' is not an IP address\n"
    )


def test_no_python_repr_in_human_output(
    capsys: pytest.CaptureFixture[str], daemon_at: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that prints the daemon's data for people: no dict, list or None reprs."""
    path, _ = daemon_at(Response.success(STATUS.to_dict()).encode())
    monkeypatch.setattr("time.time", lambda: 1_000_000.0)
    outputs = [
        run(capsys, *argv, "--socket", path)[1]
        for argv in (("status",), ("status", "-v"), ("ip",), ("ip", "b"), ("whois", "100.64.0.2"))
    ]
    pong = {"peer": "b", "address": "100.64.0.2", "pong": True, "via": "direct",
            "endpoint": "198.18.0.2:41641", "latency_ms": 0.4}  # fmt: skip
    outputs.append(format_pong(pong))
    for text in outputs:
        assert text.strip()
        for marker in ("{", "}", "[", "]", "None", "'", "()", "dict(", "Status("):
            assert marker not in text.replace("[v6]", ""), (marker, text)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
def test_bash_completion_from_the_parsers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, script, _ = run(capsys, "completion", "bash")
    assert rc == 0
    f = tmp_path / "agent.bash"
    f.write_text(script)

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        prog = (
            f"source {f}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
            f"COMP_CWORD={len(words) - 1}; _agent_complete; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        res = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True)
        return sorted(res.stdout.split())

    assert {"status", "join", "whois", "coordinator", "completion"} <= set(complete("agent "))
    assert complete("agent coordinator keys c") == ["create"]
    assert complete("agent coordinator keys create --re") == ["--reusable"]
    assert complete("agent join --c") == ["--ca-file", "--config"]
    assert complete("agent status --j") == ["--json"]
