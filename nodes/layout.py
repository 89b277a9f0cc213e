"""Where LanHub puts things on a node, what it calls them, and which names it accepts: one home for each fact.

Pure constants and functions (no Django, no network). Every other module (render, files, provisioning,
openvpn_mgmt, services, players) takes on-node paths, instance names, management ports, tunnel device names and
certificate common names from here, and the model validators and the planner use the same name rules.

Names reach file paths, certificate names and shell commands, so they keep to a safe alphabet:
- a node's (and a LAN's) *display name* is what the host typed, in any script ("Hong Kong", "杭州"): it is shown,
  never used in a path, a certificate or a command;
- its *slug* (``Node.name``, ``Lan.slug``) is derived from the display name once, when the row is created
  (``slug_for``: "Hong Kong" -> ``hong-kong``, "杭州" -> ``hangzhou``), and never changes with it: it names the
  node's files, certificates (``node-<slug>``, ``link-<slug>``), OpenVPN instances and URLs;
- a region is a path of up to 8 lowercase parts separated by ``/`` (``asia/cn/east``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence

from anyascii import anyascii  # pinned in requirements.txt: a small pure-Python transliteration table

# --- name rules -----------------------------------------------------------------------------------------------

# \A and \Z, not ^ and $: "$" also matches before a trailing newline (issue 14, item 13).
NODE_NAME_PATTERN = r"\A[a-z][a-z0-9-]{0,31}\Z"
REGION_PART_PATTERN = r"[a-z0-9][a-z0-9-]{0,31}"
REGION_PATTERN = rf"\A(({REGION_PART_PATTERN})(/{REGION_PART_PATTERN}){{0,7}})?\Z"
NODE_NAME_RE = re.compile(NODE_NAME_PATTERN)
REGION_RE = re.compile(REGION_PATTERN)
NODE_NAME_RULE = "Use 1–32 lowercase letters, digits or '-', starting with a letter."
REGION_RULE = "A region is a path of lowercase names separated by '/', such as asia/cn/east."


SLUG_MAX = 32
DISPLAY_NAME_MAX = 64
DISPLAY_NAME_RULE = f"Enter a name of 1–{DISPLAY_NAME_MAX} characters, in any language."
_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


def is_display_name(value) -> bool:
    """Any script, but one line of printable text (a display name lands in HTML, profile comments and logs)."""
    return (isinstance(value, str) and 0 < len(value) <= DISPLAY_NAME_MAX and value == value.strip()
            and value.isprintable())


def slug_for(display_name: str, *, fallback: str) -> str:
    """The slug a display name gets: transliterated to ASCII, lowercase, other runs as one '-', at most 32
    characters, starting with a letter ("Hong Kong" -> "hong-kong", "杭州" -> "hangzhou", "1st" -> "n-1st"). A name
    with nothing transliterable becomes ``fallback``. The result always passes is_node_name."""
    slug = _SLUG_UNSAFE.sub("-", anyascii(display_name or "").lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"{fallback[0]}-{slug}"
    return slug[:SLUG_MAX].rstrip("-") or fallback


def unique_slug(base: str, taken: Collection[str]) -> str:
    """``base``, or ``base-2``, ``base-3``, … (cut to fit 32 characters): the first not in ``taken``."""
    if base not in taken:
        return base
    for number in range(2, len(taken) + 3):
        suffix = f"-{number}"
        candidate = base[:SLUG_MAX - len(suffix)].rstrip("-") + suffix
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable: len(taken) + 1 candidates cannot all be taken")


def is_node_name(value) -> bool:
    # fullmatch: "$" alone would accept a trailing newline
    return isinstance(value, str) and bool(NODE_NAME_RE.fullmatch(value))


def is_region(value) -> bool:
    return isinstance(value, str) and bool(REGION_RE.fullmatch(value))


# --- certificate common names -----------------------------------------------------------------------------------

NODE_CN_PREFIX = "node-"  # a node's server certificate
LINK_CN_PREFIX = "link-"  # the client certificate a node uses on its links (and the name of its ccd file)
PLAYER_CN_PREFIX = "player-"  # a device's certificate: player-<nickname's slug>-<random suffix>


def node_cn(name: str) -> str:
    return f"{NODE_CN_PREFIX}{name}"


def link_cn(name: str) -> str:
    return f"{LINK_CN_PREFIX}{name}"


def player_cn(nickname: str, suffix: str) -> str:
    """A nickname is typed freely ("Bob Smith", "小明"); the certificate carries its slug ("bob-smith",
    "xiaoming"). The random suffix keeps two players with one slug ("Bob", "bob!") apart."""
    return f"{PLAYER_CN_PREFIX}{slug_for(nickname, fallback='player')}-{suffix}"


def node_cns(name: str) -> tuple[str, str]:
    """Every common name a node's own certificates carry."""
    return node_cn(name), link_cn(name)


