"""A Linux player follows the player page's NetworkManager steps with the real tools.

NetworkManager makes an imported VPN the default route unless the connection says ``never-default``; LanHub's
servers carry only the LAN and don't NAT, so such a player would lose the internet while connected
(OPENVPN-NOTES.md). The page therefore shows nmcli steps with the player's own file name. This test downloads the
profile through the real view, takes the commands from the rendered page, and runs them against a real
NetworkManager (Debian's network-manager and network-manager-openvpn): ``nmcli connection import`` goes through the
plugin's own .ovpn parser, as on a player's desktop.

NetworkManager runs in a mount and network namespace of its own, with a private D-Bus system bus and tmpfs over
its configuration, state and the home directory the plugin writes certificates to: nothing of this machine's
network or configuration is touched, and everything goes with the namespace. What is not run: ``nmcli connection
up`` (it needs a reachable LanHub server; tests/e2e covers the profile on real OpenVPN clients).

Needs root and unshare (marker lab; run under the heavy lock).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from nodes.models import Node, NodeState
from tests.base import BaseTestCase
from tests.lab_helpers import lab_required

pytestmark = pytest.mark.lab

TOOLS = ("nmcli", "NetworkManager", "dbus-daemon", "unshare")
PLUGIN = Path("/usr/lib/NetworkManager/VPN/nm-openvpn-service.name")
PRIVATE_DIRS = ("/run/dbus", "/run/NetworkManager", "/etc/NetworkManager/system-connections",
                "/etc/NetworkManager/conf.d", "/var/lib/NetworkManager")

# Runs inside `unshare --mount --net --fork --kill-child`: $1 is the home directory, $2 the page's commands file.
SCRIPT = r"""
set -eu
for d in {private}; do mkdir -p "$d"; mount -t tmpfs lanhub-nm "$d"; done
mount -t tmpfs lanhub-nm "$1"
printf '[main]\nplugins=keyfile\nauth-polkit=false\n' > /etc/NetworkManager/conf.d/lanhub-test.conf
ip link set lo up
dbus-daemon --system --fork --nopidfile
NetworkManager --no-daemon >"$1/nm.log" 2>&1 &
i=0
until nmcli -t general status >/dev/null 2>&1; do
  i=$((i + 1)); [ "$i" -le 100 ] || {{ echo "NetworkManager did not start"; cat "$1/nm.log"; exit 3; }}; sleep 0.1
done
cp "$3" "$1/"
cd "$1"
show() {{ echo "== $1: $(nmcli -g ipv4.never-default,ipv6.never-default connection show "$2" | tr '\n' ' ')"; }}
n=0
while IFS= read -r command; do
  n=$((n + 1))
  echo "\$ $command"
  sh -c "$command"
  [ "$n" -ne 1 ] || show imported "$(basename "$3" .ovpn)"
done < "$2"
show modified "$(basename "$3" .ovpn)"
nmcli -g vpn.data connection show "$(basename "$3" .ovpn)"
"""


def missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount and network namespaces)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not PLUGIN.exists():
        absent.append("network-manager-openvpn")
    if absent:
        return f"missing {', '.join(absent)} (apt-get install --no-install-recommends network-manager-openvpn dbus)"
    return None


class NetworkManagerImportTests(BaseTestCase):
    def setUp(self):
        reason = missing_tools()
        if reason:
            if lab_required():
                pytest.fail(f"NetworkManager test required but unavailable: {reason}", pytrace=False)
            pytest.skip(reason)
        self.add_node("hong-kong", display_name="Hong Kong", public_address="203.0.113.20")
        Node.objects.filter(lan=self.lan).update(state=NodeState.READY)
        self.home = Path(tempfile.mkdtemp(prefix="lanhub-nm-"))
        self.addCleanup(shutil.rmtree, self.home, ignore_errors=True)

    def page_commands(self, client: Client) -> list[str]:
        page = client.get(reverse("players:player_home", args=[self.bob.token])).content.decode()
        block = re.search(r"<pre[^>]*data-nmcli[^>]*><code>(.*?)</code></pre>", page, re.S)
        self.assertIsNotNone(block, "the player page shows no nmcli steps")
        commands = [html.unescape(line).strip() for line in block.group(1).splitlines() if line.strip()]
        # The steps end with "nmcli connection up": that needs a reachable server, so it is left out here.
        self.assertTrue(commands[-1].startswith("nmcli connection up "), commands)
        return commands[:-1]

    def test_the_pages_nmcli_steps_import_the_profile_and_keep_the_default_route_off_the_vpn(self):
        client = Client()
        commands = self.page_commands(client)
        download = client.get(reverse("players:profile_download", args=[self.bob.token, "hong-kong"]))
        filename = re.search(r'filename="([^"]+)"', download["Content-Disposition"]).group(1)
        self.assertEqual(filename, "gamenight-bob-hong-kong.ovpn")
        self.assertEqual(commands[0], f"nmcli connection import type openvpn file {filename}")
        staged = self.home.parent / f"{self.home.name}-profile-dir"
        staged.mkdir()
        self.addCleanup(shutil.rmtree, staged, ignore_errors=True)
        (staged / filename).write_bytes(download.content)
        listing = self.home.parent / f"{self.home.name}-commands"
        listing.write_text("\n".join(commands) + "\n")
        self.addCleanup(listing.unlink)

        script = SCRIPT.format(private=" ".join(PRIVATE_DIRS))
        result = subprocess.run(
            ["unshare", "--mount", "--net", "--fork", "--kill-child", "sh", "-c", script, "nm-test",
             str(self.home), str(listing), str(staged / filename)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(self.home)})
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertIn(f"Connection '{filename[:-5]}'", output)  # named after the file, as the steps assume
        # As imported, the connection would take the default route: the problem the steps fix.
        self.assertIn("== imported: no no", output)
        self.assertIn("== modified: yes yes", output)
        # The plugin kept every server of the profile, in order, and checks the server certificate's name.
        self.assertIn("remote = 203.0.113.20:1194:udp", output.replace("\\", ""))
        self.assertIn("verify-x509-name = name-prefix:node-", output.replace("\\", ""))
