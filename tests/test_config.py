"""agent.config: good configs parse to the model; each bad one names its key path exactly."""

from __future__ import annotations

import dataclasses
import json
import re
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest

from agent.config import (
    Config,
    ConfigError,
    ControlConfig,
    DerpConfig,
    DerpNode,
    DnsConfig,
    InterfaceConfig,
    PeerConfig,
    control_socket_path,
    format_problems,
    load_config,
    parse_config,
)
from agent.keys import NodePrivate, PresharedKey

REPO = Path(__file__).resolve().parents[1]

# fixed keys so that problem lines are reproducible
PRIV_A = NodePrivate(bytes(range(1, 33)))
PUB_A = PRIV_A.public().to_b64()
PUB_B = NodePrivate(bytes(range(2, 34))).public().to_b64()
PUB_C = NodePrivate(bytes(range(3, 35))).public().to_b64()
PSK = PresharedKey(bytes(range(4, 36)))

q = json.dumps  # a JSON string of printable ASCII is a valid TOML string

IFACE = f"""
[interface]
private_key = {q(PRIV_A.to_b64())}
addresses = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
"""


def peer(pub: str = PUB_B, **fields: object) -> str:
    lines = ["[[peers]]", f"public_key = {q(pub)}"]
    fields.setdefault("allowed_ips", ["100.64.0.2/32"])
    lines += [f"{k} = {q(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def problems_of(text: str, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir)
    return info.value.problems


# -- good configs ---------------------------------------------------------------------------------


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(IFACE)
    iface = cfg.interface
    assert iface.name == "agent0"
    assert iface.private_key == PRIV_A
    assert iface.addresses == (ip_interface("100.64.0.1/32"), ip_interface("fd7a:115c:a1e0::1/128"))
    assert (iface.listen_port, iface.mtu, iface.uapi, iface.fwmark) == (41641, 1280, True, 0)
    assert iface.txqueuelen == 2000
    assert iface.control_socket == "/run/agent/agent0.sock"
    assert iface.metrics_listen is None
    assert cfg.derp == DerpConfig(home_region=None, regions=())
    assert cfg.peers == ()


def test_v4_v6_peers_derp_map_and_inline_psk() -> None:
    text = (
        IFACE.replace(
            "[interface]",
            '[interface]\nname = "wgx1"\nlisten_port = 0\nmtu = 1420\ntxqueuelen = 500',
        )
        + """
[derp]
home_region = 900
[[derp.regions]]
id = 900
code = "lab"
[[derp.regions.nodes]]
host = "198.18.0.10"
ca_file = "ca.pem"
[[derp.regions.nodes]]
host = "derp.example"
port = 8443
stun_port = 0
insecure_skip_verify = true
"""
        + peer(
            name="b",
            allowed_ips=["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.1.0.0/16"],
            endpoint="198.18.0.2:41641",
            derp_region=900,
            preshared_key=PSK.to_b64(),
            persistent_keepalive=25,
        )
        + peer(PUB_C, allowed_ips=["100.64.0.3/32"], endpoint="[fd00::3]:51820")
    )
    cfg = parse_config(text, base_dir=Path("/etc/agent"))
    assert cfg.interface.name == "wgx1"
    assert cfg.interface.control_socket == "/run/agent/wgx1.sock"
    assert (cfg.interface.listen_port, cfg.interface.mtu, cfg.interface.txqueuelen) == (
        0,
        1420,
        500,
    )
    region = cfg.derp.regions[0]
    assert (cfg.derp.home_region, region.id, region.code) == (900, 900, "lab")
    assert region.nodes == (
        DerpNode(host="198.18.0.10", ca_file="/etc/agent/ca.pem"),
        DerpNode(host="derp.example", port=8443, stun_port=0, insecure_skip_verify=True),
    )
    b, c = cfg.peers
    assert b.name == "b"
    assert b.allowed_ips == (
        ip_network("100.64.0.2/32"),
        ip_network("fd7a:115c:a1e0::2/128"),
        ip_network("10.1.0.0/16"),
    )
    assert (b.endpoint, b.derp_region, b.preshared_key, b.persistent_keepalive) == (
        ("198.18.0.2", 41641),
        900,
        PSK,
        25,
    )
    assert c.name == PUB_C[:8]  # default name
    assert (c.endpoint, c.derp_region, c.preshared_key) == (("fd00::3", 51820), None, None)
    assert c.persistent_keepalive is None


def test_metrics_listen_on_loopback_v4_and_v6() -> None:
    cfg = parse_config(IFACE + 'metrics_listen = "127.0.0.1:9101"\n')
    assert cfg.interface.metrics_listen == ("127.0.0.1", 9101)
    cfg = parse_config(IFACE + 'metrics_listen = "[::1]:9102"\n')
    assert cfg.interface.metrics_listen == ("::1", 9102)


def test_peer_without_endpoint_and_keepalive_zero_is_off() -> None:
    cfg = parse_config(IFACE + peer(persistent_keepalive=0, allowed_ips=[]))
    (p,) = cfg.peers
    assert (p.endpoint, p.persistent_keepalive, p.allowed_ips) == (None, None, ())


def test_key_files_are_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "private.key").write_text(PRIV_A.to_b64() + "\n")
    (tmp_path / "b.psk").write_text(PSK.to_b64())
    conf = tmp_path / "agent.conf"
    conf.write_text(
        '[interface]\nprivate_key_file = "keys/private.key"\naddresses = ["100.64.0.1/10"]\n'
        'control_socket = "agent.sock"\n' + peer(preshared_key_file=str(tmp_path / "b.psk"))
    )
    cfg = load_config(conf)
    assert cfg.interface.private_key == PRIV_A
    assert cfg.interface.control_socket == str(tmp_path / "agent.sock")
    assert cfg.peers[0].preshared_key == PSK
    assert control_socket_path(conf) == str(tmp_path / "agent.sock")


