#!/usr/bin/env bash
# Fuzzes every libFuzzer target (tests/fuzz/) for a bounded time: installs clang
# and libFuzzer if missing, builds them from a clean build directory, runs each
# over a copy of its seed corpus (the in-tree corpus never grows), and prints a
# line per target. Exits non-zero if any target found something; its crash
# input and log stay in the work directory named at the end.
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   BUILDDIR       build directory (default build-fuzz; wiped first)
#   FUZZ_TARGETS   targets to run (default: all)
#   FUZZ_WORKDIR   where corpora, crashes and logs go (default: a new mktemp -d)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
builddir=${BUILDDIR:-build-fuzz}
targets=${FUZZ_TARGETS:-fuzz-control fuzz-config fuzz-slab fuzz-port}

# Build dependencies, and the compiler with libFuzzer.
scripts/deps.sh clang libclang-rt-14-dev

# Clean, so that no object of another configuration (gcc, no coverage) slips in.
# The test suite and benchmarks are not needed; sanitizers for every language and
# no -Wl,--no-undefined (clang leaves their runtimes out of shared libraries).
rm -rf "$builddir"
CC=clang CXX=clang++ meson setup "$builddir" -Dfuzz=true -Dtests=false -Dbench=false -Dman=disabled \
        -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debugoptimized >/dev/null
meson compile -C "$builddir" >/dev/null

work=${FUZZ_WORKDIR:-$(mktemp -d -t shmzone-fuzz.XXXXXX)}
mkdir -p "$work"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# One target over a copy of its seeds; its output goes to $work/$t/log.
run_target() {
        local t=$1 bin="$builddir/tests/fuzz/$1"
        local corpus="$work/$t/corpus" artifacts="$work/$t/crashes" log="$work/$t/log"

        rm -rf "${work:?}/$t"
        mkdir -p "$corpus" "$artifacts"
        if [ ! -x "$bin" ] || [ ! -d "tests/fuzz/corpus/$t" ]; then
                echo "no fuzz target $t (or no tests/fuzz/corpus/$t)" >"$log"
                return 1
        fi
        cp tests/fuzz/corpus/"$t"/* "$corpus"/ || return 1
        "$bin" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
                -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
}

rc=0
for t in $targets; do
        log="$work/$t/log"
        if run_target "$t"; then
                execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
                echo "fuzz $t: ok (${execs:-?} execs)"
        else
                echo "fuzz $t: FAILED"
                # What was found, and where its input is.
                grep -m1 -E "ERROR: |runtime error|does not hold|no fuzz target" "$log" >&2 || tail -n 5 "$log" >&2
                ls "$work/$t/crashes"/* >&2 2>/dev/null || true
                rc=1
        fi
done
echo "fuzz: logs, corpora and crash inputs in $work"
exit $rc
