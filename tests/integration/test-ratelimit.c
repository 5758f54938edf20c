/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rate limiter example end to end: a real shmzoned on a private socket,
 * the real pre-forked ratelimit-server on 127.0.0.1 (a free port it picks and
 * prints), and plain HTTP/1.0 requests from a small client of our own.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static struct daemon_proc d;
static pid_t server = -1;
static int server_out = -1;
static int port;

static uint64_t mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static const char *server_path(void) {
        const char *p = getenv("RATELIMIT_SERVER");
        return p ? p : "ratelimit-server";
}

/* SIGTERM to the master; its exit status (or 128+signal), killing it after 10 s. */
static int server_stop(void) {
        int status = 0;

        if (server <= 0)
                return -1;
        kill(server, SIGTERM);
        for (uint64_t deadline = mono_ms() + 10000;;) {
                pid_t p = waitpid(server, &status, WNOHANG);

                if (p == server)
                        break;
                if (mono_ms() > deadline) {
                        kill(server, SIGKILL);
                        waitpid(server, &status, 0);
                        break;
                }
                struct timespec ts = { .tv_nsec = 10 * 1000 * 1000 };
                nanosleep(&ts, NULL);
        }
        server = -1;
        if (server_out >= 0)
                close(server_out);
        server_out = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void stop(void) {
        (void) server_stop();
        harness_cleanup(&d);
}

/* Reads the server's stdout until "listening on 127.0.0.1:PORT" (20 s at most). */
static int wait_listening(void) {
        char buf[512];
        size_t n = 0;

        for (uint64_t deadline = mono_ms() + 20000; mono_ms() < deadline;) {
                struct pollfd p = { .fd = server_out, .events = POLLIN };
                ssize_t k;
                char *s;

                if (poll(&p, 1, 200) <= 0)
                        continue;
                k = read(server_out, buf + n, sizeof(buf) - 1 - n);
                if (k <= 0)
                        return -EPIPE;
                n += (size_t) k;
                buf[n] = 0;
                s = strstr(buf, "listening on 127.0.0.1:");
                if (s && strchr(s, '\n'))
                        return atoi(s + strlen("listening on 127.0.0.1:"));
        }
        return -ETIMEDOUT;
}

/* A daemon, and the server with these arguments (NULL-terminated) on a free port. */
static void start(const char *const *args) {
        const char *argv[32];
        int pipefd[2];
        size_t n = 0;

        harness_init(&d, "[daemon]\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
        argv[n++] = server_path();
        argv[n++] = "--socket";
        argv[n++] = d.socket;
        argv[n++] = "--listen";
        argv[n++] = "127.0.0.1:0";
        for (size_t i = 0; args[i] && n < 30; i++)
                argv[n++] = args[i];
        argv[n] = NULL;
        cr_assert_eq(pipe2(pipefd, O_CLOEXEC), 0);
        server = fork();
        cr_assert_geq(server, 0);
        if (server == 0) {
                dup2(pipefd[1], STDOUT_FILENO);
                execvp(argv[0], (char *const *) argv);
                _exit(127);
        }
        close(pipefd[1]);
        server_out = pipefd[0];
        port = wait_listening();
        cr_assert_gt(port, 0, "server did not start: %d", port);
}

struct reply {
        int status;      /* HTTP status, or -errno */
        uint64_t ms;     /* from sending to the end of the answer */
        char worker[16]; /* X-Worker: the process that answered */
        char buf[1024];
        size_t n;
};

static void parse_reply(struct reply *r) {
        const char *w;

        r->buf[r->n] = 0;
        if (sscanf(r->buf, "HTTP/1.%*d %d", &r->status) != 1)
                r->status = -EBADMSG;
        w = strcasestr(r->buf, "\r\nX-Worker: ");
        if (w)
                sscanf(w + strlen("\r\nX-Worker: "), "%15[0-9]", r->worker);
}

/*
 * n requests at once, each on its own connection, with an optional header line
 * per request (NULL: none); waits (30 s at most) for every answer.
 */
static void http_many(size_t n, const char *const *headers, struct reply *out) {
        int fds[64];
        uint64_t t0;

        cr_assert_leq(n, 64);
        memset(out, 0, n * sizeof(*out));
        for (size_t i = 0; i < n; i++) {
                fds[i] = harness_tcp_connect(port);
                cr_assert_geq(fds[i], 0, "connect: %s", strerror(-fds[i]));
        }
        t0 = mono_ms();
        for (size_t i = 0; i < n; i++) {
                char req[256];
                int len = snprintf(req, sizeof(req), "GET / HTTP/1.0\r\nHost: test\r\n%s%s\r\n",
                                   headers && headers[i] ? headers[i] : "", headers && headers[i] ? "\r\n" : "");
                cr_assert_eq(write(fds[i], req, (size_t) len), len);
        }
        for (size_t left = n; left > 0;) {
                struct pollfd p[64];
                size_t map[64], k = 0;

                cr_assert_lt(mono_ms() - t0, 30000, "answers take too long");
                for (size_t i = 0; i < n; i++)
                        if (fds[i] >= 0) {
                                p[k] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
                                map[k++] = i;
                        }
                if (poll(p, k, 500) <= 0)
                        continue;
                for (size_t j = 0; j < k; j++) {
                        struct reply *r = &out[map[j]];
                        ssize_t got;

                        if (!p[j].revents)
                                continue;
                        got = read(fds[map[j]], r->buf + r->n, sizeof(r->buf) - 1 - r->n);
                        if (got > 0) {
                                r->n += (size_t) got;
                                continue;
                        }
                        /* HTTP/1.0: the end of the answer is the end of the connection. */
                        r->ms = mono_ms() - t0;
                        parse_reply(r);
                        close(fds[map[j]]);
                        fds[map[j]] = -1;
                        left--;
                }
        }
}

static struct reply http_one(const char *header) {
        struct reply r;
        const char *h[1] = { header };

        http_many(1, h, &r);
        return r;
}

static int count_status(const struct reply *r, size_t n, int status) {
        int c = 0;
        for (size_t i = 0; i < n; i++)
                c += r[i].status == status;
        return c;
}

TestSuite(ratelimit, .fini = stop, .timeout = 90);

/*
 * burst=5 nodelay from one address, 20 requests at once spread over four
 * workers: the bucket is shared, so 1 + 5 pass (a few more only if the
 * answers took seconds), the rest get 503.
 */
Test(ratelimit, shared_bucket_rejects_over_burst) {
        const char *args[] = {
                "--workers", "4", "--zone", "one:1m", "--rate", "1r/s", "--burst", "5", "--nodelay", NULL
        };
        struct reply r[20];
        uint64_t t0;
        int ok, workers = 0;

        start(args);
        t0 = mono_ms();
        http_many(20, NULL, r);
        ok = count_status(r, 20, 200);
        cr_assert_eq(ok + count_status(r, 20, 503), 20, "every answer 200 or 503");
        cr_assert_geq(ok, 6, "%d passed", ok);
        cr_assert_leq(ok, 6 + (int) ((mono_ms() - t0) / 1000), "%d passed", ok);
        for (size_t i = 0; i < 20; i++) {
                bool seen = false;
                for (size_t j = 0; j < i; j++)
                        seen = seen || strcmp(r[i].worker, r[j].worker) == 0;
                workers += !seen && r[i].worker[0];
        }
        printf("ratelimit: 20 requests, %d passed, answered by %d workers\n", ok, workers);
        cr_assert_eq(server_stop(), 0, "clean stop");
}

/*
 * rate=10r/s burst=5, no nodelay: requests over the rate are delayed by
 * excess / rate, 100 ms apart; with delay=2 the first two over the rate pass
 * at once.
 */
static void check_delays(const char *delay_arg, const char *delay_val, const uint64_t *want, size_t n) {
        const char *args[] = { "--workers", "2", "--zone",  "one:1m",  "--rate", "10r/s",
                               "--burst",   "5", delay_arg, delay_val, NULL };
        struct reply r[8];
        uint64_t ms[8];

        start(args);
        http_many(n, NULL, r);
        for (size_t i = 0; i < n; i++) {
                cr_assert_eq(r[i].status, 200, "request %zu: %d", i, r[i].status);
                ms[i] = r[i].ms;
        }
        /* Which connection a worker took first is not ours to know: compare the sorted times. */
        for (size_t i = 0; i < n; i++)
                for (size_t j = i + 1; j < n; j++)
                        if (ms[j] < ms[i]) {
                                uint64_t t = ms[i];
                                ms[i] = ms[j];
                                ms[j] = t;
                        }
        for (size_t i = 0; i < n; i++) {
                printf("ratelimit: %s answer %zu after %lu ms (want %lu)\n", delay_arg ? delay_arg : "", i,
                       (unsigned long) ms[i], (unsigned long) want[i]);
                cr_assert_geq(ms[i] + 30, want[i], "answer %zu after %lu ms, want %lu", i, (unsigned long) ms[i],
                              (unsigned long) want[i]);
                cr_assert_leq(ms[i], want[i] + 600, "answer %zu after %lu ms, want %lu", i, (unsigned long) ms[i],
                              (unsigned long) want[i]);
        }
}

Test(ratelimit, delays_like_nginx) {
        static const uint64_t want[] = { 0, 100, 200, 300, 400 };
        check_delays(NULL, NULL, want, 5);
}

Test(ratelimit, delay_n_passes_first_n_at_once) {
        static const uint64_t want[] = { 0, 0, 0, 100, 200, 300 };
        check_delays("--delay", "2", want, 6);
}

/* Keyed on a header: each value its own bucket; no header, not accounted (as nginx's empty key). */
Test(ratelimit, keyed_on_header) {
        const char *args[] = { "--workers", "2", "--zone",    "hdr:1m",       "--rate",   "1r/s",
                               "--burst",   "0", "--nodelay", "--key-header", "X-Client", NULL };

        start(args);
        cr_assert_eq(http_one("X-Client: alice").status, 200);
        cr_assert_eq(http_one("X-Client: alice").status, 503);
        cr_assert_eq(http_one("X-Client: bob").status, 200);
        cr_assert_eq(http_one("X-Client: bob").status, 503);
        for (int i = 0; i < 5; i++)
                cr_assert_eq(http_one(NULL).status, 200);
}

/*
 * A worker killed by SIGKILL is replaced, and the bucket outlives it: the
 * state is in the zone, not in the process, so whoever answers next goes on
 * counting from where the dead one left it.
 */
Test(ratelimit, killed_worker_is_replaced_and_the_bucket_survives) {
        const char *args[] = {
                "--workers", "2", "--zone", "one:1m", "--rate", "1r/s", "--burst", "3", "--nodelay", NULL
        };
        struct reply r = {};
        uint64_t t0;
        pid_t victim;
        int ok = 0, other = 0;

        start(args);
        t0 = mono_ms();
        cr_assert_eq(http_one(NULL).status, 200);
        r = http_one(NULL);
        cr_assert_eq(r.status, 200);
        victim = atoi(r.worker);
        cr_assert_gt(victim, 1);
        cr_assert_eq(kill(victim, SIGKILL), 0);
        /* Bounded: 8 requests; one accepted by the dying worker may be cut off. */
        for (int i = 0; i < 8; i++) {
                r = http_one(NULL);
                ok += r.status == 200;
                other += r.status > 0 && atoi(r.worker) != victim;
        }
        cr_assert_gt(other, 0, "another worker answered");
        /* 1 + burst 3 in all; 2 went before the kill, plus what drained meanwhile. */
        cr_assert_geq(ok, 2, "%d passed after the kill", ok);
        cr_assert_leq(ok, 2 + (int) ((mono_ms() - t0) / 1000), "%d passed after the kill: the bucket was lost", ok);
        cr_assert_eq(server_stop(), 0, "clean stop");
}

/*
 * Connections waiting in the accept queue of the listening socket on 127.0.0.1:port (for a
 * listening socket, /proc/net/tcp's rx_queue is that queue), or -errno.
 */
static int accept_queue(int listen_port) {
        FILE *f = fopen("/proc/net/tcp", "re");
        char line[512];
        int r = -ENOENT;

        if (!f)
                return -errno;
        while (r == -ENOENT && fgets(line, sizeof(line), f)) {
                unsigned addr, lport, st, txq, rxq;

                if (sscanf(line, " %*u: %x:%x %*x:%*x %x %x:%x", &addr, &lport, &st, &txq, &rxq) == 5 && st == 0x0A &&
                    (int) lport == listen_port)
                        r = (int) rxq;
        }
        fclose(f);
        return r;
}

static void *term_later(void *userdata) {
        /* Well inside the first held-back request's 1 s delay: a choice of moment, not a synchronisation. */
        struct timespec ts = { .tv_nsec = 300 * 1000 * 1000 }, poll_ts = { .tv_nsec = 5 * 1000 * 1000 };

        nanosleep(&ts, NULL);
        /*
         * A connection still in the accept queue when every worker stops is the kernel's to refuse (as
         * with nginx): wait until the workers took all three, for 5 s at most (a loaded machine).
         */
        for (int i = 0; i < 1000 && accept_queue(port) > 0; i++)
                nanosleep(&poll_ts, NULL);
        kill(server, SIGTERM);
        return NULL;
}

/* SIGTERM while requests are held back: they are answered at once, workers and master exit 0. */
Test(ratelimit, sigterm_answers_held_back_requests_and_stops) {
        const char *args[] = { "--workers", "2", "--zone", "one:1m", "--rate", "1r/s", "--burst", "5", NULL };
        struct reply r[3];
        pthread_t t;
        int status;

        start(args);
        /* The key's free first request: a worker serves, and the next three are held back 1, 2, 3 s. */
        cr_assert_eq(http_one(NULL).status, 200);
        cr_assert_eq(pthread_create(&t, NULL, term_later, NULL), 0);
        http_many(3, NULL, r);
        pthread_join(t, NULL);
        for (int i = 0; i < 3; i++) {
                cr_assert_eq(r[i].status, 200, "request %d: %d", i, r[i].status);
                cr_assert_lt(r[i].ms, 1000, "request %d answered after %lu ms, not at SIGTERM", i,
                             (unsigned long) r[i].ms);
        }
        cr_assert_eq(waitpid(server, &status, 0), server);
        server = -1;
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "master: status %d", status);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}
