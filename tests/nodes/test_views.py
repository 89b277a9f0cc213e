"""Host pages: LAN list and creation, the dashboard, nodes, sync, status JSON and the topology picture.

Every view is tested for success, the wrong method (405) and another host's object (404). The last class walks
every host URL as charlie against alice's objects.
"""

import datetime as dt
from types import SimpleNamespace

from django.contrib.auth import get_user_model
from django.test import SimpleTestCase
from django.urls import reverse
from django.utils import timezone

from nodes import games, services, svg
from nodes.models import Lan, Link, LinkState, Node, SyncRun, SyncStatus, VpnSession
from nodes.views import INVITES_SHOWN, PLAYERS_PER_PAGE, SERVERS_PER_PAGE
from players import services as player_services
from tests.base import BaseTestCase
from tests.nodes.test_services import mark_synced


class HostTestCase(BaseTestCase):
    def setUp(self):
        self.client.force_login(self.alice)


class LanListTests(HostTestCase):
    def test_it_lists_only_the_hosts_own_lans(self):
        response = self.client.get(reverse("nodes:lan_list"))
        self.assertContains(response, "Game Night")
        self.assertNotContains(response, "Office")

    def test_it_counts_servers_and_players_of_each_lan(self):
        self.add_node("hangzhou")
        self.add_node("hongkong", region="asia/hk", public_address="203.0.113.11")
        self.assertContains(self.client.get(reverse("nodes:lan_list")), "2 servers · 1 player ·")

    def test_it_lists_lans_in_a_fixed_number_of_queries(self):
        # 1 session, 2 user, 3 the host's LANs with node and player counts (correlated subqueries, same query).
        with self.assertNumQueries(3):
            self.client.get(reverse("nodes:lan_list"))

    def test_it_sends_a_visitor_to_the_login_page(self):
        self.client.logout()
        response = self.client.get(reverse("nodes:lan_list"))
        self.assertRedirects(response, reverse("login") + "?next=" + reverse("nodes:lan_list"))

    def test_the_site_root_leads_to_the_lan_list(self):
        self.assertRedirects(self.client.get("/"), reverse("nodes:lan_list"))

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(reverse("nodes:lan_list")).status_code, 405)

    def test_the_login_page_renders(self):
        self.client.logout()
        self.assertContains(self.client.get(reverse("login")), "Sign in")


class LanCreateTests(HostTestCase):
    def test_it_creates_a_lan_and_opens_its_dashboard(self):
        response = self.client.post(reverse("nodes:lan_create"), {
            "name": "Weekend", "slug": "", "supernet": "10.0.0.0/8", "pool_prefix": 16, "topology_mode": "auto"})
        lan = Lan.objects.get(owner=self.alice, slug="weekend")
        self.assertRedirects(response, reverse("nodes:lan_detail", args=[lan.slug]))
        self.assertTrue(lan.ca_cert and lan.ssh_public_key)

    def test_it_shows_a_service_error_on_the_form_and_creates_nothing(self):
        before = Lan.objects.count()
        response = self.client.post(reverse("nodes:lan_create"), {
            "name": "Again", "slug": "gamenight", "supernet": "10.0.0.0/8", "pool_prefix": 16,
            "topology_mode": "auto"})
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "You already have a LAN with the short name")
        self.assertEqual(Lan.objects.count(), before)

    def test_it_rejects_a_public_supernet(self):
        response = self.client.post(reverse("nodes:lan_create"), {
            "name": "Public", "supernet": "8.8.8.0/24", "pool_prefix": 16, "topology_mode": "auto"})
        self.assertContains(response, "not a private range")
        self.assertFalse(Lan.objects.filter(name="Public").exists())

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(reverse("nodes:lan_create")).status_code, 405)


