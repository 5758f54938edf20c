/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The daemon as a service: config, reload, sd_notify, hostile clients. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone-abi.h"
#include "shmzone.h"

static struct daemon_proc d;

static void stop(void) {
        harness_cleanup(&d);
}

static struct shmz_client *connect_or_die(void) {
        struct shmz_client *c = harness_connect(&d);

        cr_assert_not_null(c, "cannot connect to %s", d.socket);
        return c;
}

TestSuite(config, .fini = stop, .timeout = 60);

Test(config, bad_line_refuses_start_naming_file_and_line) {
        char expect[200];

        harness_init(&d, "[daemon]\nthreads = 2\n\n[zone ok]\nsize = 1M\n[zone bad]\nsize = 12X\n");
        cr_assert_eq(harness_start(&d, NULL, false), 1);
        snprintf(expect, sizeof(expect), "%s:7:", d.config);
        cr_assert(strstr(harness_log(&d), expect), "no file:line in: %s", harness_log(&d));
        cr_assert(strstr(harness_log(&d), "bad size"), "log: %s", harness_log(&d));
}

Test(config, unknown_key_section_and_missing_size) {
        static const char *const cases[][2] = {
                { "[daemon]\nflavour = mint\n", ":2:" },
                { "[nonsense]\nx = 1\n", ":1:" }, /* section errors name the header's line */
                { "[zone a]\ntag = x\n\n[zone b]\nsize = 1M\n", ":1:" },
                { "[zone a/b]\nsize = 1M\n", ":1:" },
                { "[zone a]\nsize = 1M\nmode = 999\n", ":3:" },
                { "[zone a]\nsize = 1M\nuser = no-such-user-here\n", ":3:" },
                { "this is not ini\n", ":1:" },
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                harness_init(&d, cases[i][0]);
                cr_assert_eq(harness_start(&d, NULL, false), 1, "case %zu started", i);
                cr_assert(strstr(harness_log(&d), cases[i][1]), "case %zu: log: %s", i, harness_log(&d));
                harness_cleanup(&d);
        }
}

Test(config, missing_explicit_config_refuses_start) {
        harness_init(&d, NULL);
        (void) unlink(d.config);
        cr_assert_eq(harness_start(&d, NULL, false), 1);
}

Test(config, options) {
        const char *const args[] = { "--threads", "3", NULL };
        struct shmz_client *c;
        struct shmz_zone *z;

        harness_init(&d, "[zone demo]\nsize = 64K\ntag = demo\nmode = 0666\n");
        cr_assert_eq(harness_start(&d, args, false), 0, "log: %s", harness_log(&d));
        cr_assert(strstr(harness_log(&d), "3 worker thread(s)"), "log: %s", harness_log(&d));
        c = connect_or_die();
        cr_assert_eq(shmz_zone_open(c, "demo", 0, "demo", 0, &z), 0);
        cr_assert_eq(shmz_zone_size(z), 65536);
        cr_assert_eq(shmz_zone_existed(z), 0, "nobody used a declared zone yet");
        shmz_zone_close(z);
        shmz_disconnect(c);
}

TestSuite(reload, .fini = stop, .timeout = 60);

