"""LanHub on real Debian 12 servers: QEMU virtual machines with systemd and apt (lab/vm.py).

One VM ("hongkong", on the lab's node bridge) serves the whole module; each test makes its own LAN (the database is
emptied between tests) and the VM keeps what earlier tests left on it, in file order:

1. bare VM, registered through the node service the admin form calls: apt installs openvpn through the lab's proxy,
   the instances run as enabled systemd units, management answers, verify passes (as a NOPASSWD sudo user);
2. a sudo user who needs a password is refused before anything on the node changes;
3. a reboot heals by itself: the units come back from systemd, the link to Hangzhou (a namespace node) and the
   players reconnect, and the status poll shows the node back;
4. deleting the node stops and disables its units, removes LanHub's files and revokes its certificates;
5. the VM rebuilt at the same address (new disk, new host key): the sync stops with both fingerprints, uploads
   nothing;
6. on that bare VM, a first sync whose apt step fails (proxy stopped) leaves the node as it was and says why, and
   the retry succeeds.

The module runs from ``make test-vm`` (pytest.ini leaves marker ``vm`` out of ``make test`` and CI for now): 1-4
passed here before the discovery relay became a step of every sync; 5 and 6 (``vm_extra``) have not yet passed end
to end.
"""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from lab import vm as labvm
from nodes import openvpn_mgmt as management
from nodes import services, syncing
from nodes.models import Link, LinkState, Node, NodeState, RevokedCertificate, SyncRun, SyncStatus, VpnSession
from nodes.provisioning import verify
from nodes.ssh import open_connection
from players import services as player_services
from players.models import Player
from tests.celery_worker import real_worker
from tests.lab_helpers import connect_node, ssh_run
from tests.vm.conftest import FIGURES

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]

UNITS = ("openvpn-server@lanhub-udp", "openvpn-server@lanhub-tcp")
BOOT_WAIT = 420  # seconds; a cold boot under TCG takes 15-25 s on an idle 2-core machine, far more when it is busy
APT_WAIT = 600


