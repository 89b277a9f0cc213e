"""The session watcher: who is online, pushed by the nodes instead of polled.

A long-running process (``manage.py watch_sessions``, in the Procfile) holds, for every ready node of its shard,
one SSH connection and on it each server instance's management interface with the real-time log on
(nodes/openvpn_mgmt.ClientStream: joins come as >CLIENT:ESTABLISHED, leaves as >LOG lines; why is explained there).
When it (re)connects to an instance it reads the client list and replaces that instance's sessions; a client
joining makes it read the list again at once (and once more a second later if the client was not on it yet), a client leaving deletes its session
at once (nodes/presence.py), and the list is read again after OpenVPN's 5-second delayed exit: whenever a read
list still shows a client that said goodbye, another read is due when its delayed exit is over.

- Sharding: ``--processes N`` starts N worker processes; a node belongs to the one where ``pk % N`` equals its
  index, so every node is held exactly once and a process holds about 1/N of them (one thread per node).
- Failures: an SSH connection that fails or drops is retried with exponential backoff (1 s up to 60 s, with
  jitter); an instance that stops (a restart by a sync, a crash) is reconnected within a second once it is back,
  and its sessions are re-read. Nothing is lost across a restart of the watcher either: a fresh start re-reads.
- Sharing: OpenVPN serves one management client at a time, so syncs and polls ask the watcher to step aside
  (openvpn_mgmt.request_yield over Redis pub/sub). The watcher closes that interface, waits until nobody asked
  for YIELD_QUIET seconds, reconnects and re-reads the list, so a change made meanwhile is not missed.
- The periodic status poll (LANHUB_STATUS_INTERVAL) stays, as the safety net and for link RTTs. A node whose server
  interfaces the watcher holds is polled only every LANHUB_HELD_POLL_INTERVAL (presence.due_for_poll): the held
  connection already shows it alive, and kernel TCP keepalives end it within about 30 s if the node dies. Losing a
  node it held, the watcher asks for a poll of it at once; a missed poll is looked at again after
  LANHUB_RECHECK_AFTER seconds, so a dead node is marked down and its LAN re-planned within about a minute. When it
  reaches a node marked down again, it asks for a poll at once too: the poll that answers brings the node back.
"""

from __future__ import annotations

import logging
import random
import resource
import select
import socket
import threading
import time

import redis
from django.conf import settings
from django.db import close_old_connections, connection

from nodes import layout, openvpn_mgmt, presence
from nodes.models import Node, NodeState
from nodes.ssh import ProvisioningError, open_connection

log = logging.getLogger(__name__)

SERVER_PORTS = {layout.UDP_INSTANCE: layout.UDP_MANAGEMENT, layout.TCP_INSTANCE: layout.TCP_MANAGEMENT}
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
YIELD_QUIET = 1.0  # seconds without a yield request before the watcher takes an interface back
WAIT = 30.0  # seconds a node's thread waits for its interfaces when nothing happens (stop() wakes it at once)
RELIST_AFTER_JOIN = 1.0  # a second look after a join whose client the first look did not list yet
RELIST_AFTER_LEAVE = 6.0  # OpenVPN keeps a client that said goodbye listed for 5 s ("Delayed exit in 5 seconds")
REFRESH = 10.0  # seconds between looks at which nodes this shard should hold
# paramiko's transport thread wakes on every socket timeout (0.1 s by default) to check whether it should end or
# send a keepalive. Even once a second, that was 20 ms of CPU per node and minute, 20 CPU-seconds a minute for
# 1,000 nodes (benchmarks/poll_cost.py). The watcher ends its transports itself (shutting the socket down wakes the
# thread at once) and leaves dead-peer detection and NAT keepalive to the kernel (TCP keepalive), so the thread
# needs to wake only for data.
TRANSPORT_CHECK = 60.0
# Idle seconds before the first probe, seconds between probes, probes: a node that vanishes without a word (power,
# network) is noticed within about 30 s. A probe is a bare TCP segment sent by the kernel: no Python wakes for it.
TCP_KEEPALIVE = (15, 5, 3)


