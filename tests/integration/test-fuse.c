/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The FUSE view against a real shmzoned and a real mount, driven with the
 * tools an operator uses (ls, stat, cat, dd, od, chmod, chown, rm, truncate,
 * getfattr, setfattr) and with the library. Every test mounts its own
 * directory; the fini unmounts it even when the test failed.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "harness.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534

static struct daemon_proc d;

static void start(void) {
        /* Criterion's runner may carry one in; open_path must find the socket through <mount>/socket. */
        (void) unsetenv("SHMZONE_SOCKET");
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        static char log[65536];
        bool ran = d.pid > 0;
        int st = ran ? harness_stop(&d) : 0;

        /* A clean exit, sanitizers included, is part of every test; the mount goes in any case. */
        snprintf(log, sizeof(log), "%s", harness_log(&d));
        harness_cleanup(&d);
        cr_assert_eq(st, 0, "daemon exit status %d: %s", st, log);
}

TestSuite(fuse, .init = start, .fini = stop, .timeout = 120);

static const char *zpath(const char *name) {
        static char buf[2][512];
        static int i;

        i ^= 1;
        snprintf(buf[i], sizeof(buf[i]), "%s/zones/%s", d.mount, name);
        return buf[i];
}

/* Runs a shell command; its stdout (NUL-terminated) in out; returns the exit status. */
_printf_(3, 4) static int run(char *out, size_t size, const char *fmt, ...) {
        char cmd[4096];
        size_t n = 0;
        va_list ap;
        FILE *p;
        int st;

        va_start(ap, fmt);
        vsnprintf(cmd, sizeof(cmd), fmt, ap);
        va_end(ap);
        p = popen(cmd, "re");
        cr_assert_not_null(p);
        if (out) {
                n = fread(out, 1, size - 1, p);
                out[n] = 0;
        } else {
                char sink[4096];

                while (fread(sink, 1, sizeof(sink), p) > 0)
                        ;
        }
        st = pclose(p);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static struct shmz_client *client(void) {
        struct shmz_client *c = NULL;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        return c;
}

static void make_zone(struct shmz_client *c, const char *name, uint64_t size, const char *tag, mode_t mode) {
        struct shmz_zone *z = NULL;

        cr_assert_eq(shmz_zone_open(c, name, size, tag, SHMZ_CREATE | SHMZ_EXCL, &z), 0, "create %s", name);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_chmod(c, name, mode), 0);
}

Test(fuse, layout_statfs_and_socket_link) {
        struct shmz_client *c = client();
        struct statvfs sv, sv2;
        char out[8192], link[256];
        ssize_t n;

        cr_assert_eq(run(out, sizeof(out), "ls -l %s", d.mount), 0);
        cr_assert(strstr(out, "zones") && strstr(out, "segments") && strstr(out, "ports") && strstr(out, "status") &&
                          strstr(out, "metrics") && strstr(out, "socket ->"),
                  "%s", out);
        cr_assert(strstr(out, "drwxrwxrwt"), "zones/ is sticky and world-writable: %s", out);
        snprintf(out, sizeof(out), "%s/socket", d.mount);
        n = readlink(out, link, sizeof(link) - 1);
        cr_assert_gt(n, 0);
        link[n] = 0;
        cr_assert_str_eq(link, d.socket);

        /* statfs: the budget is the size, what it leaves is free. */
        cr_assert_eq(statvfs(d.mount, &sv), 0);
        cr_assert_eq((uint64_t) sv.f_blocks * sv.f_frsize, 64u << 20);
        cr_assert_eq(sv.f_bfree, sv.f_blocks);
        make_zone(c, "one", 1 << 20, NULL, 0644);
        cr_assert_eq(statvfs(d.mount, &sv2), 0);
        cr_assert_eq((uint64_t) (sv.f_bfree - sv2.f_bfree) * sv.f_frsize, (1u << 20) + SHMZ_ZONE_HEADER_SIZE);
        cr_assert_eq(run(out, sizeof(out), "stat -f -c '%%b %%f %%S' %s", d.mount), 0);
        cr_assert_eq(atoll(out), 16384, "%s", out);
        shmz_disconnect(c);
}

Test(fuse, status_and_metrics) {
        struct shmz_client *c = client();
        char out[16384];

        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        cr_assert(strstr(out, "zones                0\n"), "%s", out);
        make_zone(c, "counted", 8192, "tg", 0644);
        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        cr_assert(strstr(out, "zones                1\n"), "%s", out);
        cr_assert(strstr(out, "counted"), "%s", out);
        cr_assert_eq(run(out, sizeof(out), "cat %s/metrics", d.mount), 0);
        cr_assert(strstr(out, "# TYPE shmzone_zones gauge\nshmzone_zones 1\n"), "%s", out);
        cr_assert(strstr(out, "# TYPE shmzone_requests_total counter\n"), "%s", out);
        cr_assert(strstr(out, "shmzone_memory_budget_bytes 67108864\n"), "%s", out);
        cr_assert(strstr(out, "shmzone_zone_size_bytes{zone=\"counted\"} 8192\n"), "%s", out);
        /* Every sample line is "name{labels} value": no stray text for a scraper to choke on. */
        cr_assert_eq(run(out, sizeof(out),
                         "grep -v '^#' %s/metrics | "
                         "grep -cvE '^shmzone_[a-z_]+(\\{(zone|version)=\"[^\"]+\"\\})? [0-9]+(\\.[0-9]+)?$'",
                         d.mount),
                     1, "bad lines: %s", out);
        /* The version as an info metric, the start time for Prometheus's reset detection. */
        cr_assert_eq(run(out, sizeof(out), "cat %s/metrics", d.mount), 0);
        cr_assert(strstr(out, "\nshmzone_build_info{version=\"" PACKAGE_VERSION "\"} 1\n"), "%s", out);
        {
                const char *st = strstr(out, "\nshmzone_start_time_seconds ");
                double t = st ? atof(st + strlen("\nshmzone_start_time_seconds ")) : 0;

                cr_assert(t > (double) time(NULL) - 600 && t < (double) time(NULL) + 1, "%s", out);
        }
        /* Prometheus's own checker on the real file (scripts/promtool.sh fetches it if need be). */
        cr_assert_eq(run(out, sizeof(out), "p=$(%s) && cat %s/metrics | \"$p\" check metrics 2>&1; echo rc=$?",
                         getenv("PROMTOOL_SH"), d.mount),
                     0);
        cr_assert(strstr(out, "rc=0\n"), "promtool: %s", out);
        /* Made afresh at each open: a second read a second later is another file. */
        {
                char again[16384];
                const char *u1, *u2;

                cr_assert_eq(run(out, sizeof(out), "cat %s/metrics", d.mount), 0);
                usleep(1100000);
                cr_assert_eq(run(again, sizeof(again), "cat %s/metrics", d.mount), 0);
                u1 = strstr(out, "\nshmzone_uptime_seconds ");
                u2 = strstr(again, "\nshmzone_uptime_seconds ");
                cr_assert(u1 && u2 && atoll(u2 + 24) > atoll(u1 + 24), "%s\n---\n%s", out, again);
        }
        /* st_size matches what cat reads, for tools that trust it. */
        cr_assert_eq(
                run(out, sizeof(out), "test $(stat -c %%s %s/status) -eq $(cat %s/status | wc -c)", d.mount, d.mount),
                0);
        shmz_disconnect(c);
}

