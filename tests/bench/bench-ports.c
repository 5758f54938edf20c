/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Ports side by side with their anchors, two real processes each:
 *  - round trips (rtt_<size>) against a bare SOCK_SEQPACKET socketpair that
 *    copies the payload, both sides sleeping in recv;
 *  - rtt_64B and rtt_1MiB against Eclipse iceoryx's C binding (waitset, a RouDi
 *    of our own), when it was found at build time;
 *  - one-way throughput of 1 MiB messages the sender fills in place
 *    (shmz_port_buf), against one memcpy of 1 MiB per message and against a
 *    stream socket (the sender fills its own buffer and writes it).
 * In round trips each side stamps the first and last 8 bytes of what it sends
 * (a port buffer, an iceoryx chunk, or the socket's user buffer) and the other
 * side reads them: payloads are produced in place, the socket copies them.
 * Small payloads (<= SHMZ_FRAME_INLINE_MAX) go the way an application sends
 * them: shmz_port_send() from its own buffer (inline). Medians of several
 * runs; RATIO <metric>/<anchor> x, x = anchor time / our time (> 1: we win).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench-util.h"
#include "harness.h"
#include "shmzone.h"

#if HAVE_ICEORYX
/* Its headers declare `f()` without void. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <iceoryx_binding_c/publisher.h>
#include <iceoryx_binding_c/runtime.h>
#include <iceoryx_binding_c/subscriber.h>
#include <iceoryx_binding_c/wait_set.h>
#pragma GCC diagnostic pop
#endif

#define RUNS 5
#define THR_MSGS 400
#define MiB (1u << 20)

static struct daemon_proc d;

static pid_t main_pid;

static void die(const char *what) {
        fprintf(stderr, "bench-ports: %s\n", what);
        /* The daemon goes with the benchmark, not with one of its children. */
        if (getpid() == main_pid)
                harness_cleanup(&d);
        exit(1);
}

static void stamp(void *buf, size_t size, uint64_t v) {
        if (size >= 16) {
                memcpy(buf, &v, 8);
                memcpy((char *) buf + size - 8, &v, 8);
        } else if (size > 0)
                memset(buf, (int) v, size);
}

/* The stamp, or STAMP_TORN when its two copies differ. */
#define STAMP_TORN (UINT64_MAX - 1)
static uint64_t read_stamp(const void *buf, size_t size) {
        uint64_t a = 0, b = 0;

        if (size < 16)
                return size ? *(const unsigned char *) buf : 0;
        memcpy(&a, buf, 8);
        memcpy(&b, (const char *) buf + size - 8, 8);
        return a == b ? a : STAMP_TORN;
}

/* ---- shmzone ports ---------------------------------------------------------------------- */

static struct shmz_port *child_port(const char *name) {
        struct shmz_client *c;
        struct shmz_port *p;

        if (shmz_connect(d.socket, &c) < 0 || shmz_port_connect(c, name, &p) < 0)
                _exit(2);
        return p;
}

/* A buffer of the port, waiting while the peer still holds the memory (port_buf itself never waits). */
static void *port_buf_wait(struct shmz_port *p, size_t size) {
        for (;;) {
                void *b = shmz_port_buf(p, size);

                if (b)
                        return b;
                if (errno != EAGAIN)
                        return NULL;
                sched_yield();
        }
}

/* Sends size bytes stamped v: in place when large, from our own buffer when small. */
static int shmz_send_stamped(struct shmz_port *p, size_t size, uint64_t v) {
        static char small[SHMZ_FRAME_INLINE_MAX];
        struct shmz_msg m = { .type = 1, .size = size, .fd = -1 };

        m.data = size > SHMZ_FRAME_INLINE_MAX ? port_buf_wait(p, size) : small;
        if (!m.data)
                return -errno;
        stamp(m.data, size, v);
        return shmz_port_send(p, &m, -1);
}

