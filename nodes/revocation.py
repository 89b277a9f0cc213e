"""Revocation without a window: the revoked serial reaches every node before the revoke request returns.

A sync would carry the new file too, but it is queued, and the nodes' syncs finish one after another: a revoked
profile was accepted by the other nodes for seconds after the host pressed "revoke". So the service that revokes
also writes the one empty file `crl-verify DIR dir` looks for (nodes/layout.py: revoked_serial_path) on every
node itself, over SSH, in parallel, within REVOKE_PUSH_TIMEOUT, and only then returns. OpenVPN stats that file at
each handshake, so from then on no node accepts the certificate. The sync that follows finds the file in place.

Why not a tls-verify or client-connect hook asking the portal? It would make every handshake depend on the portal,
and a LAN must keep working while the portal is down. A node that cannot be reached within the timeout is named
to the caller (the host sees it) and gets the file from its queued sync, with retries, once it answers.
"""

from __future__ import annotations

import logging
import shlex
from concurrent.futures import ThreadPoolExecutor, wait

from nodes import layout
from nodes.models import Lan, Node
from nodes.ssh import ProvisioningError, open_connection, run_root

log = logging.getLogger(__name__)

REVOKE_PUSH_TIMEOUT = 5  # seconds per node for connect + command; all nodes in parallel
MAX_PARALLEL = 16


def push_revoked(lan: Lan, serials: list[str]) -> list[str]:
    """Write the revocation files for `serials` on every node of `lan` that LanHub has set up; return the names
    of the nodes that could not be reached in time."""
    nodes = [n for n in Node.objects.filter(lan=lan).select_related("lan") if n.applied_files and n.ssh_host_key]
    if not nodes or not serials:
        return []
    # Paths are built here, in the caller's thread: the workers below touch no database.
    command = _command(serials)
    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(nodes)), thread_name_prefix="revoke-push")
    futures = {pool.submit(_push_one, node, command): node for node in nodes}
    done, _ = wait(futures, timeout=REVOKE_PUSH_TIMEOUT * 2 + 1)
    pool.shutdown(wait=False, cancel_futures=True)
    unreached = []
    for future, node in futures.items():
        error = future.exception() if future in done else TimeoutError("no answer in time")
        if error is not None:
            log.warning("revocation not pushed to node %s: %s", node.name, error)
            unreached.append(node.name)
    return sorted(unreached)


def _command(serials: list[str]) -> str:
    paths = " ".join(shlex.quote(layout.revoked_serial_path(serial)) for serial in serials)
    directory = shlex.quote(layout.PKI_CRL_DIR)
    # Mode 644 and empty, exactly what the sync uploads, so the sync that follows changes nothing here.
    return f"mkdir -p -- {directory} && touch -- {paths} && chmod 644 -- {paths}"


def _push_one(node: Node, command: str) -> None:
    try:
        with open_connection(node, timeout=REVOKE_PUSH_TIMEOUT) as c:
            run_root(c, command, hide=True, timeout=REVOKE_PUSH_TIMEOUT)
    except ProvisioningError:
        raise
    except Exception as exc:  # noqa: BLE001  (whatever went wrong, this node did not get the file)
        raise ProvisioningError("revoke", f"{type(exc).__name__}: {exc}") from None