Test(fuse, bytes_are_live_both_ways) {
        struct shmz_client *c = client();
        struct shmz_zone *z;
        char out[4096];
        char *p;
        int fd;

        cr_assert_eq(shmz_zone_open(c, "live", 1 << 16, NULL, SHMZ_CREATE, &z), 0);
        p = shmz_zone_base(z);
        memcpy(p + 1000, "HELLO", 5);
        /* File offset 0 is the zone's first usable byte. */
        cr_assert_eq(run(out, sizeof(out), "od -An -c -j 1000 -N 5 %s", zpath("live")), 0);
        cr_assert(strstr(out, "H   E   L   L   O"), "%s", out);
        cr_assert_eq(run(NULL, 0, "printf world | dd of=%s bs=1 seek=7 conv=notrunc status=none", zpath("live")), 0);
        cr_assert_eq(memcmp(p + 7, "world", 5), 0, "mapping sees the write at once");
        memcpy(p + 7, "WORLD", 5);
        cr_assert_eq(run(out, sizeof(out), "dd if=%s bs=1 skip=7 count=5 status=none", zpath("live")), 0);
        cr_assert_str_eq(out, "WORLD");
        cr_assert_eq(run(out, sizeof(out), "stat -c '%%s %%a %%u' %s", zpath("live")), 0);
        cr_assert_str_eq(out, "65536 600 0\n");

        /* Odd offsets, the last byte, the end, past the end. */
        fd = open(zpath("live"), O_RDWR);
        cr_assert_geq(fd, 0);
        p[65535] = 'Z';
        cr_assert_eq(pread(fd, out, 10, 65535), 1);
        cr_assert_eq(out[0], 'Z');
        cr_assert_eq(pread(fd, out, 10, 65536), 0);
        cr_assert_eq(pread(fd, out, 10, 1 << 30), 0);
        cr_assert_eq(pread(fd, out, 3, 4093), 3);
        errno = 0;
        cr_assert_eq(pwrite(fd, "x", 1, 65536), -1);
        cr_assert_eq(errno, ENOSPC, "writes past the end are refused: %m");
        cr_assert_eq(pwrite(fd, "abcdef", 6, 65533), 3, "a write across the end is short");
        cr_assert_eq(memcmp(p + 65533, "abc", 3), 0);
        /* ftruncate to another size is refused: zones never change size. */
        cr_assert_eq(ftruncate(fd, 4096), -1);
        cr_assert_eq(ftruncate(fd, 65536), 0);
        close(fd);
        /* O_TRUNC is ignored, as on a device: the shell's > writes from offset 0. */
        cr_assert_eq(run(NULL, 0, "printf ab > %s", zpath("live")), 0);
        cr_assert_eq(memcmp(p, "ab", 2), 0);
        cr_assert_eq(p[65533], 'a');
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(fuse, shared_mmap_is_refused) {
        struct shmz_client *c = client();
        void *m;
        int fd;

        make_zone(c, "mapped", 8192, NULL, 0600);
        fd = open(zpath("mapped"), O_RDWR);
        cr_assert_geq(fd, 0);
        m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        cr_assert_eq(m, MAP_FAILED);
        cr_assert_eq(errno, ENODEV, "a shared mapping would be a copy, not the zone: %m");
        close(fd);
        shmz_disconnect(c);
}

Test(fuse, rm_keeps_attached_clients_working) {
        struct shmz_client *c = client();
        struct shmz_zone_stat st;
        struct shmz_zone *z;
        char out[4096];
        char *p;

        cr_assert_eq(shmz_zone_open(c, "doomed", 1 << 16, NULL, SHMZ_CREATE, &z), 0);
        p = shmz_zone_base(z);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones", d.mount), 0);
        cr_assert_str_eq(out, "doomed\n");
        cr_assert_eq(run(NULL, 0, "rm %s", zpath("doomed")), 0);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones", d.mount), 0);
        cr_assert_str_eq(out, "", "the name is gone at once");
        cr_assert_eq(shmz_zone_stat(c, "doomed", &st), -ENOENT);
        strcpy(p, "still mine");
        cr_assert_str_eq(p, "still mine");
        cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
        cr_assert(strstr(out, "zones_unlinked       1\n"), "%s", out);
        shmz_zone_close(z);
        /* The memory goes after the last detach (the close is one-way: allow it a moment). */
        for (int i = 0; i < 100; i++) {
                cr_assert_eq(run(out, sizeof(out), "cat %s/status", d.mount), 0);
                if (strstr(out, "zones_unlinked       0\n"))
                        break;
                usleep(10000);
        }
        cr_assert(strstr(out, "zones_unlinked       0\n") && strstr(out, "memory_used_bytes    0\n"), "%s", out);
        shmz_disconnect(c);
}

Test(fuse, create_then_truncate_makes_a_zone) {
        struct shmz_client *c = client();
        struct shmz_zone_stat st;
        struct shmz_zone *z;
        char out[4096];

        int fd;

        /* The creating open stays open meanwhile: an unsized zone goes with it (see below). */
        fd = open(zpath("fresh"), O_CREAT | O_WRONLY, 0600);
        cr_assert_geq(fd, 0, "%m");
        cr_assert_eq(run(out, sizeof(out), "stat -c %%s %s", zpath("fresh")), 0);
        cr_assert_str_eq(out, "0\n", "pending: no memory yet");
        cr_assert_eq(run(out, sizeof(out), "cat %s | wc -c", zpath("fresh")), 0);
        cr_assert_str_eq(out, "0\n");
        cr_assert_eq(shmz_zone_open(c, "fresh", 0, NULL, 0, &z), -EAGAIN, "a pending zone cannot be attached");
        cr_assert_eq(run(NULL, 0, "setfattr -n user.shmzone.tag -v made-by-fs %s", zpath("fresh")), 0);
        cr_assert_eq(run(NULL, 0, "truncate -s 1M %s", zpath("fresh")), 0);
        cr_assert_eq(close(fd), 0);
        cr_assert_eq(run(out, sizeof(out), "stat -c %%s %s", zpath("fresh")), 0);
        cr_assert_str_eq(out, "1048576\n");
        cr_assert_neq(run(NULL, 0, "truncate -s 2M %s 2>/dev/null", zpath("fresh")), 0, "only one truncate");
        cr_assert_eq(shmz_zone_stat(c, "fresh", &st), 0);
        cr_assert_eq(st.size, 1u << 20);
        cr_assert_str_eq(st.tag, "made-by-fs");
        cr_assert_eq(shmz_zone_open(c, "fresh", 0, "made-by-fs", 0, &z), 0);
        shmz_zone_close(z);
        /* truncate on a missing name creates and sizes it in one go. */
        cr_assert_eq(run(NULL, 0, "truncate -s 64K %s", zpath("direct")), 0);
        cr_assert_eq(shmz_zone_stat(c, "direct", &st), 0);
        cr_assert_eq(st.size, 64u << 10);
        cr_assert_str_eq(st.tag, "", "no tag set: the default is empty");
        /* Beyond the budget: a clear error, nothing half made. */
        cr_assert_neq(run(NULL, 0, "truncate -s 1G %s 2>/dev/null", zpath("huge")), 0);
        shmz_disconnect(c);
}

Test(fuse, chmod_chown_through_tools_and_socket) {
        struct shmz_client *c = client();
        struct shmz_zone_stat st;
        char out[4096];

        make_zone(c, "acl", 4096, NULL, 0600);
        cr_assert_eq(run(NULL, 0, "chmod 640 %s", zpath("acl")), 0);
        cr_assert_eq(shmz_zone_stat(c, "acl", &st), 0);
        cr_assert_eq(st.mode, 0640);
        cr_assert_eq(run(NULL, 0, "chown nobody:nogroup %s", zpath("acl")), 0);
        cr_assert_eq(shmz_zone_stat(c, "acl", &st), 0);
        cr_assert_eq(st.uid, NOBODY);
        cr_assert_eq(st.gid, NOBODY);
        /* Changes made on the socket show in the mount at once (the kernel's cache is invalidated). */
        cr_assert_eq(run(out, sizeof(out), "stat -c '%%a %%u' %s", zpath("acl")), 0);
        cr_assert_str_eq(out, "640 65534\n");
        cr_assert_eq(shmz_zone_chmod(c, "acl", 0604), 0);
        cr_assert_eq(shmz_zone_chown(c, "acl", 0, 0), 0);
        cr_assert_eq(run(out, sizeof(out), "stat -c '%%a %%u %%g' %s", zpath("acl")), 0);
        cr_assert_str_eq(out, "604 0 0\n");
        cr_assert_eq(run(out, sizeof(out), "ls -l %s/zones", d.mount), 0);
        cr_assert(strstr(out, "-rw----r-- 1 root root 4096"), "%s", out);
        shmz_disconnect(c);
}

Test(fuse, socket_changes_show_at_once) {
        struct shmz_client *c = client();
        struct stat st;
        int fd;

        /* Look it up first, so that the kernel has something to forget. */
        cr_assert_eq(stat(zpath("comes"), &st), -1);
        make_zone(c, "comes", 4096, NULL, 0644);
        cr_assert_eq(stat(zpath("comes"), &st), 0);
        cr_assert_eq(st.st_size, 4096);
        /* An open file's cached attributes are invalidated (well within their 1 s timeout). */
        fd = open(zpath("comes"), O_RDONLY);
        cr_assert_geq(fd, 0);
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0644);
        cr_assert_eq(shmz_zone_chmod(c, "comes", 0640), 0);
        for (int i = 0; i < 50 && (st.st_mode & 07777) != 0640; i++) {
                usleep(10000);
                cr_assert_eq(fstat(fd, &st), 0);
        }
        cr_assert_eq(st.st_mode & 07777, 0640, "fstat still shows the old mode");
        close(fd);
        cr_assert_eq(shmz_zone_unlink(c, "comes"), 0);
        cr_assert_eq(stat(zpath("comes"), &st), -1, "a cached entry of a removed zone");
        cr_assert_eq(errno, ENOENT);
        shmz_disconnect(c);
}

