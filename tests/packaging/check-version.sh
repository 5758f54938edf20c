#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# One version: what the Debian changelog says (the packages' version) is what shmzoned, shmzctl
# and shmzone.pc say.
# Usage: check-version.sh SOURCE_DIR BUILD_DIR SHMZONED SHMZCTL
set -eu
src=$1 build=$2 daemon=$3 ctl=$4
if command -v dpkg-parsechangelog >/dev/null; then
        want=$(dpkg-parsechangelog -l "$src/packaging/debian/changelog" -S Version)
else
        want=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$src/packaging/debian/changelog")
fi
# Native packages have no revision, and no epoch is used.
want=${want#*:}
fail=0
check() {
        if [ "$2" = "$3" ]; then
                echo "ok: $1 says $2"
        else
                echo "FAIL: $1 says '$2', the changelog '$3'"
                fail=1
        fi
}
check "shmzoned --version" "$("$daemon" --version)" "shmzoned $want"
check "shmzctl --version" "$("$ctl" --version)" "shmzctl $want"
check shmzone.pc "$(sed -n 's/^Version: //p' "$build/meson-private/shmzone.pc")" "$want"
exit $fail
