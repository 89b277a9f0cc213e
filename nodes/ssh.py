"""SSH to nodes: the one place that builds a ``fabric.Connection``, and the one domain error of provisioning.

``open_connection(node)`` connects eagerly, so every way of failing to reach a node (refused, timed out, wrong
deploy key, changed host key) surfaces here as a ``ProvisioningError("connect", ...)`` with a message an operator
can act on, and never as a paramiko traceback half-way through a step.

Host keys are pinned, never learnt silently: Fabric's default auto-add policy is replaced by the node's pinned
key plus ``RejectPolicy``. Only when no key is pinned yet (first contact) does a policy accept the key the server
presents, and the caller's ``pin`` callback stores it once the login has succeeded.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import shlex
import socket
from collections.abc import Callable

import paramiko
from django.conf import settings
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit
from paramiko.config import SSHConfig

from lanhub.pki import fingerprint_sha256
from lanhub.secrets import SecretError, unseal

# Upper bound for any one remote command: apt-get on a slow mirror is the longest thing a step runs. Without it a
# wedged command would hold the Celery worker (and the node's sync claim) forever.
COMMAND_TIMEOUT = 900


class ProvisioningError(Exception):
    """A step failed in a way the operator should see: ``message`` is shown in the UI and stored on the SyncRun.

    ``permanent`` means retrying will not help until someone changes something (a changed host key, a refused
    login, an unsupported OS); transient failures (timeouts, a node that is down) may be retried by the task.
    """

    def __init__(self, step: str, message: str, *, permanent: bool = False):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message
        self.permanent = permanent


def open_connection(node, *, pin: Callable[[str], None] | None = None, timeout: int | None = None) -> Connection:
    """Connect to ``node`` and return the open Connection; use it as ``with open_connection(node) as c:``.

    ``pin(key_line)`` is called with ``"<type> <base64>"`` when the node had no pinned host key and the login
    succeeded. Without ``pin`` an unpinned node is refused: trusting a key nobody will remember is pointless.
    """
    timeout = timeout or getattr(settings, "LANHUB_SSH_TIMEOUT", 10)
    pkey = _deploy_key(node)
    # The TCP connection is made here, to an address vetted here, and handed to paramiko: resolving twice would
    # let a DNS answer change between the check and the connect.
    sock = _connect_socket(node, timeout)
    c = Connection(
        node.ssh_host, user=node.ssh_user, port=node.ssh_port, connect_timeout=timeout,
        connect_kwargs={"sock": sock, "pkey": pkey, "look_for_keys": False, "allow_agent": False,
                        "banner_timeout": timeout, "auth_timeout": timeout, "channel_timeout": timeout},
        # An explicit empty SSHConfig keeps ~/.ssh/config and /etc/ssh/ssh_config of the worker out of the way;
        # in_stream=False because a worker (or pytest) has no stdin worth forwarding to a remote command.
        config=Config(ssh_config=SSHConfig(),
                      overrides={"run": {"in_stream": False}, "timeouts": {"command": COMMAND_TIMEOUT}}),
    )
    first_contact = _FirstContactPolicy() if not node.ssh_host_key.strip() else None
    if first_contact:
        if pin is None:
            sock.close()
            raise ProvisioningError("connect", f"{_where(node)} has no pinned host key and this call cannot pin one.",
                                    permanent=True)
        c.client.set_missing_host_key_policy(first_contact)
    else:
        expected = _parse_host_key(node.ssh_host_key)
        c.client.get_host_keys().add(_known_hosts_name(node), expected.get_name(), expected)
        c.client.set_missing_host_key_policy(_PinnedPolicy(expected))
    try:
        c.open()
        c.transport.set_keepalive(15)  # long apt-get runs: keep NAT boxes from dropping an idle session
    except BaseException as exc:
        c.client.close()  # paramiko leaves the transport thread running after a failed handshake
        raise _connect_error(node, exc) from exc
    if first_contact:
        # Pinned only after a successful login, so a typo in the address does not pin a stranger's key.
        pin(first_contact.seen)
    return c


def run_root(c: Connection, cmd: str, **kwargs):
    """Run ``cmd`` as root: directly when logged in as root, else through ``sudo -n sh -c``.

    Not ``c.sudo``: it feeds a password LanHub does not have (so needs NOPASSWD anyway, and ``-n`` fails fast
    instead of waiting on a prompt), and it prefixes only the first word, so ``a | b`` or ``a && b`` would run
    ``b`` unprivileged. Wrapping the whole command in ``sh -c`` gives root the same shell line a root login gets.
    """
    if is_root(c):
        return c.run(cmd, **kwargs)
    return c.run(f"sudo -n -- sh -c {shlex.quote(cmd)}", **kwargs)


def is_root(c: Connection) -> bool:
    return c.user == "root"


def check_sudo(c: Connection, step: str) -> None:
    """Fail at once, permanently and saying so, when a non-root login cannot ``sudo -n``.

    Without this, the first ``run_root`` probe (``warn=True``) fails for sudo's reason and is read as its own
    answer ("openvpn is missing"), and the error the operator sees is about the next command, not about sudo.
    """
    if is_root(c):
        return
    out = c.run("sudo -n true", hide=True, warn=True)
    if not out.ok:
        said = (out.stderr or out.stdout or "").strip()[-300:] or f"exit {out.exited}"
        raise ProvisioningError(
            step, f"{c.user} cannot run commands as root without a password ({said}): log in as root, or give "
            f"{c.user} passwordless sudo (e.g. `{c.user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/lanhub).",
            permanent=True)


def command_error(step: str, exc: BaseException) -> ProvisioningError:
    """Turn what a Fabric call can raise into the domain error, keeping the useful part of the output."""
    if isinstance(exc, ProvisioningError):
        return exc
    if isinstance(exc, UnexpectedExit):
        result = exc.result
        output = (result.stderr or result.stdout or "").strip()[-800:]
        command = result.command if len(result.command) < 300 else result.command[:300] + "…"
        return ProvisioningError(step, f"`{command}` exited with {result.exited}" + (f": {output}" if output else ""))
    if isinstance(exc, CommandTimedOut):
        return ProvisioningError(step, f"a command took longer than {exc.timeout}s: `{exc.result.command[:300]}`")
    if isinstance(exc, (socket.error, EOFError, paramiko.SSHException)):
        return ProvisioningError(step, f"the SSH session failed: {exc or type(exc).__name__}")
    raise exc


# ---- where LanHub may connect ----------------------------------------------------------------------------------

def refused_target(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `address` may not be an SSH target, or None. A host types any address into the node form and the worker
    connects to it: without this, any host could reach services on the portal's own machine (loopback, its own
    addresses) or a cloud metadata service (link-local 169.254.169.254) from the worker. The lab and the tests,
    whose nodes live on this machine, set LANHUB_SSH_ALLOW_LOCAL_TARGETS."""
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    if getattr(settings, "LANHUB_SSH_ALLOW_LOCAL_TARGETS", False):
        return None
    if address.is_loopback or address.is_unspecified:
        return "it is a loopback address of the portal's own machine"
    if address.is_link_local:
        return "it is a link-local address"
    if address.is_multicast or address.is_reserved:
        return "it is not a unicast address"
    if _is_own_address(address):
        return "it is an address of the portal's own machine"
    return None


