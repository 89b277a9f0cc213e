#!/usr/bin/env python3
"""LanHub's LAN-discovery relay: carries game announcements (UDP broadcast and multicast) between the servers.

This file is shipped to every node as it is and runs there under the system's python3: standard library only,
no LanHub imports. Its config (JSON) is rendered by nodes/render.py; docs/discovery.md explains the design.

How a packet travels:
1. A player sends UDP to 255.255.255.255, to its subnet's broadcast address, or to a listed multicast group
   (the profile routes those into the tunnel). OpenVPN cannot route it to a client, so it writes it into its tun
   device (lh-udp / lh-tcp).
2. The kernel's fan-out, an nftables table this relay writes (nft_rules): a packet from the instance's own players
   to a listed port passes a per-player rate limit and is copied once to each other player this relay knows of,
   with the sender's address as source, while OpenVPN's write is still being processed (no process wakes up).
3. A relay knows only its neighbours on the LAN's relay tree (relay.json "peers": the node its routes to the LAN
   primary go through, and the nodes whose routes to the primary go through it; nodes/render.py), so a node joining
   changes relay.json on its tree neighbour only. Each relay tells each neighbour which players lie on its own side
   of the tree (its own players plus those its other neighbours reported: PLAYERS messages, on change and every few
   seconds). A neighbour's side is in the kernel's table once its list is here (the LAN routes each copy like
   unicast from the sender: no relay anywhere wakes up). For a neighbour whose list it does not hold, the relay
   itself reads the announcements (a packet socket; a BPF filter lets only UDP to broadcast or multicast addresses
   reach Python) and sends one copy to that neighbour's relay, which delivers it to its players and spreads it the
   same way to its other neighbours (split horizon). A tree has one path between any two nodes, so every player
   gets each packet once, whatever cycles the links themselves have. A hop limit bounds a copy's travel while two
   nodes' configs disagree during a re-plan.
4. Without nftables the relay does it all itself, the same way: the checks, a token bucket per player, and each
   copy (the ORIGINAL source address and ports, addressed to the player's VPN address) written through a raw
   socket into the node's routing. Games listen on 0.0.0.0:port, so they accept copies, and their unicast reply
   goes straight to the sender.

Which players are local is read from the instances' status files (rewritten every few seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

MAGIC = b"LHR2"  # relay-to-relay message: MAGIC + src(4) + dst(4) + sport(2) + dport(2) + hops left(1) + payload
PLAYERS = b"LHP2"  # the players on the sender's side of the tree, to a neighbour: PLAYERS + 4 bytes per player
MAX_HOPS = 32  # a relayed copy crosses at most this many relays (deeper than any planned tree)
MAX_LIST = 16_000  # players in one PLAYERS message (64 kB); a side with more is reached through its relay
PLAYERS_EVERY_S = 5.0  # a relay re-sends its list this often (and at once when it changes)
PLAYERS_VALID_S = 3 * PLAYERS_EVERY_S  # a peer's list not refreshed for this long is forgotten
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
IP_FREEBIND = 15
IP_PKTINFO = 8
RESCAN_S = 1.0  # how often devices are re-opened (an instance restarted) and status files re-read
MAX_PAYLOAD = 1472

log = logging.getLogger("lanhub-relay")


# --- configuration -------------------------------------------------------------------------------------------


class Instance:
    """One OpenVPN server instance of this node: its tun device, its pool and its status file."""

    def __init__(self, spec: dict):
        self.device = spec["device"]
        self.pool = ipaddress.IPv4Network(spec["pool"])
        self.status = spec["status"]
        self.broadcast = int(self.pool.broadcast_address)
        self.low, self.high = int(self.pool.network_address) + 1, self.broadcast - 1
        self.gateway = self.low  # "server <net> <mask>" takes the first address itself
        self.sock: socket.socket | None = None
        self.ifindex = 0
        self.status_mtime = -1.0
        self.players: set[int] = set()
        self.targets: tuple[Target, ...] = ()  # the players, ready to send to (built when the status file changes)

    def set_players(self, players: set[int]) -> None:
        self.players = players
        self.targets = tuple(Target(p) for p in sorted(players))


class Target:
    """One local player as the hot path needs it: its address as an int, as the 4 header bytes, as the 16-bit sum
    the UDP checksum adds for it, and as a socket address. Computed once per status change, not per packet."""

    __slots__ = ("address", "raw", "word_sum", "sockaddr")

    def __init__(self, address: int):
        self.address = address
        self.raw = address.to_bytes(4, "big")
        self.word_sum = (address >> 16) + (address & 0xFFFF)
        self.sockaddr = (socket.inet_ntoa(self.raw), 0)


class Config:
    def __init__(self, data: dict):
        self.node = data["node"]
        self.address = data["address"]
        self.port = int(data["port"])
        self.peers = {int(ipaddress.IPv4Address(p)) for p in data["peers"]}
        # The hot path needs them as socket addresses (sending) and as strings (checking a message's source).
        self.peer_names = frozenset(str(ipaddress.IPv4Address(p)) for p in self.peers)
        self.peer_sockaddrs = tuple((str(ipaddress.IPv4Address(p)), self.port) for p in sorted(self.peers))
        self.instances = [Instance(s) for s in data["instances"]]
        self.link_prefix = data.get("link_prefix", "link-")
        ports = set()
        for low, high in data["ports"]:
            ports.update(range(int(low), int(high) + 1))
        self.ports = frozenset(ports)
        self.port_ranges = _ranges(self.ports)  # merged: nftables refuses overlapping intervals in one set
        self.groups = frozenset(int(ipaddress.IPv4Address(g)) for g in data["groups"])
        rate = data["rate"]
        self.rate_packets, self.rate_bytes = float(rate["packets"]), float(rate["bytes"])
        self.burst_packets = float(rate.get("burst_packets", self.rate_packets))
        self.burst_bytes = float(rate.get("burst_bytes", self.rate_bytes))


def _ranges(values) -> tuple[tuple[int, int], ...]:
    """Sorted integers as (low, high) runs."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return tuple((low, high) for low, high in runs)


