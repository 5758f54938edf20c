/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * ratelimit-server: nginx's
 *
 *     limit_req_zone $binary_remote_addr zone=one:10m rate=1r/s;
 *     limit_req zone=one burst=120;
 *
 * as a pre-forked HTTP server: N worker processes share one listening socket
 * and one limiter zone served by shmzoned, and answer 200 "ok" or 503, delaying
 * requests as nginx would. HTTP is libmicrohttpd's; the limiter is
 * ratelimit/limiter.c.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "limiter.h"
#define MIN(a, b) ((a) < (b) ? (a) : (b))

#define WORKERS_MAX 64
#define DELAYED_MAX 4096 /* requests one worker holds back at once; more are answered 503 */

static struct {
        const char *listen;
        unsigned workers;
        const char *zone_name;
        uint64_t zone_size;
        struct limiter_config cfg;
        const char *header; /* key on this request header instead of the client address */
        const char *socket;
        bool stats;
} arg = {
        .listen = "127.0.0.1:8080",
        .workers = 1,
        .cfg = { .burst = 0, .delay = 0 },
};

/* ---- the worker -------------------------------------------------------------------------- */

/* Connections held back for their delay, woken by the timer thread. */
struct delayed {
        struct MHD_Connection *conn;
        uint64_t due_ms;
};

static struct {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        struct delayed q[DELAYED_MAX];
        size_t n;
        bool stop;
} timer = { .lock = PTHREAD_MUTEX_INITIALIZER };

enum { REQ_NEW, REQ_DELAYED, REQ_DONE };

struct request {
        int state;
};

static struct limiter *lim;
static char worker_pid[16];
static _Atomic unsigned held;       /* delayed requests not answered yet */
static _Atomic unsigned open_conns; /* connections this worker accepted and has not closed */

static uint64_t mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static void *timer_main(void *userdata) {
        pthread_mutex_lock(&timer.lock);
        while (!timer.stop || timer.n > 0) {
                uint64_t now = mono_ms(), next = UINT64_MAX;

                for (size_t i = 0; i < timer.n;) {
                        if (timer.stop || timer.q[i].due_ms <= now) {
                                MHD_resume_connection(timer.q[i].conn);
                                timer.q[i] = timer.q[--timer.n];
                                continue;
                        }
                        next = MIN(next, timer.q[i].due_ms);
                        i++;
                }
                if (timer.stop)
                        continue;
                if (next == UINT64_MAX)
                        pthread_cond_wait(&timer.cond, &timer.lock);
                else {
                        struct timespec ts = { .tv_sec = (time_t) (next / 1000),
                                               .tv_nsec = (long) (next % 1000) * 1000000 };
                        (void) pthread_cond_timedwait(&timer.cond, &timer.lock, &ts);
                }
        }
        pthread_mutex_unlock(&timer.lock);
        return NULL;
}

/* 1: queued; 0: the worker is stopping; -ENOBUFS: the queue is full. */
static int timer_add(struct MHD_Connection *conn, uint64_t due_ms) {
        int r;

        pthread_mutex_lock(&timer.lock);
        r = timer.stop ? 0 : timer.n < DELAYED_MAX ? 1 : -ENOBUFS;
        if (r > 0) {
                /* Suspended before the timer can see it: resume never comes before suspend. */
                MHD_suspend_connection(conn);
                timer.q[timer.n++] = (struct delayed){ .conn = conn, .due_ms = due_ms };
                pthread_cond_signal(&timer.cond);
        }
        pthread_mutex_unlock(&timer.lock);
        return r;
}

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *body) {
        struct MHD_Response *resp;
        enum MHD_Result r;

        resp = MHD_create_response_from_buffer(strlen(body), (void *) body, MHD_RESPMEM_PERSISTENT);
        if (!resp)
                return MHD_NO;
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");
        (void) MHD_add_response_header(resp, "X-Worker", worker_pid); /* which process answered */
        r = MHD_queue_response(conn, status, resp);
        MHD_destroy_response(resp);
        return r;
}

