"""The node services: planning stored in rows, syncs requested for exactly the nodes that change, revocation,
the one-sync-per-node claim, and health failover. SSH goes to a closed loopback port where a failure is wanted."""

import socket

from cryptography import x509
from django.core.exceptions import ValidationError
from django.test import override_settings

from nodes import layout, render, services, syncing
from nodes.files import desired_files
from nodes.models import Link, Node, RevokedCertificate, SyncRun, SyncState, SyncStatus
from players import services as player_services
from tests.base import BaseTestCase


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mark_synced(lan):
    """Pretend every node applied its current files, as a completed sync records."""
    lan_plan = services.plan_lan(lan)
    for node in lan_plan.nodes.values():
        files = desired_files(lan, node, lan_plan)
        Node.objects.filter(pk=node.pk).update(applied_files={p: f.sha256 for p, f in files.items()}, state="ready")
    SyncRun.objects.filter(node__lan=lan, status=SyncStatus.QUEUED).update(status=SyncStatus.COMPLETED)


class PlanningTests(BaseTestCase):
    def test_adding_two_nodes_gives_the_reference_pools_and_link(self):
        self.add_node("hangzhou", region="asia/cn/east")
        self.add_node("hongkong", region="asia/hk", public_address="203.0.113.11", ssh_host="203.0.113.11")
        pools = dict(Node.objects.filter(lan=self.lan).values_list("name", "udp_pool"))
        self.assertEqual(pools, {"hangzhou": "10.0.0.0/16", "hongkong": "10.2.0.0/16"})
        link = Link.objects.get(lan=self.lan)
        self.assertEqual((link.upstream.name, link.downstream.name, link.address),
                         ("hangzhou", "hongkong", "10.0.0.2"))

    def test_a_node_keeps_its_pools_when_an_older_one_is_removed(self):
        hz = self.add_node("hangzhou")
        self.add_node("hongkong", region="asia/hk")
        services.delete_node(hz)
        self.assertEqual(Node.objects.get(lan=self.lan, name="hongkong").udp_pool, "10.2.0.0/16")
        self.assertFalse(Link.objects.filter(lan=self.lan).exists())

    def test_only_the_nodes_whose_files_change_are_synced(self):
        self.lan.topology_mode = "hub"
        self.lan.save()
        self.add_node("hangzhou")
        self.add_node("hongkong", region="asia/hk")
        mark_synced(self.lan)
        before = set(SyncRun.objects.values_list("pk", flat=True))
        self.add_node("singapore", region="asia/sg")
        queued = set(SyncRun.objects.exclude(pk__in=before).values_list("node__name", flat=True))
        # Hong Kong already routes everything via Hangzhou, and its discovery relay's only tree neighbour is still
        # Hangzhou: nothing of its changes, so it is not synced.
        self.assertEqual(queued, {"hangzhou", "singapore"})
        hk = Node.objects.get(lan=self.lan, name="hongkong")
        files = desired_files(self.lan, hk, services.plan_lan(self.lan))
        self.assertEqual({p for p, f in files.items() if hk.applied_files.get(p) != f.sha256}, set())
        hz = Node.objects.get(lan=self.lan, name="hangzhou")
        files = desired_files(self.lan, hz, services.plan_lan(self.lan))
        self.assertIn(render.RELAY_CONFIG, {p for p, f in files.items() if hz.applied_files.get(p) != f.sha256})

    def test_an_impossible_node_is_refused_before_anything_is_saved(self):
        self.add_node("hangzhou", udp_pool="10.0.0.0/16", tcp_pool="10.1.0.0/16")
        candidate = Node(lan=self.lan, name="hongkong", public_address="203.0.113.11", ssh_host="203.0.113.11",
                         udp_pool="10.0.0.0/17", tcp_pool="10.3.0.0/16")
        with self.assertRaises(ValidationError) as ctx:
            services.check_node(candidate)
        self.assertIn("hangzhou", str(ctx.exception))
        self.assertEqual(Node.objects.filter(lan=self.lan).count(), 1)


