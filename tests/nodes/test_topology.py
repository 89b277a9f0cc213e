"""Planning: pools, links per mode, pins, down nodes, routes, bad input. Pure code, no database."""

import ipaddress
import math
import random
from collections import namedtuple
from itertools import combinations

from django.test import SimpleTestCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.routing import plan_routes
from nodes.topology import LanSpec, NodePools, NodeSpec, PlanError, plan_lan

net = ipaddress.IPv4Network
addr = ipaddress.IPv4Address

HANGZHOU = NodeSpec("hangzhou", region="asia/cn/east", order=0, public_address="203.0.113.10")
HONGKONG = NodeSpec("hongkong", region="asia/hk", order=1, public_address="203.0.113.11")


def nodes(count, **kwargs):
    return [NodeSpec(f"n{i}", order=i, public_address=f"198.51.100.{i}", **kwargs) for i in range(count)]


def link_pairs(plan):
    return {(link.upstream, link.downstream) for link in plan.links}


class PoolTests(SimpleTestCase):
    def test_it_carves_the_reference_pools_downward_below_the_reserved_block(self):
        plan = plan_lan(LanSpec(), [HONGKONG, HANGZHOU])
        self.assertEqual(plan.pools["hangzhou"].udp, net("10.0.0.0/16"))
        self.assertEqual(plan.pools["hangzhou"].tcp, net("10.1.0.0/16"))
        self.assertEqual(plan.pools["hongkong"].udp, net("10.2.0.0/16"))
        self.assertEqual(plan.pools["hongkong"].tcp, net("10.3.0.0/16"))

    def test_it_keeps_existing_pools_and_reuses_a_freed_one(self):
        old = NodeSpec("old", order=5, udp_pool="10.247.0.0/16", tcp_pool="10.246.0.0/16")
        new = NodeSpec("new", order=9)
        plan = plan_lan(LanSpec(), [old, new])
        self.assertEqual(plan.pools["old"].udp, net("10.247.0.0/16"))
        # Nodes without a region fill from the top down; the top slot is free again (its node was removed).
        self.assertEqual((plan.pools["new"].udp, plan.pools["new"].tcp), (net("10.250.0.0/16"), net("10.251.0.0/16")))

    def test_it_allocates_missing_pools_oldest_first(self):
        plan = plan_lan(LanSpec(pool_prefix=20), [NodeSpec("b", order=2), NodeSpec("a", order=1)])
        self.assertEqual(plan.pools["a"].udp, net("10.251.224.0/20"))
        self.assertEqual(plan.pools["b"].udp, net("10.251.192.0/20"))

    def test_a_regions_nodes_share_one_block_that_routes_aggregate_to(self):
        lan = [NodeSpec(f"cn{i}", region="asia/cn", order=i) for i in range(4)]
        lan += [NodeSpec(f"de{i}", region="eu/de", order=10 + i) for i in range(4)]
        plan = plan_lan(LanSpec(pool_prefix=20, mode="hub"), lan)
        (cn_block,) = plan.blocks["asia/cn"]
        (de_block,) = plan.blocks["eu/de"]
        self.assertFalse(cn_block.overlaps(de_block))
        for name, pools in plan.pools.items():
            block = cn_block if name.startswith("cn") else de_block
            self.assertTrue(pools.udp.subnet_of(block) and pools.tcp.subnet_of(block), name)
        # Four nodes, each a /19 (UDP + TCP /20): one /17 per region.
        self.assertEqual(cn_block.prefixlen, 17)

    def test_a_region_keeps_its_block_when_the_lan_is_planned_again(self):
        first = plan_lan(LanSpec(pool_prefix=20), [NodeSpec("a", region="asia/cn")])
        blocks = {region: [str(b) for b in nets] for region, nets in first.blocks.items()}
        kept = NodeSpec("a", region="asia/cn", udp_pool=str(first.pools["a"].udp), tcp_pool=str(first.pools["a"].tcp))
        second = plan_lan(LanSpec(pool_prefix=20), [kept, NodeSpec("b", region="asia/cn", order=1)], blocks=blocks)
        self.assertTrue(second.pools["b"].udp.subnet_of(second.blocks["asia/cn"][0]))
        self.assertEqual(len(second.blocks["asia/cn"]), 1)

    def test_a_full_lan_is_a_clear_error_naming_its_capacity(self):
        lan = LanSpec(supernet="10.0.0.0/14", pool_prefix=16)  # a /14 less its top /20: one /15 slot
        with self.assertRaisesRegex(PlanError, "this LAN is full: supernet 10.0.0.0/14 holds 1 nodes.*: b"):
            plan_lan(lan, [NodeSpec("a"), NodeSpec("b", order=1)])

    def test_it_rejects_overlapping_fixed_pools(self):
        lan = [NodeSpec("alpha", udp_pool="10.1.0.0/16"), NodeSpec("beta", tcp_pool="10.1.128.0/17")]
        with self.assertRaisesRegex(PlanError, "alpha.*beta"):
            plan_lan(LanSpec(), lan)

    def test_it_rejects_a_fixed_pool_outside_the_supernet(self):
        with self.assertRaisesRegex(PlanError, "alpha.*outside"):
            plan_lan(LanSpec(), [NodeSpec("alpha", udp_pool="192.168.0.0/16")])

    def test_it_rejects_a_fixed_pool_in_the_reserved_block(self):
        with self.assertRaisesRegex(PlanError, "alpha.*reserved"):
            plan_lan(LanSpec(), [NodeSpec("alpha", udp_pool="10.253.0.0/16")])

    def test_it_rejects_a_supernet_too_small_naming_the_nodes_left_out(self):
        lan = LanSpec(supernet="10.0.0.0/16", pool_prefix=18)
        with self.assertRaisesRegex(PlanError, "n1, n2"):
            plan_lan(lan, nodes(3))

    def test_it_rejects_pools_smaller_than_a_22(self):
        with self.assertRaisesRegex(PlanError, "/22"):
            plan_lan(LanSpec(pool_prefix=23), nodes(1))

    def test_it_rejects_bad_names_duplicates_and_unknown_pins(self):
        for lan, message in [
            ([NodeSpec("Bad_Name")], "Bad_Name"),
            ([NodeSpec("a"), NodeSpec("a")], "two nodes are named a"),
            ([NodeSpec("a", pinned_upstream="ghost")], "a is pinned to unknown node ghost"),
        ]:
            with self.subTest(message), self.assertRaisesRegex(PlanError, message):
                plan_lan(LanSpec(), lan)


