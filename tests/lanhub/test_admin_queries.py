"""Every admin changelist runs a fixed number of queries, whatever the number of rows on the page.

Each test fills the list with a few rows, counts the queries of one page, adds many more rows (still one page of
the admin's 100) and counts again: the count must not move. The comment on each count names the queries.
"""

from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from nodes.models import Lan, Link, Node, NodeState, RevokedCertificate, SyncRun, VpnSession
from players import services as player_services
from players.models import Invite, Player
from tests.base import BaseTestCase

# Every changelist of a superuser opens with: 1 the session, 2 the user.
SESSION_AND_USER = 2


class AdminChangelistQueryTests(BaseTestCase):
    def setUp(self):
        self.root = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
        self.client.force_login(self.root)
        self.nodes = [self.node(i) for i in range(3)]

    def node(self, i: int) -> Node:
        # Rows straight into the table: these tests count the admin's reads, so no plan or sync is needed.
        return Node.objects.create(lan=self.lan, name=f"node{i}", public_address=f"203.0.113.{i + 1}",
                                   ssh_host=f"203.0.113.{i + 1}", state=NodeState.READY)

    def changelist(self, model) -> str:
        meta = model._meta
        return reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")

    def assert_constant(self, model, expected: int, add_rows) -> None:
        """One page with the rows set up so far, then with `add_rows()` more: `expected` queries both times."""
        url = self.changelist(model)
        with self.assertNumQueries(expected):
            self.assertEqual(self.client.get(url).status_code, 200)
        before = model.objects.count()
        add_rows()
        self.assertGreater(model.objects.count(), before + 10)  # the second page really is larger
        with self.assertNumQueries(expected):
            response = self.client.get(url)
        self.assertEqual(response.status_code, 200)

    def test_the_sync_run_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            SyncRun.objects.bulk_create(SyncRun(node=self.nodes[i % 3], reason=f"run {i}") for i in range(60))
        SyncRun.objects.create(node=self.nodes[0], reason="first")
        # 3 count of the rows (no second count of all rows: show_full_result_count is off), 4 the page of runs
        # with their nodes and LANs. The kind filter lists known kinds, without a SELECT DISTINCT over the runs.
        self.assert_constant(SyncRun, SESSION_AND_USER + 2, add_rows)

    def test_the_vpn_session_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            VpnSession.objects.bulk_create(
                VpnSession(node=self.nodes[i % 3], instance="server-udp", common_name=f"player-p{i}")
                for i in range(60))
        # 3 count of the rows (show_full_result_count is off), 4 the page of sessions with their nodes and LANs.
        self.assert_constant(VpnSession, SESSION_AND_USER + 2, add_rows)

    def test_the_link_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            more = [self.node(i) for i in range(3, 15)]
            Link.objects.bulk_create(Link(lan=self.lan, upstream=self.nodes[0], downstream=n,
                                          address=f"10.0.0.{n.pk % 250 + 2}") for n in more)
            Link.objects.bulk_create(Link(lan=self.lan, upstream=self.nodes[1], downstream=n,
                                          address=f"10.0.1.{n.pk % 250 + 2}") for n in more)
        Link.objects.create(lan=self.lan, upstream=self.nodes[0], downstream=self.nodes[1], address="10.0.0.2")
        # 3 count of the filtered rows, 4 count of all rows, 5 the LANs for the LAN filter, 6 the page of links
        # with both ends and their LANs.
        self.assert_constant(Link, SESSION_AND_USER + 4, add_rows)

    def test_the_node_list_reads_a_page_in_a_fixed_number_of_queries(self):
        # 3 count of the filtered rows, 4 count of all rows, 5 the LANs for the LAN filter, 6 the page of nodes
        # with their LANs.
        self.assert_constant(Node, SESSION_AND_USER + 4, lambda: [self.node(i) for i in range(3, 20)])

    def test_the_lan_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            for i in range(12):
                lan = Lan.objects.create(owner=self.charlie, name=f"LAN {i}", slug=f"lan{i}")
                Node.objects.create(lan=lan, name="one", public_address="203.0.113.9", ssh_host="203.0.113.9")
        # 3 count of the filtered rows, 4 count of all rows, 5 the page of LANs with owners and node counts.
        self.assert_constant(Lan, SESSION_AND_USER + 3, add_rows)

    def test_the_player_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            invite = player_services.create_invite(lan=self.lan, max_uses=100)
            for i in range(12):
                player = player_services.redeem_invite(token=invite.token, nickname=f"friend{i}")
                player_services.choose_node(player, self.nodes[i % 3])
        # 3 count of the filtered rows, 4 count of all rows, 5 the LANs for the LAN filter, 6 the page of players
        # with their LANs and preferred nodes (and those nodes' LANs).
        self.assert_constant(Player, SESSION_AND_USER + 4, add_rows)

    def test_the_invite_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            for i in range(12):
                player_services.create_invite(lan=self.lan, note=f"invite {i}")
        # 3 count of the filtered rows, 4 count of all rows, 5 the LANs for the LAN filter, 6 the page of invites
        # with their LANs.
        self.assert_constant(Invite, SESSION_AND_USER + 4, add_rows)

    def test_the_revoked_certificate_list_reads_a_page_in_a_fixed_number_of_queries(self):
        def add_rows():
            RevokedCertificate.objects.bulk_create(
                RevokedCertificate(lan=self.lan, serial=format(1000 + i, "x"), common_name=f"player-x{i}",
                                   revoked_at=timezone.now()) for i in range(30))
        # 3 count of the filtered rows, 4 count of all rows, 5 the page of certificates with their LANs.
        self.assert_constant(RevokedCertificate, SESSION_AND_USER + 3, add_rows)
