"""Profile downloads on their hot path (players/middleware.py, players.views.download_response): what they cost in
queries, that the short cut answers as the whole stack does, and that nothing cached outlives a revoke or a change
of the servers."""

from unittest import mock

from django.contrib.sessions.middleware import SessionMiddleware
from django.urls import reverse

from nodes.models import Node, NodeState
from players import services
from tests.base import BaseTestCase

HEADERS = ("Content-Type", "Content-Disposition", "Content-Length", "Cache-Control", "X-Frame-Options",
           "Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy")


def download_url(player, node="hangzhou", device=None):
    if device is None:
        return reverse("players:profile_download", args=[player.token, node])
    return reverse("players:device_profile_download", args=[player.token, device.ref, node])


def remote_hosts(response) -> list[str]:
    return [line.split()[1] for line in response.content.decode().splitlines() if line.startswith("remote ")]


class DownloadTestCase(BaseTestCase):
    def setUp(self):
        self.hangzhou = self.add_node("hangzhou", public_address="203.0.113.10")
        self.hongkong = self.add_node("hongkong", region="asia/hk", public_address="203.0.113.20")
        self.make_ready(self.hangzhou, self.hongkong)

    def make_ready(self, *nodes, healthy=True):
        Node.objects.filter(pk__in=[n.pk for n in nodes]).update(state=NodeState.READY, healthy=healthy)


class DownloadCostTests(DownloadTestCase):
    def test_a_download_is_one_query_and_skips_the_session_and_sign_in_middleware(self):
        self.client.get(download_url(self.bob))  # the statements compiled, the nodes read, the profile rendered
        with mock.patch.object(SessionMiddleware, "process_request", autospec=True) as session:
            # 1 the device in use with its player and LAN; the LAN's ready nodes (their version unchanged) and the
            # profile from the process's caches.
            with self.assertNumQueries(1):
                response = self.client.get(download_url(self.bob))
        self.assertEqual(response.status_code, 200)
        session.assert_not_called()

    def test_a_browser_that_measured_its_round_trip_times_gets_them_applied_through_its_session(self):
        rtts = f'{{"{self.hangzhou.pk}": 90, "{self.hongkong.pk}": 12}}'
        self.client.post(reverse("players:player_rtt", args=[self.bob.token]), {"rtts": rtts})
        with self.assertNumQueries(3):  # the device, the ready nodes (first download), and the session with the times
            response = self.client.get(download_url(self.bob, "hangzhou"))
        self.assertEqual(remote_hosts(response), ["203.0.113.10", "203.0.113.10", "203.0.113.20", "203.0.113.20"])
        response = self.client.get(download_url(self.bob, "hongkong"))
        self.assertEqual(remote_hosts(response)[2], "203.0.113.10")


class ShortCutTests(DownloadTestCase):
    def test_it_answers_with_the_body_and_headers_of_the_whole_stack(self):
        laptop = services.add_device(self.bob, name="laptop")
        for device in (None, laptop):
            with self.subTest(device=device):
                short = self.client.get(download_url(self.bob, device=device))
                self.client.cookies["sessionid"] = "not-a-session"  # a session cookie: the whole stack answers
                whole = self.client.get(download_url(self.bob, device=device))
                del self.client.cookies["sessionid"]
                self.assertEqual((short.status_code, whole.status_code), (200, 200))
                self.assertEqual(short.content, whole.content)
                for header in HEADERS:
                    self.assertEqual(short.get(header), whole.get(header), header)
                self.assertEqual(short["Content-Length"], str(len(short.content)))
                self.assertEqual(short["Cache-Control"], "no-store")
                self.assertEqual(short["X-Frame-Options"], "DENY")

    def test_an_ovpn_path_that_is_not_a_download_goes_on_through_the_stack_every_time(self):
        for _ in range(2):  # the second time from the short cut's resolved paths
            response = self.client.get(f"/me/{self.bob.token}/profile/a/b.ovpn")
            self.assertEqual(response.status_code, 404)
            self.assertNotIn(b"<key>", response.content)
        self.assertEqual(self.client.get(download_url(self.bob)).status_code, 200)

    def test_refusals_are_explained_by_the_whole_stack(self):
        self.assertContains(self.client.get(f"/me/{'B' * 32}/profile/hangzhou.ovpn"), "This link leads nowhere",
                            status_code=404)
        self.assertContains(self.client.get("/me/short/profile/hangzhou.ovpn"), "This link is incomplete",
                            status_code=404)
        self.assertEqual(self.client.get(download_url(self.bob, "nowhere")).status_code, 404)
        self.assertEqual(self.client.post(download_url(self.bob)).status_code, 405)


