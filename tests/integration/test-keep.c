/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * No zone is lost by an operator's ordinary action: --check-config, a
 * restart with a config the daemon cannot use (it keeps the zones systemd's
 * fd store gave back and says it runs degraded), and a reload that waits and
 * returns the file's errors (shmzctl reload, the unit's ExecReload=). The
 * harness plays systemd, as in test-restart.c.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone.h"
#include "util.h"
#include "zone-header.h"

static struct daemon_proc d;

#define GOOD_CONFIG "[daemon]\nmemory_budget = 64M\n[zone decl]\nsize = 64K\ntag = d\nmode = 0644\n"
/* Three errors, on lines 2, 4 and 6. */
#define BAD_CONFIG                                                                                                     \
        "[daemon]\nmemory_budget = lots\n[zone decl]\nsize = 64K\ntag = d\nmode = 0644\n"                              \
        "bogus = 1\n[zone other]\nsize = -1\n"

static void start(void) {
        harness_init(&d, GOOD_CONFIG);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        harness_stop_clean(&d);
}

TestSuite(keep, .init = start, .fini = stop, .timeout = 90);

/* Runs a shell command line; its stdout and stderr in out; returns its exit status. */
_printf_(3, 4) static int run(char *out, size_t size, const char *fmt, ...) {
        char cmd[1024];
        va_list ap;
        FILE *p;
        size_t n = 0;
        int status;

        va_start(ap, fmt);
        (void) vsnprintf(cmd, sizeof(cmd), fmt, ap);
        va_end(ap);
        p = popen(cmd, "r");
        cr_assert_not_null(p);
        while (n + 1 < size) {
                size_t k = fread(out + n, 1, size - n - 1, p);

                if (k == 0)
                        break;
                n += k;
        }
        out[n] = 0;
        status = pclose(p);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

static const char *tool(const char *var) {
        const char *p = getenv(var);

        cr_assert_not_null(p, "$%s is not set", var);
        return p;
}

static void write_file(const char *path, const char *text) {
        FILE *f = fopen(path, "we");

        cr_assert_not_null(f);
        cr_assert_geq(fputs(text, f), 0);
        cr_assert_eq(fclose(f), 0);
}

Test(keep, check_config) {
        char out[4096], want[1024], path[256];

        cr_assert_eq(run(out, sizeof(out), "%s --check-config --config %s 2>&1", tool("SHMZONED"), d.config), 0, "%s",
                     out);
        snprintf(want, sizeof(want), "%s: OK\n", d.config);
        cr_expect_str_eq(out, want);

        /* Every error, as FILE:LINE: message, nothing else; exit 1. */
        snprintf(path, sizeof(path), "%s/bad.conf", d.dir);
        write_file(path, BAD_CONFIG);
        cr_assert_eq(run(out, sizeof(out), "%s --check-config --config %s 2>&1", tool("SHMZONED"), path), 1, "%s", out);
        snprintf(want, sizeof(want),
                 "%1$s:2: memory_budget: bad size 'lots' (a number with an optional K, M, G or T suffix)\n"
                 "%1$s:7: zone 'decl': unknown key 'bogus'\n"
                 "%1$s:9: zone 'other': bad size '-1' (a number with an optional K, M, G or T suffix)\n",
                 path);
        cr_expect_str_eq(out, want);

        /* An explicit file must exist, as for a start. */
        snprintf(path, sizeof(path), "%s/missing.conf", d.dir);
        cr_assert_eq(run(out, sizeof(out), "%s --check-config --config %s 2>&1", tool("SHMZONED"), path), 1, "%s", out);
        snprintf(want, sizeof(want), "%s: No such file or directory\n", path);
        cr_expect_str_eq(out, want);
        /* It checked, it did not start: the running daemon still serves alone. */
        cr_expect_eq(access(d.socket, F_OK), 0);
}

/*
 * Stops the daemon (SIGKILL: as a crash) and starts it again with the fds it
 * stored, as systemctl restart (Restart=on-failure) does.
 */
static int restart_after(bool crash) {
        harness_stop_for_restart(&d, crash);
        return harness_start(&d, NULL, true);
}

static int restart(void) {
        return restart_after(false);
}

static void expect_log(const char *line) {
        cr_expect_eq(harness_wait_log(&d, line, 5), 0, "no '%s' in the log:\n%s", line, harness_log(&d));
}

/* A file from the view, NUL-terminated, in buf. */
static void read_view(const char *name, char *buf, size_t size) {
        char path[256];
        ssize_t n;
        int fd;

        snprintf(path, sizeof(path), "%s/%s", d.mount, name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        cr_assert_geq(fd, 0, "%s: %s", path, strerror(errno));
        n = read(fd, buf, size - 1);
        cr_assert_geq(n, 0);
        buf[n] = 0;
        close(fd);
}

Test(keep, restart_with_bad_config_keeps_zones) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_zone *z;
        struct shmz_zone_stat st;
        char metrics[16384];

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "mine", 1 << 20, "m", SHMZ_CREATE, &z), 0);
        memset(shmz_zone_base(z), 0x5a, 1 << 20);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_open(c, "decl", 0, "d", 0, &z), 0);
        memcpy(shmz_zone_base(z), "declared bytes", 14);
        shmz_zone_close(z);
        shmz_disconnect(c);

        harness_write_config(&d, BAD_CONFIG);
        cr_assert_eq(restart(), 0, "the daemon gave up its zones for a bad config: %s", harness_log(&d));
        /* Every error at err, and what it does instead. */
        expect_log("<3>");
        cr_expect(strstr(harness_log(&d), ":2: memory_budget: bad size 'lots'"), "%s", harness_log(&d));
        cr_expect(strstr(harness_log(&d), ":9: zone 'other': bad size '-1'"), "%s", harness_log(&d));
        expect_log("refused: serving the 2 zone(s) kept from the previous run with built-in defaults");
        cr_expect(strstr(d.notified, "STATUS=Degraded: "), "no degraded status: %s", d.notified);
        read_view("metrics", metrics, sizeof(metrics));
        cr_expect(strstr(metrics, "\nshmzone_config_degraded 1\n"), "%s", metrics);
        cr_expect(strstr(metrics, "\nshmzone_config_errors 3\n"), "%s", metrics);

        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "mine", 0, "m", 0, &z), 0);
        for (size_t i = 0; i < (1 << 20); i++)
                cr_assert_eq(((unsigned char *) shmz_zone_base(z))[i], 0x5a, "byte %zu", i);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_open(c, "decl", 0, "d", 0, &z), 0);
        cr_expect_eq(memcmp(shmz_zone_base(z), "declared bytes", 14), 0);
        shmz_zone_close(z);
        /* Declared zones stay declared: nothing was retired for want of a config. */
        cr_assert_eq(shmz_zone_stat(c, "decl", &st), 0);
        cr_expect(st.flags & SHMZ_ZONE_INFO_DECLARED);
        /* It serves: new zones too. */
        cr_assert_eq(shmz_zone_open(c, "new", 65536, "", SHMZ_CREATE, &z), 0);
        shmz_zone_close(z);

        /* A fixed file, reloaded: applied, no longer degraded. */
        harness_write_config(&d, GOOD_CONFIG "[zone more]\nsize = 64K\n");
        cr_assert_eq(harness_reload(&d), 0);
        expect_log("applied; no longer degraded.");
        cr_expect_null(strstr(d.notified, "Degraded"), "%s", d.notified);
        read_view("metrics", metrics, sizeof(metrics));
        cr_expect(strstr(metrics, "\nshmzone_config_degraded 0\n"), "%s", metrics);
        cr_expect(strstr(metrics, "\nshmzone_config_errors 0\n"), "%s", metrics);
        cr_expect_eq(shmz_zone_stat(c, "more", &st), 0);
        cr_assert_eq(shmz_zone_open(c, "decl", 0, "d", 0, &z), 0);
        cr_expect_eq(memcmp(shmz_zone_base(z), "declared bytes", 14), 0);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

