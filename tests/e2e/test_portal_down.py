"""A LAN keeps working while the portal is down (issue 14, item 1), on a real LAN: two nodes and their link.

LanHub builds Hangzhou and Hong Kong as usual (Celery, SSH, OpenVPN in the lab's namespaces), three players join
over HTTP, mallory is revoked, and then the portal stops: no worker, no beat, nothing of LanHub runs any more.

The clock is moved by dating the certificates, which is what OpenVPN compares with its clock: the LAN's CA, the
players' certificates and the nodes' server and link certificates were all issued, by LanHub's own issuing code,
PAST_OLD_LIFETIME ago: a year past the ten years LanHub used to give the CA and players, five times the two years
it used to give nodes (and the 30-day CRL nodes used to need would have lapsed over a hundred times).
With that the link comes back after a reconnect, players on both servers reach each other across it, mallory is
refused by both servers, every OpenVPN process on the nodes runs as nobody, and no management interface answers a
command without its password.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client, override_settings
from django.urls import reverse

from lab.netns import NODES_NET
from lanhub import pki
from lanhub.secrets import seal
from nodes import games, layout, services
from nodes.models import Node, NodeState, SyncRun, SyncStatus
from players.models import Player
from tests.celery_worker import real_worker
from tests.figures import record

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NOW = datetime.now(timezone.utc)
OLD_LIFETIME_DAYS = 3650  # what LanHub gave a LAN's CA and its players before they had no expiry date
PAST_OLD_LIFETIME = timedelta(days=OLD_LIFETIME_DAYS + 365)
PORTAL_DOWN_DAYS = PAST_OLD_LIFETIME.days  # every certificate is this old, so the portal can have stopped no later
REGIONS = {"hangzhou": "asia/cn/east", "hongkong": "asia/hk"}
PLAYERS = {"alice": "hangzhou", "bob": "hongkong", "mallory": "hangzhou"}
UPLINK_GATEWAY = f"{NODES_NET}.1"  # the nodes' uplink gateway, in the lab's own wan namespace
MANAGEMENT_PROBE = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.settimeout(1.5)
s.sendall(b"status 3\nstate\n")
seen = b""
try:
    while len(seen) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        seen += chunk
except OSError:
    pass
print(seen.decode(errors="replace"))
"""


# Watches the lab's underlay bridge (in the lab's own "wan" namespace) for a UDP datagram from a player's tunnel
# address: one that a node forwarded from a tunnel onto its uplink.
UPLINK_SNIFFER = r"""
import socket, struct, sys, time
source, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind(("br-nodes", 0))
s.settimeout(0.2)
print("READY", flush=True)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        data = s.recv(65535)
    except socket.timeout:
        continue
    ihl = (data[0] & 15) * 4
    if data[9] == 17 and socket.inet_ntoa(data[12:16]) == source and struct.unpack("!H", data[ihl+2:ihl+4])[0] == port:
        print("SEEN", flush=True)
        break
"""
UDP_SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"out through the node", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""


