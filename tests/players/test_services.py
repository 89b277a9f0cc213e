"""The invite and player services on their own: the checks hold even when a view did not make them first."""

import datetime as dt

from django.core.exceptions import ValidationError
from django.utils import timezone

from lanhub.secrets import unseal
from nodes.models import Node, NodeState
from players import services
from players.models import Device, Invite, Player
from tests.base import BaseTestCase


class RedeemInviteTests(BaseTestCase):
    def assertRefused(self, reason):
        players, uses = Player.objects.count(), Invite.objects.get(pk=self.invite.pk).uses
        with self.assertRaises(services.InviteUnusable) as caught:
            services.redeem_invite(token=self.invite.token, nickname="erin")
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(Player.objects.count(), players)
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, uses)

    def test_an_invite_that_expired_after_the_page_loaded_is_refused_by_the_service(self):
        Invite.objects.filter(pk=self.invite.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
        self.assertRefused("expired")

    def test_a_used_up_invite_is_refused_by_the_service(self):
        Invite.objects.filter(pk=self.invite.pk).update(max_uses=1)  # bob used it
        self.assertRefused("used_up")

    def test_a_revoked_invite_is_refused_by_the_service(self):
        services.revoke_invite(self.invite)
        self.assertRefused("revoked")

    def test_redeeming_counts_a_use(self):  # already covered through the view; here for the service alone
        services.redeem_invite(token=self.invite.token, nickname="dave")
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)




class RedeemPathTests(BaseTestCase):
    def test_redeeming_is_a_fixed_number_of_queries(self):
        services.redeem_invite(token=self.invite.token, nickname="warm")  # the statements are compiled once
        # (the test's savepoint) 1 the invite with its LAN, locked, 2 the player, 3 its first device, 4 the use
        # counted (release of the savepoint): no nickname lookup (the constraint is the check), no re-reads.
        with self.assertNumQueries(6):
            services.redeem_invite(token=self.invite.token, nickname="dave")

    def test_a_nickname_taken_in_another_case_is_refused_and_nothing_is_written(self):
        players, devices = Player.objects.count(), Device.objects.count()
        with self.assertRaisesMessage(ValidationError, "is taken on this LAN"):
            services.redeem_invite(token=self.invite.token, nickname="BOB")
        self.assertEqual((Player.objects.count(), Device.objects.count()), (players, devices))
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 1)  # bob's use only
        services.redeem_invite(token=self.invite.token, nickname="dave")  # the next join is unaffected
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)

    def test_the_same_nickname_on_another_lan_is_fine(self):
        office = services.create_invite(lan=self.charlies_lan, created_by=self.charlie)
        self.assertEqual(services.redeem_invite(token=office.token, nickname="Bob").lan, self.charlies_lan)

    def test_the_player_comes_back_with_the_device_it_joined_on_as_stored(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave", client_address="192.0.2.7")
        stored = Device.objects.get(player=dave)
        self.assertEqual(dave.joined_device.pk, stored.pk)
        for field in ("name", "ref", "common_name", "cert_pem", "key_sealed", "serial"):
            self.assertEqual(getattr(dave.joined_device, field), getattr(stored, field), field)
        self.assertNotIn("PRIVATE KEY", stored.key_sealed)  # sealed at rest
        self.assertIn("PRIVATE KEY", unseal(stored.key_sealed))
        self.assertEqual(Player.objects.get(pk=dave.pk).joined_from, "192.0.2.7")
        self.assertEqual(Player.objects.get(pk=dave.pk).invite_id, self.invite.pk)


class ProfileFromRowsTests(BaseTestCase):
    def setUp(self):
        self.hangzhou = self.add_node("hangzhou", country="CN", public_address="203.0.113.10")
        self.hongkong = self.add_node("hongkong", region="asia/hk", public_address="203.0.113.20", tcp_port=8443)
        self.add_node("pending", region="eu", public_address="203.0.113.30")
        Node.objects.filter(pk__in=[self.hangzhou.pk, self.hongkong.pk]).update(state=NodeState.READY, healthy=True)

    def profile(self, node_name="hongkong"):
        rows = services.ready_node_rows(self.lan.pk)
        return services.build_profile(self.bob, node=next(r for r in rows if r.name == node_name), ranked=rows)

    def test_ready_node_rows_are_the_ready_nodes_and_make_the_same_profile(self):
        nodes = services.ready_nodes(self.lan)
        rows = services.ready_node_rows(self.lan.pk)
        self.assertEqual([(r.pk, r.name, r.public_address, r.tcp_port) for r in rows],
                         [(n.pk, n.name, n.public_address, n.tcp_port) for n in nodes])
        self.assertEqual(self.profile(), services.build_profile(self.bob, node=nodes[1], ranked=nodes))
        with self.assertNumQueries(1):
            services.ready_node_rows(self.lan.pk)

    def test_the_cached_profile_follows_every_change_of_the_nodes(self):
        first = self.profile().content
        self.assertIn("remote 203.0.113.10 1194 udp", first)
        Node.objects.filter(pk=self.hangzhou.pk).update(udp_port=1195)
        self.assertIn("remote 203.0.113.10 1195 udp", self.profile().content)
        Node.objects.filter(pk=self.hangzhou.pk).update(healthy=False)  # gone from the ready nodes
        self.assertNotIn("203.0.113.10", self.profile().content)
        singapore = self.add_node("singapore", region="asia/sg", public_address="203.0.113.40")
        Node.objects.filter(pk=singapore.pk).update(state=NodeState.READY, healthy=True)
        self.assertIn("remote 203.0.113.40 1194 udp", self.profile().content)
        Node.objects.filter(pk=self.hangzhou.pk).update(healthy=True)
        self.assertEqual(self.profile().content.count("\nremote "), 6)
