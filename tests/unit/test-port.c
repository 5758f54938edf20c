/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Ports without a daemon: two ends of a socketpair in this process, a channel
 * memfd, and segments from memfds made here (the daemon's SEGMENT_CREATE is
 * replaced by a source callback). Hostile frames are written raw on one end.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "port.h"
#include "shmzone.h"
#include "util.h"
#include "wire.h"

#define CHUNK 4096u

struct source {
        uint32_t chunk_size, n_chunks;
        atomic_int made;
        int limit; /* segments the "daemon" hands out per direction, 0: none */
        bool unsealed;
        uint64_t wrong_size;
};

static int memfd_sealed(size_t size, bool seal) {
        int fd = wire_memfd(size, seal);

        cr_assert(fd >= 0, "memfd: %s", strerror(-fd));
        return fd;
}

static int source_cb(struct shmz_port *p, void *userdata, int *ret_fd, uint64_t *ret_id) {
        struct source *s = userdata;
        int n;

        (void) p;
        n = atomic_fetch_add(&s->made, 1);
        if (s->limit && n >= s->limit) {
                atomic_fetch_sub(&s->made, 1);
                return -ENOSPC;
        }
        *ret_fd = memfd_sealed(s->wrong_size ?: SHMZ_SEGMENT_HEADER_SIZE + (size_t) s->n_chunks * s->chunk_size,
                               !s->unsealed);
        *ret_id = (uint64_t) n + 1;
        return 0;
}

/* As the daemon makes it: both receivers start as pollers (the first message sends a WAKE frame). */
static int channel_new(void) {
        int fd = wire_channel_new();

        cr_assert(fd >= 0, "channel: %s", strerror(-fd));
        return fd;
}

static struct port_params params(uint32_t side, uint32_t n_chunks, uint64_t port_memory) {
        return (struct port_params){
                .port_id = 7,
                .token = 42,
                .side = side,
                .peer_pid = 1234,
                .peer_uid = 1000,
                .peer_gid = 100,
                .chunk_size = CHUNK,
                .segment_chunks = n_chunks,
                .port_memory = port_memory,
        };
}

static struct source src_a, src_b;

/* a (connector) and b (acceptor) joined by a socketpair and one channel. */
static void pair(uint32_t n_chunks, uint64_t port_memory, struct shmz_port **a, struct shmz_port **b) {
        struct port_params pa = params(0, n_chunks, port_memory), pb = params(1, n_chunks, port_memory);
        int sv[2], ch = channel_new();

        src_a = (struct source){ .chunk_size = CHUNK, .n_chunks = n_chunks };
        src_b = src_a;
        cr_assert(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
        cr_assert_eq(port_new(sv[0], fcntl(ch, F_DUPFD_CLOEXEC, 3), &pa, NULL, source_cb, &src_a, a), 0);
        cr_assert_eq(port_new(sv[1], ch, &pb, NULL, source_cb, &src_b, b), 0);
}

/* b as a port, and the raw other end (its socket and the channel) for writing hostile frames and descriptors. */
struct raw {
        int sock;
        struct shmz_channel *ch;
        uint32_t head;
};

static void half(uint32_t n_chunks, struct raw *ret_raw, struct shmz_port **b) {
        struct port_params pb = params(1, n_chunks, UINT64_C(1) << 24);
        int sv[2], ch = channel_new();

        src_b = (struct source){ .chunk_size = CHUNK, .n_chunks = n_chunks };
        cr_assert(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
        ret_raw->ch = mmap(NULL, SHMZ_CHANNEL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, ch, 0);
        cr_assert(ret_raw->ch != MAP_FAILED);
        cr_assert_eq(port_new(sv[1], ch, &pb, NULL, source_cb, &src_b, b), 0);
        ret_raw->sock = sv[0];
        ret_raw->head = 0;
}

static void raw_close(struct raw *w) {
        munmap(w->ch, SHMZ_CHANNEL_SIZE);
        close(w->sock);
}

static int count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        int n = 0;

        cr_assert(d);
        while (readdir(d))
                n++;
        closedir(d);
        return n;
}

static void fill(uint8_t *p, size_t n, unsigned seed) {
        for (size_t i = 0; i < n; i++)
                p[i] = (uint8_t) (i * 31 + seed);
}

static bool check(const uint8_t *p, size_t n, unsigned seed) {
        for (size_t i = 0; i < n; i++)
                if (p[i] != (uint8_t) (i * 31 + seed))
                        return false;
        return true;
}

Test(port, inline_round_trip) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 7, .stream = 3, .flags = SHMZ_MSG_LAST, .data = "hello", .size = 6, .fd = -1 };
        struct shmz_msg r;
        pid_t pid;
        uid_t uid;
        gid_t gid;

        pair(64, UINT64_C(1) << 24, &a, &b);
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EAGAIN);
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert_eq(r.type, 7);
        cr_assert_eq(r.stream, 3);
        cr_assert_eq(r.flags, SHMZ_MSG_LAST);
        cr_assert_eq(r.size, 6);
        cr_assert_str_eq(r.data, "hello");
        cr_assert_eq(r.fd, -1);
        shmz_msg_release(b, &r);
        /* Nothing went through shared memory. */
        cr_assert_eq(src_a.made, 0);
        /* Empty messages too. */
        m = (struct shmz_msg){ .type = 1, .fd = -1 };
        cr_assert_eq(shmz_port_send(b, &m, 0), 0);
        cr_assert_eq(shmz_port_recv(a, &r, 1000000000), 0);
        cr_assert_eq(r.size, 0);
        shmz_msg_release(a, &r);
        cr_assert_eq(shmz_port_recv(a, &r, 1000000), -ETIMEDOUT);
        cr_assert_eq(shmz_port_peer(a, &pid, &uid, &gid), 0);
        cr_assert(pid == 1234 && uid == 1000 && gid == 100);
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, chunked_round_trip) {
        struct shmz_port *a, *b;
        size_t size = 200000;
        uint8_t *data = malloc(size);
        struct shmz_msg m = { .type = 1, .data = data, .size = size, .fd = -1 }, r;
        int fds;

        pair(64, UINT64_C(1) << 24, &a, &b);
        fill(data, size, 5);
        fds = count_fds();
        cr_assert_eq(shmz_port_send(a, &m, -1), 0);
        cr_assert_eq(src_a.made, 1);
        /* Segments are kept as mappings: no fd stays open for them on either side. */
        cr_assert_eq(port_tx_chunks_used(a), (size + CHUNK - 1) / CHUNK);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert_eq(r.size, size);
        cr_assert(r.data != data);
        cr_assert(check(r.data, size, 5));
        cr_assert_eq(port_rx_chunks_held(b), (size + CHUNK - 1) / CHUNK);
        cr_assert_eq(count_fds(), fds);
        shmz_msg_release(b, &r);
        shmz_msg_release(b, &r); /* twice: nothing */
        cr_assert_eq(port_tx_chunks_used(a), 0);
        cr_assert_eq(port_rx_chunks_held(b), 0);
        /* Larger than one run of 64 chunks: refused. */
        m.size = 64 * CHUNK + 1;
        data = realloc(data, m.size);
        m.data = data;
        cr_assert_eq(shmz_port_send(a, &m, 0), -EMSGSIZE);
        free(data);
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, buf_zero_copy) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 2, .fd = -1 }, r;
        uint8_t *buf;

        pair(64, UINT64_C(1) << 24, &a, &b);
        buf = shmz_port_buf(a, 3 * CHUNK);
        cr_assert_not_null(buf);
        cr_assert_eq(port_tx_chunks_used(a), 3);
        fill(buf, 100, 9);
        m.data = buf;
        m.size = 100; /* smaller than asked: the tail goes back */
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        cr_assert_eq(port_tx_chunks_used(a), 1);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert_eq(r.size, 100);
        cr_assert(check(r.data, 100, 9));
        /* The same memory, not a copy. */
        buf[0] = 0xee;
        cr_assert_eq(((uint8_t *) r.data)[0], 0xee);
        shmz_msg_release(b, &r);
        cr_assert_eq(port_tx_chunks_used(a), 0);
        /* A buffer not sent goes back with buf_free; an unknown pointer is refused by send. */
        buf = shmz_port_buf(a, 10);
        cr_assert_eq(port_tx_chunks_used(a), 1);
        shmz_port_buf_free(a, buf);
        cr_assert_eq(port_tx_chunks_used(a), 0);
        m.data = buf;
        m.size = 10;
        cr_assert_eq(shmz_port_send(a, &m, 0), -EINVAL);
        /* Inside a buffer but not at its start: not a buffer either. */
        buf = shmz_port_buf(a, 2 * CHUNK);
        m.data = buf + 10;
        cr_assert_eq(shmz_port_send(a, &m, 0), -EINVAL);
        m.data = buf + CHUNK;
        cr_assert_eq(shmz_port_send(a, &m, 0), -EINVAL);
        shmz_port_buf_free(a, buf + CHUNK); /* nothing */
        cr_assert_eq(port_tx_chunks_used(a), 2);
        shmz_port_buf_free(a, buf);
        cr_assert_eq(port_tx_chunks_used(a), 0);
        errno = 0;
        cr_assert_null(shmz_port_buf(a, 65 * CHUNK));
        cr_assert_eq(errno, EMSGSIZE);
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, fd_rides_along) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 3, .data = "x", .size = 1, .flags = SHMZ_MSG_CLOSE_FD }, r;
        int pfd[2];
        char c;

        pair(64, UINT64_C(1) << 24, &a, &b);
        cr_assert(pipe2(pfd, O_CLOEXEC) == 0);
        m.fd = pfd[1];
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        cr_assert(fcntl(pfd[1], F_GETFD) < 0); /* closed once sent */
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert(r.fd >= 0);
        cr_assert(write(r.fd, "!", 1) == 1);
        cr_assert(read(pfd[0], &c, 1) == 1 && c == '!');
        close(r.fd);
        close(pfd[0]);
        shmz_msg_release(b, &r);
        shmz_port_close(a);
        shmz_port_close(b);
}

