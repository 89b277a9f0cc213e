"""A packet-forwarding simulator that reads only rendered files (test helper).

It knows nothing of the Plan. From each node's files it rebuilds what the kernel and OpenVPN would hold:
- kernel: the node's own pools (connected on lh-udp / lh-tcp), the UDP server's ``route`` lines (into lh-udp),
  each link client's ``route`` lines and its tunnel's connected subnet (from the upstream's ``ifconfig-push``
  address and mask for this node's link certificate);
- OpenVPN UDP server: per client certificate name, its ``iroute`` prefixes and its ``ifconfig-push`` address.

A packet from a player in one pool to a player in another is then carried hop by hop: longest-prefix match in
the kernel; into the UDP server, where the iroutes pick the link client; or into a link client, whose upstream
server checks the source address the way OpenVPN does (the longest iroute or client address matching the
source must belong to the sending client, else "MULTI: bad source address"). No client-to-client: a server
hands every packet from a client to its kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping

SERVER_UDP = "/etc/openvpn/server/lanhub-udp.conf"
SERVER_TCP = "/etc/openvpn/server/lanhub-tcp.conf"
CCD_PREFIX = "/etc/openvpn/server/ccd/"
CLIENT_PREFIX = "/etc/openvpn/client/lanhub-link-"
ROUTE_QUOTA = 256  # OpenVPN's default max-routes-per-client


class ConfigError(AssertionError):
    """The files could not be loaded as a kernel or OpenVPN would (e.g. the same route twice)."""


@dataclass(frozen=True)
class Trace:
    source: str
    target: str
    path: tuple[str, ...]
    delivered: bool
    reason: str = ""

    @property
    def hops(self) -> int:
        return len(self.path) - 1


class _Lpm:
    """Longest-prefix match over IPv4 prefixes, keyed by integer for speed."""

    def __init__(self):
        self.tables: dict[int, dict[int, object]] = {}

    def add(self, prefix: ipaddress.IPv4Network, value, *, where: str) -> None:
        table = self.tables.setdefault(prefix.prefixlen, {})
        key = int(prefix.network_address) >> (32 - prefix.prefixlen)
        if key in table and table[key] != value:
            raise ConfigError(f"{where}: {prefix} is routed twice ({table[key]} and {value})")
        table[key] = value
        self.order = sorted(self.tables, reverse=True)

    def lookup(self, address: int):
        for length in getattr(self, "order", ()):
            value = self.tables[length].get(address >> (32 - length))
            if value is not None:
                return value
        return None


def _net(address: str, mask: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{address}/{mask}")


def _lines(content: str, keyword: str) -> list[list[str]]:
    return [line.split()[1:] for line in content.splitlines() if line.split()[:1] == [keyword]]


def _content(file) -> str:
    return file if isinstance(file, str) else file.content


class Network:
    """The LAN as rebuilt from files: ``files[node][path]`` is a RenderedFile or its text."""

    def __init__(self, files: Mapping[str, Mapping[str, object]]):
        self.pools: dict[str, list[ipaddress.IPv4Network]] = {}
        self.max_iroutes = 0
        self.over_quota: list[str] = []  # ccd files past their server's max-routes-per-client
        self.kernel: dict[str, _Lpm] = {}
        self.clients: dict[str, _Lpm] = {}  # server node -> prefix -> client certificate name
        texts = {node: {path: _content(f) for path, f in node_files.items()} for node, node_files in files.items()}
        for node, node_files in texts.items():
            self._load_server(node, node_files)
        for node, node_files in texts.items():
            self._load_links(node, node_files, texts)
        self._cache: dict[tuple[str, int], object] = {}
        self.owner = {pool: node for node, pools in self.pools.items() for pool in pools}

    def _load_server(self, node: str, node_files: Mapping[str, str]) -> None:
        udp = _net(*_lines(node_files[SERVER_UDP], "server")[0][:2])
        tcp = _net(*_lines(node_files[SERVER_TCP], "server")[0][:2])
        self.pools[node] = [udp, tcp]
        kernel = self.kernel[node] = _Lpm()
        kernel.add(udp, ("local", node), where=node)
        kernel.add(tcp, ("local", node), where=node)
        for address, mask in _lines(node_files[SERVER_UDP], "route"):
            kernel.add(_net(address, mask), ("server", node), where=node)
        clients = self.clients[node] = _Lpm()
        quota = int((_lines(node_files[SERVER_UDP], "max-routes-per-client") or [[ROUTE_QUOTA]])[0][0])
        for path, text in node_files.items():
            if not path.startswith(CCD_PREFIX):
                continue
            cn = path[len(CCD_PREFIX):]
            for address, _mask in _lines(text, "ifconfig-push"):
                clients.add(ipaddress.IPv4Network(address), cn, where=f"{node} ccd")
            iroutes = _lines(text, "iroute")
            self.max_iroutes = max(self.max_iroutes, len(iroutes))
            if len(iroutes) + 1 > quota:
                self.over_quota.append(f"{node} ccd {cn}: {len(iroutes)} iroutes, quota {quota}")
            # OpenVPN learns the client's own address and then iroutes up to the quota, and drops the rest
            # ("route quota exceeded"): so does the simulator, and packets to those prefixes go nowhere. It learns
            # them last line first (its option list is built by prepending; seen in a real server's log), so the
            # lines dropped are the first ones of the file.
            for address, mask in iroutes[len(iroutes) - (quota - 1):] if len(iroutes) >= quota else iroutes:
                clients.add(_net(address, mask), cn, where=f"{node} ccd")

    def _load_links(self, node: str, node_files: Mapping[str, str], texts) -> None:
        for path, text in node_files.items():
            if not path.startswith(CLIENT_PREFIX):
                continue
            upstream = _lines(text, "verify-x509-name")[0][0].removeprefix("node-")
            ccd = texts[upstream].get(f"{CCD_PREFIX}link-{node}")
            if ccd is None:
                raise ConfigError(f"{upstream} has no ccd file for {node}'s link")
            address, mask = _lines(ccd, "ifconfig-push")[0]
            connected = ipaddress.IPv4Interface(f"{address}/{mask}").network
            self.kernel[node].add(connected, ("link", upstream), where=node)
            for address, mask, _gateway in _lines(text, "route"):
                self.kernel[node].add(_net(address, mask), ("link", upstream), where=node)

    @staticmethod
    def player(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
        """An address a player could hold in the pool: the top of the dynamic range."""
        return pool.broadcast_address - 2

    def _route(self, node: str, destination: int):
        key = (node, destination)
        if key not in self._cache:
            self._cache[key] = self.kernel[node].lookup(destination)
        return self._cache[key]

    def send(self, source: str, source_pool: ipaddress.IPv4Network, target_pool: ipaddress.IPv4Network) -> Trace:
        """Carry one packet from a player in source_pool (on node source) to a player in target_pool."""
        return self.send_to(source, source_pool, int(self.player(target_pool)), self.owner[target_pool])

    def send_to(self, source: str, source_pool: ipaddress.IPv4Network, dst: int, target: str = "") -> Trace:
        """Carry one packet from a player in source_pool to the address ``dst`` (held by ``target``, if anyone)."""
        src = int(self.player(source_pool))
        path = [source]
        while True:
            node = path[-1]
            action = self._route(node, dst)
            if action is None:
                return Trace(source, target, tuple(path), False, f"no route on {node}")
            kind, arg = action
            if kind == "local":
                return Trace(source, target, tuple(path), node == target, "" if node == target else "wrong node")
            if kind == "server":
                cn = self.clients[node].lookup(dst)
                if cn is None:
                    return Trace(source, target, tuple(path), False, f"no iroute on {node}")
                following = cn.removeprefix("link-")
            else:
                following = arg
                if self.clients[following].lookup(src) != f"link-{node}":
                    return Trace(source, target, tuple(path), False, f"bad source address on {following}")
            if following in path:
                return Trace(source, target, tuple(path + [following]), False, "loop")
            path.append(following)

    def send_all(self, sources=None, nodes=None) -> list[Trace]:
        """A packet from every pool of ``sources`` (default: all) to every other pool of ``nodes``."""
        nodes = sorted(nodes if nodes is not None else self.pools)
        sources = sorted(sources if sources is not None else nodes)
        traces = []
        for source in sources:
            for source_pool in self.pools[source]:
                for target in nodes:
                    for target_pool in self.pools[target]:
                        if target_pool != source_pool:
                            traces.append(self.send(source, source_pool, target_pool))
        return traces
