#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# An external program builds against the installed -dev files: meson install --destdir
# into a temp dir, then pkg-config (sysroot'd into it) + cc -std=c99 -pedantic, link, run.
# Usage: check-pkgconfig.sh BUILD_DIR
set -eu
build=$1
command -v pkg-config >/dev/null 2>&1 || { echo "no pkg-config: skip"; exit 77; }
CC=${CC:-cc}
command -v "$CC" >/dev/null 2>&1 || { echo "no C compiler: skip"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dest=$tmp/root
meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >"$tmp/install.log" 2>&1 ||
        { cat "$tmp/install.log"; exit 1; }
pcfile=$(find "$dest" -name shmzone.pc | head -n1)
[ -n "$pcfile" ] || { echo "shmzone.pc not installed"; exit 1; }
export PKG_CONFIG_SYSROOT_DIR="$dest" PKG_CONFIG_PATH="$(dirname "$pcfile")" PKG_CONFIG_LIBDIR="$(dirname "$pcfile")"
flags=$(pkg-config --cflags --libs shmzone)
cat >"$tmp/prog.c" <<'C'
#include <shmzone.h>
#include <stdio.h>
int main(void)
{
        struct shmz_client *c = NULL;
        int r = shmz_connect("/nonexistent/shmzone.sock", &c);
        if (r >= 0) {
                fprintf(stderr, "shmz_connect succeeded on a missing socket\n");
                return 1;
        }
        shmz_disconnect(NULL);
        printf("shmz_connect: %d\n", r);
        return 0;
}
C
libdir=$(dirname "$(dirname "$pcfile")")
# A sanitized build installs a sanitized library: its users must link the runtimes first.
san=""
if readelf -d "$libdir"/libshmzone.so.0 2>/dev/null | grep -q 'libasan'; then
        san="-fsanitize=address,undefined"
fi
# shellcheck disable=SC2086
"$CC" -std=c99 -pedantic -Wall -Wextra -Werror $san -o "$tmp/prog" "$tmp/prog.c" $flags
LD_LIBRARY_PATH="$libdir" "$tmp/prog"
