"""Use cases for invites and players: invite friends, let them join, give them profiles, revoke them."""

from __future__ import annotations

import datetime as dt
import functools
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from lanhub import pki, prepared
from lanhub.prepared import PreparedSelect, PreparedUpdate
from lanhub.secrets import seal, unseal
from nodes import layout
from nodes import services as node_services
from nodes.models import NODE_BULK_FIELDS, Lan, Node, NodeState
from players import profiles, ranking
from players.models import (FIRST_DEVICE_NAME, NICKNAME_MESSAGE, Device, Invite, Player, device_name_validator,
                            new_token, nickname_validator)

INVITE_DEFAULT_TTL = dt.timedelta(hours=24)
PROFILE_CACHE_SIZE = 512  # rendered profiles kept per process (about 5-15 KB each)
INVITE_MAX_TTL = dt.timedelta(days=30)
MAX_DEVICES = 10  # devices in use per player: a household's worth, and a bound on what one page link can issue


class InviteUnusable(Exception):
    """The invite cannot be redeemed; `reason` is one of revoked, expired, used_up, not_found."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RateLimited(Exception):
    """Too many requests of one kind from one client; the message says when to try again."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@contextmanager
def rate_slot(key: str, *, limit: int, window: int, message: str):
    """Take one of `limit` slots per `window` seconds for `key` (in Redis), and give it back if the block raises.

    Only what succeeds is counted: a friend who mistypes a nickname five times has joined once, not five times.
    Taking the slot before the work (rather than counting after) keeps the limit exact under concurrency."""
    key = f"rate:{key}"
    cache.add(key, 0, timeout=window)
    try:
        count = cache.incr(key)
    except ValueError:  # the key expired between add and incr
        cache.set(key, 1, timeout=window)
        count = 1
    if count > limit:
        _give_back(key)
        raise RateLimited(message, retry_after=window)
    try:
        yield
    except BaseException:
        _give_back(key)
        raise


def join_rate_key(client_address: str | None) -> str:
    return f"join:{client_address or 'unknown'}"


def lost_device_rate_key(player: Player) -> str:
    return f"lost-device:{player.pk}"


def clear_rate(key: str) -> None:
    cache.delete(f"rate:{key}")


