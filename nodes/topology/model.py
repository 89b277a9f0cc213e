"""The planner's data types: LanSpec and NodeSpec in, Plan (NodePools, LinkPlan, routes) out, PlanError, rank."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property

from nodes.routing import RoutePlan, player_routes

# The first 256 addresses of a UDP pool hold .0 (network), .1 (the server) and .2-.255 for link clients.
LINK_SLOTS = 256
MAX_POOL_PREFIX = 22  # a /22 still leaves three /24s for players after the link block


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
    public_ipv6: str = ""  # a dual-stack node's IPv6 address, dialled after public_address
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
    # region path -> its address blocks (addresses.py); passed back to the next plan so regions keep them
    blocks: dict[str, tuple[ipaddress.IPv4Network, ...]] = field(default_factory=dict)

    @cached_property
    def _by_node(self) -> dict[str, tuple[dict[str, LinkPlan], dict[str, LinkPlan]]]:
        index: dict[str, tuple[dict, dict]] = {name: ({}, {}) for name in self.pools}
        for link in self.links:
            index[link.downstream][0][link.upstream] = link
            index[link.upstream][1][link.downstream] = link
        return index

    @cached_property
    def _routes_by_via(self) -> dict[str, dict[str, list[RoutePlan]]]:
        index: dict[str, dict[str, list[RoutePlan]]] = {}
        for name, routes in self.routes.items():
            by_via = index[name] = {}
            for route in routes:
                by_via.setdefault(route.via, []).append(route)
        return index

    @cached_property
    def _relay_tree(self) -> dict[str, tuple[str, ...]]:
        """The tree LAN discovery's relays spread announcements over: each healthy node's parent is the next hop of
        its route to the LAN primary. Routes are loop-free, so the parents form one tree; it changes only where
        routes to the primary change (a joining node hangs off the node it links to)."""
        tree: dict[str, set[str]] = {name: set() for name in self.pools}
        root = self.primaries.get("")
        if root is None or root not in self.pools:
            return {}
        target = self.pools[root].udp.network_address + 1
        for name in self.healthy:
            parent = None if name == root else self.next_hop(name, target)
            if parent is not None and parent != name and parent in tree:
                tree[name].add(parent)
                tree[parent].add(name)
        return {name: tuple(sorted(nbrs)) for name, nbrs in tree.items()}

    def relay_neighbours(self, name: str) -> tuple[str, ...]:
        """The node's neighbours on the relay tree (``_relay_tree``)."""
        return self._relay_tree.get(name, ())

    def player_routes(self, supernet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Network, ...]:
        """The prefixes every server pushes to its players (routing.player_routes): computed once per plan, not
        once per node rendered."""
        cache = self.__dict__.setdefault("_player_routes", {})  # as cached_property does (a frozen dataclass)
        if supernet not in cache:
            pools = [pool for pair in self.pools.values() for pool in (pair.udp, pair.tcp)]
            cache[supernet] = player_routes(self.blocks, pools, supernet)
        return cache[supernet]

    def routes_via(self, name: str, via: str) -> list[RoutePlan]:
        """The node's routes whose next hop is ``via``, in route order."""
        return self._routes_by_via.get(name, {}).get(via, [])

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

    # -- storage: a plan is computed once per change and stored as plain JSON ----------------------------------

    def to_data(self) -> dict:
        return {
            "mode": self.mode,
            "pools": {name: [str(p.udp), str(p.tcp)] for name, p in self.pools.items()},
            "links": [[l.upstream, l.downstream, str(l.address)] for l in self.links],
            "primaries": dict(self.primaries),
            "routes": {name: [[str(r.prefix), r.via] for r in routes] for name, routes in self.routes.items()},
            "healthy": sorted(self.healthy),
            "blocks": {region: [str(b) for b in blocks] for region, blocks in self.blocks.items()},
        }

    @classmethod
    def from_data(cls, data: dict) -> "Plan":
        net, addr = ipaddress.IPv4Network, ipaddress.IPv4Address
        return cls(
            mode=data["mode"],
            pools={name: NodePools(net(udp), net(tcp)) for name, (udp, tcp) in data["pools"].items()},
            links=tuple(LinkPlan(up, down, addr(a)) for up, down, a in data["links"]),
            primaries=dict(data["primaries"]),
            routes={name: tuple(RoutePlan(net(p), via) for p, via in routes) for name, routes in data["routes"].items()},
            healthy=frozenset(data["healthy"]),
            blocks={region: tuple(net(b) for b in blocks) for region, blocks in data.get("blocks", {}).items()},
        )


def rank_key(node: NodeSpec) -> tuple[int, int, str]:
    """Better nodes sort first: higher priority, then older, then name."""
    return (-node.priority, node.order, node.name)


def link_range(udp_pool: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """First and last address a link client may hold in an upstream's UDP pool."""
    return udp_pool.network_address + 2, udp_pool.network_address + LINK_SLOTS - 1


def dynamic_pool(udp_pool: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The ``ifconfig-pool`` range: from .1 of the block after the link block up to broadcast - 2."""
    return udp_pool.network_address + LINK_SLOTS + 1, udp_pool.broadcast_address - 2