/*
 * Every change made on the socket (or by a reload) reaches the kernel before
 * the call returns: the view caches names and attributes, so each test below
 * first has the kernel cache the zone (a stat through the path, an open file,
 * a listing), then looks through the mount once, right after the call, with no
 * retry and no sleep.
 */
static void cache_in_kernel(const char *name, int *ret_fd) {
        char out[65536];
        struct stat st;

        cr_assert_eq(stat(zpath(name), &st), 0, "%s: %m", name);
        cr_assert_eq(stat(zpath(name), &st), 0);
        cr_assert_eq(run(out, sizeof(out), "ls -l %s/zones", d.mount), 0);
        if (ret_fd) {
                *ret_fd = open(zpath(name), O_RDONLY | O_CLOEXEC);
                cr_assert_geq(*ret_fd, 0, "%s: %m", name);
                cr_assert_eq(fstat(*ret_fd, &st), 0);
        }
}

Test(fuse, socket_chmod_shows_at_once) {
        struct shmz_client *c = client();
        struct stat st;
        int fd;

        make_zone(c, "chm", 4096, NULL, 0644);
        cache_in_kernel("chm", &fd);
        /* The kernel checks permissions itself, from what it cached: nobody reads now... */
        cr_assert_eq(run(NULL, 0, "setpriv --reuid=%d --regid=%d --clear-groups cat %s >/dev/null", NOBODY, NOBODY,
                         zpath("chm")),
                     0);
        cr_assert_eq(shmz_zone_chmod(c, "chm", 0640), 0);
        /* ...and no longer, right after the chmod returned. */
        cr_assert_neq(run(NULL, 0, "setpriv --reuid=%d --regid=%d --clear-groups cat %s 2>/dev/null", NOBODY, NOBODY,
                          zpath("chm")),
                      0, "the kernel let nobody read after the chmod");
        cr_assert_eq(stat(zpath("chm"), &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0640, "stat shows mode %o", st.st_mode & 07777);
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0640, "fstat shows mode %o", st.st_mode & 07777);
        close(fd);
        shmz_disconnect(c);
}

Test(fuse, socket_chown_shows_at_once) {
        struct shmz_client *c = client();
        struct stat st;
        int fd;

        make_zone(c, "cho", 4096, NULL, 0600);
        cache_in_kernel("cho", &fd);
        cr_assert_eq(shmz_zone_chown(c, "cho", NOBODY, NOBODY), 0);
        cr_assert_eq(stat(zpath("cho"), &st), 0);
        cr_assert_eq(st.st_uid, NOBODY);
        cr_assert_eq(st.st_gid, NOBODY);
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_uid, NOBODY, "fstat shows uid %u", st.st_uid);
        /* The new owner may read at once (mode 0600 is theirs now). */
        cr_assert_eq(run(NULL, 0, "setpriv --reuid=%d --regid=%d --clear-groups cat %s >/dev/null", NOBODY, NOBODY,
                         zpath("cho")),
                     0);
        close(fd);
        shmz_disconnect(c);
}

