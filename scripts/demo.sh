#!/usr/bin/env bash
# Builds shmzoned and runs it in the foreground with the shipped configuration
# (a "demo" zone), its socket and FUSE view in the default places. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
[ -d build ] || meson setup build
meson compile -C build
exec build/daemon/shmzoned --config packaging/shmzone.conf "$@"
