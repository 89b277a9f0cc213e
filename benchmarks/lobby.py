"""The lobby with 300 players online and 100 lobbies open: what it costs the server, and how fast a change shows.

    .venv/bin/python benchmarks/lobby.py [--online 300] [--lobbies 100] [--seconds 30] [--change-every 5]

Set-up (benchmarks/harness.py: throwaway database, DEBUG=False, gunicorn 2 workers x 128 threads as in the Procfile):
a LAN with 10 nodes added through the real service and marked ready, `--online` players who joined through an
invite, each with a VPN session. `--lobbies` simulated lobbies, each a player's own lobby page (drawn with the
rows' ETag), kept current the way static/js/lobby.js does it: a server-sent-events stream
(/me/<token>/lobby/stream/?etag=<the page's>) held open for the whole phase, or, for a lobby the server has no
stream to spare for (503), polling /me/<token>/lobby/live/ every LOBBY_POLL_SECONDS with If-None-Match. While they are open, a player comes online every `--change-every` seconds (a
VpnSession row written, as the session watcher writes it); every lobby notes when it first holds that player.

Three phases of `--seconds` each, in one run:
- floor: the same lobbies poll a static file of the fragment's size from the same gunicorn, with its ETag
  (whitenoise answers 304): what keeping them current by polling costs with no Python view at all;
- LanHub as pages use it: streams (and polling for any lobby that got a 503);
- LanHub's fallback: every lobby polls the fragment, as pages do where no stream can be had.

Figures (JSON lines): gunicorn's CPU (master and workers, user + system from /proc) as a percentage of one core,
LanHub against the floor, target under 10 %; and the delay from a write to a lobby holding it (the worst over every
lobby and change, and the median), target under 3 s.
"""

from __future__ import annotations

import argparse
import http.client
import re
import selectors
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, Site, emit, in_threads  # noqa: E402

TARGET_CPU_PERCENT = 10.0
TARGET_DELAY_S = 3.0
CLIENT_THREADS = 10
LOBBY_POLL_SECONDS_FLOOR = 1.5  # players/lobby.py LOBBY_POLL_SECONDS: what a polling lobby waits at worst
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
    tokens = [p.token for p in players[:lobbies]]
    return nodes, tokens, invite


class Lobby:
    """One open lobby: its own connection, the ETag it holds, and when it first held each arrival."""

    def __init__(self, path: str, *, etag: str | None = None):
        self.path, self.etag, self.conn = path, etag, None
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


