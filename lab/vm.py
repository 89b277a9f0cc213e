"""QEMU virtual machines as lab hosts: real Debian 12 servers with systemd, apt and reboots.

The namespace hosts of lab.netns share the machine's kernel and have no systemd; a VM host is a whole Debian
bookworm system, so LanHub's systemd path (enable, restart, is-active), its ``apt-get install openvpn`` and a
reboot run for real. A VM sits on the same br-nodes bridge as the namespace nodes (its tap device lives in the
lab's wan namespace, and QEMU runs there, so ``Lab.down()`` kills it with everything else)::

    host (root ns) 198.18.0.1 -- apt-cacher-ng (bound to 198.18.0.1 only, serves only Debian)
         |  veth
    wan ns -- br-nodes 203.0.113.1/24 -- tap v-<name> -- QEMU (TCG) -- Debian 12: eth0 203.0.113.4x/24

Images (``ensure_image``) are built from a Debian tree that debootstrap makes from the Debian registry once
(``tree-<hash>``, kept), and cached as ``<layer>-<hash of the recipe>/`` in ``cache_dir()``: /var/cache/lanhub/vm
when run as root (outside any checkout, so a fresh clone, as CI makes, reuses it), else var/vm
(``LANHUB_VM_CACHE`` overrides). ``base`` has openssh-server, systemd, sudo and iptables but no openvpn;
``preloaded`` adds openvpn and python3 (what LanHub's ensure_openvpn step installs), for tests that do not exercise
apt. A change to the recipe (packages, files, units, this module's ``IMAGE_VERSION``) gives a new hash and a new
build; old builds stay until the cache directory is removed.

Saved states (``ensure_saved_state``): each image booted once, in a network namespace of its own with nothing on
its link, and saved with QEMU's ``migrate`` to a file once systemd says the system is up; its overlay disk is kept
frozen beside it. A VM made with ``saved=`` boots a fresh overlay of that disk, restores the state (seconds, where
a cold boot under TCG takes 15-60) and is then told over its second serial port to take its own identity:
lanhub-lab-clone in the image sets the clock, reseeds the random pool (so does vmgenid), re-reads fw_cfg
(address, MAC, host key, users, root's keys, apt proxy), gives itself a new machine-id and restarts sshd. Clones
then differ in everything a test can see, and share one bridge. A reboot of a clone is a cold boot of its own
disk. A saved state is keyed by the image, QEMU's version, the accelerator, memory and CPUs.

Each VM boots a throw-away qcow2 overlay in the lab's state directory (removed by ``down()``).

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
# layer -> packages added on top of the debootstrap tree. "preloaded" has what LanHub's ensure_openvpn step would
# install (nodes/provisioning/system.py PACKAGES), for the tests that do not exercise apt.
LAYERS = {"base": (), "preloaded": ("openvpn", "python3")}
SYSTEM_CACHE = Path("/var/cache/lanhub/vm")
FIRST_VM_HOST = 40  # VMs get 203.0.113.40 and up (namespace nodes count up from .10)
VM_NAME_MAX = 12  # "v-" + name must fit a 15-char interface name
BUILD_TIMEOUT = 900.0
MACHINE_VERSION = "q35"  # part of a saved state's key: a restore needs the machine it was saved on
KERNEL_ARGS = ("root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 loglevel=4 panic=-1 mitigations=off "
               "random.trust_cpu=on systemd.show_status=auto")

# Applied at every boot, from QEMU's fw_cfg (see add_vm). POSIX sh: dash is the image's /bin/sh.
INIT_SCRIPT = r"""#!/bin/sh
# lanhub-lab-init: this VM's own settings from QEMU's fw_cfg (written by lab/vm.py), applied at every boot, and
# again by lanhub-lab-clone ("clone" mode) when the VM is a clone restored from a saved state: then the fw_cfg
# module is reloaded (it lists the entries of the QEMU that now runs the VM), root's keys are replaced and the
# users created, since the saved VM had another identity.
set -eu
mode=${1:-boot}
[ "$mode" = clone ] && { rmmod qemu_fw_cfg 2>/dev/null || true; }
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
mac=$(get mac)
if [ -n "$mac" ] && [ "$(cat /sys/class/net/eth0/address)" != "$mac" ]; then
  ip link set eth0 down  # up again below, with an IPv6 link-local address made from the new MAC
  ip link set eth0 address "$mac"