/* The key: the header's value, or the client's address in binary (4 bytes for IPv4, as nginx's). */
static size_t request_key(struct MHD_Connection *conn, const void **ret_key) {
        const union MHD_ConnectionInfo *ci;
        const struct sockaddr *sa;

        if (arg.header) {
                const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, arg.header);
                *ret_key = v;
                return v ? strlen(v) : 0;
        }
        ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        sa = ci ? ci->client_addr : NULL;
        if (sa && sa->sa_family == AF_INET) {
                *ret_key = &((const struct sockaddr_in *) sa)->sin_addr;
                return 4;
        }
        if (sa && sa->sa_family == AF_INET6) {
                const struct in6_addr *a = &((const struct sockaddr_in6 *) sa)->sin6_addr;
                if (IN6_IS_ADDR_V4MAPPED(a)) {
                        *ret_key = &a->s6_addr[12];
                        return 4;
                }
                *ret_key = a;
                return 16;
        }
        *ret_key = NULL;
        return 0;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size, void **req_cls) {
        struct request *req = *req_cls;
        struct limiter_decision d;
        const void *key;
        size_t keylen;
        int r;

        if (!req) {
                /* First call: headers only. */
                req = calloc(1, sizeof(*req));
                if (!req)
                        return MHD_NO;
                *req_cls = req;
                return MHD_YES;
        }
        if (*upload_data_size > 0) {
                *upload_data_size = 0; /* bodies are not ours to read */
                return MHD_YES;
        }
        if (req->state == REQ_DELAYED) {
                req->state = REQ_DONE;
                atomic_fetch_sub(&held, 1);
                return respond(conn, MHD_HTTP_OK, "ok\n");
        }

        keylen = request_key(conn, &key);
        r = limiter_decide(lim, key, keylen, mono_ms(), &d);
        if (r < 0) {
                fprintf(stderr, "ratelimit-server: decision failed: %s\n", strerror(-r));
                return respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "limited\n"); /* as nginx when out of memory */
        }
        if (d.verdict == LIMITER_REJECT)
                return respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "limited\n");
        if (d.verdict == LIMITER_DELAY && d.delay_ms > 0) {
                req->state = REQ_DELAYED;
                atomic_fetch_add(&held, 1);
                r = timer_add(conn, mono_ms() + d.delay_ms);
                if (r > 0)
                        return MHD_YES;
                atomic_fetch_sub(&held, 1);
                req->state = REQ_DONE;
                /* Stopping: held-back requests are answered now, so is one that comes in meanwhile. */
                if (r == 0)
                        return respond(conn, MHD_HTTP_OK, "ok\n");
                return respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "limited\n");
        }
        req->state = REQ_DONE;
        return respond(conn, MHD_HTTP_OK, "ok\n");
}

static void connection_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                              enum MHD_ConnectionNotificationCode toe) {
        if (toe == MHD_CONNECTION_NOTIFY_STARTED)
                atomic_fetch_add(&open_conns, 1);
        else if (toe == MHD_CONNECTION_NOTIFY_CLOSED)
                atomic_fetch_sub(&open_conns, 1);
}

static void completed(void *cls, struct MHD_Connection *conn, void **req_cls, enum MHD_RequestTerminationCode toe) {
        struct request *req = *req_cls;

        if (req && req->state == REQ_DELAYED) /* ended before its answer */
                atomic_fetch_sub(&held, 1);
        free(req);
        *req_cls = NULL;
}

/*
 * The zone's tag names the key as nginx would write it, so that nginx's module
 * (shmzone_limit_req_zone $binary_remote_addr, or $http_x_key for --key-header X-Key)
 * can share the zone, and nothing keyed otherwise can.
 */
