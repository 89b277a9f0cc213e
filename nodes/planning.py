"""Planning a LAN from its rows: the planner's input (specs, RTTs), storing the plan and what must stay stable
(pools, link addresses), and asking exactly the nodes whose files change to sync.

A plan is computed once per change (``replan``: a node added, changed, removed or failed over, link RTTs moved
past RTT_REPLAN_*, LAN settings) and stored as a StoredPlan row; syncs, drift checks and revocations read it
(``current_plan``) and the status poll reads only the node's Link rows (``node_links``). Nothing else plans.

Below services (which call it for every change) and beside runs (which it asks for syncs); it never imports
services, tasks or syncing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction

import ipaddress
import logging

from nodes import games, layout, runs, topology
from nodes.files import desired_files
from nodes.models import Lan, Link, Node, RevokedCertificate, StoredPlan, SyncState
from nodes.provisioning import NodeLink

log = logging.getLogger(__name__)

# A measured link RTT re-plans the LAN when it moved this far from the RTT the stored plan used (both bounds):
# small jitter never re-plans, a route that became slow does.
RTT_REPLAN_RATIO = 0.5
RTT_REPLAN_MS = 20.0


@dataclass(frozen=True)
class LanPlan:
    """The plan of a LAN together with the rows it was made from, for rendering."""

    plan: topology.Plan
    spec: topology.LanSpec
    specs: dict[str, topology.NodeSpec]
    nodes: dict[str, Node]
    discovery: games.DiscoverySpec = games.DiscoverySpec()  # the LAN's game list, for the relays and pushes


def lan_spec(lan: Lan) -> topology.LanSpec:
    return topology.LanSpec(supernet=lan.supernet, pool_prefix=lan.pool_prefix, mode=lan.topology_mode)


def node_specs(lan: Lan, nodes: list[Node]) -> list[topology.NodeSpec]:
    by_pk = {n.pk: n for n in nodes if n.pk is not None}  # a candidate being checked has no pk yet
    return [
        topology.NodeSpec(
            name=n.name, region=n.region, priority=n.priority, order=index, healthy=n.healthy,
            public_address=n.public_address, public_ipv6=n.public_ipv6, udp_port=n.udp_port, tcp_port=n.tcp_port,
            udp_pool=n.udp_pool or None, tcp_pool=n.tcp_pool or None,
            pinned_upstream=by_pk[n.pinned_upstream_id].name if n.pinned_upstream_id in by_pk else None,
        )
        for index, n in enumerate(nodes)
    ]


def plan_lan(lan: Lan) -> LanPlan:
    """Compute the LAN's plan from its rows (replan stores it). Raises ValidationError with the planner's message
    on impossible input."""
    nodes = list(lan.nodes.order_by("created_at", "pk"))
    links = list(lan.links.select_related("upstream", "downstream"))
    spec = lan_spec(lan)
    specs = node_specs(lan, nodes)
    # Measured link RTTs win; pairs without a link are estimated from the nodes' coordinates (on demand, inside
    # the planner), so it can choose central primaries and shortcuts when every node has a location.
    rtts = {frozenset((l.upstream.name, l.downstream.name)): l.rtt_ms for l in links if l.rtt_ms}
    locations = {n.name: (n.latitude, n.longitude) for n in nodes
                 if n.latitude is not None and n.longitude is not None}
    addresses = {(l.upstream.name, l.downstream.name): l.address for l in links}
    # Regions keep the address blocks and, unless another node is clearly more central, the primaries the previous
    # plan gave them (topology/addresses.py, topology/links.py).
    stored = StoredPlan.objects.filter(lan=lan).values_list("data", flat=True).first() or {}
    try:
        plan = topology.plan_lan(spec, specs, rtts=rtts, link_addresses=addresses, locations=locations,
                                 blocks=stored.get("blocks"), primaries=stored.get("primaries"))
    except topology.PlanError as exc:
        raise ValidationError(str(exc)) from None
    return LanPlan(plan=plan, spec=spec, specs={s.name: s for s in specs}, nodes={n.name: n for n in nodes},
                   discovery=lan.discovery)


def current_plan(lan: Lan) -> LanPlan:
    """The LAN's stored plan with the rows it refers to: what syncs apply. A LAN never planned (or whose stored
    plan no longer names its nodes) is planned and stored once here."""
    nodes = list(lan.nodes.order_by("created_at", "pk"))
    stored = StoredPlan.objects.filter(lan=lan).first()
    if stored is None or set(stored.data.get("pools", {})) != {n.name for n in nodes}:
        lan_plan = plan_lan(lan)
        _store_plan(lan, lan_plan, reason="first read")
        return lan_plan
    specs = node_specs(lan, nodes)
    return LanPlan(plan=topology.Plan.from_data(stored.data), spec=lan_spec(lan), specs={s.name: s for s in specs},
                   nodes={n.name: n for n in nodes}, discovery=lan.discovery)


def _store_plan(lan: Lan, lan_plan: LanPlan, *, reason: str) -> StoredPlan:
    data = lan_plan.plan.to_data()
    data["rtts"] = {f"{l.upstream.name}|{l.downstream.name}": l.rtt_ms
                    for l in lan.links.select_related("upstream", "downstream") if l.rtt_ms}
    stored, created = StoredPlan.objects.get_or_create(lan=lan, defaults={"data": data, "version": 1,
                                                                          "reason": reason[:200]})
    if not created:
        stored.data, stored.version, stored.reason = data, stored.version + 1, reason[:200]
        stored.save(update_fields=["data", "version", "reason"])
    return stored


def node_links(node: Node) -> list[NodeLink]:
    """The links ``node`` runs a client for, from its Link rows (the stored plan's links): what the status poll
    pings. No planning."""
    links = []
    for link in node.upstream_links.select_related("upstream").order_by("upstream__name"):
        up = link.upstream
        if not up.udp_pool:
            continue
        peer = str(ipaddress.IPv4Network(up.udp_pool).network_address + 1)  # "server <net> ..." takes .1
        links.append(NodeLink(up.name, layout.link_instance(up.name), layout.link_device(up.name), peer))
    return links


def rtts_moved(lan: Lan) -> bool:
    """Whether a link's measured RTT moved past the thresholds from the one the stored plan used."""
    stored = StoredPlan.objects.filter(lan=lan).only("data").first()
    if stored is None:
        return False
    used = stored.data.get("rtts", {})
    for up, down, rtt in lan.links.values_list("upstream__name", "downstream__name", "rtt_ms"):
        old = used.get(f"{up}|{down}")
        if rtt is None or old is None:
            continue
        if abs(rtt - old) > max(RTT_REPLAN_MS, RTT_REPLAN_RATIO * old):
            return True
    return False


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


def check_node(node: Node) -> None:
    """Raise ValidationError when the LAN could not take `node` as given (added or changed).

    Forms call this so that an impossible node (a bad name, overlapping pools, a cyclic pin, a full supernet) is
    an error on the form, before anything is saved. It validates and allocates pools only: the links and routes
    are planned once, by the save (replan)."""
    lan = node.lan
    nodes = [n for n in lan.nodes.order_by("created_at", "pk")]
    nodes = [node if n.pk == node.pk else n for n in nodes] if node.pk else [*nodes, node]
    try:
        topology.check_lan(lan_spec(lan), node_specs(lan, nodes))
    except topology.PlanError as exc:
        raise ValidationError(str(exc)) from None


def check_lan(lan: Lan) -> None:
    """Raise ValidationError when the LAN's nodes would not fit its settings (supernet, pool size, mode), as
    the admin form is about to save them."""
    nodes = list(Lan.objects.get(pk=lan.pk).nodes.order_by("created_at", "pk")) if lan.pk else []
    try:
        topology.check_lan(lan_spec(lan), node_specs(lan, nodes))
    except topology.PlanError as exc:
        raise ValidationError(str(exc)) from None


def lock_lan(lan_id: int) -> None:
    """Take the LAN row's lock, inside the caller's transaction, before touching any of its nodes' rows.

    One order for every writer, LAN first and then nodes: a re-plan holds the LAN while it updates nodes' rows,
    and a change of a node column players are given updates the LAN row too (its nodes_version, by trigger), so a
    writer that took a node's row first could wait for the LAN while the re-plan waits for that node (on
    PostgreSQL a deadlock, one of them aborted)."""
    Lan.objects.select_for_update().filter(pk=lan_id).values_list("pk", flat=True).first()


@transaction.atomic
def replan(lan: Lan, *, reason: str, requested_by=None) -> list[Node]:
    """Plan the LAN, store what must stay stable (pools, links), and sync the nodes whose files change."""
    lock_lan(lan.pk)  # one re-plan of a LAN at a time
    lan_plan = plan_lan(lan)
    _store_pools(lan_plan)
    _store_links(lan, lan_plan)
    _store_plan(lan, lan_plan, reason=reason)
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
    lan_plan = lan_plan or current_plan(lan)
    lan.refresh_from_db()
    changed = []
    for node in lan_plan.nodes.values():
        files = desired_files(lan, node, lan_plan)
        # A running sync may be applying an older plan than this one, even when this one equals what the node
        # last applied (a change and its undo): it must go again.
        running = node.sync_state == SyncState.RUNNING
        if running or {path: f.sha256 for path, f in files.items()} != node.applied_files:
            runs.request_sync(node, reason=reason, requested_by=requested_by)
            changed.append(node)
    return changed


def revoked_names(lan: Lan) -> set[str]:
    """Common names whose live sessions must be cut: revoked ones, except the names of nodes that exist now
    (a node re-added under an old name reuses the name with a new certificate)."""
    names = set(RevokedCertificate.objects.filter(lan=lan).values_list("common_name", flat=True))
    live = {cn for name in lan.nodes.values_list("name", flat=True) for cn in layout.node_cns(name)}
    return names - live
