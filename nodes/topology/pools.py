"""Validation of a LAN's input (names, regions, pins, supernet) and allocation of each node's UDP and TCP pools."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Sequence

from nodes import layout
from nodes.topology.addresses import AddressPlan
from nodes.topology.model import MAX_POOL_PREFIX, LanSpec, NodePools, NodeSpec, PlanError

MODES = ("auto", "hub", "mesh", "hierarchical")
NAME_RE = layout.NODE_NAME_RE  # the same rules as the models' validators
REGION_PART_RE = re.compile(rf"^{layout.REGION_PART_PATTERN}\Z")


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
        if not layout.is_node_name(node.name):
            raise PlanError(f"node name {node.name!r}: {layout.NODE_NAME_RULE}")
        if node.name in seen:
            raise PlanError(f"two nodes are named {node.name}")
        seen.add(node.name)
        if not layout.is_region(node.region):
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

@functools.lru_cache(maxsize=65536)
def _network(value: str) -> ipaddress.IPv4Network:
    """Parsed once: a LAN of thousands of nodes is re-planned with every node's stored pools."""
    return ipaddress.IPv4Network(value)


def _parse_pool(node: NodeSpec, kind: str, value: str) -> ipaddress.IPv4Network:
    try:
        return _network(value)
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


def reserved_block(supernet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The top 1/64 of the supernet stays free for a future bridged (TAP) segment."""
    return ipaddress.IPv4Network(
        (int(supernet.broadcast_address) + 1 - (supernet.num_addresses >> 6), supernet.prefixlen + 6)
    )


def capacity(lan: LanSpec) -> int:
    """How many nodes the LAN holds: each takes a UDP and a TCP pool of /pool_prefix, below the reserve."""
    supernet = ipaddress.IPv4Network(lan.supernet)
    usable = int(reserved_block(supernet).network_address) - int(supernet.network_address)
    return max(0, usable // (2 << (32 - lan.pool_prefix)))


def _allocate_pools(lan, supernet, nodes_by_age, previous_blocks=None):
    """Keep every pool a node holds; give missing ones slots in their region's blocks (addresses.py).

    Returns (pools by node, blocks by region)."""
    reserved = reserved_block(supernet)
    fixed = _fixed_pools(lan, supernet, reserved, nodes_by_age)
    plan = AddressPlan(supernet, lan.pool_prefix, reserved, previous_blocks)
    for *_, pool in fixed:
        plan.occupy_pool(pool)
    plan.adopt_previous({n.region for n in nodes_by_age})
    result: dict[str, NodePools] = {}
    for node in nodes_by_age:
        udp, tcp = node.udp_pool, node.tcp_pool
        if udp is None or tcp is None:
            try:
                slot = plan.pools(plan.allocate(node.region))
            except PlanError:
                missing = [n.name for n in nodes_by_age
                           if n.name not in result and (n.udp_pool is None or n.tcp_pool is None)]
                raise PlanError(
                    f"this LAN is full: supernet {supernet} holds {plan.capacity} nodes with /{lan.pool_prefix} "
                    f"pools (each node takes a UDP and a TCP pool), and there is no room for: "
                    f"{', '.join(missing)}. Choose smaller pools (a longer prefix) or a larger supernet "
                    "in the LAN's settings."
                ) from None
            result[node.name] = NodePools(_network(udp) if udp else slot.udp, _network(tcp) if tcp else slot.tcp)
        else:
            result[node.name] = NodePools(_network(udp), _network(tcp))
    return result, plan.region_blocks({n.region for n in nodes_by_age})
