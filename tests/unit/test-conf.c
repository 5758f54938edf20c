/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The daemon's config file parser (daemon/conf-file.c): a good file and every
 * kind of bad line. Errors are logged to stderr as "<3>path:line: message";
 * the tests catch fd 2 around config_load() to hold it to the line it names.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define HAVE_LSAN 1
#endif

#include "conf-file.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

static char dir[] = "/tmp/test-conf.XXXXXX";
static char path[sizeof(dir) + 32];
static char log_buf[4096];

static void setup(void) {
        cr_assert_not_null(mkdtemp(dir));
        (void) snprintf(path, sizeof(path), "%s/shmzone.conf", dir);
}

static void teardown(void) {
        struct dirent *de;
        DIR *d = opendir(dir);

        if (!d)
                return;
        while ((de = readdir(d)))
                if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
                        (void) unlinkat(dirfd(d), de->d_name, 0);
        closedir(d);
        (void) rmdir(dir);
}

TestSuite(conf, .init = setup, .fini = teardown, .timeout = 30);

/* LeakSanitizer's report at exit does not fail a criterion test: ask it now. */
static void expect_no_leaks(void) {
#ifdef HAVE_LSAN
        cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "leaked (LeakSanitizer's report above)");
#endif
}

static void write_file(const char *text) {
        FILE *f = fopen(path, "we");

        cr_assert_not_null(f);
        cr_assert_eq(fputs(text, f) >= 0, true);
        cr_assert_eq(fclose(f), 0);
}