struct sender {
        struct shmz_port *p;
        size_t size;
        int r;
        uint64_t done_ns;
};

static void *send_one(void *arg) {
        struct sender *s = arg;
        uint8_t *data = calloc(1, s->size);
        struct shmz_msg m = { .data = data, .size = s->size, .fd = -1 };

        s->r = shmz_port_send(s->p, &m, -1);
        s->done_ns = now_nsec(CLOCK_MONOTONIC);
        free(data);
        return NULL;
}

Test(port, backpressure) {
        struct shmz_port *a, *b;
        uint8_t data[2 * CHUNK] = {};
        struct shmz_msg m = { .data = data, .size = sizeof(data), .fd = -1 }, r;
        struct sender s;
        pthread_t t;
        uint64_t released;

        /* One segment of 64 chunks per direction: 32 messages of 2 chunks fill it. */
        pair(64, SHMZ_SEGMENT_HEADER_SIZE + 64 * CHUNK, &a, &b);
        cr_assert_eq(port_max_slots(a), 1);
        for (int i = 0; i < 32; i++)
                cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        cr_assert_eq(shmz_port_send(a, &m, 0), -EAGAIN);
        cr_assert_eq(shmz_port_send(a, &m, 20000000), -ETIMEDOUT);
        errno = 0;
        cr_assert_null(shmz_port_buf(a, 100));
        cr_assert_eq(errno, EAGAIN);
        /* Inline messages need no memory. */
        m.size = 10;
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);

        /* A sender sleeping for memory wakes as soon as the receiver releases. */
        s = (struct sender){ .p = a, .size = 2 * CHUNK };
        cr_assert(pthread_create(&t, NULL, send_one, &s) == 0);
        usleep(100000);
        cr_assert_eq(s.done_ns, 0);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        released = now_nsec(CLOCK_MONOTONIC);
        shmz_msg_release(b, &r);
        pthread_join(t, NULL);
        cr_assert_eq(s.r, 0);
        cr_assert_lt(s.done_ns - released, 50000000, "woken after %llu ns",
                     (unsigned long long) (s.done_ns - released));
        shmz_port_close(a);
        shmz_port_close(b);
}

/* The ring holds 1024 one-slot messages; a sender waiting for slots wakes once the receiver has freed some. */
static void *send_small_blocking(void *arg) {
        struct sender *s = arg;
        struct shmz_msg m = { .type = 99999, .fd = -1 };

        s->r = shmz_port_send(s->p, &m, -1);
        s->done_ns = now_nsec(CLOCK_MONOTONIC);
        return NULL;
}

Test(port, ring_full_backpressure) {
        struct shmz_port *a, *b;
        struct shmz_msg r;
        struct sender s;
        pthread_t t;
        uint32_t n = 0;
        uint64_t freed;

        pair(64, UINT64_C(1) << 24, &a, &b);
        for (;; n++) {
                struct shmz_msg m = { .type = n, .data = &n, .size = sizeof(n), .fd = -1 };
                int rr = shmz_port_send(a, &m, 0);

                if (rr == -EAGAIN)
                        break;
                cr_assert_eq(rr, 0);
        }
        cr_assert_eq(n, SHMZ_RING_SLOTS, "%u one-slot messages fit", n);
        {
                struct shmz_msg m = { .data = &n, .size = sizeof(n), .fd = -1 };

                cr_assert_eq(shmz_port_send(a, &m, 20000000), -ETIMEDOUT);
        }
        s = (struct sender){ .p = a };
        cr_assert(pthread_create(&t, NULL, send_small_blocking, &s) == 0);
        usleep(50000);
        cr_assert_eq(s.done_ns, 0, "a sender went into a full ring");
        /* Take them all, in order: the sender wakes once the receiver gives slots back. */
        for (uint32_t i = 0; i < n; i++) {
                cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
                cr_assert_eq(r.type, i);
                shmz_msg_release(b, &r);
        }
        freed = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert_eq(r.type, 99999);
        shmz_msg_release(b, &r);
        pthread_join(t, NULL);
        cr_assert_eq(s.r, 0);
        cr_assert_lt((int64_t) (s.done_ns - freed), 50000000, "woken %lld ns after", (long long) (s.done_ns - freed));
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, sender_wakes_with_epipe_when_port_closes) {
        struct shmz_port *a, *b;
        uint8_t data[2 * CHUNK] = {};
        struct shmz_msg m = { .data = data, .size = sizeof(data), .fd = -1 };
        struct sender s;
        pthread_t t;

        pair(64, SHMZ_SEGMENT_HEADER_SIZE + 64 * CHUNK, &a, &b);
        for (int i = 0; i < 32; i++)
                cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        s = (struct sender){ .p = a, .size = 2 * CHUNK };
        cr_assert(pthread_create(&t, NULL, send_one, &s) == 0);
        usleep(50000);
        shmz_port_close(b); /* as the daemon does on the peer's death: channel closed, senders woken */
        pthread_join(t, NULL);
        cr_assert_eq(s.r, -EPIPE);
        shmz_port_close(a);
}

/* The peer is gone and nobody touches the channel (a restarted daemon no longer watches the port):
 * the sleeping sender still finds out, from the socket, within a bounded time. */
Test(port, sender_wakes_with_epipe_without_the_daemon) {
        struct shmz_port *a, *b;
        uint8_t data[2 * CHUNK] = {};
        struct shmz_msg m = { .data = data, .size = sizeof(data), .fd = -1 };
        struct sender s;
        pthread_t t;
        uint64_t gone;

        pair(64, SHMZ_SEGMENT_HEADER_SIZE + 64 * CHUNK, &a, &b);
        for (int i = 0; i < 32; i++)
                cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        s = (struct sender){ .p = a, .size = 2 * CHUNK };
        cr_assert(pthread_create(&t, NULL, send_one, &s) == 0);
        usleep(50000);
        cr_assert_eq(s.done_ns, 0);
        gone = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shutdown(port_socket_fd(b), SHUT_RDWR), 0); /* the socket only, not the channel */
        pthread_join(t, NULL);
        cr_assert_eq(s.r, -EPIPE);
        cr_assert_lt(s.done_ns - gone, UINT64_C(2000000000), "woken after %llu ns",
                     (unsigned long long) (s.done_ns - gone));
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, epipe_after_queued_messages) {
        struct shmz_port *a, *b;
        uint8_t big[3 * CHUNK];
        struct shmz_msg m = { .data = big, .size = sizeof(big), .fd = -1 }, r;

        pair(64, UINT64_C(1) << 24, &a, &b);
        fill(big, sizeof(big), 1);
        for (int i = 0; i < 3; i++) {
                m.type = (uint32_t) i;
                m.size = i == 1 ? 5 : sizeof(big);
                cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        }
        shmz_port_close(a);
        for (int i = 0; i < 3; i++) {
                cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
                cr_assert_eq(r.type, (uint32_t) i);
                cr_assert(check(r.data, r.size, 1));
                shmz_msg_release(b, &r);
        }
        cr_assert_eq(shmz_port_recv(b, &r, -1), -EPIPE);
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EPIPE);
        m.size = 1;
        cr_assert_eq(shmz_port_send(b, &m, 0), -EPIPE);
        shmz_port_close(b);
}

/* ---- hostile frames --------------------------------------------------------------------- */

static void send_raw(int fd, const struct shmz_frame *f, const void *payload, size_t n, const int *fds, size_t n_fds) {
        struct iovec iov[2] = { { (void *) f, sizeof(*f) }, { (void *) payload, n } };
        int r = wire_send(fd, iov, n ? 2 : 1, fds, n_fds, 0);

        cr_assert(r >= 0, "sendmsg: %s", strerror(-r));
}

