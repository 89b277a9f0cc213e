"""Live presence end to end: the session watcher (a real `manage.py watch_sessions` process) holds a real node's
OpenVPN management interfaces in the lab; a real player connecting and leaving shows in the lobby's data, across a
node's server restart (by a drift repair, whose management commands the watcher steps aside for) and across the
watcher being killed (SIGKILL) and started again.

The latencies are recorded as figures (var/presence-figures.json; target 3 s); the test itself only bounds its
waits generously, so a slow machine fails nothing but the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection

from nodes import presence, services, syncing
from nodes.models import Node, NodeState, SyncStatus, VpnSession
from players import services as player_services
from tests.celery_worker import real_worker
from tests.e2e.watcher_process import WatcherProcess

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

BOUND = 20.0  # seconds any step may take before the test fails (the figures say how long it really took)


def wait_for(predicate, what: str, timeout: float = BOUND):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def online(player) -> bool:
    connection.close()  # read what the watcher committed, not a cached snapshot
    return VpnSession.objects.filter(player=player, node__name="hangzhou").exists()


def test_the_watcher_shows_players_arrive_and_leave_within_seconds(lab):
    figures: dict[str, float] = {}
    host_user = get_user_model().objects.create_user("host", password="host-password")
    lan = services.create_lan(owner=host_user, name="Presence", slug="presence", topology_mode="hub")
    hz_host = lab.add_node("hangzhou")
    hz_host.authorize(lan.ssh_public_key)
    with real_worker(concurrency=1):
        services.create_node(lan=lan, name="hangzhou", region="asia/cn/east", public_address=hz_host.address,
                             ssh_host=hz_host.address)
        wait_for(lambda: Node.objects.filter(lan=lan, state=NodeState.READY).exists(), "hangzhou to be ready", 120)
    node = Node.objects.get(lan=lan, name="hangzhou")
    invite = player_services.create_invite(lan=lan, note="presence", max_uses=2)
    alice = player_services.redeem_invite(token=invite.token, nickname="alice")
    # The client says goodbye when it stops (UDP: explicit-exit-notify); without it the server notices a player
    # gone only at its keepalive timeout, two minutes later, whatever watches it.
    profile = player_services.build_profile(alice, node=node, ranked=[node]).content + "explicit-exit-notify 1\n"
    alice_host = lab.add_player("alice")

    watcher = WatcherProcess()
    try:
        wait_for(lambda: watcher.watching("hangzhou"), "the watcher to hold hangzhou's interface")
        # Held, the node is marked so: the status poll reads it only once per LANHUB_HELD_POLL_INTERVAL.
        wait_for(lambda: node.pk in presence.held_nodes(), "the watcher to mark hangzhou as held")

        # 1. alice connects: her session appears without any poll.
        alice_host.start_openvpn(profile)
        alice_host.wait_for_tunnel(timeout=30)
        up = time.monotonic()
        wait_for(lambda: online(alice), "alice to show online")
        figures["connect_to_lobby_s"] = time.monotonic() - up

        # 2. alice leaves (her client says so: explicit-exit-notify): her session goes.
        alice_host.stop_openvpn()
        down = time.monotonic()
        wait_for(lambda: not online(alice), "alice to leave the lobby")
        figures["disconnect_to_gone_s"] = time.monotonic() - down

        # 3. alice connects again at once, within the 5 s OpenVPN still lists her old session after her goodbye (it
        # drops that session as a duplicate and logs the new connection without her name): she is online again.
        alice_host.start_openvpn(profile)
        alice_host.wait_for_tunnel(timeout=30)
        up = time.monotonic()
        wait_for(lambda: online(alice), "alice to show online again")
        figures["reconnect_to_lobby_s"] = time.monotonic() - up
        # The node's UDP server dies and a drift repair starts it again; its management commands make the watcher
        # step aside. alice is back in the lobby after the restart.
        assert lab.kill_process(hz_host, "lanhub-udp")
        wait_for(lambda: not online(alice), "alice's session to end with her server")
        run = syncing.run_sync(Node.objects.get(pk=node.pk), kind="drift")
        assert run.status == SyncStatus.COMPLETED, run.error
        restarted = time.monotonic()
        wait_for(lambda: online(alice), "alice to be back after the restart", 60)
        figures["server_restart_to_back_s"] = time.monotonic() - restarted

        # 4. The watcher is killed; alice leaves meanwhile (nobody sees it); a new watcher re-reads the list.
        watcher.kill()
        alice_host.stop_openvpn()
        time.sleep(1)
        assert online(alice)  # stale: nothing watched
        watcher = WatcherProcess()
        started = time.monotonic()
        wait_for(lambda: not online(alice), "the restarted watcher to drop alice's stale session")
        figures["watcher_restart_to_fresh_s"] = time.monotonic() - started
        alice_host.start_openvpn(profile)
        alice_host.wait_for_tunnel(timeout=30)
        up = time.monotonic()
        wait_for(lambda: online(alice), "alice to show online through the new watcher")
        figures["connect_to_lobby_after_restart_s"] = time.monotonic() - up
        alice_host.stop_openvpn()
    except BaseException:
        print("\n".join(watcher.lines[-60:]))
        raise
    finally:
        watcher.stop()
        report = {k: round(v, 3) for k, v in figures.items()}
        print("\nLanHub presence figures:", json.dumps(report))
        Path(settings.VAR_DIR, "presence-figures.json").write_text(json.dumps(report, indent=1))
