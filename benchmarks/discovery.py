"""LAN-discovery figures: broadcast latency across two servers next to unicast over the same servers, and the
relay's CPU time, printed as JSON lines (each figure next to its floor or target, measured in the same run).

    .venv/bin/python benchmarks/discovery.py              # the e2e run (root, openvpn, sshd) + the relay alone
    .venv/bin/python benchmarks/discovery.py --from-file  # only print var/discovery-figures.json + the relay alone
    .venv/bin/python benchmarks/discovery.py --relay-only # only the relay alone

1. Across two servers, from the discovery e2e run (`pytest tests/e2e/test_discovery.py`, which writes
   var/discovery-figures.json when it passes): alice on Hangzhou, bob on Hong Kong, 200 probes per path sent
   alternately (broadcast, unicast, broadcast, ...) so both paths see the same load; medians and 90th percentiles.
   The broadcast's one-way delivery (alice's game socket -> 255.255.255.255 -> Hangzhou -> bob's game socket: what
   a player waits for) is printed next to a unicast datagram's one-way delivery alice -> bob over the same servers
   (the floor), with their ratio (target: at most 1.5x), and the broadcast's extra time pair by pair; the round
   trips (bob answers by unicast) and ICMP ping are printed too, and on which nodes the fan-out ran in the kernel.
   The same run gives each relay's CPU time while alice offers 1,000 broadcasts per second, and Hangzhou's OpenVPN
   server's (the kernel's fan-out and rate limit run in it) next to the same for 1,000 unicast datagrams/s.
2. The relay alone (its own delivery path, used where a node has no nftables or a peer's players are not known
   yet), full path, no rate limit in the way: the relay's own code (nodes/discovery/relay.py) in a
   throwaway network namespace with a tun device that nobody reads, fed N packets as from its tun device, each relayed to 3 peer
   relays and delivered to 4 local players (7 packets written per packet read). CPU time per 1,000 packets, so the
   CPU share at 1,000 packets/s, next to the floor: the same namespace writing the same 7 packets per input with
   a bare raw socket and no relay logic; and the receiving side alone (a peer's copy delivered to 4 players). Nothing leaves the namespace (a tun device nobody reads drops everything).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "var" / "discovery-figures.json"
TARGET_RATIO = 1.5


def run_e2e(timeout: float) -> int:
    env = dict(os.environ, CACHE_PREFIX=f"lanhub-disc-{os.getpid()}", CELERY_QUEUE=f"lanhub-disc-{os.getpid()}")
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "tests/e2e/test_discovery.py", "-q", "-s",
               "-p", "no:cacheprovider"]
    try:
        return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(json.dumps({"error": f"the e2e run took longer than {timeout:.0f} s and was stopped"}))
        return 1


def print_e2e() -> None:
    f = json.loads(FIGURES.read_text())
    n = f["probes_per_path"]
    b, u = f["broadcast_one_way"], f["unicast_one_way"]
    ratio = b["median"] / u["median"] if b["median"] and u["median"] else None
    ratio_p90 = b["p90"] / u["p90"] if b["p90"] and u["p90"] else None
    lines = [
        {"figure": f"broadcast one-way delivery across two servers ({n} probes, alternating with the unicast ones)",
         "median_ms": _ms(b["median"]), "p90_ms": _ms(b["p90"]), "delivered": f["broadcast_delivered"],
         "floor": "unicast one-way over the same servers, same run", "floor_median_ms": _ms(u["median"]),
         "floor_p90_ms": _ms(u["p90"]), "floor_delivered": f["unicast_delivered"],
         "ratio_median": ratio and round(ratio, 2), "ratio_p90": ratio_p90 and round(ratio_p90, 2),
         "target_ratio": TARGET_RATIO, "fan_out_in_the_kernel": f.get("kernel_fanout")},
        {"figure": "broadcast's extra one-way time, pair by pair (each broadcast probe minus the unicast probe "
                   "sent 30 ms after it)", "median_ms": _ms(f["extra_one_way"]["median"]),
         "p90_ms": _ms(f["extra_one_way"]["p90"]), "pairs": f["extra_one_way"]["n"]},
        {"figure": "broadcast + unicast reply round trip", "median_ms": _ms(f["broadcast_round_trip"]["median"]),
         "p90_ms": _ms(f["broadcast_round_trip"]["p90"]), "floor": "unicast UDP round trip",
         "floor_median_ms": _ms(f["unicast_round_trip"]["median"]), "floor_p90_ms": _ms(f["unicast_round_trip"]["p90"]),
         "ping_median_ms": _ms(f["ping"]["median"]), "ping_p90_ms": _ms(f["ping"]["p90"])},
    ]
    for name in ("hangzhou", "hongkong", "singapore"):
        key = f"relay_cpu_ms_per_s_at_1000pps_{name}"
        if key in f:
            lines.append({"figure": f"relay CPU on {name} while alice (on hangzhou) offers "
                                    f"{f['offered_pps']:.0f} broadcasts/s", "cpu_ms_per_s": round(f[key], 1),
                          "share_of_one_core": round(f[key] / 1000, 4)})
    if "server_cpu_ms_per_s_at_1000pps_broadcast" in f:
        lines.append({"figure": f"hangzhou's OpenVPN UDP server CPU (the kernel's fan-out runs in it) while alice "
                                f"offers {f['offered_pps']:.0f} broadcasts/s",
                      "cpu_ms_per_s": round(f["server_cpu_ms_per_s_at_1000pps_broadcast"], 1),
                      "floor": "the same while alice sends 1,000 unicast datagrams/s to bob",
                      "floor_cpu_ms_per_s": round(f["server_cpu_ms_per_s_at_1000pps_unicast"], 1)})
    for line in lines:
        print(json.dumps(line))


def _ms(value):
    return None if value is None else round(value, 3)


# The microbenchmark runs inside its own namespace: the relay module is imported from the repository.
MICRO = textwrap.dedent("""
    import importlib.util, json, socket, struct, sys, time, types
    spec = importlib.util.spec_from_file_location("relay", sys.argv[1])
    relay = importlib.util.module_from_spec(spec); spec.loader.exec_module(relay)
    count = int(sys.argv[2])
    config = relay.Config({"node": "bench", "address": "10.251.0.1", "port": 7400,
        "peers": ["10.249.0.1", "10.247.0.1", "10.245.0.1"],
        "instances": [{"device": "dummy0", "pool": "10.251.0.0/16", "status": "/nonexistent"}],
        "ports": [[6112, 6112]], "groups": [],
        "rate": {"packets": 1e9, "bytes": 1e12, "burst_packets": 1e9, "burst_bytes": 1e12}})
    r = relay.Relay(config)
    inst = config.instances[0]
    players = {int.from_bytes(socket.inet_aton(f"10.251.1.{i}"), "big") for i in range(1, 6)}
    if hasattr(inst, "set_players"):
        inst.set_players(players)
    else:  # the relay before its hot path was reworked (for comparing the two)
        inst.players = players
    sender = int.from_bytes(socket.inet_aton("10.251.1.1"), "big")
    payloads = [relay.build_udp(sender, 0xFFFFFFFF, 6112, 6112, b"x" * 60 + str(i).encode()) for i in range(count)]
    began = time.process_time()
    for p in payloads:
        r.originate(inst, p, time.monotonic())
    relay_cpu = time.process_time() - began
    written = r.counters["delivered"] + r.counters["relayed"] * len(config.peers)
    # The receiving side: a peer's copy delivered to the same 4 local players (the sender is not local there).
    other = int.from_bytes(socket.inet_aton("10.249.1.1"), "big")
    began = time.process_time()
    for i in range(count):
        r.deliver(other, 6112, 6112, b"x" * 60 + str(i).encode())
    receive_cpu = time.process_time() - began
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    out = payloads[0]
    targets = ["10.249.0.1", "10.247.0.1", "10.245.0.1"] + [f"10.251.1.{i}" for i in range(2, 6)]
    began = time.process_time()
    for _ in range(count):
        for t in targets:
            raw.sendto(out, (t, 0))
    floor_cpu = time.process_time() - began
    print(json.dumps({"packets": count, "relay_cpu_s": relay_cpu, "floor_cpu_s": floor_cpu,
                      "receive_cpu_s": receive_cpu,
                      "written": written}))
