"""The verify step: instances running, listening and up, links pinged (ping_through); NodeLink and node_links.

Named verification, not verify: the package re-exports the ``verify`` function under that name.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fabric import Connection

from nodes import layout
from nodes.provisioning.instances import _ALIVE_SH, _paths
from nodes.ssh import ProvisioningError, run_root

VERIFY_WAIT = 15  # seconds an instance gets to be running, listening and have its device up
LINK_WAIT = 20  # seconds a link gets to answer a ping through its tunnel

_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_RELEASE_RE = re.compile(r"\bOpenVPN\s+(\d+\.\d+(?:\.\d+)?(?:[_-][A-Za-z0-9]+)?)")


def openvpn_release(version_line: str) -> str:
    """"2.6.14" out of "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] ..."; "" when there is none."""
    match = _RELEASE_RE.search(version_line or "")
    return match.group(1) if match else ""


@dataclass(frozen=True)
class NodeLink:
    """A link as its downstream node sees it: the client instance, its tunnel device and the upstream's address."""

    upstream: str
    instance: str
    device: str
    peer: str


def node_links(plan, node_name: str) -> list[NodeLink]:
    """The links ``node_name`` runs a client for, with what verify and the status poll ping through each."""
    links = []
    for link in plan.links:
        if link.downstream == node_name:
            peer = str(plan.pools[link.upstream].udp.network_address + 1)  # "server <net> ..." takes .1
            links.append(NodeLink(link.upstream, layout.link_instance(link.upstream),
                                  layout.link_device(link.upstream), peer))
    return links


# ---- verify -------------------------------------------------------------------------------------------------------


def verify(c: Connection, *, wanted: Iterable[str], links: Iterable[tuple[str, str]] = ()) -> dict:
    """Check that every wanted instance runs, listens (servers) and has its device up, and ping each link.

    Returns ``{"openvpn_version": str, "instances": {name: {...}}, "links": {device: rtt_ms | None},
    "warnings": [...]}``; raises ProvisioningError("verify", ...) naming the first instance problem, with the tail
    of that instance's log. A link that does not answer is a warning (see below), not an error.
    """
    wanted = sorted(set(wanted))
    configs = _config_lines(c, wanted)
    version = openvpn_release(run_root(c, "openvpn --version 2>&1 | head -n 1", hide=True, warn=True).stdout)
    deadline = time.monotonic() + VERIFY_WAIT
    started = time.monotonic()
    while True:
        instances = _probe_instances(c, wanted, configs)
        bad = {n: s for n, s in instances.items() if not all(v is not False for v in s.values())}
        dead = [n for n, s in bad.items() if not s["running"]]
        if not bad:
            break
        # A process that is gone will not come back by itself; a grace second covers one still writing its pid.
        if time.monotonic() > deadline or (dead and time.monotonic() - started > 1.5):
            name = dead[0] if dead else sorted(bad)[0]
            problems = [k.replace("_", " ") for k, v in bad[name].items() if v is False]
            raise ProvisioningError("verify", f"{name} is not {', '.join(problems)}.{_log_tail(c, name)}")
        time.sleep(0.3)
    result = {"openvpn_version": version, "instances": instances, "links": {}, "warnings": []}
    for device, peer in links:
        rtt = ping_through(c, device, peer, wait=LINK_WAIT)
        result["links"][device] = rtt
        if rtt is None:
            # A silent link is reported, not rolled back: its other end may simply not be synced yet (both ends of
            # a new link sync in parallel), and undoing this node's correct files would not bring it up sooner.
            # The status poll keeps measuring it and the dashboard shows it down.
            owner = next((n for n, conf in configs.items() if conf.get("dev") == device), None)
            result["warnings"].append(f"The link on {device} gets no answer from {peer} after {LINK_WAIT}s yet."
                                      + (_log_tail(c, owner) if owner else ""))
    return result