class ModeTests(SimpleTestCase):
    def test_two_nodes_in_auto_mode_put_hongkong_downstream_of_hangzhou(self):
        plan = plan_lan(LanSpec(), [HANGZHOU, HONGKONG])
        self.assertEqual([(l.upstream, l.downstream, l.address) for l in plan.links],
                         [("hangzhou", "hongkong", addr("10.0.0.2"))])

    def test_auto_mode_meshes_small_lans_and_goes_hierarchical_above_five(self):
        self.assertEqual(plan_lan(LanSpec(), nodes(5)).mode, "mesh")
        self.assertEqual(plan_lan(LanSpec(), nodes(6)).mode, "hierarchical")

    def test_hub_mode_links_everyone_to_the_highest_priority_node(self):
        lan = nodes(4) + [NodeSpec("boss", priority=5, order=9)]
        plan = plan_lan(LanSpec(mode="hub"), lan)
        self.assertEqual(link_pairs(plan), {("boss", f"n{i}") for i in range(4)})
        self.assertEqual(plan.primaries[""], "boss")

    def test_a_down_primary_is_replaced_and_keeps_its_pools_without_links(self):
        lan = [NodeSpec("boss", priority=5, healthy=False)] + nodes(3)
        plan = plan_lan(LanSpec(mode="hub"), lan)
        self.assertEqual(link_pairs(plan), {("n0", "n1"), ("n0", "n2")})
        self.assertIn("boss", plan.pools)
        self.assertEqual(plan.routes["boss"], ())
        self.assertNotIn(plan.pools["boss"].udp, [r.prefix for r in plan.routes["n0"]])

    def test_mesh_mode_links_every_pair_with_the_higher_ranked_upstream(self):
        plan = plan_lan(LanSpec(mode="mesh"), nodes(5))
        self.assertEqual(link_pairs(plan), {(f"n{a}", f"n{b}") for a, b in combinations(range(5), 2)})

    def test_hierarchical_mode_gives_each_region_a_primary_and_links_sibling_primaries(self):
        lan = [
            NodeSpec("hz", region="asia/cn", order=0), NodeSpec("sh", region="asia/cn", order=1),
            NodeSpec("hk", region="asia/hk", order=2), NodeSpec("hk2", region="asia/hk", order=3),
            NodeSpec("fra", region="eu/de", order=4), NodeSpec("ber", region="eu/de", order=5),
        ]
        plan = plan_lan(LanSpec(mode="hierarchical"), lan)
        self.assertEqual(plan.primaries, {"asia/cn": "hz", "asia/hk": "hk", "eu/de": "fra", "asia": "hz",
                                          "eu": "fra", "": "hz"})
        self.assertEqual(link_pairs(plan), {("hz", "sh"), ("hk", "hk2"), ("fra", "ber"), ("hz", "hk"),
                                            ("hz", "fra")})

    def test_hierarchical_mode_splits_a_big_region_to_keep_tunnels_within_two_root_n(self):
        for count in (10, 50, 200):
            plan = plan_lan(LanSpec(mode="hierarchical", pool_prefix=20), nodes(count, region="eu"))
            with self.subTest(count):
                self.assertLessEqual(max(plan.tunnels(n) for n in plan.pools), 2 * math.sqrt(count))

    def test_pins_are_honoured_in_every_mode(self):
        lan = nodes(6) + [NodeSpec("x", order=9, pinned_upstream="n4")]
        for mode in ("hub", "mesh", "hierarchical"):
            with self.subTest(mode):
                plan = plan_lan(LanSpec(mode=mode), lan)
                self.assertIn(("n4", "x"), link_pairs(plan))
                if mode != "mesh":
                    self.assertEqual(plan.neighbours("x"), ("n4",))

    def test_a_pin_cycle_in_hub_mode_is_joined_to_the_primary(self):
        lan = nodes(3) + [NodeSpec("a", order=5, pinned_upstream="b"), NodeSpec("b", order=6, pinned_upstream="a")]
        plan = plan_lan(LanSpec(mode="hub"), lan)
        self.assertIn(("n0", "a"), link_pairs(plan))
        self.assertEqual(plan.hops("n1", "b"), 3)

    def test_it_rejects_cyclic_pins_in_hierarchical_mode(self):
        lan = nodes(2) + [
            NodeSpec("a", pinned_upstream="b"), NodeSpec("b", pinned_upstream="c"), NodeSpec("c", pinned_upstream="a"),
        ]
        with self.assertRaisesRegex(PlanError, "a -> b -> c -> a"):
            plan_lan(LanSpec(mode="hierarchical"), lan)