/* A good SEGMENT frame for slot 0 (fd: a proper segment), so descriptors can name chunks. */
static int announce(int raw, uint32_t n_chunks, uint32_t slot) {
        int fd = memfd_sealed(SHMZ_SEGMENT_HEADER_SIZE + (size_t) n_chunks * CHUNK, true);
        struct shmz_frame f = { .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(struct shmz_frame_segment) };
        struct shmz_frame_segment fs = { .id = 1, .slot = slot, .chunk_size = CHUNK, .n_chunks = n_chunks };

        send_raw(raw, &f, &fs, sizeof(fs), &fd, 1);
        return fd;
}

/*
 * Writes a descriptor (as given: n_slots may lie) and payload at the raw
 * side's head in the acceptor's receiving ring (direction 0), then publishes
 * head + advance (0: n_slots) and wakes the receiver as a sender would.
 */
static void raw_put(struct raw *w, const struct shmz_desc *d, const void *payload, size_t n, uint32_t advance) {
        uint8_t *ring = (uint8_t *) w->ch + SHMZ_CHANNEL_HEADER_SIZE;
        uint8_t *at = ring + (size_t) (w->head % SHMZ_RING_SLOTS) * SHMZ_RING_SLOT_SIZE;
        struct shmz_frame wake = { .kind = SHMZ_FRAME_WAKE };

        memcpy(at, d, sizeof(*d));
        if (n)
                memcpy(at + sizeof(*d), payload, n);
        w->head += advance ?: d->n_slots;
        __atomic_store_n(&w->ch->dir[0].head, w->head, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(&w->ch->dir[0].wake_seq, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &w->ch->dir[0].wake_seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        send_raw(w->sock, &wake, NULL, 0, NULL, 0);
}

static uint16_t slots_for(size_t inline_size) {
        return (uint16_t) (inline_size <= 32 ? 1 : 1 + (inline_size - 32 + 63) / 64);
}

enum hostile {
        /* In the ring. */
        H_KIND,
        H_FLAGS,
        H_INLINE_SLOTS_MISMATCH,
        H_INLINE_TOO_BIG,
        H_N_SLOTS_ZERO,
        H_N_SLOTS_PAST_HEAD,
        H_HEAD_TOO_FAR,
        H_PAD_SHORT_OF_END,
        H_PAD_FLAGS,
        H_INLINE_NONZERO_SEGMENT,
        H_FD_FLAG_WITHOUT_FRAME,
        H_SLOT_UNKNOWN,
        H_SLOT_TOO_BIG,
        H_CHUNK_OUT_OF_RANGE,
        H_RUN_CROSSES_WORD,
        H_SIZE_OVERFLOW,
        H_SIZE_ZERO_CHUNK,
        H_CHUNK_TWO_SLOTS,
        H_BITS_NOT_CLAIMED,
        H_REPLAY,
        H_RING_LAST = H_REPLAY,
        /* On the socket. */
        H_SOCK_KIND,
        H_SOCK_DATA,
        H_FD_FRAME_WITHOUT_FD,
        H_FD_FRAME_TWO_FDS,
        H_FD_FRAME_PAYLOAD,
        H_WAKE_WITH_FD,
        H_WAKE_FIELDS,
        H_SEGMENT_WRONG_SIZE,
        H_SEGMENT_UNSEALED,
        H_SEGMENT_NO_FD,
        H_SEGMENT_TWICE,
        H_SEGMENT_WRONG_CHUNKS,
        H_SEGMENT_READ_ONLY,
        H_SEGMENT_NOT_MEMFD,
        H_SHORT,
        H_EMPTY_WITH_FD,
        H_COUNT,
};

static void hostile(enum hostile h) {
        struct shmz_port *b;
        struct shmz_desc d = { .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = SHMZ_FRAME_F_CHUNK, .size = 10 };
        struct shmz_frame f = {};
        struct shmz_frame_segment fs = { .id = 1, .chunk_size = CHUNK, .n_chunks = 128 };
        static uint8_t payload[SHMZ_FRAME_INLINE_MAX + 64];
        struct shmz_msg r;
        struct raw raw;
        int seg = -1, fds[2], before, expect_ok = 0;
        uint64_t *used = NULL;

        before = count_fds();
        half(128, &raw, &b);
        cr_assert(pipe2(fds, O_CLOEXEC) == 0);

        /* A legitimate segment in slot 0 with chunks 0..1 claimed, first. */
        if (h >= H_SLOT_UNKNOWN && h <= H_REPLAY) {
                seg = announce(raw.sock, 128, 0);
                used = mmap(NULL, SHMZ_SEGMENT_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, seg, 0);
                cr_assert(used != MAP_FAILED);
                used = ((struct shmz_segment_header *) (void *) used)->used;
                __atomic_store_n(&used[0], 3, __ATOMIC_SEQ_CST);
        }
        switch (h) {
        case H_KIND:
                d = (struct shmz_desc){ .kind = 9, .n_slots = 1 };
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_FLAGS:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = 0x4 };
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_INLINE_SLOTS_MISMATCH:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 3, .size = 10 };
                raw_put(&raw, &d, payload, 10, 0);
                break;
        case H_INLINE_TOO_BIG:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA,
                                        .n_slots = slots_for(SHMZ_FRAME_INLINE_MAX + 8),
                                        .size = SHMZ_FRAME_INLINE_MAX + 8 };
                raw_put(&raw, &d, payload, SHMZ_FRAME_INLINE_MAX + 8, 0);
                break;
        case H_N_SLOTS_ZERO:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 0, .size = 0 };
                raw_put(&raw, &d, NULL, 0, 1);
                break;
        case H_N_SLOTS_PAST_HEAD:
                /* Claims 65 slots of payload, publishes one. */
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA,
                                        .n_slots = slots_for(SHMZ_FRAME_INLINE_MAX),
                                        .size = SHMZ_FRAME_INLINE_MAX };
                raw_put(&raw, &d, NULL, 0, 1);
                break;
        case H_HEAD_TOO_FAR:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .size = 1 };
                raw_put(&raw, &d, "x", 1, SHMZ_RING_SLOTS + 1);
                break;
        case H_PAD_SHORT_OF_END:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_PAD, .n_slots = 1 };
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_PAD_FLAGS:
                raw.head = SHMZ_RING_SLOTS - 2;
                __atomic_store_n(&raw.ch->dir[0].tail, raw.head, __ATOMIC_SEQ_CST);
                d = (struct shmz_desc){ .kind = SHMZ_DESC_PAD, .n_slots = 2, .flags = 1 };
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_INLINE_NONZERO_SEGMENT:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .size = 4, .segment = 1 };
                raw_put(&raw, &d, payload, 4, 0);
                break;
        case H_FD_FLAG_WITHOUT_FRAME:
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = SHMZ_FRAME_F_FD, .size = 1 };
                raw_put(&raw, &d, payload, 1, 0);
                break;
        case H_SLOT_UNKNOWN:
                d.segment = 1;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_SLOT_TOO_BIG:
                d.segment = UINT32_MAX;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_CHUNK_OUT_OF_RANGE:
                d.chunk = 127;
                d.size = 2 * CHUNK;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_RUN_CROSSES_WORD:
                __atomic_store_n(&used[0], UINT64_MAX, __ATOMIC_SEQ_CST);
                __atomic_store_n(&used[1], UINT64_MAX, __ATOMIC_SEQ_CST);
                d.chunk = 60;
                d.size = 8 * CHUNK;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_SIZE_OVERFLOW:
                d.size = UINT64_MAX;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_SIZE_ZERO_CHUNK:
                d.size = 0;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_CHUNK_TWO_SLOTS:
                d.n_slots = 2;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_BITS_NOT_CLAIMED:
                d.chunk = 4;
                raw_put(&raw, &d, NULL, 0, 0);
                break;
        case H_REPLAY:
                d.size = 2 * CHUNK;
                raw_put(&raw, &d, NULL, 0, 0);
                raw_put(&raw, &d, NULL, 0, 0);
                expect_ok = 1;
                break;
        case H_SOCK_KIND:
                f = (struct shmz_frame){ .kind = 9 };
                send_raw(raw.sock, &f, NULL, 0, NULL, 0);
                break;
        case H_SOCK_DATA:
                /* Messages travel in the ring: a message frame on the socket is none of ours. */
                f = (struct shmz_frame){ .kind = 1, .size = 2 };
                send_raw(raw.sock, &f, "ok", 2, NULL, 0);
                break;
        case H_FD_FRAME_WITHOUT_FD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_FD };
                send_raw(raw.sock, &f, NULL, 0, NULL, 0);
                break;
        case H_FD_FRAME_TWO_FDS:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_FD };
                send_raw(raw.sock, &f, NULL, 0, fds, 2);
                break;
        case H_FD_FRAME_PAYLOAD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_FD, .size = 4 };
                send_raw(raw.sock, &f, payload, 4, &fds[0], 1);
                break;
        case H_WAKE_WITH_FD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_WAKE };
                send_raw(raw.sock, &f, NULL, 0, &fds[0], 1);
                break;
        case H_WAKE_FIELDS:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_WAKE, .type = 1 };
                send_raw(raw.sock, &f, NULL, 0, NULL, 0);
                break;
        case H_SEGMENT_WRONG_SIZE:
        case H_SEGMENT_UNSEALED:
        case H_SEGMENT_READ_ONLY:
        case H_SEGMENT_NOT_MEMFD: {
                size_t size = SHMZ_SEGMENT_HEADER_SIZE + 128 * CHUNK;

                if (h == H_SEGMENT_NOT_MEMFD)
                        seg = dup(fds[0]);
                else
                        seg = memfd_sealed(h == H_SEGMENT_WRONG_SIZE ? size - CHUNK : size, h != H_SEGMENT_UNSEALED);
                if (h == H_SEGMENT_READ_ONLY) {
                        char path[64];
                        int ro;

                        snprintf(path, sizeof(path), "/proc/self/fd/%d", seg);
                        ro = open(path, O_RDONLY | O_CLOEXEC);
                        cr_assert(ro >= 0);
                        close(seg);
                        seg = ro;
                }
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs) };
                send_raw(raw.sock, &f, &fs, sizeof(fs), &seg, 1);
                break;
        }
        case H_SEGMENT_NO_FD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs) };
                send_raw(raw.sock, &f, &fs, sizeof(fs), NULL, 0);
                break;
        case H_SEGMENT_TWICE:
                seg = announce(raw.sock, 128, 0);
                close(announce(raw.sock, 128, 0));
                break;
        case H_SEGMENT_WRONG_CHUNKS:
                seg = announce(raw.sock, 64, 0);
                break;
        case H_SHORT:
                cr_assert(send(raw.sock, "abc", 3, MSG_NOSIGNAL) == 3);
                break;
        case H_EMPTY_WITH_FD: {
                struct iovec iov = { NULL, 0 };

                cr_assert(wire_send(raw.sock, &iov, 1, &fds[0], 1, 0) >= 0);
                break;
        }
        default:
                cr_assert_fail();
        }
        if (h <= H_RING_LAST && h != H_HEAD_TOO_FAR && h != H_N_SLOTS_PAST_HEAD) {
                /* A good message after the bad one: it must never be seen. */
                d = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .size = 2 };
                raw_put(&raw, &d, "ok", 2, 0);
        }

        for (int i = 0; i < expect_ok; i++) {
                cr_assert_eq(shmz_port_recv(b, &r, -1), 0, "case %d", h);
                shmz_msg_release(b, &r);
        }
        /* What is wrong on the socket shows when the socket is read: a receive that finds the ring empty. */
        cr_assert_eq(shmz_port_recv(b, &r, h <= H_RING_LAST ? -1 : 0), -EBADMSG, "case %d", h);
        cr_assert_eq(shmz_port_recv(b, &r, -1), -EPIPE, "case %d", h);
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EPIPE, "case %d", h);
        /* The peer sees the port shut down. */
        {
                char c;

                cr_assert_eq(recv(raw.sock, &c, 1, MSG_DONTWAIT), 0, "case %d", h);
        }
        shmz_port_close(b);
        if (used)
                munmap((uint8_t *) used - offsetof(struct shmz_segment_header, used), SHMZ_SEGMENT_HEADER_SIZE);
        safe_close(seg);
        raw_close(&raw);
        close(fds[0]);
        close(fds[1]);
        /* Every fd that came with the hostile frames was closed. */
        cr_assert_eq(count_fds(), before, "case %d: fds leaked", h);
}

