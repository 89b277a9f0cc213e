"""The provisioning steps and the apply pipeline, on a real sshd + OpenVPN in a lab namespace.

Files are written by hand here (following OPENVPN-NOTES.md) rather than by nodes/render.py, so these tests pin
down what the steps do with any set of files; certificates come from lanhub/pki.py.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from lanhub import pki
from nodes import provisioning as p
from nodes import render
from nodes.render import RenderedFile
from nodes.ssh import ProvisioningError, open_connection
from tests.nodes.test_ssh import stand_in

pytestmark = pytest.mark.lab
PKI = "/etc/openvpn/lanhub/pki"
UDP = "server/lanhub-udp"
TCP = "server/lanhub-tcp"


File = RenderedFile  # the shape upload_files takes


@dataclass(frozen=True)
class Pki:
    ca: pki.Issued
    server: pki.Issued
    tls_crypt: str
    crl: str

    def client(self, name: str) -> pki.Issued:
        return pki.issue_client(ca=self.ca, common_name=name, now=datetime.now(timezone.utc))


def make_pki() -> Pki:
    now = datetime.now(timezone.utc)
    ca = pki.create_ca(name="lanhub-test-ca", now=now)
    return Pki(ca, pki.issue_server(ca=ca, common_name="node", now=now), pki.make_tls_crypt_key(),
               pki.make_crl(ca=ca, revoked=[], now=now, number=1))


def server_conf(*, transport: str = "udp", port: int = 1194, pool: str = "10.251.0.0", management: int = 7505,
                extra: str = "") -> str:
    name = f"lanhub-{transport}"
    return (f"dev lh-{transport}\ndev-type tun\nproto {'udp' if transport == 'udp' else 'tcp-server'}\nport {port}\n"
            f"topology subnet\nserver {pool} 255.255.0.0\n"
            f"ca {PKI}/ca.crt\ncert {PKI}/node.crt\nkey {PKI}/node.key\ndh none\ntls-crypt {PKI}/tls-crypt.key\n"
            f"crl-verify {PKI}/crl.pem\nmanagement 127.0.0.1 {management}\nstatus {p.RUN_DIR}/{name}.status 5\n"
            f"keepalive 10 60\ndisable-dco\nverb 3\n{extra}")


def node_files(material: Pki, *, udp: str | None = None, tcp: bool = False) -> dict[str, File]:
    files = [
        File(f"{PKI}/ca.crt", material.ca.cert_pem),
        File(f"{PKI}/node.crt", material.server.cert_pem),
        File(f"{PKI}/node.key", material.server.key_pem, 0o600),
        File(f"{PKI}/tls-crypt.key", material.tls_crypt, 0o600),
        File(f"{PKI}/crl.pem", material.crl),
        File("/etc/sysctl.d/90-lanhub.conf", "net.ipv4.ip_forward = 1\n"),
        render.render_firewall(SimpleNamespace(supernet="10.0.0.0/8")),  # the real one: -F, -I FORWARD 1
        File("/etc/openvpn/server/lanhub-udp.conf", udp or server_conf(), instance=UDP),
    ]
    if tcp:
        files.append(File("/etc/openvpn/server/lanhub-tcp.conf",
                          server_conf(transport="tcp", port=443, pool="10.250.0.0", management=7506), instance=TCP))
    return {f.path: f for f in files}


def client_profile(material: Pki, name: str, address: str, *, port: int = 1194, proto: str = "udp") -> str:
    client = material.client(name)
    return (f"client\ndev tun\nproto {proto}\nremote {address} {port}\nnobind\nremote-cert-tls server\n"
            f"disable-dco\nverb 3\nconnect-retry 1\n<ca>\n{material.ca.cert_pem}</ca>\n<cert>\n{client.cert_pem}"
            f"</cert>\n<key>\n{client.key_pem}</key>\n<tls-crypt>\n{material.tls_crypt}</tls-crypt>\n")


def node_file(host, path: str) -> bytes | None:
    """A file as the node sees it (its /etc/<x> is /etc/netns/<ns>/<x> on the lab host)."""
    local = host.etc_path(path.removeprefix("/etc/"))
    return local.read_bytes() if local.exists() else None


def remove_everything(c) -> None:
    """Leave the node as a fresh server: no lanhub instances, files, rules or forwarding."""
    p.ensure_instances(c, wanted=set())
    c.run("rm -rf /etc/openvpn/lanhub /etc/openvpn/server/* /etc/openvpn/client/* /etc/sysctl.d/90-lanhub.conf; "
          "iptables -D FORWARD -j LANHUB-FORWARD 2>/dev/null; iptables -F LANHUB-FORWARD 2>/dev/null; "
          "iptables -X LANHUB-FORWARD 2>/dev/null; sysctl -qw net.ipv4.ip_forward=0", hide=True)


@pytest.fixture(scope="module")
def material() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def host(lab, ssh_key):
    node = lab.add_node("prov")
    node.authorize(ssh_key.public_line)
    return node


@pytest.fixture
def c(host, ssh_key):
    """A connection to a node with nothing of LanHub on it; whatever the test starts is stopped afterwards."""
    with open_connection(stand_in(host, ssh_key)) as conn:
        remove_everything(conn)
        yield conn
        remove_everything(conn)


def test_check_os_names_a_debian_node(c):
    assert p.check_os(c).startswith("Debian GNU/Linux")


def test_check_os_refuses_a_system_without_apt_naming_it():
    # Fault injection: the lab nodes share the host's /etc/os-release, so another OS can't be had for real.
    fake = SimpleNamespace(run=lambda *a, **k: SimpleNamespace(
        stdout='NAME="Fedora Linux"\nID=fedora\nPRETTY_NAME="Fedora Linux 40 (Server Edition)"\n'))
    with pytest.raises(ProvisioningError) as caught:
        p.check_os(fake)
    assert caught.value.permanent and "Fedora Linux 40 (Server Edition)" in caught.value.message


def test_check_os_accepts_a_derivative_through_id_like():
    fake = SimpleNamespace(run=lambda *a, **k: SimpleNamespace(
        stdout='NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\nPRETTY_NAME="Linux Mint 22"\n'))
    assert p.check_os(fake) == "Linux Mint 22"


def test_openvpn_release_keeps_only_the_version_number():
    line = "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [LZ4] [EPOLL] [PKCS11] [MH/PKTINFO] [AEAD]"
    assert p.openvpn_release(line) == "2.6.14"
    assert p.openvpn_release("OpenVPN 2.7_rc2 x86_64-pc-linux-gnu") == "2.7_rc2"
    assert p.openvpn_release("bash: openvpn: command not found") == ""


def test_node_links_lists_the_links_a_node_runs_a_client_for():
    import ipaddress

    pools = {name: SimpleNamespace(udp=ipaddress.IPv4Network(net)) for name, net in
             (("hangzhou", "10.251.0.0/16"), ("hongkong", "10.249.0.0/16"), ("tokyo", "10.247.0.0/16"))}
    plan = SimpleNamespace(pools=pools, links=(SimpleNamespace(upstream="hangzhou", downstream="hongkong"),
                                               SimpleNamespace(upstream="hongkong", downstream="tokyo")))
    assert p.node_links(plan, "hongkong") == [
        p.NodeLink("hangzhou", "client/lanhub-link-hangzhou", render.link_device("hangzhou"), "10.251.0.1")]
    assert p.node_links(plan, "hangzhou") == []


def test_ensure_openvpn_leaves_an_installed_openvpn_alone(c):
    assert p.ensure_openvpn(c) is False


def test_upload_writes_only_what_differs_with_the_right_modes(c, host, material):
    files = node_files(material)
    first = p.upload_files(c, files)
    assert sorted(first.changed) == sorted(files)
    assert node_file(host, f"{PKI}/node.key") == material.server.key_pem.encode()
    assert oct(host.etc_path("openvpn/lanhub/pki/node.key").stat().st_mode & 0o777) == "0o600"
    assert oct(host.etc_path("openvpn/lanhub/pki/ca.crt").stat().st_mode & 0o777) == "0o644"
    assert p.upload_files(c, files).touched == []
    # A hand edit and a loosened key mode are both drift: exactly those two files go up again.
    host.etc_path("openvpn/server/lanhub-udp.conf").write_text("edited by hand\n")
    host.etc_path("openvpn/lanhub/pki/tls-crypt.key").chmod(0o644)
    assert sorted(p.upload_files(c, files).changed) == ["/etc/openvpn/lanhub/pki/tls-crypt.key",
                                                        "/etc/openvpn/server/lanhub-udp.conf"]
    assert not list(host.etc_path("openvpn/server").glob(".*lanhub-new"))  # no temporary files left


def test_upload_refuses_paths_outside_what_lanhub_manages(c):
    with pytest.raises(ProvisioningError) as caught:
        p.upload_files(c, {"/etc/passwd": File("/etc/passwd", "root::0:0::/:/bin/sh\n")})
    assert caught.value.permanent
    with pytest.raises(ProvisioningError):
        p.upload_files(c, {"/etc/openvpn/../passwd": File("/etc/openvpn/../passwd", "x")})


def test_rollback_restores_the_previous_files_byte_for_byte(c, host, material):
    before = node_files(material)
    p.upload_files(c, before)
    snapshot = {path: (node_file(host, path), host.etc_path(path[5:]).stat().st_mode) for path in before}
    after = dict(before)
    after[f"{PKI}/node.key"] = File(f"{PKI}/node.key", "new key\n", 0o600)
    ccd = "/etc/openvpn/server/ccd/player"
    after[ccd] = File(ccd, "ifconfig-push 10.251.0.9 255.255.0.0\n")
    del after["/etc/sysctl.d/90-lanhub.conf"]
    result = p.upload_files(c, after, remove={"/etc/sysctl.d/90-lanhub.conf"})
    assert result.removed == ["/etc/sysctl.d/90-lanhub.conf"]
    assert node_file(host, "/etc/sysctl.d/90-lanhub.conf") is None
    p.rollback(c, result)
    assert {path: (node_file(host, path), host.etc_path(path[5:]).stat().st_mode) for path in before} == snapshot
    assert node_file(host, "/etc/openvpn/server/ccd/player") is None  # created by the run, so gone again
    assert not host.etc_path("openvpn/lanhub/rollback").exists()


def test_ensure_forwarding_turns_it_on_and_loads_the_rules_once(c, host, material):
    p.upload_files(c, node_files(material))
    assert p.ensure_forwarding(c) is True
    assert p.ensure_forwarding(c) is False
    rules = host.exec(["iptables", "-S"]).stdout
    assert rules.count("-A FORWARD -j LANHUB-FORWARD") == 1 and rules.count("-A LANHUB-FORWARD -s 10.0.0.0/8") == 1
    assert host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_ensure_forwarding_says_so_when_there_are_no_rules(c):
    notes = []
    assert p.ensure_forwarding(c, note=notes.append) is True  # forwarding was off
    assert notes and "firewall.rules is missing" in notes[0]


def test_ensure_instances_starts_restarts_only_when_asked_and_stops_the_unwanted(c, host, material):
    p.upload_files(c, node_files(material, tcp=True))
    first = p.ensure_instances(c, wanted={UDP, TCP}, restart=set())
    assert sorted(first.started) == [TCP, UDP] and not first.restarted
    pid = int(node_file(host, f"{p.RUN_DIR}/lanhub-udp.pid"))
    assert p.ensure_instances(c, wanted={UDP, TCP}).changed is False
    again = p.ensure_instances(c, wanted={UDP, TCP}, restart={UDP})
    assert again.restarted == [UDP] and int(node_file(host, f"{p.RUN_DIR}/lanhub-udp.pid")) != pid
    p.upload_files(c, node_files(material), remove={"/etc/openvpn/server/lanhub-tcp.conf"})
    assert p.ensure_instances(c, wanted={UDP}).stopped == [TCP]
    assert not p.instance_running(c, TCP) and p.instance_running(c, UDP)


def test_apply_twice_the_second_run_uploads_nothing_and_restarts_nothing(c, host, material):
    files = node_files(material, tcp=True)
    steps = []
    began = time.monotonic()
    first = p.apply(c, files=files, wanted={UDP, TCP}, log=lambda *step: steps.append(step))
    first_seconds = time.monotonic() - began
    assert [s[0] for s in steps] == list(p.STEPS)
    assert sorted(first.instances.started) == [TCP, UDP] and len(first.changed) == len(files)
    assert first.verify["instances"][UDP] == {"running": True, "listening": True, "device_up": True}
    assert re.fullmatch(r"2\.\d+\.\d+", first.openvpn_version), first.openvpn_version
    steps.clear()
    began = time.monotonic()
    second = p.apply(c, files=files, wanted={UDP, TCP}, restart=lambda changed: {UDP, TCP} if changed else set(),
                     log=lambda *step: steps.append(step))
    second_seconds = time.monotonic() - began
    assert second.changed == [] and not second.instances.changed and not second.forwarding_changed
    assert [changed for _, _, changed in steps] == [False] * len(p.STEPS)
    print(f"\napply on a fresh lab node: {first_seconds:.2f}s; again with nothing changed: {second_seconds:.2f}s; "
          f"steps: {', '.join(f'{n} {s:.2f}s' for n, s, _ in first.steps)} / "
          f"{', '.join(f'{n} {s:.2f}s' for n, s, _ in second.steps)}")


def test_apply_restarts_an_instance_whose_config_changed(c, host, material):
    p.apply(c, files=node_files(material), wanted={UDP})
    changed = p.apply(c, files=node_files(material, udp=server_conf(extra="# tuned\n")), wanted={UDP})
    assert changed.changed == ["/etc/openvpn/server/lanhub-udp.conf"] and changed.restarted == [UDP]


def test_a_config_that_fails_to_start_is_rolled_back_and_the_previous_instance_runs_again(c, host, material):
    good = node_files(material)
    p.apply(c, files=good, wanted={UDP})
    snapshot = {path: node_file(host, path) for path in good}
    old_pid = int(node_file(host, f"{p.RUN_DIR}/lanhub-udp.pid"))
    # Valid options and existing files, so openvpn daemonizes; the certificate does not match the key, so it dies
    # while initialising, which only verify can see.
    broken = node_files(material, udp=server_conf().replace(f"{PKI}/node.crt", f"{PKI}/ca.crt"))
    with pytest.raises(ProvisioningError) as caught:
        p.apply(c, files=broken, wanted={UDP})
    error = caught.value
    assert error.step == "verify" and "server/lanhub-udp is not running" in error.message
    assert "key values mismatch" in error.message  # the tail of the instance's log says why
    assert "previous files were restored" in error.message
    assert {path: node_file(host, path) for path in good} == snapshot
    new_pid = int(node_file(host, f"{p.RUN_DIR}/lanhub-udp.pid"))
    assert new_pid != old_pid and p.instance_running(c, UDP)
    assert p.verify(c, wanted={UDP})["instances"][UDP]["listening"]


def test_an_options_error_fails_in_ensure_instances_and_is_rolled_back_too(c, host, material):
    good = node_files(material)
    p.apply(c, files=good, wanted={UDP})
    broken = node_files(material, udp=server_conf(extra="no-such-option yes\n"))
    with pytest.raises(ProvisioningError) as caught:
        p.apply(c, files=broken, wanted={UDP})
    assert caught.value.step == "ensure_instances" and "no-such-option" in caught.value.message
    conf = "/etc/openvpn/server/lanhub-udp.conf"
    assert node_file(host, conf) == good[conf].content.encode()
    assert p.instance_running(c, UDP)


def test_verify_names_a_link_that_does_not_answer_without_failing_the_node(c, material, monkeypatch):
    p.apply(c, files=node_files(material), wanted={UDP})
    monkeypatch.setattr("nodes.provisioning.verification.LINK_WAIT", 2)  # where verify reads it
    result = p.verify(c, wanted={UDP}, links=[("lh-udp", "10.251.0.77")])
    assert result["links"] == {"lh-udp": None}
    assert "lh-udp gets no answer from 10.251.0.77" in result["warnings"][0]


def test_a_player_connects_to_the_server_apply_started(c, lab, host, material):
    p.apply(c, files=node_files(material), wanted={UDP})
    player = lab.players.get("pv") or lab.add_player("pv")
    try:
        player.start_openvpn(client_profile(material, "pv", host.address))
        address = player.wait_for_tunnel()
        assert address.startswith("10.251.")
        assert p.ping_through(c, "lh-udp", address, wait=5) is not None
    finally:
        player.stop_openvpn()


def relay_files(*, peers=("10.249.0.1",), ports=((6112, 6112),), program_note: str = "") -> dict[str, File]:
    config = {"node": "hangzhou", "address": "10.251.0.1", "port": 7400, "peers": list(peers),
              "instances": [{"device": "lh-udp", "pool": "10.251.0.0/16",
                             "status": f"{p.RUN_DIR}/lanhub-udp.status"}],
              "ports": [list(r) for r in ports], "groups": [], "rate": {"packets": 20, "bytes": 32000}}
    program = render.render_relay_program()
    if program_note:  # a new release of the program
        program = File(program.path, program.content + f"# {program_note}\n", mode=program.mode)
    return {render.RELAY_PROGRAM: program, render.RELAY_CONFIG: File(render.RELAY_CONFIG, json.dumps(config))}


def relay_pid(host) -> int | None:
    text = node_file(host, f"{p.RUN_DIR}/lanhub-relay.pid")
    pid = int(text) if text else None
    return pid if pid in host.lab.pids(host.ns) else None


def test_ensure_relay_starts_it_reloads_a_changed_config_restarts_a_new_program_and_stops_it_when_unwanted(c, host):
    upload = p.upload_files(c, relay_files())
    first = p.ensure_relay(c, wanted=True, changed_files=upload.touched)
    assert first.started and not first.restarted
    pid = relay_pid(host)
    assert pid and p.relay_state(c) == (False, True)
    assert "7400" in host.exec(["ss", "-Hlnu"]).stdout  # bound to the UDP server's address even before it exists
    sched = open(f"/proc/{pid}/sched").read()  # asked for a short scheduler slice (kernels that show se.slice)
    assert "se.slice" not in sched or re.search(r"se\.slice\s+:\s+100000\b", sched), sched
    assert not p.ensure_relay(c, wanted=True).changed  # nothing changed: left alone
    # A node joins elsewhere in the LAN (one more peer) and a port is ticked: only relay.json changes, and the
    # same process re-reads it (SIGHUP) instead of restarting.
    upload = p.upload_files(c, relay_files(peers=("10.249.0.1", "10.247.0.1"), ports=((6112, 6112), (4445, 4445))))
    again = p.ensure_relay(c, wanted=True, changed_files=upload.touched)
    assert again.reloaded and not again.restarted and relay_pid(host) == pid
    log = f"{p.RUN_DIR}/lanhub-relay.log"
    deadline = time.monotonic() + 5
    while b"2 peers, 2 ports" not in (node_file(host, log) or b"") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"reloaded" in node_file(host, log) and b"2 peers, 2 ports" in node_file(host, log), node_file(host, log)
    upload = p.upload_files(c, relay_files(program_note="a new release"))  # a new program: a new process
    again = p.ensure_relay(c, wanted=True, changed_files=upload.touched)
    assert again.restarted and relay_pid(host) not in (None, pid)
    host.lab.kill_process(host, "lanhub-relay")  # what the drift check finds: not running, so it starts again
    assert p.ensure_relay(c, wanted=True).started and relay_pid(host)
    gone = p.ensure_relay(c, wanted=False)
    assert gone.stopped and relay_pid(host) is None and p.relay_state(c) == (False, False)


def test_the_relay_stops_itself_when_its_files_are_removed_with_the_node(c, host):
    upload = p.upload_files(c, relay_files())
    assert p.ensure_relay(c, wanted=True, changed_files=upload.touched).started and relay_pid(host)
    p.upload_files(c, {}, remove=list(render.RELAY_FILES))  # what deleting the node does to LanHub's files
    deadline = time.monotonic() + 10
    while relay_pid(host) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert relay_pid(host) is None
    assert p.relay_state(c) == (False, False)


def test_ensure_relay_reports_a_relay_that_cannot_start_with_its_log(c, host):
    files = relay_files()
    files[render.RELAY_CONFIG] = File(render.RELAY_CONFIG, '{"node": "x", "address": "not an address"}')
    p.upload_files(c, files)
    with pytest.raises(ProvisioningError) as raised:
        p.ensure_relay(c, wanted=True, changed_files=list(files))
    assert raised.value.step == "ensure_relay" and "bad config" in raised.value.message, raised.value.message