class RevocationTests(BaseTestCase):
    def test_revoking_a_player_puts_the_serial_in_the_crl_and_syncs_every_node(self):
        self.add_node("hangzhou")
        self.add_node("hongkong", region="asia/hk")
        mark_synced(self.lan)
        before = set(SyncRun.objects.values_list("pk", flat=True))
        player_services.revoke_player(self.bob)
        self.lan.refresh_from_db()
        crl = x509.load_pem_x509_crl(self.lan.crl_pem.encode())
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(int(self.bob.serial, 16)))
        queued = set(SyncRun.objects.exclude(pk__in=before).values_list("node__name", flat=True))
        self.assertEqual(queued, {"hangzhou", "hongkong"})

    def test_a_lost_device_revokes_the_old_certificate_and_keeps_the_player(self):
        old_serial = self.bob.serial
        player = player_services.reissue_player(self.bob)
        self.assertNotEqual(player.serial, old_serial)
        self.lan.refresh_from_db()
        crl = x509.load_pem_x509_crl(self.lan.crl_pem.encode())
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(int(old_serial, 16)))
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(int(player.serial, 16)))
        self.assertIsNone(player.revoked_at)


class SyncRunTests(BaseTestCase):
    def test_requests_join_the_run_already_waiting(self):
        node = self.add_node("hangzhou")
        first = services.request_sync(node, reason="one")
        second = services.request_sync(node, reason="two")
        self.assertEqual(first.pk, second.pk)
        self.assertEqual(SyncRun.objects.filter(node=node, status=SyncStatus.QUEUED).count(), 1)
        self.assertTrue(second.reason.endswith("one; two"))


    def test_a_second_sync_finds_the_node_claimed_and_leaves_its_run_queued(self):
        node = self.add_node("hangzhou")
        run = SyncRun.objects.filter(node=node).latest("created_at")
        Node.objects.filter(pk=node.pk).update(sync_state=SyncState.RUNNING)
        result = syncing.run_sync(node, run_id=run.pk)
        self.assertEqual(result.status, SyncStatus.QUEUED)
        self.assertEqual(result.steps, [])

    def test_a_duplicate_delivery_of_a_finished_run_does_nothing(self):
        node = self.add_node("hangzhou")
        run = SyncRun.objects.filter(node=node).latest("created_at")
        SyncRun.objects.filter(pk=run.pk).update(status=SyncStatus.COMPLETED)
        result = syncing.run_sync(node, run_id=run.pk)
        self.assertEqual(result.status, SyncStatus.COMPLETED)
        self.assertEqual(Node.objects.get(pk=node.pk).sync_state, SyncState.IDLE)

    def test_an_unreachable_node_fails_retryably_and_keeps_its_state(self):
        node = self.add_node("hangzhou", ssh_host="127.0.0.1", ssh_port=closed_port())
        run = SyncRun.objects.filter(node=node).latest("created_at")
        result = syncing.run_sync(node, run_id=run.pk)
        self.assertEqual(result.status, SyncStatus.FAILED)
        self.assertTrue(result.retryable)
        self.assertTrue(result.error.startswith("connect:"), result.error)
        node.refresh_from_db()
        self.assertEqual((node.state, node.sync_state), ("failed", SyncState.IDLE))
        self.assertIn("127.0.0.1", node.last_error)

    def test_a_ready_node_that_fails_a_sync_stays_ready_on_its_old_files(self):
        node = self.add_node("hangzhou", ssh_host="127.0.0.1", ssh_port=closed_port())
        Node.objects.filter(pk=node.pk).update(state="ready", applied_files={"/etc/x": "abc"})
        run = services.request_sync(node, reason="test")
        syncing.run_sync(node, run_id=run.pk)
        node.refresh_from_db()
        self.assertEqual(node.state, "ready")
        self.assertEqual(node.applied_files, {"/etc/x": "abc"})

    def test_stale_queued_runs_are_sent_again_once_per_node(self):
        node = self.add_node("hangzhou")
        SyncRun.objects.filter(node=node).update(created_at=node.created_at.replace(year=2000))
        with self.captureOnCommitCallbacks(execute=False):
            sent = services.requeue_stale_runs()
        self.assertEqual(sent, 1)


