"""The relay's fan-out in the kernel, for real, inside a throwaway network namespace (run by tests/nodes/test_relay.py
through ``ip netns exec``; prints one JSON object).

Two tun devices stand in for OpenVPN: ``lh-udp`` (this node's UDP instance, pool 10.251.0.0/16) and ``lhl-peer``
(a link towards a peer node whose players are in 10.249.0.0/16). The probe writes a player's broadcast into
``lh-udp`` as OpenVPN would and reads what the kernel writes back into both devices, that is, what OpenVPN would
send on to the players. Bounded: every read waits at most 0.3 s.
"""

import fcntl
import importlib.util
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
ALICE, BOB, DAVE, PEER_PLAYER, PEER_RELAY = "10.251.1.1", "10.251.1.2", "10.251.1.3", "10.249.1.2", "10.249.0.1"


def load_relay(path: str):
    spec = importlib.util.spec_from_file_location("relay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


def with_ip_checksum(relay, packet: bytes) -> bytes:
    """OpenVPN writes complete packets into its tun device: the kernel checks the IP header's checksum."""
    header = bytearray(packet[:20])
    header[10:12] = (0xFFFF - relay._checksum(bytes(header))).to_bytes(2, "big")
    return bytes(header) + packet[20:]


def udp_checksum_ok(packet: bytes) -> bool:
    udp = packet[20:]
    data = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp)) + udp
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def drain(fds: dict[str, int], seconds: float = 0.3) -> list[dict]:
    """Every UDP packet the kernel wrote into the devices within ``seconds`` of the last one."""
    seen = []
    while select.select(list(fds.values()), [], [], seconds)[0]:
        for name, fd in fds.items():
            try:
                packet = os.read(fd, 2048)
            except BlockingIOError:
                continue
            if len(packet) >= 28 and packet[9] == 17:
                seen.append({"device": name, "src": socket.inet_ntoa(packet[12:16]),
                             "dst": socket.inet_ntoa(packet[16:20]), "ttl": packet[8],
                             "dport": struct.unpack("!H", packet[22:24])[0],
                             "payload": packet[28:].decode(errors="replace"), "checksum_ok": udp_checksum_ok(packet)})
    return seen


def main() -> None:
    relay = load_relay(sys.argv[1])
    fds = {"lh-udp": tun("lh-udp"), "lhl-peer": tun("lhl-peer")}
    for argv in (["ip", "addr", "add", "10.251.0.1/16", "dev", "lh-udp"], ["ip", "link", "set", "lh-udp", "up"],
                 ["ip", "addr", "add", "10.249.0.2/16", "dev", "lhl-peer"], ["ip", "link", "set", "lhl-peer", "up"],
                 ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        subprocess.run(argv, check=True)
    tmp = tempfile.mkdtemp()
    status = f"{tmp}/status"
    with open(status, "w") as handle:  # alice, bob and dave are this node's players
        handle.write("ROUTING TABLE\n" + "".join(f"{a},player-{a},198.51.100.1:1,now\n" for a in (ALICE, BOB, DAVE))
                     + "GLOBAL STATS\nEND\n")
    config = relay.Config({"node": "n", "address": "10.251.0.1", "port": 7400, "peers": [PEER_RELAY],
                           "instances": [{"device": "lh-udp", "pool": "10.251.0.0/16", "status": status}],
                           "ports": [[6112, 6112], [6113, 6113]], "groups": ["224.0.2.60"],
                           "rate": {"packets": 20, "bytes": 32000, "burst_packets": 40, "burst_bytes": 64000}})
    running = relay.Relay(config, fanout=relay.KernelFanout())
    result = {"kernel_active": running.kernel_active}
    now = time.monotonic()
    running.scan(now)
    # The peer's players are not known yet: the relay reads the device and sends copies through the peer's relay.
    result["reads_devices_before_the_peer_is_known"] = config.instances[0].sock is not None

    def announce(dst: str, dport: int, payload: str, src: str = ALICE) -> None:
        packet = bytearray(relay.build_udp(ip(src), ip(dst), 50000, dport, payload.encode()))
        if dst.startswith("224."):
            packet[8] = 1  # a game's multicast: TTL 1
        os.write(fds["lh-udp"], with_ip_checksum(relay, bytes(packet)))

    announce("255.255.255.255", 6112, "unknown-peer")
    time.sleep(0.05)
    running._from_device(config.instances[0].sock, config.instances[0])
    result["peer_unknown"] = drain(fds)
    running.learn_players(PEER_RELAY, relay.PLAYERS + socket.inet_aton(PEER_PLAYER), now)
    drain(fds)  # the reply with this node's list
    running.watch_devices()
    result["reads_devices_once_every_peer_is_in_the_kernel"] = config.instances[0].sock is not None
    result["rules"] = subprocess.run(["nft", "list", "table", "ip", relay.NFT_TABLE], capture_output=True,
                                     text=True).stdout
    for dst, dport, payload in (("255.255.255.255", 6112, "limited"), ("10.251.255.255", 6112, "directed"),
                                ("224.0.2.60", 6113, "group"), ("255.255.255.255", 7777, "unlisted"),
                                ("224.0.0.251", 6112, "other-group")):
        announce(dst, dport, payload)
        result[payload] = drain(fds)
    announce("255.255.255.255", 6112, "from-a-stranger", src="10.250.1.1")  # not from this instance's pool
    result["from-a-stranger"] = drain(fds)
    began = time.monotonic()
    for i in range(200):  # a flood from alice, well inside a second: the burst passes, then the rate holds
        announce("255.255.255.255", 6112, f"flood#{i}")
    result["flood_seconds"] = time.monotonic() - began
    result["flood"] = drain(fds)
    result["relay_sent_nothing_itself"] = running.counters["relayed"] == 1 and running.counters["delivered"] == 0
    running.fanout.stop()
    result["table_after_stop"] = subprocess.run(["nft", "list", "table", "ip", relay.NFT_TABLE],
                                                capture_output=True, text=True).returncode
    print(json.dumps(result))


if __name__ == "__main__":
    main()