Test(fuse, socket_unlink_shows_at_once) {
        struct shmz_client *c = client();
        struct stat st;
        char out[4096];
        int fd;

        make_zone(c, "unl", 4096, NULL, 0644);
        cache_in_kernel("unl", &fd);
        cr_assert_eq(shmz_zone_unlink(c, "unl"), 0);
        errno = 0;
        cr_assert_eq(stat(zpath("unl"), &st), -1, "a cached name of a removed zone");
        cr_assert_eq(errno, ENOENT);
        cr_assert_eq(open(zpath("unl"), O_RDONLY | O_CLOEXEC), -1);
        cr_assert_eq(errno, ENOENT);
        /* The open file is the unlinked zone: no link left. */
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_nlink, 0);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones", d.mount), 0);
        cr_assert_str_eq(out, "");
        close(fd);
        shmz_disconnect(c);
}

Test(fuse, socket_create_shows_at_once) {
        struct shmz_client *c = client();
        struct shmz_zone *z;
        struct stat st, old;
        char out[4096];

        /* A missing name: the kernel must not remember that it was missing. */
        cr_assert_eq(stat(zpath("cre"), &st), -1);
        cr_assert_eq(stat(zpath("cre"), &st), -1);
        make_zone(c, "cre", 8192, NULL, 0644);
        cr_assert_eq(stat(zpath("cre"), &st), 0, "a new zone is missing: %m");
        cr_assert_eq(st.st_size, 8192);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones", d.mount), 0);
        cr_assert_str_eq(out, "cre\n");

        /* Removed and made again under the same name: the name is the new zone at once. */
        cache_in_kernel("cre", NULL);
        cr_assert_eq(stat(zpath("cre"), &old), 0);
        cr_assert_eq(shmz_zone_unlink(c, "cre"), 0);
        cr_assert_eq(shmz_zone_open(c, "cre", 3 * 4096, NULL, SHMZ_CREATE | SHMZ_EXCL, &z), 0);
        cr_assert_eq(stat(zpath("cre"), &st), 0, "%m");
        cr_assert_neq(st.st_ino, old.st_ino, "the name still leads to the removed zone");
        cr_assert_eq(st.st_size, 3 * 4096);
        memcpy(shmz_zone_base(z), "new!", 4);
        cr_assert_eq(run(out, sizeof(out), "head -c 4 %s", zpath("cre")), 0);
        cr_assert_str_eq(out, "new!");
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(fuse, reload_shows_at_once) {
        struct stat st;
        int fd;

        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n\n"
                                 "[zone decl]\nsize = 8K\nuser = root\ngroup = root\nmode = 0644\n");
        cr_assert_eq(harness_reload(&d), 0, "%s", harness_log(&d));
        cr_assert_eq(stat(zpath("decl"), &st), 0, "a declared zone is missing: %m");
        cr_assert_eq(st.st_mode & 07777, 0644);
        cache_in_kernel("decl", &fd);

        /* Its mode changes with the config. */
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n\n"
                                 "[zone decl]\nsize = 8K\nuser = root\ngroup = root\nmode = 0600\n");
        cr_assert_eq(harness_reload(&d), 0, "%s", harness_log(&d));
        cr_assert_eq(stat(zpath("decl"), &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0600, "stat shows mode %o", st.st_mode & 07777);
        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_mode & 07777, 0600, "fstat shows mode %o", st.st_mode & 07777);

        /* Dropped from the config: the name goes. */
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n");
        cr_assert_eq(harness_reload(&d), 0, "%s", harness_log(&d));
        errno = 0;
        cr_assert_eq(stat(zpath("decl"), &st), -1, "a cached name of a retired zone");
        cr_assert_eq(errno, ENOENT);
        close(fd);
}

Test(fuse, other_xattr_namespaces_are_unsupported_and_create_applies_the_umask) {
        struct shmz_client *c = client();
        char v[64], out[256];

        make_zone(c, "ns", 4096, NULL, 0644);
        /* ls -l asks every file for these: "not supported" makes it stop asking, ENODATA would not. */
        cr_assert_eq(lgetxattr(zpath("ns"), "security.selinux", v, sizeof(v)), -1);
        cr_assert_eq(errno, ENOTSUP, "security.selinux: %m");
        cr_assert_eq(getxattr(zpath("ns"), "trusted.x", v, sizeof(v)), -1);
        cr_assert_eq(errno, ENOTSUP, "trusted.x: %m");
        /* No ACL, asked twice (the kernel keeps the answer). */
        cr_assert_eq(getxattr(zpath("ns"), "system.posix_acl_access", v, sizeof(v)), -1);
        cr_assert_eq(errno, ENODATA, "system.posix_acl_access: %m");
        cr_assert_eq(getxattr(zpath("ns"), "system.posix_acl_access", v, sizeof(v)), -1);
        cr_assert_eq(errno, ENODATA);
        cr_assert_eq(getxattr(zpath("ns"), "user.shmzone.tag", v, sizeof(v)), 0);
        /* The creator's umask applies to a zone made in the view (the kernel leaves it to us with ACLs on). */
        cr_assert_eq(run(NULL, 0, "umask 027; truncate -s 4K %s", zpath("masked")), 0);
        cr_assert_eq(run(out, sizeof(out), "stat -c %%a %s", zpath("masked")), 0);
        cr_assert_str_eq(out, "640\n");
        cr_assert_eq(run(NULL, 0, "umask 0; truncate -s 4K %s", zpath("open")), 0);
        cr_assert_eq(run(out, sizeof(out), "stat -c %%a %s", zpath("open")), 0);
        cr_assert_str_eq(out, "666\n");
        shmz_disconnect(c);
}

Test(fuse, xattrs) {
        struct shmz_client *c = client();
        struct shmz_zone *z;
        char out[4096], v[64];

        make_zone(c, "attrs", 4096, "first", 0644);
        cr_assert_eq(run(out, sizeof(out), "getfattr -d %s 2>/dev/null", zpath("attrs")), 0);
        cr_assert(strstr(out, "user.shmzone.tag=\"first\"") && strstr(out, "user.shmzone.attached=\"0\""), "%s", out);
        cr_assert_eq(shmz_zone_open(c, "attrs", 0, "first", 0, &z), 0);
        cr_assert_eq(getxattr(zpath("attrs"), "user.shmzone.attached", v, sizeof(v)), 1);
        cr_assert_eq(v[0], '1');
        cr_assert_eq(getxattr(zpath("attrs"), "user.shmzone.attached", v, 0), 1, "size query");
        cr_assert_eq(getxattr(zpath("attrs"), "user.shmzone.tag", v, 2), -1);
        cr_assert_eq(errno, ERANGE);
        cr_assert_eq(getxattr(zpath("attrs"), "user.other", v, sizeof(v)), -1);
        cr_assert_eq(errno, ENODATA);
        /* Figures are the daemon's; the tag is fixed once the zone was used. */
        cr_assert_neq(run(NULL, 0, "setfattr -n user.shmzone.attached -v 9 %s 2>/dev/null", zpath("attrs")), 0);
        cr_assert_eq(setxattr(zpath("attrs"), "user.shmzone.tag", "new", 3, 0), -1);
        cr_assert_eq(errno, EBUSY);
        shmz_zone_close(z);
        /* Hostile values: too long, embedded NUL, not printable. */
        cr_assert_eq(run(NULL, 0, "truncate -s 4K %s", zpath("fresh")), 0);
        memset(out, 'a', 200);
        cr_assert_eq(setxattr(zpath("fresh"), "user.shmzone.tag", out, 200, 0), -1);
        cr_assert_eq(errno, EINVAL);
        cr_assert_eq(setxattr(zpath("fresh"), "user.shmzone.tag", "a\0b", 3, 0), -1);
        cr_assert_eq(errno, EINVAL);
        cr_assert_eq(setxattr(zpath("fresh"), "user.shmzone.tag", "a\nb", 3, 0), -1);
        cr_assert_eq(errno, EINVAL);
        cr_assert_eq(setxattr(zpath("fresh"), "user.shmzone.tag", "ok", 2, 0), 0);
        cr_assert_eq(getxattr(zpath("fresh"), "user.shmzone.tag", v, sizeof(v)), 2);
        cr_assert_eq(memcmp(v, "ok", 2), 0);
        cr_assert_eq(removexattr(zpath("fresh"), "user.shmzone.tag"), 0);
        cr_assert_eq(getxattr(zpath("fresh"), "user.shmzone.tag", v, sizeof(v)), 0);
        shmz_disconnect(c);
}