Test(reload, keeps_adds_refuses_and_retires) {
        struct shmz_client *c;
        struct shmz_zone *keep, *resize, *gone, *z;
        struct shmz_zone_stat st;
        struct shmz_daemon_status before, after;

        harness_init(&d, "[daemon]\nmemory_budget = 64M\n"
                         "[zone keep]\nsize = 1M\ntag = k\n"
                         "[zone resize]\nsize = 1M\n"
                         "[zone gone]\nsize = 2M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        c = connect_or_die();
        cr_assert_eq(shmz_zone_open(c, "keep", 0, "k", 0, &keep), 0);
        cr_assert_eq(shmz_zone_open(c, "resize", 0, NULL, 0, &resize), 0);
        cr_assert_eq(shmz_zone_open(c, "gone", 0, NULL, 0, &gone), 0);
        strcpy(shmz_zone_base(keep), "kept bytes");
        strcpy(shmz_zone_base(resize), "resize bytes");
        strcpy(shmz_zone_base(gone), "gone bytes");

        harness_write_config(&d, "[daemon]\nmemory_budget = 64M\n"
                                 "[zone keep]\nsize = 1M\ntag = k\n"
                                 "[zone resize]\nsize = 4M\n"
                                 "[zone fresh]\nsize = 1M\nmode = 0640\n");
        cr_assert_eq(harness_reload(&d), 0, "no reload; log: %s", harness_log(&d));

        /* Unchanged: same zone, same bytes, new attachments see them. */
        cr_assert_eq(shmz_zone_open(c, "keep", 0, "k", 0, &z), 0);
        cr_assert_str_eq(shmz_zone_base(z), "kept bytes");
        cr_assert_eq(shmz_zone_existed(z), 1);
        shmz_zone_close(z);
        /* Size changed: refused with a logged error, the old zone stays. */
        cr_assert_eq(shmz_zone_stat(c, "resize", &st), 0);
        cr_assert_eq(st.size, 1u << 20);
        cr_assert_eq(shmz_zone_open(c, "resize", 0, NULL, 0, &z), 0);
        cr_assert_str_eq(shmz_zone_base(z), "resize bytes");
        shmz_zone_close(z);
        cr_assert(strstr(harness_log(&d), "Zone 'resize': size changed"), "log: %s", harness_log(&d));
        /* New: there. */
        cr_assert_eq(shmz_zone_stat(c, "fresh", &st), 0);
        cr_assert_eq(st.mode, 0640);
        /* Removed: name gone, memory alive until the last detach. */
        cr_assert_eq(shmz_zone_stat(c, "gone", &st), -ENOENT);
        cr_assert_str_eq(shmz_zone_base(gone), "gone bytes");
        cr_assert_eq(shmz_daemon_status(c, &before), 0);
        cr_assert_eq(before.zones_unlinked, 1);
        shmz_zone_close(gone);
        cr_assert_eq(shmz_daemon_status(c, &after), 0);
        cr_assert_eq(after.zones_unlinked, 0);
        cr_assert_eq(before.budget_used - after.budget_used, (2u << 20) + 4096);

        shmz_zone_close(keep);
        shmz_zone_close(resize);
        shmz_disconnect(c);
}

Test(reload, bad_config_keeps_running_one) {
        struct shmz_client *c;
        struct shmz_zone_stat st;

        harness_init(&d, "[zone a]\nsize = 1M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        harness_write_config(&d, "[zone a]\nsize = 1M\n[zone b]\nsize = lots\n");
        cr_assert_eq(harness_reload(&d), 0, "no reload; log: %s", harness_log(&d));
        c = connect_or_die();
        cr_assert_eq(shmz_zone_stat(c, "a", &st), 0);
        cr_assert_eq(shmz_zone_stat(c, "b", &st), -ENOENT);
        cr_assert(strstr(harness_log(&d), "keeping the running configuration"), "log: %s", harness_log(&d));
        shmz_disconnect(c);
        cr_assert_eq(harness_stop(&d), 0);
}

TestSuite(notify, .fini = stop, .timeout = 60);

/* The harness is the daemon's NOTIFY_SOCKET: harness_start() returned on READY=1, the rest is read here. */
Test(notify, ready_reloading_stopping) {
        harness_init(&d, "[zone demo]\nsize = 1M\n");
        /* One the test runs under (a service manager's) is not passed on: the harness's wins. */
        cr_assert_eq(setenv("NOTIFY_SOCKET", "/nonexistent/notify", 1), 0);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        cr_assert(strstr(d.notified, "READY=1\nSTATUS=1 zones"), "got: %s", d.notified);
        cr_assert_eq(kill(d.pid, SIGHUP), 0);
        cr_assert_eq(harness_wait_notify(&d, "RELOADING=1", 20), 0, "got: %s", d.notified);
        cr_assert_eq(harness_wait_notify(&d, "READY=1", 20), 0, "got: %s", d.notified);
        cr_assert_eq(kill(d.pid, SIGTERM), 0);
        cr_assert_eq(harness_wait_notify(&d, "STOPPING=1", 20), 0, "got: %s", d.notified);
        cr_assert_eq(harness_stop(&d), 0);
}

/* STATUS= is refreshed every 10 s for as long as the daemon runs, not once (a one-shot timer must be re-enabled). */
Test(notify, status_refreshed) {
        unsigned n = 0;

        harness_init(&d, "[zone demo]\nsize = 1M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        /* Nothing says this: the wait only collects what comes in 25 s into d.notified. */
        cr_assert_eq(harness_wait_notify(&d, "NOTHING=1", 25), -ETIMEDOUT);
        for (const char *p = d.notified; (p = strstr(p, "|STATUS=1 zones")); p++)
                n++;
        cr_assert_geq(n, 2, "STATUS= updates after READY: %u: %s", n, d.notified);
        cr_assert_eq(harness_stop(&d), 0);
}

TestSuite(hostile, .fini = stop, .timeout = 240);

struct good_client {
        atomic_bool stop;
        atomic_int rounds, failures;
        char socket[128];
};

/* A well-behaved client that keeps working while others misbehave. */
static void *good_client_main(void *userdata) {
        struct good_client *g = userdata;
        struct shmz_client *c;

        if (shmz_connect(g->socket, &c) < 0) {
                atomic_fetch_add(&g->failures, 1);
                return NULL;
        }
        while (!atomic_load(&g->stop)) {
                struct shmz_zone *z;
                struct shmz_zone_stat st;

                if (shmz_zone_open(c, "good", 4096, "g", SHMZ_CREATE, &z) < 0 || shmz_zone_stat(c, "good", &st) < 0) {
                        atomic_fetch_add(&g->failures, 1);
                        continue;
                }
                ((volatile uint32_t *) shmz_zone_base(z))[0]++;
                shmz_zone_close(z);
                atomic_fetch_add(&g->rounds, 1);
        }
        shmz_disconnect(c);
        return NULL;
}

/* One malformed or random message; mostly well-framed so that validation deeper in is reached. */
static size_t make_garbage(uint8_t *buf, size_t max, unsigned *seed, bool *ret_oneway) {
        struct shmz_msg_header *h = (struct shmz_msg_header *) buf;
        size_t size = (size_t) rand_r(seed) % 600;
        int kind = rand_r(seed) % 6;

        *ret_oneway = false;

        for (size_t i = 0; i < max; i++)
                buf[i] = (uint8_t) rand_r(seed);
        if (size < sizeof(*h))
                size = sizeof(*h);
        if (kind == 0) /* pure noise */
                return size;
        h->size = (uint32_t) size;
        h->type = (uint16_t) (rand_r(seed) % 12);
        h->flags = (uint16_t) (rand_r(seed) % 2 ? 0 : rand_r(seed));
        if (kind >= 2) {
                /* Right framing and body size for the type, random contents. */
                static const size_t body[] = { 0, 16, 288, 8, 208, 208, 0, 224, 24, 0 };

                if (h->type >= 1 && h->type <= 9)
                        h->size = (uint32_t) (sizeof(*h) + body[h->type]);
                size = h->size;
                h->flags = 0;
                /* A well-framed ZONE_CLOSE gets no reply, by design. */
                *ret_oneway = h->type == SHMZ_MSG_ZONE_CLOSE;
                if (kind == 3 && h->type == SHMZ_MSG_ZONE_OPEN) {
                        /* Valid-looking names with silly sizes. */
                        memcpy(buf + sizeof(*h) + 16, "fz", 3);
                        buf[sizeof(*h) + 16 + 200] = 0;
                        buf[sizeof(*h) + 16 + 208 + 63] = 0;
                }
        }
        return size;
}

Test(hostile, ten_thousand_bad_requests) {
        struct good_client g = {};
        struct shmz_msg_hello hello = { .version_min = 1, .version_max = 1 };
        uint8_t buf[1024];
        unsigned seed = 4242;
        pthread_t t;
        int fd = -1, sent = 0, replies = 0;

        harness_init(&d, "[daemon]\nmemory_budget = 256M\nuid_quota = 256M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        snprintf(g.socket, sizeof(g.socket), "%s", d.socket);
        cr_assert_eq(pthread_create(&t, NULL, good_client_main, &g), 0);

        while (sent < 10000) {
                bool oneway;
                size_t n;

                if (fd < 0) {
                        struct shmz_msg_header h = { .size = sizeof(h) + sizeof(hello),
                                                     .type = SHMZ_MSG_HELLO,
                                                     .stream = 1 };

                        fd = harness_raw_connect(d.socket);
                        cr_assert_geq(fd, 0, "daemon stopped accepting after %d requests", sent);
                        /* Half the connections say hello first, so that requests get past it. */
                        if (rand_r(&seed) % 2) {
                                memcpy(buf, &h, sizeof(h));
                                memcpy(buf + sizeof(h), &hello, sizeof(hello));
                                (void) send(fd, buf, sizeof(h) + sizeof(hello), MSG_NOSIGNAL);
                        }
                }
                n = make_garbage(buf, sizeof(buf), &seed, &oneway);
                if (send(fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
                        /* Disconnected (as it should for broken framing) or full: a new connection. */
                        close(fd);
                        fd = -1;
                        continue;
                }
                sent++;
                if (oneway)
                        continue;
                /* Every request is answered or ends the connection: wait for one or the other. */
                {
                        struct pollfd p = { .fd = fd, .events = POLLIN };
                        ssize_t got;

                        cr_assert_eq(poll(&p, 1, 10000), 1, "no answer to request %d", sent);
                        got = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
                        if (got <= 0) {
                                close(fd);
                                fd = -1;
                        } else
                                replies++;
                }
        }
        if (fd >= 0)
                close(fd);
        atomic_store(&g.stop, true);
        pthread_join(t, NULL);

        cr_assert_gt(atomic_load(&g.rounds), 10, "the good client made no progress");
        cr_assert_eq(atomic_load(&g.failures), 0, "the good client saw %d failures", atomic_load(&g.failures));
        {
                struct shmz_client *c = connect_or_die();
                struct shmz_daemon_status st;

                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                cr_assert_gt(st.errors, 5000);
                cr_assert_gt(replies, 1000);
                shmz_disconnect(c);
        }
        cr_assert_eq(harness_stop(&d), 0, "daemon exit; log: %s", harness_log(&d));
}

Test(hostile, fds_in_requests_and_bad_hello) {
        struct shmz_msg_hello hello = { .version_min = 7, .version_max = 9 };
        struct {
                struct shmz_msg_header h;
                struct shmz_msg_hello b;
        } m = { { .size = sizeof(m), .type = SHMZ_MSG_HELLO, .stream = 5 }, hello };
        struct {
                struct shmz_msg_header h;
                int32_t x;
        } reply;
        int fd;

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));

        /* Unsupported version: a clear error, then the connection ends. */
        fd = harness_raw_connect(d.socket);
        cr_assert_eq(send(fd, &m, sizeof(m), 0), (ssize_t) sizeof(m));
        cr_assert_eq(recv(fd, &reply, sizeof(reply), 0), (ssize_t) sizeof(reply.h));
        cr_assert_eq(reply.h.status, -EPROTONOSUPPORT);
        cr_assert_eq(recv(fd, &reply, sizeof(reply), 0), 0);
        close(fd);

        /* A request before hello: refused, connection kept. */
        fd = harness_raw_connect(d.socket);
        m.h.type = SHMZ_MSG_STATUS;
        m.h.size = sizeof(m.h);
        cr_assert_eq(send(fd, &m, sizeof(m.h), 0), (ssize_t) sizeof(m.h));
        cr_assert_eq(recv(fd, &reply, sizeof(reply), 0), (ssize_t) sizeof(reply.h));
        cr_assert_eq(reply.h.status, -EPROTO);
        cr_assert_eq(reply.h.stream, 5);

        /* An fd riding along a request: dropped with the connection, never kept by the daemon. */
        {
                union {
                        struct cmsghdr c;
                        char b[CMSG_SPACE(sizeof(int))];
                } ctl = {};
                struct iovec iov = { .iov_base = &m, .iov_len = sizeof(m.h) };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof(ctl.b)
                };
                struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
                int passed = 0;

                cm->cmsg_level = SOL_SOCKET;
                cm->cmsg_type = SCM_RIGHTS;
                cm->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cm), &passed, sizeof(int));
                /* Where the kernel has SO_PASSRIGHTS it refuses the fd itself (test-attack covers both). */
                if (sendmsg(fd, &mh, 0) < 0)
                        cr_assert_eq(errno, EPERM);
                else
                        cr_assert_eq(recv(fd, &reply, sizeof(reply), 0), 0);
        }
        close(fd);

        {
                struct shmz_client *c = connect_or_die();
                struct shmz_daemon_status st;

                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                shmz_disconnect(c);
        }
}

