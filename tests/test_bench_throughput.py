"""bench/throughput.py's pure helpers: option parsing, the rows, medians, ratios, /proc parsing
and the agent's generated config (dataplane, policy_file)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.config import parse_config
from tests.integration.lab import Lab, keypair


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_throughput", module)
    spec.loader.exec_module(module)
    return module


tp = _load()


def test_intervals_and_their_names() -> None:
    assert tp.intervals("0.01,0.05,1") == [0.01, 0.05, 1.0]
    assert [tp.interval_tag(i) for i in (0.01, 0.05, 1.0, 2.0, 0.5)] == [
        "10ms",
        "50ms",
        "1s",
        "2s",
        "500ms",
    ]
    assert [tp.ping_count(i) for i in (0.01, 0.05, 1.0)] == [20, 20, 5]
    for bad in ("", "x", "0.001", "0.05,11"):
        with pytest.raises(argparse.ArgumentTypeError):
            tp.intervals(bad)


def test_test_list_keeps_the_canonical_order() -> None:
    assert tp.test_list("cpu,tcp") == ["tcp", "cpu"]
    with pytest.raises(argparse.ArgumentTypeError):
        tp.test_list("tcp,bogus")


def test_rows_follow_the_selection() -> None:
    keys = [m.key for m in tp.metrics_for(["tcp", "ping"], [0.01, 1.0], True)]
    assert keys == ["tcp_gbps", "tcp_policy_gbps", "ping_10ms_median_ms", "ping_1s_median_ms"]
    cpu = [m.key for m in tp.metrics_for(["cpu"], [], False)]
    assert "cpu_tx_us" in cpu
    assert "rss_rx_mib" in cpu


def test_median_skips_rounds_without_the_figure() -> None:
    rounds = [{"tcp_gbps": 1.0}, {"tcp_gbps": None}, {"tcp_gbps": 3.0}, {}]
    assert tp.median_of_rounds(rounds, ["tcp_gbps", "udp64_pps"]) == {
        "tcp_gbps": 2.0,
        "udp64_pps": None,
    }


def test_table_ratios_and_rss_difference() -> None:
    results = {
        "agent": {"tcp_gbps": 2.0, "rss_tx_mib": 70.0, "rss_rx_mib": 71.0},
        "agent-python": {"tcp_gbps": 1.0, "rss_tx_mib": 65.0, "rss_rx_mib": 70.5},
        "wireguard-go": {"tcp_gbps": 0.5, "rss_tx_mib": 10.0, "rss_rx_mib": 12.0},
    }
    metrics = [m for m in tp.metrics_for(["tcp", "cpu"], [], False) if m.unit != "us"]
    text = tp.table(results, metrics)
    header, _rule, tcp_row, *_ = text.splitlines()
    assert header.split()[1:] == [
        "agent",
        "agent-python",
        "wireguard-go",
        "native/wg-go",
        "target",
        "py/wg-go",
        "native/py",
    ]
    assert tcp_row.split()[-5:] == ["4.00x", ">=", "4.0x", "2.00x", "2.00x"]
    assert "RSS native - python: sender +5.0 MiB, receiver +0.5 MiB" in text


def test_cpu_share_and_per_packet() -> None:
    before = tp.proc_stat_cpu("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    after = tp.proc_stat_cpu("cpu  160 0 70 900 10 0 0 60 0 0\n")
    share = tp.cpu_share(before, after)
    assert share["busy_pct"] == pytest.approx(100 * 80 / 200)
    assert share["steal_pct"] == pytest.approx(10.0)
    assert tp.per_packet_us(0.5, 100_000) == pytest.approx(5.0)
    assert tp.per_packet_us(0.5, 0) is None
    assert tp.cpu_mhz("cpu MHz\t\t: 1996.248\nx\ncpu MHz\t\t: 2100.5\n") == [1996.248, 2100.5]


def test_agent_config_carries_dataplane_and_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text(tp.POLICY)
    with Lab() as lab:
        for impl, dataplane in (("agent", "native"), ("agent-python", "python")):
            for address in (tp.A4, tp.B4):
                agent = tp.BenchAgent(
                    lab,
                    "unused-ns",
                    private_key=keypair()[0],
                    addresses=[f"{address}/32"],
                    listen_port=tp.PORT,
                    dataplane=tp.DATAPLANE.get(impl),
                    policy_path=policy,
                )
                cfg = parse_config(agent.config_text(), base_dir=tmp_path)
                assert cfg.interface.dataplane == dataplane
                rules = cfg.interface.policy
                assert rules is not None
                assert len(rules) == 1  # one rule has this node as its destination
        plain = tp.BenchAgent(
            lab, "unused-ns", private_key=keypair()[0], addresses=["100.64.0.1/32"], listen_port=1
        )
        cfg = parse_config(plain.config_text(), base_dir=tmp_path)
        assert cfg.interface.policy is None
        assert "dataplane" not in plain.config_text()  # another tree may not know the key
