"""Pure planning of a LAN: address pools, links between nodes, and per-node routes.

Plain data in, plain data out: no Django, no database, no clock, no randomness. The same input always gives
the same Plan, so rendered files only change when something that matters changed.

Modes (``LanSpec.mode``):
- ``hub``: the primary (healthy, highest priority, oldest on ties) serves a link to every other node.
- ``mesh``: a link for every pair of healthy nodes; the higher-ranked node is upstream. At most 255 nodes,
  because an upstream has 254 link addresses (.2 to .255 of its UDP pool).
- ``hierarchical``: a primary per region, the region's other nodes attach to it, and the primaries of sibling
  regions link to each other, recursively along the region path. A group with more than ceil(sqrt(n)) members
  is split into sub-groups whose primaries (the best-ranked members) mesh, members joining the sub-primary
  with the lowest RTT; that keeps tunnels per node near 2*sqrt(n) for region trees of modest depth.
- ``auto``: ``mesh`` for up to 5 healthy nodes (every tunnel direct, at most 4 per node, which is within
  2*sqrt(n)), else ``hierarchical`` (which follows the regions and splits big ones). Two nodes give one link
  with the older node upstream, as a hub would.

Rank is (-priority, order, name): it picks primaries and, in mesh and among sibling primaries, the upstream
side of a link. A pinned upstream replaces a node's default attachment in every mode (in mesh it only fixes the
link's direction). If pins cut a group of nodes off, their best-ranked node is linked to the LAN primary.
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
    if mode == "hierarchical":
        _reject_pin_cycles(nodes)
    builder = _LinkBuilder(healthy, by_name, rtt)
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

def _rtt_lookup(rtts):
    table: dict[frozenset[str], float] = {}
    for key, value in (rtts or {}).items():
        table[key if isinstance(key, frozenset) else frozenset(key)] = float(value)

    def rtt(a: str, b: str) -> float:
        return table.get(frozenset((a, b)), RTT_UNKNOWN)

    return rtt


def _resolve_mode(mode: str, healthy: Sequence[NodeSpec]) -> str:
    if mode != "auto":
        return mode
    return "mesh" if len(healthy) <= AUTO_MESH_MAX else "hierarchical"


class _LinkBuilder:
    """Collects links as unordered pairs with a direction, applying the mode, the pins and a final repair."""

    def __init__(self, healthy: Sequence[NodeSpec], by_name: Mapping[str, NodeSpec], rtt):
        self.healthy = list(healthy)
        self.names = {n.name for n in healthy}
        self.rank = {n.name: i for i, n in enumerate(healthy)}
        self.by_name = by_name
        self.rtt = rtt
        self.direction: dict[frozenset[str], tuple[str, str]] = {}
        self.degree: dict[str, int] = {n.name: 0 for n in healthy}
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
    """Region tree to links: a primary per region, members attach to it, sibling primaries mesh."""

    def __init__(self, builder: _LinkBuilder, free: list[str]):
        self.b = builder
        self.free = free
        n = len(free)
        self.group_max = max(2, math.ceil(math.sqrt(n)))
        self.budget = max(1, math.floor(2 * math.sqrt(n)))
        self.reps: set[str] = set()

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
            primary = self.connect(units)
            primaries[path] = primary
            self.reps.add(primary)
            if path:
                child_reps[path.rpartition("/")[0]].append(primary)
        return primaries

    def connect(self, units: list[str]) -> str:
        """Link one group (units ranked best first) and return its primary."""
        if len(units) > self.group_max:
            heads = self._heads(units)
            if len(heads) < len(units):
                groups = self._assign(units, heads)
                for head in heads:
                    self.connect(groups[head])
                self.reps.update(heads)
                return self.connect(heads)
        primary = units[0]
        reps = [u for u in units if u == primary or u in self.reps]
        # Every sibling primary links to the group's primary; the other sibling pairs link directly (lower
        # stretch) only while both stay within the tunnel budget.
        for rep in reps[1:]:
            self.b.link_ranked(primary, rep)
        for a, b in combinations(reps[1:], 2):
            if self.b.degree[a] < self.budget and self.b.degree[b] < self.budget:
                self.b.link_ranked(a, b)
        for leaf in (u for u in units if u not in reps):
            self.b.link(self._attach_point(primary, reps, leaf), leaf)
        return primary

    def _capacity(self, head: str, heads: int) -> int:
        """Members a sub-group head can still take, keeping room for links to the other heads."""
        return max(0, min(self.group_max - 1, self.budget - self.b.degree[head] - (heads - 1)))

    def _heads(self, units: list[str]) -> list[str]:
        """The best-ranked units head sub-groups; more heads join while the heads lack room for the rest."""
        heads = units[: math.ceil(len(units) / self.group_max)]
        rest = units[len(heads):]
        while rest and sum(self._capacity(h, len(heads)) for h in heads) < len(rest):
            # The least-loaded remaining unit (best-ranked on ties) becomes another head.
            extra = min(rest, key=lambda u: (self.b.degree[u], self.b.rank[u]))
            rest.remove(extra)
            heads.append(extra)
        return sorted(heads, key=self.b.rank.__getitem__)

    def _assign(self, units: list[str], heads: list[str]) -> dict[str, list[str]]:
        """Each other unit joins the closest head (by RTT) that has room; rank breaks ties."""
        groups: dict[str, list[str]] = {head: [head] for head in heads}
        room = {head: self._capacity(head, len(heads)) for head in heads}
        for unit in units:
            if unit in groups:
                continue
            open_heads = [h for h in heads if room[h] > 0] or heads
            head = min(open_heads, key=lambda h: (self.b.rtt(unit, h), self.b.rank[h]))
            groups[head].append(unit)
            room[head] -= 1
        return groups

    def _attach_point(self, primary: str, reps: list[str], leaf: str) -> str:
        """The primary, unless it is already at the tunnel budget; then the closest sibling primary."""
        if self.b.degree[primary] < self.budget or len(reps) == 1:
            return primary
        spare = [r for r in reps if self.b.degree[r] < self.budget] or reps
        return min(spare, key=lambda r: (self.b.degree[r] >= self.budget, self.b.rtt(leaf, r), self.b.rank[r]))


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