/* Waits (up to 5 s) until path is gone; the kernel sends the release after close() returned. */
static bool gone_soon(const char *path) {
        struct stat st;

        for (int i = 0; i < 500; i++) {
                if (stat(path, &st) < 0 && errno == ENOENT)
                        return true;
                usleep(10000);
        }
        return false;
}

/* cp and shell redirections into a new name: refused (ENOSPC, kept), explained in the log, nothing left behind. */
Test(fuse, unsized_create_goes_with_its_file) {
        struct shmz_client *c = client();
        struct shmz_zone_stat st;
        char out[4096];
        int fd, fd2;

        cr_assert_neq(run(out, sizeof(out), "cp /etc/passwd %s 2>&1", zpath("copied")), 0);
        cr_assert(strstr(out, "No space left on device"), "%s", out);
        cr_assert(gone_soon(zpath("copied")), "cp left a zone behind");
        cr_assert_eq(shmz_zone_stat(c, "copied", &st), -ENOENT);
        cr_assert_eq(harness_wait_log(&d, "zones/copied was written before it had a size", 5), 0, "%s",
                     harness_log(&d));
        cr_assert(strstr(harness_log(&d), "truncate -s SIZE zones/copied"), "%s", harness_log(&d));
        cr_assert_neq(run(NULL, 0, "echo hi > %s 2>/dev/null", zpath("redirected")), 0);
        cr_assert(gone_soon(zpath("redirected")));
        /* touch makes nothing either: a zone needs a size. */
        cr_assert_eq(run(NULL, 0, "touch %s", zpath("touched")), 0);
        cr_assert(gone_soon(zpath("touched")));
        /* Another open of the pending zone does not keep it: the creating one decides. */
        fd = open(zpath("twice"), O_CREAT | O_RDWR, 0600);
        cr_assert_geq(fd, 0, "%m");
        fd2 = open(zpath("twice"), O_RDWR);
        cr_assert_geq(fd2, 0, "%m");
        cr_assert_eq(close(fd), 0);
        cr_assert(gone_soon(zpath("twice")));
        cr_assert_eq(close(fd2), 0);
        /* A size set through any open keeps it, and so does truncate on the creating one. */
        fd = open(zpath("kept"), O_CREAT | O_RDWR, 0600);
        cr_assert_geq(fd, 0, "%m");
        cr_assert_eq(ftruncate(fd, 8192), 0, "%m");
        cr_assert_eq(pwrite(fd, "abc", 3, 0), 3);
        cr_assert_eq(close(fd), 0);
        usleep(200000);
        cr_assert_eq(shmz_zone_stat(c, "kept", &st), 0);
        cr_assert_eq(st.size, 8192);
        shmz_disconnect(c);
}

/* user.shmzone.holders: who attached, per process, as ipcs -p -t shows it. */
Test(fuse, holders_xattr) {
        struct shmz_client *c = client();
        struct shmz_zone *z1, *z2;
        char v[65536], want[128], list[1024];
        ssize_t n;

        make_zone(c, "held", 4096, "h", 0644);
        n = getxattr(zpath("held"), "user.shmzone.holders", v, sizeof(v) - 1);
        cr_assert_gt(n, 0, "%m");
        v[n] = 0;
        snprintf(want, sizeof(want), "creator_pid=%d creator_uid=0 ", (int) getpid());
        cr_assert(!strncmp(v, want, strlen(want)), "%s", v);
        cr_assert(strstr(v, " processes=0 "), "made and closed: nobody holds it: %s", v);
        cr_assert(!strstr(v, " attach_usec=0 "), "make_zone attached once: %s", v);
        cr_assert_eq(shmz_zone_open(c, "held", 0, "h", 0, &z1), 0);
        cr_assert_eq(shmz_zone_open(c, "held", 0, "h", 0, &z2), 0);
        n = getxattr(zpath("held"), "user.shmzone.holders", v, sizeof(v) - 1);
        cr_assert_gt(n, 0, "%m");
        v[n] = 0;
        snprintf(want, sizeof(want), "\npid=%d uid=0 gid=0 attachments=2 since_usec=", (int) getpid());
        cr_assert(strstr(v, want) && strstr(v, " processes=1 "), "%s", v);
        cr_assert(strstr(v, " comm=test-fuse\n"), "the name from /proc/PID/comm: %s", v);
        shmz_zone_close(z2);
        n = getxattr(zpath("held"), "user.shmzone.holders", v, sizeof(v) - 1);
        cr_assert_gt(n, 0);
        v[n] = 0;
        snprintf(want, sizeof(want), "\npid=%d uid=0 gid=0 attachments=1 ", (int) getpid());
        cr_assert(strstr(v, want) && !strstr(v, " detach_usec=0 "), "%s", v);
        n = listxattr(zpath("held"), list, sizeof(list));
        cr_assert_gt(n, 0);
        cr_assert(memmem(list, (size_t) n, "user.shmzone.holders", sizeof("user.shmzone.holders")), "not listed");
        shmz_zone_close(z1);
        shmz_disconnect(c);
}

/* ---- another user ----------------------------------------------------------------------- */

struct as_nobody {
        const char *path;
        const char *mount;
        const char *cmd;
};

static int nobody_reads(void *arg) {
        struct as_nobody *a = arg;
        char buf[8];
        int fd = open(a->path, O_RDONLY);

        if (fd < 0)
                return errno == EACCES ? 10 : 11;
        return pread(fd, buf, sizeof(buf), 0) == (ssize_t) sizeof(buf) ? 0 : 12;
}