/* config_load() on text, with what it logged in log_buf. */
static int load(const char *text, struct config **ret) {
        char log_path[sizeof(dir) + 16];
        int saved, fd, r;
        ssize_t n;

        if (text)
                write_file(text);
        (void) snprintf(log_path, sizeof(log_path), "%s/stderr", dir);
        fd = open(log_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        cr_assert_geq(fd, 0);
        fflush(stderr);
        saved = dup(STDERR_FILENO);
        cr_assert_geq(saved, 0);
        cr_assert_eq(dup2(fd, STDERR_FILENO), STDERR_FILENO);
        r = config_load(path, ret);
        fflush(stderr);
        cr_assert_eq(dup2(saved, STDERR_FILENO), STDERR_FILENO);
        close(saved);
        n = pread(fd, log_buf, sizeof(log_buf) - 1, 0);
        cr_assert_geq(n, 0);
        log_buf[n] = 0;
        close(fd);
        return r;
}

/* Refused, with one error line that names path:line and says what. */
static void expect_error(const char *text, unsigned line, const char *what) {
        struct config *c = NULL;
        char prefix[256];
        int r;

        r = load(text, &c);
        config_free(c);    /* before asserting: a failure must not add a leak report to the log */
        expect_no_leaks(); /* every error path frees what it parsed */
        cr_assert_eq(r, -EINVAL, "loaded (%d) what should be refused:\n%s", r, text);
        cr_assert_null(c, "a refused file must not hand out a config");
        (void) snprintf(prefix, sizeof(prefix), "<%d>%s:%u: ", LOG_ERR, path, line);
        cr_assert(strncmp(log_buf, prefix, strlen(prefix)) == 0, "expected '%s...', logged '%s' for:\n%s", prefix,
                  log_buf, text);
        if (what)
                cr_assert(strstr(log_buf, what), "expected '%s' in '%s'", what, log_buf);
        cr_assert(strchr(log_buf, '\n') == log_buf + strlen(log_buf) - 1, "one line expected: '%s'", log_buf);
}

/* Refused; the first of several error lines names path:line and says what. */
static void expect_errors(const char *text, unsigned line, const char *what) {
        struct config *c = NULL;
        char prefix[256];

        cr_assert_eq(load(text, &c), -EINVAL, "loaded what should be refused:\n%s", text);
        cr_assert_null(c);
        (void) snprintf(prefix, sizeof(prefix), "<%d>%s:%u: ", LOG_ERR, path, line);
        cr_assert(strncmp(log_buf, prefix, strlen(prefix)) == 0, "expected '%s...', logged '%s'", prefix, log_buf);
        cr_assert(strstr(log_buf, what), "expected '%s' in '%s'", what, log_buf);
        cr_assert_neq(strchr(log_buf, '\n'), log_buf + strlen(log_buf) - 1, "more lines expected: '%s'", log_buf);
}

static struct config *expect_ok(const char *text) {
        struct config *c = NULL;
        int r;

        r = load(text, &c);
        cr_assert_eq(r, 0, "refused (%d): %s", r, log_buf);
        cr_assert_not_null(c);
        cr_assert_str_empty(log_buf, "a good file logs nothing");
        return c;
}

Test(conf, good_file) {
        struct passwd *pw = getpwnam("daemon");
        struct group *gr = getgrnam("adm");
        struct config *c;

        cr_assert_not_null(pw, "base-passwd has user daemon");
        cr_assert_not_null(gr, "base-passwd has group adm");
        c = expect_ok("; shmzoned configuration\n"
                      "[daemon]\n"
                      "socket = /run/test/s.sock\n"
                      "mount = /run/test/fs\n"
                      "threads = 3\n"
                      "memory_budget = 2G\n"
                      "uid_quota = 64M\n"
                      "uid_max_zones = 7\n"
                      "max_clients = 100\n"
                      "uid_max_clients = 10\n"
                      "hello_timeout = 30\n"
                      "\n"
                      "# a zone by names\n"
                      "[zone counters]\n"
                      "size = 1M\n"
                      "tag = counters-v1\n"
                      "user = daemon\n"
                      "group = adm\n"
                      "mode = 0640 ; inline comment\n"
                      "\n"
                      "[zone raw.data-1_x]\n"
                      "size = 4096\n"
                      "user = 1234\n"
                      "group = 5678\n"
                      "\n"
                      "[zone big]\n"
                      "size = 2T\n"
                      "mode = 0\n");
        cr_assert_str_eq(c->socket_path, "/run/test/s.sock");
        cr_assert_str_eq(c->mount_path, "/run/test/fs");
        cr_assert_eq(c->threads, 3);
        cr_assert_eq(c->limits.budget, UINT64_C(2) << 30);
        cr_assert_eq(c->limits.quota, UINT64_C(64) << 20);
        cr_assert_eq(c->limits.max_zones, 7);
        cr_assert_eq(c->max_clients, 100);
        cr_assert_eq(c->uid_max_clients, 10);
        cr_assert_eq(c->hello_timeout, 30);
        cr_assert_eq(c->n_zones, 3);

        cr_assert_str_eq(c->zones[0].name, "counters");
        cr_assert_eq(c->zones[0].size, UINT64_C(1) << 20);
        cr_assert_str_eq(c->zones[0].tag, "counters-v1");
        cr_assert_eq(c->zones[0].uid, pw->pw_uid);
        cr_assert_eq(c->zones[0].gid, gr->gr_gid);
        cr_assert_eq(c->zones[0].mode, 0640);

        /* Defaults of a zone: root's, 0600, no tag. */
        cr_assert_str_eq(c->zones[1].name, "raw.data-1_x");
        cr_assert_eq(c->zones[1].size, 4096);
        cr_assert_str_empty(c->zones[1].tag);
        cr_assert_eq(c->zones[1].uid, 1234);
        cr_assert_eq(c->zones[1].gid, 5678);
        cr_assert_eq(c->zones[1].mode, 0600);

        cr_assert_str_eq(c->zones[2].name, "big");
        cr_assert_eq(c->zones[2].size, UINT64_C(2) << 40);
        cr_assert_eq(c->zones[2].uid, 0);
        cr_assert_eq(c->zones[2].gid, 0);
        cr_assert_eq(c->zones[2].mode, 0);
        config_free(c);
        expect_no_leaks();
}

/* An empty file is the defaults, the same as no file at all. */
Test(conf, empty_file_is_defaults) {
        struct config *c = expect_ok(""), *d = NULL;

        cr_assert_eq(config_new_default(&d), 0);
        cr_assert_str_eq(c->socket_path, d->socket_path);
        cr_assert_str_eq(c->socket_path, SHMZ_DEFAULT_SOCKET);
        cr_assert_str_eq(c->mount_path, d->mount_path);
        cr_assert_eq(c->threads, d->threads);
        cr_assert_eq(c->limits.budget, d->limits.budget);
        cr_assert_eq(c->limits.quota, d->limits.quota);
        cr_assert_eq(c->limits.max_zones, d->limits.max_zones);
        cr_assert_eq(c->max_clients, d->max_clients);
        cr_assert_eq(c->uid_max_clients, d->uid_max_clients);
        cr_assert_eq(c->hello_timeout, d->hello_timeout);
        cr_assert_eq(c->n_zones, 0);
        cr_assert_gt(d->limits.budget, 0);
        cr_assert_gt(d->hello_timeout, 0);
        config_free(c);
        config_free(d);
        expect_no_leaks();
}

Test(conf, mount_no_and_edges) {
        struct config *c;

        c = expect_ok("[daemon]\nmount = no\nthreads = 0\nhello_timeout = 3600\nuid_max_zones = 1000000\n");
        cr_assert_null(c->mount_path, "mount = no: no FUSE view");
        cr_assert_eq(c->threads, 0, "0: automatic");
        cr_assert_eq(c->hello_timeout, 3600);
        cr_assert_eq(c->limits.max_zones, 1000000);
        config_free(c);
        c = expect_ok("[daemon]\nmount =\nthreads = 64\nhello_timeout = 1\n");
        cr_assert_null(c->mount_path);
        cr_assert_eq(c->threads, 64);
        cr_assert_eq(c->hello_timeout, 1);
        config_free(c);
        expect_no_leaks();
}

Test(conf, missing_file) {
        struct config *c = NULL;

        cr_assert_eq(load(NULL, &c), -ENOENT);
        cr_assert_null(c);
}

/* ---- [daemon] --------------------------------------------------------------------------- */

Test(conf, unknown_key) {
        expect_error("[daemon]\nthreads = 2\n\n; a comment\nbogus = 1\n", 5, "unknown key 'bogus'");
        expect_error("[zone a]\nsize = 1M\ncolour = red\n", 3, "unknown key 'colour'");
}

Test(conf, relative_paths) {
        expect_error("[daemon]\nsocket = run/s.sock\n", 2, "socket must be an absolute path");
        expect_error("[daemon]\nmount = fs\n", 2, "mount must be an absolute path");
}

Test(conf, threads_out_of_range) {
        expect_error("[daemon]\nthreads = 65\n", 2, "threads must be a number");
        expect_error("[daemon]\nthreads = -1\n", 2, "threads must be a number");
        expect_error("[daemon]\nthreads = two\n", 2, "threads must be a number");
        expect_error("[daemon]\nthreads = 99999999999999999999999\n", 2, "threads must be a number");
}

Test(conf, hello_timeout_out_of_range) {
        expect_error("[daemon]\nhello_timeout = 0\n", 2, "hello_timeout must be a number from 1 to 3600");
        expect_error("[daemon]\nhello_timeout = 3601\n", 2, "hello_timeout must be a number from 1 to 3600");
        expect_error("[daemon]\nhello_timeout = 10s\n", 2, "hello_timeout must be");
}

Test(conf, counts_out_of_range) {
        expect_error("[daemon]\nmax_clients = 0\n", 2, "max_clients must be");
        expect_error("[daemon]\nuid_max_clients = 1000001\n", 2, "uid_max_clients must be");
        expect_error("[daemon]\nuid_max_zones = \n", 2, "uid_max_zones must be");
}

Test(conf, daemon_sizes) {
        expect_error("[daemon]\nmemory_budget = 0\n", 2, "memory_budget: bad size '0'");
        expect_error("[daemon]\nuid_quota = 1X\n", 2, "uid_quota: bad size '1X'");
        expect_error("[daemon]\nmemory_budget = 99999999999T\n", 2, "memory_budget: bad size");
}

/* ---- [daemon] port keys ------------------------------------------------------------------ */

Test(conf, port_sections) {
        struct config *c = expect_ok("[port svc]\nuser = 1000\ngroup = 2000\nmode = 0620\n[port other]\n");

        cr_assert_eq(c->n_port_decls, 2u);
        cr_assert_str_eq(c->port_decls[0].name, "svc");
        cr_assert_eq(c->port_decls[0].uid, 1000u);
        cr_assert_eq(c->port_decls[0].gid, 2000u);
        cr_assert_eq(c->port_decls[0].mode, 0620u);
        cr_assert_str_eq(c->port_decls[1].name, "other");
        cr_assert_eq(c->port_decls[1].uid, 0u);
        cr_assert_eq(c->port_decls[1].mode, 0600u);
        config_free(c);
        expect_error("[port a]\nsize = 1M\n", 2, "port 'a': unknown key 'size'");
        expect_error("[port a]\nmode = 0999\n", 2, "port 'a': mode must be octal");
        expect_error("[port a]\nuser = no-such-user-here\n", 2, "port 'a': unknown user");
        expect_error("[port ../x]\n", 1, "bad port name");
        expect_error("[port a]\n[port a]\n", 2, "port 'a' declared twice");
        expect_no_leaks();
}

Test(conf, port_defaults) {
        struct config *c = expect_ok("");

        cr_assert_eq(c->ports.chunk_size, 64u << 10);
        cr_assert_eq(c->ports.segment_chunks, 64u);
        cr_assert_eq(c->ports.port_memory, UINT64_C(64) << 20);
        cr_assert_eq(c->ports.max_ports_per_uid, 256u);
        cr_assert_eq(c->ports.backlog, 64u);
        cr_assert_eq(c->ports.uid_connections, 64u);
        cr_assert_eq(c->ports.segment_memory, UINT64_C(4) << 30);
        cr_assert_eq(c->ports.uid_segment_memory, UINT64_C(1) << 30);
        config_free(c);
        expect_no_leaks();
}

Test(conf, port_keys) {
        struct config *c = expect_ok("[daemon]\nchunk_size = 4K\nsegment_chunks = 16384\nport_memory = 1G\n"
                                     "max_ports_per_uid = 1\nport_backlog = 65536\nsegment_memory = 2T\n"
                                     "uid_segment_memory = 3G\nport_uid_connections = 5\n");

        cr_assert_eq(c->ports.uid_connections, 5u);
        cr_assert_eq(c->ports.chunk_size, 4096u);
        cr_assert_eq(c->ports.segment_chunks, SHMZ_SEGMENT_MAX_CHUNKS);
        cr_assert_eq(c->ports.port_memory, UINT64_C(1) << 30);
        cr_assert_eq(c->ports.max_ports_per_uid, 1u);
        cr_assert_eq(c->ports.backlog, 65536u);
        cr_assert_eq(c->ports.segment_memory, UINT64_C(2) << 40);
        cr_assert_eq(c->ports.uid_segment_memory, UINT64_C(3) << 30);
        config_free(c);
        /* One segment exactly fills port_memory. */
        c = expect_ok("[daemon]\nchunk_size = 1M\nsegment_chunks = 8\nport_memory = 8M\n");
        cr_assert_eq(c->ports.chunk_size, 1u << 20);
        config_free(c);
        expect_no_leaks();
}

Test(conf, port_keys_out_of_range) {
        expect_error("[daemon]\nchunk_size = 2K\n", 2, "chunk_size must be a power of two");
        expect_error("[daemon]\nchunk_size = 12K\n", 2, "chunk_size must be a power of two");
        expect_error("[daemon]\nchunk_size = 128M\n", 2, "chunk_size must be a power of two");
        expect_error("[daemon]\nchunk_size = big\n", 2, "chunk_size must be a power of two");
        expect_error("[daemon]\nsegment_chunks = 0\n", 2, "segment_chunks must be a number from 1 to 16384");
        expect_error("[daemon]\nsegment_chunks = 16385\n", 2, "segment_chunks must be a number from 1 to 16384");
        expect_error("[daemon]\nport_memory = 0\n", 2, "port_memory: bad size");
        expect_error("[daemon]\nport_memory = 65G\n", 2, "port_memory: bad size");
        expect_error("[daemon]\nmax_ports_per_uid = 0\n", 2, "max_ports_per_uid must be");
        expect_error("[daemon]\nport_backlog = 65537\n", 2, "port_backlog must be");
        expect_error("[daemon]\nport_uid_connections = 0\n", 2, "port_uid_connections must be");
        expect_error("[daemon]\nport_backlog = -3\n", 2, "port_backlog must be");
        expect_error("[daemon]\nsegment_memory = 0\n", 2, "segment_memory: bad size");
        expect_error("[daemon]\nuid_segment_memory = lots\n", 2, "uid_segment_memory: bad size");
}

/* Keys that constrain each other are checked once the file is read, whatever their order. */
static void expect_ports_refused(const char *text, const char *what) {
        struct config *c = NULL;
        int r = load(text, &c);

        config_free(c);
        expect_no_leaks();
        cr_assert_eq(r, -EINVAL, "loaded: %s", text);
        cr_assert_null(c);
        cr_assert(strstr(log_buf, path), "no file named in '%s'", log_buf);
        cr_assert(strstr(log_buf, what), "expected '%s' in '%s'", what, log_buf);
}

Test(conf, port_keys_together) {
        /* The default port_memory (64M) cannot hold a segment of 64 x 2M. */
        expect_ports_refused("[daemon]\nchunk_size = 2M\n", "port_memory (67108864) must hold at least one segment");
        expect_ports_refused("[daemon]\nport_memory = 1M\nchunk_size = 64K\n", "must hold at least one segment");
        /* 64 x 64K and its header page do not fit in 4M. */
        expect_ports_refused("[daemon]\nuid_segment_memory = 4M\n", "must hold at least one segment (4198400 bytes");
        expect_ports_refused("[daemon]\nsegment_memory = 1M\n", "segment_memory and uid_segment_memory");
        /* A segment of 16384 x 64M is past 1G. */
        expect_ports_refused("[daemon]\nchunk_size = 64M\nsegment_chunks = 17\nport_memory = 64G\n",
                             "a segment may have 1G at most");
}

/* ---- [zone NAME] ------------------------------------------------------------------------ */

Test(conf, bad_size) {
        expect_error("[zone a]\nsize = 12Q\n", 2, "zone 'a': bad size '12Q'");
        expect_error("[zone a]\nsize = abc\n", 2, "bad size 'abc'");
        expect_error("[zone a]\nsize = -1\n", 2, "bad size '-1'");
        expect_error("[zone a]\nsize = 1.5M\n", 2, "bad size '1.5M'");
        expect_error("[zone a]\nsize = 1MB\n", 2, "bad size '1MB'");
}

Test(conf, zero_size) {
        expect_error("[zone a]\nmode = 0600\nsize = 0\n", 3, "zone 'a': bad size '0'");
}

Test(conf, size_overflow) {
        expect_error("[zone a]\nsize = 99999999999T\n", 2, "bad size '99999999999T'");
        expect_error("[zone a]\nsize = 18446744073709551616\n", 2, "bad size");
        /* 2^64 exactly. */
        expect_error("[zone a]\nsize = 16777216T\n", 2, "bad size");
}

Test(conf, bad_mode) {
        expect_error("[zone a]\nsize = 1M\nmode = rw-r-----\n", 3, "zone 'a': mode must be octal");
        expect_error("[zone a]\nsize = 1M\nmode = 0689\n", 3, "mode must be octal");
        expect_error("[zone a]\nsize = 1M\nmode = 0x1ff\n", 3, "mode must be octal");
        expect_error("[zone a]\nsize = 1M\nmode =\n", 3, "mode must be octal");
}

Test(conf, mode_above_0777) {
        expect_error("[zone a]\nsize = 1M\nmode = 01000\n", 3, "mode must be octal, 0 to 0777");
        expect_error("[zone a]\nsize = 1M\nmode = 4755\n", 3, "mode must be octal, 0 to 0777");
}

Test(conf, unknown_user_group) {
        expect_error("[zone a]\nsize = 1M\nuser = no-such-user-shmz\n", 3,
                     "zone 'a': unknown user 'no-such-user-shmz'");
        expect_error("[zone a]\nsize = 1M\ngroup = no-such-group-shmz\n", 3,
                     "zone 'a': unknown group 'no-such-group-shmz'");
        /* UINT32_MAX is (uid_t) -1, no uid; it is looked up as a name and not found. */
        expect_error("[zone a]\nsize = 1M\nuser = 4294967295\n", 3, "unknown user '4294967295'");
}

Test(conf, bad_tag) {
        char text[256];

        (void) snprintf(text, sizeof(text), "[zone a]\nsize = 1M\ntag = %064d\n", 0);
        expect_error(text, 3, "zone 'a': tag must be printable");
}

Test(conf, zone_without_size) {
        /* Reported where its section begins, not where the next one does. */
        expect_error("[zone a]\ntag = x\n\n; comment\n[zone b]\nsize = 1M\n", 1, "zone 'a' has no size");
        /* Also the last section of the file. */
        expect_error("[daemon]\nthreads = 1\n\n[zone a]\ntag = x\nmode = 0600\n", 4, "zone 'a' has no size");
}

/* What outlives a stop: persisted zones, where and how often they are written. */
Test(conf, persist_keys) {
        struct config *c;

        c = expect_ok("[zone a]\nsize = 1M\n");
        cr_expect_str_eq(c->state_directory, SHMZ_DEFAULT_STATE_DIR);
        cr_expect_eq(c->persist_interval, 0);
        cr_expect_eq(c->zones[0].persist, false);
        config_free(c);
        c = expect_ok("[daemon]\npersist_interval = 30\nstate_directory = /srv/z\n[zone a]\nsize = 1M\npersist = yes\n"
                      "[zone b]\nsize = 1M\npersist = off\n");
        cr_expect_str_eq(c->state_directory, "/srv/z");
        cr_expect_eq(c->persist_interval, 30);
        cr_expect_eq(c->zones[0].persist, true);
        cr_expect_eq(c->zones[1].persist, false);
        config_free(c);
        expect_error("[zone a]\nsize = 1M\npersist = maybe\n", 3, "persist must be yes or no");
        expect_error("[daemon]\npersist_interval = 86401\n", 2, "persist_interval must be");
        expect_error("[daemon]\nstate_directory = var/lib\n", 2, "state_directory must be an absolute path");
}

/* Every error is reported, each on a line of its own naming its line, in line order (--check-config). */
Test(conf, every_error_reported) {
        struct config *c = NULL;
        char want[1024];

        cr_assert_eq(load("[daemon]\nthreads = 1\nbogus = 1\nhello_timeout = 0\nno equals\n[zone a]\nsize = 0\n"
                          "[zone b]\n[zone c]\nsize = 1M\nmode = 9\n",
                          &c),
                     -EINVAL);
        cr_assert_null(c);
        (void) snprintf(want, sizeof(want),
                        "<3>%1$s:3: unknown key 'bogus' in [daemon]\n"
                        "<3>%1$s:4: hello_timeout must be a number from 1 to 3600\n"
                        "<3>%1$s:5: syntax error: expected 'key = value'\n"
                        "<3>%1$s:7: zone 'a': bad size '0' (a number with an optional K, M, G or T suffix)\n"
                        "<3>%1$s:8: zone 'b' has no size\n"
                        "<3>%1$s:11: zone 'c': mode must be octal, 0 to 0777\n",
                        path);
        cr_assert_str_eq(log_buf, want);
        expect_no_leaks();
}

/* A hostile file cannot make the parser keep unbounded errors: the rest are counted. */
Test(conf, errors_bounded) {
        static char text[16384];
        struct config *c = NULL;
        size_t n = 0;

        char *errors = NULL;

        for (int i = 0; i < 200; i++)
                n += (size_t) snprintf(text + n, sizeof(text) - n, "bad line %d\n", i);
        write_file(text);
        cr_assert_eq(config_parse(path, &c, &errors), -EINVAL);
        cr_assert_null(c);
        cr_assert_not_null(errors);
        cr_assert(strstr(errors, ":64: syntax error"), "%s", errors);
        cr_assert_null(strstr(errors, ":65: "), "%s", errors);
        cr_assert(strstr(errors, ": 136 more error(s) not shown\n"), "%s", errors);
        free(errors);
}

Test(conf, syntax_error) {
        expect_error("[daemon]\nthreads = 1\nno equals sign here\n", 3, "syntax error");
        expect_error("[daemon\nthreads = 1\n", 1, NULL);
}

/* The first bad line is named, a syntax error before a handler's error as well. */
Test(conf, syntax_error_first) {
        expect_error("[daemon]\nthreads = 1\nno equals sign here\n", 3, "syntax error");
        /* With a later error too: both, the first line first. */
        expect_errors("[daemon]\nthreads = 1\nno equals sign here\nbogus = 1\n", 3, "syntax error");
}

Test(conf, key_outside_section) {
        struct config *c = NULL;

        cr_assert_eq(load("threads = 1\n", &c), -EINVAL);
        cr_assert_null(c);
        cr_assert(strstr(log_buf, ":1: "), "%s", log_buf);
}

/*
 * The offending line of a section-level error (an unknown section, a bad or
 * duplicate zone name) is its [header], as for "has no size", not the line of
 * the section's first key, where it is noticed.
 */
Test(conf, unknown_section) {
        expect_error("[daemon]\nthreads = 1\n[zones]\n\n; comment\nsize = 1M\n", 3, "unknown section [zones]");
        expect_error("[zone]\nsize = 1M\n", 1, "unknown section [zone]");
}

Test(conf, duplicate_zone) {
        expect_error("[zone a]\nsize = 1M\n[zone b]\nsize = 1M\n\n[zone a]\n\nsize = 2M\n", 6,
                     "zone 'a' declared twice");
}

Test(conf, bad_zone_name) {
        expect_error("[zone ../x]\n\nsize = 1M\n", 1, "bad zone name '../x'");
        expect_error("[zone ]\n\nsize = 1M\n", 1, "bad zone name ''");
        expect_error("[zone a/b]\n\nsize = 1M\n", 1, "bad zone name 'a/b'");
        expect_error("[zone ..]\n\nsize = 1M\n", 1, "bad zone name '..'");
}

/*
 * SHMZ_NAME_MAX + 1 bytes: refused at its own line (inih splits such a line, and the
 * pieces must not be taken for later lines, nor "size =" for a key of [daemon]).
 */
Test(conf, zone_name_too_long) {
        char text[512], name[SHMZ_NAME_MAX + 2];

        memset(name, 'n', SHMZ_NAME_MAX + 1);
        name[SHMZ_NAME_MAX + 1] = 0;
        (void) snprintf(text, sizeof(text), "[daemon]\nthreads = 1\n[zone %s]\nsize = 1M\n", name);
        expect_error(text, 3, NULL);
}

/*
 * A section without keys is refused for having no size: Debian's inih 55 is built
 * without INI_CALL_HANDLER_ON_NEW_SECTION, so only the reader, which sees every
 * [header], can notice it (dropped, a reload would retire a running zone "a").
 */
Test(conf, zone_section_without_keys) {
        expect_error("[zone a]\n\n[zone b]\nsize = 1M\n", 1, "zone 'a' has no size");
}

/* Two adjacent [zone a] sections are refused as non-adjacent ones are, not merged. */
Test(conf, duplicate_zone_adjacent) {
        expect_error("[zone a]\nsize = 1M\n[zone a]\nsize = 2M\n", 3, "zone 'a' declared twice");
}

/*
 * inih 55 copies section names into a 50-byte buffer: a longer valid name is
 * kept whole or refused, never cut into the name of another zone.
 */
Test(conf, long_zone_name_kept_whole) {
        char text[256], name[61];
        struct config *c = NULL;
        int r;

        memset(name, 'L', 60);
        name[60] = 0;
        (void) snprintf(text, sizeof(text), "[zone %s]\nsize = 1M\n", name);
        r = load(text, &c);
        if (r == 0) {
                char got[SHMZ_NAME_BUF];
                size_t n = c->n_zones;

                strncpy_buf(got, sizeof(got), n > 0 ? c->zones[0].name : "");
                config_free(c);
                cr_assert_eq(n, 1);
                cr_assert_str_eq(got, name, "declared as '%s'", got);
        } else {
                cr_assert_eq(r, -EINVAL);
                cr_assert(strstr(log_buf, ":1: "), "%s", log_buf);
        }
}

/*
 * inih 55 reads a line longer than INI_MAX_LINE (200) in pieces: an error in
 * it names that line, not the line after it.
 */
Test(conf, long_line_named_by_its_line) {
        char text[512], sock[260];

        sock[0] = '/';
        memset(sock + 1, 's', 250);
        sock[251] = 0;
        (void) snprintf(text, sizeof(text), "[daemon]\nsocket = %s\nthreads = 1\n", sock);
        expect_error(text, 2, NULL);
}
