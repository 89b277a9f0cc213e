"""The lobby's live list: rendered once per change and pushed to every open lobby.

An open lobby holds one server-sent-events stream (`Stream`): the portal looks at the list once per
RECHECK_SECONDS and sends the rows only when they change, so an idle lobby costs one Redis GET a second and no
request at all. Where a stream can't be had (the process's STREAM_LIMIT is reached, a proxy buffers streams, an old
browser) the page falls back to asking every LOBBY_POLL_SECONDS with the ETag of what it shows, answered by a 304
until the list changes. docs/lobby.md says why. Both read the same two things:

- a fingerprint of what the list is made of (who is online where, with which address since when, and which nodes
  exist and are ready), from two aggregate queries (no rows fetched, nothing rendered), looked at most once per
  RECHECK_SECONDS per LAN: in between, every lobby of the LAN is answered from one Redis key;
- the rendered rows and their ETag (a hash of the HTML), kept per LAN and fingerprint. A fingerprint that changes
  while the rows do not (a status poll rewriting the same sessions) costs one render, and the lobbies still get
  304s, because the ETag is that of the HTML.

No writer has to announce a change: the session watcher, the status poll, a revocation and a node going down are
all seen through the rows they write. What the fingerprint does not cover (a node renamed) shows when the rendered
copy expires, after HTML_SECONDS. The rows are the same for every viewer; the page marks "(you)" itself.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator

from django.conf import settings
from django.core.cache import cache
from django.db import connections
from django.db.models import Case, Count, F, IntegerField, Max, Min, Sum, When

from nodes.models import Lan, Node, NodeState, VpnSession

LOBBY_POLL_SECONDS = 1.5  # a change shows within a poll and a recheck (2.5 s), plus one request
RECHECK_SECONDS = 1  # 0: look at the rows on every poll (the tests do, so no test sees another's rows)
HTML_SECONDS = 60
STREAM_SECONDS = 300  # then the stream ends and the browser opens a new one (after STREAM_RETRY_MS)
STREAM_RETRY_MS = 1000
STREAM_HEARTBEAT_SECONDS = 15  # a comment line: proxies keep the stream open, and a gone browser is noticed

# Each open stream holds one of the web server's threads for up to STREAM_SECONDS, so a process serves at most
# STREAM_LIMIT of them and keeps the rest of its threads for pages (the Procfile gives each worker 64 threads).
STREAM_LIMIT = settings.LANHUB_LOBBY_STREAMS
_stream_slots = threading.BoundedSemaphore(STREAM_LIMIT) if STREAM_LIMIT > 0 else None


def current(lan: Lan, render: Callable[[], str]) -> tuple[str, Callable[[], str]]:
    """The ETag of the LAN's lobby rows now, and a function that returns their HTML (rendered only if needed)."""
    lan_id = _lan_key(lan)
    etag = cache.get(f"lobby:now:{lan_id}") if RECHECK_SECONDS else None
    if etag is None:
        etag_key = f"lobby:etag:{lan_id}:{_fingerprint(lan.pk)}"
        etag = cache.get(etag_key)
        if etag is None:
            html = render()
            etag = '"' + hashlib.sha256(html.encode()).hexdigest()[:24] + '"'
            cache.set_many({f"lobby:html:{lan_id}:{etag}": html, etag_key: etag}, HTML_SECONDS)
            _remember(lan_id, etag)
            return etag, lambda: html
        _remember(lan_id, etag)

    def html() -> str:
        cached = cache.get(f"lobby:html:{lan_id}:{etag}")
        return cached if cached is not None else render()  # evicted meanwhile: the same rows, drawn again

    return etag, html


def _remember(lan_id: str, etag: str) -> None:
    if RECHECK_SECONDS:  # the Redis backend counts whole seconds
        cache.set(f"lobby:now:{lan_id}", etag, RECHECK_SECONDS)


def _lan_key(lan: Lan) -> str:
    # The LAN's creation time next to its pk: a pk reused after a deletion (or a test's rollback) is another LAN.
    return f"{lan.pk}-{lan.created_at.timestamp():.6f}"


def _fingerprint(pk: int) -> str:
    sessions = VpnSession.objects.filter(node__lan_id=pk, player__isnull=False, player__revoked_at__isnull=True)
    sessions = sessions.aggregate(
        rows=Count("pk"), addressed=Count("vpn_address"), players=Sum("player_id"),
        placed=Sum(F("node_id") * F("player_id")), first=Min("connected_since"), last=Max("connected_since"))
    nodes = Node.objects.filter(lan_id=pk).aggregate(
        rows=Count("pk"), ids=Sum("pk"),
        ready=Sum(Case(When(state=NodeState.READY, then=F("pk")), default=0, output_field=IntegerField())))
    return hashlib.sha256(repr((sorted(sessions.items()), sorted(nodes.items()))).encode()).hexdigest()