class StreamingLobby:
    """One open lobby on a server-sent-events stream: a raw socket read as bytes arrive (the events' framing does
    not matter: the arrivals are found in the HTML they carry)."""

    def __init__(self, path: str):
        self.path = path
        self.etag = unquote(path.partition("?etag=")[2]) or None
        self.sock: socket.socket | None = None
        self.status: int | None = None
        self.buffer = b""
        self.seen: dict[int, float] = {}
        self.events = self.reconnects = 0

    def open(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
                          f"Cache-Control: no-cache\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.status, self.buffer = None, b""

    def read(self) -> bool:
        """Take what arrived; False when the server closed the stream."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        now = time.monotonic()
        self.buffer = self.buffer[-64:] + data  # an arrival's name may straddle two reads
        if self.status is None and self.buffer.startswith(b"HTTP/1.1 "):
            self.status = int(self.buffer[9:12])
        self.events += data.count(b"\nid: ") + data.startswith(b"id: ")
        for match in ARRIVAL.finditer(self.buffer):
            self.seen.setdefault(int(match.group(1)), now)
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_streams(lobbies: list[StreamingLobby], port: int, seconds: float, every: float) -> list[Lobby]:
    """Open every lobby's stream and read them all until `seconds` have passed; a stream the server ends is opened
    again, as a browser's EventSource does. A lobby the server refuses a stream (503) polls instead, as the page
    does, in a thread of its own from then on. Returns those polling lobbies."""
    selector = selectors.DefaultSelector()
    began = time.monotonic()
    deadline = began + seconds
    for lobby in lobbies:
        lobby.open(port)
        selector.register(lobby.sock, selectors.EVENT_READ, lobby)
    polling: list[Lobby] = []
    pollers: list[threading.Thread] = []
    refused: list[StreamingLobby] = []
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=min(left, 0.2)):
            lobby = key.data
            if lobby.read():
                continue
            selector.unregister(lobby.sock)
            lobby.close()
            if lobby.status == 503:
                refused.append(lobby)
            elif time.monotonic() < deadline - 1:
                lobby.reconnects += 1
                lobby.open(port)
                selector.register(lobby.sock, selectors.EVENT_READ, lobby)
        if refused:
            batch = [Lobby(lobby.path.split("?")[0].replace("/lobby/stream/", "/lobby/live/"), etag=lobby.etag)
                     for lobby in refused]
            for fallback, lobby in zip(batch, refused):
                fallback.seen = lobby.seen  # one lobby: what it saw on either path
            refused = []
            polling.extend(batch)
            thread = threading.Thread(target=run_lobbies, args=(batch, port, deadline - time.monotonic(), every))
            thread.start()
            pollers.append(thread)
    for lobby in lobbies:
        lobby.close()
    selector.close()
    for thread in pollers:
        thread.join(timeout=every + 15)
    return polling


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
        nodes, tokens, invite = build_lan(max(options.online, lobbies_n), lobbies_n)
        first = Client(HTTP_HOST=HOST).get(f"/me/{tokens[0]}/lobby/live/")
        size, page_etag = len(first.content), first["ETag"]  # every lobby page is drawn with this version
        floor_path = site.static_file("floor-lobby.html", size)
        phases = 2
        per_phase = int(seconds / options.change_every) + 1
        arrivals = [player_services.redeem_invite(token=invite.token, nickname=f"arrive{i}")
                    for i in range(phases * per_phase)]
        site.start()

        floor_lobbies = [Lobby(floor_path) for _ in tokens]
        before = site.cpu_seconds()
        began = time.monotonic()
        run_lobbies(floor_lobbies, site.port, seconds, every)
        floor_cpu = 100 * (site.cpu_seconds() - before) / (time.monotonic() - began)

        def phase(number: int, keep_current) -> tuple[float, dict[int, float]]:
            """Arrivals every --change-every seconds while `keep_current()` runs the lobbies; gunicorn's CPU."""
            written: dict[int, float] = {}
            mine = arrivals[number * per_phase:(number + 1) * per_phase]
            began = time.monotonic()

            def writer() -> None:
                for i, player in enumerate(mine, start=number * per_phase):
                    time.sleep(options.change_every)
                    if time.monotonic() - began > seconds - options.change_every:
                        return
                    VpnSession.objects.create(node=nodes[i % len(nodes)], instance="server-udp", player=player,
                                              common_name=player.common_name, vpn_address=f"10.9.{i}.6")
                    written[i] = time.monotonic()

            before = site.cpu_seconds()
            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            keep_current()
            cpu = 100 * (site.cpu_seconds() - before) / (time.monotonic() - began)
            thread.join(timeout=options.change_every + 5)
            return cpu, written

        # LanHub as the pages use it: streams, and polling for lobbies refused a stream.
        streams = [StreamingLobby(f"/me/{token}/lobby/stream/?etag={quote(page_etag)}") for token in tokens]
        fallback: list[Lobby] = []
        stream_cpu, written = phase(0, lambda: fallback.extend(run_streams(streams, site.port, seconds, every)))
        report(f"{len(streams) - len(fallback)} on server-sent-events streams, {len(fallback)} refused one (503) "
               f"and polling", streams, written, stream_cpu, floor_cpu, options, lobbies_n,
               failures=sum(x.failures for x in fallback))

        # The fallback alone: every lobby polls.
        pollers = [Lobby(f"/me/{token}/lobby/live/", etag=page_etag) for token in tokens]
        poll_cpu, written = phase(1, lambda: run_lobbies(pollers, site.port, seconds, every))
        requests = sum(lobby.requests for lobby in pollers)
        report(f"all polling every {every:g} s ({requests / seconds:.0f} req/s, "
               f"{sum(x.not_modified for x in pollers) / max(1, requests):.0%} 304s; the fallback)", pollers, written,
               poll_cpu, floor_cpu, options, lobbies_n, failures=sum(x.failures for x in pollers))


def report(how: str, lobbies, written: dict[int, float], cpu: float, floor_cpu: float, options, lobbies_n: int,
           *, failures: int) -> None:
    delays = [lobby.seen[i] - at for i, at in written.items() for lobby in lobbies if i in lobby.seen]
    missed = sum(1 for i in written for lobby in lobbies if i not in lobby.seen)
    emit(f"lobby: {options.online} players online, {lobbies_n} lobbies open, {how}: gunicorn CPU, % of one core, vs "
         f"the same lobbies polling a static file", cpu, floor_cpu, unit="% of one core",
         target=f"lanhub < {TARGET_CPU_PERCENT:g}", meets=cpu < TARGET_CPU_PERCENT, failures=failures)
    worst = max(delays) if delays else float("nan")
    emit(f"lobby ({how}): a player's arrival (VpnSession row written) until a lobby shows it, worst of "
         f"{len(delays)} (lobby, arrival) pairs ({missed} missed), vs the poll interval", worst,
         LOBBY_POLL_SECONDS_FLOOR, unit="s", target=f"lanhub < {TARGET_DELAY_S:g}",
         meets=bool(delays) and worst < TARGET_DELAY_S and not missed,
         median=round(statistics.median(delays), 3) if delays else None)


if __name__ == "__main__":
    main()
