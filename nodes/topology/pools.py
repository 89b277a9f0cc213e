"""Validation of a LAN's input (names, regions, pins, supernet) and allocation of each node's UDP and TCP pools."""

from __future__ import annotations

import ipaddress
import re
from typing import Sequence

from nodes import layout
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