class Stream:
    """The lobby's rows as server-sent events: `retry`, then the rows each time their ETag changes (the ETag is the
    event's id, so a browser that reconnects with Last-Event-ID gets nothing until something is new), and a
    heartbeat comment while nothing changes. Ends after STREAM_SECONDS, or when `allowed()` says the viewer may no
    longer look (a revoked player, a host signed out), asked whenever the rows change and at every heartbeat.

    Takes one of the process's STREAM_LIMIT slots (`open` returns None when none is free: the page polls instead)
    and gives it back on `close`, which the web server calls when the browser goes or the stream ends. Between
    looks it holds no database connection: a hundred open lobbies must not hold a hundred of them.
    """

    def __init__(self, lan: Lan, render: Callable[[], str], *, last_etag: str | None,
                 allowed: Callable[[], bool] = lambda: True, seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.lan, self.render, self.sent, self.allowed = lan, render, last_etag, allowed
        self.clock, self.sleep = clock, sleep
        self.deadline = clock() + (STREAM_SECONDS if seconds is None else seconds)
        self._held = True
        self._events = self._run()

    @classmethod
    def open(cls, lan: Lan, render: Callable[[], str], *, last_etag: str | None = None, **kwargs) -> Stream | None:
        if _stream_slots is None or not _stream_slots.acquire(blocking=False):
            return None
        return cls(lan, render, last_etag=last_etag, **kwargs)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        if self._held:  # once, however often the server calls it
            self._held = False
            _stream_slots.release()

    def _run(self) -> Iterator[bytes]:
        yield f"retry: {STREAM_RETRY_MS}\n\n".encode()
        quiet_since = self.clock()
        while True:
            etag, html = shared_look(self.lan, self.render)
            changed, due = etag != self.sent, self.clock() - quiet_since >= STREAM_HEARTBEAT_SECONDS
            if (changed or due) and not self.allowed():
                return  # the browser reconnects and gets the page's own answer (410, a login)
            if changed:
                self.sent = etag
                quiet_since = self.clock()
                yield event(etag, html())
            elif due:
                quiet_since = self.clock()
                yield b": still here\n\n"
            _release_connections()
            if self.clock() >= self.deadline:
                return
            self.sleep(max(RECHECK_SECONDS, 0.2))


# The streams of one process share their looks: per LAN, one look per RECHECK_SECONDS (one Redis GET, or the two
# aggregate queries when the LAN's ETag has expired) and the rows fetched once per change, whatever the number of
# streams. Without it, a hundred streams would each ask Redis every second and all run the queries at once.
_looks: dict[str, tuple[float, str, Callable[[], str]]] = {}
_look_locks: dict[str, threading.Lock] = {}
_looks_guard = threading.Lock()


def shared_look(lan: Lan, render: Callable[[], str]) -> tuple[str, Callable[[], str]]:
    """`current(lan, render)`, shared by the process's streams for RECHECK_SECONDS."""
    if not RECHECK_SECONDS:
        return current(lan, render)
    key = _lan_key(lan)
    with _looks_guard:
        lock = _look_locks.setdefault(key, threading.Lock())
    with lock:  # the other streams of this LAN wait for this look and take its answer
        seen = _looks.get(key)
        if seen is not None and time.monotonic() - seen[0] < RECHECK_SECONDS:
            return seen[1], seen[2]
        etag, html = current(lan, render)
        if seen is not None and seen[1] == etag:
            html = seen[2]  # unchanged: keep the rows already fetched
        else:
            html = _once(html)
        _looks[key] = (time.monotonic(), etag, html)
        return etag, html


def _once(fetch: Callable[[], str]) -> Callable[[], str]:
    """`fetch`, run on the first call only (the rows of one ETag never change)."""
    done: list[str] = []
    lock = threading.Lock()

    def rows() -> str:
        with lock:
            if not done:
                done.append(fetch())
            return done[0]

    return rows


def event(etag: str, html: str) -> bytes:
    """One server-sent event: the ETag as its id, the HTML as its data (one `data:` field per line)."""
    data = "".join(f"data: {line}\n" for line in html.split("\n"))
    return f"id: {etag}\n{data}\n".encode()


def _release_connections() -> None:
    """The stream's thread lives on between looks; its database connections need not. (Not inside a transaction:
    only a test wraps a request in one.)"""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()