fi
ip link set eth0 up
ip -4 addr flush dev eth0
ip neigh flush dev eth0 2>/dev/null || true
ip addr add "$(get address)" dev eth0
ip route replace default via "$(get gateway)"
# Tell the bridge and the gateway where this address lives now (a clone or a rebuilt server has a new MAC).
ping -c1 -W1 "$(get gateway)" >/dev/null 2>&1 || true

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
# A clone gets a machine-id of its own (systemd itself keeps the saved one until the next boot).
[ "$mode" != clone ] || tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id

# Keys and users only on the first boot (or as a new clone): what was added later (a LAN's deploy key) survives
# reboots.
mkdir -p /root/.ssh
[ -e /root/.ssh/authorized_keys ] && [ "$mode" != clone ] || get authorized_keys > /root/.ssh/authorized_keys

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
echo "lanhub-lab-init: $name $(get address) ready for sshd ($mode)" > /dev/console
"""

# Listens on the second serial port (a socket of QEMU's on the host). Says "waiting" once the system has booted (a
# saved state is taken then); after a restore the host sends "reconfigure <unix time> <random hex>": the clock is
# set, the kernel's random pool reseeded (vmgenid does it too where the kernel has the driver), this VM's own
# settings applied again from fw_cfg, sshd restarted with the new host key; then it answers "done" (or "failed").
CLONE_SCRIPT = r"""#!/bin/sh
# lanhub-lab-clone: the host's control line into this VM (see lab/vm.py).
port=/dev/ttyS1
[ -c "$port" ] || exit 0
stty -F "$port" raw -echo 2>/dev/null || exit 0
exec 3<>"$port"
timeout 120 systemctl is-system-running --wait >/dev/null 2>&1 || true
echo "lanhub-lab-clone: waiting" >&3
while read -r command when noise <&3; do
  case "$command" in
    reconfigure)
      date -u -s "@$when" >/dev/null 2>&1 || true
      echo "$noise" > /dev/urandom
      if out=$(/usr/local/sbin/lanhub-lab-init clone 2>&1) && systemctl restart ssh 2>&1; then
        echo "lanhub-lab-clone: done" >&3
      else
        echo "lanhub-lab-clone: failed: $(echo "$out" | tail -n 3 | tr '\n' ' ')" >&3
      fi ;;
    *) echo "lanhub-lab-clone: unknown command" >&3 ;;
  esac
done
"""

CLONE_UNIT = """[Unit]
Description=LanHub lab: the host's control line (reconfigure after a restore from a saved state)
After=ssh.service lanhub-lab-init.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/lanhub-lab-clone
Restart=no

[Install]
WantedBy=multi-user.target
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
    "etc/systemd/system/lanhub-lab-clone.service": CLONE_UNIT,
    "usr/local/sbin/lanhub-lab-clone": CLONE_SCRIPT,
}
EXECUTABLES = ("usr/local/sbin/lanhub-lab-init", "usr/local/sbin/lanhub-lab-clone")
ENABLED_UNITS = {"lanhub-lab-init.service": "sysinit.target", "lanhub-lab-clone.service": "multi-user.target"}
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