TestSuite(shmzctl, .fini = stop, .timeout = 60);

/* Runs shmzctl against the test's daemon; returns its exit status, output in out. */
static int shmzctl(char *out, size_t size, const char *args) {
        char cmd[512];
        FILE *p;
        size_t n;

        snprintf(cmd, sizeof(cmd), "%s --socket %s %s 2>&1", getenv("SHMZCTL"), d.socket, args);
        p = popen(cmd, "re");
        cr_assert_not_null(p);
        n = fread(out, 1, size - 1, p);
        out[n] = 0;
        return WEXITSTATUS(pclose(p));
}

Test(shmzctl, create_list_info_chmod_rm) {
        char out[4096];

        harness_init(&d, "[zone demo]\nsize = 1M\ntag = demo\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));

        cr_assert_eq(shmzctl(out, sizeof(out), "create web 2M --tag limit_req"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "create web 2M"), 1);
        /* Every error names what it is about, in words. */
        cr_assert(strstr(out, "shmzctl create web: zone exists with another tag ('limit_req', 2097152 bytes)"), "%s",
                  out);
        cr_assert_eq(shmzctl(out, sizeof(out), "create web 2M --tag limit_req"), 1);
        cr_assert(strstr(out, "shmzctl create web: zone exists (tag"), "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "chmod 640 web"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "chown nobody:nogroup web"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "info web"), 0, "%s", out);
        cr_assert(strstr(out, "tag: limit_req\n") && strstr(out, "size: 2097152\n") && strstr(out, "mode: 0640\n") &&
                          strstr(out, "owner: nobody\n") && strstr(out, "group: nogroup\n") &&
                          strstr(out, "created: 20"),
                  "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "list"), 0, "%s", out);
        cr_assert(strstr(out, "demo ") && strstr(out, "(declared)") && strstr(out, "web "), "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "rm web"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "info web"), 3);
        cr_assert(strstr(out, "shmzctl info web: no such zone\n"), "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "status"), 0, "%s", out);
        cr_assert(strstr(out, "zones: 1 "), "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "frobnicate"), 2);
}

/* Runs a shell command line; its exit status, output in out. */
static int run(char *out, size_t size, const char *cmd) {
        FILE *p = popen(cmd, "re");
        size_t n;

        cr_assert_not_null(p);
        n = fread(out, 1, size - 1, p);
        out[n] = 0;
        return WEXITSTATUS(pclose(p));
}

/* Checks shmzctl's JSON with python's parser: a python expression over j that must be true. */
static void check_json(const char *args, const char *expr) {
        char cmd[2048], out[8192];

        snprintf(cmd, sizeof(cmd),
                 "%s --socket %s %s | python3 -c \"import json,sys; j=json.load(sys.stdin); sys.exit(0 if (%s) else "
                 "1)\" "
                 "2>&1",
                 getenv("SHMZCTL"), d.socket, args, expr);
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s: %s: %s", args, expr, out);
}

Test(shmzctl, commands_json_options_exit_codes) {
        char out[8192], cmd[1024];

        harness_init(&d, "[zone demo]\nsize = 1M\ntag = demo\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));

        /* Options before, between and after the operands. */
        cr_assert_eq(shmzctl(out, sizeof(out), "create a --size 2M --tag t1 --mode 0644"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "--size 4K --json create b"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "--size 1G create c --size 3M"), 0, "%s", out);
        snprintf(cmd, sizeof(cmd), "POSIXLY_CORRECT=1 %s --socket %s create e --size 1K 2>&1", getenv("SHMZCTL"),
                 d.socket);
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "show a"), 0, "%s", out);
        cr_assert(strstr(out, "tag: t1\n") && strstr(out, "mode: 0644\n") && strstr(out, "size: 2097152\n"), "%s", out);

        check_json("list --json", "[z['name'] for z in j] == ['a','b','c','demo','e'] and j[3]['declared'] is True and "
                                  "j[0]['size'] == 2097152 and j[0]['mode'] == '0644' and j[0]['tag'] == 't1' and "
                                  "j[1]['size'] == 4096 and j[2]['size'] == 3145728 and isinstance(j[0]['uid'], int)");
        check_json("show a --json", "j['name'] == 'a' and j['size'] == 2097152 and j['attached'] == 0 and "
                                    "j['declared'] is False and j['gid'] == 0");
        check_json("--json status", "j['zones'] == 5 and isinstance(j['budget'], int) and j['budget_used'] > 0 and "
                                    "set(j) >= {'clients','requests','errors','uptime_usec','uid_quota'}");

        cr_assert_eq(shmzctl(out, sizeof(out), "list --names"), 0, "%s", out);
        cr_assert_str_eq(out, "a\nb\nc\ndemo\ne\n");
        cr_assert_eq(shmzctl(out, sizeof(out), "chown 65534:65534 b"), 0, "%s", out);
        check_json("show b --json", "j['uid'] == 65534 and j['gid'] == 65534 and j['user'] == 'nobody' and "
                                    "j['group'] == 'nogroup' and j['mode'] == '0600'");
        cr_assert_eq(shmzctl(out, sizeof(out), "chmod 0600 b"), 0, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "rm e"), 0, "%s", out);

        /* 2: usage. */
        cr_assert_eq(shmzctl(out, sizeof(out), ""), 2, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "create x"), 2, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "create x --size lots"), 2, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "chmod 99 a"), 2, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "chown no-such-user-here a"), 2, "%s", out);
        cr_assert(strstr(out, "shmzctl chown no-such-user-here: no such user\n"), "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "--bogus list"), 2, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "show"), 2, "%s", out);
        /* 3: not found. */
        cr_assert_eq(shmzctl(out, sizeof(out), "show nope"), 3, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "rm nope"), 3, "%s", out);
        cr_assert_eq(shmzctl(out, sizeof(out), "chmod 644 nope"), 3, "%s", out);
        /* 1: anything else (it exists). */
        cr_assert_eq(shmzctl(out, sizeof(out), "create a --size 1M"), 1, "%s", out);
        /* 4: permission, as nobody on root's zone. */
        snprintf(cmd, sizeof(cmd), "setpriv --reuid=65534 --regid=65534 --clear-groups %s --socket %s %s 2>&1",
                 getenv("SHMZCTL"), d.socket, "chmod 0666 a");
        cr_assert_eq(run(out, sizeof(out), cmd), 4, "%s", out);
        cr_assert(strstr(out, "shmzctl chmod a: not yours: only its owner or root may do that\n"), "%s", out);
        /* Who holds a zone: for those who may read it (a is 0644); c is root's 0600: its figures only. */
        snprintf(cmd, sizeof(cmd), "setpriv --reuid=65534 --regid=65534 --clear-groups %s --socket %s %s 2>&1",
                 getenv("SHMZCTL"), d.socket, "show c");
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s", out);
        cr_assert(strstr(out, "holders: (not readable by you)\n") && strstr(out, "size: 3145728\n"), "%s", out);
        snprintf(cmd, sizeof(cmd), "setpriv --reuid=65534 --regid=65534 --clear-groups %s --socket %s %s 2>&1",
                 getenv("SHMZCTL"), d.socket, "show a");
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s", out);
        cr_assert(strstr(out, "holders: 0\n") && strstr(out, "creator: root, pid "), "%s", out);
        snprintf(cmd, sizeof(cmd), "setpriv --reuid=65534 --regid=65534 --clear-groups %s --socket %s %s 2>&1",
                 getenv("SHMZCTL"), d.socket, "rm a");
        cr_assert_eq(run(out, sizeof(out), cmd), 4, "%s", out);
        /* 5: no daemon there. */
        snprintf(cmd, sizeof(cmd), "%s --socket /nonexistent/shmzone.sock status 2>&1", getenv("SHMZCTL"));
        cr_assert_eq(run(out, sizeof(out), cmd), 5, "%s", out);
        snprintf(cmd, sizeof(cmd), "SHMZONE_SOCKET=/nonexistent/shmzone.sock %s list 2>&1", getenv("SHMZCTL"));
        cr_assert_eq(run(out, sizeof(out), cmd), 5, "%s", out);

        /* The completion offers zone names, asking the daemon the command line names. */
        snprintf(cmd, sizeof(cmd),
                 "PATH=$(dirname %s):$PATH bash -c 'source %s.bash && COMP_WORDS=(shmzctl --socket %s show d) && "
                 "COMP_CWORD=4 && _shmzctl && echo \"${COMPREPLY[@]}\"' 2>&1",
                 getenv("SHMZCTL"), getenv("SHMZCTL"), d.socket);
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s", out);
        cr_assert_str_eq(out, "demo\n");

        snprintf(cmd, sizeof(cmd), "%s --help", getenv("SHMZCTL"));
        cr_assert_eq(run(out, sizeof(out), cmd), 0);
        cr_assert(strstr(out, "Exit status") && strstr(out, "chown"), "%s", out);
        snprintf(cmd, sizeof(cmd), "%s --version", getenv("SHMZCTL"));
        cr_assert_eq(run(out, sizeof(out), cmd), 0);
        cr_assert(!strncmp(out, "shmzctl ", 8), "%s", out);
}

