"""podrouter-cni pieces that need no root: config decoding, runtime bandwidth, names, error JSON."""

from __future__ import annotations

import json

import pytest

from podrouter import cni


def _conf(**kw: object) -> dict:
    base = {"cniVersion": "1.0.0", "name": "podnet", "type": "podrouter-cni",
            "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}
    base.update(kw)
    return base


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNI_COMMAND", "VERSION")
    rc, out = cni.run('{"cniVersion": "1.0.0"}')
    assert rc == 0 and json.loads(out)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


@pytest.mark.parametrize(
    ("command", "stdin", "code", "needle"),
    [
        ("", "{}", 4, "CNI_COMMAND"),
        ("FROB", "{}", 4, "FROB"),
        ("ADD", "{not json", 6, "not JSON"),
        ("ADD", "[1]", 6, "not a JSON object"),
        ("ADD", json.dumps(_conf(cniVersion="2.0.0")), 1, "2.0.0"),
        ("ADD", json.dumps(_conf(ipam={})), 7, "ipam"),
        ("ADD", json.dumps(_conf(mtu=70000)), 7, "mtu"),
        ("ADD", json.dumps(_conf(podrouterSocket="")), 7, "podrouterSocket"),
        ("CHECK", json.dumps(_conf(cniVersion="0.3.1")), 1, "CHECK needs"),
    ],
)
def test_errors_are_spec_json(monkeypatch: pytest.MonkeyPatch, command: str, stdin: str, code: int,
                              needle: str) -> None:
    monkeypatch.setenv("CNI_COMMAND", command)
    rc, out = cni.run(stdin)
    err = json.loads(out)
    assert rc == 1 and err["code"] == code and needle in err["msg"] and "cniVersion" in err


def test_missing_env_is_code_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNI_COMMAND", "ADD")
    for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        monkeypatch.delenv(var, raising=False)
    rc, out = cni.run(json.dumps(_conf()))
    assert rc == 1 and json.loads(out)["code"] == 4 and "CNI_CONTAINERID" in json.loads(out)["msg"]


def test_runtime_bandwidth_to_annotations() -> None:
    conf = _conf(runtimeConfig={"bandwidth": {"ingressRate": 20_000_000, "ingressBurst": 4294967295,
                                              "egressRate": 1_000_000_000, "egressBurst": 100_000}})
    assert cni.bandwidth_annotations(conf) == {
        "kubernetes.io/ingress-bandwidth": "20000000",
        "kubernetes.io/egress-bandwidth": "1000000000",
    }
    assert cni.bandwidth_annotations(_conf()) == {}
    assert cni.bandwidth_annotations(_conf(runtimeConfig={"bandwidth": {"egressRate": 0}})) == {}


@pytest.mark.parametrize(
    ("bw", "needle"),
    [
        ({"egressRate": 999}, "unreasonably small"),
        ({"egressRate": 2 * 10**15}, "unreasonably large"),
        ({"egressRate": "10M"}, "egressRate"),
        ({"ingressRate": -5}, "ingressRate"),
        ({"egressRate": 10**7, "egressBurst": "big"}, "egressBurst"),
        ({"egressRate": True}, "egressRate"),
    ],
)
def test_runtime_bandwidth_refused(bw: dict, needle: str) -> None:
    with pytest.raises(cni.CniError) as exc:
        cni.bandwidth_annotations(_conf(runtimeConfig={"bandwidth": bw}))
    assert exc.value.code == 7 and needle in exc.value.msg


def test_names(monkeypatch: pytest.MonkeyPatch) -> None:
    a = cni.host_ifname("0123456789abcdef" * 4, "eth0")
    assert a.startswith("pr") and len(a) == 14 and a == cni.host_ifname("0123456789abcdef" * 4, "eth0")
    assert a != cni.host_ifname("0123456789abcdef" * 4, "net1")
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-7d9f")
    assert cni.pod_name("abc") == "prod.web-7d9f"
    monkeypatch.setenv("CNI_ARGS", "K8S_POD_NAME=" + "x" * 80 + ";K8S_POD_NAMESPACE=a")
    assert cni.pod_name("f00dcafe-1234-5678") == "cni-f00dcafe1234"
    monkeypatch.delenv("CNI_ARGS")
    assert cni.pod_name("f00dcafe") == "cni-f00dcafe"


def test_daemon_unreachable_is_try_again(tmp_path: object) -> None:
    with pytest.raises(cni.CniError) as exc:
        cni.daemon_request(f"{tmp_path}/none.sock", {"op": "pod_list"})
    assert exc.value.code == 11
