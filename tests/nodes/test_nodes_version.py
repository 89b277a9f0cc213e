"""A LAN's nodes_version moves with every change of what players are given (migration nodes 0009's triggers), so
the download may trust it instead of reading the ready nodes (players.services.ready_node_rows)."""

import datetime as dt

from nodes.models import PLAYER_NODE_COLUMNS, Lan, Node, NodeState
from players.services import ReadyNode
from tests.base import BaseTestCase

# A new value for each column players are given; a column added to PLAYER_NODE_COLUMNS needs one here.
CHANGES = {
    "name": "hangzhou2",
    "public_address": "203.0.113.99",
    "public_ipv6": "2001:db8::99",
    "udp_port": 1195,
    "tcp_port": 8443,
    "country": "JP",
    "latitude": 35.7,
    "longitude": 139.7,
    "state": NodeState.FAILED,
    "healthy": False,
    "created_at": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
}


class NodesVersionTests(BaseTestCase):
    def setUp(self):
        self.node = self.add_node("hangzhou", latitude=30.3, longitude=120.2, country="CN")
        Node.objects.filter(pk=self.node.pk).update(state=NodeState.READY, healthy=True)

    def version(self, lan=None) -> int:
        return Lan.objects.values_list("nodes_version", flat=True).get(pk=(lan or self.lan).pk)

    def assertChanges(self, change, *, lan=None, msg=None):
        before = self.version(lan)
        change()
        self.assertNotEqual(self.version(lan), before, msg)

    def test_the_columns_it_follows_are_all_that_the_ready_rows_read_and_filter_on(self):
        read = set(ReadyNode._fields) - {"pk"}
        self.assertLessEqual(read | {"state", "healthy", "created_at"}, set(PLAYER_NODE_COLUMNS))
        self.assertEqual(set(PLAYER_NODE_COLUMNS) - {"lan_id"}, set(CHANGES))

    def test_a_change_of_any_column_players_are_given_changes_it(self):
        for column, value in CHANGES.items():
            with self.subTest(column=column):
                self.assertChanges(lambda: Node.objects.filter(pk=self.node.pk).update(**{column: value}))

    def test_a_change_saved_through_the_model_changes_it(self):
        self.node.refresh_from_db()
        self.node.public_address = "203.0.113.77"
        self.assertChanges(lambda: self.node.save(update_fields=["public_address"]))

    def test_a_node_added_or_deleted_changes_it(self):
        self.assertChanges(lambda: self.add_node("hongkong", region="asia/hk", public_address="203.0.113.20"))
        self.assertChanges(lambda: Node.objects.filter(name="hongkong").delete())

    def test_a_node_moved_to_another_lan_changes_both(self):
        before = self.version(self.charlies_lan)
        self.assertChanges(lambda: Node.objects.filter(pk=self.node.pk).update(lan=self.charlies_lan))
        self.assertNotEqual(self.version(self.charlies_lan), before)

    def test_columns_players_are_not_given_leave_it(self):
        before = self.version()
        Node.objects.filter(pk=self.node.pk).update(last_error="timeout", missed_polls=3, openvpn_version="2.6",
                                                    last_seen_at=dt.datetime.now(dt.timezone.utc))
        Node.objects.filter(pk=self.node.pk).update(public_address=Node.objects.get(pk=self.node.pk).public_address)
        self.assertEqual(self.version(), before)

    def test_other_lans_are_left_alone(self):
        before = self.version(self.charlies_lan)
        Node.objects.filter(pk=self.node.pk).update(public_address="203.0.113.55")
        self.assertEqual(self.version(self.charlies_lan), before)
