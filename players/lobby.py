"""The lobby's live list: rendered once per change and served to every open lobby, which revalidates it cheaply.

Each open lobby asks every LOBBY_POLL_SECONDS with the ETag of what it shows; the answer is a 304 until the list
changes (docs/lobby.md says why this and not a push channel). What makes the 304 cheap:

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
from collections.abc import Callable

from django.core.cache import cache
from django.db.models import Case, Count, F, IntegerField, Max, Min, Sum, When

from nodes.models import Lan, Node, NodeState, VpnSession

LOBBY_POLL_SECONDS = 1.5  # a change shows within a poll and a recheck (2.5 s), plus one request
RECHECK_SECONDS = 1  # 0: look at the rows on every poll (the tests do, so no test sees another's rows)
HTML_SECONDS = 60


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
