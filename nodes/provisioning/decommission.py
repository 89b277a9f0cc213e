"""Take LanHub off a node that is being deleted: its OpenVPN instances stopped (and their systemd units disabled),
every file LanHub wrote removed, its keys and run files gone, and its firewall chain unhooked. OpenVPN itself and
IP forwarding stay: they may have been there before LanHub, and other software may rely on them."""

from __future__ import annotations

from collections.abc import Iterable

from fabric import Connection

from nodes import layout
from nodes.provisioning.files import discard_backups, upload_files
from nodes.provisioning.instances import ensure_instances
from nodes.ssh import run_root

# Unhook and delete the chain; each command may fail harmlessly (no iptables, chain already gone).
_FIREWALL = ("command -v iptables >/dev/null || exit 0; "
             "while iptables -D FORWARD -j LANHUB-FORWARD 2>/dev/null; do :; done; "
             "iptables -F LANHUB-FORWARD 2>/dev/null; iptables -X LANHUB-FORWARD 2>/dev/null; true")


def decommission(c: Connection, *, applied: Iterable[str]) -> list[str]:
    """Stop every lanhub instance and remove `applied` (the paths the last sync wrote); returns what it stopped."""
    stopped = ensure_instances(c, wanted=set()).stopped
    result = upload_files(c, {}, remove=sorted(applied))
    discard_backups(c, result)
    run_root(c, _FIREWALL, hide=True, warn=True)
    run_root(c, f"rm -rf -- {layout.PKI_DIR} {layout.RUN_DIR} {layout.FIREWALL_PATH}", hide=True)
    return stopped