class DashboardTests(HostTestCase):
    def setUp(self):
        super().setUp()
        self.hangzhou = self.add_node("hangzhou", country="CN")
        self.hongkong = self.add_node("hongkong", region="asia/hk", public_address="203.0.113.20", country="HK")
        VpnSession.objects.create(node=self.hongkong, instance="server-udp", common_name=self.bob.common_name,
                                  player=self.bob, vpn_address="10.1.0.6")

    def url(self):
        return reverse("nodes:lan_detail", args=[self.lan.slug])

    def test_it_shows_nodes_sync_progress_invites_players_and_the_deploy_key(self):
        response = self.client.get(self.url())
        self.assertContains(response, "hangzhou")
        self.assertContains(response, 'data-status-url="/nodes/%d/status.json"' % self.hangzhou.pk)
        self.assertContains(response, "Queued")  # adding a node queued a sync of it
        self.assertContains(response, self.lan.ssh_public_key)
        self.assertContains(response, "/join/%s/" % self.invite.token)
        self.assertContains(response, 'class="qr"')  # an <img>, drawn when the browser asks
        self.assertContains(response, "10.1.0.6")  # bob is online on hongkong
        self.assertContains(response, reverse("nodes:lan_topology_svg", args=[self.lan.slug]))

    def test_it_loads_in_a_fixed_number_of_queries_whatever_the_history_and_the_number_of_players(self):
        # 1 session, 2 user, 3 the LAN, 4 the number of its nodes, 5 one page of them with their online counts and
        # latest run ids (correlated subqueries), 6 those runs, 7 links with both ends' names, 8 the number of
        # players, 9 one page of players, 10 their sessions with nodes, 11 the newest invites, 12 players online on
        # every server, 13 the stored plan's version, 14 the upstream choices of the add-server form; and, on the
        # first load after the plan changed, 15 its blocks and pools (what players are routed, kept per version).
        with self.assertNumQueries(15):
            self.client.get(self.url())
        with self.assertNumQueries(14):
            self.client.get(self.url())
        self.add_node("tokyo", region="asia/jp", public_address="203.0.113.30")
        nodes = list(Node.objects.filter(lan=self.lan))
        start = timezone.now() - dt.timedelta(days=14)
        SyncRun.objects.bulk_create(SyncRun(node=nodes[i % 3], kind="drift", status=SyncStatus.COMPLETED,
                                            created_at=start + dt.timedelta(minutes=5 * i)) for i in range(300))
        invite = player_services.create_invite(lan=self.lan, max_uses=100)
        for i in range(PLAYERS_PER_PAGE + 5):
            player_services.redeem_invite(token=invite.token, nickname=f"friend{i:02}")
        for i in range(INVITES_SHOWN):
            player_services.create_invite(lan=self.lan, note=f"invite {i}")
        with self.assertNumQueries(15):  # the same with another node (a new plan), history, more players and invites
            response = self.client.get(self.url())
        with self.assertNumQueries(14):
            self.client.get(self.url())
        self.assertContains(response, "Players 1–50 of %d" % (PLAYERS_PER_PAGE + 6))
        self.assertContains(response, "Only the %d newest invites are shown." % INVITES_SHOWN)

    def test_the_blank_add_server_form_lists_a_node_added_since_it_was_last_drawn(self):
        self.assertNotContains(self.client.get(self.url()), ">Tokyo</option>")
        self.add_node("tokyo", region="asia/jp", public_address="203.0.113.30", display_name="Tokyo")
        self.assertContains(self.client.get(self.url()), ">Tokyo</option>")
        Node.objects.filter(name="tokyo").update(display_name="Tokyo East")  # a label changes the form too
        self.assertContains(self.client.get(self.url()), ">Tokyo East</option>")

    def test_it_shows_what_players_are_routed_and_not_the_whole_supernet(self):
        response = self.client.get(self.url())
        self.assertEqual(response.context["player_routes"], ["10.0.0.0/12"])
        self.assertContains(response, "Players are routed 10.0.0.0/12 through the tunnel")

    def test_servers_come_a_page_at_a_time_and_every_page_counts_them_all(self):
        for i in range(SERVERS_PER_PAGE):  # with hangzhou and hongkong: two pages
            self.add_node(f"extra{i:02}", region="asia/jp", public_address=f"203.0.113.{100 + i}")
        total = SERVERS_PER_PAGE + 2
        first = self.client.get(self.url())
        self.assertEqual(len(first.context["nodes"]), SERVERS_PER_PAGE)
        self.assertContains(first, f"Servers 1–{SERVERS_PER_PAGE} of {total}")
        self.assertContains(first, f"{total} of ")  # the capacity line counts every server
        self.assertContains(first, "1 online now")  # bob, on hongkong (first page), counted once
        second = self.client.get(self.url() + "?servers=2")
        self.assertEqual([n.name for n in second.context["nodes"]], ["extra22", "extra23"])
        self.assertContains(second, "1 online now")  # still every server's players, not this page's
        self.assertNotContains(second, ">hangzhou</a>")

    def test_a_player_with_two_devices_online_counts_once(self):
        device = player_services.add_device(self.bob, name="laptop")
        VpnSession.objects.create(node=self.hangzhou, instance="server-udp", common_name=device.common_name,
                                  player=self.bob, vpn_address="10.0.1.7")
        self.assertContains(self.client.get(self.url()), "1 online now")

    def test_each_node_card_shows_its_latest_run(self):
        older = SyncRun.objects.create(node=self.hangzhou, status=SyncStatus.FAILED, current_step="connect",
                                       created_at=timezone.now() - dt.timedelta(hours=1))
        newest = SyncRun.objects.create(node=self.hangzhou, status=SyncStatus.RUNNING, current_step="upload-files")
        cards = {node.name: node for node in self.client.get(self.url()).context["nodes"]}
        self.assertEqual(cards["hangzhou"].run.pk, newest.pk)
        self.assertNotEqual(cards["hangzhou"].run.pk, older.pk)
        self.assertEqual(cards["hongkong"].run.node_id, self.hongkong.pk)

    def test_the_second_page_lists_the_remaining_players(self):
        invite = player_services.create_invite(lan=self.lan, max_uses=100)
        for i in range(PLAYERS_PER_PAGE):
            player_services.redeem_invite(token=invite.token, nickname=f"zz{i:02}")
        response = self.client.get(self.url() + "?players=2")
        self.assertContains(response, "zz49")
        self.assertNotContains(response, "zz00<")
        self.assertContains(response, "Players 51–51 of 51")

    def test_invite_qr_codes_are_images_drawn_on_demand_for_the_host_only(self):
        response = self.client.get(self.url())
        qr_url = reverse("players:invite_qr", args=[self.invite.pk])
        self.assertContains(response, f'src="{qr_url}"')
        self.assertNotContains(response, "<svg")
        image = self.client.get(qr_url)
        self.assertEqual(image["Content-Type"], "image/svg+xml")
        self.assertIn(b'<svg xmlns="http://www.w3.org/2000/svg"', image.content)
        self.assertIn("private", image["Cache-Control"])
        self.assertEqual(self.client.post(qr_url).status_code, 405)
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(qr_url).status_code, 404)

    def test_node_cards_count_players_only_and_show_the_openvpn_version_number(self):
        # hongkong's link client is a session on hangzhou's server; it is not a player.
        VpnSession.objects.create(node=self.hangzhou, instance="server-udp", common_name="link-hongkong",
                                  vpn_address="10.0.0.2")
        Node.objects.filter(lan=self.lan).update(openvpn_version="2.6.14")
        response = self.client.get(self.url())
        cards = {node.name: node for node in response.context["nodes"]}
        self.assertEqual((cards["hangzhou"].online, cards["hongkong"].online), (0, 1))
        self.assertContains(response, "OpenVPN 2.6.14 · 0 players online")
        self.assertContains(response, "OpenVPN 2.6.14 · 1 player online")
        page = self.client.get(reverse("nodes:node_detail", args=[self.hangzhou.pk]))
        self.assertEqual(page.context["players_online"], 0)

    def test_it_shows_the_last_error_of_a_node(self):
        Node.objects.filter(pk=self.hangzhou.pk).update(last_error="SSH: host key changed")
        self.assertContains(self.client.get(self.url()), "SSH: host key changed")

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(self.url()).status_code, 405)

    def test_another_hosts_lan_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(self.url()).status_code, 404)


