#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Builds the Debian packages (shmzoned, libshmzone0, libshmzone-dev) from this source tree:
# copies the tree (tracked and untracked-but-not-ignored files, no build dirs) to a temp dir,
# puts packaging/debian at ./debian there, runs dpkg-buildpackage -b -us -uc and collects the
# .debs, .changes and .buildinfo into OUTDIR (default: ./debs). Runs lintian unless --no-lintian.
# Installs debhelper, lintian and the Build-Depends if missing (needs root or sudo).
set -euo pipefail
lint=1
[ "${1:-}" = --no-lintian ] && { lint=0; shift; }
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/debs}" && cd "${1:-$src/debs}" && pwd)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
need=(dpkg-dev debhelper fakeroot lintian)
need+=($(sed -n '/^Build-Depends:/,/^[A-Z][^:]*:/p' "$src/packaging/debian/control" |
        sed '$d; s/^Build-Depends://; s/([^)]*)//g; s/,/ /g'))
missing=()
for p in "${need[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
        # A virtual package (dh-sequence-nginx) is there when an installed package provides it.
        dpkg-query -W -f='${Status} ${Provides}\n' 2>/dev/null | grep "^install ok installed" |
                grep -qE "(^| |,)$p( |,|$)" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/shmzone"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$src" ls-files -z --cached --others --exclude-standard |
                (cd "$src" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
                tar -C "$src" --null -T - -cf - | tar -C "$tmp/shmzone" -xf -
else
        tar -C "$src" --exclude='./build*' --exclude=./debs -cf - . | tar -C "$tmp/shmzone" -xf -
fi
rm -rf "$tmp/shmzone/debian"
cp -a "$tmp/shmzone/packaging/debian" "$tmp/shmzone/debian"
(cd "$tmp/shmzone" && dpkg-buildpackage -b -us -uc)
cp "$tmp"/*.deb "$tmp"/*.changes "$tmp"/*.buildinfo "$out"/
if [ $lint -eq 1 ]; then
        lintian --fail-on error "$tmp"/*.changes
fi
ls -1 "$out"
