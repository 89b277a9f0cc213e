"""A player's devices (issue 12, item 3): each device its own certificate, profile and address; the lobby shows a
player once with their devices; revoking the player revokes every device; a lost device is switched off alone."""

import re

from cryptography import x509
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import TransactionTestCase
from django.urls import reverse
from django.utils import timezone

from nodes import presence
from nodes.models import Lan, Node, NodeState, RevokedCertificate, VpnSession
from nodes.openvpn_mgmt import ClientRow
from players import services
from players.models import FIRST_DEVICE_NAME, Player
from tests.base import BaseTestCase


def me_url(player, name="player_home", *args):
    return reverse(f"players:{name}", args=[player.token, *args])


def cert_of(profile: str) -> str:
    return re.search(r"<cert>\n(.+?)</cert>", profile, re.S).group(1)


def row(cn, vpn, real):
    return ClientRow(common_name=cn, real_address=real, vpn_address=vpn, bytes_in=0, bytes_out=0,
                     connected_since=timezone.now(), instance="server/lanhub-udp")


class DeviceServiceTests(BaseTestCase):
    def test_a_player_joins_with_one_device_holding_their_certificate(self):
        [device] = self.bob.devices.all()
        self.assertEqual(device.name, FIRST_DEVICE_NAME)
        cert = x509.load_pem_x509_certificate(device.cert_pem.encode())
        self.assertEqual(format(cert.serial_number, "x"), device.serial)
        self.assertTrue(device.common_name.startswith("player-bob-"))

    def test_each_added_device_gets_its_own_certificate_and_common_name(self):
        laptop = services.add_device(self.bob, name="  laptop ")
        phone = services.add_device(self.bob, name="Anna's phone")
        devices = list(self.bob.devices.all())
        self.assertEqual([d.name for d in devices], [FIRST_DEVICE_NAME, "laptop", "Anna's phone"])
        self.assertEqual(len({d.common_name for d in devices}), 3)  # OpenVPN tells sessions apart by common name
        self.assertEqual(len({d.serial for d in devices}), 3)
        self.assertNotEqual(laptop.key_sealed, phone.key_sealed)

    def test_a_device_name_is_required_unique_among_devices_in_use_and_printable(self):
        services.add_device(self.bob, name="laptop")
        for bad in ("", "   ", "LAPTOP", "tab\x07let", "x" * 33):
            with self.subTest(name=bad), self.assertRaises(ValidationError):
                services.add_device(self.bob, name=bad)
        self.assertEqual(self.bob.devices.count(), 2)

    def test_a_lost_devices_name_can_be_used_again(self):
        laptop = services.add_device(self.bob, name="laptop")
        services.switch_off_device(self.bob, laptop)
        again = services.add_device(Player.objects.get(pk=self.bob.pk), name="laptop")
        self.assertNotEqual(again.serial, laptop.serial)

    def test_a_player_has_at_most_max_devices_in_use(self):
        for i in range(services.MAX_DEVICES - 1):
            services.add_device(self.bob, name=f"device {i}")
        with self.assertRaisesMessage(ValidationError, "Switch one off"):
            services.add_device(self.bob, name="one more")

    def test_a_revoked_player_cannot_add_a_device(self):
        services.revoke_player(self.bob)
        with self.assertRaises(ValidationError):
            services.add_device(self.bob, name="laptop")

    def test_revoking_the_player_revokes_every_device(self):
        laptop = services.add_device(self.bob, name="laptop")
        services.revoke_player(self.bob)
        serials = {d.serial for d in self.bob.devices.all()}
        self.assertEqual(serials, {self.bob.serial, laptop.serial})
        self.assertEqual(set(RevokedCertificate.objects.filter(lan=self.lan).values_list("serial", flat=True)),
                         serials)
        self.assertFalse(self.bob.devices.filter(revoked_at__isnull=True).exists())

    def test_a_lost_device_is_switched_off_alone(self):
        first = self.bob.first_device
        laptop = services.add_device(self.bob, name="laptop")
        services.switch_off_device(self.bob, laptop)
        first.refresh_from_db()
        laptop.refresh_from_db()
        self.assertIsNone(first.revoked_at)
        self.assertIsNotNone(laptop.revoked_at)
        self.assertEqual(list(RevokedCertificate.objects.values_list("serial", flat=True)), [laptop.serial])
        self.assertIsNone(Player.objects.get(pk=self.bob.pk).revoked_at)

    def test_another_players_device_cannot_be_switched_off(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        with self.assertRaises(ValidationError):
            services.switch_off_device(self.bob, dave.first_device)
        self.assertFalse(RevokedCertificate.objects.exists())

    def test_the_hosts_reissue_renews_every_device_in_use(self):
        laptop = services.add_device(self.bob, name="laptop")
        old = {d.serial for d in self.bob.devices.all()}
        services.reissue_player(self.bob)
        new = {d.serial for d in self.bob.devices.all()}
        self.assertFalse(old & new)
        self.assertEqual(set(RevokedCertificate.objects.values_list("serial", flat=True)), old)
        self.assertEqual(self.bob.devices.get(pk=laptop.pk).name, "laptop")


class DeviceProfileTests(BaseTestCase):
    def setUp(self):
        self.hangzhou = self.add_node("hangzhou", public_address="203.0.113.10")
        Node.objects.filter(pk=self.hangzhou.pk).update(state=NodeState.READY)
        self.laptop = services.add_device(self.bob, name="laptop")

    def test_each_device_downloads_a_profile_with_its_own_certificate(self):
        first = self.client.get(me_url(self.bob, "device_profile_download", self.bob.first_device.ref, "hangzhou"))
        laptop = self.client.get(me_url(self.bob, "device_profile_download", self.laptop.ref, "hangzhou"))
        self.assertEqual(cert_of(first.content.decode()).strip(), self.bob.first_device.cert_pem.strip())
        self.assertEqual(cert_of(laptop.content.decode()).strip(), self.laptop.cert_pem.strip())
        # Two devices' files must not overwrite each other in one Downloads folder.
        self.assertEqual(first["Content-Disposition"], 'attachment; filename="gamenight-bob-hangzhou.ovpn"')
        self.assertEqual(laptop["Content-Disposition"], 'attachment; filename="gamenight-bob-laptop-hangzhou.ovpn"')

    def test_the_link_without_a_device_serves_the_first_device_in_use(self):
        response = self.client.get(me_url(self.bob, "profile_download", "hangzhou"))
        self.assertEqual(cert_of(response.content.decode()).strip(), self.bob.first_device.cert_pem.strip())
        services.switch_off_device(self.bob, self.bob.first_device)
        self.bob.refresh_from_db()
        response = self.client.get(me_url(self.bob, "profile_download", "hangzhou"))
        self.assertEqual(cert_of(response.content.decode()).strip(), self.laptop.cert_pem.strip())

    def test_a_switched_off_or_another_players_device_has_no_profile(self):
        dave = services.redeem_invite(token=self.invite.token, nickname="dave")
        response = self.client.get(me_url(self.bob, "device_profile_download", dave.first_device.ref, "hangzhou"))
        self.assertEqual(response.status_code, 404)
        services.switch_off_device(self.bob, self.laptop)
        self.bob.refresh_from_db()
        response = self.client.get(me_url(self.bob, "device_profile_download", self.laptop.ref, "hangzhou"))
        self.assertEqual(response.status_code, 404)
        self.assertNotIn(b"<key>", response.content)


class AddDeviceViewTests(BaseTestCase):
    def test_the_player_page_lists_the_devices_with_their_downloads(self):
        hangzhou = self.add_node("hangzhou")
        Node.objects.filter(pk=hangzhou.pk).update(state=NodeState.READY)
        laptop = services.add_device(self.bob, name="laptop")
        response = self.client.get(me_url(self.bob))
        self.assertContains(response, f'id="device-{laptop.ref}"')
        self.assertContains(response, me_url(self.bob, "device_profile_download", laptop.ref, "hangzhou"))
        self.assertContains(response, me_url(self.bob, "player_lost_device", laptop.ref))
        self.assertNotContains(response, "Each of your devices can use the same file")

    def test_adding_a_device_redirects_to_it(self):
        response = self.client.post(me_url(self.bob, "player_add_device"), {"name": "laptop"})
        laptop = self.bob.devices.get(name="laptop")
        self.assertRedirects(response, me_url(self.bob) + f"#device-{laptop.ref}", fetch_redirect_response=False)

    def test_a_bad_name_is_shown_on_the_form_not_a_traceback(self):
        services.add_device(self.bob, name="laptop")
        response = self.client.post(me_url(self.bob, "player_add_device"), {"name": "Laptop"})
        self.assertContains(response, "You have a device called “Laptop” already", status_code=400)
        response = self.client.post(me_url(self.bob, "player_add_device"), {"name": ""})
        self.assertContains(response, "This field is required", status_code=400)
        self.assertEqual(self.bob.devices.count(), 2)

    def test_it_rejects_a_get_and_a_revoked_player(self):
        self.assertEqual(self.client.get(me_url(self.bob, "player_add_device")).status_code, 405)
        services.revoke_player(self.bob)
        self.assertEqual(self.client.post(me_url(self.bob, "player_add_device"), {"name": "x"}).status_code, 410)


class DevicesOnlineTests(BaseTestCase):
    """Two devices of one player online at once: two sessions, one player in the lobby."""

    def setUp(self):
        self.hangzhou = self.add_node("hangzhou")
        Node.objects.filter(pk=self.hangzhou.pk).update(state=NodeState.READY)
        self.laptop = services.add_device(self.bob, name="laptop")
        presence.replace_node(self.hangzhou, [
            row(self.bob.first_device.common_name, "10.0.1.5", "198.51.100.10:40001"),
            row(self.laptop.common_name, "10.0.1.6", "198.51.100.11:40002"),
        ])

    def test_the_status_rows_of_both_devices_belong_to_the_player(self):
        self.assertEqual(list(VpnSession.objects.order_by("vpn_address").values_list("player__nickname", "vpn_address")),
                         [("bob", "10.0.1.5"), ("bob", "10.0.1.6")])

    def test_the_lobby_shows_the_player_once_with_both_devices(self):
        response = self.client.get(me_url(self.bob, "lobby_fragment"))
        html = response.content.decode()
        self.assertContains(response, "1 player online")
        self.assertEqual(html.count('data-player="bob"'), 1)
        self.assertIn('data-device="laptop"', html)
        self.assertIn(f'data-device="{FIRST_DEVICE_NAME}"', html)
        self.assertIn('data-copy="10.0.1.5"', html)
        self.assertIn('data-copy="10.0.1.6"', html)

    def test_the_hosts_pages_count_the_player_once(self):
        self.client.force_login(self.alice)
        page = self.client.get(reverse("nodes:node_detail", args=[self.hangzhou.pk]))
        self.assertEqual(page.context["players_online"], 1)
        dashboard = self.client.get(reverse("nodes:lan_detail", args=[self.lan.slug]))
        self.assertContains(dashboard, "+1 device")

    def test_a_lost_devices_session_no_longer_counts_as_the_player(self):
        services.switch_off_device(self.bob, self.laptop)
        presence.replace_node(self.hangzhou, [row(self.laptop.common_name, "10.0.1.6", "198.51.100.11:40002")])
        self.assertEqual(list(VpnSession.objects.values_list("player", flat=True)), [None])


class DevicesMigrationTests(TransactionTestCase):
    """Players from before devices keep their certificate, as their first device."""

    def migrate(self, target):
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([target])
        return executor.loader.project_state([target]).apps

    def tearDown(self):
        self.migrate(("players", executor_leaf()))

    def test_a_players_certificate_becomes_their_first_device(self):
        apps = self.migrate(("players", "0002_nickname_validator_ends_at_z"))
        # Only the players app goes back; the LAN is a row of today's nodes tables.
        OldPlayer = apps.get_model("players", "Player")
        owner = get_user_model().objects.create(username="host")
        lan = Lan.objects.create(owner=owner, name="Old", slug="old")
        issued = timezone.now()
        OldPlayer.objects.create(lan_id=lan.pk, nickname="bob", token="t" * 32, common_name="player-bob-abc123",
                                 cert_pem="CERT", key_sealed="KEY", serial="1f", issued_at=issued)
        apps = self.migrate(("players", "0003_devices"))
        [device] = apps.get_model("players", "Device").objects.all()
        self.assertEqual((device.name, device.common_name, device.cert_pem, device.key_sealed, device.serial),
                         (FIRST_DEVICE_NAME, "player-bob-abc123", "CERT", "KEY", "1f"))
        self.assertEqual(device.issued_at, issued)
        self.assertIsNone(device.revoked_at)


def executor_leaf() -> str:
    return MigrationExecutor(connection).loader.graph.leaf_nodes("players")[0][1]
