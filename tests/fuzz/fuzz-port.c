/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The receiving side of a port against a hostile peer: the input is a script
 * of what the peer does with its end of the socketpair and the channel they
 * share, interleaved with what the honest side does. The honest side is a
 * real port (port_new(), the library's own checks); the peer writes bytes.
 *
 * Input: a script of ops, each a byte (op % 9) and its arguments:
 *   0 frame:  u8 length (% 49), that many bytes as one datagram, then fds
 *   1 segment frame: u32 id, u32 slot (% 8 unless bit 31), u8 flags, fds
 *   2 fd frame: fds
 *   3 descriptor: u16 kind, u16 n_slots, u32 flags, u32 type, u64 size,
 *     u32 segment, u32 chunk, u8 payload length, the payload, u16 advance
 *     (0: n_slots); written at the peer's head, published, woken
 *   4 word: u16 offset (% channel header), u32 value: the peer scribbles on it
 *   5 bits: u8 segment (of those the peer made), u8 word, u64 value: its used[]
 *   6 receive (non-blocking); u8: bit 0 release at once, else keep (at most 64)
 *   7 dispatch (non-blocking), or a send from the honest side (u8 bit 0: large)
 *   8 the peer shuts its end down
 * fds: u8 count (% 4), then a u8 kind each: 0 a sealed memfd of the segment's
 * size, 1 one of the wrong size, 2 an unsealed one, 3 a pipe, 4 /dev/null,
 * 5 an eventfd, 6 a unix socket, 7 a TCP socket.
 *
 * Oracles: the sanitizers (every byte of a message received is read), only
 * the errors the API documents, and no fd left behind once the port is closed
 * and the reaper is done.
 */
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz-util.h"
#include "port.h"
#include "reaper.h"
#include "shmzone.h"
#include "util.h"
#include "wire.h"

#define CHUNK 4096u
#define N_CHUNKS 16u
#define SEG_SIZE (SHMZ_SEGMENT_HEADER_SIZE + N_CHUNKS * CHUNK)
#define MAX_PEER_SEGS 8
#define MAX_KEPT 64

struct peer {
        int sock;
        uint8_t *ch;
        uint32_t head;
        uint8_t *segs[MAX_PEER_SEGS]; /* the peer's own view of segments it sent */
        unsigned n_segs;
};

/* The honest side's segments, as the daemon would make them. */
static int source_cb(struct shmz_port *p, void *userdata, int *ret_fd, uint64_t *ret_id) {
        unsigned *made = userdata;

        if (*made >= 4)
                return -ENOSPC;
        *ret_fd = wire_memfd(SEG_SIZE, true);
        if (*ret_fd < 0)
                return *ret_fd;
        *ret_id = ++*made;
        return 0;
}

/* One fd of the kind the input picks (the peer keeps a mapping of the segments it makes), or -1. */
static int make_fd(struct peer *w, uint8_t kind) {
        int fd = -1, v[2];

        switch (kind % 8) {
        case 0:
                fd = wire_memfd(SEG_SIZE, true);
                if (fd >= 0 && w->n_segs < MAX_PEER_SEGS) {
                        void *m = mmap(NULL, SEG_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

                        if (m != MAP_FAILED)
                                w->segs[w->n_segs++] = m;
                }
                return fd;
        case 1:
                return wire_memfd(SEG_SIZE - CHUNK, true);
        case 2:
                return wire_memfd(SEG_SIZE, false);
        case 3:
                if (pipe2(v, O_CLOEXEC) < 0)
                        return -1;
                close(v[1]);
                return v[0];
        case 4:
                return open("/dev/null", O_RDONLY | O_CLOEXEC);
        case 5:
                return eventfd(0, EFD_CLOEXEC);
        case 6:
                return socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        default:
                return socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        }
}

/* Sends bytes as one datagram with the fds the input asks for; the peer's copies are closed. */
static void send_frame(struct peer *w, struct cursor *c, const void *buf, size_t n) {
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = n };
        unsigned n_fds = take_u8(c) % 4, k = 0;
        int fds[3];

        for (unsigned i = 0; i < n_fds; i++) {
                int fd = make_fd(w, take_u8(c));

                if (fd >= 0)
                        fds[k++] = fd;
        }
        (void) wire_send(w->sock, &iov, 1, fds, k, MSG_DONTWAIT);
        for (unsigned i = 0; i < k; i++)
                close(fds[i]);
}

/* What the honest side sends the peer: read and dropped (SEGMENT frames carry fds). */
static void peer_drain(struct peer *w) {
        for (int i = 0; i < 64; i++) {
                union {
                        struct cmsghdr cm;
                        char b[CMSG_SPACE(sizeof(int) * 4)];
                } ctl;
                char buf[256];
                struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof(ctl)
                };

                if (recvmsg(w->sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) <= 0)
                        return;
                for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
                        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
                                for (size_t j = 0; j < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); j++) {
                                        int fd;

                                        memcpy(&fd, CMSG_DATA(cm) + j * sizeof(int), sizeof(int));
                                        close(fd);
                                }
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint8_t sink;

/* Every byte of a message is read: one out of bounds is the sanitizers' (or the mapping's) to catch. */
static void touch(const struct shmz_msg *m) {
        const uint8_t *b = m->data;
        uint8_t x = 0;

        for (size_t i = 0; i < m->size; i++)
                x ^= b[i];
        sink = x;
}

static bool recv_error_ok(int r) {
        return r == -EAGAIN || r == -EPIPE || r == -EBADMSG || r == -ENOMEM || r == -EDQUOT || r == -EMFILE;
}

static void handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        touch(m);
        if (m->fd >= 0)
                close(m->fd);
        shmz_msg_release(p, m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static char large[3 * CHUNK];
        struct port_params pp = {
                .port_id = 7,
                .token = 42,
                .side = SHMZ_PORT_SIDE_ACCEPTOR,
                .peer_pid = 1234,
                .peer_uid = 1000,
                .peer_gid = 100,
                .chunk_size = CHUNK,
                .segment_chunks = N_CHUNKS,
                .port_memory = 4 * (uint64_t) N_CHUNKS * CHUNK,
        };
        struct cursor c = { data, size };
        struct shmz_msg kept[MAX_KEPT];
        struct peer w = {};
        struct shmz_port *p;
        unsigned made = 0, n_kept = 0;
        int fds_before = count_fds(), sv[2], ch;

        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
                abort();
        ch = wire_channel_new();
        if (ch < 0)
                abort();
        w.ch = mmap(NULL, SHMZ_CHANNEL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, ch, 0);
        if (w.ch == MAP_FAILED)
                abort();
        w.sock = sv[0];
        if (port_new(sv[1], ch, &pp, NULL, source_cb, &made, &p) < 0)
                abort();
        shmz_port_set_handler(p, handler, NULL);

        for (unsigned steps = 0; c.n > 0 && steps < 256; steps++) {
                uint8_t op = take_u8(&c) % 9;

                switch (op) {
                case 0: {
                        uint8_t buf[48];
                        size_t n = take_bytes(&c, buf, take_u8(&c) % 49);

                        send_frame(&w, &c, buf, n);
                        break;
                }
                case 1: {
                        struct {
                                struct shmz_frame f;
                                struct shmz_frame_segment s;
                        } m = { .f = { .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(m.s) } };
                        uint32_t slot;

                        m.s.id = take_u32(&c);
                        slot = take_u32(&c);
                        m.s.slot = slot & 0x80000000u ? slot : slot % 8;
                        m.s.chunk_size = CHUNK;
                        m.s.n_chunks = N_CHUNKS;
                        if (take_u8(&c) & 1)
                                m.f.flags = SHMZ_FRAME_F_LAST;
                        send_frame(&w, &c, &m, sizeof(m));
                        break;
                }
                case 2: {
                        struct shmz_frame f = { .kind = SHMZ_FRAME_FD };

                        send_frame(&w, &c, &f, sizeof(f));
                        break;
                }
                case 3: {
                        uint8_t slot[SHMZ_RING_SLOT_SIZE * 4] = { 0 };
                        struct shmz_desc d;
                        uint8_t *ring = w.ch + SHMZ_CHANNEL_HEADER_SIZE; /* direction 0: the connector's */
                        uint32_t idx = w.head % SHMZ_RING_SLOTS;
                        size_t n, room = (SHMZ_RING_SLOTS - idx) * (size_t) SHMZ_RING_SLOT_SIZE;
                        uint16_t advance;

                        d.kind = take_u16(&c) % 4;
                        d.n_slots = take_u16(&c);
                        d.flags = take_u32(&c);
                        d.type = take_u32(&c);
                        d.stream = take_u32(&c);
                        d.size = take_u64(&c);
                        d.segment = take_u32(&c);
                        d.chunk = take_u32(&c);
                        memcpy(slot, &d, sizeof(d));
                        n = take_bytes(&c, slot + sizeof(d), take_u8(&c) % (sizeof(slot) - sizeof(d)));
                        n += sizeof(d);
                        memcpy(ring + (size_t) idx * SHMZ_RING_SLOT_SIZE, slot, MIN(n, room));
                        advance = take_u16(&c);
                        w.head += advance ? advance : d.n_slots;
                        __atomic_store_n(&((struct shmz_channel *) w.ch)->dir[0].head, w.head, __ATOMIC_RELEASE);
                        {
                                struct shmz_frame f = { .kind = SHMZ_FRAME_WAKE };

                                (void) send(w.sock, &f, sizeof(f), MSG_DONTWAIT | MSG_NOSIGNAL);
                        }
                        break;
                }
                case 4: {
                        uint16_t off = take_u16(&c) % (SHMZ_CHANNEL_HEADER_SIZE / 4);
                        uint32_t v = take_u32(&c);

                        __atomic_store_n((uint32_t *) (void *) (w.ch + off * 4), v, __ATOMIC_RELAXED);
                        break;
                }
                case 5: {
                        uint8_t k = take_u8(&c), word = take_u8(&c);
                        uint64_t v = take_u64(&c);

                        if (w.n_segs > 0)
                                __atomic_store_n(&((struct shmz_segment_header *) (void *) w.segs[k % w.n_segs])
                                                          ->used[word % (N_CHUNKS / 64 + 1)],
                                                 v, __ATOMIC_RELEASE);
                        break;
                }
                case 6: {
                        struct shmz_msg m;
                        uint8_t how = take_u8(&c);
                        int r = shmz_port_recv(p, &m, 0);

                        if (r < 0) {
                                fuzz_assert(recv_error_ok(r), "shmz_port_recv: %d", r);
                                break;
                        }
                        touch(&m);
                        if (m.fd >= 0)
                                close(m.fd);
                        m.fd = -1;
                        if ((how & 1) || n_kept == MAX_KEPT)
                                shmz_msg_release(p, &m);
                        else
                                kept[n_kept++] = m;
                        break;
                }
                case 7: {
                        uint8_t how = take_u8(&c);
                        int r;

                        if (how & 2) {
                                r = shmz_port_dispatch(p, 0);
                                fuzz_assert(r >= 0 || recv_error_ok(r) || r == -ETIMEDOUT, "dispatch: %d", r);
                        } else {
                                struct shmz_msg m = {
                                        .type = 1, .data = large, .size = how & 1 ? sizeof(large) : 16, .fd = -1
                                };

                                r = shmz_port_send(p, &m, 0);
                                fuzz_assert(r == 0 || r == -EAGAIN || r == -EPIPE || r == -EBADMSG || r == -ENOSPC ||
                                                    r == -ENOMEM,
                                            "send: %d", r);
                        }
                        break;
                }
                default:
                        (void) shutdown(w.sock, SHUT_RDWR);
                        break;
                }
                peer_drain(&w);
        }

        for (unsigned i = 0; i < n_kept; i++)
                shmz_msg_release(p, &kept[i]);
        shmz_port_close(p);
        peer_drain(&w);
        for (unsigned i = 0; i < w.n_segs; i++)
                (void) munmap(w.segs[i], SEG_SIZE);
        (void) munmap(w.ch, SHMZ_CHANNEL_SIZE);
        close(w.sock);
        /* What went to the reaper closes soon (nothing here blocks in close()). */
        for (int i = 0; i < 2000 && reaper_held_total() > 0; i++)
                usleep(1000);
        fuzz_assert(count_fds() == fds_before, "%d fds before, %d after", fds_before, count_fds());
        return 0;
}
