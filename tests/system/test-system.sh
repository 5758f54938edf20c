#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# System test: boots systemd as PID 1 in fresh mount/pid/uts namespaces over a throwaway
# overlay of /, installs the build there, and drives shmzoned.socket/.service with systemctl:
# restart (and a crash restarted by Restart=on-failure) keeps zones (mount, library, an attached
# client's mapping), reload adds a zone,
# stop leaves no FUSE mount, the journal has the log with priorities.
# Never boots systemd on the host. Usage: test-system.sh BUILD_DIR SOURCE_DIR [CONFIG]. Exit 77: skipped.
set -u
BUILD=$(realpath "${1:?build dir}")
SRC=$(realpath "${2:?source dir}")
CONF=${3:-/etc/shmzone/shmzone.conf}
[ "$(id -u)" = 0 ] || { echo "skip: not root"; exit 77; }
for t in unshare nsenter systemctl cc meson; do
        command -v $t >/dev/null || { echo "skip: no $t"; exit 77; }
done
[ -x /lib/systemd/systemd ] || { echo "skip: no systemd"; exit 77; }
[ -c /dev/fuse ] || { echo "skip: no /dev/fuse"; exit 77; }

T=$(mktemp -d /tmp/shmz-system.XXXXXX)
UPID=
cleanup() {
        local p
        if [ -n "$UPID" ]; then
                p=$(cat /proc/$UPID/task/$UPID/children 2>/dev/null)
                [ -n "$p" ] && kill -KILL $p 2>/dev/null
                kill -KILL $UPID 2>/dev/null
                wait $UPID 2>/dev/null
        fi
        # Every mount was made inside the namespace, and goes with it.
        rm -rf "$T"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; echo "--- container log"; tail -n 40 "$T/boot.log" 2>/dev/null; exit 1; }

# The helper: attaches to a zone with the library and checks/writes patterns.
cat > "$T/client.c" <<'C'
#include <shmzone.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
        /* client SOCKET ZONE hold DIR | client SOCKET ZONE check OFFSET STRING */
        struct shmz_client *c; struct shmz_zone *z; char *b; int r;
        if ((r = shmz_connect(argv[1], &c)) < 0) { fprintf(stderr, "connect: %s\n", strerror(-r)); return 1; }
        if ((r = shmz_zone_open(c, argv[2], 0, NULL, 0, &z)) < 0) { fprintf(stderr, "open: %s\n", strerror(-r)); return 1; }
        b = shmz_zone_base(z);
        if (strcmp(argv[3], "check") == 0) {
                size_t off = strtoul(argv[4], NULL, 0);
                if (memcmp(b + off, argv[5], strlen(argv[5])) != 0) { fprintf(stderr, "check: mismatch\n"); return 1; }
                return 0;
        }
        memcpy(b, "PATTERN-A", 9);
        char p[512]; snprintf(p, sizeof(p), "%s/ready", argv[4]);
        FILE *f = fopen(p, "w"); if (f) fclose(f);
        snprintf(p, sizeof(p), "%s/go", argv[4]);
        for (int i = 0; i < 600 && access(p, F_OK) < 0; i++) usleep(100000);
        if (access(p, F_OK) < 0) { fprintf(stderr, "hold: no go\n"); return 1; }
        if (memcmp(b, "PATTERN-A", 9) != 0) { fprintf(stderr, "hold: pattern lost\n"); return 1; }
        memcpy(b + 64, "PATTERN-B", 9);
        return 0;
}
C
LIBDIR=$(dirname "$(find "$BUILD/lib" -maxdepth 1 -name 'libshmzone.so*' | head -n1)")
cc -o "$T/client" "$T/client.c" -I"$SRC/lib" -L"$LIBDIR" -lshmzone -Wl,-rpath,"$LIBDIR" || fail "helper does not build"

# The container: overlay of / (tmpfs upper), fresh /proc, /run, /tmp; systemd as PID 1.
cat > "$T/boot.sh" <<'B'
set -e
T=$1
mount --make-rprivate /
mkdir -p "$T/ovl"
mount -t tmpfs tmpfs "$T/ovl"
mkdir -p "$T/ovl/upper" "$T/ovl/work" "$T/ovl/root"
mount -t overlay overlay -o lowerdir=/,upperdir="$T/ovl/upper",workdir="$T/ovl/work" "$T/ovl/root"
R=$T/ovl/root
mount --rbind /dev "$R/dev"
mount --rbind /sys "$R/sys"
mount -t proc proc "$R/proc"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mkdir -p "$R/$T"; mount --bind "$T" "$R/$T"
for u in systemd-sysctl systemd-binfmt systemd-modules-load systemd-udevd systemd-udevd-control.socket \
         systemd-udevd-kernel.socket systemd-udev-trigger systemd-networkd systemd-resolved systemd-timesyncd \
         getty@tty1 serial-getty@ttyS0 console-getty systemd-logind cron ssh apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer systemd-random-seed systemd-remount-fs \
         systemd-hwdb-update systemd-journal-flush systemd-pstore systemd-firstboot systemd-machine-id-commit \
         dev-hugepages.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
         sys-kernel-config.mount proc-sys-fs-binfmt_misc.automount tmp.mount systemd-update-utmp; do
        ln -sf /dev/null "$R/etc/systemd/system/$u.service" 2>/dev/null || true
        case $u in *.*) ln -sf /dev/null "$R/etc/systemd/system/$u";; esac