class LinkAddressTests(SimpleTestCase):
    def test_new_links_take_the_lowest_free_address_and_old_ones_keep_theirs(self):
        previous = {("n0", "n2"): "10.250.0.2"}
        plan = plan_lan(LanSpec(mode="hub"), nodes(4), link_addresses=previous)
        self.assertEqual({l.downstream: str(l.address) for l in plan.links},
                         {"n2": "10.250.0.2", "n1": "10.250.0.3", "n3": "10.250.0.4"})

    def test_an_upstream_with_more_than_254_links_is_refused(self):
        with self.assertRaisesRegex(PlanError, "n0 would serve more than 254 links"):
            plan_lan(LanSpec(mode="hub", pool_prefix=20), nodes(256))


class RouteTests(SimpleTestCase):
    def test_hangzhou_routes_both_hongkong_pools_as_one_aggregate_and_hongkong_defaults_to_hangzhou(self):
        plan = plan_lan(LanSpec(), [HANGZHOU, HONGKONG])
        self.assertEqual([(r.prefix, r.via) for r in plan.routes["hangzhou"]], [(net("10.2.0.0/15"), "hongkong")])
        self.assertEqual([(r.prefix, r.via) for r in plan.routes["hongkong"]], [(net("10.0.0.0/8"), "hangzhou")])

    def test_paths_are_the_reverse_of_each_other_even_when_every_link_ties(self):
        # No RTTs: many equal-cost paths across the sibling meshes; tie-breaking must still agree both ways.
        lan = [NodeSpec(f"n{i}", region=f"r{i % 4}/s{i % 3}", order=i) for i in range(40)]
        plan = plan_lan(LanSpec(mode="hierarchical"), lan)
        for a, b in combinations(plan.pools, 2):
            self.assertEqual(plan.path(a, b), tuple(reversed(plan.path(b, a))))

    def test_a_slow_link_is_still_used_between_its_own_ends(self):
        # n0-n2 is slower than the detour via n1, but n2's tunnel to n0 holds n0's pool as a connected subnet.
        rtts = {("n0", "n1"): 1, ("n1", "n2"): 1, ("n0", "n2"): 10}
        plan = plan_lan(LanSpec(mode="mesh"), nodes(3), rtts=rtts)
        self.assertEqual(plan.path("n2", "n0"), ("n2", "n0"))

    def test_a_leaf_gets_one_default_route_toward_its_upstream(self):
        plan = plan_lan(LanSpec(mode="hub"), nodes(5))
        self.assertEqual([(str(r.prefix), r.via) for r in plan.routes["n3"]], [("10.0.0.0/8", "n0")])
        self.assertEqual(len(plan.routes["n0"]), 4)


