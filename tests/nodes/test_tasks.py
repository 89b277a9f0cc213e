"""The tasks through a real Celery worker on Redis: results land in the database, connection errors retry."""

import time

from django.contrib.auth import get_user_model
from django.test import TransactionTestCase, override_settings

from nodes import services, tasks
from nodes.models import Node, StoredPlan, SyncRun, SyncStatus, VpnSession
from tests.celery_worker import real_worker
from tests.nodes.test_services import closed_port


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class WorkerTests(TransactionTestCase):
    def setUp(self):
        host = get_user_model().objects.create_user("alice", password="alice-password")
        self.lan = services.create_lan(owner=host, name="Game night", slug="gamenight")

    def test_a_queued_sync_is_run_by_the_worker_and_recorded(self):
        with real_worker():
            # create_node commits, then sends the task (autocommit: on_commit runs at once).
            node = services.create_node(lan=self.lan, name="hangzhou", public_address="127.0.0.1",
                                        ssh_host="127.0.0.1", ssh_port=closed_port())
            run = wait_for(lambda: SyncRun.objects.filter(node=node, status=SyncStatus.FAILED).first(),
                           10, "the worker to record the failed run")
        self.assertTrue(run.error.startswith("connect:"), run.error)
        self.assertIsNotNone(run.started_at)
        self.assertIsNotNone(run.finished_at)

    def test_a_connection_error_is_retried_twice_with_new_runs_and_then_left_failed(self):
        # Twice, not five times: a worker that keeps knocking on a closed port is a patient port scanner.
        tasks.RETRY_BACKOFF = 0.5  # the schedule's shape, not its length, is under test here
        failed = SyncRun.objects.none()
        try:
            with real_worker():
                node = services.create_node(lan=self.lan, name="hangzhou", public_address="127.0.0.1",
                                            ssh_host="127.0.0.1", ssh_port=closed_port())
                failed = SyncRun.objects.filter(node=node, status=SyncStatus.FAILED)
                wait_for(lambda: failed.filter(reason__startswith="retry:").count() == 2, 20,
                         "two retried runs to fail again")
                time.sleep(4 * tasks.RETRY_BACKOFF * 2 ** tasks.MAX_RETRIES)  # a third retry would be due by now
        finally:
            tasks.RETRY_BACKOFF = 5
        self.assertTrue(all(run.retryable for run in failed))
        self.assertEqual(failed.count(), 3)  # the first attempt and two retries
        self.assertFalse(SyncRun.objects.filter(node=node, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING])
                         .exists())

    def test_the_status_poll_task_counts_a_missed_poll(self):
        node = services.create_node(lan=self.lan, name="hangzhou", public_address="127.0.0.1",
                                    ssh_host="127.0.0.1", ssh_port=closed_port())
        with real_worker():
            outcome = tasks.poll_status.delay(node.pk).get(timeout=15)
        self.assertEqual(outcome, "missed")
        node.refresh_from_db()
        self.assertEqual(node.missed_polls, 1)

    @override_settings(LANHUB_RECHECK_AFTER=1, LANHUB_DOWN_AFTER_POLLS=3)
    def test_a_missed_poll_is_looked_at_again_soon_until_the_node_is_failed_over(self):
        # One poll, nothing else: no beat runs here, so every later poll is a recheck the misses asked for.
        node = services.create_node(lan=self.lan, name="hangzhou", public_address="127.0.0.1",
                                    ssh_host="127.0.0.1", ssh_port=closed_port())
        Node.objects.filter(pk=node.pk).update(state="ready")
        VpnSession.objects.create(node=node, instance="server/lanhub-udp", common_name="alice-1a2b3c",
                                  real_address="192.0.2.7:50000", vpn_address="10.0.1.1")
        version = StoredPlan.objects.get(lan=self.lan).version
        with real_worker():
            tasks.poll_status.delay(node.pk)
            wait_for(lambda: not Node.objects.get(pk=node.pk).healthy, 30, "the node to be marked down")
            time.sleep(3)  # a recheck after the node was marked down would be due by now
        node.refresh_from_db()
        self.assertEqual(node.missed_polls, 3)
        self.assertIn("nothing answered there as an SSH server", node.last_error)
        self.assertFalse(VpnSession.objects.filter(node=node).exists())  # its players are not online there
        plan = StoredPlan.objects.get(lan=self.lan)
        self.assertGreater(plan.version, version)  # the LAN was re-planned, without the node
        self.assertIn("hangzhou missed 3 polls", plan.reason)
        self.assertEqual(plan.data["healthy"], [])
