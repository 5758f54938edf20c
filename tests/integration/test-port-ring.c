/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The rings under ports, between real processes through a real daemon:
 *  - a million messages with random sleeps on both sides and a receiver that
 *    keeps changing how it waits (blocking, timeouts, polling the fd,
 *    dispatch): nothing lost, nothing reordered, never a hang (a lost
 *    wake-up would stall the stream: every wait is bounded and counted);
 *  - several threads sending on one port: each one's order kept;
 *  - a third process rewriting the ring's descriptors and words while
 *    messages flow: the receiver never reads outside what it checked, gets
 *    -EBADMSG once and -EPIPE after, and the daemon serves on;
 *  - a peer's fd whose close never returns (FUSE) stalls no receive.
 */
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
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "port.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "stallfs.h"
#include "util.h"

#define NSEC_PER_MSEC INT64_C(1000000)
#define NSEC_PER_SEC INT64_C(1000000000)
#define KiB(n) ((size_t) (n) << 10)

static struct daemon_proc d;

static void stop(void) {
        harness_stop_clean(&d);
}

static void start(void) {
        harness_init(&d, "[daemon]\nchunk_size = 64K\nsegment_chunks = 64\nport_memory = 16M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

TestSuite(ring, .init = start, .fini = stop, .timeout = 400);

static int wait_child(pid_t pid) {
        return harness_wait_child(pid);
}

static struct shmz_port *child_connect(const char *name) {
        return harness_child_connect(&d, name);
}

static unsigned count_fds(void) {
        return harness_count_fds(0);
}

/* Tells the child its messages all came, and that it may go; then everything is closed. */
static void finish(struct shmz_client *c, struct shmz_listener *l, struct shmz_port *p, pid_t pid) {
        struct shmz_msg m = { .type = 2, .data = "done", .size = 4, .fd = -1 };

        cr_assert_eq(shmz_port_send(p, &m, -1), 0);
        cr_assert_eq(wait_child(pid), 0);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- a million messages, random sleeps ---------------------------------------------------- */

#define STRESS_MSGS 1000000u

/* Message i's size, from i alone: mostly small (inline), some of a few KiB (inline, many slots), a few chunked. */
static size_t size_of(uint32_t i) {
        uint32_t h = i * 2654435761u;

        if (h % 1000 == 7)
                return KiB(70) + h % 1000;
        if (h % 100 == 3)
                return 2000 + h % 2000;
        return 8 + h % 200;
}

static void stamp(uint8_t *b, size_t size, uint32_t i) {
        memcpy(b, &i, sizeof(i));
        b[size - 1] = (uint8_t) (i * 7);
        if (size > 64)
                b[size / 2] = (uint8_t) (i * 13);
}

static bool stamped(const uint8_t *b, size_t size, uint32_t i) {
        uint32_t v;

        memcpy(&v, b, sizeof(v));
        return v == i && b[size - 1] == (uint8_t) (i * 7) && (size <= 64 || b[size / 2] == (uint8_t) (i * 13));
}

static void maybe_sleep(unsigned *seed) {
        if (rand_r(seed) % 3000 == 0)
                usleep((useconds_t) (rand_r(seed) % 400));
}

/* The sender: every message in order; now and then an fd rides along; random pauses. */
static _Noreturn void stress_sender(const char *name, unsigned seed) {
        struct shmz_port *p = child_connect(name);
        static uint8_t buf[KiB(72)];

        for (uint32_t i = 0; i < STRESS_MSGS; i++) {
                size_t size = size_of(i);
                struct shmz_msg m = { .type = 1, .data = buf, .size = size, .fd = -1 };
                int r;

                stamp(buf, size, i);
                if (i % 9973 == 0) {
                        m.fd = memfd_create("ride", MFD_CLOEXEC);
                        m.flags = SHMZ_MSG_CLOSE_FD;
                }
                r = shmz_port_send(p, &m, 30 * NSEC_PER_SEC);
                if (r < 0)
                        _exit(10);
                maybe_sleep(&seed);
        }
        /* Wait for the receiver's word that it has them all. */
        {
                struct shmz_msg m;

                if (shmz_port_recv(p, &m, 60 * NSEC_PER_SEC) < 0)
                        _exit(11);
                shmz_msg_release(p, &m);
        }
        shmz_port_close(p);
        _exit(0);
}

struct stress_rx {
        uint32_t next;
        unsigned bad;
};

static void take(struct stress_rx *rx, struct shmz_port *p, struct shmz_msg *m) {
        if (m->size != size_of(rx->next) || !stamped(m->data, m->size, rx->next) ||
            (m->fd >= 0) != (rx->next % 9973 == 0))
                rx->bad++;
        if (m->fd >= 0)
                close(m->fd);
        shmz_msg_release(p, m);
        rx->next++;
}

static void on_msg(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        take(userdata, p, m);
}

Test(ring, million_messages_random_sleeps_never_hang) {
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *p;
        struct stress_rx rx = {};
        unsigned seed = (unsigned) time(NULL), waits = 0;
        uint64_t t0;
        pid_t pid;

        cr_log_info("seed %u", seed);
        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "stress", 0600, &l), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0)
                stress_sender("stress", seed + 1);
        cr_assert_eq(shmz_port_accept(l, 10 * NSEC_PER_SEC, &p), 0);
        shmz_port_set_handler(p, on_msg, &rx);
        t0 = now_nsec(CLOCK_MONOTONIC);
        while (rx.next < STRESS_MSGS) {
                unsigned mode = (unsigned) rand_r(&seed) % 4, n = 1 + (unsigned) rand_r(&seed) % 5000;
                struct shmz_msg m;
                int r = 0;

                for (unsigned k = 0; k < n && rx.next < STRESS_MSGS; k++) {
                        switch (mode) {
                        case 0: /* blocking, bounded only by the test's own watchdog */
                                r = shmz_port_recv(p, &m, 20 * NSEC_PER_SEC);
                                if (r == 0)
                                        take(&rx, p, &m);
                                break;
                        case 1: /* short timeouts */
                                r = shmz_port_recv(p, &m, (int64_t) (rand_r(&seed) % 2000) * 1000);
                                if (r == 0)
                                        take(&rx, p, &m);
                                else if (r == -ETIMEDOUT || r == -EAGAIN)
                                        r = 0, waits++;
                                break;
                        case 2: { /* an event loop: poll the fd, then receive without waiting */
                                r = shmz_port_recv(p, &m, 0);
                                if (r == 0)
                                        take(&rx, p, &m);
                                else if (r == -EAGAIN) {
                                        struct pollfd pfd = { .fd = shmz_port_fd(p), .events = POLLIN };

                                        /* Readable within the watchdog, or a wake-up was lost. */
                                        r = poll(&pfd, 1, 20000) == 1 ? 0 : -ETIME;
                                        waits++;
                                }
                                break;
                        }
                        default: /* dispatch to the handler */
                                r = shmz_port_dispatch(p, 20 * NSEC_PER_SEC);
                                r = r > 0 ? 0 : r;
                                break;
                        }
                        cr_assert_eq(r, 0, "mode %u, message %u: %s", mode, rx.next, strerror(-r));
                        maybe_sleep(&seed);
                }
        }
        cr_log_info("%u messages in %.1f s, %u waits", STRESS_MSGS, (double) (now_nsec(CLOCK_MONOTONIC) - t0) / 1e9,
                    waits);
        cr_assert_eq(rx.bad, 0, "%u messages wrong", rx.bad);
        finish(c, l, p, pid);
}

/* ---- several sending threads ------------------------------------------------------------ */

#define SENDERS 4
#define PER_SENDER 100000u

struct sender_arg {
        struct shmz_port *p;
        uint32_t id;
        int r;
};

static void *sender_thread(void *arg) {
        struct sender_arg *a = arg;
        uint8_t buf[KiB(70)];

        for (uint32_t i = 0; i < PER_SENDER && a->r == 0; i++) {
                size_t size = i % 500 == 0 ? KiB(70) : 16 + (i * 7) % 100;
                struct shmz_msg m = { .type = a->id, .data = buf, .size = size, .fd = -1 };

                memcpy(buf, &i, sizeof(i));
                a->r = shmz_port_send(a->p, &m, 30 * NSEC_PER_SEC);
        }
        return NULL;
}

Test(ring, threads_sending_on_one_port_keep_their_order) {
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *p;
        uint32_t next[SENDERS] = {};
        pid_t pid;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "threads", 0600, &l), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("threads");
                struct sender_arg a[SENDERS];
                pthread_t t[SENDERS];
                struct shmz_msg m;

                for (uint32_t i = 0; i < SENDERS; i++) {
                        a[i] = (struct sender_arg){ .p = cp, .id = i };
                        if (pthread_create(&t[i], NULL, sender_thread, &a[i]) != 0)
                                _exit(20);
                }
                for (uint32_t i = 0; i < SENDERS; i++) {
                        pthread_join(t[i], NULL);
                        if (a[i].r != 0)
                                _exit(21);
                }
                if (shmz_port_recv(cp, &m, 60 * NSEC_PER_SEC) < 0)
                        _exit(22);
                _exit(0);
        }
        cr_assert_eq(shmz_port_accept(l, 10 * NSEC_PER_SEC, &p), 0);
        for (uint32_t n = 0; n < SENDERS * PER_SENDER; n++) {
                struct shmz_msg m;
                uint32_t i;
                int r = shmz_port_recv(p, &m, 20 * NSEC_PER_SEC);

                cr_assert_eq(r, 0, "message %u: %s", n, strerror(-r));
                cr_assert_lt(m.type, SENDERS);
                memcpy(&i, m.data, sizeof(i));
                cr_assert_eq(i, next[m.type], "thread %u: message %u after %u", m.type, i, next[m.type]);
                next[m.type]++;
                shmz_msg_release(p, &m);
        }
        finish(c, l, p, pid);
}