def wait_until(predicate, *, timeout: float, interval: float = 0.5, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")


def runs(lan) -> str:
    return "\n".join(f"{r.node.name} {r.kind} {r.status} {r.reason}: {r.error}"
                     for r in SyncRun.objects.filter(node__lan=lan).order_by("created_at"))


def settled(node: Node) -> Node:
    node.refresh_from_db()
    busy = SyncRun.objects.filter(node=node, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).exists()
    return None if busy or node.state in (NodeState.NEW, NodeState.PROVISIONING) else node


def wait_settled(node: Node, timeout: float) -> Node:
    return wait_until(lambda: settled(node), timeout=timeout, what=lambda: f"{node.name} to settle:\n{runs(node.lan)}")


def root_sh(vm, ssh_key, command: str, timeout: float = 60) -> tuple[int, str, str]:
    with connect_node(vm, ssh_key) as client:
        return ssh_run(client, command, timeout=timeout)


def root_out(vm, ssh_key, command: str, timeout: float = 60) -> str:
    status, out, err = root_sh(vm, ssh_key, command, timeout)
    assert status == 0, f"{command!r} on {vm.name}: exit {status}: {err}"
    return out


def authorize(vm, ssh_key, key_line: str) -> None:
    """What a host does by hand: paste the LAN's deploy key for root and for the deploy user."""
    line = key_line.strip()
    root_out(vm, ssh_key, f"for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do "
                          f"grep -qxF '{line}' \"$f\" || echo '{line}' >> \"$f\"; done")


def node_side(vm, ssh_key) -> str:
    """What LanHub could have changed on the node: its files (with hashes; not the run directory, where running
    instances write status and address-pool files), the openvpn package, its units."""
    return root_out(vm, ssh_key, "find /etc/openvpn /etc/sysctl.d -type f -not -path '/etc/openvpn/lanhub/run/*' "
                                 "2>/dev/null | sort | xargs -r sha256sum; echo @@; "
                                 "dpkg-query -W -f='${Status}\\n' openvpn 2>/dev/null; echo @@; "
                                 "systemctl list-units --all --plain --no-legend 'openvpn*' | awk '{print $1, $3}'; "
                                 "ls /etc/systemd/system/*.wants/ | grep openvpn; true")


def new_lan(name: str):
    owner = get_user_model().objects.create_user(f"host-{name}", password="host-password")
    return services.create_lan(owner=owner, name=name, topology_mode="hub")


@pytest.fixture(scope="module")
def hongkong(vm_lab, vm_image, apt_proxy, ssh_key):
    """The module's VM: bare Debian 12, users deploy (NOPASSWD sudo) and asker (sudo with a password)."""
    vm = labvm.add_vm(vm_lab, "hongkong", vm_image, authorized_keys=ssh_key.public_line, apt_proxy=apt_proxy.url,
                      users={"deploy": "nopasswd", "asker": "password"})
    FIGURES["boot_to_ssh_s"] = vm.wait_for_ssh(BOOT_WAIT)
    yield vm
    vm.stop()


def test_a_bare_vm_registered_through_the_node_service_gets_openvpn_from_apt_and_runs_enabled_systemd_units(
        hongkong, apt_proxy, ssh_key):
    vm = hongkong
    assert "not-installed" in node_side(vm, ssh_key) or "install ok" not in node_side(vm, ssh_key)
    assert root_out(vm, ssh_key, "test -d /run/systemd/system && echo systemd").strip() == "systemd"
    lan = new_lan("Bare VM")
    authorize(vm, ssh_key, lan.ssh_public_key)
    with real_worker():
        began = time.monotonic()
        node = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address,
                                    ssh_user="deploy")
        node = wait_settled(node, APT_WAIT)
        FIGURES["bare_vm_register_to_ready_with_apt_s"] = time.monotonic() - began
    assert node.state == NodeState.READY, f"{node.last_error}\n{runs(lan)}"
    assert node.ssh_host_key == vm.host_public_key()  # pinned on first contact, the key the VM was given

    # apt installed the package, through the lab's proxy (its log names the .deb it fetched).
    assert "install ok installed" in root_out(vm, ssh_key, "dpkg-query -W -f='${Status}' openvpn")
    proxy_log = "".join(p.read_text(errors="replace") for p in (apt_proxy.run_dir / "acng-log").glob("*.log"))
    assert re.search(r"openvpn_[^ ]*\.deb", proxy_log), proxy_log[-2000:]
    # OpenVPN runs as enabled systemd units.
    assert root_out(vm, ssh_key, f"systemctl is-active {' '.join(UNITS)}").split() == ["active", "active"]
    assert root_out(vm, ssh_key, f"systemctl is-enabled {' '.join(UNITS)}").split() == ["enabled", "enabled"]
    # Management answers and verify passes, through LanHub's own SSH door.
    with open_connection(node) as c:
        status = management.node_status(c)
        assert {"server/lanhub-udp", "server/lanhub-tcp"} <= set(status.ports), status.ports
        result = verify(c, wanted=["server/lanhub-udp", "server/lanhub-tcp"])
    assert result["openvpn_version"], result


def test_a_sudo_user_that_needs_a_password_is_refused_clearly_before_anything_changes(hongkong, ssh_key):
    vm = hongkong
    before = node_side(vm, ssh_key)
    lan = new_lan("Password sudo")
    authorize(vm, ssh_key, lan.ssh_public_key)
    with real_worker():
        node = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address,
                                    ssh_user="asker")
        node = wait_settled(node, 120)
    assert node.state == NodeState.FAILED, runs(lan)
    assert "asker cannot run commands as root without a password" in node.last_error, node.last_error
    assert "NOPASSWD" in node.last_error
    assert node_side(vm, ssh_key) == before


