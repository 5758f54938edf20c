#!/usr/bin/env bash
# Prints the path of a promtool (Prometheus's checker of the metrics text format), fetching it first
# if need be: the one on PATH, else the one unpacked from Debian's prometheus package into a cache.
# The package is never installed: that would start a Prometheus server. Exit 1 if there is none.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
        command -v promtool
        exit 0
fi
dir="${SHMZONE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shmzone}/prometheus"
if [ ! -x "$dir/usr/bin/promtool" ]; then
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        # apt-get download writes into the current directory; its lists may need a refresh on a fresh machine.
        if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
                [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 || true
                (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || {
                        echo "promtool.sh: cannot download Debian's prometheus package" >&2
                        exit 1
                }
        fi
        mkdir -p "$(dirname "$dir")"
        new=$(mktemp -d "$dir.XXXXXX")
        dpkg-deb -x "$tmp"/prometheus_*.deb "$new"
        # Only promtool is kept. Unpacked aside and renamed: a caller racing this one finds it whole or not at all.
        rm -f "$new/usr/bin/prometheus"
        mv -T "$new" "$dir" 2>/dev/null || rm -rf "$new"
fi
echo "$dir/usr/bin/promtool"