Test(shmzctl, bash_completion) {
        char out[4096], cmd[2048];
        char file[1024];

        /* tools/meson.build copies it next to the binary. */
        snprintf(file, sizeof(file), "%s.bash", getenv("SHMZCTL"));

        if (access(file, R_OK) < 0 || access("/bin/bash", X_OK) < 0)
                cr_skip_test("no completion script or no bash");
        snprintf(
                cmd, sizeof(cmd),
                "bash -c 'source %s && COMP_WORDS=(shmzctl cr) && COMP_CWORD=1 && _shmzctl && echo \"${COMPREPLY[@]}\" "
                "&& COMP_WORDS=(shmzctl list --js) && COMP_CWORD=2 && _shmzctl && echo \"${COMPREPLY[@]}\"' 2>&1",
                file);
        cr_assert_eq(run(out, sizeof(out), cmd), 0, "%s", out);
        cr_assert_str_eq(out, "create\n--json\n");
}

Test(config, help_and_version) {
        char cmd[512], out[4096];
        FILE *p;
        size_t n;

        snprintf(cmd, sizeof(cmd), "%s --help && %s --version", getenv("SHMZONED"), getenv("SHMZONED"));
        p = popen(cmd, "re");
        cr_assert_not_null(p);
        n = fread(out, 1, sizeof(out) - 1, p);
        out[n] = 0;
        cr_assert_eq(WEXITSTATUS(pclose(p)), 0, "%s", out);
        cr_assert(strstr(out, "--config") && strstr(out, "--no-mount") && strstr(out, "SIGHUP"), "%s", out);
        cr_assert(strstr(out, "shmzoned " PACKAGE_VERSION "\n"), "%s", out);

        /* Bad options: a clear refusal, not a start. */
        snprintf(cmd, sizeof(cmd), "%s --threads 0 2>&1; echo rc=$?", getenv("SHMZONED"));
        p = popen(cmd, "re");
        n = fread(out, 1, sizeof(out) - 1, p);
        out[n] = 0;
        pclose(p);
        cr_assert(strstr(out, "--threads") && strstr(out, "rc=1"), "%s", out);
}