# --- the filter in the kernel: only UDP to 255.255.255.255, a subnet broadcast (x.x.255.255-style: any address
# whose host bits are all ones is checked in Python) or 224.0.0.0/4 reaches Python -----------------------------


def bpf_program(broadcast: int) -> bytes:
    """Classic BPF on a SOCK_DGRAM packet socket of a tun device: offset 0 is the IPv4 header."""
    insns = [
        (0x30, 0, 0, 9),             # ldb [9]              protocol
        (0x15, 0, 6, 17),            # jeq #17 else drop
        (0x20, 0, 0, 16),            # ld  [16]             destination
        (0x15, 3, 0, 0xFFFFFFFF),    # jeq 255.255.255.255 -> accept
        (0x15, 2, 0, broadcast),     # jeq subnet broadcast -> accept
        (0x54, 0, 0, 0xF0000000),    # and #0xf0000000
        (0x15, 0, 1, 0xE0000000),    # jeq 224/4 -> accept else drop
        (0x06, 0, 0, 0xFFFF),        # accept
        (0x06, 0, 0, 0),             # drop
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", count, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --- packets -------------------------------------------------------------------------------------------------


def parse_udp(packet: bytes):
    """(src, dst, sport, dport, payload) as ints and bytes, or None for anything but an unfragmented UDP packet."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 17:
        return None
    ihl = (packet[0] & 0x0F) * 4
    flags_fragment = int.from_bytes(packet[6:8], "big")
    if flags_fragment & 0x3FFF:  # more-fragments or an offset: discovery packets are small, skip the rare rest
        return None
    src, dst = int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")
    sport, dport, length = struct.unpack_from("!HHH", packet, ihl)
    payload = packet[ihl + 8: ihl + length] if length >= 8 else b""
    return src, dst, sport, dport, payload


def _checksum(data: bytes) -> int:
    """One's-complement sum of 16-bit words: summing the bytes as one big integer in 64-bit-ish chunks is the
    fastest way in pure Python (the carries fold the same way)."""
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big")
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16) if total.bit_length() <= 32 else _fold(total)
    return total


def _fold(value: int) -> int:
    total = 0
    while value:
        total += value & 0xFFFFFFFFFFFFFFFF
        value >>= 64
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def build_udp(src: int, dst: int, sport: int, dport: int, payload: bytes, payload_sum: int | None = None) -> bytes:
    """An IPv4+UDP packet; the kernel fills in the IP checksum, identification and total length.

    ``payload_sum`` (``_checksum(payload)``) lets one payload sent to many players be summed once: the one's
    complement sum is additive, and an even-length header keeps the payload's words aligned."""
    length = 8 + len(payload)
    s, d = src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    header = s + d + struct.pack("!BBHHHHH", 0, 17, length, sport, dport, length, 0)
    total = _checksum(header) + (_checksum(payload) if payload_sum is None else payload_sum)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    check = 0xFFFF - total or 0xFFFF
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, 17, 0, s, d)
    return ip + struct.pack("!HHHH", sport, dport, length, check) + payload


