"""Provisioning steps: make one node match its part of the plan, over an open Fabric Connection.

Every step is a function of ``c`` (it never opens a connection; see nodes/ssh.py), checks before it acts, returns
whether it changed something, and is safe to run again: a second ``apply`` with nothing changed uploads nothing and
restarts nothing. Probes use ``hide=True, warn=True``; every value interpolated into a shell line goes through
``shlex.quote``; paths and instance names are also validated, because they come from the planner, not from a shell.

Instances are named like their config files: ``server/lanhub-udp`` is /etc/openvpn/server/lanhub-udp.conf, run
as the systemd unit ``openvpn-server@lanhub-udp`` where the node has systemd, else as a plain daemon with its pid
file and log in /etc/openvpn/lanhub/run (under /etc because the lab gives each node only its own /etc).
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fabric import Connection

from nodes.ssh import ProvisioningError, check_sudo, command_error, is_root, run_root

RUN_DIR = "/etc/openvpn/lanhub/run"
CCD_DIR = "/etc/openvpn/server/ccd"
ROLLBACK_DIR = "/etc/openvpn/lanhub/rollback"  # previous versions of this run's files; exists only during a run
FIREWALL_RULES = "/etc/openvpn/lanhub/firewall.rules"
MANAGED_PREFIXES = ("/etc/openvpn/", "/etc/sysctl.d/")  # a planner bug must not be able to write /etc/passwd
STEPS = ("check_os", "ensure_openvpn", "upload_files", "ensure_forwarding", "ensure_instances", "verify")
STOP_WAIT = 10  # seconds an instance gets to exit after SIGTERM (OpenVPN needs about 1 s) before SIGKILL
VERIFY_WAIT = 15  # seconds an instance gets to be running, listening and have its device up
LINK_WAIT = 20  # seconds a link gets to answer a ping through its tunnel

_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@+-]+(/[A-Za-z0-9_.@+-]+)*$")
INSTANCE_RE = re.compile(r"^(server|client)/(lanhub-[a-z0-9][a-z0-9-]{0,40})$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

Log = Callable[[str, float, bool], None]


# ---- check_os / ensure_openvpn ------------------------------------------------------------------------------------


def check_os(c: Connection) -> str:
    """Return the node's OS name if it is Debian, Ubuntu or a derivative (apt), else fail permanently."""
    text = c.run("cat /etc/os-release", hide=True, warn=True).stdout
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            try:
                info[key.strip()] = " ".join(shlex.split(value))
            except ValueError:
                info[key.strip()] = value.strip().strip('"')
    name = info.get("PRETTY_NAME") or info.get("NAME") or "an OS without /etc/os-release"
    family = {info.get("ID", "")} | set(info.get("ID_LIKE", "").split())
    if family & {"debian", "ubuntu"}:
        return name
    raise ProvisioningError("check_os", f"The node runs {name}; LanHub supports Debian, Ubuntu and their "
                            "derivatives (it installs OpenVPN with apt).", permanent=True)


def ensure_openvpn(c: Connection) -> bool:
    """Install the distribution's openvpn package unless an openvpn binary is already there."""
    check_sudo(c, "ensure_openvpn")  # the first step that needs root: a failing probe below must mean "no openvpn"
    if run_root(c, "command -v openvpn", hide=True, warn=True).ok:
        return False
    # Lock timeout: a fresh cloud server is often still running unattended-upgrades when it is first synced.
    apt = "DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300"
    run_root(c, f"{apt} update && {apt} install -y --no-install-recommends openvpn", hide=True)
    return True


# ---- upload_files / rollback --------------------------------------------------------------------------------------


@dataclass
class UploadResult:
    """What upload_files did: ``backups`` maps every touched path to its saved previous version (None: was absent)."""

    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    backups: dict[str, str | None] = field(default_factory=dict)

    @property
    def touched(self) -> list[str]:
        return self.changed + self.removed


