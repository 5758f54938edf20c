/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The nginx module in Debian's real nginx: a real shmzoned on a private socket,
 * nginx started here on 127.0.0.1 from a config written here (its own prefix,
 * port and pid file, daemon off), stopped by its pid. The module's decisions are
 * compared with nginx's own limit_req in the same nginx: two locations, the same
 * requests, sent to both at the same moment.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "limiter.h"
#include "shmzone.h"

static struct daemon_proc d;

struct nginx {
        pid_t pid;
        int port;
        char dir[160];
        char conf[192];
};
static struct nginx ngx[2];
static bool ngx_daemon; /* daemon on (a binary upgrade needs it): the master is not our child */

static uint64_t mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms) {
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long) (ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

/* Not NGINX: nginx takes that variable for the sockets an old binary hands a new one. */
static const char *nginx_path(void) {
        const char *p = getenv("NGINX_BIN");
        return p ? p : "/usr/sbin/nginx";
}

static const char *module_path(void) {
        const char *p = getenv("NGINX_MODULE");
        return p ? p : "ngx_http_shmzone_module.so";
}

static int free_port(void) {
        struct sockaddr_in sa = { .sin_family = AF_INET };
        socklen_t len = sizeof(sa);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port;

        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        cr_assert_geq(fd, 0);
        cr_assert_eq(bind(fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        cr_assert_eq(getsockname(fd, (struct sockaddr *) &sa, &len), 0);
        port = ntohs(sa.sin_port);
        close(fd);
        return port;
}

static char *read_file(const char *path) {
        static char buf[1 << 20];
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n;

        buf[0] = 0;
        if (fd < 0)
                return buf;
        n = read(fd, buf, sizeof(buf) - 1);
        buf[n > 0 ? n : 0] = 0;
        close(fd);
        return buf;
}

static char *error_log(const struct nginx *n) {
        char p[256];

        snprintf(p, sizeof(p), "%s/error.log", n->dir);
        return read_file(p);
}

/*
 * The config of nginx i: http-level text and the server's locations. One worker, so
 * that the requests sent to two locations at once are read in one turn of its loop
 * and see one time, as two requests to one location would.
 */
static void nginx_config(struct nginx *n, int i, const char *workers, const char *http, const char *locations) {
        FILE *f;

        if (!n->dir[0]) {
                snprintf(n->dir, sizeof(n->dir), "%s/nginx%d", d.dir, i);
                cr_assert_eq(mkdir(n->dir, 0755), 0, "%s: %m", n->dir);
                snprintf(n->conf, sizeof(n->conf), "%s/nginx.conf", n->dir);
                n->port = free_port();
                char p[256];
                snprintf(p, sizeof(p), "%s/f", n->dir);
                f = fopen(p, "w");
                cr_assert(f);
                fputs("ok\n", f);
                fclose(f);
        }
        f = fopen(n->conf, "w");
        cr_assert(f);
        fprintf(f,
                "load_module %s;\n"
                "daemon %s;\nmaster_process on;\nuser root;\nworker_processes %s;\n"
                "pid %s/nginx.pid;\nerror_log %s/error.log info;\n%s"
                "events { worker_connections 512; }\n"
                "http {\n"
                "  access_log off;\n"
                "  client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s; uwsgi_temp_path %s;"
                " scgi_temp_path %s;\n"
                "  shmzone_socket %s;\n"
                "%s\n"
                "  server {\n    listen 127.0.0.1:%d;\n"
                "    location = /plain { alias %s/f; }\n"
                "%s\n  }\n}\n",
                module_path(), ngx_daemon ? "on" : "off", workers, n->dir, n->dir,
                getenv("NGINX_MAIN_EXTRA") ? getenv("NGINX_MAIN_EXTRA") : "", n->dir, n->dir, n->dir, n->dir, n->dir,
                d.socket, http, n->port, n->dir, locations);
        fclose(f);
}

static pid_t pid_file(const struct nginx *n, const char *name) {
        char p[256];
        pid_t pid = 0;

        snprintf(p, sizeof(p), "%s/%s", n->dir, name);
        (void) sscanf(read_file(p), "%d", &pid);
        return pid;
}

/* Starts nginx i from its config; waits until it answers (20 s at most). */
static void nginx_start(struct nginx *n) {
        if (ngx_daemon) {
                char cmd[640];

                snprintf(cmd, sizeof(cmd), "%s -p %s -c %s", nginx_path(), n->dir, n->conf);
                cr_assert_eq(system(cmd), 0, "nginx: %s", error_log(n));
                n->pid = pid_file(n, "nginx.pid");
                cr_assert_gt(n->pid, 0);
                for (uint64_t deadline = mono_ms() + 20000;; sleep_ms(20)) {
                        int fd = harness_tcp_connect(n->port);
                        if (fd >= 0) {
                                close(fd);
                                return;
                        }
                        cr_assert_lt(mono_ms(), deadline, "nginx does not answer");
                }
        }
        n->pid = fork();
        cr_assert_geq(n->pid, 0);
        if (n->pid == 0) {
                int null = open("/dev/null", O_RDWR);
                char log[256];
                int fd;

                snprintf(log, sizeof(log), "%s/stderr", n->dir);
                fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
                dup2(null, 0);
                dup2(fd >= 0 ? fd : null, 1);
                dup2(fd >= 0 ? fd : null, 2);
                execl(nginx_path(), nginx_path(), "-p", n->dir, "-c", n->conf, (char *) NULL);
                _exit(127);
        }
        for (uint64_t deadline = mono_ms() + 20000;;) {
                int fd = harness_tcp_connect(n->port), status;

                if (fd >= 0) {
                        close(fd);
                        return;
                }
                if (waitpid(n->pid, &status, WNOHANG) == n->pid) {
                        char p[256];
                        snprintf(p, sizeof(p), "%s/stderr", n->dir);
                        n->pid = 0;
                        cr_assert_fail("nginx exited (status %d): %s", status, read_file(p));
                }
                cr_assert_lt(mono_ms(), deadline, "nginx does not answer");
                sleep_ms(20);
        }
}

/* The exit status of nginx -t on its config, and its output in out. */
static int nginx_test_config(struct nginx *n, char *out, size_t size) {
        char cmd[640];
        FILE *p;
        size_t k = 0;

        snprintf(cmd, sizeof(cmd), "%s -t -p %s -c %s 2>&1", nginx_path(), n->dir, n->conf);
        p = popen(cmd, "r");
        cr_assert(p);
        k = fread(out, 1, size - 1, p);
        out[k] = 0;
        return pclose(p);
}

/* SIGQUIT (graceful) and wait; SIGKILL after 10 s. A daemon's master is not ours to wait for: it goes. */
static void nginx_stop(struct nginx *n) {
        int status;

        if (n->pid <= 0)
                return;
        kill(n->pid, SIGQUIT);
        for (uint64_t deadline = mono_ms() + 10000;;) {
                pid_t w = waitpid(n->pid, &status, WNOHANG);

                if (w == n->pid || (w < 0 && errno == ECHILD && kill(n->pid, 0) < 0))
                        break;
                if (mono_ms() > deadline) {
                        kill(n->pid, SIGKILL);
                        (void) waitpid(n->pid, &status, 0);
                        break;
                }
                sleep_ms(20);
        }
        n->pid = 0;
}

static void fini(void) {
        ngx_daemon = false;
        for (int i = 0; i < 2; i++) {
                nginx_stop(&ngx[i]);
                /* Workers of a killed master: ours, found by their parent, never by name. */
                ngx[i] = (struct nginx){ 0 };
        }
        harness_cleanup(&d);
}

static void init(void) {
        harness_init(&d, "[daemon]\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "log: %s", harness_log(&d));
}

TestSuite(nginx, .init = init, .fini = fini, .timeout = 240);

/* ---- requests ---------------------------------------------------------------------------- */

struct req {
        int fd;
        int status; /* HTTP status, 0: no answer (the connection closed), -1: not done */
        char s[24]; /* X-S: the status variable */
        uint64_t sent, ms;
        char buf[2048];
        size_t n;
};

static void req_send(struct req *r, int port, const char *path, const char *key) {
        char text[256];
        int len;

        *r = (struct req){ .status = -1 };
        r->fd = harness_tcp_connect(port);
        cr_assert_geq(r->fd, 0, "connect: %s", strerror(-r->fd));
        len = snprintf(text, sizeof(text), "GET %s HTTP/1.0\r\nHost: t\r\nX-Key: %s\r\n\r\n", path, key ? key : "");
        r->sent = mono_ms();
        cr_assert_eq(write(r->fd, text, (size_t) len), len);
}

static void req_parse(struct req *r) {
        const char *h;

        r->buf[r->n] = 0;
        r->status = 0;
        (void) sscanf(r->buf, "HTTP/1.%*d %d", &r->status);
        h = strcasestr(r->buf, "\r\nX-S: ");
        if (h)
                (void) sscanf(h + strlen("\r\nX-S: "), "%23[A-Z_]", r->s);
}

/* Reads what has arrived on every open request, waiting up to wait_ms; true when all are done. */
static bool req_poll(struct req *rs, size_t n, int wait_ms) {
        struct pollfd p[64];
        size_t map[64], k = 0;

        for (size_t i = 0; i < n && k < 64; i++)
                if (rs[i].status == -1) {
                        p[k] = (struct pollfd){ .fd = rs[i].fd, .events = POLLIN };
                        map[k++] = i;
                }
        if (k == 0)
                return true;
        if (poll(p, k, wait_ms) <= 0)
                return false;
        for (size_t j = 0; j < k; j++) {
                struct req *r = &rs[map[j]];
                ssize_t got;

                if (!p[j].revents)
                        continue;
                got = read(r->fd, r->buf + r->n, sizeof(r->buf) - 1 - r->n);
                if (got > 0) {
                        r->n += (size_t) got;
                        continue;
                }
                r->ms = mono_ms() - r->sent;
                req_parse(r);
                close(r->fd);
                r->fd = -1;
        }
        return false;
}

static void req_wait_all(struct req *rs, size_t n) {
        for (uint64_t deadline = mono_ms() + 30000; !req_poll(rs, n, 200);)
                cr_assert_lt(mono_ms(), deadline, "answers take too long");
}

static struct req one(int port, const char *path, const char *key) {
        struct req r;

        req_send(&r, port, path, key);
        req_wait_all(&r, 1);
        return r;
}

/* ---- the module against nginx's limit_req, request for request --------------------------- */

struct step {
        unsigned gap_ms; /* before this request */
        const char *key;
};

struct plan {
        const char *name;
        const char *n_loc, *s_loc; /* what the two locations say (each with its own zones) */
        struct step steps[24];
};

/* Zones of both kinds, alike; keys from X-Key. Rates and gaps keep every excess far from a bound. */
static const char *plan_http = "  limit_req_zone $http_x_key zone=n1:1m rate=2r/s;\n"
                               "  shmzone_limit_req_zone $http_x_key zone=s1:1m rate=2r/s;\n"
                               "  limit_req_zone $http_x_key zone=n2:1m rate=1r/s;\n"
                               "  shmzone_limit_req_zone $http_x_key zone=s2:1m rate=1r/s;\n"
                               "  limit_req_zone $binary_remote_addr zone=n3:1m rate=30r/m;\n"
                               "  shmzone_limit_req_zone $binary_remote_addr zone=s3:1m rate=30r/m;\n";

static const struct plan plans[] = {
        { "burst=3: passed, delayed, rejected; drained after a pause",
          "limit_req zone=n1 burst=3;",
          "shmzone_limit_req zone=s1 burst=3;",
          { { 0, "a" },
            { 0, "a" },
            { 0, "a" },
            { 0, "a" },
            { 0, "a" },
            { 0, "a" },
            { 1250, "a" },
            { 0, "a" },
            { 0, "a" },
            { 0, "b" },
            { 0, "b" },
            { 0, "b" },
            { 0, "b" },
            { 0, "b" } } },
        { "nodelay",
          "limit_req zone=n1 burst=2 nodelay;",
          "shmzone_limit_req zone=s1 burst=2 nodelay;",
          { { 0, "c" },
            { 0, "c" },
            { 0, "c" },
            { 0, "c" },
            { 0, "c" },
            { 750, "c" },
            { 0, "c" },
            { 0, "c" },
            { 1750, "c" },
            { 0, "c" },
            { 0, "c" },
            { 0, "c" } } },
        { "delay=2",
          "limit_req zone=n1 burst=5 delay=2;",
          "shmzone_limit_req zone=s1 burst=5 delay=2;",
          { { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" },
            { 0, "d" } } },
        { "two limits on one location: per key and per address",
          "limit_req zone=n1 burst=2 nodelay; limit_req zone=n3 burst=4;",
          "shmzone_limit_req zone=s1 burst=2 nodelay; shmzone_limit_req zone=s3 burst=4;",
          { { 0, "e" },
            { 0, "e" },
            { 0, "f" },
            { 0, "e" },
            { 0, "e" },
            { 0, "f" },
            { 0, "g" },
            { 0, "g" },
            { 0, "h" },
            { 0, "h" },
            { 0, "h" },
            { 1250, "e" },
            { 0, "f" } } },
        { "two limits, the second delays more",
          "limit_req zone=n2 burst=4 delay=1; limit_req zone=n1 burst=3 nodelay;",
          "shmzone_limit_req zone=s2 burst=4 delay=1; shmzone_limit_req zone=s1 burst=3 nodelay;",
          { { 0, "i" }, { 0, "i" }, { 0, "i" }, { 0, "i" }, { 0, "i" }, { 0, "i" }, { 0, "j" }, { 0, "j" } } },
        { "dry run",
          "limit_req zone=n1 burst=1; limit_req_dry_run on;",
          "shmzone_limit_req zone=s1 burst=1; shmzone_limit_req_dry_run on;",
          { { 0, "k" }, { 0, "k" }, { 0, "k" }, { 0, "k" } } },
        { "status 429, an empty key is not limited",
          "limit_req zone=n1 nodelay; limit_req_status 429;",
          "shmzone_limit_req zone=s1 nodelay; shmzone_limit_req_status 429;",
          { { 0, "l" }, { 0, "l" }, { 0, "l" }, { 0, "" }, { 0, "" }, { 0, "" } } },
};

static char plan_locations[8192];

static const char *locations_of_plans(void) {
        size_t k = 0;

        for (size_t p = 0; p < sizeof(plans) / sizeof(plans[0]); p++)
                k += (size_t) snprintf(
                        plan_locations + k, sizeof(plan_locations) - k,
                        "    location = /n%zu { %s alias %s/f; add_header X-S $limit_req_status always; }\n"
                        "    location = /s%zu { %s alias %s/f; add_header X-S $shmzone_limit_req_status "
                        "always; }\n",
                        p, plans[p].n_loc, ngx[0].dir, p, plans[p].s_loc, ngx[0].dir);
        return plan_locations;
}

Test(nginx, decisions_equal_nginx_limit_req) {
        /* Request i of a plan: r[2i] to nginx's location, r[2i+1] to ours; both read by one poll loop. */
        static struct req r[48];
        unsigned passed = 0, delayed = 0, rejected = 0, dry = 0;

        nginx_config(&ngx[0], 0, "1", plan_http, "");
        nginx_config(&ngx[0], 0, "1", plan_http, locations_of_plans());
        nginx_start(&ngx[0]);
        for (size_t p = 0; p < sizeof(plans) / sizeof(plans[0]); p++) {
                const struct plan *pl = &plans[p];
                char npath[16], spath[16];
                size_t n = 0;

                snprintf(npath, sizeof(npath), "/n%zu", p);
                snprintf(spath, sizeof(spath), "/s%zu", p);
                for (; pl->steps[n].key; n++) {
                        /* Wait out the gap reading answers, then send to both at once. */
                        for (uint64_t until = mono_ms() + pl->steps[n].gap_ms; mono_ms() < until;)
                                (void) req_poll(r, 2 * n, 5);
                        req_send(&r[2 * n], ngx[0].port, npath, pl->steps[n].key);
                        req_send(&r[2 * n + 1], ngx[0].port, spath, pl->steps[n].key);
                }
                req_wait_all(r, 2 * n);
                for (size_t i = 0; i < n; i++) {
                        const struct req *rn = &r[2 * i], *rs = &r[2 * i + 1];

                        cr_expect_eq(rs->status, rn->status, "%s, request %zu: status %d, nginx's %d", pl->name, i,
                                     rs->status, rn->status);
                        cr_expect_str_eq(rs->s, rn->s, "%s, request %zu: %s, nginx's %s", pl->name, i, rs->s, rn->s);
                        /* A delay is (excess - delay) / rate: both wait about as long. */
                        if (!strcmp(rn->s, "DELAYED")) {
                                int64_t diff = (int64_t) rs->ms - (int64_t) rn->ms;
                                cr_expect(diff < 250 && diff > -250, "%s, request %zu: delayed %lu ms, nginx %lu ms",
                                          pl->name, i, (unsigned long) rs->ms, (unsigned long) rn->ms);
                                cr_expect_gt(rn->ms, 150, "%s, request %zu: nginx delayed only %lu ms", pl->name, i,
                                             (unsigned long) rn->ms);
                        }
                        passed += !strcmp(rn->s, "PASSED");
                        delayed += !strcmp(rn->s, "DELAYED");
                        rejected += !strcmp(rn->s, "REJECTED");
                        dry += !strncmp(rn->s, "REJECTED_DRY", 12) || !strncmp(rn->s, "DELAYED_DRY", 11);
                }
        }
        /* The plans do what they say: every kind of decision was compared. */
        cr_assert(passed >= 5 && delayed >= 5 && rejected >= 5 && dry >= 2, "passed %u delayed %u rejected %u dry %u",
                  passed, delayed, rejected, dry);
        cr_assert(strstr(error_log(&ngx[0]), "limiting requests, excess:") &&
                          strstr(error_log(&ngx[0]), "by zone \"s1\""),
                  "refusals are logged as nginx logs them");
}

static pid_t worker_of(pid_t master) {
        char p[64], *s;
        pid_t w = 0;

        /* Our master's children, by its own list: never a process found by name. */
        snprintf(p, sizeof(p), "/proc/%d/task/%d/children", master, master);
        s = read_file(p);
        sscanf(s, "%d", &w);
        return w;
}

/* ---- what nginx cannot do ---------------------------------------------------------------- */

static const char *keep_http = "  limit_req_zone $binary_remote_addr zone=nk:1m rate=1r/m;\n"
                               "  shmzone_limit_req_zone $binary_remote_addr zone=keep:1m rate=1r/m;\n";
#define KEEP_LOCS                                                                                                      \
        "    location = /n { limit_req zone=nk burst=1 nodelay; alias %s/f; }\n"                                       \
        "    location = /s { shmzone_limit_req zone=keep burst=1 nodelay; alias %s/f; }\n"

static void keep_config(struct nginx *n, int i, const char *http) {
        char locs[512];

        nginx_config(n, i, "2", http, "");
        snprintf(locs, sizeof(locs), KEEP_LOCS, n->dir, n->dir);
        nginx_config(n, i, "2", http, locs);
}

Test(nginx, state_survives_restart_nginx_own_resets) {
        keep_config(&ngx[0], 0, keep_http);
        nginx_start(&ngx[0]);
        cr_assert_eq(one(ngx[0].port, "/n", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/n", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/n", NULL).status, 503);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503);
        nginx_stop(&ngx[0]);

        nginx_start(&ngx[0]);
        /* nginx's zone is new and empty; ours is the same zone, its key still over its burst. */
        cr_assert_eq(one(ngx[0].port, "/n", NULL).status, 200, "nginx's own zone was kept?");
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503, "the key was lost over the restart");
}

/* USR2 starts the new binary beside the old, QUIT ends the old one: the zone is opened again, the same. */
Test(nginx, state_survives_binary_upgrade) {
        pid_t old, new;

        ngx_daemon = true;
        keep_config(&ngx[0], 0, keep_http);
        nginx_start(&ngx[0]);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503);
        old = ngx[0].pid;
        cr_assert_eq(kill(old, SIGUSR2), 0);
        for (uint64_t deadline = mono_ms() + 20000;; sleep_ms(20)) {
                new = pid_file(&ngx[0], "nginx.pid");
                if (new > 0 && new != old && pid_file(&ngx[0], "nginx.pid.oldbin") == old &&worker_of(new) > 0)
                        break;
                cr_assert_lt(mono_ms(), deadline, "no new binary: %s", error_log(&ngx[0]));
        }
        /* fini() stops both, whatever happens from here. */
        ngx[0].pid = new;
        ngx[1].pid = old;
        nginx_stop(&ngx[1]);
        cr_assert_neq(worker_of(new), 0);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503, "the key was lost by the upgrade");
}

Test(nginx, two_nginx_share_a_zone) {
        keep_config(&ngx[0], 0, keep_http);
        keep_config(&ngx[1], 1, keep_http);
        nginx_start(&ngx[0]);
        nginx_start(&ngx[1]);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[1].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[1].port, "/s", NULL).status, 503, "the second nginx has its own limit");
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503);
        /* nginx's own zones: one per instance. */
        cr_assert_eq(one(ngx[0].port, "/n", NULL).status, 200);
        cr_assert_eq(one(ngx[1].port, "/n", NULL).status, 200);
        cr_assert_eq(one(ngx[1].port, "/n", NULL).status, 200);
}