class NothingStaleTests(DownloadTestCase):
    def test_a_switched_off_device_is_refused_at_once_with_the_cache_warm(self):
        laptop = services.add_device(self.bob, name="laptop")
        old_token = self.bob.token
        for _ in range(2):  # warm: rendered and cached
            self.assertEqual(self.client.get(download_url(self.bob, device=laptop)).status_code, 200)
        services.switch_off_device(self.bob, laptop)
        refused = self.client.get(download_url(self.bob, device=laptop))  # the link it may have bookmarked
        self.assertEqual(refused.status_code, 404)
        self.assertNotIn(b"<key>", refused.content)
        self.bob.refresh_from_db()
        self.assertNotEqual(self.bob.token, old_token)
        self.assertEqual(self.client.get(download_url(self.bob, device=laptop)).status_code, 404)
        self.assertEqual(self.client.get(download_url(self.bob)).status_code, 200)  # the other device goes on

    def test_a_revoked_player_is_refused_at_once_with_the_cache_warm(self):
        self.assertEqual(self.client.get(download_url(self.bob)).status_code, 200)
        services.revoke_player(self.bob)
        refused = self.client.get(download_url(self.bob))
        self.assertContains(refused, "This player was removed", status_code=410)
        self.assertNotIn(b"<key>", refused.content)

    def test_a_reissued_certificate_replaces_the_cached_profile(self):
        before = self.client.get(download_url(self.bob)).content
        bob = services.reissue_player(self.bob)
        after = self.client.get(download_url(bob)).content
        self.assertNotEqual(before, after)
        self.assertIn(bob.first_device.cert_pem.strip().encode(), after)
        self.assertEqual(self.client.get(download_url(self.bob)).status_code, 404)  # the old link

    def test_servers_added_removed_or_moved_change_the_cached_profile_at_once(self):
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2], ["203.0.113.10", "203.0.113.20"])
        singapore = self.add_node("singapore", region="asia/sg", public_address="203.0.113.40")
        self.make_ready(singapore)
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2],
                         ["203.0.113.10", "203.0.113.20", "203.0.113.40"])
        self.make_ready(self.hongkong, healthy=False)  # down: no longer a fallback
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2], ["203.0.113.10", "203.0.113.40"])
        Node.objects.filter(pk=singapore.pk).update(public_address="203.0.113.41")
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2], ["203.0.113.10", "203.0.113.41"])
        Node.objects.filter(pk=singapore.pk).delete()
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2], ["203.0.113.10"])
        self.assertEqual(self.client.get(download_url(self.bob, "singapore")).status_code, 404)

    def test_the_lans_new_default_server_reorders_the_cached_profile(self):
        singapore = self.add_node("singapore", region="asia/sg", public_address="203.0.113.40")
        self.make_ready(singapore)
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2],
                         ["203.0.113.10", "203.0.113.20", "203.0.113.40"])
        self.lan.default_node = singapore  # the first fallback from now on
        self.lan.save(update_fields=["default_node"])
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob)))[::2],
                         ["203.0.113.10", "203.0.113.40", "203.0.113.20"])


class NodesVersionTests(DownloadTestCase):
    """The ready nodes are read only when the LAN's nodes_version moved: every change a profile shows must move it."""

    def download(self, node="hangzhou"):
        response = self.client.get(download_url(self.bob, node))
        self.assertEqual(response.status_code, 200)
        return response.content.decode()

    def test_with_nothing_changed_a_download_is_one_query(self):
        self.download()
        with self.assertNumQueries(1):  # the device with its player and LAN (and the LAN's nodes_version)
            self.download()
        Node.objects.filter(pk=self.hongkong.pk).update(tcp_port=8443)
        with self.assertNumQueries(2):  # and the ready nodes, read again
            self.assertIn("remote 203.0.113.20 8443 tcp", self.download())

    def test_each_change_a_profile_shows_is_in_the_next_download(self):
        changes = [  # (column, value, what the next download holds)
            ("public_address", "203.0.113.21", "remote 203.0.113.21 1194 udp"),
            ("public_ipv6", "2001:db8::20", "remote 2001:db8::20 1194 udp"),
            ("udp_port", 1195, "remote 203.0.113.21 1195 udp"),
            ("tcp_port", 8443, "remote 203.0.113.21 8443 tcp"),
        ]
        for column, value, expected in changes:
            with self.subTest(column=column):
                self.download()  # warm: rows and profile in the process's caches
                Node.objects.filter(pk=self.hongkong.pk).update(**{column: value})
                self.assertIn(expected, self.download())

    def test_a_server_renamed_stopped_or_down_is_gone_from_the_next_download(self):
        self.assertIn("203.0.113.20", self.download())
        Node.objects.filter(pk=self.hongkong.pk).update(name="hk2")
        self.assertEqual(self.client.get(download_url(self.bob, "hongkong")).status_code, 404)
        self.assertIn("203.0.113.20", self.download("hk2"))
        Node.objects.filter(pk=self.hongkong.pk).update(state=NodeState.FAILED)
        self.assertNotIn("203.0.113.20", self.download())
        Node.objects.filter(pk=self.hongkong.pk).update(state=NodeState.READY, healthy=False)
        self.assertNotIn("203.0.113.20", self.download())
        Node.objects.filter(pk=self.hongkong.pk).update(healthy=True)
        self.assertIn("203.0.113.20", self.download())

    def test_a_new_order_of_the_servers_is_in_the_next_download(self):
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob, "hangzhou")))[::2],
                         ["203.0.113.10", "203.0.113.20"])
        singapore = self.add_node("singapore", region="asia/sg", public_address="203.0.113.40")
        self.make_ready(singapore)
        self.download()
        # The order the host added them in decides among equals: singapore first from now on.
        Node.objects.filter(pk=singapore.pk).update(created_at=self.hongkong.created_at.replace(year=2000))
        self.assertEqual(remote_hosts(self.client.get(download_url(self.bob, "hangzhou")))[::2],
                         ["203.0.113.10", "203.0.113.40", "203.0.113.20"])
