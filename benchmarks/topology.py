"""Benchmark planning and rendering: `.venv/bin/python benchmarks/topology.py`.

Nodes sit at seeded random points around eight cities, one region per city; the RTT between two nodes comes
from their great-circle distance. For each mode and size it prints plan + render time, peak memory
(tracemalloc, measured in a second run so it does not slow the timed one), tunnels per node, routes per node
and the mean path stretch (RTT along the planned path / direct RTT, over 2,000 seeded node pairs). It also
writes docs/topology-benchmark.svg from the results.
"""

from __future__ import annotations

import math
import random
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodes.render import render_lan  # noqa: E402
from nodes.topology import LanSpec, NodeSpec, plan_lan  # noqa: E402

CITIES = {  # region path -> (latitude, longitude)
    "asia/cn/east": (30.3, 120.2), "asia/hk": (22.3, 114.2), "asia/jp": (35.7, 139.7), "eu/de": (50.1, 8.7),
    "eu/uk": (51.5, -0.1), "na/us/east": (40.7, -74.0), "na/us/west": (37.8, -122.4), "sa/br": (-23.5, -46.6),
}
SIZES = (10, 100, 500, 1000)
MODES = ("hub", "mesh", "hierarchical", "auto")
LINK_LIMIT = 255  # an upstream has 254 link addresses, so hub and mesh stop at 255 nodes


def great_circle_km(a, b) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(h))


def make_lan(count: int, seed: int = 7):
    """Nodes spread round the cities, and RTTs: 1 ms plus light in fibre (200 km/ms) both ways, 1.5x detour."""
    rng = random.Random(seed)
    regions = list(CITIES)
    nodes, where = [], {}
    for i in range(count):
        region = regions[i % len(regions)] if i < len(regions) else rng.choice(regions)
        lat, lon = CITIES[region]
        where[f"n{i}"] = (lat + rng.uniform(-3, 3), lon + rng.uniform(-3, 3))
        nodes.append(NodeSpec(f"n{i}", region=region, order=i, public_address=f"198.51.{i // 250}.{i % 250 + 1}"))
    names = sorted(where)
    rtts = {
        frozenset((a, b)): 1 + 1.5 * 2 * great_circle_km(where[a], where[b]) / 200
        for i, a in enumerate(names) for b in names[i + 1:]
    }
    return nodes, rtts


def stretch(plan, rtts, names, rng) -> float:
    ratios = []
    for _ in range(2000):
        a, b = rng.sample(names, 2)
        path = plan.path(a, b)
        along = sum(rtts[frozenset(pair)] for pair in zip(path, path[1:]))
        ratios.append(along / rtts[frozenset((a, b))])
    return sum(ratios) / len(ratios)


def measure(mode: str, count: int) -> dict:
    nodes, rtts = make_lan(count)
    lan = LanSpec(mode=mode, pool_prefix=20 if count > 100 else 16)
    started = time.perf_counter()
    plan = plan_lan(lan, nodes, rtts=rtts)
    files = render_lan(plan, lan, nodes)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    render_lan(plan_lan(lan, nodes, rtts=rtts), lan, nodes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    names = [n.name for n in nodes]
    tunnels = [plan.tunnels(n) for n in names]
    routes = [len(plan.routes[n]) for n in names]
    return {
        "mode": mode, "resolved": plan.mode, "n": count, "seconds": elapsed, "peak_mb": peak / 2**20,
        "tunnels_max": max(tunnels), "tunnels_mean": sum(tunnels) / count, "limit": 2 * math.sqrt(count),
        "routes_mean": sum(routes) / count, "routes_max": max(routes),
        "stretch": stretch(plan, rtts, names, random.Random(count)),
        "files": sum(len(f) for f in files.values()),
    }


def write_svg(results: list[dict], path: Path) -> None:
    """Grouped bars of plan + render time per size, one colour per mode, log scale, with the 2 s target."""
    colours = {"hub": "#8c6d31", "mesh": "#d62728", "hierarchical": "#1f77b4", "auto": "#2ca02c"}
    width, height, left, bottom, top = 760, 360, 70, 300, 40

    def y(seconds: float) -> float:  # log scale from 1 ms to 10 s
        return bottom - (math.log10(max(seconds, 1e-3)) + 3) / 4 * (bottom - top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">LanHub plan + render time '
           f'(log scale; 8 geographic regions, RTT from distance)</text>']
    for seconds, label in ((1e-3, "1 ms"), (1e-2, "10 ms"), (0.1, "100 ms"), (1, "1 s"), (10, "10 s")):
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(seconds):.1f}" y2="{y(seconds):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 8}" y="{y(seconds) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(2):.1f}" y2="{y(2):.1f}" stroke="#d62728" '
               f'stroke-dasharray="6 4"/><text x="{width - 22}" y="{y(2) - 5:.1f}" text-anchor="end" '
               f'fill="#d62728">2 s target</text>')
    slot = (width - left - 20) / len(SIZES)
    bar = slot / (len(MODES) + 1)
    for i, size in enumerate(SIZES):
        x0 = left + i * slot + bar / 2
        out.append(f'<text x="{x0 + bar * len(MODES) / 2:.1f}" y="{bottom + 18}" text-anchor="middle">'
                   f'{size} nodes</text>')
        for j, mode in enumerate(MODES):
            row = next((r for r in results if r["n"] == size and r["mode"] == mode), None)
            x = x0 + j * bar
            if row is None:
                out.append(f'<text x="{x + bar / 2:.1f}" y="{bottom - 6}" text-anchor="middle" font-size="10" '
                           f'fill="#999">skip</text>')
                continue
            top_y = y(row["seconds"])
            out.append(f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar - 4:.1f}" height="{bottom - top_y:.1f}" '
                       f'fill="{colours[mode]}"><title>{mode} {size}: {row["seconds"] * 1000:.0f} ms</title></rect>')
    for j, mode in enumerate(MODES):
        out.append(f'<rect x="{left + j * 150}" y="{height - 28}" width="12" height="12" fill="{colours[mode]}"/>'
                   f'<text x="{left + j * 150 + 18}" y="{height - 18}">{mode}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    header = (f"{'mode':<13}{'n':>5} {'resolved':<13}{'time':>9}{'peak MB':>9}{'tun max':>8}{'2√n':>7}"
              f"{'tun mean':>9}{'routes mean':>12}{'routes max':>11}{'stretch':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for count in SIZES:
        for mode in MODES:
            if mode in ("hub", "mesh") and count > LINK_LIMIT:
                print(f"{mode:<13}{count:>5} skipped: one upstream would need {count - 1} links (254 addresses); "
                      f"{'mesh would also mean n-1 tunnels on every node' if mode == 'mesh' else 'single hub'}")
                continue
            r = measure(mode, count)
            results.append(r)
            print(f"{mode:<13}{count:>5} {r['resolved']:<13}{r['seconds'] * 1000:>7.0f}ms{r['peak_mb']:>9.1f}"
                  f"{r['tunnels_max']:>8}{r['limit']:>7.1f}{r['tunnels_mean']:>9.2f}{r['routes_mean']:>12.1f}"
                  f"{r['routes_max']:>11}{r['stretch']:>8.2f}")
    write_svg(results, ROOT / "docs" / "topology-benchmark.svg")
    print("wrote docs/topology-benchmark.svg")


if __name__ == "__main__":
    main()