TestSuite(lifecycle, .fini = stop, .timeout = 60);

Test(lifecycle, sigint_stops_cleanly) {
        struct shmz_client *c;
        struct shmz_daemon_status st;
        int status;

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        c = connect_or_die();
        cr_assert_eq(kill(d.pid, SIGINT), 0);
        cr_assert_eq(waitpid(d.pid, &status, 0), d.pid);
        d.pid = 0;
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d; log: %s", status, harness_log(&d));
        /* The client was told (or saw the end of the stream), the socket file is gone. */
        cr_assert_eq(shmz_daemon_status(c, &st), -ENOTCONN);
        cr_assert(strstr(harness_log(&d), "Received Interrupt, stopping."), "log: %s", harness_log(&d));
        cr_assert_eq(access(d.socket, F_OK), -1);
        shmz_disconnect(c);
}

Test(lifecycle, clients_are_spread_over_workers) {
        const char *const args[] = { "--threads", "2", "--verbose", NULL };
        struct shmz_client *c[4];

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, args, false), 0, "log: %s", harness_log(&d));
        for (int i = 0; i < 4; i++)
                c[i] = connect_or_die();
        /* Every worker served somebody: connections are not all on one thread. */
        cr_assert(strstr(harness_log(&d), "Worker 0: client") && strstr(harness_log(&d), "Worker 1: client"), "log: %s",
                  harness_log(&d));
        for (int i = 0; i < 4; i++)
                shmz_disconnect(c[i]);
}