@override_settings(LANHUB_DOWN_AFTER_POLLS=3)
class HealthTests(BaseTestCase):
    def test_a_primary_that_misses_polls_is_marked_down_and_its_region_fails_over(self):
        self.lan.topology_mode = "hub"
        self.lan.save()
        hz = self.add_node("hangzhou", ssh_host="127.0.0.1", ssh_port=closed_port())
        self.add_node("hongkong", region="asia/hk")
        self.add_node("singapore", region="asia/sg")
        Node.objects.filter(lan=self.lan).update(state="ready")
        self.assertEqual(set(Link.objects.values_list("upstream__name", flat=True)), {"hangzhou"})
        outcomes = [syncing.poll_status(hz) for _ in range(3)]
        self.assertEqual(outcomes, ["missed", "missed", "down"])
        self.assertFalse(Node.objects.get(pk=hz.pk).healthy)
        # Hong Kong, next by age, is the new hub; Hangzhou keeps its pools for when it returns.
        self.assertEqual(list(Link.objects.values_list("upstream__name", "downstream__name")),
                         [("hongkong", "singapore")])
        self.assertEqual(Node.objects.get(pk=hz.pk).udp_pool, "10.0.0.0/16")


class EstimatedRttTests(BaseTestCase):
    def test_located_nodes_get_rtts_from_distance_and_measured_links_win(self):
        self.add_node("hangzhou", latitude=30.27, longitude=120.15)
        self.add_node("hongkong", region="asia/hk", latitude=22.32, longitude=114.17)
        self.add_node("nowhere", region="asia/x")
        nodes = list(Node.objects.filter(lan=self.lan))
        rtts = services.estimated_rtts(nodes)
        self.assertEqual(list(rtts), [frozenset({"hangzhou", "hongkong"})])
        self.assertAlmostEqual(rtts[frozenset({"hangzhou", "hongkong"})], 1 + 1058 / 100, delta=0.5)


class CertificateRenewalTests(BaseTestCase):
    def test_the_signed_crl_is_renewed_but_no_node_needs_it(self):
        # Nodes revoke through crl-verify DIR dir (one file per serial), which never lapses: re-signing the CRL
        # record changes no node's files, so nothing syncs.
        import datetime

        from django.utils import timezone

        self.add_node("hangzhou")
        mark_synced(self.lan)
        Lan = type(self.lan)
        Lan.objects.filter(pk=self.lan.pk).update(crl_next_update=timezone.now() + datetime.timedelta(days=2))
        self.assertTrue(services.renew_crl(self.lan))
        self.assertFalse(SyncRun.objects.filter(node__name="hangzhou", reason="CRL renewed").exists())

    def test_new_node_certificates_have_no_expiry_date(self):
        import datetime

        from django.utils import timezone

        from lanhub import pki

        node = self.add_node("hangzhou")
        for pem in (node.server_cert, node.link_cert):
            self.assertEqual(x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc, pki.NO_EXPIRY)
        self.assertIsNone(services.node_certificate_expiry(node))
        # However late the renewal task runs, a certificate without a date is never re-issued.
        mark_synced(self.lan)
        later = timezone.now() + datetime.timedelta(days=100 * 365)
        self.assertEqual(services.renew_node_certificates(self.lan, now=later), [])
        old = (node.server_cert, node.link_cert)
        node.refresh_from_db()
        self.assertEqual((node.server_cert, node.link_cert), old)
        self.assertFalse(SyncRun.objects.filter(node=node, reason__contains="certificates renewed").exists())

    def test_dated_node_certificates_of_an_older_lan_are_reissued_without_a_date_and_synced(self):
        import datetime

        from django.utils import timezone

        from lanhub import pki
        from lanhub.secrets import seal

        # A node whose certificates were issued before node certificates stopped expiring: 730 days.
        node = self.add_node("hangzhou")
        mark_synced(self.lan)
        issued = timezone.now()
        ca = services.lan_ca(self.lan)
        server = pki.issue_server(ca=ca, common_name=layout.node_cn("hangzhou"), now=issued, days=730)
        link = pki.issue_client(ca=ca, common_name=layout.link_cn("hangzhou"), now=issued, days=730)
        node.server_cert, node.server_key_sealed = server.cert_pem, seal(server.key_pem)
        node.link_cert, node.link_key_sealed = link.cert_pem, seal(link.key_pem)
        node.save()
        self.assertEqual((services.node_certificate_expiry(node) - issued).days, 729)
        # More than NODE_CERT_RENEW_DAYS left: left alone.
        self.assertEqual(services.renew_node_certificates(self.lan, now=issued), [])
        node.refresh_from_db()
        self.assertEqual(node.server_cert, server.cert_pem)
        # Less than NODE_CERT_RENEW_DAYS left (a year before they expire): re-issued, with no date, and synced.
        later = issued + datetime.timedelta(days=730 - services.NODE_CERT_RENEW_DAYS + 1)
        renewed = services.renew_node_certificates(self.lan, now=later)
        self.assertEqual([n.name for n in renewed], ["hangzhou"])
        node.refresh_from_db()
        self.assertNotEqual(node.server_cert, server.cert_pem)
        self.assertNotEqual(node.link_cert, link.cert_pem)
        self.assertIsNone(services.node_certificate_expiry(node))
        self.assertTrue(SyncRun.objects.filter(node=node, reason__contains="certificates renewed").exists())
        # And never again.
        self.assertEqual(services.renew_node_certificates(self.lan, now=later + datetime.timedelta(days=3650)), [])


