"""OpenVPN's management interface, reached through the node's SSH connection.

Each instance listens on 127.0.0.1:<port> on the node. Rather than expose that port or open a local listener, a
``direct-tcpip`` channel of the already-open SSH transport is connected to it: nothing listens on the worker and
nothing new is reachable from outside. The protocol is line-based: OpenVPN first sends a ``>INFO:`` banner, and a
command sent before the banner is read can be lost (OPENVPN-NOTES.md), then a multi-line answer ends with ``END``
and a single-line one starts with ``SUCCESS:`` or ``ERROR:``. Lines starting with ``>`` are real-time
notifications and may arrive at any time; ``command`` skips them, ``ClientStream`` lives on them.

OpenVPN serves one management client at a time: a second connection waits until the first leaves (checked with
OpenVPN 2.6.14). The session watcher (nodes/watcher.py) holds each server instance's interface, so every other
user first asks it to step aside (``request_yield``, over Redis pub/sub): the watcher closes that interface at
once, stays away until nobody has asked for a moment, then reconnects and re-reads the client list.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import logging

import paramiko
import redis
from django.conf import settings
from fabric import Connection

from nodes import layout
from nodes.layout import INSTANCE_RE
from nodes.provisioning import ping_through
from nodes.ssh import ProvisioningError, run_root

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # seconds for the whole exchange with one instance; the interface answers in milliseconds
YIELD_CHANNEL = "lanhub:management-yield"  # Redis pub/sub channel: "<ssh host>:<ssh port>:<management port>"
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
    request_yield(c, int(port))
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


def interface_key(c: Connection, port: int) -> str:
    """Names one management interface the same way for the watcher and for everyone else."""
    return f"{c.host}:{c.port}:{int(port)}"


_publisher: redis.Redis | None = None


def request_yield(c: Connection, port: int) -> None:
    """Ask a watcher holding this interface to step aside (see the module docstring). Without Redis nothing
    holds it that we know of, so a failure to publish only costs the wait for a busy interface."""
    global _publisher
    try:
        if _publisher is None:
            _publisher = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        _publisher.publish(YIELD_CHANNEL, interface_key(c, port))
    except redis.RedisError as exc:
        log.debug("could not ask the watcher to yield %s: %s", interface_key(c, port), exc)


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


# --- real-time client notifications ----------------------------------------------------------------------------
# Two sources, both on the held interface (checked with 2.6.14):
# - ``>CLIENT:ESTABLISHED,<cid>`` followed by ``>CLIENT:ENV,<name>=<value>`` lines up to ``>CLIENT:ENV,END``, sent
#   for every client that completed its connection, without --management-client-auth. The ENV block names the client
#   (common_name) and its address (trusted_ip / trusted_ip6, trusted_port). OpenVPN sends >CLIENT:DISCONNECT only
#   for clients it announced with >CLIENT:CONNECT, i.e. only with --management-client-auth (which would make every
#   connection wait for the portal's approval), so leaving is read from the log.
# - The real-time log (the ``log on`` command: >LOG lines), per client ("<common name>/<address>:<port> <message>"):
#   an exit notice or an ended client instance means a client left. A client that says goodbye (explicit-exit-notify)
#   stays in the client list for five more seconds ("Delayed exit in 5 seconds"); the log line comes at once.
#   The per-client prefix is not always there: once OpenVPN has closed an earlier session of the same common name
#   ("new connection by client ... previous active sessions ... dropped", which happens when a player reconnects
#   within those five seconds), the new connection's lines, its PUSH_REPLY included, come without it. So a join is
#   taken from >CLIENT:ESTABLISHED, which always names the client; a prefixed PUSH_REPLY line counts as one too.

_GOODBYE = "exit message received"  # the client said it is leaving (explicit-exit-notify)
_ENDED = ("client-instance exiting", "client-instance restarting", "Connection reset", "Inactivity timeout")
_CLIENT_PREFIX = re.compile(r"^(?P<cn>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(?P<real>\S+) (?P<text>.*)$")


@dataclass(frozen=True)
class ClientEvent:
    """What a >LOG line says about one client: ``joined`` (its client list entry is new or changed), ``bye`` (it said
    it is leaving) or ``ended`` (its connection ended: a TCP close, a timeout, or the delayed exit after a bye)."""

    kind: str  # "joined" | "bye" | "ended"
    common_name: str
    real_address: str


def parse_log_line(line: str) -> ClientEvent | None:
    """A ClientEvent from one >LOG:<time>,<flags>,<message> line, or None when it is about nothing we track."""
    if not line.startswith(">LOG:"):
        return None
    parts = line[len(">LOG:"):].split(",", 2)
    if len(parts) < 3:
        return None
    match = _CLIENT_PREFIX.match(parts[2])
    if match is None:
        return None
    text = match.group("text")
    if "PUSH_REPLY" in text and text.startswith("SENT CONTROL"):
        return ClientEvent("joined", match.group("cn"), match.group("real"))
    if _GOODBYE in text:
        return ClientEvent("bye", match.group("cn"), match.group("real"))
    if any(marker in text for marker in _ENDED):
        return ClientEvent("ended", match.group("cn"), match.group("real"))
    return None


class NotificationReader:
    """ClientEvents from a stream of notification lines: >LOG lines one by one (parse_log_line) and >CLIENT blocks,
    whose header and ENV lines arrive as separate lines and make one event at their ``>CLIENT:ENV,END``."""

    def __init__(self):
        self.block: str | None = None  # the >CLIENT kind being read ("ESTABLISHED", ...), None outside a block
        self.env: dict[str, str] = {}

    def feed(self, line: str) -> ClientEvent | None:
        if line.startswith(">CLIENT:ENV,"):
            if self.block is None:
                return None
            item = line[len(">CLIENT:ENV,"):]
            if item != "END":
                name, _, value = item.partition("=")
                self.env[name] = value
                return None
            kind, env, self.block, self.env = self.block, self.env, None, {}
            return self._client_event(kind, env)
        if line.startswith(">CLIENT:"):
            self.block, self.env = line[len(">CLIENT:"):].split(",", 1)[0], {}
            return None
        return parse_log_line(line)

    @staticmethod
    def _client_event(kind: str, env: dict[str, str]) -> ClientEvent | None:
        common_name = env.get("common_name", "")
        address = env.get("trusted_ip") or env.get("trusted_ip6")
        if not _COMMON_NAME.match(common_name) or not address:
            return None
        real = f"{address}:{env['trusted_port']}" if env.get("trusted_port", "").isdigit() else address
        if kind == "ESTABLISHED":
            return ClientEvent("joined", common_name, real)
        if kind == "DISCONNECT":
            return ClientEvent("ended", common_name, real)
        return None


class ClientStream:
    """One server instance's management interface, held open: its client list, then its clients' events.

    ``open()`` reads the banner, turns the real-time log on and reads the client list; ``client_list()`` reads it
    again on the same connection; ``events()`` yields each ClientEvent as OpenVPN logs it, until the interface
    closes (the instance stopped, or ``close()`` from another thread) or nothing arrives for ``idle`` seconds.
    """

    def __init__(self, c: Connection, port: int, *, instance: str = ""):
        self.c, self.port, self.instance = c, int(port), instance
        self.channel: paramiko.Channel | None = None
        self.buffer = b""
        self.notifications: list[str] = []  # > lines that arrived while a command's answer was read
        self.yielded = False  # closed because someone else asked for the interface (the instance still runs)
        self.reader = NotificationReader()

    @property
    def key(self) -> str:
        return interface_key(self.c, self.port)

    def open(self, *, timeout: float = TIMEOUT) -> list[ClientRow]:
        self.channel = _open_channel(self.c, self.port, timeout)
        reader = _LineReader(self.channel, time.monotonic() + timeout, self.port)
        _log_in(self.c, self.channel, reader, self.port)  # the password, when the interface asks for it
        self.buffer = reader.buffer
        self.channel.sendall(b"log on\n")
        answer = self._answer(time.monotonic() + timeout)
        if not answer.startswith("SUCCESS"):
            raise ProvisioningError("management", f"OpenVPN refused the real-time log: {answer}")
        return self.client_list(timeout=timeout)

    def client_list(self, *, timeout: float = TIMEOUT) -> list[ClientRow]:
        """``status 3`` on the held connection."""
        deadline = time.monotonic() + timeout
        self.channel.sendall(b"status 3\n")
        header, rows = [], []
        while (line := self._answer(deadline)) != "END":
            fields = line.split("\t")
            if fields[:2] == ["HEADER", "CLIENT_LIST"]:
                header = fields[1:]
            elif fields[0] == "CLIENT_LIST" and header:
                rows.append(_client_row(dict(zip(header, fields)), self.instance))
        return rows

    def events(self, *, idle: float = 1.0):
        """ClientEvents as they come; returns after ``idle`` quiet seconds or when the interface closes."""
        while self.notifications:
            if (event := self.reader.feed(self.notifications.pop(0))) is not None:
                yield event
        channel = self.channel
        if channel is None:
            return
        channel.settimeout(idle)
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                if (event := self.reader.feed(raw.decode(errors="replace").rstrip("\r"))) is not None:
                    yield event
            try:
                chunk = channel.recv(65536)
            except (TimeoutError, OSError):  # socket.timeout is TimeoutError: a quiet moment
                return
            except (EOFError, paramiko.SSHException):
                chunk = b""
            if not chunk:
                self.close()
                return
            self.buffer += chunk

    def _line(self, deadline: float) -> str:
        # events() may have left the channel non-blocking (idle=0): a command's answer is waited for, not spun on.
        self.channel.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        reader = _LineReader(self.channel, deadline, self.port)
        reader.buffer = self.buffer
        try:
            return reader.next_line(skip_notifications=False)
        finally:
            self.buffer = reader.buffer

    def _answer(self, deadline: float) -> str:
        """The next line of a command's answer; notifications met on the way are kept for events()."""
        while (line := self._line(deadline)).startswith(">"):
            self.notifications.append(line)
        return line

    @property
    def closed(self) -> bool:
        channel = self.channel
        return channel is None or channel.closed

    def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            try:
                channel.close()  # from another thread too: a select() on it wakes up
            except (OSError, EOFError, paramiko.SSHException):
                pass