static int nobody_writes(void *arg) {
        struct as_nobody *a = arg;
        int fd = open(a->path, O_WRONLY);

        if (fd < 0)
                return errno == EACCES ? 10 : 11;
        return pwrite(fd, "n", 1, 0) == 1 ? 0 : 12;
}

static int nobody_runs(void *arg) {
        struct as_nobody *a = arg;
        int st = system(a->cmd);

        return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

Test(fuse, another_user_is_refused_where_the_mode_says) {
        struct shmz_client *c = client();
        struct as_nobody a = { .mount = d.mount };
        char cmd[1024];

        make_zone(c, "private", 4096, NULL, 0600);
        a.path = zpath("private");
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_reads, &a), 10);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_writes, &a), 10);
        a.cmd = cmd;
        snprintf(cmd, sizeof(cmd), "cat %s >/dev/null 2>&1", a.path);
        cr_assert_neq(harness_run_as(NOBODY, NOBODY, nobody_runs, &a), 0, "cat as nobody");
        snprintf(cmd, sizeof(cmd), "rm -f %s 2>/dev/null", a.path);
        cr_assert_neq(harness_run_as(NOBODY, NOBODY, nobody_runs, &a), 0, "rm as nobody (sticky zones/)");
        snprintf(cmd, sizeof(cmd), "chmod 666 %s 2>/dev/null", a.path);
        cr_assert_neq(harness_run_as(NOBODY, NOBODY, nobody_runs, &a), 0, "chmod as nobody");
        snprintf(cmd, sizeof(cmd), "ls -l %s >/dev/null", a.path);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_runs, &a), 0, "anyone may list");
        cr_assert_eq(access(a.path, F_OK), 0, "still there");

        cr_assert_eq(shmz_zone_chmod(c, "private", 0604), 0);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_reads, &a), 0);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_writes, &a), 10);
        cr_assert_eq(shmz_zone_chmod(c, "private", 0606), 0);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_writes, &a), 0);

        /* nobody makes its own zone, owns it, may remove it. */
        snprintf(cmd, sizeof(cmd), "truncate -s 8K %s && stat -c %%u %s | grep -qx 65534 && rm %s", zpath("theirs"),
                 zpath("theirs"), zpath("theirs"));
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_runs, &a), 0);
        shmz_disconnect(c);
}

/*
 * The same answer from the kernel (open through the mount), from
 * shmz_zone_open_path (open + ticket + socket) and from shmz_zone_open
 * (socket only), for a matrix of owners, groups, modes and access.
 */
struct matrix_case {
        uid_t uid;
        gid_t gid;
        mode_t mode;
};

struct matrix_arg {
        const char *path;
        const char *socket;
        const char *name;
};

static int matrix_child(void *arg) {
        struct matrix_arg *a = arg;
        struct shmz_client *c = NULL;
        int bits = 0;

        if (shmz_connect(a->socket, &c) < 0)
                return 255;
        for (int w = 0; w < 2; w++) {
                struct shmz_zone *z = NULL;
                int fd, r;

                fd = open(a->path, w ? O_RDWR : O_RDONLY);
                if (fd >= 0) {
                        bits |= 1 << (w * 3);
                        close(fd);
                } else if (errno != EACCES)
                        return 254;
                r = shmz_zone_open_path(a->path, w ? 0 : SHMZ_RDONLY, &z);
                if (r >= 0) {
                        bits |= 2 << (w * 3);
                        /* The mapping gives what was proved, no more. */
                        if (w)
                                ((volatile char *) shmz_zone_base(z))[0] = 1;
                        shmz_zone_close(z);
                } else if (r != -EACCES)
                        return 253;
                r = shmz_zone_open(c, a->name, 0, NULL, w ? 0 : SHMZ_RDONLY, &z);
                if (r >= 0) {
                        bits |= 4 << (w * 3);
                        shmz_zone_close(z);
                } else if (r != -EACCES)
                        return 252;
        }
        shmz_disconnect(c);
        return bits;
}

Test(fuse, permission_matrix_same_answer_everywhere) {
        static const struct matrix_case cases[] = {
                { 0, 0, 0600 },           { 0, 0, 0644 },      { 0, 0, 0606 },           { 0, 0, 0604 },
                { 0, 0, 0602 },           { 0, NOBODY, 0640 }, { 0, NOBODY, 0660 },      { 0, NOBODY, 0620 },
                { 0, NOBODY, 0606 },      { NOBODY, 0, 0600 }, { NOBODY, 0, 0400 },      { NOBODY, 0, 0200 },
                { NOBODY, 0, 0000 },      { NOBODY, 0, 0066 }, { NOBODY, NOBODY, 0060 }, { NOBODY, NOBODY, 0640 },
                { NOBODY, NOBODY, 0006 }, { 0, 0, 0000 },
        };
        struct shmz_client *c = client();
        int readable = 0, writable = 0, refused = 0;

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct matrix_arg a = { .socket = d.socket };
                char name[32];
                int bits, want_r, want_w, bits_r, bits_w;
                unsigned who;

                snprintf(name, sizeof(name), "m%zu", i);
                make_zone(c, name, 4096, NULL, cases[i].mode);
                cr_assert_eq(shmz_zone_chown(c, name, cases[i].uid, cases[i].gid), 0);
                a.path = zpath(name);
                a.name = name;
                bits = harness_run_as(NOBODY, NOBODY, matrix_child, &a);
                cr_assert_lt(bits, 64, "case %zu: unexpected error (%d)", i, bits);
                bits_r = bits & 7;
                bits_w = (bits >> 3) & 7;
                cr_assert(bits_r == 0 || bits_r == 7, "case %zu (uid %u gid %u mode %04o): read differs: %d", i,
                          cases[i].uid, cases[i].gid, cases[i].mode, bits_r);
                cr_assert(bits_w == 0 || bits_w == 7, "case %zu (uid %u gid %u mode %04o): write differs: %d", i,
                          cases[i].uid, cases[i].gid, cases[i].mode, bits_w);
                /* And it is the right answer, from the mode bits. */
                who = cases[i].uid == NOBODY ? 6 : cases[i].gid == NOBODY ? 3 : 0;
                want_r = (cases[i].mode >> who) & 4;
                want_w = want_r && ((cases[i].mode >> who) & 2);
                cr_assert_eq(!!bits_r, !!want_r, "case %zu read", i);
                cr_assert_eq(!!bits_w, !!want_w, "case %zu write", i);
                readable += !!bits_r;
                writable += !!bits_w;
                refused += !bits_r;
        }
        cr_assert(readable > 3 && writable > 3 && refused > 3);
        shmz_disconnect(c);
}

/*
 * shmz_zone_open_path() sends its hello and its request together and reads
 * the hello's reply first: a connection the daemon refuses (over
 * uid_max_clients) fails it cleanly, and it works again once a slot is free.
 */
