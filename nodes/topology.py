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
  planned path is much longer than the direct RTT. With partial or no RTTs it follows rank.
- ``auto``: ``mesh`` for up to 5 healthy nodes (every tunnel direct, at most 4 per node, which is within
  2*sqrt(n)), else ``hierarchical`` (which follows the regions and splits big ones). Two nodes give one link
  with the older node upstream, as a hub would. A pin cycle is an error in ``hierarchical`` mode; ``auto``
  joins it to the primary as ``hub`` does, so a LAN that planned at 5 nodes still plans at 6.

Rank is (-priority, order, name): it picks primaries (among equal priorities, centrality decides when RTTs are
known) and, in mesh and among sibling primaries, the upstream side of a link. A pinned upstream replaces a
node's default attachment in every mode (in mesh it only fixes the link's direction). If pins cut a group of
nodes off, their best-ranked node is linked to the LAN primary.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Mapping, Sequence

from nodes.routing import RoutePlan, plan_routes

__all__ = [
    "LanSpec", "NodeSpec", "NodePools", "LinkPlan", "RoutePlan", "Plan", "PlanError", "plan_lan",
    "rank_key", "link_range", "dynamic_pool", "LINK_SLOTS", "MAX_POOL_PREFIX",
]

MODES = ("auto", "hub", "mesh", "hierarchical")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
REGION_PART_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# The first 256 addresses of a UDP pool hold .0 (network), .1 (the server) and .2-.255 for link clients.
LINK_SLOTS = 256
MAX_POOL_PREFIX = 22  # a /22 still leaves three /24s for players after the link block
AUTO_MESH_MAX = 5
RTT_UNKNOWN = 1.0  # one "hop" when nothing was measured


@dataclass(frozen=True)
class LanSpec:
    supernet: str = "10.0.0.0/8"
    pool_prefix: int = 16  # prefix length of each pool
    mode: str = "auto"  # "auto" | "hub" | "mesh" | "hierarchical"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    region: str = ""
    priority: int = 0
    order: int = 0
    healthy: bool = True
    public_address: str = ""
    udp_port: int = 1194
    tcp_port: int = 443
    udp_pool: str | None = None
    tcp_pool: str | None = None
    pinned_upstream: str | None = None


class PlanError(ValueError):
    """A LAN that cannot be planned; the message is for the user and names the nodes concerned."""


@dataclass(frozen=True)
class NodePools:
    udp: ipaddress.IPv4Network
    tcp: ipaddress.IPv4Network


@dataclass(frozen=True)
class LinkPlan:
    upstream: str
    downstream: str
    address: ipaddress.IPv4Address  # the downstream's fixed address in the upstream's UDP pool


@dataclass(frozen=True)
class Plan:
    mode: str
    pools: dict[str, NodePools]
    links: tuple[LinkPlan, ...]
    primaries: dict[str, str]  # region path ("" = whole LAN) -> primary node
    routes: dict[str, tuple[RoutePlan, ...]]  # node -> aggregated routes; a supernet route is the default
    healthy: frozenset[str] = frozenset()

    @cached_property
    def _by_node(self) -> dict[str, tuple[dict[str, LinkPlan], dict[str, LinkPlan]]]:
        index: dict[str, tuple[dict, dict]] = {name: ({}, {}) for name in self.pools}
        for link in self.links:
            index[link.downstream][0][link.upstream] = link
            index[link.upstream][1][link.downstream] = link
        return index

    def upstreams(self, name: str) -> tuple[str, ...]:
        """Nodes this node runs a link client to."""
        return tuple(sorted(self._by_node[name][0]))

    def downstreams(self, name: str) -> tuple[str, ...]:
        """Nodes that run a link client to this node's UDP server."""
        return tuple(sorted(self._by_node[name][1]))

    def neighbours(self, name: str) -> tuple[str, ...]:
        return tuple(sorted({*self._by_node[name][0], *self._by_node[name][1]}))

    def link(self, upstream: str, downstream: str) -> LinkPlan:
        return self._by_node[upstream][1][downstream]

    def tunnels(self, name: str) -> int:
        return len(self._by_node[name][0]) + len(self._by_node[name][1])

    def next_hop(self, node: str, address: ipaddress.IPv4Address) -> str | None:
        """Longest-prefix match over the node's planned routes, as its kernel would do."""
        best = None
        for route in self.routes.get(node, ()):
            if address in route.prefix and (best is None or route.prefix.prefixlen > best.prefix.prefixlen):
                best = route
        return best.via if best else None

    def path(self, source: str, target: str) -> tuple[str, ...]:
        """The nodes a packet from source's pools to target's pools crosses, both ends included."""
        path = [source]
        address = self.pools[target].udp.network_address + 1
        while path[-1] != target:
            via = self.next_hop(path[-1], address)
            if via is None or via in path:
                raise PlanError(f"no loop-free route from {source} to {target}")
            path.append(via)
        return tuple(path)

    def hops(self, source: str, target: str) -> int:
        return len(self.path(source, target)) - 1


