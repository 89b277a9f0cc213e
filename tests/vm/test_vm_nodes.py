"""LanHub on real Debian 12 servers: QEMU virtual machines with systemd and apt (lab/vm.py).

Every test gets fresh VMs, clones restored from a saved state on the lab's node bridge (``make_vm``), and a LAN
of its own; nodes are registered through the node service the admin form calls, and synced by a real Celery
worker over SSH:

1. a bare VM (no openvpn) becomes ready: apt installs openvpn through the lab's proxy, the instances run as
   enabled systemd units, management answers, verify passes (as a NOPASSWD sudo user); the VM reaches nothing but
   the proxy;
2. and 3. two VMs, Hangzhou and Hong Kong, with players in namespaces on the same bridge: ping and UDP across both
   servers; then Hong Kong reboots (``systemctl reboot``) and, without LanHub doing anything, OpenVPN comes back
   from systemd, the link to Hangzhou and the players reconnect, and the status poll shows the node back;
4. deleting the node stops and disables its units, removes LanHub's files and revokes its certificates;
5. a sudo user who needs a password is refused before anything on the node changes;
6. the VM rebuilt at the same address (new disk, new host key): the sync stops with both fingerprints and uploads
   nothing;
7. on a bare VM, a first sync whose apt step fails (proxy stopped) leaves the node as it was and says why, and the
   retry succeeds.

The VMs of 1, 5 and 7 are clones of the image without openvpn (the apt installs of 1 and 7 are real); the others
are clones of the image with openvpn and python3 preloaded. make test and CI run 1-6; 7 (marker ``vm_extra``, a
second real apt install, about two minutes here) runs from ``make test-vm``, which runs them all.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
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
from tests.lab_helpers import connect_node, describe_runs, ssh_run, vpn_address, wait_until
from tests.vm.conftest import FIGURES

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]

UNITS = ("openvpn-server@lanhub-udp", "openvpn-server@lanhub-tcp")
BOOT_WAIT = 420  # seconds; a cold boot under TCG takes 15-45 s on a 2-core machine, far more when it is busy
APT_WAIT = 600
BOOTED = "ready for sshd (boot)"  # what lanhub-lab-init writes on the console at each boot (not after a restore)
RESTARTING = "Restarting system"  # the kernel's last words before a reboot
SYNC_WAIT = 300


def settled(node: Node) -> Node | None:
    node.refresh_from_db()
    busy = SyncRun.objects.filter(node=node, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).exists()
    return None if busy or node.state in (NodeState.NEW, NodeState.PROVISIONING) else node


def wait_settled(node: Node, timeout: float) -> Node:
    return wait_until(lambda: settled(node), timeout=timeout, interval=0.5,
                      what=lambda: f"{node.name} to settle:\n{describe_runs(node.lan)}")


def root_sh(vm, ssh_key, command: str, timeout: float = 60) -> tuple[int, str, str]:
    with connect_node(vm, ssh_key) as client:
        return ssh_run(client, command, timeout=timeout)


def root_out(vm, ssh_key, command: str, timeout: float = 60) -> str:
    status, out, err = root_sh(vm, ssh_key, command, timeout)
    assert status == 0, f"{command!r} on {vm.name}: exit {status}: {err}"
    return out


def authorize(vm, ssh_key, key_line: str) -> None:
    """What a host does by hand: paste the LAN's deploy key for root and for the deploy users."""
    line = key_line.strip()
    root_out(vm, ssh_key, f"for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do "
                          f"[ -e \"$f\" ] || continue; grep -qxF '{line}' \"$f\" || echo '{line}' >> \"$f\"; done")


def node_side(vm, ssh_key) -> str:
    """What LanHub could have changed on the node: its files (with hashes; not the run directory, where running
    instances write status and address-pool files), the openvpn package, its units."""
    return root_out(vm, ssh_key, "find /etc/openvpn /etc/sysctl.d /etc/systemd/system -type f "
                                 "-not -path '/etc/openvpn/lanhub/run/*' 2>/dev/null | sort | xargs -r sha256sum; "
                                 "echo @@; dpkg-query -W -f='${Status}\\n' openvpn 2>/dev/null; echo @@; "
                                 "systemctl list-units --all --plain --no-legend 'openvpn*' 'lanhub*' "
                                 "| awk '{print $1, $3}'; ls /etc/systemd/system/*.wants/; true")


def node_files(vm, ssh_key) -> str:
    """The files part of ``node_side``: what must be back as it was once LanHub has gone."""
    return node_side(vm, ssh_key).split("@@", 1)[0]