Test(port, hostile_frames_and_descriptors) {
        for (int h = 0; h < H_COUNT; h++)
                hostile((enum hostile) h);
}

/* A peer that floods WAKE frames: a receive without waiting reads a bounded number and returns; the port works. */
Test(port, wake_flood_is_bounded) {
        struct shmz_frame wake = { .kind = SHMZ_FRAME_WAKE };
        struct shmz_desc d = { .kind = SHMZ_DESC_DATA, .n_slots = 1, .size = 2 };
        struct shmz_port *b;
        struct shmz_msg r;
        struct raw raw;
        int n = 0;

        half(64, &raw, &b);
        /* More than one drain takes, as many as the socket holds. */
        while (n < 2000 && send(raw.sock, &wake, sizeof(wake), MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof(wake))
                n++;
        cr_assert_gt(n, 256, "only %d frames fit", n);
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EAGAIN);
        {
                struct pollfd pfd = { .fd = shmz_port_fd(b), .events = POLLIN };

                cr_assert_eq(poll(&pfd, 1, 0), 1, "the rest of the flood keeps the fd readable");
        }
        while (shmz_port_recv(b, &r, 0) == -EAGAIN && n-- > 0)
                ;
        raw_put(&raw, &d, "ok", 2, 0);
        cr_assert_eq(shmz_port_recv(b, &r, -1), 0);
        cr_assert_eq(memcmp(r.data, "ok", 2), 0);
        shmz_msg_release(b, &r);
        shmz_port_close(b);
        raw_close(&raw);
}

/*
 * A descriptor names a slot never announced, and the peer floods WAKE frames
 * as fast as they are read: the receive looking for the SEGMENT frame must
 * not read the flood for ever (what it needs was sent before the descriptor,
 * so it is among the frames queued when it starts looking).
 */
struct flooder {
        int sock;
        atomic_bool stop;
        atomic_ulong sent;
};

static void *flood_wakes(void *arg) {
        struct flooder *fl = arg;
        struct shmz_frame wake = { .kind = SHMZ_FRAME_WAKE };

        while (!atomic_load(&fl->stop) && send(fl->sock, &wake, sizeof(wake), MSG_NOSIGNAL) == sizeof(wake))
                fl->sent++;
        return NULL;
}

struct receiver {
        struct shmz_port *p;
        int64_t timeout_ns;
        int r;
        atomic_bool done;
        uint64_t took_ns;
};

static void *recv_once(void *arg) {
        struct receiver *rc = arg;
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
        struct shmz_msg m;

        rc->r = shmz_port_recv(rc->p, &m, rc->timeout_ns);
        rc->took_ns = now_nsec(CLOCK_MONOTONIC) - t0;
        if (rc->r == 0)
                shmz_msg_release(rc->p, &m);
        atomic_store(&rc->done, true);
        return NULL;
}

/* Waits up to ms for rc to finish. */
static bool wait_done(struct receiver *rc, int ms) {
        for (int i = 0; i < ms && !atomic_load(&rc->done); i++)
                usleep(1000);
        return atomic_load(&rc->done);
}

Test(port, wake_flood_while_a_descriptor_waits_for_its_segment) {
        struct shmz_desc d = { .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = SHMZ_FRAME_F_CHUNK, .size = 10 };
        struct flooder fl = {};
        struct receiver rc = {};
        struct shmz_port *b;
        struct raw raw;
        pthread_t tf[6], tr;
        bool done;

        half(64, &raw, &b);
        /* Slot 0 is never announced; the flood fills the socket before the receive starts, and keeps it full. */
        raw_put(&raw, &d, NULL, 0, 0);
        fl.sock = raw.sock;
        for (int i = 0; i < 6; i++)
                cr_assert(pthread_create(&tf[i], NULL, flood_wakes, &fl) == 0);
        usleep(20000);
        rc = (struct receiver){ .p = b, .timeout_ns = 0 };
        cr_assert(pthread_create(&tr, NULL, recv_once, &rc) == 0);
        done = wait_done(&rc, 1000);
        atomic_store(&fl.stop, true);
        pthread_join(tr, NULL);
        (void) shutdown(raw.sock, SHUT_RDWR); /* a flooder blocked in send() returns */
        for (int i = 0; i < 6; i++)
                pthread_join(tf[i], NULL);
        cr_log_info("receive: %llu ns, %lu frames sent", (unsigned long long) rc.took_ns, fl.sent);
        cr_assert(done, "the receive read the flood for over a second (%lu frames)", fl.sent);
        /* It reads what was queued when it started looking (a few hundred frames), not the flood. */
        cr_assert_lt(rc.took_ns, UINT64_C(100000000), "the receive took %llu ns", (unsigned long long) rc.took_ns);
        cr_assert_eq(rc.r, -EBADMSG);
        cr_assert_eq(shmz_port_recv(b, &(struct shmz_msg){}, 0), -EPIPE);
        shmz_port_close(b);
        raw_close(&raw);
}

