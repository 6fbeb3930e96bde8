#!/usr/bin/env bash
# Installs the Debian packages flowprobe's tests and demo use, only those missing.
# Idempotent and quiet when everything is there, so `make test` can always call it.
set -euo pipefail

# binary -> package
declare -A NEED=(
  [tshark]=tshark
  [dumpcap]=tshark
  [ip]=iproute2
  [ss]=iproute2
  [redis-server]=redis-server
  [pg_ctlcluster]=postgresql
  [mariadbd]=mariadb-server
  [nft]=nftables
  [prometheus]=prometheus
  [openssl]=openssl
  [capinfos]=tshark
  [nginx]=nginx-light
  [h2load]=nghttp2-client
  [tcpdump]=tcpdump
  [gcc]=gcc
)
missing=()
for bin in "${!NEED[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${NEED[$bin]}")
done
# libmodsecurity3 + CRS have no binary to look for.
dpkg -s libmodsecurity3 modsecurity-crs >/dev/null 2>&1 || missing+=(libmodsecurity3 modsecurity-crs)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing Debian packages: ${pkgs[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "need root to apt-get install ${pkgs[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The services must not start at install time: tests start their own instances.
[ -e /usr/sbin/policy-rc.d ] || { printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; }
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
