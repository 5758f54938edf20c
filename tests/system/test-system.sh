#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# System test: builds the Debian packages (scripts/build-debs.sh, lintian included) unless
# DEB_DIR holds them, boots systemd as PID 1 in fresh mount/pid/uts namespaces over a throwaway
# overlay of /, installs the packages there with dpkg, and drives shmzoned.socket/.service with
# systemctl: the package starts the service and its FUSE view is seen outside the service;
# restart (and a crash restarted by Restart=on-failure) keeps zones (mount, library, an attached
# client's mapping, which still shares memory with a new client); a client keeps its zone, listener
# and port (messages flowing, none lost, a new peer at once, holders back) through systemctl restart
# and kill -9 of the daemon (carry-on); reload adds a zone; the journal
# has the log with priorities; stop leaves no mount; stop+start loses the zones (systemd 252);
# ProtectSystem=, ProtectHome=, PrivateTmp= would each hide the view (why the unit lacks them);
# systemd-analyze security rates the unit 3.0 or better; shmzctl show --json names the processes
# attached to a zone; message counters stay up after their ports end; promtool accepts the
# view's metrics (scripts/promtool.sh unpacks it from Debian's prometheus package, not installed);
# poweroff leaves nothing running and no mount.
# Never boots systemd on the host, never installs anything on it (but build-debs.sh's
# Build-Depends).
#
# Usage: test-system.sh SOURCE_DIR [DEB_DIR]
# Prints "ok NAME" or "FAIL NAME: why" per check, then "Synthesis: Tested: N | Passing: N |
# Failing: N" (checks after a failure count as failing). Exit 77: skipped, with a line
# "Skipping all N tests: why". SHMZONE_SYSTEM_DROPIN=FILE installs FILE as a drop-in of
# shmzoned.service before the packages (to try unit settings).
set -u
SRC=$(realpath "${1:?source dir}")
DEBS=${2:-}
CHECKS=(debs boot install view-outside-service verify security-score helper-pkg-config create-and-write holders
        counters-monotonic promtool-metrics restart
        crash-restart carry-on reload journal
        check-config restart-bad-config reload-bad-config damaged-header history-kept persist-stop-start
        stop-warns persist-bad-copy
        stop stop-start-loses-zones namespacing-hides-view nginx-module nginx-restarts python-module poweroff
        persist-reboot)
