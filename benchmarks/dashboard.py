"""The host's LAN dashboard at 100 nodes and 1,000 players, before and after 14 days of sync history.

    .venv/bin/python benchmarks/dashboard.py [--nodes 100] [--players 1000] [--online 300] [--days 14]
        [--requests 100] [--seconds 60] [--database-url URL]

Set-up (benchmarks/harness.py: throwaway database, DEBUG=False, gunicorn 2 workers x 128 threads as in the Procfile):
a host, a LAN with `--nodes` nodes added through the real service (planned, certificates issued), `--players`
players who joined through invites, `--online` of them with a VPN session, 30 invites, one sync run per node. The
host's session cookie comes from a real login. Measured from this process on 127.0.0.1: sequential keep-alive GETs
of /lans/<slug>/ (p50), interleaved with GETs of a static file of the same size from the same gunicorn (whitenoise:
the floor). Then `--days` of history are written (a drift check per node every 5 minutes and a sync per node per
day, as beat schedules them; prune_runs keeps 14 days) and the page is timed again.

Figures (JSON lines): the dashboard's p50 with one run per node and with the full history, each against the static
floor; and the p50 with history against the p50 without, which shows whether the page grows with the history.
Targets: p50 under 50 ms at the full history, and that ratio under 1.2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Site, emit, p50_pair  # noqa: E402

TARGET_MS = 50.0
TARGET_GROWTH = 1.2
REGIONS = ["asia/cn/east", "asia/cn/south", "asia/hk", "asia/jp", "asia/sg", "europe/de", "europe/uk", "na/us/west",
           "na/us/east", "oceania/au"]


def build_lan(nodes: int, players: int, online: int):
    """Host, LAN, nodes, players, sessions and invites through the real services. Returns (lan, host)."""
    from django.contrib.auth import get_user_model

    from nodes import services as node_services
    from nodes.models import Node, NodeState, SyncRun, SyncStatus, VpnSession
    from players import services as player_services

    host = get_user_model().objects.create_user("bench-host")
    lan = node_services.create_lan(owner=host, name="Bench LAN", slug="bench")
    for i in range(nodes):
        # Documentation addresses (RFC 5737): nothing connects to them; the queued syncs are purged at the end.
        node_services.create_node(lan=lan, name=f"node{i:03}", region=REGIONS[i % len(REGIONS)],
                                  public_address=f"198.51.100.{i % 250 + 1}", ssh_host=f"198.51.100.{i % 250 + 1}")
    Node.objects.filter(lan=lan).update(state=NodeState.READY, healthy=True, openvpn_version="2.6.14")
    SyncRun.objects.filter(node__lan=lan).update(status=SyncStatus.COMPLETED, progress=100, current_step="done")
    node_ids = list(Node.objects.filter(lan=lan).values_list("pk", flat=True))
    invite = player_services.create_invite(lan=lan, created_by=host, note="bench", max_uses=1000)
    made = []
    for i in range(players):
        if i and i % 1000 == 0:
            invite = player_services.create_invite(lan=lan, created_by=host, note="bench", max_uses=1000)
        made.append(player_services.redeem_invite(token=invite.token, nickname=f"player{i:04}"))
    VpnSession.objects.bulk_create(
        VpnSession(node_id=node_ids[i % len(node_ids)], instance="server-udp", common_name=p.common_name, player=p,
                   vpn_address=f"10.{i // 250}.{i % 250}.6", real_address="192.0.2.1:50000")
        for i, p in enumerate(made[:online]))
    for i in range(28):
        player_services.create_invite(lan=lan, created_by=host, note=f"invite {i}")
    return lan, host


def add_history(lan, days: int) -> int:
    """`days` of drift checks (every 5 minutes) and daily syncs for every node, older than the runs there are."""
    from nodes.models import SyncRun, SyncStatus

    now = timezone_now()
    rows = 0
    steps = [{"step": "connect", "seconds": 0.2, "changed": False}]
    for node_id in lan.nodes.values_list("pk", flat=True):
        batch = []
        for k in range(days * 288):
            when = now - dt.timedelta(minutes=5 * (k + 1))
            kind = "sync" if k % 288 == 0 else "drift"
            batch.append(SyncRun(node_id=node_id, kind=kind, reason=f"{kind} check", status=SyncStatus.COMPLETED,
                                 progress=100, current_step="done", steps=steps, created_at=when,
                                 started_at=when, finished_at=when + dt.timedelta(seconds=2),
                                 log="connect: unchanged in 0.20s\n"))
        SyncRun.objects.bulk_create(batch, batch_size=2000)
        rows += len(batch)
    return rows


def timezone_now():
    from django.utils import timezone

    return timezone.now()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--players", type=int, default=1000)
    parser.add_argument("--online", type=int, default=300)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--requests", type=int, default=100, help="GETs per measurement (default 100)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per measurement (default 60)")
    parser.add_argument("--database-url", help="a database of your own instead of a throwaway SQLite file")
    options = parser.parse_args()

    with Site(database_url=options.database_url) as site:
        began = time.monotonic()
        lan, host = build_lan(options.nodes, options.players, options.online)
        from django.test import Client

        browser = Client(HTTP_HOST="127.0.0.1")
        browser.force_login(host)
        cookie = {"Cookie": f"sessionid={browser.cookies['sessionid'].value}"}
        path = f"/lans/{lan.slug}/"
        size = len(browser.get(path).content)
        floor_path = site.static_file("floor-dashboard.html", size)
        print(f"# fixture: {options.nodes} nodes, {options.players} players, {options.online} online, built in "
              f"{time.monotonic() - began:.0f} s; page {size} bytes", file=sys.stderr)
        label = f"dashboard p50, {options.nodes} nodes, {options.players:,} players"
        site.start()
        timed = dict(count=options.requests, seconds=options.seconds, headers=cookie, expect=b'id="players"')
        fresh, floor, _ = p50_pair(site.port, path, floor_path, **timed)
        emit(f"{label}, 1 run per node (GET {path})", fresh, floor, unit="ms", target=f"p50 < {TARGET_MS:.0f} ms",
             meets=fresh < TARGET_MS, bytes=size)
        site.stop()
        rows = add_history(lan, options.days)
        site.start()
        full, floor, size = p50_pair(site.port, path, floor_path, **timed)
        emit(f"{label}, {options.days} days of sync history ({rows:,} runs)", full, floor, unit="ms",
             target=f"p50 < {TARGET_MS:.0f} ms", meets=full < TARGET_MS, bytes=size)
        emit(f"dashboard growth with history: p50 at {options.days} days / p50 at 1 run per node", full, fresh,
             unit="ms", target=f"ratio < {TARGET_GROWTH}", meets=full / fresh < TARGET_GROWTH)


if __name__ == "__main__":
    main()
