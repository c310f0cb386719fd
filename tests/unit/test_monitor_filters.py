"""`podrouter monitor` without a datapath: request validation, filters, the human line, and the
API's checks of a CNI attachment (both read untrusted input from the API socket)."""

from __future__ import annotations

import ipaddress

import pytest

from podrouter import api
from podrouter.monitor import Filter, MonitorError, format_event, parse_request

REASONS = ["no_route", "truncated", "unknown_peer"]

EVENT = {
    "kind": "drop",
    "reason": "unknown_peer",
    "path": "vxlan",
    "direction": "ingress",
    "family": 4,
    "proto": "icmp",
    "src": "10.244.2.1",
    "dst": "10.244.1.1",
    "sport": 0,
    "dport": 0,
    "src_pod": None,
    "dst_pod": "pod1",
    "outer": "172.16.2.1:40312",
    "len": 70,
    "time": 1.5,
}


def test_parse_request_accepts_good_filters() -> None:
    flt, flows = parse_request(
        {"flows": True, "pod": "pod1", "reason": "truncated", "address": "fd00::1"}, REASONS
    )
    assert flows and flt == Filter("pod1", "truncated", ipaddress.ip_address("fd00::1"))
    assert parse_request({}, REASONS) == (Filter(), False)


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        ({"flows": "yes"}, "flows: 'yes'"),
        ({"reason": "nope"}, "reason: 'nope' is not a drop reason"),
        ({"reason": 3}, "reason: '3'"),
        ({"address": "10.0.0"}, "address: '10.0.0' is not an IP address"),
        ({"address": ["x"]}, "address:"),
        ({"pod": ""}, "pod: ''"),
        ({"pod": "x" * 300}, "pod:"),
    ],
)
def test_parse_request_names_the_bad_key(req: dict, needle: str) -> None:
    with pytest.raises(MonitorError, match=needle.replace("[", r"\[")):
        parse_request(req, REASONS)


@pytest.mark.parametrize(
    ("flt", "match"),
    [
        (Filter(), True),
        (Filter(reason="unknown_peer"), True),
        (Filter(reason="truncated"), False),
        (Filter(pod="pod1"), True),
        (Filter(pod="pod2"), False),
        (Filter(address=ipaddress.ip_address("10.244.2.1")), True),
        (Filter(address=ipaddress.ip_address("172.16.2.1")), True),  # the tunnel sender
        (Filter(address=ipaddress.ip_address("172.16.2.2")), False),
    ],
)
def test_filter(flt: Filter, match: bool) -> None:
    assert flt.matches(EVENT) is match


def test_format_event() -> None:
    line = format_event(EVENT)
    assert "DROP unknown_peer" in line and "vxlan/ingress" in line and "icmp" in line
    assert "10.244.2.1 -> 10.244.1.1 (pod1) via 172.16.2.1:40312 len 70" in line
    flow = {
        **EVENT,
        "kind": "flow",
        "reason": None,
        "proto": "tcp",
        "src": "fd00::1",
        "sport": 443,
        "dst": "10.0.0.1",
        "dport": 80,
        "outer": None,
        "dst_pod": None,
    }
    assert "FLOW" in format_event(flow) and "[fd00::1]:443 -> 10.0.0.1:80 len" in format_event(flow)


def test_cni_attachment_is_checked() -> None:
    good = {"container_id": "abc_1.2-3", "netns": "/var/run/netns/cni-1", "ifname": "eth0"}
    assert api.cni_attachment(good) == good
    assert api.cni_attachment(None) is None
    for bad, needle in (
        ({"container_id": ""}, "cni.container_id"),
        ({"container_id": "-x"}, "cni.container_id"),
        ({"container_id": "a/b"}, "cni.container_id"),
        ({"container_id": "a" * 300}, "cni.container_id"),
        ({"container_id": "a", "ifname": "a-name-too-long-for-linux"}, "cni.ifname"),
        ({"container_id": "a", "netns": 5}, "cni.netns"),
        ({"container_id": "a", "extra": 1}, "cni.extra: unknown key"),
        ("abc", "cni:"),
    ):
        with pytest.raises(api.ApiError, match=needle):
            api.cni_attachment(bad)
    assert api.valid_container_id("0123abcd") and not api.valid_container_id(None)
