"""The discovery relay's pure parts (nodes/discovery/relay.py): packets, status files, the rate limit, the game list.

The relay end to end (tun devices, raw sockets, three servers) is tests/e2e/test_discovery.py.
"""

import ipaddress
import struct
import tempfile

from django.test import SimpleTestCase

from nodes import games
from nodes.discovery import relay
from tests.lab_helpers import unavailable
from tests.nodes.kernel_fanout_probe import udp_checksum_ok as checksum_ok


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


STATUS_V1 = """\
OpenVPN CLIENT LIST
Updated,2026-12-02 03:00:00
Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since
player-alice-x1,198.51.100.10:41234,100,200,2026-12-02 02:59:00
link-hongkong,203.0.113.11:1194,100,200,2026-12-02 02:59:00
ROUTING TABLE
Virtual Address,Common Name,Real Address,Last Ref
10.251.1.1,player-alice-x1,198.51.100.10:41234,2026-12-02 03:00:00
10.251.0.2,link-hongkong,203.0.113.11:1194,2026-12-02 03:00:00
10.249.0.0/16,link-hongkong,203.0.113.11:1194,2026-12-02 03:00:00
10.9.0.7,player-stray-x2,198.51.100.12:1194,2026-12-02 03:00:00
GLOBAL STATS
Max bcast/mcast queue length,0
END
"""

STATUS_V2 = """\
TITLE,OpenVPN 2.6.14
TIME,2026-12-02 03:00:00,1764644400
HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)
ROUTING_TABLE,10.250.0.2,player-dave-x3,198.51.100.13:50000,2026-12-02 03:00:00,1764644400
END
"""


class PacketTests(SimpleTestCase):
    def test_a_built_packet_parses_back_with_a_valid_checksum_for_every_payload_length(self):
        for size in range(0, 70):
            payload = bytes(range(size))
            packet = relay.build_udp(ip("10.251.1.1"), ip("10.249.1.1"), 6112, 6112, payload)
            self.assertTrue(checksum_ok(packet), size)
            self.assertEqual(relay.parse_udp(packet), (ip("10.251.1.1"), ip("10.249.1.1"), 6112, 6112, payload))

    def test_a_payload_summed_once_gives_the_same_packet(self):
        payload = b"[MOTD]world[/MOTD]"
        self.assertEqual(relay.build_udp(1, 2, 3, 4, payload, relay._checksum(payload)),
                         relay.build_udp(1, 2, 3, 4, payload))

    def test_fragments_and_other_protocols_are_not_parsed(self):
        packet = bytearray(relay.build_udp(1, 2, 3, 4, b"x" * 40))
        packet[6] |= 0x20  # more fragments
        self.assertIsNone(relay.parse_udp(bytes(packet)))
        packet = bytearray(relay.build_udp(1, 2, 3, 4, b"x"))
        packet[9] = 6  # TCP
        self.assertIsNone(relay.parse_udp(bytes(packet)))

    def test_the_kernel_filter_is_nine_classic_bpf_instructions(self):
        self.assertEqual(len(relay.bpf_program(ip("10.251.255.255"))), 9 * 8)


class StatusFileTests(SimpleTestCase):
    def setUp(self):
        self.tmp = self.enterContext(tempfile.TemporaryDirectory())

    def read(self, text: str, pool: str) -> set[str]:
        path = f"{self.tmp}/x.status"
        with open(path, "w") as handle:
            handle.write(text)
        return {str(ipaddress.IPv4Address(a)) for a in relay.read_players(path, ipaddress.IPv4Network(pool), "link-")}

    def test_players_are_the_routing_tables_addresses_in_the_pool_without_links_or_iroutes(self):
        self.assertEqual(self.read(STATUS_V1, "10.251.0.0/16"), {"10.251.1.1"})

    def test_status_version_2_is_read_too(self):
        self.assertEqual(self.read(STATUS_V2, "10.250.0.0/16"), {"10.250.0.2"})

    def test_a_missing_file_means_no_players(self):
        self.assertEqual(relay.read_players(f"{self.tmp}/none", ipaddress.IPv4Network("10.0.0.0/8"), "link-"), set())