static _Noreturn void shmz_echo(const char *name) {
        struct shmz_port *p = child_port(name);

        for (;;) {
                struct shmz_msg m;
                uint64_t v;
                size_t size;

                if (shmz_port_recv(p, &m, -1) < 0)
                        _exit(0);
                v = read_stamp(m.data, m.size);
                size = m.size;
                shmz_msg_release(p, &m);
                if (shmz_send_stamped(p, size, v) < 0)
                        _exit(0);
        }
}

static double shmz_rtt(struct shmz_port *p, size_t size, long iters) {
        double t0 = now_ns();

        for (long i = 0; i < iters; i++) {
                struct shmz_msg m;

                if (shmz_send_stamped(p, size, (uint64_t) i) < 0 || shmz_port_recv(p, &m, -1) < 0)
                        die("shmz round trip failed");
                if (size >= 16 && read_stamp(m.data, m.size) != (uint64_t) i)
                        die("shmz round trip: the stamp did not come back");
                shmz_msg_release(p, &m);
        }
        return (now_ns() - t0) / (double) iters;
}

/* The receiver of the throughput run: checks a byte at each end, tells when the run's end marker came. */
static _Noreturn void shmz_sink(const char *name) {
        struct shmz_port *p = child_port(name);

        for (;;) {
                struct shmz_msg m;

                if (shmz_port_recv(p, &m, -1) < 0)
                        _exit(0);
                if (m.type == 2) {
                        shmz_msg_release(p, &m);
                        if (shmz_send_stamped(p, 1, 0) < 0)
                                _exit(0);
                        continue;
                }
                if (m.size != MiB || ((unsigned char *) m.data)[0] != ((unsigned char *) m.data)[MiB - 1])
                        _exit(3);
                shmz_msg_release(p, &m);
        }
}

static double shmz_thr(struct shmz_port *p) {
        double t0 = now_ns();
        struct shmz_msg m;

        for (int i = 0; i < THR_MSGS; i++) {
                void *b = port_buf_wait(p, MiB);

                if (!b)
                        die("shmz_port_buf failed");
                memset(b, i & 0xff, MiB);
                m = (struct shmz_msg){ .type = 1, .data = b, .size = MiB, .fd = -1 };
                if (shmz_port_send(p, &m, -1) < 0)
                        die("shmz send failed");
        }
        m = (struct shmz_msg){ .type = 2, .data = "e", .size = 1, .fd = -1 };
        if (shmz_port_send(p, &m, -1) < 0 || shmz_port_recv(p, &m, -1) < 0)
                die("shmz end of run failed");
        shmz_msg_release(p, &m);
        return (now_ns() - t0) / THR_MSGS;
}

static struct shmz_port *accept_child(struct shmz_listener *l) {
        struct shmz_port *p;

        if (shmz_port_accept(l, 10 * (int64_t) 1000000000, &p) < 0)
                die("accept failed");
        return p;
}

/* ---- sockets ---------------------------------------------------------------------------- */

/* Largest datagram the pair takes: the whole payload where the buffers allow (root: forced), else pieces. */
static size_t seq_piece = SIZE_MAX;

static void big_buffers(int fd, int bytes) {
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes)) < 0)
                (void) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) < 0)
                (void) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

static void seq_send(int fd, const char *buf, size_t size) {
        size_t off = 0;

        do {
                size_t n = size - off < seq_piece ? size - off : seq_piece;
                ssize_t k = send(fd, buf + off, n, MSG_NOSIGNAL);

                if (k < 0 && (errno == EMSGSIZE || errno == ENOBUFS || errno == ENOMEM) && seq_piece > 4096) {
                        seq_piece = n / 2; /* the kernel will not take it whole: pieces, as an application would */
                        continue;
                }
                if (k < 0)
                        die("seqpacket send failed");
                off += (size_t) k;
        } while (off < size);
}

static ssize_t seq_recv(int fd, char *buf, size_t size) {
        size_t off = 0;

        do {
                ssize_t k = recv(fd, buf + off, size - off, 0);

                if (k <= 0)
                        return -1;
                off += (size_t) k;
        } while (off < size);
        return (ssize_t) off;
}