def wait_until(predicate, *, timeout: float, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")


def runs_of(lan) -> str:
    return "\n".join(f"{r.node.name} {r.kind} {r.status} {r.error}" for r in
                     SyncRun.objects.filter(node__lan=lan).select_related("node").order_by("created_at"))


def settled(lan) -> bool:
    return (Node.objects.filter(lan=lan, state=NodeState.READY).count() == len(REGIONS) and not SyncRun.objects
            .filter(node__lan=lan, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).exists())


def date_the_ca(lan) -> None:
    """The LAN was created PAST_OLD_LIFETIME ago: its CA is dated then (before any node or player exists)."""
    ca = pki.create_ca(name=f"lanhub-{lan.slug}-ca", now=NOW - PAST_OLD_LIFETIME)
    lan.ca_cert, lan.ca_key_sealed = ca.cert_pem, seal(ca.key_pem)
    lan.save(update_fields=["ca_cert", "ca_key_sealed"])


def date_the_node_certificates(lan) -> None:
    """The nodes were added PAST_OLD_LIFETIME ago: what LanHub's issuing code gave them then, then synced."""
    for node in Node.objects.filter(lan=lan).select_related("lan"):
        services._issue_node_certificates(node, now=NOW - PAST_OLD_LIFETIME)
        node.save(update_fields=["server_cert", "server_key_sealed", "link_cert", "link_key_sealed"])
        assert services.node_certificate_expiry(node) is None  # no date: the portal never has to come back
        with transaction.atomic():
            services.request_sync(node, reason="node certificates renewed")


def date_the_player(player: Player, lan) -> None:
    """The player joined PAST_OLD_LIFETIME ago: the same common name, a certificate dated then."""
    device = player.first_device
    issued = pki.issue_client(ca=services.lan_ca(lan), common_name=device.common_name, now=NOW - PAST_OLD_LIFETIME)
    device.cert_pem, device.key_sealed = issued.cert_pem, seal(issued.key_pem)
    device.serial, device.issued_at = format(issued.serial, "x"), NOW - PAST_OLD_LIFETIME
    device.save(update_fields=["cert_pem", "key_sealed", "serial", "issued_at"])


def only_remote(profile: str, host: str, port: int) -> str:
    keep = f"remote {host} {port} udp"
    lines = [line for line in profile.splitlines() if not line.startswith("remote ") or line == keep]
    assert keep in lines
    return "\n".join(lines) + "\n"


def openvpn_processes(lab, node_host) -> dict[str, tuple[int, int]]:
    """Instance config path -> (pid, real uid) of every openvpn process in the node's namespace."""
    found = {}
    for pid in lab.pids(node_host.ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "openvpn":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            uid = int(re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
        except OSError:
            continue
        config = next((arg for arg in cmdline if arg.endswith(".conf")), " ".join(cmdline))
        found[config] = (pid, uid)
    return found


def reaches_the_uplink(lab, player, tunnel_address: str, port: int) -> bool:
    """Send UDP from the player's tunnel address to the underlay's gateway through the tunnel; True if the node
    put it on its uplink."""
    sniffer = subprocess.Popen(["ip", "netns", "exec", lab.wan, sys.executable, "-c", UPLINK_SNIFFER,
                                tunnel_address, str(port), "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout.readline().strip() == "READY"
        lab.exec(player.ns, [sys.executable, "-c", UDP_SENDER, UPLINK_GATEWAY, str(port)])
        out, _ = sniffer.communicate(timeout=10)
        return "SEEN" in out
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait(timeout=5)


def find_link(lab, node_hosts) -> dict:
    """The one link of a two-node LAN: its downstream, upstream, client config, pid and log."""
    processes = {name: openvpn_processes(lab, node_hosts[name]) for name in REGIONS}
    links = [(name, config) for name in REGIONS for config in processes[name] if config.startswith(layout.CLIENT_DIR)]
    assert len(links) == 1, processes  # two nodes: one link, its client on the downstream
    downstream, config = links[0]
    upstream = next(name for name in REGIONS if name != downstream)
    log = node_hosts[downstream].etc_path(f"openvpn/lanhub/run/{layout.link_basename(upstream)}.log")
    return {"downstream": downstream, "upstream": upstream, "config": config, "pid": processes[downstream][config][0],
            "log": log}


def log_since(log: Path, offset: int) -> str:
    return log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""


def reconnected(log: Path, offset: int) -> bool:
    """Since `offset` the link client restarted and its new connection completed."""
    text = log_since(log, offset)
    restart = text.find("process restarting")
    return restart >= 0 and text.find("Initialization Sequence Completed", restart) > restart


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_the_lan_keeps_working_with_the_portal_stopped_past_every_lifetime(lab):
    host_user = get_user_model().objects.create_user("host", password="host-password")
    lan = services.create_lan(owner=host_user, name="Outage", slug="outage", topology_mode="hub")
    date_the_ca(lan)
    node_hosts = {}
    host = Client()
    host.force_login(host_user)
    with real_worker(concurrency=2):
        for name, region in REGIONS.items():
            node_host = node_hosts[name] = lab.add_node(name)
            node_host.authorize(lan.ssh_public_key)
            services.create_node(lan=lan, name=name, region=region, public_address=node_host.address,
                                 ssh_host=node_host.address)
        wait_until(lambda: settled(lan), timeout=180, what=lambda: f"two ready nodes:\n{runs_of(lan)}")
        date_the_node_certificates(lan)
        wait_until(lambda: settled(lan), timeout=180, what=lambda: f"the renewed certificates:\n{runs_of(lan)}")
        for name, node_host in node_hosts.items():
            node = Node.objects.get(lan=lan, name=name)
            assert node_host.etc_path("openvpn/lanhub/pki/node.crt").read_text() == node.server_cert

        host.post(reverse("players:invite_create", args=[lan.slug]), {"note": "", "hours": 24, "max_uses": 5})
        token = lan.invites.get().token
        profiles = {}
        for nickname, server in PLAYERS.items():
            assert Client().post(reverse("players:join", args=[token]), {"nickname": nickname}).status_code == 302
            player = Player.objects.get(lan=lan, nickname=nickname)
            date_the_player(player, lan)
            node = Node.objects.get(lan=lan, name=server)
            response = Client().get(reverse("players:profile_download", args=[player.token, node.name]))
            assert response.status_code == 200, response.content[:300]
            profiles[nickname] = only_remote(response.content.decode(), node.public_address, node.udp_port)
        mallory = Player.objects.get(lan=lan, nickname="mallory")
        assert host.post(reverse("players:player_revoke", args=[mallory.pk])).status_code == 302
        wait_until(lambda: settled(lan), timeout=120, what=lambda: f"the revocation's syncs:\n{runs_of(lan)}")

        # The host unticks a game: the players' push list changes and the upstream restarts. The link client
        # reconnects as nobody with the same pulled options (its ccd file's push-reset), so it never has to
        # reopen its device, which nobody could not.
        link = find_link(lab, node_hosts)
        offset = link["log"].stat().st_size
        services.update_discovery(lan, discovery_games=[g for g in games.default_games() if g != "minecraft-java"])
        wait_until(lambda: settled(lan), timeout=120, what=lambda: f"the game list's syncs:\n{runs_of(lan)}")
        wait_until(lambda: reconnected(link["log"], offset), timeout=60,
                   what=lambda: f"the link to reconnect:\n{log_since(link['log'], offset)[-3000:]}")
        assert "Pulled options changed" not in log_since(link["log"], offset)
        assert find_link(lab, node_hosts)["pid"] == link["pid"], "the link client kept running"
    # The portal is stopped: from here on only the nodes, the players and this test's own probes run.

    # The link reconnects with a fresh handshake (SIGUSR1 is what a ping-restart does), unprivileged, keeping its
    # device and routes.
    link = find_link(lab, node_hosts)
    offset = link["log"].stat().st_size
    restarted_at = time.monotonic()
    os.kill(link["pid"], signal.SIGUSR1)
    wait_until(lambda: reconnected(link["log"], offset), timeout=60,
               what=lambda: f"the link to reconnect:\n{log_since(link['log'], offset)[-3000:]}")
    link_reconnect_s = time.monotonic() - restarted_at
    assert "Preserving previous TUN/TAP instance" in log_since(link["log"], offset)
    assert find_link(lab, node_hosts)["pid"] == link["pid"], "the link client restarted in place"
    downstream = link["downstream"]

    # Every OpenVPN process on the nodes, servers and link client, runs as nobody.
    for name in REGIONS:
        uids = {config: uid for config, (_, uid) in openvpn_processes(lab, node_hosts[name]).items()}
        assert uids and all(uid != 0 for uid in uids.values()), (name, uids)

    # Players on both servers connect and reach each other across the link.
    players = {nickname: lab.add_player(nickname) for nickname in PLAYERS}
    addresses = {}
    for nickname in ("alice", "bob"):
        players[nickname].start_openvpn(profiles[nickname])
        addresses[nickname] = players[nickname].wait_for_tunnel(timeout=30)
    assert wait_until(lambda: lab.ping(players["alice"].ns, addresses["bob"], count=1), timeout=30,
                      what="alice to reach bob across the link")
    assert lab.ping(players["bob"].ns, addresses["alice"], count=3) is not None

    # A player cannot use its node as a way onto the node's uplink: the FORWARD chain drops tunnel-to-uplink
    # traffic. The control (the drop rules taken out of this lab node) shows the probe would see it.
    alice_node = node_hosts[PLAYERS["alice"]]
    device = next(line.split()[1] for line in players["alice"].exec(["ip", "-4", "-o", "addr", "show"]).stdout
                  .splitlines() if f" {addresses['alice']}/" in line)
    players["alice"].exec(["ip", "route", "add", f"{UPLINK_GATEWAY}/32", "dev", device])
    assert not reaches_the_uplink(lab, players["alice"], addresses["alice"], 40001)
    for rule in (["-i", "lh+", "-j", "DROP"], ["-o", "lh+", "-j", "DROP"]):
        alice_node.exec(["iptables", "-D", "LANHUB-FORWARD", *rule])
    assert reaches_the_uplink(lab, players["alice"], addresses["alice"], 40002), "the control saw nothing"

    # Mallory, revoked, is refused by both servers (the revocation directory has no expiry).
    for server in REGIONS:
        profile = profiles["mallory"]
        if server != PLAYERS["mallory"]:
            other = Node.objects.get(lan=lan, name=server)
            profile = re.sub(r"^remote .*$", f"remote {other.public_address} {other.udp_port} udp", profile,
                             flags=re.M)
        players["mallory"].start_openvpn(profile)
        time.sleep(6)
        assert "Initialization Sequence Completed" not in players["mallory"].log(), server
        players["mallory"].stop_openvpn()
        server_log = node_hosts[server].etc_path("openvpn/lanhub/run/lanhub-udp.log").read_text(errors="replace")
        assert f"serial={int(mallory.serial, 16)} is revoked" in server_log, (server, server_log[-2000:])

    # No management interface answers a command without its password.
    for name, node_host in node_hosts.items():
        ports = re.findall(r"^management 127\.0\.0\.1 (\d+) (\S+)$", "\n".join(
            path.read_text() for path in node_host.etc_path("openvpn").rglob("lanhub-*.conf")), re.M)
        assert len(ports) == (3 if name == downstream else 2), ports
        for port, password_file in ports:
            assert password_file == layout.MANAGEMENT_PASSWORD_FILE
            seen = lab.exec(node_host.ns, [sys.executable, "-c", MANAGEMENT_PROBE, port]).stdout
            assert "ENTER PASSWORD:" in seen, seen
            assert "CLIENT_LIST" not in seen and "CONNECTED" not in seen and "END" not in seen, seen

    for player in players.values():
        player.stop_openvpn()
    print(f"\nportal down: {PORTAL_DOWN_DAYS} days, link reconnect {link_reconnect_s:.2f} s")
    record("portal_down_days_tested", PORTAL_DOWN_DAYS)
    record("portal_down_days_guaranteed", "no date (indefinite)")
    record("portal_down_years_past_old_lifetime", round(PAST_OLD_LIFETIME.days / 365, 1))
