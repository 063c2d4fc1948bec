#!/bin/bash
# Build dist/cnisup_<version>_<arch>.deb from this checkout (`make deb`).
#
# Installs the build dependencies (debian/control's Build-Depends, and
# lintian) with apt when they are missing; copies the checkout's files (what
# git tracks plus untracked files it does not ignore, so no .venv, build/ or
# dist/) into a temporary tree with debian/ at its top; runs
# dpkg-buildpackage there; copies the .deb to $DIST; runs lintian on it.
# Prints the .deb's path as its last line of standard output.
#
# Environment: DIST (default: dist/ at the top of the checkout), LINTIAN=0 to
# skip lintian, KEEP_BUILD_TREE=1 to keep the temporary tree.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
DIST=${DIST:-$TOP/dist}
LINTIAN=${LINTIAN:-1}
KEEP_BUILD_TREE=${KEEP_BUILD_TREE:-0}
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYTHONSTARTUP

say() { echo "deb: $*" >&2; }

# -- build dependencies (idempotent: apt runs only when something is missing) --
apt_updated=0
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        say "missing build dependencies: $* (run as root, or install them)"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >&2
}
missing=()
for tool in dpkg-buildpackage:dpkg-dev make:make; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ "$LINTIAN" = 1 ] && ! command -v lintian >/dev/null; then
    missing+=(lintian)
fi
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi
if ! dpkg-checkbuilddeps "$HERE/debian/control" 2>/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        dpkg-checkbuilddeps "$HERE/debian/control" || true
        say "missing build dependencies (run as root, or install them)"
        exit 1
    fi
    say "installing build dependencies"
    [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq "$HERE" >&2
fi

# -- version: pyproject.toml's, in Debian's syntax (1.2.0rc1 -> 1.2.0~rc1) ----
PY_VERSION=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$TOP/pyproject.toml")
VERSION=$(printf '%s' "$PY_VERSION" | sed -E 's/\.?(a|b|rc|dev)([0-9]*)/~\1\2/g; s/\+/+local/')

# -- the build tree ---------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cnisup-deb.XXXXXX")
cleanup() {
    if [ "$KEEP_BUILD_TREE" = 1 ]; then say "build tree kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
SRC="$WORK/cnisup-$VERSION"
mkdir -p "$SRC"
git_() { git -c safe.directory="$TOP" -C "$TOP" "$@"; }
if command -v git >/dev/null && git_ rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$TOP" && git_ ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done \
        | sort -zu | tar --null --no-recursion -T - -cf -) | tar -xf - -C "$SRC"
else
    # Not a git checkout (an unpacked tarball): everything but dot-files,
    # build products and caches.
    tar -C "$TOP" --exclude='./.*' --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC"
fi
cp -a "$SRC/packaging/deb/debian" "$SRC/debian"

# debian/changelog names the version; a pyproject.toml bumped without a
# changelog entry still builds, with an entry that says so.
CHANGELOG_VERSION=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -S Version)
if [ "$CHANGELOG_VERSION" != "$VERSION" ]; then
    say "debian/changelog is at $CHANGELOG_VERSION, pyproject.toml at $PY_VERSION: adding an entry for $VERSION"
    MAINT=$(sed -n 's/^Maintainer: //p' "$SRC/debian/control")
    { printf 'cnisup (%s) unstable; urgency=medium\n\n' "$VERSION"
      printf '  * Built from pyproject.toml version %s.\n\n' "$PY_VERSION"
      printf ' -- %s  %s\n\n' "$MAINT" "$(date -R)"
      cat "$SRC/debian/changelog"; } > "$SRC/debian/changelog.new"
    mv "$SRC/debian/changelog.new" "$SRC/debian/changelog"
fi

# -- build ------------------------------------------------------------------------
say "building cnisup $VERSION in $SRC"
start=$(date +%s)
(cd "$SRC" && dpkg-buildpackage -b -us -uc) >&2
ARCH=$(dpkg-architecture -qDEB_HOST_ARCH 2>/dev/null)
DEB="cnisup_${VERSION}_${ARCH}.deb"
mkdir -p "$DIST"
cp "$WORK/$DEB" "$DIST/$DEB"
say "built $DIST/$DEB ($(du -k "$DIST/$DEB" | cut -f1) KiB) in $(($(date +%s) - start)) s"

if [ "$LINTIAN" = 1 ]; then
    say "lintian $DEB"
    lintian --info --fail-on error "$DIST/$DEB" >&2
fi
echo "$DIST/$DEB"
