"""A player's .ovpn profile: pure rendering, no Django, no database.

The profile must import unchanged into OpenVPN 2.5/2.6, OpenVPN Connect 3 and Tunnelblick, so it uses only options
all three accept: ``remote host port proto`` lines (tried strictly in order: the first is the node the player chose,
the rest are fallbacks ranked by the caller), inline ``<ca>``/``<cert>``/``<key>``/``<tls-crypt>``, and nothing
that runs scripts. Everything interpolated is validated first: a newline smuggled into a host name, a LAN name or a
PEM would otherwise let its author add directives (``up``, ``script-security``) to a file a friend runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from anyascii import anyascii

from nodes import layout

PROTOCOLS = ("udp", "tcp")
NODE_CN_PREFIX = layout.NODE_CN_PREFIX  # node server certificates have CN "node-<name>"
_HOST = re.compile(r"[A-Za-z0-9:][A-Za-z0-9.:-]{0,252}")  # DNS name, IPv4 or IPv6 literal: never spaces or quotes
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\n[A-Za-z0-9+/=\n]+?-----END \1-----\n")
CERTIFICATE = ("CERTIFICATE",)
PRIVATE_KEY = ("PRIVATE KEY", "EC PRIVATE KEY")  # PKCS8 as lanhub.pki writes it, or legacy SEC1
_TLS_CRYPT = re.compile(
    r"(#[^\n]*\n)*-----BEGIN OpenVPN Static key V1-----\n([0-9a-f]{32}\n){16}-----END OpenVPN Static key V1-----\n?"
)
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class NodeLike(Protocol):
    """What profile_remotes needs from a node (nodes.models.Node has these fields)."""

    public_address: str
    public_ipv6: str  # may be empty
    udp_port: int | None
    tcp_port: int | None


@dataclass(frozen=True)
class Remote:
    """One ``remote`` line. Validated on creation so that render_profile can interpolate it as is."""

    host: str
    port: int
    proto: str  # "udp" | "tcp"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not _HOST.fullmatch(self.host):
            raise ValueError(f"invalid remote host {self.host!r}: expected a DNS name or an IP address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"invalid remote port {self.port!r}: expected 1-65535")
        if self.proto not in PROTOCOLS:
            raise ValueError(f"invalid remote proto {self.proto!r}: expected 'udp' or 'tcp'")


def profile_remotes(*, chosen: NodeLike, others: Sequence[NodeLike]) -> list[Remote]:
    """The connection order: the chosen node's UDP then TCP, then each other node (in the given order) likewise.
    A dual-stack node's IPv6 address follows its public address for each transport: a player whose network has
    only one family fails over to the other within the node (an unreachable family fails at once).

    UDP comes first because it performs better for games; TCP on the same node comes next because a network that
    drops UDP usually still passes TCP, and staying on the chosen node beats moving to a distant one. A transport a
    node does not run (port None/0) is skipped, and an entry already listed (the chosen node repeated among the
    others) is not tried twice.
    """
    remotes: list[Remote] = []
    seen: set[tuple[str, int, str]] = set()  # a set, not `remote in remotes`: 100 nodes are 200 remotes
    for node in (chosen, *others):
        hosts = [node.public_address, node.public_ipv6]
        for proto, port in (("udp", node.udp_port), ("tcp", node.tcp_port)):
            for host in hosts:
                if not port or not host or (host, port, proto) in seen:
                    continue
                seen.add((host, port, proto))
                remotes.append(Remote(host=host, port=port, proto=proto))
    return remotes


def render_profile(
    *, lan_name: str, nickname: str, remotes: Sequence[Remote], ca_pem: str, cert_pem: str, key_pem: str, tls_crypt: str
) -> str:
    """Render the complete profile text. Raises ValueError rather than render something a client would misread."""
    if not remotes:
        raise ValueError("a profile needs at least one remote")
    lines = _header(lan_name=lan_name, nickname=nickname, remotes=remotes)
    lines += _options(remotes)
    lines += _inline("ca", _lan_pem(ca_pem))
    lines += _inline("cert", _pem(cert_pem, what="cert_pem", labels=CERTIFICATE, single=True))
    lines += _inline("key", _pem(key_pem, what="key_pem", labels=PRIVATE_KEY, single=True))
    lines += _inline("tls-crypt", _lan_tls_crypt(tls_crypt))
    return "\n".join(lines) + "\n"


def profile_filename(*, lan: str, nickname: str, node: str) -> str:
    """``<lan>-<nickname>-<node>.ovpn`` using only [A-Za-z0-9_.-]: safe in a path and a Content-Disposition header.

    Other scripts are transliterated to ASCII ("Zoë" -> "Zoe", "小明" -> "XiaoMing"); other runs of unsafe characters
    become one '_'. Each part is trimmed of edge '.', '_', '-' and cut to 40 characters; a part with nothing left
    becomes a fixed word ("lan", "player", "node"), so the name is never empty, hidden or option-like.
    """
    parts = [_filename_part(lan, "lan"), _filename_part(nickname, "player"), _filename_part(node, "node")]
    return "-".join(parts) + ".ovpn"


# --- helpers -----------------------------------------------------------------------------------------------------


def _header(*, lan_name: str, nickname: str, remotes: Sequence[Remote]) -> list[str]:
    lines = [
        "# LanHub profile",
        f"# LAN: {_comment_text(lan_name)}",
        f"# Player: {_comment_text(nickname)}",
        "# Servers, tried in this order:",
    ]
    lines += [f"#   {i}. {r.host} {r.port}/{r.proto}" for i, r in enumerate(remotes, start=1)]
    return lines + ["#"]


def _options(remotes: Sequence[Remote]) -> list[str]:
    """Client options. No remote-random: the order is the player's choice first, then ranked fallbacks."""
    return [
        "client",
        "dev tun",
        "nobind",
        # 'tcp' here means tcp-client (implied by 'client'); OpenVPN Connect accepts the same spelling.
        *(f"remote {r.host} {r.port} {r.proto}" for r in remotes),
        "server-poll-timeout 5",  # move on to the next remote after 5 s instead of the default 120 s
        # A handshake begun with a server that was restarting (a sync) would otherwise hang for the default 60 s
        # before the client starts over; 10 s is ample for a TLS handshake over any real link.
        "hand-window 10",
        "resolv-retry infinite",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",  # only a certificate with serverAuth, i.e. a node, can be the server
        f"verify-x509-name {NODE_CN_PREFIX} name-prefix",  # any node of this LAN, never a fellow player
        # A rogue or stale node must not take over the player's traffic or name resolution: the LAN needs only
        # its routes, so a pushed default gateway or DNS server is ignored (OpenVPN 2.4+, OpenVPN Connect).
        'pull-filter ignore "redirect-gateway"',
        'pull-filter ignore "dhcp-option"',
        "verb 3",
    ]


