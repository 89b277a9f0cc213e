"""A player downloading their profile through the real view, at 2 and at 100 nodes, against a static file.

    .venv/bin/python benchmarks/profile_download.py [--sizes 2,100] [--requests 300] [--seconds 60]

Set-up (benchmarks/harness.py: throwaway database, DEBUG=False, gunicorn 2 workers x 128 threads as in the Procfile):
for each size, a LAN whose nodes are added through the real service (planned, certificates issued) and marked
ready, and one player who joined through an invite. Measured from this process on 127.0.0.1: sequential
keep-alive GETs of /me/<token>/profile/<first node>.ovpn (every response must be a 200 holding ``<cert>``),
interleaved in three rounds with GETs of a static file of the same size served by the same gunicorn (whitenoise):
the floor, i.e. what sending those bytes costs with no Python view at all.

Figures (JSON lines): the download's p50 against the static file's p50 at each size. Target: ratio at most 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Site, emit, p50_pair  # noqa: E402

TARGET_RATIO = 2.0
REGIONS = ["asia/cn/east", "asia/hk", "asia/jp", "europe/de", "na/us/west"]


def build_lan(host, nodes: int) -> str:
    """A LAN with `nodes` ready nodes and one player; returns the download path."""
    from nodes import services as node_services
    from nodes.models import Node, NodeState
    from players import services as player_services

    lan = node_services.create_lan(owner=host, name=f"Bench {nodes}", slug=f"bench{nodes}")
    for i in range(nodes):
        # Documentation addresses (RFC 5737): nothing connects to them; the queued syncs are purged at the end.
        address = f"198.51.{100 + i // 250}.{i % 250 + 1}"
        node_services.create_node(lan=lan, name=f"node{i:03}", region=REGIONS[i % len(REGIONS)],
                                  public_address=address, ssh_host=address)
    Node.objects.filter(lan=lan).update(state=NodeState.READY, healthy=True)
    invite = player_services.create_invite(lan=lan, created_by=host, note="bench")
    player = player_services.redeem_invite(token=invite.token, nickname="bench")
    return f"/me/{player.token}/profile/node000.ovpn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,100", help="LAN sizes in nodes, comma-separated (default 2,100)")
    parser.add_argument("--requests", type=int, default=300, help="GETs of each path per size (default 300)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per size and path (default 60)")
    parser.add_argument("--database-url", help="a database of your own instead of a throwaway SQLite file")
    options = parser.parse_args()
    sizes = [max(1, min(int(s), 500)) for s in options.sizes.split(",")]

    with Site(database_url=options.database_url) as site:
        from django.contrib.auth import get_user_model
        from django.test import Client

        began = time.monotonic()
        host = get_user_model().objects.create_user("bench-host")
        paths, floors = {}, {}
        for size in sizes:
            paths[size] = build_lan(host, size)
            body = Client(HTTP_HOST="127.0.0.1").get(paths[size]).content
            floors[size] = site.static_file(f"floor-profile-{size}.ovpn", len(body))
        print(f"# fixture built in {time.monotonic() - began:.0f} s", file=sys.stderr)
        site.start()
        for size in sizes:
            ours, floor, length = p50_pair(site.port, paths[size], floors[size], count=options.requests,
                                           seconds=options.seconds, expect=b"<cert>")
            emit(f"profile download p50, {size} nodes (GET /me/<token>/profile/<node>.ovpn, players.views."
                 f"profile_download) vs a static file of the same size", ours, floor, unit="ms",
                 target=f"ratio <= {TARGET_RATIO:g}", meets=ours / floor <= TARGET_RATIO, bytes=length)


if __name__ == "__main__":
    main()