def cache_dir(var_dir: str | Path | None = None) -> Path:
    """Where images, saved states and the apt cache live: ``LANHUB_VM_CACHE`` if set; else, as root,
    /var/cache/lanhub/vm (outside any checkout, so a fresh clone, as CI makes, reuses what an earlier run built);
    else ``<var_dir>/vm``."""
    forced = os.environ.get("LANHUB_VM_CACHE", "").strip()
    if forced:
        return Path(forced)
    if os.geteuid() == 0 or var_dir is None:
        return SYSTEM_CACHE
    return Path(var_dir) / "vm"


def tree_recipe() -> dict:
    """What debootstrap is asked for: the raw tree every layer starts from (customised per layer, on a copy)."""
    return {"version": IMAGE_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": sorted(BASE_PACKAGES)}


def recipe(layer: str) -> dict:
    if layer not in LAYERS:
        raise ValueError(f"unknown image layer {layer!r}: one of {', '.join(LAYERS)}")
    return {**tree_recipe(), "layer": layer, "extra_packages": list(LAYERS[layer]), "files": IMAGE_FILES,
            "enabled": ENABLED_UNITS, "masked": list(MASKED_UNITS)}


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def recipe_hash(layer: str) -> str:
    return _hash(recipe(layer))


def ensure_image(var_dir: str | Path | None = None, layer: str = "base", *, log=None) -> tuple[VmImage, bool]:
    """The cached image for ``layer`` (built first if its recipe changed); returns (image, built now?).

    Builds are serialised by a lock file in the cache, so two test runs never build the same image twice.
    """
    log = log or (lambda message: None)
    root = cache_dir(var_dir)
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
            _run(["rm", "-rf", "--one-file-system", work / "root"], timeout=300)
            if image.directory.exists():
                shutil.rmtree(image.directory)
            work.rename(image.directory)
        finally:
            if work.exists():
                _umount_chroot(work / "root")
                _run(["rm", "-rf", "--one-file-system", work], timeout=300, check=False)
    return image, True


def ensure_tree(root: Path, log) -> Path:
    """The raw debootstrap tree (kept, so a new layer or a changed file does not debootstrap again)."""
    tree = root / f"tree-{_hash(tree_recipe())}"
    if not (tree / ".complete").exists():
        _run(["rm", "-rf", "--one-file-system", tree], timeout=300, check=False)
        log(f"debootstrap {SUITE} from {MIRROR} ...")
        began = time.monotonic()
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, tree, MIRROR],
             timeout=BUILD_TIMEOUT)
        (tree / ".complete").write_text(f"{time.monotonic() - began:.1f}\n")  # seconds debootstrap took
    return tree


def debootstrap_seconds(var_dir: str | Path | None = None) -> float | None:
    """How long the cached debootstrap tree took to make (recorded when it was made)."""
    try:
        return float((cache_dir(var_dir) / f"tree-{_hash(tree_recipe())}" / ".complete").read_text())
    except (OSError, ValueError):
        return None


def _build(work: Path, layer: str, root: Path, log) -> None:
    tree = work / "root"
    work.mkdir()
    base_tree = ensure_tree(root, log)
    _run(["cp", "-a", base_tree, tree], timeout=300)
    (tree / ".complete").unlink(missing_ok=True)
    if LAYERS[layer]:
        log(f"apt-get install {' '.join(LAYERS[layer])} into the {layer} layer ...")
        _install(tree, LAYERS[layer])
    _customize(tree)
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


def _install(tree: Path, packages: tuple[str, ...]) -> None:
    """apt-get install ``packages`` into ``tree`` from the Debian registry (this machine's DNS, for the build only;
    services are not started in the chroot); package lists and downloaded .debs are removed afterwards."""
    policy = tree / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv = tree / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copy2("/etc/resolv.conf", resolv)
    apt = ["chroot", tree, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q",
           "-o", "APT::Install-Recommends=false"]
    try:
        _run(["mount", "-t", "proc", "proc", tree / "proc"])
        _run([*apt, "update"], timeout=BUILD_TIMEOUT)
        _run([*apt, "install", "-y", *packages], timeout=BUILD_TIMEOUT)
        _run([*apt, "clean"], timeout=60)
    finally:
        _umount_chroot(tree)
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
    for lists in (tree / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()


def _customize(tree: Path) -> None:
    for relative, text in IMAGE_FILES.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)
    for script in EXECUTABLES:
        (tree / script).chmod(0o755)
    for unit, target in ENABLED_UNITS.items():
        wants = tree / "etc/systemd/system" / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
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

    The cache lives in ``cache_dir()/apt-cache`` (kept between runs); configuration, logs and pid in ``run_dir``.
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


