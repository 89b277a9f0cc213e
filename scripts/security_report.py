#!/usr/bin/env python3
"""Regenerate docs/security.md: run the tests that measure its figures, then write the page from what they saw.

    .venv/bin/python scripts/security_report.py            # needs root, openvpn and sshd for the revocation run

The tests are the ordinary ones (scripts/test.sh, a private Redis); LANHUB_SECURITY_FIGURES tells them where to
write their figures. A test that fails stops the script: the page never shows figures from a red run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "var" / "security-figures.json"
TESTS = ["tests/test_url_walk.py", "tests/nodes/test_revocation_without_expiry.py",
         "tests/e2e/test_revocation_window.py", "tests/e2e/test_portal_down.py", "tests/players/test_pull_filter.py"]
EXAMPLES = os.environ.get("LANHUB_FUZZ_EXAMPLES", "600")


def run_tests() -> dict:
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.unlink(missing_ok=True)
    env = {**os.environ, "LANHUB_SECURITY_FIGURES": str(FIGURES), "LANHUB_FUZZ_EXAMPLES": EXAMPLES,
           "LANHUB_REQUIRE_LAB": "1"}
    result = subprocess.run(["scripts/test.sh", *TESTS, "-q", "-p", "no:logging"], cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"the tests failed (exit {result.returncode}); docs/security.md is left as it was")
    return json.loads(FIGURES.read_text())


def page(f: dict) -> str:
    rev = f["revocation"]
    refused = ", ".join(f"{name} {count}" for name, count in sorted(rev["refused_by_server"].items()))
    return f"""# Security

What a public LanHub portal and its nodes defend against, and the figures that show it. This page is written by
`scripts/security_report.py` from the tests it runs (last run {dt.date.today().isoformat()}); edit the script, not
the page.

## Figures

| what | figure | test |
| --- | --- | --- |
| URLs in the URL configuration that name a host's object, requested by another host | {f["cross_host_urls"]} walked, every one a 404 | `tests/test_url_walk.py` |
| generated requests (every URL, generated path segments and form fields, GET and POST, anonymous / host / other host) | {f["generated_requests"]} tried, {f["server_errors"]} server errors | `tests/test_url_walk.py` (hypothesis) |
| revoke request to "every node refuses", {rev["nodes"]} nodes | {rev["revoke_request_s"]} s (the request returns once every node has the revocation file); {rev["attempts_after_revoke"]} reconnect attempts after it, {rev["accepted_after_revoke"]} accepted; refusals logged by the servers: {refused} | `tests/e2e/test_revocation_window.py` |
| days the LAN kept working with the portal stopped | {f["portal_down_days_tested"]} days tested on a real LAN of two nodes and their link (the outage is made by dating the certificates, which is what OpenVPN compares with its clock): the CA, the players' certificates and the nodes' server and link certificates all {f["portal_down_years_past_old_lifetime"]} years old, past every validity period LanHub sets or ever set (the old ten years, the old two years of node certificates, the old 30-day CRL): the link reconnects, players on both nodes reach each other, a revoked player is refused by both. Guaranteed: {f["portal_down_days_guaranteed"]}, since nothing on a node carries a date | `tests/e2e/test_portal_down.py`, `tests/nodes/test_revocation_without_expiry.py` |

## What is defended, and where

- **Development secrets in production.** With `DEBUG=False`, gunicorn (`lanhub/wsgi.py`), the Celery worker and
  beat (`lanhub/celery.py`) refuse to start while `SECRET_KEY` or `LANHUB_KEY` is missing, a published
  development or example value, or shorter than 32 characters (`lanhub/checks.py`; `tests/lanhub/test_startup.py`
  starts each process and watches it exit).
- **Password guessing.** django-axes locks a user name from one address after 5 wrong passwords for 15 minutes on
  the host login and the admin login; the join page no longer names the host's user name.
- **Tokens are credentials.** Player and invite tokens are never shown in the admin (not even to view-only staff),
  and are masked in gunicorn's access log and Django's 404 warnings (`lanhub/logmask.py`).
- **Cross-host access.** Every object a URL names is looked up through `lanhub/access.py`, which answers 404 for
  another host's object; the URL walk above covers new URLs without anyone listing them.
- **Bad input.** The known 500s (a Unicode digit as a server id, deeply nested JSON, an address that only looks
  like IPv6) are 400/404/form errors; validators use `\\Z`, so a trailing newline never reaches a config file.