static _Noreturn void seq_echo(int fd, size_t size) {
        char *buf = malloc(size ? size : 1);

        for (;;) {
                if (seq_recv(fd, buf, size) < 0)
                        _exit(0);
                stamp(buf, size, read_stamp(buf, size));
                seq_send(fd, buf, size);
        }
}

static double seq_rtt(int fd, char *buf, size_t size, long iters) {
        double t0 = now_ns();

        for (long i = 0; i < iters; i++) {
                stamp(buf, size, (uint64_t) i);
                seq_send(fd, buf, size);
                if (seq_recv(fd, buf, size) < 0)
                        die("seqpacket round trip failed");
                if (size >= 16 && read_stamp(buf, size) != (uint64_t) i)
                        die("seqpacket round trip: the stamp did not come back");
        }
        return (now_ns() - t0) / (double) iters;
}

static bool read_all(int fd, void *buf, size_t size) {
        size_t off = 0;

        while (off < size) {
                ssize_t k = read(fd, (char *) buf + off, size - off);

                if (k <= 0)
                        return false;
                off += (size_t) k;
        }
        return true;
}

static bool write_all(int fd, const void *buf, size_t size) {
        size_t off = 0;

        while (off < size) {
                ssize_t k = write(fd, (const char *) buf + off, size - off);

                if (k <= 0)
                        return false;
                off += (size_t) k;
        }
        return true;
}

static _Noreturn void stream_sink(int fd) {
        unsigned char *buf = malloc(MiB);
        uint64_t n;

        while (read_all(fd, &n, sizeof(n))) {
                for (uint64_t i = 0; i < n; i++)
                        if (!read_all(fd, buf, MiB) || buf[0] != buf[MiB - 1])
                                _exit(3);
                if (!write_all(fd, "a", 1))
                        _exit(4);
        }
        _exit(0);
}

static double stream_thr(int fd, char *buf) {
        double t0 = now_ns();
        uint64_t n = THR_MSGS;
        char ack;

        if (!write_all(fd, &n, sizeof(n)))
                die("stream write failed");
        for (int i = 0; i < THR_MSGS; i++) {
                memset(buf, i & 0xff, MiB);
                if (!write_all(fd, buf, MiB))
                        die("stream write failed");
        }
        if (!read_all(fd, &ack, 1))
                die("stream ack failed");
        return (now_ns() - t0) / THR_MSGS;
}

static double memcpy_thr(char *dst, const char *src) {
        double t0 = now_ns();

        for (int i = 0; i < THR_MSGS; i++) {
                memcpy(dst, src, MiB);
                __asm__ volatile("" : : "r"(dst) : "memory");
        }
        return (now_ns() - t0) / THR_MSGS;
}

/* ---- iceoryx ---------------------------------------------------------------------------- */

#if HAVE_ICEORYX
struct iox_side {
        iox_pub_storage_t pub_storage;
        iox_sub_storage_t sub_storage;
        iox_ws_storage_t ws_storage;
        iox_pub_t pub;
        iox_sub_t sub;
        iox_ws_t ws;
};

static void iox_side_open(struct iox_side *s, const char *name, const char *out, const char *in, size_t size) {
        char instance[32];
        iox_pub_options_t po;
        iox_sub_options_t so;

        /* A service per size: a process of an earlier run that lingers never subscribes to this one. */
        snprintf(instance, sizeof(instance), "rtt%zu", size);

        iox_runtime_init(name);
        iox_pub_options_init(&po);
        iox_sub_options_init(&so);
        so.queueCapacity = 16;
        s->pub = iox_pub_init(&s->pub_storage, "shmzbench", instance, out, &po);
        s->sub = iox_sub_init(&s->sub_storage, "shmzbench", instance, in, &so);
        s->ws = iox_ws_init(&s->ws_storage);
        if (iox_ws_attach_subscriber_state(s->ws, s->sub, SubscriberState_HAS_DATA, 0, NULL) != WaitSetResult_SUCCESS)
                _exit(5);
        /* Both directions connected before the first message. */
        while (!iox_pub_has_subscribers(s->pub) || iox_sub_get_subscription_state(s->sub) != SubscribeState_SUBSCRIBED)
                usleep(1000);
}