def upload_files(c: Connection, files: Mapping[str, object], *, remove: Iterable[str] = ()) -> UploadResult:
    """Make ``files`` (path -> object with ``content`` and ``mode``) exist exactly, and ``remove`` paths not exist.

    One command reads every remote hash and mode; only differing files go up. Each goes to a temporary name in its
    own directory (created 0600, so a key is never readable by others even for a moment), gets its mode, and all of
    them are renamed into place in one command, so OpenVPN never reads half a file or a mixed set.
    """
    wanted = {path: (_content(f), _mode(f)) for path, f in files.items()}
    gone = sorted(set(remove) - set(wanted))
    for path in [*wanted, *gone]:
        _check_path(path)
    remote = _remote_state(c, [*wanted, *gone])
    result = UploadResult(
        changed=sorted(p for p, (data, mode) in wanted.items() if remote.get(p) != (_sha256(data), mode)),
        removed=[p for p in gone if p in remote],
    )
    if not result.touched:
        return result
    for path in result.touched:
        result.backups[path] = ROLLBACK_DIR + path if path in remote else None
    try:
        _stage_and_commit(c, result, wanted)
    except Exception as exc:
        error = command_error("upload_files", exc)
        _try_rollback(c, result, error)
        raise error from exc
    return result


def rollback(c: Connection, result: UploadResult) -> None:
    """Put back exactly what upload_files replaced or removed, and delete the files it created."""
    if not result.touched:
        return
    commands = []
    for path, backup in result.backups.items():
        tmp = _tmp_name(path)
        if backup is None:
            commands.append(f"rm -f -- {shlex.quote(path)} {shlex.quote(tmp)}")
        else:  # cp -p made the backup, so mode, owner and mtime come back too
            commands.append(f"rm -f -- {shlex.quote(tmp)} && mv -f -- {shlex.quote(backup)} {shlex.quote(path)}")
    commands.append(f"rm -rf -- {ROLLBACK_DIR}")
    run_root(c, " && ".join(commands), hide=True)


def discard_backups(c: Connection, result: UploadResult) -> None:
    """Drop the previous versions once the run succeeded (they include private keys)."""
    if result.touched:
        run_root(c, f"rm -rf -- {ROLLBACK_DIR}", hide=True)


def _stage_and_commit(c: Connection, result: UploadResult, wanted: dict) -> None:
    prepare = [f"rm -rf -- {ROLLBACK_DIR}", f"mkdir -p -m 700 -- {ROLLBACK_DIR}"]
    for path, backup in result.backups.items():
        if backup:
            prepare.append(f"mkdir -p -- {shlex.quote(_dir(backup))} && cp -p -- {shlex.quote(path)} "
                           f"{shlex.quote(backup)}")
    for path in result.changed:
        prepare.append(f"mkdir -p -- {shlex.quote(_dir(path))} && "
                       f"install -m 600 /dev/null {shlex.quote(_tmp_name(path))}")
    run_root(c, " && ".join(prepare), hide=True)
    # SFTP runs as the login user: root writes the temporary file directly; anyone else stages in a private
    # directory of their own and root copies from there.
    staging = None if is_root(c) else c.run("mktemp -d", hide=True).stdout.strip()
    commit = []
    for index, path in enumerate(result.changed):
        data, mode = wanted[path]
        tmp = _tmp_name(path)
        target = tmp if staging is None else f"{staging}/{index}"
        c.put(io.BytesIO(data), remote=target)
        copy = "" if staging is None else f"cp -- {shlex.quote(target)} {shlex.quote(tmp)} && "
        commit.append(f"{copy}chmod {mode:o} {shlex.quote(tmp)} && mv -f -- {shlex.quote(tmp)} {shlex.quote(path)}")
    for path in result.removed:
        commit.append(f"rm -f -- {shlex.quote(path)}")  # its backup is already in ROLLBACK_DIR
    try:
        run_root(c, " && ".join(commit), hide=True)
    finally:
        if staging:
            c.run(f"rm -rf -- {shlex.quote(staging)}", hide=True, warn=True)


