"""Who is online: VpnSession rows written from what a node's OpenVPN instances report.

Two writers, one set of rules: the session watcher (nodes/watcher.py) writes an instance's client list whenever
it (re)connects to it or the instance logs a client joining, and drops a client the moment the log says it left; the periodic status poll (nodes/syncing.py) replaces
a node's rows with what it read, as the slow safety net. Rows are per (node, instance, common name).
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from nodes.models import Node, VpnSession
from nodes.openvpn_mgmt import ClientRow
from players.models import Device, Player


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
    """The full client list of one instance, as read when the watcher (re)connects to it."""
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
