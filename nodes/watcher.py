"""The session watcher: who is online, pushed by the nodes instead of polled.

A long-running process (``manage.py watch_sessions``, in the Procfile) holds, for every ready node of its shard,
one SSH connection and on it each server instance's management interface with the real-time log on
(nodes/openvpn_mgmt.ClientStream: joins come as >CLIENT:ESTABLISHED, leaves as >LOG lines; why is explained there).
When it (re)connects to an instance it reads the client list and replaces that instance's sessions; a client
joining makes it read the list again at once (and once more a second later), a client leaving deletes its session
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
- The periodic status poll (LANHUB_STATUS_INTERVAL) stays, as the safety net and for link RTTs.
"""

from __future__ import annotations

import logging
import random
import select
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
WAIT = 5.0  # seconds a node's thread sleeps between looks at stops and missing instances, when nothing happens
RELIST_AFTER_JOIN = 1.0  # a second look at the list after a join, in case the first came a moment early
RELIST_AFTER_LEAVE = 6.0  # OpenVPN keeps a client that said goodbye listed for 5 s ("Delayed exit in 5 seconds")
REFRESH = 10.0  # seconds between looks at which nodes this shard should hold
# paramiko's transport thread wakes every 0.1 s to check whether it should end; 1,000 held connections would
# spend a core on that. The watcher ends its transports itself, so once a second is plenty.
TRANSPORT_CHECK = 1.0


class NodeWatcher(threading.Thread):
    """Holds one node's server instances' management interfaces until stopped."""

    def __init__(self, node_id: int, yields: dict[str, float], held: dict[str, openvpn_mgmt.ClientStream]):
        super().__init__(name=f"watch-node-{node_id}", daemon=True)
        self.node_id = node_id
        self.yields = yields  # interface key -> monotonic time of the last yield request (shared, read only)
        self.held = held  # interface key -> the stream holding it, so a yield request can close it at once
        self.stopping = threading.Event()
        self.connected = threading.Event()  # for tests and status: holding at least one interface

    def stop(self) -> None:
        self.stopping.set()

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
                self.connected.clear()
                if time.monotonic() - began > 60:
                    delay = BACKOFF_FIRST  # it held for a while: the next failure starts the backoff over
                self.stopping.wait(delay * random.uniform(0.8, 1.2))
                delay = min(BACKOFF_MAX, delay * 2)
        finally:
            connection.close()

    def _hold(self, node: Node) -> None:
        with open_connection(node) as c:
            c.open()
            c.transport.sock.settimeout(TRANSPORT_CHECK)
            streams: dict[str, openvpn_mgmt.ClientStream] = {}
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
                    self._read(node, streams)
            finally:
                for stream in streams.values():
                    self.held.pop(stream.key, None)
                    stream.close()

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
        ready = buffered or select.select(list(waiting), [], [], wait)[0]
        for channel in ready:
            instance, stream = waiting[channel]
            joined = False
            for event in stream.events(idle=0):
                key = (instance, event.common_name, event.real_address)
                if event.kind == "joined":
                    self.leaving.pop(key, None)  # a new connection from that address: the list decides
                    joined = True
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
                self._relist(node, instance, stream)
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

    def _relist(self, node: Node, instance: str, stream: openvpn_mgmt.ClientStream) -> None:
        try:
            rows = stream.client_list(timeout=3)
        except ProvisioningError:
            stream.close()  # the instance went away or the interface was taken: the loop reopens it
            return
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


class Shard:
    """The nodes of one shard (pk % count == index), each with its NodeWatcher, plus the yield listener."""

    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count
        self.watchers: dict[int, NodeWatcher] = {}
        self.yields: dict[str, float] = {}
        self.held: dict[str, openvpn_mgmt.ClientStream] = {}
        self.stopping = threading.Event()

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
        threading.Thread(target=self.listen_for_yields, name="watch-yields", daemon=True).start()
        try:
            while not self.stopping.is_set() and not (until and until()):
                close_old_connections()
                self.refresh()
                self.stopping.wait(REFRESH)
        finally:
            self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for watcher in self.watchers.values():
            watcher.stop()
        for watcher in self.watchers.values():
            watcher.join(timeout=10)