static void key_tag(char tag[SHMZ_TAG_BUF]) {
        char expr[128] = "$binary_remote_addr";

        if (arg.header) {
                size_t n = strlen("$http_");

                memcpy(expr, "$http_", n + 1);
                for (const char *h = arg.header; *h && n + 1 < sizeof(expr); h++)
                        expr[n++] = *h == '-' ? '_' : (char) tolower((unsigned char) *h);
                expr[n] = 0;
        }
        limiter_tag(expr, tag);
}

/* create: make the zone if missing (with --zone's size); else open it as it is. */
static int attach(bool create, struct shmz_client **ret_c, struct shmz_zone **ret_z, struct limiter **ret_l) {
        char tag[SHMZ_TAG_BUF];
        struct shmz_client *c = NULL;
        struct shmz_zone *z = NULL;
        int r;

        r = shmz_connect(arg.socket, &c);
        if (r < 0) {
                fprintf(stderr, "ratelimit-server: cannot connect to shmzoned: %s\n", strerror(-r));
                return r;
        }
        key_tag(tag);
        r = shmz_zone_open(c, arg.zone_name, create ? arg.zone_size : 0, tag, create ? SHMZ_CREATE : 0, &z);
        if (r < 0) {
                fprintf(stderr, "ratelimit-server: zone %s: %s\n", arg.zone_name, strerror(-r));
                shmz_disconnect(c);
                return r;
        }
        r = limiter_open(z, &arg.cfg, ret_l);
        if (r < 0) {
                fprintf(stderr, "ratelimit-server: limiter in zone %s: %s\n", arg.zone_name, strerror(-r));
                shmz_zone_close(z);
                shmz_disconnect(c);
                return r;
        }
        *ret_c = c;
        *ret_z = z;
        return 0;
}

/* The master's end of the readiness pipe: each worker writes a byte once it serves. */
static int ready_fd = -1;

static int worker_main(int listen_fd) {
        struct shmz_client *c;
        struct shmz_zone *z;
        struct MHD_Daemon *mhd;
        pthread_condattr_t ca;
        pthread_t timer_thread;
        sigset_t set;
        int r, sig;

        /* A worker whose master is gone would serve on alone. */
        (void) prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() == 1)
                return 0;
        if (attach(true, &c, &z, &lim) < 0) {
                sleep(1); /* the master replaces us: not in a tight loop while shmzoned is away */
                return 1;
        }
        snprintf(worker_pid, sizeof(worker_pid), "%d", (int) getpid());

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&timer.cond, &ca);
        r = pthread_create(&timer_thread, NULL, timer_main, NULL);
        if (r != 0) {
                fprintf(stderr, "ratelimit-server: timer thread: %s\n", strerror(r));
                return 1;
        }
        /* Signals stay blocked (inherited from the master), so only sigwait() below sees them. */
        mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_ALLOW_SUSPEND_RESUME, 0, NULL, NULL,
                               handle, NULL, MHD_OPTION_LISTEN_SOCKET, listen_fd, MHD_OPTION_NOTIFY_COMPLETED,
                               completed, NULL, MHD_OPTION_NOTIFY_CONNECTION, connection_notify, NULL,
                               MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) 30, MHD_OPTION_END);
        if (!mhd) {
                fprintf(stderr, "ratelimit-server: libmicrohttpd did not start\n");
                return 1;
        }
        if (ready_fd >= 0) {
                (void) write(ready_fd, "", 1); /* a replacement's byte goes nowhere (EPIPE), which is fine */
                close(ready_fd);
        }

        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        (void) sigwait(&set, &sig);

        /* The listening socket is shared: stop accepting without closing or shutting it down for the others. */
        (void) MHD_quiesce_daemon(mhd);
        /* Held-back requests are answered now, then the daemon stops. */
        pthread_mutex_lock(&timer.lock);
        timer.stop = true;
        pthread_cond_signal(&timer.cond);
        pthread_mutex_unlock(&timer.lock);
        pthread_join(timer_thread, NULL);
        /*
         * Resumed, they are answered by the daemon's thread, and so is every connection this worker
         * accepted before it stopped (its request may not have been read yet): give them two seconds.
         */
        for (uint64_t deadline = mono_ms() + 2000;
             (atomic_load(&held) > 0 || atomic_load(&open_conns) > 0) && mono_ms() < deadline;) {
                struct timespec ts = { .tv_nsec = 5 * 1000 * 1000 };
                nanosleep(&ts, NULL);
        }
        MHD_stop_daemon(mhd);
        limiter_close(lim);
        shmz_zone_close(z);
        shmz_disconnect(c);
        return 0;
}

