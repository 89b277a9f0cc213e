"""The invite and player services on their own: the checks hold even when a view did not make them first."""

import datetime as dt
import threading

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connections
from django.test import TransactionTestCase
from django.utils import timezone

from lanhub.secrets import unseal
from nodes import services as node_services
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

    def test_the_last_use_is_granted_and_the_next_refused(self):
        Invite.objects.filter(pk=self.invite.pk).update(max_uses=2)  # bob used one
        services.redeem_invite(token=self.invite.token, nickname="dave")
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)
        self.assertRefused("used_up")

    def test_a_revoked_or_expired_invite_says_so_even_when_used_up(self):
        Invite.objects.filter(pk=self.invite.pk).update(max_uses=1, revoked_at=timezone.now())
        self.assertRefused("revoked")
        Invite.objects.filter(pk=self.invite.pk).update(revoked_at=None,
                                                        expires_at=timezone.now() - dt.timedelta(seconds=1))
        self.assertRefused("expired")

    def test_an_unknown_invite_is_not_found(self):
        with self.assertRaises(services.InviteUnusable) as caught:
            services.redeem_invite(token="x" * 32, nickname="erin")
        self.assertEqual(caught.exception.reason, "not_found")

    def test_a_revoked_invite_is_refused_by_the_service(self):
        services.revoke_invite(self.invite)
        self.assertRefused("revoked")

    def test_redeeming_counts_a_use(self):  # already covered through the view; here for the service alone
        services.redeem_invite(token=self.invite.token, nickname="dave")
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)




class RedeemPathTests(BaseTestCase):
    def test_redeeming_is_a_fixed_number_of_queries(self):
        services.redeem_invite(token=self.invite.token, nickname="warm")  # the statements are compiled once
        # (the test's savepoint) 1 the use counted, returning the invite with its LAN (the row locked), 2 the
        # player, 3 its first device (release of the savepoint): no nickname lookup (the constraint is the check),
        # no separate read of the invite, no re-reads.
        with self.assertNumQueries(5):
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


class FirstProfileTests(BaseTestCase):
    def setUp(self):
        self.hangzhou = self.add_node("hangzhou", public_address="203.0.113.10")
        Node.objects.filter(pk=self.hangzhou.pk).update(state=NodeState.READY, healthy=True)

    def test_the_profile_handed_over_at_joining_holds_the_key_as_stored_and_the_nodes_as_they_are(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        rows = services.ready_node_rows(dave.lan_id, version=dave.lan.nodes_version)
        with self.assertNumQueries(0):  # the nodes come by their version
            content = services.build_profile(dave, node=rows[0], ranked=rows, device=dave.joined_device).content
        stored = Device.objects.get(player=dave)
        self.assertIn(unseal(stored.key_sealed).strip(), content)
        self.assertIn(stored.cert_pem.strip(), content)
        self.assertIn("remote 203.0.113.10 1194 udp", content)

    def test_a_node_changed_after_joining_is_in_the_next_profile(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        services.ready_node_rows(dave.lan_id, version=dave.lan.nodes_version)
        Node.objects.filter(pk=self.hangzhou.pk).update(public_address="203.0.113.11")
        erin = services.redeem_invite(token=self.invite.token, nickname="erin")
        rows = services.ready_node_rows(erin.lan_id, version=erin.lan.nodes_version)
        content = services.build_profile(erin, node=rows[0], ranked=rows, device=erin.joined_device).content
        self.assertIn("remote 203.0.113.11 1194 udp", content)


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


class ConcurrentRedeemTests(TransactionTestCase):
    """Friends joining at the same moment, each on their own connection, on whichever database the tests use: the
    use limit and the nickname's uniqueness hold (on SQLite the writers queue at BEGIN IMMEDIATE; on PostgreSQL
    the counting UPDATE locks the invite row and re-checks the limit after waiting)."""

    THREADS = 12

    def setUp(self):
        alice = get_user_model().objects.create_user("alice")
        self.lan = node_services.create_lan(owner=alice, name="Game Night", slug="gamenight")
        self.alice = alice

    def race(self, joins) -> list[str]:
        """Run each (token, nickname) join in its own thread, all released at once; their outcomes, sorted."""
        barrier, outcomes, lock = threading.Barrier(len(joins)), [], threading.Lock()

        def join(token, nickname):
            try:
                barrier.wait()
                try:
                    services.redeem_invite(token=token, nickname=nickname)
                    outcome = "joined"
                except services.InviteUnusable as exc:
                    outcome = exc.reason
                except ValidationError:
                    outcome = "nickname_taken"
                with lock:
                    outcomes.append(outcome)
            finally:
                connections.close_all()  # each thread has its own connection; leave none open

        threads = [threading.Thread(target=join, args=j) for j in joins]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return sorted(outcomes)

    def test_a_two_use_invite_makes_exactly_two_players(self):
        invite = services.create_invite(lan=self.lan, created_by=self.alice, max_uses=2)
        outcomes = self.race([(invite.token, f"friend{i}") for i in range(self.THREADS)])
        self.assertEqual(outcomes, ["joined"] * 2 + ["used_up"] * (self.THREADS - 2))
        self.assertEqual(Player.objects.filter(lan=self.lan).count(), 2)
        self.assertEqual(Invite.objects.get(pk=invite.pk).uses, 2)

    def test_one_nickname_in_any_case_through_several_invites_makes_one_player(self):
        invites = [services.create_invite(lan=self.lan, created_by=self.alice, max_uses=10) for _ in range(3)]
        names = ["Dana", "dana", "DANA", "dAnA"]
        outcomes = self.race([(invites[i % 3].token, names[i % 4]) for i in range(self.THREADS)])
        self.assertEqual(outcomes, ["joined"] + ["nickname_taken"] * (self.THREADS - 1))
        self.assertEqual(Player.objects.filter(lan=self.lan).count(), 1)
        self.assertEqual(sum(Invite.objects.filter(lan=self.lan).values_list("uses", flat=True)), 1)
