/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Ports side by side with their anchors, two real processes each:
 *  - round trips (rtt_<size>) against a bare SOCK_SEQPACKET socketpair that
 *    copies the payload, both sides sleeping in recv;
 *  - rtt_64B against a bare futex ping-pong between two processes (no payload):
 *    the floor of any receiver that sleeps, x near 1 being the best there is;
 *  - rtt_64B and rtt_1MiB against Eclipse iceoryx's C binding (waitset, a RouDi
 *    of our own), when it was found at build time;
 *  - rtt_64B with both sides spinning (shmz_port_set_spin() far longer than a
 *    run, shmz_port_recv(-1)) against iceoryx with busy-polling subscribers
 *    (iox_sub_take_chunk in a loop, no waitset), one fresh pair of processes
 *    per run each, so that no idle spinner steals a core from the other's run;
 *    a run ends after its round trips or after RUN_CAP_NS, whichever comes
 *    first (the figure is per round trip done);
 *  - one-way throughput of 1 MiB messages the sender fills in place
 *    (shmz_port_buf), against one memcpy of 1 MiB per message and against a
 *    stream socket (the sender fills its own buffer and writes it);
 *  - one-way messages per second (msgs_64B): the sender sends 64 bytes from
 *    its own buffer as fast as the port takes them (waiting when it is full),
 *    the receiver checks each one's sequence number and answers an end
 *    marker that carries their number (runs capped as above); against the
 *    same over a SOCK_SEQPACKET socketpair, and against a bare single-producer
 *    ring of 64-byte slots in shared memory, both sides spinning (spsc_ring):
 *    the floor of streaming on this machine;
 *  - rtt_64B with both sides spinning against two processes flipping one word
 *    of one cache line (spin_pingpong): the floor of any spinning receiver.
 * In round trips each side stamps the first and last 8 bytes of what it sends
 * (a port buffer, an iceoryx chunk, or the socket's user buffer) and the other
 * side reads them: payloads are produced in place, the socket copies them.
 * Small payloads (<= SHMZ_FRAME_INLINE_MAX) go the way an application sends
 * them: shmz_port_send() from its own buffer (inline). Medians of several
 * runs; RATIO <metric>/<anchor> x, x = anchor time / our time, or for msgs_64B
 * our rate / the anchor's rate (> 1: we win).
 */
#include <errno.h>
#include <linux/futex.h>
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
#include <sys/syscall.h>
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
#define MSGS 200000 /* one-way messages per run */
/* Longer than any run: a spinning receiver never goes to sleep. */
#define SPIN_NS (10 * (uint64_t) 1000000000)
/*
 * What a run of the spinning round trips or of msgs_64B may take at most (a tenth for a warm-up): busy pollers on
 * a loaded machine (2 shared cores) can take 100 us a round trip, which must not make the benchmark take minutes.
 */
#define RUN_CAP_NS 2e9
#define MiB (1u << 20)

static struct daemon_proc d;

static pid_t main_pid;
static pid_t roudi_pid = -1; /* our RouDi while it runs */

static void die(const char *what) {
        fprintf(stderr, "bench-ports: %s\n", what);
        /* The daemon (and RouDi) go with the benchmark, not with one of its children. */
        if (getpid() == main_pid) {
                if (roudi_pid > 0) {
                        kill(roudi_pid, SIGTERM);
                        waitpid(roudi_pid, NULL, 0);
                }
                harness_cleanup(&d);
        }
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

/* Whether a run that began at t0, i steps in, is over its cap (0: none). Looks at the clock every 64 steps. */
static bool over_cap(double t0, double cap_ns, long i) {
        return cap_ns > 0 && i > 0 && (i & 63) == 0 && now_ns() - t0 > cap_ns;
}

/*
 * How many of RUNS runs the cap cut short, from their figures: time per step (or, rate: steps per second) and the
 * steps a whole run has. Many: the machine is loaded (spinners wait for a core), the figures say little.
 */
static int n_capped(const double *v, bool rate, long steps) {
        int n = 0;

        for (int r = 0; r < RUNS; r++)
                n += rate ? (double) steps * 1e9 / v[r] > RUN_CAP_NS : v[r] * (double) steps > RUN_CAP_NS;
        return n;
}

/* ---- shmzone ports ---------------------------------------------------------------------- */

static struct shmz_port *child_port(const char *name) {
        struct shmz_client *c;
        struct shmz_port *p;

        if (shmz_connect(d.socket, &c) < 0 || shmz_port_connect(c, name, &p) < 0)
                _exit(2);
        return p;
}

/*
 * A buffer of the port, polling while the peer still holds the memory: the
 * sender of a stream owns its core, as the anchors' writers do. (Sleeping in
 * shmz_port_buf_wait() costs the receiver a wake-up call per release and the
 * sender a wake-up; measured here it made thr_1MiB swing between 0.64x and
 * 1.1x memcpy, against 0.82-1.05x polling.)
 */
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
static int shmz_send_typed(struct shmz_port *p, uint32_t type, size_t size, uint64_t v) {
        static char small[SHMZ_FRAME_INLINE_MAX];
        struct shmz_msg m = { .type = type, .size = size, .fd = -1 };

        m.data = size > SHMZ_FRAME_INLINE_MAX ? port_buf_wait(p, size) : small;
        if (!m.data)
                return -errno;
        stamp(m.data, size, v);
        return shmz_port_send(p, &m, -1);
}

static int shmz_send_stamped(struct shmz_port *p, size_t size, uint64_t v) {
        return shmz_send_typed(p, 1, size, v);
}

/* Answers every message with its size and stamp, until the port goes or a type 2 message (the end) comes. */
static _Noreturn void shmz_echo(const char *name, uint64_t spin_ns) {
        struct shmz_port *p = child_port(name);

        if (spin_ns > 0 && shmz_port_set_spin(p, spin_ns) < 0)
                _exit(2);
        for (;;) {
                struct shmz_msg m;
                uint64_t v;
                size_t size;

                if (shmz_port_recv(p, &m, -1) < 0 || m.type == 2)
                        _exit(0);
                v = read_stamp(m.data, m.size);
                size = m.size;
                shmz_msg_release(p, &m);
                if (shmz_send_stamped(p, size, v) < 0)
                        _exit(0);
        }
}

/* Mean round trip over iters of them, or over those done when cap_ns (0: none) passed. */
static double shmz_rtt(struct shmz_port *p, size_t size, long iters, double cap_ns) {
        double t0 = now_ns();
        long i;

        for (i = 0; i < iters && !over_cap(t0, cap_ns, i); i++) {
                struct shmz_msg m;

                if (shmz_send_stamped(p, size, (uint64_t) i) < 0 || shmz_port_recv(p, &m, -1) < 0)
                        die("shmz round trip failed");
                if (size >= 16 && read_stamp(m.data, m.size) != (uint64_t) i)
                        die("shmz round trip: the stamp did not come back");
                shmz_msg_release(p, &m);
        }
        return (now_ns() - t0) / (double) i;
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

/*
 * One run of 64-byte round trips with both sides spinning, with an echo of its own: once the run is over the echo
 * is gone, so that it spins on no core while the anchor runs.
 */
static double shmz_spin_rtt(struct shmz_listener *l, long iters) {
        struct shmz_port *p;
        double t;
        pid_t echo;

        echo = fork();
        if (echo < 0)
                die("fork");
        if (echo == 0)
                shmz_echo("bench", SPIN_NS);
        p = accept_child(l);
        if (shmz_port_set_spin(p, SPIN_NS) < 0)
                die("shmz_port_set_spin failed");
        (void) shmz_rtt(p, 64, iters / 10 + 1, RUN_CAP_NS / 10);
        t = shmz_rtt(p, 64, iters, RUN_CAP_NS);
        if (shmz_send_typed(p, 2, 16, 0) < 0)
                die("shmz end of run failed");
        waitpid(echo, NULL, 0);
        shmz_port_close(p);
        return t;
}

/*
 * The receiver of one-way messages: a run is messages of 64 bytes stamped 0, 1, ... and an end (type 2) stamped
 * with their number; it answers the end with that number when every one came, in order, else with UINT64_MAX.
 */
static _Noreturn void shmz_msgs_sink(const char *name) {
        struct shmz_port *p = child_port(name);
        uint64_t next = 0;
        bool ok = true;

        for (;;) {
                struct shmz_msg m;

                if (shmz_port_recv(p, &m, -1) < 0)
                        _exit(0);
                if (m.type == 2) {
                        uint64_t n = read_stamp(m.data, m.size);

                        shmz_msg_release(p, &m);
                        if (shmz_send_stamped(p, 16, ok && next == n ? n : UINT64_MAX) < 0)
                                _exit(0);
                        next = 0;
                        ok = true;
                        continue;
                }
                if (m.type != 1 || m.size != 64 || read_stamp(m.data, m.size) != next)
                        ok = false;
                next++;
                shmz_msg_release(p, &m);
        }
}

/*
 * Messages per second, from the first send until the receiver said it has them all: n of them, or those sent until
 * cap_ns passed.
 */
static double shmz_msgs(struct shmz_port *p, long n, double cap_ns) {
        double t0 = now_ns();
        struct shmz_msg m;
        long i;

        for (i = 0; i < n && !over_cap(t0, cap_ns, i); i++)
                if (shmz_send_stamped(p, 64, (uint64_t) i) < 0)
                        die("shmz message send failed");
        n = i;
        if (shmz_send_typed(p, 2, 16, (uint64_t) n) < 0 || shmz_port_recv(p, &m, -1) < 0)
                die("shmz end of messages failed");
        if (m.size != 16 || read_stamp(m.data, m.size) != (uint64_t) n)
                die("shmz messages: lost or out of order");
        shmz_msg_release(p, &m);
        return (double) n * 1e9 / (now_ns() - t0);
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

/* The anchor's socketpair, with 4 MiB buffers each way (faster than the default for streams of datagrams). */
static void seqpacket_pair(int sv[2]) {
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
                die("socketpair");
        big_buffers(sv[0], 4 * MiB);
        big_buffers(sv[1], 4 * MiB);
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

/* As shmz_msgs_sink(): 64-byte datagrams stamped 0, 1, ..., then a 16-byte one (the end) stamped with their number. */
static _Noreturn void seq_msgs_sink(int fd) {
        char buf[64];
        uint64_t next = 0;
        bool ok = true;

        for (;;) {
                ssize_t k = recv(fd, buf, sizeof(buf), 0);

                if (k <= 0)
                        _exit(0);
                if (k == 16) {
                        uint64_t n = read_stamp(buf, 16);

                        stamp(buf, 16, ok && next == n ? n : UINT64_MAX);
                        if (send(fd, buf, 16, MSG_NOSIGNAL) != 16)
                                _exit(0);
                        next = 0;
                        ok = true;
                        continue;
                }
                if (k != 64 || read_stamp(buf, 64) != next)
                        ok = false;
                next++;
        }
}

static double seq_msgs(int fd, long n, double cap_ns) {
        double t0 = now_ns();
        char buf[64];
        long i;

        for (i = 0; i < n && !over_cap(t0, cap_ns, i); i++) {
                stamp(buf, 64, (uint64_t) i);
                if (send(fd, buf, 64, MSG_NOSIGNAL) != 64)
                        die("seqpacket message send failed");
        }
        n = i;
        stamp(buf, 16, (uint64_t) n);
        if (send(fd, buf, 16, MSG_NOSIGNAL) != 16 || recv(fd, buf, sizeof(buf), 0) != 16)
                die("seqpacket end of messages failed");
        if (read_stamp(buf, 16) != (uint64_t) n)
                die("seqpacket messages: lost or out of order");
        return (double) n * 1e9 / (now_ns() - t0);
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
        iox_ws_t ws; /* NULL: busy polling */
};

/*
 * A service per instance (a size, or a run of the busy case): a process of an earlier run that lingers never
 * subscribes to this one.
 */
static void iox_side_open(struct iox_side *s, const char *name, const char *out, const char *in, const char *instance,
                          bool busy) {
        iox_pub_options_t po;
        iox_sub_options_t so;

        iox_runtime_init(name);
        iox_pub_options_init(&po);
        iox_sub_options_init(&so);
        so.queueCapacity = 16;
        s->pub = iox_pub_init(&s->pub_storage, "shmzbench", instance, out, &po);
        s->sub = iox_sub_init(&s->sub_storage, "shmzbench", instance, in, &so);
        s->ws = NULL;
        if (!busy) {
                s->ws = iox_ws_init(&s->ws_storage);
                if (iox_ws_attach_subscriber_state(s->ws, s->sub, SubscriberState_HAS_DATA, 0, NULL) !=
                    WaitSetResult_SUCCESS)
                        _exit(5);
        }
        /* Both directions connected before the first message. */
        while (!iox_pub_has_subscribers(s->pub) || iox_sub_get_subscription_state(s->sub) != SubscribeState_SUBSCRIBED)
                usleep(1000);
}

/* Sleeps in the waitset until a chunk is there (busy: polls), takes it. */
static const void *iox_take(struct iox_side *s) {
        const void *chunk;

        for (;;) {
                iox_notification_info_t infos[4];
                uint64_t missed;

                if (iox_sub_take_chunk(s->sub, &chunk) == ChunkReceiveResult_SUCCESS)
                        return chunk;
                if (s->ws)
                        (void) iox_ws_wait(s->ws, infos, 4, &missed);
        }
}

static void iox_side_close(struct iox_side *s) {
        if (s->ws)
                iox_ws_deinit(s->ws);
        iox_sub_deinit(s->sub);
        iox_pub_deinit(s->pub);
        iox_runtime_shutdown();
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

static _Noreturn void iox_pong(size_t size, const char *instance, bool busy) {
        struct iox_side s;
        char name[64];

        snprintf(name, sizeof(name), "shmzbench-pong-%d", (int) getpid());
        iox_side_open(&s, name, "pong", "ping", instance, busy);
        for (;;) {
                const void *in = iox_take(&s);
                uint64_t v = read_stamp(in, size);

                iox_sub_release_chunk(s.sub, in);
                if (v == UINT64_MAX)
                        break;
                iox_send(&s, size, v);
        }
        iox_side_close(&s);
        _exit(0);
}

/* In a child of its own: the median of runs runs into *ret. Busy: runs capped as those of ours (RUN_CAP_NS). */
static _Noreturn void iox_ping(size_t size, long iters, int runs, const char *instance, bool busy, double *ret) {
        double t[RUNS];
        struct iox_side s;
        char name[64];

        snprintf(name, sizeof(name), "shmzbench-ping-%d", (int) getpid());
        iox_side_open(&s, name, "ping", "pong", instance, busy);
        for (int r = -1; r < runs; r++) { /* run -1 warms up */
                double t0 = now_ns();
                /* Busy: the warm-up and the cap are those of ours. */
                long n = r < 0 && busy ? iters / 10 + 1 : iters, i;
                double cap = busy ? (r < 0 ? RUN_CAP_NS / 10 : RUN_CAP_NS) : 0;

                for (i = 0; i < n && !over_cap(t0, cap, i); i++) {
                        const void *in;

                        iox_send(&s, size, (uint64_t) i);
                        in = iox_take(&s);
                        if (size >= 16 && read_stamp(in, size) != (uint64_t) i)
                                _exit(7);
                        iox_sub_release_chunk(s.sub, in);
                }
                if (r >= 0)
                        t[r] = (now_ns() - t0) / (double) i;
        }
        iox_send(&s, size >= 16 ? size : 16, UINT64_MAX); /* ends the pong */
        *ret = median(t, (size_t) runs);
        iox_side_close(&s);
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

/* Median of runs (<= RUNS) round trips of size bytes through iceoryx, or a negative value. */
static double iox_rtt(size_t size, long iters, int runs, const char *instance, bool busy, double *shared) {
        pid_t pong, ping, w = 0;
        int st = 0;

        *shared = -1;
        pong = fork();
        if (pong < 0)
                die("fork");
        if (pong == 0)
                iox_pong(size, instance, busy);
        ping = fork();
        if (ping < 0) {
                kill(pong, SIGKILL);
                waitpid(pong, NULL, 0);
                die("fork");
        }
        if (ping == 0)
                iox_ping(size, iters, runs, instance, busy, shared);
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

/* ---- the floor: two processes waking each other with a bare futex ------------------------- */

static void futex_wait_while(uint32_t *word, uint32_t v) {
        while (__atomic_load_n(word, __ATOMIC_ACQUIRE) == v)
                (void) syscall(SYS_futex, word, FUTEX_WAIT, v, NULL, NULL, 0);
}

static void futex_bump(uint32_t *word) {
        __atomic_fetch_add(word, 1, __ATOMIC_SEQ_CST);
        (void) syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/*
 * Round trips of a bare futex ping-pong, both sides asleep in FUTEX_WAIT: no
 * payload, no checks, no ring. What any receiver that sleeps pays for its two
 * wake-ups on this machine, whatever carries the message.
 */
static double futex_rtt(long iters) {
        uint32_t *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        double t0, t;
        pid_t pid;

        if (w == MAP_FAILED)
                die("mmap");
        pid = fork();
        if (pid < 0)
                die("fork");
        if (pid == 0) {
                for (long i = 0; i < iters; i++) {
                        futex_wait_while(&w[0], (uint32_t) i);
                        futex_bump(&w[16]);
                }
                _exit(0);
        }
        t0 = now_ns();
        for (long i = 0; i < iters; i++) {
                futex_bump(&w[0]);
                futex_wait_while(&w[16], (uint32_t) i);
        }
        t = (now_ns() - t0) / (double) iters;
        waitpid(pid, NULL, 0);
        munmap(w, 4096);
        return t;
}

/* ---- the floors of spinning and streaming: bare shared memory, no library ----------------- */

static void *shared_pages(size_t size) {
        void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

        if (m == MAP_FAILED)
                die("mmap");
        return m;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield" ::: "memory");
#endif
}

/*
 * One run of round trips between two spinning processes flipping one word in
 * one cache line (odd: the parent's turn is over, even: the child's), capped
 * like the spinning runs. No payload, no ring, no checks: what two spinners pay
 * for the line to go there and back on this machine. A process of its own per
 * run, gone when the run is.
 */
static double spin_pingpong(long iters, double cap_ns) {
        uint64_t *w = shared_pages(4096);
        double t0, t;
        long i;
        pid_t pid;

        pid = fork();
        if (pid < 0)
                die("fork");
        if (pid == 0) {
                for (uint64_t v = 1;; v += 2) {
                        uint64_t x;

                        while ((x = __atomic_load_n(w, __ATOMIC_ACQUIRE)) < v)
                                relax();
                        if (x == UINT64_MAX)
                                _exit(0);
                        __atomic_store_n(w, v + 1, __ATOMIC_RELEASE);
                }
        }
        t0 = now_ns();
        for (i = 0; i < iters && !over_cap(t0, cap_ns, i); i++) {
                uint64_t v = 2 * (uint64_t) i + 1;

                __atomic_store_n(w, v, __ATOMIC_RELEASE);
                while (__atomic_load_n(w, __ATOMIC_ACQUIRE) != v + 1)
                        relax();
        }
        t = (now_ns() - t0) / (double) i;
        __atomic_store_n(w, UINT64_MAX, __ATOMIC_RELEASE);
        waitpid(pid, NULL, 0);
        munmap(w, 4096);
        return t;
}

/*
 * A bare single-producer, single-consumer ring of SHMZ_RING_SLOTS slots of 64
 * bytes, as many as a port's ring: the producer stamps each message in its slot
 * (both ends, as our sender does) and publishes a head after each, the
 * consumer checks each stamp and publishes a tail whenever it has caught up;
 * each side spins while the ring is full or empty (the consumer SPSC_BACKOFF
 * pauses between looks, so that messages gather instead of every one moving
 * the head's line on its own) and keeps its own copy of the other's index.
 * Messages per second of one run, capped.
 */
#define SPSC_BACKOFF 64
struct spsc {
        _Alignas(64) uint64_t head; /* written by the producer */
        _Alignas(64) uint64_t tail; /* written by the consumer */
        _Alignas(64) uint64_t bad;
        _Alignas(64) unsigned char slot[SHMZ_RING_SLOTS][64];
};

static double spsc_ring(long n, double cap_ns) {
        struct spsc *r = shared_pages(sizeof(struct spsc));
        uint64_t tail = 0, i;
        double t0, t;
        pid_t pid;

        pid = fork();
        if (pid < 0)
                die("fork");
        if (pid == 0) {
                uint64_t head = 0, bad = 0;

                for (i = 0;; i++) {
                        uint64_t v;

                        if (head == i) {
                                /* Caught up: hand back what we took, then look again, not at once. */
                                __atomic_store_n(&r->tail, i, __ATOMIC_RELEASE);
                                while ((head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE)) == i)
                                        for (int k = 0; k < SPSC_BACKOFF; k++)
                                                relax();
                        }
                        v = read_stamp(r->slot[i % SHMZ_RING_SLOTS], 64);
                        if (v == UINT64_MAX)
                                break;
                        bad += v != i;
                }
                r->bad = bad;
                __atomic_store_n(&r->tail, i + 1, __ATOMIC_RELEASE);
                _exit(0);
        }
        t0 = now_ns();
        for (i = 0; i < (uint64_t) n && !over_cap(t0, cap_ns, (long) i); i++) {
                while (i - tail >= SHMZ_RING_SLOTS) {
                        tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
                        if (i - tail >= SHMZ_RING_SLOTS)
                                relax();
                }
                stamp(r->slot[i % SHMZ_RING_SLOTS], 64, i);
                __atomic_store_n(&r->head, i + 1, __ATOMIC_RELEASE);
        }
        n = (long) i;
        /* The end: a slot stamped UINT64_MAX; done once the consumer has taken it. */
        while (i - tail >= SHMZ_RING_SLOTS)
                tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
        stamp(r->slot[i % SHMZ_RING_SLOTS], 64, UINT64_MAX);
        __atomic_store_n(&r->head, i + 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) != i + 1)
                relax();
        t = now_ns() - t0;
        waitpid(pid, NULL, 0);
        if (r->bad != 0)
                die("spsc ring: lost or torn messages");
        munmap(r, sizeof(struct spsc));
        return (double) n * 1e9 / t;
}

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
                        shmz_echo("bench", 0);
                p = accept_child(l);
                seqpacket_pair(sv);
                seq = fork();
                if (seq == 0) {
                        close(sv[0]);
                        seq_echo(sv[1], rc->size);
                }
                close(sv[1]);
                (void) shmz_rtt(p, rc->size, rc->iters / 10 + 1, 0);
                (void) seq_rtt(sv[0], buf, rc->size, rc->iters / 10 + 1);
                /* Interleaved runs: machine noise hits both sides alike. */
                for (int r = 0; r < RUNS; r++) {
                        anchor[r] = seq_rtt(sv[0], buf, rc->size, rc->iters);
                        ours[r] = shmz_rtt(p, rc->size, rc->iters, 0);
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
        {
                double fx[RUNS];

                for (int r = 0; r < RUNS; r++)
                        fx[r] = futex_rtt(cases[0].iters);
                /* The floor for sleeping receivers: x near 1 means the library adds next to nothing. */
                printf("rtt bare futex ping-pong (both asleep, no payload) %.0f ns (median of %d x %ld)\n",
                       median(fx, RUNS), RUNS, cases[0].iters);
                printf("RATIO rtt_64B/futex_pingpong %.3f\n", median(fx, RUNS) / cases[0].ours);
                fflush(stdout);
        }

        /*
         * iceoryx (a RouDi of our own for both of its cases), then both sides spinning: a run of ours, a run of
         * iceoryx's, and again, each with processes of its own.
         */
        {
                char why[512] = "libiceoryx-binding-c-dev was not found at build time";
                long iters = cases[0].iters;

#if HAVE_ICEORYX
                double *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

                if (shared == MAP_FAILED)
                        snprintf(why, sizeof(why), "mmap: %s", strerror(errno));
                else
                        roudi_pid = roudi_start(d.dir, why, sizeof(why));
                if (roudi_pid > 0) {
                        double i64 = iox_rtt(64, cases[0].iters, RUNS, "rtt64", false, shared);
                        double i1m = iox_rtt(MiB, cases[3].iters, RUNS, "rtt1048576", false, shared);

                        if (i64 < 0 || i1m < 0)
                                die("iceoryx round trips failed");
                        printf("rtt 64B: iceoryx (waitset) %.0f ns; rtt 1MiB: iceoryx (waitset) %.0f ns\n", i64, i1m);
                        printf("RATIO rtt_64B/iceoryx_waitset %.3f\n", i64 / cases[0].ours);
                        printf("RATIO rtt_1MiB/iceoryx %.3f\n", i1m / cases[3].ours);
                }
#endif
                if (roudi_pid <= 0)
                        printf("SKIP iceoryx (%s)\n", why);
                fflush(stdout);

                for (int r = 0; r < RUNS; r++) {
                        ours[r] = shmz_spin_rtt(l, iters);
                        anchor2[r] = spin_pingpong(iters, RUN_CAP_NS);
#if HAVE_ICEORYX
                        if (roudi_pid > 0) {
                                char instance[32];

                                snprintf(instance, sizeof(instance), "busy64r%d", r);
                                anchor[r] = iox_rtt(64, iters, 1, instance, true, shared);
                                if (anchor[r] < 0)
                                        die("iceoryx busy round trips failed");
                        }
#endif
                }
                printf("rtt 64B, both sides spinning: shmzone (set_spin) %.0f ns (median of %d x up to %ld or %.0f s; "
                       "cut short: %d)\n",
                       median(ours, RUNS), RUNS, iters, RUN_CAP_NS / 1e9, n_capped(ours, false, iters));
                printf("rtt both sides spinning, bare cache line ping-pong (no payload) %.0f ns (cut short: %d)\n",
                       median(anchor2, RUNS), n_capped(anchor2, false, iters));
                /* The floor for spinners: x near 1 means the library adds next to nothing. */
                printf("RATIO rtt_64B_spin/spin_pingpong %.3f\n", median(anchor2, RUNS) / median(ours, RUNS));
                if (roudi_pid > 0) {
                        printf("rtt 64B, both sides spinning: iceoryx (busy polling) %.0f ns (cut short: %d)\n",
                               median(anchor, RUNS), n_capped(anchor, false, iters));
                        printf("RATIO rtt_64B_spin/iceoryx_busy %.3f\n", median(anchor, RUNS) / median(ours, RUNS));
                } else
                        printf("SKIP rtt_64B_spin/iceoryx_busy (the anchor is missing: %s)\n", why);
                fflush(stdout);
#if HAVE_ICEORYX
                if (roudi_pid > 0) {
                        roudi_stop(roudi_pid);
                        roudi_pid = -1;
                }
                if (shared != MAP_FAILED)
                        munmap(shared, 4096);
#endif
        }

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
                fflush(stdout);
        }

        /* One-way 64-byte messages, interleaved runs as above. */
        {
                struct shmz_port *p;
                pid_t sink, ssink;

                sink = fork();
                if (sink < 0)
                        die("fork");
                if (sink == 0)
                        shmz_msgs_sink("bench");
                p = accept_child(l);
                seqpacket_pair(sv);
                ssink = fork();
                if (ssink < 0)
                        die("fork");
                if (ssink == 0) {
                        close(sv[0]);
                        seq_msgs_sink(sv[1]);
                }
                close(sv[1]);
                (void) shmz_msgs(p, MSGS / 10, RUN_CAP_NS / 10);
                (void) seq_msgs(sv[0], MSGS / 10, RUN_CAP_NS / 10);
                (void) spsc_ring(MSGS / 10, RUN_CAP_NS / 10);
                for (int r = 0; r < RUNS; r++) {
                        anchor[r] = seq_msgs(sv[0], MSGS, RUN_CAP_NS);
                        ours[r] = shmz_msgs(p, MSGS, RUN_CAP_NS);
                        anchor2[r] = spsc_ring(MSGS, RUN_CAP_NS);
                }
                close(sv[0]);
                shmz_port_close(p);
                waitpid(ssink, NULL, 0);
                waitpid(sink, NULL, 0);
                printf("msgs 64B one way: shmzone %.0f msgs/s, unix seqpacket %.0f msgs/s (median of %d x up to %d or "
                       "%.0f s; cut short: %d, %d)\n",
                       median(ours, RUNS), median(anchor, RUNS), RUNS, MSGS, RUN_CAP_NS / 1e9,
                       n_capped(ours, true, MSGS), n_capped(anchor, true, MSGS));
                printf("RATIO msgs_64B/unix_seqpacket %.3f\n", median(ours, RUNS) / median(anchor, RUNS));
                printf("msgs 64B one way: bare spsc ring of %u slots, both sides spinning, %.0f msgs/s (cut short: "
                       "%d)\n",
                       SHMZ_RING_SLOTS, median(anchor2, RUNS), n_capped(anchor2, true, MSGS));
                /* The floor for streaming through shared memory. */
                printf("RATIO msgs_64B/spsc_ring %.3f\n", median(ours, RUNS) / median(anchor2, RUNS));
                fflush(stdout);
        }

        shmz_listener_close(l);
        shmz_disconnect(c);
        harness_cleanup(&d);
        free(buf);
        free(buf2);
        return 0;
}