npass=0
skip() { echo "Skipping all ${#CHECKS[@]} tests: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "not root"
for t in unshare nsenter pivot_root systemctl dpkg cc; do
        command -v $t >/dev/null || skip "no $t"
done
[ -x /lib/systemd/systemd ] || skip "no systemd"
[ -c /dev/fuse ] || skip "no /dev/fuse"

T=$(mktemp -d /tmp/shmz-system.XXXXXX)
UPID=
P1=
cleanup() {
        local p
        if [ -n "$UPID" ] && kill -0 "$UPID" 2>/dev/null; then
                p=$(cat /proc/$UPID/task/$UPID/children 2>/dev/null)
                [ -n "$p" ] && kill -KILL $p 2>/dev/null
                kill -KILL "$UPID" 2>/dev/null
                wait "$UPID" 2>/dev/null
        fi
        # Every mount was made inside the container's mount namespace, and went with it.
        rm -rf "$T"
        echo "Synthesis: Tested: ${#CHECKS[@]} | Passing: $npass | Failing: $((${#CHECKS[@]} - npass))"
}
trap cleanup EXIT
ok() { echo "ok $1"; npass=$((npass + 1)); }
fail() {
        local name=$1
        shift
        echo "FAIL $name: $*"
        echo "not run: ${CHECKS[*]:$((npass + 1))}"
        if [ -n "$P1" ] && kill -0 "$P1" 2>/dev/null; then
                echo "--- journalctl -u shmzoned"
                cin journalctl -u shmzoned -n 30 --no-pager 2>&1
        fi
        echo "--- container console"
        tail -n 40 "$T/boot.log" 2>/dev/null
        exit 1
}

# Zones are never lost by an operator's ordinary action: bad configs at restart and reload, a
# writer's damaged header, history across restart, crash and upgrade, persisted zones across
# stop+start and a reboot, what a stop discards. Run after "journal", the service up with zone pat.
# history NAME: inode number, mtime, ctime (the view), generation, creation time, tag (shmzctl).
history() {
        local j
        j=$(cin $CTL show "$1" --json | tr -d ' \n')
        echo "$(cin stat -c '%i %Y %Z' $V/zones/$1)" \
                "$(echo "$j" | sed 's/.*"generation":\([0-9]*\).*/\1/')" \
                "$(echo "$j" | sed 's/.*"created_usec":\([0-9]*\).*/\1/')" \
                "$(echo "$j" | sed 's/.*"tag":"\([^"]*\)".*/\1/')"
}
keep_checks() {
        local good bad out h0 h1 st pid deb
        good=$T/good.conf
        cin cp $CONF "$good"
        bad='[daemon]\nmemory_budget = lots\n[zone demo]\nsize = 1M\nbogus = 1\n'

        cin /usr/sbin/shmzoned --check-config >"$T/cc.out" 2>&1 || fail check-config "the shipped file: $(cat "$T/cc.out")"
        grep -qx "$CONF: OK" "$T/cc.out" || fail check-config "no '$CONF: OK': $(cat "$T/cc.out")"
        cin sh -c 'printf "$1" >"$2"' sh "$bad" "$T/bad.conf"
        cin /usr/sbin/shmzoned --check-config --config "$T/bad.conf" >"$T/cc.out" 2>&1 && fail check-config "a bad file passed"
        [ "$(cat "$T/cc.out")" = "$T/bad.conf:2: memory_budget: bad size 'lots' (a number with an optional K, M, G or T suffix)
$T/bad.conf:5: zone 'demo': unknown key 'bogus'" ] || fail check-config "not every error as FILE:LINE: $(cat "$T/cc.out")"
        ok check-config

        # A typo, then a restart: the zones and their bytes stay, the daemon serves them, says so.
        cin cp "$T/bad.conf" $CONF
        restart_shmzoned || fail restart-bad-config "systemctl restart: $(cin systemctl status shmzoned --no-pager 2>&1)"
        [ "$(cin systemctl is-active shmzoned)" = active ] || fail restart-bad-config "not active"
        cin "$T/client" pat check 64 PATTERN-B || fail restart-bad-config "zone pat lost its bytes"
        cin grep -q PATTERN-B $Z || fail restart-bad-config "pat not served through the view"
        st=$(cin systemctl show -P StatusText shmzoned)
        case $st in Degraded:*) ;; *) fail restart-bad-config "status line: $st" ;; esac
        cin grep -qx 'shmzone_config_degraded 1' $V/metrics || fail restart-bad-config "no metric"
        cin journalctl --sync
        cin journalctl -u shmzoned -p err --no-pager | grep -q "$CONF:2: memory_budget: bad size" ||
                fail restart-bad-config "errors not in the journal at err"
        cin cp "$good" $CONF
        cin systemctl reload shmzoned.service || fail restart-bad-config "reload of the fixed file"
        cin grep -qx 'shmzone_config_degraded 0' $V/metrics || fail restart-bad-config "still degraded"
        ok restart-bad-config

        # A reload of a bad file fails, with the errors on shmzctl's output and in the journal.
        cin cp "$T/bad.conf" $CONF
        cin systemctl reload shmzoned.service >"$T/reload.out" 2>&1 && fail reload-bad-config "systemctl reload succeeded"
        cin $CTL reload >"$T/reload.out" 2>&1 && fail reload-bad-config "shmzctl reload succeeded"
        grep -q "^$CONF:5: zone 'demo': unknown key 'bogus'$" "$T/reload.out" || fail reload-bad-config "$(cat "$T/reload.out")"
        st=$(cin systemctl show -P StatusText shmzoned)
        case $st in "Last reload refused"*) ;; *) fail reload-bad-config "status line: $st" ;; esac
        cin journalctl --sync
        cin journalctl -u shmzoned -p err --no-pager | grep -q "$CONF:5: zone 'demo': unknown key 'bogus'" ||
                fail reload-bad-config "errors not in the journal"
        [ "$(cin systemctl is-active shmzoned)" = active ] || fail reload-bad-config "not active"
        cin cp "$good" $CONF
        cin systemctl reload shmzoned.service || fail reload-bad-config "reload of the fixed file"
        ok reload-bad-config

        # F14: a writer of a 0666 zone zeroes its header; a restart keeps the zone, its owner and name.
        cin $CTL create shared --size 64K --mode 0666 >/dev/null || fail damaged-header "create"
        cin $CTL chown nobody shared || fail damaged-header "chown"
        printf PATTERN-H | cin dd of=$V/zones/shared conv=notrunc status=none || fail damaged-header "write"
        # $T is root's only: the writer's copy of the helper where uid 1 may run it.
        cin install -m 0755 "$T/client" /usr/local/bin/shmz-writer || fail damaged-header "install the helper"
        cin setpriv --reuid=1 --regid=1 --clear-groups /usr/local/bin/shmz-writer shared zero-header x ||
                fail damaged-header "a writer cannot zero the header"
        restart_shmzoned || fail damaged-header "restart"
        cin "$T/client" shared check 0 PATTERN-H || fail damaged-header "bytes lost"
        [ "$(cin stat -c %U $V/zones/shared)" = nobody ] || fail damaged-header "owner: $(cin stat -c %U $V/zones/shared)"
        cin setpriv --reuid=1 --regid=1 --clear-groups $CTL create shared --size 64K >/dev/null 2>&1 &&
                fail damaged-header "another uid took the name"
        cin journalctl --sync
        cin journalctl -u shmzoned -p warning --no-pager | grep -q "shared': its header was damaged" ||
                fail damaged-header "repair not logged"
        ok damaged-header

        # History: the same inode number, times, generation and tag after a restart, a crash, an upgrade.
        h0=$(history pat)
        restart_shmzoned || fail history-kept "restart: $(cin systemctl status shmzoned --no-pager 2>&1 | tail -n 15)"
        h1=$(history pat)
        [ "$h1" = "$h0" ] || fail history-kept "restart: $h1, was $h0"
        pid=$(cin systemctl show -P MainPID shmzoned)
        cin systemctl reset-failed shmzoned.service >/dev/null 2>&1
        cin kill -SEGV "$pid"
        deadline=$((SECONDS + 20))
        until [ "$(cin systemctl is-active shmzoned)" = active ] && [ "$(cin systemctl show -P MainPID shmzoned)" != "$pid" ] &&
              cin test -e $Z; do
                [ $SECONDS -lt $deadline ] || fail history-kept "no restart after the crash"
                sleep 0.2
        done
        h1=$(history pat)
        [ "$h1" = "$h0" ] || fail history-kept "crash: $h1, was $h0"
        # An upgrade: the same package under a higher version (the maintainer scripts restart the service).
        deb=${PKGS[0]}
        rm -rf "$T/up" && mkdir -p "$T/up" && dpkg-deb -R "$deb" "$T/up/root" &&
                sed -i 's/^Version: .*/&+up1/' "$T/up/root/DEBIAN/control" &&
                dpkg-deb -b "$T/up/root" "$T/up/shmzoned-up.deb" >/dev/null || fail history-kept "repack"
        pid=$(cin systemctl show -P MainPID shmzoned)
        cin systemctl reset-failed shmzoned.service >/dev/null 2>&1
        cint 120 env DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$T/up/shmzoned-up.deb" >"$T/up.log" 2>&1 ||
                fail history-kept "upgrade: $(tail -n 20 "$T/up.log")"
        [ "$(cin systemctl show -P MainPID shmzoned)" != "$pid" ] || fail history-kept "the upgrade did not restart"
        h1=$(history pat)
        [ "$h1" = "$h0" ] || fail history-kept "upgrade: $h1, was $h0"
        ok history-kept

        # persist = yes: the bytes outlive stop+start (the fd store does not).
        cin sh -c 'printf "\n[zone kept]\nsize = 64K\nmode = 0644\npersist = yes\n" >>"$1"' sh $CONF
        cin systemctl reload shmzoned.service || fail persist-stop-start "reload"
        printf PATTERN-P | cin dd of=$V/zones/kept conv=notrunc status=none || fail persist-stop-start "write"
        h0=$(history kept)
        cin journalctl --sync
        cin systemctl stop shmzoned.socket shmzoned.service || fail persist-stop-start "stop"
        cin test -s /var/lib/shmzone/kept.zone || fail persist-stop-start "no copy in /var/lib/shmzone"
        cin systemctl start shmzoned.socket shmzoned.service || fail persist-stop-start "start"
        cin "$T/client" kept check 0 PATTERN-P || fail persist-stop-start "bytes lost"
        h1=$(history kept)
        [ "${h1#* * * }" = "${h0#* * * }" ] || fail persist-stop-start "generation, creation time, tag: $h1, was $h0"
        ok persist-stop-start

        # That stop said, at warning, which zones it discarded and how many bytes.
        cin journalctl -u shmzoned -p warning --no-pager >"$T/stop.log"
        grep -q "Stopping discards [0-9]* zone(s), [0-9]* bytes: .*pat" "$T/stop.log" ||
                fail stop-warns "no warning naming pat: $(tail -n 5 "$T/stop.log")"
        grep "Stopping discards" "$T/stop.log" | grep -q kept && fail stop-warns "the persisted zone is said to be discarded"
        ok stop-warns

        # A damaged copy is refused, kept aside, never half-restored.
        cin systemctl stop shmzoned.socket shmzoned.service || fail persist-bad-copy "stop"
        cin truncate -s -4096 /var/lib/shmzone/kept.zone
        cin systemctl start shmzoned.socket shmzoned.service || fail persist-bad-copy "start"
        cin journalctl --sync
        cin journalctl -u shmzoned -p err --no-pager | grep -q "kept.zone is truncated; not restored, kept as" ||
                fail persist-bad-copy "not refused in the journal"
        cin sh -c 'ls /var/lib/shmzone/kept.zone.bad-*' >/dev/null 2>&1 || fail persist-bad-copy "not kept aside"
        cin "$T/client" kept check 0 PATTERN-P && fail persist-bad-copy "restored from a truncated copy"
        cin test -e $V/zones/kept || fail persist-bad-copy "no zone kept (the declaration makes it afresh)"
        # A good copy again, for the reboot.
        printf PATTERN-R | cin dd of=$V/zones/kept conv=notrunc status=none || fail persist-bad-copy "write"
        cin cp $CONF "$T/persist.conf"
        ok persist-bad-copy
}