/* ---- a third process rewrites the ring ---------------------------------------------------------- */

/* Forked from the sender: it has the channel mapped where the sender has it. Scribbles until killed. */
static _Noreturn void vandal(struct shmz_channel *ch, unsigned seed) {
        uint8_t *ring = (uint8_t *) ch + SHMZ_CHANNEL_HEADER_SIZE; /* the connector's direction: 0 */

        for (unsigned n = 0;; n++) {
                uint64_t v = ((uint64_t) rand_r(&seed) << 32) | (uint64_t) rand_r(&seed);
                unsigned what = (unsigned) rand_r(&seed) % 100;

                if (what < 90) {
                        /* A word of some descriptor: kind, slots, flags, size, segment, chunk, payload. */
                        size_t at = (size_t) ((unsigned) rand_r(&seed) % SHMZ_RING_SLOTS) * SHMZ_RING_SLOT_SIZE +
                                    (size_t) ((unsigned) rand_r(&seed) % (SHMZ_RING_SLOT_SIZE / 8)) * 8;
                        uint64_t keep;

                        /* Half the time something plausible: small values pass the first checks. */
                        if (rand_r(&seed) % 2)
                                v %= 70000;
                        memcpy(&keep, ring + at, 8);
                        __atomic_store_n((uint64_t *) (void *) (ring + at), v, __ATOMIC_RELAXED);
                        /* Put it back a moment later, as a forger racing the reader would. */
                        if (rand_r(&seed) % 2)
                                __atomic_store_n((uint64_t *) (void *) (ring + at), keep, __ATOMIC_RELAXED);
                } else if (what < 95)
                        __atomic_store_n(&ch->dir[0].head,
                                         __atomic_load_n(&ch->dir[0].head, __ATOMIC_RELAXED) + (uint32_t) (v % 5),
                                         __ATOMIC_RELEASE);
                else
                        __atomic_store_n(&ch->dir[0].rx_sleep, (uint32_t) v, __ATOMIC_RELAXED);
                if (n % 64 == 0)
                        usleep(50);
        }
}

