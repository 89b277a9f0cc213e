"""OpenVPN Connect's core as a LanHub player: the openvpn3 command-line client (test/ovpncli from OpenVPN/openvpn3,
the library OpenVPN Connect is built on) connects with the profile LanHub hands out, unchanged, and takes part in
LAN discovery with players on the openvpn 2.6 client.

The client is not part of LanHub and not installed by scripts/bootstrap.sh: build it from the openvpn3 sources
outside the project and name the binary in ``LANHUB_OPENVPN3_CLI``. The module is marked ``openvpn3``, which
pytest.ini leaves out of ``make test`` and CI (they have no openvpn3 build, and the project ships no script that
builds one): run it with ``-m openvpn3``. Selected, it never skips: without the variable, or with one that names no
executable, it fails. docs/discovery.md ("What each client needs") records what a run showed.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import re
import signal
import subprocess
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from nodes import services
from nodes.models import Node
from nodes.render import STATUS_INTERVAL
from tests.celery_worker import real_worker
from tests.e2e.test_discovery import GROUP, Listener, received, relay_log, send
from tests.e2e.test_lan_end_to_end import connect, download, host_invite, join, register, wait_ready
from tests.lab_helpers import require_openvpn, wait_until

CLI_ENV = "LANHUB_OPENVPN3_CLI"

pytestmark = [pytest.mark.e2e, pytest.mark.openvpn3, pytest.mark.django_db(transaction=True)]


def openvpn3_cli() -> str:
    """The openvpn3 client's path; a path that is not an executable fails the test."""
    path = os.environ.get(CLI_ENV, "")
    if not path:
        pytest.fail(f"needs the openvpn3 command-line client: build test/ovpncli from OpenVPN/openvpn3 outside the "
                    f"project and set {CLI_ENV} to it", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{CLI_ENV}={path} is not an executable", pytrace=False)
    return path


class Openvpn3Player:
    """The openvpn3 client running in a player's namespace with a profile as downloaded; its output is the log."""

    def __init__(self, host, cli: str, profile: str):
        self.host = host
        host.run_dir.mkdir(parents=True, exist_ok=True)
        self.profile = host.run_dir / "openvpn3.ovpn"
        self.profile.write_text(profile)
        self.profile.chmod(0o600)
        self.log_path = host.run_dir / "openvpn3.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", host.ns, cli, str(self.profile)], stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_connected(self, timeout: float) -> str:
        """The tunnel's address once the client reports CONNECTED and its tun device has it."""
        def address():
            assert self.proc.poll() is None, f"openvpn3 exited:\n{self.log()[-3000:]}"
            if "CONNECTED" not in self.log():
                return None
            out = self.host.exec(["ip", "-4", "-o", "addr", "show"]).stdout
            found = [line.split()[3].split("/")[0] for line in out.splitlines() if line.split()[1].startswith("tun")]
            return found[0] if found else None

        return wait_until(address, timeout=timeout, what=lambda: f"openvpn3 to connect\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log_file.close()


@override_settings(LANHUB_JOIN_RATE=10_000)
def test_an_openvpn3_player_connects_with_the_downloaded_profile_and_discovers_and_is_discovered(lab):
    cli = openvpn3_cli()
    require_openvpn()
    host_user = get_user_model().objects.create_user("host", password="host-password")
    lan = services.create_lan(owner=host_user, name="Connect night", slug="connect")
    with real_worker(concurrency=2):
        hosts = {name: register(lab, lan, name)[0] for name in ("hangzhou", "hongkong")}
        wait_ready(lan, list(hosts), timeout=120)
        _, invite = host_invite(lan, host_user)
        players = {}
        for nickname, node in (("alice", "hangzhou"), ("bob", "hongkong")):
            player = join(Client(), invite, nickname)
            players[nickname] = connect(lab, nickname, download(Client(), player, node))[:2]
        (alice, alice_ip), (bob, bob_ip) = players["alice"], players["bob"]
        # olga uses OpenVPN Connect's core, with the profile exactly as the player page hands it out.
        olga_host = lab.add_player("olga")
        olga = Openvpn3Player(olga_host, cli, download(Client(), join(Client(), invite, "olga"), "hangzhou"))
        try:
            olga_ip = olga.wait_connected(timeout=60)
            check_olga(lab, lan, olga, olga_host, olga_ip, alice, alice_ip, bob, bob_ip, hosts)
        finally:
            olga.stop()


def check_olga(lab, lan, olga, olga_host, olga_ip, alice, alice_ip, bob, bob_ip, hosts):  # noqa: C901
    hangzhou = Node.objects.get(lan=lan, name="hangzhou")
    assert ipaddress.ip_address(olga_ip) in ipaddress.ip_network(hangzhou.udp_pool), (olga_ip, hangzhou.udp_pool)
    log = olga.log()
    # The pushed routes, as openvpn3 installs them on Linux: the LAN, the limited broadcast, the group.
    routes = olga_host.exec(["ip", "-4", "route", "show", "table", "all"]).stdout
    print(f"\nopenvpn3 client's routes:\n{routes}\nopenvpn3 log:\n{log}")
    lines = routes.splitlines()

    def route(prefix: str) -> str | None:
        return next((line for line in lines if line.startswith(prefix + " ") and "dev tun" in line), None)

    assert route("10.0.0.0/8") or any("dev tun" in line and line.startswith("10.") for line in lines), routes
    # Metric 1, as pushed ("vpn_gateway 1"): the metric that makes Windows send broadcasts into the tunnel.
    assert " metric 1" in f"{route('255.255.255.255')} ", routes
    assert route(GROUP), routes
    # Unicast both ways with a player on the other server.
    wait_until(lambda: lab.ping(olga_host, bob_ip, timeout=1) and lab.ping(bob, olga_ip, timeout=1), timeout=20,
               what="pings between olga (openvpn3, Hangzhou) and bob (Hong Kong)")
    listener = Listener(lab, bob, 6112, seconds=3)
    send(lab, olga_host, bob_ip, 6112, "unicast")
    assert received(listener.records(), olga_ip, "unicast") == {"unicast": 1}
    time.sleep(STATUS_INTERVAL + 2)  # the relays learn olga from the status file and tell each other

    def why():
        return "\n".join(f"--- {n} relay:\n{relay_log(h)}" for n, h in hosts.items()) + f"\n{olga.log()[-1500:]}"

    # olga's broadcasts, to 255.255.255.255:6112 and to her subnet's broadcast address, reach alice (same server)
    # and bob (other server) once each, from olga's address, and their unicast replies reach olga's game.
    subnet_broadcast = str(ipaddress.ip_network(hangzhou.udp_pool).broadcast_address)
    listeners = {"alice": Listener(lab, alice, 6112, seconds=7), "bob": Listener(lab, bob, 6112, seconds=7)}
    replies = send(lab, olga_host, "255.255.255.255", 6112, "from-openvpn3", count=3, wait=2, sport=6112)
    replies += send(lab, olga_host, subnet_broadcast, 6112, "directed", count=2, wait=2, sport=6112)
    for name, listener in listeners.items():
        records = listener.records()
        got = received(records, olga_ip, "from-openvpn3")
        assert got == {f"from-openvpn3#{i}": 1 for i in range(3)}, (name, got, why())
        assert received(records, olga_ip, "directed") == {"directed#0": 1, "directed#1": 1}, (name, records, why())
    repliers = collections.Counter(r["src"] for r in replies if r["data"].startswith("reply:"))
    assert repliers == {alice_ip: 5, bob_ip: 5}, (replies, why())
    # ... and the other way: alice's and bob's broadcasts reach olga's game once each.
    listener = Listener(lab, olga_host, 6112, seconds=5)
    send(lab, alice, "255.255.255.255", 6112, "from-alice", count=2)
    send(lab, bob, "255.255.255.255", 6112, "from-bob", count=2)
    records = listener.records()
    assert received(records, alice_ip, "from-alice") == {"from-alice#0": 1, "from-alice#1": 1}, (records, why())
    assert received(records, bob_ip, "from-bob") == {"from-bob#0": 1, "from-bob#1": 1}, (records, why())
    # Minecraft Java's multicast, both ways.
    listeners = {"olga": Listener(lab, olga_host, 4445, seconds=4, group=GROUP),
                 "bob": Listener(lab, bob, 4445, seconds=4, group=GROUP)}
    send(lab, bob, GROUP, 4445, "[MOTD]bob[/MOTD]", count=2)
    send(lab, olga_host, GROUP, 4445, "[MOTD]olga[/MOTD]", count=2)
    at_olga, at_bob = listeners["olga"].records(), listeners["bob"].records()
    assert sorted(received(at_olga, bob_ip, "[MOTD]bob").values()) == [1, 1], (at_olga, why())
    assert sorted(received(at_bob, olga_ip, "[MOTD]olga").values()) == [1, 1], (at_bob, why())