# A reboot: a new container over the same /var/lib/shmzone, the packages installed afresh with the
# config of before (a real system keeps /etc): the persisted zone is back with its bytes.
reboot_check() {
        unshare --mount --pid --uts --fork bash "$T/boot.sh" "$T" >"$T/boot2.log" 2>&1 &
        UPID=$!
        deadline=$((SECONDS + 30))
        while :; do
                P1=$(cat /proc/$UPID/task/$UPID/children 2>/dev/null)
                P1=${P1%% *}
                [ -n "$P1" ] && [ "$(cat /proc/$P1/comm 2>/dev/null)" = systemd ] && break
                P1=
                [ $SECONDS -lt $deadline ] || fail persist-reboot "systemd did not start again"
                sleep 0.2
        done
        deadline=$((SECONDS + 45))
        until cin systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; do
                [ $SECONDS -lt $deadline ] || fail persist-reboot "did not boot again"
                sleep 0.5
        done
        cin mkdir -p /etc/shmzone && cin cp "$T/persist.conf" $CONF || fail persist-reboot "config"
        cint 120 env DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "${PKGS[@]}" >"$T/dpkg2.log" 2>&1 ||
                fail persist-reboot "dpkg -i: $(tail -n 20 "$T/dpkg2.log")"
        cin sh -c 'cc -Wall -o "$1/client2" "$1/client.c" $(pkg-config --cflags --libs shmzone)' sh "$T" >/dev/null 2>&1 ||
                fail persist-reboot "helper"
        cin "$T/client2" kept check 0 PATTERN-R || fail persist-reboot "the persisted zone lost its bytes: $(cin journalctl -u shmzoned --no-pager | tail -n 5)"
        cin test -e $V/zones/pat && fail persist-reboot "pat survived a reboot"
        cin systemctl poweroff --no-block >/dev/null 2>&1
        deadline=$((SECONDS + 30))
        while kill -0 "$UPID" 2>/dev/null; do
                [ $SECONDS -lt $deadline ] || fail persist-reboot "the container did not exit"
                sleep 0.2
        done
        wait "$UPID" 2>/dev/null
        P1=
        ok persist-reboot
}

# 1. The packages.
if [ -z "$DEBS" ]; then
        DEBS=$T/debs
        echo "building the packages (scripts/build-debs.sh)"
        "$SRC/scripts/build-debs.sh" "$DEBS" >"$T/debs.log" 2>&1 || fail debs "build-debs.sh: $(tail -n 30 "$T/debs.log")"
fi
DEBS=$(realpath "$DEBS")
# Under $T, which the container sees at the same path (its /tmp is its own).
PKGS=()
mkdir -p "$T/pkgs"
for p in shmzoned libshmzone0 libshmzone-dev; do
        f=$(ls "$DEBS"/${p}_*.deb 2>/dev/null | tail -n 1)
        [ -n "$f" ] || fail debs "no ${p}_*.deb in $DEBS"
        cp "$f" "$T/pkgs/" || fail debs "cp $f"
        PKGS+=("$T/pkgs/${f##*/}")
done
# The nginx module's package, installed by its own check (when nginx-dev built it).
NGINX_DEB=$(ls "$DEBS"/libnginx-mod-http-shmzone_*.deb 2>/dev/null | tail -n 1)
[ -n "$NGINX_DEB" ] || fail debs "no libnginx-mod-http-shmzone_*.deb in $DEBS"
cp "$NGINX_DEB" "$T/pkgs/" || fail debs "cp $NGINX_DEB"
NGINX_DEB=$T/pkgs/${NGINX_DEB##*/}
f=$(ls "$DEBS"/python3-shmzone_*.deb 2>/dev/null | tail -n 1)
[ -n "$f" ] || fail debs "no python3-shmzone_*.deb in $DEBS"
cp "$f" "$T/pkgs/" || fail debs "cp $f"
PKGS+=("$T/pkgs/${f##*/}")
# promtool for promtool-metrics, copied where the container sees it (never installed there).
P=$("$SRC/scripts/promtool.sh" 2>"$T/promtool-fetch.log") && cp "$P" "$T/promtool"
ok debs

# 2. The container: overlay of / (tmpfs upper), fresh /proc, /run, /tmp; systemd as PID 1.
cat >"$T/boot.sh" <<'B'
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
# /var/lib/shmzone outlives the container: a second boot over it is a reboot.
mkdir -p "$T/state" "$R/var/lib/shmzone"; mount --bind "$T/state" "$R/var/lib/shmzone"
for u in systemd-sysctl systemd-binfmt systemd-modules-load systemd-udevd systemd-udevd-control.socket \
         systemd-udevd-kernel.socket systemd-udev-trigger systemd-networkd systemd-resolved systemd-timesyncd \
         getty@tty1 serial-getty@ttyS0 console-getty systemd-logind cron ssh apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer systemd-random-seed systemd-remount-fs \
         systemd-hwdb-update systemd-journal-flush systemd-pstore systemd-firstboot systemd-machine-id-commit \
         dev-hugepages.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
         sys-kernel-config.mount proc-sys-fs-binfmt_misc.automount tmp.mount systemd-update-utmp \
         man-db.timer man-db; do
        ln -sf /dev/null "$R/etc/systemd/system/$u.service" 2>/dev/null || true
        case $u in *.*) ln -sf /dev/null "$R/etc/systemd/system/$u";; esac
