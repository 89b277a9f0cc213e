"""Who is online: VpnSession rows written from what a node's OpenVPN instances report.

Two writers, one set of rules: the session watcher (nodes/watcher.py) writes an instance's client list whenever
it (re)connects to it or the instance logs a client joining, and drops a client the moment the log says it left; the periodic status poll (nodes/syncing.py) replaces
a node's rows with what it read, as the slow safety net. Rows are per (node, instance, common name).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError

from nodes.models import Node, VpnSession
from nodes.openvpn_mgmt import ClientRow
from players.models import Device, Player

log = logging.getLogger(__name__)

def held_key() -> str:
    """Redis hash: node id -> unix time a watcher last reported holding it (per deployment: the cache prefix)."""
    return f"{settings.CACHES['default'].get('KEY_PREFIX') or 'lanhub'}:watcher-held"

HELD_FRESH = 30.0  # seconds: an older mark is stale (its watcher is gone), and the node is polled as usual


def held_nodes(now: float | None = None) -> set[int]:
    """The nodes whose server interfaces a session watcher holds right now (empty when Redis cannot say)."""
    now = time.time() if now is None else now
    try:
        marks = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2).hgetall(held_key())
    except redis.RedisError as exc:
        log.warning("cannot read which nodes the watcher holds: %s", exc)
        return set()
    held = set()
    for pk, at in marks.items():
        try:
            if now - float(at) < HELD_FRESH:
                held.add(int(pk))
        except ValueError:
            continue
    return held


POLL_TASK = "nodes.tasks.poll_status"  # sent by name: tasks import this module


def request_poll(node_id: int, *, countdown: float = 0, reason: str = "") -> bool:
    """Poll one node soon, outside the periodic round: a node the watcher lost, or one that just missed a poll
    (nodes/syncing.py). A broker that is down loses nothing: the periodic round polls the node anyway."""
    try:
        current_app.signature(POLL_TASK, args=(node_id,)).apply_async(
            countdown=countdown, expires=countdown + settings.LANHUB_STATUS_INTERVAL)
    except OperationalError as exc:
        log.warning("could not queue a poll of node %s (%s): %s", node_id, reason, exc)
        return False
    return True


def due_for_poll(node_ids: Iterable[int], now: float | None = None) -> list[int]:
    """The nodes the status poll round starting now should read: every node the watcher does not hold, and the held
    ones in turn, so each is read once per LANHUB_HELD_POLL_INTERVAL (spread over the rounds by id)."""
    now = time.time() if now is None else now
    interval = max(1, settings.LANHUB_STATUS_INTERVAL)
    every = max(1, round(settings.LANHUB_HELD_POLL_INTERVAL / interval))  # rounds between two polls of a held node
    this_round = int(now // interval)
    held = held_nodes(now)
    return [pk for pk in node_ids if pk not in held or (pk + this_round) % every == 0]


def _players(node: Node, names) -> dict[str, Player]:
    """Common name -> player, through the player's devices in use (each device has its own certificate)."""
    devices = Device.objects.filter(player__lan_id=node.lan_id, player__revoked_at__isnull=True,
                                    revoked_at__isnull=True, common_name__in=set(names)).select_related("player")
    return {d.common_name: d.player for d in devices}


def _session(node: Node, row: ClientRow, player: Player | None, now) -> VpnSession:
    return VpnSession(node=node, instance=row.instance, common_name=row.common_name, player=player,
                      vpn_address=row.vpn_address or None, real_address=row.real_address[:64],
                      connected_since=row.connected_since, bytes_in=row.bytes_in, bytes_out=row.bytes_out,
                      seen_at=now)


def client_left(node: Node, instance: str, common_name: str, real_address: str) -> None:
    """A client said goodbye or its connection ended (the watcher read it in the instance's log)."""
    VpnSession.objects.filter(node=node, instance=instance, common_name=common_name,
                              real_address=real_address[:64]).delete()


@transaction.atomic
def replace_instance(node: Node, instance: str, rows: list[ClientRow]) -> None:
    """The full client list of one instance, as the watcher read it. Unchanged sessions are left as they are: most
    reads (a second look, the one after a delayed exit) find what the log already said."""
    stored = set(VpnSession.objects.filter(node=node, instance=instance)
                 .values_list("common_name", "real_address", "vpn_address", "connected_since"))
    if stored == {(r.common_name, r.real_address[:64], r.vpn_address or None, r.connected_since) for r in rows} \
            and len(stored) == len(rows):
        return
    now = timezone.now()
    players = _players(node, [r.common_name for r in rows])
    VpnSession.objects.filter(node=node, instance=instance).delete()
    VpnSession.objects.bulk_create(_session(node, r, players.get(r.common_name), now) for r in rows)
    seen = [players[r.common_name].pk for r in rows if r.common_name in players]
    Player.objects.filter(pk__in=seen).update(last_seen_at=now)


@transaction.atomic
def replace_node(node: Node, rows: list[ClientRow]) -> None:
    """Every instance's client list of a node, as the status poll read it."""
    now = timezone.now()
    players = _players(node, [r.common_name for r in rows])
    VpnSession.objects.filter(node=node).delete()
    VpnSession.objects.bulk_create(_session(node, r, players.get(r.common_name), now) for r in rows)
    seen = [players[r.common_name].pk for r in rows if r.common_name in players]
    Player.objects.filter(pk__in=seen).update(last_seen_at=now)


def forget_instance(node: Node, instance: str) -> None:
    """An instance stopped: nobody is connected to it any more."""
    VpnSession.objects.filter(node=node, instance=instance).delete()
