"""Provisioning as a non-root login with passwordless sudo (``run_root``'s ``sudo -n -- sh -c`` path), for real.

The lab node has its own /etc/{passwd,shadow,group,sudoers.d} (see ``Lab.add_node(user=...)``): "deploy" exists and
may sudo only on that node, "guest" exists without sudo rights on another; the host's accounts are never touched.
File material and checks come from test_provisioning.py, so both paths are held to the same expectations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodes import provisioning as p
from nodes.ssh import ProvisioningError, is_root, open_connection, run_root
from tests.lab_helpers import lab_required
from tests.nodes.test_provisioning import (
    PKI,
    TCP,
    UDP,
    client_profile,
    make_pki,
    node_file,
    node_files,
    remove_everything,
    server_conf,
)
from tests.nodes.test_ssh import stand_in

pytestmark = pytest.mark.lab


def require_sudo() -> None:
    if Path("/etc/sudoers.d").is_dir() and os.access("/usr/bin/sudo", os.X_OK):
        return
    reason = "sudo is not installed on the host (scripts/bootstrap.sh test installs it)"
    if lab_required():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def as_user(host, key):
    """What open_connection reads from a Node whose ssh_user is the lab node's non-root user."""
    return SimpleNamespace(**{**vars(stand_in(host, key)), "ssh_user": host.user})


def host_accounts() -> dict[str, bytes]:
    return {name: Path(f"/etc/{name}").read_bytes() for name in ("passwd", "shadow", "group")}


@pytest.fixture(scope="module")
def material():
    return make_pki()


@pytest.fixture(scope="module")
def accounts_before():
    return host_accounts()


@pytest.fixture(scope="module")
def host(lab, ssh_key, accounts_before):
    require_sudo()
    node = lab.add_node("sudo", user="deploy")
    node.authorize(ssh_key.public_line)
    return node


@pytest.fixture(scope="module")
def nosudo(lab, ssh_key, accounts_before):
    require_sudo()
    node = lab.add_node("nosudo", user="guest", sudo=False)
    node.authorize(ssh_key.public_line)
    return node


@pytest.fixture
def c(host, ssh_key):
    """A connection as deploy to a node with nothing of LanHub on it; cleaned as root before and after."""
    with open_connection(stand_in(host, ssh_key)) as root:
        remove_everything(root)
        with open_connection(as_user(host, ssh_key)) as conn:
            yield conn
        remove_everything(root)


def test_the_user_exists_only_in_the_nodes_etc_view(host, nosudo, accounts_before):
    assert host_accounts() == accounts_before  # passwd, shadow and group of the host are byte for byte as before
    assert "deploy:" not in accounts_before["passwd"].decode() and "guest:" not in accounts_before["passwd"].decode()
    assert not any(path.name.startswith("lanhub-") for path in Path("/etc/sudoers.d").iterdir())
    assert "deploy:x:" in host.exec(["getent", "passwd", "deploy"]).stdout
    assert host.exec(["getent", "passwd", "guest"], check=False).returncode != 0  # each node has only its own
    grant = host.etc_path("sudoers.d/lanhub-deploy")
    assert grant.stat().st_uid == 0 and oct(grant.stat().st_mode & 0o777) == "0o440"
    assert list(nosudo.etc_path("sudoers.d").iterdir()) == []


def test_deploy_logs_in_as_itself_and_becomes_root_only_through_sudo(c):
    assert not is_root(c)
    assert c.run("id -un", hide=True).stdout.strip() == "deploy"
    assert c.run("id -u", hide=True).stdout.strip() != "0"
    assert c.run("pwd", hide=True).stdout.strip() == "/etc/ssh/lanhub-home/deploy"  # sshd found the home
    assert run_root(c, "id -u", hide=True).stdout.strip() == "0"
    # The whole line runs as root, not just its first word (why run_root is not c.sudo).
    assert run_root(c, "id -u | cat && id -un", hide=True).stdout.split() == ["0", "root"]