done
# A clean system: no shmzone from a `meson install` on the host shadows the packages.
rm -rf "$R"/usr/local/sbin/shmzoned "$R"/usr/local/bin/shmzctl "$R"/usr/local/include/shmzone*.h \
       "$R"/usr/local/lib/*/libshmzone* "$R"/usr/local/lib/*/pkgconfig/shmzone.pc \
       "$R"/usr/local/lib/systemd/system/shmzoned.* "$R"/usr/local/etc/shmzone \
       "$R"/etc/systemd/system/shmzoned.* "$R"/etc/shmzone
# A Docker image's policy-rc.d (exit 101) forbids maintainer scripts to start services; a
# real system has none.
rm -f "$R/usr/sbin/policy-rc.d"
# The man-db trigger would index every man page on the host: not what is tested, and slow.
rm -f "$R/var/lib/man-db/auto-update"
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
exec env -i container=shmztest /lib/systemd/systemd --unit=multi-user.target --log-target=console </dev/null
B
mkdir -p "$T/meta"
unshare --mount --pid --uts --fork bash "$T/boot.sh" "$T" >"$T/boot.log" 2>&1 &
UPID=$!

deadline=$((SECONDS + 30))
while :; do
        P1=$(cat /proc/$UPID/task/$UPID/children 2>/dev/null)
        P1=${P1%% *}
        [ -n "$P1" ] && [ "$(cat /proc/$P1/comm 2>/dev/null)" = systemd ] && break
        P1=
        [ $SECONDS -lt $deadline ] || fail boot "systemd did not start"
        sleep 0.2
done
# A command in the container (its mount, pid and uts namespaces: a shell there, not the service).
cint() { local t=$1; shift; timeout "$t" nsenter -t "$P1" -m -p -u -- env -u SHMZONE_SOCKET "$@"; }
cin() { cint 30 "$@"; }
# The checks restart the service many times within seconds, which systemd's start limit
# (5 starts in 10 s) would refuse; each restart here starts the count afresh, as an
# administrator's restarts minutes apart would.
restart_shmzoned() {
        cin systemctl reset-failed shmzoned.service shmzoned.socket >/dev/null 2>&1
        cin systemctl restart shmzoned.service
}
PIDNS=$(readlink /proc/$P1/ns/pid)
deadline=$((SECONDS + 45))
until cin systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; do
        [ $SECONDS -lt $deadline ] || fail boot "did not finish booting: $(cin systemctl is-system-running 2>&1)"
        sleep 0.5
done
ok boot

# 3. Install the packages; their maintainer scripts enable and start the socket and the service.
if [ -n "${SHMZONE_SYSTEM_DROPIN:-}" ]; then
        cp "$SHMZONE_SYSTEM_DROPIN" "$T/dropin.conf" || fail install "drop-in $SHMZONE_SYSTEM_DROPIN"
        cin mkdir -p /etc/systemd/system/shmzoned.service.d
        cin cp "$T/dropin.conf" /etc/systemd/system/shmzoned.service.d/test.conf || fail install "drop-in"
fi
cint 120 env DEBIAN_FRONTEND=noninteractive dpkg -i --force-confnew "${PKGS[@]}" >"$T/dpkg.log" 2>&1 ||
        fail install "dpkg -i: $(tail -n 20 "$T/dpkg.log")"
U=$(cin systemctl show -P FragmentPath shmzoned.service)
[ "$U" = /lib/systemd/system/shmzoned.service ] || fail install "unit is '$U', not the package's"
for u in shmzoned.socket shmzoned.service; do
        [ "$(cin systemctl is-enabled $u)" = enabled ] || fail install "$u not enabled"
        [ "$(cin systemctl is-active $u)" = active ] || fail install "$u not started: $(cin systemctl status $u --no-pager 2>&1)"
done
# The docs: the README and the examples beside the daemon, a man page under every function's name.
cin sh -c 'ls /usr/share/doc/shmzoned/README.md* /usr/share/doc/shmzoned/examples/hello-zone.c*' >/dev/null 2>&1 ||
        fail install "/usr/share/doc/shmzoned: $(cin ls -R /usr/share/doc/shmzoned 2>&1)"
for f in shmz_zone_open_path shmz_port_recv shmz_mutex_consistent libshmzone; do
        cin man -w 3 $f >/dev/null 2>&1 || fail install "no man page for $f(3)"
done
ok install

# 4. The view is mounted where everybody looks: a shell in the container, outside the service,
# lists it (the hardening must not leave it in a mount namespace of the service's own).
V=/run/shmzone/fs
cin sh -c "ls $V/zones" 2>&1 | grep -qx demo || fail view-outside-service "ls $V/zones: $(cin ls -la $V $V/zones 2>&1)"
ok view-outside-service

cin systemd-analyze verify --man=no shmzoned.service shmzoned.socket >"$T/verify.log" 2>&1 ||
        fail verify "$(cat "$T/verify.log")"
[ -s "$T/verify.log" ] && fail verify "warnings: $(cat "$T/verify.log")"
ok verify

# The hardening, as systemd rates it (inside the container: the unit as installed and running),
# with the view still seen outside the service (checked above, and used by every check after).
cin systemd-analyze security --no-pager shmzoned.service >"$T/security.log" 2>&1 ||
        fail security-score "$(tail -5 "$T/security.log")"
score=$(sed -n 's/.*Overall exposure level for shmzoned.service: \([0-9.]*\).*/\1/p' "$T/security.log")
[ -n "$score" ] || fail security-score "no score: $(tail -3 "$T/security.log")"
awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }' || fail security-score "exposure $score > 3.0: $(grep '✗' "$T/security.log")"
echo "security-score: $score"
ok security-score

