"""OpenVPN's management interface, reached through the node's SSH connection.

Each instance listens on 127.0.0.1:<port> on the node. Rather than expose that port or open a local listener, a
``direct-tcpip`` channel of the already-open SSH transport is connected to it: nothing listens on the worker and
nothing new is reachable from outside. The protocol is line-based: OpenVPN first sends a ``>INFO:`` banner, and a
command sent before the banner is read can be lost (OPENVPN-NOTES.md), then a multi-line answer ends with ``END``
and a single-line one starts with ``SUCCESS:`` or ``ERROR:``. Lines starting with ``>`` are real-time
notifications and may arrive at any time; they are skipped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import paramiko
from fabric import Connection

from nodes import layout
from nodes.layout import INSTANCE_RE
from nodes.provisioning import ping_through
from nodes.ssh import ProvisioningError, run_root

TIMEOUT = 5.0  # seconds for the whole exchange with one instance; the interface answers in milliseconds
_COMMON_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # lanhub/pki.py's rule: no spaces, no newlines


@dataclass(frozen=True)
class ClientRow:
    """One connected client as ``status 3`` reports it."""

    common_name: str
    real_address: str
    vpn_address: str
    bytes_in: int
    bytes_out: int
    connected_since: datetime | None
    instance: str = ""
    client_id: int | None = None


def read_status(c: Connection, port: int, *, instance: str = "") -> list[ClientRow]:
    """The clients connected to the instance whose management interface is on 127.0.0.1:``port``."""
    lines = command(c, port, "status 3", multiline=True)
    header: list[str] = []
    rows = []
    for line in lines:
        fields = line.split("\t")
        if fields[:2] == ["HEADER", "CLIENT_LIST"]:
            header = fields[1:]  # column names, aligned with a CLIENT_LIST row's fields
        elif fields[0] == "CLIENT_LIST" and header:
            rows.append(_client_row(dict(zip(header, fields)), instance))
    return rows


def kill_client(c: Connection, port: int, common_name: str) -> int:
    """Disconnect every session of ``common_name``; returns how many were killed (0 if none was connected)."""
    if not _COMMON_NAME.match(common_name):
        raise ValueError(f"invalid common name {common_name!r}")
    answer = command(c, port, f"kill {common_name}")[0]
    if answer.startswith("SUCCESS:"):
        match = re.search(r"(\d+) client\(s\) killed", answer)
        return int(match.group(1)) if match else 1
    if "not found" in answer:
        return 0
    raise ProvisioningError("management", f"OpenVPN refused to kill {common_name}: {answer}")


def instance_ports(c: Connection) -> dict[str, int]:
    """instance -> management port, as the ``management`` lines of the node's lanhub configs say.

    Read from the files rather than computed, so a link instance's port is whatever the planner gave it.
    """
    out = run_root(c, "grep -H -E '^[[:space:]]*management[[:space:]]' "
                      f"{layout.SERVER_DIR}/lanhub-*.conf {layout.CLIENT_DIR}/lanhub-*.conf 2>/dev/null; true",
                   hide=True, warn=True).stdout
    ports = {}
    for line in out.splitlines():
        path, _, option = line.partition(":")
        match = re.match(rf"^{layout.OPENVPN_DIR}/(server|client)/(lanhub-[a-z0-9-]+)\.conf$", path)
        args = option.split()
        # Only TCP on localhost: a unix-socket interface ("management /path unix") is not ours to read this way.
        if match and len(args) >= 3 and args[1] in ("127.0.0.1", "localhost") and args[2].isdigit():
            name = f"{match.group(1)}/{match.group(2)}"
            if INSTANCE_RE.match(name):
                ports[name] = int(args[2])
    return ports


def link_rtt(c: Connection, device: str, peer: str) -> float | None:
    """Round-trip time in ms through a link's tunnel, or None when the peer does not answer."""
    return ping_through(c, device, peer, wait=0)


def command(c: Connection, port: int, cmd: str, *, multiline: bool = False, timeout: float = TIMEOUT) -> list[str]:
    """Send one management command; return the answer's lines (without ``END``), or the one-line answer."""
    if not (0 < int(port) < 65536) or "\n" in cmd:
        raise ValueError("bad management port or command")
    channel = _open_channel(c, int(port), timeout)
    try:
        reader = _LineReader(channel, time.monotonic() + timeout, port)
        _log_in(c, channel, reader, port)
        channel.sendall(f"{cmd}\n".encode())
        if not multiline:
            return [reader.next_line()]
        lines = []
        while (line := reader.next_line()) != "END":
            lines.append(line)
        return lines
    finally:
        try:
            channel.sendall(b"quit\n")
        except (OSError, EOFError, paramiko.SSHException):
            pass
        channel.close()


PASSWORD_PROMPT = "ENTER PASSWORD:"


def _log_in(c: Connection, channel: paramiko.Channel, reader: "_LineReader", port: int) -> None:
    """Read the greeting; when the interface asks for its password (LanHub's configs set one), give it first.

    The prompt comes without a newline; after the right password OpenVPN answers SUCCESS and then sends its
    usual >INFO banner. An interface without a password (an older config) sends the banner at once."""
    first = reader.next_line(skip_notifications=False, prompt=PASSWORD_PROMPT)
    if first != PASSWORD_PROMPT:
        return
    channel.sendall(f"{management_password(c)}\n".encode())
    answer = reader.next_line(prompt=PASSWORD_PROMPT)  # a wrong password may get the prompt again
    if not answer.startswith("SUCCESS"):
        raise ProvisioningError("management", f"The management interface on port {port} refused LanHub's "
                                f"password ({answer.strip()[:100]}): sync the node to rewrite it.")
    reader.next_line(skip_notifications=False)  # the >INFO banner


