#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# Every default path comes from the configured prefix: configures scratch builds (no compile)
# with --prefix=/usr/local and /usr and checks the config path compiled in, and where the unit
# and the tmpfiles snippet would be installed.
# Usage: check-paths.sh SOURCE_DIR
set -eu
src=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0

check() { # what, path, expected
        case $2 in
        "$3") echo "ok: $1 = $2" ;;
        *) echo "FAIL: $1 = '$2', expected '$3'"; fail=1 ;;
        esac
}

# prefix, expected config, expected unit dir, expected tmpfiles dir
while read -r prefix config unitdir tmpfilesdir; do
        b=$tmp/build-$(echo "$prefix" | tr / _)
        if ! meson setup "$b" "$src" --prefix="$prefix" -Dtests=false -Dbench=false -Dman=disabled \
                -Dfuzz=false >"$tmp/setup.log" 2>&1; then
                cat "$tmp/setup.log"
                exit 1
        fi
        got=$(sed -n 's/^#define SHMZ_DEFAULT_CONFIG "\(.*\)"$/\1/p' "$b/config.h")
        check "config ($prefix)" "$got" "$config"
        installed=$(meson introspect --installed "$b")
        unit=$(printf '%s' "$installed" | python3 -c 'import json,sys; print(*[v for k,v in json.load(sys.stdin).items() if k.endswith("/shmzoned.service")])')
        check "unit ($prefix)" "$unit" "$unitdir/shmzoned.service"
        tmpf=$(printf '%s' "$installed" | python3 -c 'import json,sys; print(*[v for k,v in json.load(sys.stdin).items() if k.endswith("tmpfiles.d/shmzone.conf")])')
        check "tmpfiles ($prefix)" "$tmpf" "$tmpfilesdir/shmzone.conf"
done <<END
/usr/local /usr/local/etc/shmzone/shmzone.conf /usr/local/lib/systemd/system /usr/local/lib/tmpfiles.d
/usr /etc/shmzone/shmzone.conf /usr/lib/systemd/system /usr/lib/tmpfiles.d
END
exit $fail