# --- paths on a node ----------------------------------------------------------------------------------------------

OPENVPN_DIR = "/etc/openvpn"
LANHUB_DIR = f"{OPENVPN_DIR}/lanhub"
PKI_DIR = f"{LANHUB_DIR}/pki"
# Pid files, logs, status files and pool-persist files live under /etc because the lab gives a node only its own
# /etc (its /run is the machine's).
RUN_DIR = f"{LANHUB_DIR}/run"
ROLLBACK_DIR = f"{LANHUB_DIR}/rollback"  # previous versions of one run's files; exists only during a run
FIREWALL_PATH = f"{LANHUB_DIR}/firewall.rules"
SERVER_DIR = f"{OPENVPN_DIR}/server"
CLIENT_DIR = f"{OPENVPN_DIR}/client"
CCD_DIR = f"{SERVER_DIR}/ccd"
SYSCTL_PATH = "/etc/sysctl.d/90-lanhub.conf"
MANAGED_PREFIXES = (f"{OPENVPN_DIR}/", "/etc/sysctl.d/")  # a planner bug must not be able to write /etc/passwd

PKI_CA = f"{PKI_DIR}/ca.crt"
PKI_TLS_CRYPT = f"{PKI_DIR}/tls-crypt.key"
# Revocation without expiry: `crl-verify DIR dir` refuses a certificate when DIR holds a file named after its
# decimal serial. Unlike a CRL file, a directory has no nextUpdate, so a node LanHub cannot reach keeps accepting
# its players indefinitely and keeps refusing the revoked ones (OPENVPN-NOTES.md, "CRL expiry").
PKI_CRL_DIR = f"{PKI_DIR}/revoked"
PKI_CRL_DIR_KEEP = f"{PKI_CRL_DIR}/.keep"  # the directory must exist for OpenVPN to start, revoked or not


def revoked_serial_path(serial_hex: str) -> str:
    """The file that revokes a certificate, from its serial as LanHub stores it (hex)."""
    return f"{PKI_CRL_DIR}/{int(serial_hex, 16)}"
PKI_NODE_CERT = f"{PKI_DIR}/node.crt"
PKI_NODE_KEY = f"{PKI_DIR}/node.key"
PKI_LINK_CERT = f"{PKI_DIR}/link.crt"
PKI_LINK_KEY = f"{PKI_DIR}/link.key"
# The management interfaces listen on 127.0.0.1 and ask for this password (root-only file): without it any local
# user of the node could kill sessions or read who is online (OPENVPN-NOTES.md, "Management on TCP").
MANAGEMENT_PASSWORD_FILE = f"{PKI_DIR}/management.pw"


# The LAN-discovery relay (docs/discovery.md): its program and config are uploaded like the OpenVPN files; the
# systemd unit is written by the ensure_relay step on systemd hosts only (a lab's /etc/systemd is the machine's).
RELAY_DIR = f"{LANHUB_DIR}/relay"
RELAY_PROGRAM = f"{RELAY_DIR}/lanhub-relay.py"
RELAY_CONFIG = f"{RELAY_DIR}/relay.json"
RELAY_FILES = (RELAY_PROGRAM, RELAY_CONFIG)
RELAY_UNIT_NAME = "lanhub-relay.service"
RELAY_UNIT = f"/etc/systemd/system/{RELAY_UNIT_NAME}"
RELAY_PID = f"{RUN_DIR}/lanhub-relay.pid"
RELAY_LOG = f"{RUN_DIR}/lanhub-relay.log"
RELAY_PORT = 7400  # relay-to-relay messages, on the nodes' own tunnel addresses only