#define CONNECTORS 8
#define CONNECTS_EACH 25

struct connector {
        const char *socket;
        struct shmz_client *c[CONNECTS_EACH];
        int failures;
};

/* Connects CONNECTS_EACH times as fast as it can; each connection must answer a request. */
static void *connector_main(void *userdata) {
        struct connector *k = userdata;

        for (int i = 0; i < CONNECTS_EACH; i++) {
                struct shmz_daemon_status st;

                k->c[i] = NULL;
                if (shmz_connect(k->socket, &k->c[i]) < 0 || shmz_daemon_status(k->c[i], &st) < 0)
                        k->failures++;
        }
        return NULL;
}

Test(lifecycle, many_concurrent_connects_are_spread_over_workers) {
        const char *const args[] = { "--threads", "3", "--verbose", NULL };
        static struct connector k[CONNECTORS];
        pthread_t t[CONNECTORS];
        struct shmz_daemon_status st;
        struct shmz_client *c;

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, args, false), 0, "log: %s", harness_log(&d));
        for (int i = 0; i < CONNECTORS; i++) {
                k[i] = (struct connector){ .socket = d.socket };
                cr_assert_eq(pthread_create(&t[i], NULL, connector_main, &k[i]), 0);
        }
        for (int i = 0; i < CONNECTORS; i++) {
                cr_assert_eq(pthread_join(t[i], NULL), 0);
                cr_assert_eq(k[i].failures, 0, "connector %d: %d connections failed", i, k[i].failures);
        }
        /* Every connection is counted once, whichever worker took it. */
        c = connect_or_die();
        cr_assert_eq(shmz_daemon_status(c, &st), 0);
        cr_assert_eq(st.clients, CONNECTORS * CONNECTS_EACH + 1);
        for (int w = 0; w < 3; w++) {
                char line[32];

                snprintf(line, sizeof(line), "Worker %d: client", w);
                cr_assert(strstr(harness_log(&d), line), "no connection went to worker %d; log: %s", w,
                          harness_log(&d));
        }
        for (int i = 0; i < CONNECTORS; i++)
                for (int j = 0; j < CONNECTS_EACH; j++)
                        shmz_disconnect(k[i].c[j]);
        /* And given back once each when they go. */
        for (int i = 0; i < 500; i++) {
                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                if (st.clients == 1)
                        break;
                usleep(10000);
        }
        cr_assert_eq(st.clients, 1);
        shmz_disconnect(c);
        cr_assert_eq(harness_stop(&d), 0, "daemon exit; log: %s", harness_log(&d));
}