/* With nothing to lose, a bad file still keeps the daemon from starting. */
Test(keep, first_start_with_bad_config_refused) {
        cr_assert_eq(harness_stop(&d), 0);
        harness_drain_notify(&d);
        for (size_t i = 0; i < d.n_stored; i++)
                close(d.stored_fds[i]);
        d.n_stored = 0;
        harness_write_config(&d, BAD_CONFIG);
        cr_assert_eq(harness_start(&d, NULL, false), 1, "%s", harness_log(&d));
        expect_log(":2: memory_budget: bad size 'lots'");
        expect_log("refused; not starting.");
}

Test(keep, reload_returns_errors) {
        struct shmz_client *c;
        struct shmz_zone_stat st;
        char out[4096], want[1024];

        /* Refused: exit 1, every error on its output, the running config kept. */
        harness_write_config(&d, BAD_CONFIG);
        harness_drain_notify(&d);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s reload 2>&1", tool("SHMZCTL"), d.socket), 1, "%s", out);
        snprintf(want, sizeof(want),
                 "%1$s:2: memory_budget: bad size 'lots' (a number with an optional K, M, G or T suffix)\n"
                 "%1$s:7: zone 'decl': unknown key 'bogus'\n"
                 "%1$s:9: zone 'other': bad size '-1' (a number with an optional K, M, G or T suffix)\n"
                 "shmzctl reload: the configuration was refused; shmzoned runs the one it had.\n",
                 d.config);
        cr_expect_str_eq(out, want);
        cr_expect_eq(harness_wait_notify(&d, "READY=1", 5), 0);
        cr_expect(strstr(d.notified, "STATUS=Last reload refused: "), "%s", d.notified);
        expect_log("Reload refused; keeping the running configuration.");
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_expect_eq(shmz_zone_stat(c, "decl", &st), 0);
        cr_expect_eq(shmz_zone_stat(c, "other", &st), -ENOENT);

        /* Only root reloads. */
        cr_assert_eq(run(out, sizeof(out), "setpriv --reuid=65534 --regid=65534 --clear-groups %s -s %s reload 2>&1",
                         tool("SHMZCTL"), d.socket),
                     4, "%s", out);

        /* A good one: exit 0, applied, the status line clean again. */
        harness_write_config(&d, GOOD_CONFIG "[zone other]\nsize = 64K\n");
        harness_drain_notify(&d);
        cr_assert_eq(run(out, sizeof(out), "%s -s %s reload 2>&1", tool("SHMZCTL"), d.socket), 0, "%s", out);
        cr_expect_str_empty(out);
        cr_expect_eq(shmz_zone_stat(c, "other", &st), 0);
        cr_expect_eq(harness_wait_notify(&d, "READY=1", 5), 0);
        cr_expect_null(strstr(d.notified, "refused"), "%s", d.notified);

        /* A declaration refused (a changed size) applies the rest: exit 0, said on stderr. */
        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\n[zone decl]\nsize = 128K\ntag = d\nmode = 0644\n");
        cr_assert_eq(run(out, sizeof(out), "%s -s %s reload 2>&1", tool("SHMZCTL"), d.socket), 0, "%s", out);
        cr_expect(strstr(out, "1 zone declaration(s) refused"), "%s", out);
        cr_expect_eq(shmz_zone_stat(c, "other", &st), -ENOENT);
        shmz_disconnect(c);
}