def ping_through(c: Connection, device: str, peer: str, *, wait: float = 0) -> float | None:
    """Round-trip time in ms of one ping to ``peer`` out of ``device``, retried for up to ``wait`` seconds."""
    if not _DEVICE_RE.match(device) or not re.match(r"^[0-9a-fA-F:.]+$", peer):
        raise ProvisioningError("verify", f"Bad link device or peer: {device!r} {peer!r}.", permanent=True)
    cmd = (f"end=$(( $(date +%s) + {int(wait)} )); while :; do "
           f"ping -n -c1 -W1 -I {shlex.quote(device)} {shlex.quote(peer)} && exit 0; "
           "[ $(date +%s) -ge $end ] && exit 1; sleep 0.5; done")
    out = c.run(cmd, hide=True, warn=True)
    match = re.search(r"time[=<]([\d.]+) ?ms", out.stdout)
    return float(match.group(1)) if out.ok and match else None


def _config_lines(c: Connection, names: list[str]) -> dict[str, dict[str, str]]:
    """name -> {"port", "proto", "dev", "management"} as the instance's config file says."""
    if not names:
        return {}
    confs = " ".join(shlex.quote(_paths(n)["conf"]) for n in names)
    out = run_root(c, f"grep -H -E '^[[:space:]]*(port|lport|proto|dev|management)[[:space:]]' -- {confs}; true",
                   hide=True, warn=True).stdout
    configs = {n: {} for n in names}
    by_conf = {_paths(n)["conf"]: n for n in names}
    for line in out.splitlines():
        path, _, option = line.partition(":")
        key, _, value = option.strip().partition(" ")
        if path in by_conf:
            configs[by_conf[path]].setdefault("port" if key == "lport" else key, value.strip())
    return configs


def _probe_instances(c: Connection, names: list[str], configs: dict) -> dict[str, dict]:
    checks = [_ALIVE_SH, "[ -d /run/systemd/system ] && sd=1 || sd=", ]
    for name in names:
        p = {k: shlex.quote(v) for k, v in _paths(name).items()}
        checks.append(f"if [ -n \"$sd\" ] && systemctl is-active --quiet {p['unit']} || lh_alive \"$(cat {p['pid']} "
                      f"2>/dev/null)\"; then echo \"RUN {name}\"; fi")
    checks += ["echo @@; ss -Hlnu 2>/dev/null; ss -Hlnt 2>/dev/null; echo @@; ip -o link show 2>/dev/null; true"]
    out = run_root(c, "\n".join(checks), hide=True, warn=True).stdout
    head, sockets, links = (out.split("@@\n", 2) + ["", ""])[:3]
    running = {line[4:] for line in head.splitlines() if line.startswith("RUN ")}
    listening = {(line.split()[0], line.split()[3].rsplit(":", 1)[-1])
                 for line in sockets.splitlines() if len(line.split()) >= 4}
    listening = {(("udp" if state == "UNCONN" else "tcp"), port) for state, port in listening}
    devices = {}
    for line in links.splitlines():
        match = re.match(r"^\d+: ([^:@]+)[^<]*<([^>]*)>", line)
        if match:
            devices[match.group(1)] = "UP" in match.group(2).split(",")
    result = {}
    for name in names:
        conf = configs.get(name, {})
        status = {"running": name in running, "listening": None, "device_up": None}
        if name.startswith("server/"):
            proto = "tcp" if conf.get("proto", "udp").startswith("tcp") else "udp"
            status["listening"] = (proto, conf.get("port", "1194")) in listening
        dev = conf.get("dev", "")
        # A link client's device exists only once its tunnel is up, which depends on the other end; the link ping
        # below reports that. A generic "tun" gets a kernel-chosen name: nothing to check either.
        if dev and name.startswith("server/") and not re.fullmatch(r"tun|tap", dev):
            status["device_up"] = devices.get(dev, False)
        result[name] = status
    return result


def _log_tail(c: Connection, name: str, lines: int = 15) -> str:
    p = {k: shlex.quote(v) for k, v in _paths(name).items()}
    out = run_root(c, f"if [ -s {p['log']} ]; then tail -n {lines} {p['log']}; else journalctl -u {p['unit']} "
                      f"-n {lines} --no-pager -o cat 2>/dev/null; fi; true", hide=True, warn=True).stdout.strip()
    return f"\nLast lines of its log:\n{out}" if out else " Its log is empty."
