"""The lobby with 300 players online and 100 lobbies open: what it costs the server, and how fast a change shows.

    .venv/bin/python benchmarks/lobby.py [--online 300] [--lobbies 100] [--seconds 30] [--change-every 5]

Set-up (benchmarks/harness.py: throwaway database, DEBUG=False, gunicorn 2 workers x 4 threads as in the Procfile):
a LAN with 10 nodes added through the real service and marked ready, `--online` players who joined through an
invite, each with a VPN session. `--lobbies` simulated lobbies, each a player's own /me/<token>/lobby/live/ on its
own keep-alive connection, poll the way static/js/lobby.js does: every LOBBY_POLL_SECONDS, with If-None-Match
set to the ETag of the rows they hold. While they poll, a player comes online every `--change-every` seconds (a
VpnSession row written, as the session watcher writes it); every lobby notes when it first holds that player.

Floor, in the same run: the same lobbies poll a static file of the fragment's size from the same gunicorn, with
its ETag (whitenoise answers 304), for the same time: what the polling itself costs with no Python view.

Figures (JSON lines): gunicorn's CPU (master and workers, user + system from /proc) as a percentage of one core,
LanHub against the floor, target under 10 %; and the delay from a write to a lobby holding it (the worst over every
lobby and change, and the median), against the poll interval, target under 3 s.
"""

from __future__ import annotations

import argparse
import http.client
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, Site, emit, in_threads  # noqa: E402

TARGET_CPU_PERCENT = 10.0
TARGET_DELAY_S = 3.0
CLIENT_THREADS = 10
ARRIVAL = re.compile(rb'data-player="arrive(\d+)"')


def build_lan(online: int, lobbies: int):
    """Returns (the LAN's nodes, lobby paths, the invite for arrivals)."""
    from django.contrib.auth import get_user_model

    from nodes import services as node_services
    from nodes.models import Node, NodeState, VpnSession
    from players import services as player_services

    host = get_user_model().objects.create_user("bench-host")
    lan = node_services.create_lan(owner=host, name="Bench LAN", slug="bench")
    for i in range(10):
        address = f"198.51.100.{i + 1}"  # RFC 5737: nothing connects to it; queued syncs are purged at the end
        node_services.create_node(lan=lan, name=f"node{i}", region=f"region{i % 3}", public_address=address,
                                  ssh_host=address)
    Node.objects.filter(lan=lan).update(state=NodeState.READY, healthy=True)
    nodes = list(Node.objects.filter(lan=lan))
    invite = player_services.create_invite(lan=lan, created_by=host, max_uses=1000)
    players = [player_services.redeem_invite(token=invite.token, nickname=f"player{i:03}") for i in range(online)]
    VpnSession.objects.bulk_create(
        VpnSession(node=nodes[i % len(nodes)], instance="server-udp", common_name=p.common_name, player=p,
                   vpn_address=f"10.{i // 250}.{i % 250}.6") for i, p in enumerate(players))
    paths = [f"/me/{p.token}/lobby/live/" for p in players[:lobbies]]
    return nodes, paths, invite


