"""Writers lock a LAN's row before its nodes' rows (nodes.planning.lock_lan), so a re-plan and a node change never
wait for each other in a circle.

A re-plan holds the LAN row and then updates nodes' rows (their sync generation); a change of a node column that
players are given also updates the LAN row (its nodes_version, by trigger). A writer that took the node's row
first would wait for the LAN while the re-plan waits for that node: on PostgreSQL a deadlock, one transaction
aborted (a failed poll, a 500 on the dashboard). SQLite locks the whole database for a write, so it cannot show this.
"""

import threading
import time
import unittest

from django.contrib.auth import get_user_model
from django.db import connection, connections, transaction
from django.db.models import F
from django.test import TransactionTestCase

from nodes import planning, services, syncing
from nodes.models import Node, NodeState

HOLD = 1.5  # seconds the re-plan holds the LAN row before it touches the node: past PostgreSQL's deadlock_timeout


@unittest.skipUnless(connection.vendor == "postgresql",
                     "needs PostgreSQL row locks; SQLite serialises whole-database writes, so it cannot deadlock. "
                     "Run with DATABASE_URL=postgres://...")
class LockOrderTests(TransactionTestCase):
    def setUp(self):
        host = get_user_model().objects.create_user("host", password="host-password")
        self.lan = services.create_lan(owner=host, name="Game night", slug="gamenight")
        for name, address in (("hangzhou", "198.51.100.10"), ("hongkong", "198.51.100.11")):
            services.create_node(lan=self.lan, name=name, public_address=address, ssh_host=address)
        Node.objects.filter(lan=self.lan).update(state=NodeState.READY)
        self.node = Node.objects.select_related("lan").get(lan=self.lan, name="hongkong")

    def race(self, change):
        """A re-plan's pattern holds the LAN row, then updates the node; ``change`` starts meanwhile."""
        errors, holding = [], threading.Event()

        def replan_pattern():
            try:
                with transaction.atomic():
                    planning.lock_lan(self.lan.pk)
                    holding.set()
                    time.sleep(HOLD)
                    Node.objects.filter(pk=self.node.pk).update(sync_generation=F("sync_generation") + 1)
            except Exception as exc:  # noqa: BLE001 - what the test reports
                errors.append(f"re-plan: {exc!r}")
            finally:
                connections.close_all()

        def node_change():
            try:
                holding.wait(10)
                change()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"node change: {exc!r}")
            finally:
                connections.close_all()

        threads = [threading.Thread(target=replan_pattern), threading.Thread(target=node_change)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertFalse(any(thread.is_alive() for thread in threads))
        self.assertEqual(errors, [])

    def test_marking_a_node_down_waits_for_the_lan_instead_of_deadlocking(self):
        self.race(lambda: syncing.mark_health(Node.objects.select_related("lan").get(pk=self.node.pk),
                                              healthy=False, reason="hongkong missed 3 polls"))
        self.assertFalse(Node.objects.get(pk=self.node.pk).healthy)

    def test_changing_a_node_waits_for_the_lan_instead_of_deadlocking(self):
        self.race(lambda: services.update_node(Node.objects.select_related("lan").get(pk=self.node.pk),
                                               udp_port=1195))
        self.assertEqual(Node.objects.get(pk=self.node.pk).udp_port, 1195)

    def test_a_failed_first_sync_waits_for_the_lan_instead_of_deadlocking(self):
        Node.objects.filter(pk=self.node.pk).update(state=NodeState.NEW, applied_files={})
        self.race(lambda: syncing._fail_node(self.node, "connect: nothing answered"))
        self.assertEqual(Node.objects.get(pk=self.node.pk).state, NodeState.FAILED)
