"""Render a Plan into the files each node needs: deterministic text, each with a content hash.

Pure: plain data in, strings out. The same plan renders byte-identical files, so a sync compares hashes and
restarts only the OpenVPN instances whose files changed (``diff``).

Choices worth knowing:
- Server ``route`` lines carry no gateway: on a tun server OpenVPN picks the client by iroute, not by next hop.
- Routes are aggregated (10.2.0.0/16 + 10.3.0.0/16 render as ``10.2.0.0 255.254.0.0``).
- A link client uses ``route-nopull`` (and its ccd file ``push-reset``): several upstreams would each push the
  supernet. Its routes are the prefixes whose next hop is that upstream (possibly the whole supernet as a
  default); a route equal to the upstream's UDP pool is left out, because that pool is the tunnel's connected
  subnet.
- A ccd file's instance is ``server/lanhub-udp``: OpenVPN reads ccd at connect time, so new iroutes only take
  effect when the link client reconnects.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from nodes import games, layout
from nodes.topology import LanSpec, NodeSpec, Plan, PlanError, dynamic_pool

# Paths, instance names, ports and certificate names come from layout.py (re-exported here for callers and tests).
PKI = layout.PKI_DIR
RUN = layout.RUN_DIR
SERVER_DIR = layout.SERVER_DIR
CLIENT_DIR = layout.CLIENT_DIR
CCD_DIR = layout.CCD_DIR
SYSCTL_PATH = layout.SYSCTL_PATH
FIREWALL_PATH = layout.FIREWALL_PATH
UDP_INSTANCE = layout.UDP_INSTANCE
TCP_INSTANCE = layout.TCP_INSTANCE
UDP_MANAGEMENT = layout.UDP_MANAGEMENT
TCP_MANAGEMENT = layout.TCP_MANAGEMENT
LINK_PORTS = layout.LINK_PORTS
link_instance = layout.link_instance
link_device = layout.link_device
link_cn = layout.link_cn
node_cn = layout.node_cn
instance_for_path = layout.instance_for_path
link_management_ports = layout.link_management_ports
ROUTE_QUOTA = 256  # OpenVPN's default max-routes-per-client
QUOTA_MARGIN = 16  # the client's own address and a few spare: a file near the limit gets the quota raised
HEADER = "# Managed by LanHub; local edits are overwritten at the next sync."
STATUS_INTERVAL = 2  # seconds between status-file rewrites: the discovery relay learns its players from them
RELAY_PROGRAM = layout.RELAY_PROGRAM
RELAY_CONFIG = layout.RELAY_CONFIG
RELAY_UNIT = layout.RELAY_UNIT
RELAY_FILES = layout.RELAY_FILES
_RELAY_SOURCE = Path(__file__).with_name("discovery") / "relay.py"
# A host name or an IPv4/IPv6 address: one token of these characters is all a `remote` line may carry.
_HOST_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
# Dual-stack sockets: `proto udp` / `tcp-server` bind IPv4 only, so a node reached by its IPv6 address refused every
# player and link (OPENVPN-NOTES.md "IPv6 underlay"). udp6 / tcp6-server bind [::] without IPV6_V6ONLY and take
# IPv4 as well (as v4-mapped addresses). Clients keep plain `udp`, which follows the family of the remote's address.
UDP_PROTO = "proto udp6"
TCP_PROTO = "proto tcp6-server"


@dataclass(frozen=True)
class RenderedFile:
    path: str
    content: str
    mode: int = 0o644
    instance: str | None = None  # the OpenVPN instance that must restart when this file changes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass
class FileDiff:
    added: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    restart: set[str] = field(default_factory=set)
    stop: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@functools.lru_cache(maxsize=65536)
def _net(prefix: ipaddress.IPv4Network) -> str:
    """``address netmask`` as OpenVPN wants it (plain integers: ipaddress's own formatting is slow)."""
    mask = (0xFFFFFFFF << (32 - prefix.prefixlen)) & 0xFFFFFFFF
    return f"{_dotted(int(prefix.network_address))} {_dotted(mask)}"


def _dotted(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


# Rendering thousands of nodes formats the same few values over and over; ipaddress is slow at it.
@functools.lru_cache(maxsize=16)
def _supernet(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


@functools.lru_cache(maxsize=16)
def _push_player_routes(prefixes: tuple[ipaddress.IPv4Network, ...]) -> tuple[str, ...]:
    """Only what the LAN allocated (Plan.player_routes), not the supernet: a player's own 10.x networks stay
    outside the tunnel."""
    return tuple(f'push "route {_net(prefix)}"' for prefix in prefixes)


@functools.lru_cache(maxsize=65536)
def _dynamic_pool(pool: ipaddress.IPv4Network) -> tuple[str, str]:
    low, high = dynamic_pool(pool)
    return str(low), str(high)


@functools.lru_cache(maxsize=65536)
def _gateway(pool: ipaddress.IPv4Network) -> str:
    return str(pool.network_address + 1)


def _common_tail(management: int, status: str) -> list[str]:
    return [
        "keepalive 10 60",
        "persist-key",
        "persist-tun",
        "disable-dco",
        f"management 127.0.0.1 {management} {layout.MANAGEMENT_PASSWORD_FILE}",
        f"status {RUN}/{status}.status {STATUS_INTERVAL}",
        "verb 3",
    ]


def _unprivileged() -> list[str]:
    # Servers and link clients drop root once their sockets, tun device, routes, keys and status/pool files are
    # open: a bug in the TLS or packet code then runs as nobody. persist-key and persist-tun (_common_tail) keep
    # keys, device and routes across a reconnect, so nothing needs root again: OpenVPN reopens the device (and
    # re-adds routes) only when the options pulled from the server change, and a link's never do (render_ccd).
    return ["user nobody", "group nogroup"]


def _pool_persist(instance: str) -> list[str]:
    # A player keeps their address across server restarts (syncs, drift repairs): friends join games by IP.
    return [f"ifconfig-pool-persist {RUN}/{instance}.ipp"]


def _server_pki() -> list[str]:
    return [
        f"ca {layout.PKI_CA}",
        f"cert {layout.PKI_NODE_CERT}",
        f"key {layout.PKI_NODE_KEY}",
        "dh none",
        f"tls-crypt {layout.PKI_TLS_CRYPT}",
        f"crl-verify {layout.PKI_CRL_DIR} dir",
    ]


def _discovery_pushes(discovery: games.DiscoverySpec) -> list[str]:
    """Routes that bring a player's game announcements into the tunnel: the limited broadcast and the LAN's
    multicast groups, each as a /32 (never all of 224/4: the player's home mDNS and SSDP stay home). A player's
    subnet broadcast is on-link on the tunnel already.

    The limited broadcast's route carries gateway ``vpn_gateway`` and metric 1. Windows sends 255.255.255.255 out of
    one interface, the one whose route for it has the lowest metric (route metric + interface metric; every adapter
    has an on-link 255.255.255.255/32 route with route metric 256), so metric 1 makes the tunnel win over the home
    network. OpenVPN 2.6 passes the metric to Windows (route.c: the interactive service's CreateIpForwardEntry2,
    route.exe METRIC, ipapi dwForwardMetric1), Linux (``metric 1``) and macOS (``-rtt 1``); openvpn3 (OpenVPN
    Connect) reads the metric from the route's fifth field and accepts only ``vpn_gateway`` or ``net_gateway`` as its
    fourth (tun/client/tunprop.hpp: route_target), so the keyword, not an address, is pushed. Multicast groups need no
    metric: a /32 beats the on-link 224.0.0.0/4 by prefix length (docs/discovery.md)."""
    lines = ['push "route 255.255.255.255 255.255.255.255 vpn_gateway 1"']
    return lines + [f'push "route {group} 255.255.255.255"' for group in discovery.groups]


def _port(node: NodeSpec, which: str) -> int:
    """A port as a config line needs it. The models validate ports too; the renderer refuses on its own, because a
    value that reached it another way (a migration, a script) must never become a second directive."""
    value = getattr(node, which)
    if type(value) is not int or not 1 <= value <= 65535:
        raise PlanError(f"node {node.name}: {which.replace('_', ' ')} {value!r} is not a port number (1-65535)")
    return value


def _remote_host(node: NodeSpec, host) -> str:
    if not isinstance(host, str) or not _HOST_TOKEN.fullmatch(host):
        raise PlanError(f"node {node.name}: public address {host!r} is not a host name or an IP address")
    return host


def _text(lines: list[str]) -> str:
    return "\n".join([HEADER, *lines]) + "\n"


def render_udp_server(plan: Plan, lan: LanSpec, node: NodeSpec,
                      discovery: games.DiscoverySpec = games.DiscoverySpec()) -> RenderedFile:
    pool = plan.pools[node.name].udp
    low, high = _dynamic_pool(pool)
    downstreams = set(plan.downstreams(node.name))
    lines = [
        f"port {_port(node, 'udp_port')}", UDP_PROTO, f"dev {layout.UDP_DEVICE}", "dev-type tun", "topology subnet",
        # nopool + our own ifconfig-pool keeps the first /24 free for the links' fixed addresses.
        f"server {_net(pool)} nopool",
        f"ifconfig-pool {low} {high}",
        f"client-config-dir {CCD_DIR}",
    ]
    # Without these the kernel never hands the downstreams' prefixes to OpenVPN (verified: players fail). A route
    # through the node itself is a region block it is the primary of: what no client's iroute holds is dropped.
    lines += [f"route {_net(r.prefix)}" for r in plan.routes[node.name] if r.via in downstreams or r.via == node.name]
    iroutes = max((len(plan.routes_via(node.name, down)) for down in downstreams), default=0)
    if iroutes > ROUTE_QUOTA - QUOTA_MARGIN:
        # OpenVPN learns at most 256 routes per client and silently drops traffic to the rest ("route quota
        # exceeded", OPENVPN-NOTES.md). Region blocks keep ccd files far below that; a file that still needs more
        # gets the quota raised, in steps of 256 so the line does not change with every node.
        quota = -(-(iroutes + QUOTA_MARGIN) // ROUTE_QUOTA) * ROUTE_QUOTA
        lines.append(f"max-routes-per-client {quota}")
    lines += [*_push_player_routes(plan.player_routes(_supernet(lan.supernet))), *_discovery_pushes(discovery)]
    # Clients say goodbye when they stop, so a player who quits leaves the lobby at once instead of at the
    # keepalive timeout. Pushed, not written in the profile: a global explicit-exit-notify in a profile with TCP
    # remotes is fatal on 2.4/2.5 clients, while pushed from a UDP server it is safe on every client.
    lines.append('push "explicit-exit-notify 1"')
    lines += _server_pki()
    # On a restart (a sync, a drift repair) tell UDP clients to reconnect at once; without it players and the
    # links of downstream nodes sit silent until ping-restart, a minute or two later.
    lines += ["explicit-exit-notify 1", *_pool_persist(layout.UDP_BASENAME), *_unprivileged()]
    lines += _common_tail(UDP_MANAGEMENT, layout.UDP_BASENAME)
    return RenderedFile(layout.instance_paths(UDP_INSTANCE)["conf"], _text(lines), instance=UDP_INSTANCE)


def render_tcp_server(plan: Plan, lan: LanSpec, node: NodeSpec,
                      discovery: games.DiscoverySpec = games.DiscoverySpec()) -> RenderedFile:
    pool = plan.pools[node.name].tcp
    lines = [
        f"port {_port(node, 'tcp_port')}", TCP_PROTO, f"dev {layout.TCP_DEVICE}", "dev-type tun", "topology subnet",
        f"server {_net(pool)}",
        *_push_player_routes(plan.player_routes(_supernet(lan.supernet))), *_discovery_pushes(discovery),
        *_server_pki(),
    ]
    lines += [*_pool_persist(layout.TCP_BASENAME), *_unprivileged()]
    lines += _common_tail(TCP_MANAGEMENT, layout.TCP_BASENAME)
    return RenderedFile(layout.instance_paths(TCP_INSTANCE)["conf"], _text(lines), instance=TCP_INSTANCE)


def render_ccd(plan: Plan, upstream: str, downstream: str) -> RenderedFile:
    """What the upstream's UDP server tells the downstream's link client, and what it routes to it."""
    link = plan.link(upstream, downstream)
    mask = plan.pools[upstream].udp.netmask
    # push-reset: the link client pulls only its address, never the players' push list (routes, discovery
    # groups). That list changes with the LAN's settings, and a client whose pulled options change on reconnect
    # closes and reopens its tun device, which its unprivileged user (user nobody) cannot. The link client sets
    # its own topology, keepalive and routes.
    lines = ["push-reset", f"ifconfig-push {link.address} {mask}"]
    # iroutes are both the routing table inside OpenVPN and its source-address filter for this client.
    lines += [f"iroute {_net(r.prefix)}" for r in plan.routes_via(upstream, downstream)]
    return RenderedFile(layout.ccd_path(downstream), _text(lines), instance=UDP_INSTANCE)


def render_link_client(plan: Plan, node: NodeSpec, upstream: NodeSpec, management: int) -> RenderedFile:
    if not upstream.public_address:
        raise PlanError(f"node {upstream.name} has no public address, but {node.name} must link to it")
    up_pool = plan.pools[upstream.name].udp
    gateway = _gateway(up_pool)
    basename = layout.link_basename(upstream.name)
    lines = [
        "client", f"dev {link_device(upstream.name)}", "dev-type tun", "topology subnet", "proto udp",
        # Each of the upstream's addresses, IPv4 (or its name) first: a node on one family only still links.
        *(f"remote {_remote_host(upstream, host)} {_port(upstream, 'udp_port')}" for host in _addresses(upstream)),
        "nobind", "resolv-retry infinite", "connect-retry 2 10",
        # The upstream restarts on syncs; a handshake begun with the exiting instance is retried after 10 s rather
        # than the default 60 s.
        "hand-window 10",
        f"ca {layout.PKI_CA}", f"cert {layout.PKI_LINK_CERT}", f"key {layout.PKI_LINK_KEY}",
        f"tls-crypt {layout.PKI_TLS_CRYPT}",
        "remote-cert-tls server", f"verify-x509-name {node_cn(upstream.name)} name",
        "route-nopull",
    ]
    lines += [f"route {_net(r.prefix)} {gateway}" for r in plan.routes_via(node.name, upstream.name)
              if r.prefix != up_pool]
    lines += [*_unprivileged(), *_common_tail(management, basename)]
    return RenderedFile(f"{CLIENT_DIR}/{basename}.conf", _text(lines), instance=link_instance(upstream.name))


def _addresses(node: NodeSpec) -> list[str]:
    return [node.public_address] + ([node.public_ipv6] if node.public_ipv6 not in ("", node.public_address) else [])


def relay_address(plan: Plan, name: str) -> ipaddress.IPv4Address:
    """Where a node's relay listens: its UDP server's own tunnel address, reachable from every node over the
    LAN's routes (and inside the iroutes that name this node, so no player can forge it)."""
    return plan.pools[name].udp.network_address + 1


def render_relay_config(plan: Plan, node: NodeSpec, discovery: games.DiscoverySpec) -> RenderedFile:
    """The discovery relay's JSON config: its address, its peers (its neighbours on the plan's relay tree, so a node
    joining changes this file on its tree neighbour only), its instances, the relayed ports and groups."""
    pools = plan.pools[node.name]
    config = {
        "node": node.name,
        "address": str(relay_address(plan, node.name)),
        "port": layout.RELAY_PORT,
        "peers": [str(relay_address(plan, other)) for other in plan.relay_neighbours(node.name)],
        "instances": [
            {"device": layout.UDP_DEVICE, "pool": str(pools.udp),
             "status": layout.instance_paths(UDP_INSTANCE)["status"]},
            {"device": layout.TCP_DEVICE, "pool": str(pools.tcp),
             "status": layout.instance_paths(TCP_INSTANCE)["status"]},
        ],
        "link_prefix": layout.LINK_CN_PREFIX,
        "ports": [list(r) for r in discovery.ports],
        "groups": list(discovery.groups),
        "rate": {"packets": games.RATE_PACKETS, "bytes": games.RATE_BYTES,
                 "burst_packets": games.BURST_PACKETS, "burst_bytes": games.BURST_BYTES},
    }
    return RenderedFile(RELAY_CONFIG, json.dumps(config, indent=1, sort_keys=True) + "\n")


def render_relay_program() -> RenderedFile:
    return RenderedFile(RELAY_PROGRAM, _RELAY_SOURCE.read_text(), mode=0o755)


def render_relay_unit() -> RenderedFile:
    """The systemd unit. Not one of the node's uploaded files: ensure_relay writes it where systemd runs (hosts
    without systemd run the same command as a daemon with a pid file, and a test lab's shared /etc/systemd must
    never receive it)."""
    lines = [
        "[Unit]", "Description=LanHub LAN-discovery relay (game broadcasts between servers)",
        "After=network-online.target",
        # The relay exits cleanly when its config is removed (the node was deleted): then it must stay stopped.
        f"ConditionPathExists={RELAY_CONFIG}", "",
        "[Service]", f"ExecStart=/usr/bin/python3 {RELAY_PROGRAM} --config {RELAY_CONFIG}",
        # A changed relay.json (a node added or removed, a new game list) is re-read in place.
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure", "RestartSec=2", "",
        "[Install]", "WantedBy=multi-user.target",
    ]
    return RenderedFile(RELAY_UNIT, _text(lines))


def render_sysctl() -> RenderedFile:
    return RenderedFile(SYSCTL_PATH, _text(["net.ipv4.ip_forward=1"]))


def render_firewall(lan: LanSpec) -> RenderedFile:
    """Rules for ``iptables-restore --noflush``: forward LAN traffic between LanHub tunnels only.

    ``lh+`` matches lh-udp, lh-tcp and every lhl-* link device. Declaring and flushing the chain makes the
    chain's rules idempotent. The FORWARD jump is not: iptables-restore cannot say "insert if missing", and a
    ``-D`` of a missing rule would fail the whole restore. A second jump is harmless (the chain is idempotent),
    but the applying step should drop the ``-I`` line when ``iptables -C FORWARD -j LANHUB-FORWARD`` succeeds.
    """
    supernet = ipaddress.IPv4Network(lan.supernet)
    lines = [
        "*filter",
        ":LANHUB-FORWARD - [0:0]",
        "-F LANHUB-FORWARD",
        f"-A LANHUB-FORWARD -i lh+ -o lh+ -s {supernet} -d {supernet} -j ACCEPT",
        # Anything else to or from a tunnel is dropped: a player must not use the node as a way onto its uplink
        # (the node would forward, un-NATed, whatever a player sends), nor the uplink reach the players through it.
        "-A LANHUB-FORWARD -i lh+ -j DROP",
        "-A LANHUB-FORWARD -o lh+ -j DROP",
        "-I FORWARD 1 -j LANHUB-FORWARD",
        "COMMIT",
    ]
    return RenderedFile(FIREWALL_PATH, _text(lines), mode=0o600)


def render_node(
    plan: Plan, lan: LanSpec, nodes_by_name: Mapping[str, NodeSpec], name: str,
    discovery: games.DiscoverySpec = games.DiscoverySpec(),
) -> dict[str, RenderedFile]:
    """Every file one node needs, by path. A down node gets its own servers and no links."""
    node = nodes_by_name[name]
    files = [render_udp_server(plan, lan, node, discovery), render_tcp_server(plan, lan, node, discovery),
             render_sysctl(), render_firewall(lan), render_relay_program(), render_relay_config(plan, node, discovery)]
    files += [render_ccd(plan, name, down) for down in plan.downstreams(name)]
    upstreams = plan.upstreams(name)
    ports = link_management_ports(upstreams)
    files += [render_link_client(plan, node, nodes_by_name[up], ports[up]) for up in upstreams]
    return {f.path: f for f in files}


def render_lan(plan: Plan, lan: LanSpec, nodes: Sequence[NodeSpec] | Mapping[str, NodeSpec],
               discovery: games.DiscoverySpec = games.DiscoverySpec()):
    """Files for every node: node name -> path -> file."""
    by_name = dict(nodes) if isinstance(nodes, Mapping) else {n.name: n for n in nodes}
    return {name: render_node(plan, lan, by_name, name, discovery) for name in sorted(by_name)}


def diff(old: Mapping[str, str | RenderedFile], new: Mapping[str, RenderedFile]) -> FileDiff:
    """What a sync must write, delete, restart and stop to go from ``old`` (path -> hash or file) to ``new``."""
    def digest(value):
        return value.sha256 if isinstance(value, RenderedFile) else value

    result = FileDiff()
    result.added = {p for p in new if p not in old}
    result.changed = {p for p in new if p in old and digest(old[p]) != new[p].sha256}
    result.removed = {p for p in old if p not in new}
    live = {f.instance for f in new.values() if f.instance}
    for path in result.added | result.changed:
        if new[path].instance:
            result.restart.add(new[path].instance)
    for path in result.removed:
        instance = instance_for_path(path)
        if instance in live:
            result.restart.add(instance)  # e.g. a ccd file went away: the server must forget that link
        elif instance:
            result.stop.add(instance)
    return result
