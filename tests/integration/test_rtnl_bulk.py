"""netlink/rtnl.py against a real kernel: bulk route changes, dumps and next-hop lookups agree with
`ip` and with pyroute2, and each request of a batch gets its own answer (errors included)."""

from __future__ import annotations

import json

from helpers import python_in

from nettopo import Host, Topology

CODE = r"""
import errno, ipaddress, json, socket
from pyroute2 import IPRoute
from podrouter.netlink.rtnl import Rtnl, RouteRequest
from podrouter.netlink.underlay import next_hop_for, next_hops_for, resolve_underlay
from podrouter.config import NodeConfig

ipr = IPRoute()
idx = ipr.link_lookup(ifname="eth0")[0]
reqs = [RouteRequest("replace", f"10.{16 + (i >> 8)}.{i & 255}.0/24", 254, 77, oif=idx, mtu=1400 + i % 50)
        for i in range(1200)]
reqs.append(RouteRequest("replace", "fd00:77::/64", 254, 77, oif=idx, mtu=1400))
reqs.append(RouteRequest("replace", "10.99.0.0/24", 254, 77, type=7))  # unreachable
reqs.append(RouteRequest("replace", "10.98.0.0/24", 254, 77, oif=99999))  # no such device
out = {"codes": Rtnl().change(reqs)}
with Rtnl() as nl:
    dump = nl.dump_routes(socket.AF_INET) + nl.dump_routes(socket.AF_INET6)
out["ours"] = sorted([r.dst, r.oif, r.mtu, r.type] for r in dump if r.proto == 77)
# a delete of every second route plus one that does not exist
dels = [RouteRequest("del", f"10.{16 + (i >> 8)}.{i & 255}.0/24", 254, 77, scope=255)
        for i in range(0, 1200, 2)]
dels.append(RouteRequest("del", "10.97.0.0/24", 254, 77, scope=255))
out["del_codes"] = Rtnl().change(dels)
with Rtnl() as nl:
    out["left"] = sum(1 for r in nl.dump_routes(socket.AF_INET) if r.proto == 77)
node = NodeConfig(name="n", address=ipaddress.IPv4Address("172.16.2.2"), interface="eth0", pod_cidrs=())
u = resolve_underlay(ipr, node)
peers = [ipaddress.IPv4Address(a) for a in ("172.16.2.7", "172.30.1.1", "172.31.0.5", "192.0.2.1")]
bulk = next_hops_for(ipr, u, peers)
out["hops"] = {str(p): [str(bulk[p]), str(next_hop_for(ipr, u, p))] for p in peers}
print(json.dumps(out))
"""


def h_idx(h: Host) -> int:
    return int(json.loads(h.ip("-j link show eth0"))[0]["ifindex"])


def test_bulk_routes_match_the_kernel(topo: Topology) -> None:
    h = topo.host("rt")
    gw = topo.host("gw")
    topo.link(h, "eth0", gw, "eth0", a_addr="172.16.2.2/24", b_addr="172.16.2.1/24")
    h.ip("route add default via 172.16.2.1")
    h.ip("route add 172.30.0.0/16 via 172.16.2.9")  # a more specific underlay route than the default
    h.ip("-6 addr add fd00:1::2/64 dev eth0 nodad")
    r = python_in(h, CODE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    codes = out["codes"]
    assert codes[:-1] == [0] * (len(codes) - 1)
    assert codes[-1] == 19  # ENODEV: only the request naming a missing device failed
    # the dump saw everything that was asked (IPv4 and IPv6)
    assert len(out["ours"]) == 1200 + 2
    assert ["10.16.7.0/24", h_idx(h), 1407, 1] in out["ours"]

    assert out["del_codes"][:-1] == [0] * 600
    assert out["del_codes"][-1] == 3  # ESRCH for the one that was not there
    assert out["left"] == 600 + 1
    # what is left, as `ip` sees it: the odd ones and the unreachable route
    shown = json.loads(h.ip("-j -d route show proto 77"))
    assert len(shown) == 600 + 1
    by_dst = {x["dst"]: x for x in shown}
    assert by_dst["10.16.7.0/24"]["metrics"][0]["mtu"] == 1407
    assert by_dst["10.99.0.0/24"]["type"] == "unreachable"
    assert "fd00:77::/64" in h.ip("-6 route show proto 77")

    # the bulk next hops are what the kernel answers one at a time
    for addr, (bulk, single) in out["hops"].items():
        assert bulk == single, addr
    assert out["hops"]["172.16.2.7"][0] == "172.16.2.7"  # on-link
    assert out["hops"]["172.30.1.1"][0] == "172.16.2.9"  # the more specific route
    assert out["hops"]["192.0.2.1"][0] == "172.16.2.1"  # the default gateway
