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
# The closing line counts test cases, not programs. meson 1.0's testlog.json keeps no
# per-case results, only each program's result and its output: a TAP program's cases are
# its "ok"/"not ok" lines (criterion's --tap; the harness's "# SKIP" when it cannot run),
# pytest's from its closing line, any other program counts as one case. A program that
# failed although none of its cases did (a leak found at exit, a timeout) is one failure more.
python3 - "$builddir/meson-logs/testlog.json" "$fuzz_results" "$system_results" "$checks_results" "$tsan_results" <<'PY' || { [ "$rc" -ne 0 ] || rc=1; }
import json, re, sys
synthesis = re.compile(r"Synthesis: Tested: (\d+) \| Passing: (\d+) \| Failing: (\d+)")
skipping = re.compile(r"^Skipping all (\d+) tests?: ", re.M)
tap = re.compile(r"^(not ok|ok)\b[^#\n]*(# *SKIP)?", re.M | re.I)
passed = failed = skipped = 0
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    r = json.loads(line)
    out = r.get("stdout") or ""
    ok = r.get("result") in ("OK", "EXPECTEDFAIL", "SKIP")
    cases = tap.findall(out)
    if not cases:
        # pytest: its closing line "= N passed, M failed, K skipped in Ts =".
        t = re.findall(r"^=+ (.*\d+ (?:passed|failed|errors?).*) in [\d.]+s.* =+$", out, re.M)
        n = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", t[-1])} if t else {}
        cases = [("ok", "")] * n.get("passed", 0) + [("not ok", "")] * (n.get("failed", 0) + n.get("error", 0) + n.get("errors", 0)) + [("ok", "SKIP")] * n.get("skipped", 0)
    if not cases:
        cases = [("ok", "SKIP" if r.get("result") == "SKIP" else "")] if ok else []
    f = sum(c[0] != "ok" for c in cases)
    skipped += sum(c[0] == "ok" and bool(c[1]) for c in cases)
    passed += sum(c[0] == "ok" and not c[1] for c in cases)
    failed += f + (not ok and f == 0)
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