/*
 * A thread that needs a new segment while the peer reads nothing from its
 * socket waits (its timeout: for ever) to announce it. Another thread that
 * needs one too, with a timeout, gets its timeout; shmz_port_buf() does not
 * wait at all.
 */
struct timed_sender {
        struct shmz_port *p;
        size_t size;
        int64_t timeout_ns;
        bool buf;
        int r;
        atomic_bool done;
        uint64_t took_ns;
};

static void *timed_send(void *arg) {
        struct timed_sender *s = arg;
        uint8_t *data = calloc(1, s->size);
        struct shmz_msg m = { .data = data, .size = s->size, .fd = -1 };
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);

        if (s->buf) {
                void *b = shmz_port_buf(s->p, s->size);

                s->r = b ? 0 : -errno;
                if (b)
                        shmz_port_buf_free(s->p, b);
        } else
                s->r = shmz_port_send(s->p, &m, s->timeout_ns);
        s->took_ns = now_nsec(CLOCK_MONOTONIC) - t0;
        atomic_store(&s->done, true);
        free(data);
        return NULL;
}

static bool sender_done(struct timed_sender *s, int ms) {
        for (int i = 0; i < ms && !atomic_load(&s->done); i++)
                usleep(1000);
        return atomic_load(&s->done);
}

Test(port, a_sender_waiting_to_announce_a_segment_holds_up_no_other) {
        struct shmz_frame wake = { .kind = SHMZ_FRAME_WAKE };
        struct timed_sender first, second, third;
        struct shmz_port *a, *b;
        pthread_t t1, t2, t3;
        bool done2, done3;
        char buf[64];
        int n = 0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        /* b never reads its socket: a's is full, and a has no segment yet. */
        while (send(port_socket_fd(a), &wake, sizeof(wake), MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof(wake))
                n++;
        cr_assert_gt(n, 0);
        first = (struct timed_sender){ .p = a, .size = 2 * CHUNK, .timeout_ns = -1 };
        cr_assert(pthread_create(&t1, NULL, timed_send, &first) == 0);
        usleep(50000);
        cr_assert(!atomic_load(&first.done), "the first sender did not wait for the full socket");
        second = (struct timed_sender){ .p = a, .size = 2 * CHUNK, .timeout_ns = 20000000 };
        third = (struct timed_sender){ .p = a, .size = 2 * CHUNK, .buf = true };
        cr_assert(pthread_create(&t2, NULL, timed_send, &second) == 0);
        cr_assert(pthread_create(&t3, NULL, timed_send, &third) == 0);
        done2 = sender_done(&second, 1000);
        done3 = sender_done(&third, 1000);
        /* b's socket read empty (the SEGMENT frame's fd goes with it): the first sender goes on. */
        while (recv(port_socket_fd(b), buf, sizeof(buf), MSG_DONTWAIT) > 0)
                ;
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
        pthread_join(t3, NULL);
        cr_assert(done2, "a send with a 20 ms timeout waited for another thread's send for over a second");
        cr_assert(done3, "shmz_port_buf() waited for another thread's send for over a second");
        cr_assert_eq(second.r, -ETIMEDOUT);
        cr_assert_lt(second.took_ns, UINT64_C(200000000), "took %llu ns", (unsigned long long) second.took_ns);
        cr_assert_eq(third.r, -EAGAIN);
        cr_assert_lt(third.took_ns, UINT64_C(200000000), "took %llu ns", (unsigned long long) third.took_ns);
        cr_assert_eq(first.r, 0);
        shmz_port_close(a);
        shmz_port_close(b);
}

/* A sender waiting to announce a segment sees the peer's end at once. */
Test(port, a_sender_waiting_to_announce_a_segment_sees_the_peer_go) {
        struct shmz_frame wake = { .kind = SHMZ_FRAME_WAKE };
        struct timed_sender first;
        struct shmz_port *a, *b;
        uint64_t gone;
        pthread_t t;

        pair(64, UINT64_C(1) << 24, &a, &b);
        while (send(port_socket_fd(a), &wake, sizeof(wake), MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof(wake))
                ;
        first = (struct timed_sender){ .p = a, .size = 2 * CHUNK, .timeout_ns = -1 };
        cr_assert(pthread_create(&t, NULL, timed_send, &first) == 0);
        usleep(50000);
        cr_assert(!atomic_load(&first.done));
        gone = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shutdown(port_socket_fd(b), SHUT_RDWR), 0); /* as the daemon does when b's process dies */
        pthread_join(t, NULL);
        cr_assert_eq(first.r, -EPIPE);
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - gone, UINT64_C(50000000), "woken after %llu ns",
                     (unsigned long long) (now_nsec(CLOCK_MONOTONIC) - gone));
        shmz_port_close(a);
        shmz_port_close(b);
}

/* A hugetlbfs memfd takes seals too, but a hole its owner punches would fault our reads: refused. */
Test(port, hugetlb_segment_refused) {
        struct shmz_frame_segment fs = { .id = 1, .chunk_size = CHUNK, .n_chunks = 511 };
        struct shmz_frame f = { .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs) };
        struct shmz_port *b;
        struct shmz_msg r;
        struct raw raw;
        int seg;

        /* 4 KiB + 511 chunks of 4 KiB: 2 MiB, one huge page. */
        half(511, &raw, &b);
        seg = memfd_create("huge", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
        if (seg < 0) {
                shmz_port_close(b);
                raw_close(&raw);
                cr_skip_test("no hugetlbfs memfd here: %m");
        }
        cr_assert(ftruncate(seg, SHMZ_SEGMENT_HEADER_SIZE + 511 * CHUNK) == 0, "%m");
        cr_assert(fcntl(seg, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0, "%m");
        send_raw(raw.sock, &f, &fs, sizeof(fs), &seg, 1);
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EBADMSG);
        cr_assert_eq(shmz_port_recv(b, &r, -1), -EPIPE);
        shmz_port_close(b);
        close(seg);
        raw_close(&raw);
}

/* ---- threads --------------------------------------------------------------------------- */

#define THREADS 4
#define PER_THREAD 300

struct worker {
        struct shmz_port *p;
        unsigned id;
        int r;
};

static void *sender_thread(void *arg) {
        struct worker *w = arg;
        static const size_t sizes[] = { 16, 3000, 5000, 70000, 200000 };
        uint8_t *data = malloc(200000);

        for (unsigned i = 0; i < PER_THREAD && w->r == 0; i++) {
                size_t size = sizes[(i + w->id) % ELEMENTSOF(sizes)];
                struct shmz_msg m = { .type = w->id, .stream = i + 1, .size = size, .fd = -1 };

                if (i % 3 == 0 && size > 16) {
                        /* In place, through a buffer of the port. */
                        uint8_t *buf;

                        while (!(buf = shmz_port_buf(w->p, size)))
                                if (errno != EAGAIN) {
                                        w->r = -errno;
                                        break;
                                } else
                                        usleep(100);
                        if (!buf)
                                break;
                        fill(buf, size, w->id * 1000 + i);
                        m.data = buf;
                } else {
                        fill(data, size, w->id * 1000 + i);
                        m.data = data;
                }
                w->r = shmz_port_send(w->p, &m, -1);
        }
        free(data);
        return NULL;
}

static void *receiver_thread(void *arg) {
        struct worker *w = arg;

        for (;;) {
                struct shmz_msg m;
                int r = shmz_port_recv(w->p, &m, 5000000000);

                if (r == -ETIMEDOUT || r == -EPIPE)
                        return NULL;
                if (r < 0 || m.type >= THREADS || !check(m.data, m.size, m.type * 1000 + (m.stream - 1))) {
                        w->r = r < 0 ? r : -EBADMSG;
                        return NULL;
                }
                shmz_msg_release(w->p, &m);
                if (atomic_fetch_add((atomic_uint *) &w->id, 1) + 1 == THREADS * PER_THREAD)
                        return NULL;
        }
}

Test(port, threads) {
        struct shmz_port *a, *b;
        struct worker s[THREADS], rcv = {};
        pthread_t ts[THREADS], tr[2];

        /* Little memory, so that senders wait for each other's releases. */
        pair(64, 4 * (SHMZ_SEGMENT_HEADER_SIZE + 64 * CHUNK), &a, &b);
        rcv.p = b;
        for (int i = 0; i < 2; i++)
                cr_assert(pthread_create(&tr[i], NULL, receiver_thread, &rcv) == 0);
        for (unsigned i = 0; i < THREADS; i++) {
                s[i] = (struct worker){ .p = a, .id = i };
                cr_assert(pthread_create(&ts[i], NULL, sender_thread, &s[i]) == 0);
        }
        for (unsigned i = 0; i < THREADS; i++) {
                pthread_join(ts[i], NULL);
                cr_assert_eq(s[i].r, 0, "sender %u: %d", i, s[i].r);
        }
        /* The receivers count together; the one that reaches the total ends, the other times out or sees EPIPE. */
        while (atomic_load((atomic_uint *) &rcv.id) < THREADS * PER_THREAD && rcv.r == 0)
                usleep(1000);
        shmz_port_close(a);
        for (int i = 0; i < 2; i++)
                pthread_join(tr[i], NULL);
        cr_assert_eq(rcv.r, 0);
        cr_assert_eq(rcv.id, THREADS * PER_THREAD);
        cr_assert_leq(src_a.made, 4);
        cr_assert_eq(port_rx_chunks_held(b), 0);
        shmz_port_close(b);
}

