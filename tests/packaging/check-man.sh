#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# Every exported function has a man page under its own name once installed (a page, or a
# symlink to its family's page), and that page's NAME line names it.
# Usage: check-man.sh BUILD_DIR SYMBOL_MAP
set -eu
build=$1
map=$2
command -v scdoc >/dev/null 2>&1 || { echo "no scdoc, no man pages: skip"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
meson install -C "$build" --destdir "$tmp/root" --no-rebuild --quiet >"$tmp/install.log" 2>&1 ||
        { cat "$tmp/install.log"; exit 1; }
man3=$(find "$tmp/root" -type d -path '*/man/man3' | head -n1)
[ -n "$man3" ] || { echo "no man3 directory installed"; exit 1; }
bad=0
n=0
for sym in $(sed -n 's/^[[:space:]]*\(shmz_[a-z0-9_]*\);.*/\1/p' "$map"); do
        n=$((n + 1))
        page=$man3/$sym.3
        if [ ! -f "$page" ]; then
                echo "no man page for $sym(3)"
                bad=1
                continue
        fi
        # The first text line after .SH NAME: "name, name, ... - what they do".
        names=$(awk '/^\.SH NAME/ { f = 1; next } f && !/^\./ { print; exit }' "$page")
        if ! printf '%s\n' "$names" | grep -Eq "(^|[ ,])$sym(,| )"; then
                echo "$sym.3 -> $(readlink "$page" || echo "$page"): NAME does not name $sym"
                bad=1
        fi
done
[ "$bad" = 0 ] || exit 1
echo "$n functions, each with its man page"
