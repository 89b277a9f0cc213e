"""A game's discovery traffic, played by hand inside a player's namespace (stdlib only, bounded in time).

    listen --port P [--group G] [--reply] --seconds S   print READY, then one JSON line per datagram received
    send --to A --port P --payload X [--count N] [--wait S]   send N datagrams (SO_BROADCAST), print the replies
    flood --to A --port P --count N --seconds S [--rate R]   send N datagrams within S seconds (R per second)
    rtt --to A [--to B] --port P --count N [--interval S]  N probes to each target in turn, S apart, each waiting
                                                         up to 1 s for its reply; one JSON line per probe:
                                                         to, seq, data, sent (monotonic), rtt
"""

import argparse
import json
import socket
import struct
import sys
import time


def listen(args) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.port))  # like a game: every address, the port
    if args.group:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(args.group), socket.inet_aton("0.0.0.0")))
    print("READY", flush=True)
    deadline = time.monotonic() + args.seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (src, sport) = sock.recvfrom(4096)
        except socket.timeout:
            break
        print(json.dumps({"src": src, "sport": sport, "data": data.decode(errors="replace"),
                          "t": time.monotonic()}), flush=True)
        if args.reply:
            sock.sendto(b"reply:" + data, (src, sport))


def send(args) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("0.0.0.0", args.sport))
    for i in range(args.count):
        sock.sendto(f"{args.payload}#{i}".encode() if args.count > 1 else args.payload.encode(), (args.to, args.port))
        if args.interval:
            time.sleep(args.interval)
    deadline = time.monotonic() + args.wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (src, _) = sock.recvfrom(4096)
        except socket.timeout:
            break
        print(json.dumps({"src": src, "data": data.decode(errors="replace")}), flush=True)


def flood(args) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    began, sent = time.monotonic(), 0
    deadline = began + args.seconds
    while sent < args.count and time.monotonic() < deadline:
        if args.rate and sent > (time.monotonic() - began) * args.rate:
            time.sleep(0.0005)
            continue
        try:
            sock.sendto(f"flood#{sent}".encode(), (args.to, args.port))
        except OSError:  # a full queue: count only what left
            continue
        sent += 1
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - began}), flush=True)


def rtt(args) -> None:
    """Probes to each ``--to`` in turn (broadcast, unicast, broadcast, ...): the paths are compared under the same
    load, probe for probe, with the same number of probes each."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    for seq in range(args.count):
        for target in args.to:
            payload = f"rtt#{target}#{seq}".encode()
            sent = time.monotonic()
            sock.sendto(payload, (target, args.port))
            took = None
            while (left := sent + 1.0 - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, _ = sock.recvfrom(4096)
                except socket.timeout:
                    break
                if data == b"reply:" + payload:
                    took = (time.monotonic() - sent) * 1000
                    break
            print(json.dumps({"to": target, "seq": seq, "data": payload.decode(), "sent": sent, "rtt": took}),
                  flush=True)
            time.sleep(max(0.0, sent + args.interval - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("listen")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--group")
    p.add_argument("--reply", action="store_true")
    p.add_argument("--seconds", type=float, required=True)
    p = sub.add_parser("send")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--payload", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--wait", type=float, default=0.0)
    p = sub.add_parser("flood")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p = sub.add_parser("rtt")
    p.add_argument("--to", required=True, action="append")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    {"listen": listen, "send": send, "flood": flood, "rtt": rtt}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