/* nginx and the example server, on one zone of one key ($binary_remote_addr: 4 bytes for 127.0.0.1). */
Test(nginx, nginx_and_the_example_server_share_a_zone) {
        const char *server = getenv("RATELIMIT_SERVER");
        char buf[512] = "";
        int pipefd[2], port = 0;
        size_t n = 0;
        pid_t pid;

        if (!server || access(server, X_OK) < 0)
                cr_skip_test("no ratelimit-server (libmicrohttpd)");
        keep_config(&ngx[0], 0, keep_http);
        nginx_start(&ngx[0]);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);

        cr_assert_eq(pipe2(pipefd, O_CLOEXEC), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                dup2(pipefd[1], STDOUT_FILENO);
                execl(server, server, "--socket", d.socket, "--listen", "127.0.0.1:0", "--zone", "keep:1m", "--rate",
                      "1r/m", "--burst", "1", "--nodelay", (char *) NULL);
                _exit(127);
        }
        close(pipefd[1]);
        /* ngx[1] stops it (SIGQUIT, then SIGKILL) whatever happens. */
        ngx[1].pid = pid;
        for (uint64_t deadline = mono_ms() + 20000; !port;) {
                struct pollfd p = { .fd = pipefd[0], .events = POLLIN };
                char *l;
                ssize_t k;

                cr_assert_lt(mono_ms(), deadline, "the server does not listen: %s", buf);
                if (poll(&p, 1, 200) <= 0)
                        continue;
                k = read(pipefd[0], buf + n, sizeof(buf) - 1 - n);
                cr_assert_gt(k, 0, "the server ended: %s", buf);
                n += (size_t) k;
                buf[n] = 0;
                l = strstr(buf, "listening on 127.0.0.1:");
                if (l && strchr(l, '\n'))
                        port = atoi(l + strlen("listening on 127.0.0.1:"));
        }
        close(pipefd[0]);
        /* nginx counted one request; the server's first makes two (burst 1), its second is over. */
        cr_assert_eq(one(port, "/", NULL).status, 200);
        cr_assert_eq(one(port, "/", NULL).status, 503, "the server has a limit of its own");
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503);
        kill(pid, SIGTERM); /* its way to stop */
        (void) waitpid(pid, NULL, 0);
        ngx[1].pid = 0;
}