done
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
exec env -i container=shmztest /lib/systemd/systemd --unit=multi-user.target --log-target=console </dev/null
B
mkdir -p "$T/meta"
unshare --mount --pid --uts --fork bash "$T/boot.sh" "$T" >"$T/boot.log" 2>&1 &
UPID=$!

inpid() { cat /proc/$UPID/task/$UPID/children 2>/dev/null; }
deadline=$((SECONDS + 30))
while :; do
        P1=$(inpid); P1=${P1%% *}
        [ -n "$P1" ] && [ "$(cat /proc/${P1% }/comm 2>/dev/null)" = systemd ] && break
        [ $SECONDS -lt $deadline ] || fail "systemd did not start"
        sleep 0.2
done
cin() { timeout 30 nsenter -t "$P1" -m -p -u -- "$@"; }
deadline=$((SECONDS + 45))
until cin systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; do
        [ $SECONDS -lt $deadline ] || fail "the container did not finish booting: $(cin systemctl is-system-running 2>&1)"
        sleep 0.5
done
echo "booted in ${SECONDS}s"

# Install the build into the overlay.
cin env DESTDIR=/ meson install -C "$BUILD" --no-rebuild --quiet >/dev/null || fail "meson install"
cin ldconfig
cin systemctl daemon-reload
U=$(cin systemctl show -P FragmentPath shmzoned.service)
[ -n "$U" ] || fail "shmzoned.service not installed"
cin systemd-analyze verify --man=no shmzoned.service shmzoned.socket || fail "systemd-analyze verify"
echo "ok verify"

cin systemctl start shmzoned.socket shmzoned.service || fail "start"
SOCK=/run/shmzone/shmzone.sock
CTL=$(cin sh -c 'command -v shmzctl') || fail "no shmzctl installed"
cin "$CTL" --socket $SOCK create pat --size 1M || fail "create"
Z=/run/shmzone/fs/zones/pat
cin test -e $Z || fail "no $Z in the view"

# An attached client, held across the restart.
cin "$T/client" $SOCK pat hold "$T/meta" >"$T/hold.log" 2>&1 &
HOLD=$!
deadline=$((SECONDS + 10))
until [ -e "$T/meta/ready" ]; do [ $SECONDS -lt $deadline ] || fail "client not ready"; sleep 0.1; done
cin grep -q PATTERN-A $Z || fail "pattern not seen through the mount"
echo "ok pattern written"

OLD=$(cin systemctl show -P MainPID shmzoned)
cin systemctl restart shmzoned.service || fail "restart"
NEW=$(cin systemctl show -P MainPID shmzoned)
[ "$OLD" != "$NEW" ] || fail "restart kept pid $OLD"
cin grep -q PATTERN-A $Z || fail "pattern lost through the mount after restart"
cin "$T/client" $SOCK pat check 0 PATTERN-A || fail "pattern lost through the library after restart"
touch "$T/meta/go"
wait $HOLD || fail "held client: $(cat "$T/hold.log")"
cin "$T/client" $SOCK pat check 64 PATTERN-B || fail "old client's write not seen by a new one"
echo "ok restart keeps the zone"

cin sh -c 'kill -SEGV $(systemctl show -P MainPID shmzoned)'
deadline=$((SECONDS + 20))
until [ "$(cin systemctl is-active shmzoned)" = active ] && cin test -e $Z && [ "$(cin systemctl show -P NRestarts shmzoned)" = 1 ]; do
        [ $SECONDS -lt $deadline ] || fail "no restart after a crash: $(cin systemctl status shmzoned --no-pager)"; sleep 0.2; done
cin grep -q PATTERN-A $Z || fail "pattern lost after a crash"
echo "ok crash restart keeps the zone"

cin sh -c 'printf "\n[zone added]\nsize = 64K\n" >> "$1"' sh "$CONF"
cin systemctl reload shmzoned.service || fail "reload"
cin test -e /run/shmzone/fs/zones/added || fail "reload did not add the zone: $(cin "$CTL" --socket $SOCK list)"
echo "ok reload"

cin journalctl --sync 2>/dev/null
cin journalctl -u shmzoned -p info -o json --no-pager | grep '"PRIORITY":"6"' | grep -q 'serving' ||
        fail "no 'serving' line with PRIORITY 6 in the journal"
echo "ok journal"

cin systemctl stop shmzoned.socket shmzoned.service || fail "stop"
if cin grep -q ' /run/shmzone/fs ' /proc/self/mountinfo; then fail "FUSE mount left behind"; fi
echo "ok stop leaves no mount"

cin systemctl poweroff --no-block >/dev/null 2>&1
deadline=$((SECONDS + 20))
while kill -0 $UPID 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "poweroff timed out; killing"; break; }
        sleep 0.2
done
echo "PASS in ${SECONDS}s"