/* ---- the master -------------------------------------------------------------------------- */

static int listen_socket(const char *spec) {
        struct sockaddr_storage ss = {};
        socklen_t sl;
        char host[128], *colon;
        unsigned long port;
        char *end;
        int fd, one = 1;

        if (strlen(spec) >= sizeof(host))
                return -EINVAL;
        strcpy(host, spec);
        colon = strrchr(host, ':');
        if (!colon)
                return -EINVAL;
        *colon = 0;
        errno = 0;
        port = strtoul(colon + 1, &end, 10);
        if (errno || *end || end == colon + 1 || port > 65535)
                return -EINVAL;
        if (host[0] == '[' && colon > host + 1 && colon[-1] == ']') {
                struct sockaddr_in6 *s6 = (struct sockaddr_in6 *) &ss;
                colon[-1] = 0;
                s6->sin6_family = AF_INET6;
                s6->sin6_port = htons((uint16_t) port);
                if (inet_pton(AF_INET6, host + 1, &s6->sin6_addr) != 1)
                        return -EINVAL;
                sl = sizeof(*s6);
        } else {
                struct sockaddr_in *s4 = (struct sockaddr_in *) &ss;
                s4->sin_family = AF_INET;
                s4->sin_port = htons((uint16_t) port);
                if (inet_pton(AF_INET, host, &s4->sin_addr) != 1)
                        return -EINVAL;
                sl = sizeof(*s4);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *) &ss, sl) < 0 || listen(fd, 511) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

static void print_address(int fd) {
        struct sockaddr_storage ss = {};
        socklen_t sl = sizeof(ss);
        char buf[INET6_ADDRSTRLEN];

        if (getsockname(fd, (struct sockaddr *) &ss, &sl) < 0)
                return;
        if (ss.ss_family == AF_INET && sl >= sizeof(struct sockaddr_in)) {
                struct sockaddr_in *s4 = (struct sockaddr_in *) &ss;
                if (inet_ntop(AF_INET, &s4->sin_addr, buf, sizeof(buf)))
                        printf("listening on %s:%u\n", buf, ntohs(s4->sin_port));
        } else if (ss.ss_family == AF_INET6 && sl >= sizeof(struct sockaddr_in6)) {
                struct sockaddr_in6 *s6 = (struct sockaddr_in6 *) &ss;
                if (inet_ntop(AF_INET6, &s6->sin6_addr, buf, sizeof(buf)))
                        printf("listening on [%s]:%u\n", buf, ntohs(s6->sin6_port));
        }
        fflush(stdout);
}

static pid_t spawn(int listen_fd) {
        pid_t pid = fork();

        if (pid == 0)
                _exit(worker_main(listen_fd));
        return pid;
}

/* Slot size the allocator gives a node of keylen bytes, and keys per MiB from it. */
static void print_memory(struct shmz_zone *z, const char *what, size_t keylen) {
        struct shmz_alloc_stats st;
        size_t node = limiter_node_bytes(keylen);
        uint64_t slot = node;

        if (shmz_zone_alloc_stats(z, &st) == 0)
                for (unsigned c = 0; c < st.nclasses; c++)
                        if (st.classes[c].size >= node) {
                                slot = st.classes[c].size;
                                break;
                        }
        /* The allocator keeps a 32-byte descriptor per 4 KiB page. */
        printf("%-15s node %zu bytes, slot %lu bytes, about %lu keys per MiB\n", what, node, (unsigned long) slot,
               (unsigned long) ((1 << 20) / slot * (4096 - 32) / 4096));
}

