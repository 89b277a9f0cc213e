"""What a public portal meets (issue 14): guessed passwords, tokens in the admin, inputs that used to be 500s,
rate limits that counted the wrong thing or the wrong client, and values with a trailing newline."""

import json
import uuid

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.test import RequestFactory, override_settings
from django.urls import reverse

from lanhub.clientip import client_address
from nodes.models import Node, NodeState, RevokedCertificate
from players import services
from players.models import Player, nickname_validator
from tests.base import BaseTestCase


def me_url(player, name="player_home", *args):
    return reverse(f"players:{name}", args=[player.token, *args])


class SignInThrottlingTests(BaseTestCase):
    """30 wrong passwords, then the right one: the right one no longer gets in (django-axes)."""

    def setUp(self):
        # A user of this test alone: lockouts live in the cache for the whole run.
        self.name = f"host-{uuid.uuid4().hex[:8]}"
        self.user = get_user_model().objects.create_user(self.name, password="the-right-password",
                                                         is_staff=True, is_superuser=True)

    def guess(self, url, password):
        return self.client.post(url, {"username": self.name, "password": password})

    def test_the_host_login_locks_out_after_repeated_wrong_passwords(self):
        url = reverse("login")
        for i in range(30):
            self.guess(url, f"wrong-{i}")
        response = self.guess(url, "the-right-password")
        self.assertEqual(response.status_code, 429)
        self.assertContains(response, "Too many wrong passwords", status_code=429)
        self.assertNotIn("_auth_user_id", self.client.session)

    def test_the_admin_login_locks_out_after_repeated_wrong_passwords(self):
        url = reverse("admin:login")
        for i in range(30):
            self.guess(url, f"wrong-{i}")
        response = self.guess(url, "the-right-password")
        self.assertEqual(response.status_code, 429)
        self.assertNotIn("_auth_user_id", self.client.session)

    def test_a_few_mistakes_do_not_lock_out_the_right_password(self):
        url = reverse("login")
        for i in range(3):
            self.guess(url, f"wrong-{i}")
        self.assertEqual(self.guess(url, "the-right-password").status_code, 302)


class TokensInTheAdminTests(BaseTestCase):
    """Player and invite tokens are credentials: never on an admin page, even for staff who may only view."""

    def setUp(self):
        viewer = get_user_model().objects.create_user("viewer", password="viewer-password", is_staff=True)
        viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_player", "view_invite"]))
        self.client.force_login(viewer)

    def test_no_player_or_invite_page_shows_a_token(self):
        pages = [reverse("admin:players_player_changelist"), reverse("admin:players_invite_changelist"),
                 reverse("admin:players_player_change", args=[self.bob.pk]),
                 reverse("admin:players_invite_change", args=[self.invite.pk])]
        for url in pages:
            response = self.client.get(url)
            self.assertEqual(response.status_code, 200, url)
            body = response.content.decode()
            self.assertNotIn(self.bob.token, body, url)
            self.assertNotIn(self.invite.token, body, url)


class InputsThatWere500sTests(BaseTestCase):
    def setUp(self):
        self.node = self.add_node("hangzhou")
        Node.objects.filter(pk=self.node.pk).update(state=NodeState.READY)

    def test_an_rtt_key_that_is_a_unicode_digit_is_ignored_not_a_crash(self):
        response = self.client.post(me_url(self.bob, "player_rtt"), {"rtts": json.dumps({"²": 1})})
        self.assertEqual(response.status_code, 200)

    def test_rtts_nested_a_thousand_deep_are_a_bad_request(self):
        response = self.client.post(me_url(self.bob, "player_rtt"), {"rtts": "[" * 1000 + "]" * 1000})
        self.assertEqual(response.status_code, 400)

    def test_a_profile_named_by_a_unicode_digit_is_not_found(self):
        response = self.client.get(f"/me/{self.bob.token}/profile/%C2%B2.ovpn")
        self.assertEqual(response.status_code, 404)

    def test_a_host_that_only_looks_like_ipv6_is_a_form_error(self):
        self.client.force_login(self.alice)
        data = {"name": "deadbeef", "region": "asia/hk", "priority": 0, "public_address": "dead:beef",
                "udp_port": 1194, "tcp_port": 443, "ssh_host": "dead:beef", "ssh_port": 22, "ssh_user": "root"}
        response = self.client.post(reverse("nodes:node_add", args=[self.lan.slug]), data)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "Enter a host name or an IP address.")
        self.assertFalse(Node.objects.filter(name="deadbeef").exists())