def _is_own_address(address) -> bool:
    # The kernel knows which addresses are ours: binding to one succeeds only if it is configured here.
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def _connect_socket(node, timeout: int) -> socket.socket:
    """A TCP connection to the node's SSH port, after every resolved address has been vetted."""
    unreachable = ProvisioningError(
        "connect", f"Could not open an SSH session with {_where(node)}: nothing answered there as an SSH server "
        "(the node is down, the address or port is wrong, or a firewall is in the way).")
    try:
        infos = socket.getaddrinfo(node.ssh_host, node.ssh_port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise ProvisioningError("connect", f"Cannot resolve {node.ssh_host!r} to an address.",
                                permanent=True) from None
    targets = []
    for family, kind, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        why = refused_target(address)
        if why:
            raise ProvisioningError("connect", f"LanHub does not connect to {node.ssh_host} ({address}): {why}.",
                                    permanent=True)
        targets.append((family, kind, proto, sockaddr))
    for family, kind, proto, sockaddr in targets:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            continue
        return sock
    raise unreachable


# ---- keys ---------------------------------------------------------------------------------------------------------


def _deploy_key(node) -> paramiko.PKey:
    try:
        pem = unseal(node.lan.ssh_private_key_sealed)
    except SecretError as exc:
        raise ProvisioningError("connect", f"The LAN's SSH deploy key cannot be used: {exc}", permanent=True) from None
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(pem))
        except (paramiko.SSHException, ValueError):
            continue
    raise ProvisioningError("connect", "The LAN's SSH deploy key is not an OpenSSH private key.", permanent=True)


