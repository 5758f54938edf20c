#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds with warnings as errors
# under AddressSanitizer and UndefinedBehaviorSanitizer, runs every test.
# Needs root: tests mount FUSE views and switch to other uids (without root or
# /dev/fuse those tests are skipped, exit status 77).
#
# FUZZ_SECONDS=N (CI sets 20) also runs every libFuzzer target for N seconds
# on a clean clang build (scripts/fuzz.sh) first; each target counts as a case.
#
# scripts/checks.sh first (CHECKS=none leaves it out): clang-format, a clang -Werror build
# of the whole tree, clang's static analyzer and an arm64 cross-build, each a case.
# TSAN_SECONDS=N (default 20; 0 leaves it out) runs the port stress for N seconds
# against a library and daemon built with ThreadSanitizer (scripts/tsan.sh); each
# of its phases, and the sanitizer's reports, count as a case.
#
# Then the system test (tests/system/test-system.sh): builds the Debian packages,
# installs them in a container booted with systemd and drives the service; each
# of its checks counts as a case. SYSTEM_TEST=0 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
fuzz_results=$(mktemp)
system_results=$(mktemp)
checks_results=$(mktemp)
tsan_results=$(mktemp)
trap 'rm -f "$fuzz_results" "$system_results" "$checks_results" "$tsan_results"' EXIT
if [ "${CHECKS:-}" != none ]; then
        # Failed before any check ran (its dependencies, say): that counts too.
        scripts/checks.sh | tee "$checks_results" || grep -q ': FAILED' "$checks_results" ||
                echo "check checks.sh: FAILED" >>"$checks_results"
fi
if [ "${FUZZ_SECONDS:-0}" -gt 0 ]; then
        frc=0
        FUZZ_SECONDS=$FUZZ_SECONDS scripts/fuzz.sh | tee "$fuzz_results" || frc=$?
        # Failed before any target ran (the clang build, say): that counts too.
        if [ "$frc" -ne 0 ] && ! grep -q ': FAILED' "$fuzz_results"; then
                echo "fuzz build: FAILED" >>"$fuzz_results"
        fi
fi
if [ "${TSAN_SECONDS:-20}" -gt 0 ]; then
        trc=0
        TSAN_SECONDS=${TSAN_SECONDS:-20} BUILDDIR=build-tsan scripts/tsan.sh | tee "$tsan_results" || trc=$?
        if [ "$trc" -ne 0 ] && ! grep -q ': FAILED' "$tsan_results"; then
                echo "tsan build: FAILED" >>"$tsan_results"
        fi
fi
builddir=${BUILDDIR:-build-test}
if [ -d "$builddir" ]; then
        meson setup --reconfigure "$builddir" --native-file build-dev.ini >/dev/null
else
        meson setup "$builddir" --native-file build-dev.ini
fi
meson compile -C "$builddir"
rc=0
# Suite 'system' (registered only without sanitizers) runs below, once.
meson test -C "$builddir" --print-errorlogs --num-processes 2 --no-suite system "$@" || rc=$?
if [ "${SYSTEM_TEST:-1}" != 0 ]; then
        # Its exit status rides along as a last line: the pipe to tee would hide it.
        { tests/system/test-system.sh "$PWD" 2>&1 || echo "system-test exit $?"; } | tee "$system_results"
fi
# The closing line counts test cases, not programs: a criterion program's cases
# from its own synthesis line, a program that exited 77 (SKIP) from its line
# "Skipping all N tests: ..." (tests/integration/harness.c), any other program
# as one case.
python3 - "$builddir/meson-logs/testlog.json" "$fuzz_results" "$system_results" "$checks_results" "$tsan_results" <<'PY' || { [ "$rc" -ne 0 ] || rc=1; }
import json, re, sys
synthesis = re.compile(r"Synthesis: Tested: (\d+) \| Passing: (\d+) \| Failing: (\d+)")
skipping = re.compile(r"^Skipping all (\d+) tests?: ", re.M)
colour = re.compile(r"\x1b\[[0-9;]*m")
passed = failed = skipped = 0
for line in open(sys.argv[1]):
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    out = colour.sub("", (r.get("stdout") or "") + (r.get("stderr") or ""))
    result = r.get("result")
    ok = result in ("OK", "EXPECTEDFAIL")
    if result == "SKIP":
        m = skipping.search(out)
        skipped += int(m.group(1)) if m else 1
        continue
    # pytest: its closing line "= N passed, M failed, K skipped in Ts =" counts its cases.
    t = re.findall(r"^=+ (.*\d+ (?:passed|failed|errors?).*) in [\d.]+s.* =+$", out, re.M)
    if t and not synthesis.search(out):
        n = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", t[-1])}
        passed += n.get("passed", 0)
        failed += n.get("failed", 0) + n.get("error", 0) + n.get("errors", 0)
        skipped += n.get("skipped", 0)
        failed += not ok and n.get("failed", 0) + n.get("error", 0) + n.get("errors", 0) == 0
        continue
    m = synthesis.findall(out)
    if m:
        _, p, f = map(int, m[-1])
        passed += p
        failed += f
        # Failed outside its cases (a leak found at exit): one failure more.
        failed += not ok and f == 0
    else:
        # Not criterion, or killed before its synthesis (a timeout): one case.
        passed += ok
        failed += not ok
# scripts/fuzz.sh: "fuzz <target>: ok (...)" or "fuzz <target>: FAILED";
# scripts/checks.sh: "check <name>: ok" or "check <name>: FAILED";
# scripts/tsan.sh: "tsan <phase>: ok (...)" or "tsan <phase>: FAILED (...)".
for path, word in ((sys.argv[2], "fuzz"), (sys.argv[4], "check"), (sys.argv[5], "tsan")):
    for line in open(path):
        m = re.match(word + r" \S+: (ok|FAILED)", line)
        if m:
            passed += m.group(1) == "ok"
            failed += m.group(1) == "FAILED"
# tests/system/test-system.sh: its synthesis, or "Skipping all N tests: ..." when it exited 77;
# "system-test exit N" when it failed (a failure outside its checks counts as one more).
out = open(sys.argv[3]).read()
status = re.search(r"^system-test exit (\d+)$", out, re.M)
status = int(status.group(1)) if status else 0
m = synthesis.findall(out)
if status == 77:
    m = skipping.search(out)
    skipped += int(m.group(1)) if m else 1
elif m:
    _, p, f = map(int, m[-1])
    passed += p
    failed += f + (status != 0 and f == 0)
elif out.strip():
    passed += status == 0
    failed += status != 0
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(1 if failed else 0)
PY
exit $rc
