#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds with warnings as errors
# under AddressSanitizer and UndefinedBehaviorSanitizer, runs every test.
# Needs root: tests mount FUSE views and switch to other uids.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
builddir=${BUILDDIR:-build-test}
if [ -d "$builddir" ]; then
        meson setup --reconfigure "$builddir" --native-file build-dev.ini >/dev/null
else
        meson setup "$builddir" --native-file build-dev.ini
fi
meson compile -C "$builddir"
rc=0
meson test -C "$builddir" --print-errorlogs --num-processes 2 "$@" || rc=$?
python3 - "$builddir/meson-logs/testlog.json" <<'PY'
import json, sys
passed = failed = 0
for line in open(sys.argv[1]):
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    if r.get("result") in ("OK", "EXPECTEDFAIL", "SKIP"):
        passed += r.get("result") != "SKIP"
    else:
        failed += 1
print(f"{passed} passed, {failed} failed")
PY
exit $rc