static int show_stats(void) {
        struct shmz_client *c;
        struct shmz_zone *z;
        struct limiter *l;
        struct limiter_stats st;
        int r;

        r = attach(false, &c, &z, &l);
        if (r < 0)
                return 1;
        r = limiter_stats(l, &st);
        if (r < 0) {
                fprintf(stderr, "ratelimit-server: %s\n", strerror(-r));
                return 1;
        }
        printf("zone %s: %lu bytes\n", arg.zone_name, (unsigned long) shmz_zone_size(z));
        print_memory(z, "IPv4 key:", 4);
        print_memory(z, "IPv6 key:", 16);
        print_memory(z, "64-byte header:", LIMITER_KEY_MAX);
        printf("keys %lu\ndecisions %lu\npassed %lu\ndelayed %lu\nrejected %lu\nexpired %lu\nevicted %lu\n"
               "recoveries %lu\nrebuilds %lu\ncorruptions %lu\nnomem %lu\n",
               (unsigned long) st.nodes, (unsigned long) st.decisions, (unsigned long) st.passed,
               (unsigned long) st.delayed, (unsigned long) st.rejected, (unsigned long) st.expired,
               (unsigned long) st.evicted, (unsigned long) st.recoveries, (unsigned long) st.rebuilds,
               (unsigned long) st.corruptions, (unsigned long) st.nomem);
        limiter_close(l);
        shmz_zone_close(z);
        shmz_disconnect(c);
        return 0;
}

static int master(void) {
        struct shmz_client *c;
        struct shmz_zone *z;
        struct limiter *l;
        pid_t pids[WORKERS_MAX] = {};
        sigset_t set;
        int fd, r, ready[2];

        fd = listen_socket(arg.listen);
        if (fd < 0) {
                fprintf(stderr, "ratelimit-server: --listen %s: %s\n", arg.listen, strerror(-fd));
                return 1;
        }
        /* Create and check the zone once, so that a mistake stops us here and not in every worker. */
        if (attach(true, &c, &z, &l) < 0)
                return 1;
        limiter_close(l);
        shmz_zone_close(z);
        shmz_disconnect(c);

        /* A client that went away must cost a write error, not the worker. */
        signal(SIGPIPE, SIG_IGN);
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGCHLD);
        sigprocmask(SIG_BLOCK, &set, NULL);
        if (pipe2(ready, O_CLOEXEC) < 0) {
                fprintf(stderr, "ratelimit-server: pipe: %m\n");
                return 1;
        }
        ready_fd = ready[1];
        for (unsigned i = 0; i < arg.workers; i++) {
                pids[i] = spawn(fd);
                if (pids[i] < 0) {
                        fprintf(stderr, "ratelimit-server: fork: %m\n");
                        return 1;
                }
        }
        close(ready[1]);
        ready_fd = -1; /* replacements started later have nobody to tell */
        /* "listening on" means served: every worker is in its loop (or 10 s passed). */
        for (unsigned n = 0; n < arg.workers;) {
                struct pollfd p = { .fd = ready[0], .events = POLLIN };
                char b[WORKERS_MAX];
                ssize_t k;

                if (poll(&p, 1, 10000) <= 0)
                        break;
                k = read(ready[0], b, sizeof(b));
                if (k <= 0)
                        break; /* every worker gone: SIGCHLD says more below */
                n += (unsigned) k;
        }
        close(ready[0]);
        print_address(fd);

        for (;;) {
                siginfo_t si;
                int sig = sigwaitinfo(&set, &si);
                pid_t pid;
                int status;

                if (sig == SIGTERM || sig == SIGINT)
                        break;
                if (sig != SIGCHLD)
                        continue;
                while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
                        for (unsigned i = 0; i < arg.workers; i++) {
                                if (pids[i] != pid)
                                        continue;
                                /* Like nginx's master: a worker that died is replaced; the zone stays. */
                                fprintf(stderr, "ratelimit-server: worker %d %s %d, starting another\n", pid,
                                        WIFSIGNALED(status) ? "killed by signal" : "exited with",
                                        WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
                                pids[i] = spawn(fd);
                        }
        }

        for (unsigned i = 0; i < arg.workers; i++)
                if (pids[i] > 0)
                        kill(pids[i], SIGTERM);
        /* Workers answer what they hold back and stop; those still there after 5 s are killed. */
        r = 0;
        for (uint64_t deadline = mono_ms() + 5000;;) {
                bool left = false;
                pid_t pid;
                int status;

                while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
                        for (unsigned i = 0; i < arg.workers; i++)
                                if (pids[i] == pid)
                                        pids[i] = 0;
                for (unsigned i = 0; i < arg.workers; i++)
                        left = left || pids[i] > 0;
                if (!left)
                        break;
                if (mono_ms() >= deadline) {
                        for (unsigned i = 0; i < arg.workers; i++)
                                if (pids[i] > 0)
                                        kill(pids[i], SIGKILL);
                        r = 1;
                        deadline = UINT64_MAX;
                }
                struct timespec ts = { .tv_nsec = 100 * 1000 * 1000 };
                sigset_t chld;
                sigemptyset(&chld);
                sigaddset(&chld, SIGCHLD);
                (void) sigtimedwait(&chld, NULL, &ts);
        }
        close(fd);
        return r;
}