/* ---- RPC ----------------------------------------------------------------------------- */

struct rpc_seen {
        int replies, last_error, ended;
        uint32_t stream;
};

static void server(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        int *mode = userdata;

        /* mode 0: two replies, the second LAST; 1: silence. */
        if (*mode == 0) {
                struct shmz_msg r1 = { .type = 100, .stream = m->stream, .data = "one", .size = 4, .fd = -1 };
                struct shmz_msg r2 = { .type = 101, .stream = m->stream, .flags = SHMZ_MSG_LAST, .fd = -1 };

                cr_assert_eq(shmz_port_send(p, &r1, -1), 0);
                cr_assert_eq(shmz_port_send(p, &r2, -1), 0);
        }
        shmz_msg_release(p, m);
}

static void on_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct rpc_seen *s = userdata;

        if (error < 0) {
                s->last_error = error;
                s->ended++;
                return;
        }
        s->replies++;
        s->stream = reply->stream;
        if (reply->flags & SHMZ_MSG_LAST)
                s->ended++;
        shmz_msg_release(p, reply);
}

Test(port, rpc) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct rpc_seen seen = {};
        uint32_t stream;
        int mode = 0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        shmz_port_set_handler(b, server, &mode);
        cr_assert_eq(shmz_port_next_deadline(a), UINT64_MAX);

        /* Replies, dropped on LAST. */
        cr_assert_eq(shmz_port_call(a, &req, 0, on_reply, &seen, &stream), 0);
        cr_assert_eq(shmz_port_dispatch(b, -1), 1);
        cr_assert_eq(shmz_port_dispatch(a, -1), 2);
        cr_assert_eq(seen.replies, 2);
        cr_assert_eq(seen.ended, 1);
        cr_assert_eq(seen.stream, stream);
        cr_assert_eq(shmz_port_dispatch(a, 0), -EAGAIN);

        /* Calls from the other side use streams of their own: b calls a, a's handler answers. */
        shmz_port_set_handler(a, server, &mode);
        memset(&seen, 0, sizeof(seen));
        cr_assert_eq(shmz_port_call(b, &req, 0, on_reply, &seen, &stream), 0);
        cr_assert(stream & 0x80000000u);
        cr_assert_eq(shmz_port_dispatch(a, -1), 1);
        cr_assert_eq(shmz_port_dispatch(b, -1), 2);
        cr_assert_eq(seen.ended, 1);

        /* A deadline: the handler gets -ETIMEDOUT, and a late reply is dropped. */
        mode = 1;
        memset(&seen, 0, sizeof(seen));
        {
                struct timespec ts;
                uint64_t now, t0;

                clock_gettime(CLOCK_MONOTONIC, &ts);
                now = (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
                cr_assert_eq(shmz_port_call(a, &req, now + 50000000, on_reply, &seen, &stream), 0);
                cr_assert_eq(shmz_port_next_deadline(a), now + 50000000);
                cr_assert_eq(shmz_port_dispatch(b, -1), 1);
                t0 = now_nsec(CLOCK_MONOTONIC);
                cr_assert_eq(shmz_port_dispatch(a, -1), 1); /* the deadline wakes a dispatch that would wait forever */
                cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 1000000000u);
                cr_assert_eq(seen.last_error, -ETIMEDOUT);
                cr_assert_eq(seen.ended, 1);
                cr_assert_eq(shmz_port_next_deadline(a), UINT64_MAX);
        }

        /* The peer goes: pending calls end with -EPIPE. */
        memset(&seen, 0, sizeof(seen));
        cr_assert_eq(shmz_port_call(a, &req, 0, on_reply, &seen, NULL), 0);
        shmz_port_close(b);
        cr_assert_eq(shmz_port_dispatch(a, -1), 1);
        cr_assert_eq(seen.last_error, -EPIPE);
        cr_assert_eq(shmz_port_dispatch(a, -1), -EPIPE);
        cr_assert_eq(shmz_port_call(a, &req, 0, on_reply, &seen, NULL), -EPIPE);
        shmz_port_close(a);
}

/* Many pending calls: those due end in one dispatch, the next deadline stays right, the rest end with the peer. */
Test(port, rpc_many_calls_and_their_deadlines) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct rpc_seen seen = {}, answered = {}, late = {};
        uint64_t t0, far;
        int mode = 0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        shmz_port_set_handler(b, server, &mode);
        t0 = now_nsec(CLOCK_MONOTONIC);
        far = t0 + UINT64_C(10000000000);

        /* A call that is answered takes its deadline with it, at the latest once that time came. */
        cr_assert_eq(shmz_port_call(a, &req, t0 + 40000000, on_reply, &answered, NULL), 0);
        cr_assert_eq(shmz_port_dispatch(b, -1), 1);
        cr_assert_eq(shmz_port_call(a, &req, far, on_reply, &late, NULL), 0);
        cr_assert_eq(shmz_port_dispatch(a, -1), 2);
        cr_assert_eq(answered.ended, 1);
        cr_assert_leq(shmz_port_next_deadline(a), far);
        cr_assert_geq(shmz_port_next_deadline(a), t0 + 40000000);
        while (now_nsec(CLOCK_MONOTONIC) < t0 + 50000000)
                usleep(5000);
        cr_assert_eq(shmz_port_dispatch(a, 0), -EAGAIN);
        cr_assert_eq(shmz_port_next_deadline(a), far);

        /* 100 calls due soon among others: one dispatch ends exactly those. */
        t0 = now_nsec(CLOCK_MONOTONIC);
        for (int i = 0; i < 100; i++)
                cr_assert_eq(shmz_port_call(a, &req, t0 + 20000000, on_reply, &seen, NULL), 0);
        for (int i = 0; i < 50; i++)
                cr_assert_eq(shmz_port_call(a, &req, 0, on_reply, &seen, NULL), 0);
        cr_assert_eq(shmz_port_next_deadline(a), t0 + 20000000);
        cr_assert_eq(shmz_port_dispatch(a, -1), 100);
        cr_assert_geq(now_nsec(CLOCK_MONOTONIC), t0 + 20000000);
        cr_assert_eq(seen.ended, 100);
        cr_assert_eq(seen.last_error, -ETIMEDOUT);
        cr_assert_eq(late.ended, 0);
        cr_assert_eq(shmz_port_next_deadline(a), far);

        /* The peer goes: the 51 left end, in batches, with -EPIPE. */
        shmz_port_close(b);
        cr_assert_eq(shmz_port_dispatch(a, -1), 51);
        cr_assert_eq(seen.ended, 150);
        cr_assert_eq(seen.last_error, -EPIPE);
        cr_assert_eq(late.ended, 1);
        cr_assert_eq(late.last_error, -EPIPE);
        cr_assert_eq(shmz_port_next_deadline(a), UINT64_MAX);
        shmz_port_close(a);
}

struct late {
        struct shmz_port *p;
        struct shmz_msg m;
        bool close;
};

/* After 30 ms, the receiver takes and releases what waits, or closes its side. */
static void *late_release(void *arg) {
        struct late *l = arg;

        usleep(30000);
        if (l->close)
                shmz_port_close(l->p);
        else {
                cr_assert_eq(shmz_port_recv(l->p, &l->m, -1), 0);
                shmz_msg_release(l->p, &l->m);
        }
        return NULL;
}

