"""What keeping 1,000 nodes' state current costs the portal in CPU: `.venv/bin/python benchmarks/poll_cost.py`.

Needs root, openvpn and sshd (it builds a small lab in network namespaces, like the e2e tests) and Redis.
Everything is throwaway: a SQLite file in a temporary directory, a queue and cache prefix of this run's own, the
lab (downed at the end, also on failure).

Measured on ``--lab-nodes`` real nodes, provisioned by LanHub, one real player connected to the first, in this
process: polls by time.process_time; the watcher by the CPU clocks of its threads (every thread but the main one,
which drives the benchmark: the shard, its yield listener, one thread per node and their paramiko transports):
- ``cpu_per_poll_ms``: one status poll (`syncing.poll_status`: SSH connect with the pinned key, each server's
  client list over its management interface, each link pinged, sessions written), mean of ``--polls`` polls;
- ``floor_ssh_connect_ms``: the floor of any poll, measured in the same run: one SSH connect and close alone;
- ``watcher_shard_ms_per_min``: a watcher shard's own idle cost (its yield listener, its look at which nodes to
  hold), measured on a shard holding none of the nodes; paid once per watcher process;
- ``watcher_idle_ms_per_node_min``: the shard holding every lab node's interfaces for ``--idle`` seconds with
  nothing happening, net of the shard's own cost, per node and minute;
- ``cpu_per_event_ms``: one client event applied (the player leaving or coming back, net of the idle cost).
Then, for ``--nodes`` nodes in the steady state (the watcher holds them all, so each is polled once per
LANHUB_HELD_POLL_INTERVAL; nodes.presence.due_for_poll): polls, ``LANHUB_WATCHER_PROCESSES`` shards, the idle
cost of every node, and ``--events-per-node-hour`` client connects/disconnects per node and hour. Target (issue
#11): under 6 CPU-seconds per minute for 1,000 nodes. The per-node figures come from the lab nodes; 1,000 nodes
multiply them, they are not run (1,000 sshd sessions and 2,000 OpenVPN servers do not fit this machine).
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


def hold(shard_index: int, shard_count: int, expect: int):
    """Start a watcher shard in this process and wait until it holds ``expect`` nodes completely."""
    from nodes.watcher import Shard

    shard = Shard(shard_index, shard_count)
    thread = threading.Thread(target=shard.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while sum(w.complete for w in list(shard.watchers.values())) < expect:
        if time.monotonic() > deadline:
            raise SystemExit("the watcher did not take hold of the lab nodes' interfaces")
        time.sleep(0.1)
    time.sleep(1)
    return shard, thread


def watcher_cpu() -> float:
    """CPU seconds of every thread but the main one: the watcher's threads (shard, yield listener, one per node)
    and their SSH transports. The main thread only drives the benchmark (players, waits), so it is left out."""
    total = 0.0
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except OSError:  # ended meanwhile
                pass
    return total


def idle_cpu_per_min(seconds: float) -> float:
    began = watcher_cpu()
    time.sleep(seconds)
    return (watcher_cpu() - began) / seconds * 60


def measure(args) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from lab.netns import Lab
    from nodes import services, syncing
    from nodes.models import Node, VpnSession
    from nodes.ssh import open_connection
    from players import services as player_services

    with Lab() as lab:
        owner = get_user_model().objects.create_user("bench")
        lan = services.create_lan(owner=owner, name="Poll cost", slug="pollcost", topology_mode="hub")
        nodes = []
        for index in range(args.lab_nodes):
            name = f"node{index}"
            host = lab.add_node(name)
            host.authorize(lan.ssh_public_key)
            node = services.create_node(lan=lan, name=name, region="asia/cn/east", public_address=host.address,
                                        ssh_host=host.address)
            run = syncing.run_sync(Node.objects.get(pk=node.pk), run_id=node.sync_runs.first().pk)
            if run.status != "completed":
                raise SystemExit(f"provisioning lab node {name} failed: {run.error}")
            nodes.append(Node.objects.get(pk=node.pk))
        node = nodes[0]
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

        # A shard's own cost (its yield listener, its look at which nodes to hold): a shard holding none of them.
        ids = {n.pk for n in nodes}
        empty = next(i for i in range(len(ids) + 1) if all(pk % (len(ids) + 1) != i for pk in ids))
        shard, thread = hold(empty, len(ids) + 1, 0)
        per_shard = idle_cpu_per_min(args.idle)
        shard.stopping.set()
        thread.join(timeout=20)
        # Every lab node held by one shard, nothing happening: net of the shard's own cost, per node.
        shard, thread = hold(0, 1, len(nodes))
        per_node = max(0.0, (idle_cpu_per_min(args.idle) - per_shard) / len(nodes))
        # Events: the player leaves and comes back, a few times; each cycle is two notifications.
        cycles, began_wall, began = 3, time.monotonic(), watcher_cpu()
        for _ in range(cycles):
            player_host.stop_openvpn()
            while VpnSession.objects.filter(node=node, player=player).exists():
                time.sleep(0.05)
            player_host.start_openvpn(profile)
            player_host.wait_for_tunnel(timeout=30)
            while not VpnSession.objects.filter(node=node, player=player).exists():
                time.sleep(0.05)
        time.sleep(8)  # the look at the client list after OpenVPN's delayed exit belongs to the last event
        idle_during = (per_shard + per_node * len(nodes)) / 60 * (time.monotonic() - began_wall)
        per_event = max(0.0, (watcher_cpu() - began - idle_during) / (2 * cycles))
        shard.stopping.set()
        thread.join(timeout=20)
        player_host.stop_openvpn()

    # Steady state: the watcher holds every node, so each is polled once per LANHUB_HELD_POLL_INTERVAL.
    polls_per_min = args.nodes * 60 / settings.LANHUB_HELD_POLL_INTERVAL
    events_per_min = args.nodes * args.events_per_node_hour / 60
    polls = polls_per_min * per_poll
    processes = settings.LANHUB_WATCHER_PROCESSES
    watcher = processes * per_shard + args.nodes * per_node + events_per_min * per_event
    return {
        "nodes": args.nodes, "lab_nodes": len(nodes), "status_interval_s": settings.LANHUB_STATUS_INTERVAL,
        "held_poll_interval_s": settings.LANHUB_HELD_POLL_INTERVAL, "watcher_processes": processes,
        "cpu_per_poll_ms": round(per_poll * 1000, 2), "floor_ssh_connect_ms": round(floor * 1000, 2),
        "watcher_shard_ms_per_min": round(per_shard * 1000, 2),
        "watcher_idle_ms_per_node_min": round(per_node * 1000, 3),
        "cpu_per_event_ms": round(per_event * 1000, 2), "events_per_min": round(events_per_min, 1),
        "polls_cpu_s_per_min": round(polls, 2), "watcher_cpu_s_per_min": round(watcher, 2),
        "total_cpu_s_per_min": round(polls + watcher, 2), "target_cpu_s_per_min": TARGET_CPU_S_PER_MIN,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds the watcher idles while measured")
    parser.add_argument("--lab-nodes", type=int, default=3, help="real nodes built in the lab and held")
    parser.add_argument("--events-per-node-hour", type=float, default=10.0)
    args = parser.parse_args()
    args.polls, args.idle = max(1, min(args.polls, 200)), max(5.0, min(args.idle, 120.0))  # bounded
    args.lab_nodes = max(1, min(args.lab_nodes, 8))
    tmp = Path(tempfile.mkdtemp(prefix="lanhub-poll-cost-"))
    try:
        setup_environment(tmp)
        print(json.dumps(measure(args)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
