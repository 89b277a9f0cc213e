"""The only place that looks up objects a URL names (convention 2).

Host-facing helpers return the object or raise Http404, also when it belongs to another host: a 403 would tell
charlie that alice's node 7 exists. Public helpers take a token from a link; a token that cannot be one of ours
(wrong alphabet or length) is rejected before it reaches the database, with its own reason so the page can say
"the link is cut short" rather than "unknown".
"""

from __future__ import annotations

import math
import re

from django.db import DEFAULT_DB_ALIAS
from django.http import Http404

from lanhub.prepared import PreparedSelect
from nodes.models import Lan, Node
from players.models import TOKEN_BYTES, Device, Invite, Player

# secrets.token_urlsafe(n) gives ceil(4n/3) characters of the URL-safe base64 alphabet, no padding.
TOKEN_LENGTH = math.ceil(TOKEN_BYTES * 4 / 3)
TOKEN_RE = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


class LinkNotFound(Http404):
    """A public link that leads nowhere; `reason` is "malformed" or "unknown" and picks the page's wording."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _pk(value) -> int:
    # URL converters already give ints; this guards callers that pass strings from forms.
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Http404("No such object.") from None


def get_lan_for_host(request, slug: str) -> Lan:
    lan = Lan.objects.filter(owner=request.user, slug=slug).first() if request.user.is_authenticated else None
    if lan is None:
        raise Http404("No such LAN.")
    return lan


def get_node_for_host(request, pk, *, operators: bool = False) -> Node:
    """`operators=True` also lets a user who may view every node in the admin read it (the admin's sync-progress
    element polls the node status endpoint); hosts still see only their own."""
    if not request.user.is_authenticated:
        raise Http404("No such node.")
    query = Node.objects.select_related("lan").filter(pk=_pk(pk))
    if not (operators and request.user.is_staff and request.user.has_perm("nodes.view_node")):
        query = query.filter(lan__owner=request.user)
    node = query.first()
    if node is None:
        raise Http404("No such node.")
    return node


def get_player_for_host(request, pk) -> Player:
    player = (Player.objects.select_related("lan").filter(pk=_pk(pk), lan__owner=request.user).first()
              if request.user.is_authenticated else None)
    if player is None:
        raise Http404("No such player.")
    return player


def get_invite_for_host(request, pk) -> Invite:
    invite = (Invite.objects.select_related("lan").filter(pk=_pk(pk), lan__owner=request.user).first()
              if request.user.is_authenticated else None)
    if invite is None:
        raise Http404("No such invite.")
    return invite


def check_token(token: str) -> str:
    if not TOKEN_RE.fullmatch(token or ""):
        raise LinkNotFound("malformed")
    return token


def get_invite_by_token(token: str) -> Invite:
    """The invite a /join/ link names, usable or not (the page explains why it is not)."""
    invite = Invite.objects.select_related("lan__owner").filter(token=check_token(token)).first()
    if invite is None:
        raise LinkNotFound("unknown")
    return invite


def get_player_by_token(token: str) -> Player:
    """The player a /me/ link names, revoked or not (a revoked player's page says so with a 410)."""
    player = Player.objects.select_related("lan__owner").filter(token=check_token(token)).first()
    if player is None:
        raise LinkNotFound("unknown")
    return player


def get_player_device(player: Player, ref: str | None, *, active: bool = True) -> Device:
    """One of `player`'s devices by its ref, or, with no ref, the first one still in use (what the links made
    before devices existed download). Another player's device, and a switched-off one (`active`), are a 404."""
    devices = Device.objects.filter(player=player)
    if active:
        devices = devices.filter(revoked_at__isnull=True)
    device = devices.filter(ref=ref).first() if ref is not None else devices.order_by("created_at", "pk").first()
    if device is None:
        raise Http404("No such device, or it was switched off.")
    return device


def get_lan_node(lan: Lan, ref: str, *, among: list[Node] | None = None) -> Node:
    """A node of `lan` named by pk or by name (profile download URLs accept either).

    With `among` (nodes of `lan` the caller has loaded already, such as the ready ones), the node must be one of
    them, and no query is made: a download is on a hot path."""
    if among is not None:
        node = next((n for n in among if n.lan_id == lan.pk and (n.name == ref or str(n.pk) == ref)), None)
        if node is None:
            raise Http404("No such server on this LAN, or it is not ready for players yet.")
        return node
    query = Node.objects.filter(lan=lan)
    # Only ASCII digits are a pk: str.isdigit() is also true for "²", which int() refuses.
    node = query.filter(pk=int(ref)).first() if re.fullmatch(r"[0-9]{1,18}", ref) else query.filter(name=ref).first()
    if node is None:
        raise Http404("No such server on this LAN.")
    return node


# A download's one query (lanhub/prepared.py): the device in use with its player still in the LAN, and what the
# profile needs of the LAN, with the version of its nodes (the ready nodes are read again only when it moved). By
# ref, or the first device in use for links from before devices.
DOWNLOAD_DEVICE_FIELDS = ("id", "player_id", "name", "ref", "cert_pem", "key_sealed", "revoked_at")
DOWNLOAD_PLAYER_FIELDS = ("id", "lan_id", "nickname", "token", "preferred_node_id", "revoked_at")
DOWNLOAD_LAN_FIELDS = ("id", "name", "slug", "default_node_id", "ca_cert", "tls_crypt_sealed",
                       "nodes_version")
_DOWNLOAD_COLUMNS = (*DOWNLOAD_DEVICE_FIELDS, *(f"player__{f}" for f in DOWNLOAD_PLAYER_FIELDS),
                     *(f"player__lan__{f}" for f in DOWNLOAD_LAN_FIELDS))


def _devices_in_use(token: str):
    return Device.objects.filter(player__token=token, player__revoked_at__isnull=True, revoked_at__isnull=True)


_DOWNLOAD_BY_REF = PreparedSelect(
    lambda token, ref: _devices_in_use(token).filter(ref=ref).values_list(*_DOWNLOAD_COLUMNS)[:1], token=str, ref=str)
_DOWNLOAD_FIRST = PreparedSelect(
    lambda token: _devices_in_use(token).order_by("created_at", "pk").values_list(*_DOWNLOAD_COLUMNS)[:1], token=str)


def find_device_for_download(token: str, ref: str | None) -> tuple[Player, Device] | None:
    """The player a /me/ link names and the device in use it downloads for (by ref, or the first in use), in one
    query, with the player's LAN as far as a profile needs it; None when there is nothing to download: a
    malformed or unknown link, a revoked player, a device switched off or another player's. Nothing is cached:
    a revoke is seen by the next request. The caller shows the page that explains a None (get_player_by_token,
    get_player_device)."""
    if not TOKEN_RE.fullmatch(token or ""):
        return None
    rows = _DOWNLOAD_BY_REF.run(token=token, ref=ref) if ref is not None else _DOWNLOAD_FIRST.run(token=token)
    if not rows:
        return None
    row, first, second = rows[0], len(DOWNLOAD_DEVICE_FIELDS), len(DOWNLOAD_DEVICE_FIELDS) + len(DOWNLOAD_PLAYER_FIELDS)
    device = Device.from_db(DEFAULT_DB_ALIAS, DOWNLOAD_DEVICE_FIELDS, row[:first])
    player = Player.from_db(DEFAULT_DB_ALIAS, DOWNLOAD_PLAYER_FIELDS, row[first:second])
    player.lan = Lan.from_db(DEFAULT_DB_ALIAS, DOWNLOAD_LAN_FIELDS, row[second:])
    device.player = player
    return player, device