/* The harness's fd store entry of the zone called name. */
static int stored_fd(const char *name) {
        for (size_t i = 0; i < d.n_stored; i++) {
                const char *s = d.stored_names[i];
                size_t l = strlen(s), k = strlen(name);

                if (l > k && s[l - k - 1] == '.' && streq(s + l - k, name) && !streq(s, "shmz.history"))
                        return d.stored_fds[i];
        }
        return -1;
}

static int as_other_user(void *userdata) {
        struct shmz_client *c;
        struct shmz_zone *z;

        if (shmz_connect(d.socket, &c) < 0)
                return 10;
        /* The name is the zone's: not free to create, not this uid's to remove. */
        if (shmz_zone_open(c, "shared", 65536, "", SHMZ_CREATE | SHMZ_EXCL, &z) != -EEXIST)
                return 11;
        if (shmz_zone_unlink(c, "shared") != -EPERM)
                return 12;
        shmz_disconnect(c);
        return 0;
}

/*
 * F14: a writer of a 0666 zone zeroes its header. Across a restart the zone
 * is taken back under the identity its FDNAME records, the header rewritten;
 * before, it was dropped from the store and its name was free for anybody.
 */
Test(keep, damaged_header_does_not_delete_zone) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_zone *z;
        struct shmz_zone_stat st, was;
        struct shmz_zone_header h;
        char zeros[SHMZ_ZONE_HEADER_SIZE / 2] = {};
        int fd;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "shared", 1 << 20, "tg", SHMZ_CREATE, &z), 0);
        memset(shmz_zone_base(z), 0xc3, 1 << 20);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_chown(c, "shared", 1000, 1000), 0);
        cr_assert_eq(shmz_zone_chmod(c, "shared", 0666), 0);
        cr_assert_eq(shmz_zone_stat(c, "shared", &was), 0);
        shmz_disconnect(c);

        /* What any writer can do: the first 512 bytes (magic, sizes, ACL copy, name, tag) zeroed. */
        harness_drain_notify(&d);
        fd = stored_fd("shared");
        cr_assert_geq(fd, 0);
        cr_assert_eq(pwrite(fd, zeros, sizeof(zeros), 0), (ssize_t) sizeof(zeros));

        cr_assert_eq(restart(), 0, "%s", harness_log(&d));
        expect_log("Stored zone 'shmz.1000.1000.666.0.0.shared': its header was damaged: the daemon's fields were "
                   "rewritten; its name, owner, mode and bytes are kept.");
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_stat(c, "shared", &st), 0);
        cr_expect_eq(st.uid, 1000);
        cr_expect_eq(st.gid, 1000);
        cr_expect_eq(st.mode, 0666);
        cr_expect_str_eq(st.tag, "tg", "the tag comes from the history record, not the header");
        cr_expect_eq(st.ino, was.ino);
        cr_expect_eq(st.created_usec, was.created_usec);
        /* The library checks the header at every attach: it describes the zone again. */
        cr_assert_eq(shmz_zone_open(c, "shared", 0, "tg", 0, &z), 0);
        for (size_t i = 0; i < (1 << 20); i++)
                cr_assert_eq(((unsigned char *) shmz_zone_base(z))[i], 0xc3, "byte %zu", i);
        shmz_zone_close(z);
        cr_assert_eq(pread(stored_fd("shared"), &h, sizeof(h), 0), (ssize_t) sizeof(h));
        cr_expect_eq(h.magic, SHMZ_ZONE_MAGIC);
        cr_expect_str_eq(h.name, "shared");
        cr_expect_eq(h.uid, 1000);
        cr_expect_eq(h.mode, 0666);
        cr_expect_eq(h.created_usec, was.created_usec);
        /* And nobody else can take its name. */
        cr_expect_eq(harness_run_as(1001, 1001, as_other_user, NULL), 0);
        shmz_disconnect(c);
}