class Lobby:
    """One open lobby: its own connection, the ETag it holds, and when it first held each arrival."""

    def __init__(self, path: str):
        self.path, self.etag, self.conn = path, None, None
        self.seen: dict[int, float] = {}
        self.requests = self.failures = self.not_modified = 0

    def poll(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else {}
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection: reconnect once
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                self.conn.request("GET", self.path, headers=headers)
                response = self.conn.getresponse()
                body = response.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    self.failures += 1
                    return
        self.requests += 1
        now = time.monotonic()
        if response.status == 304:
            self.not_modified += 1
        elif response.status == 200:
            self.etag = response.getheader("ETag")
            for match in ARRIVAL.finditer(body):
                self.seen.setdefault(int(match.group(1)), now)
        else:
            self.failures += 1


def run_lobbies(lobbies: list[Lobby], port: int, seconds: float, every: float) -> None:
    """Each lobby polls every `every` seconds (spread evenly over the interval) until `seconds` have passed."""
    start = time.monotonic()
    for lobby in lobbies:
        lobby.port = port

    def client(share: list[tuple[int, Lobby]]) -> None:
        due = {i: start + every * i / len(lobbies) for i, _ in share}
        while True:
            i, lobby = min(share, key=lambda item: due[item[0]])
            if due[i] >= start + seconds:
                return
            time.sleep(max(0.0, due[i] - time.monotonic()))
            lobby.poll()
            due[i] += every

    indexed = list(enumerate(lobbies))
    in_threads(client, [(indexed[k::CLIENT_THREADS],) for k in range(CLIENT_THREADS)])
    for lobby in lobbies:
        if lobby.conn is not None:
            lobby.conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online", type=int, default=300)
    parser.add_argument("--lobbies", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase (default 30)")
    parser.add_argument("--change-every", type=float, default=5, help="seconds between arrivals (default 5)")
    parser.add_argument("--database-url", help="a database of your own instead of a throwaway SQLite file")
    options = parser.parse_args()
    seconds = max(5.0, min(options.seconds, 120.0))
    lobbies_n = max(1, min(options.lobbies, min(options.online, 500)))

    with Site(database_url=options.database_url) as site:
        from django.test import Client

        from nodes.models import VpnSession
        from players import lobby as live
        from players import services as player_services

        every = live.LOBBY_POLL_SECONDS
        nodes, paths, invite = build_lan(max(options.online, lobbies_n), lobbies_n)
        size = len(Client(HTTP_HOST=HOST).get(paths[0]).content)
        floor_path = site.static_file("floor-lobby.html", size)
        arrivals = [player_services.redeem_invite(token=invite.token, nickname=f"arrive{i}")
                    for i in range(int(seconds / options.change_every) + 1)]
        site.start()

        floor_lobbies = [Lobby(floor_path) for _ in paths]
        before = site.cpu_seconds()
        began = time.monotonic()
        run_lobbies(floor_lobbies, site.port, seconds, every)
        floor_cpu = 100 * (site.cpu_seconds() - before) / (time.monotonic() - began)

        lobbies = [Lobby(path) for path in paths]
        written: dict[int, float] = {}

        def writer() -> None:
            for i, player in enumerate(arrivals):
                time.sleep(options.change_every)
                if time.monotonic() - began > seconds - options.change_every:
                    return
                VpnSession.objects.create(node=nodes[i % len(nodes)], instance="server-udp", player=player,
                                          common_name=player.common_name, vpn_address=f"10.9.{i}.6")
                written[i] = time.monotonic()

        before = site.cpu_seconds()
        began = time.monotonic()
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        run_lobbies(lobbies, site.port, seconds, every)
        ours_cpu = 100 * (site.cpu_seconds() - before) / (time.monotonic() - began)
        thread.join(timeout=options.change_every + 5)

        delays = [lobby.seen[i] - at for i, at in written.items() for lobby in lobbies if i in lobby.seen]
        missed = sum(1 for i in written for lobby in lobbies if i not in lobby.seen)
        requests = sum(lobby.requests for lobby in lobbies)
        rate = requests / seconds
        emit(f"lobby: {options.online} players online, {lobbies_n} lobbies polling every {every:g} s "
             f"({rate:.0f} req/s, {sum(x.not_modified for x in lobbies) / max(1, requests):.0%} 304s): gunicorn CPU, "
             f"% of one core, vs the same polling of a static file", ours_cpu, floor_cpu, unit="% of one core",
             target=f"lanhub < {TARGET_CPU_PERCENT:g}", meets=ours_cpu < TARGET_CPU_PERCENT,
             failures=sum(x.failures for x in lobbies), floor_failures=sum(x.failures for x in floor_lobbies))
        worst = max(delays) if delays else float("nan")
        emit(f"lobby: a player's arrival (VpnSession row written) until a polling lobby shows it, worst of "
             f"{len(delays)} (lobby, arrival) pairs ({missed} missed), vs the poll interval", worst, every, unit="s",
             target=f"lanhub < {TARGET_DELAY_S:g}", meets=bool(delays) and worst < TARGET_DELAY_S and not missed,
             median=round(statistics.median(delays), 3) if delays else None)


if __name__ == "__main__":
    main()
