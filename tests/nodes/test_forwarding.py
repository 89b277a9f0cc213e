"""Packets carried over the rendered files alone (tests/nodes/forwarding.py), on the reference LAN and on
random LANs from hypothesis: every pool reaches every other pool, without loops or black holes, in exactly the
planned number of hops, whatever the mode, region tree, down nodes, pins and RTTs."""

import ipaddress
import math
import random

from django.test import SimpleTestCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.render import render_lan
from nodes.routing import MAX_PLAYER_ROUTES
from nodes.topology import LanSpec, NodeSpec, plan_lan
from tests.nodes.forwarding import ConfigError, Network

HANGZHOU = NodeSpec("hangzhou", region="asia/cn/east", order=0, public_address="203.0.113.10")
HONGKONG = NodeSpec("hongkong", region="asia/hk", order=1, public_address="203.0.113.11")
CCD_HK = "/etc/openvpn/server/ccd/link-hongkong"
UDP = "/etc/openvpn/server/lanhub-udp.conf"


def reference_files():
    lan = LanSpec()
    return render_lan(plan_lan(lan, [HANGZHOU, HONGKONG]), lan, [HANGZHOU, HONGKONG])


def edited(files, node, path, drop):
    """A copy of the files with the lines starting with ``drop`` removed from one file."""
    copy = {n: {p: f.content for p, f in fs.items()} for n, fs in files.items()}
    copy[node][path] = "\n".join(l for l in copy[node][path].splitlines() if not l.startswith(drop))
    return copy


class ReferenceForwardingTests(SimpleTestCase):
    def test_every_pool_reaches_every_other_pool_of_the_reference_lan(self):
        traces = Network(reference_files()).send_all()
        self.assertEqual(len(traces), 12)
        self.assertTrue(all(t.delivered for t in traces), [t for t in traces if not t.delivered])
        self.assertEqual({t.hops for t in traces if t.source != t.target}, {1})

    def test_the_simulator_drops_packets_without_iroutes_as_openvpn_does(self):
        traces = Network(edited(reference_files(), "hangzhou", CCD_HK, "iroute")).send_all()
        reasons = {t.reason for t in traces if not t.delivered}
        self.assertEqual(reasons, {"bad source address on hangzhou", "no iroute on hangzhou"})

    def test_the_simulator_black_holes_without_the_servers_route_lines(self):
        traces = Network(edited(reference_files(), "hangzhou", UDP, "route ")).send_all()
        self.assertIn("no route on hangzhou", {t.reason for t in traces})

    def test_the_simulator_refuses_a_route_the_kernel_would_refuse(self):
        files = reference_files()
        copy = {n: {p: f.content for p, f in fs.items()} for n, fs in files.items()}
        copy["hangzhou"][UDP] += "route 10.1.0.0 255.255.0.0\n"  # hangzhou's own TCP pool
        with self.assertRaises(ConfigError):
            Network(copy)


@st.composite
def random_lans(draw, mode, max_nodes):
    """A LAN from a seed: random region tree, priorities, down nodes, pins and (sometimes) RTTs."""
    count = draw(st.integers(1, max_nodes))
    rng = random.Random(draw(st.integers(0, 2**32)))
    paths = [""]
    for i in range(rng.randint(0, 12)):
        parent = rng.choice(paths)
        paths.append(f"{parent}/g{i}".lstrip("/"))
    down_rate = rng.choice([0, 0.1, 0.3])
    nodes = []
    for i in range(count):
        pin = None
        # Pins go to older nodes in hierarchical mode (cycles are an error there), anywhere otherwise.
        if i and rng.random() < 0.1:
            pin = f"n{rng.randrange(i) if mode == 'hierarchical' else rng.choice([x for x in range(count) if x != i])}"
        nodes.append(NodeSpec(
            f"n{i}", region=rng.choice(paths), priority=rng.randint(0, 2), order=rng.randint(0, count),
            healthy=rng.random() >= down_rate, public_address=f"198.51.{i // 250}.{i % 250 + 1}",
            pinned_upstream=pin,
        ))
    rtts = None
    if rng.random() < 0.5:
        where = {n.name: (rng.random() * 100, rng.random() * 100) for n in nodes}
        # Mostly distances, some inflated: measured RTTs break the triangle inequality.
        rtts = {(a, b): (1 + math.dist(where[a], where[b])) * (3 if rng.random() < 0.1 else 1)
                for a in where for b in where if a < b}
    return LanSpec(mode=mode, pool_prefix=20 if count > 100 else 16), nodes, rtts