class JoinRateTests(BaseTestCase):
    def setUp(self):
        for address in ("127.0.0.1", "198.51.100.7", "198.51.100.8"):
            services.clear_rate(services.join_rate_key(address))
            self.addCleanup(services.clear_rate, services.join_rate_key(address))

    def join(self, nickname, **headers):
        return self.client.post(reverse("players:join", args=[self.invite.token]), {"nickname": nickname},
                                **headers)

    @override_settings(LANHUB_JOIN_RATE=2)
    def test_failed_attempts_do_not_use_up_the_join_limit(self):
        for _ in range(5):
            self.assertEqual(self.join("!!").status_code, 200)  # a form error
        self.assertEqual(self.join("bob").status_code, 200)  # nickname taken: also not a join
        self.assertEqual(self.join("dave").status_code, 302)
        self.assertEqual(self.join("erin").status_code, 302)
        self.assertEqual(self.join("frank").status_code, 429)

    @override_settings(LANHUB_JOIN_RATE=1, TRUSTED_PROXIES=["127.0.0.1"])
    def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(self):
        self.assertEqual(self.join("dave", HTTP_X_FORWARDED_FOR="198.51.100.7").status_code, 302)
        self.assertEqual(self.join("erin", HTTP_X_FORWARDED_FOR="198.51.100.8").status_code, 302)
        self.assertEqual(self.join("frank", HTTP_X_FORWARDED_FOR="198.51.100.8").status_code, 429)

    @override_settings(LANHUB_JOIN_RATE=1, TRUSTED_PROXIES=[])
    def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(self):
        self.assertEqual(self.join("dave", HTTP_X_FORWARDED_FOR="198.51.100.7").status_code, 302)
        self.assertEqual(self.join("erin", HTTP_X_FORWARDED_FOR="198.51.100.8").status_code, 429)


class ClientAddressTests(BaseTestCase):
    def address(self, remote, forwarded=None):
        request = RequestFactory().get("/", REMOTE_ADDR=remote,
                                       **({"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}))
        return client_address(request)

    @override_settings(TRUSTED_PROXIES=["10.0.0.0/24"])
    def test_it_takes_the_rightmost_address_no_trusted_proxy_added(self):
        self.assertEqual(self.address("10.0.0.5", "1.2.3.4, 198.51.100.9, 10.0.0.7"), "198.51.100.9")

    @override_settings(TRUSTED_PROXIES=["10.0.0.0/24"])
    def test_a_malformed_hop_falls_back_to_the_peer(self):
        self.assertEqual(self.address("10.0.0.5", "198.51.100.9, nonsense"), "10.0.0.5")

    @override_settings(TRUSTED_PROXIES=["10.0.0.0/24"])
    def test_a_peer_outside_the_trusted_proxies_is_the_client(self):
        self.assertEqual(self.address("203.0.113.9", "198.51.100.9"), "203.0.113.9")


class LostDeviceRateTests(BaseTestCase):
    def setUp(self):
        services.clear_rate(services.lost_device_rate_key(self.bob))
        self.addCleanup(services.clear_rate, services.lost_device_rate_key(self.bob))

    @override_settings(LANHUB_LOST_DEVICE_RATE=2)
    def test_the_lost_device_button_is_throttled_per_player(self):
        devices = [services.add_device(self.bob, name=name) for name in ("laptop", "phone", "tablet")]
        for device in devices[:2]:
            player = Player.objects.get(pk=self.bob.pk)
            self.assertEqual(self.client.post(me_url(player, "player_lost_device", device.ref)).status_code, 302)
        player = Player.objects.get(pk=self.bob.pk)
        revoked = RevokedCertificate.objects.count()
        response = self.client.post(me_url(player, "player_lost_device", devices[2].ref))
        self.assertEqual(response.status_code, 429)
        self.assertEqual(RevokedCertificate.objects.count(), revoked)  # no CRL re-signed, no sync
        self.assertEqual(Player.objects.get(pk=self.bob.pk).token, player.token)


class TrailingNewlineTests(BaseTestCase):
    def test_names_and_hosts_with_a_trailing_newline_are_refused(self):
        for field, value in (("name", "hangzhou\n"), ("region", "asia/hk\n"), ("public_address", "203.0.113.5\n"),
                             ("ssh_host", "node.example.org\n"), ("ssh_user", "root\n")):
            fields = {"lan": self.lan, "name": "hangzhou", "public_address": "203.0.113.5",
                      "ssh_host": "203.0.113.5", field: value}
            with self.subTest(field=field), self.assertRaises(ValidationError):
                Node(**fields).full_clean(exclude=["lan"])

    def test_a_nickname_with_a_trailing_newline_is_refused(self):
        with self.assertRaises(ValidationError):
            nickname_validator("dave\n")
