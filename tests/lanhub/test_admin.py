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
