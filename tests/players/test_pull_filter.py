"""A rogue or stale node cannot take over a player's traffic (issue 14, item 12), shown by real OpenVPN.

A server with a certificate of the LAN pushes ``redirect-gateway def1`` and DNS settings besides the LAN's route.
A player connects with the profile LanHub renders, in a namespace of its own with an ordinary default route: the
LAN's route arrives, the player's default route and routing table stay as they were, and no DNS option reaches
the client's up script (where NetworkManager and resolvconf scripts read them). The same server and profile
without LanHub's two ``pull-filter`` lines take the player's traffic over: the control that shows the test can see
the difference.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from lanhub import pki
from nodes import layout
from players.profiles import Remote, render_profile
from tests.lab_helpers import require_openvpn

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def _openvpn():
    require_openvpn()  # a skip here, a failure under CI

NOW = datetime.now(timezone.utc)
ROGUE_PUSHES = ['push "route 10.0.0.0 255.0.0.0"', 'push "redirect-gateway def1"',
                'push "dhcp-option DNS 10.99.0.1"', 'push "dhcp-option DOMAIN rogue.example"']
FILTER_LINES = ('pull-filter ignore "redirect-gateway"', 'pull-filter ignore "dhcp-option"')


def inline(tag: str, body: str) -> str:
    return f"<{tag}>\n{body.strip()}\n</{tag}>"


@pytest.fixture(scope="module")
def rogue(lab):
    """A server of the LAN (its certificate is a node's) that pushes a default gateway and DNS servers."""
    ca = pki.create_ca(name="lanhub-rogue-ca", now=NOW)
    node = pki.issue_server(ca=ca, common_name=layout.node_cn("rogue"), now=NOW, days=30)
    tls_crypt = pki.make_tls_crypt_key()
    host = lab.add_player("rogue")  # a bare namespace on the lab's underlay is all a server needs here
    config = "\n".join([
        "port 1194", "proto udp", "dev tun", "topology subnet", "server 10.99.0.0 255.255.255.0", "dh none",
        "keepalive 10 60", "disable-dco", "verb 3", *ROGUE_PUSHES,
        inline("ca", ca.cert_pem), inline("cert", node.cert_pem), inline("key", node.key_pem),
        inline("tls-crypt", tls_crypt),
    ]) + "\n"
    host.start_openvpn(config)
    yield {"host": host, "ca": ca, "tls_crypt": tls_crypt}
    host.stop_openvpn()


def connect(lab, rogue, name: str, *, keep_filter: bool) -> dict:
    """Connect a fresh player with LanHub's profile (or the profile minus its pull-filter lines)."""
    player = lab.add_player(name)
    bob = pki.issue_client(ca=rogue["ca"], common_name=f"player-{name}-1a2b3c", now=NOW)
    profile = render_profile(lan_name="Lab", nickname=name, remotes=[Remote(rogue["host"].address, 1194, "udp")],
                             ca_pem=rogue["ca"].cert_pem, cert_pem=bob.cert_pem, key_pem=bob.key_pem,
                             tls_crypt=rogue["tls_crypt"])
    assert all(line in profile.splitlines() for line in FILTER_LINES)
    if not keep_filter:
        profile = "\n".join(line for line in profile.splitlines() if line not in FILTER_LINES) + "\n"
    # The test's own instrument: an up script that writes the options a client hands to DNS tools.
    player.run_dir.mkdir(parents=True, exist_ok=True)
    dump, script = player.run_dir / "foreign-options", player.run_dir / "up.sh"
    script.write_text(f"#!/bin/sh\nenv | grep '^foreign_option_' > {dump}; true\n")
    script.chmod(0o755)
    profile += f"script-security 2\nup {script}\n"
    before = routes(player)
    player.start_openvpn(profile)
    address = player.wait_for_tunnel(timeout=20)
    after = routes(player)
    player.stop_openvpn()
    return {"before": before, "after": after, "address": address, "log": player.log(),
            "foreign": dump.read_text() if dump.exists() else None}


def routes(player) -> list[str]:
    return player.exec(["ip", "-4", "route", "show"]).stdout.strip().splitlines()


def test_a_pushed_default_gateway_and_dns_are_ignored_by_lanhubs_profile(lab, rogue):
    seen = connect(lab, rogue, "alice", keep_filter=True)
    added = set(seen["after"]) - set(seen["before"])
    assert any(line.startswith("10.0.0.0/8 via 10.99.0.1 dev tun") for line in added), added  # the LAN's route
    assert [r for r in seen["after"] if r.startswith("default")] == [r for r in seen["before"]
                                                                     if r.startswith("default")]
    assert not [r for r in seen["after"] if r.startswith(("0.0.0.0/1", "128.0.0.0/1"))], seen["after"]
    assert set(seen["before"]) <= set(seen["after"])  # nothing the player had was replaced
    assert seen["foreign"] == "", seen["foreign"]  # the up script ran, and no DNS option reached it
    assert "Pushed option removed by filter: 'redirect-gateway def1'" in seen["log"]
    assert "Pushed option removed by filter: 'dhcp-option DNS 10.99.0.1'" in seen["log"]


def test_without_the_filter_the_same_server_takes_the_players_traffic(lab, rogue):
    seen = connect(lab, rogue, "carol", keep_filter=False)
    assert any(r.startswith("0.0.0.0/1 via 10.99.0.1") for r in seen["after"]), seen["after"]
    assert any(r.startswith("128.0.0.0/1 via 10.99.0.1") for r in seen["after"]), seen["after"]
    assert "foreign_option_1=dhcp-option DNS 10.99.0.1" in seen["foreign"], seen["foreign"]
