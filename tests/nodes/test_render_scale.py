"""Rendering stays linear in the LAN's size where the output allows it (benchmarks/topology.py has the figures)."""

import json
import time

from django.test import SimpleTestCase

from nodes import games
from nodes.render import RELAY_CONFIG, relay_address, render_lan, render_relay_config
from nodes.topology import LanSpec, NodeSpec, plan_lan

REGIONS = ("asia/cn/east", "asia/hk", "eu/de", "na/us/east")


def lan_of(count: int):
    nodes = [NodeSpec(f"n{i}", region=REGIONS[i % len(REGIONS)], order=i, public_address=f"198.51.{i // 250}.{i % 250 + 1}")
             for i in range(count)]
    lan = LanSpec(mode="auto", pool_prefix=20)
    return lan, nodes, plan_lan(lan, nodes)


class RelayConfigTests(SimpleTestCase):
    def test_every_relay_lists_every_other_peer_exactly_as_json_writes_it(self):
        for count in (1, 2, 3, 9):
            lan, nodes, plan = lan_of(count)
            files = render_lan(plan, lan, nodes)
            for node in nodes:
                text = files[node.name][RELAY_CONFIG].content
                config = json.loads(text)
                self.assertEqual(config["peers"], [str(relay_address(plan, other)) for other in sorted(plan.pools)
                                                   if other != node.name])
                self.assertEqual(text, json.dumps(config, indent=1, sort_keys=True) + "\n")

    def test_rendering_every_relay_config_grows_about_linearly_not_quadratically(self):
        # Each file names n-1 peers, so the bytes grow as n^2; formatting the addresses once per LAN keeps the time
        # near linear (copying is cheap). Formatting n-1 addresses per file made 4x the nodes cost ~16x the time.
        def seconds(count: int) -> float:
            lan, nodes, plan = lan_of(count)
            best = float("inf")
            for _ in range(3):
                began = time.perf_counter()
                for node in nodes:
                    render_relay_config(plan, node, games.DiscoverySpec())
                best = min(best, time.perf_counter() - began)
            return best

        small, large = seconds(300), seconds(1200)
        self.assertLess(large / small, 9.0, f"300 nodes: {small:.3f} s, 1,200 nodes: {large:.3f} s")