def _give_back(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:  # expired meanwhile: nothing left to give back
        pass


@transaction.atomic
def create_invite(*, lan: Lan, created_by=None, note: str = "", ttl: dt.timedelta = INVITE_DEFAULT_TTL,
                  max_uses: int = 10) -> Invite:
    if ttl <= dt.timedelta(0) or ttl > INVITE_MAX_TTL:
        raise ValidationError({"ttl": "An invite lasts between a minute and 30 days."})
    invite = Invite(lan=lan, created_by=created_by, note=note, max_uses=max_uses,
                    expires_at=timezone.now() + ttl)
    invite.full_clean()
    invite.save()
    return invite


def revoke_invite(invite: Invite) -> Invite:
    Invite.objects.filter(pk=invite.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    invite.refresh_from_db()
    return invite


def validate_nickname(nickname: str) -> str:
    nickname = (nickname or "").strip()
    try:
        nickname_validator(nickname)
    except ValidationError:
        raise ValidationError({"nickname": NICKNAME_MESSAGE}) from None
    return nickname


def redeem_invite(*, token: str, nickname: str, client_address: str | None = None,
                  join_rate: int | None = None) -> Player:
    """Turn an invite into a player. The invite row is locked, so its use limit holds under concurrency.

    With `join_rate`, at most that many players join per client address per hour; failed attempts do not count."""
    if join_rate is None:
        return _redeem(token=token, nickname=nickname, client_address=client_address)
    with rate_slot(join_rate_key(client_address), limit=join_rate, window=3600,
                   message="Too many people joined from your address in the last hour. Try again later."):
        return _redeem(token=token, nickname=nickname, client_address=client_address)


INVITE_FIELDS = ("id", "lan_id", "expires_at", "max_uses", "uses", "revoked_at")
REDEEM_LAN_FIELDS = ("id", "name", "slug", "ca_cert", "ca_key_sealed", "tls_crypt_sealed", "nodes_version")
# The join path's first statement, compiled once (lanhub/prepared.py): count the use of an invite that has one left,
# and return it with the parts of its LAN that issuing and the first profile read. One UPDATE both locks the row
# until the end of the transaction (SQLite's writer lock is taken at BEGIN IMMEDIATE already; PostgreSQL locks the
# invite row only, not its LAN, and re-checks `uses < max_uses` on the newest row after waiting for a concurrent
# join) and claims the use: no separate read, so no window between the check and the count.
_COUNT_USE = PreparedUpdate(lambda token: Invite.objects.filter(token=token, uses__lt=F("max_uses")),
                            {"uses": F("uses") + 1}, token=str,
                            returning=(*INVITE_FIELDS, *(f"lan__{f}" for f in REDEEM_LAN_FIELDS)))


@transaction.atomic
def _redeem(*, token: str, nickname: str, client_address: str | None) -> Player:
    nickname = validate_nickname(nickname)
    row = _COUNT_USE.run(token=token)  # counted and locked; an error below rolls the count back with the rest
    if not row:
        raise InviteUnusable(_unusable_reason(token))
    invite = Invite.from_db(DEFAULT_DB_ALIAS, INVITE_FIELDS, row[0][: len(INVITE_FIELDS)])
    problem = invite.problem()  # `uses` counts this join already: reaching `max_uses` is this, the last, use
    if problem and problem != "used_up":
        raise InviteUnusable(problem)
    lan = Lan.from_db(DEFAULT_DB_ALIAS, REDEEM_LAN_FIELDS, row[0][len(INVITE_FIELDS):])
    invite.lan = lan
    # The nickname was validated above, the token is 192 random bits under a unique index, the address comes from
    # lanhub.clientip (a parsed IP address), and the LAN and the invite are the rows just read under the lock: no
    # field is left for full_clean to check. Uniqueness of the nickname per LAN (case-insensitive) is the
    # constraint's: one INSERT both checks and claims it, also against a friend taking it through another invite at
    # the same moment. No savepoint: the error leaves this transaction, which rolls back whole, the use included.
    player = Player(lan=lan, nickname=nickname, invite=invite, joined_from=client_address)
    try:
        prepared.insert(player)
    except IntegrityError:
        raise ValidationError({"nickname": f"“{nickname}” is taken on this LAN; pick another."}) from None
    # The device they join on; the player page adds the others, each with its own certificate.
    device = Device(player=player, name=FIRST_DEVICE_NAME)
    _issue_certificate(device, player=player, lan=lan)
    prepared.insert(device)
    player.joined_device = device  # what build_profile needs next, without reading back the row just written
    return player


def _unusable_reason(token: str) -> str:
    """Why no use could be counted: no such invite, or its problem (used up, or revoked or expired as well)."""
    invite = Invite.objects.filter(token=token).only(*INVITE_FIELDS).first()
    if invite is None:
        return "not_found"
    return invite.problem() or "used_up"


def _issue_certificate(device: Device, *, player: Player, lan: Lan) -> None:
    """Give `device` a new certificate and its key, sealed."""
    now = timezone.now()
    # Every issuance gets its own common name, so the sessions of a revoked certificate can be killed by name
    # through the management interface without touching its replacement or the player's other devices.
    suffix = secrets.token_hex(3)
    issued = pki.issue_client(ca=node_services.lan_ca(lan), common_name=layout.player_cn(player.nickname, suffix),
                              now=now)
    device.common_name = issued.common_name
    device.cert_pem, device.key_sealed = issued.cert_pem, seal(issued.key_pem)
    device.serial = format(issued.serial, "x")
    device.issued_at = now


def validate_device_name(name: str) -> str:
    name = " ".join((name or "").split())  # no stray or doubled spaces: "phone " and "phone" are one name
    try:
        device_name_validator(name)
    except ValidationError:
        raise ValidationError({"name": device_name_validator.message}) from None
    return name


@transaction.atomic
def add_device(player: Player, *, name: str) -> Device:
    """Give the player another device: its own certificate, so it connects alongside the others (a shared
    certificate would drop the other device's session) and keeps its own address."""
    name = validate_device_name(name)
    player = Player.objects.select_for_update().select_related("lan").get(pk=player.pk)  # one add at a time
    if player.revoked_at:
        raise ValidationError("This player was removed by the host.")
    active = player.devices.filter(revoked_at__isnull=True)
    if active.count() >= MAX_DEVICES:
        raise ValidationError(f"You have {MAX_DEVICES} devices already. Switch one off (I lost it) to add another.")
    if active.filter(name__iexact=name).exists():
        raise ValidationError({"name": f"You have a device called “{name}” already; pick another name."})
    device = Device(player=player, name=name)
    _issue_certificate(device, player=player, lan=player.lan)
    device.full_clean(exclude=["player"], validate_constraints=False)  # the name's uniqueness: checked above
    device.save()
    return device


@transaction.atomic
def revoke_player(player: Player, *, reason: str = "revoked by the host") -> Player:
    """Revoke every device of the player on every node before returning (nodes/revocation.py); the sync that
    follows kills their live sessions. `unreached_nodes` names the nodes that get it only once they answer."""
    player = Player.objects.select_for_update().select_related("lan").get(pk=player.pk)
    if player.revoked_at:
        return player
    player.revoked_at = timezone.now()
    player.save(update_fields=["revoked_at"])
    devices = list(player.devices.filter(revoked_at__isnull=True))
    Device.objects.filter(pk__in=[d.pk for d in devices]).update(revoked_at=player.revoked_at)
    player.unreached_nodes = node_services.revoke_certificates(
        lan=player.lan, certificates=[(d.serial, d.common_name) for d in devices], reason=reason)
    return player


@transaction.atomic
def reissue_player(player: Player) -> Player:
    """The host's "reissue": every device in use gets a new certificate and the player page a new link; every
    profile downloaded so far stops working."""
    player = Player.objects.select_for_update().select_related("lan").get(pk=player.pk)
    if player.revoked_at:
        raise ValidationError("This player was revoked by the host.")
    old = []
    for device in player.devices.filter(revoked_at__isnull=True):
        old.append((device.serial, device.common_name))
        _issue_certificate(device, player=player, lan=player.lan)
        device.save(update_fields=["common_name", "cert_pem", "key_sealed", "serial", "issued_at"])
    # The player page may be bookmarked on a lost device: a new link, or it could fetch the new profiles.
    player.token = new_token()
    player.save(update_fields=["token"])
    player.unreached_nodes = node_services.revoke_certificates(
        lan=player.lan, certificates=old, reason=f"reissued for {player.nickname}")
    return player


@transaction.atomic
def switch_off_device(player: Player, device: Device) -> Device:
    """'I lost my device': that device's certificate is refused by every node from now on; the player's other
    devices stay connected. The page gets a new link, because the lost device may have it bookmarked (and could
    add itself a new device with it)."""
    player = Player.objects.select_for_update().select_related("lan").get(pk=player.pk)
    device = Device.objects.select_for_update().get(pk=device.pk)
    if device.player_id != player.pk:
        raise ValidationError("That device belongs to someone else.")
    if player.revoked_at:
        raise ValidationError("This player was revoked by the host.")
    if device.revoked_at:
        return device
    device.revoked_at = timezone.now()
    device.save(update_fields=["revoked_at"])
    player.token = new_token()
    player.save(update_fields=["token"])
    device.player = player
    device.unreached_nodes = node_services.revoke_certificates(
        lan=player.lan, certificates=[(device.serial, device.common_name)],
        reason=f"device “{device.name}” lost; switched off for {player.nickname}")
    return device


def lose_device(player: Player, device: Device, *, limit: int) -> Device:
    """The player's own "I lost this device" button, at most `limit` times per player per hour: each one re-signs
    the CRL and syncs every node of the LAN."""
    with rate_slot(lost_device_rate_key(player), limit=limit, window=3600,
                   message="Devices were switched off several times from this page in the last hour. "
                           "Wait a while, or ask the host."):
        return switch_off_device(player, device)


@transaction.atomic
def choose_node(player: Player, node: Node) -> Player:
    if node.lan_id != player.lan_id:
        raise ValidationError("That server belongs to another LAN.")
    player.preferred_node = node
    player.save(update_fields=["preferred_node"])
    return player


# --- Profiles -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    filename: str
    content: str


def _ready(lan_id: int):
    """The LAN's nodes that players are given, in the order the host added them: one definition for the pages
    (ready_nodes) and the download (ready_node_rows)."""
    return Node.objects.filter(lan_id=lan_id, state=NodeState.READY, healthy=True).order_by("created_at", "pk")


def ready_nodes(lan: Lan) -> list[Node]:
    return list(_ready(lan.pk).defer(*NODE_BULK_FIELDS))


class ReadyNode(NamedTuple):
    """What a profile and its ranking need of a ready node (players/profiles.py, players/ranking.py: NodeLike), for
    the paths that do not show the node: a download, the profile handed over at joining."""

    pk: int
    lan_id: int
    name: str
    public_address: str
    public_ipv6: str
    udp_port: int | None
    tcp_port: int | None
    country: str
    latitude: float | None
    longitude: float | None


_READY_NODES = PreparedSelect(lambda lan_id: _ready(lan_id).values_list(*ReadyNode._fields), lan_id=int)


class Rows(tuple):
    """A tuple whose hash is computed once: the caches on the download path are keyed by a LAN's whole list of
    ready nodes, and a list of 100 nodes would otherwise be hashed again at every lookup."""

    def __hash__(self) -> int:
        try:
            return self.__dict__["hash"]
        except KeyError:
            self.__dict__["hash"] = value = super().__hash__()
            return value


def ready_node_rows(lan_id: int, *, version: int | None = None) -> Rows:
    """The LAN's ready nodes in the order the host added them, as ReadyNode rows: one query, compiled once. The
    same rows give back the same Rows object (kept per process, keyed by the rows as read, so any change to any
    column read is a new value), which makes the caches keyed by it cheap.

    With `version` (the LAN's nodes_version, read by the caller from the database a moment before), the rows come
    from the process's memory when they were read at that version, and no query is made. The version moves in the
    same transaction as any change to the rows (migration nodes 0009), so equal versions mean equal rows. The rows
    are always read after the version, so at worst they are newer than the version they are kept under, and the
    next reader who sees the newer version reads them again."""
    if version is None:
        return _ready_node_rows(tuple(_READY_NODES.run(lan_id=lan_id)))
    kept = _ROWS_BY_VERSION.get(lan_id)
    if kept is not None and kept[0] == version:
        return kept[1]
    rows = _ready_node_rows(tuple(_READY_NODES.run(lan_id=lan_id)))
    if len(_ROWS_BY_VERSION) >= READY_ROWS_LANS:
        _ROWS_BY_VERSION.clear()  # a bound, not a policy: a few hundred LANs per process is far more than served
    _ROWS_BY_VERSION[lan_id] = (version, rows)  # one assignment: threads see the old pair or the new one
    return rows


READY_ROWS_LANS = 1024
_ROWS_BY_VERSION: dict[int, tuple[int, Rows]] = {}


@functools.lru_cache(maxsize=256)
def _ready_node_rows(rows: tuple) -> Rows:
    return Rows(ReadyNode(*row) for row in rows)


@functools.lru_cache(maxsize=1024)
def rank_ready_nodes(nodes: Rows, *, rtts: tuple[tuple[int, float | None], ...] = (), client_country: str | None,
                     default_node_id: int | None) -> Rows:
    """ranking.rank_nodes for a download: the nodes alone, in ranked order, kept per process for the same inputs
    (ranking is pure, and the country table is fixed)."""
    ranked = ranking.rank_nodes(nodes, rtts=dict(rtts), client_country=client_country,
                                countries=ranking.CountryTable.load(), default_node_id=default_node_id)
    return Rows(node for node, _ in ranked)


def active_devices(player: Player) -> list[Device]:
    return list(player.devices.filter(revoked_at__isnull=True).defer("cert_pem", "key_sealed"))


def build_profile(player: Player, *, node: profiles.NodeLike, ranked: list, device: Device | None = None) -> Profile:
    """The .ovpn of one of the player's devices (by default the first one in use) for `node`, with the other
    nodes, in ranked order, as fallbacks. Nodes are Node models or ReadyNode rows."""
    if player.revoked_at:
        raise ValidationError("This player was revoked.")
    if device is None:
        device = player.devices.filter(revoked_at__isnull=True).order_by("created_at", "pk").first()
    if device is None or device.player_id != player.pk or device.revoked_at:
        raise ValidationError("This device was switched off.")
    lan = player.lan
    endpoints = (_endpoints(ranked, node.pk) if isinstance(ranked, Rows)
                 else _endpoints_of(node, *(n for n in ranked if n.pk != node.pk)))
    content = _render_profile(lan.name, player.nickname, endpoints, lan.ca_cert, device.cert_pem, device.key_sealed,
                              lan.tls_crypt_sealed)
    return Profile(filename=profile_filename(player, node=node, device=device), content=content)


class _Endpoint(NamedTuple):
    public_address: str
    public_ipv6: str
    udp_port: int | None
    tcp_port: int | None


def _endpoints_of(*nodes) -> Rows:
    # The remotes depend on these four fields of each node, in this order, and on nothing else.
    return Rows(_Endpoint(n.public_address, n.public_ipv6, n.udp_port, n.tcp_port) for n in nodes)


@functools.lru_cache(maxsize=1024)
def _endpoints(ranked: Rows, chosen_pk: int) -> Rows:
    return _endpoints_of(*(n for n in ranked if n.pk == chosen_pk), *(n for n in ranked if n.pk != chosen_pk))


def profile_filename(player: Player, *, node: Node, device: Device) -> str:
    """The name a device's .ovpn for ``node`` downloads as (the player page quotes it in its instructions). The
    device's name is in it: two devices' files must not overwrite each other in one Downloads folder."""
    owner = player.nickname if device.name == FIRST_DEVICE_NAME else f"{player.nickname}-{device.name}"
    return profiles.profile_filename(lan=player.lan.slug, nickname=owner, node=node.name)


@functools.lru_cache(maxsize=PROFILE_CACHE_SIZE)
def _render_profile(lan_name: str, nickname: str, endpoints: Rows, ca_pem: str, cert_pem: str,
                    key_sealed: str, tls_crypt_sealed: str) -> str:
    """The rendered profile, cached per process and keyed by every input as stored: the private halves sealed, so
    a new certificate, a re-sealed key, a renamed LAN, a node's new address or port, a node gone or added or another
    order of servers is simply another key, and nothing needs invalidating. A revoked device or player never gets
    here (build_profile and the download's lookup refuse it first). In process memory only, never in Redis: the
    text holds the player's private key. A hit skips two unseals, the PEM checks and the remotes' validation; the
    key (seven values, the nodes as plain tuples) hashes in microseconds even at 100 nodes."""
    remotes = profiles.profile_remotes(chosen=endpoints[0], others=endpoints[1:])
    return profiles.render_profile(lan_name=lan_name, nickname=nickname, remotes=remotes, ca_pem=ca_pem,
                                   cert_pem=cert_pem, key_pem=unseal(key_sealed),
                                   tls_crypt=_unsealed_tls_crypt(tls_crypt_sealed))


@functools.lru_cache(maxsize=64)
def _unsealed_tls_crypt(sealed: str) -> str:
    """The LAN's tls-crypt key, opened once per process like its CA key (nodes/services.py: _unsealed_ca_key): every
    profile of the LAN holds the same one."""
    return unseal(sealed)