Test(ring, descriptors_rewritten_by_a_third_process) {
        struct shmz_client *c;
        struct shmz_listener *l;
        unsigned seed = (unsigned) time(NULL), fds_before;
        int violations = 0;

        cr_log_info("seed %u", seed);
        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "vandal", 0600, &l), 0);
        fds_before = count_fds();
        for (int round = 0; round < 10; round++) {
                struct shmz_port *p;
                unsigned received = 0;
                pid_t pid;
                int r;

                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        struct shmz_port *cp = child_connect("vandal");
                        static uint8_t buf[KiB(80)];
                        unsigned s = seed + (unsigned) round;
                        pid_t v;

                        v = fork();
                        if (v < 0)
                                _exit(30);
                        if (v == 0)
                                vandal(port_channel(cp), s * 3);
                        for (uint32_t i = 0;; i++) {
                                size_t size = i % 50 == 0 ? KiB(64) + i % 4096 : i % 3000;
                                struct shmz_msg m = { .type = i, .data = buf, .size = size, .fd = -1 };

                                memset(buf, (int) i, size);
                                r = shmz_port_send(cp, &m, 100 * NSEC_PER_MSEC);
                                if (r == -EPIPE || r == -EBADMSG)
                                        break;
                        }
                        kill(v, SIGKILL);
                        waitpid(v, NULL, 0);
                        _exit(0);
                }
                cr_assert_eq(shmz_port_accept(l, 10 * NSEC_PER_SEC, &p), 0);
                for (;;) {
                        struct shmz_msg m;

                        r = shmz_port_recv(p, &m, 5 * NSEC_PER_SEC);
                        if (r != 0)
                                break;
                        /* What we got was checked: a size within the port's limits, bytes we may read. */
                        cr_assert_leq(m.size, 64 * KiB(64));
                        if (m.size > 0) {
                                volatile uint8_t sum = 0;

                                for (size_t i = 0; i < m.size; i += 512)
                                        sum ^= ((const uint8_t *) m.data)[i];
                                (void) sum;
                        }
                        if (m.fd >= 0)
                                close(m.fd);
                        shmz_msg_release(p, &m);
                        received++;
                }
                cr_assert(r == -EBADMSG || r == -EPIPE, "round %d: recv: %s", round, strerror(-r));
                if (r == -EBADMSG) {
                        violations++;
                        cr_assert_eq(shmz_port_recv(p, &(struct shmz_msg){}, 0), -EPIPE);
                }
                shmz_port_close(p);
                cr_assert_eq(wait_child(pid), 0, "round %d: the sender", round);
                cr_log_info("round %d: %u messages, then %s", round, received, strerror(-r));
        }
        /* Random rewrites of descriptors in flight are caught, not just survived. */
        cr_assert_gt(violations, 0, "no rewrite was ever caught");
        cr_assert_eq(count_fds(), fds_before, "fds leaked");

        /* The daemon serves on: a clean port still works. */
        {
                struct shmz_port *p;
                struct shmz_msg m;
                pid_t pid = fork();

                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        struct shmz_port *cp = child_connect("vandal");
                        struct shmz_msg out = { .type = 9, .data = "fine", .size = 4, .fd = -1 };

                        _exit(shmz_port_send(cp, &out, -1) == 0 && shmz_port_recv(cp, &m, 10 * NSEC_PER_SEC) == 0 ? 0
                                                                                                                  : 40);
                }
                cr_assert_eq(shmz_port_accept(l, 10 * NSEC_PER_SEC, &p), 0);
                cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
                cr_assert_eq(m.type, 9);
                cr_assert_eq(memcmp(m.data, "fine", 4), 0);
                shmz_msg_release(p, &m);
                m = (struct shmz_msg){ .type = 10, .data = "ok", .size = 2, .fd = -1 };
                cr_assert_eq(shmz_port_send(p, &m, -1), 0);
                cr_assert_eq(wait_child(pid), 0);
                shmz_port_close(p);
        }
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- fds a peer sends ------------------------------------------------------------------------------ */