""")


# One hop, without OpenVPN: inside a throwaway namespace this process writes a player's packets into a tun device as
# the OpenVPN server does, and a reader process reads what comes out of a second tun device, as a link's OpenVPN
# would. Broadcasts (copied to a player behind that link) alternate with unicast datagrams to the same player
# (forwarded by the kernel: the floor), 20 ms apart. argv: relay.py path, "python" or "kernel", count.
HOP = textwrap.dedent("""
    import fcntl, importlib.util, json, os, select, socket, statistics, struct, subprocess, sys, time
    spec = importlib.util.spec_from_file_location("relay", sys.argv[1])
    relay = importlib.util.module_from_spec(spec); spec.loader.exec_module(relay)
    mode, count = sys.argv[2], int(sys.argv[3])

    def tun(name):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x1001))  # IFF_TUN | IFF_NO_PI
        return fd

    writer, reader = tun("lh-udp"), tun("lhl-peer")
    for argv in (["ip", "addr", "add", "10.251.0.1/16", "dev", "lh-udp"], ["ip", "link", "set", "lh-udp", "up"],
                 ["ip", "addr", "add", "10.249.0.2/16", "dev", "lhl-peer"], ["ip", "link", "set", "lhl-peer", "up"],
                 ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        subprocess.run(argv, check=True)
    with open("/tmp/lanhub-hop-status", "w") as handle:
        handle.write("ROUTING TABLE\\n10.251.1.1,player-alice,198.51.100.1:1,now\\nGLOBAL STATS\\nEND\\n")
    config = relay.Config({"node": "bench", "address": "10.251.0.1", "port": 7400, "peers": ["10.249.0.1"],
        "instances": [{"device": "lh-udp", "pool": "10.251.0.0/16", "status": "/tmp/lanhub-hop-status"}],
        "ports": [[6112, 6112]], "groups": [],
        "rate": {"packets": 1e6, "bytes": 1e9, "burst_packets": 1e6, "burst_bytes": 1e9}})
    out_r, out_w = os.pipe()
    link = os.fork()
    if link == 0:  # the link's OpenVPN: reads copies, notes when each arrived
        os.close(out_r)
        os.close(1)  # not the benchmark's pipe: it ends when the parent prints
        while True:
            packet = os.read(reader, 2048)
            if len(packet) > 28 and packet[9] == 17 and packet[28:].startswith(b"hop"):
                os.write(out_w, json.dumps([packet[28:].decode(), time.monotonic_ns()]).encode() + b"\\n")
    running = relay.Relay(config, fanout=relay.KernelFanout() if mode == "kernel" else None)
    assert running.kernel_active == (mode == "kernel"), "nftables refused the relay's table"
    running.scan(time.monotonic())
    running.learn_players("10.249.0.1", relay.PLAYERS + socket.inet_aton("10.249.1.2"), time.monotonic())
    running.watch_devices()
    relay_pid = os.fork()
    if relay_pid == 0:  # the relay, as on a node
        os.close(1)
        relay.request_short_slice()
        running.run(until=time.monotonic() + count * 0.05 + 5)
        os._exit(0)
    time.sleep(0.5)
    sent = {}
    for i in range(count):
        for kind, dst in (("broadcast", "255.255.255.255"), ("unicast", "10.249.1.2")):
            packet = bytearray(relay.build_udp(0x0AFB0101, int.from_bytes(socket.inet_aton(dst), "big"), 50000, 6112,
                                               f"hop {kind} {i}".encode()))
            packet[10:12] = (0xFFFF - relay._checksum(bytes(packet[:20]))).to_bytes(2, "big")
            sent[f"hop {kind} {i}"] = time.monotonic_ns()
            os.write(writer, bytes(packet))
            time.sleep(0.02)
    arrived, buffered = {}, b""
    while select.select([out_r], [], [], 0.5)[0]:
        buffered += os.read(out_r, 65536)
    for line in buffered.splitlines():
        name, t = json.loads(line)
        arrived.setdefault(name, t)
    for pid in (link, relay_pid):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    result = {}
    for kind in ("broadcast", "unicast"):
        took = [(arrived[k] - t) / 1000 for k, t in sent.items() if k.split()[1] == kind and k in arrived]
        result[kind] = {"n": len(took), "median_us": statistics.median(took),
                        "p90_us": statistics.quantiles(took, n=10)[8]}
    print(json.dumps(result))
""")


def one_hop(count: int) -> None:
    for mode, what in (("python", "the relay's Python path (epoll, packet socket, raw socket)"),
                       ("kernel", "the kernel's fan-out (nftables dup, the relay's table)")):
        ns = f"lhhop{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", HOP,
                                  str(ROOT / "nodes" / "discovery" / "relay.py"), mode, str(count)],
                                 check=True, capture_output=True, text=True, timeout=count * 0.05 + 60).stdout
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        r = json.loads(out.strip().splitlines()[-1])
        b, u = r["broadcast"], r["unicast"]
        print(json.dumps({"figure": f"one hop without OpenVPN, write into the server's tun device to the link's read: "
                                    f"broadcast through {what} ({count} each, alternating)",
                          "median_us": round(b["median_us"], 1), "p90_us": round(b["p90_us"], 1),
                          "delivered": b["n"], "floor": "unicast forwarded by the kernel, same run",
                          "floor_median_us": round(u["median_us"], 1), "floor_p90_us": round(u["p90_us"], 1),
                          "floor_delivered": u["n"]}))


def relay_alone(count: int) -> None:
    ns = f"lhbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for argv in (["ip", "tuntap", "add", "dev", "dummy0", "mode", "tun"],
                     ["ip", "addr", "add", "10.251.0.1/16", "dev", "dummy0"], ["ip", "link", "set", "dummy0", "up"],
                     ["ip", "route", "add", "10.0.0.0/8", "dev", "dummy0"]):
            subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", MICRO,
                              str(ROOT / "nodes" / "discovery" / "relay.py"), str(count)],
                             check=True, capture_output=True, text=True, timeout=300).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    r = json.loads(out)
    per_1000 = r["relay_cpu_s"] * 1000 / r["packets"]
    print(json.dumps({"figure": "relay alone: CPU per 1,000 broadcasts relayed (3 peers + 4 local players each)",
                      "cpu_ms": round(per_1000 * 1000, 1), "share_of_one_core_at_1000pps": round(per_1000, 4),
                      "floor": "bare raw-socket writes of the same 7 packets",
                      "floor_cpu_ms": round(r["floor_cpu_s"] * 1000 * 1000 / r["packets"], 1),
                      "packets": r["packets"], "written": r["written"]}))
    print(json.dumps({"figure": "relay alone, receiving side: CPU per 1,000 peer copies delivered to 4 local players",
                      "cpu_ms": round(r["receive_cpu_s"] * 1000 * 1000 / r["packets"], 1),
                      "share_of_one_core_at_1000pps": round(r["receive_cpu_s"] * 1000 / r["packets"], 4)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-file", action="store_true", help="print the last e2e figures, do not run it")
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument("--hop-only", action="store_true", help="only the one-hop comparison")
    parser.add_argument("--hops", type=int, default=200, help="probes per path in the one-hop comparison")
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"error": "needs root (network namespaces)"}))
        return 1
    status = 0
    if args.hop_only:
        one_hop(args.hops)
        return 0
    if not args.relay_only:
        if not args.from_file:
            FIGURES.unlink(missing_ok=True)
            status = run_e2e(args.timeout)
        if status == 0 and FIGURES.exists():
            print_e2e()
        else:
            print(json.dumps({"error": "the discovery e2e run failed: no figures from it"}))
    one_hop(args.hops)
    relay_alone(args.packets)
    return status


if __name__ == "__main__":
    sys.exit(main())