# 5. The helper, built in the container against the installed libshmzone-dev.
# client ZONE hold DIR: attach, expect PATTERN-A at 0 (written through the view), say ready, wait
#   for DIR/go (after the restart), expect PATTERN-A at 0 and PATTERN-C at 128 (written through
#   the new daemon's view) in the same mapping, write PATTERN-B at 64.
# client ZONE check OFFSET STRING: attach and compare.
cat >"$T/client.c" <<'C'
#include <errno.h>
#include <shmzone.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int expect(const char *b, size_t off, const char *s) {
        if (memcmp(b + off, s, strlen(s)) != 0) {
                fprintf(stderr, "no %s at %zu\n", s, off);
                return -1;
        }
        return 0;
}

int main(int argc, char **argv) {
        struct shmz_client *c;
        struct shmz_zone *z;
        char p[512];
        char *b;
        FILE *f;
        int r;

        if (argc < 4)
                return 2;
        r = shmz_connect(NULL, &c);
        if (r < 0) {
                fprintf(stderr, "connect: %s\n", strerror(-r));
                return 1;
        }
        /* client NAME ports N: a port of our own to NAME, N messages of 100 bytes over it, then closed. */
        if (strcmp(argv[2], "ports") == 0) {
                struct shmz_listener *l;
                struct shmz_port *pc, *pa;
                char data[100] = "x";
                int n = atoi(argv[3]);

                if (shmz_port_listen(c, argv[1], 0600, &l) < 0 || shmz_port_connect(c, argv[1], &pc) < 0 ||
                    shmz_port_accept(l, 5000000000, &pa) < 0) {
                        fprintf(stderr, "port setup failed\n");
                        return 1;
                }
                for (int i = 0; i < n; i++) {
                        struct shmz_msg m = { .type = 1, .data = data, .size = sizeof(data), .fd = -1 };

                        if (shmz_port_send(pc, &m, 5000000000) < 0 || shmz_port_recv(pa, &m, 5000000000) < 0) {
                                fprintf(stderr, "message %d lost\n", i);
                                return 1;
                        }
                        shmz_msg_release(pa, &m);
                }
                shmz_port_close(pc);
                shmz_port_close(pa);
                shmz_listener_close(l);
                return 0;
        }
        /* client - peer NAME DIR: a new peer of NAME, one round trip; peer-die: then says DIR/die-ready, waits to
         * be killed. */
        if ((strcmp(argv[2], "peer") == 0 || strcmp(argv[2], "peer-die") == 0) && argc == 5) {
                struct shmz_port *pp;
                struct shmz_msg m = { .type = 7, .data = "hello", .size = 5, .fd = -1 };

                r = shmz_port_connect(c, argv[3], &pp);
                if (r < 0 || shmz_port_send(pp, &m, 2000000000) < 0 || shmz_port_recv(pp, &m, 2000000000) < 0 ||
                    m.size != 5 || memcmp(m.data, "hello", 5) != 0) {
                        fprintf(stderr, "peer: %s\n", strerror(r < 0 ? -r : EPROTO));
                        return 1;
                }
                shmz_msg_release(pp, &m);
                if (strcmp(argv[2], "peer") == 0)
                        return 0;
                snprintf(p, sizeof(p), "%s/die-ready", argv[4]);
                f = fopen(p, "w");
                if (!f)
                        return 1;
                fclose(f);
                pause();
                return 0;
        }
        r = shmz_zone_open(c, argv[1], 0, NULL, 0, &z);
        if (r < 0) {
                fprintf(stderr, "open: %s\n", strerror(-r));
                return 1;
        }
        b = shmz_zone_base(z);
        /* client ZONE carry DIR: through daemon restarts, a zone (a counter written at 0), a listener NAME-svc
         * whose new peers get their message back, and a port of our own with a numbered message every
         * millisecond, none to be lost; a peer that dies is reported (DIR/peer-gone). Ends at DIR/stop. */
        if (strcmp(argv[2], "carry") == 0) {
                struct shmz_listener *l;
                struct shmz_port *pc, *pa, *peers[16];
                size_t np = 0;
                uint64_t sent = 0;
                char name[200];

                snprintf(name, sizeof(name), "%s-svc", argv[1]);
                if (shmz_port_listen(c, name, 0600, &l) < 0 || shmz_port_connect(c, name, &pc) < 0 ||
                    shmz_port_accept(l, 5000000000, &pa) < 0) {
                        fprintf(stderr, "carry: port setup failed\n");
                        return 1;
                }
                snprintf(p, sizeof(p), "%s/ready", argv[3]);
                f = fopen(p, "w");
                if (!f)
                        return 1;
                fclose(f);
                snprintf(p, sizeof(p), "%s/stop", argv[3]);
                while (access(p, F_OK) < 0) {
                        struct shmz_msg m = { .type = 1, .data = &sent, .size = sizeof(sent), .fd = -1 };
                        struct shmz_port *np_port;

                        r = shmz_port_send(pc, &m, 2000000000);
                        if (r >= 0)
                                r = shmz_port_recv(pa, &m, 2000000000);
                        if (r < 0 || m.size != sizeof(sent) || memcmp(m.data, &sent, sizeof(sent)) != 0) {
                                fprintf(stderr, "carry: message %llu lost: %s\n", (unsigned long long) sent,
                                        strerror(r < 0 ? -r : EPROTO));
                                return 1;
                        }
                        shmz_msg_release(pa, &m);
                        memcpy(b, &sent, sizeof(sent));
                        sent++;
                        if (np < 16 && shmz_port_accept(l, 0, &np_port) == 0)
                                peers[np++] = np_port;
                        for (size_t i = 0; i < np; i++) {
                                if (!peers[i])
                                        continue;
                                r = shmz_port_recv(peers[i], &m, 0);
                                if (r == 0) {
                                        (void) shmz_port_send(peers[i], &m, 1000000000);
                                        shmz_msg_release(peers[i], &m);
                                } else if (r == -EPIPE) {
                                        char g[512];

                                        shmz_port_close(peers[i]);
                                        peers[i] = NULL;
                                        snprintf(g, sizeof(g), "%s/peer-gone", argv[3]);
                                        f = fopen(g, "a");
                                        if (f)
                                                fclose(f);
                                }
                        }
                        usleep(1000);
                }
                r = shmz_zone_attached(z);
                if (r != 1) {
                        fprintf(stderr, "carry: zone not counted again: %d\n", r);
                        return 1;
                }
                printf("carry: %llu messages, none lost\n", (unsigned long long) sent);
                return 0;
        }
        /* What any writer of the zone can do: zero its header's first 512 bytes (magic, sizes, ACL, name). */
        if (strcmp(argv[2], "zero-header") == 0) {
                memset(b - SHMZ_ZONE_HEADER_SIZE, 0, 512);
                return 0;
        }
        if (strcmp(argv[2], "check") == 0)
                return argc == 5 && expect(b, strtoul(argv[3], NULL, 0), argv[4]) == 0 ? 0 : 1;

        if (expect(b, 0, "PATTERN-A") < 0)
                return 1;
        snprintf(p, sizeof(p), "%s/ready", argv[3]);
        f = fopen(p, "w");
        if (!f)
                return 1;
        fclose(f);
        snprintf(p, sizeof(p), "%s/go", argv[3]);
        for (int i = 0; i < 900 && access(p, F_OK) < 0; i++)
                usleep(100000);
        if (access(p, F_OK) < 0) {
                fprintf(stderr, "hold: no go\n");
                return 1;
        }
        if (expect(b, 0, "PATTERN-A") < 0 || expect(b, 128, "PATTERN-C") < 0)
                return 1;
        memcpy(b + 64, "PATTERN-B", 9);
        return 0;
}
C
PC=$(cin pkg-config --path shmzone) || fail helper-pkg-config "no shmzone.pc"
cin dpkg -S "$PC" | grep -q '^libshmzone-dev' || fail helper-pkg-config "$PC is not libshmzone-dev's"
cin sh -c 'cc -Wall -o "$1/client" "$1/client.c" $(pkg-config --cflags --libs shmzone)' sh "$T" >"$T/cc.log" 2>&1 ||
        fail helper-pkg-config "$(cat "$T/cc.log")"
