"""Network-namespace lab: throwaway "servers" and "players" for LanHub's tests.

Pure Python + subprocess (no Django), run as root. One ``Lab`` builds::

    host (root ns) --veth 198.18.0.1/.2--> wan ns (ip_forward=1)
                                               |- br-nodes   203.0.113.1/24  -> one ns per node (sshd, own /etc view)
                                               '- br-players 198.51.100.1/24 -> one ns per player (openvpn client)

Every name a lab makes starts with ``lh<4 hex>-`` and is written to a state file *before* it is created, so
``Lab.load(state_dir).down()`` in another process, or ``Lab.cleanup_stale()`` after a crash, removes exactly what
was made and nothing else. Traffic stays inside: wan has no default route, so nodes and players reach only each
other and the host's lab address.

Choices worth knowing (see also /work/shared/OPENVPN-NOTES.md):
- The host link uses /32 peer addresses from 198.18.0.0/15 (RFC 2544, reserved for testing network devices), not a
  documentation /24: a machine's own NIC may sit in 192.0.2.0/24, and the lab must never shadow or answer for it.
- The host routes only the low /26 of each segment (203.0.113.0/26, 198.51.100.0/26) into the lab, never the whole
  /24: other machines in those documentation ranges (this workplace's package registry answers at 203.0.113.80)
  must stay reachable while a lab is up. Lab hosts therefore get addresses from .10 to .62.
- Those host routes can exist once per machine, so a lab with ``host_link=True``
  holds an exclusive flock on ``<base>/host-link.lock`` for its lifetime; a second one waits up to
  ``lock_timeout`` seconds and then fails naming the holder. ``host_link=False`` labs never wait.
- /run and /root are shared by all namespaces: pid, log and status files must have per-namespace paths.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path("/tmp/lanhub-lab")
NETNS_ETC = Path("/etc/netns")
NODES_NET, PLAYERS_NET = "203.0.113", "198.51.100"
# IPv6 underlay (Lab.enable_ipv6): /64s of the documentation prefix 2001:db8::/32, only ever inside the lab's own
# namespaces (the host gets no route to them). A host's v6 address ends in the last byte of its IPv4 address.
NODES_NET6, PLAYERS_NET6 = "2001:db8:0:113", "2001:db8:0:100"
HOST_ADDR, WAN_HOST_ADDR = "198.18.0.1", "198.18.0.2"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")  # "n-" + name must fit a 15-char interface name
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
FIRST_UID = 2000  # lab users get the first uid/gid from here that the host's passwd/group does not use
PREFIX_RE = re.compile(r"^lh[0-9a-f]{4}-")
FIRST_HOST = 10  # node i gets 203.0.113.(10+i), player i 198.51.100.(10+i)
# The wan router's own MAC on each bridge (locally administered unicast; each lab's bridges are in its own wan
# namespace, so labs side by side do not clash).
BRIDGE_MACS = {"br-nodes": "02:1a:b0:00:00:01", "br-players": "02:1a:b0:00:00:02"}
ROUTED = 26  # the host routes <net>.0/26 into the lab, so lab hosts live in .1-.62


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _run(argv: list[str], *, check: bool = True, timeout: float = 30.0,
         input: str | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(map(str, argv))}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(map(str, argv))} -> exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _wait(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded by count too)."""
    for _ in range(max(1, int(timeout / interval)) + 1):
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks: tells a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_and_wait(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM ``pids``, wait up to ``timeout`` s, SIGKILL what is left; returns the pids still alive (rare)."""
    pids = [p for p in pids if p != os.getpid()]
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        live = [p for p in pids if _alive(p)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if _wait(lambda: not any(_alive(p) for p in live), wait_s):
            return []
    return [p for p in pids if _alive(p)]


class _Host:
    """A namespace on one of wan's bridges."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str):
        self.lab, self.name, self.ns, self.address = lab, name, ns, address
        self.address6: str | None = None  # set by Lab.enable_ipv6

    def exec(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return self.lab.exec(self.ns, argv, **kwargs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.address} ns={self.ns}>"


class NodeHost(_Host):
    """A server: its own sshd on ``address``:22 and its own /etc/{ssh,openvpn,sysctl.d} (under /etc/netns/<ns>).

    A node made with ``user=`` also has its own /etc/{passwd,shadow,group,sudoers.d}: the host's accounts plus
    ``user`` (a login with the same authorized keys as root, and passwordless sudo unless ``sudo=False``).
    """

    def __init__(self, lab: Lab, name: str, ns: str, address: str, user: str | None = None):
        super().__init__(lab, name, ns, address)
        self.user = user

    @property
    def etc_dir(self) -> Path:
        return NETNS_ETC / self.ns

    def etc_path(self, relative: str) -> Path:
        """Host path of the node's ``/etc/<relative>`` (only ssh/, openvpn/ and sysctl.d/ are per node, and with a
        lab user also passwd, shadow, group and sudoers.d/)."""
        return self.etc_dir / relative

    def authorize(self, public_key_line: str) -> None:
        line = public_key_line.strip()
        if not line or "\n" in line:
            raise ValueError("expected one public key line")
        with open(self.etc_path("ssh/lanhub_authorized_keys"), "a") as fh:
            fh.write(line + "\n")

    def host_public_key(self) -> str:
        """``ssh-ed25519 AAAA...`` (no comment): what a client pins."""
        return " ".join(self.etc_path("ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])

    def host_key_fingerprint(self) -> str:
        """``SHA256:...`` exactly as ``ssh-keygen -lf`` prints it."""
        blob = base64.b64decode(self.host_public_key().split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    def sshd_log(self) -> str:
        path = self.etc_path("ssh/sshd.log")
        return path.read_text(errors="replace") if path.exists() else ""


class PlayerHost(_Host):
    """A player's machine: namespace only, plus an OpenVPN client the test starts."""

    @property
    def run_dir(self) -> Path:
        return self.lab.state_dir / "players" / self.name

    def _files(self) -> tuple[Path, Path, Path]:
        return self.run_dir / "openvpn.conf", self.run_dir / "openvpn.pid", self.run_dir / "openvpn.log"

    def start_openvpn(self, config_text: str, timeout: float = 5.0) -> int:
        """Write ``config_text`` and run it as a daemon in the player's namespace; returns its pid."""
        self.stop_openvpn()
        conf, pidf, logf = self._files()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(config_text)
        conf.chmod(0o600)  # profiles carry private keys
        for path in (pidf, logf):
            path.unlink(missing_ok=True)
        self.exec(["openvpn", "--cd", self.run_dir, "--config", conf, "--writepid", pidf, "--log", logf,
                   "--daemon", f"openvpn-{self.ns}"], timeout=timeout)
        if not _wait(lambda: pidf.exists() and pidf.read_text().strip(), timeout):
            raise LabError(f"openvpn in {self.ns} wrote no pid file:\n{self.log()[-2000:]}")
        return int(pidf.read_text())

    def openvpn_pid(self) -> int | None:
        pidf = self._files()[1]
        try:
            pid = int(pidf.read_text())
        except (OSError, ValueError):
            return None
        # Only trust the pid while it is still a process inside this namespace (pids get reused).
        return pid if pid in self.lab.pids(self.ns) else None

    def stop_openvpn(self, timeout: float = 5.0) -> None:
        pid = self.openvpn_pid()
        if pid is not None:
            _signal_and_wait([pid], timeout)  # openvpn needs ~1 s after SIGTERM
        self._files()[1].unlink(missing_ok=True)

    def wait_for_tunnel(self, timeout: float = 15.0) -> str:
        """Wait for "Initialization Sequence Completed"; return the IPv4 address on the tun/tap device."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Initialization Sequence Completed" in self.log():
                for line in self.exec(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
                    fields = line.split()
                    if fields[1].startswith(("tun", "tap")):
                        return fields[3].split("/")[0]
            elif self.openvpn_pid() is None:
                raise LabError(f"openvpn in {self.ns} exited:\n{self.log()[-2000:]}")
            time.sleep(0.05)
        raise LabError(f"no tunnel in {self.ns} after {timeout}s:\n{self.log()[-2000:]}")

    def log(self) -> str:
        logf = self._files()[2]
        return logf.read_text(errors="replace") if logf.exists() else ""


class Lab:
    """One run's namespaces. Build with ``Lab()`` (or ``with Lab() as lab:``), tear down with ``down()``."""

    def __init__(self, *, state_dir: str | Path | None = None, host_link: bool = True,
                 lock_timeout: float = 120.0, cleanup_stale: bool = True):
        reason = self.requirements_missing()
        if reason:
            raise LabError(reason)
        # BASE_DIR is the registry of runs even when state_dir is elsewhere (then BASE_DIR/<id> is a symlink).
        self.base_dir = BASE_DIR
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if cleanup_stale:
            self.cleanup_stale()
        self.id = self._new_id()
        self.prefix = f"lh{self.id}-"
        self.state_dir = Path(state_dir) if state_dir else self.base_dir / self.id
        self._lock_fd: int | None = None
        self._owner = True
        self.nodes: dict[str, NodeHost] = {}
        self.players: dict[str, PlayerHost] = {}
        self.state = {"id": self.id, "prefix": self.prefix, "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                      "created": time.time(), "host_link": host_link, "namespaces": [], "host_links": [],
                      "host_routes": [], "netns_dirs": [], "nodes": {}, "players": {}}
        self.state_dir.mkdir(parents=True, exist_ok=False)
        if self.state_dir != self.base_dir / self.id:
            (self.base_dir / self.id).symlink_to(self.state_dir.resolve())  # so cleanup_stale finds it
        self._save()
        _register(self)
        try:
            if host_link:
                self._lock_host_link(lock_timeout)
            self._build_wan(host_link)
        except BaseException:
            self.down()
            raise

    # ---- identity, state, locking ------------------------------------------------------------------------------

    def _new_id(self) -> str:
        taken = set(_run(["ip", "netns", "list"]).stdout.split())
        for _ in range(100):
            run_id = secrets.token_hex(2)
            if not (self.base_dir / run_id).exists() and not any(n.startswith(f"lh{run_id}-") for n in taken):
                return run_id
        raise LabError("could not pick a free lab id in 100 tries")

    @property
    def wan(self) -> str:
        return self.prefix + "wan"

    def _save(self) -> None:
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_dir / "state.json")  # atomic: a reader never sees half a file

    def _record(self, key: str, value) -> None:
        """Write a resource into the state file *before* creating it, so a crash mid-way still gets cleaned."""
        if value not in self.state[key]:
            self.state[key].append(value)
            self._save()

    def _lock_host_link(self, timeout: float) -> None:
        fd = os.open(self.base_dir / "host-link.lock", os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(int(timeout / 0.2) + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.2)
        else:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LabError(f"another lab holds the host link routes ({holder}); waited {timeout}s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"lab {self.id} pid {os.getpid()} state {self.state_dir}\n".encode(), 0)
        self._lock_fd = fd
        # A dead run may still hold the routes (its lock died with it); remove it now that we own the lock.
        self.cleanup_stale()

    # ---- building ----------------------------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        self._record("namespaces", ns)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])  # new namespaces start with lo down

    def _build_wan(self, host_link: bool) -> None:
        wan = self.wan
        self._add_ns(wan)
        for bridge, net in (("br-nodes", NODES_NET), ("br-players", PLAYERS_NET)):
            _run(["ip", "-n", wan, "link", "add", bridge, "type", "bridge"])  # stp off: ports forward at once
            # A bridge without an address of its own takes the lowest MAC among its ports, so adding a host whose
            # veth sorts lower changes the router's MAC under every host that already cached it: their packets then
            # go to an address nobody has until their neighbour entry is probed again (seen: an IPv6 player cut off
            # from its server for over 20 s after a third player joined). Set, the address never changes.
            _run(["ip", "-n", wan, "link", "set", bridge, "address", BRIDGE_MACS[bridge]])
            _run(["ip", "-n", wan, "addr", "add", f"{net}.1/24", "dev", bridge])
            _run(["ip", "-n", wan, "link", "set", bridge, "up"])
        self.exec(wan, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if host_link:
            self._build_host_link()

    def _build_host_link(self) -> None:
        veth, wan = self.prefix + "host", self.wan
        for net in (NODES_NET, PLAYERS_NET):
            if _run(["ip", "route", "show", f"{net}.0/{ROUTED}"]).stdout.strip():
                raise LabError(f"host already has a route to {net}.0/{ROUTED} (is a `manage.py lab up` lab still "
                               "running? `manage.py lab down` removes it); refusing to shadow it")
        self._record("host_links", veth)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "host0", "netns", wan])
        _run(["ip", "addr", "add", f"{HOST_ADDR}/32", "peer", f"{WAN_HOST_ADDR}/32", "dev", veth])
        _run(["ip", "link", "set", veth, "up"])
        _run(["ip", "-n", wan, "addr", "add", f"{WAN_HOST_ADDR}/32", "peer", f"{HOST_ADDR}/32", "dev", "host0"])
        _run(["ip", "-n", wan, "link", "set", "host0", "up"])
        for net in (NODES_NET, PLAYERS_NET):
            route = [f"{net}.0/{ROUTED}", "via", WAN_HOST_ADDR, "dev", veth, "src", HOST_ADDR]
            self._record("host_routes", route)
            _run(["ip", "route", "add", *route])

    def _add_host(self, kind: str, name: str, address: str | None) -> tuple[str, str]:
        if not NAME_RE.match(name) or name == "wan":
            raise ValueError(f"bad lab host name {name!r}: want {NAME_RE.pattern}, not 'wan'")
        if name in self.nodes or name in self.players:
            raise ValueError(f"lab already has a host named {name!r}")
        net, bridge = (NODES_NET, "br-nodes") if kind == "n" else (PLAYERS_NET, "br-players")
        count = len(self.nodes) if kind == "n" else len(self.players)
        address = address or f"{net}.{FIRST_HOST + count}"
        if not address.startswith(net + ".") or not 1 < int(address.rsplit(".", 1)[1]) < 2 ** (32 - ROUTED) - 1:
            raise ValueError(f"{address} is outside {net}.2-{net}.62, the part of {net}.0/24 the lab routes")
        ns, port = self.prefix + name, f"{kind}-{name}"
        self._add_ns(ns)
        _run(["ip", "-n", self.wan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "-n", self.wan, "link", "set", port, "master", bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", f"{net}.1"])
        return ns, address

    def enable_ipv6(self, host: _Host) -> str:
        """Give ``host`` an IPv6 address on its bridge (and wan its router addresses, once); returns the address.

        ``nodad``: duplicate address detection would keep a new address unusable for a second or two, and nothing
        else on these bridges can hold it."""
        if host.address6:
            return host.address6
        wan = self.wan
        if not self.state.get("ipv6"):
            for bridge, net6 in (("br-nodes", NODES_NET6), ("br-players", PLAYERS_NET6)):
                _run(["ip", "-n", wan, "-6", "addr", "add", f"{net6}::1/64", "dev", bridge, "nodad"])
            self.exec(wan, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            self.state["ipv6"] = True
            self._save()
        net6 = NODES_NET6 if isinstance(host, NodeHost) else PLAYERS_NET6
        address6 = f"{net6}::{host.address.rsplit('.', 1)[1]}"
        self.exec(host.ns, ["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"])
        _run(["ip", "-n", host.ns, "-6", "addr", "add", f"{address6}/64", "dev", "eth0", "nodad"])
        _run(["ip", "-n", host.ns, "-6", "route", "add", "default", "via", f"{net6}::1"])
        host.address6 = address6
        return address6

    def add_player(self, name: str, address: str | None = None) -> PlayerHost:
        ns, address = self._add_host("p", name, address)
        player = self.players[name] = PlayerHost(self, name, ns, address)
        self.state["players"][name] = {"ns": ns, "address": address}
        self._save()
        return player

    def add_node(self, name: str, address: str | None = None, *, user: str | None = None,
                 sudo: bool = True) -> NodeHost:
        """A node with its own sshd. ``user``: also a non-root login of that name, with the same authorized keys as
        root and ``NOPASSWD: ALL`` sudo (none with ``sudo=False``); it exists only in the node's /etc view."""
        if user is not None:
            self._check_user(user)  # before anything is made
        ns, address = self._add_host("n", name, address)
        node = NodeHost(self, name, ns, address, user)
        self._make_etc(node)
        if user is not None:
            self._make_user(node, user, sudo=sudo)
        self._start_sshd(node)  # after the user: sshd sees the /etc/netns files that exist when it starts
        self.nodes[name] = node
        self.state["nodes"][name] = {"ns": ns, "address": address, **({"user": user} if user else {})}
        self._save()
        return node

    @staticmethod
    def _check_user(user: str) -> None:
        if not USER_RE.match(user):
            raise ValueError(f"bad lab user name {user!r}: want {USER_RE.pattern}")
        if user in {line.split(":", 1)[0] for line in Path("/etc/passwd").read_text().splitlines()}:
            raise ValueError(f"{user!r} is already an account on the host; pick a name the host does not have")
        if not Path("/etc/sudoers.d").is_dir() or not os.access("/usr/bin/sudo", os.X_OK):
            raise LabError("a lab node with a user needs sudo and /etc/sudoers.d on the host (apt-get install sudo)")

    def _make_user(self, node: NodeHost, user: str, *, sudo: bool) -> None:
        """/etc/netns/<ns>/{passwd,shadow,group,sudoers.d}: the host's accounts plus ``user``; the host's are untouched.

        The shadow copy carries no password hash ('*', or '!' where the host's is locked): sshd runs with UsePAM no
        and takes keys only, and sudo is NOPASSWD. The home directory is under /etc/ssh, which only the node has.
        """
        etc = node.etc_dir
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        taken_ids = {int(f[2]) for f in (line.split(":") for line in (passwd + group).splitlines())
                     if len(f) > 2 and f[2].isdigit()}
        uid = next(i for i in range(FIRST_UID, FIRST_UID + 10000) if i not in taken_ids)
        home = f"/etc/ssh/lanhub-home/{user}"
        (etc / home[5:]).mkdir(parents=True, mode=0o700)
        os.chown(etc / home[5:], uid, uid)
        shadow = []
        for line in (Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else "").splitlines():
            fields = line.split(":")
            if len(fields) > 1:
                fields[1] = "!" if fields[1].startswith("!") else "*"
                shadow.append(":".join(fields))
        # A last-change day of 0 would make sshd demand a new password; today's day number does not.
        shadow.append(f"{user}:*:{int(time.time() // 86400)}:0:99999:7:::")
        shadow_gid = next((int(f[2]) for f in (line.split(":") for line in group.splitlines())
                           if f[0] == "shadow" and len(f) > 2 and f[2].isdigit()), 0)
        for rel, text, mode, gid in (
                ("passwd", passwd.rstrip("\n") + f"\n{user}:x:{uid}:{uid}:LanHub lab user:{home}:/bin/sh\n", 0o644, 0),
                ("group", group.rstrip("\n") + f"\n{user}:x:{uid}:\n", 0o644, 0),
                ("shadow", "\n".join(shadow) + "\n", 0o640, shadow_gid)):
            path = etc / rel
            path.write_text(text)
            os.chown(path, 0, gid)
            path.chmod(mode)
        sudoers = etc / "sudoers.d"
        sudoers.mkdir(mode=0o755)  # always the node's own, so the host's sudoers.d grants nothing here
        if sudo:
            grant = sudoers / f"lanhub-{user}"
            grant.write_text(f"# LanHub lab node {node.name}: {user} may run anything as root, no password\n"
                             f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
            grant.chmod(0o440)
        # sshd reads authorized keys as the user logging in: public keys, so readable by all (StrictModes allows
        # a root-owned file that nobody else can write).
        node.etc_path("ssh/lanhub_authorized_keys").chmod(0o644)

    def _make_etc(self, node: NodeHost) -> None:
        """/etc/netns/<ns>/{ssh,openvpn,sysctl.d}: ``ip netns exec`` bind-mounts each over /etc/<entry>."""
        etc = node.etc_dir
        self._record("netns_dirs", str(etc))
        for sub in ("ssh", "openvpn/server", "openvpn/client", "sysctl.d"):
            (etc / sub).mkdir(parents=True, exist_ok=True, mode=0o755)
        for src in ("/etc/ssh/moduli", "/etc/ssh/ssh_config", "/etc/openvpn/update-resolv-conf"):
            if Path(src).is_file():  # non-secret files a Debian server has; never the host's keys
                shutil.copy2(src, etc / Path(src).relative_to("/etc"))
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lanhub-lab-{node.name}",
              "-f", etc / "ssh/ssh_host_ed25519_key"])
        (etc / "ssh/sshd_config").write_text(
            f"# LanHub lab node {node.name} (lab {self.id}); generated, removed by lab down\n"
            f"ListenAddress {node.address}\nPort 22\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
            "PidFile /etc/ssh/sshd.pid\n"  # /run is shared between namespaces
            "UsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "AuthorizedKeysFile /etc/ssh/lanhub_authorized_keys\n"
            "Subsystem sftp internal-sftp\nUseDNS no\nPrintMotd no\nAcceptEnv LANG LC_*\n")
        keys = etc / "ssh/lanhub_authorized_keys"
        keys.touch(mode=0o600)
        keys.chmod(0o600)

    def _start_sshd(self, node: NodeHost) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir; /run is shared
        self.exec(node.ns, ["/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config", "-E", "/etc/ssh/sshd.log"])
        pidf = node.etc_path("ssh/sshd.pid")  # sshd writes it after it listens
        if not _wait(pidf.exists, 5.0):
            raise LabError(f"sshd in {node.ns} did not start:\n{node.sshd_log()[-2000:]}")

    # ---- generic helpers ---------------------------------------------------------------------------------------

    def _ns(self, ns) -> str:
        """Accept a namespace name, a host object, a host's short name, or "wan"."""
        if isinstance(ns, _Host):
            return ns.ns
        if ns == "wan":
            return self.wan
        host = self.nodes.get(ns) or self.players.get(ns)
        return host.ns if host else ns

    def exec(self, ns, argv: list[str], *, timeout: float = 30.0, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", self._ns(ns), *argv], check=check, timeout=timeout, input=input)

    def ping(self, ns, address: str, count: int = 1, timeout: float = 2.0) -> float | None:
        """Average rtt in ms, or None if no reply arrived within ``timeout`` s per probe."""
        deadline = max(1, int(timeout * count + 0.999))
        proc = self.exec(ns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(deadline), address],
                         check=False, timeout=deadline + 5)
        match = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
        return float(match.group(1)) if proc.returncode == 0 and match else None

    def udp_roundtrip(self, from_ns, to_ns, to_address: str, port: int, timeout: float = 3.0) -> bool:
        """True if a datagram from ``from_ns`` reaches a listener in ``to_ns`` and its echo comes back."""
        token = secrets.token_hex(8)
        listener = subprocess.Popen(
            ["ip", "netns", "exec", self._ns(to_ns), sys.executable, "-c", _UDP_ECHO, str(port), str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if listener.stdout.readline().strip() != "READY":  # bounded: the listener exits after timeout
                return False
            sent = self.exec(from_ns, [sys.executable, "-c", _UDP_SEND, to_address, str(port), token, str(timeout)],
                             check=False, timeout=timeout + 5)
            out, _ = listener.communicate(timeout=timeout + 5)
            return sent.returncode == 0 and sent.stdout.strip() == token and token in out
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait(timeout=5)

    def pids(self, ns) -> list[int]:
        proc = _run(["ip", "netns", "pids", self._ns(ns)], check=False)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def kill_process(self, ns, pattern: str, timeout: float = 5.0) -> list[int]:
        """Terminate processes in ``ns`` whose command line matches the regex ``pattern``; returns their pids."""
        matched = []
        for pid in self.pids(ns):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if re.search(pattern, cmdline):
                matched.append(pid)
        _signal_and_wait(matched, timeout)
        return matched

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @staticmethod
    def requirements_missing() -> str | None:
        """Why a lab can't be built here, or None."""
        if os.geteuid() != 0:
            return f"the network lab needs root (running as uid {os.geteuid()})"
        if not Path("/dev/net/tun").exists():
            return "/dev/net/tun is missing (OpenVPN needs the tun device)"
        for tool in ("ip", "openvpn", "ssh-keygen", "ping"):
            if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
                return f"`{tool}` not found on PATH or in /usr/sbin"
        if not os.access("/usr/sbin/sshd", os.X_OK):
            return "/usr/sbin/sshd not found (apt-get install openssh-server)"
        for etc in ("/etc/ssh", "/etc/openvpn", "/etc/sysctl.d"):
            if not Path(etc).is_dir():
                return f"{etc} is missing on the host (ip netns exec needs it as a bind-mount target)"
        return None

    @classmethod
    def load(cls, state_dir: str | Path) -> Lab:
        """A handle on a lab another process made, good for ``down()`` and the helpers."""
        state_dir = Path(state_dir)
        state = json.loads((state_dir / "state.json").read_text())
        return cls._handle(state, state_dir)

    @classmethod
    def _handle(cls, state: dict, state_dir: Path) -> Lab:
        """A Lab object over existing state: builds nothing, owns no lock, isn't downed at this process's exit."""
        lab = cls.__new__(cls)
        lab.state, lab.state_dir, lab.base_dir, lab._lock_fd, lab._owner = state, state_dir, BASE_DIR, None, False
        lab.id, lab.prefix = state["id"], state["prefix"]
        lab.nodes = {n: NodeHost(lab, n, v["ns"], v["address"], v.get("user")) for n, v in state["nodes"].items()}
        lab.players = {n: PlayerHost(lab, n, v["ns"], v["address"]) for n, v in state["players"].items()}
        return lab

    def detach(self) -> None:
        """Let the lab outlive this process (``manage.py lab up``); only ``down()`` removes it then."""
        self.state["detached"] = True
        self._save()
        _unregister(self)
        if self._lock_fd is not None:
            # The lock dies with this process anyway; release it now so this process can build other labs (they
            # will find the host routes taken and say so until this lab is downed).
            os.close(self._lock_fd)
            self._lock_fd = None

    def owner_alive(self) -> bool:
        pid = self.state.get("pid")
        return bool(pid) and _alive(pid) and _proc_start(pid) == self.state.get("pid_start")

    def down(self) -> None:
        """Kill everything in the lab's namespaces, then delete them, the host link, /etc/netns dirs and state."""
        names = [n for n in self.state["namespaces"] if PREFIX_RE.match(n) and n.startswith(self.prefix)]
        pids = [p for ns in names for p in self.pids(ns)]
        stuck = _signal_and_wait(pids, 5.0)
        for route in self.state["host_routes"]:
            _run(["ip", "route", "del", *route], check=False)
        for link in self.state["host_links"]:
            if link.startswith(self.prefix):
                _run(["ip", "link", "del", link], check=False)
        for ns in names:
            _run(["ip", "netns", "del", ns], check=False)
        for path in map(Path, self.state["netns_dirs"]):
            if path.parent == NETNS_ETC and path.name.startswith(self.prefix):  # never anything else under /etc
                shutil.rmtree(path, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()  # only if empty: another lab or the admin may use it
        except OSError:
            pass
        self._remove_state()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        _unregister(self)
        if stuck:
            raise LabError(f"lab {self.id}: processes survived SIGKILL: {stuck}")

    def _remove_state(self) -> None:
        link = self.base_dir / self.id
        if link.is_symlink():
            link.unlink()
        if (self.state_dir / "state.json").exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def cleanup_stale(cls) -> list[str]:
        """Down every lab whose owner process is gone, and lh????- leftovers with no state; returns their ids."""
        # List leftovers *before* reading states: a lab records a name before creating it, so anything listed
        # here that belongs to a live lab has a state file by the time the states are read.
        candidates = cls._list_prefixed()
        removed, known = [], set()
        for entry in sorted(BASE_DIR.iterdir()) if BASE_DIR.is_dir() else []:
            if not (entry / "state.json").is_file():
                continue
            try:
                lab = cls.load(entry.resolve())
            except (OSError, ValueError, KeyError):
                continue
            known.add(lab.prefix)
            if lab.state.get("detached"):
                continue  # made to outlive its process; `manage.py lab down` removes it
            if lab.state.get("pid") != os.getpid() and not lab.owner_alive():
                lab.down()
                if entry.is_symlink():
                    entry.unlink()
                removed.append(lab.id)
        # An orphan is what a down() interrupted after removing the state (its processes are already dead).
        # Namespaces with live processes but no state are not ours to judge: someone else may use the name.
        orphans = {prefix: entry for prefix, entry in candidates.items() if prefix not in known
                   and not any(_run(["ip", "netns", "pids", ns], check=False).stdout.split()
                               for ns in entry["namespaces"])}
        for prefix, entry in orphans.items():
            state = {**entry, "id": prefix[2:6], "prefix": prefix, "host_routes": [], "nodes": {}, "players": {}}
            cls._handle(state, Path("/nonexistent-lanhub-lab")).down()
        return removed + [p[2:6] for p in orphans]

    @staticmethod
    def _list_prefixed() -> dict[str, dict]:
        """Namespaces, root-ns links and /etc/netns dirs named lh????-, grouped by prefix."""
        found: dict[str, dict] = {}
        ns_names = [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]
        links = re.findall(r"^\d+: (lh[0-9a-f]{4}-[^:@]+)", _run(["ip", "-o", "link"]).stdout, re.M)
        dirs = [p.name for p in NETNS_ETC.iterdir()] if NETNS_ETC.is_dir() else []
        for key, names in (("namespaces", ns_names), ("host_links", links), ("netns_dirs", dirs)):
            for name in names:
                match = PREFIX_RE.match(name)
                if match:
                    entry = found.setdefault(match.group(0), {"namespaces": [], "host_links": [], "netns_dirs": []})
                    entry[key].append(str(NETNS_ETC / name) if key == "netns_dirs" else name)
        return found


# Tiny programs run inside namespaces by udp_roundtrip; both exit on their own after the timeout.
_UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2])); print("READY", flush=True)
data, peer = s.recvfrom(2048); s.sendto(data, peer); print(data.decode(), peer[0], flush=True)
"""
_UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
deadline = time.monotonic() + float(sys.argv[4])
while time.monotonic() < deadline:
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(2048).decode()); break
    except socket.timeout:
        pass
else:
    sys.exit(1)
"""

# ---- process-wide cleanup: labs made by this process go down at exit and on SIGTERM/SIGINT ---------------------

_LIVE: dict[str, Lab] = {}
_PREVIOUS: dict[int, object] = {}
_ATEXIT = False


def _down_all() -> None:
    for lab in list(_LIVE.values()):
        try:
            lab.down()
        except Exception as exc:  # keep going: the other labs still need to go
            print(f"lab.netns: down of {lab.id} failed: {exc}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    _down_all()
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. pytest/Python's SIGINT -> KeyboardInterrupt
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _register(lab: Lab) -> None:
    global _ATEXIT
    if not _ATEXIT:
        _ATEXIT = bool(atexit.register(_down_all))
    _LIVE[lab.id] = lab
    if not _PREVIOUS and _is_main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            _PREVIOUS[sig] = signal.signal(sig, _on_signal)


def _unregister(lab: Lab) -> None:
    _LIVE.pop(getattr(lab, "id", None), None)
    if not _LIVE and _PREVIOUS and _is_main_thread():
        for sig, previous in list(_PREVIOUS.items()):
            if signal.getsignal(sig) is _on_signal:  # don't undo a handler someone installed after us
                signal.signal(sig, previous)
            del _PREVIOUS[sig]


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.netns list | down STATE_DIR | cleanup``: inspect or remove labs from a shell."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["list"]:
        for entry in sorted(BASE_DIR.iterdir()) if BASE_DIR.is_dir() else []:
            if (entry / "state.json").is_file():
                lab = Lab.load(entry.resolve())
                status = "alive" if lab.owner_alive() else "stale"
                print(f"{lab.id} pid={lab.state['pid']} {status} {lab.state_dir} "
                      f"nodes={','.join(lab.nodes)} players={','.join(lab.players)}")
        return 0
    if args[:1] == ["down"] and len(args) == 2:
        Lab.load(args[1]).down()
        return 0
    if args[:1] == ["cleanup"]:
        print("removed:", " ".join(Lab.cleanup_stale()) or "nothing")
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