def rank_key(node: NodeSpec) -> tuple[int, int, str]:
    """Better nodes sort first: higher priority, then older, then name."""
    return (-node.priority, node.order, node.name)


def link_range(udp_pool: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """First and last address a link client may hold in an upstream's UDP pool."""
    return udp_pool.network_address + 2, udp_pool.network_address + LINK_SLOTS - 1


def dynamic_pool(udp_pool: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The ``ifconfig-pool`` range: from .1 of the block after the link block up to broadcast - 2."""
    return udp_pool.network_address + LINK_SLOTS + 1, udp_pool.broadcast_address - 2


def plan_lan(
    lan: LanSpec,
    nodes: Sequence[NodeSpec],
    rtts: Mapping[frozenset[str] | tuple[str, str], float] | None = None,
    link_addresses: Mapping[tuple[str, str], str] | None = None,
) -> Plan:
    """Plan pools, links and routes for one LAN. Raises PlanError for input no plan can satisfy."""
    supernet = _validate(lan, nodes)
    by_name = {node.name: node for node in nodes}
    pools = _allocate_pools(lan, supernet, sorted(nodes, key=lambda n: (n.order, n.name)))
    healthy = sorted((n for n in nodes if n.healthy), key=rank_key)
    rtt = _rtt_lookup(rtts)
    mode = _resolve_mode(lan.mode, healthy)
    if lan.mode == "hierarchical":
        _reject_pin_cycles(nodes)  # auto mode joins a pin cycle to the primary instead, as at <= 5 nodes
    builder = _LinkBuilder(healthy, by_name, rtt, previous={frozenset(pair) for pair in (link_addresses or {})})
    primaries = builder.build(mode)
    links = _assign_addresses(builder.oriented(), pools, link_addresses or {})
    weights = {pair: rtt(*pair) for pair in builder.pairs}
    routes = plan_routes(
        [n.name for n in healthy], links, pools, weights, primaries.get(""), supernet,
    )
    for node in nodes:
        routes.setdefault(node.name, ())
    return Plan(mode, pools, links, primaries, routes, frozenset(n.name for n in healthy))


# --- validation -------------------------------------------------------------------------------------------

def _validate(lan: LanSpec, nodes: Sequence[NodeSpec]) -> ipaddress.IPv4Network:
    if lan.mode not in MODES:
        raise PlanError(f"unknown topology mode {lan.mode!r}; choose one of {', '.join(MODES)}")
    try:
        supernet = ipaddress.IPv4Network(lan.supernet)
    except ValueError as exc:
        raise PlanError(f"supernet {lan.supernet!r} is not a valid IPv4 network: {exc}") from None
    if not isinstance(lan.pool_prefix, int) or lan.pool_prefix > MAX_POOL_PREFIX:
        raise PlanError(
            f"pool prefix /{lan.pool_prefix} is too small a pool: each UDP pool needs a /24 for link addresses "
            f"and room for players, so use /{MAX_POOL_PREFIX} or shorter"
        )
    if lan.pool_prefix < supernet.prefixlen + 1:
        raise PlanError(f"pool prefix /{lan.pool_prefix} does not fit in supernet {supernet}")
    seen: set[str] = set()
    for node in nodes:
        if not isinstance(node.name, str) or not NAME_RE.match(node.name):
            raise PlanError(f"node name {node.name!r} must be 1-32 characters of a-z, 0-9 and '-'")
        if node.name in seen:
            raise PlanError(f"two nodes are named {node.name}")
        seen.add(node.name)
        if node.region and not all(REGION_PART_RE.match(p) for p in node.region.split("/")):
            raise PlanError(f"node {node.name} has a malformed region {node.region!r} (use a path like asia/cn)")
    for node in nodes:
        if node.pinned_upstream is not None and node.pinned_upstream not in seen:
            raise PlanError(f"node {node.name} is pinned to unknown node {node.pinned_upstream}")
        if node.pinned_upstream == node.name:
            raise PlanError(f"node {node.name} is pinned to itself")
    return supernet


def _reject_pin_cycles(nodes: Sequence[NodeSpec]) -> None:
    """Hierarchical links follow pins upward, so a cycle of pins has no way up to a primary."""
    pins = {n.name: n.pinned_upstream for n in nodes if n.pinned_upstream}
    done: set[str] = set()
    for start in sorted(pins):
        trail: list[str] = []
        current: str | None = start
        while current in pins and current not in done and current not in trail:
            trail.append(current)
            current = pins[current]
        if current in trail:
            cycle = trail[trail.index(current):]
            raise PlanError(f"pinned upstreams form a cycle: {' -> '.join(cycle + [cycle[0]])}")
        done.update(trail)


# --- pools ------------------------------------------------------------------------------------------------

def _parse_pool(node: NodeSpec, kind: str, value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value)
    except ValueError:
        raise PlanError(f"node {node.name} has an invalid {kind} pool {value!r}") from None


def _fixed_pools(lan, supernet, reserved, nodes) -> list[tuple[int, int, str, str, ipaddress.IPv4Network]]:
    """The pools nodes already hold, checked to lie in the supernet, outside the reserve, apart."""
    fixed = []
    for node in nodes:
        for kind in ("udp", "tcp"):
            value = getattr(node, f"{kind}_pool")
            if value is None:
                continue
            pool = _parse_pool(node, kind, value)
            if not pool.subnet_of(supernet):
                raise PlanError(f"node {node.name}: {kind} pool {pool} is outside the supernet {supernet}")
            if pool.overlaps(reserved):
                raise PlanError(f"node {node.name}: {kind} pool {pool} overlaps the reserved block {reserved}")
            if kind == "udp" and pool.prefixlen > MAX_POOL_PREFIX:
                raise PlanError(f"node {node.name}: UDP pool {pool} is smaller than a /{MAX_POOL_PREFIX}")
            fixed.append((int(pool.network_address), int(pool.broadcast_address), node.name, kind, pool))
    fixed.sort()
    for (_, end, name_a, kind_a, pool_a), (start, _, name_b, kind_b, pool_b) in zip(fixed, fixed[1:]):
        if start <= end:
            raise PlanError(
                f"pools overlap: {name_a} {kind_a} {pool_a} and {name_b} {kind_b} {pool_b}"
            )
    return fixed


def _allocate_pools(lan, supernet, nodes_by_age) -> dict[str, NodePools]:
    """Keep every pool a node holds; give missing ones the highest free blocks below the reserve."""
    # The top 1/64 of the supernet stays free for a future bridged (TAP) segment.
    reserved = ipaddress.IPv4Network(
        (int(supernet.broadcast_address) + 1 - (supernet.num_addresses >> 6), supernet.prefixlen + 6)
    )
    fixed = _fixed_pools(lan, supernet, reserved, nodes_by_age)
    size = 1 << (32 - lan.pool_prefix)
    base = int(supernet.network_address)
    count = (int(reserved.network_address) - base) // size
    blocked: set[int] = set()
    for start, end, *_ in fixed:
        # Block index 0 is the highest block; a fixed pool may span several blocks or sit inside one.
        for block in range((start - base) // size, min(count - 1, (end - base) // size) + 1):
            blocked.add(count - 1 - block)
    free = (i for i in range(count) if i not in blocked)
    result: dict[str, NodePools] = {}
    for node in nodes_by_age:
        pair = []
        for kind in ("udp", "tcp"):
            value = getattr(node, f"{kind}_pool")
            if value is not None:
                pair.append(ipaddress.IPv4Network(value))
                continue
            index = next(free, None)
            if index is None:
                missing = [n.name for n in nodes_by_age if n.name not in result]
                raise PlanError(
                    f"supernet {supernet} has no room for /{lan.pool_prefix} pools for: {', '.join(missing)}"
                )
            pair.append(ipaddress.IPv4Network((base + (count - 1 - index) * size, lan.pool_prefix)))
        result[node.name] = NodePools(*pair)
    return result


# --- links ------------------------------------------------------------------------------------------------

class _Rtt:
    """RTT between two nodes in ms; RTT_UNKNOWN (one "hop") for a pair nobody measured."""

    def __init__(self, rtts):
        self.table: dict[frozenset[str], float] = {}
        for key, value in (rtts or {}).items():
            self.table[key if isinstance(key, frozenset) else frozenset(key)] = float(value)

    def __call__(self, a: str, b: str) -> float:
        return self.table.get(frozenset((a, b)), RTT_UNKNOWN)

    def known(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.table


def _rtt_lookup(rtts) -> _Rtt:
    return _Rtt(rtts)


def _resolve_mode(mode: str, healthy: Sequence[NodeSpec]) -> str:
    if mode != "auto":
        return mode
    return "mesh" if len(healthy) <= AUTO_MESH_MAX else "hierarchical"


class _LinkBuilder:
    """Collects links as unordered pairs with a direction, applying the mode, the pins and a final repair."""

    def __init__(self, healthy: Sequence[NodeSpec], by_name: Mapping[str, NodeSpec], rtt, previous=frozenset()):
        self.healthy = list(healthy)
        self.previous = previous  # pairs linked in the plan before this one (from link_addresses)
        self.names = {n.name for n in healthy}
        self.rank = {n.name: i for i, n in enumerate(healthy)}
        self.by_name = by_name
        self.rtt = rtt
        self.direction: dict[frozenset[str], tuple[str, str]] = {}
        self.degree: dict[str, int] = {n.name: 0 for n in healthy}
        self.adj: dict[str, set[str]] = {n.name: set() for n in healthy}
        # A pin to a healthy node replaces the default attachment; a pin to a down node is ignored for now.
        self.pins = {
            n.name: n.pinned_upstream for n in healthy if n.pinned_upstream in self.names
        }

    @property
    def pairs(self):
        return list(self.direction)

    def link(self, up: str, down: str) -> None:
        pair = frozenset((up, down))
        if pair not in self.direction:
            self.degree[up] += 1
            self.degree[down] += 1
            self.adj[up].add(down)
            self.adj[down].add(up)
        self.direction[pair] = (up, down)

    def link_ranked(self, a: str, b: str) -> None:
        up, down = sorted((a, b), key=self.rank.__getitem__)
        self.link(up, down)

    def oriented(self) -> list[tuple[str, str]]:
        return sorted(self.direction.values())

    def build(self, mode: str) -> dict[str, str]:
        if not self.healthy:
            return {}
        free = [n.name for n in self.healthy if n.name not in self.pins or mode == "mesh"]
        primaries = getattr(self, f"_{mode}")(free)
        for down, up in sorted(self.pins.items()):
            self.link(up, down)
        self._repair(primaries[""])
        return primaries

    def _hub(self, free: list[str]) -> dict[str, str]:
        primary = free[0] if free else self.healthy[0].name
        for name in free[1:]:
            self.link(primary, name)
        return {"": primary}

    def _mesh(self, free: list[str]) -> dict[str, str]:
        for a, b in combinations(free, 2):
            self.link_ranked(a, b)
        return {"": free[0]}

    def _hierarchical(self, free: list[str]) -> dict[str, str]:
        if not free:
            return {"": self.healthy[0].name}
        grouper = _Hierarchy(self, free)
        return grouper.run()

    def _repair(self, root: str) -> None:
        """Pins can cut nodes off (a cycle in hub mode); join each cut-off group to the primary."""
        parent = {name: name for name in self.names}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in self.direction.values():
            parent[find(a)] = find(b)
        linked = {find(root)}
        for node in self.healthy:
            if find(node.name) not in linked:
                linked.add(find(node.name))
                self.link(root, node.name)


class _Hierarchy:
    """Region tree to links: a primary per region, members attach to it, sibling primaries link, then shortcuts.

    Tunnel budget: every node keeps at most ``floor(2*sqrt(n))`` tunnels (n = healthy nodes that are not
    pinned), whatever the depth of the region tree. Links are only ever added to a node with a free slot, and a
    group's primary keeps ``RESERVE`` slots free for the levels above it; when the primary of a group is full,
    the group's other units attach to the closest unit already joined that has room (a deeper tree rather than
    a fuller node). Pinned links come on top (a node gets one extra tunnel per node pinned to it).

    Stretch: with measured RTTs, a group's primary (among its best-priority units) is its most central unit,
    big groups are split by RTT clustering around central heads, and a final pass adds shortcut links between
    primaries and heads (the "core") where the planned path is more than ``SHORTCUT_STRETCH`` times the direct
    RTT, shortest pairs first (a greedy spanner), within the tunnel budget. Leaves stay single-homed, so their
    route files hold one default route and stay stable as the LAN grows.
    """

    RESERVE = 2  # slots a group's primary keeps for the levels above it
    SHORTCUT_STRETCH = 1.1  # add a core shortcut when the planned path is longer than this times the direct RTT
    KEEP_STRETCH = 1.2  # ... or this, for a link that exists already (hysteresis: links do not flap)
    INCUMBENT_MARGIN = 0.1  # a unit already linked to its group stays its centre unless another is 10% better
    LLOYD_ROUNDS = 3

    def __init__(self, builder: _LinkBuilder, free: list[str]):
        self.b = builder
        self.free = free
        n = len(free)
        self.group_max = max(2, math.ceil(math.sqrt(n)))
        self.budget = max(2, math.floor(2 * math.sqrt(n)))
        self.reps: set[str] = set()
        # RTT-driven choices need every pair measured (a partial matrix would read unmeasured pairs as 1 ms).
        names = frozenset(free)
        known = sum(len(pair) == 2 and pair <= names for pair in builder.rtt.table)
        self.measured = n > 2 and known >= n * (n - 1) // 2

    # -- the region tree ---------------------------------------------------------------------------------

    def run(self) -> dict[str, str]:
        members: dict[str, list[str]] = {"": []}
        for name in self.free:
            region = self.b.by_name[name].region
            members.setdefault(region, []).append(name)
            while region:
                region = region.rpartition("/")[0]
                members.setdefault(region, [])
        child_reps: dict[str, list[str]] = {path: [] for path in members}
        primaries: dict[str, str] = {}
        # Deepest regions first, so a region's children are done before the region itself.
        for path in sorted(members, key=lambda p: (-p.count("/") - bool(p), p)):
            units = sorted(members[path] + child_reps[path], key=self.b.rank.__getitem__)
            if not units:
                continue
            primary = self.connect(units, self.RESERVE if path else 0)
            primaries[path] = primary
            self.reps.add(primary)
            if path:
                child_reps[path.rpartition("/")[0]].append(primary)
        if self.measured:
            self._shortcuts()
        return primaries

    def connect(self, units: list[str], reserve: int, primary: str | None = None) -> str:
        """Link one group (units ranked best first) and return its primary."""
        primary = primary or self._primary(units)
        if len(units) > self.group_max:
            heads, groups = self._cluster(units, primary, reserve)
            if len(heads) < len(units):
                for head in heads:
                    self._join(head, groups[head], len(heads) - 1 + (reserve if head == primary else 0))
                self.reps.update(heads)
                return self.connect(heads, reserve, primary)
        self._join(primary, units, reserve)
        return primary

    def _usable(self, unit: str, primary: str, reserve: int) -> int:
        return self.budget - self.b.degree[unit] - (reserve if unit == primary else 0)

    def _join(self, primary: str, units: list[str], reserve: int) -> None:
        """A tree over the group within the budget (primary first), then sibling primaries link directly.

        When the primary is full, a unit attaches to the closest node with room among those already joined to
        the primary, including the nodes its sub-regions joined to it earlier (they lie inside this region
        too). The primary thus spends no slot on a level it cannot afford, however many levels it heads.
        """
        rtt, rank = self.b.rtt, self.b.rank
        reps = [u for u in units if u != primary and u in self.reps]
        leaves = [u for u in units if u != primary and u not in self.reps]
        joined: list[str] | None = None
        # Busy units (sibling primaries) first, while the primary has room; then the rest, closest first.
        for unit in reps + sorted(leaves, key=lambda u: (rtt(primary, u), rank[u])):
            if self._usable(primary, primary, reserve) > 0:
                point = primary
            else:
                if joined is None:
                    joined = self._component(primary)
                open_ = [j for j in joined if self._usable(j, primary, reserve) > 0]
                open_ = open_ or [j for j in joined if self.b.degree[j] < self.budget] or [primary]
                point = min(open_, key=lambda j: (rtt(unit, j), rank[j]))
            self.b.link_ranked(point, unit) if unit in self.reps else self.b.link(point, unit)
            if joined is not None:
                joined.extend(self._component(unit, exclude=set(joined)))
        if not self.measured:
            # Without RTTs there is nothing to choose shortcuts by: sibling primaries link directly (fewer hops)
            # while both keep a free slot.
            for a, b in combinations(reps, 2):
                if self._usable(a, primary, reserve) > 1 and self._usable(b, primary, reserve) > 1:
                    self.b.link_ranked(a, b)

    def _component(self, start: str, exclude: set[str] | None = None) -> list[str]:
        """Nodes linked to start (breadth first), not crossing into ``exclude``."""
        seen = {start} | (exclude or set())
        order, queue = [start], [start]
        while queue:
            node = queue.pop()
            for nbr in sorted(self.b.adj[node], key=self.b.rank.__getitem__):
                if nbr not in seen:
                    seen.add(nbr)
                    order.append(nbr)
                    queue.append(nbr)
        return order

    def _primary(self, units: list[str]) -> str:
        """Highest priority wins; among equals the most central unit (by RTT), else the best-ranked."""
        best = self.b.by_name[units[0]].priority
        candidates = [u for u in units if self.b.by_name[u].priority == best]
        return self._centre(candidates, units)

    def _centre(self, candidates: list[str], group: list[str]) -> str:
        """The candidate with the least RTT to the group (a sample of it, for big groups).

        Hysteresis: the candidates already linked to most of the group in the previous plan (``link_addresses``)
        count INCUMBENT_MARGIN closer, so a small RTT change does not move a primary and all its links.
        """
        if len(candidates) == 1 or not self.measured:
            return min(candidates, key=self.b.rank.__getitem__)
        rtt, previous = self.b.rtt, self.b.previous
        sample = group if len(group) <= 64 else group[:: math.ceil(len(group) / 64)]
        scores = {c: sum(rtt(c, u) for u in sample if u != c) for c in candidates}
        if previous:
            held = {c: sum(frozenset((c, u)) in previous for u in group) for c in candidates}
            most = max(held.values())
            for c in candidates:
                if most and held[c] == most:  # the centre(s) of the previous plan, by links into the group
                    scores[c] *= 1 - self.INCUMBENT_MARGIN
        return min(candidates, key=lambda c: (scores[c], self.b.rank[c]))

    def _cluster(self, units: list[str], primary: str, reserve: int) -> tuple[list[str], dict[str, list[str]]]:
        """Split a big group around heads: farthest-first seeds, a few rounds of nearest-head + medoid, by RTT.

        Without RTTs every distance ties, so the best-ranked units head the sub-groups and fill in rank order.
        """
        rtt, rank, degree = self.b.rtt, self.b.rank, self.b.degree
        count = math.ceil(len(units) / self.group_max)

        def room(head: str, heads: int) -> int:
            extra = reserve if head == primary else 0
            return max(0, min(self.group_max - 1, self.budget - degree[head] - (heads - 1) - extra))

        fresh = sorted(units, key=lambda u: (degree[u], rank[u]))  # least-loaded first: best heads
        heads = [primary]
        if self.measured:
            nearest = {u: rtt(u, primary) for u in units}
            while len(heads) < count:
                head = max((u for u in fresh if u not in heads), key=lambda u: (nearest[u], -degree[u], -rank[u]))
                heads.append(head)
                for u in units:
                    nearest[u] = min(nearest[u], rtt(u, head))
        else:
            heads += [u for u in fresh if u != primary][: count - 1]
        groups = self._assign(units, heads, room)
        for _ in range(self.LLOYD_ROUNDS if self.measured else 0):
            moved = [primary] + [
                self._centre([u for u in members if room(u, len(heads)) > 0] or [head], members)
                for head, members in groups.items() if head != primary
            ]
            if moved == heads:
                break
            heads = moved
            groups = self._assign(units, heads, room)
        # More heads join while the heads lack room for the rest (a head that is busy elsewhere has little).
        while sum(room(h, len(heads)) for h in heads) < len(units) - len(heads):
            extra = next(u for u in fresh if u not in heads)
            heads.append(extra)
            groups = self._assign(units, heads, room)
        return heads, groups

    def _assign(self, units: list[str], heads: list[str], room) -> dict[str, list[str]]:
        """Each other unit joins the closest head with room; units closest to some head choose first."""
        rtt, rank = self.b.rtt, self.b.rank
        left = {h: room(h, len(heads)) for h in heads}
        groups: dict[str, list[str]] = {h: [h] for h in heads}
        others = [u for u in units if u not in groups]
        order = sorted(others, key=lambda u: (min(rtt(u, h) for h in heads), rank[u]))
        for unit in order:
            open_heads = [h for h in heads if left[h] > 0] or heads
            head = min(open_heads, key=lambda h: (rtt(unit, h), rank[h]))
            groups[head].append(unit)
            left[head] -= 1
        return {h: sorted(g, key=rank.__getitem__) for h, g in groups.items()}

    # -- shortcuts ---------------------------------------------------------------------------------------

    def _shortcuts(self) -> None:
        """Greedy spanner over the core: shortest pairs first, link when the planned path is too long.

        Distances are kept as an all-pairs matrix over the core (leaves carry no transit traffic), updated
        in O(core^2) per new link.
        """
        rtt, degree = self.b.rtt, self.b.degree
        core = sorted(self.reps, key=self.b.rank.__getitem__)
        index = {name: i for i, name in enumerate(core)}
        size = len(core)
        inf = float("inf")
        dist = [[0.0 if i == j else inf for j in range(size)] for i in range(size)]
        for a, b in self.b.direction:
            if a in index and b in index:
                i, j = index[a], index[b]
                dist[i][j] = dist[j][i] = min(dist[i][j], rtt(a, b))
        for k in range(size):
            dk = dist[k]
            for i in range(size):
                dik = dist[i][k]
                if dik == inf:
                    continue
                di = dist[i]
                for j in range(size):
                    if dik + dk[j] < di[j]:
                        di[j] = dik + dk[j]
        pairs = sorted(
            ((rtt(a, b), self.b.rank[a], self.b.rank[b], a, b) for a, b in combinations(core, 2)
             if rtt.known(a, b) and frozenset((a, b)) not in self.b.direction),
        )
        for w, _, _, a, b in pairs:
            if degree[a] >= self.budget or degree[b] >= self.budget:
                continue
            i, j = index[a], index[b]
            limit = self.KEEP_STRETCH if frozenset((a, b)) in self.b.previous else self.SHORTCUT_STRETCH
            if dist[i][j] <= limit * w:
                continue
            self.b.link_ranked(a, b)
            di, dj = dist[i], dist[j]
            for x in range(size):
                dxa, dxb = dist[x][i], dist[x][j]
                via_a, via_b = dxa + w, dxb + w
                row = dist[x]
                for y in range(size):
                    best = min(via_a + dj[y], via_b + di[y])
                    if best < row[y]:
                        row[y] = best


def _assign_addresses(oriented, pools, previous: Mapping[tuple[str, str], str]) -> tuple[LinkPlan, ...]:
    """Give each link a fixed address in its upstream's link block, keeping addresses already in use."""
    taken: dict[str, set[ipaddress.IPv4Address]] = {}
    chosen: dict[tuple[str, str], ipaddress.IPv4Address] = {}
    for up, down in oriented:
        first, last = link_range(pools[up].udp)
        try:
            old = ipaddress.IPv4Address(previous.get((up, down), ""))
        except ValueError:
            continue
        if first <= old <= last and old not in taken.setdefault(up, set()):
            taken[up].add(old)
            chosen[(up, down)] = old
    for up, down in oriented:
        if (up, down) in chosen:
            continue
        first, last = link_range(pools[up].udp)
        used = taken.setdefault(up, set())
        address = first
        while address in used:
            address += 1
        if address > last:
            raise PlanError(f"node {up} would serve more than {int(last) - int(first) + 1} links")
        used.add(address)
        chosen[(up, down)] = address
    return tuple(LinkPlan(up, down, chosen[(up, down)]) for up, down in oriented)