def test_after_a_reboot_openvpn_the_link_and_the_players_come_back_by_themselves(vm_lab, hongkong, ssh_key):
    vm, lab = hongkong, vm_lab
    lan = new_lan("Reboot")
    authorize(vm, ssh_key, lan.ssh_public_key)
    hz_host = lab.add_node("hangzhou")
    hz_host.authorize(lan.ssh_public_key)
    with real_worker(concurrency=2):
        services.create_node(lan=lan, name="hangzhou", region="asia/cn/east", public_address=hz_host.address)
        hk = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address)
        for node in Node.objects.filter(lan=lan):
            assert wait_settled(node, 300).state == NodeState.READY, runs(lan)
        invite = player_services.create_invite(lan=lan)
        alice = player_services.redeem_invite(token=invite.token, nickname="alice")
        bob = player_services.redeem_invite(token=invite.token, nickname="bob")
        alice_host, bob_host = lab.add_player("alice"), lab.add_player("bob")
        alice_host.start_openvpn(profile(alice, "hangzhou"))
        bob_host.start_openvpn(profile(bob, "hongkong"))
        alice_ip, bob_ip = alice_host.wait_for_tunnel(30), bob_host.wait_for_tunnel(60)
        wait_until(lambda: lab.ping(alice_host, bob_ip, timeout=2), timeout=60, what="alice -> bob before the reboot")
        assert lab.udp_roundtrip(alice_host, bob_host, bob_ip, 4447), "UDP alice -> bob lost"

        # Reboot Hong Kong from inside; LanHub does nothing.
        rebooted, rebooted_at = time.monotonic(), timezone.now()
        root_sh(vm, ssh_key, "systemctl reboot", timeout=15)
        assert vm.wait_for_ssh_down(120), "the VM did not go down"
        runs_before = SyncRun.objects.filter(node=hk).count()
        vm.wait_for_ssh(BOOT_WAIT)
        hz = Node.objects.get(lan=lan, name="hangzhou")
        hz_gateway = str(ipaddress.ip_network(hz.udp_pool).network_address + 1)
        wait_until(lambda: root_sh(vm, ssh_key, f"ping -n -c1 -W2 {hz_gateway}")[0] == 0, timeout=180, interval=2,
                   what="Hong Kong's link to Hangzhou after the reboot")
        # bob's client reconnects by itself: to Hong Kong, or to Hangzhou (his profile's fallback) while it was down.
        wait_until(lambda: lab.ping(alice_host, vpn_address(bob_host) or bob_ip, timeout=2), timeout=300, interval=2,
                   what=lambda: f"alice -> bob after the reboot; bob:\n{bob_host.log()[-2500:]}")
        FIGURES["reboot_to_lan_healed_s"] = time.monotonic() - rebooted
        assert SyncRun.objects.filter(node=hk).count() == runs_before, "LanHub synced: the VM did not heal alone"
        assert root_out(vm, ssh_key, f"systemctl is-active {' '.join(UNITS)}").split() == ["active", "active"]
        assert lab.udp_roundtrip(bob_host, alice_host, alice_ip, 4448), "UDP bob -> alice lost after the reboot"

        # The status poll shows the node back: it answers, its link is up, and bob is online again.
        def back():
            for node in Node.objects.filter(lan=lan):
                syncing.poll_status(node)  # what the periodic poll task runs, called here so none is left queued
            hk.refresh_from_db()
            link = Link.objects.get(lan=lan)
            bob_seen = VpnSession.objects.filter(player__nickname="bob", node__lan=lan, seen_at__gt=rebooted_at)
            return (hk.healthy and hk.last_seen_at and hk.last_seen_at > rebooted_at and link.state == LinkState.UP
                    and bob_seen.exists())

        wait_until(back, timeout=120, interval=1, what=lambda: (
            f"the status poll to show Hong Kong back: {Node.objects.filter(lan=lan).values_list('name', 'healthy', 'last_seen_at', 'last_error')} "
            f"links {list(Link.objects.filter(lan=lan).values_list('state', flat=True))}"))
    alice_host.stop_openvpn()
    bob_host.stop_openvpn()


