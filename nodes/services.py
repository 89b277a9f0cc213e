"""Use cases for LANs and nodes: create them, plan them, and ask the nodes that must change to sync.

Views, the admin, management commands and tasks call these functions and nothing below them. Each function that
writes more than one row is atomic, and Celery tasks are enqueued only after the transaction commits.
"""

from __future__ import annotations

import functools
import ipaddress
import logging

from cryptography import x509
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from lanhub import pki
from lanhub.secrets import seal, unseal
from nodes import games, layout, provisioning, revocation, routing
from nodes.models import Lan, Node, RevokedCertificate, StoredPlan
from nodes import topology
from nodes.ssh import ProvisioningError, open_connection
# Planning and run bookkeeping live in their own modules; the names views, the admin and tests use are re-exported.
from nodes.planning import (  # noqa: F401
    LanPlan, check_lan, check_node, current_plan, estimated_rtts, lock_lan, node_specs, plan_lan, replan, revoked_names,
    sync_changed_nodes,
)
from nodes.runs import enqueue_sync, prune_runs, request_sync, requeue_stale_runs  # noqa: F401

log = logging.getLogger(__name__)

CRL_DAYS = 30


# --- LANs -----------------------------------------------------------------------------------------------------


@transaction.atomic
def create_lan(*, owner, name: str, slug: str = "", supernet: str = "10.0.0.0/8", pool_prefix: int = 16,
               topology_mode: str = "auto", discovery_games: list[str] | None = None,
               discovery_ports: str = "") -> Lan:
    """Create a LAN with its own certificate authority, tls-crypt key, empty CRL and SSH deploy key."""
    name = (name or "").strip()
    if slug and Lan.objects.filter(owner=owner, slug=slug).exists():
        raise ValidationError({"slug": f"You already have a LAN with the short name “{slug}”; choose another or "
                                       "leave it blank."})
    if not slug:  # derived: a clash gets a suffix rather than an error the host did not cause
        taken = set(Lan.objects.filter(owner=owner).values_list("slug", flat=True))
        slug = layout.unique_slug(layout.slug_for(name, fallback="lan"), taken)
    lan = Lan(owner=owner, name=name, slug=slug, supernet=supernet, pool_prefix=pool_prefix,
              topology_mode=topology_mode, discovery_ports=discovery_ports,
              discovery_games=games.default_games() if discovery_games is None else list(discovery_games))
    lan.full_clean()
    now = timezone.now()
    ca = pki.create_ca(name=f"lanhub-{lan.slug}-ca", now=now)
    lan.ca_cert, lan.ca_key_sealed = ca.cert_pem, seal(ca.key_pem)
    lan.tls_crypt_sealed = seal(pki.make_tls_crypt_key())
    private, public = pki.make_ssh_keypair(comment=f"lanhub-{lan.slug}")
    lan.ssh_private_key_sealed, lan.ssh_public_key = seal(private), public
    _write_crl(lan, now=now)
    lan.save()
    return lan


@transaction.atomic
def update_discovery(lan: Lan, *, discovery_games: list[str], discovery_ports: str = "", requested_by=None) -> Lan:
    """Change the games whose LAN announcements are relayed; the nodes whose relay config or pushed routes
    change are synced (every node for a port; a multicast group also changes what players are pushed)."""
    Lan.objects.select_for_update().filter(pk=lan.pk).first()
    lan.discovery_games, lan.discovery_ports = list(discovery_games), discovery_ports.strip()
    lan.full_clean(exclude=["owner", "default_node"])
    lan.save(update_fields=["discovery_games", "discovery_ports"])
    sync_changed_nodes(lan, reason="game list changed", requested_by=requested_by)
    return lan


def lan_ca(lan: Lan) -> tuple[str, str]:
    """The CA certificate and its private key, unsealed for signing."""
    return lan.ca_cert, _unsealed_ca_key(lan.ca_key_sealed)


@functools.lru_cache(maxsize=64)
def _unsealed_ca_key(sealed: str) -> str:
    """Kept per process, keyed by the sealed text: every player issued on a LAN signs with the same CA key, and
    a new key (a new LAN) is a new entry. Process memory already holds it while signing; it never leaves it."""
    return unseal(sealed)


