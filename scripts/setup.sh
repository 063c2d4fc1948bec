#!/bin/bash
# Idempotent set-up for a Debian 12 machine: apt packages, a virtualenv made
# from the system Python (so Debian's python3-bpfcc is importable), the project.
# Safe to run again: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
STAMP="$VENV/.setup-stamp"

APT_PACKAGES=(
  python3 python3-venv python3-dev
  python3-zmq python3-click python3-tenacity python3-yaml python3-jsonschema
  python3-pyroute2 python3-kubernetes python3-bpfcc
  containernetworking-plugins iproute2 strace procps
  openssl
  linux-headers-amd64
  python3-matplotlib
  debootstrap systemd-container  # tests/packaging/test_nspawn.py: the unit under a real systemd
  python3-nacl nats-server
  gcc libc6-dev
  podman runc
  mandoc groff-base  # tests/packaging/test_manpage.py: the man page lints clean
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing apt packages: ${need_apt[*]} (run as root, or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The running kernel may have no headers package: that is host set-up for
# BCC, done only if the kernel family will be exercised (see README).
if [ "$(id -u)" -eq 0 ] && [ -x scripts/host-bpf-setup.sh ]; then
  scripts/host-bpf-setup.sh || echo "setup: BPF host set-up incomplete; the kernel family will use its fallback" >&2
fi

# Unprivileged workers (nobody/cnisup) run this checkout's code: every
# directory above it must be searchable by them (a `mktemp -d` parent is
# 0700). Only the search bit is added, never read; `cnisup check` reports it
# when it is missing on a real install.
if [ "$(id -u)" -eq 0 ]; then
  dir="$(pwd -P)"
  while [ "$dir" != "/" ]; do
    if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
      chmod o+x "$dir" && echo "setup: made $dir searchable for the unprivileged workers" >&2
    fi
    dir="$(dirname "$dir")"
  done
fi

if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
# Re-install only when the project metadata changed.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$STAMP"
fi