/* A zero-copy sender may wait for memory: the receiver's release wakes it, and so does the peer's end. */
Test(port, buf_wait_for_memory) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 2, .fd = -1 };
        struct late l;
        pthread_t t;
        uint8_t *all, *buf;
        uint64_t t0;

        pair(64, 64 * CHUNK, &a, &b); /* one segment of 64 chunks, all the port may have */
        all = shmz_port_buf(a, 64 * CHUNK);
        cr_assert_not_null(all);
        errno = 0;
        cr_assert_null(shmz_port_buf_wait(a, CHUNK, 0));
        cr_assert_eq(errno, EAGAIN);
        t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_null(shmz_port_buf_wait(a, CHUNK, 20000000));
        cr_assert_eq(errno, ETIMEDOUT);
        cr_assert_geq(now_nsec(CLOCK_MONOTONIC) - t0, 20000000u);

        /* Sent, then released by the receiver 30 ms later: the waiter gets its chunk then. */
        m.data = all;
        m.size = 64 * CHUNK;
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        l = (struct late){ .p = b };
        cr_assert_eq(pthread_create(&t, NULL, late_release, &l), 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        buf = shmz_port_buf_wait(a, CHUNK, -1);
        cr_assert_not_null(buf);
        cr_assert_geq(now_nsec(CLOCK_MONOTONIC) - t0, 25000000u);
        pthread_join(t, NULL);
        shmz_port_buf_free(a, buf);

        /* All of it held again, and the peer goes: the waiter wakes with EPIPE. */
        all = shmz_port_buf(a, 64 * CHUNK);
        cr_assert_not_null(all);
        l = (struct late){ .p = b, .close = true };
        cr_assert_eq(pthread_create(&t, NULL, late_release, &l), 0);
        errno = 0;
        cr_assert_null(shmz_port_buf_wait(a, CHUNK, 5000000000));
        cr_assert_eq(errno, EPIPE);
        pthread_join(t, NULL);
        shmz_port_buf_free(a, all);
        shmz_port_close(a);
}

struct dispatcher {
        struct shmz_port *p;
        int r;
        uint64_t done_ns;
};

static void *dispatch_forever(void *arg) {
        struct dispatcher *d = arg;

        d->r = shmz_port_dispatch(d->p, -1);
        d->done_ns = now_nsec(CLOCK_MONOTONIC);
        return NULL;
}

/* A call made while another thread already sleeps in dispatch(-1): its deadline still fires on time. */
Test(port, rpc_deadline_wakes_a_sleeping_dispatcher) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct rpc_seen seen = {};
        struct dispatcher d;
        pthread_t t;
        uint64_t t0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        d = (struct dispatcher){ .p = a };
        cr_assert(pthread_create(&t, NULL, dispatch_forever, &d) == 0);
        usleep(50000); /* asleep in the ring, no deadline known */
        cr_assert_eq(d.done_ns, 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        /* b never answers. */
        cr_assert_eq(shmz_port_call(a, &req, t0 + 30000000, on_reply, &seen, NULL), 0);
        pthread_join(t, NULL);
        cr_assert_eq(d.r, 1);
        cr_assert_eq(seen.last_error, -ETIMEDOUT);
        cr_assert_eq(seen.ended, 1);
        cr_assert_lt(d.done_ns - t0, 500000000u, "fired %llu ms after the call",
                     (unsigned long long) ((d.done_ns - t0) / 1000000));
        cr_assert_geq(d.done_ns - t0, 30000000u);
        shmz_port_close(a);
        shmz_port_close(b);
}

/* Two threads asleep in dispatch(-1), one of them handles a message and leaves: a call's deadline still
 * wakes the other on time. */
Test(port, rpc_deadline_wakes_the_dispatcher_left_asleep) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct rpc_seen seen = {};
        struct dispatcher d[2];
        pthread_t t[2];
        int mode = 1, left;
        uint64_t t0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        shmz_port_set_handler(a, server, &mode); /* silent: it only takes the message */
        for (int i = 0; i < 2; i++) {
                d[i] = (struct dispatcher){ .p = a };
                cr_assert(pthread_create(&t[i], NULL, dispatch_forever, &d[i]) == 0);
        }
        usleep(50000); /* both asleep in the ring */
        cr_assert_eq(shmz_port_send(b, &req, 0), 0);
        for (int i = 0; i < 200 && !d[0].done_ns && !d[1].done_ns; i++)
                usleep(1000);
        cr_assert(d[0].done_ns || d[1].done_ns, "neither dispatcher took the message");
        left = d[0].done_ns ? 1 : 0;
        pthread_join(t[!left], NULL);
        cr_assert_eq(d[!left].r, 1);
        usleep(20000);
        cr_assert_eq(d[left].done_ns, 0);

        t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shmz_port_call(a, &req, t0 + 30000000, on_reply, &seen, NULL), 0); /* b never answers */
        pthread_join(t[left], NULL);
        cr_assert_eq(d[left].r, 1);
        cr_assert_eq(seen.last_error, -ETIMEDOUT);
        /* Not at the sleep's own 250 ms bound: woken for the deadline. */
        cr_assert_lt(d[left].done_ns - t0, 200000000u, "fired %llu ms after the call",
                     (unsigned long long) ((d[left].done_ns - t0) / 1000000));
        cr_assert_geq(d[left].done_ns - t0, 30000000u);
        shmz_port_close(a);
        shmz_port_close(b);
}

struct timed_dispatch {
        struct shmz_port *p;
        int64_t timeout_ns;
        atomic_int r;
        _Atomic uint64_t done_ns;
};

static void *dispatch_timed(void *arg) {
        struct timed_dispatch *d = arg;

        atomic_store(&d->r, shmz_port_dispatch(d->p, d->timeout_ns));
        atomic_store(&d->done_ns, now_nsec(CLOCK_MONOTONIC));
        return NULL;
}

/*
 * A call made while a dispatch spins in the ring: the dispatch goes back to
 * look at the new deadline, and still ends by that deadline and by its own
 * timeout, although nothing ever arrives. Spinning (set_spin) makes every
 * round of the wait take the spin's path, where a receiver in the middle of
 * a stream also looks.
 */
Test(port, dispatch_keeps_its_deadlines_while_calls_come) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct shmz_msg unstick = { .type = 3, .fd = -1 };

        pair(64, UINT64_C(1) << 24, &a, &b);
        cr_assert_eq(shmz_port_set_spin(a, UINT64_C(10000000000)), 0);
        for (int i = 0; i < 5; i++) {
                struct timed_dispatch d = { .p = a, .timeout_ns = 50000000 };
                struct rpc_seen seen = {};
                pthread_t t;
                uint64_t t0;

                t0 = now_nsec(CLOCK_MONOTONIC);
                cr_assert(pthread_create(&t, NULL, dispatch_timed, &d) == 0);
                usleep(5000); /* inside its wait */
                /* b never answers: its call times out 10 ms from now. */
                cr_assert_eq(shmz_port_call(a, &req, now_nsec(CLOCK_MONOTONIC) + 10000000, on_reply, &seen, NULL), 0);
                for (int k = 0; k < 2000 && atomic_load(&d.done_ns) == 0; k++)
                        usleep(1000);
                if (atomic_load(&d.done_ns) == 0)
                        cr_assert_eq(shmz_port_send(b, &unstick, 0), 0); /* lets the test end */
                pthread_join(t, NULL);
                cr_assert_lt(atomic_load(&d.done_ns) - t0, 1000000000u,
                             "dispatch(50 ms) returned after %llu ms (round %d)",
                             (unsigned long long) ((atomic_load(&d.done_ns) - t0) / 1000000), i);
                cr_assert_eq(atomic_load(&d.r), 1);
                cr_assert_eq(seen.last_error, -ETIMEDOUT);
                cr_assert_eq(seen.ended, 1);
                /* Nothing else came: a dispatch with nothing to do keeps its own timeout. */
                t0 = now_nsec(CLOCK_MONOTONIC);
                cr_assert_eq(shmz_port_dispatch(a, 20000000), -ETIMEDOUT);
                cr_assert_geq(now_nsec(CLOCK_MONOTONIC) - t0, 20000000u);
        }
        shmz_port_close(a);
        shmz_port_close(b);
}

/* ---- close while other threads are inside calls -------------------------------------- */

enum inside { IN_RECV, IN_DISPATCH, IN_BUF_WAIT, IN_SEND, IN_SEND_CHUNKED, IN_TOTAL };

struct insider {
        struct shmz_port *p;
        enum inside what;
        atomic_bool started;
        int r;
};

static void *call_inside(void *arg) {
        struct insider *in = arg;
        struct shmz_msg m = { .type = 5, .fd = -1 };
        uint8_t big[2 * CHUNK] = {};
        void *buf;

        atomic_store(&in->started, true);
        switch (in->what) {
        case IN_RECV:
                in->r = shmz_port_recv(in->p, &m, -1);
                break;
        case IN_DISPATCH:
                in->r = shmz_port_dispatch(in->p, -1);
                break;
        case IN_BUF_WAIT:
                buf = shmz_port_buf_wait(in->p, CHUNK, -1);
                in->r = buf ? 0 : -errno;
                break;
        case IN_SEND:
                in->r = shmz_port_send(in->p, &m, -1);
                break;
        case IN_SEND_CHUNKED:
                m.data = big;
                m.size = sizeof(big);
                in->r = shmz_port_send(in->p, &m, -1);
                break;
        default:
                cr_assert_fail();
        }
        return NULL;
}