def _write_crl(lan: Lan, *, now) -> None:
    revoked = [(int(r.serial, 16), r.revoked_at) for r in lan.revoked_certificates.all()] if lan.pk else []
    lan.crl_number += 1
    lan.crl_pem = pki.make_crl(ca=lan_ca(lan), revoked=revoked, now=now, number=lan.crl_number, days=CRL_DAYS)
    lan.crl_next_update = pki.crl_next_update(lan.crl_pem)


def revoke_certificate(*, lan: Lan, serial: str, common_name: str, reason: str) -> list[str]:
    return revoke_certificates(lan=lan, certificates=[(serial, common_name)], reason=reason)


@transaction.atomic
def revoke_certificates(*, lan: Lan, certificates: list[tuple[str, str]], reason: str) -> list[str]:
    """Revoke certificates, given as (serial in hex, common name), on every node before returning
    (nodes/revocation.py), record them, and sync the nodes once (which also kills their live sessions). Returns
    the names of nodes that could not be reached in time."""
    if not certificates:
        return []
    for serial, common_name in certificates:
        RevokedCertificate.objects.get_or_create(lan=lan, serial=serial,
                                                 defaults={"common_name": common_name, "reason": reason[:100]})
    lan = Lan.objects.select_for_update().get(pk=lan.pk)
    _write_crl(lan, now=timezone.now())
    lan.save(update_fields=["crl_pem", "crl_number", "crl_next_update"])
    unreached = revocation.push_revoked(lan, [serial for serial, _ in certificates])
    sync_changed_nodes(lan, reason=f"certificate revoked: {', '.join(cn for _, cn in certificates)}"[:200])
    return unreached


@transaction.atomic
def renew_crl(lan: Lan, *, min_days_left: float = CRL_DAYS / 2) -> bool:
    """Re-sign the CRL when less than `min_days_left` remain: OpenVPN rejects everyone once it lapses."""
    lan = Lan.objects.select_for_update().get(pk=lan.pk)
    if lan.crl_next_update and (lan.crl_next_update - timezone.now()).total_seconds() > min_days_left * 86400:
        return False
    _write_crl(lan, now=timezone.now())
    lan.save(update_fields=["crl_pem", "crl_number", "crl_next_update"])
    try:
        with transaction.atomic():  # the new CRL stays saved even when the LAN cannot be planned right now
            sync_changed_nodes(lan, reason="CRL renewed")
    except ValidationError as exc:
        log.error("CRL of LAN %s renewed, but its nodes could not be planned: %s", lan.pk, "; ".join(exc.messages))
    return True


# --- Nodes ----------------------------------------------------------------------------------------------------

# What a host enters for a node: the dashboard's and the admin's forms both take exactly these (nodes/forms.py).
NODE_FIELDS = ("display_name", "name", "region", "priority", "public_address", "public_ipv6", "udp_port", "tcp_port",
               "ssh_host", "ssh_port", "ssh_user", "latitude", "longitude", "country", "udp_pool", "tcp_pool",
               "pinned_upstream")


def node_candidate(*, lan: Lan, instance: Node | None = None, **fields) -> Node:
    """The node as it would be saved, with the defaults every way in shares (unsaved; nothing is checked).

    - the SSH host is the public address when left blank;
    - a new node's slug (``name``) is derived from its display name when left blank, with a suffix when another
      node of the LAN has it ("hong-kong-2"); the display name defaults to the slug for callers that give only
      that;
    - an existing node keeps its slug, whatever its display name becomes.
    """
    unknown = set(fields) - set(NODE_FIELDS) - {"ssh_host_key", "healthy"}
    if unknown:
        raise TypeError(f"unknown node fields: {', '.join(sorted(unknown))}")
    node = Node(lan=lan) if instance is None else instance
    for field, value in fields.items():
        if field == "name" and node.pk:
            continue  # the slug never changes (update_node refuses a different one before getting here)
        setattr(node, field, value.strip() if isinstance(value, str) else value)
    if not node.ssh_host:
        node.ssh_host = node.public_address
    if not node.display_name:
        node.display_name = node.name
    if not node.name and node.display_name:
        taken = set(Node.objects.filter(lan=lan).exclude(pk=node.pk).values_list("name", flat=True))
        node.name = layout.unique_slug(layout.slug_for(node.display_name, fallback="node"), taken)
    return node