def _inline(tag: str, body: str) -> list[str]:
    return [f"<{tag}>", body.rstrip("\n"), f"</{tag}>"]


def _pem(text: str, *, what: str, labels: Sequence[str], single: bool) -> str:
    """Accept only whole PEM blocks of the expected kind: anything else could close the inline tag early and add
    directives after it, or put a key where a certificate belongs."""
    normalised = text.replace("\r\n", "\n").strip() + "\n"
    blocks = list(_PEM_BLOCK.finditer(normalised))
    if not blocks or "".join(b.group(0) for b in blocks) != normalised:
        raise ValueError(f"{what} is not PEM")
    if any(b.group(1) not in labels for b in blocks) or (single and len(blocks) != 1):
        raise ValueError(f"{what} must hold {'one' if single else 'only'} {' or '.join(labels)} PEM")
    return normalised


@lru_cache(maxsize=64)
def _lan_pem(text: str) -> str:
    """The LAN's CA certificate, checked once per process: every profile of the LAN holds the same one."""
    return _pem(text, what="ca_pem", labels=CERTIFICATE, single=False)


@lru_cache(maxsize=64)
def _lan_tls_crypt(text: str) -> str:
    """The LAN's tls-crypt key (as _lan_pem)."""
    return _tls_crypt(text)


def _tls_crypt(text: str) -> str:
    normalised = text.replace("\r\n", "\n").strip() + "\n"
    if not _TLS_CRYPT.fullmatch(normalised):
        raise ValueError("tls_crypt is not an OpenVPN static key V1 (2048-bit)")
    return normalised


def _comment_text(text: str) -> str:
    """Keep display names readable in the header, but never let one start a new (non-comment) line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


def _filename_part(text: str, fallback: str) -> str:
    ascii_text = anyascii(text)  # "Zoë" -> "Zoe", "小明" -> "XiaoMing"
    part = _FILENAME_UNSAFE.sub("_", ascii_text).strip("._-")[:40].strip("._-")
    return part or fallback
