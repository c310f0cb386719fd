"""etcd discovery against a real etcd with TLS (client certificates) and v3 authentication, run in R's
namespace: nodes find each other through it; hostile entries planted with etcdctl (malformed JSON, a
huge value, a node claiming another node's address, an overlapping CIDR) are logged, skipped and shown
in status while the valid peers stay; a stalled etcd (SIGSTOP) is detected (`reconnecting`) and the
watch re-established when it continues; after an etcd restart the lost auth token is fetched again."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import DaemonHandle, Daemons, etcd_argv, ref_config, wait_for

from nettopo import ReferenceTopology

ETCD_1 = "https://172.16.2.1:2379"  # R's address on node1/node3's segment
ETCD_2 = "https://172.16.3.1:2379"  # R's address towards node2
PREFIX = "/podrouter/v1/nodes/"


# ------------------------------------------------------------------------- a throwaway PKI


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ips: tuple[str, ...] = (),
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    # no CN on a client certificate: with auth enabled, etcd's JSON gateway refuses (HTTP 400) a
    # client certificate carrying a CommonName (it would not be used as the user name)
    attr = NameOID.COMMON_NAME if ca or server else NameOID.ORGANIZATION_NAME
    name = x509.Name([x509.NameAttribute(attr, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usage.append(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if ips:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(a)) for a in ips]),
                critical=False,
            )
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(d: Path) -> Pki:
    d.mkdir(mode=0o700)
    ca_key = _key()
    ca = _cert("podrouter-test-ca", ca_key, None, ca_key, ca=True)
    srv_key, cli_key = _key(), _key()
    # etcd's own gateway dials its gRPC server with the server certificate: it is a client cert too
    srv = _cert("etcd", srv_key, ca, ca_key, ips=("172.16.2.1", "172.16.3.1", "127.0.0.1"), server=True)
    # no CN (see _cert): only the password token can authorize a request
    cli = _cert("podrouter-node", cli_key, ca, ca_key)
    pki = Pki(d / "ca.pem", d / "etcd.pem", d / "etcd.key", d / "client.pem", d / "client.key")
    for path, cert in ((pki.ca, ca), (pki.server_cert, srv), (pki.client_cert, cli)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, srv_key)
    _write_key(pki.client_key, cli_key)
    return pki


# ------------------------------------------------------------------------------ the etcd


class SecureEtcd:
    """etcd in R's namespace with TLS, client-certificate auth and v3 authentication enabled."""

    def __init__(self, ref: ReferenceTopology, tmp: Path) -> None:
        self.ref = ref
        self.r = ref.router
        self.data = tmp / "etcd-data"
        self.pki = make_pki(tmp / "pki")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "etcd.log"

    def start(self) -> None:
        p = self.pki
        with self.log.open("ab") as log:
            self.proc = self.r.popen(
                etcd_argv(
                    self.data,
                    [ETCD_1, ETCD_2],
                    "--cert-file",
                    str(p.server_cert),
                    "--key-file",
                    str(p.server_key),
                    "--trusted-ca-file",
                    str(p.ca),
                    "--client-cert-auth",
                ),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(lambda: self.ctl("endpoint", "health", user=None).returncode == 0, 20, 0.3, "etcd healthy")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def ctl(self, *args: str, user: str | None = "root:rootpw") -> subprocess.CompletedProcess[str]:
        p = self.pki
        argv = [
            "etcdctl",
            f"--endpoints={ETCD_1}",
            f"--cacert={p.ca}",
            f"--cert={p.client_cert}",
            f"--key={p.client_key}",
            "--command-timeout=5s",
        ]
        if user is not None:
            argv.append(f"--user={user}")
        return self.r.try_run([*argv, *args], timeout=30)

    def must(self, *args: str, user: str | None = "root:rootpw") -> str:
        r = self.ctl(*args, user=user)
        assert r.returncode == 0, f"etcdctl {' '.join(args[:2])}: {r.stderr}"
        return r.stdout

    def enable_auth(self) -> None:
        for args in (
            ("user", "add", "root:rootpw"),
            ("user", "grant-role", "root", "root"),
            ("role", "add", "podrouter"),
            ("role", "grant-permission", "podrouter", "--prefix=true", "readwrite", "/podrouter/v1/"),
            ("user", "add", "podrouter:nodepw"),
            ("user", "grant-role", "podrouter", "podrouter"),
            ("auth", "enable"),
        ):
            self.must(*args, user=None)


@pytest.fixture
def secure_etcd(ref: ReferenceTopology, tmp_path: Path) -> Iterator[SecureEtcd]:
    e = SecureEtcd(ref, tmp_path)
    try:
        e.start()
        e.enable_auth()
        # without credentials nothing under the prefix can be read (auth really is on)
        r = e.ctl("get", "--prefix", PREFIX, user=None)
        assert r.returncode != 0, r.stdout
        yield e
    finally:
        e.stop()


def secure_cfg(
    ref: ReferenceTopology, node: str, sockdir: Path, etcd: SecureEtcd, endpoints: list[str]
) -> dict:
    p = etcd.pki
    return ref_config(
        ref,
        node,
        sockdir,
        mode="tunnel",
        peers=[],
        discovery={
            "backend": "etcd",
            "etcd": {
                "endpoints": endpoints,
                "lease_ttl": 3,
                "ca_file": str(p.ca),
                "cert_file": str(p.client_cert),
                "key_file": str(p.client_key),
                "username": "podrouter",
                "password": "nodepw",
            },
        },
    )


def discovery(d: DaemonHandle) -> dict:
    return d.status()["discovery"]


def peer_names(d: DaemonHandle) -> set[str]:
    return {p["name"] for p in d.status()["peers"]}


def node_record(name: str, address: str, cidr: str) -> str:
    return json.dumps({"name": name, "address": address, "pod_cidr": cidr})


def test_tls_auth_discovery_survives_hostile_entries(
    ref: ReferenceTopology, daemons: Daemons, secure_etcd: SecureEtcd
) -> None:
    d1 = daemons.start(ref.nodes["node1"], secure_cfg(ref, "node1", daemons.sockdir, secure_etcd, [ETCD_1]))
    d2 = daemons.start(ref.nodes["node2"], secure_cfg(ref, "node2", daemons.sockdir, secure_etcd, [ETCD_2]))
    wait_for(lambda: peer_names(d1) == {"node2"}, 15, what="node1 discovers node2 over TLS + auth")
    wait_for(lambda: peer_names(d2) == {"node1"}, 15, what="node2 discovers node1")
    st = discovery(d1)
    assert st["tls"] is True and st["auth"] is True and st["state"] == "connected"
    assert ref.pods["pod1"].host.ping("10.244.2.1", count=2)

    hostile = {
        PREFIX + "garbage": "{not json",
        PREFIX + "huge": "x" * 100_000,
        PREFIX + "thief": node_record("thief", "172.16.3.2", "10.244.50.0/24"),  # node2's address
        PREFIX + "squatter": node_record("squatter", "172.16.2.3", "10.244.2.0/25"),  # inside node2's CIDR
    }
    for key, value in hostile.items():
        secure_etcd.must("put", key, value)
    want = {
        PREFIX + "garbage": "value is not a JSON object",
        PREFIX + "huge": "value is 100000 bytes (limit 4096)",
        PREFIX + "thief": "address 172.16.3.2 is already node2's",
        PREFIX + "squatter": "pod CIDR 10.244.2.0/25 overlaps node2's 10.244.2.0/24",
    }
    for d in (d1, d2):
        wait_for(lambda d=d: set(want) <= set(discovery(d)["rejected"]), 10, what="hostile entries refused")
    rejected = discovery(d1)["rejected"]
    for key, why in want.items():
        assert rejected[key] == why
    assert d1.alive() and d2.alive()
    assert peer_names(d1) == {"node2"} and peer_names(d2) == {"node1"}
    assert ref.pods["pod1"].host.ping("10.244.2.1", count=2)
    text = d1.cli("status", "--socket", d1.socket).stdout
    assert f"refused {PREFIX}thief: address 172.16.3.2 is already node2's" in text
    assert "ignoring etcd entry /podrouter/v1/nodes/thief" in d1.logs()

    # overwriting a live node's own record does not stick: the node writes it back at once
    secure_etcd.must("put", PREFIX + "node2", node_record("node2", "172.16.2.3", "10.244.2.0/24"))

    def node2_record() -> str:
        return json.loads(secure_etcd.must("get", PREFIX + "node2", "--print-value-only"))["address"]

    wait_for(lambda: node2_record() == "172.16.3.2", 10, what="node2 re-registers itself")
    wait_for(
        lambda: [p["address"] for p in d1.status()["peers"]] == ["172.16.3.2"],
        10,
        what="node1 sees node2 again",
    )
    assert "re-registered /podrouter/v1/nodes/node2" in d2.logs()

    # the first writer keeps its claim for as long as it lives; the thief only gets in once node2 is
    # gone for good
    code, _ = d2.stop()
    assert code == 0
    wait_for(lambda: "thief" in peer_names(d1), 10, what="the next claimant once node2 left")
    assert PREFIX + "thief" not in discovery(d1)["rejected"]


def test_stalled_etcd_is_detected_and_the_watch_reestablished(
    ref: ReferenceTopology, daemons: Daemons, secure_etcd: SecureEtcd
) -> None:
    cfg = secure_cfg(ref, "node1", daemons.sockdir, secure_etcd, [ETCD_1])
    d1 = daemons.start(ref.nodes["node1"], cfg)
    secure_etcd.must("put", PREFIX + "node3", node_record("node3", "172.16.2.3", "10.244.3.0/24"))
    wait_for(lambda: peer_names(d1) == {"node3"}, 10, what="node3 discovered")
    wait_for(lambda: discovery(d1)["state"] == "connected", 10, what="connected")

    # a frozen etcd: TCP still accepts, nothing answers. The quiet watch hits its deadline (lease_ttl
    # 3 s), the re-list times out: state reconnecting; the peers it knew stay
    assert secure_etcd.proc is not None
    secure_etcd.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: discovery(d1)["state"] == "reconnecting", 25, 0.5, "stall detected")
        st = discovery(d1)
        assert st["connected"] is False and st["last_error"]
        assert peer_names(d1) == {"node3"} and d1.alive()
    finally:
        secure_etcd.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: discovery(d1)["state"] == "connected", 30, 0.5, "reconnected after SIGCONT")
    restarts = discovery(d1)["watch_restarts"]
    assert restarts >= 1
    # the new watch delivers changes
    secure_etcd.must("del", PREFIX + "node3")
    wait_for(lambda: peer_names(d1) == set(), 10, what="node3's deletion seen through the new watch")

    # etcd restarted: the simple auth token the daemon holds is gone; it authenticates again
    secure_etcd.stop()
    secure_etcd.start()
    secure_etcd.must("put", PREFIX + "node3", node_record("node3", "172.16.2.3", "10.244.3.0/24"))
    wait_for(lambda: peer_names(d1) == {"node3"}, 30, 0.5, "node3 discovered after the etcd restart")
    wait_for(lambda: discovery(d1)["state"] == "connected", 15, 0.5, "connected after the restart")
    assert d1.logs().count("authenticated to etcd as podrouter") >= 2
    # our registration is (still, or again) in etcd
    out = secure_etcd.must("get", PREFIX + "node1", "--print-value-only")
    assert json.loads(out)["address"] == "172.16.2.2"
    assert d1.alive()
