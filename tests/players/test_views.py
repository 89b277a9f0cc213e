"""Invites, joining, the player's page, profile downloads and the lobby, through the views.

Each view: success, wrong method (405), another host's object (404). Error paths count rows before and after:
a failed join creates nothing.
"""

import datetime as dt
import json
import re
import threading
import unittest
from unittest import mock

from django.core.cache import cache
from django.db import connection, connections
from django.test import Client, TransactionTestCase, override_settings
from django.urls import reverse
from django.utils import timezone

from nodes import services as node_services
from nodes.models import Node, NodeState, RevokedCertificate, VpnSession
from players import lobby, services
from players.models import Invite, Player
from tests.base import BaseTestCase

CLIENT_ADDRESS = "127.0.0.1"  # what Django's test client sends as REMOTE_ADDR


def join_url(token):
    return reverse("players:join", args=[token])


def me_url(player, name="player_home", *args):
    return reverse(f"players:{name}", args=[player.token, *args])


def ready(*nodes):
    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(state=NodeState.READY)
    for n in nodes:
        n.refresh_from_db()


def remotes(profile: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^remote (\S+) (\d+) (udp|tcp)$", profile, flags=re.M)


class HostTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)


# --- Host: invites and players ----------------------------------------------------------------------------------


class InviteCreateTests(HostTestCase):
    def url(self, lan=None):
        return reverse("players:invite_create", args=[(lan or self.lan).slug])

    def test_it_creates_an_invite_with_the_given_expiry_and_limit(self):
        response = self.client.post(self.url(), {"hours": 48, "max_uses": 3, "note": "weekend"})
        self.assertRedirects(response, reverse("nodes:lan_detail", args=[self.lan.slug]) + "#invites",
                             fetch_redirect_response=False)
        invite = Invite.objects.get(note="weekend")
        self.assertEqual(invite.max_uses, 3)
        self.assertAlmostEqual((invite.expires_at - timezone.now()).total_seconds(), 48 * 3600, delta=60)

    def test_it_refuses_more_than_720_hours_and_creates_nothing(self):
        before = Invite.objects.count()
        response = self.client.post(self.url(), {"hours": 721, "max_uses": 3})
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "less than or equal to 720")
        self.assertEqual(Invite.objects.count(), before)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)

    def test_another_hosts_lan_is_not_found(self):
        response = self.client.post(self.url(self.charlies_lan), {"hours": 1, "max_uses": 1})
        self.assertEqual(response.status_code, 404)
        self.assertFalse(self.charlies_lan.invites.exists())


class InviteRevokeTests(HostTestCase):
    def url(self):
        return reverse("players:invite_revoke", args=[self.invite.pk])

    def test_it_withdraws_the_invite(self):
        self.client.post(self.url())
        self.invite.refresh_from_db()
        self.assertIsNotNone(self.invite.revoked_at)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)

    def test_another_hosts_invite_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.post(self.url()).status_code, 404)
        self.invite.refresh_from_db()
        self.assertIsNone(self.invite.revoked_at)


class PlayerRevokeTests(HostTestCase):
    def url(self):
        return reverse("players:player_revoke", args=[self.bob.pk])

    def test_it_revokes_the_player_and_adds_the_certificate_to_the_crl(self):
        self.client.post(self.url())
        self.bob.refresh_from_db()
        self.assertIsNotNone(self.bob.revoked_at)
        self.assertTrue(RevokedCertificate.objects.filter(lan=self.lan, serial=self.bob.serial).exists())

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)

    def test_another_hosts_player_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.post(self.url()).status_code, 404)
        self.bob.refresh_from_db()
        self.assertIsNone(self.bob.revoked_at)


class PlayerReissueTests(HostTestCase):
    def url(self):
        return reverse("players:player_reissue", args=[self.bob.pk])

    def test_it_issues_a_new_certificate_and_revokes_the_old_one(self):
        old = self.bob.serial
        self.client.post(self.url())
        self.bob.refresh_from_db()
        self.assertNotEqual(self.bob.serial, old)
        self.assertTrue(RevokedCertificate.objects.filter(lan=self.lan, serial=old).exists())

    def test_a_revoked_player_gets_a_message_not_a_traceback(self):
        services.revoke_player(self.bob)
        response = self.client.post(self.url(), follow=True)
        self.assertContains(response, "This player was revoked by the host.")

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)

    def test_another_hosts_player_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.post(self.url()).status_code, 404)