class NodeAddTests(HostTestCase):
    def url(self, lan=None):
        return reverse("nodes:node_add", args=[(lan or self.lan).slug])

    def data(self, **overrides):
        data = {"display_name": "Hong Kong", "name": "", "region": "asia/hk", "priority": 0,
                "public_address": "203.0.113.20",
                "udp_port": 1194, "tcp_port": 443, "ssh_host": "", "ssh_port": 22, "ssh_user": "root",
                "country": "hk", "latitude": "", "longitude": "", "udp_pool": "", "tcp_pool": "",
                "pinned_upstream": ""}
        data.update(overrides)
        return data

    def test_it_adds_a_node_queues_its_sync_and_opens_its_page(self):
        response = self.client.post(self.url(), self.data())
        node = Node.objects.get(lan=self.lan, name="hong-kong")  # the slug, derived from the name typed
        self.assertEqual(node.display_name, "Hong Kong")
        self.assertRedirects(response, reverse("nodes:node_detail", args=[node.pk]))
        self.assertEqual(node.ssh_host, "203.0.113.20")  # defaults to the public address
        self.assertEqual(node.country, "HK")
        self.assertTrue(node.udp_pool)  # planned
        self.assertEqual(node.sync_runs.get().status, SyncStatus.QUEUED)

    def test_a_node_may_have_an_ipv6_address_besides_its_public_address(self):
        self.client.post(self.url(), self.data(public_ipv6="2001:db8::20"))
        node = Node.objects.get(lan=self.lan, display_name="Hong Kong")
        self.assertEqual(node.public_ipv6, "2001:db8::20")
        for bad in ("203.0.113.20", "::ffff:203.0.113.20", "2001:db8::zz", "hk.example.net"):
            with self.subTest(value=bad):
                response = self.client.post(self.url(), self.data(display_name="Other", public_ipv6=bad))
                self.assertEqual(response.status_code, 200)
                self.assertFalse(Node.objects.filter(lan=self.lan, display_name="Other").exists())

    def test_a_full_lan_is_a_clear_form_error_and_the_dashboard_shows_the_capacity(self):
        small = services.create_lan(owner=self.alice, name="Small", slug="small", supernet="10.0.0.0/14")
        self.add_node("hangzhou", lan=small)  # a /14 less its reserved top /20 holds one /16 + /16 node
        dashboard = self.client.get(reverse("nodes:lan_detail", args=[small.slug]))
        self.assertContains(dashboard, "1 of 1 server this LAN holds")
        response = self.client.post(self.url(small), self.data())
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "this LAN is full: supernet 10.0.0.0/14 holds 1 nodes with /16 pools")
        self.assertFalse(Node.objects.filter(lan=small, display_name="Hong Kong").exists())

    def test_it_shows_field_errors_and_adds_nothing(self):
        response = self.client.post(self.url(), self.data(name="Hong Kong!", udp_port=70000))
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "Use 1–32 lowercase letters")
        self.assertContains(response, "less than or equal to 65535")
        self.assertFalse(Node.objects.filter(lan=self.lan).exists())

    def test_it_shows_a_duplicate_name_as_a_form_error(self):
        self.add_node("hong-kong", display_name="Hong Kong")
        response = self.client.post(self.url(), self.data(display_name="hong kong"))
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "This LAN already has a server named “hong kong”.")
        self.assertEqual(Node.objects.filter(lan=self.lan).count(), 1)

    def test_a_short_name_typed_twice_is_a_form_error(self):
        self.add_node("hongkong")
        response = self.client.post(self.url(), self.data(name="hongkong"))
        self.assertContains(response, "Another server of this LAN already has the short name “hongkong”")
        self.assertEqual(Node.objects.filter(lan=self.lan).count(), 1)

    def test_a_derived_short_name_that_is_taken_gets_a_suffix(self):
        self.add_node("hong-kong", display_name="HK")
        self.client.post(self.url(), self.data())
        self.assertEqual(Node.objects.get(lan=self.lan, display_name="Hong Kong").name, "hong-kong-2")

    def test_a_name_in_chinese_gets_a_transliterated_short_name(self):
        self.client.post(self.url(), self.data(display_name="杭州", region="asia/cn/east"))
        self.assertEqual(Node.objects.get(lan=self.lan, display_name="杭州").name, "hangzhou")
        self.assertContains(self.client.get(reverse("nodes:lan_detail", args=[self.lan.slug])), "杭州")

    def test_it_refuses_an_upstream_from_another_lan(self):
        office = self.add_node("office", lan=self.charlies_lan)
        response = self.client.post(self.url(), self.data(pinned_upstream=office.pk))
        self.assertContains(response, "Select a valid choice")
        self.assertFalse(Node.objects.filter(lan=self.lan).exists())

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)

    def test_another_hosts_lan_is_not_found(self):
        response = self.client.post(self.url(self.charlies_lan), self.data())
        self.assertEqual(response.status_code, 404)
        self.assertFalse(Node.objects.filter(name="hongkong").exists())