cin ldd "$T/client" | grep -q '/libshmzone.so.0 ' || fail helper-pkg-config "not linked to libshmzone.so.0"
ok helper-pkg-config

# 6. A zone made with shmzctl, a pattern written through the view, a client attached.
CTL=/usr/bin/shmzctl
Z=$V/zones/pat
cin $CTL create pat --size 1M >"$T/ctl.log" 2>&1 || fail create-and-write "shmzctl create: $(cat "$T/ctl.log")"
cin test -e $Z || fail create-and-write "no $Z in the view"
printf PATTERN-A | cin dd of=$Z conv=notrunc status=none || fail create-and-write "write through the view"
cin "$CTL" show pat >/dev/null || fail create-and-write "shmzctl show pat"
cint 120 "$T/client" pat hold "$T/meta" >"$T/hold.log" 2>&1 &
HOLD=$!
deadline=$((SECONDS + 15))
until [ -e "$T/meta/ready" ]; do
        kill -0 $HOLD 2>/dev/null || fail create-and-write "client: $(cat "$T/hold.log")"
        [ $SECONDS -lt $deadline ] || fail create-and-write "client not ready"
        sleep 0.1
done
ok create-and-write

# Who holds pat, as ipcs -p -t would say: the helper (its pid in the container, its name), since
# when; who made it (shmzctl, root) and the last attach.
HPID=$(cin pgrep -xn client)
cin $CTL show pat --json >"$T/holders.json" 2>&1 || fail holders "shmzctl show --json: $(cat "$T/holders.json")"
cin python3 -c '
import json, sys, time
j = json.load(open(sys.argv[1]))
hs = j["holders"]
assert j["processes"] == 1 and len(hs) == 1, j
h = hs[0]
assert h["pid"] == int(sys.argv[2]) and h["comm"] == "client" and h["attachments"] == 1, h
assert h["uid"] == 0 and h["user"] == "root", h
now = time.time() * 1e6
assert 0 < h["since_usec"] <= now and now - h["since_usec"] < 600e6, h
assert j["creator_uid"] == 0 and j["creator_pid"] > 0 and j["creator_pid"] != h["pid"], j
assert j["attach_usec"] >= h["since_usec"] and j["last_pid"] == h["pid"], j
assert j["mode"] == "0600", j
' "$T/holders.json" "$HPID" >"$T/holders.log" 2>&1 || fail holders "$(cat "$T/holders.log"): $(cat "$T/holders.json")"
cin getfattr --only-values -n user.shmzone.holders $Z 2>&1 | grep -q "^pid=$HPID .* comm=client\$" ||
        fail holders "xattr: $(cin getfattr --only-values -n user.shmzone.holders $Z 2>&1)"
cin $CTL list | grep -E '^pat +' | grep -qE ' 1 +1 *$' || fail holders "list: $(cin $CTL list 2>&1)"
ok holders

# Counters of the metrics file only grow: a port's messages stay counted once it ended.
metric() { cin cat $V/metrics | sed -n "s/^shmzone_$1 //p"; }
m0=$(metric messages_total)
b0=$(metric message_bytes_total)
c0=$(metric ports_closed_total)
cin "$T/client" systest-port ports 25 >"$T/ports.log" 2>&1 || fail counters-monotonic "$(cat "$T/ports.log")"
m1=$(metric messages_total)
b1=$(metric message_bytes_total)
c1=$(metric ports_closed_total)
[ "$(metric ports)" = 0 ] || fail counters-monotonic "ports left: $(metric ports)"
[ $((m1 - m0)) -ge 25 ] || fail counters-monotonic "messages_total $m0 -> $m1 after 25 sent on a port that ended"
[ $((b1 - b0)) -ge 2500 ] || fail counters-monotonic "message_bytes_total $b0 -> $b1"
[ $((c1 - c0)) -ge 1 ] || fail counters-monotonic "ports_closed_total $c0 -> $c1"
ok counters-monotonic

# promtool, Prometheus's own parser, on the real file of the real daemon.
[ -x "$T/promtool" ] || fail promtool-metrics "no promtool: scripts/promtool.sh failed on the host"
cin sh -c "cat $V/metrics >\"\$1/metrics.txt\" && \"\$1/promtool\" check metrics <\"\$1/metrics.txt\"" sh "$T" \
        >"$T/promtool.log" 2>&1 || fail promtool-metrics "$(cat "$T/promtool.log"): $(cat "$T/metrics.txt")"
grep -q '^shmzone_build_info{version="' "$T/metrics.txt" || fail promtool-metrics "no shmzone_build_info"
grep -q '^shmzone_start_time_seconds [0-9]' "$T/metrics.txt" || fail promtool-metrics "no shmzone_start_time_seconds"
ok promtool-metrics

