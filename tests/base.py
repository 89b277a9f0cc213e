"""The named cast every DB test starts from: hosts alice and charlie, each with a LAN, and player bob."""

import datetime as dt

from django.contrib.auth import get_user_model
from django.test import TestCase

from nodes import services as node_services
from players import services as player_services


class BaseTestCase(TestCase):
    @classmethod
    def setUpTestData(cls):
        User = get_user_model()
        cls.alice = User.objects.create_user("alice", "alice@example.org", "alice-password")
        cls.charlie = User.objects.create_user("charlie", "charlie@example.org", "charlie-password")
        cls.lan = node_services.create_lan(owner=cls.alice, name="Game Night", slug="gamenight")
        cls.charlies_lan = node_services.create_lan(owner=cls.charlie, name="Office", slug="office")
        cls.invite = player_services.create_invite(lan=cls.lan, created_by=cls.alice, note="friends",
                                                   ttl=dt.timedelta(hours=24), max_uses=10)
        cls.bob = player_services.redeem_invite(token=cls.invite.token, nickname="bob")

    def add_node(self, name, *, lan=None, **fields):
        """A node row planned like the admin would add it; syncs are queued only on commit (not in TestCase)."""
        defaults = {"region": "asia/cn/east", "public_address": "203.0.113.10", "ssh_host": "203.0.113.10"}
        defaults.update(fields)
        return node_services.create_node(lan=lan or self.lan, name=name, **defaults)