def quiet_transport(c) -> None:
    """Make a held SSH connection cost nothing while idle: no Python wakeups, only kernel keepalives."""
    sock = c.transport.sock
    c.transport.set_keepalive(0)
    sock.settimeout(TRANSPORT_CHECK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = TCP_KEEPALIVE
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):  # Linux; elsewhere the system's keepalive timers apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def wake_transport(c) -> None:
    """Shut the socket down so the transport thread, asleep in recv() for up to TRANSPORT_CHECK, ends now."""
    transport = c.transport
    if transport is not None:
        try:
            transport.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class NodeWatcher(threading.Thread):
    """Holds one node's server instances' management interfaces until stopped."""

    def __init__(self, node_id: int, yields: dict[str, float], held: dict[str, openvpn_mgmt.ClientStream]):
        super().__init__(name=f"watch-node-{node_id}", daemon=True)
        self.node_id = node_id
        self.yields = yields  # interface key -> monotonic time of the last yield request (shared, read only)
        self.held = held  # interface key -> the stream holding it, so a yield request can close it at once
        self.stopping = threading.Event()
        self.connected = threading.Event()  # for tests and status: holding at least one interface
        self.complete = False  # holding every server instance's interface: the status poll may slow down

    def stop(self) -> None:
        self.stopping.set()
        for stream in list(getattr(self, "streams", {}).values()):
            stream.yielded = True  # not a stopped instance: its sessions stay for the next watcher to re-read
            stream.close()  # wakes the thread's wait on its channels

    def run(self) -> None:
        delay = BACKOFF_FIRST
        try:
            while not self.stopping.is_set():
                close_old_connections()
                node = Node.objects.filter(pk=self.node_id).select_related("lan").first()
                if node is None:
                    return
                began = time.monotonic()
                try:
                    self._hold(node)
                except Exception as exc:  # SSH, management or database trouble: one node never ends the thread
                    log.info("watcher lost %s: %s", node.name, exc)
                    if self.connected.is_set() and not self.stopping.is_set():
                        # It was holding the node: ask whether the node is down now, not at its next poll round
                        # (a held node's can be half an hour away). Missed polls are looked at again shortly, so
                        # a node that died is failed over within a minute or so (nodes/syncing.py).
                        presence.request_poll(node.pk, reason="the session watcher lost it")
                self.connected.clear()
                self.complete = False
                if time.monotonic() - began > 60:
                    delay = BACKOFF_FIRST  # it held for a while: the next failure starts the backoff over
                self.stopping.wait(delay * random.uniform(0.8, 1.2))
                delay = min(BACKOFF_MAX, delay * 2)
        finally:
            connection.close()

    def _hold(self, node: Node) -> None:
        with open_connection(node) as c:
            c.open()
            quiet_transport(c)
            if not node.healthy:  # marked down, and it answers again: bring it back now, not at the next round
                presence.request_poll(node.pk, reason="the session watcher reached it again")
            streams: dict[str, openvpn_mgmt.ClientStream] = {}
            self.streams = streams
            retry_at: dict[str, float] = {}
            self.relist: dict[str, float] = {}  # instance -> when to read its client list again
            # (instance, common name, real address) -> wall-clock time the client said goodbye
            self.leaving: dict[tuple[str, str, str], float] = {}
            try:
                while not self.stopping.is_set():
                    if not c.is_connected:
                        raise ProvisioningError("connect", "SSH connection closed")
                    for instance, port in SERVER_PORTS.items():
                        stream = streams.get(instance)
                        if stream is not None and stream.closed:
                            streams.pop(instance)
                            self.held.pop(stream.key, None)
                            if not stream.yielded:
                                presence.forget_instance(node, instance)  # stopped: its clients went with it
                                retry_at[instance] = time.monotonic() + 0.2
                            stream = None
                        if stream is None:
                            self._open(c, node, instance, port, streams, retry_at)
                    if streams:
                        self.connected.set()
                    self.complete = len(streams) == len(SERVER_PORTS)
                    self._read(node, streams)
            finally:
                for stream in streams.values():
                    self.held.pop(stream.key, None)
                    stream.close()
                wake_transport(c)

    def _open(self, c, node, instance, port, streams, retry_at) -> None:
        key = openvpn_mgmt.interface_key(c, port)
        if time.monotonic() < retry_at.get(instance, 0) or self._asked_to_yield(key):
            return
        stream = openvpn_mgmt.ClientStream(c, port, instance=instance)
        try:
            rows = stream.open(timeout=3)
        except ProvisioningError:
            stream.close()
            retry_at[instance] = time.monotonic() + 1.0  # not running (yet): look again in a second
            return
        presence.replace_instance(node, instance, rows)
        streams[instance] = stream
        self.held[key] = stream
        log.info("watching %s %s: %d online", node.name, instance, len(rows))

    def _asked_to_yield(self, key: str) -> bool:
        return time.monotonic() - self.yields.get(key, float("-inf")) < YIELD_QUIET

    def _read(self, node: Node, streams: dict[str, openvpn_mgmt.ClientStream]) -> None:
        """Wait for log lines on any held interface (or a yield closing one), then apply what they say."""
        now = time.monotonic()
        self._relist_due(node, streams, now)
        waiting = {s.channel: (instance, s) for instance, s in streams.items() if s.channel is not None}
        wait = WAIT if len(streams) == len(SERVER_PORTS) else 1.0  # an instance is missing: look again soon
        if self.relist:
            wait = max(0.0, min(wait, min(self.relist.values()) - now))
        if not waiting:
            self.stopping.wait(wait)
            return
        # Lines read already (while a client list was read) do not wake select(): take those streams as ready.
        buffered = [s.channel for s in streams.values()
                    if s.channel is not None and (s.notifications or b"\n" in s.buffer)]
        ready = buffered or _readable(list(waiting), wait)
        for channel in ready:
            instance, stream = waiting[channel]
            joined = []
            for event in stream.events(idle=0):
                key = (instance, event.common_name, event.real_address)
                if event.kind == "joined":
                    self.leaving.pop(key, None)  # a new connection from that address: the list decides
                    joined.append((event.common_name, event.real_address))
                elif event.kind == "bye":
                    presence.client_left(node, instance, event.common_name, event.real_address)
                    self.leaving[key] = time.time()
                    self.relist.setdefault(instance, now + RELIST_AFTER_LEAVE)
                elif key in self.leaving:
                    # OpenVPN's delayed exit of a connection that said goodbye: it is off the list now.
                    del self.leaving[key]
                    self.relist[instance] = min(self.relist.get(instance, now + 0.3), now + 0.3)
                else:  # a connection ended without a goodbye (TCP close, timeout)
                    presence.client_left(node, instance, event.common_name, event.real_address)
                    self.relist.setdefault(instance, now + RELIST_AFTER_LEAVE)
            if joined and not stream.closed:
                rows = self._relist(node, instance, stream)
                listed = {(r.common_name, r.real_address) for r in rows or ()}
                if rows is not None and not listed.issuperset(joined):  # the list came a moment early
                    self.relist[instance] = time.monotonic() + RELIST_AFTER_JOIN

    def _relist_due(self, node: Node, streams, now: float) -> None:
        for instance, when in list(self.relist.items()):
            if when <= now:
                del self.relist[instance]
                if instance in streams and not streams[instance].closed:
                    self._relist(node, instance, streams[instance])
        wall = time.time()
        self.leaving = {key: at for key, at in self.leaving.items() if wall - at < RELIST_AFTER_LEAVE + 1}

    def _gone(self, instance: str, row) -> bool:
        said_goodbye = self.leaving.get((instance, row.common_name, row.real_address))
        if said_goodbye is None:
            return False
        # connected_since has whole seconds: a connection listed as begun by the goodbye's second is the one that
        # said it (a later one from the same address announces itself with a join, which clears the goodbye).
        return row.connected_since is None or row.connected_since.timestamp() <= said_goodbye

    def _relist(self, node: Node, instance: str, stream: openvpn_mgmt.ClientStream) -> list | None:
        """Read the instance's client list again and store it; returns the rows read (None if it could not)."""
        try:
            rows = stream.client_list(timeout=3)
        except ProvisioningError:
            stream.close()  # the instance went away or the interface was taken: the loop reopens it
            return None
        # A client that said goodbye is still listed until OpenVPN's delayed exit: it is gone already. A connection
        # from the same address that began after the goodbye is a new one and stays.
        kept = [r for r in rows if not self._gone(instance, r)]
        presence.replace_instance(node, instance, kept)
        if len(kept) < len(rows):
            # Someone who said goodbye is still listed: look again once OpenVPN's delayed exit is over, whatever
            # else is due (a join's second look must not stand in for it).
            goodbye = max(self.leaving.get((instance, r.common_name, r.real_address), 0.0) for r in rows
                          if r not in kept)
            due = time.monotonic() + max(0.5, goodbye + RELIST_AFTER_LEAVE - time.time())
            self.relist[instance] = min(self.relist.get(instance, due), due)
        return rows


