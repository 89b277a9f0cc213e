"""Links between nodes: the hub, mesh and hierarchical builders (region grouping, RTT clustering, shortcuts),
pins and repair, and the fixed link addresses.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from itertools import combinations
from typing import Mapping, Sequence

from nodes.topology.model import LinkPlan, NodeSpec, PlanError, link_range

AUTO_MESH_MAX = 5
RTT_UNKNOWN = 1.0  # one "hop" when nothing was measured


class _Rtt:
    """RTT between two nodes in ms: measured (the table), else estimated from both nodes' locations (computed on
    demand, so a LAN of n located nodes costs no n^2 matrix), else RTT_UNKNOWN (one "hop")."""

    def __init__(self, rtts, locations=None):
        self.table: dict[tuple[str, str], float] = {}
        for key, value in (rtts or {}).items():
            a, b = sorted(key)
            self.table[(a, b)] = float(value)
        self.points = {name: _unit_vector(point) for name, point in (locations or {}).items()}
        self.estimated: set[tuple[str, str]] = set()

    def __call__(self, a: str, b: str) -> float:
        key = (a, b) if a < b else (b, a)
        value = self.table.get(key)
        if value is not None:
            return value
        pa, pb = self.points.get(a), self.points.get(b)
        if pa is None or pb is None:
            return RTT_UNKNOWN
        # Estimates are kept once computed (clustering asks for the same pairs round after round); only pairs the
        # planner looks at are ever computed, never the n^2 matrix.
        value = self.table[key] = 1.0 + _KM_PER_CHORD_ASIN / 100.0 * math.asin(min(1.0, math.dist(pa, pb) / 2))
        self.estimated.add(key)
        return value

    def known(self, a: str, b: str) -> bool:
        return ((a, b) if a < b else (b, a)) in self.table or (a in self.points and b in self.points)

    def covers(self, names) -> bool:
        """Whether every pair of ``names`` is known (measured or both located)."""
        names = frozenset(names)
        if names <= self.points.keys():
            return True
        n = len(names)
        known = sum(a in names and b in names for a, b in self.table if (a, b) not in self.estimated)
        return known >= n * (n - 1) // 2


_KM_PER_CHORD_ASIN = 2 * 6371.0  # great-circle distance = 2R * asin(chord / 2) on the unit sphere


def _unit_vector(point) -> tuple[float, float, float]:
    lat, lon = math.radians(point[0]), math.radians(point[1])
    return math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)


def _radians(point) -> tuple[float, float, float]:
    return _unit_vector(point)


def estimated_rtt_ms(a, b) -> float:
    """RTT guess from great-circle distance (points as _unit_vector gives them): light in fibre covers ~100 km
    per ms of round trip, plus 1 ms."""
    return 1.0 + _KM_PER_CHORD_ASIN / 100.0 * math.asin(min(1.0, math.dist(a, b) / 2))


def _rtt_lookup(rtts, locations=None) -> _Rtt:
    return _Rtt(rtts, locations)


def _resolve_mode(mode: str, healthy: Sequence[NodeSpec]) -> str:
    if mode != "auto":
        return mode
    return "mesh" if len(healthy) <= AUTO_MESH_MAX else "hierarchical"


class _LinkBuilder:
    """Collects links as unordered pairs with a direction, applying the mode, the pins and a final repair."""

    def __init__(self, healthy: Sequence[NodeSpec], by_name: Mapping[str, NodeSpec], rtt, previous=frozenset(),
                 previous_primaries: Mapping[str, str] | None = None):
        self.healthy = list(healthy)
        self.previous = previous  # pairs linked in the plan before this one (from link_addresses)
        self.previous_primaries = dict(previous_primaries or {})  # region path -> its primary in the plan before
        self.previous_adj: dict[str, set[str]] = {}
        for pair in previous:
            if len(pair) == 2:
                a, b = tuple(pair)
                self.previous_adj.setdefault(a, set()).add(b)
                self.previous_adj.setdefault(b, set()).add(a)
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
    RTT, shortest pairs first (a greedy spanner), within the tunnel budget. A shortcut joins two region primaries
    or two core nodes of one region, never a head to another region, so routes aggregate by region. Leaves stay single-homed, so their
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
        self.path = ""  # the region being linked (run); its previous primary is the incumbent centre
        # RTT-driven choices need every pair measured (a partial matrix would read unmeasured pairs as 1 ms).
        self.measured = n > 2 and builder.rtt.covers(free)

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
            self.path = path
            primary = self.connect(units, self.RESERVE if path else 0)
            primaries[path] = primary
            self.reps.add(primary)
            if path:
                child_reps[path.rpartition("/")[0]].append(primary)
        if self.measured:
            self._shortcuts(set(primaries.values()))
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
        return self._centre(candidates, units, self.b.previous_primaries.get(self.path))

    def _centre(self, candidates: list[str], group: list[str], incumbent: str | None = None) -> str:
        """The candidate with the least RTT to the group (a sample of it, for big groups).

        Hysteresis: the incumbent (the region's primary in the previous plan, when the caller knows it), else the
        candidates already linked to most of the group in the previous plan (``link_addresses``), count
        INCUMBENT_MARGIN closer, so a small RTT change does not move a primary and all its links.
        """
        if len(candidates) == 1 or not self.measured:
            return min(candidates, key=self.b.rank.__getitem__)
        rtt, previous = self.b.rtt, self.b.previous
        sample = group if len(group) <= 64 else group[:: math.ceil(len(group) / 32)]
        incumbent = incumbent if incumbent in candidates else None
        if len(candidates) > 64:
            # A sample of the candidates (every k-th by rank) plus the previous plan's centres: the most central
            # of 64 is central enough, and it keeps a big region at O(64 * 64) instead of O(n * 64). With the
            # incumbent known, only it joins the sample: a re-plan then weighs the same candidates as the plan
            # before, and a node joining elsewhere does not move the centre to a unit that plan never looked at.
            held_before = [incumbent] if incumbent else [
                c for c in candidates if any(frozenset((c, u)) in previous for u in sample)]
            candidates = sorted({*candidates[:: math.ceil(len(candidates) / 32)], *held_before[:32]},
                                key=self.b.rank.__getitem__)
        scores = {c: sum(rtt(c, u) for u in sample if u != c) for c in candidates}
        if incumbent:
            scores[incumbent] *= 1 - self.INCUMBENT_MARGIN
        elif previous:
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
        # Incremental: the heads of the previous plan stay heads (a unit that had two or more of this group's
        # units linked to it), so one node joining or leaving does not reshuffle the group and its files.
        members, previous = set(units), self.b.previous_adj
        kept = sorted((u for u in units if u != primary and len(previous.get(u, set()) & members) >= 2),
                      key=rank.__getitem__)[: count - 1]
        heads += kept
        if self.measured:
            nearest = {u: min(rtt(u, h) for h in heads) for u in units}
            while len(heads) < count:
                head = max((u for u in fresh if u not in heads), key=lambda u: (nearest[u], -degree[u], -rank[u]))
                heads.append(head)
                for u in units:
                    nearest[u] = min(nearest[u], rtt(u, head))
        else:
            heads += [u for u in fresh if u not in heads][: max(0, count - len(heads))]
        groups = self._assign(units, heads, room)
        for _ in range(self.LLOYD_ROUNDS if self.measured and not kept else 0):
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
        to = {u: {h: rtt(u, h) for h in heads} for u in others}  # each distance once
        order = sorted(others, key=lambda u: (min(to[u].values()), rank[u]))
        previous = self.b.previous_adj
        for unit in order:
            open_heads = [h for h in heads if left[h] > 0] or heads
            head = min(open_heads, key=lambda h: (to[unit][h], rank[h]))
            # A unit stays with its previous head unless another is clearly closer (hysteresis, as for links).
            before = [h for h in open_heads if h in previous.get(unit, ())]
            if before and to[unit][before[0]] <= self.KEEP_STRETCH * to[unit][head]:
                head = before[0]
            groups[head].append(unit)
            left[head] -= 1
        return {h: sorted(g, key=rank.__getitem__) for h, g in groups.items()}

    # -- shortcuts ---------------------------------------------------------------------------------------

    def _shortcuts(self, primaries: set[str]) -> None:
        """Greedy spanner over the core: shortest pairs first, link when the planned path is too long.

        Distances are kept as an all-pairs matrix over the core (leaves carry no transit traffic), updated
        in O(core^2) per new link.

        A shortcut joins two region primaries, or two core nodes of the same region: never a head to another
        region. So every region is entered from outside only through its primary, every node outside it reaches
        all of the region's nodes through one first hop, and their routes and iroutes aggregate to the region's
        address blocks (nodes/topology/addresses.py) instead of one prefix per node a head serves.
        """
        region = {name: self.b.by_name[name].region for name in self.reps}

        def allowed(a: str, b: str) -> bool:
            return (a in primaries and b in primaries) or region[a] == region[b]
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
        # All pairs by Dijkstra from each core node (the core is sparse: O(V E log V) rather than Floyd's V^3).
        adj: list[list[tuple[int, float]]] = [[] for _ in range(size)]
        for i in range(size):
            for j in range(size):
                if i != j and dist[i][j] != inf:
                    adj[i].append((j, dist[i][j]))
        for source in range(size):
            row = dist[source]
            heap = [(0.0, source)]
            done = [False] * size
            while heap:
                d, node = heapq.heappop(heap)
                if done[node]:
                    continue
                done[node] = True
                row[node] = d
                for nbr, w in adj[node]:
                    if not done[nbr] and d + w < row[nbr]:
                        row[nbr] = d + w
                        heapq.heappush(heap, (d + w, nbr))
        pairs = sorted(
            ((rtt(a, b), self.b.rank[a], self.b.rank[b], a, b) for a, b in combinations(core, 2)
             if rtt.known(a, b) and frozenset((a, b)) not in self.b.direction and allowed(a, b)),
        )
        # Incremental: the previous plan's shortcuts stay (within the budget) before any new one is considered, so
        # a node joining or leaving elsewhere does not re-run the spanner's choices and move links around.
        previous = self.b.previous
        kept = [p for p in pairs if frozenset((p[3], p[4])) in previous]
        fresh = [p for p in pairs if frozenset((p[3], p[4])) not in previous]
        for keep, (w, _, _, a, b) in [(True, p) for p in kept] + [(False, p) for p in fresh]:
            if degree[a] >= self.budget or degree[b] >= self.budget:
                continue
            i, j = index[a], index[b]
            if not keep and dist[i][j] <= self.SHORTCUT_STRETCH * w:
                continue
            if keep and dist[i][j] <= w:
                continue  # the planned path is already as short as the link: it adds nothing any more
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
    taken: dict[str, set[int]] = {}
    chosen: dict[tuple[str, str], int] = {}
    ranges = {up: tuple(map(int, link_range(pools[up].udp))) for up, _ in oriented}
    for up, down in oriented:
        first, last = ranges[up]
        try:
            old = int(ipaddress.IPv4Address(previous.get((up, down), "")))
        except ValueError:
            continue
        if first <= old <= last and old not in taken.setdefault(up, set()):
            taken[up].add(old)
            chosen[(up, down)] = old
    cursor: dict[str, int] = {}
    for up, down in oriented:
        if (up, down) in chosen:
            continue
        first, last = ranges[up]
        used = taken.setdefault(up, set())
        address = cursor.get(up, first)  # lowest free address (nothing is freed while assigning)
        while address in used:
            address += 1
        if address > last:
            raise PlanError(f"node {up} would serve more than {last - first + 1} links")
        used.add(address)
        cursor[up] = address + 1
        chosen[(up, down)] = address
    return tuple(LinkPlan(up, down, ipaddress.IPv4Address(chosen[(up, down)])) for up, down in oriented)
