"""Fixtures shared by every test package (pytest finds them by name; never import fixtures from test modules).

``lab`` is module-scoped: one ``lab.netns.Lab`` per test module, downed after the module's last test, also when a
test fails. Where a lab can't be built the tests skip with the exact reason; with CI=true or LANHUB_REQUIRE_LAB=1
they fail instead, so a CI runner that lost root or openvpn can't go green by skipping everything::

    pytestmark = pytest.mark.lab

    def test_it_provisions(lab, ssh_key):
        node = lab.add_node("hangzhou")
        node.authorize(ssh_key.public_line)
        with connect_node(node, ssh_key) as client: ...   # connect_node from tests.lab_helpers
"""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.lab_helpers import SshKey, generate_ssh_key, make_lab_fixture

lab = make_lab_fixture("module")


@pytest.fixture(scope="session")
def ssh_key() -> SshKey:
    """A throwaway client key for the whole run: nothing is written to disk, least of all /root/.ssh."""
    return generate_ssh_key()


@pytest.fixture(autouse=True)
def _ssh_targets_on_this_machine(request):
    """Test nodes live on this machine (sshd on 127.0.0.1, namespaces): allow them as SSH targets, as the lab
    does. Tests of the refusal itself override the setting back off."""
    if not settings.configured:
        yield
        return
    old = getattr(settings, "LANHUB_SSH_ALLOW_LOCAL_TARGETS", False)
    settings.LANHUB_SSH_ALLOW_LOCAL_TARGETS = True
    yield
    settings.LANHUB_SSH_ALLOW_LOCAL_TARGETS = old


@pytest.fixture(autouse=True)
def lobby_looks_at_the_rows_on_every_poll():
    """Outside tests, the lobby answers every poll of a LAN for a second from one Redis key (players/lobby.py).
    Tests share a LAN across a class and reuse primary keys, so a test could get the previous test's rows: here
    each poll looks at the rows. A test that counts the shortcut's queries turns it back on itself."""
    from players import lobby

    saved, lobby.RECHECK_SECONDS = lobby.RECHECK_SECONDS, 0
    yield
    lobby.RECHECK_SECONDS = saved
