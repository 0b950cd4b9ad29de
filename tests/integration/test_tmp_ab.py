from tests.integration.test_agent_pair import *  # noqa
from tests.integration.lab import iperf3, ping_rtt

def test_ab(pair: Pair) -> None:
    ping_rtt(pair.ns_a, B4, count=5)
    for _ in range(2):
        r = iperf3(pair.ns_b, pair.ns_a, B4, seconds=3)
        print(pair.dataplane, "TCP", round(r["end"]["sum_received"]["bits_per_second"]/1e9, 3))
    print(pair.dataplane, "ping", ping_rtt(pair.ns_a, B4, count=20, interval=0.05))
