"""One stored plan per LAN version: computed by a change, read by syncs, revocations and polls."""

from unittest import mock

from django.core.exceptions import ValidationError

from nodes import planning, services, topology
from nodes.models import Link, StoredPlan
from nodes.provisioning import node_links as plan_node_links
from players import services as player_services
from tests.base import BaseTestCase


def counting_planner():
    """topology.plan_lan, counted: the real planner runs, the test learns how often."""
    return mock.patch.object(topology, "plan_lan", wraps=topology.plan_lan)


class StoredPlanTests(BaseTestCase):
    def setUp(self):
        self.hz = self.add_node("hangzhou", latitude=30.3, longitude=120.2)
        self.hk = self.add_node("hongkong", region="asia/hk", latitude=22.3, longitude=114.2)

    def test_every_change_stores_a_new_plan_version(self):
        first = StoredPlan.objects.get(lan=self.lan)
        self.add_node("tokyo", region="asia/jp")
        second = StoredPlan.objects.get(lan=self.lan)
        self.assertEqual(second.version, first.version + 1)
        self.assertIn("tokyo", second.data["pools"])

    def test_the_stored_plan_reads_back_as_the_plan_that_was_computed(self):
        computed = planning.plan_lan(self.lan).plan
        self.assertEqual(topology.Plan.from_data(computed.to_data()), computed)
        self.assertEqual(planning.current_plan(self.lan).plan, computed)

    def test_revoking_a_player_plans_nothing(self):
        with counting_planner() as planner:
            player_services.revoke_player(self.bob)
        self.assertEqual(planner.call_count, 0)

    def test_adding_a_node_plans_the_lan_once(self):
        with counting_planner() as planner:
            self.add_node("tokyo", region="asia/jp")
        self.assertEqual(planner.call_count, 1)

    def test_checking_a_node_for_a_form_plans_no_links(self):
        candidate = services.Node(lan=self.lan, name="tokyo", region="asia/jp", public_address="203.0.113.12")
        with counting_planner() as planner:
            services.check_node(candidate)
        self.assertEqual(planner.call_count, 0)

    def test_a_node_that_does_not_fit_is_still_refused_by_the_check(self):
        self.hz.refresh_from_db()
        candidate = services.Node(lan=self.lan, name="tokyo", public_address="203.0.113.12",
                                  udp_pool=self.hz.udp_pool)
        with self.assertRaisesMessage(ValidationError, "pools overlap"):
            services.check_node(candidate)

    def test_the_poll_reads_a_nodes_links_from_its_rows_as_the_plan_has_them(self):
        plan = planning.current_plan(self.lan).plan
        self.assertEqual(planning.node_links(self.hk), plan_node_links(plan, "hongkong"))
        self.assertEqual(planning.node_links(self.hz), [])

    def test_link_rtts_replan_only_when_they_move_past_the_threshold(self):
        link = Link.objects.get(lan=self.lan)
        link.rtt_ms = 30.0
        link.save()
        planning.replan(self.lan, reason="measured")
        self.assertFalse(planning.rtts_moved(self.lan))
        Link.objects.filter(pk=link.pk).update(rtt_ms=45.0)  # +15 ms: jitter
        self.assertFalse(planning.rtts_moved(self.lan))
        Link.objects.filter(pk=link.pk).update(rtt_ms=80.0)  # +50 ms and +167 %: a real change
        self.assertTrue(planning.rtts_moved(self.lan))