/* Sleeps in the waitset until a chunk is there, takes it. */
static const void *iox_take(struct iox_side *s) {
        const void *chunk;

        for (;;) {
                iox_notification_info_t infos[4];
                uint64_t missed;

                if (iox_sub_take_chunk(s->sub, &chunk) == ChunkReceiveResult_SUCCESS)
                        return chunk;
                (void) iox_ws_wait(s->ws, infos, 4, &missed);
        }
}

static void iox_send(struct iox_side *s, size_t size, uint64_t v) {
        void *chunk;

        if (iox_pub_loan_chunk(s->pub, &chunk, (uint32_t) size) != AllocationResult_SUCCESS) {
                fprintf(stderr, "bench-ports: iceoryx could not loan %zu bytes\n", size);
                _exit(6);
        }
        stamp(chunk, size, v);
        iox_pub_publish_chunk(s->pub, chunk);
}

static _Noreturn void iox_pong(size_t size) {
        struct iox_side s;
        char name[64];

        snprintf(name, sizeof(name), "shmzbench-pong-%d", (int) getpid());
        iox_side_open(&s, name, "pong", "ping", size);
        for (;;) {
                const void *in = iox_take(&s);
                uint64_t v = read_stamp(in, size);

                iox_sub_release_chunk(s.sub, in);
                if (v == UINT64_MAX)
                        break;
                iox_send(&s, size, v);
        }
        iox_ws_deinit(s.ws);
        iox_sub_deinit(s.sub);
        iox_pub_deinit(s.pub);
        iox_runtime_shutdown();
        _exit(0);
}

/* In a child of its own: medians of RUNS runs into *ret. */
static _Noreturn void iox_ping(size_t size, long iters, double *ret) {
        double t[RUNS];
        struct iox_side s;
        char name[64];

        snprintf(name, sizeof(name), "shmzbench-ping-%d", (int) getpid());
        iox_side_open(&s, name, "ping", "pong", size);
        for (int r = -1; r < RUNS; r++) { /* run -1 warms up */
                double t0 = now_ns();

                for (long i = 0; i < iters; i++) {
                        const void *in;

                        iox_send(&s, size, (uint64_t) i);
                        in = iox_take(&s);
                        if (size >= 16 && read_stamp(in, size) != (uint64_t) i)
                                _exit(7);
                        iox_sub_release_chunk(s.sub, in);
                }
                if (r >= 0)
                        t[r] = (now_ns() - t0) / (double) iters;
        }
        iox_send(&s, size >= 16 ? size : 16, UINT64_MAX); /* ends the pong */
        *ret = median(t, RUNS);
        iox_ws_deinit(s.ws);
        iox_sub_deinit(s.sub);
        iox_pub_deinit(s.pub);
        iox_runtime_shutdown();
        _exit(0);
}

static const char roudi_config[] = "[general]\nversion = 1\n\n[[segment]]\n\n"
                                   "[[segment.mempool]]\nsize = 128\ncount = 1000\n\n"
                                   "[[segment.mempool]]\nsize = 1052672\ncount = 32\n";

