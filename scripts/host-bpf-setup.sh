#!/bin/bash
# Host set-up so BCC can compile tracepoint programs on this machine (test and
# CI hosts; not product behaviour — the product only detects what is missing,
# says so in `cnisup check`, and falls back to proc-poll).
#
# Idempotent, as root:
#   1. linux-headers-amd64 installed (BCC compiles against kernel headers at
#      run time);
#   2. /lib/modules/$(uname -r)/build (and source) pointing at headers: when the
#      running kernel has no headers package of its own (a custom or VM kernel),
#      link the newest installed Debian headers. Our programs read only
#      tracepoint arguments, so headers of a nearby version are good enough;
#   3. tracefs mounted at /sys/kernel/tracing (BCC finds tracepoints there).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "host-bpf-setup: needs root" >&2
  exit 1
fi

if ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed"; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends linux-headers-amd64
fi

release="$(uname -r)"
moddir="/lib/modules/$release"
if [ ! -e "$moddir/build/include" ]; then
  # Prefer the headers of exactly this kernel, else the newest -amd64 ones.
  amd64=""
  if [ -d "/usr/src/linux-headers-$release" ]; then
    amd64="/usr/src/linux-headers-$release"
  else
    amd64="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  if [ -z "$amd64" ]; then
    echo "host-bpf-setup: no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64" >&2
    exit 1
  fi
  common="${amd64%-amd64}-common"
  mkdir -p "$moddir"
  ln -sfn "$amd64" "$moddir/build"
  if [ -d "$common" ]; then
    ln -sfn "$common" "$moddir/source"
  fi
  echo "host-bpf-setup: $moddir/build -> $amd64 (running kernel $release has no headers package)"
fi

if ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing
  echo "host-bpf-setup: mounted tracefs at /sys/kernel/tracing"
fi
