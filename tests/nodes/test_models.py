"""The database refuses rows that break the LAN's invariants, whatever code tries to write them."""

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from nodes.models import Link, Node
from tests.base import BaseTestCase


class ConstraintTests(BaseTestCase):
    def make_node(self, name, **fields):
        defaults = {"lan": self.lan, "name": name, "public_address": "203.0.113.5", "ssh_host": "203.0.113.5"}
        defaults.update(fields)
        return Node.objects.create(**defaults)

    def test_it_rejects_a_link_from_a_node_to_itself(self):
        node = self.make_node("hangzhou")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Link.objects.create(lan=self.lan, upstream=node, downstream=node, address="10.251.0.2")

    def test_it_rejects_a_second_link_for_the_same_pair(self):
        a, b = self.make_node("hangzhou"), self.make_node("hongkong")
        Link.objects.create(lan=self.lan, upstream=a, downstream=b, address="10.251.0.2")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Link.objects.create(lan=self.lan, upstream=a, downstream=b, address="10.251.0.3")

    def test_it_rejects_the_same_pool_twice_in_one_lan(self):
        self.make_node("hangzhou", udp_pool="10.251.0.0/16")
        with self.assertRaises(IntegrityError), transaction.atomic():
            self.make_node("hongkong", udp_pool="10.251.0.0/16")

    def test_it_allows_the_same_pool_in_another_lan(self):
        self.make_node("hangzhou", udp_pool="10.251.0.0/16")
        other = self.make_node("hangzhou", lan=self.charlies_lan, udp_pool="10.251.0.0/16")
        self.assertEqual(other.udp_pool, "10.251.0.0/16")

    def test_it_rejects_two_nodes_with_one_name_in_a_lan(self):
        self.make_node("hangzhou")
        with self.assertRaises(IntegrityError), transaction.atomic():
            self.make_node("hangzhou")

    def test_it_rejects_a_nickname_twice_in_one_lan_whatever_the_case(self):
        from players.models import Player

        with self.assertRaises(IntegrityError), transaction.atomic():
            Player.objects.create(lan=self.lan, nickname="BOB")

    def test_clean_names_the_field_of_a_bad_pool(self):
        node = Node(lan=self.lan, name="x", public_address="203.0.113.5", ssh_host="203.0.113.5",
                    udp_pool="10.251.0.1/16")
        with self.assertRaises(ValidationError) as ctx:
            node.full_clean()
        self.assertIn("udp_pool", ctx.exception.message_dict)

    def test_clean_rejects_a_node_name_that_could_reach_a_shell(self):
        node = Node(lan=self.lan, name="x; rm -rf /", public_address="203.0.113.5", ssh_host="203.0.113.5")
        with self.assertRaises(ValidationError) as ctx:
            node.full_clean()
        self.assertIn("name", ctx.exception.message_dict)

    def test_clean_rejects_a_public_supernet(self):
        self.lan.supernet = "8.0.0.0/8"
        with self.assertRaises(ValidationError) as ctx:
            self.lan.full_clean()
        self.assertIn("supernet", ctx.exception.message_dict)
