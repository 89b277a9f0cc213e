#!/usr/bin/env python3
"""LanHub's LAN-discovery relay: carries game announcements (UDP broadcast and multicast) between the servers.

This file is shipped to every node as it is and runs there under the system's python3: standard library only,
no LanHub imports. Its config (JSON) is rendered by nodes/render.py; docs/discovery.md explains the design.

How a packet travels:
1. A player sends UDP to 255.255.255.255, to its subnet's broadcast address, or to a listed multicast group
   (the profile routes those into the tunnel). OpenVPN cannot route it to a client, so it writes it into its tun
   device (lh-udp / lh-tcp), where this relay reads it with a packet socket (a BPF filter lets only UDP to
   broadcast or multicast addresses reach Python). It keeps the packet only if it arrived from the instance's
   players (incoming, source in the instance's own pool) and goes to a listed port.
2. A per-player token bucket (packets and bytes per second) drops floods.
3. The origin relay delivers it to each local player except the sender and sends one copy, by unicast over the
   LAN, to every other node's relay. A relay that receives a copy delivers it locally and never forwards it: with
   exactly one origin per packet, every player gets each packet once whatever the shape of the links.
4. Local delivery is a UDP packet with the ORIGINAL source address and ports, addressed to the player's VPN
   address, written through a raw socket into the node's routing: OpenVPN routes it to the player by destination.
   Games listen on 0.0.0.0:port, so they accept it, and their unicast reply goes straight to the sender.

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
import selectors
import signal
import socket
import struct
import sys
import time

MAGIC = b"LHR1"  # relay-to-relay message: MAGIC + src(4) + dst(4) + sport(2) + dport(2) + payload
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


class Config:
    def __init__(self, data: dict):
        self.node = data["node"]
        self.address = data["address"]
        self.port = int(data["port"])
        self.peers = {int(ipaddress.IPv4Address(p)) for p in data["peers"]}
        self.instances = [Instance(s) for s in data["instances"]]
        self.link_prefix = data.get("link_prefix", "link-")
        ports = set()
        for low, high in data["ports"]:
            ports.update(range(int(low), int(high) + 1))
        self.ports = frozenset(ports)
        self.groups = frozenset(int(ipaddress.IPv4Address(g)) for g in data["groups"])
        rate = data["rate"]
        self.rate_packets, self.rate_bytes = float(rate["packets"]), float(rate["bytes"])
        self.burst_packets = float(rate.get("burst_packets", self.rate_packets))
        self.burst_bytes = float(rate.get("burst_bytes", self.rate_bytes))


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


# --- the relay -----------------------------------------------------------------------------------------------


class Relay:
    def __init__(self, config: Config, *, config_path: str | None = None):
        self.config, self.config_path = config, config_path
        self.selector = selectors.DefaultSelector()
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.listener = self._listen()
        self.selector.register(self.listener, selectors.EVENT_READ, self._from_peer)
        self.buckets: dict[int, Bucket] = {}
        self.own = int(ipaddress.IPv4Address(config.address))
        self.counters = {"relayed": 0, "delivered": 0, "limited": 0, "ignored": 0, "peer_refused": 0}
        self.next_scan = 0.0
        self.running = True

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # The address is the UDP server's own tun address: FREEBIND lets the relay bind before (or while) that
        # instance is down; PKTINFO tells which device a message came in on (only LanHub tunnels count).
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.address, self.config.port))
        sock.setblocking(False)
        return sock

    def scan(self, now: float) -> None:
        """Open the packet socket of every device that (re)appeared; re-read status files that changed.

        A config file that is gone means LanHub was taken off this server (node deleted): the relay stops, and its
        systemd unit's ConditionPathExists keeps it from starting again."""
        if self.config_path and not os.path.exists(self.config_path):
            log.info("%s is gone: LanHub was removed from this server, stopping", self.config_path)
            self.running = False
            return
        for inst in self.config.instances:
            try:
                index = socket.if_nametoindex(inst.device)
            except OSError:
                index = 0
            if index != inst.ifindex:
                self._close(inst)
                if index:
                    self._open(inst, index)
            try:
                mtime = os.stat(inst.status).st_mtime
            except OSError:
                mtime = -1.0
            if mtime != inst.status_mtime:
                inst.status_mtime = mtime
                inst.players = read_players(inst.status, inst.pool, self.config.link_prefix)
        self.next_scan = now + RESCAN_S

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
        self.selector.register(sock, selectors.EVENT_READ, lambda s=sock, i=inst: self._from_device(s, i))
        log.info("listening on %s (%s)", inst.device, inst.pool)

    def _close(self, inst: Instance) -> None:
        if inst.sock is not None:
            self.selector.unregister(inst.sock)
            inst.sock.close()
            log.info("%s went away", inst.device)
        inst.sock, inst.ifindex = None, 0

    def _from_device(self, sock: socket.socket, inst: Instance) -> None:
        for _ in range(256):  # bounded per wake-up so the peer socket and the rescan get their turn
            try:
                packet, address = sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    self._close(inst)
                    return
                raise
            if address[2] == PACKET_OUTGOING:
                continue  # our own deliveries leaving through this device
            self.originate(inst, packet, time.monotonic())

    def originate(self, inst: Instance, packet: bytes, now: float) -> None:
        cfg = self.config
        parsed = parse_udp(packet)
        if parsed is None:
            return
        src, dst, sport, dport, payload = parsed
        if not (dst == 0xFFFFFFFF or dst == inst.broadcast or dst in cfg.groups) or dport not in cfg.ports \
                or not inst.low < src < inst.high or len(payload) > MAX_PAYLOAD:
            self.counters["ignored"] += 1
            return
        bucket = self.buckets.get(src)
        if bucket is None:
            if len(self.buckets) > 65536:
                self.buckets.clear()  # bounded memory; a flood of fresh sources cannot pass the pool check anyway
            bucket = self.buckets[src] = Bucket(cfg, now)
        if not bucket.take(cfg, len(payload), now):
            self.counters["limited"] += 1
            return
        self.counters["relayed"] += 1
        message = MAGIC + src.to_bytes(4, "big") + dst.to_bytes(4, "big") + struct.pack("!HH", sport, dport) + payload
        message_sum = _checksum(message)
        for peer in cfg.peers:
            self._send(build_udp(self.own, peer, cfg.port, cfg.port, message, message_sum), peer)
        self.deliver(src, sport, dport, payload)

    def _from_peer(self) -> None:
        for _ in range(256):
            try:
                data, ancillary, _, address = self.listener.recvmsg(2048, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            if not self._trusted(address[0], ancillary) or len(data) < 16 or data[:4] != MAGIC:
                self.counters["peer_refused"] += 1
                continue
            src, dst = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
            sport, dport = struct.unpack_from("!HH", data, 12)
            if dport in self.config.ports:  # a peer rendered from an older game list must not widen ours
                self.deliver(src, sport, dport, data[16:])

    def _trusted(self, source: str, ancillary) -> bool:
        """A peer node's relay address, arriving on a LanHub tunnel (OpenVPN's iroute check stops players from
        forging it inside the LAN; the device check stops it arriving from outside)."""
        if int.from_bytes(socket.inet_aton(source), "big") not in self.config.peers:
            return False
        for level, kind, data in ancillary:
            if level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= 4:
                index = struct.unpack_from("i", data)[0]
                try:
                    return socket.if_indextoname(index).startswith("lh")
                except OSError:
                    return False
        return False

    def deliver(self, src: int, sport: int, dport: int, payload: bytes) -> None:
        """One unicast copy to every local player but the sender, with the sender's address as source."""
        payload_sum = _checksum(payload)
        for inst in self.config.instances:
            for player in inst.players:
                if player != src:
                    self._send(build_udp(src, player, sport, dport, payload, payload_sum), player)
                    self.counters["delivered"] += 1

    def _send(self, packet: bytes, dst: int) -> None:
        try:
            self.raw.sendto(packet, (socket.inet_ntoa(dst.to_bytes(4, "big")), 0))
        except OSError as exc:  # no route yet (an instance restarting): discovery is best effort, like a LAN
            log.debug("send to %s failed: %s", socket.inet_ntoa(dst.to_bytes(4, "big")), exc)

    def run(self, *, until: float | None = None) -> None:
        self.scan(time.monotonic())
        while self.running and (until is None or time.monotonic() < until):
            now = time.monotonic()
            for key, _ in self.selector.select(max(0.0, min(self.next_scan - now, 1.0))):
                key.data()
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
        relay = Relay(config, config_path=args.config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    signal.signal(signal.SIGUSR1, lambda *_: log.info("counters %s", json.dumps(relay.counters)))
    log.info("relay of %s on %s:%d, %d peers", config.node, config.address, config.port, len(config.peers))
    relay.run()
    log.info("stopped; counters %s", json.dumps(relay.counters))
    return 0


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
