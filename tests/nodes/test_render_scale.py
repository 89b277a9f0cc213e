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
    def test_every_relay_lists_its_tree_neighbours_and_the_lists_form_one_tree_over_the_links(self):
        for count in (1, 2, 3, 9, 40):
            lan, nodes, plan = lan_of(count)
            files = render_lan(plan, lan, nodes)
            address = {str(relay_address(plan, n.name)): n.name for n in nodes}
            edges = set()
            for node in nodes:
                text = files[node.name][RELAY_CONFIG].content
                config = json.loads(text)
                self.assertEqual(text, json.dumps(config, indent=1, sort_keys=True) + "\n")
                for peer in config["peers"]:
                    other = address[peer]
                    self.assertIn(other, plan.neighbours(node.name))  # one tunnel away: a link of the plan
                    self.assertIn(str(relay_address(plan, node.name)),
                                  json.loads(files[other][RELAY_CONFIG].content)["peers"])  # both ways
                    edges.add(frozenset((node.name, other)))
            # A tree: n - 1 edges that connect every node (one path between any two: each copy arrives once).
            self.assertEqual(len(edges), count - 1, count)
            reached, queue = {nodes[0].name}, [nodes[0].name]
            while queue:
                here = queue.pop()
                for edge in edges:
                    if here in edge:
                        (other,) = edge - {here}
                        if other not in reached:
                            reached.add(other)
                            queue.append(other)
            self.assertEqual(reached, {n.name for n in nodes}, count)

    def test_rendering_every_relay_config_grows_about_linearly_not_quadratically(self):
        # Each file names its tree neighbours only; the tree is computed once per plan, not once per file.
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
