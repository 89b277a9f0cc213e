"""Helpers for tests that need real "servers" (the lab's network namespaces with sshd and OpenVPN).

The fixtures themselves (``lab``, ``ssh_key``) live in tests/conftest.py and are found by name; this module holds
the plain functions tests call: ``require_lab`` (skip, or fail under CI / LANHUB_REQUIRE_LAB=1, with the reason a
lab can't be built), ``generate_ssh_key``, ``connect_node`` and ``ssh_run``, and what the end-to-end and VM tests
share while LanHub syncs their servers: ``wait_until``, ``settled``, ``describe_runs`` and ``vpn_address``. A test
module that needs a lab with another scope or options makes its own fixture with ``make_lab_fixture``. Labs with
host routes are serialised machine-wide (see lab/netns.py), so two suites running at once wait for each other
rather than collide.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from dataclasses import dataclass

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab.netns import Lab, NodeHost


def lab_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("LANHUB_REQUIRE_LAB") == "1"


def unavailable(reason: str) -> None:
    """A prerequisite is missing: skip here, fail under CI / LANHUB_REQUIRE_LAB=1, where nothing may be skipped."""
    if lab_required():
        pytest.fail(f"required but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def require_openvpn() -> None:
    """Skip (or fail under CI / LANHUB_REQUIRE_LAB=1) where the openvpn binary is missing."""
    if shutil.which("openvpn"):
        return
    if lab_required():
        pytest.fail("openvpn required but not installed", pytrace=False)
    pytest.skip("needs openvpn")


def require_lab() -> None:
    """Skip (or fail under CI / LANHUB_REQUIRE_LAB=1) with the reason a lab can't be built here."""
    reason = Lab.requirements_missing()
    if reason is None:
        return
    if lab_required():
        pytest.fail(f"network lab required but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def make_lab_fixture(scope: str = "module", **lab_kwargs):
    """A fixture yielding a fresh ``Lab(**lab_kwargs)`` per ``scope``, downed afterwards even on failure."""

    @pytest.fixture(scope=scope)
    def _lab():
        require_lab()
        with Lab(**lab_kwargs) as built:
            yield built

    return _lab


@dataclass(frozen=True)
class SshKey:
    """A throwaway client key: nothing is written to disk, least of all /root/.ssh."""

    pkey: paramiko.Ed25519Key
    private_openssh: str  # "-----BEGIN OPENSSH PRIVATE KEY-----..." for tools that want text
    public_line: str  # "ssh-ed25519 AAAA... comment" for authorized_keys


def generate_ssh_key(comment: str = "lanhub-test") -> SshKey:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SshKey(paramiko.Ed25519Key(file_obj=io.StringIO(private)), private, f"{public.decode()} {comment}")


def connect_node(node: NodeHost, key: SshKey, timeout: float = 10.0) -> paramiko.SSHClient:
    """Paramiko client to ``node`` as root, pinned to the node's host key (RejectPolicy: no trust on first use)."""
    client = paramiko.SSHClient()
    key_type, key_b64 = node.host_public_key().split()
    client.get_host_keys().add(node.address, key_type, paramiko.Ed25519Key(data=base64.b64decode(key_b64)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(node.address, username="root", pkey=key.pkey, timeout=timeout, banner_timeout=timeout,
                   auth_timeout=timeout, look_for_keys=False, allow_agent=False)
    return client


def ssh_run(client: paramiko.SSHClient, command: str, timeout: float = 15.0) -> tuple[int, str, str]:
    """Run ``command``; returns (exit status, stdout, stderr). Bounded by ``timeout`` on each read."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out, err = stdout.read().decode(), stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def wait_until(predicate, *, timeout: float, interval: float = 0.25, what):
    """Poll `predicate` until it returns something truthy; fail naming `what` (text, or a callable giving it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")


def settled(lan) -> bool:
    """No sync of the LAN is queued or running."""
    from nodes.models import SyncRun, SyncStatus

    return not SyncRun.objects.filter(node__lan=lan, status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).exists()


def describe_runs(lan) -> str:
    """One line per sync run of the LAN, oldest first: what a failed wait shows."""
    from nodes.models import SyncRun

    rows = SyncRun.objects.filter(node__lan=lan).select_related("node").order_by("created_at")
    return "\n".join(f"{r.node.name} {r.kind} {r.status} {r.reason} {r.error}" for r in rows)


def vpn_address(player_host) -> str | None:
    """The player's tunnel address now: a client that fell back to its server's TCP instance has a new one."""
    out = player_host.exec(["ip", "-4", "-o", "addr", "show", "dev", "tun0"], check=False).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None
