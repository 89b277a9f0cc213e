"""Benchmark planning and rendering: `.venv/bin/python benchmarks/topology.py [--sizes 10,100,...] [--mode auto]`.

Nodes sit at seeded random points around eight cities, one region per city (region paths two or three deep); the
planner gets each node's location and estimates RTTs from great-circle distance on demand, as LanHub does for
nodes with coordinates. Every size runs in a fresh child process, so ``peak_rss_mb`` is the whole process's peak
resident memory (ru_maxrss: interpreter, Django-free planner, plan and every rendered file), not tracemalloc's view.

One JSON line per size, with:
- ``plan_s``: ``topology.plan_lan``; ``render_s``: ``render_lan`` (every file of every node);
  ``floor_s``: ``topology.check_lan`` in the same run (validating the nodes and allocating pools: the O(n) work any
  plan needs), so a slow machine shows in both;
- ``max_tunnels`` (target 2*sqrt(n)), ``max_routes`` (the most route lines in one node's files), ``max_iroutes``
  (the most iroute lines in one ccd file; OpenVPN's per-client limit is 256);
- ``stretch_mean`` / ``stretch_p99``: RTT along the planned path over the direct RTT, 2,000 seeded pairs (both RTTs
  estimated the way the planner estimates them: 1 ms plus 1 ms per 100 km of great-circle distance, per hop);
  ``stretch_p99_same_region`` / ``stretch_p99_across_regions``: the p99 of the same pairs split by whether both
  nodes are in one region (``pairs_same_region`` of them); ``extra_ms_p99`` / ``extra_ms_p99_same_region``: the
  p99 of what the planned path adds to the direct RTT in ms (what a player feels), over all pairs and in one region;
  ``pairs_over_2``: how many of the 2,000 pairs have a stretch over 2 (p99 <= 2 allows 20);
  ``reference_star_stretch_p99`` / ``reference_star_pairs_over_2``: the same pairs on the hierarchy itself with no
  tunnel limit (every node on its region's primary, primaries meshed): what the hierarchy itself costs;
- ``nodes_touched_on_add``: one more node joins (a seeded region), planned the way LanHub re-plans (pools, link
  addresses, region blocks and primaries passed back): how many nodes' files differ, every file counted (the
  discovery relay's relay.json included: it names the node's relay-tree neighbours), the new node included.
Targets (issue #11): 1,000 nodes under 1 s and 5,000 under 5 s (plan + render), under 1 GB, max_iroutes <= 256,
max_tunnels <= 2*sqrt(n), stretch_p99 <= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodes.render import render_lan  # noqa: E402
from nodes.topology import LanSpec, NodeSpec, check_lan, plan_lan  # noqa: E402
from nodes.topology.links import _radians, estimated_rtt_ms  # noqa: E402

CITIES = {  # region path -> (latitude, longitude)
    "asia/cn/east": (30.3, 120.2), "asia/hk": (22.3, 114.2), "asia/jp": (35.7, 139.7), "eu/de": (50.1, 8.7),
    "eu/uk": (51.5, -0.1), "na/us/east": (40.7, -74.0), "na/us/west": (37.8, -122.4), "sa/br": (-23.5, -46.6),
}
SIZES = (10, 100, 500, 1000, 2000, 5000)


def pool_prefix(count: int) -> int:
    """The pool size a LAN of this size is set to (explicit: LanHub never changes it on its own). A /8 holds
    (2^(p-8) - 2^(p-14)) / 2 nodes with /p pools: 126 at /16, 2,016 at /20, 8,064 at /22."""
    return 16 if count <= 100 else 20 if count <= 1000 else 22


def make_lan(count: int, seed: int = 7):
    rng = random.Random(seed)
    regions = list(CITIES)
    nodes, where = [], {}
    for i in range(count + 1):  # the last one joins later (nodes_touched_on_add)
        region = regions[i % len(regions)] if i < len(regions) else rng.choice(regions)
        lat, lon = CITIES[region]
        name = f"n{i}"
        where[name] = (lat + rng.uniform(-3, 3), lon + rng.uniform(-3, 3))
        nodes.append(NodeSpec(name, region=region, order=i, public_address=f"198.51.{i // 250}.{i % 250 + 1}"))
    return nodes[:count], nodes[count], where


def stretch(plan, where, names, rng, regions) -> dict[str, float]:
    """Mean and p99 of planned-path RTT over direct RTT for 2,000 random pairs, and the p99 of the pairs in one
    region and of the pairs in two (the same pairs, split: where the tail comes from).

    Next to them, the reference: the same pairs on the hierarchy's own shape drawn without any limit (a
    primary per region, secondaries attached to it, primaries linked to each other): every node linked straight
    to its region's primary (the plan's), every two primaries linked, no tunnel limit, so no heads in between."""
    points = {n: _radians(where[n]) for n in names}

    def rtt(a, b):
        return estimated_rtt_ms(points[a], points[b])

    def star(a, b):
        path = [a]
        for hub in (plan.primaries[regions[a]], plan.primaries[regions[b]]):
            if hub != path[-1]:
                path.append(hub)
        if b != path[-1]:
            path.append(b)
        return sum(rtt(x, y) for x, y in zip(path, path[1:]))

    ratios, same, across, extra, extra_same, reference = [], [], [], [], [], []
    for _ in range(2000):
        a, b = rng.sample(names, 2)
        path = plan.path(a, b)
        planned, direct = sum(rtt(x, y) for x, y in zip(path, path[1:])), rtt(a, b)
        ratios.append(planned / direct)
        reference.append(star(a, b) / direct)
        extra.append(planned - direct)
        (same if regions[a] == regions[b] else across).append(ratios[-1])
        if regions[a] == regions[b]:
            extra_same.append(planned - direct)

    def p99(values):
        values = sorted(values)
        return round(values[min(len(values) - 1, int(0.99 * len(values)))], 3) if values else None

    return {"stretch_mean": round(sum(ratios) / len(ratios), 3), "stretch_p99": p99(ratios),
            "stretch_p99_same_region": p99(same), "stretch_p99_across_regions": p99(across),
            "pairs_same_region": len(same),
            "extra_ms_p99": p99(extra), "extra_ms_p99_same_region": p99(extra_same),
            "reference_star_stretch_p99": p99(reference), "reference_star_pairs_over_2": sum(r > 2 for r in reference),
            "pairs_over_2": sum(r > 2 for r in ratios)}


def _count(files, keyword: str, prefix: str = "") -> int:
    return max((f.content.count(f"\n{keyword} ") for path, f in files.items() if path.startswith(prefix)), default=0)


def measure(count: int, mode: str) -> dict:
    nodes, newcomer, where = make_lan(count)
    lan = LanSpec(mode=mode, pool_prefix=pool_prefix(count))
    locations = {n: where[n] for n in where}
    started = time.perf_counter()
    check_lan(lan, nodes)
    floor = time.perf_counter() - started
    started = time.perf_counter()
    plan = plan_lan(lan, nodes, locations=locations)
    planned = time.perf_counter() - started
    files = render_lan(plan, lan, nodes)
    rendered = time.perf_counter() - started - planned
    names = [n.name for n in nodes]
    stretches = stretch(plan, where, names, random.Random(count), {n.name: n.region for n in nodes})
    before = {name: {p: f.sha256 for p, f in node_files.items()} for name, node_files in files.items()}
    row = {
        "nodes": count, "mode": mode, "resolved": plan.mode, "pool_prefix": lan.pool_prefix,
        "plan_s": round(planned, 3), "render_s": round(rendered, 3), "floor_s": round(floor, 4),
        "max_tunnels": max(plan.tunnels(n) for n in names), "tunnel_limit": math.floor(2 * math.sqrt(count)),
        "max_routes": max(_count(f, "route") for f in files.values()),
        "max_iroutes": max(_count(f, "iroute", "/etc/openvpn/server/ccd/") for f in files.values()),
        **stretches,
    }
    # One more node, re-planned as LanHub does: every existing node keeps its pools and its links' addresses.
    kept = [NodeSpec(**{**n.__dict__, "udp_pool": str(plan.pools[n.name].udp),
                        "tcp_pool": str(plan.pools[n.name].tcp)}) for n in nodes]
    addresses = {(link.upstream, link.downstream): str(link.address) for link in plan.links}
    del files  # the portal never holds two renders of the LAN at once: only their digests are compared
    grown = [*kept, newcomer]
    blocks = {region: [str(b) for b in nets] for region, nets in plan.blocks.items()}
    after = render_lan(plan_lan(lan, grown, link_addresses=addresses, locations=locations, blocks=blocks,
                                primaries=plan.primaries), lan, grown)
    row["nodes_touched_on_add"] = sum(
        {p: f.sha256 for p, f in after[n].items()} != before.get(n, {})
        for n in after
    )
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--mode", default="auto", choices=("auto", "hierarchical", "hub", "mesh"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process measuring one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.mode)), flush=True)
        return
    for count in map(int, args.sizes.split(",")):
        # A fresh process per size: ru_maxrss is the peak of the whole process since it started.
        subprocess.run([sys.executable, __file__, "--one", str(count), "--mode", args.mode], check=True)


if __name__ == "__main__":
    main()