static int nobody_over_the_limit(void *arg) {
        struct matrix_arg *a = arg;
        struct shmz_client *c = NULL;
        struct shmz_zone *z = NULL;
        int r = -1;

        if (shmz_connect(a->socket, &c) < 0)
                return 1;
        r = shmz_zone_open_path(a->path, SHMZ_RDONLY, &z);
        if (r >= 0)
                return 2; /* a second connection got in */
        if (r != -ENOTCONN)
                return 3;
        shmz_disconnect(c);
        /* The worker gives the slot back when it sees the first connection end. */
        for (int i = 0; i < 500; i++) {
                r = shmz_zone_open_path(a->path, SHMZ_RDONLY, &z);
                if (r != -ENOTCONN)
                        break;
                usleep(10000);
        }
        if (r < 0)
                return 4;
        r = memcmp(shmz_zone_base(z), "pipelined", 10) == 0 ? 0 : 5;
        shmz_zone_close(z);
        return r;
}

Test(fuse, open_path_on_a_refused_connection_fails_cleanly) {
        struct shmz_client *c = client();
        struct matrix_arg a = { .path = zpath("limited"), .socket = d.socket, .name = "limited" };
        struct shmz_zone *z = NULL;

        cr_assert_eq(shmz_zone_open(c, "limited", 4096, NULL, SHMZ_CREATE | SHMZ_EXCL, &z), 0);
        memcpy(shmz_zone_base(z), "pipelined", 10);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_chmod(c, "limited", 0644), 0);
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\nuid_max_clients = 1\n");
        cr_assert_eq(harness_reload(&d), 0);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, nobody_over_the_limit, &a), 0);
        shmz_disconnect(c);
}

Test(fuse, tickets_are_bound_to_their_open) {
        struct shmz_client *c = client();
        struct shmz_msg_zone_ticket t = {}, t2 = {};
        struct shmz_msg_zone_info info;
        struct shmz_daemon_status st;
        int fd, zfd = -EBADF, r;

        make_zone(c, "tk", 4096, NULL, 0644);
        fd = open(zpath("tk"), O_RDONLY);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ioctl(fd, SHMZ_IOC_TICKET, &t), 0);
        cr_assert(t.ticket[0] || t.ticket[1]);
        /* Opened read-only: a write attachment is refused, and the ticket is spent. */
        r = client_request(c, SHMZ_MSG_ZONE_OPEN_TICKET, &t, sizeof(t), &info, sizeof(info), &zfd);
        cr_assert_eq(r, -EACCES);
        t.flags = SHMZ_RDONLY;
        r = client_request(c, SHMZ_MSG_ZONE_OPEN_TICKET, &t, sizeof(t), &info, sizeof(info), &zfd);
        cr_assert_eq(r, -EACCES, "one use only");
        cr_assert_eq(ioctl(fd, SHMZ_IOC_TICKET, &t2), 0);
        cr_assert(memcmp(t.ticket, t2.ticket, sizeof(t.ticket)) != 0);
        /*
         * The release revokes it, but the kernel sends RELEASE after close()
         * returns. Waited for as a condition: with the name gone, the zone
         * leaves zones_unlinked only when the open file and the ticket have
         * both let go of it. (Trying t2 until refused would spend it.)
         */
        cr_assert_eq(shmz_zone_unlink(c, "tk"), 0);
        close(fd);
        for (int i = 0; i < 500; i++) {
                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                if (st.zones_unlinked == 0)
                        break;
                usleep(10000);
        }
        cr_assert_eq(st.zones_unlinked, 0, "the release never came, or left the ticket");
        t2.flags = SHMZ_RDONLY;
        r = client_request(c, SHMZ_MSG_ZONE_OPEN_TICKET, &t2, sizeof(t2), &info, sizeof(info), &zfd);
        cr_assert_eq(r, -EACCES, "revoked at close");
        /* Other commands and files. */
        make_zone(c, "tk", 4096, NULL, 0644);
        fd = open(zpath("tk"), O_RDONLY);
        cr_assert_eq(ioctl(fd, _IOR('z', 2, struct shmz_msg_zone_ticket), &t), -1);
        cr_assert_eq(errno, ENOTTY);
        close(fd);
        snprintf(info.name, sizeof(info.name), "%s/status", d.mount);
        fd = open(info.name, O_RDONLY);
        cr_assert_eq(ioctl(fd, SHMZ_IOC_TICKET, &t), -1);
        close(fd);
        shmz_disconnect(c);
}

/* ---- names, storms, mounts -------------------------------------------------------------- */

Test(fuse, odd_and_long_names) {
        static const char *const bad[] = { "a b",     "new\nline",   "caf\xc3\xa9", "\xff\xfe", "tab\t",
                                           "quo\"te", "back\\slash", "star*",       "-" };
        struct shmz_client *c = client();
        char name[300], out[8192];
        struct stat st;
        int fd;

        for (size_t i = 0; i < ELEMENTSOF(bad) - 1; i++) {
                errno = 0;
                fd = open(zpath(bad[i]), O_CREAT | O_RDWR, 0600);
                cr_assert_eq(fd, -1, "name %zu accepted", i);
                cr_assert_eq(errno, EINVAL, "name %zu: %m", i);
                cr_assert_eq(stat(zpath(bad[i]), &st), -1);
                cr_assert_eq(errno, ENOENT);
        }
        /* "-" is a valid name; tools need "--" or ./ but the view does not care. */
        cr_assert_eq(run(NULL, 0, "truncate -s 4K -- %s", zpath("-")), 0);
        /* 200 bytes: the longest name; 201 and 255: too long; 256: the kernel's own limit. */
        memset(name, 'n', sizeof(name));
        name[200] = 0;
        cr_assert_eq(run(NULL, 0, "truncate -s 4K %s", zpath(name)), 0);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones | awk '{ print length($0) }' | sort -n | tail -1", d.mount), 0);
        cr_assert_str_eq(out, "200\n");
        name[201] = 0;
        name[200] = 'n';
        cr_assert_eq(open(zpath(name), O_CREAT | O_RDWR, 0600), -1);
        cr_assert_eq(errno, ENAMETOOLONG);
        memset(name, 'n', 256);
        name[256] = 0;
        cr_assert_eq(open(zpath(name), O_CREAT | O_RDWR, 0600), -1);
        cr_assert_eq(errno, ENAMETOOLONG);
        cr_assert_eq(run(out, sizeof(out), "ls %s/zones | wc -l", d.mount), 0);
        cr_assert_str_eq(out, "2\n");
        /* The directory refuses what is not a zone. */
        cr_assert_neq(run(NULL, 0, "mkdir %s 2>/dev/null", zpath("dir")), 0);
        cr_assert_neq(run(NULL, 0, "touch %s/newfile 2>/dev/null", d.mount), 0);
        cr_assert_neq(run(NULL, 0, "rm -f %s/status 2>/dev/null", d.mount), 0);
        shmz_disconnect(c);
}

