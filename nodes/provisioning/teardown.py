"""The teardown step: what deleting a node does on the server itself.

Every LanHub instance and the discovery relay are stopped and disabled (systemd units) or killed (plain daemons),
then LanHub's files are removed: its OpenVPN configs, /etc/openvpn/lanhub (keys, run files, firewall rules, the
relay), its client-config-dir files, the sysctl drop-in, and the LANHUB-FORWARD firewall chain with its jump. The openvpn package stays (the host may
use it for something else), and so do files LanHub did not write. Safe to run again: a second run finds nothing.
"""

from __future__ import annotations

import shlex

from fabric import Connection

from nodes import layout
from nodes.provisioning.instances import _instance_state, _stop
from nodes.provisioning.relay import ensure_relay
from nodes.ssh import check_sudo, run_root


def teardown(c: Connection) -> list[str]:
    """Stop and remove everything LanHub put on the node; returns the instances it stopped."""
    check_sudo(c, "teardown")
    systemd, running, present = _instance_state(c)
    stopped = sorted(running | present)
    for name in stopped:
        _stop(c, name, systemd)
    ensure_relay(c, wanted=False)  # the discovery relay: stopped, and its systemd unit file removed
    run_root(c, (
        f"rm -f {layout.SERVER_DIR}/lanhub-*.conf {layout.CLIENT_DIR}/{layout.LINK_PREFIX}*.conf "
        f"{layout.CCD_DIR}/{layout.LINK_CN_PREFIX}* {shlex.quote(layout.SYSCTL_PATH)} && "
        f"rm -rf -- {shlex.quote(layout.LANHUB_DIR)} && {{ rmdir {layout.CCD_DIR} 2>/dev/null; true; }} && "
        "if command -v iptables >/dev/null; then "
        "while iptables -w -D FORWARD -j LANHUB-FORWARD 2>/dev/null; do :; done; "
        "iptables -w -F LANHUB-FORWARD 2>/dev/null; iptables -w -X LANHUB-FORWARD 2>/dev/null; fi; "
        "if [ -d /run/systemd/system ]; then systemctl daemon-reload; systemctl reset-failed "
        "'openvpn-server@lanhub-*' 'openvpn-client@lanhub-*' 2>/dev/null; fi; true"), hide=True)
    return stopped