/* JSON without its spaces, to look for "key":value whatever the printer's style. */
static char *squeeze(char *s) {
        char *w = s;

        for (const char *r = s; *r; r++)
                if (*r != ' ' && *r != '\n')
                        *w++ = *r;
        *w = 0;
        return s;
}

/* Creation time, generation, inode number, tag and creator pid, across a restart and a crash. */
Test(keep, history_survives_restart_and_crash) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_zone *z;
        struct shmz_zone_stat a, b, gone, decl, declb, fresh;
        char tag[SHMZ_TAG_BUF] = "forged", out[8192], want[64];

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "gone", 65536, "", SHMZ_CREATE, &z), 0);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_stat(c, "gone", &gone), 0);
        cr_assert_eq(shmz_zone_open(c, "hist", 65536, "t1", SHMZ_CREATE, &z), 0);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_unlink(c, "gone"), 0);
        cr_assert_eq(shmz_zone_chmod(c, "hist", 0640), 0);
        cr_assert_eq(shmz_zone_stat(c, "hist", &a), 0);
        cr_assert_eq(shmz_zone_stat(c, "decl", &decl), 0);
        shmz_disconnect(c);
        /* A writer changes the header's tag: the record's is the one that counts. */
        harness_drain_notify(&d);
        cr_assert_eq(pwrite(stored_fd("hist"), tag, sizeof(tag), offsetof(struct shmz_zone_header, tag)),
                     (ssize_t) sizeof(tag));

        for (int crash = 0; crash < 2; crash++) {
                cr_assert_eq(restart_after(crash), 0, "%s", harness_log(&d));
                c = harness_connect(&d);
                cr_assert_not_null(c);
                cr_assert_eq(shmz_zone_stat(c, "hist", &b), 0);
                cr_expect_eq(b.ino, a.ino, "%s: inode %lu, was %lu", crash ? "crash" : "restart", (unsigned long) b.ino,
                             (unsigned long) a.ino);
                cr_expect_eq(b.generation, a.generation);
                cr_expect_eq(b.created_usec, a.created_usec);
                cr_expect_eq(b.ctime_usec, a.ctime_usec);
                cr_expect_eq(b.mtime_usec, a.mtime_usec);
                cr_expect_str_eq(b.tag, "t1");
                /* The creator's pid, as ipcs -p shows a creator that may have gone: this process made it. */
                cr_assert_eq(run(out, sizeof(out), "%s --socket %s --json show hist 2>&1", getenv("SHMZCTL"), d.socket),
                             0, "%s", out);
                snprintf(want, sizeof(want), "\"creator_pid\":%d,", (int) getpid());
                cr_expect(strstr(squeeze(out), want), "%s: %s", crash ? "crash" : "restart", out);
                cr_assert_eq(shmz_zone_stat(c, "decl", &declb), 0);
                cr_expect_eq(declb.ino, decl.ino);
                cr_expect_eq(declb.generation, decl.generation);
                cr_expect_eq(declb.created_usec, decl.created_usec);
                shmz_disconnect(c);
        }
        /* Numbers are never given twice: not even those of a zone that went before the restart. */
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "fresh", 65536, "", SHMZ_CREATE, &z), 0);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_stat(c, "fresh", &fresh), 0);
        cr_expect_gt(fresh.ino, gone.ino);
        cr_expect_gt(fresh.ino, a.ino);
        cr_expect_gt(fresh.generation, gone.generation);
        shmz_disconnect(c);
}

