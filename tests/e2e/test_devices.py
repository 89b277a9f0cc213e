"""Two devices of one player online at once (issue 12, item 3), with real OpenVPN clients.

alice joins, adds a laptop on her page and downloads one profile per device; her PC and her laptop connect to
Hangzhou at the same time, bob connects to Hong Kong. Both of alice's devices stay up, each with its own address,
and reach bob and each other (one shared certificate would drop the first device the moment the second connects).
The lobby shows alice once with both devices. Then "I lost this device" switches the laptop off, and only it.
"""

from __future__ import annotations

import re
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from nodes import services, tasks
from nodes.models import Node, NodeState
from players import services as player_services
from players.models import Player
from tests.celery_worker import real_worker
from tests.lab_helpers import describe_runs, settled, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REGIONS = {"hangzhou": "asia/cn/east", "hongkong": "asia/hk"}


def register(lab, lan, name):
    host = lab.add_node(name)
    host.authorize(lan.ssh_public_key)
    services.create_node(lan=lan, name=name, region=REGIONS[name], public_address=host.address,
                         ssh_host=host.address)
    return host


def tunnel_address(player_host) -> str | None:
    out = player_host.exec(["ip", "-4", "-o", "addr", "show", "dev", "tun0"], check=False).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None


def server_log(node_host, instance="lanhub-udp") -> str:
    path = node_host.etc_path(f"openvpn/lanhub/run/{instance}.log")
    return path.read_text(errors="replace") if path.exists() else ""


def page(client: Client, player: Player) -> str:
    response = client.get(f"/me/{player.token}/")
    assert response.status_code == 200
    return response.content.decode()


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_two_devices_of_one_player_are_online_at_once_and_both_reachable(lab):
    owner = get_user_model().objects.create_user("hostd", password="host-password")
    lan = services.create_lan(owner=owner, name="Devices night", slug="devices", topology_mode="hub")
    with real_worker(concurrency=2):
        hz_host = register(lab, lan, "hangzhou")
        hk_host = register(lab, lan, "hongkong")

        def ready():
            nodes = list(Node.objects.filter(lan=lan))
            failed = [n for n in nodes if n.state == NodeState.FAILED]
            assert not failed, f"{failed[0].name} failed: {failed[0].last_error}\n{describe_runs(lan)}"
            return len(nodes) == 2 and all(n.state == NodeState.READY for n in nodes) and settled(lan)

        wait_until(ready, timeout=90, what=lambda: f"both nodes ready\n{describe_runs(lan)}")
        wait_until(lambda: lab.ping(hk_host, "10.0.0.1", timeout=1), timeout=20, what="Hong Kong's link")

        # alice joins and adds her laptop on her page; each device downloads its own profile over HTTP.
        invite = player_services.create_invite(lan=lan, created_by=owner, note="devices", max_uses=10)
        browser = Client()
        assert browser.post(f"/join/{invite.token}/", {"nickname": "alice"}).status_code == 302
        alice = Player.objects.get(lan=lan, nickname="alice")
        assert browser.post(f"/me/{alice.token}/devices/", {"name": "laptop"}).status_code == 302
        first, laptop = alice.devices.order_by("created_at")
        profiles = {}
        for device in (first, laptop):
            assert f"/me/{alice.token}/devices/{device.ref}/profile/hangzhou.ovpn" in page(browser, alice)
            response = browser.get(f"/me/{alice.token}/devices/{device.ref}/profile/hangzhou.ovpn")
            assert response.status_code == 200, response.content[:300]
            profiles[device.name] = response.content.decode()
        assert profiles[first.name] != profiles["laptop"]
        assert browser.post(f"/join/{invite.token}/", {"nickname": "bob"}).status_code == 302
        bob = Player.objects.get(lan=lan, nickname="bob")
        bob_profile = Client().get(f"/me/{bob.token}/profile/hongkong.ovpn").content.decode()

        # Both of alice's devices on Hangzhou at once, bob on Hong Kong.
        pc_host, laptop_host, bob_host = lab.add_player("alicepc"), lab.add_player("alicelap"), lab.add_player("bob")
        pc_host.start_openvpn(profiles[first.name])
        pc_ip = pc_host.wait_for_tunnel(timeout=30)
        laptop_host.start_openvpn(profiles["laptop"])
        laptop_ip = laptop_host.wait_for_tunnel(timeout=30)
        bob_host.start_openvpn(bob_profile)
        bob_ip = bob_host.wait_for_tunnel(timeout=30)
        assert pc_ip != laptop_ip and pc_ip.startswith("10.0.") and laptop_ip.startswith("10.0."), (pc_ip, laptop_ip)

        # The PC was not pushed off when the laptop connected: both reach bob, and each other, from now on.
        for host, ip in ((pc_host, pc_ip), (laptop_host, laptop_ip)):
            assert wait_until(lambda h=host: lab.ping(h, bob_ip, timeout=2), timeout=15, what=f"{host.name} -> bob")
            assert lab.ping(bob_host, ip, timeout=2) is not None, f"bob cannot reach {host.name}"
        assert lab.ping(pc_host, laptop_ip, timeout=2) is not None, "alice's PC cannot reach her laptop"
        assert tunnel_address(pc_host) == pc_ip and pc_host.openvpn_pid() is not None
        # What a shared certificate caused: the server dropping the first session for the second. (Hong Kong's link
        # client may log it for itself when it reconnects after a sync: only alice's names count here.)
        dropped = re.findall(r"new connection by client '([^']+)' will cause previous active sessions",
                             server_log(hz_host))
        assert not {first.common_name, laptop.common_name} & set(dropped), dropped

        # The lobby: alice once, with both devices and their addresses.
        def lobby_rows():
            tasks.poll_all_status.delay()
            time.sleep(1)
            html = Client().get(f"/me/{bob.token}/lobby/live/").content.decode()
            return html if pc_ip in html and laptop_ip in html else None

        html = wait_until(lobby_rows, timeout=30, interval=0.5, what="the lobby to show both of alice's devices")
        assert html.count('data-player="alice"') == 1, html
        assert 'data-device="laptop"' in html and "2 players online" in html, html

        # "I lost this device" for the laptop: it is switched off, the PC stays up and reachable.
        response = browser.post(f"/me/{alice.token}/devices/{laptop.ref}/lost/")
        assert response.status_code == 302
        wait_until(lambda: laptop_host.openvpn_pid() is None or lab.ping(laptop_host, bob_ip, timeout=1) is None,
                   timeout=20, what="the laptop to be cut off")
        wait_until(lambda: settled(lan), timeout=60, what=lambda: f"the revocation syncs\n{describe_runs(lan)}")
        laptop_host.start_openvpn(profiles["laptop"])
        time.sleep(3)
        assert lab.ping(laptop_host, bob_ip, timeout=2) is None, "the lost laptop still reaches bob"
        # The PC reconnects by itself if a sync restarted its server; then it is reachable again.
        assert wait_until(lambda: (ip := tunnel_address(pc_host)) and lab.ping(pc_host, bob_ip, timeout=2)
                          and lab.ping(bob_host, ip, timeout=2), timeout=40, what="alice's PC after the loss")
