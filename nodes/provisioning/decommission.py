"""Take LanHub off a node that is being deleted: its OpenVPN instances and its discovery relay stopped (their
systemd units disabled, the relay's unit file removed), every file LanHub wrote removed, its directory (keys, run
files, relay) gone, and its firewall chain unhooked. OpenVPN itself and IP forwarding stay: they may have been
there before LanHub, and other software may rely on them."""

from __future__ import annotations

from collections.abc import Iterable

from fabric import Connection

from nodes import layout
from nodes.provisioning.files import discard_backups, upload_files
from nodes.provisioning.instances import ensure_instances
from nodes.provisioning.relay import ensure_relay
from nodes.ssh import run_root

# Unhook and delete the chain; each command may fail harmlessly (no iptables, chain already gone).
_FIREWALL = ("command -v iptables >/dev/null || exit 0; "
             "while iptables -D FORWARD -j LANHUB-FORWARD 2>/dev/null; do :; done; "
             "iptables -F LANHUB-FORWARD 2>/dev/null; iptables -X LANHUB-FORWARD 2>/dev/null; true")


def decommission(c: Connection, *, applied: Iterable[str]) -> list[str]:
    """Stop every lanhub instance and the relay, remove `applied` (the paths the last sync wrote) and LanHub's
    directory; returns the instances it stopped."""
    stopped = ensure_instances(c, wanted=set()).stopped
    ensure_relay(c, wanted=False)
    result = upload_files(c, {}, remove=sorted(applied))
    discard_backups(c, result)
    run_root(c, _FIREWALL, hide=True, warn=True)
    run_root(c, f"rm -rf -- {layout.LANHUB_DIR}", hide=True)
    return stopped