Test(fuse, storm_of_creates_and_deletes_while_listing) {
        pid_t lister, churner;
        char out[4096];
        int st;

        lister = fork();
        cr_assert_geq(lister, 0);
        if (lister == 0) {
                char cmd[512];

                snprintf(cmd, sizeof(cmd), "ls -l %s/zones >/dev/null 2>&1; test $? -le 1", d.mount);
                for (int i = 0; i < 200; i++) {
                        int s = system(cmd);

                        if (!WIFEXITED(s) || WEXITSTATUS(s) != 0)
                                _exit(1);
                }
                _exit(0);
        }
        churner = fork();
        cr_assert_geq(churner, 0);
        if (churner == 0) {
                struct shmz_client *c = NULL;
                char name[32];

                if (shmz_connect(d.socket, &c) < 0)
                        _exit(2);
                for (int i = 0; i < 400; i++) {
                        struct shmz_zone *z = NULL;
                        int fd;

                        snprintf(name, sizeof(name), "s%d", i % 37);
                        if (i % 2) {
                                /* Through the mount: create, size, remove. */
                                fd = open(zpath(name), O_CREAT | O_RDWR, 0644);
                                if (fd >= 0) {
                                        (void) ftruncate(fd, 4096);
                                        close(fd);
                                }
                                (void) unlink(zpath(name));
                        } else {
                                if (shmz_zone_open(c, name, 4096, NULL, SHMZ_CREATE, &z) >= 0)
                                        shmz_zone_close(z);
                                if (i % 3)
                                        (void) shmz_zone_unlink(c, name);
                        }
                }
                shmz_disconnect(c);
                _exit(0);
        }
        cr_assert_eq(waitpid(churner, &st, 0), churner);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        cr_assert_eq(waitpid(lister, &st, 0), lister);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "ls failed during the storm");
        /* Afterwards the mount and the socket agree. */
        {
                struct shmz_client *c = client();
                struct shmz_daemon_status ds;

                cr_assert_eq(shmz_daemon_status(c, &ds), 0);
                cr_assert_eq(run(out, sizeof(out), "ls %s/zones | wc -l", d.mount), 0);
                cr_assert_eq((uint64_t) atoll(out), ds.zones, "ls %s vs %" PRIu64, out, ds.zones);
                shmz_disconnect(c);
        }
        cr_assert_eq(kill(d.pid, 0), 0, "daemon alive");
}

static bool mounted(const char *path) {
        char out[256];

        return run(out, sizeof(out), "findmnt -n -o FSTYPE --mountpoint %s", path) == 0 && strstr(out, "fuse.shmzone");
}

Test(fuse, sigterm_unmounts) {
        int st;

        cr_assert(mounted(d.mount));
        cr_assert_eq(kill(d.pid, SIGTERM), 0);
        cr_assert_eq(waitpid(d.pid, &st, 0), d.pid);
        d.pid = 0;
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        cr_assert(!mounted(d.mount), "the mount is gone after SIGTERM");
}

Test(fuse, stale_mount_of_a_crashed_daemon_is_cleared) {
        struct stat st;
        int status;

        cr_assert_eq(kill(d.pid, SIGKILL), 0);
        cr_assert_eq(waitpid(d.pid, &status, 0), d.pid);
        d.pid = 0;
        cr_assert_eq(stat(d.mount, &st), -1);
        cr_assert_eq(errno, ENOTCONN, "a dead mount: %m");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "restart: %s", harness_log(&d));
        cr_assert_eq(stat(zpath(""), &st), 0, "the new mount answers");
        cr_assert(strstr(harness_log(&d), "Detached a dead FUSE mount"), "%s", harness_log(&d));
        cr_assert_eq(run(NULL, 0, "findmnt -n --mountpoint %s | wc -l | grep -qx 1", d.mount), 0,
                     "one mount, not two stacked");
}

Test(fuse, allocator_figures_in_xattr) {
        struct shmz_client *c = client();
        struct shmz_zone *z;
        char out[8192];
        void *p[10];

        cr_assert_eq(shmz_zone_open(c, "slabbed", 1 << 20, NULL, SHMZ_CREATE, &z), 0);
        /* Raw bytes only: no allocator, no figures. */
        cr_assert_eq(run(out, sizeof(out), "getfattr -d -m - %s 2>&1", zpath("slabbed")), 0);
        cr_assert_null(strstr(out, "user.shmzone.alloc"), "%s", out);
        for (int i = 0; i < 10; i++)
                cr_assert_not_null(p[i] = shmz_alloc(z, 84));
        shmz_free(z, p[0]);
        cr_assert_eq(run(out, sizeof(out), "getfattr --only-values -n user.shmzone.alloc %s", zpath("slabbed")), 0);
        cr_assert(strstr(out, "pages_total="), "%s", out);
        /* 84-byte objects land in the 88-byte class: 10 requests, 9 in use. */
        cr_assert(strstr(out, "class=88 ") && strstr(out, " used=9 reqs=10 fails=0"), "%s", out);
        cr_assert_eq(run(out, sizeof(out), "getfattr -d -m - %s 2>&1", zpath("slabbed")), 0);
        cr_assert(strstr(out, "user.shmzone.alloc"), "%s", out);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(fuse, reading_a_sparse_zone_allocates_nothing) {
        struct shmz_client *c = client();
        struct shmz_msg_zone_open req = { .size = 16u << 20, .flags = SHMZ_CREATE };
        struct shmz_msg_zone_info info;
        struct stat before, after;
        char out[4096];
        int fd = -1;

        /* The daemon's memfd itself, to see how much memory the zone really holds. */
        strncpy_buf(req.name, sizeof(req.name), "sparse");
        cr_assert_eq(client_request(c, SHMZ_MSG_ZONE_OPEN, &req, sizeof(req), &info, sizeof(info), &fd), 0);
        cr_assert_eq(fstat(fd, &before), 0);
        cr_assert_eq(run(out, sizeof(out), "dd if=%s of=/dev/null bs=1M 2>&1", zpath("sparse")), 0, "%s", out);
        cr_assert_eq(fstat(fd, &after), 0);
        cr_assert_eq(after.st_blocks, before.st_blocks, "a read committed %lld blocks",
                     (long long) (after.st_blocks - before.st_blocks));

        /* Data and holes mixed in one request: the bytes still come back right. */
        cr_assert_eq(run(out, sizeof(out),
                         "head -c 300000 /dev/urandom > %s/data && dd if=%s/data of=%s bs=4096 seek=100 "
                         "conv=notrunc 2>/dev/null && dd if=%s bs=1M 2>/dev/null | cmp -s -i 409600:0 -n 300000 - "
                         "%s/data",
                         d.dir, d.dir, zpath("sparse"), zpath("sparse"), d.dir),
                     0, "%s", out);
        cr_assert_eq(run(out, sizeof(out), "dd if=%s bs=1M 2>/dev/null | head -c 409600 | tr -d '\\000' | wc -c",
                         zpath("sparse")),
                     0);
        cr_assert_str_eq(out, "0\n", "bytes before the data are not zero");
        close(fd);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ true);
}