def check_lan(testcase, lan, nodes, rtts):
    plan = plan_lan(lan, nodes, rtts=rtts)
    healthy = sorted(plan.healthy)
    for node in nodes:
        if not node.healthy:
            testcase.assertEqual(plan.tunnels(node.name), 0)
        elif node.pinned_upstream in plan.healthy:
            testcase.assertIn(node.pinned_upstream, plan.neighbours(node.name))
    pools = sorted(p for pair in plan.pools.values() for p in (pair.udp, pair.tcp))
    testcase.assertFalse([(a, b) for a, b in zip(pools, pools[1:]) if a.overlaps(b)])
    testcase.assertFalse([p for p in pools if p.overlaps(ipaddress.IPv4Network("10.252.0.0/14"))])
    files = render_lan(plan, lan, nodes)
    assert_players_routed_to_every_pool(testcase, lan, pools, files)
    network = Network(files)
    # OpenVPN's route limit: no ccd file holds more iroutes than its server's max-routes-per-client allows.
    testcase.assertEqual(network.over_quota, [])
    # Every pool to every pool on smaller LANs; from a sample of sources on big ones (each is O(n^2)).
    sources = healthy if len(healthy) <= 60 else random.Random(len(healthy)).sample(healthy, 20)
    planned = {}
    for trace in network.send_all(sources=sources, nodes=healthy):
        testcase.assertTrue(trace.delivered, trace)
        key = (trace.source, trace.target)
        if key not in planned:
            planned[key] = plan.hops(*key)
            testcase.assertEqual(plan.path(*key), tuple(reversed(plan.path(key[1], key[0]))))
        testcase.assertEqual(trace.hops, planned[key], trace)
    # An address of a region block that no pool holds yet (routes name whole blocks) ends where OpenVPN drops it
    # or leaves the LAN's routes, never in a loop between nodes.
    for region, blocks in sorted(plan.blocks.items()):
        for block in blocks:
            free = next((a for a in (block.network_address + 1, block.broadcast_address - 1)
                         if not any(a in p for p in pools)), None)
            for source in (sources[:5] if free is not None else ()):
                trace = network.send_to(source, network.pools[source][0], int(free))
                testcase.assertFalse(trace.delivered, trace)
                testcase.assertNotEqual(trace.reason, "loop", (region, block, trace))
    # The tunnel budget holds for every region tree, however deep; pins are excepted (links to or from a pinned
    # node are not counted: a node takes every node pinned to it, and a cut-off pin cycle joins the primary).
    if lan.mode in ("auto", "hierarchical") and plan.mode == "hierarchical":
        assert_tunnel_budget(testcase, plan, nodes)
    return plan


def assert_players_routed_to_every_pool(testcase, lan, pools, files):
    """What servers push to players covers every pool (each player reaches every other), within the supernet, in
    a bounded number of routes, and the same on every server."""
    pushed = set()
    for node_files in files.values():
        for path, file in node_files.items():
            if path.startswith("/etc/openvpn/server/lanhub-"):
                pushed_lines = [line.split('"')[1].split()[1:3] for line in file.content.splitlines()
                                if line.startswith('push "route ')]
                routes = tuple(ipaddress.IPv4Network(f"{address}/{mask}") for address, mask in pushed_lines
                               if mask != "255.255.255.255")  # the discovery /32s
                pushed.add(routes)
    testcase.assertLessEqual(len(pushed), 1)
    for routes in pushed:
        testcase.assertLessEqual(len(routes), MAX_PLAYER_ROUTES)
        testcase.assertTrue(all(r.subnet_of(ipaddress.IPv4Network(lan.supernet)) for r in routes), routes)
        testcase.assertFalse([p for p in pools if not any(p.subnet_of(r) for r in routes)], routes)


def assert_tunnel_budget(testcase, plan, nodes):
    pinned = {n.name for n in nodes if n.pinned_upstream in plan.healthy and n.name in plan.healthy}
    free = sorted(plan.healthy - pinned)
    if len(free) < 2:
        return
    counted = {name: sum(m not in pinned for m in plan.neighbours(name)) for name in free}
    testcase.assertLessEqual(max(counted.values()), 2 * math.sqrt(len(free)), counted)


SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RandomLanForwardingTests(SimpleTestCase):
    @SETTINGS
    @given(random_lans("hierarchical", 200))
    def test_hierarchical_lans_forward_every_packet_along_the_plan(self, case):
        check_lan(self, *case)

    @SETTINGS
    @given(random_lans("auto", 120))
    def test_auto_lans_forward_every_packet_along_the_plan(self, case):
        check_lan(self, *case)

    @settings(max_examples=30, deadline=None)
    @given(random_lans("hub", 80))
    def test_hub_lans_forward_every_packet_along_the_plan(self, case):
        check_lan(self, *case)

    @settings(max_examples=30, deadline=None)
    @given(random_lans("mesh", 30))
    def test_mesh_lans_forward_every_packet_along_the_plan(self, case):
        check_lan(self, *case)