# --- Joining ----------------------------------------------------------------------------------------------------


class JoinTests(BaseTestCase):
    def setUp(self):
        services.clear_rate(services.join_rate_key(CLIENT_ADDRESS))
        self.addCleanup(services.clear_rate, services.join_rate_key(CLIENT_ADDRESS))

    def counts(self):
        return Player.objects.count(), RevokedCertificate.objects.count()

    def test_the_invite_page_names_the_lan_but_not_the_hosts_user_name(self):
        response = self.client.get(join_url(self.invite.token))
        self.assertContains(response, "Game Night")
        self.assertNotContains(response, "alice")  # the host's sign-in name is half of a login
        self.assertContains(response, 'name="nickname"')

    def test_joining_creates_one_player_and_opens_their_page(self):
        before = Player.objects.count()
        response = self.client.post(join_url(self.invite.token), {"nickname": "dave"})
        dave = Player.objects.get(nickname="dave")
        self.assertRedirects(response, me_url(dave), fetch_redirect_response=False)
        self.assertEqual(Player.objects.count(), before + 1)
        self.assertEqual(dave.joined_from, CLIENT_ADDRESS)
        self.invite.refresh_from_db()
        self.assertEqual(self.invite.uses, 2)

    def assertProblem(self, token, status, wording, method="post"):
        before = self.counts()
        response = getattr(self.client, method)(join_url(token), {"nickname": "erin"})
        self.assertContains(response, wording, status_code=status)
        self.assertEqual(self.counts(), before)
        self.assertNotContains(response, 'name="nickname"', status_code=status)

    def test_an_expired_invite_gets_410_and_creates_nothing(self):
        Invite.objects.filter(pk=self.invite.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
        self.assertProblem(self.invite.token, 410, "This invite has expired")
        self.assertProblem(self.invite.token, 410, "This invite has expired", method="get")

    def test_a_used_up_invite_gets_410_and_creates_nothing(self):
        Invite.objects.filter(pk=self.invite.pk).update(max_uses=1)  # bob used it
        self.assertProblem(self.invite.token, 410, "This invite has been used up")

    def test_a_revoked_invite_gets_410_and_creates_nothing(self):
        services.revoke_invite(self.invite)
        self.assertProblem(self.invite.token, 410, "This invite was withdrawn")

    def test_a_malformed_token_gets_404_and_creates_nothing(self):
        for token in (self.invite.token[:-1], self.invite.token + "x", "a" * 31 + "!", "%20" * 12):
            with self.subTest(token=token):
                self.assertProblem(token, 404, "This link is incomplete")

    def test_an_unknown_token_gets_404_and_creates_nothing(self):
        self.assertProblem("A" * 32, 404, "This link leads nowhere")

    def test_a_taken_nickname_is_a_form_error_whatever_its_case(self):
        before = self.counts()
        response = self.client.post(join_url(self.invite.token), {"nickname": "BOB"})
        self.assertContains(response, "is taken on this LAN")
        self.assertEqual(self.counts(), before)

    def test_an_invalid_nickname_is_a_form_error(self):
        before = self.counts()
        for nickname in ("x", "!!", "tab\there", "a" * 33):
            with self.subTest(nickname=nickname):
                response = self.client.post(join_url(self.invite.token), {"nickname": nickname})
                self.assertContains(response, "Use 2–32 characters")
        self.assertEqual(self.counts(), before)

    def test_a_nickname_is_typed_the_way_people_write_their_names(self):
        for nickname in ("Bob Smith", "小明", "Zoë_99"):
            with self.subTest(nickname=nickname):
                response = self.client.post(join_url(self.invite.token), {"nickname": f"  {nickname} "})
                self.assertEqual(response.status_code, 302)
                player = Player.objects.get(lan=self.lan, nickname=nickname)  # stored without the outer spaces
                device = player.devices.get()
                self.assertRegex(device.common_name, r"\Aplayer-[a-z][a-z0-9-]*-[0-9a-f]{6}\Z")
        self.assertTrue(Player.objects.get(nickname="小明").devices.get().common_name.startswith("player-xiaoming-"))
        self.assertTrue(Player.objects.get(nickname="Bob Smith").devices.get().common_name.startswith("player-bob-smith-"))

    @override_settings(LANHUB_JOIN_RATE=2)
    def test_joins_past_the_rate_limit_get_429_and_create_nothing(self):
        for nickname in ("dave", "erin"):
            self.assertEqual(self.client.post(join_url(self.invite.token), {"nickname": nickname}).status_code, 302)
        before = self.counts()
        response = self.client.post(join_url(self.invite.token), {"nickname": "frank"})
        self.assertContains(response, "Too many people joined from your address", status_code=429)
        self.assertEqual(self.counts(), before)

    def test_it_rejects_other_methods(self):
        self.assertEqual(self.client.put(join_url(self.invite.token)).status_code, 405)


@unittest.skipUnless(connection.vendor == "postgresql",
                     "needs PostgreSQL row locks (the counting UPDATE); SQLite serialises whole-database writes, "
                     "so it cannot show the race. Run with DATABASE_URL=postgres://...")
@override_settings(LANHUB_JOIN_RATE=1000)
class ConcurrentJoinTests(TransactionTestCase):
    """Fifty friends click a one-use invite at the same moment: exactly one becomes a player."""

    THREADS = 50

    def setUp(self):
        from django.contrib.auth import get_user_model

        alice = get_user_model().objects.create_user("alice", "alice@example.org", "alice-password")
        lan = node_services.create_lan(owner=alice, name="Game Night", slug="gamenight")
        self.invite = services.create_invite(lan=lan, created_by=alice, max_uses=1)
        services.clear_rate(services.join_rate_key(CLIENT_ADDRESS))

    def test_fifty_concurrent_redemptions_of_a_one_use_invite_create_exactly_one_player(self):
        barrier = threading.Barrier(self.THREADS)
        statuses, lock = [], threading.Lock()

        def join(i):
            try:
                client = Client()
                barrier.wait()
                status = client.post(join_url(self.invite.token), {"nickname": f"friend{i}"}).status_code
                with lock:
                    statuses.append(status)
            finally:
                connections.close_all()  # each thread has its own connection; leave none open

        threads = [threading.Thread(target=join, args=(i,)) for i in range(self.THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertEqual(sorted(statuses), [302] + [410] * (self.THREADS - 1))
        self.assertEqual(Player.objects.count(), 1)
        self.invite.refresh_from_db()
        self.assertEqual(self.invite.uses, 1)


# --- The player's page ------------------------------------------------------------------------------------------


class PlayerPageTestCase(BaseTestCase):
    def setUp(self):
        self.hangzhou = self.add_node("hangzhou", country="CN", public_address="203.0.113.10")
        self.hongkong = self.add_node("hongkong", region="asia/hk", country="HK", public_address="203.0.113.20",
                                      tcp_port=8443)
        self.pending = self.add_node("pending", region="eu", public_address="203.0.113.30")
        ready(self.hangzhou, self.hongkong)


class PlayerHomeTests(PlayerPageTestCase):
    def test_it_ranks_the_ready_nodes_and_offers_the_download_and_a_qr_code(self):
        response = self.client.get(me_url(self.bob))
        self.assertContains(response, "Hi bob")
        self.assertContains(response, me_url(self.bob, "profile_download", "hangzhou"))
        self.assertContains(response, "in the order the host added servers")  # 127.0.0.1 has no country
        self.assertContains(response, 'class="qr"')
        self.assertContains(response, "Tunnelblick")
        self.assertContains(response, "sudo openvpn --config")
        self.assertContains(response, me_url(self.bob, "lobby"))
        self.assertNotContains(response, "pending")
        self.assertContains(response, 'data-measure="auto"')

    def test_it_says_which_games_work_by_lan_play_and_what_to_do_for_the_others(self):
        response = self.client.get(me_url(self.bob))
        self.assertContains(response, "<strong>LAN play works</strong> across every server of Game Night for: "
                                      "Warcraft III / StarCraft, Minecraft Java Edition,")
        self.assertContains(response, "choose <em>join by IP</em>")
        self.lan.discovery_games, self.lan.discovery_ports = ["directplay"], "7777-7780"
        self.lan.save()
        response = self.client.get(me_url(self.bob))
        self.assertContains(response, "for: Age of Empires II and other DirectPlay games, other games on UDP 7777-7780.")
        self.lan.discovery_games, self.lan.discovery_ports = [], ""
        self.lan.save()
        self.assertContains(self.client.get(me_url(self.bob)), "LAN game discovery is off for Game Night")

    def test_its_csp_lets_the_page_time_requests_to_the_nodes_and_nothing_else(self):
        csp = self.client.get(me_url(self.bob))["Content-Security-Policy"]
        self.assertIn("connect-src 'self' http://203.0.113.10:443 https://203.0.113.10:443 "
                      "http://203.0.113.20:8443 https://203.0.113.20:8443;", csp)
        self.assertIn("script-src 'self';", csp)
        self.assertNotIn("203.0.113.30", csp)

    def test_the_default_node_comes_first_when_nothing_else_is_known(self):
        self.lan.default_node = self.hongkong
        self.lan.save(update_fields=["default_node"])
        response = self.client.get(me_url(self.bob))
        self.assertEqual(response.context["ranked"][0], (self.hongkong, "the host's default server"))

    def test_it_loads_in_a_fixed_number_of_queries(self):
        # 1 the player with LAN and host, 2 the ready nodes, 3 the player's devices in use (the session is not
        # touched: no cookie yet).
        with self.assertNumQueries(3):
            self.client.get(me_url(self.bob))

    def test_a_revoked_player_gets_410_and_no_download(self):
        services.revoke_player(self.bob)
        response = self.client.get(me_url(self.bob))
        self.assertContains(response, "This player was removed", status_code=410)
        self.assertNotContains(response, ".ovpn", status_code=410)

    def test_a_malformed_or_unknown_token_gets_404(self):
        self.assertContains(self.client.get("/me/short/"), "This link is incomplete", status_code=404)
        self.assertContains(self.client.get("/me/%s/" % ("B" * 32)), "This link leads nowhere", status_code=404)

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(me_url(self.bob)).status_code, 405)


class BrowserMeasurementTests(PlayerPageTestCase):
    def post(self, rtts, player=None):
        return self.client.post(me_url(player or self.bob, "player_rtt"), {"rtts": json.dumps(rtts)})

    def test_measured_times_re_rank_the_nodes_and_stay_in_the_session(self):
        response = self.post({str(self.hangzhou.pk): 180.0, str(self.hongkong.pk): 21.4})
        self.assertEqual([n.name for n, _ in response.context["ranked"]], ["hongkong", "hangzhou"])
        self.assertContains(response, "21 ms from your browser")
        page = self.client.get(me_url(self.bob))
        self.assertEqual(page.context["ranked"][0][1], "21 ms from your browser")
        self.assertContains(page, 'data-measure="done"')

    def test_a_node_that_did_not_answer_is_kept_and_nodes_of_other_lans_are_ignored(self):
        office = self.add_node("office", lan=self.charlies_lan)
        response = self.post({str(self.hangzhou.pk): None, str(self.hongkong.pk): 50, str(office.pk): 1})
        ranked = response.context["ranked"]
        self.assertEqual([n.name for n, _ in ranked], ["hongkong", "hangzhou"])
        self.assertIn("did not answer your browser", ranked[1][1])

    def test_garbage_is_a_400(self):
        self.assertEqual(self.client.post(me_url(self.bob, "player_rtt"), {"rtts": "{not json"}).status_code, 400)
        self.assertEqual(self.post({str(self.hangzhou.pk): -5}).status_code, 400)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(me_url(self.bob, "player_rtt")).status_code, 405)


class ChooseNodeTests(PlayerPageTestCase):
    def test_the_player_picks_another_node(self):
        response = self.client.post(me_url(self.bob, "player_choose"), {"node": self.hongkong.pk})
        self.assertRedirects(response, me_url(self.bob) + "#download", fetch_redirect_response=False)
        self.bob.refresh_from_db()
        self.assertEqual(self.bob.preferred_node, self.hongkong)
        page = self.client.get(me_url(self.bob))
        self.assertEqual(page.context["chosen"], self.hongkong)

    def test_a_node_that_is_not_ready_or_of_another_lan_cannot_be_chosen(self):
        office = self.add_node("office", lan=self.charlies_lan)
        ready(office)
        for node in (self.pending, office):
            with self.subTest(node=node.name):
                response = self.client.post(me_url(self.bob, "player_choose"), {"node": node.pk}, follow=True)
                self.assertContains(response, "That server is not available")
                self.bob.refresh_from_db()
                self.assertIsNone(self.bob.preferred_node)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(me_url(self.bob, "player_choose")).status_code, 405)


