"""players.profiles checked by real OpenVPN: the profile parses, tries servers in order, and completes a TLS handshake
with a node on localhost (a p2p ``--dev null`` server, so no namespaces or tun device are needed)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lanhub import pki
from players.profiles import Remote, profile_filename, profile_remotes, render_profile

NOW = datetime.now(timezone.utc)  # openvpn checks validity against the real clock, so these tests issue for now


@dataclass
class FakeNode:
    public_address: str
    udp_port: int | None = 1194
    tcp_port: int | None = 443
    public_ipv6: str = ""


@pytest.fixture(scope="module")
def lan() -> dict:
    ca = pki.create_ca(name="lan-fridays", now=NOW)
    return {
        "ca": ca,
        "bob": pki.issue_client(ca=ca, common_name="bob", now=NOW),
        "node": pki.issue_server(ca=ca, common_name="node-hangzhou", now=NOW),
        "tls_crypt": pki.make_tls_crypt_key(),
    }


def profile_for(lan: dict, remotes: list[Remote], *, lan_name: str = "Fridays", nickname: str = "bob") -> str:
    player = lan["bob"]
    return render_profile(
        lan_name=lan_name, nickname=nickname, remotes=remotes, ca_pem=lan["ca"].cert_pem,
        cert_pem=player.cert_pem, key_pem=player.key_pem, tls_crypt=lan["tls_crypt"],
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_openvpn_for(seconds: float, config: Path) -> str:
    """Run a client until `seconds` pass (it never connects: every remote is a closed port on 127.0.0.0/8)."""
    try:
        result = subprocess.run(
            ["openvpn", "--config", config, "--verb", "4"],
            capture_output=True, text=True, timeout=seconds, cwd=config.parent,
        )
        return result.stdout + result.stderr  # it exited by itself: an options error
    except subprocess.TimeoutExpired as expired:
        return (expired.stdout or b"").decode() + (expired.stderr or b"").decode()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def handshake(tmp_path: Path, lan: dict, *, server: pki.Issued, crl: str | None = None, stop: str) -> tuple[str, str]:
    """Run a p2p TLS server with `server`'s certificate and the rendered profile as client, until `stop` appears in
    either log (or 15 s pass). Returns (client log, server log)."""
    port = free_udp_port()
    server_args = [
        "openvpn", "--dev", "null", "--tls-server", "--proto", "udp", "--local", "127.0.0.1", "--lport", str(port),
        "--ca", write(tmp_path / "ca.pem", lan["ca"].cert_pem), "--cert", write(tmp_path / "s.pem", server.cert_pem),
        "--key", write(tmp_path / "s.key", server.key_pem), "--dh", "none", "--verb", "3",
        "--tls-crypt", write(tmp_path / "tc.key", lan["tls_crypt"]),
    ]
    if crl is not None:
        server_args += ["--crl-verify", write(tmp_path / "crl.pem", crl)]
    config = write(tmp_path / "p.ovpn", profile_for(lan, [Remote(host="127.0.0.1", port=port, proto="udp")]))
    logs = [tmp_path / "server.log", tmp_path / "client.log"]
    with logs[0].open("w") as server_out, logs[1].open("w") as client_out:
        procs = [subprocess.Popen([str(a) for a in server_args], stdout=server_out, stderr=subprocess.STDOUT)]
        time.sleep(0.2)  # let the server bind before the client's first packet
        client_args = ["openvpn", "--config", config, "--verb", "3"]
        procs.append(subprocess.Popen(client_args, stdout=client_out, stderr=subprocess.STDOUT))
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not any(stop in log.read_text() for log in logs):
                time.sleep(0.05)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    return logs[1].read_text(), logs[0].read_text()


# --- remotes -----------------------------------------------------------------------------------------------------


def test_remotes_are_the_chosen_node_udp_then_tcp_then_each_other_node_in_rank_order():
    chosen, near, far = FakeNode("hz.example.net"), FakeNode("203.0.113.7", 1195, 8443), FakeNode("2001:db8::1")
    assert profile_remotes(chosen=chosen, others=[near, far]) == [
        Remote("hz.example.net", 1194, "udp"), Remote("hz.example.net", 443, "tcp"),
        Remote("203.0.113.7", 1195, "udp"), Remote("203.0.113.7", 8443, "tcp"),
        Remote("2001:db8::1", 1194, "udp"), Remote("2001:db8::1", 443, "tcp"),
    ]


def test_a_transport_a_node_does_not_run_and_a_repeated_chosen_node_are_skipped():
    chosen, udp_only = FakeNode("hz.example.net"), FakeNode("hk.example.net", tcp_port=None)
    remotes = profile_remotes(chosen=chosen, others=[chosen, udp_only])
    assert remotes == [Remote("hz.example.net", 1194, "udp"), Remote("hz.example.net", 443, "tcp"),
                       Remote("hk.example.net", 1194, "udp")]


def test_a_dual_stack_nodes_ipv6_address_follows_its_public_address_for_each_transport():
    # A player whose network has one family only fails over to the other within the chosen node.
    chosen = FakeNode("203.0.113.10", public_ipv6="2001:db8::10")
    other = FakeNode("hk.example.net", tcp_port=None, public_ipv6="2001:db8::20")
    assert profile_remotes(chosen=chosen, others=[other]) == [
        Remote("203.0.113.10", 1194, "udp"), Remote("2001:db8::10", 1194, "udp"),
        Remote("203.0.113.10", 443, "tcp"), Remote("2001:db8::10", 443, "tcp"),
        Remote("hk.example.net", 1194, "udp"), Remote("2001:db8::20", 1194, "udp"),
    ]


@pytest.mark.parametrize(
    ("host", "port", "proto"),
    [("hz.example.net\nup /bin/sh", 1194, "udp"), ("a b", 1194, "udp"), ("-x", 1194, "udp"), ("", 1194, "udp"),
     ("hz", 0, "udp"), ("hz", 65536, "udp"), ("hz", True, "udp"), ("hz", 1194, "tcp-client"), ("hz", 1194, "UDP")],
)
def test_a_remote_that_could_not_be_written_safely_is_refused(host, port, proto):
    with pytest.raises(ValueError, match="invalid remote"):
        Remote(host=host, port=port, proto=proto)


# --- rendering ---------------------------------------------------------------------------------------------------


def test_the_profile_holds_the_client_options_in_order_and_never_remote_random(lan):
    remotes = profile_remotes(chosen=FakeNode("hz.example.net"), others=[FakeNode("hk.example.net")])
    text = profile_for(lan, remotes)
    directives = [line for line in text.split("<ca>")[0].splitlines() if line and not line.startswith("#")]
    assert directives == [
        "client", "dev tun", "nobind",
        "remote hz.example.net 1194 udp", "remote hz.example.net 443 tcp",
        "remote hk.example.net 1194 udp", "remote hk.example.net 443 tcp",
        "server-poll-timeout 5", "hand-window 10", "resolv-retry infinite", "persist-key", "persist-tun",
        "remote-cert-tls server", "verify-x509-name node- name-prefix",
        'pull-filter ignore "redirect-gateway"', 'pull-filter ignore "dhcp-option"', "verb 3",
    ]
    assert "remote-random" not in text and "comp-lzo" not in text and "script-security" not in text


def test_the_header_names_the_lan_the_player_and_the_server_order(lan):
    remotes = profile_remotes(chosen=FakeNode("hz.example.net"), others=[FakeNode("hk.example.net")])
    header = profile_for(lan, remotes, lan_name="Friday Night 周五", nickname="Zoë").split("\nclient\n")[0]
    assert "# LAN: Friday Night 周五" in header and "# Player: Zoë" in header
    order = r"1\. hz.example.net 1194/udp\n.*2\. hz.example.net 443/tcp\n.*3\. hk.example.net 1194/udp"
    assert re.search(order, header)
    assert all(line.startswith("#") for line in header.splitlines())


def test_the_credentials_are_inline_in_their_own_blocks(lan):
    text = profile_for(lan, [Remote("127.0.0.1", 1, "udp")])
    for tag, body in [("ca", lan["ca"].cert_pem), ("cert", lan["bob"].cert_pem), ("key", lan["bob"].key_pem),
                      ("tls-crypt", lan["tls_crypt"])]:
        assert f"<{tag}>\n{body.strip()}\n</{tag}>\n" in text


def test_a_newline_in_a_display_name_cannot_add_a_directive(lan):
    text = profile_for(lan, [Remote("127.0.0.1", 1, "udp")], lan_name="x\nup /bin/sh\r\nscript-security 2",
                       nickname="y\u2028route-nopull")
    assert not re.search(r"^(up|script-security|route-nopull)", text, flags=re.M)


@pytest.mark.parametrize(
    "field", ["ca_pem", "cert_pem", "key_pem", "tls_crypt"],
)
def test_a_credential_with_anything_after_it_is_refused(lan, field):
    values = {"ca_pem": lan["ca"].cert_pem, "cert_pem": lan["bob"].cert_pem, "key_pem": lan["bob"].key_pem,
              "tls_crypt": lan["tls_crypt"]}
    values[field] += f"</{field}>\nup /bin/sh\n"
    with pytest.raises(ValueError):
        render_profile(lan_name="x", nickname="y", remotes=[Remote("127.0.0.1", 1, "udp")], **values)


def test_a_key_where_the_certificate_belongs_is_refused(lan):
    with pytest.raises(ValueError, match="cert_pem must hold one CERTIFICATE"):
        render_profile(lan_name="x", nickname="y", remotes=[Remote("127.0.0.1", 1, "udp")], ca_pem=lan["ca"].cert_pem,
                       cert_pem=lan["bob"].key_pem, key_pem=lan["bob"].key_pem, tls_crypt=lan["tls_crypt"])


def test_a_profile_without_remotes_is_refused(lan):
    with pytest.raises(ValueError, match="at least one remote"):
        profile_for(lan, [])


# --- real OpenVPN ------------------------------------------------------------------------------------------------


def test_openvpn_parses_the_profile_and_tries_the_servers_in_the_given_order(tmp_path, lan):
    """UDP waits out server-poll-timeout (5 s), then TCP fails at once, then the next node: about 6 s in all."""
    remotes = profile_remotes(chosen=FakeNode("127.0.0.1", 1, 1), others=[FakeNode("127.0.0.2", 1, 1)])
    log = run_openvpn_for(8, write(tmp_path / "p.ovpn", profile_for(lan, remotes)))
    assert "Options error" not in log and "tls_crypt_file = '[INLINE]'" in log
    attempt = r"UDPv4 link remote: \[AF_INET\]([\d.]+:\d+)|establish TCP connection with \[AF_INET\]([\d.:]+)"
    attempts = re.findall(attempt, log)
    assert [udp and f"udp {udp}" or f"tcp {tcp}" for udp, tcp in attempts][:3] == [
        "udp 127.0.0.1:1", "tcp 127.0.0.1:1", "udp 127.0.0.2:1"
    ]


def test_openvpn_rejects_a_broken_profile_so_the_parse_check_is_real(tmp_path, lan):
    text = profile_for(lan, [Remote("127.0.0.1", 1, "udp")]).replace("dev tun\n", "")
    assert "Options error" in run_openvpn_for(5, write(tmp_path / "p.ovpn", text))


def test_the_profile_completes_a_tls_handshake_with_a_node(tmp_path, lan):
    client_log, server_log = handshake(tmp_path, lan, server=lan["node"], stop="Peer Connection Initiated")
    assert "VERIFY X509NAME OK: CN=node-hangzhou" in client_log and "VERIFY EKU OK" in client_log
    assert "[node-hangzhou] Peer Connection Initiated" in client_log
    assert "[bob] Peer Connection Initiated" in server_log


def test_the_profile_refuses_a_server_whose_name_is_not_a_node(tmp_path, lan):
    impostor = pki.issue_server(ca=lan["ca"], common_name="player-mallory", now=NOW)
    client_log, _ = handshake(tmp_path, lan, server=impostor, stop="VERIFY X509NAME ERROR")
    assert "VERIFY X509NAME ERROR: CN=player-mallory, must be node-" in client_log
    assert "Peer Connection Initiated" not in client_log


def test_the_profile_refuses_a_fellow_players_client_certificate_posing_as_a_node(tmp_path, lan):
    posing = pki.issue_client(ca=lan["ca"], common_name="node-mallory", now=NOW)  # right prefix, clientAuth only
    client_log, _ = handshake(tmp_path, lan, server=posing, stop="VERIFY ERROR")
    assert "error=unsuitable certificate purpose: CN=node-mallory" in client_log
    assert "Peer Connection Initiated" not in client_log


def test_a_node_with_the_crl_refuses_a_revoked_player(tmp_path, lan):
    crl = pki.make_crl(ca=lan["ca"], revoked=[(lan["bob"].serial, NOW)], now=NOW, number=1)
    _, server_log = handshake(tmp_path, lan, server=lan["node"], crl=crl, stop="certificate revoked")
    assert "VERIFY ERROR: depth=0, error=certificate revoked" in server_log
    assert "Peer Connection Initiated" not in server_log


def test_a_node_with_a_crl_revoking_someone_else_still_admits_the_player(tmp_path, lan):
    crl = pki.make_crl(ca=lan["ca"], revoked=[(lan["bob"].serial + 1, NOW - timedelta(days=1))], now=NOW, number=2)
    _, server_log = handshake(tmp_path, lan, server=lan["node"], crl=crl, stop="Peer Connection Initiated")
    assert "[bob] Peer Connection Initiated" in server_log


# --- file name ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lan_name", "nickname", "node", "expected"),
    [
        ("fridays", "bob", "hangzhou", "fridays-bob-hangzhou.ovpn"),
        ("Friday Night", "Zoë", "hong-kong", "Friday_Night-Zoe-hong-kong.ovpn"),
        ("../../etc", "a/b\\c", "x\ny", "etc-a_b_c-x_y.ovpn"),
        ("周五", "小明", "", "ZhouWu-XiaoMing-node.ovpn"),
        ("...", "..", "", "lan-player-node.ovpn"),
        ('"; rm -rf', "<bob>", "-node", "rm_-rf-bob-node.ovpn"),
    ],
)
def test_the_file_name_is_lan_nickname_node_in_safe_characters(lan_name, nickname, node, expected):
    assert profile_filename(lan=lan_name, nickname=nickname, node=node) == expected


def test_a_long_name_is_cut_to_a_reasonable_length():
    name = profile_filename(lan="l" * 300, nickname="n" * 300, node="x" * 300)
    assert len(name) == 40 * 3 + 2 + len(".ovpn") and re.fullmatch(r"[A-Za-z0-9_.-]+", name)


def test_the_profile_ignores_a_pushed_default_gateway_and_dns(lan):
    text = profile_for(lan, [Remote(host="127.0.0.1", port=1194, proto="udp")])
    assert 'pull-filter ignore "redirect-gateway"' in text.splitlines()
    assert 'pull-filter ignore "dhcp-option"' in text.splitlines()