def ccd_path(downstream: str) -> str:
    """The upstream's client-config-dir file for a downstream node's link certificate."""
    return f"{CCD_DIR}/{link_cn(downstream)}"


# --- OpenVPN instances ------------------------------------------------------------------------------------------
# An instance is named like its config file: ``server/lanhub-udp`` is /etc/openvpn/server/lanhub-udp.conf, run as
# the systemd unit ``openvpn-server@lanhub-udp`` where the node has systemd, else as a daemon with a pid file.

UDP_BASENAME = "lanhub-udp"
TCP_BASENAME = "lanhub-tcp"
UDP_INSTANCE = f"server/{UDP_BASENAME}"
TCP_INSTANCE = f"server/{TCP_BASENAME}"
SERVER_INSTANCES = (UDP_INSTANCE, TCP_INSTANCE)
LINK_PREFIX = "lanhub-link-"
INSTANCE_RE = re.compile(r"\A(server|client)/(lanhub-[a-z0-9][a-z0-9-]{0,40})\Z")
UDP_MANAGEMENT = 7505
TCP_MANAGEMENT = 7506
LINK_PORTS = range(7510, 8000)
UDP_DEVICE = "lh-udp"
TCP_DEVICE = "lh-tcp"


def link_basename(upstream: str) -> str:
    return f"{LINK_PREFIX}{upstream}"


def link_instance(upstream: str) -> str:
    return f"client/{link_basename(upstream)}"


def link_device(upstream: str) -> str:
    """``lhl-`` + 8 hex digits: fits IFNAMSIZ (15) whatever the upstream's name is."""
    return "lhl-" + hashlib.sha1(upstream.encode()).hexdigest()[:8]


def instance_paths(name: str) -> dict[str, str]:
    """Config file, systemd unit, pid file and log of an instance (``name`` must match INSTANCE_RE)."""
    kind, _, base = name.partition("/")
    return {"dir": f"{OPENVPN_DIR}/{kind}", "conf": f"{OPENVPN_DIR}/{kind}/{base}.conf",
            "unit": f"openvpn-{kind}@{base}", "pid": f"{RUN_DIR}/{base}.pid", "log": f"{RUN_DIR}/{base}.log",
            "status": f"{RUN_DIR}/{base}.status", "ipp": f"{RUN_DIR}/{base}.ipp", "base": base}


def instance_for_path(path: str) -> str | None:
    """The instance a file belongs to, from its path alone (old files may be known only by path and hash)."""
    if path == f"{SERVER_DIR}/{UDP_BASENAME}.conf" or path.startswith(f"{CCD_DIR}/"):
        return UDP_INSTANCE
    if path == f"{SERVER_DIR}/{TCP_BASENAME}.conf":
        return TCP_INSTANCE
    if path.startswith(f"{CLIENT_DIR}/{LINK_PREFIX}") and path.endswith(".conf"):
        return "client/" + path[len(CLIENT_DIR) + 1: -len(".conf")]
    return None


def link_management_ports(upstreams: Sequence[str]) -> dict[str, int]:
    """A management port per link, from a hash of the upstream's name.

    The port stays put as other links come and go; two upstreams hashing to one port probe upward in name
    order, which is deterministic within the node.
    """
    ports: dict[str, int] = {}
    used: set[int] = set()
    for upstream in sorted(upstreams):
        slot = int(hashlib.sha1(upstream.encode()).hexdigest(), 16) % len(LINK_PORTS)
        while LINK_PORTS[slot] in used:
            slot = (slot + 1) % len(LINK_PORTS)
        used.add(LINK_PORTS[slot])
        ports[upstream] = LINK_PORTS[slot]
    return ports