class LostDeviceTests(PlayerPageTestCase):
    def setUp(self):
        super().setUp()
        services.clear_rate(services.lost_device_rate_key(self.bob))
        self.first = self.bob.first_device
        self.laptop = services.add_device(self.bob, name="laptop")

    def test_it_switches_off_that_device_only(self):
        old_page = me_url(self.bob, "player_home")
        response = self.client.post(me_url(self.bob, "player_lost_device", self.laptop.ref), follow=True)
        self.assertContains(response, "“laptop” is switched off on every server")
        self.laptop.refresh_from_db()
        self.first.refresh_from_db()
        self.assertIsNotNone(self.laptop.revoked_at)
        self.assertIsNone(self.first.revoked_at)
        self.assertEqual(set(RevokedCertificate.objects.values_list("serial", flat=True)), {self.laptop.serial})
        # The lost device's bookmark no longer opens the page (nor its downloads); the new address does.
        self.bob.refresh_from_db()
        self.assertEqual(self.client.get(old_page).status_code, 404)
        self.assertEqual(response.redirect_chain[-1][0], me_url(self.bob, "player_home"))
        self.assertNotContains(response, f'id="device-{self.laptop.ref}"')
        self.assertContains(response, f'id="device-{self.first.ref}"')

    def test_a_switched_off_or_unknown_device_is_not_found(self):
        services.switch_off_device(self.bob, self.laptop)
        self.bob.refresh_from_db()
        for ref in (self.laptop.ref, "nonsense"):
            with self.subTest(ref=ref):
                self.assertEqual(self.client.post(me_url(self.bob, "player_lost_device", ref)).status_code, 404)

    def test_another_players_device_is_not_found(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        response = self.client.post(me_url(self.bob, "player_lost_device", dave.first_device.ref))
        self.assertEqual(response.status_code, 404)
        self.assertIsNone(dave.first_device.revoked_at)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(me_url(self.bob, "player_lost_device", self.laptop.ref)).status_code, 405)


