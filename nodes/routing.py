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
"""

from __future__ import annotations

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
) -> dict[str, tuple[RoutePlan, ...]]:
    """Routes for every healthy node (``names``) toward every other healthy node's pools."""
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
    routes = {}
    for name in names:
        default = hops.next_hop(name, root) if root is not None and name != root else None
        if default not in upstreams[name]:
            default = None
        routes[name] = _routes_for(name, names, hops, intervals, behind, default, supernet)
    return routes


def _intervals(node_pools) -> list[tuple[int, int]]:
    return [
        (int(pool.network_address), int(pool.broadcast_address)) for pool in (node_pools.udp, node_pools.tcp)
    ]


def _routes_for(name, names, hops, intervals, behind, default, supernet) -> tuple[RoutePlan, ...]:
    if not hops.adj[name]:
        return ()
    parent = hops.leaf_parent.get(name)
    if parent is not None and parent == default:
        # A leaf whose only link is its default: the supernet route covers every other node (most nodes of a
        # hierarchical LAN; O(1) instead of a pass over the LAN).
        return (RoutePlan(supernet, default),)
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
            if via is not None and via != default:
                groups.setdefault(via, []).extend(spans)
    groups.pop(default, None)
    routes = [RoutePlan(supernet, default)] if default else []
    for via, spans in groups.items():
        routes.extend(RoutePlan(prefix, via) for prefix in aggregate(spans))
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