- **Rate limits.** Joins count successful redemptions per client address; `X-Forwarded-For` is read only from
  `TRUSTED_PROXIES`. "I lost my device" is limited per player.
- **The worker as a port scanner.** SSH targets on the portal's own machine (loopback, its own addresses) and
  link-local addresses are refused unless `LANHUB_SSH_ALLOW_LOCAL_TARGETS` is set; refused, silent and non-SSH
  ports fail with one message; connection failures are retried twice, not five times.
- **HTTPS.** `SECURE_HSTS_SECONDS`, `SECURE_HSTS_INCLUDE_SUBDOMAINS`, `SECURE_HSTS_PRELOAD` and
  `SECURE_SSL_REDIRECT` are variables; with them `check --deploy` is clean (`tests/lanhub/test_deploy.py`).
- **Nodes.** Revocation is `crl-verify DIR dir` (one empty file per revoked serial): no CRL lapses while the portal
  is down. The revoke request writes the file on every node over SSH before it returns (`nodes/revocation.py`);
  a node that cannot be reached is named to the host and gets the file from its queued sync. The management
  interfaces ask for a per-node password from a root-only file; a connection without it gets no answer
  (`tests/e2e/test_portal_down.py`). Every OpenVPN process on a node, servers and link clients, drops to
  nobody/nogroup after start-up; persist-tun and persist-key keep device, routes and keys across reconnects, and a
  link's ccd file has `push-reset`, so the options a link pulls never change with the players' push list (a
  change would make OpenVPN reopen the device, which nobody cannot). The FORWARD chain drops tunnel-to-uplink
  traffic (a player's datagram to the node's uplink gateway never reaches the uplink). Deleting a node stops its
  instances and removes LanHub's files from it, revokes its certificates and re-plans the LAN without it.
  Profiles ignore a pushed `redirect-gateway` and `dhcp-option`: against a real server pushing both, a player's
  default route and routing table stay as they were and no DNS option reaches the client's scripts
  (`tests/players/test_pull_filter.py`, with the unfiltered profile as the control).

## Lifetimes

What a LAN holds that could expire, and what happens when the portal is down:

| what | lifetime | while the portal is down |
| --- | --- | --- |
| the LAN's CA | none (`notAfter` 99991231235959Z, RFC 5280's "no well-defined expiration date") | nothing to renew; every profile embeds the CA, so a dated CA would stop the whole LAN on one day |
| a player's certificate | none | ends only by revocation |
| revocations | none: one empty file per serial in the nodes' revocation directory | kept and enforced by every node |
| a node's certificates (server and link) | none (those of LANs made before node certificates stopped expiring carry two years: the portal re-issues them without a date once less than one year is left) | nothing to renew |
| the portal's own signed CRL | 30 days, re-signed with 15 left | a record on the portal only; no node reads it |

So a LAN keeps working indefinitely with the portal stopped: nothing on a node expires.

The trade-off, plainly: a player's OpenVPN client cannot consult the LAN's revocations (it has only the CA in its
profile, and the profile accepts any node of the LAN as its server). So a node key taken from a retired or
broken-into server can pose as a node of that LAN to players until it is revoked *and* the players' clients
refuse it, and with no date on the certificate, time never ends that by itself. What refuses it at once are the
nodes: deleting a node revokes its server and link certificates, the revocation is written into every other
node's revocation directory before the request returns, and from then on no node accepts that certificate and no
link connects to or from it. What remains open is a player's client being led (by the old server's address, or
its DNS name, now in someone else's hands) to a server that presents the stolen key.

If a node is compromised, or a server is retired without LanHub having cleaned it up, the host should:

1. delete the node in LanHub at once: its certificates are revoked on every other node, and new profiles and
   pages no longer list it;
2. tell the players to download their profiles again (the new ones no longer name that server), and delete the
   old ones;
3. if the key may be in hostile hands and the old address or name could come under an attacker's control, make a
   new LAN (a new CA) and invite the players again: that is the only thing that makes players' clients refuse the
   old node key, since they trust the LAN's CA and cannot consult its revocations.
"""


if __name__ == "__main__":
    figures = run_tests()
    (ROOT / "docs" / "security.md").write_text(page(figures))
    print(json.dumps(figures, indent=1))
    print("wrote docs/security.md")
