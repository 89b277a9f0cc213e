"""The ensure_relay step: run the LAN-discovery relay (nodes/discovery/relay.py) on the node.

Like an OpenVPN instance: a systemd unit (lanhub-relay.service) where the node has systemd, else a plain daemon
with its pid file and log in /etc/openvpn/lanhub/run. It restarts when its program or unit changed, re-reads
its config in place when only the config changed (SIGHUP: a node added elsewhere in the LAN or a new game list
changes relay.json on every node, and that costs no restart), starts when it is not running (the drift check runs
this step too), and stops when the node no longer wants it. The relay re-opens the tun devices itself when an
OpenVPN instance restarts, so instance restarts leave it alone.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from fabric import Connection

from nodes import layout, render
from nodes.provisioning.instances import RUN_DIR, STOP_WAIT
from nodes.ssh import ProvisioningError, run_root

UNIT = layout.RELAY_UNIT_NAME
PID = layout.RELAY_PID
LOG = layout.RELAY_LOG
START_WAIT = 5  # seconds the relay gets to bind its port
COMMAND = f"python3 {render.RELAY_PROGRAM} --config {render.RELAY_CONFIG}"

# Alive = the pid runs python with our program in its command line (pids are reused; pid files outlive processes).
_ALIVE_SH = ("lh_relay_alive() { [ -n \"$1\" ] && kill -0 \"$1\" 2>/dev/null && "
             f"tr '\\0' ' ' </proc/$1/cmdline 2>/dev/null | grep -q {shlex.quote(render.RELAY_PROGRAM)}; }}\n")


@dataclass
class RelayResult:
    started: bool = False
    restarted: bool = False
    reloaded: bool = False  # only its config changed: told to re-read it, same process
    stopped: bool = False

    @property
    def changed(self) -> bool:
        return self.started or self.restarted or self.reloaded or self.stopped


def ensure_relay(c: Connection, *, wanted: bool, changed_files=(), progress: RelayResult | None = None) -> RelayResult:
    """Start, restart (its files changed) or stop the relay; then, when wanted, wait until it listens.

    ``progress`` is filled in before each action, so apply can undo a half-done step."""
    changed = set(changed_files) & set(render.RELAY_FILES)
    systemd, running = relay_state(c)
    result = progress if progress is not None else RelayResult()
    if not wanted:
        if running or systemd:
            result.stopped = running
            _stop(c, systemd, remove_unit=True)
        return result
    if systemd and _write_unit(c):
        changed.add(render.RELAY_UNIT)
    if running and changed == {render.RELAY_CONFIG}:
        result.reloaded = True
        _reload(c, systemd)
    elif running and changed:
        _stop(c, systemd)
        result.restarted = True
    elif not running:
        result.started = True
    if result.started or result.restarted:
        _start(c, systemd)
    _wait_listening(c)
    return result


def relay_state(c: Connection) -> tuple[bool, bool]:
    """(systemd?, relay running?)"""
    out = run_root(c, _ALIVE_SH + (
        "[ -d /run/systemd/system ] && echo SYSTEMD && systemctl is-active --quiet " + UNIT + " && echo RUNNING\n"
        f"lh_relay_alive \"$(cat {PID} 2>/dev/null)\" && echo RUNNING\ntrue\n"), hide=True, warn=True).stdout
    return "SYSTEMD" in out, "RUNNING" in out


def relay_listening(c: Connection) -> bool:
    out = run_root(c, "ss -Hlnu 2>/dev/null; true", hide=True, warn=True).stdout
    return any(line.split()[3].endswith(f":{layout.RELAY_PORT}") for line in out.splitlines() if len(line.split()) > 3)


def _start(c: Connection, systemd: bool) -> None:
    if systemd:
        run_root(c, f"systemctl enable --quiet {UNIT} && systemctl restart {UNIT}", hide=True)
        return
    run_root(c, f"mkdir -p -m 700 {RUN_DIR}", hide=True)
    out = run_root(c, (
        f"rm -f {PID} && {COMMAND} --daemon --pidfile {PID} --log {LOG} </dev/null >&2; "
        f"i=0; while [ ! -s {PID} ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done; [ -s {PID} ]"),
        hide=True, warn=True)
    if not out.ok:
        raise ProvisioningError("ensure_relay", f"The discovery relay did not start: {out.stderr.strip()[-600:]}"
                                + _log_tail(c))


def _reload(c: Connection, systemd: bool) -> None:
    """SIGHUP: the relay re-reads relay.json at once (it would notice the new mtime within a second anyway)."""
    if systemd:
        run_root(c, f"systemctl reload {UNIT}", hide=True)
        return
    run_root(c, _ALIVE_SH + f"pid=$(cat {PID} 2>/dev/null); lh_relay_alive \"$pid\" && kill -HUP \"$pid\"; true",
             hide=True)


def _write_unit(c: Connection) -> bool:
    """Install or update the systemd unit; True when it changed (then systemd has re-read it)."""
    unit = render.render_relay_unit()
    path = shlex.quote(render.RELAY_UNIT)
    current = run_root(c, f"sha256sum -- {path} 2>/dev/null; true", hide=True, warn=True).stdout[:64]
    if current == unit.sha256:
        return False
    tmp = shlex.quote(render.RELAY_UNIT + ".lanhub-new")
    run_root(c, f"cat > {tmp} <<'LANHUB_UNIT'\n{unit.content}LANHUB_UNIT\nchmod 644 {tmp} && mv -f -- {tmp} {path} && "
                "systemctl daemon-reload", hide=True)
    return True


def _stop(c: Connection, systemd: bool, *, remove_unit: bool = False) -> None:
    script = (_ALIVE_SH + f"pid=$(cat {PID} 2>/dev/null); if lh_relay_alive \"$pid\"; then kill -TERM \"$pid\"; i=0; "
              f"while lh_relay_alive \"$pid\" && [ $i -lt {STOP_WAIT * 10} ]; do sleep 0.1; i=$((i+1)); done; "
              f"lh_relay_alive \"$pid\" && kill -KILL \"$pid\"; fi; rm -f {PID}")
    if systemd:
        script += f"; systemctl disable --quiet --now {UNIT} 2>/dev/null; true"
        if remove_unit:
            script += f"; rm -f {shlex.quote(render.RELAY_UNIT)} && systemctl daemon-reload; true"
    run_root(c, script, hide=True)


def _wait_listening(c: Connection) -> None:
    script = (f"i=0; while [ $i -lt {START_WAIT * 5} ]; do ss -Hlnu | grep -q ':{layout.RELAY_PORT} ' && exit 0; "
              "sleep 0.2; i=$((i+1)); done; exit 1")
    if not run_root(c, script, hide=True, warn=True).ok:
        raise ProvisioningError("ensure_relay", f"The discovery relay is not listening on UDP {layout.RELAY_PORT}."
                                + _log_tail(c))


def _log_tail(c: Connection, lines: int = 15) -> str:
    out = run_root(c, f"if [ -s {LOG} ]; then tail -n {lines} {LOG}; else journalctl -u {UNIT} -n {lines} "
                      "--no-pager -o cat 2>/dev/null; fi; true", hide=True, warn=True).stdout.strip()
    return f"\nLast lines of its log:\n{out}" if out else ""
