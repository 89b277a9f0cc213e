#!/usr/bin/env bash
# Set up everything LanHub needs on a Debian/Ubuntu machine: system packages, .venv, Python packages.
# Usage: scripts/bootstrap.sh run|test   ("test" adds what the test suite needs: sshd, iptables, nftables, easy-rsa, chromium,
#        and for the VM hosts QEMU, debootstrap and apt-cacher-ng)
set -euo pipefail
cd "$(dirname "$0")/.."

purpose="${1:-run}"
packages=(redis-server openvpn openssh-client python3-venv iproute2 iputils-ping)
if [ "$purpose" = test ]; then
  # fonts-wqy-microhei: the browser tests type names such as "杭州"; without a CJK font chromium draws boxes.
  packages+=(openssh-server sudo iptables nftables easy-rsa openssl socat chromium fonts-wqy-microhei)
  packages+=(qemu-system-x86 qemu-utils debootstrap e2fsprogs apt-cacher-ng)  # the lab's VM hosts (lab/vm.py)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "==> Installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" apt-cacher-ng "* ]]; then
      # The package starts a proxy for every address on port 3142; the lab runs its own, bound to the lab side.
      if [ -d /run/systemd/system ]; then systemctl disable --now apt-cacher-ng >/dev/null 2>&1 || true
      else service apt-cacher-ng stop >/dev/null 2>&1 || true; fi
    fi
  else
    echo "LanHub needs these system packages: ${missing[*]}" >&2
    echo "Install them with:  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# NetworkManager with its OpenVPN plugin, for the test that imports a player's profile the way the player page says
# (tests/players/test_networkmanager.py runs its own NetworkManager in private namespaces). Installed without
# letting the package start a NetworkManager on this machine (a policy-rc.d for the install, the unit disabled
# after): it must never take over the host's own network.
if [ "$purpose" = test ] && ! dpkg-query -W -f='${Status}' network-manager-openvpn 2>/dev/null | grep -q "install ok installed"; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "==> Installing network-manager-openvpn (not started)"
    policy=/usr/sbin/policy-rc.d; own_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends network-manager-openvpn dbus \
      >/dev/null || true
    [ "$own_policy" = 1 ] && rm -f "$policy"
    if [ -d /run/systemd/system ]; then systemctl disable NetworkManager >/dev/null 2>&1 || true; fi
  else
    echo "The NetworkManager test needs: sudo apt-get install --no-install-recommends network-manager-openvpn" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> Creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> Installing Python packages"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
mkdir -p var
