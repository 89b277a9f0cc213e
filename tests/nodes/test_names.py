"""Names: a display name typed freely, a slug derived from it once; and one set of node fields behind the dashboard's
and the admin's forms."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import SimpleTestCase, TransactionTestCase
from django.urls import reverse

from nodes import layout, services
from nodes.admin import NodeAdminForm
from nodes.forms import NodeForm
from nodes.models import Lan, Node
from tests.base import BaseTestCase


class SlugTests(SimpleTestCase):
    def test_display_names_in_any_script_become_safe_slugs(self):
        cases = {"Hong Kong": "hong-kong", "杭州": "hangzhou", "東京": "dongjing", "Zoë's box": "zoe-s-box",
                 "Москва": "moskva", "1st server": "n-1st-server", "🎮": "video-game", "---": "node", "": "node",
                 "a" * 40: "a" * 32, "x" * 31 + " y": "x" * 31}
        for typed, slug in cases.items():
            with self.subTest(typed=typed):
                self.assertEqual(layout.slug_for(typed, fallback="node"), slug)
                self.assertTrue(layout.is_node_name(layout.slug_for(typed, fallback="node")))

    def test_a_taken_slug_gets_the_first_free_suffix_within_32_characters(self):
        self.assertEqual(layout.unique_slug("hong-kong", set()), "hong-kong")
        self.assertEqual(layout.unique_slug("hong-kong", {"hong-kong", "hong-kong-2"}), "hong-kong-3")
        self.assertEqual(layout.unique_slug("a" * 32, {"a" * 32}), "a" * 30 + "-2")

    def test_a_display_name_is_one_printable_line(self):
        self.assertTrue(layout.is_display_name("Hong Kong"))
        self.assertTrue(layout.is_display_name("杭州"))
        for bad in ("", " Hong Kong", "Hong\nKong", "x" * 65, None):
            with self.subTest(bad=bad):
                self.assertFalse(layout.is_display_name(bad))


class NodeNameServiceTests(BaseTestCase):
    def test_a_node_typed_as_hong_kong_gets_the_slug_hong_kong_and_the_public_address_as_ssh_host(self):
        node = services.create_node(lan=self.lan, display_name="Hong Kong", region="asia/hk",
                                    public_address="203.0.113.20")
        self.assertEqual((node.name, node.display_name, node.ssh_host), ("hong-kong", "Hong Kong", "203.0.113.20"))
        self.assertEqual([cn for _, cn in services.node_certificates(node)], ["node-hong-kong", "link-hong-kong"])
        self.assertEqual(str(node), "Hong Kong (Game Night)")

    def test_two_names_with_one_slug_get_a_suffix_and_a_name_twice_is_an_error(self):
        services.create_node(lan=self.lan, display_name="Hong Kong", public_address="203.0.113.20")
        second = services.create_node(lan=self.lan, display_name="Hong-Kong", public_address="203.0.113.21")
        self.assertEqual(second.name, "hong-kong-2")
        with self.assertRaises(ValidationError) as ctx:
            services.create_node(lan=self.lan, display_name="HONG KONG", public_address="203.0.113.22")
        self.assertIn("already has a server named", str(ctx.exception))

    def test_a_lan_named_in_chinese_gets_a_slug_and_a_clash_a_suffix(self):
        first = services.create_lan(owner=self.alice, name="杭州 LAN")
        second = services.create_lan(owner=self.alice, name="杭州 lan")
        self.assertEqual((first.slug, second.slug), ("hangzhou-lan", "hangzhou-lan-2"))
        self.assertEqual(first.name, "杭州 LAN")


class OneNodeFormTests(BaseTestCase):
    """The dashboard's form and the admin's take the same fields with the same rules and defaults."""

    def setUp(self):
        self.root = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
        self.other = services.create_lan(owner=self.alice, name="Other")

    def minimal(self, **extra):
        return {"display_name": "Hong Kong", "public_address": "203.0.113.20", "priority": 0, "udp_port": 1194,
                "tcp_port": 443, "ssh_port": 22, "ssh_user": "root", **extra}

    def test_both_forms_have_the_same_fields_required_alike(self):
        dashboard, admin = NodeForm(lan=self.lan), NodeAdminForm()
        for field in services.NODE_FIELDS:
            with self.subTest(field=field):
                self.assertEqual(dashboard.fields[field].required, admin.fields[field].required)
                self.assertEqual(dashboard.fields[field].label, admin.fields[field].label)
        self.assertFalse(dashboard.fields["ssh_host"].required)
        self.assertFalse(dashboard.fields["name"].required)
        self.assertTrue(dashboard.fields["display_name"].required)

    def test_the_same_minimal_input_makes_the_same_node_through_the_dashboard_and_the_admin(self):
        self.client.force_login(self.alice)
        self.client.post(reverse("nodes:node_add", args=[self.lan.slug]), self.minimal())
        self.client.force_login(self.root)
        response = self.client.post(reverse("admin:nodes_node_add"), self.minimal(lan=self.other.pk, healthy="on"))
        self.assertEqual(response.status_code, 302, response.content[-3000:])
        fields = ("name", "display_name", "ssh_host", "ssh_user", "ssh_port", "region", "country")
        made = [Node.objects.filter(lan=lan).values(*fields).get() for lan in (self.lan, self.other)]
        self.assertEqual(made[0], made[1])
        self.assertEqual((made[0]["name"], made[0]["ssh_host"]), ("hong-kong", "203.0.113.20"))

    def test_both_forms_refuse_the_same_bad_input_with_the_same_messages(self):
        bad = self.minimal(ssh_user="Root!", public_address="dead:beef", name="Hong Kong", display_name="   ")
        dashboard = NodeForm(bad, lan=self.lan)
        admin = NodeAdminForm({**bad, "lan": self.lan.pk, "healthy": "on"})
        self.assertFalse(dashboard.is_valid())
        self.assertFalse(admin.is_valid())
        for field in ("ssh_user", "public_address", "name", "display_name"):
            with self.subTest(field=field):
                self.assertEqual(dashboard.errors[field], admin.errors[field])

    def test_the_admin_keeps_a_nodes_slug_when_its_name_changes(self):
        node = self.add_node("hangzhou", display_name="Hangzhou")
        self.client.force_login(self.root)
        data = {f: getattr(node, f) if getattr(node, f) is not None else "" for f in services.NODE_FIELDS}
        data.update({"display_name": "杭州", "name": "shanghai", "pinned_upstream": "", "healthy": "on",
                     "ssh_host_key": ""})
        response = self.client.post(reverse("admin:nodes_node_change", args=[node.pk]), data)
        self.assertEqual(response.status_code, 302, response.content[-3000:])
        node.refresh_from_db()
        self.assertEqual((node.name, node.display_name), ("hangzhou", "杭州"))

    def test_a_lan_added_in_the_admin_without_a_slug_gets_one(self):
        self.client.force_login(self.root)
        response = self.client.post(reverse("admin:nodes_lan_add"), {
            "owner": self.alice.pk, "name": "Hong Kong nights", "slug": "", "supernet": "10.0.0.0/8",
            "pool_prefix": 16, "topology_mode": "auto", "discovery_ports": ""})
        self.assertEqual(response.status_code, 302, response.content[-3000:])
        self.assertTrue(Lan.objects.filter(owner=self.alice, slug="hong-kong-nights").exists())


class DisplayNameMigrationTests(TransactionTestCase):
    """Existing nodes are shown by their slug until renamed; a LAN slug that breaks the rules is derived again."""

    before, after = [("nodes", "0007_node_public_ipv6")], [("nodes", "0008_node_display_name")]

    def tearDown(self):
        MigrationExecutor(connection).migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())

    def test_existing_rows_get_a_display_name_and_a_valid_slug(self):
        executor = MigrationExecutor(connection)
        executor.migrate(self.before)
        old = executor.loader.project_state(self.before).apps
        owner = old.get_model("auth", "User").objects.create(username="host")
        lan = old.get_model("nodes", "Lan").objects.create(owner=owner, name="杭州", slug="")
        old.get_model("nodes", "Node").objects.create(lan=lan, name="hangzhou", public_address="203.0.113.5",
                                                      ssh_host="203.0.113.5")
        executor = MigrationExecutor(connection)
        executor.migrate(self.after)
        new = executor.loader.project_state(self.after).apps
        self.assertEqual(new.get_model("nodes", "Node").objects.get().display_name, "hangzhou")
        self.assertEqual(new.get_model("nodes", "Lan").objects.get().slug, "hangzhou")