REGION_TREE = [
    "asia/cn/east", "asia/cn/north", "asia/cn/south/gz", "asia/cn/south/sz", "asia/hk", "asia/jp/kanto",
    "asia/jp", "europe/de/fra", "europe/de/ber", "europe/uk", "europe", "na/us/east/nyc", "na/us/east/dc",
    "na/us/west", "na/ca", "sa/br", "",
]


@st.composite
def deep_lans(draw):
    """Deep region trees, skewed sizes, priorities that make one node primary of many levels, maybe RTTs."""
    count = draw(st.integers(2, 400))
    rng = random.Random(draw(st.integers(0, 2**32)))
    regions = rng.sample(REGION_TREE, rng.randint(1, len(REGION_TREE)))
    weights = [rng.random() ** 3 for _ in regions]  # a few big regions, many small ones
    lan = []
    for i in range(count):
        region = rng.choices(regions, weights)[0]
        priority = 5 if i < rng.choice([0, 1, 3]) else rng.choice([0, 0, 0, 1])
        lan.append(NodeSpec(f"n{i}", region=region, priority=priority, order=i))
    rtts = None
    if rng.random() < 0.5:
        where = {n.name: (rng.random() * 100, rng.random() * 100) for n in lan}
        rtts = {(a.name, b.name): 1 + math.dist(where[a.name], where[b.name])
                for a, b in combinations(lan, 2)}
    return lan, rtts