Test(nginx, the_zone_is_a_shmzone_zone) {
        struct shmz_client *c;
        struct shmz_zone_stat st;
        char tag[SHMZ_TAG_BUF];

        keep_config(&ngx[0], 0, keep_http);
        nginx_start(&ngx[0]);
        c = harness_connect(&d);
        cr_assert_eq(shmz_zone_stat(c, "keep", &st), 0);
        limiter_tag("$binary_remote_addr", tag);
        cr_assert_str_eq(st.tag, tag);
        cr_assert_eq(st.size, 1 << 20);
        cr_assert_eq(shmz_zone_stat(c, "nk", &st), -ENOENT, "nginx's own zones are not shmzone's");
        shmz_disconnect(c);
}

Test(nginx, reload_refuses_a_size_change) {
        static const char *big = "  limit_req_zone $binary_remote_addr zone=nk:1m rate=1r/m;\n"
                                 "  shmzone_limit_req_zone $binary_remote_addr zone=keep:2m rate=1r/m;\n";
        char out[4096];

        keep_config(&ngx[0], 0, keep_http);
        nginx_start(&ngx[0]);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 200);

        keep_config(&ngx[0], 0, big);
        cr_assert_neq(nginx_test_config(&ngx[0], out, sizeof(out)), 0, "nginx -t took a new size: %s", out);
        cr_assert(strstr(out, "has 1048576 bytes, not 2097152"), "nginx -t says: %s", out);
        kill(ngx[0].pid, SIGHUP);
        for (uint64_t deadline = mono_ms() + 10000; !strstr(error_log(&ngx[0]), "not 2097152");)
                cr_assert_lt(mono_ms(), deadline, "no error on reload: %s", error_log(&ngx[0]));
        /* The running configuration, and its zone with its keys, serve on. */
        cr_assert_eq(one(ngx[0].port, "/s", NULL).status, 503, "the key was lost by the reload");
        cr_assert_eq(one(ngx[0].port, "/plain", NULL).status, 200);
}

