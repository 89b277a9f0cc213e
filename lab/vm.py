"""QEMU virtual machines as lab hosts: real Debian 12 servers with systemd, apt and reboots.

The namespace hosts of lab.netns share the machine's kernel and have no systemd; a VM host is a whole Debian
bookworm system, so LanHub's systemd path (enable, restart, is-active), its ``apt-get install openvpn`` and a
reboot run for real. A VM sits on the same br-nodes bridge as the namespace nodes (its tap device lives in the
lab's wan namespace, and QEMU runs there, so ``Lab.down()`` kills it with everything else)::

    host (root ns) 198.18.0.1 -- apt-cacher-ng (bound to 198.18.0.1 only, serves only Debian)
         |  veth
    wan ns -- br-nodes 203.0.113.1/24 -- tap v-<name> -- QEMU (TCG) -- Debian 12: eth0 203.0.113.4x/24

Images (``ensure_image``) are built by debootstrap from the Debian registry and cached under ``var/vm/<layer>-<hash
of the recipe>/``: ``base`` has openssh-server, systemd, sudo and iptables but no openvpn. The debootstrapped tree
is kept beside it (``tree-<hash>``), so a layer with packages preloaded (for tests that do not exercise apt) can be
added on top without a second debootstrap; there is none yet. A change to the recipe (packages, files, this
module's ``IMAGE_VERSION``) gives a new hash and a new build; old builds stay until var/vm is removed.
Each VM boots a throw-away qcow2 overlay of the image, in the lab's state directory (removed by ``down()``).

Everything a VM must have of its own arrives through QEMU's fw_cfg at every boot and is applied by the image's
``lanhub-lab-init`` unit before sshd starts: hostname, address, gateway, apt proxy, its SSH host key (made here,
so a test pins it without asking the VM), root's authorized keys and extra users (``nopasswd`` sudo, or sudo
that asks for a password). The VM has no DNS and no NTP (no timesyncd; the clock comes from the RTC at boot); its
only way out of the lab is the apt proxy. QEMU uses KVM only where the CPU shows hardware virtualisation (vmx or
svm) and /dev/kvm opens; otherwise TCG (on this kind of machine /dev/kvm exists but is not hardware KVM, and a
Debian kernel hangs under it). ``LANHUB_VM_ACCEL=tcg|kvm`` overrides.

Every wait is bounded; a VM or proxy that does not come up raises ``LabError`` with the tail of its console log.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab.netns import HOST_ADDR, NODES_NET, ROUTED, Lab, LabError, _Host, _run, _signal_and_wait, _wait

IMAGE_VERSION = 1  # bump to force a rebuild when something outside the recipe below changes the image
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "iptables", "iproute2",
                 "iputils-ping", "procps", "kmod", "passwd", "linux-image-amd64")
LAYERS = {"base": ()}  # layer -> packages added on top of the base tree (none yet: see the module docstring)
FIRST_VM_HOST = 40  # VMs get 203.0.113.40 and up (namespace nodes count up from .10)
VM_NAME_MAX = 12  # "v-" + name must fit a 15-char interface name
BUILD_TIMEOUT = 900.0
KERNEL_ARGS = ("root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 loglevel=4 panic=-1 mitigations=off "
               "random.trust_cpu=on systemd.show_status=auto")

# Applied at every boot, from QEMU's fw_cfg (see add_vm). POSIX sh: dash is the image's /bin/sh.
INIT_SCRIPT = r"""#!/bin/sh
# lanhub-lab-init: this VM's own settings from QEMU's fw_cfg (written by lab/vm.py), applied at every boot.
set -eu
modprobe qemu_fw_cfg 2>/dev/null || true
d=/sys/firmware/qemu_fw_cfg/by_name/opt/lanhub
i=0
while [ ! -d "$d" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -d "$d" ] || { echo "lanhub-lab-init: no opt/lanhub entries in fw_cfg" >&2; exit 1; }
get() { if [ -r "$d/$1/raw" ]; then cat "$d/$1/raw"; fi; }

name=$(get hostname)
echo "$name" > /etc/hostname
hostname "$name"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" > /etc/hosts

# This runs before udev has settled: load the drivers it needs itself and wait (bounded) for eth0.
modprobe virtio_net 2>/dev/null || true
i=0
while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up
ip -4 addr flush dev eth0
ip addr add "$(get address)" dev eth0
ip route replace default via "$(get gateway)"

