"""Every admin changelist and add page renders for a superuser, and no private key is ever shown."""

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import RequestFactory
from django.urls import reverse

from tests.base import BaseTestCase


class AdminPagesTests(BaseTestCase):
    def setUp(self):
        self.root = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
        self.client.force_login(self.root)

    def test_every_changelist_and_add_page_renders(self):
        self.add_node("hangzhou")
        request = RequestFactory().get("/admin/")
        request.user = self.root
        for model, model_admin in admin.site._registry.items():
            meta = model._meta
            with self.subTest(model=meta.label):
                url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
                self.assertEqual(self.client.get(url).status_code, 200)
                add = self.client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_add"))
                expected = 200 if model_admin.has_add_permission(request) else 403
                self.assertEqual(add.status_code, expected)

    def test_no_admin_page_shows_a_private_key(self):
        node = self.add_node("hangzhou")
        pages = [
            reverse("admin:nodes_lan_change", args=[self.lan.pk]),
            reverse("admin:nodes_node_change", args=[node.pk]),
            reverse("admin:players_player_change", args=[self.bob.pk]),
        ]
        for url in pages:
            body = self.client.get(url).content.decode()
            self.assertNotIn("PRIVATE KEY", body, url)
            self.assertNotIn(self.lan.ca_key_sealed[:40], body, url)
            self.assertNotIn("OpenVPN Static key", body, url)

    def test_the_node_page_shows_the_authorized_keys_line(self):
        node = self.add_node("hangzhou")
        body = self.client.get(reverse("admin:nodes_node_change", args=[node.pk])).content.decode()
        self.assertIn(self.lan.ssh_public_key.split()[1], body)


class AdminWritesTests(BaseTestCase):
    def setUp(self):
        self.root = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
        self.client.force_login(self.root)

    def node_form(self, node, **changes):
        data = {f: getattr(node, f) if getattr(node, f) is not None else "" for f in (
            "display_name", "region", "priority", "public_address", "udp_port", "tcp_port", "ssh_host", "ssh_port",
            "ssh_user", "latitude", "longitude", "country", "udp_pool", "tcp_pool", "ssh_host_key")}
        data.update({"pinned_upstream": "", "healthy": "on" if node.healthy else ""})
        data.update(changes)
        return data

    def test_clearing_the_pinned_host_key_in_the_admin_clears_it(self):
        node = self.add_node("hangzhou")
        node.ssh_host_key = "ssh-ed25519 AAAAOLD"
        node.save()
        url = reverse("admin:nodes_node_change", args=[node.pk])
        response = self.client.post(url, self.node_form(node, ssh_host_key=""))
        self.assertEqual(response.status_code, 302, response.content[:2000])
        node.refresh_from_db()
        self.assertEqual(node.ssh_host_key, "")

    def test_an_impossible_node_is_a_form_error_and_saves_nothing(self):
        self.add_node("hangzhou", udp_pool="10.251.0.0/16", tcp_pool="10.250.0.0/16")
        data = {"lan": self.lan.pk, "display_name": "Hong Kong", "name": "", "region": "asia/hk", "priority": 0,
                "public_address": "203.0.113.11", "udp_port": 1194, "tcp_port": 443, "ssh_host": "203.0.113.11",
                "ssh_port": 22, "ssh_user": "root", "udp_pool": "10.251.0.0/17", "tcp_pool": "10.248.0.0/16",
                "healthy": "on"}
        response = self.client.post(reverse("admin:nodes_node_add"), data)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "hangzhou")
        self.assertFalse(self.lan.nodes.filter(display_name="Hong Kong").exists())

    def test_a_supernet_the_pools_do_not_fit_is_a_form_error(self):
        self.add_node("hangzhou")
        url = reverse("admin:nodes_lan_change", args=[self.lan.pk])
        data = {"owner": self.alice.pk, "name": self.lan.name, "slug": self.lan.slug, "supernet": "192.168.0.0/16",
                "pool_prefix": 16, "topology_mode": "auto", "default_node": ""}
        response = self.client.post(url, data)
        self.assertEqual(response.status_code, 200)
        self.lan.refresh_from_db()
        self.assertEqual(self.lan.supernet, "10.0.0.0/8")