def _readable(channels: list, timeout: float) -> list:
    """The channels with something to read, waiting up to ``timeout`` seconds. poll(), not select(): a process
    holding hundreds of nodes has file descriptors past select()'s limit of 1024 (each channel's fileno is a pipe)."""
    poller = select.poll()
    by_fd = {}
    for channel in channels:
        fd = channel.fileno()
        by_fd[fd] = channel
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def raise_file_limit() -> int:
    """Let this process open as many files as it may (three per held interface, one per node): the soft limit is
    often 1024. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


class Shard:
    """The nodes of one shard (pk % count == index), each with its NodeWatcher, plus the yield listener."""

    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count
        self.watchers: dict[int, NodeWatcher] = {}
        self.yields: dict[str, float] = {}
        self.held: dict[str, openvpn_mgmt.ClientStream] = {}
        self.stopping = threading.Event()
        self.redis: redis.Redis | None = None

    def node_ids(self) -> set[int]:
        ids = Node.objects.filter(state=NodeState.READY).values_list("pk", flat=True)
        return {pk for pk in ids if pk % self.count == self.index}

    def refresh(self) -> None:
        wanted = self.node_ids()
        for pk in set(self.watchers) - wanted:
            self.watchers.pop(pk).stop()
        for pk in wanted:
            watcher = self.watchers.get(pk)
            if watcher is None or not watcher.is_alive():
                self.watchers[pk] = watcher = NodeWatcher(pk, self.yields, self.held)
                watcher.start()

    def listen_for_yields(self) -> None:
        """Record every yield request (from any process) with its time; the watchers read the table."""
        delay = BACKOFF_FIRST
        while not self.stopping.is_set():
            try:
                pubsub = redis.Redis.from_url(settings.REDIS_URL).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(openvpn_mgmt.YIELD_CHANNEL)
                delay = BACKOFF_FIRST
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        key = message["data"].decode(errors="replace")
                        self.yields[key] = time.monotonic()
                        stream = self.held.get(key)
                        if stream is not None:  # step aside now: the asker is waiting for the banner
                            stream.yielded = True
                            stream.close()
            except redis.RedisError as exc:
                log.warning("watcher cannot listen for yield requests: %s", exc)
                self.stopping.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)

    def run(self, *, until=None) -> None:
        """Hold this shard's nodes until stopped (or until ``until()`` is true, for tests)."""
        raise_file_limit()
        threading.Thread(target=self.listen_for_yields, name="watch-yields", daemon=True).start()
        try:
            while not self.stopping.is_set() and not (until and until()):
                close_old_connections()
                self.refresh()
                self.mark_held()
                self.stopping.wait(REFRESH)
        finally:
            self.stop()
            self.mark_held(clear=True)

    def mark_held(self, *, clear: bool = False) -> None:
        """Tell the status poll which nodes this shard holds completely (one Redis call per REFRESH)."""
        now = time.time()
        held = {pk: now for pk, w in self.watchers.items() if w.complete and w.is_alive() and not clear}
        let_go = [pk for pk in self.watchers if pk not in held]
        try:
            if self.redis is None:  # one client (and connection) for the shard's life, not one per REFRESH
                self.redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
            pipe = self.redis.pipeline(transaction=False)
            if held:
                pipe.hset(presence.held_key(), mapping=held)
            if let_go:
                pipe.hdel(presence.held_key(), *let_go)
            pipe.execute()
        except redis.RedisError as exc:  # the poll then just polls at its normal rate
            log.warning("watcher cannot record the nodes it holds: %s", exc)

    def stop(self) -> None:
        self.stopping.set()
        for stream in list(getattr(self, "streams", {}).values()):
            stream.yielded = True  # not a stopped instance: its sessions stay for the next watcher to re-read
            stream.close()  # wakes the thread's wait on its channels
        for watcher in self.watchers.values():
            watcher.stop()
        for watcher in self.watchers.values():
            watcher.join(timeout=10)