class RateLimitTests(SimpleTestCase):
    def config(self):
        return relay.Config({"node": "n", "address": "10.251.0.1", "port": 7400, "peers": [], "instances": [],
                             "ports": [[6112, 6112]], "groups": [],
                             "rate": {"packets": 20, "bytes": 32000, "burst_packets": 40, "burst_bytes": 64000}})

    def test_a_burst_passes_then_the_rate_holds(self):
        config = self.config()
        bucket = relay.Bucket(config, now=0.0)
        self.assertEqual(sum(bucket.take(config, 100, 0.0) for _ in range(1000)), 40)
        self.assertEqual(sum(bucket.take(config, 100, 1.0) for _ in range(1000)), 20)  # one second later

    def test_bytes_are_limited_too(self):
        config = self.config()
        bucket = relay.Bucket(config, now=0.0)
        self.assertEqual(sum(bucket.take(config, 1400, 0.0) for _ in range(100)), 40)
        bucket = relay.Bucket(config, now=0.0)
        self.assertEqual(sum(bucket.take(config, 16000, 0.0) for _ in range(100)), 4)


class KernelRulesTests(SimpleTestCase):
    def config(self):
        return relay.Config({"node": "hangzhou", "address": "10.0.0.1", "port": 7400, "peers": ["10.2.0.1"],
                             "instances": [{"device": "lh-udp", "pool": "10.0.0.0/16", "status": "/nonexistent"},
                                           {"device": "lh-tcp", "pool": "10.1.0.0/16", "status": "/nonexistent"}],
                             "ports": [[6112, 6112]], "groups": [],
                             "rate": {"packets": 20, "bytes": 32000, "burst_packets": 40, "burst_bytes": 64000}})

    def copies(self, targets) -> list[str]:
        text = relay.nft_rules(self.config(), [ip(a) for a in targets])
        return [line.rsplit(" ", 1)[1] for line in text.splitlines() if " dup to " in line]

    def test_the_copies_for_players_on_other_nodes_are_made_before_the_local_ones(self):
        # Local players (this node's pools) sort below the remote ones by address here; the remote copies must
        # still come first, and each player exactly once.
        targets = ["10.1.0.2", "10.0.1.1", "10.4.1.1", "10.2.1.1", "10.0.1.1", "10.0.0.9"]
        self.assertEqual(self.copies(targets), ["10.2.1.1", "10.4.1.1", "10.0.0.9", "10.0.1.1", "10.1.0.2"])

    def test_without_remote_players_the_local_copies_are_all_there(self):
        self.assertEqual(self.copies(["10.1.0.2", "10.0.1.1"]), ["10.0.1.1", "10.1.0.2"])


class GameListTests(SimpleTestCase):
    def test_presets_and_custom_ports_merge_into_sorted_ranges(self):
        spec = games.discovery_spec(["warcraft3", "minecraft-java"], "6113, 4446-4450")
        self.assertEqual(spec.ports, ((4445, 4450), (6112, 6113)))
        self.assertEqual(spec.groups, ("224.0.2.60",))

    def test_bad_custom_ports_say_what_is_wrong(self):
        for text, message in (("0", "between 1 and 65535"), ("9-1", "between 1 and 65535"), ("x", "not a port"),
                              (", ".join(str(p) for p in range(1000, 1017)), "At most 16"),
                              ("1-3000", "Too many ports"), ("6112\n", None)):
            with self.subTest(text=text):
                if message is None:
                    self.assertEqual(games.parse_ports(text), ((6112, 6112),))
                else:
                    with self.assertRaisesMessage(games.GameListError, message):
                        games.discovery_spec([], text)


class LifecycleTests(SimpleTestCase):
    """A real Relay object (root: raw and packet sockets), listening on loopback only and sending nothing."""

    def test_the_relay_stops_by_itself_when_its_config_is_removed_with_the_node(self):
        import json
        import os
        import socket
        import time

        if os.geteuid() != 0:
            unavailable("needs root (raw sockets)")
        with tempfile.TemporaryDirectory() as tmp:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
            data = {"node": "n", "address": "127.0.0.1", "port": port, "peers": [],
                    "instances": [{"device": "lh-absent0", "pool": "10.251.0.0/16", "status": f"{tmp}/s"}],
                    "ports": [[6112, 6112]], "groups": [], "rate": {"packets": 20, "bytes": 32000}}
            path = f"{tmp}/relay.json"
            with open(path, "w") as handle:
                json.dump(data, handle)
            running = relay.Relay(relay.Config(data), config_path=path)
            running.scan(time.monotonic())
            self.assertTrue(running.running)
            os.unlink(path)
            running.run(until=time.monotonic() + 5)
            self.assertFalse(running.running)  # a relay that missed it would still be running at the deadline