class NodePageTests(HostTestCase):
    def setUp(self):
        super().setUp()
        self.node = self.add_node("hangzhou")

    def test_it_shows_details_progress_and_the_last_runs(self):
        SyncRun.objects.create(node=self.node, status=SyncStatus.FAILED, log="step ensure_openvpn: apt failed",
                               error="apt-get install openvpn failed")
        response = self.client.get(reverse("nodes:node_detail", args=[self.node.pk]))
        self.assertContains(response, "hangzhou")
        self.assertContains(response, "apt-get install openvpn failed")
        self.assertContains(response, "step ensure_openvpn: apt failed")
        self.assertContains(response, 'class="lh-sync"')

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(reverse("nodes:node_detail", args=[self.node.pk])).status_code, 405)

    def test_another_hosts_node_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(reverse("nodes:node_detail", args=[self.node.pk])).status_code, 404)


class NodeSyncTests(HostTestCase):
    def setUp(self):
        super().setUp()
        self.node = self.add_node("hangzhou")

    def test_it_queues_a_sync_and_returns_to_the_node(self):
        self.node.sync_runs.update(status="completed")  # the run adding the node queued has happened
        before = self.node.sync_runs.count()
        response = self.client.post(reverse("nodes:node_sync", args=[self.node.pk]))
        self.assertRedirects(response, reverse("nodes:node_detail", args=[self.node.pk]))
        self.assertEqual(self.node.sync_runs.count(), before + 1)
        self.assertEqual(self.node.sync_runs.first().reason, "sync requested by the host")

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(reverse("nodes:node_sync", args=[self.node.pk])).status_code, 405)

    def test_another_hosts_node_is_not_found_and_not_synced(self):
        before = self.node.sync_runs.count()
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.post(reverse("nodes:node_sync", args=[self.node.pk])).status_code, 404)
        self.assertEqual(self.node.sync_runs.count(), before)