/* Our own RouDi, its own config and directory; stopped by its pid. 0, or -1 and why. */
static pid_t roudi_start(const char *dir, char *why, size_t why_size) {
        char cfg[256], log[256];
        const char *roudi = getenv("IOX_ROUDI");
        pid_t pid;
        FILE *f;

        if (!roudi)
                roudi = IOX_ROUDI_PATH;
        if (access(roudi, X_OK) < 0) {
                snprintf(why, why_size, "%s not found", roudi);
                return -1;
        }
        snprintf(cfg, sizeof(cfg), "%s/roudi.toml", dir);
        snprintf(log, sizeof(log), "%s/roudi.log", dir);
        f = fopen(cfg, "we");
        if (!f || fputs(roudi_config, f) < 0 || fclose(f) != 0)
                die("cannot write the RouDi config");
        pid = fork();
        if (pid < 0)
                die("fork");
        if (pid == 0) {
                int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

                if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0 || chdir(dir) < 0)
                        _exit(127);
                /* No process monitoring: a busy machine must not get our processes removed; we stop it ourselves. */
                execl(roudi, roudi, "-c", cfg, "-l", "warning", "-m", "off", (char *) NULL);
                _exit(127);
        }
        /* RouDi is up once it says so (a stale management segment of an earlier one proves nothing). */
        for (int i = 0; i < 1000; i++) {
                char text[8192] = "";
                int fd;

                if (waitpid(pid, NULL, WNOHANG) == pid) {
                        snprintf(why, why_size, "iox-roudi exited at start (is another RouDi running?), see %s", log);
                        return -1;
                }
                fd = open(log, O_RDONLY | O_CLOEXEC);
                if (fd >= 0) {
                        ssize_t n = read(fd, text, sizeof(text) - 1);

                        close(fd);
                        if (n > 0 && strstr(text, "RouDi is ready for clients"))
                                return pid;
                }
                usleep(10000);
        }
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        snprintf(why, why_size, "iox-roudi did not come up");
        return -1;
}

static void roudi_stop(pid_t pid) {
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
}

/* Median round trip of size bytes through iceoryx, or a negative value. */
static double iox_rtt(size_t size, long iters, double *shared) {
        pid_t pong, ping, w = 0;
        int st = 0;

        *shared = -1;
        pong = fork();
        if (pong == 0)
                iox_pong(size);
        ping = fork();
        if (ping == 0)
                iox_ping(size, iters, shared);
        /* Bounded: a run that hangs (RouDi gone, a process dropped) ends as a failure, not a stuck benchmark. */
        for (int i = 0; i < 6000 && (w = waitpid(ping, &st, WNOHANG)) == 0; i++)
                usleep(50000);
        if (w != ping || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                if (w == 0) {
                        kill(ping, SIGKILL);
                        waitpid(ping, NULL, 0);
                }
                kill(pong, SIGKILL);
                waitpid(pong, NULL, 0);
                return -1;
        }
        for (int i = 0; i < 200 && (w = waitpid(pong, &st, WNOHANG)) == 0; i++)
                usleep(50000);
        if (w == 0) {
                kill(pong, SIGKILL);
                waitpid(pong, NULL, 0);
        }
        return *shared;
}
#endif

/* ---- main ------------------------------------------------------------------------------- */

struct rtt_case {
        const char *name;
        size_t size;
        long iters;
        double ours, seq;
};

int main(void) {
        struct rtt_case cases[] = {
                { "64B", 64, 20000 },
                { "4KiB", 4096, 10000 },
                { "64KiB", 65536, 4000 },
                { "1MiB", MiB, 600 },
        };
        double ours[RUNS], anchor[RUNS], anchor2[RUNS];
        struct shmz_client *c;
        struct shmz_listener *l;
        char *buf = malloc(MiB), *buf2 = malloc(MiB);
        int sv[2];

        if (!buf || !buf2)
                die("out of memory");
        memset(buf, 1, MiB);
        memset(buf2, 2, MiB);
        main_pid = getpid();
        harness_init(&d, "[daemon]\nmemory_budget = 64M\n");
        if (harness_start(&d, NULL, false) != 0) {
                fprintf(stderr, "daemon did not start: %s\n", harness_log(&d));
                harness_cleanup(&d);
                return 1;
        }
        if (shmz_connect(d.socket, &c) < 0 || shmz_port_listen(c, "bench", 0600, &l) < 0)
                die("cannot listen");

        for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
                struct rtt_case *rc = &cases[k];
                struct shmz_port *p;
                pid_t echo, seq;

                echo = fork();
                if (echo == 0)
                        shmz_echo("bench");
                p = accept_child(l);
                if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
                        die("socketpair");
                big_buffers(sv[0], 4 * MiB);
                big_buffers(sv[1], 4 * MiB);
                seq = fork();
                if (seq == 0) {
                        close(sv[0]);
                        seq_echo(sv[1], rc->size);
                }
                close(sv[1]);
                (void) shmz_rtt(p, rc->size, rc->iters / 10 + 1);
                (void) seq_rtt(sv[0], buf, rc->size, rc->iters / 10 + 1);
                /* Interleaved runs: machine noise hits both sides alike. */
                for (int r = 0; r < RUNS; r++) {
                        anchor[r] = seq_rtt(sv[0], buf, rc->size, rc->iters);
                        ours[r] = shmz_rtt(p, rc->size, rc->iters);
                }
                rc->ours = median(ours, RUNS);
                rc->seq = median(anchor, RUNS);
                close(sv[0]);
                shmz_port_close(p);
                waitpid(seq, NULL, 0);
                waitpid(echo, NULL, 0);
                printf("rtt %s: shmzone %.0f ns, unix seqpacket %.0f ns%s (median of %d x %ld)\n", rc->name, rc->ours,
                       rc->seq, seq_piece < rc->size ? " (in pieces)" : "", RUNS, rc->iters);
                printf("RATIO rtt_%s/unix_seqpacket %.3f\n", rc->name, rc->seq / rc->ours);
                fflush(stdout);
        }

