#!/bin/sh
# The shared library exports exactly the symbols of libshmzone.sym, all shmz_*, all versioned.
set -eu
lib=$1
map=$2
debsyms=${3:-}
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRV]$/ {print $3}' | grep -v '^SHMZONE_' | sed 's/@.*//' | sort)
listed=$(sed -n 's/^[[:space:]]*\(shmz_[a-z0-9_]*\);.*/\1/p' "$map" | sort)
# Fails, showing how two sorted lists differ, unless they are the same.
same_or_die() {
        [ "$2" = "$3" ] && return 0
        echo "$1 differ:"
        diff -u /dev/fd/3 /dev/fd/4 3<<E 4<<L || true
$2
E
$3
L
        exit 1
}
same_or_die "listed and exported symbols" "$listed" "$exported"
# Every export carries one of the map's version nodes (SHMZONE_0.1, SHMZONE_0.2, ...).
nodes=$(sed -n 's/^\(SHMZONE_[0-9.]*\)[[:space:]]*{.*/\1/p' "$map" | sed 's/\./\\./g' | paste -sd'|')
bad=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBR]$/ {print $3}' | grep -Ev "@@($nodes)\$" | grep -v '^SHMZONE_' || true)
[ -z "$bad" ] || { echo "unversioned exports: $bad"; exit 1; }
# The Debian symbols file names each export with its version node (dpkg-gensymbols fails the build otherwise).
if [ -n "$debsyms" ]; then
        versioned=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBR]$/ {print $3}' | grep -v '^SHMZONE_' |
                sed 's/@@/@/' | sort)
        packaged=$(sed -n 's/^ \(shmz_[a-z0-9_]*@SHMZONE_[0-9.]*\) .*/\1/p' "$debsyms" | sort)
        same_or_die "$debsyms and the exported symbols" "$packaged" "$versioned"
fi
echo "$(echo "$exported" | wc -l) symbols, all listed and versioned"
