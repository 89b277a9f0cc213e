"""The namespace lab itself: two nodes and two players that behave like separate machines.

Tests run in file order on one module-scoped lab; ``test_down_leaves_nothing_of_the_lab`` is the last one that
uses it, and the stale-lab test comes after it because a lab with host routes holds a machine-wide lock.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paramiko
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab.netns import BASE_DIR, HOST_ADDR, Lab, LabError
from tests.lab_helpers import connect_node, generate_ssh_key, require_lab, ssh_run

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cast(lab, ssh_key):
    """hangzhou + hongkong (nodes, key authorized) and p1 + p2 (players)."""
    nodes = [lab.add_node("hangzhou"), lab.add_node("hongkong")]
    for node in nodes:
        node.authorize(ssh_key.public_line)
    return {"nodes": nodes, "players": [lab.add_player("p1"), lab.add_player("p2")]}


def ssh(node, key, command: str) -> str:
    with connect_node(node, key) as client:
        status, out, err = ssh_run(client, command)
    assert status == 0, f"{command!r} on {node.name}: {err}"
    return out


def lab_leftovers(prefix: str) -> list[str]:
    """What is left of lab ``prefix``: its namespaces, links, /etc/netns dirs and the host routes it made.

    Only routes through the lab's own link count (their device carries the prefix): the machine may have other
    routes into 203.0.113.0/24 or 198.51.100.0/24 (another engineer's lab, the package registry) that are not ours.
    """
    found = [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
             .stdout.split() if n.startswith(prefix)]
    found += [f"link {line}" for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
              .stdout.splitlines() if prefix in line]
    found += [f"route {line}" for line in subprocess.run(["ip", "route"], capture_output=True, text=True)
              .stdout.splitlines() if prefix in line]
    netns = Path("/etc/netns")
    found += [f"dir {p}" for p in (netns.iterdir() if netns.is_dir() else []) if p.name.startswith(prefix)]
    return found


def test_each_node_accepts_the_test_key_under_its_pinned_host_key(cast, ssh_key):
    for node in cast["nodes"]:
        assert ssh(node, ssh_key, "hostname -I").split() == [node.address]
        assert node.host_key_fingerprint().startswith("SHA256:")


def test_a_node_presenting_another_host_key_is_rejected(cast, ssh_key):
    hangzhou, hongkong = cast["nodes"]
    impostor = type(hangzhou)(hangzhou.lab, hangzhou.name, hangzhou.ns, hangzhou.address)
    impostor.host_public_key = hongkong.host_public_key  # pin the wrong key for hangzhou's address
    with pytest.raises(paramiko.BadHostKeyException):
        connect_node(impostor, ssh_key)


def test_each_node_sees_its_own_etc_view_over_ssh(cast, ssh_key):
    marker = "openvpn/server/lanhub-lab-marker"
    assert not Path("/etc", marker).exists()
    for node in cast["nodes"]:
        node.etc_path(marker).write_text(f"{node.name}\n")
    for node in cast["nodes"]:
        assert ssh(node, ssh_key, f"cat /etc/{marker}") == f"{node.name}\n"
        assert sorted(ssh(node, ssh_key, "ls -d /etc/openvpn/server /etc/openvpn/client").split()) == [
            "/etc/openvpn/client", "/etc/openvpn/server"]
    assert not Path("/etc", marker).exists()


def test_ip_forward_set_over_ssh_stays_in_that_namespace(cast, ssh_key):
    hangzhou, hongkong = cast["nodes"]
    host_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    ssh(hangzhou, ssh_key, "sysctl -w net.ipv4.ip_forward=1")
    try:
        assert ssh(hangzhou, ssh_key, "sysctl -n net.ipv4.ip_forward").strip() == "1"
        assert ssh(hongkong, ssh_key, "sysctl -n net.ipv4.ip_forward").strip() == "0"
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_before
    finally:
        ssh(hangzhou, ssh_key, "sysctl -w net.ipv4.ip_forward=0")


def test_players_reach_nodes_and_each_other_across_wan(lab, cast):
    for player in cast["players"]:
        for node in cast["nodes"]:
            assert lab.ping(player, node.address) is not None, f"{player.name} -> {node.name}"
    p1, p2 = cast["players"]
    assert lab.ping(p1, p2.address) is not None
    assert lab.udp_roundtrip(p1, cast["nodes"][0], cast["nodes"][0].address, 41000)
    assert lab.ping(p1, "203.0.113.99", timeout=1) is None  # nobody there: ping reports None, not an error


def test_a_host_joining_later_leaves_the_others_reaching_their_router(lab, cast):
    """A new host's port must not change the wan router's MAC under the hosts already talking through it. A Linux
    bridge without an address of its own takes its lowest port MAC; a port added with a lower one then changes it,
    and every host's cached neighbour entry for the router points at an address the router no longer answers (IPv4
    and IPv6 alike) until that entry is probed again, 20 s and more. Here the new port gets the lowest MAC there is
    among locally administered ones, so without a fixed bridge address the change is certain."""
    node = cast["nodes"][0]
    mac = lambda dev: lab.exec(lab.wan, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()  # noqa: E731
    bridge_mac = lambda: mac("br-players")  # noqa: E731
    before = bridge_mac()
    # The sender must not be the player whose wan port owns the bridge's MAC: frames to a port's own MAC arriving on
    # that port still count as the router's, so only the other players show the loss.
    p1 = next(p for p in cast["players"] if mac(f"p-{p.name}") != before)
    assert lab.ping(p1, node.address) is not None
    cached = lab.exec(p1, ["ip", "neigh", "show", "198.51.100.1", "dev", "eth0"]).stdout
    assert before in cached, cached  # p1 holds the router's MAC

    port, peer = "t-lowmac", "t-lowmacp"
    lab.exec(lab.wan, ["ip", "link", "add", port, "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", peer])
    try:
        lab.exec(lab.wan, ["ip", "link", "set", port, "master", "br-players", "up"])
        lab.exec(lab.wan, ["ip", "link", "set", peer, "up"])
        assert bridge_mac() == before
        # At once, with p1's cached entry: one probe, no time for a new neighbour resolution to rescue it.
        assert lab.ping(p1, node.address, timeout=1) is not None, "p1 lost its router when a port was added"
    finally:
        lab.exec(lab.wan, ["ip", "link", "del", port], check=False)


def test_the_host_reaches_node_sshd_through_the_lab_link(lab, cast):
    for node in cast["nodes"]:
        route = subprocess.run(["ip", "route", "get", node.address], capture_output=True, text=True).stdout
        assert f"dev {lab.prefix}host src {HOST_ADDR}" in route
        with socket.create_connection((node.address, 22), timeout=5) as sock:
            assert sock.recv(64).startswith(b"SSH-2.0-")


# ---- OpenVPN across the lab: a tiny EC CA, a server on hangzhou (started over SSH), a client on p1 -------------

def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, eku=None) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def make_pki() -> dict[str, str]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lanhub-lab-ca")])
    ca = _cert("lanhub-lab-ca", ca_key, ca_name, ca_key, ca=True)
    out = {"ca": _pem(ca)}
    for role, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        out[role + "_cert"] = _pem(_cert(f"lab-{role}", key, ca_name, ca_key, eku=eku))
        out[role + "_key"] = _pem(key)
    return out


def _inline(pki: dict[str, str], role: str) -> str:
    return f"<ca>\n{pki['ca']}</ca>\n<cert>\n{pki[role + '_cert']}</cert>\n<key>\n{pki[role + '_key']}</key>\n"


def test_openvpn_server_on_a_node_serves_a_player(lab, cast, ssh_key):
    node, player = cast["nodes"][0], cast["players"][0]
    pki = make_pki()
    server_conf = (f"port 1194\nproto udp\nlocal {node.address}\ndev tun\ntopology subnet\n"
                   "server 10.8.0.0 255.255.255.0\ndh none\ndisable-dco\nkeepalive 5 30\nverb 3\n"
                   + _inline(pki, "server"))
    client_conf = (f"client\ndev tun\nproto udp\nremote {node.address} 1194\nnobind\nremote-cert-tls server\n"
                   "disable-dco\nverb 3\n" + _inline(pki, "client"))
    with connect_node(node, ssh_key) as client:
        # The ssh session must see the node's /etc view before anything is written through it.
        assert ssh_run(client, "test -d /etc/openvpn/server && test ! -e /etc/openvpn/server/lab-test.conf")[0] == 0
        with client.open_sftp() as sftp:
            sftp.putfo(io.BytesIO(server_conf.encode()), "/etc/openvpn/server/lab-test.conf")
        status, _, err = ssh_run(client, "openvpn --cd /etc/openvpn/server --config lab-test.conf "
                                         "--writepid /etc/openvpn/server/lab-test.pid "
                                         "--log /etc/openvpn/server/lab-test.log --daemon openvpn-lab-test")
        assert status == 0, err
    assert not Path("/etc/openvpn/server/lab-test.conf").exists()
    server_log = node.etc_path("openvpn/server/lab-test.log")
    deadline = time.monotonic() + 10
    while "Initialization Sequence Completed" not in server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Initialization Sequence Completed" in server_log.read_text(), server_log.read_text()[-2000:]

    player.start_openvpn(client_conf)
    vpn_address = player.wait_for_tunnel(timeout=15)
    assert vpn_address.startswith("10.8.0."), player.log()[-2000:]
    assert lab.ping(player, "10.8.0.1", count=2) is not None
    assert lab.ping(node, vpn_address) is not None
    assert lab.udp_roundtrip(node, player, vpn_address, 41001)

    player.stop_openvpn()
    assert player.openvpn_pid() is None
    assert lab.kill_process(node, r"openvpn .*lab-test\.conf")
    assert not any("openvpn" in Path(f"/proc/{p}/cmdline").read_text() for p in lab.pids(node)
                   if Path(f"/proc/{p}").exists())


def test_a_second_lab_waits_for_the_host_link_but_one_without_it_coexists(lab, cast):
    before = sorted(p.name for p in BASE_DIR.iterdir())
    with pytest.raises(LabError, match=f"another lab holds the host link routes \\(lab {lab.id} "):
        Lab(lock_timeout=0.5)
    assert sorted(p.name for p in BASE_DIR.iterdir()) == before  # the failed lab cleaned up after itself
    with Lab(host_link=False) as side:
        player = side.add_player("p1")  # same short name as the module lab's player: namespaces differ
        assert side.ping(player, "198.51.100.1") is not None
        assert side.ping(player, cast["nodes"][0].address) is None  # two labs never see each other
    assert lab_leftovers(side.prefix) == []


def test_down_leaves_nothing_of_the_lab(lab, cast):
    """Last user of the module's lab: down() it here and look for leftovers (the fixture's down is a no-op)."""
    state_dir, prefix = lab.state_dir, lab.prefix
    started = time.monotonic()
    lab.down()
    assert time.monotonic() - started < 10
    assert lab_leftovers(prefix) == []
    assert not state_dir.exists()
    lab.down()  # idempotent


def spawn_child_lab() -> tuple[subprocess.Popen, str, str]:
    """A lab (one node, one player) owned by another process; returns (process, state_dir, prefix)."""
    require_lab()
    script = ("import time; from lab.netns import Lab\n"
              "lab = Lab(lock_timeout=60); lab.add_node('child'); lab.add_player('pchild')\n"
              "print(lab.state_dir, lab.prefix, flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([child.stdout], [], [], 90)
    if not ready:
        child.kill()
        child.wait(timeout=10)
        pytest.fail("child lab did not come up in 90 s")
    state_dir, prefix = child.stdout.readline().split()
    assert lab_leftovers(prefix), "the child's lab should exist now"
    return child, state_dir, prefix


def test_cleanup_stale_removes_a_lab_whose_process_died():
    child, state_dir, prefix = spawn_child_lab()
    child.kill()  # SIGKILL: no atexit, no signal handler, the lab stays behind
    child.wait(timeout=10)
    assert lab_leftovers(prefix), "the killed child should have left its lab behind"
    state = json.loads((Path(state_dir) / "state.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{4}", state["id"]) and state["pid"] == child.pid

    assert state["id"] in Lab.cleanup_stale()
    assert lab_leftovers(prefix) == []
    assert not Path(state_dir).exists()


def test_cleanup_stale_removes_orphans_whose_state_is_gone_but_not_busy_namespaces():
    require_lab()
    orphan, busy = f"lh{secrets.token_hex(2)}-", f"lh{secrets.token_hex(2)}-"
    subprocess.run(["ip", "netns", "add", orphan + "wan"], check=True)
    (Path("/etc/netns") / (orphan + "node")).mkdir(parents=True)
    subprocess.run(["ip", "netns", "add", busy + "x"], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", busy + "x", "sleep", "30"])
    try:
        time.sleep(0.2)
        removed = Lab.cleanup_stale()
        assert orphan[2:6] in removed and busy[2:6] not in removed
        assert lab_leftovers(orphan) == []
        assert lab_leftovers(busy) == [f"netns {busy}x"]
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", busy + "x"], check=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_lab_goes_down_when_its_process_is_signalled(signum):
    child, state_dir, prefix = spawn_child_lab()
    child.send_signal(signum)
    assert child.wait(timeout=20) != 0
    assert lab_leftovers(prefix) == []
    assert not Path(state_dir).exists()


def test_another_process_can_take_a_live_lab_down_from_its_state_dir():
    child, state_dir, prefix = spawn_child_lab()
    try:
        loaded = Lab.load(state_dir)
        assert loaded.owner_alive() and set(loaded.nodes) == {"child"} and set(loaded.players) == {"pchild"}
        loaded.down()
        assert lab_leftovers(prefix) == []
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.parametrize("env, outcome", [({}, pytest.skip.Exception), ({"CI": "true"}, pytest.fail.Exception),
                                          ({"LANHUB_REQUIRE_LAB": "1"}, pytest.fail.Exception)])
def test_lab_fixtures_skip_without_the_lab_unless_it_is_required(monkeypatch, env, outcome):
    for name in ("CI", "LANHUB_REQUIRE_LAB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Lab, "requirements_missing", staticmethod(lambda: "/dev/net/tun is missing"))
    with pytest.raises(outcome, match="/dev/net/tun is missing"):
        require_lab()
