"""Nodes reached over IPv6 (issue 12, item 5): Hangzhou has only an IPv6 public address, Hong Kong is dual-stack
(an IPv4 public address and an IPv6 one); Hong Kong links to Hangzhou over IPv6, and players whose network reaches
the servers over IPv6 only connect to both: to Hong Kong through the IPv6 remote that follows its IPv4 one.

The lab's bridges get addresses from 2001:db8::/32 (documentation prefix) inside the lab's own namespaces. LanHub
still manages the servers over SSH on their IPv4 addresses (ssh_host): only what players and links use is IPv6.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from nodes import services
from nodes.models import Node, NodeState, SyncRun, SyncStatus
from players import services as player_services
from players.models import Player
from tests.celery_worker import real_worker
from tests.lab_helpers import describe_runs, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REGIONS = {"hangzhou": "asia/cn/east", "hongkong": "asia/hk"}


def register_v6(lab, lan, name, *, dual_stack=False):
    """A server whose public address (what profiles and links dial) is its IPv6 address, or, dual-stack, its IPv4
    address with the IPv6 one besides."""
    host = lab.add_node(name)
    lab.enable_ipv6(host)
    host.authorize(lan.ssh_public_key)
    addresses = ({"public_address": host.address, "public_ipv6": host.address6} if dual_stack
                 else {"public_address": host.address6})
    services.create_node(lan=lan, name=name, region=REGIONS[name], ssh_host=host.address, **addresses)
    return host


def ipv6_only_player(lab, name):
    """A player machine that reaches the servers over IPv6 only: IPv4 to the servers' network is dropped."""
    host = lab.add_player(name)
    lab.enable_ipv6(host)
    lab.exec(host, ["iptables", "-A", "OUTPUT", "-d", "203.0.113.0/24", "-j", "DROP"])
    return host


def join_and_download(invite, nickname: str, node: str) -> str:
    client = Client()
    response = client.post(f"/join/{invite.token}/", {"nickname": nickname})
    assert response.status_code == 302, response.content[:500]
    player = Player.objects.get(lan=invite.lan, nickname=nickname)
    profile = client.get(f"/me/{player.token}/profile/{node}.ovpn")
    assert profile.status_code == 200, profile.content[:500]
    return profile.content.decode()


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_players_and_links_reach_nodes_over_an_ipv6_underlay(lab):
    owner = get_user_model().objects.create_user("host6", password="host-password")
    lan = services.create_lan(owner=owner, name="IPv6 night", slug="ipv6night", topology_mode="hub")
    with real_worker(concurrency=2):
        hz_host = register_v6(lab, lan, "hangzhou")
        hk_host = register_v6(lab, lan, "hongkong", dual_stack=True)

        def ready():
            nodes = list(Node.objects.filter(lan=lan))
            failed = [n for n in nodes if n.state == NodeState.FAILED]
            assert not failed, f"{failed[0].name} failed: {failed[0].last_error}\n{describe_runs(lan)}"
            busy = SyncRun.objects.filter(node__lan=lan, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING])
            return len(nodes) == 2 and all(n.state == NodeState.READY for n in nodes) and not busy.exists()

        wait_until(ready, timeout=90, what=lambda: f"both nodes ready\n{describe_runs(lan)}")

        # The link: Hong Kong's client dials Hangzhou's IPv6 address and gets its fixed tunnel address.
        link_conf = hk_host.etc_path("openvpn/client/lanhub-link-hangzhou.conf").read_text()
        assert f"remote {hz_host.address6} 1194" in link_conf
        wait_until(lambda: lab.ping(hk_host, "10.0.0.1", timeout=1), timeout=30,
                   what="Hong Kong's link to Hangzhou over IPv6")

        invite = player_services.create_invite(lan=lan, created_by=owner, note="v6", max_uses=10)
        alice_profile = join_and_download(invite, "alice", "hangzhou")
        bob_profile = join_and_download(invite, "bob", "hongkong")
        hz_remotes = re.findall(r"^remote (\S+) (\d+) (udp|tcp)$", alice_profile, re.M)
        assert hz_remotes[:2] == [(hz_host.address6, "1194", "udp"), (hz_host.address6, "443", "tcp")], hz_remotes
        # Hong Kong's profile: its IPv4 address, then its IPv6 one, for each transport.
        hk_remotes = re.findall(r"^remote (\S+) (\d+) (udp|tcp)$", bob_profile, re.M)
        assert hk_remotes[:2] == [(hk_host.address, "1194", "udp"), (hk_host.address6, "1194", "udp")], hk_remotes

        alice, bob = ipv6_only_player(lab, "alice"), ipv6_only_player(lab, "bob")
        alice.start_openvpn(alice_profile)
        bob.start_openvpn(bob_profile)
        alice_ip, bob_ip = alice.wait_for_tunnel(timeout=30), bob.wait_for_tunnel(timeout=30)
        assert alice_ip.startswith("10.0.") and bob_ip.startswith("10.2."), (alice_ip, bob_ip)
        # The servers saw the players' IPv6 addresses: the tunnels really run over IPv6.
        assert alice.address6 in server_log(hz_host), server_log(hz_host)[-2000:]
        assert bob.address6 in server_log(hk_host), server_log(hk_host)[-2000:]
        # Across both servers and the IPv6 link.
        assert wait_until(lambda: lab.ping(alice, bob_ip, timeout=2), timeout=20, what="alice -> bob over IPv6")
        assert lab.ping(bob, alice_ip, timeout=2) is not None, "bob cannot reach alice"

        # The same dual-stack server still takes IPv4: carol has no IPv6 at all.
        carol = lab.add_player("carol")
        carol.start_openvpn(join_and_download(invite, "carol", "hongkong"))
        carol_ip = carol.wait_for_tunnel(timeout=30)
        assert carol.address in server_log(hk_host)
        # carol reaches bob on her own server and alice across the IPv6 link, and both answer her. (A third player
        # joining used to change the lab router's MAC under the players already connected: lab/netns.py.)
        assert wait_until(lambda: lab.ping(carol, bob_ip, timeout=2), timeout=10, what="carol -> bob")
        assert wait_until(lambda: lab.ping(carol, alice_ip, timeout=2), timeout=10, what="carol -> alice over the link")
        assert lab.ping(alice, carol_ip, timeout=2) is not None, "alice cannot reach carol"
        assert lab.ping(bob, carol_ip, timeout=2) is not None, "bob cannot reach carol"


def server_log(node_host, instance="lanhub-udp") -> str:
    path = node_host.etc_path(f"openvpn/lanhub/run/{instance}.log")
    return path.read_text(errors="replace") if path.exists() else ""
