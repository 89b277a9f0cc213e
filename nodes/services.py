"""Use cases for LANs and nodes: create them, plan them, and ask the nodes that must change to sync.

Views, the admin, management commands and tasks call these functions and nothing below them. Each function that
writes more than one row is atomic, and Celery tasks are enqueued only after the transaction commits.
"""

from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.text import slugify

from cryptography import x509

from lanhub import pki
from lanhub.secrets import seal, unseal
from nodes import games, topology
from nodes.files import desired_files
from nodes.models import Lan, Link, Node, RevokedCertificate, SyncRun, SyncStatus

log = logging.getLogger(__name__)

CRL_DAYS = 30


@dataclass(frozen=True)
class LanPlan:
    """The plan of a LAN together with the rows it was made from, for rendering."""

    plan: topology.Plan
    spec: topology.LanSpec
    specs: dict[str, topology.NodeSpec]
    nodes: dict[str, Node]
    discovery: games.DiscoverySpec = games.DiscoverySpec()


# --- LANs -----------------------------------------------------------------------------------------------------


@transaction.atomic
def create_lan(*, owner, name: str, slug: str = "", supernet: str = "10.0.0.0/8", pool_prefix: int = 16,
               topology_mode: str = "auto", discovery_games: list[str] | None = None,
               discovery_ports: str = "") -> Lan:
    """Create a LAN with its own certificate authority, tls-crypt key, empty CRL and SSH deploy key."""
    lan = Lan(owner=owner, name=name, slug=slug or slugify(name)[:32], supernet=supernet, pool_prefix=pool_prefix,
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
    """The CA certificate and its private key, unsealed for one signing operation."""
    return lan.ca_cert, unseal(lan.ca_key_sealed)


def _write_crl(lan: Lan, *, now) -> None:
    revoked = [(int(r.serial, 16), r.revoked_at) for r in lan.revoked_certificates.all()] if lan.pk else []
    lan.crl_number += 1
    lan.crl_pem = pki.make_crl(ca=lan_ca(lan), revoked=revoked, now=now, number=lan.crl_number, days=CRL_DAYS)
    lan.crl_next_update = pki.crl_next_update(lan.crl_pem)


@transaction.atomic
def revoke_certificate(*, lan: Lan, serial: str, common_name: str, reason: str) -> None:
    """Add a certificate to the LAN's CRL and ask every node to pick up the new CRL."""
    RevokedCertificate.objects.get_or_create(lan=lan, serial=serial,
                                             defaults={"common_name": common_name, "reason": reason})
    lan = Lan.objects.select_for_update().get(pk=lan.pk)
    _write_crl(lan, now=timezone.now())
    lan.save(update_fields=["crl_pem", "crl_number", "crl_next_update"])
    sync_changed_nodes(lan, reason=f"certificate revoked: {common_name}")


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

NODE_FIELDS = ("name", "region", "priority", "public_address", "udp_port", "tcp_port", "ssh_host", "ssh_port",
               "ssh_user", "latitude", "longitude", "country", "udp_pool", "tcp_pool", "pinned_upstream")


@transaction.atomic
def create_node(*, lan: Lan, requested_by=None, **fields) -> Node:
    """Register a server: issue its certificates, re-plan the LAN, and sync every node whose files change."""
    unknown = set(fields) - set(NODE_FIELDS)
    if unknown:
        raise TypeError(f"unknown node fields: {', '.join(sorted(unknown))}")
    node = Node(lan=lan, **fields)
    if not node.ssh_host:
        node.ssh_host = node.public_address
    node.full_clean()
    _issue_node_certificates(node)
    node.save()
    replan(lan, reason=f"node {node.name} added", requested_by=requested_by)
    return node


@transaction.atomic
def update_node(node: Node, *, requested_by=None, **fields) -> Node:
    """Change a node's settings; a rename re-issues its certificates (their names carry the node's name) and
    revokes the old ones."""
    renamed = "name" in fields and fields["name"] != node.name
    old_certificates = node_certificates(node) if renamed else []
    for field, value in fields.items():
        if field not in NODE_FIELDS and field not in ("ssh_host_key", "healthy"):
            raise TypeError(f"unknown node field: {field}")
        setattr(node, field, value)
    node.full_clean()
    if renamed:
        _issue_node_certificates(node)
    node.save()
    _revoke_all(node.lan, old_certificates, reason=f"node renamed to {node.name}")
    replan(node.lan, reason=f"node {node.name} changed", requested_by=requested_by)
    return node


@transaction.atomic
def delete_node(node: Node, *, requested_by=None) -> None:
    """Remove a node from the LAN; its certificates are revoked (the server may not be ours any more) and the
    others are re-planned and synced without it."""
    lan, name, old_certificates = node.lan, node.name, node_certificates(node)
    node.delete()
    _revoke_all(lan, old_certificates, reason=f"node {name} removed")
    replan(lan, reason=f"node {name} removed", requested_by=requested_by)


def node_certificates(node: Node) -> list[tuple[str, str]]:
    """(serial in hex, common name) of the node's server and link certificates."""
    return [(format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x"), cn)
            for pem, cn in ((node.server_cert, f"node-{node.name}"), (node.link_cert, f"link-{node.name}")) if pem]


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


def revoked_names(lan: Lan) -> set[str]:
    """Common names whose live sessions must be cut: revoked ones, except the names of nodes that exist now
    (a node re-added under an old name reuses the name with a new certificate)."""
    names = set(RevokedCertificate.objects.filter(lan=lan).values_list("common_name", flat=True))
    live = {f"{prefix}-{name}" for name in lan.nodes.values_list("name", flat=True) for prefix in ("node", "link")}
    return names - live


def _issue_node_certificates(node: Node) -> None:
    now = timezone.now()
    ca = lan_ca(node.lan)
    server = pki.issue_server(ca=ca, common_name=f"node-{node.name}", now=now)
    link = pki.issue_client(ca=ca, common_name=f"link-{node.name}", now=now)
    node.server_cert, node.server_key_sealed = server.cert_pem, seal(server.key_pem)
    node.link_cert, node.link_key_sealed = link.cert_pem, seal(link.key_pem)


@transaction.atomic
def accept_host_key(node: Node, *, key_line: str) -> Node:
    """Pin the SSH host key seen on first contact (or one an operator accepted after a change)."""
    Node.objects.filter(pk=node.pk, ssh_host_key="").update(ssh_host_key=key_line.strip())
    node.refresh_from_db(fields=["ssh_host_key"])
    return node


# --- Planning -------------------------------------------------------------------------------------------------


def node_specs(lan: Lan, nodes: list[Node]) -> list[topology.NodeSpec]:
    by_pk = {n.pk: n for n in nodes if n.pk is not None}  # a candidate being checked has no pk yet
    return [
        topology.NodeSpec(
            name=n.name, region=n.region, priority=n.priority, order=index, healthy=n.healthy,
            public_address=n.public_address, udp_port=n.udp_port, tcp_port=n.tcp_port,
            udp_pool=n.udp_pool or None, tcp_pool=n.tcp_pool or None,
            pinned_upstream=by_pk[n.pinned_upstream_id].name if n.pinned_upstream_id in by_pk else None,
        )
        for index, n in enumerate(nodes)
    ]


def plan_lan(lan: Lan) -> LanPlan:
    """Plan the LAN from its rows. Raises ValidationError with the planner's message on impossible input."""
    nodes = list(lan.nodes.order_by("created_at", "pk"))
    links = list(lan.links.select_related("upstream", "downstream"))
    spec = topology.LanSpec(supernet=lan.supernet, pool_prefix=lan.pool_prefix, mode=lan.topology_mode)
    specs = node_specs(lan, nodes)
    # Measured link RTTs win; pairs without a link are estimated from the nodes' coordinates, so the planner
    # can choose central primaries and shortcuts when every node has a location.
    rtts = estimated_rtts(nodes)
    rtts.update({frozenset((l.upstream.name, l.downstream.name)): l.rtt_ms for l in links if l.rtt_ms})
    addresses = {(l.upstream.name, l.downstream.name): l.address for l in links}
    try:
        plan = topology.plan_lan(spec, specs, rtts=rtts, link_addresses=addresses)
    except topology.PlanError as exc:
        raise ValidationError(str(exc)) from None
    return LanPlan(plan=plan, spec=spec, specs={s.name: s for s in specs}, nodes={n.name: n for n in nodes},
                   discovery=lan.discovery)


def estimated_rtts(nodes: list[Node]) -> dict[frozenset[str], float]:
    """RTT guesses from great-circle distance: light in fibre covers ~100 km per ms of round trip, plus 1 ms."""
    located = [n for n in nodes if n.latitude is not None and n.longitude is not None]
    rtts = {}
    for i, a in enumerate(located):
        for b in located[i + 1:]:
            rtts[frozenset((a.name, b.name))] = 1.0 + _distance_km(a, b) / 100.0
    return rtts


def _distance_km(a: Node, b: Node) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


@transaction.atomic
def replan(lan: Lan, *, reason: str, requested_by=None) -> list[Node]:
    """Plan the LAN, store what must stay stable (pools, links), and sync the nodes whose files change."""
    Lan.objects.select_for_update().filter(pk=lan.pk).first()  # one re-plan of a LAN at a time
    lan_plan = plan_lan(lan)
    _store_pools(lan_plan)
    _store_links(lan, lan_plan)
    return sync_changed_nodes(lan, reason=reason, requested_by=requested_by, lan_plan=lan_plan)


def _store_pools(lan_plan: LanPlan) -> None:
    for name, pools in lan_plan.plan.pools.items():
        node = lan_plan.nodes[name]
        udp, tcp = str(pools.udp), str(pools.tcp)
        if (node.udp_pool, node.tcp_pool) != (udp, tcp):
            node.udp_pool, node.tcp_pool = udp, tcp
            node.save(update_fields=["udp_pool", "tcp_pool"])


def _store_links(lan: Lan, lan_plan: LanPlan) -> None:
    existing = {(l.upstream.name, l.downstream.name): l for l in lan.links.select_related("upstream", "downstream")}
    wanted = {(l.upstream, l.downstream): l for l in lan_plan.plan.links}
    for key, link in existing.items():
        if key not in wanted:
            link.delete()
    for key, planned in wanted.items():
        link = existing.get(key)
        if link is None:
            Link.objects.create(lan=lan, upstream=lan_plan.nodes[planned.upstream],
                                downstream=lan_plan.nodes[planned.downstream], address=str(planned.address))
        elif link.address != str(planned.address):
            link.address = str(planned.address)
            link.save(update_fields=["address"])


def sync_changed_nodes(lan: Lan, *, reason: str, requested_by=None, lan_plan: LanPlan | None = None) -> list[Node]:
    """Request a sync of exactly the nodes whose desired files differ from what they last applied."""
    lan_plan = lan_plan or plan_lan(lan)
    lan.refresh_from_db()
    changed = []
    for node in lan_plan.nodes.values():
        files = desired_files(lan, node, lan_plan)
        # A running sync may be applying an older plan than this one, even when this one equals what the node
        # last applied (a change and its undo): it must go again.
        running = node.sync_state == "running"
        if running or {path: f.sha256 for path, f in files.items()} != node.applied_files:
            request_sync(node, reason=reason, requested_by=requested_by)
            changed.append(node)
    return changed


# --- Sync requests --------------------------------------------------------------------------------------------


@transaction.atomic
def request_sync(node: Node, *, reason: str, requested_by=None, kind: str = "sync") -> SyncRun:
    """Queue a sync of one node; the task is sent only after the surrounding transaction commits.

    A sync reads the plan when it runs, so one queued run carries any number of changes: a request that finds
    one waiting joins it (ten revocations in a row mean one more sync per node, not ten)."""
    # A sync already running compares this generation when it ends and goes again if it moved.
    Node.objects.filter(pk=node.pk).update(sync_generation=F("sync_generation") + 1)
    waiting = SyncRun.objects.select_for_update().filter(node=node, kind=kind, status=SyncStatus.QUEUED).first()
    if waiting is not None:
        waiting.reason = f"{waiting.reason}; {reason}"[:200]
        waiting.save(update_fields=["reason"])
        return waiting
    run = SyncRun.objects.create(node=node, kind=kind, reason=reason[:200], status=SyncStatus.QUEUED)
    transaction.on_commit(lambda: enqueue_sync(node.pk, run.pk))
    return run


def enqueue_sync(node_id: int, run_id: int) -> bool:
    """Send the sync task (after commit, like delay_on_commit). A broker that is down must not turn a saved
    change into an error page: the run stays queued and the periodic sweep (requeue_stale_runs) sends it later."""
    from kombu.exceptions import OperationalError

    from nodes import tasks

    try:
        tasks.sync_node.delay(node_id, run_id)
    except OperationalError as exc:
        log.warning("could not queue sync run %s of node %s, the sweep will retry: %s", run_id, node_id, exc)
        return False
    return True


def requeue_stale_runs(*, older_than_s: int = 120) -> int:
    """Re-send queued runs of idle nodes that nobody picked up (the broker was down, a worker was lost)."""
    now = timezone.now()
    cutoff = now - datetime.timedelta(seconds=older_than_s)
    # A node still claimed long past the task time limit lost its worker; the claim will be taken over.
    lost = now - datetime.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 60)
    stale = SyncRun.objects.filter(
        Q(node__sync_state="idle") | Q(node__sync_claimed_at__lt=lost),
        status=SyncStatus.QUEUED, kind="sync", created_at__lt=cutoff,
    ).order_by("node_id", "created_at")
    _reap_lost_claims(now)
    latest = {}
    for run in stale:
        latest.setdefault(run.node_id, run)  # one run per node carries every change
    return sum(enqueue_sync(node_id, run.pk) for node_id, run in latest.items())


def _reap_lost_claims(now) -> None:
    """Free nodes whose sync worker died (no periodic check would ever claim a node that is not ready)."""
    lost = Node.objects.filter(sync_state="running",
                               sync_claimed_at__lt=now - datetime.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 60))
    SyncRun.objects.filter(node__in=lost, status=SyncStatus.RUNNING).update(
        status=SyncStatus.ERRORED, finished_at=now, error="the worker running this sync was lost")
    lost.update(sync_state="idle")


def prune_runs(*, keep_days: int = 14) -> int:
    """Delete finished runs older than `keep_days`; drift checks add one per node every few minutes."""
    cutoff = timezone.now() - datetime.timedelta(days=keep_days)
    deleted, _ = SyncRun.objects.filter(created_at__lt=cutoff).exclude(
        status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).delete()
    return deleted


def check_node(node: Node) -> None:
    """Raise ValidationError when the LAN could not be planned with `node` as given (added or changed).

    Forms call this so that an impossible node (overlapping pools, a cyclic pin, a full supernet) is an error on
    the form, before anything is saved."""
    lan = node.lan
    nodes = [n for n in lan.nodes.order_by("created_at", "pk")]
    nodes = [node if n.pk == node.pk else n for n in nodes] if node.pk else [*nodes, node]
    spec = topology.LanSpec(supernet=lan.supernet, pool_prefix=lan.pool_prefix, mode=lan.topology_mode)
    try:
        topology.plan_lan(spec, node_specs(lan, nodes))
    except topology.PlanError as exc:
        raise ValidationError(str(exc)) from None