def new_lan(name: str):
    owner = get_user_model().objects.create_user(f"host-{name.lower().replace(' ', '-')}", password="host-password")
    return services.create_lan(owner=owner, name=name, topology_mode="hub")


def register(lan, vm, ssh_key, name: str, region: str, **fields) -> Node:
    """The host pastes the LAN's deploy key on the server, then adds the node (the admin form's service)."""
    authorize(vm, ssh_key, lan.ssh_public_key)
    return services.create_node(lan=lan, name=name, region=region, public_address=vm.address, **fields)


def units_active(vm, ssh_key) -> list[str]:
    return root_out(vm, ssh_key, f"systemctl is-active {' '.join(UNITS)}; true").split()


def profile(player: Player, node_name: str) -> str:
    response = Client().get(f"/me/{player.token}/profile/{node_name}.ovpn")
    assert response.status_code == 200, response.content[:300]
    return response.content.decode()


def host_gateway() -> str | None:
    """This machine's own default gateway: outside the lab, so a VM must not reach it."""
    match = re.search(r"default via (\S+)", subprocess.run(["ip", "-4", "route", "show", "default"],
                                                           capture_output=True, text=True, timeout=10).stdout)
    return match.group(1) if match else None


def test_a_bare_vm_registered_through_the_node_service_gets_openvpn_from_apt_and_runs_enabled_systemd_units(
        make_vm, apt_proxy, ssh_key):
    vm = make_vm("hongkong", layer="base", users={"deploy": "nopasswd"})
    assert "install ok installed" not in node_side(vm, ssh_key)
    assert root_out(vm, ssh_key, "test -d /run/systemd/system && echo systemd").strip() == "systemd"
    lan = new_lan("Bare VM")
    with real_worker():
        began = time.monotonic()
        node = register(lan, vm, ssh_key, "hongkong", "asia/hk", ssh_user="deploy")
        node = wait_settled(node, APT_WAIT)
        FIGURES["bare_vm_register_to_ready_with_apt_s"] = time.monotonic() - began
    assert node.state == NodeState.READY, f"{node.last_error}\n{describe_runs(lan)}"
    assert node.ssh_host_key == vm.host_public_key()  # pinned on first contact, the key the VM was given

    # apt installed the packages, through the lab's proxy (its log names the .deb it served).
    assert "install ok installed" in root_out(vm, ssh_key, "dpkg-query -W -f='${Status}' openvpn")
    proxy_log = "".join(p.read_text(errors="replace") for p in (apt_proxy.run_dir / "acng-log").glob("*.log"))
    assert re.search(r"openvpn_[^ ]*\.deb", proxy_log), proxy_log[-2000:]
    # OpenVPN runs as enabled systemd units, and so does the discovery relay.
    assert units_active(vm, ssh_key) == ["active", "active"]
    assert root_out(vm, ssh_key, f"systemctl is-enabled {' '.join(UNITS)}").split() == ["enabled", "enabled"]
    assert root_out(vm, ssh_key, "systemctl is-active lanhub-relay.service").strip() == "active"
    # Management answers and verify passes, through LanHub's own SSH door.
    with open_connection(node) as c:
        status = management.node_status(c)
        assert {"server/lanhub-udp", "server/lanhub-tcp"} <= set(status.ports), status.ports
        result = verify(c, wanted=["server/lanhub-udp", "server/lanhub-tcp"])
    assert result["openvpn_version"], result
    # The proxy was the VM's only way out: this machine's own gateway does not answer it.
    gateway = host_gateway()
    if gateway:
        assert root_sh(vm, ssh_key, f"ping -n -c1 -W2 {gateway}")[0] != 0, f"the VM reached {gateway}"