def check_new_slug(lan: Lan, requested: str) -> None:
    """A slug the host typed is theirs: a clash is an error on the form, not a silent suffix."""
    if requested and Node.objects.filter(lan=lan, name=requested).exists():
        raise ValidationError({"name": f"Another server of this LAN already has the short name “{requested}”; "
                                       "choose another or leave it blank."})


@transaction.atomic
def create_node(*, lan: Lan, requested_by=None, **fields) -> Node:
    """Register a server: issue its certificates, re-plan the LAN, and sync every node whose files change."""
    if set(fields) - set(NODE_FIELDS):
        raise TypeError(f"unknown node fields: {', '.join(sorted(set(fields) - set(NODE_FIELDS)))}")
    node = node_candidate(lan=lan, **fields)
    check_new_slug(lan, (fields.get("name") or "").strip())
    node.full_clean()
    _issue_node_certificates(node)
    node.save()
    replan(lan, reason=f"node {node.name} added", requested_by=requested_by)
    return node


@transaction.atomic
def update_node(node: Node, *, requested_by=None, **fields) -> Node:
    """Change a node's settings. Its slug (``name``) stays: its files, certificates and instances carry it, so a
    new display name changes only what people see."""
    if fields.get("name", node.name) != node.name:
        raise ValidationError({"name": f"The short name never changes (it is “{node.name}”); change the name "
                                       "instead, or remove the server and add it again."})
    lock_lan(node.lan_id)
    node = node_candidate(lan=node.lan, instance=node, **fields)
    node.full_clean()
    node.save()
    replan(node.lan, reason=f"node {node.name} changed", requested_by=requested_by)
    return node


@transaction.atomic
def delete_node(node: Node, *, requested_by=None) -> str:
    """Remove a node from the LAN: LanHub is taken off the server (instances stopped, files removed), its
    certificates are revoked on the other nodes (the server may not be ours any more), and the others are
    re-planned and synced without it, so new profiles and pages no longer list it.

    Returns "" when the server was cleaned up (or never set up), else why it could not be: the row goes anyway,
    because a host deletes a server that is gone as often as one that is still there."""
    lan, name, old_certificates = node.lan, node.name, node_certificates(node)
    problem = _decommission(node)
    lock_lan(lan.pk)
    node.delete()
    _revoke_all(lan, old_certificates, reason=f"node {name} removed")
    replan(lan, reason=f"node {name} removed", requested_by=requested_by)
    return problem


def _decommission(node: Node) -> str:
    if not node.applied_files or not node.ssh_host_key:
        return ""  # LanHub never set this server up
    try:
        with open_connection(node) as c:
            provisioning.decommission(c, applied=node.applied_files.keys())
    except ProvisioningError as exc:
        log.warning("node %s deleted, but its server was not cleaned up: %s", node.name, exc.message)
        return exc.message
    return ""


