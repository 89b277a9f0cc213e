"""A server dies and the LAN heals itself, on a real LAN: no single node takes the whole LAN down.

LanHub builds three nodes in hub mode (Hangzhou the hub, Hong Kong and Tokyo linked to it), a real session watcher
holds them, and alice (Hangzhou), bob (Hong Kong) and carol (Tokyo) connect with the profiles they downloaded. Then
Hangzhou vanishes without a word: its network goes down, as with a power cut, so nothing tells anyone.

What must follow by itself, with no beat and nobody at the dashboard:
- the watcher notices the silent connection (kernel TCP keepalive) and asks for a poll of Hangzhou; the misses are
  looked at again within seconds, the third marks it down and the LAN is re-planned around it;
- Hong Kong and Tokyo are re-linked to each other, so bob and carol, whose traffic went through Hangzhou, reach
  each other again;
- alice's client gives up on Hangzhou (its keepalive) and moves on to the next server in her profile, where she
  reaches bob and carol, and the lobby shows her there and nobody on Hangzhou.
Then Hangzhou's network comes back: the watcher reaches it and asks for a poll, which marks it up, the LAN is
re-planned with it, and alice, starting her client again, is on Hangzhou and reaches both others.

How long each step took is printed and written to var/failover-figures.json; the test bounds its waits generously.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse

from lab.netns import NODES_NET
from nodes import services
from nodes.models import Node, NodeState, StoredPlan, VpnSession
from players.models import Player
from tests.celery_worker import real_worker
from tests.e2e.watcher_process import WatcherProcess
from tests.lab_helpers import describe_runs, settled, vpn_address, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODES = {"hangzhou": "asia/cn/east", "hongkong": "asia/hk", "tokyo": "asia/jp"}  # the first is the hub
PLAYERS = {"alice": "hangzhou", "bob": "hongkong", "carol": "tokyo"}
HEAL_BOUND = 240  # seconds; the figures say how long it took


def all_ready(lan) -> bool:
    connection.close()  # see what the worker and the watcher committed
    return Node.objects.filter(lan=lan, state=NodeState.READY).count() == len(NODES) and settled(lan)


def reaches(lab, players, a: str, b: str) -> bool:
    address = vpn_address(players[b])
    return bool(address) and lab.ping(players[a].ns, address, count=1, timeout=1.0) is not None


def sessions_of(player) -> set[str]:
    connection.close()
    return set(VpnSession.objects.filter(player=player).values_list("node__name", flat=True))


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_a_hub_that_dies_is_failed_over_and_its_players_move_to_a_fallback(lab):
    figures: dict[str, float] = {}
    host_user = get_user_model().objects.create_user("host", password="host-password")
    lan = services.create_lan(owner=host_user, name="Failover", slug="failover", topology_mode="hub")
    node_hosts = {}
    watcher = None
    players, profiles = {}, {}
    with real_worker(concurrency=2):
        try:
            for name, region in NODES.items():
                node_hosts[name] = lab.add_node(name)
                node_hosts[name].authorize(lan.ssh_public_key)
                services.create_node(lan=lan, name=name, region=region, public_address=node_hosts[name].address,
                                     ssh_host=node_hosts[name].address)
            wait_until(lambda: all_ready(lan), timeout=240,
                       what=lambda: f"three ready nodes:\n{describe_runs(lan)}")
            assert StoredPlan.objects.get(lan=lan).data["primaries"][""] == "hangzhou"

            host = Client()
            host.force_login(host_user)
            host.post(reverse("players:invite_create", args=[lan.slug]), {"note": "", "hours": 24, "max_uses": 5})
            token = lan.invites.get().token
            for nickname, server in PLAYERS.items():
                assert Client().post(reverse("players:join", args=[token]), {"nickname": nickname}).status_code == 302
                player = Player.objects.get(lan=lan, nickname=nickname)
                response = Client().get(reverse("players:profile_download", args=[player.token, server]))
                assert response.status_code == 200, response.content[:300]
                profiles[nickname] = response.content.decode()
                players[nickname] = lab.add_player(nickname)
                players[nickname].start_openvpn(profiles[nickname])
            for nickname in PLAYERS:
                players[nickname].wait_for_tunnel(timeout=30)

            watcher = WatcherProcess()
            wait_until(lambda: all(watcher.watching(name) for name in NODES), timeout=60,
                       what="the watcher to hold every node")
            for a, b in (("bob", "carol"), ("alice", "bob"), ("carol", "alice")):
                wait_until(lambda: reaches(lab, players, a, b), timeout=30, what=f"{a} to reach {b}")
            alice = Player.objects.get(lan=lan, nickname="alice")
            wait_until(lambda: sessions_of(alice) == {"hangzhou"}, timeout=20, what="alice online on hangzhou")

            # Hangzhou's network goes down: no FIN, no RST, nothing answers any more.
            lab.exec(node_hosts["hangzhou"].ns, ["ip", "link", "set", "eth0", "down"])
            died = time.monotonic()
            hangzhou = Node.objects.get(lan=lan, name="hangzhou")

            def marked_down():
                connection.close()
                return not Node.objects.get(pk=hangzhou.pk).healthy

            wait_until(marked_down, timeout=HEAL_BOUND, interval=0.5,
                       what=lambda: f"hangzhou to be marked down; watcher:\n" + "\n".join(watcher.lines[-30:]))
            figures["died_to_marked_down_s"] = time.monotonic() - died
            wait_until(lambda: reaches(lab, players, "bob", "carol") and reaches(lab, players, "carol", "bob"),
                       timeout=HEAL_BOUND, interval=0.5,
                       what=lambda: f"bob and carol to reach each other again:\n{describe_runs(lan)}")
            figures["died_to_healed_s"] = time.monotonic() - died
            plan = StoredPlan.objects.get(lan=lan)
            assert "hangzhou" not in plan.data["healthy"]
            assert plan.data["primaries"][""] in ("hongkong", "tokyo")

            # alice's client gives up on Hangzhou and takes the next server in her profile.
            wait_until(lambda: reaches(lab, players, "alice", "bob") and reaches(lab, players, "alice", "carol"),
                       timeout=HEAL_BOUND, interval=0.5,
                       what=lambda: f"alice to be back through a fallback:\n{players['alice'].log()[-3000:]}")
            figures["died_to_player_moved_s"] = time.monotonic() - died
            wait_until(lambda: sessions_of(alice) and "hangzhou" not in sessions_of(alice), timeout=30,
                       what=lambda: f"the lobby to show alice on her new server, not {sessions_of(alice)}")
            connection.close()
            assert not VpnSession.objects.filter(node=hangzhou).exists()

            # Hangzhou comes back. The watcher, still trying, reaches it and asks for a poll; the poll that answers
            # marks it up and the LAN is re-planned with it. alice starts her client again: its first server is
            # Hangzhou once more, and from there she reaches both others.
            lab.exec(node_hosts["hangzhou"].ns, ["ip", "link", "set", "eth0", "up"])
            lab.exec(node_hosts["hangzhou"].ns, ["ip", "route", "replace", "default", "via", f"{NODES_NET}.1"])
            back = time.monotonic()

            def healthy_again():
                connection.close()
                return Node.objects.get(pk=hangzhou.pk).healthy and "hangzhou" in StoredPlan.objects.get(
                    lan=lan).data["healthy"] and settled(lan)

            wait_until(healthy_again, timeout=HEAL_BOUND, interval=0.5,
                       what=lambda: f"hangzhou to be back in the LAN:\n{describe_runs(lan)}\n"
                                    + "\n".join(watcher.lines[-30:]))
            figures["back_to_in_the_lan_s"] = time.monotonic() - back
            players["alice"].stop_openvpn()
            players["alice"].start_openvpn(profiles["alice"])
            players["alice"].wait_for_tunnel(timeout=30)
            wait_until(lambda: reaches(lab, players, "alice", "bob") and reaches(lab, players, "alice", "carol"),
                       timeout=60, interval=0.5, what=lambda: f"alice on hangzhou to reach bob and carol again:\n"
                                                              f"{players['alice'].log()[-3000:]}")
            wait_until(lambda: sessions_of(alice) == {"hangzhou"}, timeout=30,
                       what=lambda: f"the lobby to show alice on hangzhou, not {sessions_of(alice)}")
            figures["back_to_player_on_it_s"] = time.monotonic() - back
        except BaseException:
            if watcher is not None:
                print("\n".join(watcher.lines[-60:]))
            raise
        finally:
            if watcher is not None:
                watcher.stop()
            for player in players.values():
                player.stop_openvpn()
            report = {k: round(v, 1) for k, v in figures.items()}
            print("\nLanHub failover figures:", json.dumps(report))
            Path(settings.VAR_DIR, "failover-figures.json").write_text(json.dumps(report, indent=1))