class NodeStatusTests(HostTestCase):
    def setUp(self):
        super().setUp()
        self.node = self.add_node("hangzhou")
        SyncRun.objects.filter(node=self.node).update(status=SyncStatus.RUNNING, current_step="upload files",
                                                      progress=40)
        Node.objects.filter(pk=self.node.pk).update(last_error="", openvpn_version="2.6.14")

    def url(self):
        return reverse("nodes:node_status", args=[self.node.pk])

    def test_it_reports_state_step_progress_and_runs(self):
        data = self.client.get(self.url()).json()
        self.assertEqual(data["state"], "new")
        self.assertEqual(data["sync_state"], "idle")
        self.assertEqual(data["status"], "running")
        self.assertEqual(data["current_step"], "upload files")
        self.assertEqual(data["progress"], 40)
        self.assertTrue(data["active"])
        self.assertEqual(data["openvpn_version"], "2.6.14")
        self.assertEqual(data["last_error"], "")
        self.assertEqual(len(data["runs"]), 1)

    def test_the_status_url_is_the_one_the_admin_polls(self):
        self.assertEqual(self.url(), "/nodes/%d/status.json" % self.node.pk)

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(self.url()).status_code, 405)

    def test_another_hosts_node_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(self.url()).status_code, 404)

    def test_an_operator_who_may_view_nodes_in_the_admin_can_read_it(self):
        admin = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
        self.client.force_login(admin)
        self.assertEqual(self.client.get(self.url()).json()["node"], "hangzhou")

    def test_a_visitor_gets_401_json(self):
        self.client.logout()
        self.assertEqual(self.client.get(self.url()).status_code, 401)


