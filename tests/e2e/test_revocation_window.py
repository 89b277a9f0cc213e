"""Revocation without a window (issue 14, item 2), on three real nodes.

A revoked player keeps trying: one reconnect loop per node, each attempt a fresh OpenVPN client with the revoked
profile pointed at that node alone. The host presses "revoke" in the middle. Attempts that start before the
request returns may succeed (their sessions are then cut by the sync); not one attempt that starts after it may.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from nodes import services
from nodes.models import Node, NodeState, SyncRun, SyncStatus
from players.models import Player
from tests.celery_worker import real_worker
from tests.figures import record
from tests.lab_helpers import describe_runs, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REGIONS = {"hangzhou": "asia/cn/east", "hongkong": "asia/hk", "singapore": "asia/sg"}
ATTEMPT_TIMEOUT = 6.0  # seconds an attempt may take to connect before it counts as refused
LOOP_AFTER_REVOKE = 15.0  # each loop goes on this long after the revoke returned
MAX_ATTEMPTS = 40
REFUSED = re.compile(r"TLS Error|TLS key negotiation failed|AUTH_FAILED|tls-error|SIGTERM\[soft,tls-error\]")


@dataclass
class Attempt:
    node: str
    started: float
    ended: float
    connected: bool


def only_remote(profile: str, host: str, port: int) -> str:
    """The profile with every remote but `host`'s UDP one taken out: an attempt reaches that node or none."""
    keep = f"remote {host} {port} udp"
    lines = [line for line in profile.splitlines() if not line.startswith("remote ") or line == keep]
    assert keep in lines
    return "\n".join(lines) + "\n"


def attempt(player_host, profile: str, node: str) -> Attempt:
    started = time.monotonic()
    player_host.start_openvpn(profile)
    connected = False
    try:
        while time.monotonic() - started < ATTEMPT_TIMEOUT:
            log = player_host.log()
            if "Initialization Sequence Completed" in log:
                connected = True
                break
            if REFUSED.search(log) or player_host.openvpn_pid() is None:
                break
            time.sleep(0.05)
    finally:
        player_host.stop_openvpn()
    return Attempt(node, started, time.monotonic(), connected)


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_no_node_accepts_a_revoked_profile_once_the_revoke_returns(lab):  # noqa: F811
    host_user = get_user_model().objects.create_user("host", password="host-password")
    lan = services.create_lan(owner=host_user, name="Revocation", slug="revocation", topology_mode="hub")
    with real_worker(concurrency=2):
        node_hosts = {}
        for name in REGIONS:
            node_host = node_hosts[name] = lab.add_node(name)
            node_host.authorize(lan.ssh_public_key)
            services.create_node(lan=lan, name=name, region=REGIONS[name], public_address=node_host.address,
                                 ssh_host=node_host.address)
        wait_until(lambda: Node.objects.filter(lan=lan, state=NodeState.READY).count() == 3 and not SyncRun.objects
                   .filter(node__lan=lan, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).exists(),
                   timeout=180, what=lambda: f"three ready nodes:\n{describe_runs(lan)}")

        host = Client()
        host.force_login(host_user)
        host.post(f"/lans/{lan.slug}/invites/", {"note": "", "hours": 24, "max_uses": 5})
        token = lan.invites.get().token
        assert Client().post(f"/join/{token}/", {"nickname": "mallory"}).status_code == 302
        mallory = Player.objects.get(lan=lan, nickname="mallory")
        profiles = {}
        for node in Node.objects.filter(lan=lan):
            response = Client().get(f"/me/{mallory.token}/profile/{node.name}.ovpn")
            assert response.status_code == 200
            profiles[node.name] = only_remote(response.content.decode(), node.public_address, node.udp_port)

        attempts: list[Attempt] = []
        revoked = {}
        done = threading.Event()

        def loop(name: str, player_host):
            for _ in range(MAX_ATTEMPTS):
                attempts.append(attempt(player_host, profiles[name], name))
                if "returned" in revoked and time.monotonic() > revoked["returned"] + LOOP_AFTER_REVOKE:
                    return
                if done.is_set():
                    return

        players = {name: lab.add_player(f"m{name[:6]}") for name in REGIONS}
        threads = [threading.Thread(target=loop, args=(name, players[name])) for name in REGIONS]
        for thread in threads:
            thread.start()
        try:
            # Let every loop connect at least once, so the loops demonstrably can connect.
            wait_until(lambda: {a.node for a in attempts if a.connected} == set(REGIONS), timeout=60,
                       what=lambda: f"mallory to connect to every node: {attempts}")
            revoked["sent"] = time.monotonic()
            response = host.post(f"/players/{mallory.pk}/revoke/")
            revoked["returned"] = time.monotonic()
            assert response.status_code == 302
        finally:
            for thread in threads:
                thread.join(timeout=LOOP_AFTER_REVOKE + MAX_ATTEMPTS * (ATTEMPT_TIMEOUT + 6))
            done.set()

    after = [a for a in attempts if a.started >= revoked["returned"]]
    accepted_after = [a for a in after if a.connected]
    assert {a.node for a in after} == set(REGIONS), "every node was tried after the revoke"
    assert accepted_after == [], f"accepted after the revoke returned: {accepted_after}"
    # The refusals were the servers' doing (the revocation file), not a network that stopped answering.
    refusals = {}
    for name, node_host in node_hosts.items():
        log = node_host.etc_path("openvpn/lanhub/run/lanhub-udp.log")
        refusals[name] = len(re.findall(rf"serial={int(mallory.serial, 16)} is revoked",
                                        log.read_text(errors="replace") if log.exists() else ""))
    assert all(refusals.values()), refusals
    figures = {
        "nodes": len(REGIONS),
        "revoke_request_s": round(revoked["returned"] - revoked["sent"], 3),
        "attempts_before_revoke": len(attempts) - len(after),
        "attempts_after_revoke": len(after),
        "accepted_after_revoke": len(accepted_after),
        "refused_by_server": refusals,
    }
    print("\nrevocation window figures:", json.dumps(figures))
    record("revocation", figures)

    # The servers run as nobody once started (their configs say `user nobody`).
    hz_host = node_hosts["hangzhou"]
    uids = {}
    for pid in lab.pids(hz_host.ns):
        status = Path(f"/proc/{pid}/status")
        if status.exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "openvpn":
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            uid = re.search(r"^Uid:\s+(\d+)", status.read_text(), re.M).group(1)
            uids[cmdline] = uid
    servers = {cmd: uid for cmd, uid in uids.items() if "/server/" in cmd}
    assert servers and all(uid != "0" for uid in servers.values()), uids

    # Deleting a node takes LanHub off the server and the server out of new profiles.
    singapore = Node.objects.get(lan=lan, name="singapore")
    assert services.delete_node(singapore) == ""
    sg_host = node_hosts["singapore"]
    assert not sg_host.etc_path("openvpn/server/lanhub-udp.conf").exists()
    assert not sg_host.etc_path("openvpn/lanhub/pki").exists()
    comms = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in lab.pids(sg_host.ns)
             if Path(f"/proc/{pid}/comm").exists()]
    assert "openvpn" not in comms, comms
    invite = lan.invites.get()
    assert Client().post(f"/join/{invite.token}/", {"nickname": "erin"}).status_code == 302
    erin = Player.objects.get(lan=lan, nickname="erin")
    profile = Client().get(f"/me/{erin.token}/profile/hangzhou.ovpn").content.decode()
    assert sg_host.address not in profile
