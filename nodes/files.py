"""Every file a node needs: the planner's rendered configs plus the PKI files, private keys unsealed only here.

A file's hash is what LanHub compares to decide whether a node must sync; private keys are hashed like any file,
so a re-issued key reaches the node, but their contents never leave this function except towards the node.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from django.conf import settings

from lanhub.secrets import unseal
from nodes import layout, render

PKI_DIR = layout.PKI_DIR
SERVER_INSTANCES = layout.SERVER_INSTANCES
CCD_DIR = layout.CCD_DIR + "/"


@dataclass(frozen=True)
class PkiFile:
    """A PKI file and the instances that must restart when it changes (the CRL is re-read by OpenVPN itself)."""

    path: str
    content: str = field(repr=False)
    mode: int = 0o644
    restarts: str = ""  # "servers", "links", "all" or ""

    @property
    def instance(self) -> None:
        return None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


def pki_files(lan, node) -> dict[str, PkiFile]:
    files = [
        PkiFile(layout.PKI_CA, lan.ca_cert, restarts="all"),
        PkiFile(layout.PKI_TLS_CRYPT, unseal(lan.tls_crypt_sealed), 0o600, restarts="all"),
        PkiFile(layout.PKI_CRL_DIR_KEEP, ""),
        PkiFile(layout.PKI_NODE_CERT, node.server_cert, restarts="servers"),
        PkiFile(layout.PKI_NODE_KEY, unseal(node.server_key_sealed), 0o600, restarts="servers"),
        PkiFile(layout.PKI_LINK_CERT, node.link_cert, restarts="links"),
        PkiFile(layout.PKI_LINK_KEY, unseal(node.link_key_sealed), 0o600, restarts="links"),
        PkiFile(layout.MANAGEMENT_PASSWORD_FILE, management_password(lan, node) + "\n", 0o600, restarts="all"),
    ]
    # One empty file per revoked serial; OpenVPN looks the file up at each handshake, so nothing restarts.
    files += [PkiFile(layout.revoked_serial_path(serial), "") for serial in revoked_serials(lan)]
    return {f.path: f for f in files}


def management_password(lan, node) -> str:
    """The node's management-interface password: derived from LANHUB_KEY, so it is stable across syncs, differs
    per node, and is never stored. The worker reads it back from the node (nodes/openvpn_mgmt.py)."""
    material = f"lanhub-management:{lan.pk}:{node.pk}".encode()
    return hmac.new(settings.LANHUB_KEY.encode(), material, hashlib.sha256).hexdigest()


def revoked_serials(lan) -> list[str]:
    return sorted(lan.revoked_certificates.values_list("serial", flat=True))


def desired_files(lan, node, lan_plan) -> dict:
    """path -> file (RenderedFile or PkiFile) for one node under the current plan."""
    files = dict(render.render_node(lan_plan.plan, lan_plan.spec, lan_plan.specs, node.name, lan_plan.discovery))
    files.update(pki_files(lan, node))
    return files


def instances_to_restart(changed_paths, files: dict, wanted: set[str]) -> set[str]:
    """Which running instances must restart because these files changed."""
    restart = set()
    for path in changed_paths:
        f = files.get(path)
        if f is None:
            continue
        if isinstance(f, PkiFile):
            if f.restarts == "all":
                restart |= wanted
            elif f.restarts == "servers":
                restart |= wanted & set(SERVER_INSTANCES)
            elif f.restarts == "links":
                restart |= {i for i in wanted if i.startswith("client/")}  # link instances
        elif f.instance and not path.startswith(CCD_DIR):
            restart.add(f.instance)
    return restart & wanted


def reconnect_for(changed_paths) -> set[str]:
    """Common names whose client-config-dir file changed: they must reconnect, the server need not restart."""
    return {path[len(CCD_DIR):] for path in changed_paths if path.startswith(CCD_DIR)}


def wanted_instances(files: dict) -> set[str]:
    return {f.instance for f in files.values() if getattr(f, "instance", None)}