def test_apply_as_deploy_writes_root_owned_files_runs_its_instances_and_is_idempotent(c, lab, host,
                                                                                      material):
    files = node_files(material, tcp=True)
    host_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    first = p.apply(c, files=files, wanted={UDP, TCP})
    assert sorted(first.changed) == sorted(files)
    assert sorted(first.instances.started) == [TCP, UDP]
    assert first.verify["instances"][UDP] == {"running": True, "listening": True, "device_up": True}
    for path, wanted in files.items():
        stat = host.etc_path(path.removeprefix("/etc/")).stat()
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, 0, wanted.mode), path
        assert node_file(host, path) == wanted.content.encode()
    assert oct(host.etc_path("openvpn/lanhub/pki/node.key").stat().st_mode & 0o777) == "0o600"
    assert not list(host.etc_path("openvpn").rglob("*.lanhub-new"))
    assert not host.etc_path("openvpn/lanhub/rollback").exists()
    uid = int(c.run("id -u", hide=True).stdout)
    assert not [entry for entry in Path("/tmp").iterdir() if entry.lstat().st_uid == uid]  # staging dir removed
    for instance in (UDP, TCP):
        pid = int(node_file(host, f"{p.RUN_DIR}/{instance.split('/')[1]}.pid"))
        assert pid in lab.pids(host)
        assert Path(f"/proc/{pid}/status").read_text().split("\nUid:\t", 1)[1].startswith("0\t")  # runs as root
    assert host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forwarding  # only the node's namespace
    assert "-A FORWARD -j LANHUB-FORWARD" in host.exec(["iptables", "-S"]).stdout

    steps = []
    second = p.apply(c, files=files, wanted={UDP, TCP}, restart=lambda changed: {UDP, TCP} if changed else set(),
                     log=lambda *step: steps.append(step))
    assert second.changed == [] and not second.instances.changed and not second.forwarding_changed
    assert [changed for _, _, changed in steps] == [False] * len(p.STEPS)


def test_a_failed_apply_as_deploy_is_rolled_back_through_sudo(c, host, material):
    good = node_files(material)
    p.apply(c, files=good, wanted={UDP})
    broken = node_files(material, udp=server_conf(extra="no-such-option yes\n"))
    with pytest.raises(ProvisioningError) as caught:
        p.apply(c, files=broken, wanted={UDP})
    assert caught.value.step == "ensure_instances" and "previous files were restored" in caught.value.message
    conf = "/etc/openvpn/server/lanhub-udp.conf"
    assert node_file(host, conf) == good[conf].content.encode()
    assert host.etc_path(conf[5:]).stat().st_uid == 0
    assert p.instance_running(c, UDP)


def test_a_player_connects_and_ping_through_works_as_deploy(c, lab, host, material):
    p.apply(c, files=node_files(material), wanted={UDP})
    player = lab.players.get("ps") or lab.add_player("ps")
    try:
        player.start_openvpn(client_profile(material, "ps", host.address))
        address = player.wait_for_tunnel()
        assert p.ping_through(c, "lh-udp", address, wait=5) is not None
    finally:
        player.stop_openvpn()


def test_a_user_without_sudo_rights_gets_a_clear_error_at_once_and_nothing_changes(nosudo, ssh_key,
                                                                                    material):
    with open_connection(as_user(nosudo, ssh_key)) as conn:
        assert conn.run("id -un", hide=True).stdout.strip() == "guest"
        began = time.monotonic()
        with pytest.raises(ProvisioningError) as caught:
            p.apply(conn, files=node_files(material), wanted={UDP})
        seconds = time.monotonic() - began
    error = caught.value
    assert seconds < 10, f"took {seconds:.1f}s: sudo -n must fail, not wait for a password"
    # Named as the sudo problem it is (not as a failed `apt-get install openvpn`), and not worth retrying.
    assert error.step == "ensure_openvpn" and error.permanent, error
    assert error.message.startswith("guest cannot run commands as root without a password (sudo: a password is "
                                    "required)") and "NOPASSWD" in error.message and "apt-get" not in error.message
    assert not nosudo.etc_path("openvpn/lanhub").exists() and not nosudo.etc_path(PKI[5:]).exists()