class StaleClaimTests(BaseTestCase):
    def test_a_claim_left_by_a_lost_worker_is_taken_over_after_the_time_limit(self):
        import datetime

        from django.utils import timezone

        node = self.add_node("hangzhou")
        lost = SyncRun.objects.create(node=node, status=SyncStatus.RUNNING)
        recent = timezone.now() - datetime.timedelta(seconds=30)
        Node.objects.filter(pk=node.pk).update(sync_state=SyncState.RUNNING, sync_claimed_at=recent)
        self.assertIsNone(syncing.claim(node))  # a live sync: hands off
        old = timezone.now() - datetime.timedelta(hours=2)
        Node.objects.filter(pk=node.pk).update(sync_claimed_at=old)
        self.assertIsNotNone(syncing.claim(node))
        lost.refresh_from_db()
        self.assertEqual(lost.status, SyncStatus.ERRORED)
        self.assertIn("lost", lost.error)


class NodeCertificateRevocationTests(BaseTestCase):
    def test_a_removed_node_cannot_come_back_with_its_old_certificates(self):
        node = self.add_node("hangzhou")
        serials = {int(s, 16) for s, _ in services.node_certificates(node)}
        services.delete_node(node)
        self.lan.refresh_from_db()
        crl = x509.load_pem_x509_crl(self.lan.crl_pem.encode())
        self.assertEqual({s for s in serials if crl.get_revoked_certificate_by_serial_number(s)}, serials)

    def test_a_node_added_again_under_an_old_name_keeps_its_sessions(self):
        services.delete_node(self.add_node("hangzhou"))
        self.assertEqual(services.revoked_names(self.lan) & {"node-hangzhou", "link-hangzhou"},
                         {"node-hangzhou", "link-hangzhou"})
        self.add_node("hangzhou")
        self.assertFalse(services.revoked_names(self.lan) & {"node-hangzhou", "link-hangzhou"})

    def test_a_new_display_name_keeps_the_slug_and_the_certificates(self):
        node = self.add_node("hangzhou", display_name="Hangzhou")
        certificates = services.node_certificates(node)
        services.update_node(node, display_name="杭州")
        node.refresh_from_db()
        self.assertEqual((node.name, node.display_name), ("hangzhou", "杭州"))
        self.assertEqual(services.node_certificates(node), certificates)
        self.assertFalse(RevokedCertificate.objects.filter(lan=self.lan).exists())

    def test_the_slug_never_changes(self):
        node = self.add_node("hangzhou")
        with self.assertRaises(ValidationError) as ctx:
            services.update_node(node, name="shanghai")
        self.assertIn("never changes", str(ctx.exception))
        node.refresh_from_db()
        self.assertEqual(node.name, "hangzhou")


class RetryChainTests(BaseTestCase):
    def test_no_second_retry_chain_starts_while_a_run_is_queued(self):
        node = self.add_node("hangzhou")
        failed = SyncRun.objects.create(node=node, status=SyncStatus.FAILED, retryable=True)
        self.assertIsNone(syncing.queue_retry(failed))  # the run add_node queued carries the work
        SyncRun.objects.filter(node=node, status=SyncStatus.QUEUED).update(status=SyncStatus.COMPLETED)
        self.assertIsNotNone(syncing.queue_retry(failed))

    def test_a_node_that_is_syncing_is_asked_again_even_if_the_plan_came_back_to_its_files(self):
        node = self.add_node("hangzhou")
        mark_synced(self.lan)
        Node.objects.filter(pk=node.pk).update(sync_state=SyncState.RUNNING)
        generation = Node.objects.get(pk=node.pk).sync_generation
        services.sync_changed_nodes(self.lan, reason="a change undone")
        self.assertEqual(Node.objects.get(pk=node.pk).sync_generation, generation + 1)
