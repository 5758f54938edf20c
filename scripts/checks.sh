#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The checks beside the test suite, each a line "check NAME: ok" or "check NAME: FAILED"
# (scripts/test.sh counts them as cases); exits non-zero if any failed. Each build is made
# once, from a clean directory:
#   clang-format  every tracked C source is formatted as .clang-format says
#   clang         the whole tree (tests and benchmarks too) with clang and -Werror
#   scan-build    clang's static analyzer over the daemon, the library and the tools
#   arm64         a -Werror cross-build for arm64 (Debian's cross gcc, multiarch -dev packages;
#                 the Python and nginx modules need the host's python3-dev and nginx-dev, not built)
# CHECKS=... picks some; CHECKS_DIR (default: a new mktemp -d) keeps the builds and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
checks=${CHECKS:-clang-format clang scan-build arm64}
dir=${CHECKS_DIR:-$(mktemp -d -t shmzone-checks.XXXXXX)}
mkdir -p "$dir"

need=(clang clang-tools-14 clang-format)
case " $checks " in *" arm64 "*)
        # Multiarch: the arm64 -dev packages install beside the host's.
        dpkg --print-foreign-architectures | grep -qx arm64 ||
                { [ "$(id -u)" -eq 0 ] && dpkg --add-architecture arm64 && apt-get update -qq; }
        need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross libfuse3-dev:arm64 libsystemd-dev:arm64
                libinih-dev:arm64 libjson-c-dev:arm64 libmount-dev:arm64)
        ;;
esac
scripts/deps.sh "${need[@]}" >"$dir/deps.log" 2>&1 || { cat "$dir/deps.log"; echo "check deps: FAILED"; exit 1; }

rc=0
run() {
        local name=$1
        shift
        rm -rf "${dir:?}/build-$name"
        if "$@" >"$dir/$name.log" 2>&1; then
                echo "check $name: ok"
        else
                echo "check $name: FAILED"
                tail -n 40 "$dir/$name.log"
                rc=1
        fi
}

check_clang_format() {
        git ls-files -z '*.c' '*.h' '*.cpp' | xargs -0 clang-format --dry-run --Werror
}
check_clang() {
        CC=clang CXX=clang++ meson setup "$dir/build-clang" -Dwerror=true -Dman=disabled &&
                meson compile -C "$dir/build-clang"
}
# scan-build puts its compiler wrapper in CC for the setup, and collects the reports of
# the build; --status-bugs: a report fails the check. unix.Malloc is off: clang 14's analyzer
# does not run __attribute__((cleanup)), so every _cleanup_free_ reads as a leak to it, and it
# loses track of a list's head once an element is unlinked and freed in a callee (the
# daemon's and the view's teardown loops); ASan and LSan check both in the test suite.
check_scan_build() {
        scan-build-14 -o "$dir/scan-report" meson setup "$dir/build-scan" -Dtests=false -Dbench=false \
                -Dman=disabled &&
                grep -q ccc-analyzer "$dir/build-scan/meson-logs/meson-log.txt" &&
                scan-build-14 --status-bugs -disable-checker unix.Malloc -o "$dir/scan-report" ninja -C "$dir/build-scan"
}
check_arm64() {
        meson setup "$dir/build-arm64" --cross-file scripts/cross/arm64.ini -Dwerror=true \
                -Dtests=false -Dbench=false -Dman=disabled -Dpython=disabled -Dnginx=disabled &&
                meson compile -C "$dir/build-arm64" &&
                readelf -h "$dir/build-arm64/daemon/shmzoned" | grep -q 'AArch64'
}

for c in $checks; do
        run "$c" "check_${c//-/_}"
done
echo "checks: builds and logs in $dir"
exit $rc
