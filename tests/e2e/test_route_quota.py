"""OpenVPN's per-client route quota with real servers: more than 256 prefixes behind one link.

Two real nodes in the lab, "p" and "d" (d's link client connects to p), and 302 registered nodes pinned behind d
that exist only as rows (their pools sit in every other /21 slot, so nothing aggregates). LanHub writes p's ccd file
for d with an iroute per prefix behind it (302) and raises p's `max-routes-per-client`. An address of the last
prefix and of the first (OpenVPN learns iroutes last line first, so past the quota the first lines are the ones it
drops: "route quota (256) exceeded"), put on d, answer pings from p across the link.
"""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction

from nodes import layout, planning, services, syncing
from nodes.files import desired_files
from nodes.models import Node, NodeState, SyncStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

UDP_CONF = layout.instance_paths(layout.UDP_INSTANCE)["conf"]
PHANTOMS = 300  # nodes behind d's two children, one /21 slot each with a free one between


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def sync(node: Node) -> None:
    """Run the node's queued sync here (no Celery worker in this test)."""
    node = Node.objects.get(pk=node.pk)
    queued = node.sync_runs.filter(status=SyncStatus.QUEUED).order_by("pk").first()
    run = syncing.run_sync(node, run_id=queued.pk if queued else None)
    assert run.status == SyncStatus.COMPLETED, run.error


def test_traffic_to_the_last_of_more_than_256_prefixes_behind_one_link_crosses(lab):
    owner = get_user_model().objects.create_user("host")
    lan = services.create_lan(owner=owner, name="Quota", slug="quota", pool_prefix=22, topology_mode="hierarchical")
    p_host, d_host = lab.add_node("p"), lab.add_node("d")
    for host in (p_host, d_host):
        host.authorize(lan.ssh_public_key)
    p = services.create_node(lan=lan, name="p", public_address=p_host.address, ssh_host=p_host.address)
    d = services.create_node(lan=lan, name="d", public_address=d_host.address, ssh_host=d_host.address,
                             pinned_upstream=p)
    children = [services.create_node(lan=lan, name=f"c{i}", public_address=f"192.0.2.{i}", pinned_upstream=d)
                for i in (1, 2)]
    # Rows only (never provisioned): enough for the plan to put their prefixes behind d.
    base = int(ipaddress.IPv4Address("10.128.0.0"))
    phantoms = [Node(lan=lan, name=f"x{i}", public_address="192.0.2.9", ssh_host="192.0.2.9",
                     state=NodeState.READY, pinned_upstream=children[i * 2 // PHANTOMS],
                     udp_pool=f"{ipaddress.IPv4Address(base + 2 * i * 2048)}/22",
                     tcp_pool=f"{ipaddress.IPv4Address(base + 2 * i * 2048 + 1024)}/22") for i in range(PHANTOMS)]
    for node in phantoms:
        services._issue_node_certificates(node)  # every node's files are computed when the LAN is re-planned
    Node.objects.bulk_create(phantoms)
    with transaction.atomic():
        planning.replan(lan, reason="nodes behind d")
    sync(p)
    sync(d)

    files = desired_files(lan, Node.objects.get(pk=p.pk), planning.current_plan(lan))
    iroutes = [line for line in files[layout.ccd_path("d")].content.splitlines() if line.startswith("iroute ")]
    assert len(iroutes) > 256
    quota = re.search(r"^max-routes-per-client (\d+)$", files[UDP_CONF].content, re.M)
    assert quota and int(quota.group(1)) > len(iroutes)
    # Where a player of the first and of the last prefix would be. OpenVPN learns iroutes last line first (its log:
    # "MULTI: Learn: <last prefix>" comes first), so without the raised quota the first lines are the ones lost.
    targets = [str(ipaddress.IPv4Network("/".join(line.split()[1:3])).broadcast_address - 2)
               for line in (iroutes[0], iroutes[-1])]
    for target in targets:
        d_host.exec(["ip", "addr", "add", f"{target}/32", "dev", "lo"])

    # d's link comes up and p reaches both ends through it (p's route, p's iroute, d's answer back).
    for target in targets:
        wait_for(lambda: lab.ping(p_host, target, timeout=1.0) is not None, f"p to reach {target} behind d", 60)
