"""The management interface of a real OpenVPN server (started by ensure_instances) with a real player connected."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from nodes import provisioning as p
from nodes.ssh import ProvisioningError, open_connection
from nodes import openvpn_mgmt as management
from nodes.layout import MANAGEMENT_PASSWORD_FILE as PASSWORD_FILE
from tests.nodes.test_provisioning import TCP, UDP, File, client_profile, make_pki, node_files, remove_everything
from tests.nodes.test_ssh import stand_in

pytestmark = pytest.mark.lab




@pytest.fixture(scope="module")
def online(lab, ssh_key):
    """A node running the UDP and TCP servers, and player "bob" connected to the UDP one."""
    host = lab.add_node("mgmt")
    host.authorize(ssh_key.public_line)
    player = lab.add_player("bob")
    material = make_pki()
    files = node_files(material, tcp=True)
    # The TCP instance's interface asks for a password, as LanHub's rendered configs do; the UDP one has none
    # (an older config), so both greetings are covered.
    tcp = files["/etc/openvpn/server/lanhub-tcp.conf"]
    files[tcp.path] = File(tcp.path, tcp.content.replace("management 127.0.0.1 7506",
                                                         f"management 127.0.0.1 7506 {PASSWORD_FILE}"), instance=TCP)
    files[PASSWORD_FILE] = File(PASSWORD_FILE, "s3cret-management-password\n", 0o600)
    with open_connection(stand_in(host, ssh_key)) as c:
        remove_everything(c)
        p.upload_files(c, files)
        p.ensure_instances(c, wanted={UDP, TCP})
        p.verify(c, wanted={UDP, TCP})
    player.start_openvpn(client_profile(material, "bob", host.address))
    address = player.wait_for_tunnel()
    yield {"host": host, "player": player, "address": address, "material": material}
    player.stop_openvpn()
    with open_connection(stand_in(host, ssh_key)) as c:
        remove_everything(c)


@pytest.fixture
def c(online, ssh_key):
    with open_connection(stand_in(online["host"], ssh_key)) as conn:
        yield conn


def test_instance_ports_come_from_the_management_lines_of_the_configs(c):
    assert management.instance_ports(c) == {UDP: 7505, TCP: 7506}


def test_read_status_lists_the_connected_player(c, online):
    rows = management.read_status(c, 7505, instance=UDP)
    assert [row.common_name for row in rows] == ["bob"]
    bob = rows[0]
    assert bob.vpn_address == online["address"] and bob.instance == UDP
    assert bob.real_address.startswith(online["player"].address + ":")
    assert bob.bytes_in > 0 and bob.bytes_out > 0
    assert timedelta(0) <= datetime.now(timezone.utc) - bob.connected_since < timedelta(minutes=5)
    assert management.read_status(c, 7506) == []  # nobody on TCP


def test_link_rtt_pings_through_a_tunnel_device(c, online):
    assert management.link_rtt(c, "lh-udp", online["address"]) > 0
    assert management.link_rtt(c, "lh-udp", "10.251.0.250") is None


def test_a_port_where_nothing_listens_is_a_clear_error(c):
    with pytest.raises(ProvisioningError) as caught:
        management.read_status(c, 7599)
    assert caught.value.step == "management" and "7599" in caught.value.message


def test_kill_client_disconnects_the_player_and_counts_what_it_killed(c, online):
    assert management.kill_client(c, 7505, "nobody") == 0
    assert management.kill_client(c, 7505, "bob") == 1
    assert [r.common_name for r in management.read_status(c, 7505)] == []
    with pytest.raises(ValueError):
        management.kill_client(c, 7505, "bob\nsignal SIGTERM")  # would be a second command


def test_node_status_collects_every_server_and_kill_clients_disconnects_the_revoked(c, online):
    online["player"].start_openvpn(client_profile(online["material"], "bob", online["host"].address))
    online["player"].wait_for_tunnel()
    link = SimpleNamespace(upstream="hangzhou", device="lh-udp", peer=online["address"])  # any tunnel will do
    status = management.node_status(c, links=[link])
    assert [(r.instance, r.common_name) for r in status.clients] == [(UDP, "bob")]
    assert status.links["hangzhou"][0] is True
    assert management.kill_clients(c, status, {"carol"}) == 0
    assert management.kill_clients(c, status, {"bob", "carol"}) == 1



def test_a_password_protected_interface_is_read_with_the_nodes_password_file(c):
    assert management.read_status(c, 7506) == []  # answered only after the password
    c._lanhub_management_password = "wrong"
    with pytest.raises(ProvisioningError) as caught:
        management.read_status(c, 7506)
    assert caught.value.step == "management"  # never an answer to a command


def test_a_held_stream_waits_for_a_command_answer_instead_of_spinning(c):
    # The watcher reads events with idle=0 (a non-blocking channel) and then reads the client list on the same
    # channel: that read must sleep until OpenVPN answers, not busy-loop on an empty channel.
    import time

    stream = management.ClientStream(c, 7505, instance=UDP)
    try:
        assert [row.common_name for row in stream.open()] == ["bob"]
        list(stream.events(idle=0))
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(20):
            list(stream.events(idle=0))
            assert [row.common_name for row in stream.client_list()] == ["bob"]
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        assert cpu < 0.5 * wall, f"{cpu * 1000:.1f} ms of CPU in {wall * 1000:.1f} ms reading 20 client lists"
    finally:
        stream.close()