def _remote_state(c: Connection, paths: list[str]) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mode) for the paths that exist, in one round trip."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    out = run_root(c, f"sha256sum -- {quoted} 2>/dev/null; echo @@; stat -c '%a %n' -- {quoted} 2>/dev/null; true",
                   hide=True, warn=True).stdout
    hashes, _, modes = out.partition("@@\n")
    digest = {line[66:]: line[:64] for line in hashes.splitlines() if len(line) > 66}
    state = {}
    for line in modes.splitlines():
        mode, _, path = line.partition(" ")
        if path in digest:
            state[path] = (digest[path], int(mode, 8))
    return state


def _check_path(path: str) -> None:
    if not _PATH_RE.match(path) or "/../" in path + "/" or "/./" in path + "/" or not path.startswith(MANAGED_PREFIXES):
        raise ProvisioningError("upload_files", f"Refusing to write {path!r}: LanHub manages only plain paths "
                                f"under {', '.join(MANAGED_PREFIXES)}.", permanent=True)


def _content(f) -> bytes:
    content = f.content if hasattr(f, "content") else f
    return content.encode() if isinstance(content, str) else bytes(content)


def _mode(f) -> int:
    mode = getattr(f, "mode", 0o644)
    return int(mode, 8) if isinstance(mode, str) else int(mode)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dir(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _tmp_name(path: str) -> str:
    directory, name = path.rsplit("/", 1)
    return f"{directory}/.{name}.lanhub-new"  # same directory: the final mv is an atomic rename


def _try_rollback(c: Connection, result: UploadResult, error: ProvisioningError) -> None:
    try:
        rollback(c, result)
    except Exception as exc:  # keep the original failure; say the rollback failed too
        error.message += f" (restoring the previous files also failed: {_message(exc)})"


# ---- ensure_forwarding --------------------------------------------------------------------------------------------


def ensure_forwarding(c: Connection, *, note: Callable[[str], None] | None = None) -> bool:
    """Turn on IPv4 forwarding now, and load firewall.rules (if iptables exists) without duplicating anything.

    /etc/sysctl.d/90-lanhub.conf (uploaded with the other files) keeps forwarding on after a reboot. The rules file
    is iptables-restore --noflush input whose ``:LANHUB-FORWARD`` line makes a re-run flush and refill that chain;
    jumps from FORWARD are taken out of it and added with ``iptables -C || -I``, because a restored ``-A FORWARD``
    would be appended again on every run. ``changed`` compares iptables-save before and after (counters ignored).
    """
    note = note or (lambda message: None)
    probe = run_root(c, "sysctl -n net.ipv4.ip_forward; echo @@; command -v iptables-restore >/dev/null && "
                        f"command -v iptables >/dev/null && echo yes; echo @@; "
                        f"cat -- {FIREWALL_RULES} 2>/dev/null; true",
                     hide=True, warn=True).stdout
    forwarding, have_iptables, rules = (probe.split("@@\n", 2) + ["", ""])[:3]
    changed = False
    if forwarding.strip() != "1":
        run_root(c, "sysctl -q -w net.ipv4.ip_forward=1", hide=True)
        changed = True
    if not have_iptables.strip():
        note("iptables is not installed on the node: forwarding is on, but firewall.rules was not applied.")
        return changed
    if not rules.strip():
        note(f"{FIREWALL_RULES} is missing on the node: no firewall rules were applied.")
        return changed
    out = run_root(c, _firewall_script(rules), hide=True).stdout
    return changed or "CHANGED" in out


def _firewall_script(rules: str) -> str:
    body, jumps = [], []
    for line in rules.splitlines():
        if re.match(r"^-[AI] FORWARD(\s|$)", line.strip()):
            spec = shlex.split(line.strip())[2:]
            jumps.append(spec[1:] if spec and spec[0].isdigit() else spec)  # "-I FORWARD 1 -j X": drop the 1
        else:
            body.append(line)
    if not jumps and any(line.startswith(":LANHUB-FORWARD") for line in body):
        jumps.append(["-j", "LANHUB-FORWARD"])
    delimiter = f"LANHUB_RULES_{secrets.token_hex(8)}"
    snapshot = "iptables-save 2>/dev/null | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"
    lines = [f"before=$({snapshot})", f"iptables-restore -w --noflush <<'{delimiter}'", *body, delimiter]
    for spec in reversed(jumps):  # -I puts each at the top; reversed keeps the file's order
        quoted = " ".join(shlex.quote(arg) for arg in spec)
        lines.append(f"iptables -w -C FORWARD {quoted} 2>/dev/null || iptables -w -I FORWARD {quoted} || exit 1")
    lines += [f"after=$({snapshot})", '[ "$before" = "$after" ] || echo CHANGED']
    return "set -e\n" + "\n".join(lines) + "\n"


# ---- ensure_instances ---------------------------------------------------------------------------------------------


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
    kind, base = _split(name)
    return {"dir": f"/etc/openvpn/{kind}", "conf": f"/etc/openvpn/{kind}/{base}.conf", "unit": f"openvpn-{kind}@{base}",
            "pid": f"{RUN_DIR}/{base}.pid", "log": f"{RUN_DIR}/{base}.log", "base": base}


# A pid counts only while it is a live (not zombie) openvpn: pid files outlive their processes and pids get reused.
_ALIVE_SH = ("lh_alive() { [ -n \"$1\" ] && kill -0 \"$1\" 2>/dev/null && "
             "[ \"$(cat /proc/$1/comm 2>/dev/null)\" = openvpn ] && "
             "! grep -qE '^[0-9]+ \\(.*\\) Z ' /proc/$1/stat; }\n")


def _instance_state(c: Connection) -> tuple[bool, set[str], set[str]]:
    """(systemd?, running instances, instances present as a config, pid file or systemd unit)."""
    script = _ALIVE_SH + (
        "[ -d /run/systemd/system ] && echo SYSTEMD\n"
        "for f in /etc/openvpn/server/lanhub-*.conf /etc/openvpn/client/lanhub-*.conf; do "
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
        name = by_base.get(base) or (f"client/{base}" if base.startswith("lanhub-link-") else f"server/{base}")
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


# ---- links --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLink:
    """A link as its downstream node sees it: the client instance, its tunnel device and the upstream's address."""

    upstream: str
    instance: str
    device: str
    peer: str


def node_links(plan, node_name: str) -> list[NodeLink]:
    """The links ``node_name`` runs a client for, with what verify and the status poll ping through each."""
    from nodes import render  # names and devices are render's to decide; imported late to keep this module light

    links = []
    for link in plan.links:
        if link.downstream == node_name:
            peer = str(plan.pools[link.upstream].udp.network_address + 1)  # "server <net> ..." takes .1
            links.append(NodeLink(link.upstream, render.link_instance(link.upstream),
                                  render.link_device(link.upstream), peer))
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
    version = run_root(c, "openvpn --version 2>&1 | head -n 1", hide=True, warn=True).stdout.strip()
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


# ---- apply --------------------------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    os_name: str = ""
    installed_openvpn: bool = False
    upload: UploadResult = field(default_factory=UploadResult)
    forwarding_changed: bool = False
    instances: InstanceResult = field(default_factory=InstanceResult)
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
    if not result.upload.touched and not done.changed:
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
        error.message += " The previous files were restored" + (" and the instances restarted on them."
                                                                 if done.changed else ".")
    except Exception as exc:
        error.message += f" Restoring the previous state also failed: {_message(exc)}"


def _message(exc: BaseException) -> str:
    try:
        return command_error("rollback", exc).message
    except Exception:  # not a Fabric/SSH error: still report it rather than lose the original failure
        return f"{type(exc).__name__}: {exc}"