/*
 * Whatever a new connection sends before the worker took it is read at once,
 * by the worker that accepts it: noise, an oversized packet, a hello and then
 * garbage, nothing at all (closed before it was accepted), a hello and a
 * request whose replies nobody reads. Each ends its connection or is answered,
 * and every slot is given back.
 */
Test(hostile, garbage_on_connections_a_worker_just_accepted) {
        const char *const args[] = { "--threads", "2", NULL };
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct shmz_msg_header hh = { .size = sizeof(hh) + sizeof(hello), .type = SHMZ_MSG_HELLO, .stream = 1 };
        struct shmz_msg_header sh = { .size = sizeof(sh), .type = SHMZ_MSG_STATUS, .stream = 2 };
        static uint8_t big[2 * SHMZ_MSG_MAX];
        struct shmz_daemon_status st;
        struct shmz_client *c;
        unsigned seed = 77;
        uint8_t buf[SHMZ_MSG_MAX];

        harness_init(&d, "[daemon]\nuid_max_clients = 64\n");
        cr_assert_eq(harness_start(&d, args, false), 0, "log: %s", harness_log(&d));
        memcpy(buf, &hh, sizeof(hh));
        memcpy(buf + sizeof(hh), &hello, sizeof(hello));
        for (int i = 0; i < 400; i++) {
                int fd = harness_raw_connect(d.socket), kind = i % 5;
                bool ends = true;

                cr_assert_geq(fd, 0, "the daemon stopped accepting after %d connections", i);
                for (size_t k = 0; k < sizeof(big); k++)
                        big[k] = (uint8_t) rand_r(&seed);
                switch (kind) {
                case 0: /* noise of a random length, before any hello */
                        (void) send(fd, big, sizeof(struct shmz_msg_header) + (size_t) rand_r(&seed) % 200,
                                    MSG_NOSIGNAL);
                        break;
                case 1: /* larger than any message */
                        (void) send(fd, big, sizeof(big), MSG_NOSIGNAL);
                        break;
                case 2: /* a hello, then noise */
                        cr_assert_eq(send(fd, buf, hh.size, MSG_NOSIGNAL), (ssize_t) hh.size);
                        (void) send(fd, big, 5, MSG_NOSIGNAL);
                        break;
                case 3: /* nothing: gone before it was accepted */
                        close(fd);
                        fd = -1;
                        break;
                case 4: /* a hello and a request, never read */
                        cr_assert_eq(send(fd, buf, hh.size, MSG_NOSIGNAL), (ssize_t) hh.size);
                        cr_assert_eq(send(fd, &sh, sizeof(sh), MSG_NOSIGNAL), (ssize_t) sizeof(sh));
                        ends = false;
                        break;
                }
                if (fd < 0)
                        continue;
                if (ends) {
                        /* The connection ends (after the hello's reply, if there was one). */
                        struct pollfd p = { .fd = fd, .events = POLLIN };
                        ssize_t got;

                        do {
                                cr_assert_eq(poll(&p, 1, 10000), 1, "connection %d (kind %d) was kept", i, kind);
                                got = recv(fd, buf + sizeof(hh) + sizeof(hello), 64, MSG_DONTWAIT);
                        } while (got > 0 && kind == 2);
                        cr_assert_eq(got, 0, "connection %d (kind %d): %zd", i, kind, got);
                }
                close(fd);
        }
        c = connect_or_die();
        for (int i = 0; i < 500; i++) {
                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                if (st.clients == 1)
                        break;
                usleep(10000);
        }
        cr_assert_eq(st.clients, 1, "slots were not given back");
        cr_assert_gt(st.errors, 100);
        shmz_disconnect(c);
        cr_assert_eq(harness_stop(&d), 0, "daemon exit; log: %s", harness_log(&d));
}

