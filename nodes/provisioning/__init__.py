"""Provisioning steps: make one node match its part of the plan, over an open Fabric Connection.

Every step is a function of ``c`` (it never opens a connection; see nodes/ssh.py), checks before it acts, returns
whether it changed something, and is safe to run again: a second ``apply`` with nothing changed uploads nothing and
restarts nothing. Probes use ``hide=True, warn=True``; every value interpolated into a shell line goes through
``shlex.quote``; paths and instance names are also validated, because they come from the planner, not from a shell.

Instances are named like their config files: ``server/lanhub-udp`` is /etc/openvpn/server/lanhub-udp.conf, run
as the systemd unit ``openvpn-server@lanhub-udp`` where the node has systemd, else as a plain daemon with its pid
file and log in /etc/openvpn/lanhub/run (under /etc because the lab gives each node only its own /etc).

The steps live in submodules (files, system, instances, verification); this package re-exports them and holds
the ``apply`` pipeline that runs them in order (``STEPS``) and undoes a failed run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fabric import Connection

from nodes.provisioning.decommission import decommission  # noqa: F401
from nodes.provisioning.files import (
    MANAGED_PREFIXES,
    ROLLBACK_DIR,
    UploadResult,
    _message,
    discard_backups,
    rollback,
    upload_files,
)
from nodes.provisioning.instances import (
    CCD_DIR,
    INSTANCE_RE,
    RUN_DIR,
    STOP_WAIT,
    InstanceResult,
    _instance_state,
    _paths,
    _start,
    _stop,
    ensure_instances,
    instance_running,
)
from nodes.provisioning.relay import RelayResult, ensure_relay, relay_state
from nodes.provisioning.system import (
    FIREWALL_RULES,
    check_os,
    ensure_forwarding,
    ensure_openvpn,
)
from nodes.provisioning.verification import (
    LINK_WAIT,
    VERIFY_WAIT,
    NodeLink,
    node_links,
    openvpn_release,
    ping_through,
    verify,
)
from nodes.render import RELAY_CONFIG, RELAY_FILES
from nodes.ssh import ProvisioningError, command_error, run_root

__all__ = [
    "CCD_DIR", "FIREWALL_RULES", "INSTANCE_RE", "LINK_WAIT", "MANAGED_PREFIXES", "ROLLBACK_DIR", "RUN_DIR", "STEPS",
    "STOP_WAIT", "VERIFY_WAIT", "ApplyResult", "InstanceResult", "Log", "NodeLink", "ProvisioningError",
    "RelayResult", "UploadResult", "apply", "check_os", "discard_backups", "ensure_forwarding", "ensure_instances",
    "ensure_openvpn", "ensure_relay", "instance_running", "node_links", "openvpn_release", "ping_through",
    "relay_state", "rollback", "upload_files", "verify",
]

STEPS = ("check_os", "ensure_openvpn", "upload_files", "ensure_forwarding", "ensure_instances", "ensure_relay",
         "verify")

Log = Callable[[str, float, bool], None]


@dataclass
class ApplyResult:
    os_name: str = ""
    installed_openvpn: bool = False
    upload: UploadResult = field(default_factory=UploadResult)
    forwarding_changed: bool = False
    instances: InstanceResult = field(default_factory=InstanceResult)
    relay: RelayResult = field(default_factory=RelayResult)
    verify: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: list[tuple[str, float, bool]] = field(default_factory=list)

    @property
    def changed(self) -> list[str]:
        return self.upload.touched

    @property
    def restarted(self) -> list[str]:
        return self.instances.restarted

    @property
    def openvpn_version(self) -> str:
        return self.verify.get("openvpn_version", "")


def apply(c: Connection, *, files: Mapping[str, object], remove: Iterable[str] = (),
          restart: Iterable[str] | Callable[[list[str]], Iterable[str]] = (), wanted: Iterable[str],
          links: Iterable[tuple[str, str]] = (), log: Log | None = None) -> ApplyResult:
    """Run every step in order; on a failure after the upload, put the node back as it was and re-raise.

    ``restart`` is a set of instances, or a function of the changed paths returning one (only after the upload is
    it known what changed on this node, e.g. after someone edited a file by hand); an instance whose own config
    file changed is always restarted. "Back as it was" means: previous files restored byte for byte, instances this
    run restarted or stopped restarted on those files, instances it started stopped again.
    """
    wanted, result = set(wanted), ApplyResult()
    step = _Stepper(result, log)
    result.os_name = step("check_os", lambda: check_os(c), changed=lambda v: False)
    result.installed_openvpn = step("ensure_openvpn", lambda: ensure_openvpn(c))
    result.upload = step("upload_files", lambda: upload_files(c, files, remove=remove),
                         changed=lambda u: bool(u.touched))
    try:
        result.forwarding_changed = step("ensure_forwarding", lambda: ensure_forwarding(c, note=result.notes.append))
        chosen = set(restart(result.upload.touched) if callable(restart) else restart)
        chosen |= {n for n in wanted if _paths(n)["conf"] in result.upload.changed}
        step("ensure_instances", lambda: ensure_instances(c, wanted=wanted, restart=chosen & wanted,
                                                          progress=result.instances),
             changed=lambda r: r.changed)
        step("ensure_relay", lambda: ensure_relay(c, wanted=RELAY_CONFIG in files, changed_files=result.upload.touched,
                                                  progress=result.relay),
             changed=lambda r: r.changed)
        result.verify = step("verify", lambda: verify(c, wanted=wanted, links=links), changed=lambda v: False)
    except ProvisioningError as error:
        _recover(c, result, error)
        raise
    discard_backups(c, result.upload)
    return result


class _Stepper:
    """Times a step, records and logs it, and turns Fabric/socket errors into ProvisioningError(step, ...)."""

    def __init__(self, result: ApplyResult, log: Log | None):
        self.result, self.log = result, log

    def __call__(self, name: str, fn, changed=bool):
        began = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            error = command_error(name, exc)
            if error is exc:
                raise
            raise error from exc
        seconds, did_change = time.monotonic() - began, bool(changed(value))
        self.result.steps.append((name, seconds, did_change))
        if self.log:
            self.log(name, seconds, did_change)
        return value


def _recover(c: Connection, result: ApplyResult, error: ProvisioningError) -> None:
    """Undo this run: files first, then instances back onto them. Failures here are added to ``error``."""
    done = result.instances
    if not result.upload.touched and not done.changed and not result.relay.changed:
        return
    try:
        rollback(c, result.upload)
        if FIREWALL_RULES in result.upload.touched:
            ensure_forwarding(c)
        systemd, running, _ = _instance_state(c)
        for name in done.started:
            _stop(c, name, systemd)
        for name in sorted(set(done.restarted) | set(done.stopped)):
            if name in running:
                _stop(c, name, systemd)
            _start(c, name, systemd)
        if result.relay.changed or set(RELAY_FILES) & set(result.upload.touched):
            # back onto the restored files: restarted if its config is there again, stopped if not
            ensure_relay(c, wanted=bool(run_root(c, f"test -e {RELAY_CONFIG}", hide=True, warn=True).ok),
                         changed_files=RELAY_FILES)
        error.message += " The previous files were restored" + (" and the instances restarted on them."
                                                                 if done.changed else ".")
    except Exception as exc:
        error.message += f" Restoring the previous state also failed: {_message(exc)}"
