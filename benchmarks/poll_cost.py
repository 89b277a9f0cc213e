"""What keeping 1,000 nodes' state current costs the portal in CPU: `.venv/bin/python benchmarks/poll_cost.py`.

Needs root, openvpn and sshd (it builds a one-node lab in network namespaces, like the e2e tests) and Redis.
Everything is throwaway: a SQLite file in a temporary directory, a queue and cache prefix of this run's own, the
lab (downed at the end, also on failure).

Measured on one real node, provisioned by LanHub and with one real player connected, in this process
(time.process_time: CPU of every thread, the paramiko transport threads included):
- ``cpu_per_poll_ms``: one status poll (`syncing.poll_status`: SSH connect with the pinned key, each server's
  client list over its management interface, each link pinged, sessions written), mean of ``--polls`` polls;
- ``floor_ssh_connect_ms``: the floor of any poll, measured in the same run: one SSH connect and close alone;
- ``watcher_idle_ms_per_node_min``: the session watcher holding the node's interfaces for ``--idle`` seconds
  with nothing happening, per minute;
- ``cpu_per_event_ms``: one >CLIENT notification applied (the player reconnecting, net of the idle cost).
Then, for ``--nodes`` nodes: polls at LANHUB_STATUS_INTERVAL, the watcher idle on every node, and
``--events-per-node-hour`` client connects/disconnects per node and hour. Target (issue #11): under 6 CPU-seconds
per minute for 1,000 nodes. The per-node figures come from one node; 1,000 nodes multiply them, they are not run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_CPU_S_PER_MIN = 6.0


def setup_environment(tmp: Path) -> None:
    run = f"lanhub-bench-poll-{os.getpid()}"
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "lanhub.settings",
        "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
        "SECRET_KEY": secrets.token_urlsafe(48), "LANHUB_KEY": secrets.token_urlsafe(48),
        "CACHE_PREFIX": run, "CELERY_QUEUE": run, "LOG_LEVEL": "WARNING",
    })
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def cpu_of(action, repeat: int = 1) -> float:
    began = time.process_time()
    for _ in range(repeat):
        action()
    return (time.process_time() - began) / repeat


def measure(args) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from lab.netns import Lab
    from nodes import services, syncing
    from nodes.models import Node, VpnSession
    from nodes.ssh import open_connection
    from nodes.watcher import Shard
    from players import services as player_services

    with Lab() as lab:
        owner = get_user_model().objects.create_user("bench")
        lan = services.create_lan(owner=owner, name="Poll cost", slug="pollcost", topology_mode="hub")
        host = lab.add_node("hangzhou")
        host.authorize(lan.ssh_public_key)
        node = services.create_node(lan=lan, name="hangzhou", region="asia/cn/east", public_address=host.address,
                                    ssh_host=host.address)
        run = syncing.run_sync(Node.objects.get(pk=node.pk), run_id=node.sync_runs.get().pk)
        if run.status != "completed":
            raise SystemExit(f"provisioning the lab node failed: {run.error}")
        node = Node.objects.get(pk=node.pk)
        invite = player_services.create_invite(lan=lan, max_uses=1)
        player = player_services.redeem_invite(token=invite.token, nickname="bench")
        profile = player_services.build_profile(player, node=node, ranked=[node]).content
        profile += "explicit-exit-notify 1\n"  # say goodbye on stop, so disconnects are events too
        player_host = lab.add_player("bench")
        player_host.start_openvpn(profile)
        player_host.wait_for_tunnel(timeout=30)

        def connect_only():
            with open_connection(node) as c:
                c.open()

        floor = cpu_of(connect_only, 5)
        per_poll = cpu_of(lambda: syncing.poll_status(node), args.polls)

        shard = Shard(0, 1)
        thread = threading.Thread(target=shard.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not (shard.watchers and all(w.connected.is_set() for w in shard.watchers.values())):
            if time.monotonic() > deadline:
                raise SystemExit("the watcher did not take hold of the lab node's interfaces")
            time.sleep(0.1)
        time.sleep(1)
        began = time.process_time()
        time.sleep(args.idle)
        idle_per_min = (time.process_time() - began) / args.idle * 60
        # Events: the player leaves and comes back, a few times; each cycle is two notifications.
        cycles, began_wall, began = 3, time.monotonic(), time.process_time()
        for _ in range(cycles):
            player_host.stop_openvpn()
            while VpnSession.objects.filter(node=node, player=player).exists():
                time.sleep(0.05)
            player_host.start_openvpn(profile)
            player_host.wait_for_tunnel(timeout=30)
            while not VpnSession.objects.filter(node=node, player=player).exists():
                time.sleep(0.05)
        spent = time.process_time() - began - idle_per_min / 60 * (time.monotonic() - began_wall)
        per_event = max(0.0, spent / (2 * cycles))
        shard.stopping.set()
        thread.join(timeout=20)
        player_host.stop_openvpn()

    polls_per_min = args.nodes * 60 / settings.LANHUB_STATUS_INTERVAL
    events_per_min = args.nodes * args.events_per_node_hour / 60
    polls = polls_per_min * per_poll
    watcher = args.nodes * idle_per_min / 1 + events_per_min * per_event
    return {
        "nodes": args.nodes, "status_interval_s": settings.LANHUB_STATUS_INTERVAL,
        "cpu_per_poll_ms": round(per_poll * 1000, 2), "floor_ssh_connect_ms": round(floor * 1000, 2),
        "watcher_idle_ms_per_node_min": round(idle_per_min * 1000, 3),
        "cpu_per_event_ms": round(per_event * 1000, 2), "events_per_min": round(events_per_min, 1),
        "polls_cpu_s_per_min": round(polls, 2), "watcher_cpu_s_per_min": round(watcher, 2),
        "total_cpu_s_per_min": round(polls + watcher, 2), "target_cpu_s_per_min": TARGET_CPU_S_PER_MIN,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the watcher idles while measured")
    parser.add_argument("--events-per-node-hour", type=float, default=10.0)
    args = parser.parse_args()
    args.polls, args.idle = max(1, min(args.polls, 200)), max(5.0, min(args.idle, 120.0))  # bounded
    tmp = Path(tempfile.mkdtemp(prefix="lanhub-poll-cost-"))
    try:
        setup_environment(tmp)
        print(json.dumps(measure(args)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