/* ---- arguments --------------------------------------------------------------------------- */

static void help(void) {
        printf("Usage: ratelimit-server [OPTIONS]\n\n"
               "nginx's limit_req as a pre-forked HTTP server on a shmzone zone: 200 \"ok\" or 503.\n\n"
               "  --listen ADDR:PORT  where to listen (127.0.0.1:8080; [::1]:8080; port 0: any free one)\n"
               "  --workers N         worker processes (1)\n"
               "  --zone NAME:SIZE    the limiter's zone, like nginx's zone=one:10m (required)\n"
               "  --rate RATE         Nr/s or Nr/m, like nginx's rate= (required)\n"
               "  --burst N           requests over the rate that are held back, not refused (0)\n"
               "  --nodelay           serve requests within the burst at once\n"
               "  --delay N           serve the first N over the rate at once, delay the rest\n"
               "  --key-header NAME   key on this header's value instead of the client's address\n"
               "  --socket PATH       shmzoned's socket ($SHMZONE_SOCKET, else %s)\n"
               "  --stats             print the zone's figures and memory per key, and exit\n"
               "  --help              this text\n\n"
               "Prints \"listening on ADDR:PORT\" once the workers run; SIGTERM stops them.\n",
               SHMZ_DEFAULT_SOCKET);
}

static int parse_zone_size(const char *s, uint64_t *ret) {
        unsigned long long v;
        char *end;

        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || end == s)
                return -EINVAL;
        switch (*end) {
        case 'k':
        case 'K':
                v <<= 10;
                end++;
                break;
        case 'm':
        case 'M':
                v <<= 20;
                end++;
                break;
        case 'g':
        case 'G':
                v <<= 30;
                end++;
                break;
        }
        if (*end || v == 0)
                return -EINVAL;
        *ret = v;
        return 0;
}

static int parse_uint(const char *s, uint32_t max, uint32_t *ret) {
        unsigned long v;
        char *end;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || end == s || *end || *s == '-' || v > max)
                return -EINVAL;
        *ret = (uint32_t) v;
        return 0;
}