def node_certificates(node: Node) -> list[tuple[str, str]]:
    """(serial in hex, common name) of the node's server and link certificates."""
    return [(format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x"), cn)
            for pem, cn in zip((node.server_cert, node.link_cert), layout.node_cns(node.name)) if pem]


def _revoke_all(lan: Lan, certificates: list[tuple[str, str]], *, reason: str) -> None:
    """Put certificates in the CRL and re-sign it once; the caller re-plans, which syncs the nodes."""
    if not certificates:
        return
    for serial, common_name in certificates:
        RevokedCertificate.objects.get_or_create(lan=lan, serial=serial,
                                                 defaults={"common_name": common_name, "reason": reason})
    lan = Lan.objects.select_for_update().get(pk=lan.pk)
    _write_crl(lan, now=timezone.now())
    lan.save(update_fields=["crl_pem", "crl_number", "crl_next_update"])
    revocation.push_revoked(lan, [serial for serial, _ in certificates])


# What has a lifetime, and why (docs/security.md, "Lifetimes"):
# - nothing LanHub issues now carries a date: the LAN's CA, players' certificates and node certificates (server
#   and link) all get ``days=None`` (lanhub/pki.py: NO_EXPIRY), so a LAN keeps working however long the portal is
#   down. A player ends by revocation, a node by deletion, which revokes its certificates;
# - revocation: a directory of serials on each node (nodes/layout.py: PKI_CRL_DIR), no nextUpdate.
# The trade-off: a player's client cannot consult the LAN's revocations, so a node key taken from a retired or
# broken-into server can pose as a node to players until it is revoked *and* the players' clients refuse it
# (docs/security.md says what a host does then). The nodes refuse a revoked node certificate at once.
# Node certificates issued before this carry a two-year date: renew_node_certificates re-issues them, without a
# date, once less than NODE_CERT_RENEW_DAYS is left. Nothing else on a node expires (tests/e2e/test_portal_down.py).
NODE_CERT_DAYS: int | None = None
NODE_CERT_RENEW_DAYS = 365


def _issue_node_certificates(node: Node, *, now=None) -> None:
    now = now or timezone.now()
    ca = lan_ca(node.lan)
    server = pki.issue_server(ca=ca, common_name=layout.node_cn(node.name), now=now, days=NODE_CERT_DAYS)
    link = pki.issue_client(ca=ca, common_name=layout.link_cn(node.name), now=now, days=NODE_CERT_DAYS)
    node.server_cert, node.server_key_sealed = server.cert_pem, seal(server.key_pem)
    node.link_cert, node.link_key_sealed = link.cert_pem, seal(link.key_pem)


def node_certificate_expiry(node: Node):
    """When the first of the node's two certificates expires, or None if neither carries a date."""
    dates = [x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
             for pem in (node.server_cert, node.link_cert) if pem]
    dates = [date for date in dates if date < pki.NO_EXPIRY]
    return min(dates) if dates else None


@transaction.atomic
def renew_node_certificates(lan: Lan, *, now=None) -> list[Node]:
    """Re-issue, without a date, the certificates of every node of `lan` that still carry one (issued before node
    certificates stopped expiring) with less than NODE_CERT_RENEW_DAYS left, and sync them.

    The old certificates are not revoked: they expire by themselves, and until the sync lands the node still
    presents them."""
    now = now or timezone.now()
    renewed = []
    for node in Node.objects.select_for_update().filter(lan=lan).select_related("lan"):
        expiry = node_certificate_expiry(node) if node.server_cert else None
        if expiry is None or (expiry - now).days >= NODE_CERT_RENEW_DAYS:
            continue
        _issue_node_certificates(node)
        node.save(update_fields=["server_cert", "server_key_sealed", "link_cert", "link_key_sealed"])
        request_sync(node, reason="node certificates renewed before they expire")
        renewed.append(node)
    return renewed


def player_routes(lan: Lan) -> list[str]:
    """What every server pushes to the LAN's players (routing.player_routes), read from the stored plan. Empty
    before the LAN's first plan.

    The dashboard asks on every load: the answer is kept per stored plan and version (a plan changes only with a
    new version), so a load reads two numbers, not the plan's JSON with every node's pools and routes. The LAN's
    nodes_version (a random value that changes with every node added, removed or moved) is part of the key, so a
    plan row a rolled-back transaction numbered alike never matches."""
    stored = StoredPlan.objects.filter(lan=lan).values_list("pk", "version").first()
    if stored is None:
        return []
    return list(_stored_player_routes(*stored, lan.nodes_version, str(lan.supernet)))


@functools.lru_cache(maxsize=512)
def _stored_player_routes(plan_pk: int, version: int, nodes_version: int, supernet: str) -> tuple[str, ...]:
    data = StoredPlan.objects.filter(pk=plan_pk).values_list("data", flat=True).first() or {}
    return tuple(_player_routes(data, supernet))


def _player_routes(data: dict, supernet) -> list[str]:
    net = ipaddress.IPv4Network
    blocks = {region: [net(b) for b in nets] for region, nets in data.get("blocks", {}).items()}
    pools = [net(pool) for pair in data.get("pools", {}).values() for pool in pair]
    return ([str(prefix) for prefix in routing.player_routes(blocks, pools, net(supernet))] if pools
            else [])


def lan_capacity(lan: Lan) -> int:
    """How many nodes the LAN's supernet holds with its pool size (each node takes a UDP and a TCP pool)."""
    return topology.capacity(topology.LanSpec(supernet=lan.supernet, pool_prefix=lan.pool_prefix))