/* Empties the harness's fd store, as systemd does when the service stops (not restarts). */
static void forget_store(void) {
        harness_drain_notify(&d);
        for (size_t i = 0; i < d.n_stored; i++)
                close(d.stored_fds[i]);
        d.n_stored = 0;
}

static void make_copy_of(const char *size);

static void persist_config(const char *size) {
        char text[1024];

        snprintf(text, sizeof(text),
                 "[daemon]\nmemory_budget = 64M\nstate_directory = %s/state\n"
                 "[zone p]\nsize = %s\ntag = pt\nmode = 0644\npersist = yes\n",
                 d.dir, size);
        harness_write_config(&d, text);
}

static void copy_path(char *buf, size_t size, const char *suffix) {
        snprintf(buf, size, "%s/state/p.zone%s", d.dir, suffix);
}

/* Files in the state directory whose names start with prefix. */
static unsigned count_state(const char *prefix) {
        char cmd[300], out[64];

        snprintf(cmd, sizeof(cmd), "ls -A %s/state | grep -c '^%s'", d.dir, prefix);
        (void) run(out, sizeof(out), "%s", cmd);
        return (unsigned) strtoul(out, NULL, 10);
}

Test(keep, persisted_zone_survives_stop) {
        struct shmz_client *c;
        struct shmz_zone *z, *mine;
        struct shmz_zone_stat a, b;
        char path[256];
        void *obj;
        int fd;

        persist_config("1M");
        cr_assert_eq(harness_reload(&d), 0);
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "mine", 65536, "", SHMZ_CREATE, &mine), 0);
        shmz_zone_close(mine);
        cr_assert_eq(shmz_zone_open(c, "p", 0, "pt", 0, &z), 0);
        cr_assert_eq(shmz_zone_stat(c, "p", &a), 0);
        /* Bytes, an allocation, and the zone lock held by us when the copy is made. */
        memset((char *) shmz_zone_base(z) + 512 * 1024, 0x6b, 4096);
        obj = shmz_alloc(z, 1000);
        cr_assert_not_null(obj);
        memcpy(obj, "allocated", 10);
        for (int i = 0; i < 50; i++)
                cr_assert_not_null(shmz_alloc(z, 24 + (size_t) i * 40));
        /* As a writer that dies in the middle of an allocation leaves it: a page descriptor's count lies. */
        ((unsigned char *) shmz_zone_base(z))[2] ^= 0x5;
        cr_assert_eq(shmz_zone_check(z), -EUCLEAN);
        cr_assert_eq(shmz_mutex_lock(shmz_zone_mutex(z)), 0);

        harness_drain_notify(&d);
        cr_assert_eq(harness_stop(&d), 0);
        expect_log("Zone 'p': written to ");
        /* The zone only systemd would have kept: named, with its bytes. */
        expect_log("Stopping: 1 zone(s), 69632 bytes, are kept by systemd's fd store only: a restart keeps them, a "
                   "stop or "
                   "reboot discards them: mine.");
        copy_path(path, sizeof(path), "");
        cr_assert_eq(access(path, F_OK), 0, "no copy at %s", path);
        /* A crash in the middle of an earlier write left a temporary file: it is never read. */
        copy_path(path, sizeof(path), ".tmp");
        fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        cr_assert_geq(fd, 0);
        cr_assert_eq(write(fd, "half", 4), 4);
        close(fd);
        shmz_mutex_unlock(shmz_zone_mutex(z));
        shmz_zone_close(z);
        shmz_disconnect(c);

        /* systemctl stop, then start: the fd store is empty, the copy is what is left. */
        forget_store();
        cr_assert_eq(harness_start(&d, NULL, false), 0, "%s", harness_log(&d));
        expect_log("Zone 'p': restored from ");
        expect_log("Zone 'p': its allocator was in the middle of a change when it was written; repaired.");
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_expect_eq(shmz_zone_stat(c, "mine", &b), -ENOENT);
        cr_assert_eq(shmz_zone_stat(c, "p", &b), 0);
        cr_expect_eq(b.ino, a.ino);
        cr_expect_eq(b.generation, a.generation);
        cr_expect_eq(b.created_usec, a.created_usec);
        cr_assert_eq(shmz_zone_open(c, "p", 0, "pt", 0, &z), 0);
        cr_expect_eq(shmz_zone_existed(z), 1);
        for (size_t i = 0; i < 4096; i++)
                cr_assert_eq(((unsigned char *) shmz_zone_base(z))[512 * 1024 + i], 0x6b, "byte %zu", i);
        cr_expect_str_eq(obj = shmz_pointer(z, shmz_offset(z, obj)), "allocated");
        /* Its lock is free (no previous owner to report), its allocator whole. */
        cr_expect_eq(shmz_mutex_trylock(shmz_zone_mutex(z)), 0);
        shmz_mutex_unlock(shmz_zone_mutex(z));
        cr_expect_eq(shmz_zone_check(z), 0);
        cr_expect_not_null(shmz_alloc(z, 100));
        shmz_zone_close(z);
        shmz_disconnect(c);
        /* And it is in the fd store now, as every zone: a restart keeps it without the copy. */
        harness_drain_notify(&d);
        cr_expect_geq(stored_fd("p"), 0);
}

