#!/usr/bin/env bash
# Runs the port stress (tests/stress/stress-ports.c) for a bounded time against
# a library and daemon built with ThreadSanitizer (clang, a clean build
# directory of its own), and prints a line per phase, "tsan <phase>: ok|FAILED",
# and "tsan reports: ok|FAILED" for what the sanitizer found in either process.
# Exits non-zero on any failure; the reports stay in the work directory named
# at the end.
#
#   TSAN_SECONDS   the stress's seconds (default 30)
#   BUILDDIR       build directory (default build-tsan; wiped first)
#   TSAN_WORKDIR   where the reports go (default: a new mktemp -d)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${TSAN_SECONDS:-30}
builddir=${BUILDDIR:-build-tsan}

scripts/deps.sh clang libclang-rt-14-dev

# Clean, so that no object of another configuration slips in; only the two programs the run needs are
# built. clang leaves the sanitizer runtime out of shared libraries (no -Wl,--no-undefined).
rm -rf "$builddir"
CC=clang CXX=clang++ meson setup "$builddir" -Db_sanitize=thread -Db_lundef=false -Dbench=false -Dman=disabled \
        -Dbuildtype=debugoptimized >/dev/null
meson compile -C "$builddir" tests/stress/stress-ports:executable daemon/shmzoned:executable >/dev/null

work=${TSAN_WORKDIR:-$(mktemp -d -t shmzone-tsan.XXXXXX)}
mkdir -p "$work"
rm -f "$work"/tsan.*
# Reports of both processes (the stress and the daemon it starts) go to files; exactly one known report
# class is suppressed, in tests/tsan.supp, with its reason.
export TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp log_path=$work/tsan halt_on_error=0 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
rc=0
SHMZONED="$builddir/daemon/shmzoned" "$builddir/tests/stress/stress-ports" "$seconds" >"$work/stress.log" 2>&1 || rc=$?
sed -n 's/^stress \([a-z]*\): /tsan \1: /p' "$work/stress.log"
reports=$(cat "$work"/tsan.* 2>/dev/null | grep -c '^WARNING: ThreadSanitizer' || true)
# Failed outside its phases' verdicts and the sanitizer's reports (it crashed, say): that counts too.
if [ "$rc" -ne 0 ] && ! grep -q '^stress [a-z]*: FAILED' "$work/stress.log" && [ "$reports" -eq 0 ]; then
        echo "tsan stress: FAILED (exit status $rc)"
        tail -n 20 "$work/stress.log" >&2
fi
if [ "$reports" -eq 0 ]; then
        echo "tsan reports: ok (0 reports)"
else
        echo "tsan reports: FAILED ($reports reports)"
        grep -h -A3 '^WARNING: ThreadSanitizer' "$work"/tsan.* | head -n 40 >&2
        rc=1
fi
echo "tsan: stress log and reports in $work"
exit $rc