static int parse_args(int argc, char *argv[]) {
        enum { O_LISTEN = 256, O_WORKERS, O_ZONE, O_RATE, O_BURST, O_NODELAY, O_DELAY, O_HEADER, O_SOCKET, O_STATS };
        static const struct option opts[] = {
                { "listen", required_argument, NULL, O_LISTEN },
                { "workers", required_argument, NULL, O_WORKERS },
                { "zone", required_argument, NULL, O_ZONE },
                { "rate", required_argument, NULL, O_RATE },
                { "burst", required_argument, NULL, O_BURST },
                { "nodelay", no_argument, NULL, O_NODELAY },
                { "delay", required_argument, NULL, O_DELAY },
                { "key-header", required_argument, NULL, O_HEADER },
                { "socket", required_argument, NULL, O_SOCKET },
                { "stats", no_argument, NULL, O_STATS },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        static char zone_name[SHMZ_NAME_BUF];
        bool nodelay = false, delay = false;
        uint32_t v;
        int c;

        while ((c = getopt_long(argc, argv, "h", opts, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        exit(0);
                case O_LISTEN:
                        arg.listen = optarg;
                        break;
                case O_WORKERS:
                        if (parse_uint(optarg, WORKERS_MAX, &v) < 0 || v == 0) {
                                fprintf(stderr, "--workers: 1 to %d\n", WORKERS_MAX);
                                return -EINVAL;
                        }
                        arg.workers = v;
                        break;
                case O_ZONE: {
                        const char *colon = strchr(optarg, ':');
                        if (!colon || colon == optarg || (size_t) (colon - optarg) >= sizeof(zone_name) ||
                            parse_zone_size(colon + 1, &arg.zone_size) < 0) {
                                fprintf(stderr, "--zone: NAME:SIZE, e.g. one:10m\n");
                                return -EINVAL;
                        }
                        memcpy(zone_name, optarg, (size_t) (colon - optarg));
                        zone_name[colon - optarg] = 0;
                        arg.zone_name = zone_name;
                        break;
                }
                case O_RATE:
                        if (limiter_parse_rate(optarg, &arg.cfg.rate) < 0) {
                                fprintf(stderr, "--rate: Nr/s or Nr/m, e.g. 1r/s\n");
                                return -EINVAL;
                        }
                        break;
                case O_BURST:
                        if (parse_uint(optarg, LIMITER_BURST_MAX, &arg.cfg.burst) < 0) {
                                fprintf(stderr, "--burst: 0 to %u\n", LIMITER_BURST_MAX);
                                return -EINVAL;
                        }
                        break;
                case O_NODELAY:
                        nodelay = true;
                        break;
                case O_DELAY:
                        if (parse_uint(optarg, LIMITER_BURST_MAX, &arg.cfg.delay) < 0) {
                                fprintf(stderr, "--delay: 0 to %u\n", LIMITER_BURST_MAX);
                                return -EINVAL;
                        }
                        delay = true;
                        break;
                case O_HEADER:
                        arg.header = optarg;
                        break;
                case O_SOCKET:
                        arg.socket = optarg;
                        break;
                case O_STATS:
                        arg.stats = true;
                        break;
                default:
                        return -EINVAL;
                }
        if (optind < argc) {
                fprintf(stderr, "unexpected argument %s\n", argv[optind]);
                return -EINVAL;
        }
        if (nodelay && delay) {
                fprintf(stderr, "--nodelay and --delay exclude each other (as in nginx)\n");
                return -EINVAL;
        }
        if (nodelay)
                arg.cfg.delay = LIMITER_NODELAY;
        if (!arg.zone_name || (!arg.stats && arg.cfg.rate == 0)) {
                fprintf(stderr, "--zone and --rate are required (--help)\n");
                return -EINVAL;
        }
        if (arg.cfg.rate == 0)
                arg.cfg.rate = 1000; /* --stats only reads */
        return 0;
}

int main(int argc, char *argv[]) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        if (parse_args(argc, argv) < 0)
                return 2;
        if (arg.stats)
                return show_stats();
        return master();
}