def many_prefixes_behind_one_link() -> list[NodeSpec]:
    """p <- d <- {c1, c2} <- 150 nodes each, every node in a /21 slot with a free one between: nothing
    aggregates, so p's ccd file for d needs an iroute per node (302)."""
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    nodes = [NodeSpec("p", public_address="198.51.100.1"),
             NodeSpec("d", order=1, public_address="198.51.100.2", pinned_upstream="p"),
             NodeSpec("c1", order=2, public_address="198.51.100.3", pinned_upstream="d"),
             NodeSpec("c2", order=3, public_address="198.51.100.4", pinned_upstream="d")]
    for i in range(300):
        slot = base + (2 * i + 16) * 2048
        nodes.append(NodeSpec(f"x{i}", order=i + 4, pinned_upstream="c1" if i < 150 else "c2",
                              public_address="198.51.100.5", udp_pool=f"{ipaddress.IPv4Address(slot)}/22",
                              tcp_pool=f"{ipaddress.IPv4Address(slot + 1024)}/22"))
    return nodes


class RouteLimitTests(SimpleTestCase):
    def test_a_link_carrying_more_than_256_prefixes_gets_the_quota_raised_and_still_forwards(self):
        # 300 nodes pinned behind "d", each holding a /21 slot with a free one between: nothing aggregates, so the
        # primary's ccd file for d needs 300 iroutes.
        lan = LanSpec(mode="hub", pool_prefix=22)
        nodes = many_prefixes_behind_one_link()
        plan = plan_lan(lan, nodes)
        files = render_lan(plan, lan, nodes)
        network = Network(files)
        self.assertGreater(network.max_iroutes, 256)
        self.assertIn("max-routes-per-client 512", files["p"]["/etc/openvpn/server/lanhub-udp.conf"].content)
        self.assertEqual(network.over_quota, [])
        for trace in network.send_all(sources=["p"], nodes=["p", "d", "x0", "x299"]):
            self.assertTrue(trace.delivered, trace)

    def test_the_simulator_drops_traffic_to_prefixes_past_the_quota_as_openvpn_does(self):
        lan = LanSpec(mode="hub", pool_prefix=22)
        nodes = many_prefixes_behind_one_link()
        files = render_lan(plan_lan(lan, nodes), lan, nodes)
        udp = files["p"]["/etc/openvpn/server/lanhub-udp.conf"]
        files["p"]["/etc/openvpn/server/lanhub-udp.conf"] = udp.content.replace("max-routes-per-client 512\n", "")
        network = Network(files)
        self.assertTrue(network.over_quota)
        # OpenVPN learns a ccd file's iroutes last line first: past the quota, the first lines are the ones lost.
        first = network.send_all(sources=["p"], nodes=["p", "x0"])
        self.assertFalse(all(trace.delivered for trace in first))
        last = network.send_all(sources=["p"], nodes=["p", "x299"])
        self.assertTrue(all(trace.delivered for trace in last))



def city_lan(count: int, seed: int):
    """Nodes scattered around random cities, one region per city (paths one to three deep), with locations: the
    planner splits big regions around heads and adds RTT shortcuts, as on a real world-wide LAN."""
    rng = random.Random(seed)
    cities = {}
    for i in range(rng.randint(4, 14)):
        path = "/".join(f"r{rng.randint(0, 3)}" for _ in range(rng.randint(0, 2))) + f"/c{i}"
        cities[path.lstrip("/")] = (rng.uniform(-60, 60), rng.uniform(-180, 180))
    nodes, where = [], {}
    for i in range(count):
        region = rng.choice(list(cities))
        lat, lon = cities[region]
        where[f"n{i}"] = (lat + rng.uniform(-3, 3), lon + rng.uniform(-3, 3))
        nodes.append(NodeSpec(f"n{i}", region=region, order=i, public_address=f"198.51.{i // 250}.{i % 250 + 1}"))
    return LanSpec(mode="auto", pool_prefix=22), nodes, where


class RouteQuotaAtScaleTests(SimpleTestCase):
    def test_big_world_wide_lans_keep_every_ccd_file_within_openvpns_route_quota(self):
        # Routes aggregate by region: a region is entered only through its primary, so from outside it all of
        # its nodes share one next hop and its address blocks. No ccd file then needs the raised quota.
        for seed, count in ((1, 2500), (2, 1800), (3, 3000)):
            lan, nodes, where = city_lan(count, seed)
            plan = plan_lan(lan, nodes, locations=where)
            network = Network(render_lan(plan, lan, nodes))
            self.assertLessEqual(network.max_iroutes, 256, (seed, count))
            self.assertEqual(network.over_quota, [])
            healthy = sorted(plan.healthy)
            for trace in network.send_all(sources=random.Random(seed).sample(healthy, 2), nodes=healthy):
                self.assertTrue(trace.delivered, trace)