class TopologySvgTests(HostTestCase):
    def setUp(self):
        super().setUp()
        self.hangzhou = self.add_node("hangzhou", priority=10)
        self.hongkong = self.add_node("hongkong", region="asia/hk", public_address="203.0.113.20")
        Link.objects.filter(lan=self.lan).update(state=LinkState.UP, rtt_ms=31.6)

    def url(self):
        return reverse("nodes:lan_topology_svg", args=[self.lan.slug])

    def test_it_draws_nodes_by_region_and_links_with_rtt(self):
        response = self.client.get(self.url())
        self.assertEqual(response["Content-Type"], "image/svg+xml; charset=utf-8")
        body = response.content.decode()
        self.assertIn(">asia/cn/east<", body)
        self.assertIn(">asia/hk<", body)
        self.assertIn(">hangzhou<", body)
        self.assertIn(">32 ms<", body)
        self.assertNotIn("<style", body)  # served under style-src 'self'

    def test_it_draws_in_a_fixed_number_of_queries(self):
        # 1 session, 2 user, 3 the LAN, 4 its nodes, 5 its links with both ends.
        with self.assertNumQueries(5):
            self.client.get(self.url())

    def test_it_rejects_a_post(self):
        self.assertEqual(self.client.post(self.url()).status_code, 405)

    def test_another_hosts_lan_is_not_found(self):
        self.client.force_login(self.charlie)
        self.assertEqual(self.client.get(self.url()).status_code, 404)


class SvgRenderingTests(SimpleTestCase):
    """nodes/svg.py is pure: plain objects in, SVG text out."""

    def node(self, pk, name, region, **kw):
        fields = {"pk": pk, "name": name, "region": region, "priority": 0, "created_at": pk, "state": "ready",
                  "healthy": True, "public_address": "203.0.113.%d" % pk}
        fields.update(kw)
        return SimpleNamespace(**fields)

    def test_regions_become_columns_and_the_leader_comes_first(self):
        a = self.node(1, "a", "eu")
        b = self.node(2, "b", "asia", priority=1)
        c = self.node(3, "c", "asia", priority=5)
        pos = svg.layout([a, b, c])
        self.assertEqual(pos[c.pk][0], pos[b.pk][0])  # same column
        self.assertLess(pos[c.pk][1], pos[b.pk][1])  # higher priority on top
        self.assertLess(pos[b.pk][0], pos[a.pk][0])  # "asia" left of "eu"

    def test_names_are_escaped(self):
        evil = self.node(1, "<script>", "x&y")
        body = svg.render_topology([evil], [])
        self.assertNotIn("<script>", body)
        self.assertIn("&lt;script&gt;", body)
        self.assertIn("x&amp;y", body)

    def test_a_down_link_is_dashed_red_and_labelled_with_its_rtt(self):
        a, b = self.node(1, "a", "r1"), self.node(2, "b", "r2")
        link = SimpleNamespace(upstream_id=1, downstream_id=2, upstream=a, downstream=b, state="down", rtt_ms=None)
        body = svg.render_topology([a, b], [link])
        self.assertIn('stroke="#c62828" stroke-width="2.5" stroke-dasharray="6 4"', body)
        self.assertIn(">down<", body)

    def test_an_empty_lan_says_what_to_do(self):
        self.assertIn("No servers yet", svg.render_topology([], []))