Test(reload, changed_socket_is_reported) {
        char text[512];

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        /* The socket comes from --socket here; a different one in the file only shows with no option. */
        snprintf(text, sizeof(text), "[daemon]\nthreads = 3\n");
        harness_write_config(&d, text);
        cr_assert_eq(harness_reload(&d), 0);
        cr_assert(strstr(harness_log(&d), "take a restart"), "log: %s", harness_log(&d));
}

static int fill_max_clients(void *userdata) {
        struct shmz_client *c[3], *extra = NULL;
        int r = 0;

        for (int i = 0; i < 3; i++)
                if (shmz_connect(d.socket, &c[i]) < 0)
                        return 10;
        if (shmz_connect(d.socket, &extra) == 0)
                return 11; /* a fourth client got in */
        /* A place frees up when somebody leaves (the worker counts it down asynchronously). */
        shmz_disconnect(c[0]);
        for (int i = 0; i < 200; i++) {
                r = shmz_connect(d.socket, &extra);
                if (r == 0)
                        break;
                usleep(10000);
        }
        if (r < 0)
                return 12;
        /* Full again: root still gets in, on the slots kept for it. */
        if (write(*(int *) userdata, "f", 1) != 1)
                return 13;
        (void) !read(*((int *) userdata + 1), &r, 1);
        shmz_disconnect(extra);
        shmz_disconnect(c[1]);
        shmz_disconnect(c[2]);
        return 0;
}

static void *fill_thread(void *arg) {
        return (void *) (intptr_t) harness_run_as(65534, 65534, fill_max_clients, arg);
}

Test(hostile, connections_beyond_max_clients_are_closed) {
        int full[2], go[2], fds[2];
        pthread_t t;
        void *ret;
        char b;

        harness_init(&d, "[daemon]\nmax_clients = 3\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        cr_assert_eq(pipe2(full, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(go, O_CLOEXEC), 0);
        fds[0] = full[1];
        fds[1] = go[0];
        cr_assert_eq(pthread_create(&t, NULL, fill_thread, fds), 0);
        if (read(full[0], &b, 1) == 1) {
                struct shmz_client *root = connect_or_die();
                struct shmz_daemon_status st;

                cr_assert_eq(shmz_daemon_status(root, &st), 0);
                cr_assert_eq(st.clients, 4);
                shmz_disconnect(root);
        }
        (void) !write(go[1], "g", 1);
        cr_assert_eq(pthread_join(t, &ret), 0);
        cr_assert_eq((intptr_t) ret, 0, "step %d failed", (int) (intptr_t) ret);
}

Test(reload, never_adopts_a_zone_a_client_made) {
        struct shmz_client *c;
        struct shmz_zone *z;
        struct shmz_zone_stat st;

        harness_init(&d, NULL);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        c = connect_or_die();
        /* A client takes the name first, with the very size and tag the administrator will declare. */
        cr_assert_eq(shmz_zone_open(c, "squat", 1u << 20, "t", SHMZ_CREATE, &z), 0);
        harness_write_config(&d, "[zone squat]\nsize = 1M\ntag = t\nuser = nobody\nmode = 0600\n");
        cr_assert_eq(harness_reload(&d), 0);
        cr_assert(strstr(harness_log(&d), "Zone 'squat': a zone of that name was created by uid 0"), "log: %s",
                  harness_log(&d));
        cr_assert_eq(shmz_zone_stat(c, "squat", &st), 0);
        cr_assert_eq(st.flags & SHMZ_ZONE_INFO_DECLARED, 0);
        cr_assert_eq(st.uid, getuid(), "the squatter's zone was handed to the declared owner");
        shmz_zone_close(z);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}