Test(nginx, shmzoned_unreachable_is_a_clear_error) {
        char out[4096];

        keep_config(&ngx[0], 0, keep_http);
        harness_stop(&d);
        cr_assert_neq(nginx_test_config(&ngx[0], out, sizeof(out)), 0, "nginx -t passed: %s", out);
        cr_assert(strstr(out, "cannot connect to shmzoned at") && strstr(out, d.socket), "nginx -t says: %s", out);
}

/* ---- faults ------------------------------------------------------------------------------- */

Test(nginx, worker_killed_in_a_decision) {
        char env[512];
        pid_t w1, w2;
        struct limiter *l;
        struct shmz_zone *z;
        struct limiter_config cfg = { .rate = 16, .burst = 1, .delay = LIMITER_NODELAY };
        struct limiter_stats st;
        char tag[SHMZ_TAG_BUF];
        struct shmz_client *c;

        /*
         * The first worker SIGKILLs itself at the 8th step of an update of the tree or
         * list: in the insert of key x, between its tree link and its list link, the
         * lock held (a and a before it took 5 steps). Only once: the marker file.
         */
        snprintf(env, sizeof(env), "env SHMZONE_LIMITER_CRASH_AT=8:%s/crash-once;\n", d.dir);
        setenv("NGINX_MAIN_EXTRA", env, 1);
        nginx_config(&ngx[0], 0, "1", "  shmzone_limit_req_zone $http_x_key zone=kill:1m rate=1r/m;\n", "");
        snprintf(env, sizeof(env), "    location = /s { shmzone_limit_req zone=kill burst=1 nodelay; alias %s/f; }\n",
                 ngx[0].dir);
        nginx_config(&ngx[0], 0, "1", "  shmzone_limit_req_zone $http_x_key zone=kill:1m rate=1r/m;\n", env);
        unsetenv("NGINX_MAIN_EXTRA");
        nginx_start(&ngx[0]);
        w1 = worker_of(ngx[0].pid);
        cr_assert_gt(w1, 0);
        cr_assert_eq(one(ngx[0].port, "/s", "a").status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", "a").status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", "x").status, 0, "the worker answered instead of dying");
        for (uint64_t deadline = mono_ms() + 10000; (w2 = worker_of(ngx[0].pid)) == w1 || w2 == 0;)
                cr_assert_lt(mono_ms(), deadline, "no new worker");
        /* The lock is recovered, the tree repaired: a is still over its burst, x and b are new. */
        cr_assert_eq(one(ngx[0].port, "/s", "a").status, 503);
        cr_assert_eq(one(ngx[0].port, "/s", "x").status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", "x").status, 200);
        cr_assert_eq(one(ngx[0].port, "/s", "x").status, 503);
        cr_assert_eq(one(ngx[0].port, "/s", "b").status, 200);

        c = harness_connect(&d);
        limiter_tag("$http_x_key", tag);
        cr_assert_eq(shmz_zone_open(c, "kill", 0, tag, 0, &z), 0);
        cr_assert_eq(limiter_open(z, &cfg, &l), 0);
        cr_assert_eq(limiter_check(l, false), 0, "the zone's tree and list are sound");
        cr_assert_eq(limiter_stats(l, &st), 0);
        cr_assert_eq(st.recoveries, 1);
        cr_assert_eq(st.nodes, 3);
        limiter_close(l);
        shmz_zone_close(z);
        shmz_disconnect(c);
        cr_assert(strstr(error_log(&ngx[0]), "exited on signal 9"), "the master saw the death");
}