class GameListTests(HostTestCase):
    def url(self, lan=None):
        return reverse("nodes:lan_games", args=[(lan or self.lan).slug])

    def test_the_dashboard_shows_the_presets_with_the_default_ticked(self):
        response = self.client.get(reverse("nodes:lan_detail", args=[self.lan.slug]))
        self.assertContains(response, 'id="games"')
        self.assertContains(response, "Minecraft Java Edition (224.0.2.60:4445)")
        self.assertContains(response, 'value="minecraft-java" id="id_discovery_games_2" checked')
        self.assertContains(response, 'value="directplay" id="id_discovery_games_1">')

    def test_saving_the_list_stores_it_and_syncs_the_nodes_whose_relay_changes(self):
        self.add_node("hangzhou")
        mark_synced(self.lan)
        before = SyncRun.objects.count()
        response = self.client.post(self.url(), {"discovery_games": ["directplay", "factorio"],
                                                 "discovery_ports": "7777-7780, 27016"})
        self.assertRedirects(response, reverse("nodes:lan_detail", args=[self.lan.slug]) + "#games",
                             fetch_redirect_response=False)
        self.lan.refresh_from_db()
        self.assertEqual((self.lan.discovery_games, self.lan.discovery_ports),
                         (["directplay", "factorio"], "7777-7780, 27016"))
        self.assertEqual(self.lan.discovery.ports, ((2300, 2400), (7777, 7780), (27016, 27016), (34197, 34197),
                                                    (47624, 47624)))
        self.assertEqual(SyncRun.objects.count(), before + 1)
        self.assertEqual(SyncRun.objects.latest("created_at").reason, "game list changed")

    def test_saving_the_same_list_again_syncs_nothing(self):
        self.add_node("hangzhou")
        mark_synced(self.lan)
        before = SyncRun.objects.count()
        self.client.post(self.url(), {"discovery_games": list(games.DEFAULT_GAMES), "discovery_ports": ""})
        self.assertEqual(SyncRun.objects.count(), before)

    def test_bad_ports_are_a_form_error_and_nothing_changes(self):
        for ports, message in (("70000", "between 1 and 65535"), ("7777-7700", "between 1 and 65535"),
                               ("abc", "is not a port"), ("1-60000", "Too many ports")):
            with self.subTest(ports=ports):
                response = self.client.post(self.url(), {"discovery_games": ["factorio"], "discovery_ports": ports})
                self.assertContains(response, message, status_code=400)
        self.lan.refresh_from_db()
        self.assertEqual(self.lan.discovery_games, list(games.DEFAULT_GAMES))

    def test_an_unknown_game_is_refused(self):
        response = self.client.post(self.url(), {"discovery_games": ["quake"]})
        self.assertContains(response, "quake", status_code=400)

    def test_it_rejects_a_get(self):
        self.assertEqual(self.client.get(self.url()).status_code, 405)


class AnotherHostsObjectsTests(HostTestCase):
    """Charlie, a host too, walks every host URL with alice's objects: each one is a 404, and nothing changes."""

    def test_every_host_url_is_not_found_for_another_host(self):
        node = self.add_node("hangzhou")
        lan, invite, player = self.lan, self.invite, self.bob
        urls = [
            ("get", reverse("nodes:lan_detail", args=[lan.slug])),
            ("get", reverse("nodes:lan_topology_svg", args=[lan.slug])),
            ("post", reverse("nodes:node_add", args=[lan.slug])),
            ("post", reverse("nodes:lan_games", args=[lan.slug])),
            ("get", reverse("nodes:node_detail", args=[node.pk])),
            ("post", reverse("nodes:node_sync", args=[node.pk])),
            ("get", reverse("nodes:node_status", args=[node.pk])),
            ("post", reverse("players:invite_create", args=[lan.slug])),
            ("post", reverse("players:invite_revoke", args=[invite.pk])),
            ("get", reverse("players:invite_qr", args=[invite.pk])),
            ("post", reverse("players:player_revoke", args=[player.pk])),
            ("post", reverse("players:player_reissue", args=[player.pk])),
            ("get", reverse("players:host_lobby", args=[lan.slug])),
            ("get", reverse("players:host_lobby_fragment", args=[lan.slug])),
        ]
        runs, serial = SyncRun.objects.count(), player.serial
        self.client.force_login(self.charlie)
        for method, url in urls:
            with self.subTest(url=url):
                self.assertEqual(getattr(self.client, method)(url, {"hours": 1, "max_uses": 1}).status_code, 404)
        invite.refresh_from_db()
        player.refresh_from_db()
        self.assertIsNone(invite.revoked_at)
        self.assertEqual((player.revoked_at, player.serial), (None, serial))
        self.assertEqual(SyncRun.objects.count(), runs)
        self.assertEqual(lan.invites.count(), 1)