class _Qmp:
    """A minimal QEMU Machine Protocol client on QEMU's unix socket; every read bounded by ``timeout``."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        if not _wait(lambda: path.exists(), 10, 0.05):
            raise LabError(f"QEMU's QMP socket {path} did not appear")
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        for _ in range(1000):
            line = self.file.readline()
            if not line:
                raise LabError("QEMU closed its QMP socket")
            message = json.loads(line)
            if "event" not in message:
                return message
        raise LabError("QMP: no answer among 1000 events")

    def execute(self, command: str, **arguments) -> dict:
        self.file.write(json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}).encode()
                        + b"\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise LabError(f"QMP {command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return", {})

    def close(self) -> None:
        for closing in (self.file, self.sock):
            try:
                closing.close()
            except OSError:
                pass


class _Control:
    """The line to lanhub-lab-clone inside the VM: QEMU's second serial port, a unix socket on the host."""

    def __init__(self, path: Path):
        if not _wait(lambda: path.exists(), 10, 0.05):
            raise LabError(f"QEMU's control socket {path} did not appear")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def expect(self, prefix: str, timeout: float, alive) -> str:
        """The first line starting with "lanhub-lab-clone: " + ``prefix`` (or a failure) within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line.startswith("lanhub-lab-clone: failed") or line.startswith("lanhub-lab-clone: unknown"):
                    raise LabError(line)
                if line.startswith("lanhub-lab-clone: " + prefix):
                    return line
            if not alive():
                raise LabError("the VM exited")
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise LabError("QEMU closed the control socket")
            self.buffer += chunk
        raise LabError(f"no 'lanhub-lab-clone: {prefix}' from the VM within {timeout:.0f}s")

    def close(self) -> None:
        self.sock.close()


def qemu_version() -> str:
    return _run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0].strip()


@dataclass(frozen=True)
class SavedState:
    """A booted VM saved by QEMU's ``migrate`` to a file: ``state`` (its memory and devices) and ``disk`` (its disk
    at that moment, frozen: clones boot overlays of it). Restoring one and reconfiguring it takes seconds, where
    a cold boot under TCG takes tens of seconds."""

    image: VmImage
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.directory / "state.bin"

    @property
    def info(self) -> dict:
        return json.loads((self.directory / "saved.json").read_text())

    @property
    def memory_mb(self) -> int:
        return self.info["memory_mb"]

    @property
    def cpus(self) -> int:
        return self.info["cpus"]


def saved_state_key(image: VmImage, memory_mb: int, cpus: int) -> dict:
    return {"image": image.directory.name, "qemu": qemu_version(), "accel": accelerator(), "memory_mb": memory_mb,
            "cpus": cpus, "machine": MACHINE_VERSION}


def ensure_saved_state(image: VmImage, *, memory_mb: int = 512, cpus: int = 1, boot_timeout: float = 420.0,
                       log=None) -> tuple[SavedState, bool]:
    """The saved state of ``image`` booted once (made first if missing); returns (state, made now?).

    The VM is booted in a network namespace of its own with nothing on its link (it reaches nothing), waited for
    until lanhub-lab-clone says the system has booted, then migrated to a file and its overlay kept as the frozen
    disk. Keyed by the image, QEMU's version, the accelerator, memory and CPUs (a restore needs all of them equal).
    """
    log = log or (lambda message: None)
    key = saved_state_key(image, memory_mb, cpus)
    saved = SavedState(image, image.directory.parent / f"saved-{image.layer}-{_hash(key)}")
    with open(image.directory.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (saved.directory / "saved.json").is_file():
            return saved, False
        began = time.monotonic()
        work = image.directory.parent / f"build-saved-{secrets.token_hex(3)}"
        ns = f"lanhub-vmsave-{secrets.token_hex(3)}"
        qemu = None
        try:
            work.mkdir()
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "tuntap", "add", "dev", "v-save", "mode", "tap"])
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.disk.resolve(),
                  work / "disk.qcow2"])
            entries = {"hostname": "lanhub-saved", "address": f"{NODES_NET}.62/24", "gateway": f"{NODES_NET}.1",
                       "mac": "52:54:00:00:00:01", "apt_proxy": "", "authorized_keys": "\n", "users": ""}
            key_pair = HostKey.generate()
            entries |= {"host_key": key_pair.private_openssh, "host_key_pub": key_pair.public_line + "\n"}
            log(f"booting {image.layer} to save its state ...")
            argv = ["ip", "netns", "exec", ns, *_qemu_argv(
                name="lanhub-vmsave", image=image, disk=work / "disk.qcow2", tap="v-save", mac=entries["mac"],
                memory_mb=memory_mb, cpus=cpus, console=work / "console.log", qmp=work / "qmp.sock",
                control=work / "control.sock", fw_cfg=_fw_cfg_args(work / "fw_cfg", entries))]
            with open(work / "qemu.log", "ab") as qlog:
                qemu = subprocess.Popen(argv, stdout=qlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            control = _Control(work / "control.sock")
            try:
                control.expect("waiting", boot_timeout, lambda: qemu.poll() is None)
            except LabError as exc:
                console = (work / "console.log").read_text(errors="replace")[-3000:] if (
                    work / "console.log").exists() else ""
                raise LabError(f"saving {image.layer}: {exc}; console:\n{console}") from exc
            finally:
                control.close()
            booted = time.monotonic() - began
            qmp = _Qmp(work / "qmp.sock")
            try:
                qmp.execute("migrate", uri=f"exec:cat > {work / 'state.bin'}")
                status = {}
                for _ in range(1200):  # 120 s
                    status = qmp.execute("query-migrate")
                    if status.get("status") in ("completed", "failed", "cancelled"):
                        break
                    time.sleep(0.1)
                if status.get("status") != "completed":
                    raise LabError(f"saving {image.layer}: migrate ended {status.get('status')}: {status}")
                try:
                    qmp.execute("quit")
                except LabError:
                    pass  # QEMU may close the socket before it answers
            finally:
                qmp.close()
            qemu.wait(timeout=30)
            for leftover in ("qmp.sock", "control.sock", "fw_cfg"):
                _run(["rm", "-rf", work / leftover])
            (work / "saved.json").write_text(json.dumps(
                {**key, "boot_seconds": round(booted, 1), "seconds": round(time.monotonic() - began, 1),
                 "state_bytes": (work / "state.bin").stat().st_size}, indent=1))
            if saved.directory.exists():
                shutil.rmtree(saved.directory)
            work.rename(saved.directory)
        finally:
            if qemu is not None and qemu.poll() is None:
                _signal_and_wait([qemu.pid], 5)
                qemu.wait(timeout=5)
            _run(["ip", "netns", "del", ns], check=False)
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return saved, True


def _fw_cfg_args(directory: Path, entries: dict[str, str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    argv = []
    for key, text in entries.items():
        path = directory / key
        path.write_text(text)
        path.chmod(0o600)
        argv += ["-fw_cfg", f"name=opt/lanhub/{key},file={path}"]
    return argv


def _qemu_argv(*, name: str, image: VmImage, disk: Path, tap: str, mac: str, memory_mb: int, cpus: int,
               console: Path, qmp: Path, control: Path, fw_cfg: list[str], incoming: Path | None = None) -> list[str]:
    """One command line for cold boots, saves and restores: a restore needs the same machine and devices."""
    accel = accelerator()
    argv = ["qemu-system-x86_64", "-name", name,
            "-machine", MACHINE_VERSION, "-accel", "tcg,tb-size=128" if accel == "tcg" else "kvm",
            "-cpu", "max" if accel == "tcg" else "host", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-serial", f"file:{console}",
            "-chardev", f"socket,id=control,path={control},server=on,wait=off", "-serial", "chardev:control",
            "-qmp", f"unix:{qmp},server=on,wait=off", "-monitor", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS,
            "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
            "-device", "virtio-rng-pci", "-device", "vmgenid,guid=auto", "-rtc", "base=utc", *fw_cfg]
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {incoming}"]
    return argv


class VmHost(_Host):
    """A Debian VM on the lab's node bridge. ``start()`` boots it (from its overlay: the disk survives ``stop()``
    and reboots) or, given a ``saved`` state and a fresh disk, restores that state and gives the clone this host's
    identity (address, MAC, host key, users, clock); ``wait_for_ssh()`` waits for sshd, ``stop()`` powers it off
    hard."""

    def __init__(self, lab: Lab, name: str, address: str, image: VmImage, *, authorized_keys: str,
                 users: dict[str, str] | None = None, apt_proxy: str | None = None, memory_mb: int = 512,
                 cpus: int = 1, host_key: HostKey | None = None, saved: SavedState | None = None):
        super().__init__(lab, name, lab.wan, address)
        self.image, self.saved = image, saved
        self.memory_mb, self.cpus = (saved.memory_mb, saved.cpus) if saved else (memory_mb, cpus)
        self.authorized_keys, self.users, self.apt_proxy = authorized_keys, dict(users or {}), apt_proxy
        self.host_key = host_key or HostKey.generate()
        self.dir = lab.state_dir / "vms" / name
        self.tap = f"v-{name}"
        self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        self.proc: subprocess.Popen | None = None
        self.boots = 0
        self.restores = 0
        self._fresh_disk = False
        self.last_start_seconds = 0.0

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
        """A fresh overlay (of the saved disk, or of the image): what a rebuilt server at the same address has."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk.unlink(missing_ok=True)
        backing = self.saved.disk if self.saved else self.image.disk
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing.resolve(), self.disk])
        self._fresh_disk = True

    def _fw_cfg(self) -> list[str]:
        return _fw_cfg_args(self.dir / "fw_cfg", {
            "hostname": self.name, "address": f"{self.address}/24", "gateway": f"{NODES_NET}.1", "mac": self.mac,
            "apt_proxy": self.apt_proxy or "", "host_key": self.host_key.private_openssh,
            "host_key_pub": self.host_key.public_line + f" lanhub-lab-{self.name}\n",
            "authorized_keys": self.authorized_keys.strip() + "\n",
            "users": "".join(f"{user} {mode}\n" for user, mode in self.users.items()),
        })

    def start(self, timeout: float = 120.0) -> None:
        """Boot, or (a saved state and a fresh disk) restore and reconfigure, bounded by ``timeout``."""
        if self.running():
            raise LabError(f"VM {self.name} is already running")
        if not self.disk.exists():
            self.new_disk()
        restore = self.saved is not None and self._fresh_disk
        wan = self.lab.wan
        if self.tap not in _run(["ip", "-n", wan, "-o", "link"]).stdout:
            _run(["ip", "-n", wan, "tuntap", "add", "dev", self.tap, "mode", "tap"])
            _run(["ip", "-n", wan, "link", "set", self.tap, "master", "br-nodes", "up"])
        for sock in ("qmp.sock", "control.sock"):
            (self.dir / sock).unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", wan, *_qemu_argv(
            name=f"lanhub-lab-{self.lab.id}-{self.name}", image=self.image, disk=self.disk, tap=self.tap,
            mac=self.mac, memory_mb=self.memory_mb, cpus=self.cpus, console=self.console_path,
            qmp=self.dir / "qmp.sock", control=self.dir / "control.sock", fw_cfg=self._fw_cfg(),
            incoming=self.saved.state if restore else None)]
        self.console_path.unlink(missing_ok=True)
        began = time.monotonic()
        with open(self.dir / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._fresh_disk = False
        if not restore:
            self.boots += 1
            return
        self.restores += 1
        control = None
        try:
            # Send only once the state is loaded and the VM runs: bytes that reached the serial port earlier would
            # be overwritten by the restored device state.
            qmp = _Qmp(self.dir / "qmp.sock")
            try:
                if not _wait(lambda: qmp.execute("query-status").get("status") == "running", timeout, 0.1):
                    raise LabError(f"not running {timeout:.0f}s after the restore began")
            finally:
                qmp.close()
            control = _Control(self.dir / "control.sock")
            deadline = time.monotonic() + timeout
            while True:  # the line is sent again if it got lost; applying it twice does no harm
                control.send(f"reconfigure {time.time():.3f} {secrets.token_hex(32)}")
                try:
                    control.expect("done", min(20.0, max(1.0, deadline - time.monotonic())), self.running)
                    break
                except LabError as exc:
                    if "within" not in str(exc) or time.monotonic() >= deadline:
                        raise
        except (LabError, OSError) as exc:
            raise LabError(f"VM {self.name}: restoring its saved state: {exc} (qemu: {self.qemu_log()[-800:]})\n"
                           f"{self.console()}") from exc
        finally:
            if control is not None:
                control.close()
        self.last_start_seconds = time.monotonic() - began

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

    def console_count(self, text: str) -> int:
        """How often ``text`` is in the console log: each boot's lanhub-lab-init writes "ready for sshd (boot)"
        there, so a reboot is seen when that count grows (an SSH banner that answers late is no proof of one)."""
        return self.console_path.read_text(errors="replace").count(text) if self.console_path.exists() else 0

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


def remove_vm(lab: Lab, name: str) -> None:
    """Power a VM off and take it out of the lab: its tap device and its directory (overlay, logs) go."""
    vm = lab.__dict__.get("vms", {}).pop(name, None)
    if vm is None:
        return
    vm.stop()
    _run(["ip", "-n", lab.wan, "link", "del", vm.tap], check=False)
    shutil.rmtree(vm.dir, ignore_errors=True)


def add_vm(lab: Lab, name: str, image: VmImage, *, authorized_keys: str, address: str | None = None,
           start: bool = True, **options) -> VmHost:
    """Put a VM on ``lab``'s node bridge (needs a lab with a host link for SSH from this machine), boot it."""
    if not name.isalnum() or not name.islower() or len(name) > VM_NAME_MAX or name[0].isdigit():
        raise ValueError(f"bad VM name {name!r}: lower-case letters and digits, at most {VM_NAME_MAX}")
    vms = lab.__dict__.setdefault("vms", {})
    if name in vms or name in lab.nodes or name in lab.players:
        raise ValueError(f"lab already has a host named {name!r}")
    taken = {vm.address for vm in vms.values()}
    free = (f"{NODES_NET}.{n}" for n in range(FIRST_VM_HOST, 2 ** (32 - ROUTED) - 1))
    address = address or next(a for a in free if a not in taken)
    if not 1 < int(address.rsplit(".", 1)[1]) < 2 ** (32 - ROUTED) - 1:
        raise ValueError(f"{address} is outside the part of {NODES_NET}.0/24 the lab routes")
    vm = vms[name] = VmHost(lab, name, address, image, authorized_keys=authorized_keys, **options)
    if start:
        vm.start()
    return vm