struct port_call {
        struct shmz_port *p;
        bool close; /* shmz_port_close(), else shmz_port_recv() without waiting */
        int r;
        atomic_bool done;
};

static void *port_call_main(void *arg) {
        struct port_call *a = arg;
        struct shmz_msg m;

        if (a->close) {
                shmz_port_close(a->p);
                a->r = 0;
        } else {
                a->r = shmz_port_recv(a->p, &m, 0);
                if (a->r == 0)
                        shmz_msg_release(a->p, &m);
        }
        atomic_store(&a->done, true);
        return NULL;
}

/* Sends a frame with fd on the raw socket of a port, as a peer that skips the library would. */
static void send_frame_fd(struct shmz_port *p, const struct shmz_frame *f, const void *payload, size_t n, int fd) {
        struct iovec iov[2] = { { (void *) f, sizeof(*f) }, { (void *) payload, n } };
        union {
                struct cmsghdr c;
                uint8_t buf[CMSG_SPACE(sizeof(int))];
        } control = {};
        struct msghdr mh = {
                .msg_iov = iov, .msg_iovlen = n > 0 ? 2 : 1, .msg_control = &control, .msg_controllen = sizeof(control)
        };

        CMSG_FIRSTHDR(&mh)->cmsg_level = SOL_SOCKET;
        CMSG_FIRSTHDR(&mh)->cmsg_type = SCM_RIGHTS;
        CMSG_FIRSTHDR(&mh)->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(CMSG_FIRSTHDR(&mh)), &fd, sizeof(int));
        cr_assert_eq(sendmsg(port_socket_fd(p), &mh, MSG_NOSIGNAL), (ssize_t) (sizeof(*f) + n));
}