def test_two_vms_carry_players_across_both_servers_and_a_reboot_heals_by_itself(vm_lab, make_vm, ssh_key):
    lab = vm_lab
    hz_vm, hk_vm = make_vm("hangzhou"), make_vm("hongkong")
    lan = new_lan("Two VMs")
    with real_worker(concurrency=2):
        register(lan, hz_vm, ssh_key, "hangzhou", "asia/cn/east")
        hk = register(lan, hk_vm, ssh_key, "hongkong", "asia/hk")
        for node in Node.objects.filter(lan=lan):
            assert wait_settled(node, SYNC_WAIT).state == NodeState.READY, describe_runs(lan)
        invite = player_services.create_invite(lan=lan)
        alice = player_services.redeem_invite(token=invite.token, nickname="alice")
        bob = player_services.redeem_invite(token=invite.token, nickname="bob")
        alice_host, bob_host = lab.add_player("alice"), lab.add_player("bob")
        alice_host.start_openvpn(profile(alice, "hangzhou"))
        bob_host.start_openvpn(profile(bob, "hongkong"))
        alice_ip, bob_ip = alice_host.wait_for_tunnel(60), bob_host.wait_for_tunnel(60)
        # 2. Across both servers: alice (Hangzhou) <-> bob (Hong Kong), ping and UDP both ways.
        wait_until(lambda: lab.ping(alice_host, bob_ip, timeout=2), timeout=60, interval=1,
                   what="alice -> bob across Hangzhou and Hong Kong")
        assert lab.ping(bob_host, alice_ip, timeout=2), "bob -> alice lost"
        assert lab.udp_roundtrip(alice_host, bob_host, bob_ip, 4447), "UDP alice -> bob lost"
        assert lab.udp_roundtrip(bob_host, alice_host, alice_ip, 4446), "UDP bob -> alice lost"
        for vm in (hz_vm, hk_vm):
            assert units_active(vm, ssh_key) == ["active", "active"], vm.name

        # 3. Reboot Hong Kong from inside; LanHub does nothing.
        rebooted, rebooted_at = time.monotonic(), timezone.now()
        runs_before = SyncRun.objects.filter(node=hk).count()
        boots = hk_vm.console_count(BOOTED)
        restarts = hk_vm.console_count(RESTARTING)
        root_sh(hk_vm, ssh_key, "systemctl reboot", timeout=15)
        down = {}

        def booted_again():
            if "at" not in down and hk_vm.console_count(RESTARTING) > restarts:
                down["at"] = time.monotonic()
            return hk_vm.console_count(BOOTED) > boots

        wait_until(booted_again, timeout=BOOT_WAIT, interval=0.5,
                   what=lambda: f"Hong Kong to boot again; console:\n{hk_vm.console()}")
        hk_vm.wait_for_ssh(BOOT_WAIT)
        FIGURES["cold_boot_to_ssh_s"] = time.monotonic() - down.get("at", rebooted)
        hz = Node.objects.get(lan=lan, name="hangzhou")
        hz_gateway = str(ipaddress.ip_network(hz.udp_pool).network_address + 1)
        wait_until(lambda: root_sh(hk_vm, ssh_key, f"ping -n -c1 -W2 {hz_gateway}")[0] == 0, timeout=180,
                   interval=2, what="Hong Kong's link to Hangzhou after the reboot")
        # bob's client reconnects by itself: to Hong Kong, or to Hangzhou (his profile's fallback) while it was down.
        wait_until(lambda: lab.ping(alice_host, vpn_address(bob_host) or bob_ip, timeout=2), timeout=300,
                   interval=2, what=lambda: f"alice -> bob after the reboot; bob:\n{bob_host.log()[-2500:]}")
        FIGURES["reboot_to_lan_healed_s"] = time.monotonic() - rebooted
        assert SyncRun.objects.filter(node=hk).count() == runs_before, "LanHub synced: the VM did not heal alone"
        assert units_active(hk_vm, ssh_key) == ["active", "active"]
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
            "the status poll to show Hong Kong back: "
            f"{list(Node.objects.filter(lan=lan).values_list('name', 'healthy', 'last_seen_at', 'last_error'))} "
            f"links {list(Link.objects.filter(lan=lan).values_list('state', flat=True))}"))
    alice_host.stop_openvpn()
    bob_host.stop_openvpn()


def test_deleting_the_node_stops_and_disables_its_units_removes_lanhubs_files_and_revokes_it(make_vm, ssh_key):
    vm = make_vm("hongkong")
    before = node_files(vm, ssh_key)
    lan = new_lan("Delete")
    with real_worker():
        node = register(lan, vm, ssh_key, "hongkong", "asia/hk")
        assert wait_settled(node, SYNC_WAIT).state == NodeState.READY, describe_runs(lan)
        player = player_services.redeem_invite(token=player_services.create_invite(lan=lan).token, nickname="carol")
        assert f"remote {vm.address} " in profile(player, "hongkong")
        assert root_out(vm, ssh_key, "ls /etc/openvpn/lanhub/pki").split()
        assert root_out(vm, ssh_key, "systemctl is-active lanhub-relay.service").strip() == "active"
        problem = services.delete_node(node)
    assert problem == "", problem
    assert "active" not in units_active(vm, ssh_key)
    _, enabled, _ = root_sh(vm, ssh_key, f"systemctl is-enabled {' '.join(UNITS)} lanhub-relay.service")
    assert "enabled" not in enabled.split(), enabled
    leftovers = root_out(vm, ssh_key, "ls -d /etc/openvpn/lanhub /etc/openvpn/server/lanhub-* "
                                      "/etc/openvpn/client/lanhub-* /etc/sysctl.d/90-lanhub.conf "
                                      "/etc/systemd/system/lanhub-relay.service 2>/dev/null; "
                                      "iptables -S | grep -i lanhub; pgrep -ax openvpn; "
                                      "pgrep -af 'lanhub-relay[.]py'; true")
    assert leftovers.strip() == "", leftovers
    assert "install ok installed" in root_out(vm, ssh_key, "dpkg-query -W -f='${Status}' openvpn")  # the host's
    assert node_files(vm, ssh_key) == before, "LanHub's files are not all gone"
    revoked = set(RevokedCertificate.objects.filter(lan=lan).values_list("common_name", flat=True))
    assert {"node-hongkong", "link-hongkong"} <= revoked
    # The player's page and new profiles no longer offer it.
    assert Client().get(f"/me/{player.token}/profile/hongkong.ovpn").status_code == 404
    assert vm.address not in Client().get(f"/me/{player.token}/").content.decode()