# 7. Restart: the zone, its bytes, and the attached client's mapping are the same memory.
OLD=$(cin systemctl show -P MainPID shmzoned)
restart_shmzoned || fail restart "systemctl restart"
NEW=$(cin systemctl show -P MainPID shmzoned)
[ "$OLD" != "$NEW" ] || fail restart "restart kept pid $OLD"
cin grep -q PATTERN-A $Z || fail restart "pattern lost through the view"
cin "$T/client" pat check 0 PATTERN-A || fail restart "pattern lost through the library"
printf PATTERN-C | cin dd of=$Z bs=1 seek=128 conv=notrunc status=none || fail restart "write through the new view"
touch "$T/meta/go"
wait $HOLD || fail restart "attached client: $(cat "$T/hold.log")"
cin "$T/client" pat check 64 PATTERN-B || fail restart "the old client's write not seen by a new one"
cin grep -q PATTERN-B $Z || fail restart "the old client's write not seen through the view"
ok restart

cin sh -c 'kill -SEGV $(systemctl show -P MainPID shmzoned)'
deadline=$((SECONDS + 20))
until [ "$(cin systemctl is-active shmzoned)" = active ] && cin test -e $Z &&
      [ "$(cin systemctl show -P NRestarts shmzoned)" = 1 ]; do
        [ $SECONDS -lt $deadline ] || fail crash-restart "no restart: $(cin systemctl status shmzoned --no-pager 2>&1)"
        sleep 0.2
done
cin grep -q PATTERN-B $Z || fail crash-restart "pattern lost"
ok crash-restart

# Clients carry on through a restart and a crash: the zone handle (counted again), the listener
# (a new peer connects within 1 s of the new daemon being ready), a port of its own whose messages
# never stop and lose none, holders listed again, a peer's death reported.
carry_peer() { # $1: what; within 1 s of the daemon being active again
        local deadline=$((SECONDS + 2))
        until cint 5 "$T/client" - peer carry-svc "$T/carry" >"$T/peer.log" 2>&1; do
                [ $SECONDS -lt $deadline ] || fail carry-on "$1: no new peer: $(cat "$T/peer.log")"
                sleep 0.05
        done
}
carry_active() { # $1: the old MainPID
        local deadline=$((SECONDS + 20))
        until [ "$(cin systemctl is-active shmzoned)" = active ] &&
              [ "$(cin systemctl show -P MainPID shmzoned)" != "$1" ]; do
                [ $SECONDS -lt $deadline ] || fail carry-on "no restart: $(cin systemctl status shmzoned --no-pager 2>&1)"
                sleep 0.05
        done
}
mkdir -p "$T/carry"
cin $CTL create carry --size 64K >"$T/ctl.log" 2>&1 || fail carry-on "create: $(cat "$T/ctl.log")"
cint 120 "$T/client" carry carry "$T/carry" >"$T/carry.log" 2>&1 &
CARRY=$!
deadline=$((SECONDS + 15))
until [ -e "$T/carry/ready" ]; do
        kill -0 $CARRY 2>/dev/null || fail carry-on "client: $(cat "$T/carry.log")"
        [ $SECONDS -lt $deadline ] || fail carry-on "client not ready"
        sleep 0.1
done
CPID=$(cin pgrep -xn client)
sleep 0.3
OLD=$(cin systemctl show -P MainPID shmzoned)
restart_shmzoned || fail carry-on "systemctl restart"
carry_active "$OLD"
carry_peer "systemctl restart"
OLD=$(cin systemctl show -P MainPID shmzoned)
cin kill -9 "$OLD"
carry_active "$OLD"
carry_peer "kill -9"
sleep 0.5
cin $CTL show carry --json >"$T/carry.json" 2>&1 || fail carry-on "show: $(cat "$T/carry.json")"
cin python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert [h["pid"] for h in j["holders"]] == [int(sys.argv[2])] and j["attached"] == 1, j
' "$T/carry.json" "$CPID" >"$T/carry-h.log" 2>&1 || fail carry-on "holders not back: $(cat "$T/carry-h.log")"
cin $CTL ports >"$T/carry-ports.log" 2>&1
grep -q "$CPID" "$T/carry-ports.log" || fail carry-on "its port is not listed again: $(cat "$T/carry-ports.log")"
rm -f "$T/carry/die-ready" "$T/carry/peer-gone"
cint 30 "$T/client" - peer-die carry-svc "$T/carry" >"$T/peer.log" 2>&1 &
deadline=$((SECONDS + 5))
until [ -e "$T/carry/die-ready" ]; do
        [ $SECONDS -lt $deadline ] || fail carry-on "dying peer: $(cat "$T/peer.log")"
        sleep 0.05
done
sleep 0.1
cin pkill -9 -xn client
deadline=$((SECONDS + 2))
until [ -e "$T/carry/peer-gone" ]; do
        [ $SECONDS -lt $deadline ] || fail carry-on "a peer's death after the restarts not reported"
        sleep 0.02
done
wait $! 2>/dev/null
touch "$T/carry/stop"
wait $CARRY || fail carry-on "client: $(cat "$T/carry.log")"
grep -q 'none lost' "$T/carry.log" || fail carry-on "$(cat "$T/carry.log")"
echo "carry-on: $(cat "$T/carry.log")"
ok carry-on

CONF=/etc/shmzone/shmzone.conf
cin sh -c 'printf "\n[zone added]\nsize = 64K\n" >>"$1"' sh $CONF
cin systemctl reload shmzoned.service || fail reload "systemctl reload"
cin test -e $V/zones/added || fail reload "zone not added: $(cin $CTL list 2>&1)"
ok reload

# The daemon's "<N>" prefixes become journal priorities: info when serving, a warning when a
# reload refuses a changed size.
cin sed -i 's/^size = 64K$/size = 128K/' $CONF
cin systemctl reload shmzoned.service || fail journal "systemctl reload"
cin journalctl --sync
J=$(cin journalctl -u shmzoned -o json --no-pager)
echo "$J" | grep '"PRIORITY":"6"' | grep -q 'serving' || fail journal "no 'serving' line with priority 6"
echo "$J" | grep '"PRIORITY":"4"' | grep -q 'refused' || fail journal "no 'refused' line with priority 4"
cin journalctl -u shmzoned -p warning --no-pager | grep -q refused || fail journal "journalctl -p warning"
ok journal

keep_checks

cin systemctl stop shmzoned.socket shmzoned.service || fail stop "systemctl stop"
cin grep -q " $V " /proc/self/mountinfo && fail stop "FUSE mount left behind"
cin pgrep -x shmzoned >/dev/null && fail stop "shmzoned still running"
ok stop