/*
 * shmz_port_close() while threads sleep inside every kind of call on the
 * same port: each wakes with -EPIPE (a pending call's handler too) and the
 * memory goes with the last of them (AddressSanitizer sees any use after).
 */
Test(port, close_while_other_threads_are_inside_calls) {
        for (int round = 0; round < 3; round++) {
                struct insider in[2 * IN_TOTAL];
                pthread_t t[2 * IN_TOTAL];
                struct shmz_port *a, *b;
                struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
                struct rpc_seen seen = {};
                void *all;

                /* One segment of 64 chunks, the port's all: buf_wait and a chunked send wait for memory. */
                pair(64, 64 * CHUNK, &a, &b);
                all = shmz_port_buf(a, 64 * CHUNK);
                cr_assert_not_null(all);
                cr_assert_eq(shmz_port_call(a, &req, 0, on_reply, &seen, NULL), 0); /* never answered */
                /* The ring full of one-slot messages: a small send waits for room. b never reads, and
                 * sends nothing: a's receivers wait too. */
                for (uint32_t n = 0;; n++) {
                        struct shmz_msg m = { .type = n, .fd = -1 };
                        int r = shmz_port_send(a, &m, 0);

                        if (r == -EAGAIN)
                                break;
                        cr_assert_eq(r, 0);
                }
                for (int i = 0; i < 2 * IN_TOTAL; i++) {
                        in[i] = (struct insider){ .p = a, .what = (enum inside)(i % IN_TOTAL), .r = 1 };
                        cr_assert(pthread_create(&t[i], NULL, call_inside, &in[i]) == 0);
                }
                for (int i = 0; i < 2 * IN_TOTAL; i++)
                        while (!atomic_load(&in[i].started))
                                usleep(1000);
                usleep(50000 + round * 20000); /* all asleep inside */
                for (int i = 0; i < 2 * IN_TOTAL; i++)
                        cr_assert_eq(in[i].r, 1, "thread %d (%d) returned early: %d", i, in[i].what, in[i].r);
                /* The peer lives on: what wakes them is a's own close. */
                shmz_port_close(a);
                for (int i = 0; i < 2 * IN_TOTAL; i++) {
                        pthread_join(t[i], NULL);
                        /* A dispatch may end the pending call itself before the close does: it counts it. */
                        if (in[i].what == IN_DISPATCH && in[i].r == 1)
                                continue;
                        cr_assert_eq(in[i].r, -EPIPE, "thread %d (%d): %d", i, in[i].what, in[i].r);
                }
                shmz_port_close(b);
                cr_assert_eq(seen.ended, 1);
                cr_assert_eq(seen.last_error, -EPIPE);
        }
}

static void close_in_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        int *n = userdata;

        shmz_msg_release(p, m);
        (*n)++;
        shmz_port_close(p); /* the dispatch that called us is still inside */
}

/* A handler closes its own port: the dispatch returns with what it handled, and nothing is used after. */
Test(port, close_in_a_handler) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 1, .data = "x", .size = 2, .fd = -1 };
        int n = 0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        shmz_port_set_handler(a, close_in_handler, &n);
        for (int i = 0; i < 3; i++)
                cr_assert_eq(shmz_port_send(b, &m, 0), 0);
        cr_assert_eq(shmz_port_dispatch(a, -1), 1);
        cr_assert_eq(n, 1);
        cr_assert_eq(shmz_port_recv(b, &m, 1000000000), -EPIPE); /* the peer sees the close */
        shmz_port_close(b);
}

/*
 * recv and dispatch at once on the port that made calls: every reply goes
 * to its call's handler, whichever of them takes it; recv gets the rest.
 */
struct routed {
        atomic_int replies, ended, plain_in_recv, replies_in_recv;
};

static void on_routed_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct routed *r = userdata;

        if (error == 0) {
                atomic_fetch_add(&r->replies, 1);
                if (reply->flags & SHMZ_MSG_LAST)
                        atomic_fetch_add(&r->ended, 1);
                shmz_msg_release(p, reply);
        } else
                atomic_fetch_add(&r->ended, 1);
}

struct plain_receiver {
        struct shmz_port *p;
        struct routed *r;
        atomic_bool stop;
};

static void *recv_plain(void *arg) {
        struct plain_receiver *pr = arg;

        while (!atomic_load(&pr->stop)) {
                struct shmz_msg m;

                if (shmz_port_recv(pr->p, &m, 5000000) < 0)
                        continue;
                if (m.stream != 0)
                        atomic_fetch_add(&pr->r->replies_in_recv, 1);
                else
                        atomic_fetch_add(&pr->r->plain_in_recv, 1);
                shmz_msg_release(pr->p, &m);
        }
        return NULL;
}

static void *dispatch_until_stopped(void *arg) {
        struct plain_receiver *pr = arg;

        while (!atomic_load(&pr->stop))
                (void) shmz_port_dispatch(pr->p, 5000000);
        return NULL;
}

Test(port, replies_go_to_their_calls_when_recv_and_dispatch_run_together) {
        struct shmz_port *a, *b;
        struct shmz_msg req = { .type = 1, .data = "q", .size = 2, .fd = -1 };
        struct shmz_msg plain = { .type = 2, .data = "p", .size = 2, .fd = -1 };
        struct routed r = {};
        struct plain_receiver pr = { .r = &r };
        pthread_t t[2];
        int mode = 0, calls = 400, served = 0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        shmz_port_set_handler(b, server, &mode); /* two replies per call, the second LAST */
        pr.p = a;
        cr_assert(pthread_create(&t[0], NULL, recv_plain, &pr) == 0);
        cr_assert(pthread_create(&t[1], NULL, dispatch_until_stopped, &pr) == 0);
        for (int i = 0; i < calls; i++) {
                int k;

                cr_assert_eq(shmz_port_call(a, &req, 0, on_routed_reply, &r, NULL), 0);
                cr_assert_eq(shmz_port_send(b, &plain, -1), 0);
                k = shmz_port_dispatch(b, -1);
                cr_assert_gt(k, 0);
                served += k;
        }
        while (served < calls)
                served += shmz_port_dispatch(b, -1);
        for (int k = 0; k < 5000 && atomic_load(&r.ended) < calls; k++)
                usleep(1000);
        atomic_store(&pr.stop, true);
        pthread_join(t[0], NULL);
        pthread_join(t[1], NULL);
        cr_assert_eq(atomic_load(&r.replies_in_recv), 0, "%d replies went to recv", atomic_load(&r.replies_in_recv));
        cr_assert_eq(atomic_load(&r.replies), 2 * calls);
        cr_assert_eq(atomic_load(&r.ended), calls);
        shmz_port_close(a);
        shmz_port_close(b);
}

Test(port, bad_params) {
        struct port_params pp = params(0, 64, 1 << 24);
        struct shmz_port *p;
        int sv[2];

        pp.chunk_size = 5000;
        cr_assert(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
        cr_assert_eq(port_new(sv[0], channel_new(), &pp, NULL, source_cb, &src_a, &p), -EINVAL);
        /* The other end learns at once. */
        cr_assert_eq(recv(sv[1], &(char){ 0 }, 1, MSG_DONTWAIT), 0);
        close(sv[1]);
        /* A channel of the wrong size. */
        pp = params(0, 64, 1 << 24);
        cr_assert(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
        cr_assert_eq(port_new(sv[0], memfd_sealed(8192, true), &pp, NULL, source_cb, &src_a, &p), -EPROTO);
        close(sv[1]);
}

struct blocked {
        struct shmz_port *p;
        struct shmz_msg m;
        int r;
};

static void *recv_forever(void *arg) {
        struct blocked *b = arg;

        b->r = shmz_port_recv(b->p, &b->m, -1);
        return NULL;
}

Test(port, receivers_with_and_without_timeouts) {
        struct shmz_port *a, *b;
        struct shmz_msg m = { .type = 9, .data = "z", .size = 2, .fd = -1 }, r;
        struct blocked bl = { .r = 1 };
        pthread_t t;
        uint64_t t0;

        pair(64, UINT64_C(1) << 24, &a, &b);
        bl.p = b;
        cr_assert(pthread_create(&t, NULL, recv_forever, &bl) == 0);
        usleep(50000);
        /* Another receiver's timeout holds while one sleeps without any. */
        cr_assert_eq(shmz_port_recv(b, &r, 0), -EAGAIN);
        t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shmz_port_recv(b, &r, 20000000), -ETIMEDOUT);
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 500000000u);
        cr_assert_eq(shmz_port_send(a, &m, 0), 0);
        pthread_join(t, NULL);
        cr_assert_eq(bl.r, 0);
        cr_assert_eq(bl.m.type, 9);
        shmz_msg_release(b, &bl.m);
        shmz_port_close(a);
        shmz_port_close(b);
}
