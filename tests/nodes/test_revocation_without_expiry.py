"""A LAN keeps working while the portal is down (issue 14, item 1), checked by real OpenVPN.

Certificates are issued the way LanHub issues them (the CA, the node's server and link certificates, the players'),
but back-dated: the portal last ran PORTAL_DOWN_DAYS ago, which is past every validity period LanHub sets or ever
set (the 30-day CRL, the two years node certificates used to get, the ten years the CA and players used to get).
OpenVPN checks validity against the real clock, so moving the certificates back is moving the clock forward. Then a player and a link client still complete
a handshake with the node, a revoked player still does not, and a node with the old CRL file refuses everyone.
"""

from __future__ import annotations

import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lanhub import pki
from nodes import layout, render
from nodes.services import CRL_DAYS, NODE_CERT_DAYS
from players.profiles import Remote, render_profile
from tests.figures import record
from tests.lab_helpers import require_openvpn

@pytest.fixture(autouse=True)
def _openvpn():
    require_openvpn()  # a skip here, a failure under CI

NOW = datetime.now(timezone.utc)
# Everything was issued, and the portal stopped, a year past the longest lifetime LanHub ever gave (ten years).
PORTAL_DOWN_DAYS = 3650 + 365
STOPPED = ISSUED = NOW - timedelta(days=PORTAL_DOWN_DAYS)


@pytest.fixture(scope="module")
def lan() -> dict:
    ca = pki.create_ca(name="lanhub-lab-ca", now=ISSUED)
    return {
        "ca": ca,
        "node": pki.issue_server(ca=ca, common_name=layout.node_cn("hangzhou"), now=ISSUED, days=NODE_CERT_DAYS),
        "link": pki.issue_client(ca=ca, common_name=layout.link_cn("hongkong"), now=ISSUED, days=NODE_CERT_DAYS),
        "bob": pki.issue_client(ca=ca, common_name="player-bob-1a2b3c", now=ISSUED),
        "mallory": pki.issue_client(ca=ca, common_name="player-mallory-4d5e6f", now=ISSUED),
        "tls_crypt": pki.make_tls_crypt_key(),
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def crl_verify_args(tmp_path: Path, lan: dict, revoked: list[pki.Issued]) -> list[str]:
    """The node's crl-verify line as the renderer writes it, pointed at a directory filled as the sync fills it."""
    line = next(line for line in render._server_pki() if line.startswith("crl-verify"))
    assert line == f"crl-verify {layout.PKI_CRL_DIR} dir"
    directory = tmp_path / "revoked"
    directory.mkdir()
    for cert in revoked:
        Path(layout.revoked_serial_path(format(cert.serial, "x")).replace(layout.PKI_CRL_DIR, str(directory))).touch()
    return ["--crl-verify", str(directory), "dir"]


def handshake(tmp_path: Path, lan: dict, client: pki.Issued, crl_args: list[str], stop: tuple[str, ...]):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = lan["node"]
    server = ["openvpn", "--dev", "null", "--tls-server", "--proto", "udp", "--local", "127.0.0.1", "--lport",
              str(port), "--ca", write(tmp_path / "ca.pem", lan["ca"].cert_pem),
              "--cert", write(tmp_path / "s.pem", node.cert_pem), "--key", write(tmp_path / "s.key", node.key_pem),
              "--dh", "none", "--verb", "3", "--tls-crypt", write(tmp_path / "tc.key", lan["tls_crypt"]), *crl_args]
    profile = render_profile(lan_name="Lab", nickname="x", remotes=[Remote("127.0.0.1", port, "udp")],
                             ca_pem=lan["ca"].cert_pem, cert_pem=client.cert_pem, key_pem=client.key_pem,
                             tls_crypt=lan["tls_crypt"])
    logs = [tmp_path / "server.log", tmp_path / "client.log"]
    with logs[0].open("w") as server_out, logs[1].open("w") as client_out:
        procs = [subprocess.Popen([str(a) for a in server], stdout=server_out, stderr=subprocess.STDOUT)]
        time.sleep(0.2)
        procs.append(subprocess.Popen(["openvpn", "--config", write(tmp_path / "p.ovpn", profile), "--verb", "3"],
                                      stdout=client_out, stderr=subprocess.STDOUT))
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not any(s in log.read_text() for log in logs for s in stop):
                time.sleep(0.05)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    return logs[1].read_text(), logs[0].read_text()


def test_nothing_a_node_holds_carries_a_date(lan):
    assert NODE_CERT_DAYS is None
    for name in ("ca", "node", "link", "bob"):
        assert lan[name].not_after == pki.NO_EXPIRY, name
    record("portal_down_days_tested", PORTAL_DOWN_DAYS)
    record("portal_down_days_guaranteed", "no date (indefinite)")


@pytest.mark.parametrize("who", ["bob", "link"])
def test_players_and_links_connect_long_after_the_portal_stopped(tmp_path, lan, who):
    client_log, server_log = handshake(tmp_path, lan, lan[who], crl_verify_args(tmp_path, lan, [lan["mallory"]]),
                                       stop=("Peer Connection Initiated", "VERIFY ERROR", "VERIFY CRL"))
    # The TLS handshake is mutual: either side logging its completion means the node accepted the certificate
    # (under load the client may log it a moment before the server does).
    assert "Peer Connection Initiated" in client_log + server_log, server_log[-2000:]
    assert "VERIFY ERROR" not in server_log and "is revoked" not in server_log


def test_a_revoked_player_is_still_refused_long_after_the_portal_stopped(tmp_path, lan):
    _, server_log = handshake(tmp_path, lan, lan["mallory"], crl_verify_args(tmp_path, lan, [lan["mallory"]]),
                              stop=("VERIFY CRL", "Peer Connection Initiated"))
    assert f"serial={lan['mallory'].serial} is revoked" in server_log, server_log[-2000:]
    assert "Peer Connection Initiated" not in server_log


def test_the_old_crl_file_would_have_refused_everyone_by_now(tmp_path, lan):
    # The control: the CRL LanHub signed and pushed last, CRL_DAYS long, lapsed while the portal was down.
    crl = pki.make_crl(ca=lan["ca"], revoked=[(lan["mallory"].serial, STOPPED)], now=STOPPED, number=7,
                       days=CRL_DAYS)
    args = ["--crl-verify", str(write(tmp_path / "crl.pem", crl))]
    _, server_log = handshake(tmp_path, lan, lan["bob"], args, stop=("VERIFY ERROR", "Peer Connection Initiated"))
    assert "CRL has expired" in server_log, server_log[-2000:]