# systemd 252 empties the fd store when the service stops (README, "Restarting the daemon").
cin systemctl start shmzoned.socket shmzoned.service || fail stop-start-loses-zones "start"
cin test -e $V/zones/demo || fail stop-start-loses-zones "no declared zone after start"
cin test -e $Z && fail stop-start-loses-zones "pat survived stop+start: update the README"
ok stop-start-loses-zones

# Why the unit has no ProtectSystem=, ProtectHome=, PrivateTmp= (comments there): each gives the
# service a mount namespace whose mounts never reach the host. The daemon mounts its view there,
# and nobody else sees it.
D=/run/systemd/system/shmzoned.service.d
cin mkdir -p $D
for d in ProtectSystem=full ProtectHome=read-only PrivateTmp=yes; do
        printf '[Service]\n%s\n' "$d" | cin sh -c "cat >$D/ns.conf" && cin systemctl daemon-reload &&
                restart_shmzoned || fail namespacing-hides-view "restart with $d"
        MP=$(cin systemctl show -P MainPID shmzoned)
        cin nsenter -t "$MP" -m ls $V/zones 2>/dev/null | grep -qx demo ||
                fail namespacing-hides-view "with $d the service has no view of its own"
        cin sh -c "ls $V/zones" 2>/dev/null | grep -qx demo &&
                fail namespacing-hides-view "with $d the view is seen outside the service: use $d in the unit"
done
cin rm -r $D && cin systemctl daemon-reload && restart_shmzoned ||
        fail namespacing-hides-view "restart without the drop-in"
cin sh -c "ls $V/zones" | grep -qx demo || fail namespacing-hides-view "no view after dropping the drop-in"
ok namespacing-hides-view

# nginx with the module, as Debian enables modules; its zone a shmzone zone. nginx shares the
# host's network (no network namespace here): the site listens on a free loopback port only.
cint 120 env DEBIAN_FRONTEND=noninteractive dpkg -i "$NGINX_DEB" >"$T/dpkg-nginx.log" 2>&1 ||
        fail nginx-module "dpkg -i: $(tail -n 20 "$T/dpkg-nginx.log")"
ML=/etc/nginx/modules-enabled/50-mod-http-shmzone.conf
[ "$(cin readlink $ML)" = /usr/share/nginx/modules-available/mod-http-shmzone.conf ] ||
        fail nginx-module "$ML: $(cin ls -l /etc/nginx/modules-enabled 2>&1)"
cin grep -qx 'load_module modules/ngx_http_shmzone_module.so;' /usr/share/nginx/modules-available/mod-http-shmzone.conf ||
        fail nginx-module "no load_module line"
DEP=$(cin dpkg-query -W -f='${Depends}' libnginx-mod-http-shmzone)
echo "$DEP" | grep -q 'nginx-abi-' && echo "$DEP" | grep -q libshmzone0 ||
        fail nginx-module "Depends: $DEP (no nginx ABI or no libshmzone0)"
NPORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cin rm -f /etc/nginx/sites-enabled/default
cin sh -c 'cat >/etc/nginx/conf.d/shmzone-test.conf' <<NCONF
shmzone_limit_req_zone \$binary_remote_addr zone=systest:1m rate=1r/m;
server {
    listen 127.0.0.1:$NPORT;
    location = /t { shmzone_limit_req zone=systest burst=1 nodelay; alias /etc/debian_version; }
}
NCONF
cin systemctl restart nginx.service || fail nginx-module "restart nginx: $(cin journalctl -u nginx -n 20 --no-pager 2>&1)"
get() { cin curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NPORT/t"; }
R1=$(get) R2=$(get) R3=$(get)
[ "$R1 $R2 $R3" = "200 200 503" ] || fail nginx-module "answers $R1 $R2 $R3, not 200 200 503"
cin "$CTL" list | grep -qw systest || fail nginx-module "shmzctl list: $(cin $CTL list 2>&1)"
cin test -e $V/zones/systest || fail nginx-module "no $V/zones/systest"
ok nginx-module

# The key over its burst stays so across restarts of nginx.service and shmzoned.service, and a
# reload of nginx after the daemon's restart (a new connection, the same zone).
cin systemctl restart nginx.service || fail nginx-restarts "restart nginx"
[ "$(get)" = 503 ] || fail nginx-restarts "the key was lost by nginx's restart"
restart_shmzoned || fail nginx-restarts "restart shmzoned"
[ "$(get)" = 503 ] || fail nginx-restarts "the key was lost by shmzoned's restart"
cin systemctl reload nginx.service || fail nginx-restarts "reload nginx"
sleep 1
[ "$(cin systemctl is-active nginx)" = active ] || fail nginx-restarts "nginx not active after reload"
[ "$(get)" = 503 ] || fail nginx-restarts "the key was lost by nginx's reload"
cin systemctl restart nginx.service || fail nginx-restarts "restart nginx after shmzoned's restart"
[ "$(get)" = 503 ] || fail nginx-restarts "the key was lost by the last restart"
cin systemctl stop nginx.service
ok nginx-restarts
# The package's module in Debian's python3, against the service: a declared zone, in place.
cin /usr/bin/python3 -c '
import shmzone
c = shmzone.Client()
z = c.zone("demo", tag=c.stat("demo").tag)
memoryview(z)[:6] = b"python"
assert bytes(shmzone.open_path("/run/shmzone/fs/zones/demo").buffer(4096, 6)) == b"python"
print(shmzone.__file__)
' >"$T/python.log" 2>&1 || fail python-module "$(cat "$T/python.log")"
grep -q '^/usr/lib/python3/dist-packages/shmzone' "$T/python.log" || fail python-module "not the package's: $(cat "$T/python.log")"
ok python-module

# Power off with the service running: systemd stops it and exits, the namespaces go.
cin systemctl poweroff --no-block >/dev/null 2>&1
deadline=$((SECONDS + 30))
while kill -0 "$UPID" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || fail poweroff "the container did not exit"
        sleep 0.2
done
wait "$UPID" 2>/dev/null
P1=
for p in /proc/[0-9]*; do
        [ "$(readlink $p/ns/pid 2>/dev/null)" = "$PIDNS" ] && fail poweroff "left running: $(cat $p/cmdline | tr '\0' ' ')"
done
grep -q "$T" /proc/self/mountinfo && fail poweroff "a mount of the test is left on the host"
ok poweroff

reboot_check
echo "PASS in ${SECONDS}s"