def read_players(path: str, pool: ipaddress.IPv4Network, link_prefix: str) -> set[int]:
    """VPN addresses of the players in an OpenVPN status file (versions 1-3), links and iroutes left out."""
    players = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return players
    in_table = False
    for line in lines:
        if line.startswith("ROUTING TABLE"):
            in_table = True
            continue
        if line.startswith(("GLOBAL STATS", "END")):
            in_table = False
        fields = line.replace("\t", ",").split(",")
        if fields[0] == "ROUTING_TABLE":
            fields = fields[1:]
        elif not in_table or fields[0] == "Virtual Address":
            continue
        if len(fields) < 2 or fields[1].startswith(link_prefix):
            continue
        try:
            address = ipaddress.IPv4Address(fields[0])
        except ValueError:
            continue  # an iroute ("10.249.0.0/16") or a MAC address
        if address in pool:
            players.add(int(address))
    return players


class Bucket:
    """Token bucket of one player: ``rate`` packets and bytes per second, up to ``burst`` of each saved."""

    __slots__ = ("packets", "bytes", "stamp")

    def __init__(self, config: Config, now: float):
        self.packets, self.bytes, self.stamp = config.burst_packets, config.burst_bytes, now

    def take(self, config: Config, size: int, now: float) -> bool:
        elapsed = now - self.stamp
        self.stamp = now
        self.packets = min(config.burst_packets, self.packets + elapsed * config.rate_packets)
        self.bytes = min(config.burst_bytes, self.bytes + elapsed * config.rate_bytes)
        if self.packets < 1 or self.bytes < size:
            return False
        self.packets -= 1
        self.bytes -= size
        return True


# --- the fan-out in the kernel (nftables) ------------------------------------------------------------------------
# The relay is the control plane: it knows the players (status files, its peers' lists) and writes them into one
# nftables table; the kernel copies each announcement while OpenVPN's write into the tun device is still being
# processed, so no process wakes up for it. docs/discovery.md ("Where the time went") has the measurements.

NFT_TABLE = "lanhub_relay"
NFT_SET_TIMEOUT = "1m"  # a player's rate-limit state is kept this long after its last announcement


def _ip(address: int) -> str:
    return socket.inet_ntoa(address.to_bytes(4, "big"))


def nft_rules(config: Config, targets) -> str:
    """``nft -f`` input that replaces both chains' rules in one transaction (the rate-limit sets are kept).

    prerouting: what the Python path's checks accept (an instance's own players, sending to 255.255.255.255, to
    that instance's subnet broadcast or to a listed group, on a listed port, unfragmented) jumps to ``announce``.
    announce: the per-player limits (packets, then IP-packet bytes), a fresh TTL, then one rule per player: the packet's
    destination becomes that player (the kernel fixes the IP and UDP checksums), and ``dup`` sends a copy of it
    through the node's routing, as the relay's raw socket did; the source (the sender) is kept, and the sender is
    skipped. The original is dropped at the end: every player got a copy, and nothing on the node listens.

    The copies for players on other nodes come first: they have the links and two more OpenVPN processes ahead of
    them, while a local copy is one tun write away. The kernel makes the copies one after the other inside the
    sending OpenVPN's write, and a copy into another instance's device (a local player on lh-tcp) wakes that
    instance's OpenVPN there and then; made first, that cost 10-25 us on the way of every remote copy (measured hop
    by hop, docs/discovery.md)."""
    table = f"ip {NFT_TABLE}"
    lines = [f"flush chain {table} prerouting", f"flush chain {table} announce"]
    ports = ", ".join(f"{low}" if low == high else f"{low}-{high}" for low, high in config.port_ranges)
    groups = "".join(f", {_ip(g)}" for g in sorted(config.groups))
    for inst in config.instances if ports else ():
        lines.append(f'add rule {table} prerouting iifname "{inst.device}" ip saddr {_ip(inst.low + 1)}-'
                     f"{_ip(inst.high - 1)} ip daddr {{ 255.255.255.255, {_ip(inst.broadcast)}{groups} }} "
                     f"udp dport {{ {ports} }} ip frag-off & 0x3fff == 0 jump announce")
    rate = [max(1, round(v)) for v in (config.rate_packets, config.burst_packets, config.rate_bytes,
                                       config.burst_bytes)]
    lines += [f"add rule {table} announce udp length > {MAX_PAYLOAD + 8} drop",
              # Games send multicast with a TTL of 1 (Java's MulticastSocket, Minecraft): kept, the copy would die
              # at the first router on its way to another node. The relay's own copies leave with 64 too.
              f"add rule {table} announce ip ttl set 64",
              f"add rule {table} announce update @rate_packets {{ ip saddr limit rate over {rate[0]}/second burst "
              f"{rate[1]} packets }} drop",
              f"add rule {table} announce update @rate_bytes {{ ip saddr limit rate over {rate[2]} bytes/second burst "
              f"{rate[3]} bytes }} drop"]
    pools = [(inst.low, inst.high) for inst in config.instances]
    local = {a for a in set(targets) if any(low <= a <= high for low, high in pools)}
    for address in sorted(set(targets) - local) + sorted(local):
        player = _ip(address)
        lines.append(f"add rule {table} announce ip saddr != {player} ip daddr set {player} dup to {player}")
    lines.append(f"add rule {table} announce drop")
    return "\n".join(lines) + "\n"