def _parse_host_key(line: str) -> paramiko.PKey:
    fields = line.split()
    try:
        return paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1], validate=True))
    except (IndexError, binascii.Error, paramiko.SSHException, ValueError) as exc:
        raise ProvisioningError(
            "connect", f"The pinned host key is not an OpenSSH public key line ({exc}); clear it in the admin and "
            "sync again to pin the key the node presents.", permanent=True) from None


def _key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _known_hosts_name(node) -> str:
    # The same spelling paramiko looks the host up under (it brackets non-default ports like OpenSSH does).
    return node.ssh_host if node.ssh_port == 22 else f"[{node.ssh_host}]:{node.ssh_port}"


class _FirstContactPolicy(paramiko.MissingHostKeyPolicy):
    """Accept whatever key is presented and remember it; the caller pins it after authentication succeeds."""

    seen: str = ""

    def missing_host_key(self, client, hostname, key):
        self.seen = _key_line(key)


class _PinnedPolicy(paramiko.RejectPolicy):
    """RejectPolicy that reports a key of another type (paramiko's "not found") as the mismatch it really is."""

    def __init__(self, expected: paramiko.PKey):
        self.expected = expected

    def missing_host_key(self, client, hostname, key):
        raise paramiko.BadHostKeyException(hostname, key, self.expected)


# ---- error messages -----------------------------------------------------------------------------------------------


def _where(node) -> str:
    return f"{node.ssh_user}@{node.ssh_host}:{node.ssh_port}"


def _connect_error(node, exc: BaseException) -> ProvisioningError:
    where = _where(node)
    if isinstance(exc, ProvisioningError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return ProvisioningError(
            "connect",
            f"The host key of {node.ssh_host}:{node.ssh_port} has changed: expected "
            f"{fingerprint_sha256(exc.expected_key.asbytes())}, the server presented "
            f"{exc.key.get_name()} {fingerprint_sha256(exc.key.asbytes())}. Nothing was done. If the server was "
            "reinstalled or its keys were rotated on purpose, clear the node's pinned host key in the admin, then "
            "sync again; otherwise someone may be intercepting the connection.",
            permanent=True)
    if isinstance(exc, paramiko.AuthenticationException):
        return ProvisioningError(
            "connect", f"{where} refused LanHub's deploy key: add the LAN's public SSH key to that user's "
            "authorized_keys (and make sure the user may log in).", permanent=True)
    # Everything else means no SSH server spoke to us. One message for all of it (refused, timed out, reset,
    # something that is not sshd): a host must not learn from the worker which ports of a machine are open.
    if isinstance(exc, (OSError, EOFError, paramiko.SSHException, ValueError)):
        return ProvisioningError(
            "connect", f"Could not open an SSH session with {where}: nothing answered there as an SSH server (the "
            "node is down, the address or port is wrong, or a firewall is in the way).")
    raise exc
