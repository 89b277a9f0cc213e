"""Pure planning of a LAN: address pools, links between nodes, and per-node routes.

Plain data in, plain data out: no Django, no database, no clock, no randomness. The same input always gives
the same Plan, so rendered files only change when something that matters changed.

Modes (``LanSpec.mode``):
- ``hub``: the primary (healthy, highest priority, oldest on ties) serves a link to every other node.
- ``mesh``: a link for every pair of healthy nodes; the higher-ranked node is upstream. At most 255 nodes,
  because an upstream has 254 link addresses (.2 to .255 of its UDP pool).
- ``hierarchical``: a primary per region, the region's other nodes attach to it, and the primaries of sibling
  regions link to it, recursively along the region path. A group with more than ceil(sqrt(n)) members is split
  into sub-groups around heads that link to each other. No node gets more than floor(2*sqrt(n)) tunnels, however
  deep the region tree (n = healthy nodes not pinned; a node also takes every node pinned to it, see
  ``_Hierarchy``). With a full RTT matrix (every pair of healthy unpinned nodes measured, or estimated from
  coordinates by the caller) the plan is RTT-aware: a group's primary is its most central best-priority node,
  big groups are split by RTT clustering, and shortcut links are added between primaries and heads where the
  planned path is much longer than the direct RTT (two region primaries, or two nodes of one region: a region
  is entered only through its primary, so routes to it aggregate to its address blocks). With partial or no
  RTTs it follows rank.
- ``auto``: ``mesh`` for up to 5 healthy nodes (every tunnel direct, at most 4 per node, which is within
  2*sqrt(n)), else ``hierarchical`` (which follows the regions and splits big ones). Two nodes give one link
  with the older node upstream, as a hub would. A pin cycle is an error in ``hierarchical`` mode; ``auto``
  joins it to the primary as ``hub`` does, so a LAN that planned at 5 nodes still plans at 6.

Rank is (-priority, order, name): it picks primaries (among equal priorities, centrality decides when RTTs are
known) and, in mesh and among sibling primaries, the upstream side of a link. A pinned upstream replaces a
node's default attachment in every mode (in mesh it only fixes the link's direction). If pins cut a group of
nodes off, their best-ranked node is linked to the LAN primary.

The data types live in model.py, validation and pool allocation in pools.py, the link builders in links.py and
routes in nodes/routing.py; this package re-exports the public names and holds ``plan_lan``, which runs them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from nodes.routing import RoutePlan, plan_routes
from nodes.topology.links import (
    AUTO_MESH_MAX as AUTO_MESH_MAX,
    RTT_UNKNOWN as RTT_UNKNOWN,
    _assign_addresses,
    _LinkBuilder,
    _resolve_mode,
    _rtt_lookup,
)
from nodes.topology.model import (
    LINK_SLOTS,
    MAX_POOL_PREFIX,
    LanSpec,
    LinkPlan,
    NodePools,
    NodeSpec,
    Plan,
    PlanError,
    dynamic_pool,
    link_range,
    rank_key,
)
from nodes.topology.pools import (
    MODES as MODES,
    NAME_RE as NAME_RE,
    REGION_PART_RE as REGION_PART_RE,
    _allocate_pools,
    capacity,
    _reject_pin_cycles,
    _validate,
)

__all__ = [
    "LanSpec", "NodeSpec", "NodePools", "LinkPlan", "RoutePlan", "Plan", "PlanError", "plan_lan",
    "rank_key", "link_range", "dynamic_pool", "LINK_SLOTS", "MAX_POOL_PREFIX", "check_lan", "capacity",
]


def check_lan(lan: LanSpec, nodes: Sequence[NodeSpec]) -> dict[str, NodePools]:
    """Validate the input and allocate pools, without planning links and routes: what a form needs to know
    that a node fits. Raises PlanError like plan_lan."""
    supernet = _validate(lan, nodes)
    pools, _ = _allocate_pools(lan, supernet, sorted(nodes, key=lambda n: (n.order, n.name)))
    if lan.mode == "hierarchical":
        _reject_pin_cycles(nodes)
    healthy = [n for n in nodes if n.healthy]
    mode = _resolve_mode(lan.mode, healthy)
    if mode in ("hub", "mesh") and len(healthy) > LINK_SLOTS - 1:
        # The upstream of every link in these modes serves one link per other node from its 254 link addresses.
        raise PlanError(f"{mode} mode links at most {LINK_SLOTS - 1} nodes; this LAN would have {len(healthy)}: "
                        "choose hierarchical or auto")
    return pools


def plan_lan(
    lan: LanSpec,
    nodes: Sequence[NodeSpec],
    rtts: Mapping[frozenset[str] | tuple[str, str], float] | None = None,
    link_addresses: Mapping[tuple[str, str], str] | None = None,
    locations: Mapping[str, tuple[float, float]] | None = None,
    blocks: Mapping[str, Sequence[str]] | None = None,
    primaries: Mapping[str, str] | None = None,
) -> Plan:
    """Plan pools, links and routes for one LAN. Raises PlanError for input no plan can satisfy.

    ``rtts`` are measured round trips; a pair without one is estimated from ``locations`` (latitude, longitude)
    when both nodes have one. ``blocks`` are the previous plan's region blocks (``Plan.blocks``), ``primaries`` its
    region primaries (``Plan.primaries``: a region keeps its primary unless another is clearly more central)."""
    supernet = _validate(lan, nodes)
    by_name = {node.name: node for node in nodes}
    pools, region_blocks = _allocate_pools(lan, supernet, sorted(nodes, key=lambda n: (n.order, n.name)), blocks)
    healthy = sorted((n for n in nodes if n.healthy), key=rank_key)
    rtt = _rtt_lookup(rtts, locations)
    mode = _resolve_mode(lan.mode, healthy)
    if lan.mode == "hierarchical":
        _reject_pin_cycles(nodes)  # auto mode joins a pin cycle to the primary instead, as at <= 5 nodes
    builder = _LinkBuilder(healthy, by_name, rtt, previous={frozenset(pair) for pair in (link_addresses or {})},
                           previous_primaries=primaries)
    primaries = builder.build(mode)
    links = _assign_addresses(builder.oriented(), pools, link_addresses or {})
    weights = {pair: rtt(*pair) for pair in builder.pairs}
    routes = plan_routes(
        [n.name for n in healthy], links, pools, weights, primaries.get(""), supernet, region_blocks, primaries,
    )
    for node in nodes:
        routes.setdefault(node.name, ())
    return Plan(mode, pools, links, primaries, routes, frozenset(n.name for n in healthy), region_blocks)
