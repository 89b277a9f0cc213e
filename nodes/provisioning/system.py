"""Steps on the node's system: check_os, ensure_openvpn, and ensure_forwarding with its firewall rules."""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Callable

from fabric import Connection

from nodes import layout
from nodes.ssh import ProvisioningError, check_sudo, run_root

FIREWALL_RULES = layout.FIREWALL_PATH


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


# binary -> Debian package: python3 runs the discovery relay, nft is its fan-out in the kernel
PACKAGES = {"openvpn": "openvpn", "python3": "python3", "nft": "nftables"}


def ensure_openvpn(c: Connection) -> bool:
    """Install the distribution's openvpn, python3 and nftables packages unless their binaries are already there."""
    check_sudo(c, "ensure_openvpn")  # the first step that needs root: a failing probe below must mean "missing"
    probe = " ; ".join(f"command -v {b} >/dev/null || echo {b}" for b in PACKAGES)
    missing = run_root(c, probe + "; true", hide=True, warn=True).stdout.split()
    packages = " ".join(PACKAGES[b] for b in PACKAGES if b in missing)
    if not packages:
        return False
    # Lock timeout: a fresh cloud server is often still running unattended-upgrades when it is first synced.
    apt = "DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300"
    run_root(c, f"{apt} update && {apt} install -y --no-install-recommends {packages}", hide=True)
    return True


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