proxy=$(get apt_proxy)
if [ -n "$proxy" ]; then
  printf 'Acquire::http::Proxy "%s";\nAcquire::Retries "0";\n' "$proxy" > /etc/apt/apt.conf.d/01lanhub-lab-proxy
else
  rm -f /etc/apt/apt.conf.d/01lanhub-lab-proxy
fi

umask 077
rm -f /etc/ssh/ssh_host_*
get host_key > /etc/ssh/ssh_host_ed25519_key
get host_key_pub > /etc/ssh/ssh_host_ed25519_key.pub
chmod 644 /etc/ssh/ssh_host_ed25519_key.pub
# Keys and users only on the first boot: what was added later (a LAN's deploy key) survives reboots.
mkdir -p /root/.ssh
[ -e /root/.ssh/authorized_keys ] || get authorized_keys > /root/.ssh/authorized_keys

get users | while read -r user mode; do
  [ -n "$user" ] || continue
  id "$user" >/dev/null 2>&1 && continue
  useradd --create-home --shell /bin/sh "$user"
  install -d -m 700 -o "$user" -g "$user" "/home/$user/.ssh"
  get authorized_keys > "/home/$user/.ssh/authorized_keys"
  chown "$user:$user" "/home/$user/.ssh/authorized_keys"
  case "$mode" in
    nopasswd) echo "$user ALL=(ALL:ALL) NOPASSWD: ALL" > "/etc/sudoers.d/lanhub-lab-$user" ;;
    password)
      echo "$user ALL=(ALL:ALL) ALL" > "/etc/sudoers.d/lanhub-lab-$user"
      echo "$user:$(head -c 24 /dev/urandom | base64)" | chpasswd ;;
    *) rm -f "/etc/sudoers.d/lanhub-lab-$user" ;;
  esac
  chmod 440 "/etc/sudoers.d/lanhub-lab-$user" 2>/dev/null || true