class ProfileDownloadTests(PlayerPageTestCase):
    def download(self, ref):
        return self.client.get(me_url(self.bob, "profile_download", ref))

    def test_the_profile_parses_and_starts_with_the_chosen_node_over_udp_then_tcp(self):
        services.choose_node(self.bob, self.hongkong)
        response = self.download("hongkong")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Disposition"], 'attachment; filename="gamenight-bob-hongkong.ovpn"')
        profile = response.content.decode()
        self.assertRegex(profile, r"(?m)^client$")
        for tag in ("ca", "cert", "key", "tls-crypt"):
            block = rf"(?s)<{tag}>\n(#[^\n]*\n)*-----BEGIN [^\n]+-----\n.+-----END [^\n]+-----\n</{tag}>"
            self.assertRegex(profile, block)
        self.assertEqual(remotes(profile)[:3], [("203.0.113.20", "1194", "udp"), ("203.0.113.20", "8443", "tcp"),
                                                ("203.0.113.10", "1194", "udp")])
        self.assertNotIn("203.0.113.30", profile)  # the node that is not ready is no fallback

    def test_a_node_can_be_named_by_primary_key(self):
        response = self.download(str(self.hangzhou.pk))
        self.assertEqual(remotes(response.content.decode())[0], ("203.0.113.10", "1194", "udp"))

    def test_a_node_that_is_not_ready_or_of_another_lan_is_not_found(self):
        office = self.add_node("office", lan=self.charlies_lan)
        ready(office)
        self.assertEqual(self.download("pending").status_code, 404)
        self.assertEqual(self.download(str(office.pk)).status_code, 404)
        self.assertEqual(self.download("office").status_code, 404)

    def test_a_download_after_a_change_carries_the_change(self):
        # Rendered profiles are cached per process, keyed by what they are made of: nothing stale may come back.
        first = self.download("hongkong").content.decode()
        Node.objects.filter(pk=self.hangzhou.pk).update(public_address="203.0.113.99")
        moved = self.download("hongkong").content.decode()
        self.assertIn("remote 203.0.113.99 1194 udp", moved)
        self.assertNotIn("203.0.113.99", first)
        bob = services.reissue_player(self.bob)
        renewed = self.client.get(me_url(bob, "profile_download", "hongkong")).content.decode()
        self.assertIn(bob.first_device.cert_pem.strip(), renewed)
        self.assertNotIn(bob.first_device.cert_pem.strip(), first)

    def test_a_revoked_player_gets_410_and_no_profile(self):
        services.revoke_player(self.bob)
        response = self.download("hongkong")
        self.assertEqual(response.status_code, 410)
        self.assertNotIn(b"<key>", response.content)

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(me_url(self.bob, "profile_download", "hongkong")).status_code, 405)