class HotPathTests(SimpleTestCase):
    """A real Relay on loopback addresses (root: raw sockets): what it sends is received by real UDP sockets, so the
    kernel checks every header and checksum the relay builds."""

    def setUp(self):
        import os
        import socket

        if os.geteuid() != 0:
            unavailable("needs root (raw sockets)")
        self.tmp = self.enterContext(tempfile.TemporaryDirectory())
        self.port = self.free_port()
        self.sockets = []
        self.addCleanup(lambda: [s.close() for s in self.sockets])
        self.socket = socket

    def free_port(self) -> int:
        import socket

        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        return port

    def listen(self, address: str, port: int):
        sock = self.socket.socket(self.socket.AF_INET, self.socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(0.5)
        self.sockets.append(sock)
        return sock

    def write_config(self, **changes) -> tuple[str, dict]:
        import json

        data = {"node": "n", "address": "127.0.0.1", "port": self.port, "peers": ["127.0.0.7"],
                "instances": [{"device": "lh-absent0", "pool": "127.0.0.0/24", "status": f"{self.tmp}/s"}],
                "ports": [[6112, 6112]], "groups": [], "rate": {"packets": 20, "bytes": 32000}}
        data.update(changes)
        path = f"{self.tmp}/relay.json"
        with open(path, "w") as handle:
            json.dump(data, handle)
        return path, data

    def test_an_announcement_goes_once_to_each_peer_and_to_each_other_local_player_with_the_senders_address(self):
        path, data = self.write_config()
        running = relay.Relay(relay.Config(data), config_path=path)
        self.addCleanup(running.listener.close)
        inst = running.config.instances[0]
        inst.set_players({ip("127.0.0.5"), ip("127.0.0.6"), ip("127.0.0.8")})  # .5 sends
        peer = self.listen("127.0.0.7", self.port)
        players = {a: self.listen(a, 6112) for a in ("127.0.0.5", "127.0.0.6", "127.0.0.8")}
        for size in (0, 1, 17, 60, 1472):  # odd and even lengths: the checksum pads odd ones
            payload = bytes(range(256)) * 6
            payload = payload[:size]
            packet = relay.build_udp(ip("127.0.0.5"), 0xFFFFFFFF, 50000, 6112, payload)
            running.originate(inst, packet, 0.0)
            message, source = peer.recvfrom(2048)
            self.assertEqual(source, ("127.0.0.1", self.port))
            self.assertEqual(message, relay.MAGIC + bytes([127, 0, 0, 5, 255, 255, 255, 255])
                             + struct.pack("!HHB", 50000, 6112, relay.MAX_HOPS - 1) + payload)
            for address in ("127.0.0.6", "127.0.0.8"):  # a bad checksum would be dropped by the kernel
                self.assertEqual(players[address].recvfrom(2048), (payload, ("127.0.0.5", 50000)), (address, size))
        with self.assertRaises(self.socket.timeout):
            players["127.0.0.5"].recvfrom(2048)  # never back to the sender
        self.assertEqual(running.counters["delivered"], 10)

    def test_once_a_peer_lists_its_players_announcements_go_straight_to_them_and_not_through_its_relay(self):
        import socket
        import time

        path, data = self.write_config(instances=[{"device": "lh-absent0", "pool": "127.0.0.0/28",
                                                   "status": f"{self.tmp}/s"}])
        running = relay.Relay(relay.Config(data), config_path=path)
        self.addCleanup(running.listener.close)
        inst = running.config.instances[0]
        inst.set_players({ip("127.0.0.5"), ip("127.0.0.6")})
        peer = self.listen("127.0.0.7", self.port)
        players = {a: self.listen(a, 6112) for a in ("127.0.0.6", "127.0.1.20", "127.0.1.21")}
        # The peer's list: two players of its own, and one address of this node's pool, which is not taken from it.
        listed = b"".join(socket.inet_aton(a) for a in ("127.0.1.20", "127.0.1.21", "127.0.0.6"))
        now = time.monotonic()
        running.learn_players("127.0.0.7", relay.PLAYERS + listed, now)
        reply, _ = peer.recvfrom(2048)  # first contact: this node's list goes back at once
        self.assertEqual(reply, relay.PLAYERS + socket.inet_aton("127.0.0.5") + socket.inet_aton("127.0.0.6"))
        # ... once: an unchanged list waits for the periodic refresh.
        running.scan(now)
        with self.assertRaises(socket.timeout):
            peer.recvfrom(2048)
        running.originate(inst, relay.build_udp(ip("127.0.0.5"), 0xFFFFFFFF, 50000, 6112, b"direct"), now)
        for address, sock in players.items():  # each exactly once, with the sender's address and port
            self.assertEqual(sock.recvfrom(2048), (b"direct", ("127.0.0.5", 50000)), address)
            with self.assertRaises(socket.timeout):
                sock.recvfrom(2048)
        with self.assertRaises(socket.timeout):
            peer.recvfrom(2048)  # nothing for the peer's relay to wake up for
        self.assertEqual((running.counters["direct"], running.counters["via_peer"]), (2, 0))
        # A list not refreshed in time is forgotten: the copy goes through the peer's relay again.
        later = now + relay.PLAYERS_VALID_S + 1
        running.scan(later)
        self.assertEqual(running.remote, {})
        running.originate(inst, relay.build_udp(ip("127.0.0.5"), 0xFFFFFFFF, 50000, 6112, b"via relay"), later)
        peer.settimeout(0.5)
        while True:  # skip this node's own periodic list
            message, _ = peer.recvfrom(2048)
            if message[:4] == relay.MAGIC:
                break
        self.assertEqual(message[relay._PEER.size:], b"via relay")

    def test_a_copy_from_one_neighbour_reaches_the_local_players_and_every_other_side_of_the_tree_once(self):
        import socket
        import time

        # This relay has three tree neighbours: .7 (the copy comes from there), .9 (players unknown) and .10 (its
        # side's players listed).
        path, data = self.write_config(peers=["127.0.0.7", "127.0.0.9", "127.0.0.10"],
                                       instances=[{"device": "lh-absent0", "pool": "127.0.0.0/28",
                                                   "status": f"{self.tmp}/s"}])
        running = relay.Relay(relay.Config(data), config_path=path)
        self.addCleanup(running.listener.close)
        running.config.instances[0].set_players({ip("127.0.0.5")})
        peers = {a: self.listen(a, self.port) for a in ("127.0.0.7", "127.0.0.9", "127.0.0.10")}
        players = {a: self.listen(a, 6112) for a in ("127.0.0.5", "127.0.1.30", "127.0.2.40")}
        now = time.monotonic()
        running.learn_players("127.0.0.10", relay.PLAYERS + socket.inet_aton("127.0.1.30"), now)
        running.learn_players("127.0.0.7", relay.PLAYERS + socket.inet_aton("127.0.2.40"), now)
        # Each neighbour hears of the players on the other sides, never of its own side's (split horizon).
        lists = {}
        for address, sock in peers.items():
            while True:
                try:
                    message = sock.recvfrom(2048)[0]
                except socket.timeout:
                    break
                lists[address] = {socket.inet_ntoa(message[i:i + 4]) for i in range(4, len(message), 4)}
        self.assertEqual(lists, {"127.0.0.7": {"127.0.0.5", "127.0.1.30"},
                                 "127.0.0.9": {"127.0.0.5", "127.0.1.30", "127.0.2.40"},
                                 "127.0.0.10": {"127.0.0.5", "127.0.2.40"}})
        running.deliver(ip("127.0.0.99"), 50000, 6112, b"spread", hops=3, came_from="127.0.0.7")
        self.assertEqual(players["127.0.0.5"].recvfrom(2048), (b"spread", ("127.0.0.99", 50000)))  # local
        self.assertEqual(players["127.0.1.30"].recvfrom(2048), (b"spread", ("127.0.0.99", 50000)))  # .10's side
        message = peers["127.0.0.9"].recvfrom(2048)[0]  # .9's side through its relay, one relay fewer to go
        self.assertEqual((message[:4], message[-1 - len(b"spread")], message[relay._PEER.size:]),
                         (relay.MAGIC, 2, b"spread"))
        for address, sock in [*peers.items(), ("127.0.2.40", players["127.0.2.40"])]:
            with self.assertRaises(socket.timeout):
                sock.recvfrom(2048)  # nothing back to where it came from, nothing twice
        # A copy with no hops left is delivered here and goes no further (a loop while configs disagree ends).
        running.deliver(ip("127.0.0.99"), 50000, 6112, b"last hop", hops=0, came_from="127.0.0.7")
        self.assertEqual(players["127.0.0.5"].recvfrom(2048)[0], b"last hop")
        for sock in (peers["127.0.0.9"], players["127.0.1.30"]):
            with self.assertRaises(socket.timeout):
                sock.recvfrom(2048)

    def test_a_changed_config_is_reloaded_in_place_without_a_restart(self):
        import os
        import time

        path, data = self.write_config(peers=[])
        running = relay.Relay(relay.Config(data), config_path=path)
        self.addCleanup(running.listener.close)
        running.scan(time.monotonic())
        listener = running.listener
        # A node joins the LAN (a new peer) and the host ticks a port: only relay.json changes on this node.
        self.write_config(peers=["127.0.0.7"], ports=[[6112, 6113]])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime even on a coarse clock
        running.scan(time.monotonic())
        self.assertEqual(running.counters["reloaded"], 1)
        self.assertIs(running.listener, listener)  # same socket: nothing restarted
        self.assertEqual(running.config.peer_sockaddrs, (("127.0.0.7", self.port),))
        peer = self.listen("127.0.0.7", self.port)
        running.originate(running.config.instances[0],
                          relay.build_udp(ip("127.0.0.5"), 0xFFFFFFFF, 50000, 6113, b"new port"), 0.0)
        self.assertEqual(peer.recvfrom(2048)[0][relay._PEER.size:], b"new port")
        # SIGHUP's path: a reload is forced whatever the mtime says; a broken file keeps the running config.
        with open(path, "w") as handle:
            handle.write("{not json")
        running.request_reload()
        running.scan(time.monotonic())
        self.assertEqual(running.counters["reloaded"], 1)
        self.assertEqual(running.config.peer_sockaddrs, (("127.0.0.7", self.port),))


class SystemdUnitTests(SimpleTestCase):
    def test_systemd_accepts_the_relay_unit_without_a_warning(self):
        import os
        import shutil
        import subprocess

        from nodes import render

        if not shutil.which("systemd-analyze"):
            unavailable("systemd-analyze is not installed")
        unit = render.render_relay_unit()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(unit.path))
            with open(path, "w") as handle:
                handle.write(unit.content)
            out = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
        # verify exits 0 even for an unknown key or a bad value; it says so on stderr, which must stay empty.
        self.assertEqual((out.returncode, out.stdout.strip(), out.stderr.strip()), (0, "", ""))
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", unit.content.splitlines())  # relay.json re-read