done
echo "lanhub-lab-init: $name $(get address) ready for sshd" > /dev/console
"""

INIT_UNIT = """[Unit]
Description=LanHub lab: this VM's address, host key and users from QEMU fw_cfg
DefaultDependencies=no
After=local-fs.target systemd-udevd.service
Before=network-pre.target ssh.service sysinit.target shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/lanhub-lab-init
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=sysinit.target
"""

# File in the image -> content. Part of the recipe: a change here rebuilds the image.
IMAGE_FILES = {
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": "lanhub-vm\n",
    "etc/resolv.conf": "# no DNS inside the lab: apt goes through the proxy by address\n",
    "etc/apt/sources.list": f"deb {MIRROR} {SUITE} main\n",
    "etc/apt/apt.conf.d/02lanhub-lab-no-recommends": 'APT::Install-Recommends "false";\n',
    "etc/ssh/sshd_config.d/lanhub-lab.conf": ("HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
                                              "KbdInteractiveAuthentication no\nUseDNS no\n"),
    "etc/systemd/journald.conf.d/lanhub-lab.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    "etc/systemd/system/lanhub-lab-init.service": INIT_UNIT,
    # A small initrd: under TCG, unpacking Debian's default one (every module, 35 MB) takes most of a boot.
    "etc/initramfs-tools/conf.d/lanhub-lab": "MODULES=list\nCOMPRESS=gzip\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\ncrc32c_generic\next4\n",
    "usr/local/sbin/lanhub-lab-init": INIT_SCRIPT,
}
# Units that would reach outside (NTP, apt's daily runs) or only cost CPU in a test VM.
MASKED_UNITS = ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer", "man-db.timer", "getty@tty1.service", "serial-getty@ttyS0.service",
                "systemd-networkd-wait-online.service")


def vm_requirements_missing() -> str | None:
    """Why VM hosts can't run here, or None (the namespace lab's own requirements come first)."""
    reason = Lab.requirements_missing()
    if reason:
        return reason
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                          ("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("apt-cacher-ng", "apt-cacher-ng")):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"`{tool}` not found (apt-get install {package})"
    return None


def accelerator() -> str:
    """"kvm" only where it really works (hardware virtualisation visible and /dev/kvm usable), else "tcg"."""
    forced = os.environ.get("LANHUB_VM_ACCEL", "").strip().lower()
    if forced in ("tcg", "kvm"):
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    hardware = any(f" {flag}" in flags for flag in ("vmx", "svm"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


# ---- images ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VmImage:
    """A built image: ``disk`` (qcow2, never written by a VM: VMs boot overlays), ``kernel`` and ``initrd``."""

    layer: str
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def build_seconds(self) -> float:
        return json.loads((self.directory / "recipe.json").read_text()).get("build_seconds", 0.0)


def recipe(layer: str) -> dict:
    if layer not in LAYERS:
        raise ValueError(f"unknown image layer {layer!r}: one of {', '.join(LAYERS)}")
    return {"version": IMAGE_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": sorted(BASE_PACKAGES),
            "layer": layer, "extra_packages": list(LAYERS[layer]), "files": IMAGE_FILES,
            "masked": list(MASKED_UNITS)}


def recipe_hash(layer: str) -> str:
    return hashlib.sha256(json.dumps(recipe(layer), sort_keys=True).encode()).hexdigest()[:16]


def ensure_image(var_dir: str | Path, layer: str = "base", *, log=None) -> tuple[VmImage, bool]:
    """The cached image for ``layer`` (built first if its recipe changed); returns (image, built now?).

    Builds are serialised by a lock file per var dir, so two test runs of one worktree never build twice.
    """
    log = log or (lambda message: None)
    root = Path(var_dir) / "vm"
    root.mkdir(parents=True, exist_ok=True)
    image = VmImage(layer, root / f"{layer}-{recipe_hash(layer)}")
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image.directory / "recipe.json").is_file():
            return image, False
        began = time.monotonic()
        work = root / f"build-{layer}-{secrets.token_hex(3)}"
        try:
            _build(work, layer, root, log)
            recipe_text = {**recipe(layer), "build_seconds": round(time.monotonic() - began, 1)}
            (work / "recipe.json").write_text(json.dumps(recipe_text, indent=1))
            shutil.rmtree(work / "root", ignore_errors=True)
            if image.directory.exists():
                shutil.rmtree(image.directory)
            work.rename(image.directory)
        finally:
            if work.exists():
                _umount_chroot(work / "root")
                shutil.rmtree(work, ignore_errors=True)
    return image, True


def _build(work: Path, layer: str, root: Path, log) -> None:
    tree = work / "root"
    work.mkdir()
    # The base tree is kept (as a tarball-free directory) so the openvpn layer does not debootstrap again.
    base_tree = root / f"tree-{recipe_hash('base')}"
    if not (base_tree / ".complete").exists():
        shutil.rmtree(base_tree, ignore_errors=True)
        log(f"debootstrap {SUITE} from {MIRROR} ...")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, base_tree,
              MIRROR], timeout=BUILD_TIMEOUT)
        _customize(base_tree)
        (base_tree / ".complete").touch()
    _run(["cp", "-a", base_tree, tree], timeout=300)
    (tree / ".complete").unlink(missing_ok=True)
    if LAYERS[layer]:
        raise LabError(f"image layer {layer!r} adds packages, which this build does not do yet")
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise LabError(f"no kernel/initrd in {tree / 'boot'} after debootstrap")
    shutil.copy2(kernels[-1], work / "vmlinuz")
    shutil.copy2(initrds[-1], work / "initrd.img")
    raw = work / "disk.raw"
    _run(["mkfs.ext4", "-q", "-F", "-L", "lanhub-root", "-d", tree, raw, "2G"], timeout=300)
    _run(["qemu-img", "convert", "-O", "qcow2", raw, work / "disk.qcow2"], timeout=300)
    raw.unlink()


def _customize(tree: Path) -> None:
    for relative, text in IMAGE_FILES.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tree / "usr/local/sbin/lanhub-lab-init").chmod(0o755)
    wants = tree / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "lanhub-lab-init.service").unlink(missing_ok=True)
    (wants / "lanhub-lab-init.service").symlink_to("/etc/systemd/system/lanhub-lab-init.service")
    for unit in MASKED_UNITS:
        target = tree / "etc/systemd/system" / unit
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every VM gets its own, from fw_cfg
    _run(["chroot", tree, "passwd", "-l", "root"], timeout=60)
    try:
        _run(["mount", "-t", "proc", "proc", tree / "proc"])
        _run(["chroot", tree, "update-initramfs", "-u", "-k", "all"], timeout=300)
    finally:
        _umount_chroot(tree)
    (tree / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _umount_chroot(tree: Path) -> None:
    if (tree / "proc/self").exists() and os.path.ismount(tree / "proc"):
        _run(["umount", "-l", tree / "proc"], check=False)


# ---- the apt proxy -----------------------------------------------------------------------------------------------

class AptProxy:
    """apt-cacher-ng of the lab's own: bound to the host's lab address only, serving only Debian's archive.

    The cache lives under ``var/vm/apt-cache`` (kept between runs); configuration, logs and pid in ``run_dir``.
    """

    # apt-cacher-ng's own port: here it could not bind any other (it resolves the port as a service name), and the
    # lab address it binds exists in one lab at a time (the host-link lock), so one port is enough.
    PORT = 3142

    def __init__(self, cache_dir: str | Path, run_dir: str | Path, bind: str = HOST_ADDR):
        self.cache_dir, self.run_dir, self.bind = Path(cache_dir), Path(run_dir), bind
        self.port = self.PORT
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if self.running():
            return
        conf = self.run_dir / "acng"
        for d in (conf, self.run_dir / "acng-log", self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Only Debian's archive: any Debian mirror URL maps to deb.debian.org; ForceManaged refuses the rest.
        (conf / "acng.conf").write_text(
            f"CacheDir: {self.cache_dir}\nLogDir: {self.run_dir / 'acng-log'}\n"
            "SupportDir: /usr/lib/apt-cacher-ng\n"
            f"Port: {self.port}\nBindAddress: {self.bind}\n"
            f"Remap-debrep: file:deb_mirror*.gz /debian ; {MIRROR}/\n"
            "ForceManaged: 1\nExThreshold: 4\nOfflineMode: 0\nDnsCacheSeconds: 60\n"
            f"PidFile: {self.run_dir / 'acng.pid'}\nSocketPath: {self.run_dir / 'acng.socket'}\n")
        log = open(self.run_dir / "acng-log" / "stdout.log", "ab")
        self.proc = subprocess.Popen(["apt-cacher-ng", "-c", str(conf), "ForeGround=1"], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if not _wait(lambda: _port_open(self.bind, self.port) or self.proc.poll() is not None, timeout, 0.1) \
                or self.proc.poll() is not None:
            text = (self.run_dir / "acng-log" / "stdout.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise LabError(f"apt-cacher-ng did not listen on {self.bind}:{self.port} within {timeout}s:\n{text}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_and_wait([self.proc.pid], timeout)
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> AptProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ---- VM hosts ----------------------------------------------------------------------------------------------------

@dataclass
class HostKey:
    private_openssh: str
    public_line: str  # "ssh-ed25519 AAAA..." (no comment): what a client pins

    @classmethod
    def generate(cls) -> HostKey:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        return cls(private, public)

    @property
    def fingerprint(self) -> str:
        blob = base64.b64decode(self.public_line.split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class VmHost(_Host):
    """A Debian VM on the lab's node bridge. ``start()`` boots it (from its overlay: the disk survives ``stop()``
    and reboots), ``wait_for_ssh()`` waits for sshd, ``stop()`` powers it off hard."""

    def __init__(self, lab: Lab, name: str, address: str, image: VmImage, *, authorized_keys: str,
                 users: dict[str, str] | None = None, apt_proxy: str | None = None, memory_mb: int = 512,
                 cpus: int = 1, host_key: HostKey | None = None):
        super().__init__(lab, name, lab.wan, address)
        self.image, self.memory_mb, self.cpus = image, memory_mb, cpus
        self.authorized_keys, self.users, self.apt_proxy = authorized_keys, dict(users or {}), apt_proxy
        self.host_key = host_key or HostKey.generate()
        self.dir = lab.state_dir / "vms" / name
        self.tap = f"v-{name}"
        self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        self.proc: subprocess.Popen | None = None
        self.boots = 0

    # -- what tests pin --
    def host_public_key(self) -> str:
        return self.host_key.public_line

    def host_key_fingerprint(self) -> str:
        return self.host_key.fingerprint

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.log"

    def console(self, tail: int = 3000) -> str:
        return self.console_path.read_text(errors="replace")[-tail:] if self.console_path.exists() else ""

    # -- lifecycle --
    def new_disk(self) -> None:
        """A fresh overlay of the image: what a rebuilt server at the same address would have."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk.unlink(missing_ok=True)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.image.disk.resolve(), self.disk])

    def _fw_cfg(self) -> list[str]:
        entries = {
            "hostname": self.name, "address": f"{self.address}/24", "gateway": f"{NODES_NET}.1",
            "apt_proxy": self.apt_proxy or "", "host_key": self.host_key.private_openssh,
            "host_key_pub": self.host_key.public_line + f" lanhub-lab-{self.name}\n",
            "authorized_keys": self.authorized_keys.strip() + "\n",
            "users": "".join(f"{user} {mode}\n" for user, mode in self.users.items()),
        }
        cfg = self.dir / "fw_cfg"
        cfg.mkdir(parents=True, exist_ok=True)
        argv = []
        for key, text in entries.items():
            path = cfg / key
            path.write_text(text)
            path.chmod(0o600)
            argv += ["-fw_cfg", f"name=opt/lanhub/{key},file={path}"]
        return argv

    def start(self) -> None:
        if self.running():
            raise LabError(f"VM {self.name} is already running")
        if not self.disk.exists():
            self.new_disk()
        wan = self.lab.wan
        if self.tap not in _run(["ip", "-n", wan, "-o", "link"]).stdout:
            _run(["ip", "-n", wan, "tuntap", "add", "dev", self.tap, "mode", "tap"])
            _run(["ip", "-n", wan, "link", "set", self.tap, "master", "br-nodes", "up"])
        accel = accelerator()
        argv = ["ip", "netns", "exec", wan, "qemu-system-x86_64", "-name", f"lanhub-lab-{self.lab.id}-{self.name}",
                "-machine", "q35", "-accel", "tcg,tb-size=128" if accel == "tcg" else "kvm",
                "-cpu", "max" if accel == "tcg" else "host", "-smp", str(self.cpus), "-m", str(self.memory_mb),
                "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
                "-serial", f"file:{self.console_path}", "-monitor", "none",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", KERNEL_ARGS,
                "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
                "-device", "virtio-rng-pci", "-rtc", "base=utc", *self._fw_cfg()]
        self.console_path.unlink(missing_ok=True)
        log = open(self.dir / "qemu.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.boots += 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_ssh(self, timeout: float = 120.0) -> float:
        """Wait until sshd answers with its banner on ``address``:22; returns the seconds waited."""
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise LabError(f"VM {self.name} exited (qemu: {self.qemu_log()[-1000:]}):\n{self.console()}")
            if _ssh_banner(self.address):
                return time.monotonic() - began
            time.sleep(0.5)
        raise LabError(f"VM {self.name} did not answer SSH on {self.address} within {timeout:.0f}s; console:\n"
                       f"{self.console()}")

    def wait_for_ssh_down(self, timeout: float = 60.0) -> bool:
        """True once sshd stops answering (a reboot has begun)."""
        return _wait(lambda: not _ssh_banner(self.address, 1.0), timeout, 0.5)

    def qemu_log(self) -> str:
        path = self.dir / "qemu.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Power off at once (a rebuilt or crashed server); the overlay disk stays unless ``new_disk()``."""
        if self.proc is not None:
            if self.proc.poll() is None:
                _signal_and_wait([self.proc.pid], timeout)
            self.proc.wait(timeout=5)
        self.proc = None


def _ssh_banner(address: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def add_vm(lab: Lab, name: str, image: VmImage, *, authorized_keys: str, address: str | None = None,
           start: bool = True, **options) -> VmHost:
    """Put a VM on ``lab``'s node bridge (needs a lab with a host link for SSH from this machine), boot it."""
    if not name.isalnum() or not name.islower() or len(name) > VM_NAME_MAX or name[0].isdigit():
        raise ValueError(f"bad VM name {name!r}: lower-case letters and digits, at most {VM_NAME_MAX}")
    vms = lab.__dict__.setdefault("vms", {})
    if name in vms or name in lab.nodes or name in lab.players:
        raise ValueError(f"lab already has a host named {name!r}")
    address = address or f"{NODES_NET}.{FIRST_VM_HOST + len(vms)}"
    if not 1 < int(address.rsplit(".", 1)[1]) < 2 ** (32 - ROUTED) - 1:
        raise ValueError(f"{address} is outside the part of {NODES_NET}.0/24 the lab routes")
    vm = vms[name] = VmHost(lab, name, address, image, authorized_keys=authorized_keys, **options)
    if start:
        vm.start()
    return vm