def management_password(c: Connection) -> str:
    """The password in the node's root-only file, read once per SSH connection (the watcher keeps one open)."""
    cached = getattr(c, "_lanhub_management_password", None)
    if cached is None:
        out = run_root(c, f"cat -- {layout.MANAGEMENT_PASSWORD_FILE}", hide=True, warn=True)
        cached = out.stdout.strip() if out.ok else ""
        if not cached:
            raise ProvisioningError("management", "The management interface wants a password, and the node has "
                                    f"no {layout.MANAGEMENT_PASSWORD_FILE}: sync the node to write it.")
        c._lanhub_management_password = cached
    return cached


def _open_channel(c: Connection, port: int, timeout: float) -> paramiko.Channel:
    c.open()
    try:
        channel = c.transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=timeout)
    except paramiko.ChannelException as exc:  # sshd got "connection refused" from 127.0.0.1:port
        raise ProvisioningError("management", f"Nothing answers on the node's management port {port} "
                                f"({exc.text or exc}): is that OpenVPN instance running?") from exc
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise ProvisioningError("management", f"Cannot reach management port {port} over SSH: {exc}") from exc
    channel.settimeout(timeout)
    return channel


class _LineReader:
    """CRLF lines from a channel, bounded by one deadline for the whole exchange."""

    def __init__(self, channel: paramiko.Channel, deadline: float, port: int):
        self.channel, self.deadline, self.port, self.buffer = channel, deadline, port, b""

    def next_line(self, *, skip_notifications: bool = True, prompt: str | None = None) -> str:
        """The next line; with `prompt`, also a partial line equal to it (a prompt waits without a newline)."""
        while True:
            while b"\n" not in self.buffer:
                if prompt is not None and self.buffer.decode(errors="replace").startswith(prompt):
                    self.buffer = self.buffer[len(prompt.encode()):]
                    return prompt
                if time.monotonic() > self.deadline:
                    raise ProvisioningError("management", f"The management interface on port {self.port} "
                                            "did not answer in time.")
                try:
                    chunk = self.channel.recv(65536)
                except TimeoutError:
                    continue  # re-check the deadline
                if not chunk:
                    raise ProvisioningError("management", f"The management interface on port {self.port} closed "
                                            "the connection (another client may be attached to it).")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\n", 1)
            line = raw.decode(errors="replace").rstrip("\r")
            if not (skip_notifications and line.startswith(">")):
                return line


def _client_row(row: dict[str, str], instance: str) -> ClientRow:
    since = row.get("Connected Since (time_t)", "")
    return ClientRow(
        common_name=row.get("Common Name", ""),
        real_address=row.get("Real Address", ""),
        vpn_address=row.get("Virtual Address", ""),
        bytes_in=int(row.get("Bytes Received") or 0),
        bytes_out=int(row.get("Bytes Sent") or 0),
        connected_since=datetime.fromtimestamp(int(since), tz=timezone.utc) if since.isdigit() else None,
        instance=instance,
        client_id=int(row["Client ID"]) if row.get("Client ID", "").isdigit() else None,
    )


@dataclass
class NodeStatus:
    """Everything one status poll learns: who is online where, and whether each link answers."""

    clients: list[ClientRow] = field(default_factory=list)
    links: dict[str, tuple[bool, float | None]] = field(default_factory=dict)  # upstream -> (up, rtt ms)
    ports: dict[str, int] = field(default_factory=dict)  # instance -> management port


def node_status(c: Connection, *, links: Iterable = ()) -> NodeStatus:
    """Read every lanhub instance's clients and ping every link (objects with ``upstream``, ``device``, ``peer``)."""
    status = NodeStatus(ports=instance_ports(c))
    for instance, port in sorted(status.ports.items()):
        if instance.startswith("server/"):  # a link client has no clients of its own
            status.clients += read_status(c, port, instance=instance)
    for link in links:
        rtt = link_rtt(c, link.device, link.peer)
        status.links[link.upstream] = (rtt is not None, rtt)
    return status


def kill_clients(c: Connection, status: NodeStatus, common_names: Iterable[str], *, message: str = "RESTART") -> int:
    """Disconnect every listed client found online in ``status``; returns how many.

    ``client-kill`` (OpenVPN 2.5+) also tells the client why: RESTART makes it reconnect at once (to pick up a
    changed client-config-dir file), HALT makes it stop (a revoked player: the CRL would refuse it anyway). A plain
    ``kill`` would drop the session silently and leave the client waiting for its ping-restart.
    """
    if message not in ("RESTART", "HALT"):
        raise ValueError(f"unknown client-kill message {message!r}")
    doomed = set(common_names)
    killed = 0
    for row in sorted(status.clients, key=lambda r: (r.instance, r.common_name)):
        if row.common_name not in doomed or row.instance not in status.ports:
            continue
        port = status.ports[row.instance]
        if row.client_id is None:
            killed += kill_client(c, port, row.common_name)
            continue
        answer = command(c, port, f"client-kill {row.client_id} {message}")[0]
        if answer.startswith("SUCCESS"):
            killed += 1
        elif "not found" not in answer.lower():
            raise ProvisioningError("management", f"OpenVPN refused to disconnect {row.common_name}: {answer}")
    return killed