def test_deleting_the_node_stops_and_disables_its_units_removes_lanhubs_files_and_revokes_it(hongkong, ssh_key):
    vm = hongkong
    lan = new_lan("Delete")
    authorize(vm, ssh_key, lan.ssh_public_key)
    with real_worker():
        node = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address)
        assert wait_settled(node, 300).state == NodeState.READY, runs(lan)
        player = player_services.redeem_invite(token=player_services.create_invite(lan=lan).token, nickname="carol")
        assert f"remote {vm.address} " in profile(player, "hongkong")
        assert root_out(vm, ssh_key, "ls /etc/openvpn/lanhub/pki").split()
        services.delete_node(node)

        def gone():
            _, out, _ = root_sh(vm, ssh_key, f"systemctl is-active {' '.join(UNITS)}; ls /etc/openvpn/server "
                                             "/etc/openvpn/client; test -e /etc/openvpn/lanhub && echo LANHUB-DIR")
            words = out.split()
            return "active" not in words and "LANHUB-DIR" not in words and not any(
                w.startswith("lanhub-") for w in words)
        wait_until(gone, timeout=120, interval=2, what=lambda: "the node's units and files to go:\n" + node_side(vm, ssh_key))
    status, enabled, _ = root_sh(vm, ssh_key, f"systemctl is-enabled {' '.join(UNITS)}")
    assert "enabled" not in enabled.split(), enabled
    leftovers = root_out(vm, ssh_key, "ls -d /etc/openvpn/lanhub /etc/openvpn/server/lanhub-* /etc/openvpn/client/lanhub-* "
                                      "/etc/sysctl.d/90-lanhub.conf 2>/dev/null; iptables -S | grep -i lanhub; true")
    assert leftovers.strip() == "", leftovers
    assert "install ok installed" in root_out(vm, ssh_key, "dpkg-query -W -f='${Status}' openvpn")  # the host's
    revoked = set(RevokedCertificate.objects.filter(lan=lan).values_list("common_name", flat=True))
    assert {"node-hongkong", "link-hongkong"} <= revoked
    # The player's page and new profiles no longer offer it.
    assert Client().get(f"/me/{player.token}/profile/hongkong.ovpn").status_code == 404
    assert vm.address not in Client().get(f"/me/{player.token}/").content.decode()


@pytest.mark.vm_extra
def test_a_server_rebuilt_at_the_same_address_stops_the_sync_with_both_fingerprints_and_uploads_nothing(
        hongkong, ssh_key):
    vm = hongkong
    lan = new_lan("Rebuilt")
    authorize(vm, ssh_key, lan.ssh_public_key)
    with real_worker():
        node = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address)
        assert wait_settled(node, 300).state == NodeState.READY, runs(lan)
        old = vm.host_key_fingerprint()
        # Rebuilt: a new disk from the image and a new host key, same address; the host pasted the key again.
        vm.stop()
        vm.host_key = labvm.HostKey.generate()
        vm.new_disk()
        vm.start()
        FIGURES["boot_to_ssh_again_s"] = vm.wait_for_ssh(BOOT_WAIT)
        authorize(vm, ssh_key, lan.ssh_public_key)
        services.request_sync(node, reason="sync after the rebuild")
        node = wait_settled(node, 120)
    run = SyncRun.objects.filter(node=node).order_by("-created_at").first()
    assert run.status == SyncStatus.FAILED, runs(lan)
    assert old in run.error and vm.host_key_fingerprint() in run.error and "Nothing was done" in run.error, run.error
    status, _, _ = root_sh(vm, ssh_key, "test -e /etc/openvpn/lanhub || ls /etc/openvpn/server/lanhub-* 2>/dev/null")
    assert status != 0, "something was uploaded to the rebuilt server"


@pytest.mark.vm_extra
def test_a_first_sync_whose_apt_step_fails_leaves_the_node_as_it_was_says_why_and_the_retry_succeeds(
        hongkong, apt_proxy, ssh_key):
    vm = hongkong  # bare again: rebuilt by the previous test
    before = node_side(vm, ssh_key)
    assert "install ok installed" not in before
    lan = new_lan("Apt fails")
    authorize(vm, ssh_key, lan.ssh_public_key)
    apt_proxy.stop()
    try:
        with real_worker():
            node = services.create_node(lan=lan, name="hongkong", region="asia/hk", public_address=vm.address)
            node = wait_settled(node, 300)
            assert node.state == NodeState.FAILED, runs(lan)
            assert "ensure_openvpn" in runs(lan) and re.search(r"apt|Failed to fetch|Could not connect",
                                                                 node.last_error), node.last_error
            assert node_side(vm, ssh_key) == before
            apt_proxy.start()
            services.request_sync(node, reason="retry once the proxy is back")
            node = wait_settled(node, APT_WAIT)
        assert node.state == NodeState.READY, runs(lan)
        assert root_out(vm, ssh_key, f"systemctl is-active {' '.join(UNITS)}").split() == ["active", "active"]
    finally:
        apt_proxy.start()


def profile(player: Player, node_name: str) -> str:
    response = Client().get(f"/me/{player.token}/profile/{node_name}.ovpn")
    assert response.status_code == 200, response.content[:300]
    return response.content.decode()


def vpn_address(player_host) -> str | None:
    out = player_host.exec(["ip", "-4", "-o", "addr", "show", "dev", "tun0"], check=False).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None