class KernelFanout:
    """Writes and removes the relay's nftables table with the ``nft`` command (a few times a minute at most: when
    players come and go). ``start()`` creates an empty table, replacing one a crashed relay left behind."""

    def __init__(self, nft: str = "nft"):
        self.nft = nft

    def start(self) -> bool:
        table = f"ip {NFT_TABLE}"
        sets = "".join(f"  set {name} {{ type ipv4_addr; size 65535; flags dynamic,timeout; "
                       f"timeout {NFT_SET_TIMEOUT}; }}\n" for name in ("rate_packets", "rate_bytes"))
        return self.apply(f"table {table}\ndelete table {table}\ntable {table} {{\n{sets}"
                          "  chain prerouting { type filter hook prerouting priority raw; policy accept; }\n"
                          "  chain announce { }\n}\n")

    def apply(self, text: str) -> bool:
        try:
            done = subprocess.run([self.nft, "-f", "-"], input=text, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nft failed: %s", exc)
            return False
        if done.returncode != 0:
            log.warning("nft refused the rules: %s", done.stderr.strip()[-500:])
        return done.returncode == 0

    def stop(self) -> None:
        self.apply(f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")


# --- the relay -----------------------------------------------------------------------------------------------

_IP = struct.Struct("!BxHxxHxBxxII")   # version+ihl, total length, flags+fragment, protocol, source, destination
_UDP = struct.Struct("!HHH")            # source port, destination port, length
_PEER = struct.Struct("!4sIIHHB")       # MAGIC, source, destination, source port, destination port, hops left
_RAW_IP = struct.Struct("!BBHHHBBH4s")  # an IPv4 header up to its source address (the destination follows)


class _Copies:
    """One announcement, ready to be written to many players: the UDP checksum is the one's complement of the
    pseudo-header (source, destination, protocol, length), the header and the payload, and everything but the
    destination is the same for every player, so it is summed once and each player adds its own share."""

    __slots__ = ("send_raw", "src", "common", "head", "ports", "payload")

    def __init__(self, raw: socket.socket, src: int, sport: int, dport: int, payload: bytes):
        length = 8 + len(payload)
        self.send_raw, self.src, self.payload = raw.sendto, src, payload
        self.common = _checksum(payload) + (src >> 16) + (src & 0xFFFF) + 17 + length + sport + dport + length
        self.head = _RAW_IP.pack(0x45, 0, 20 + length, 0, 0x4000, 64, 17, 0, src.to_bytes(4, "big"))
        self.ports = _UDP.pack(sport, dport, length)

    def send(self, targets) -> int:
        """Write a copy to each target but the sender; returns how many were written."""
        sent, src, common, head, ports, payload, send = 0, self.src, self.common, self.head, self.ports, \
            self.payload, self.send_raw
        for target in targets:
            if target.address == src:
                continue
            total = common + target.word_sum
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            try:
                send(head + target.raw + ports + (0xFFFF - total or 0xFFFF).to_bytes(2, "big") + payload,
                     target.sockaddr)
            except OSError as exc:  # no route yet (an instance or a link restarting): best effort, like a LAN
                log.debug("send to %s failed: %s", target.sockaddr[0], exc)
            sent += 1
        return sent


class Relay:
    """The event loop: one epoll over the tun devices' packet sockets and the peer socket.

    The per-packet path is written for latency and CPU (benchmarks/discovery.py): one parse with precompiled
    structs, set lookups only, the peers' socket addresses and each player's header bytes and checksum share
    computed when the config or a status file changes, peer copies sent through the bound UDP socket (the kernel
    builds the header and checksum), and the UDP checksum of a local copy derived from the payload's sum, taken
    once per packet, plus that player's share."""

    def __init__(self, config: Config, *, config_path: str | None = None, fanout: KernelFanout | None = None):
        self.config, self.config_path = config, config_path
        # The kernel's fan-out (nftables), when the node has it: it then copies every announcement to every player
        # whose address this relay has written into it, and the relay itself only sends copies through the relays
        # of peers whose players it does not know (kernel_peers: the peers whose players are in the kernel now).
        self.fanout, self.kernel_active = fanout, bool(fanout and fanout.start())
        self.kernel_text: str | None = None
        self.kernel_peers: frozenset[str] = frozenset()
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.listener = self._listen()
        self._watch(self.listener, self._from_peer)
        self.buckets: dict[int, Bucket] = {}
        self.own = int(ipaddress.IPv4Address(config.address))
        self.tunnel_indexes: dict[int, bool] = {}  # ifindex -> is a LanHub tunnel (cleared on every rescan)
        # Each peer's players, from its PLAYERS messages: peer address -> (valid until, players ready to send to).
        self.remote: dict[str, tuple[float, tuple[Target, ...]]] = {}
        self.sent_lists: dict[str, bytes] = {}  # the PLAYERS message last sent to each neighbour
        self.next_players = 0.0
        self.counters = {"relayed": 0, "delivered": 0, "direct": 0, "via_peer": 0, "limited": 0, "ignored": 0,
                         "peer_refused": 0, "reloaded": 0, "kernel_updates": 0}
        self.config_mtime = self._config_mtime()
        self.next_scan = 0.0
        self.running = True
        # Signals (SIGHUP: reload now; SIGTERM) interrupt the poll through this pair, not after its timeout.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self._watch(self.wake_r, self._woken)

    def _woken(self) -> None:
        try:
            while self.wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def request_reload(self, *_) -> None:
        """SIGHUP: re-read the config at once (the next loop turn scans, whatever the file's mtime says)."""
        self.config_mtime = None
        self.next_scan = 0.0

    def _watch(self, sock: socket.socket, handler) -> None:
        self.handlers[sock.fileno()] = handler
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _unwatch(self, sock: socket.socket) -> None:
        self.handlers.pop(sock.fileno(), None)
        try:
            self.epoll.unregister(sock.fileno())
        except (OSError, ValueError):
            pass

    def _listen(self, config: Config | None = None) -> socket.socket:
        config = config or self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # The address is the UDP server's own tun address: FREEBIND lets the relay bind before (or while) that
        # instance is down; PKTINFO tells which device a message came in on (only LanHub tunnels count).
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.address, config.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _config_mtime(self) -> float | None:
        if not self.config_path:
            return None
        try:
            return os.stat(self.config_path).st_mtime_ns
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read a changed config in place (peers, ports, groups, rate, instances, even its own address): a node
        added to or removed from the LAN, or a new game list, changes relay.json on every node, and no relay
        restarts for it (provisioning sends SIGHUP; a changed mtime is noticed within a second anyway). A config
        that does not parse is logged and the running one kept."""
        try:
            with open(self.config_path, encoding="utf-8") as handle:
                config = Config(json.load(handle))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("kept the running config: cannot read %s: %s", self.config_path, exc)
            return False
        if (config.address, config.port) != (self.config.address, self.config.port):
            try:
                listener = self._listen(config)
            except OSError as exc:
                log.error("kept the running config: cannot listen on %s:%d: %s", config.address, config.port, exc)
                return False
            self._unwatch(self.listener)
            self.listener.close()
            self.listener = listener
            self._watch(listener, self._from_peer)
            self.own = int(ipaddress.IPv4Address(config.address))
        old = {inst.device: inst for inst in self.config.instances}
        for inst in config.instances:
            before = old.pop(inst.device, None)
            if before is not None and before.pool == inst.pool and before.status == inst.status:
                inst.sock, inst.ifindex = before.sock, before.ifindex  # keep the open packet socket and players
                inst.status_mtime, inst.players, inst.targets = before.status_mtime, before.players, before.targets
                if inst.sock is not None:
                    self.handlers[inst.sock.fileno()] = self._device_handler(inst.sock, inst)
            elif before is not None:
                self._close(before)
        for gone in old.values():
            self._close(gone)
        self.config = config
        self.buckets.clear()  # a changed rate applies at once
        self.counters["reloaded"] += 1
        log.info("reloaded %s: %d peers, %d ports, %d groups", self.config_path, len(config.peers),
                 len(config.ports), len(config.groups))
        return True

    def scan(self, now: float) -> None:
        """Open the packet socket of every device that (re)appeared; re-read status files that changed; reload a
        changed config.

        A config file that is gone means LanHub was taken off this server (node deleted): the relay stops, and its
        systemd unit's ConditionPathExists keeps it from starting again."""
        if self.config_path:
            mtime = self._config_mtime()
            if mtime is None:
                log.info("%s is gone: LanHub was removed from this server, stopping", self.config_path)
                self.running = False
                return
            if mtime != self.config_mtime:
                self.config_mtime = mtime
                self.reload()
        self.tunnel_indexes.clear()
        for inst in self.config.instances:
            try:
                mtime = os.stat(inst.status).st_mtime
            except OSError:
                mtime = -1.0
            if mtime != inst.status_mtime:
                inst.status_mtime = mtime
                inst.set_players(read_players(inst.status, inst.pool, self.config.link_prefix))
        self.share_players(now)
        for peer, (valid_until, _) in list(self.remote.items()):
            if valid_until < now or peer not in self.config.peer_names:
                del self.remote[peer]  # that node is gone or its relay stopped: back to copies through its relay
        self.sync_kernel(now)
        self.watch_devices()
        self.next_scan = now + RESCAN_S

    def watch_devices(self) -> None:
        """Open the packet socket of every device that (re)appeared. With the kernel's fan-out covering every peer
        the relay has nothing to do with an announcement, so it reads none (no wake-ups, no CPU at any rate)."""
        wanted = not self.kernel_active or not self.config.peer_names <= self.kernel_peers
        for inst in self.config.instances:
            try:
                index = socket.if_nametoindex(inst.device) if wanted else 0
            except OSError:
                index = 0
            if index != inst.ifindex:
                self._close(inst)
                if index:
                    self._open(inst, index)

    def sync_kernel(self, now: float) -> None:
        """Write this node's players and the players of every peer whose list is valid into the kernel's fan-out,
        when they changed. One player gets each announcement once: from the kernel if its node's list is in the
        kernel, else through its node's relay (originate), never both."""
        if not self.kernel_active:
            return
        covered = frozenset(p for p, (valid, _) in self.remote.items() if valid >= now and p in self.config.peer_names)
        targets = [t.address for inst in self.config.instances for t in inst.targets]
        targets += [t.address for peer in covered for t in self.remote[peer][1]]
        text = nft_rules(self.config, targets)
        if text == self.kernel_text and covered == self.kernel_peers:
            return
        if covered != self.kernel_peers:
            # What is queued was copied by the rules in place now: handle it with the peers they cover (a packet
            # the kernel copies while the new rules are being committed can be missed, never doubled).
            for inst in self.config.instances:
                if inst.sock is not None:
                    self._from_device(inst.sock, inst)
        if self.fanout.apply(text):
            self.kernel_text, self.kernel_peers = text, covered
            self.counters["kernel_updates"] += 1
            return
        log.error("the kernel's fan-out could not be updated: removed, the relay sends every copy itself")
        self.fanout.stop()
        self.kernel_active, self.kernel_text, self.kernel_peers = False, None, frozenset()

    def share_players(self, now: float, *, force: str | None = None) -> None:
        """Tell each neighbour which players lie on this side of the tree: this node's own and those the other
        neighbours reported (at once when that changed, else every few seconds), so that relays can send
        announcements straight to them. ``force``: a neighbour that gets its list now, changed or not."""
        periodic = now >= self.next_players
        if periodic:
            self.next_players = now + PLAYERS_EVERY_S
        own = [t.raw for inst in self.config.instances for t in inst.targets]
        for peer in self.config.peer_sockaddrs:
            players = set(own)
            for other, (valid_until, targets) in self.remote.items():
                if other != peer[0] and valid_until >= now:
                    players.update(t.raw for t in targets)
            if len(players) > MAX_LIST:
                continue  # too many to list: the neighbour's copy of this side expires and it sends through here
            message = PLAYERS + b"".join(sorted(players))
            if not periodic and peer[0] != force and message == self.sent_lists.get(peer[0]):
                continue
            self.sent_lists[peer[0]] = message
            try:
                self.listener.sendto(message, peer)
            except OSError as exc:
                log.debug("players to %s failed: %s", peer[0], exc)

    def learn_players(self, peer: str, data: bytes, now: float) -> None:
        """The players on a neighbour's side of the tree. Addresses inside this node's own pools are not taken from
        anyone. A change goes on to the other neighbours at once."""
        addresses = [int.from_bytes(data[i:i + 4], "big") for i in range(4, len(data) - 3, 4)]
        own = [(inst.low, inst.high) for inst in self.config.instances]
        targets = tuple(Target(a) for a in sorted(set(addresses))
                        if not any(low <= a <= high for low, high in own))
        before = self.remote.get(peer)
        self.remote[peer] = (now + PLAYERS_VALID_S, targets)
        if before is None or [t.address for t in before[1]] != [t.address for t in targets]:
            self.sync_kernel(now)
            # A relay that (re)started learns this side's players at once, not a few seconds later.
            self.share_players(now, force=peer if before is None else None)

    def _open(self, inst: Instance, index: int) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        try:
            attach_filter(sock, bpf_program(inst.broadcast))
            sock.bind((inst.device, ETH_P_IP))
        except OSError as exc:
            sock.close()
            log.warning("cannot open %s: %s", inst.device, exc)
            return
        sock.setblocking(False)
        inst.sock, inst.ifindex = sock, index
        self._watch(sock, self._device_handler(sock, inst))
        log.info("listening on %s (%s)", inst.device, inst.pool)

    def _device_handler(self, sock: socket.socket, inst: Instance):
        return lambda: self._from_device(sock, inst)

    def _close(self, inst: Instance) -> None:
        if inst.sock is not None:
            self._unwatch(inst.sock)
            inst.sock.close()
            log.info("%s went away", inst.device)
        inst.sock, inst.ifindex = None, 0

    def _from_device(self, sock: socket.socket, inst: Instance) -> None:
        recv = sock.recvfrom
        for _ in range(256):  # bounded per wake-up so the peer socket and the rescan get their turn
            try:
                packet, address = recv(2048)  # the tun MTU is 1500; a longer (truncated) packet fails the parse
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    self._close(inst)
                    return
                raise
            if address[2] != PACKET_OUTGOING:  # outgoing: our own deliveries leaving through this device
                self.originate(inst, packet, time.monotonic())

    def originate(self, inst: Instance, packet: bytes, now: float) -> None:
        """A player's announcement read from an instance's tun device: check, limit, send to the peers first (they
        are further away), then deliver to this node's other players."""
        cfg = self.config
        if len(packet) < 28:
            return
        version_ihl, total, fragment, protocol, src, dst = _IP.unpack_from(packet)
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or protocol != 17 or fragment & 0x3FFF or total > len(packet) \
                or len(packet) < ihl + 8:
            return
        sport, dport, length = _UDP.unpack_from(packet, ihl)
        size = length - 8
        if not (dst == 0xFFFFFFFF or dst == inst.broadcast or dst in cfg.groups) or dport not in cfg.ports \
                or not inst.low < src < inst.high or not 0 <= size <= MAX_PAYLOAD or ihl + length > total:
            self.counters["ignored"] += 1
            return
        bucket = self.buckets.get(src)
        if bucket is None:
            if len(self.buckets) > 65536:
                self.buckets.clear()  # bounded memory; a flood of fresh sources cannot pass the pool check anyway
            bucket = self.buckets[src] = Bucket(cfg, now)
        if not bucket.take(cfg, size, now):
            self.counters["limited"] += 1
            return
        self.counters["relayed"] += 1
        payload = packet[ihl + 8: ihl + length]
        copies = _Copies(self.raw, src, sport, dport, payload)
        # With the kernel's fan-out, what reaches this point was copied by the kernel to this node's players and to
        # the sides whose lists it holds: only the other sides are left (through their relays).
        kernel = self.kernel_peers if self.kernel_active else None
        self._spread(copies, src, dst, sport, dport, payload, MAX_HOPS, now, None, skip=kernel or frozenset())
        if kernel is None:
            self.counters["delivered"] += copies.send(t for inst in cfg.instances for t in inst.targets)

    def _spread(self, copies, src, dst, sport, dport, payload, hops, now, came_from, skip=frozenset()) -> None:
        """One announcement to every neighbour's side of the tree but the one it came from (split horizon) and
        those in ``skip`` (the kernel has served them): straight to the players there when their list is known,
        else one copy to that neighbour's relay, which may send it on across ``hops - 1`` more relays."""
        message = None
        remote = self.remote
        for peer in self.config.peer_sockaddrs:
            if peer[0] == came_from or peer[0] in skip:
                continue
            known = remote.get(peer[0])
            if known is not None and known[0] >= now:
                # Straight to each of those players, as if the sender were there: the LAN routes it like any
                # unicast, and no relay on the far side has to wake up for it.
                self.counters["direct"] += copies.send(known[1])
                continue
            if message is None:
                message = _PEER.pack(MAGIC, src, dst, sport, dport, hops - 1) + payload
            try:  # that side's players are not known (yet): the neighbour's relay delivers and spreads it
                self.listener.sendto(message, peer)
                self.counters["via_peer"] += 1
            except OSError as exc:  # no route yet (a link reconnecting): discovery is best effort, like a LAN
                log.debug("send to %s failed: %s", peer[0], exc)

    def _from_peer(self) -> None:
        recv = self.listener.recvmsg
        cmsg_space = socket.CMSG_SPACE(12)
        for _ in range(256):
            try:
                data, ancillary, _, address = recv(65535, cmsg_space)
            except BlockingIOError:
                return
            if len(data) < 4 or not self._trusted(address[0], ancillary):
                self.counters["peer_refused"] += 1
                continue
            if data[:4] == PLAYERS:
                self.learn_players(address[0], data, time.monotonic())
                continue
            if len(data) < _PEER.size or data[:4] != MAGIC:
                self.counters["peer_refused"] += 1
                continue
            _, src, dst, sport, dport, hops = _PEER.unpack_from(data)
            if dport in self.config.ports:  # a peer rendered from an older game list must not widen ours
                self.deliver(src, sport, dport, data[_PEER.size:], dst=dst, hops=hops, came_from=address[0])

    def _trusted(self, source: str, ancillary) -> bool:
        """A peer node's relay address, arriving on a LanHub tunnel (OpenVPN's iroute check stops players from
        forging it inside the LAN; the device check stops it arriving from outside)."""
        if source not in self.config.peer_names:
            return False
        for level, kind, data in ancillary:
            if level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= 4:
                index = struct.unpack_from("i", data)[0]
                known = self.tunnel_indexes.get(index)
                if known is None:
                    try:
                        known = socket.if_indextoname(index).startswith("lh")
                    except OSError:
                        known = False
                    self.tunnel_indexes[index] = known
                return known
        return False

    def deliver(self, src: int, sport: int, dport: int, payload: bytes, *, dst: int = 0xFFFFFFFF, hops: int = 0,
                came_from: str | None = None) -> None:
        """A copy from a neighbour's relay: one unicast copy to every local player but the sender, with the sender's
        address as source, and on to the other neighbours' sides of the tree."""
        copies = _Copies(self.raw, src, sport, dport, payload)
        if hops:
            self._spread(copies, src, dst, sport, dport, payload, hops, time.monotonic(), came_from)
        self.counters["delivered"] += copies.send(t for inst in self.config.instances for t in inst.targets)

    def run(self, *, until: float | None = None) -> None:
        self.scan(time.monotonic())
        poll, handlers = self.epoll.poll, self.handlers
        while self.running and (until is None or time.monotonic() < until):
            timeout = self.next_scan - time.monotonic()
            if timeout > 0:
                for fd, _ in poll(min(timeout, 1.0)):
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler()
            if time.monotonic() >= self.next_scan:
                self.scan(time.monotonic())

    def stop(self, *_):
        self.running = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--log")
    parser.add_argument("--daemon", action="store_true", help="detach (hosts without systemd)")
    parser.add_argument("--check", action="store_true", help="read the config, print a summary and exit")
    parser.add_argument("--no-kernel", action="store_true",
                        help="send every copy from the relay (no nftables fan-out): for comparing the two")
    args = parser.parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as handle:
            config = Config(json.load(handle))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"lanhub-relay: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"node {config.node}: {len(config.peers)} peers, {len(config.ports)} ports, "
              f"{len(config.groups)} groups, {len(config.instances)} instances")
        return 0
    if args.daemon:
        _daemonize()
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s lanhub-relay %(levelname)s %(message)s")
    if args.pidfile:
        with open(args.pidfile, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
    try:
        relay = Relay(config, config_path=args.config, fanout=None if args.no_kernel else KernelFanout())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if not relay.kernel_active:
        log.info("no fan-out in the kernel (nftables missing or refused): the relay sends every copy itself")
    if not request_short_slice():
        log.info("running with the scheduler's default time slice (sched_setattr refused a %d ns slice)", SLICE_NS)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    signal.signal(signal.SIGHUP, relay.request_reload)
    signal.signal(signal.SIGUSR1, lambda *_: log.info("counters %s", json.dumps(relay.counters)))
    signal.set_wakeup_fd(relay.wake_w.fileno(), warn_on_full_buffer=False)
    log.info("relay of %s on %s:%d, %d peers", config.node, config.address, config.port, len(config.peers))
    try:
        relay.run()
    finally:
        if relay.kernel_active:
            relay.fanout.stop()  # no copies to players this relay no longer keeps track of
    log.info("stopped; counters %s", json.dumps(relay.counters))
    return 0


SLICE_NS = 100_000  # the scheduler slice the relay asks for: its work per wake-up is tens of microseconds
_SCHED_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr (SCHED_ATTR_SIZE_VER1, 56 bytes)
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def request_short_slice(nanoseconds: int = SLICE_NS) -> bool:
    """Ask the kernel's EEVDF scheduler (Linux 6.12+) for a short time slice: a waking task with a shorter slice than
    the running one preempts it instead of waiting for that one's slice (1.4 ms by default here) to run out, so an
    announcement is forwarded as soon as it arrives even when the node's CPUs are busy. The relay's work per wake-up
    is tens of microseconds, so a short slice costs nothing else. On older kernels the value is ignored, and where the
    call is unavailable the relay runs with the default slice (best effort: returns False)."""
    number = _SYS_SCHED_SETATTR.get(os.uname().machine)
    if number is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, 0, 0, 0, 0, nanoseconds, 0, 0, 0, 0))
        return libc.syscall(number, 0, attr, 0) == 0
    except (OSError, AttributeError):
        return False


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


if __name__ == "__main__":
    sys.exit(main())