class TunnelBudgetTests(SimpleTestCase):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(deep_lans())
    def test_no_node_exceeds_two_root_n_tunnels_however_deep_the_region_tree(self, case):
        lan, rtts = case
        plan = plan_lan(LanSpec(mode="hierarchical", pool_prefix=20), lan, rtts=rtts)
        limit = 2 * math.sqrt(len(lan))
        self.assertLessEqual(max(plan.tunnels(n.name) for n in lan), limit)
        self.assertEqual(set(plan.primaries), _ancestors({n.region for n in lan}))

    def test_one_node_that_is_primary_of_every_level_stays_within_budget(self):
        lan = [NodeSpec("boss", region="a/b/c/d/e", priority=9)]
        lan += [NodeSpec(f"n{i}", region="/".join("abcde"[: i % 5 + 1]), order=i) for i in range(99)]
        plan = plan_lan(LanSpec(mode="hierarchical", pool_prefix=20), lan)
        self.assertEqual({plan.primaries[p] for p in ("", "a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e")}, {"boss"})
        self.assertLessEqual(max(plan.tunnels(n.name) for n in lan), 20)


def _ancestors(regions):
    out = set()
    for region in regions:
        out.add(region)
        while region:
            region = region.rpartition("/")[0]
            out.add(region)
    return out


def ring(count, region="eu"):
    """Nodes on a circle of radius 50 ms with RTT = 1 + distance: every pair measured."""
    where = {f"n{i}": (50 * math.cos(2 * math.pi * i / count), 50 * math.sin(2 * math.pi * i / count))
             for i in range(count)}
    rtts = {(a, b): 1 + math.dist(where[a], where[b]) for a, b in combinations(sorted(where), 2)}
    return [NodeSpec(name, region=region, order=int(name[1:])) for name in where], rtts


class RttAwareTests(SimpleTestCase):
    def test_among_equal_priorities_the_most_central_node_is_primary(self):
        lan = [NodeSpec(f"n{i}", region="eu", order=i) for i in range(7)]
        rtts = {(f"n{a}", f"n{b}"): 1 + abs(a - b) for a, b in combinations(range(7), 2)}  # on a line
        plan = plan_lan(LanSpec(mode="hierarchical"), lan, rtts=rtts)
        self.assertEqual(plan.primaries["eu"], "n3")

    def test_priority_still_wins_over_centrality(self):
        lan = [NodeSpec(f"n{i}", region="eu", order=i, priority=1 if i == 6 else 0) for i in range(7)]
        rtts = {(f"n{a}", f"n{b}"): 1 + abs(a - b) for a, b in combinations(range(7), 2)}
        self.assertEqual(plan_lan(LanSpec(mode="hierarchical"), lan, rtts=rtts).primaries["eu"], "n6")

    def test_an_incumbent_primary_survives_a_small_rtt_change(self):
        # Seven nodes on a line in eu (n3 in the middle), 42 far away in asia: eu is one group, not split.
        lan = [NodeSpec(f"n{i}", region="eu" if i < 7 else "asia", order=i) for i in range(49)]
        x = {f"n{i}": i if i < 7 else 1000 + i for i in range(49)}
        rtts = {(a, b): 1 + abs(x[a] - x[b]) for a, b in combinations(sorted(x), 2)}
        first = plan_lan(LanSpec(mode="hierarchical"), lan, rtts=rtts)
        self.assertEqual(first.primaries["eu"], "n3")
        previous = {(l.upstream, l.downstream): str(l.address) for l in first.links}
        # n2 becomes slightly more central than n3 (4% by sum of RTTs): alone, that would move the primary...
        nudged = {k: v * (0.9 if "n2" in k else 1) for k, v in rtts.items()}
        self.assertEqual(plan_lan(LanSpec(mode="hierarchical"), lan, rtts=nudged).primaries["eu"], "n2")
        # ... but not past the incumbent's margin.
        again = plan_lan(LanSpec(mode="hierarchical"), lan, rtts=nudged, link_addresses=previous)
        self.assertEqual(again.primaries["eu"], "n3")
        self.assertEqual({p for p in link_pairs(again) if "n3" in p}, {p for p in link_pairs(first) if "n3" in p})

    def test_shortcuts_between_heads_cut_stretch_within_the_budget(self):
        lan, rtts = ring(100)
        plan = plan_lan(LanSpec(mode="hierarchical"), lan, rtts=rtts)
        self.assertLessEqual(max(plan.tunnels(n.name) for n in lan), 20)
        path = plan.path("n0", "n50")
        along = sum(rtts[tuple(sorted(p, key=lambda x: int(x[1:])))] for p in zip(path, path[1:]))
        self.assertLess(along / rtts[("n0", "n50")], 1.5)
        # Leaves stay single-homed: one default route each.
        leaves = [n.name for n in lan if plan.tunnels(n.name) == 1]
        self.assertGreater(len(leaves), 70)
        self.assertTrue(all(len(plan.routes[leaf]) == 1 for leaf in leaves))

    def test_without_a_full_rtt_matrix_the_plan_follows_rank_as_before(self):
        lan = [NodeSpec(f"n{i}", region="eu", order=i) for i in range(30)]
        rtts = {(f"n{a}", f"n{b}"): 1 + abs(a - b) for a, b in combinations(range(30), 2)}  # on a line
        self.assertIn(plan_lan(LanSpec(mode="hierarchical"), lan, rtts=rtts).primaries["eu"], ("n14", "n15"))
        # Unmeasured pairs would read as 1 ms: no centrality, clustering or shortcuts without every pair.
        partial = dict(list(rtts.items())[:100])
        self.assertEqual(plan_lan(LanSpec(mode="hierarchical"), lan, rtts=partial).primaries["eu"], "n0")

    def test_auto_mode_joins_a_pin_cycle_to_the_primary_instead_of_failing(self):
        lan = nodes(6) + [NodeSpec("a", order=7, pinned_upstream="b"), NodeSpec("b", order=8, pinned_upstream="a")]
        plan = plan_lan(LanSpec(), lan)
        self.assertEqual(plan.mode, "hierarchical")
        self.assertIn(("a", "b"), {tuple(sorted(p)) for p in link_pairs(plan)})
        self.assertEqual(len([p for p in link_pairs(plan) if {"a", "b"} & set(p)]), 2)