# --- Lobby ------------------------------------------------------------------------------------------------------


class LobbyTests(PlayerPageTestCase):
    def setUp(self):
        super().setUp()
        # connected_since "now": each test's rows differ, so no test sees rows another one rendered (Redis keeps
        # rendered rows for HTML_SECONDS, and the tests share one LAN and reuse primary keys).
        VpnSession.objects.create(node=self.hongkong, instance="server-udp", common_name=self.bob.common_name,
                                  player=self.bob, vpn_address="10.2.0.6", connected_since=timezone.now())
        VpnSession.objects.create(node=self.hangzhou, instance="link", common_name="link-hongkong")  # not a player

    def test_the_player_lobby_shows_who_is_online_with_a_copy_button(self):
        response = self.client.get(me_url(self.bob, "lobby"))
        self.assertContains(response, "bob (you)")
        self.assertContains(response, 'data-copy="10.2.0.6"')
        self.assertContains(response, me_url(self.bob, "lobby_fragment"))
        self.assertNotContains(response, "link-hongkong")
        self.assertContains(response, "<strong>LAN play works</strong> across every server of Game Night")

    def test_the_live_fragment_is_just_the_rows(self):
        response = self.client.get(me_url(self.bob, "lobby_fragment"))
        self.assertContains(response, "1 player online")
        self.assertNotContains(response, "<html")
        self.assertEqual(response["Cache-Control"], "no-store")

    def test_the_fragment_loads_in_a_fixed_number_of_queries_and_a_poll_in_one(self):
        # A first look: 1 the player, 2 the sessions' fingerprint, 3 the nodes' fingerprint, 4 the LAN's nodes,
        # 5 player sessions with their players (the rows, rendered once for every open lobby).
        with self.assertNumQueries(5):
            first = self.client.get(me_url(self.bob, "lobby_fragment"))
        # Another lobby with the same rows: 1 the player, 2 and 3 the fingerprints; the ETag comes from Redis.
        with self.assertNumQueries(3):
            again = self.client.get(me_url(self.bob, "lobby_fragment"), HTTP_IF_NONE_MATCH=first["ETag"])
        self.assertEqual(again.status_code, 304)
        self.assertEqual(again.content, b"")
        # With the once-a-second recheck (outside tests): the next lobbies of the LAN cost 1 the player.
        with mock.patch.object(lobby, "RECHECK_SECONDS", 1):
            self.client.get(me_url(self.bob, "lobby_fragment"))
            with self.assertNumQueries(1):
                again = self.client.get(me_url(self.bob, "lobby_fragment"), HTTP_IF_NONE_MATCH=first["ETag"])
            cache.delete(f"lobby:now:{lobby._lan_key(self.lan)}")
        self.assertEqual(again.status_code, 304)

    def test_a_poll_gets_304_until_someone_comes_online_then_the_new_rows(self):
        url = me_url(self.bob, "lobby_fragment")
        etag = self.client.get(url)["ETag"]
        self.assertEqual(self.client.get(url, HTTP_IF_NONE_MATCH=etag).status_code, 304)
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        VpnSession.objects.create(node=self.hangzhou, instance="server-udp", common_name=dave.common_name,
                                  player=dave, vpn_address="10.1.0.10")
        response = self.client.get(url, HTTP_IF_NONE_MATCH=etag)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, 'data-player="dave"')
        self.assertContains(response, "2 players online")
        self.assertNotEqual(response["ETag"], etag)
        VpnSession.objects.filter(player=dave).delete()
        self.assertNotContains(self.client.get(url, HTTP_IF_NONE_MATCH=response["ETag"]), "dave")

    def test_rows_rewritten_unchanged_still_get_304(self):
        url = me_url(self.bob, "lobby_fragment")
        etag = self.client.get(url)["ETag"]
        session = VpnSession.objects.get(player=self.bob)
        session.delete()  # a status poll replaces a node's rows with the same ones
        session.pk = None
        session.save()
        self.assertEqual(self.client.get(url, HTTP_IF_NONE_MATCH=etag).status_code, 304)

    def test_a_revoked_player_leaves_the_lobby_of_the_others(self):
        url = reverse("players:host_lobby_fragment", args=[self.lan.slug])
        self.client.force_login(self.alice)
        etag = self.client.get(url)["ETag"]
        services.revoke_player(self.bob)
        response = self.client.get(url, HTTP_IF_NONE_MATCH=etag)
        self.assertEqual(response.status_code, 200)
        self.assertNotContains(response, 'data-player="bob"')

    def test_the_host_sees_the_same_lobby(self):
        self.client.force_login(self.alice)
        response = self.client.get(reverse("players:host_lobby", args=[self.lan.slug]))
        self.assertContains(response, 'data-copy="10.2.0.6"')
        response = self.client.get(reverse("players:host_lobby_fragment", args=[self.lan.slug]))
        self.assertContains(response, "bob")

    def test_a_revoked_player_has_no_lobby(self):
        services.revoke_player(self.bob)
        self.assertEqual(self.client.get(me_url(self.bob, "lobby")).status_code, 410)
        self.assertEqual(self.client.get(me_url(self.bob, "lobby_fragment")).status_code, 410)

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(me_url(self.bob, "lobby")).status_code, 405)
        self.assertEqual(self.client.post(me_url(self.bob, "lobby_fragment")).status_code, 405)

    def test_another_host_gets_404(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(reverse("players:host_lobby", args=[self.lan.slug])).status_code, 404)