/* A reload that declares a persisted zone again takes its copy back, rather than overwrite it with a new zone. */
Test(keep, reload_restores_a_declared_copy) {
        struct shmz_client *c;
        struct shmz_zone *z;

        make_copy_of("64K");
        forget_store();
        harness_write_config(&d, GOOD_CONFIG);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "%s", harness_log(&d));
        persist_config("64K");
        cr_assert_eq(harness_reload(&d), 0);
        expect_log("Zone 'p': restored from ");
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "p", 0, "pt", 0, &z), 0);
        cr_expect_eq(((unsigned char *) shmz_zone_base(z))[65535], 0x77);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

Test(keep, persist_interval_writes_while_running) {
        char path[256], text[512];

        snprintf(text, sizeof(text),
                 "[daemon]\npersist_interval = 1\nstate_directory = %s/state\n[zone p]\nsize = 64K\ntag = pt\n"
                 "persist = yes\n",
                 d.dir);
        harness_write_config(&d, text);
        cr_assert_eq(harness_reload(&d), 0);
        copy_path(path, sizeof(path), "");
        for (int i = 0; i < 100 && access(path, F_OK) < 0; i++)
                usleep(100000);
        cr_expect_eq(access(path, F_OK), 0, "not written within 10 s of a 1 s interval");
}

