"""Per-node routes over the planned links: shortest paths by RTT, unique and symmetric, then aggregated.

Why uniqueness matters: an OpenVPN server drops a packet from a link client unless its source lies in that
client's iroutes ("MULTI: bad source address"), and the iroutes also decide which client a prefix goes to. So
the path a -> b must be exactly the reverse of b -> a, and every node on it must agree. We get that by making
every path's length unique: a link's weight is (RTT, 1 hop, 2**edge_index) packed into one integer, compared in
that order, so two different paths never tie and the shortest path between any two nodes is unique. Its
sub-paths are then shortest too, so hop-by-hop forwarding follows it exactly.

A link is also made the shortest path between its own two ends (its RTT is lowered to the shortest detour when
a detour is faster): the downstream's tunnel has the upstream's UDP pool as a connected subnet, so traffic
between the two ends must use the link itself.

Routes: a node whose path to the LAN primary starts over one of its upstream links gets a default route for the
whole supernet through it; every prefix that leaves some other way gets an exact route. So a node only needs
new lines when a node appears that it reaches other than through its default, which keeps leaves' files stable
as the LAN grows. Defaults always step toward the primary, so even an address no one holds cannot loop.
Defaults never point at a downstream, so a server's iroutes are always exact and disjoint.

Region blocks: a node that reaches every pool of a region's address block through one next hop (as every node
outside a region does: it is entered through its primary) routes the whole block there, not the pools allocated in
it so far, so a node joining a region whose block has room changes no route outside the region. The primary routes
its region's blocks into its own UDP server, where OpenVPN drops an address no client holds (``_Blocks``).
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from dataclasses import dataclass
from typing import Mapping, Sequence

RTT_SCALE = 1000  # RTT in ms to integer microseconds; integers keep path sums exact


@dataclass(frozen=True, order=True)
class RoutePlan:
    prefix: ipaddress.IPv4Network
    via: str


def plan_routes(
    names: Sequence[str],
    links: Sequence,
    pools: Mapping,
    weights: Mapping[frozenset[str], float],
    root: str | None,
    supernet: ipaddress.IPv4Network,
    blocks: Mapping[str, Sequence[ipaddress.IPv4Network]] | None = None,
    primaries: Mapping[str, str] | None = None,
) -> dict[str, tuple[RoutePlan, ...]]:
    """Routes for every healthy node (``names``) toward every other healthy node's pools.

    With the region ``blocks`` and their ``primaries`` (the plan's), a node that reaches a whole block through one
    next hop routes the block itself rather than the pools allocated in it so far (see ``_Blocks``)."""
    adj: dict[str, dict[str, int]] = {name: {} for name in names}
    upstreams: dict[str, set[str]] = {name: set() for name in names}
    for link in links:
        w = max(1, round(weights.get(frozenset((link.upstream, link.downstream)), 1.0) * RTT_SCALE))
        adj[link.upstream][link.downstream] = w
        adj[link.downstream][link.upstream] = w
        upstreams[link.downstream].add(link.upstream)
    hops = _NextHops(adj)
    intervals = {name: _intervals(pools[name]) for name in names}
    # Every core node with the leaves hanging off it: a core node reaches all of them through one first hop.
    behind: dict[str, list[tuple[int, int]]] = {name: list(intervals[name]) for name in hops.first}
    for leaf, parent in hops.leaf_parent.items():
        if parent in behind:
            behind[parent].extend(intervals[leaf])
    behind = {name: _merge(spans) for name, spans in behind.items()}  # a region's leaves are mostly contiguous
    defaults, groups = {}, {}
    for name in names:
        default = hops.next_hop(name, root) if root is not None and name != root else None
        defaults[name] = default if default in upstreams[name] else None
        groups[name] = _groups_for(name, names, hops, intervals, behind, defaults[name])
    widened = _Blocks(blocks or {}, primaries or {}, intervals, hops, groups).apply()
    return {name: _finish(groups[name], defaults[name], supernet, widened.get(name, ())) for name in names}


class _Blocks:
    """Routes to region blocks instead of the pools allocated in them, so a node joining a region whose block has
    room changes no route outside the region (the block is what every outside node already routes).

    A node X routes block B through next hop v when every pool allocated in B is reached through v, and v does
    the same (or v is B's region primary): so an address of B that no node holds yet travels strictly toward the
    primary, hop by hop along the unique shortest paths, and the primary routes B into its own UDP server, where
    OpenVPN drops what no client holds (a ``route`` line without an ``iroute``). No loop, and no pool's path
    changes: every allocated address still follows its shortest path (the condition is checked per pool run).
    """

    def __init__(self, blocks, primaries, intervals, hops, groups):
        self.hops, self.groups, self.own = hops, groups, intervals
        spans = sorted((span for name in intervals for span in intervals[name]))
        starts = [first for first, _ in spans]
        owners: dict[tuple[int, int], tuple[int, str]] = {}
        for region, nets in blocks.items():
            owner = primaries.get(region)
            if not region or owner not in intervals:
                continue
            for net in nets:  # a block a region shares with its only sub-region belongs to the deepest one
                key = (int(net.network_address), int(net.broadcast_address))
                owners[key] = max(owners.get(key, (-1, "")), (region.count("/"), owner))
        self.blocks = []  # (first, last, owner, allocated runs), largest first
        for (first, last), (_, owner) in sorted(owners.items(), key=lambda item: (item[0][0] - item[0][1], item[0])):
            inside = spans[bisect.bisect_left(starts, first):bisect.bisect_right(starts, last)]
            self.blocks.append((first, last, owner, _merge(inside)))
        self.covers: dict[str, tuple[list[int], list[tuple[int, int, str]]]] = {}
        self.memo: dict[tuple[str, int], str | None] = {}

    def _table(self, name: str):
        """The node's reach as sorted (first, last, next hop) spans, merged per next hop."""
        table = self.covers.get(name)
        if table is None:
            group = self.groups[name]
            rows = sorted((first, last, via) for via, spans in (group or {}).items() for first, last in _merge(spans))
            table = self.covers[name] = ([r[0] for r in rows], rows)
        return table

    def via(self, name: str, index: int) -> str | None:
        """The one next hop through which ``name`` reaches every pool of block ``index`` (and that next hop does
        the same, down to the block's primary), else None. Memoised: each (node, block) is decided once."""
        key = (name, index)
        if key in self.memo:
            return self.memo[key]
        first, last, owner, runs = self.blocks[index]
        self.memo[key] = None  # a cycle (impossible on shortest paths) reads as "no"
        if name == owner:  # the block ends here (in its server) unless the owner is a plain leaf (no own routes)
            result = name if self.groups[name] is not None else None
        elif self.groups[name] is None:  # a leaf whose only link is its default: everything goes there
            parent = self.hops.leaf_parent[name]
            mine = any(a <= last and first <= b for a, b in self.own[name])
            result = parent if not mine and self.via(parent, index) is not None else None
        else:
            starts, rows = self._table(name)
            vias = set()
            for a, b in runs:
                i = bisect.bisect_right(starts, a) - 1
                vias.add(rows[i][2] if i >= 0 and rows[i][1] >= b else None)
            (result,) = vias if len(vias) == 1 else (None,)
            if result is not None and self.via(result, index) is None:
                result = None
        self.memo[key] = result
        return result

    def apply(self) -> dict[str, list[tuple[int, int, str]]]:
        """Rewrite each core node's groups: a block reached through one next hop replaces its pools there; a
        block's primary keeps explicit routes for pools of the block it reaches through its default (the block's
        own route would otherwise catch them) and gets the block itself, routed into its own server."""
        extra: dict[str, list[tuple[int, int, str]]] = {}
        for name, group in self.groups.items():
            if group is None:
                continue
            starts: list[int] = []  # the blocks routed whole here: disjoint, kept sorted
            ends: list[int] = []
            whole: dict[str, list[tuple[int, int]]] = {}
            for index, (first, last, owner, _) in enumerate(self.blocks):
                i = bisect.bisect_right(starts, first) - 1
                if i >= 0 and ends[i] >= last:
                    continue  # inside a block already routed whole
                via = self.via(name, index)
                if via is None:
                    continue
                if via == name:  # its own block (blocks nested in it may still be routed whole)
                    extra.setdefault(name, []).append((first, last, name))
                    continue
                starts.insert(i + 1, first)
                ends.insert(i + 1, last)
                whole.setdefault(via, []).append((first, last))
            for via, blocks in whole.items():
                group[via] = [*_outside(group[via], sorted(blocks)), *blocks]
        return extra


def _outside(spans, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of spans outside every block (blocks sorted and disjoint)."""
    firsts = [first for first, _ in blocks]
    kept = []
    for a, b in spans:
        # Blocks that may overlap [a, b]: from the last one starting at or before a, while they start before b.
        i = max(0, bisect.bisect_right(firsts, a) - 1)
        while i < len(blocks) and blocks[i][0] <= b:
            first, last = blocks[i]
            if last >= a:
                if a < first:
                    kept.append((a, first - 1))
                a = max(a, last + 1)
            i += 1
        if a <= b:
            kept.append((a, b))
    return kept


def _split(spans, edges: list[int]) -> list[tuple[int, int]]:
    """The spans cut at every edge (an edge is the first address of a new piece)."""
    pieces = []
    for first, last in spans:
        for edge in edges[bisect.bisect_right(edges, first):bisect.bisect_right(edges, last)]:
            pieces.append((first, edge - 1))
            first = edge
        pieces.append((first, last))
    return pieces


def _intervals(node_pools) -> list[tuple[int, int]]:
    return [
        (int(pool.network_address), int(pool.broadcast_address)) for pool in (node_pools.udp, node_pools.tcp)
    ]


def _groups_for(name, names, hops, intervals, behind, default) -> dict[str, list[tuple[int, int]]] | None:
    """The address spans the node reaches through each next hop; None for a leaf whose only link is its default
    (the supernet route covers every other node: most nodes of a hierarchical LAN, O(1) instead of a pass)."""
    if not hops.adj[name]:
        return {}
    parent = hops.leaf_parent.get(name)
    if parent is not None and parent == default:
        return None
    groups: dict[str, list[tuple[int, int]]] = {}
    if parent is not None:  # a leaf whose one link is not a default (the primary of a two-node LAN)
        groups[parent] = [span for other in names if other != name for span in intervals[other]]
    else:
        first = hops.first.get(name, {})
        for target, spans in behind.items():
            if target == name:
                for leaf in hops.leaves_of.get(name, ()):  # its own leaves: each through its own link
                    groups.setdefault(leaf, []).extend(intervals[leaf])
                continue
            via = first.get(target)
            if via is not None:
                groups.setdefault(via, []).extend(spans)
    return groups


def _finish(groups, default, supernet, own_blocks) -> tuple[RoutePlan, ...]:
    if groups is None:
        return (RoutePlan(supernet, default),)
    routes = [RoutePlan(supernet, default)] if default else []
    through_default = groups.pop(default, [])
    if own_blocks:
        # This node's own blocks go into its server (dropped there unless a pool matches): pools in them that it
        # reaches through its default need their own routes, or the block's route would catch them.
        area = _merge([(first, last) for first, last, _ in own_blocks if not any(
            (a, b) != (first, last) and a <= first and last <= b for a, b, _ in own_blocks)])  # outermost ones
        kept = [(max(a, first), min(b, last)) for a, b in _merge(through_default) for first, last in area
                if a <= last and first <= b]
        if kept:
            groups[default] = kept
    if own_blocks:
        # Split at the own blocks' edges, so no aggregate is wider than an own block it overlaps: each block's
        # route (less specific than every route inside it) then catches only addresses no pool holds.
        edges = sorted({edge for first, last, _ in own_blocks for edge in (first, last + 1)})
        for via, spans in groups.items():
            pieces: dict[int, list[tuple[int, int]]] = {}
            for piece in _split(spans, edges):  # aggregated piece by piece: merging would join them again
                pieces.setdefault(bisect.bisect_right(edges, piece[0]), []).append(piece)
            routes.extend(RoutePlan(prefix, via) for part in pieces.values() for prefix in aggregate(part))
    else:
        for via, spans in groups.items():
            routes.extend(RoutePlan(prefix, via) for prefix in aggregate(spans))
    if own_blocks:
        taken = {r.prefix for r in routes}  # a block its pools fill whole is routed to them: nothing to drop
        routes.extend(route for first, last, via in own_blocks
                      if (route := RoutePlan(_network(first, 33 - (last - first + 1).bit_length()), via)).prefix
                      not in taken)
    # RoutePlan's own order, by a cheap key (comparing IPv4Network objects is slow at thousands of routes)
    routes.sort(key=lambda r: (int(r.prefix.network_address), r.prefix.prefixlen, r.via))
    return tuple(routes)


def _merge(spans) -> list[tuple[int, int]]:
    """Disjoint spans, sorted, with adjacent ones joined."""
    merged: list[list[int]] = []
    for first, last in sorted(spans):
        if merged and first == merged[-1][1] + 1:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def aggregate(spans: list[tuple[int, int]]) -> list[ipaddress.IPv4Network]:
    """Fewest CIDR prefixes covering exactly these disjoint address spans (first, last inclusive)."""
    merged = _merge(spans)
    result = []
    for first, last in merged:
        # Largest aligned block starting at `first` that fits, repeatedly (what summarize_address_range does,
        # on plain integers).
        while first <= last:
            size = (first & -first) if first else 1 << 32
            while size > last - first + 1:
                size >>= 1
            result.append(_network(first, 32 - size.bit_length() + 1))
            first += size
    return result


_NETWORKS: dict[tuple[int, int], ipaddress.IPv4Network] = {}


def _network(address: int, prefixlen: int) -> ipaddress.IPv4Network:
    """Interned IPv4Network objects: a LAN's plan names the same few thousand prefixes over and over."""
    key = (address, prefixlen)
    net = _NETWORKS.get(key)
    if net is None:
        if len(_NETWORKS) > 200_000:
            _NETWORKS.clear()
        net = _NETWORKS[key] = ipaddress.IPv4Network(key)
    return net


class _NextHops:
    """First hop of the unique shortest path between any two connected nodes.

    Degree-1 nodes (most nodes of a hierarchical LAN) are peeled off: every path to or from one runs through
    its only neighbour, so Dijkstra only runs on the remaining core, once per core node.
    """

    def __init__(self, adj: dict[str, dict[str, int]]):
        self.adj = adj
        self.leaf_parent = {n: next(iter(nbrs)) for n, nbrs in adj.items() if len(nbrs) == 1}
        self.leaves_of: dict[str, list[str]] = {}
        for leaf, parent in self.leaf_parent.items():
            self.leaves_of.setdefault(parent, []).append(leaf)
        core = {n: {m: w for m, w in nbrs.items() if m not in self.leaf_parent}
                for n, nbrs in adj.items() if len(nbrs) > 1}
        self.first = self._all_first_hops(_exact_weights(core)) if core else {}

    def next_hop(self, source: str, target: str) -> str | None:
        if source == target:
            return None
        if source in self.leaf_parent:
            return self.leaf_parent[source]
        if target in self.leaf_parent:
            parent = self.leaf_parent[target]
            if parent == source:
                return target
            target = parent
        return self.first.get(source, {}).get(target)

    @staticmethod
    def _all_first_hops(core: dict[str, dict[str, int]]) -> dict[str, dict[str, str]]:
        return {source: _dijkstra(core, source)[1] for source in core}


def _exact_weights(core: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Pack (RTT, hops, edge bit) into one integer per link so that every path length is unique."""
    core = _clamp_to_shortest(core)
    edges = sorted({tuple(sorted((a, b))) for a, nbrs in core.items() for b in nbrs})
    edge_bits = len(edges)
    hop_bits = max(1, len(core).bit_length() + 1)
    packed: dict[str, dict[str, int]] = {n: {} for n in core}
    for index, (a, b) in enumerate(edges):
        w = (core[a][b] << (edge_bits + hop_bits)) + (1 << edge_bits) + (1 << index)
        packed[a][b] = packed[b][a] = w
    return packed


def _clamp_to_shortest(core: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Lower each link's weight to its ends' shortest distance, so the link itself is a shortest path.

    Distances between all nodes stay the same (a link never gets shorter than some existing path), and the
    hop count in the packed weight then prefers the direct link over an equally long detour.
    """
    if len({w for nbrs in core.values() for w in nbrs.values()}) <= 1:
        return core  # equal weights: a direct link always beats any detour
    dist = {source: _dijkstra(core, source)[0] for source in core}
    return {a: {b: min(w, dist[a][b]) for b, w in nbrs.items()} for a, nbrs in core.items()}


def _dijkstra(adj: Mapping[str, Mapping[str, int]], source: str) -> tuple[dict[str, int], dict[str, str]]:
    """Distances and first hops from source."""
    dist = {source: 0}
    first: dict[str, str] = {}
    done: set[str] = set()
    heap: list[tuple[int, str, str]] = [(0, source, source)]
    while heap:
        d, node, hop = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        if node != source:
            first[node] = hop
        for nbr, w in adj[node].items():
            nd = d + w
            if nbr not in done and nd < dist.get(nbr, nd + 1):
                dist[nbr] = nd
                heapq.heappush(heap, (nd, nbr, nbr if node == source else hop))
    return dist, first


# --- what players are routed into the tunnel ------------------------------------------------------------------

MAX_PLAYER_ROUTES = 8  # pushed prefixes at most; past that, the closest neighbours merge into a common prefix
HEADROOM_BITS = 4  # an allocated block is pushed as at least 1/16 of the supernet (a /12 of 10.0.0.0/8)


def player_routes(blocks: Mapping[str, Sequence[ipaddress.IPv4Network]], pools: Sequence[ipaddress.IPv4Network],
                  supernet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Network, ...]:
    """The prefixes a player is pushed: what the LAN has allocated, with headroom, never the whole supernet.

    A player's other 10.x networks (a second home subnet, a company VPN, a DNS server) must stay outside the
    tunnel, where the LAN would drop them. The allocation is the top-level regions' blocks (addresses.py: they
    hold every pool of their nodes) plus the pools of nodes outside every region block.

    Each is widened to at least 1/16 of the supernet: what a server pushes changes only when the LAN grows out of
    that, because a changed push restarts every server (players get routes only when they connect) and a small
    LAN's blocks double with nearly every server added. Past MAX_PLAYER_ROUTES prefixes the two closest neighbours
    merge into their common prefix, repeatedly: a bounded route count on every client. Everything stays inside
    the supernet (every part is)."""
    floor = min(supernet.prefixlen + HEADROOM_BITS, 32)
    top = [net for region, nets in blocks.items() if region and "/" not in region for net in nets]
    outside = [pool for pool in pools if not any(pool.subnet_of(net) for net in top)]
    prefixes = list(ipaddress.collapse_addresses(
        net.supernet(new_prefix=floor) if net.prefixlen > floor else net for net in [*top, *outside]))
    while len(prefixes) > MAX_PLAYER_ROUTES:
        merged = [_common(a, b) for a, b in zip(prefixes, prefixes[1:])]
        best = max(range(len(merged)), key=lambda i: (merged[i].prefixlen, -i))
        prefixes = list(ipaddress.collapse_addresses([*prefixes[:best], merged[best], *prefixes[best + 2:]]))
    return tuple(prefixes)


def _common(a: ipaddress.IPv4Network, b: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The smallest prefix holding both."""
    length = min(a.prefixlen, b.prefixlen, 32 - (int(a.network_address) ^ int(b.network_address)).bit_length())
    return a.supernet(new_prefix=length)