Test(nginx, corrupt_zone_logged_never_crashes) {
        static const char *http = "  shmzone_limit_req_zone $http_x_key zone=bad:1m rate=1r/m on_error=reject;\n"
                                  "  shmzone_limit_req_zone $http_x_key zone=good:1m rate=1r/m on_error=pass;\n";
        char locs[512], tag[SHMZ_TAG_BUF];
        struct shmz_client *c;
        struct shmz_zone *zb, *zg;
        pid_t w;

        nginx_config(&ngx[0], 0, "1", http, "");
        snprintf(locs, sizeof(locs),
                 "    location = /r { shmzone_limit_req zone=bad burst=1 nodelay; alias %s/f; }\n"
                 "    location = /p { shmzone_limit_req zone=good burst=1 nodelay; alias %s/f; }\n",
                 ngx[0].dir, ngx[0].dir);
        nginx_config(&ngx[0], 0, "1", http, locs);
        nginx_start(&ngx[0]);
        w = worker_of(ngx[0].pid);
        for (int i = 0; i < 20; i++) {
                char key[8];
                snprintf(key, sizeof(key), "k%d", i);
                cr_assert_eq(one(ngx[0].port, "/r", key).status, 200);
                cr_assert_eq(one(ngx[0].port, "/p", key).status, 200);
        }

        c = harness_connect(&d);
        limiter_tag("$http_x_key", tag);
        cr_assert_eq(shmz_zone_open(c, "bad", 0, tag, 0, &zb), 0);
        cr_assert_eq(shmz_zone_open(c, "good", 0, tag, 0, &zg), 0);

        /* A co-writer that holds the lock and never lets go: each decision gives up after its timeout. */
        cr_assert_geq(shmz_mutex_lock(shmz_zone_mutex(zb)), 0);
        cr_assert_geq(shmz_mutex_lock(shmz_zone_mutex(zg)), 0);
        uint64_t t0 = mono_ms();
        cr_assert_eq(one(ngx[0].port, "/r", "k1").status, 503, "on_error=reject");
        cr_assert_eq(one(ngx[0].port, "/p", "k1").status, 200, "on_error=pass");
        cr_assert_lt(mono_ms() - t0, 2000, "decisions hang on a held lock");
        cr_assert(strstr(error_log(&ngx[0]), "zone \"bad\": no decision") &&
                          strstr(error_log(&ngx[0]), "rejected (on_error=reject)") &&
                          strstr(error_log(&ngx[0]), "passed (on_error=pass)"),
                  "log: %s", error_log(&ngx[0]));
        shmz_mutex_unlock(shmz_zone_mutex(zb));
        shmz_mutex_unlock(shmz_zone_mutex(zg));

        /* Random bytes over everything past the zone's header: the limiter's and the allocator's state. */
        srandom(5);
        for (int round = 0; round < 5; round++) {
                uint8_t *b = shmz_zone_base(zb), *g = shmz_zone_base(zg);
                for (uint64_t i = 0; i < 64 * 1024; i++) {
                        b[(uint64_t) random() % (256 * 1024)] = (uint8_t) random();
                        g[(uint64_t) random() % (256 * 1024)] = (uint8_t) random();
                }
                for (int i = 0; i < 30; i++) {
                        char key[8];
                        struct req r1, r2;

                        snprintf(key, sizeof(key), "k%d", i % 25);
                        t0 = mono_ms();
                        r1 = one(ngx[0].port, "/r", key);
                        r2 = one(ngx[0].port, "/p", key);
                        cr_assert(r1.status == 200 || r1.status == 503, "round %d: status %d", round, r1.status);
                        cr_assert(r2.status == 200 || r2.status == 503, "round %d: status %d", round, r2.status);
                        cr_assert_lt(mono_ms() - t0, 2000, "round %d: a decision hangs", round);
                }
        }
        cr_assert_eq(worker_of(ngx[0].pid), w, "the worker died");
        cr_assert_eq(one(ngx[0].port, "/plain", NULL).status, 200);
        shmz_zone_close(zb);
        shmz_zone_close(zg);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        if (access(nginx_path(), X_OK) < 0 || access(module_path(), R_OK) < 0) {
                struct criterion_test_set *tests = criterion_initialize();
                char why[256];

                (void) snprintf(why, sizeof(why), "no nginx (%s) or no module (%s)", nginx_path(), module_path());
                harness_skip_all(tests->tests, why);
                criterion_finalize(tests);
                return 0;
        }
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}