def test_a_sudo_user_that_needs_a_password_is_refused_clearly_before_anything_changes(make_vm, ssh_key):
    vm = make_vm("hongkong", layer="base", users={"asker": "password"})
    before = node_side(vm, ssh_key)
    lan = new_lan("Password sudo")
    with real_worker():
        node = wait_settled(register(lan, vm, ssh_key, "hongkong", "asia/hk", ssh_user="asker"), 120)
    assert node.state == NodeState.FAILED, describe_runs(lan)
    assert "asker cannot run commands as root without a password" in node.last_error, node.last_error
    assert "NOPASSWD" in node.last_error
    assert node_side(vm, ssh_key) == before


def test_a_server_rebuilt_at_the_same_address_stops_the_sync_with_both_fingerprints_and_uploads_nothing(
        make_vm, ssh_key):
    vm = make_vm("hongkong")
    lan = new_lan("Rebuilt")
    with real_worker():
        node = register(lan, vm, ssh_key, "hongkong", "asia/hk")
        assert wait_settled(node, SYNC_WAIT).state == NodeState.READY, describe_runs(lan)
        old = vm.host_key_fingerprint()
        # Rebuilt: a new disk and a new host key at the same address; the host pasted the deploy key again.
        vm.stop()
        vm.host_key = labvm.HostKey.generate()
        vm.new_disk()
        vm.start()
        vm.wait_for_ssh(60)
        assert vm.host_key_fingerprint() != old
        authorize(vm, ssh_key, lan.ssh_public_key)
        before = node_side(vm, ssh_key)
        services.request_sync(node, reason="sync after the rebuild")
        node = wait_settled(node, 120)
    run = SyncRun.objects.filter(node=node).order_by("-created_at").first()
    assert run.status == SyncStatus.FAILED, describe_runs(lan)
    assert old in run.error and vm.host_key_fingerprint() in run.error and "Nothing was done" in run.error, run.error
    assert node_side(vm, ssh_key) == before, "the sync changed the rebuilt server"
    status, _, _ = root_sh(vm, ssh_key, "test -e /etc/openvpn/lanhub || ls /etc/openvpn/server/lanhub-* 2>/dev/null")
    assert status != 0, "something was uploaded to the rebuilt server"


@pytest.mark.vm_extra
def test_a_first_sync_whose_apt_step_fails_leaves_the_node_as_it_was_says_why_and_the_retry_succeeds(
        make_vm, apt_proxy, ssh_key):
    vm = make_vm("hongkong", layer="base")
    before = node_side(vm, ssh_key)
    assert "install ok installed" not in before
    lan = new_lan("Apt fails")
    apt_proxy.stop()
    try:
        with real_worker():
            node = wait_settled(register(lan, vm, ssh_key, "hongkong", "asia/hk"), SYNC_WAIT)
            assert node.state == NodeState.FAILED, describe_runs(lan)
            assert "ensure_openvpn" in describe_runs(lan), describe_runs(lan)
            assert re.search(r"apt|Failed to fetch|Could not connect|Unable to (locate|fetch)", node.last_error), \
                node.last_error
            assert node_side(vm, ssh_key) == before, "the failed first sync changed the node"
            apt_proxy.start()
            services.request_sync(node, reason="retry once the proxy is back")
            node = wait_settled(node, APT_WAIT)
        assert node.state == NodeState.READY, describe_runs(lan)
        assert units_active(vm, ssh_key) == ["active", "active"]
    finally:
        apt_proxy.start()