class PushedRouteTests(SimpleTestCase):
    def test_the_limited_broadcast_route_names_vpn_gateway_and_metric_1_and_groups_are_plain_host_routes(self):
        from nodes import render

        pushes = render._discovery_pushes(games.discovery_spec(["minecraft-java"], ""))
        self.assertEqual(pushes, ['push "route 255.255.255.255 255.255.255.255 vpn_gateway 1"',
                                  'push "route 224.0.2.60 255.255.255.255"'])


class SchedulerTests(SimpleTestCase):
    def test_the_relay_asks_the_scheduler_for_a_short_time_slice(self):
        import subprocess
        import sys

        script = ("import sys; sys.path.insert(0, '.'); from nodes.discovery import relay; "
                  "ok = relay.request_short_slice(); "
                  "print(ok, [l.split(':')[1].strip() for l in open('/proc/self/sched') if l.startswith('se.slice')])")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        ok, slices = out.stdout.split(" ", 1)
        if ok != "True":
            self.skipTest(f"this kernel refuses a custom slice: {out.stdout} {out.stderr}")
        if slices.strip() != "[]":  # /proc/<pid>/sched shows se.slice on kernels with EEVDF custom slices
            self.assertEqual(slices.strip(), f"['{relay.SLICE_NS}']")


class KernelFanoutTests(SimpleTestCase):
    """The fan-out in the kernel (nftables), for real: tests/nodes/kernel_fanout_probe.py writes announcements into a
    tun device as OpenVPN would, inside a throwaway network namespace, and reads the copies the kernel writes out."""

    def test_the_kernel_copies_each_announcement_once_to_each_other_player_with_the_senders_address(self):
        import json
        import os
        import secrets
        import shutil
        import subprocess
        from pathlib import Path

        missing = [tool for tool in ("ip", "nft") if not shutil.which(tool)]
        if os.geteuid() != 0 or missing:
            reason = f"needs root and {', '.join(missing) or 'ip, nft'} (network namespaces, nftables)"
            unavailable(reason)  # CI: the nodes' fan-out must be proven, not skipped
        ns = f"lhkf{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)
        probe = Path(__file__).with_name("kernel_fanout_probe.py")
        done = subprocess.run(["ip", "netns", "exec", ns, "python3", str(probe), relay.__file__], capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        r = json.loads(done.stdout)
        self.assertTrue(r["kernel_active"], done.stderr)

        def copies(key):
            return sorted((c["device"], c["src"], c["dst"], c["dport"], c["payload"]) for c in r[key])

        self.assertTrue(all(c["checksum_ok"] for key in r if isinstance(r[key], list) for c in r[key]))
        # The peer's players are not known yet: the kernel serves this node's players, the relay sends one copy
        # through the peer's relay (it reads the device for that).
        self.assertTrue(r["reads_devices_before_the_peer_is_known"])
        local = [("lh-udp", "10.251.1.1", "10.251.1.2", 6112, "unknown-peer"),
                 ("lh-udp", "10.251.1.1", "10.251.1.3", 6112, "unknown-peer")]
        self.assertEqual([c for c in copies("peer_unknown") if c[0] == "lh-udp"], local)
        via_relay = [c for c in r["peer_unknown"]
                     if c["device"] == "lhl-peer" and c["payload"].startswith(relay.MAGIC.decode())]
        self.assertEqual([(c["src"], c["dst"], c["dport"]) for c in via_relay], [("10.251.0.1", "10.249.0.1", 7400)])
        self.assertEqual([c for c in copies("peer_unknown") if c[0] == "lhl-peer" and c[2] != "10.249.0.1"], [])
        # Its list arrived: the kernel sends straight to its player too, and the relay stops reading the device.
        self.assertFalse(r["reads_devices_once_every_peer_is_in_the_kernel"], r["rules"])
        for kind, port in (("limited", 6112), ("directed", 6112), ("group", 6113)):
            self.assertEqual(copies(kind), [("lh-udp", "10.251.1.1", "10.251.1.2", port, kind),
                                            ("lh-udp", "10.251.1.1", "10.251.1.3", port, kind),
                                            ("lhl-peer", "10.251.1.1", "10.249.1.2", port, kind)], r["rules"])
        # A game's multicast leaves with TTL 1; the copies must cross routers (the LAN's nodes) to other nodes.
        self.assertTrue(all(c["ttl"] > 8 for c in r["group"]), r["group"])
        for kind in ("unlisted", "other-group", "from-a-stranger"):
            self.assertEqual(r[kind], [], kind)
        # The flood: 200 packets at once; each player gets what the burst allows (40 tokens, 4 of them used above
        # and refilled at 20/s while the probe waited for copies), plus what 20/s refills during the flood, each once.
        allowed = 40 + int(20 * r["flood_seconds"]) + 1
        per_player = {}
        for c in r["flood"]:
            per_player.setdefault(c["dst"], []).append(c["payload"])
        self.assertEqual(set(per_player), {"10.251.1.2", "10.251.1.3", "10.249.1.2"})
        for got in per_player.values():
            self.assertEqual(len(got), len(set(got)))
            self.assertTrue(30 <= len(got) <= allowed, (len(got), allowed))
        self.assertTrue(r["relay_sent_nothing_itself"])
        self.assertNotEqual(r["table_after_stop"], 0)  # the relay's table is gone once it stops