#if HAVE_ICEORYX
        {
                double *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
                char why[512];
                pid_t roudi;

                roudi = roudi_start(d.dir, why, sizeof(why));
                if (roudi < 0 || shared == MAP_FAILED)
                        printf("SKIP iceoryx (%s)\n", why);
                else {
                        double i64 = iox_rtt(64, cases[0].iters, shared);
                        double i1m = iox_rtt(MiB, cases[3].iters, shared);

                        roudi_stop(roudi);
                        if (i64 < 0 || i1m < 0)
                                die("iceoryx round trips failed");
                        printf("rtt 64B: iceoryx (waitset) %.0f ns; rtt 1MiB: iceoryx (waitset) %.0f ns\n", i64, i1m);
                        printf("RATIO rtt_64B/iceoryx_waitset %.3f\n", i64 / cases[0].ours);
                        printf("RATIO rtt_1MiB/iceoryx %.3f\n", i1m / cases[3].ours);
                }
                fflush(stdout);
        }
#else
        printf("SKIP iceoryx (libiceoryx-binding-c-dev was not found at build time)\n");
#endif

        {
                struct shmz_port *p;
                pid_t sink, ssink;

                sink = fork();
                if (sink == 0)
                        shmz_sink("bench");
                p = accept_child(l);
                if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                        die("socketpair");
                ssink = fork();
                if (ssink == 0) {
                        close(sv[0]);
                        stream_sink(sv[1]);
                }
                close(sv[1]);
                (void) shmz_thr(p);
                (void) stream_thr(sv[0], buf);
                for (int r = 0; r < RUNS; r++) {
                        anchor[r] = memcpy_thr(buf2, buf);
                        anchor2[r] = stream_thr(sv[0], buf);
                        ours[r] = shmz_thr(p);
                }
                close(sv[0]);
                shmz_port_close(p);
                waitpid(ssink, NULL, 0);
                waitpid(sink, NULL, 0);
                printf("thr 1MiB per message: shmzone (fill in place) %.0f ns, memcpy %.0f ns, unix stream (fill + "
                       "write) %.0f ns (median of %d x %d)\n",
                       median(ours, RUNS), median(anchor, RUNS), median(anchor2, RUNS), RUNS, THR_MSGS);
                printf("RATIO thr_1MiB/memcpy %.3f\n", median(anchor, RUNS) / median(ours, RUNS));
                printf("RATIO thr_1MiB/unix_stream %.3f\n", median(anchor2, RUNS) / median(ours, RUNS));
        }

        shmz_listener_close(l);
        shmz_disconnect(c);
        harness_cleanup(&d);
        free(buf);
        free(buf2);
        return 0;
}