def test_control_socket_path_does_not_read_keys(tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text('[interface]\nname = "wg7"\nprivate_key_file = "/nonexistent/key"\n')
    assert control_socket_path(conf) == "/run/agent/wg7.sock"


def test_models_are_frozen() -> None:
    cfg = parse_config(IFACE + peer())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.interface.mtu = 9000  # type: ignore[misc]
    assert isinstance(cfg, Config)
    assert isinstance(cfg.interface, InterfaceConfig)
    assert isinstance(cfg.peers[0], PeerConfig)


# -- bad configs: the exact problem line ----------------------------------------------------------

BAD = [
    # (replace in IFACE or extra text, expected problem line)
    ("", "interface: missing"),
    (IFACE + "[interfaces]\n", "interfaces: unknown key (did you mean 'interface'?)"),
    (IFACE + "listn_port = 1\n", "interface.listn_port: unknown key (did you mean 'listen_port'?)"),
    (IFACE + 'name = "a-very-long-name-x"\n', "interface.name: 'a-very-long-name-x' is not an "
     "interface name (1-15 characters, no '/' or spaces)"),
    (IFACE + 'name = "a/b"\n', "interface.name: 'a/b' is not an interface name (1-15 characters, "
     "no '/' or spaces)"),
    (IFACE + 'name = ""\n', "interface.name: must not be empty"),
    (IFACE + "listen_port = 70000\n", "interface.listen_port: 70000 is out of range 0..65535"),
    (IFACE + 'listen_port = "41641"\n',
     "interface.listen_port: expected an integer, got a string ('41641')"),
    (IFACE + "listen_port = true\n",
     "interface.listen_port: expected an integer, got a boolean (true)"),
    (IFACE + "mtu = 500\n", "interface.mtu: 500 is out of range 576..65535"),
    (IFACE + "mtu = 1000\n", "interface.mtu: 1000 is below 1280, the minimum for IPv6 addresses"),
    (IFACE + "txqueuelen = 0\n", "interface.txqueuelen: 0 is out of range 1..1000000"),
    (IFACE + "uapi = 1\n", "interface.uapi: expected true or false, got an integer (1)"),
    (IFACE + "fwmark = -1\n", "interface.fwmark: -1 is out of range 0..4294967295"),
    ('[interface]\naddresses = ["100.64.0.1/32"]\n',
     "interface.private_key: missing (give private_key or private_key_file)"),
    (IFACE + 'private_key_file = "/k"\n',
     "interface: give private_key or private_key_file, not both"),
    ('[interface]\nprivate_key = "abc"\naddresses = ["100.64.0.1/32"]\n',
     "interface.private_key: not a base64 key (not valid base64)"),
    ('[interface]\nprivate_key = "YWJj"\naddresses = ["100.64.0.1/32"]\n',
     "interface.private_key: not a base64 key (base64 decodes to 3 bytes, a key is 32)"),
    (f"[interface]\nprivate_key = {q(PRIV_A.to_b64())}\n", "interface.addresses: missing"),
    (f"[interface]\nprivate_key = {q(PRIV_A.to_b64())}\naddresses = []\n",
     "interface.addresses: lists no overlay address"),
    (f'[interface]\nprivate_key = {q(PRIV_A.to_b64())}\naddresses = ["100.64.0.1"]\n',
     "interface.addresses[0]: '100.64.0.1' needs a prefix length (for example 100.64.0.1/32)"),
    (f'[interface]\nprivate_key = {q(PRIV_A.to_b64())}\naddresses = ["100.64.0.1/33"]\n',
     "interface.addresses[0]: '100.64.0.1/33' is not an IP address with prefix"),
    (IFACE + peer(allowed_ips=["100.64.0.2/32", "100.64.0.300/32"]),
     "peers[0].allowed_ips[1]: '100.64.0.300/32' is not an IP prefix"),
    (IFACE + peer(allowed_ips=["100.64.0.5/24"]),
     "peers[0].allowed_ips[0]: '100.64.0.5/24' has host bits set (did you mean 100.64.0.0/24?)"),
    (IFACE + peer() + peer(PUB_C, allowed_ips=["100.64.0.2/32"]),
     "peers[1].allowed_ips[0]: '100.64.0.2/32' is already routed to peers[0]"),
    (IFACE + peer(allowed_ips="100.64.0.2/32"),
     "peers[0].allowed_ips: expected an array, got a string ('100.64.0.2/32')"),
    (IFACE + "[[peers]]\n" + f"public_key = {q(PUB_B)}\n",
     "peers[0].allowed_ips: missing (write [] for a peer that carries no traffic)"),
    (IFACE + '[[peers]]\nallowed_ips = []\n', "peers[0].public_key: missing"),
    (IFACE + peer("not-a-key"), "peers[0].public_key: not a base64 key (not valid base64)"),
    (IFACE + peer(PUB_A), "peers[0].public_key: is this node's own public key"),
    (IFACE + peer() + peer(allowed_ips=["100.64.0.3/32"]),
     "peers[1].public_key: same key as peers[0]"),
    (IFACE + peer(name="b") + peer(PUB_C, name="b", allowed_ips=[]),
     "peers[1].name: 'b' is already the name of peers[0]"),
    (IFACE + peer(name=""), "peers[0].name: must not be empty"),
    (IFACE + peer(endpont="198.18.0.2:1"),
     "peers[0].endpont: unknown key (did you mean 'endpoint'?)"),
    (IFACE + peer(endpoint="vpn.example.com:51820"),
     "peers[0].endpoint: 'vpn.example.com' is not a literal IP address (names are not resolved)"),
    (IFACE + peer(endpoint="198.18.0.2"),
     "peers[0].endpoint: '198.18.0.2' is not host:port or [v6]:port"),
    (IFACE + peer(endpoint="fd00::2:51820"),
     "peers[0].endpoint: 'fd00::2:51820': write an IPv6 endpoint as [address]:port"),
    (IFACE + peer(endpoint="198.18.0.2:0"), "peers[0].endpoint: '198.18.0.2:0': port '0' is not "
     "1..65535"),
    (IFACE + peer(persistent_keepalive=70000),
     "peers[0].persistent_keepalive: 70000 is out of range 0..65535"),
    (IFACE + peer(preshared_key="short"), "peers[0].preshared_key: not a base64 key (not valid "
     "base64)"),
    (IFACE + peer(preshared_key_file="/nonexistent/b.psk"),
     "peers[0].preshared_key_file: cannot read '/nonexistent/b.psk': No such file or directory"),
    (IFACE + '[derp]\nhome_region = 901\n', "derp.home_region: region 901 is not in derp.regions"),
    (IFACE + '[derp]\nhome = 901\n', "derp.home: unknown key (did you mean 'home_region'?)"),
    (IFACE + '[[derp.regions]]\nid = 900\ncode = "lab"\nnodes = []\n',
     "derp.regions[0].nodes: lists no node"),
    (IFACE + '[[derp.regions]]\nid = 900\nnodes = [{host = "h"}]\n',
     "derp.regions[0].code: missing"),
    (IFACE + '[[derp.regions]]\nid = 0\ncode = "x"\nnodes = [{host = "h"}]\n',
     "derp.regions[0].id: 0 is out of range 1..2147483647"),
    (IFACE + '[[derp.regions]]\nid = 9\ncode = "x"\nnodes = [{host = "h"}]\n'
     '[[derp.regions]]\nid = 9\ncode = "y"\nnodes = [{host = "h"}]\n',
     "derp.regions[1].id: region 9 is defined twice"),
    (IFACE + '[[derp.regions]]\nid = 9\ncode = "x"\nnodes = [{host = "h", port = 0}]\n',
     "derp.regions[0].nodes[0].port: 0 is out of range 1..65535"),
    (IFACE + '[[derp.regions]]\nid = 9\ncode = "x"\nnodes = [{hots = "h"}]\n',
     "derp.regions[0].nodes[0].hots: unknown key (did you mean 'host'?)"),
    (IFACE + '[[derp.regions]]\nid = 9\ncode = "x"\nnodes = [{host = "h"}]\n'
     + peer(derp_region=10), "peers[0].derp_region: region 10 is not in derp.regions"),
    ("[interface\n", "not valid TOML: Expected ']' at the end of a table declaration "
     "(at line 1, column 11)"),
    (IFACE + 'metrics_listen = "0.0.0.0:9101"\n', "interface.metrics_listen: '0.0.0.0:9101' is "
     "not a loopback address: metrics are served on loopback only"),
    (IFACE + 'metrics_listen = "localhost"\n', "interface.metrics_listen: 'localhost' is not "
     "IP:PORT (for example 127.0.0.1:9101)"),
    (IFACE + 'metrics_listen = "127.0.0.1:0"\n', "interface.metrics_listen: '127.0.0.1:0' is "
     "not IP:PORT (for example 127.0.0.1:9101)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_bad_config_names_the_key(text: str, problem: str) -> None:
    assert problem in problems_of(text)


def test_all_problems_are_reported_at_once() -> None:
    text = (
        IFACE.replace("[interface]", "[interface]\nmtu = 1\nlisten_port = -1")
        + peer(allowed_ips=["100.64.0.300/32", "100.64.0.9/8"], endpoint="x:1")
        + peer(PUB_C, allowed_ips=[], persistent_keepalive="25", colour="blue")
    )
    assert problems_of(text) == [
        "interface.listen_port: -1 is out of range 0..65535",
        "interface.mtu: 1 is out of range 576..65535",
        "peers[0].allowed_ips[0]: '100.64.0.300/32' is not an IP prefix",
        "peers[0].allowed_ips[1]: '100.64.0.9/8' has host bits set (did you mean 100.0.0.0/8?)",
        "peers[0].endpoint: 'x' is not a literal IP address (names are not resolved)",
        "peers[1].colour: unknown key",
        "peers[1].persistent_keepalive: expected an integer, got a string ('25')",
    ]


def test_error_message_and_format_problems() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(IFACE + "mtu = 1\nfwmark = -1\n")
    err = info.value
    assert str(err) == "interface.mtu: 1 is out of range 576..65535 (and 1 more)"
    assert format_problems(err, source="a.conf") == (
        "a.conf: interface.mtu: 1 is out of range 576..65535\n"
        "a.conf: interface.fwmark: -1 is out of range 0..4294967295"
    )
    assert format_problems(err).splitlines()[0] == "interface.mtu: 1 is out of range 576..65535"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.conf")
    assert info.value.problems == ["cannot read the config: No such file or directory"]


def test_private_key_file_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("hello\n")
    text = '[interface]\nprivate_key_file = "bad.key"\naddresses = ["100.64.0.1/32"]\n'
    assert problems_of(text, base_dir=tmp_path) == [
        f"interface.private_key_file: '{tmp_path / 'bad.key'}' does not hold a base64 key "
        "(not valid base64)"
    ]


# -- the example config ---------------------------------------------------------------------------


def _example_with_inline_keys() -> str:
    text = (REPO / "agent.conf.example").read_text()
    text, n = re.subn(
        r'^private_key_file = "[^"]*"', f"private_key = {q(PRIV_A.to_b64())}", text, flags=re.M
    )
    assert n == 1
    text, n = re.subn(
        r'^preshared_key_file = "[^"]*"', f"preshared_key = {q(PSK.to_b64())}", text, flags=re.M
    )
    assert n == 1
    return text


def test_example_config_parses_with_inline_keys() -> None:
    cfg = parse_config(_example_with_inline_keys())
    assert cfg.interface.private_key == PRIV_A
    assert cfg.derp.home_region == 900
    assert [p.name for p in cfg.peers] == ["b", "c"]
    assert cfg.peers[0].preshared_key == PSK


def test_example_config_shows_every_key() -> None:
    text = (REPO / "agent.conf.example").read_text()
    keys = {"private_key_file", "preshared_key_file", "auth_key_file"}
    for cls in (InterfaceConfig, PeerConfig, DerpConfig, DerpNode, ControlConfig, DnsConfig):
        keys |= {f.name for f in dataclasses.fields(cls)}
    keys |= {"id", "code", "nodes"}
    keys -= {"policy"}  # compiled from policy_file, not a key
    missing = sorted(k for k in keys if not re.search(rf"\b{k}\b", text))
    assert missing == []


def test_control_section_makes_addresses_optional(tmp_path: Path) -> None:
    key_file = tmp_path / "auth.key"
    key_file.write_text("agentkey-abc\n")
    text = f"""
[interface]
private_key = {q(PRIV_A.to_b64())}

[control]
url = "https://coord.example.net:8443"
auth_key_file = "auth.key"
hostname = "laptop"
"""
    cfg = parse_config(text, base_dir=tmp_path)
    assert cfg.interface.addresses == ()
    assert cfg.control == ControlConfig(
        url="https://coord.example.net:8443", auth_key="agentkey-abc", hostname="laptop"
    )
    assert "agentkey" not in repr(cfg.control)


def test_control_section_problems() -> None:
    text = IFACE + '[control]\nurl = "http://x"\nauth_key = "a"\nauth_key_file = "b"\n'
    problems = problems_of(text)
    assert "control.url: 'http://x' is not an https:// URL" in problems
    assert "control: give auth_key or auth_key_file, not both" in problems


# -- [interface] policy_file ----------------------------------------------------------------------


def _with_policy(tmp_path: Path, policy: str, extra: str = "") -> str:
    (tmp_path / "policy.hujson").write_text(policy)
    return f"""
[interface]
private_key = {q(PRIV_A.to_b64())}
addresses = ["100.64.0.1/32"]
policy_file = "policy.hujson"
{extra}"""


def test_policy_file_is_compiled_for_this_node(tmp_path: Path) -> None:
    text = _with_policy(
        tmp_path,
        """{
  // peers may reach ssh on this node, nothing else
  "acls": [{"action": "accept", "src": ["100.64.0.0/10"], "dst": ["100.64.0.1:22"]}],
}""",
    )
    cfg = parse_config(text, base_dir=tmp_path)
    rules = cfg.interface.policy
    assert rules is not None
    assert len(rules) == 1
    assert [str(s) for s in rules[0].sources] == ["100.64.0.0/10"]
    assert [(d.ports.first, d.ports.last) for d in rules[0].destinations] == [(22, 22)]
    assert (
        parse_config(
            text.replace('policy_file = "policy.hujson"', ""), base_dir=tmp_path
        ).interface.policy
        is None
    )


def test_a_bad_policy_file_names_the_key_and_the_place(tmp_path: Path) -> None:
    text = _with_policy(tmp_path, '{\n  "acls": [\n    {"action": "accept" "src": ["*"]},\n  ],\n}')
    with pytest.raises(ConfigError) as e:
        parse_config(text, base_dir=tmp_path)
    assert any(p.startswith("interface.policy_file: ") and ":3:" in p for p in e.value.problems), (
        e.value.problems
    )
    failing = _with_policy(
        tmp_path,
        '{"acls": [], "tests": [{"src": "100.64.0.2", "accept": ["100.64.0.1:22"]}]}',
    )
    with pytest.raises(ConfigError, match="policy test"):
        parse_config(failing, base_dir=tmp_path)
    ok = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    with_control = _with_policy(tmp_path, ok, '\n[control]\nurl = "https://coord:8443"\n')
    with pytest.raises(ConfigError, match="coordinator hands out"):
        parse_config(with_control, base_dir=tmp_path)


# -- [dns] ----------------------------------------------------------------------------------------


def test_dns_defaults_to_on_with_the_system_resolvers() -> None:
    assert parse_config(IFACE).dns == DnsConfig(enable=True, upstreams=None)


def test_dns_upstreams_take_an_address_with_or_without_a_port() -> None:
    text = (
        IFACE
        + "[dns]\nenable = false\n"
        + 'upstreams = ["192.0.2.1", "192.0.2.2:5353", "[2001:db8::1]:53", "2001:db8::2"]\n'
    )
    cfg = parse_config(text)
    assert cfg.dns == DnsConfig(
        enable=False,
        upstreams=(
            ("192.0.2.1", 53),
            ("192.0.2.2", 5353),
            ("2001:db8::1", 53),
            ("2001:db8::2", 53),
        ),
    )
    assert parse_config(IFACE + "[dns]\nupstreams = []\n").dns.upstreams == ()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('[dns]\nenable = "yes"\n', "dns.enable: expected true or false, got a string ('yes')"),
        ("[dns]\nupstream = []\n", "dns.upstream: unknown key (did you mean 'upstreams'?)"),
        (
            '[dns]\nupstreams = ["dns.example:53"]\n',
            "dns.upstreams[0]: 'dns.example' is not a literal IP address (names are not resolved); "
            "expected IP, IP:PORT or [V6]:PORT",
        ),
        (
            '[dns]\nupstreams = ["192.0.2.1:0"]\n',
            "dns.upstreams[0]: '192.0.2.1:0': port '0' is not 1..65535; "
            "expected IP, IP:PORT or [V6]:PORT",
        ),
        (
            '[dns]\nupstreams = "192.0.2.1"\n',
            "dns.upstreams: expected an array, got a string ('192.0.2.1')",
        ),
    ],
)
def test_dns_problems(extra: str, problem: str) -> None:
    assert problems_of(IFACE + extra) == [problem]