# Equal-cost paths whose tie-breaks disagree by direction: plan_lan's builders rarely make them, so the routing
# layer is checked on a ring directly (the iroute source check drops replies on an asymmetric path).
class RingRouteTests(SimpleTestCase):  # or paste the method into RouteTests
    def test_equal_cost_paths_round_a_ring_are_the_same_both_ways(self):
        # a-b-y-d-c-z-a, every link equal: a->d and d->a each have two 3-hop paths. Picking by name order alone,
        # a goes a-z-c-d (c < y at distance 2) but d goes d-y-b-a (b < z): the iroutes would then drop replies.
        ring = ["a", "b", "y", "d", "c", "z"]
        Link = namedtuple("Link", "upstream downstream")
        links = [Link(x, y) for x, y in zip(ring, ring[1:] + ring[:1])]
        pools = {
            name: NodePools(ipaddress.IPv4Network(f"10.{2 * i}.0.0/16"),
                            ipaddress.IPv4Network(f"10.{2 * i + 1}.0.0/16"))
            for i, name in enumerate(ring)
        }
        routes = plan_routes(ring, links, pools, {}, None, ipaddress.IPv4Network("10.0.0.0/8"))

        def path(source, target):
            address = pools[target].udp.network_address + 1
            hops = [source]
            while hops[-1] != target:
                matching = [r for r in routes[hops[-1]] if address in r.prefix]
                self.assertTrue(matching, f"no route on {hops[-1]} toward {target}")
                hops.append(max(matching, key=lambda r: r.prefix.prefixlen).via)
                self.assertLessEqual(len(hops), len(ring), f"loop from {source} to {target}: {hops}")
            return tuple(hops)

        for i, a in enumerate(ring):
            for b in ring[i + 1:]:
                with self.subTest(a=a, b=b):
                    self.assertEqual(path(a, b), tuple(reversed(path(b, a))))


