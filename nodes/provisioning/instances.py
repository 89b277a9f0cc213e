"""The ensure_instances step: start, restart and stop OpenVPN instances (systemd units or plain daemons)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from fabric import Connection

from nodes import layout
from nodes.ssh import ProvisioningError, run_root

RUN_DIR = layout.RUN_DIR
CCD_DIR = layout.CCD_DIR
STOP_WAIT = 10  # seconds an instance gets to exit after SIGTERM (OpenVPN needs about 1 s) before SIGKILL

INSTANCE_RE = layout.INSTANCE_RE


@dataclass
class InstanceResult:
    started: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.started or self.restarted or self.stopped)


def ensure_instances(c: Connection, *, wanted: Iterable[str], restart: Iterable[str] = (),
                     progress: InstanceResult | None = None) -> InstanceResult:
    """Stop lanhub instances no longer wanted, restart the ones in ``restart``, start wanted ones not running.

    ``progress`` is filled in as each action happens, so a caller can undo exactly what was done if a later
    action fails (apply does).
    """
    wanted, restart = set(wanted), set(restart)
    for name in wanted | restart:
        _split(name)
    result = progress if progress is not None else InstanceResult()
    systemd, running, present = _instance_state(c)
    # Stop first: an unwanted instance may hold the port or device a wanted one is about to take.
    # Each action is recorded before it is taken: one that fails half-way (stopped, then failed to start) must
    # still be undone.
    for name in sorted(present - wanted):
        if name in running or systemd:
            result.stopped.append(name)
            _stop(c, name, systemd)
    for name in sorted(wanted):
        if name in running and name in restart:
            result.restarted.append(name)
            _stop(c, name, systemd)
            _start(c, name, systemd)
        elif name not in running:
            result.started.append(name)
            _start(c, name, systemd)
    return result


def instance_running(c: Connection, name: str) -> bool:
    return name in _instance_state(c)[1]


def _split(name: str) -> tuple[str, str]:
    match = INSTANCE_RE.match(name)
    if not match:
        raise ProvisioningError("ensure_instances", f"{name!r} is not a LanHub instance name.", permanent=True)
    return match.group(1), match.group(2)


def _paths(name: str) -> dict[str, str]:
    _split(name)  # validates
    return layout.instance_paths(name)


# A pid counts only while it is a live (not zombie) openvpn: pid files outlive their processes and pids get reused.
_ALIVE_SH = ("lh_alive() { [ -n \"$1\" ] && kill -0 \"$1\" 2>/dev/null && "
             "[ \"$(cat /proc/$1/comm 2>/dev/null)\" = openvpn ] && "
             "! grep -qE '^[0-9]+ \\(.*\\) Z ' /proc/$1/stat; }\n")


def _instance_state(c: Connection) -> tuple[bool, set[str], set[str]]:
    """(systemd?, running instances, instances present as a config, pid file or systemd unit)."""
    script = _ALIVE_SH + (
        "[ -d /run/systemd/system ] && echo SYSTEMD\n"
        f"for f in {layout.SERVER_DIR}/lanhub-*.conf {layout.CLIENT_DIR}/lanhub-*.conf; do "
        "[ -e \"$f\" ] && echo \"CONF $f\"; done\n"
        f"for p in {RUN_DIR}/lanhub-*.pid; do [ -e \"$p\" ] || continue; "
        "if lh_alive \"$(cat \"$p\")\"; then echo \"LIVE $p\"; else echo \"DEAD $p\"; fi; done\n"
        "if [ -d /run/systemd/system ]; then systemctl list-units --all --plain --no-legend "
        "'openvpn-server@lanhub-*' 'openvpn-client@lanhub-*' 2>/dev/null | sed 's/^/UNIT /'; "
        "ls /etc/systemd/system/*.wants/ 2>/dev/null | grep -E '^openvpn-(server|client)@lanhub-' | sed 's/^/UNIT /'; "
        "fi\ntrue\n")
    out = run_root(c, script, hide=True, warn=True).stdout
    systemd, running, present, pids = False, set(), set(), {}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "SYSTEMD":
            systemd = True
        elif tag == "CONF":
            kind, base = rest.split("/")[-2], rest.rsplit("/", 1)[1][: -len(".conf")]
            present.add(f"{kind}/{base}")
        elif tag in ("LIVE", "DEAD"):
            pids[rest.rsplit("/", 1)[1][: -len(".pid")]] = tag == "LIVE"
        elif tag == "UNIT":
            match = re.match(r"openvpn-(server|client)@(lanhub-[a-z0-9-]+)\.service(\s+\S+\s+(\S+))?", rest)
            if match:
                present.add(f"{match.group(1)}/{match.group(2)}")
                if match.group(4) == "active":
                    running.add(f"{match.group(1)}/{match.group(2)}")
    by_base = {name.split("/")[1]: name for name in present}
    for base, live in pids.items():  # plain daemons (also a leftover one on a node that has systemd now)
        name = by_base.get(base) or (f"client/{base}" if base.startswith(layout.LINK_PREFIX) else f"server/{base}")
        present.add(name)
        if live:
            running.add(name)
    return systemd, {n for n in running if INSTANCE_RE.match(n)}, {n for n in present if INSTANCE_RE.match(n)}


def _start(c: Connection, name: str, systemd: bool) -> None:
    p = {k: shlex.quote(v) for k, v in _paths(name).items()}
    # Directories the configs name but no file may fill: a server without downstreams has an empty ccd dir.
    run_root(c, f"mkdir -p -m 700 {RUN_DIR} && mkdir -p {CCD_DIR}", hide=True)
    if systemd:
        run_root(c, f"systemctl enable --quiet {p['unit']} && systemctl restart {p['unit']}", hide=True)
        return
    # </dev/null: the daemon must not hold the SSH channel open; its own output goes to --log-append. The options
    # come after --config so they win over any writepid/log lines in the file.
    out = run_root(c, (
        f"rm -f {p['pid']} && "
        f"openvpn --cd {p['dir']} --config {p['conf']} --daemon {p['base']} --writepid {p['pid']} "
        f"--log-append {p['log']} </dev/null >&2 || {{ echo @@ >&2; tail -n 5 {p['log']} >&2; exit 1; }}; "
        f"i=0; while [ ! -s {p['pid']} ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done"), hide=True, warn=True)
    if not out.ok:  # options errors: openvpn refuses before daemonizing and says why on stderr
        said, _, log = out.stderr.partition("@@\n")
        raise ProvisioningError("ensure_instances", f"OpenVPN refused to start {name}: {said.strip()[-600:]}"
                                + (f"\nLast lines of its log:\n{log.strip()}" if log.strip() else ""))


def _stop(c: Connection, name: str, systemd: bool) -> None:
    p = {k: shlex.quote(v) for k, v in _paths(name).items()}
    plain = (f"pid=$(cat {p['pid']} 2>/dev/null); if lh_alive \"$pid\"; then kill -TERM \"$pid\"; i=0; "
             f"while lh_alive \"$pid\" && [ $i -lt {STOP_WAIT * 10} ]; do sleep 0.1; i=$((i+1)); done; "
             f"lh_alive \"$pid\" && kill -KILL \"$pid\"; fi; rm -f {p['pid']}")
    if systemd:
        plain += f"; systemctl disable --quiet --now {p['unit']} 2>/dev/null; true"
    run_root(c, _ALIVE_SH + plain, hide=True)