/*
 * A peer passes an fd of a file on a FUSE filesystem it mounted (any user
 * can) whose FLUSH never gets an answer: as a segment (refused: -EBADMSG), and
 * as a message's fd whose message never comes (dropped when the port is
 * closed). Closing that fd may wait for good, but never in a receive or in
 * shmz_port_close().
 */
static struct stallfs *sf;

/* Whatever a failed test left stuck on the stalling filesystem ends, and its mount goes, before the daemon's dir. */
static void stop_stallfs(void) {
        stallfs_stop(sf);
        sf = NULL;
        stop();
}

Test(ring, a_peer_fd_whose_close_never_returns_stalls_nothing, .fini = stop_stallfs) {
        struct shmz_frame_segment fs = { .id = 1, .chunk_size = KiB(64), .n_chunks = 64 };
        struct shmz_frame seg = { .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs) }, fdf = { .kind = SHMZ_FRAME_FD };
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *a[2], *b[2];
        struct port_call call[2];
        char dir[192];
        pthread_t t[2];
        bool done[2];
        int fd;

        snprintf(dir, sizeof(dir), "%s/stall", d.dir);
        fd = stallfs_start_with_stalling_fd(dir, &sf);
        cr_assert_geq(fd, 0, "stallfs at %s: %s", dir, strerror(-fd));

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "stall", 0600, &l), 0);
        for (int i = 0; i < 2; i++) {
                cr_assert_eq(shmz_port_connect(c, "stall", &a[i]), 0);
                cr_assert_eq(shmz_port_accept(l, 10 * NSEC_PER_SEC, &b[i]), 0);
        }
        send_frame_fd(a[0], &seg, &fs, sizeof(fs), fd);
        send_frame_fd(a[1], &fdf, NULL, 0, fd);
        close(fd); /* this thread's FLUSH is answered */
        /* The FD frame is read ahead of its message (which never comes): b[1] holds the fd. */
        cr_assert_eq(shmz_port_recv(b[1], &(struct shmz_msg){}, 0), -EAGAIN);

        call[0] = (struct port_call){ .p = b[0] };
        call[1] = (struct port_call){ .p = b[1], .close = true };
        for (int i = 0; i < 2; i++)
                cr_assert_eq(pthread_create(&t[i], NULL, port_call_main, &call[i]), 0);
        for (int i = 0; i < 2000 && !(atomic_load(&call[0].done) && atomic_load(&call[1].done)); i++)
                usleep(1000);
        for (int i = 0; i < 2; i++)
                done[i] = atomic_load(&call[i].done);
        /* Whatever is stuck on the filesystem ends now (EIO), so that everything can be joined and closed. */
        stallfs_release(sf);
        for (int i = 0; i < 2; i++)
                pthread_join(t[i], NULL);
        cr_assert(done[0], "the receive was stuck for 2 s closing the peer's fd");
        cr_assert(done[1], "shmz_port_close() was stuck for 2 s closing the peer's fd");
        cr_assert_eq(call[0].r, -EBADMSG);
        cr_assert_eq(shmz_port_recv(b[0], &(struct shmz_msg){}, 0), -EPIPE);
        shmz_port_close(b[0]);
        shmz_port_close(a[0]);
        shmz_port_close(a[1]);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, true, false);
}