class FakeClock:
    """A monotonic clock that `sleep` moves on, so a stream's minutes pass in no time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class LobbyStreamTests(PlayerPageTestCase):
    """The lobby pushed as server-sent events (players/lobby.py: Stream), and the 503 that sends a page to polling."""

    def setUp(self):
        super().setUp()
        VpnSession.objects.create(node=self.hongkong, instance="server-udp", common_name=self.bob.common_name,
                                  player=self.bob, vpn_address="10.2.0.6", connected_since=timezone.now())
        self.clock = FakeClock()
        # Streams the views open end after their first look, so a test can read them to the end.
        patcher = mock.patch.object(lobby, "STREAM_SECONDS", 0)
        patcher.start()
        self.addCleanup(patcher.stop)

    def stream(self, seconds=300, **kwargs):
        rows = lambda: render_rows(self.lan)  # noqa: E731
        opened = lobby.Stream.open(self.lan, rows, clock=self.clock, sleep=self.clock.sleep, seconds=seconds,
                                   **kwargs)
        self.addCleanup(opened.close)
        return opened

    def test_it_sends_the_rows_then_only_changes_with_a_heartbeat_between(self):
        stream = self.stream()
        self.assertEqual(next(stream), f"retry: {lobby.STREAM_RETRY_MS}\n\n".encode())
        first = next(stream).decode()
        self.assertRegex(first, r'^id: "[0-9a-f]{24}"\n')
        self.assertIn('data-player="bob"', first)
        self.assertTrue(first.endswith("\n\n"))
        self.assertEqual(next(stream), b": still here\n\n")  # nothing changed for STREAM_HEARTBEAT_SECONDS
        self.assertGreaterEqual(self.clock.now, lobby.STREAM_HEARTBEAT_SECONDS)
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        VpnSession.objects.create(node=self.hangzhou, instance="server-udp", common_name=dave.common_name,
                                  player=dave, vpn_address="10.1.0.10")
        changed = next(stream).decode()
        self.assertIn('data-player="dave"', changed)
        self.assertNotEqual(changed.split("\n")[0], first.split("\n")[0])

    def test_every_line_of_the_rows_is_its_own_data_field(self):
        text = lobby.event('"abc"', "<ul>\n<li>bob</li>\n</ul>").decode()
        self.assertEqual(text, 'id: "abc"\ndata: <ul>\ndata: <li>bob</li>\ndata: </ul>\n\n')

    def test_a_reconnecting_browser_that_has_the_rows_gets_no_copy(self):
        etag = self.client.get(me_url(self.bob, "lobby_fragment"))["ETag"]
        stream = self.stream(last_etag=etag)
        next(stream)  # retry
        self.assertEqual(next(stream), b": still here\n\n")

    def test_it_ends_after_its_lifetime(self):
        stream = self.stream(seconds=40)
        chunks = list(stream)
        self.assertEqual(chunks[0][:6], b"retry:")
        self.assertLessEqual(self.clock.now, 41)
        self.assertEqual(len(chunks), 2 + int(40 // lobby.STREAM_HEARTBEAT_SECONDS))  # retry, rows, heartbeats

    def test_it_ends_when_the_viewer_may_no_longer_look(self):
        allowed = {"yes": True}
        stream = self.stream(allowed=lambda: allowed["yes"])
        next(stream), next(stream)
        allowed["yes"] = False
        VpnSession.objects.filter(player=self.bob).delete()  # the rows change: the stream asks again
        self.assertEqual(list(stream), [])

    def test_the_view_streams_events_and_a_revoked_player_gets_410(self):
        response = self.client.get(me_url(self.bob, "lobby_stream"))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "text/event-stream")
        self.assertEqual(response["Cache-Control"], "no-store")
        chunks = response.streaming_content
        next(chunks)
        self.assertIn(b'data-player="bob"', next(chunks))
        hang_up(response)
        services.revoke_player(self.bob)
        self.assertEqual(self.client.get(me_url(self.bob, "lobby_stream")).status_code, 410)

    def test_the_player_page_names_the_stream_and_the_fragment(self):
        response = self.client.get(me_url(self.bob, "lobby"))
        self.assertContains(response, f'data-stream-url="{me_url(self.bob, "lobby_stream")}"')
        self.assertContains(response, f'data-live-url="{me_url(self.bob, "lobby_fragment")}"')

    def test_the_host_has_a_stream_and_another_host_gets_404(self):
        self.client.force_login(self.alice)
        response = self.client.get(reverse("players:host_lobby_stream", args=[self.lan.slug]))
        self.assertEqual(response.status_code, 200)
        hang_up(response)
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(reverse("players:host_lobby_stream", args=[self.lan.slug])).status_code,
                         404)

    def test_a_host_who_signs_out_loses_the_stream(self):
        self.client.force_login(self.alice)
        url = reverse("players:host_lobby_stream", args=[self.lan.slug])
        # A stream of 3 s with a heartbeat at every look (every 0.2 s here): signed in, it keeps going...
        with mock.patch.object(lobby, "STREAM_SECONDS", 3), mock.patch.object(lobby, "STREAM_HEARTBEAT_SECONDS", 0):
            stream = self.client.get(url).streaming_content
            chunks = [next(stream), next(stream), next(stream)]
            self.assertIn(b'data-player="bob"', chunks[1])
            self.assertEqual(chunks[2], b": still here\n\n")
            # ...and once the host signs out, it ends at the next look.
            self.client.logout()
            self.assertEqual(list(stream), [])

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(me_url(self.bob, "lobby_stream")).status_code, 405)

    def test_with_every_slot_taken_the_page_is_told_to_poll_and_a_closed_stream_frees_its_slot(self):
        taken = []
        while (stream := lobby.Stream.open(self.lan, lambda: "")) is not None:
            taken.append(stream)
            self.assertLessEqual(len(taken), lobby.STREAM_LIMIT)
        self.assertEqual(len(taken), lobby.STREAM_LIMIT)
        response = self.client.get(me_url(self.bob, "lobby_stream"))
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response["Retry-After"], str(lobby.STREAM_SECONDS))
        taken[0].close()
        taken[0].close()  # the server may close twice: the slot is given back once
        freed = self.client.get(me_url(self.bob, "lobby_stream"))
        self.assertEqual(freed.status_code, 200)
        hang_up(freed)
        for stream in taken[1:]:
            stream.close()
        again = self.client.get(me_url(self.bob, "lobby_stream"))
        self.assertEqual(again.status_code, 200)
        hang_up(again)


def hang_up(response):
    """Read a stream to its end (the tests shorten STREAM_SECONDS), as the test client wants: its wrapper then
    closes the response, giving the slot back, without closing the test's database connection."""
    return list(response.streaming_content)


def render_rows(lan):
    from players.views import _lobby_rows_html

    return _lobby_rows_html(lan)