/* A copy damaged in one of three ways: refused, moved aside, the zone made afresh. */
static void expect_refused(const char *why, const char *size) {
        struct shmz_client *c;
        struct shmz_zone *z;
        char line[256];

        forget_store();
        persist_config(size);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "%s", harness_log(&d));
        snprintf(line, sizeof(line), "p.zone %s; not restored, kept as %s/state/p.zone.bad-", why, d.dir);
        expect_log(line);
        cr_expect_eq(count_state("p.zone.bad-"), 1);
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "p", 0, "pt", 0, &z), 0);
        cr_expect_eq(((unsigned char *) shmz_zone_base(z))[100], 0, "half-restored");
        shmz_zone_close(z);
        shmz_disconnect(c);
        cr_assert_eq(harness_stop(&d), 0);
        /* Moved aside for good: the next copy is the new zone's. */
        cr_assert_eq(run(line, sizeof(line), "rm %s/state/p.zone.bad-*", d.dir), 0);
}

/* Writes a copy of p with 0x77 in its bytes, stops the daemon. */
static void make_copy(void) {
        make_copy_of("64K");
}

static void make_copy_of(const char *size) {
        struct shmz_client *c;
        struct shmz_zone *z;

        if (d.pid > 0)
                cr_assert_eq(harness_stop(&d), 0);
        persist_config(size);
        forget_store();
        cr_assert_eq(harness_start(&d, NULL, false), 0, "%s", harness_log(&d));
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "p", 0, "pt", 0, &z), 0);
        memset(shmz_zone_base(z), 0x77, 65536);
        shmz_zone_close(z);
        shmz_disconnect(c);
        cr_assert_eq(harness_stop(&d), 0);
}

static void flip_byte(const char *path, off_t off) {
        unsigned char b;
        int fd = open(path, O_RDWR | O_CLOEXEC);

        cr_assert_geq(fd, 0);
        cr_assert_eq(pread(fd, &b, 1, off), 1);
        b ^= 0x10;
        cr_assert_eq(pwrite(fd, &b, 1, off), 1);
        close(fd);
}

Test(keep, bad_copies_refused_and_kept_aside) {
        char path[256];
        struct stat st;

        cr_assert_eq(harness_stop(&d), 0);
        copy_path(path, sizeof(path), "");

        make_copy();
        cr_assert_eq(stat(path, &st), 0);
        cr_assert_eq(truncate(path, st.st_size - 4096), 0);
        expect_refused("is truncated", "64K");

        make_copy();
        flip_byte(path, 512 + 4096 + 100);
        expect_refused("fails its checksum", "64K");

        make_copy();
        flip_byte(path, 40);
        expect_refused("has a header that fails its checksum", "64K");

        make_copy();
        expect_refused("does not fit the declaration (name, size or tag changed since it was written)", "128K");
        cr_assert_eq(harness_start(&d, NULL, false), 0);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, true, true);
}
