"""open_connection against real sshd instances in lab namespaces: pinning, first contact and failures.

Most tests use ``stand_in(...)``, an object with a Node's SSH attributes, so they need no database; one test runs
through a real Node row to prove the model's fields are what open_connection reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import paramiko
import pytest

from lanhub import pki
from lanhub.secrets import seal
from nodes.ssh import ProvisioningError, open_connection, run_root

pytestmark = pytest.mark.lab


def stand_in(host, key, *, host_key: str | None = None, port: int = 22, address: str | None = None):
    """What open_connection reads from a Node, for lab host ``host`` and deploy key ``key`` (an SshKey)."""
    return SimpleNamespace(
        name=host.name, ssh_host=address or host.address, ssh_port=port, ssh_user="root",
        ssh_host_key=host.host_public_key() if host_key is None else host_key,
        lan=SimpleNamespace(ssh_private_key_sealed=seal(key.private_openssh)),
    )


@pytest.fixture(scope="module")
def server(lab, ssh_key):
    host = lab.add_node("sshnode")
    host.authorize(ssh_key.public_line)
    return host


def accepted_logins(host) -> int:
    return host.sshd_log().count("Accepted publickey")


def test_it_runs_commands_on_a_node_whose_host_key_is_pinned(server, ssh_key):
    with open_connection(stand_in(server, ssh_key)) as c:
        assert c.run("echo hello", hide=True).stdout == "hello\n"
        assert run_root(c, "id -u", hide=True).stdout.strip() == "0"
    assert not c.is_connected


def test_first_contact_pins_the_presented_key_after_logging_in(server, ssh_key):
    pinned = []
    with open_connection(stand_in(server, ssh_key, host_key=""), pin=pinned.append) as c:
        c.run("true", hide=True)
    assert pinned == [server.host_public_key()]


def test_first_contact_without_a_pin_callback_is_refused(server, ssh_key):
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, host_key=""))
    assert caught.value.permanent and "no pinned host key" in caught.value.message


def test_a_changed_host_key_stops_with_both_fingerprints_and_does_nothing(server, ssh_key):
    other_public = pki.make_ssh_keypair(comment="someone-else")[1]
    logins = accepted_logins(server)
    pinned = []
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, host_key=other_public), pin=pinned.append)
    error = caught.value
    assert error.step == "connect" and error.permanent
    assert pki.fingerprint_sha256(other_public) in error.message  # expected
    assert server.host_key_fingerprint() in error.message  # presented
    assert "clear the node's pinned host key in the admin, then sync again" in error.message
    assert pinned == [] and accepted_logins(server) == logins  # never authenticated, let alone ran anything


def test_a_pinned_key_of_another_type_is_reported_as_a_mismatch(server, ssh_key):
    ecdsa = paramiko.ECDSAKey.generate()
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, host_key=f"{ecdsa.get_name()} {ecdsa.get_base64()}"))
    assert caught.value.permanent and server.host_key_fingerprint() in caught.value.message


def test_a_pinned_key_that_is_not_a_key_line_is_a_clear_permanent_error(server, ssh_key):
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, host_key="ssh-ed25519 not-base64!"))
    assert caught.value.permanent and "not an OpenSSH public key line" in caught.value.message


def test_a_deploy_key_the_node_does_not_know_is_a_permanent_login_failure(server):
    from tests.lab_helpers import generate_ssh_key

    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, generate_ssh_key("stranger")))
    assert caught.value.step == "connect" and caught.value.permanent
    assert "refused LanHub's deploy key" in caught.value.message


def test_a_closed_port_is_a_transient_connect_error(server, ssh_key):
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, port=2222))
    assert not caught.value.permanent and "nothing answered there as an SSH server" in caught.value.message


def test_an_address_where_nothing_answers_is_a_transient_connect_error(server, ssh_key):
    # 203.0.113.99 is on the lab's node segment but nobody holds it: no route/ARP answer, or a timeout.
    with pytest.raises(ProvisioningError) as caught:
        open_connection(stand_in(server, ssh_key, address="203.0.113.99"), timeout=2)
    assert caught.value.step == "connect" and not caught.value.permanent


@pytest.mark.django_db
def test_it_connects_to_a_real_node_row_and_pins_its_key_on_first_contact(server, ssh_key):
    from django.contrib.auth import get_user_model

    from nodes.models import Lan, Node

    owner = get_user_model().objects.create_user("alice")
    lan = Lan.objects.create(owner=owner, name="Game Night", slug="gamenight",
                             ssh_private_key_sealed=seal(ssh_key.private_openssh))
    node = Node.objects.create(lan=lan, name="hangzhou", public_address=server.address, ssh_host=server.address)

    def pin(key_line):
        Node.objects.filter(pk=node.pk, ssh_host_key="").update(ssh_host_key=key_line)

    with open_connection(node, pin=pin) as c:
        c.run("true", hide=True)
    node.refresh_from_db()
    assert node.ssh_host_key == server.host_public_key()
    with open_connection(node) as c:  # now pinned: no callback needed
        assert c.run("hostname -I", hide=True).stdout.split()[0] == server.address
