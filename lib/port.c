/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Ports: messages between two processes over a SOCK_SEQPACKET pair the daemon
 * brokered, with payloads in shared-memory segments (see shmzone-abi.h for
 * the frames and layouts). Every frame from the peer is hostile until checked.
 */
#include <assert.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <linux/sockios.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <time.h>

#include "client.h"
#include "futex.h"
#include "port.h"
#include "proto.h"
#include "reaper.h"
#include "shmzone.h"
#include "util.h"

#define MAX_SLOTS 4096u /* bounds the slot tables whatever port_memory says */
#define RUN_MAX 64u     /* chunks per message: one word of used[], one CAS */
#define FRAME_FDS_MAX 4 /* control room: more fds than this is a violation anyway */
#define HANDLE_CHUNK (UINT64_C(1) << 63)
#define DISPATCH_BATCH 64  /* messages one dispatch call handles at most */
#define SOCK_DRAIN_MAX 256 /* frames a receive that found the ring empty reads from the socket at most */

struct seg {
        uint8_t *map; /* header page, then the chunks */
        size_t map_size;
        int fd; /* tx, until its SEGMENT frame is sent; then, and always for rx, -EBADF */
        uint64_t id;
        _Atomic uint64_t *held;    /* rx: chunks received here and not released yet (private) */
        _Atomic uint64_t *touched; /* tx: chunks populated already (private) */
        uint8_t *buf_n;            /* tx: run length of each shmz_port_buf() buffer, by its first chunk */
};

struct call {
        uint32_t stream;
        uint64_t deadline_ns; /* 0: none */
        shmz_reply_handler_t handler;
        void *userdata;
};

/* What a call's handler is to be given: a reply (error 0; its call is looked up then), or its end. */
struct handoff {
        struct shmz_msg m;
        int error;
        shmz_reply_handler_t handler;
        void *userdata;
};

struct shmz_port {
        int fd;
        struct shmz_channel *ch;
        struct shmz_channel_dir *txd, *rxd; /* our direction's words, the peer's */
        uint8_t *tx_ring, *rx_ring;
        struct shmz_client *client; /* SEGMENT_CREATE goes there (a reference) */
        int ch_fd;                  /* with client: the channel, kept to prove the port after a daemon restart */
        struct client_link link;    /* in client's links; its lock guards pp.port_id and pp.token */
        port_segment_source_t source;
        void *source_userdata;
        struct port_params pp;
        size_t seg_map_size;
        uint32_t n_words; /* used[] words that hold chunks */
        uint32_t max_slots;
        size_t max_msg;

        /* Slots are filled once and never moved while the port lives: readers take no lock. */
        _Atomic(struct seg *) *tx;
        _Atomic(struct seg *) *rx;
        atomic_uint n_tx;
        struct seg *tx_unannounced; /* made, its SEGMENT frame not sent yet (create_lock) */
        pthread_mutex_t create_lock;

        /* Producers, one at a time; held only over work that never sleeps. */
        pthread_mutex_t tx_lock;
        uint32_t tx_head;                      /* ours: the shared head is written, never read back */
        uint32_t tx_tail;                      /* the receiver's tail as we last read it */
        uint32_t tx_fd_pos[SHMZ_PORT_FDS_MAX]; /* where our messages with fds are, oldest first: a FIFO */
        uint32_t tx_fd_first, tx_fd_n;

        /* One consumer at a time: the ring's tail, the socket's frames read ahead. */
        pthread_mutex_t recv_lock;
        uint32_t rx_tail;         /* ours, as for tx_head */
        uint32_t rx_tail_pub;     /* what we last published of it */
        uint32_t rx_head;         /* the last head we checked */
        _Atomic uint32_t rx_seen; /* rx_tail, for a receiver about to sleep without the lock */
        int *rx_fds;              /* fds of FD frames whose descriptors we have not reached: a FIFO */
        uint32_t rx_fds_first, rx_fds_n;
        atomic_bool gone;         /* closed here, a violation, or the peer gone and its ring read: -EPIPE */
        atomic_bool peer_eof;     /* the socket ended: the ring is read to its end, then -EPIPE */
        _Atomic uint64_t spin_ns; /* shmz_port_set_spin() */
        atomic_uint rx_streak;    /* receives in a row that found a message without waiting */
        atomic_uint rx_streak_tx; /* messages sent at the last receive: one found after a send of ours is a reply */

        /* Our threads between announcing a futex sleep and being done with it (sleep_lock): the last one
         * out takes the announcement back, so that a sender need not wake a receiver that did not sleep. */
        pthread_mutex_t sleep_lock;
        unsigned futex_sleepers;

        /* For callers that poll: an epoll fd over the socket and an eventfd of ours (made on demand). */
        pthread_mutex_t poll_lock;
        _Atomic int poll_fd;
        int self_fd;
        atomic_bool self_pending; /* self_fd is readable: a non-blocking receive left messages behind */

        atomic_uint next_stream;
        /* Dispatchers asleep in the ring: the latest time one of them wakes by itself (UINT64_MAX: for
         * good, or not known since one left; 0: none asleep), how many (rpc_lock), and a count of calls
         * made with deadlines: a call due sooner wakes them (see shmz_port_call()). */
        _Atomic uint64_t dispatch_until;
        unsigned dispatch_asleep;
        atomic_uint calls_gen;
        pthread_mutex_t rpc_lock;
        struct call *calls;
        size_t n_calls, cap_calls;
        /* No pending call's deadline is earlier (a lower bound: exact after each scan). UINT64_MAX: none.
         * Lets a dispatch that finds nothing due skip the scan of every pending call. */
        uint64_t min_deadline;
        shmz_msg_handler_t handler;
        void *handler_userdata;
        /* Calls' handlers run one at a time, in the order of what they are given (rpc_lock): a reply is
         * queued here by the receive that took it, before the next receive can take another, and one
         * thread at a time (handing) empties the queue. */
        struct handoff *hq;
        size_t hq_first, hq_n, hq_cap;
        bool handing;

        /* Calls under way in this port, USERS_ONE each, and one for the caller's handle until
         * shmz_port_close(); USERS_CLOSING once that was called. The last one out frees the port. */
        atomic_uint users;
};

#define USERS_CLOSING 1u
#define USERS_ONE 2u

/* ---- time ------------------------------------------------------------------------------ */

static uint64_t deadline_of(int64_t timeout_ns) {
        uint64_t now;

        if (timeout_ns < 0)
                return UINT64_MAX;
        now = now_nsec(CLOCK_MONOTONIC);
        return (uint64_t) timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + (uint64_t) timeout_ns;
}

static int expired(int64_t timeout_ns) {
        return timeout_ns == 0 ? -EAGAIN : -ETIMEDOUT;
}

/*
 * One rule for every wait of the library: the call takes its absolute
 * deadline (CLOCK_MONOTONIC) once, when it starts, and each round of a loop
 * that is about to wait again first compares the clock with it. What ended
 * the last wait (a wake-up, a message another thread took, a new call's
 * deadline) never lets a round skip that comparison, so a wait that keeps
 * being woken for nothing still ends on time. wait_fd() and futex_sleep()
 * compare at their start; the loops around them go through one of those, or
 * compare themselves (recv_timed(), tx_spin(), recv_sleep()'s spin).
 */
static bool deadline_passed(uint64_t deadline) {
        return deadline != UINT64_MAX && now_nsec(CLOCK_MONOTONIC) >= deadline;
}

/* ---- calls under way, and the close ------------------------------------------------------ */

static void port_free(struct shmz_port *p);

static void port_leave(struct shmz_port *p) {
        if (atomic_fetch_sub(&p->users, USERS_ONE) == USERS_ONE + USERS_CLOSING)
                port_free(p);
}

/*
 * Every public call on a port runs between port_enter() and port_leave(), so
 * that shmz_port_close() in another thread (or in a handler) frees nothing
 * a call still uses: -EPIPE once the port is closing.
 */
static int port_enter(struct shmz_port *p) {
        if (atomic_fetch_add(&p->users, USERS_ONE) & USERS_CLOSING) {
                port_leave(p);
                return -EPIPE;
        }
        return 0;
}

/* Waits for events on fd until deadline: 0 when something is there, -ETIMEDOUT. */
static int wait_fd(int fd, short events, uint64_t deadline) {
        for (;;) {
                struct pollfd pfd = { .fd = fd, .events = events };
                int ms = -1, n;

                if (deadline != UINT64_MAX) {
                        uint64_t now = now_nsec(CLOCK_MONOTONIC);

                        if (now >= deadline)
                                return -ETIMEDOUT;
                        ms = (int) MIN((deadline - now + 999999) / 1000000, (uint64_t) INT_MAX);
                }
                n = poll(&pfd, 1, ms);
                if (n < 0 && errno != EINTR)
                        return -errno;
                if (n > 0)
                        return 0;
        }
}

/* ---- the channel's wake-up words (shared with a process we do not trust: figures and wake-ups only) ---- */

/* Every sender of direction d asleep for ring slots or chunks wakes (the port ends). */
static void channel_wake_senders(struct shmz_channel *ch, unsigned d) {
        __atomic_fetch_add(&ch->dir[d].release_seq, 1, __ATOMIC_SEQ_CST);
        futex_wake(&ch->dir[d].release_seq, INT_MAX);
}

/* The receiver of direction d wakes if it sleeps on the futex. */
static void channel_wake_receiver(struct shmz_channel *ch, unsigned d) {
        __atomic_fetch_add(&ch->dir[d].wake_seq, 1, __ATOMIC_SEQ_CST);
        futex_wake(&ch->dir[d].wake_seq, INT_MAX);
}

/*
 * After ring slots or chunks of direction d went back (the tail or the bits
 * stored before this): wake its senders if one sleeps. A sender raises
 * sender_waits, then looks at the tail and the bits once more before it
 * sleeps; we store, then look at sender_waits. With a full fence on both
 * sides one of us sees the other's store, so no release is missed, and a
 * receiver pays no atomic read-modify-write while nobody waits.
 */
static void channel_released(struct shmz_channel *ch, unsigned d) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&ch->dir[d].sender_waits, __ATOMIC_RELAXED) != 0)
                channel_wake_senders(ch, d);
}

#define SEND_WAIT_MAX_NS UINT64_C(250000000)

static bool port_closed(struct shmz_port *p) {
        struct pollfd pfd = { .fd = p->fd, .events = 0 };

        if (atomic_load(&p->gone) || __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE))
                return true;
        /* The peer shut its end down (or died and the daemon did): POLLHUP. */
        return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLERR | POLLNVAL));
}

/* This side saw the port end (EOF, a violation, a close): our senders and receivers asleep wake and see it. */
static void port_set_gone(struct shmz_port *p) {
        atomic_store(&p->gone, true);
        if (p->ch) {
                channel_wake_senders(p->ch, p->pp.side);
                channel_wake_receiver(p->ch, !p->pp.side);
        }
}

/*
 * Sleeps on a channel futex while it holds seen, until deadline: 0 when
 * woken (or the word moved), -ETIMEDOUT. The daemon wakes every sleeper when
 * the peer dies, but a restarted daemon no longer watches this port: then
 * only the socket's POLLHUP tells, so a sleep lasts at most SEND_WAIT_MAX_NS
 * and the caller looks at port_closed() again.
 */
static int futex_sleep(uint32_t *word, uint32_t seen, uint64_t deadline) {
        uint64_t left = SEND_WAIT_MAX_NS;
        struct timespec ts;

        if (deadline != UINT64_MAX) {
                uint64_t now = now_nsec(CLOCK_MONOTONIC);

                if (now >= deadline)
                        return -ETIMEDOUT;
                left = MIN(left, deadline - now);
        }
        ts = (struct timespec){ .tv_sec = (time_t) (left / 1000000000), .tv_nsec = (long) (left % 1000000000) };
        (void) futex_wait(word, seen, &ts);
        return 0;
}

/* ---- params and segments ------------------------------------------------------------------------ */

static bool is_pow2(uint64_t x) {
        return x && !(x & (x - 1));
}

int port_params_check(const struct port_params *pp) {
        if (!pp || pp->side > SHMZ_PORT_SIDE_ACCEPTOR)
                return -EINVAL;
        if (!is_pow2(pp->chunk_size) || pp->chunk_size < 4096 || pp->chunk_size > (UINT32_C(1) << 30))
                return -EINVAL;
        if (pp->segment_chunks == 0 || pp->segment_chunks > SHMZ_SEGMENT_MAX_CHUNKS)
                return -EINVAL;
        /* 16384 chunks of at most 1 GiB: fits 64 bits, but not every address space. */
        if ((uint64_t) pp->segment_chunks * pp->chunk_size > (uint64_t) SIZE_MAX / 2)
                return -EINVAL;
        return 0;
}

uint32_t port_max_slots(const struct shmz_port *p) {
        return p->max_slots;
}

static struct shmz_segment_header *seg_hdr(const struct seg *s) {
        return (struct shmz_segment_header *) s->map;
}

static uint8_t *seg_chunk(const struct shmz_port *p, const struct seg *s, uint32_t c) {
        return s->map + SHMZ_SEGMENT_HEADER_SIZE + (size_t) c * p->pp.chunk_size;
}

static void seg_free(struct seg *s) {
        if (!s)
                return;
        if (s->map)
                (void) munmap(s->map, s->map_size);
        safe_close(s->fd);
        free(s->held);
        free(s->touched);
        free(s->buf_n);
        free(s);
}

/*
 * Closing an fd a peer sent: close() runs the file's flush, and a FUSE server
 * the peer mounted (any user can) may never answer it; a socket with SO_LINGER
 * waits too, a tty drains its output. Shared memory, pipes and anonymous
 * inodes are closed at once, and so are TCP and other inet sockets once their
 * linger is made zero (an abortive close: the peer chose to hand it over);
 * anything else goes to the reaper threads (common/reaper.c, the daemon's
 * too), tagged with the peer's uid, so that no receive, dispatch or close of
 * a port waits on the peer's file, and one peer's stuck closes hold up no
 * one else's. Without them (all REAPER_MAX held, no thread, no memory), the
 * caller closes it.
 */
/* Nothing in its close() waits. None of these calls asks a filesystem (readlink of /proc names, no more). */
static bool close_never_waits(int fd) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        char path[64], target[32];
        int domain = 0;
        socklen_t len = sizeof(domain);
        ssize_t n;

        if (fcntl(fd, F_GET_SEALS) >= 0 || fcntl(fd, F_GETPIPE_SZ) >= 0)
                return true;
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0)
                /* A unix socket may hold fds in flight, whose last close would be ours: not at once. */
                return (domain == AF_INET || domain == AF_INET6) &&
                       setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) == 0;
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n = readlink(path, target, sizeof(target) - 1);
        if (n <= 0)
                return false;
        target[n] = 0;
        /* eventfd, timerfd, signalfd, epoll, pidfd, ...: no flush, no drain. */
        return strncmp(target, "anon_inode:", 11) == 0;
}

static void close_untrusted(const struct shmz_port *p, int fd) {
        if (fd < 0)
                return;
        if (close_never_waits(fd) || !reaper_take(fd, p->pp.peer_uid))
                (void) close(fd);
}

/*
 * Fds read ahead for this process's ports, per peer uid, and in all: with
 * what the reaper holds for that uid, one uid may make this process hold
 * half of fds_bound(), all peers together fds_bound(). A port whose peer
 * would pass that ends (-EDQUOT), and its peer's new ports are refused while
 * the reaper holds REAPER_TAG_REFUSE of its fds.
 */
static struct {
        pthread_mutex_t lock;
        struct peer_fds {
                uid_t uid;
                unsigned n;
        } * v;
        size_t n, cap;
        unsigned total;
} peer_fds = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* A quarter of the fd limit, at least 4 ports' worth. */
static unsigned fds_bound(void) {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY)
                rl.rlim_cur = 1024;
        return (unsigned) MAX(MIN(rl.rlim_cur / 4, (rlim_t) 65536), (rlim_t) 4 * SHMZ_PORT_FDS_MAX);
}

static struct peer_fds *peer_fds_find_locked(uid_t uid) {
        for (size_t i = 0; i < peer_fds.n; i++)
                if (peer_fds.v[i].uid == uid)
                        return &peer_fds.v[i];
        return NULL;
}

static int peer_fds_charge(uid_t uid) {
        unsigned bound = fds_bound(), reaped = reaper_held(uid), reaped_all = reaper_held_total();
        struct peer_fds *e;
        int r = 0;

        pthread_mutex_lock(&peer_fds.lock);
        e = peer_fds_find_locked(uid);
        if (peer_fds.total + reaped_all >= bound || (e ? e->n : 0) + reaped >= bound / 2) {
                r = -EDQUOT;
                goto out;
        }
        if (!e) {
                if (peer_fds.n == peer_fds.cap) {
                        size_t cap = MAX(peer_fds.cap * 2, (size_t) 8);
                        struct peer_fds *v = realloc(peer_fds.v, cap * sizeof(*v));

                        if (!v) {
                                r = -ENOMEM;
                                goto out;
                        }
                        peer_fds.v = v;
                        peer_fds.cap = cap;
                }
                e = &peer_fds.v[peer_fds.n++];
                *e = (struct peer_fds){ .uid = uid };
        }
        e->n++;
        peer_fds.total++;
out:
        pthread_mutex_unlock(&peer_fds.lock);
        return r;
}

static void peer_fds_uncharge(uid_t uid) {
        struct peer_fds *e;

        pthread_mutex_lock(&peer_fds.lock);
        e = peer_fds_find_locked(uid);
        if (e) {
                peer_fds.total--;
                if (--e->n == 0)
                        *e = peer_fds.v[--peer_fds.n];
        }
        pthread_mutex_unlock(&peer_fds.lock);
}

/* A new port from uid is refused: its passed fds wait to be closed (their close may never return). */
static bool peer_refused(uid_t uid) {
        return uid != 0 && uid != geteuid() && reaper_held(uid) >= REAPER_TAG_REFUSE;
}

/* Maps a segment fd after checking it against the port, never against its header. Takes fd. */
/*
 * Memory another process hands us (a segment, the channel): a regular file of exactly size
 * bytes that can neither shrink nor grow, on plain shmem (a hugetlbfs memfd takes seals too,
 * and a hole its owner punches would make our reads fault). -EBADMSG if not.
 */
static int shmem_fd_check(int fd, uint64_t size) {
        struct statfs sfs;
        struct stat st;
        int seals;

        /* Seals first: F_GET_SEALS asks no filesystem, while fstat() of a file on a FUSE filesystem the
         * peer mounted waits for an answer that may never come. Past it, the file is shmem or hugetlbfs. */
        seals = fcntl(fd, F_GET_SEALS);
        if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
                return -EBADMSG;
        if (fstat(fd, &st) < 0 || fstatfs(fd, &sfs) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || (uint64_t) st.st_size != size || sfs.f_type != TMPFS_MAGIC)
                return -EBADMSG;
        return 0;
}

static int seg_map(struct shmz_port *p, int fd, uint64_t id, bool tx, struct seg **ret) {
        _cleanup_close_ int f = fd;
        struct seg *s;
        int r;

        r = shmem_fd_check(f, p->seg_map_size);
        if (r < 0) {
                close_untrusted(p, TAKE_FD(f)); /* maybe not shared memory: its close may wait on its filesystem */
                return r;
        }
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->fd = -EBADF;
        s->map_size = p->seg_map_size;
        s->id = id;
        if (tx) {
                s->buf_n = calloc(p->pp.segment_chunks, 1);
                s->touched = calloc(p->n_words, sizeof(*s->touched));
        } else
                s->held = calloc(p->n_words, sizeof(*s->held));
        if (tx ? !s->buf_n || !s->touched : !s->held) {
                seg_free(s);
                return -ENOMEM;
        }
        /* Read-write: the receiver clears bits of used[] when it releases chunks. */
        s->map = mmap(NULL, s->map_size, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
        if (s->map == MAP_FAILED) {
                r = errno == EACCES || errno == EPERM ? -EBADMSG : -errno;
                s->map = NULL;
                seg_free(s);
                return r;
        }
        /* The mapping is all a receiver needs: no fd per segment is kept. A sender keeps it until announced. */
        if (tx)
                s->fd = TAKE_FD(f);
        *ret = s;
        return 0;
}

static uint64_t run_mask(uint32_t n) {
        return n >= 64 ? UINT64_MAX : (UINT64_C(1) << n) - 1;
}

/* Bits of word w that name real chunks. */
static uint64_t word_valid(const struct shmz_port *p, uint32_t w) {
        uint32_t bits = p->pp.segment_chunks - w * 64;

        return bits >= 64 ? UINT64_MAX : (UINT64_C(1) << bits) - 1;
}

/* The lowest position where n free bits start in `free`, or -1. */
static int find_run(uint64_t free, uint32_t n) {
        uint64_t run = run_mask(n);

        for (unsigned pos = 0; pos + n <= 64;) {
                uint64_t rest = free >> pos << pos;

                if (!rest)
                        return -1;
                pos = (unsigned) __builtin_ctzll(rest); /* the next free bit */
                if (pos + n > 64)
                        return -1;
                if (((free >> pos) & run) == run)
                        return (int) pos;
                pos++;
        }
        return -1;
}

/* Claims n chunks of s in one word with one compare-and-swap (retried while the word changes). */
static int seg_claim(const struct shmz_port *p, struct seg *s, uint32_t n, uint32_t *ret_chunk) {
        struct shmz_segment_header *h = seg_hdr(s);

        for (uint32_t w = 0; w < p->n_words; w++) {
                uint64_t valid = word_valid(p, w);
                uint64_t v = __atomic_load_n(&h->used[w], __ATOMIC_RELAXED);

                for (;;) {
                        int pos = find_run(~v & valid, n);

                        if (pos < 0)
                                break;
                        if (__atomic_compare_exchange_n(&h->used[w], &v, v | (run_mask(n) << pos), false,
                                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                                *ret_chunk = w * 64 + (uint32_t) pos;
                                return 0;
                        }
                }
        }
        return -ENOSPC;
}

/*
 * A sender about to write chunks it never wrote before populates them in
 * one call: far cheaper than a page fault per 4 KiB in the middle of the
 * write. Only what is claimed, so a port of small messages stays small.
 * A receiver does not: a peer's segment costs us nothing until we read it.
 */
static void seg_populate(const struct shmz_port *p, struct seg *s, uint32_t c, uint32_t n) {
        uint64_t bits = run_mask(n) << (c % 64);

        /* The usual case, chunks written before: a plain load, no locked operation. */
        if ((atomic_load_explicit(&s->touched[c / 64], memory_order_relaxed) & bits) == bits)
                return;
        if ((atomic_fetch_or(&s->touched[c / 64], bits) & bits) != bits)
                (void) madvise(seg_chunk(p, s, c), (size_t) n * p->pp.chunk_size, MADV_POPULATE_WRITE);
}

static void seg_unclaim(const struct shmz_port *p, struct seg *s, uint32_t c, uint32_t n) {
        if (n == 0)
                return;
        __atomic_fetch_and(&seg_hdr(s)->used[c / 64], ~(run_mask(n) << (c % 64)), __ATOMIC_RELEASE);
        channel_released(p->ch, p->pp.side);
}

/* ---- frames ------------------------------------------------------------------------------------- */

/* Sends one frame (and at most one fd) before deadline. */
static int frame_send(struct shmz_port *p, const struct shmz_frame *f, const void *payload, size_t payload_size, int fd,
                      int64_t timeout_ns, uint64_t deadline) {
        struct iovec iov[2] = {
                { .iov_base = (void *) f, .iov_len = sizeof(*f) },
                { .iov_base = (void *) payload, .iov_len = payload_size },
        };

        for (;;) {
                ssize_t n;
                int r;

                if (atomic_load(&p->gone))
                        return -EPIPE;
                n = proto_sendmsg(p->fd, iov, payload_size > 0 ? 2 : 1, &fd, fd >= 0 ? 1 : 0, MSG_DONTWAIT);
                if (n >= 0)
                        return (size_t) n == sizeof(*f) + payload_size ? 0 : -EIO;
                if (n == -EINTR)
                        continue;
                if (n == -EPIPE || n == -ECONNRESET || n == -ENOTCONN)
                        return -EPIPE;
                if (n != -EAGAIN)
                        return (int) n;
                if (timeout_ns == 0)
                        return -EAGAIN;
                r = wait_fd(p->fd, POLLOUT, deadline);
                if (r < 0)
                        return r == -ETIMEDOUT ? expired(timeout_ns) : r;
        }
}

/*
 * Adds a segment to this side's table (create_lock held): asks the source,
 * checks and maps it, announces it to the peer, and only then publishes the
 * slot, so no other thread can send a DATA frame naming it before its SEGMENT.
 * Never waits for the socket (*ret_full: it was full, the segment is kept for
 * the next try): the caller waits without the lock.
 */
static int tx_grow_locked(struct shmz_port *p, bool *ret_full) {
        uint32_t slot = atomic_load(&p->n_tx);
        struct shmz_frame_segment fs;
        struct shmz_frame f;
        struct seg *s;
        int r;

        if (slot >= p->max_slots)
                return -ENOSPC;
        if (!p->tx_unannounced) {
                int fd = -EBADF;
                uint64_t id = 0;

                r = p->source(p, p->source_userdata, &fd, &id);
                if (r < 0)
                        return r;
                r = seg_map(p, fd, id, true, &p->tx_unannounced);
                if (r < 0)
                        return r == -EBADMSG ? -EPROTO : r; /* the daemon made no sense */
        }
        s = p->tx_unannounced;
        fs = (struct shmz_frame_segment){
                .id = s->id,
                .slot = slot,
                .chunk_size = p->pp.chunk_size,
                .n_chunks = p->pp.segment_chunks,
        };
        f = (struct shmz_frame){ .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs), .segment = slot };
        r = frame_send(p, &f, &fs, sizeof(fs), s->fd, 0, 0);
        if (r < 0) {
                *ret_full = r == -EAGAIN;
                return r; /* kept for the next try: the daemon counted it already */
        }
        p->tx_unannounced = NULL;
        s->fd = safe_close(s->fd); /* the peer has its copy, the daemon its own: the mapping is enough */
        atomic_store(&p->tx[slot], s);
        atomic_store(&p->n_tx, slot + 1);
        return 0;
}

/* One scan of this side's segments for n free chunks: true with them claimed. */
static bool tx_scan(struct shmz_port *p, uint32_t n, uint32_t *ret_slot, uint32_t *ret_chunk) {
        uint32_t n_tx = atomic_load(&p->n_tx);

        for (uint32_t i = 0; i < n_tx; i++)
                if (seg_claim(p, atomic_load(&p->tx[i]), n, ret_chunk) >= 0) {
                        seg_populate(p, atomic_load(&p->tx[i]), *ret_chunk, n);
                        *ret_slot = i;
                        return true;
                }
        return false;
}

#define TX_SPIN_NS UINT64_C(20000)
#define TX_LOOK_NS UINT64_C(2000)

/*
 * Before a sender says it sleeps for memory it looks again now and then, for
 * TX_SPIN_NS (or the port's spin, if longer): the receiver of a stream
 * releases within microseconds, and once a sender is announced every release
 * costs the receiver a wake-up call and the sender a wake-up. Looks are
 * spaced so as not to take the bitmaps' lines from the receiver at each.
 */
static bool tx_spin(struct shmz_port *p, uint32_t n, uint64_t deadline, uint32_t *ret_slot, uint32_t *ret_chunk) {
        uint64_t now = now_nsec(CLOCK_MONOTONIC),
                 spin = MAX(atomic_load_explicit(&p->spin_ns, memory_order_relaxed), TX_SPIN_NS);
        uint64_t until = spin > deadline - MIN(now, deadline) ? deadline : now + spin;

        while (now < until) {
                while (now_nsec(CLOCK_MONOTONIC) < now + TX_LOOK_NS)
                        cpu_relax();
                if (atomic_load(&p->gone) || __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE))
                        return false; /* the caller's loop says why */
                if (tx_scan(p, n, ret_slot, ret_chunk))
                        return true;
                now = now_nsec(CLOCK_MONOTONIC);
        }
        return false;
}

/*
 * Claims n chunks in this side's segments: scan, else a new segment, else
 * (timeout permitting) sleep on the channel until the receiver releases some.
 */
static int tx_claim(struct shmz_port *p, uint32_t n, int64_t timeout_ns, uint64_t deadline, uint32_t *ret_slot,
                    uint32_t *ret_chunk) {
        struct shmz_channel_dir *dir = &p->ch->dir[p->pp.side];
        bool waiting = false, spun = false;
        int r;

        for (;;) {
                uint32_t seq = __atomic_load_n(&dir->release_seq, __ATOMIC_SEQ_CST);
                uint32_t n_tx = atomic_load(&p->n_tx);

                if (tx_scan(p, n, ret_slot, ret_chunk)) {
                        r = 0;
                        goto done;
                }
                if (port_closed(p)) {
                        r = -EPIPE;
                        goto done;
                }
                if (n_tx < p->max_slots) {
                        bool full = false;

                        pthread_mutex_lock(&p->create_lock);
                        /* Another thread may have added one while we scanned: scan again first. */
                        r = atomic_load(&p->n_tx) == n_tx ? tx_grow_locked(p, &full) : 0;
                        pthread_mutex_unlock(&p->create_lock);
                        if (r >= 0)
                                continue;
                        if (full && timeout_ns != 0) {
                                /* The peer has not read its socket: wait for room without the lock, so that a
                                 * peer that never reads holds up no other thread past its own timeout. */
                                r = wait_fd(p->fd, POLLOUT, deadline);
                                if (r < 0) {
                                        r = r == -ETIMEDOUT ? expired(timeout_ns) : r;
                                        goto done;
                                }
                                continue;
                        }
                        if (r != -ENOSPC)
                                goto done;
                }
                if (timeout_ns == 0) {
                        r = -EAGAIN;
                        goto done;
                }
                if (!spun) {
                        spun = true;
                        if (tx_spin(p, n, deadline, ret_slot, ret_chunk)) {
                                r = 0;
                                goto done;
                        }
                        continue;
                }
                if (!waiting) {
                        /* Say we sleep, then look once more: a release after this sees the flag and wakes us. */
                        __atomic_fetch_add(&dir->sender_waits, 1, __ATOMIC_SEQ_CST);
                        __atomic_thread_fence(
                                __ATOMIC_SEQ_CST); /* our store before our next look (see ring_wake_peer()) */
                        waiting = true;
                        continue;
                }
                r = futex_sleep(&dir->release_seq, seq, deadline);
                if (r < 0)
                        goto done;
        }
done:
        if (waiting)
                __atomic_fetch_sub(&dir->sender_waits, 1, __ATOMIC_SEQ_CST);
        return r;
}

/* Which of this side's segments holds ptr, and the chunk it starts (UINT32_MAX: none). */
static struct seg *tx_find(struct shmz_port *p, const void *ptr, uint32_t *ret_slot, uint32_t *ret_chunk) {
        uint32_t n_tx = atomic_load(&p->n_tx);
        uintptr_t a = (uintptr_t) ptr;

        for (uint32_t i = 0; i < n_tx; i++) {
                struct seg *s = atomic_load(&p->tx[i]);
                uintptr_t base = (uintptr_t) seg_chunk(p, s, 0);

                if (a >= base && a < (uintptr_t) s->map + s->map_size) {
                        *ret_slot = i;
                        /* Not the start of a chunk: no buffer of ours starts there. */
                        *ret_chunk = (a - base) % p->pp.chunk_size != 0 ? UINT32_MAX
                                                                        : (uint32_t) ((a - base) / p->pp.chunk_size);
                        return s;
                }
        }
        return NULL;
}

static uint32_t chunks_for(const struct shmz_port *p, size_t size) {
        return (uint32_t) ((size + p->pp.chunk_size - 1) / p->pp.chunk_size);
}

static void *port_buf_wait(struct shmz_port *p, size_t size, int64_t timeout_ns) {
        uint32_t slot, chunk, n;
        struct seg *s;
        int r;

        if (!p || size == 0) {
                errno = EINVAL;
                return NULL;
        }
        if (size > p->max_msg) {
                errno = EMSGSIZE;
                return NULL;
        }
        if (atomic_load(&p->gone) || __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE)) {
                errno = EPIPE;
                return NULL;
        }
        n = chunks_for(p, size);
        /* The wait is the sender's for memory: the receiver's release wakes it, and so does the port's end. */
        r = tx_claim(p, n, timeout_ns, deadline_of(timeout_ns), &slot, &chunk);
        if (r < 0) {
                errno = -r;
                return NULL;
        }
        s = atomic_load(&p->tx[slot]);
        __atomic_store_n(&s->buf_n[chunk], (uint8_t) n, __ATOMIC_RELEASE);
        return seg_chunk(p, s, chunk);
}

_public_ void *shmz_port_buf_wait(struct shmz_port *p, size_t size, int64_t timeout_ns) {
        void *buf;
        int e;

        if (!p) {
                errno = EINVAL;
                return NULL;
        }
        if (port_enter(p) < 0) {
                errno = EPIPE;
                return NULL;
        }
        buf = port_buf_wait(p, size, timeout_ns);
        e = errno;
        port_leave(p);
        errno = e;
        return buf;
}

_public_ void *shmz_port_buf(struct shmz_port *p, size_t size) {
        return shmz_port_buf_wait(p, size, 0);
}

_public_ void shmz_port_buf_free(struct shmz_port *p, void *buf) {
        uint32_t slot, chunk;
        struct seg *s;
        uint8_t n;

        if (!p || !buf || port_enter(p) < 0)
                return;
        s = tx_find(p, buf, &slot, &chunk);
        /* Take the entry before the chunks go back: once unclaimed, another thread's
         * shmz_port_buf() may claim them and record its own entry here. */
        n = s && chunk != UINT32_MAX ? __atomic_exchange_n(&s->buf_n[chunk], 0, __ATOMIC_ACQ_REL) : 0;
        if (n > 0)
                seg_unclaim(p, s, chunk, n);
        port_leave(p);
}

/* Figures (tx_lock held: one writer, so no locked instruction on the hot path). */
static void count_sent(struct shmz_port *p, size_t size) {
        struct shmz_channel_dir *dir = p->txd;

        __atomic_store_n(&dir->messages, __atomic_load_n(&dir->messages, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&dir->bytes, __atomic_load_n(&dir->bytes, __ATOMIC_RELAXED) + size, __ATOMIC_RELAXED);
}

/* ---- the rings ---------------------------------------------------------------------------------- */

#define DESC_FIRST_INLINE (SHMZ_RING_SLOT_SIZE - sizeof(struct shmz_desc)) /* payload bytes in the first slot */
#define RING_MASK (SHMZ_RING_SLOTS - 1)

/* Slots a descriptor with this much inline payload takes. */
static uint32_t desc_slots(size_t inline_size) {
        if (inline_size <= DESC_FIRST_INLINE)
                return 1;
        return 1 + (uint32_t) ((inline_size - DESC_FIRST_INLINE + SHMZ_RING_SLOT_SIZE - 1) / SHMZ_RING_SLOT_SIZE);
}

static uint8_t *ring_at(uint8_t *ring, uint32_t index) {
        return ring + (size_t) (index & RING_MASK) * SHMZ_RING_SLOT_SIZE;
}

/* The receiver made no sense of its own tail: nothing more from or to it. */
static int tx_violation(struct shmz_port *p) {
        port_set_gone(p);
        (void) shutdown(p->fd, SHUT_RDWR);
        return -EBADMSG;
}

/*
 * Free slots in our ring (tx_lock held). The tail is the receiver's word: one
 * that claims more than we published is a violation.
 */
static int ring_free_locked(struct shmz_port *p, uint32_t need, uint32_t *ret) {
        uint32_t used = p->tx_head - p->tx_tail;

        /* The tail we saw last, while it leaves room: the receiver's line is not pulled over per message. */
        if (SHMZ_RING_SLOTS - used < need) {
                p->tx_tail = __atomic_load_n(&p->txd->tail, __ATOMIC_ACQUIRE);
                used = p->tx_head - p->tx_tail;
                if (used > SHMZ_RING_SLOTS)
                        return tx_violation(p);
        }
        *ret = SHMZ_RING_SLOTS - used;
        return 0;
}

/* Sleeps (without tx_lock) until the receiver frees ring slots, as tx_claim() does for chunks. */
static int ring_wait_room(struct shmz_port *p, uint32_t need, uint64_t deadline) {
        struct shmz_channel_dir *d = p->txd;
        uint32_t seq = __atomic_load_n(&d->release_seq, __ATOMIC_SEQ_CST);
        int r = 0;

        __atomic_fetch_add(&d->sender_waits, 1, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our store before our next look (see ring_wake_peer()) */
        /* Said we sleep; look once more: a release after the raise sees it and wakes us. */
        if (__atomic_load_n(&p->tx_head, __ATOMIC_RELAXED) - __atomic_load_n(&d->tail, __ATOMIC_SEQ_CST) >
            SHMZ_RING_SLOTS - need)
                r = futex_sleep(&d->release_seq, seq, deadline);
        __atomic_fetch_sub(&d->sender_waits, 1, __ATOMIC_SEQ_CST);
        /* Not woken: the sleep's bound passed, and a peer gone while no daemon watches shows only on the
         * socket. A woken sender looks at the channel's closed word in ring_put() (no system call). */
        if (r >= 0 && __atomic_load_n(&d->release_seq, __ATOMIC_RELAXED) == seq && port_closed(p))
                r = -EPIPE;
        return r;
}

/* Whether the receiver has taken the message at pos, by the tail it published. */
static bool tx_fd_taken(uint32_t pos, uint32_t tail) {
        return (int32_t) (tail - pos) > 0;
}

/*
 * Room for one more message with an fd (tx_lock held): fewer than
 * SHMZ_PORT_FDS_MAX of ours the receiver has not taken. If not, *ret_oldest
 * is where the oldest of them is, for tx_fd_wait().
 */
static bool tx_fd_room_locked(struct shmz_port *p, uint32_t *ret_oldest) {
        uint32_t tail;

        if (p->tx_fd_n < SHMZ_PORT_FDS_MAX)
                return true;
        tail = __atomic_load_n(&p->txd->tail, __ATOMIC_ACQUIRE);
        while (p->tx_fd_n > 0 && tx_fd_taken(p->tx_fd_pos[p->tx_fd_first], tail)) {
                p->tx_fd_first = (p->tx_fd_first + 1) % SHMZ_PORT_FDS_MAX;
                p->tx_fd_n--;
        }
        *ret_oldest = p->tx_fd_pos[p->tx_fd_first];
        return p->tx_fd_n < SHMZ_PORT_FDS_MAX;
}

/* Sleeps (without tx_lock) until the receiver's tail passes oldest, as ring_wait_room() does. */
static int tx_fd_wait(struct shmz_port *p, uint32_t oldest, uint64_t deadline) {
        struct shmz_channel_dir *d = p->txd;
        uint32_t seq = __atomic_load_n(&d->release_seq, __ATOMIC_SEQ_CST);
        int r = 0;

        __atomic_fetch_add(&d->sender_waits, 1, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (!tx_fd_taken(oldest, __atomic_load_n(&d->tail, __ATOMIC_SEQ_CST)))
                r = futex_sleep(&d->release_seq, seq, deadline);
        __atomic_fetch_sub(&d->sender_waits, 1, __ATOMIC_SEQ_CST);
        if (r >= 0 && __atomic_load_n(&d->release_seq, __ATOMIC_RELAXED) == seq && port_closed(p))
                r = -EPIPE;
        return r;
}

/*
 * After publishing: wake the receiver if it said it sleeps. It sets its bits
 * in rx_sleep, then looks at our head once more before it sleeps; we store
 * the head, then look at rx_sleep. With a full fence on both sides one of us
 * sees the other's store: either it finds the message, or we find its bits
 * and wake it. Whoever clears the bits wakes it; a receiver that is awake
 * costs us one plain load. The WAKE frame is sent without waiting: a full
 * socket is readable already.
 */
static void ring_wake_peer(struct shmz_port *p) {
        struct shmz_frame f = { .kind = SHMZ_FRAME_WAKE };
        uint32_t how;

        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->txd->rx_sleep, __ATOMIC_RELAXED) == 0)
                return;
        how = __atomic_exchange_n(&p->txd->rx_sleep, 0, __ATOMIC_SEQ_CST);
        if (how & SHMZ_RX_SLEEP_FUTEX)
                channel_wake_receiver(p->ch, p->pp.side);
        if (how & SHMZ_RX_SLEEP_FD)
                (void) send(p->fd, &f, sizeof(f), MSG_NOSIGNAL | MSG_DONTWAIT);
}

/*
 * Publishes one message: its descriptor (d, with inline_size payload bytes
 * from data after it) and, first, its fd as an FD frame. Producers take
 * tx_lock only over work that does not sleep, so a sender that must wait
 * (ring full, socket full) never holds up one that need not.
 */
static int ring_put(struct shmz_port *p, const struct shmz_desc *d, const void *data, size_t inline_size, int fd,
                    int64_t timeout_ns, uint64_t deadline) {
        uint32_t n = desc_slots(inline_size);

        for (;;) {
                uint32_t room, idx, pad, oldest;
                uint8_t *at;
                int r;

                pthread_mutex_lock(&p->tx_lock);
                if (atomic_load(&p->gone) || __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE)) {
                        pthread_mutex_unlock(&p->tx_lock);
                        return -EPIPE;
                }
                idx = p->tx_head & RING_MASK;
                /* A descriptor never wraps: the slots up to the end go as one PAD first. */
                pad = idx + n > SHMZ_RING_SLOTS ? SHMZ_RING_SLOTS - idx : 0;
                r = ring_free_locked(p, n + pad, &room);
                if (r >= 0 && room >= n + pad && fd >= 0 && !tx_fd_room_locked(p, &oldest)) {
                        pthread_mutex_unlock(&p->tx_lock);
                        if (timeout_ns == 0)
                                return -EAGAIN;
                        r = tx_fd_wait(p, oldest, deadline);
                        if (r < 0)
                                return r == -ETIMEDOUT ? expired(timeout_ns) : r;
                        continue;
                }
                if (r >= 0 && room >= n + pad && fd >= 0) {
                        struct shmz_frame f = { .kind = SHMZ_FRAME_FD };

                        /* Before the descriptor that takes it, on the ordered socket. */
                        r = frame_send(p, &f, NULL, 0, fd, 0, 0);
                        if (r == -EAGAIN) {
                                pthread_mutex_unlock(&p->tx_lock);
                                if (timeout_ns == 0)
                                        return -EAGAIN;
                                r = wait_fd(p->fd, POLLOUT, deadline);
                                if (r < 0)
                                        return r == -ETIMEDOUT ? expired(timeout_ns) : r;
                                continue;
                        }
                }
                if (r < 0) {
                        pthread_mutex_unlock(&p->tx_lock);
                        return r;
                }
                if (room < n + pad) {
                        pthread_mutex_unlock(&p->tx_lock);
                        if (timeout_ns == 0)
                                return -EAGAIN;
                        r = ring_wait_room(p, n + pad, deadline);
                        if (r < 0)
                                return r == -ETIMEDOUT ? expired(timeout_ns) : r;
                        continue;
                }
                if (pad > 0) {
                        struct shmz_desc pd = { .kind = SHMZ_DESC_PAD, .n_slots = (uint16_t) pad };

                        memcpy(ring_at(p->tx_ring, p->tx_head), &pd, sizeof(pd));
                        p->tx_head += pad;
                }
                if (fd >= 0)
                        p->tx_fd_pos[(p->tx_fd_first + p->tx_fd_n++) % SHMZ_PORT_FDS_MAX] = p->tx_head;
                at = ring_at(p->tx_ring, p->tx_head);
                memcpy(at, d, sizeof(*d));
                ((struct shmz_desc *) (void *) at)->n_slots = (uint16_t) n;
                if (inline_size > 0)
                        memcpy(at + sizeof(*d), data, inline_size);
                __atomic_store_n(&p->tx_head, p->tx_head + n, __ATOMIC_RELAXED);
                __atomic_store_n(&p->txd->head, p->tx_head, __ATOMIC_RELEASE);
                count_sent(p, (size_t) d->size);
                /* Own the next slots before the next message: the fence in ring_wake_peer() waits for our
                 * stores, and a store to a line the receiver last read would make it wait for the transfer. */
                for (uint32_t k = 0; k < 4; k++)
                        __builtin_prefetch(ring_at(p->tx_ring, p->tx_head + k), 1, 3);
                __builtin_prefetch(&p->txd->head, 1, 3);
                pthread_mutex_unlock(&p->tx_lock);
                ring_wake_peer(p);
                return 0;
        }
}

static int port_send(struct shmz_port *p, const struct shmz_msg *m, int64_t timeout_ns) {
        struct shmz_desc d;
        uint64_t deadline;
        uint32_t slot = 0, chunk = 0, n = 0, buf_n = 0;
        struct seg *s = NULL, *s_buf = NULL;
        int r;

        assert_return(p && m, -EINVAL);
        assert_return(!(m->flags & ~(uint32_t) (SHMZ_MSG_LAST | SHMZ_MSG_CLOSE_FD)), -EINVAL);
        assert_return(m->size == 0 || m->data, -EINVAL);
        if (atomic_load(&p->gone))
                return -EPIPE;
        deadline = deadline_of(timeout_ns);
        d = (struct shmz_desc){
                .kind = SHMZ_DESC_DATA,
                .flags = (m->flags & SHMZ_MSG_LAST ? SHMZ_FRAME_F_LAST : 0) | (m->fd >= 0 ? SHMZ_FRAME_F_FD : 0),
                .type = m->type,
                .stream = m->stream,
                .size = m->size,
        };

        if (m->data)
                s = tx_find(p, m->data, &slot, &chunk);
        if (s) {
                /* A buffer of shmz_port_buf(): it travels in place. The entry is taken now: once the
                 * descriptor is out the receiver may release the chunks and another thread claim them. */
                buf_n = chunk == UINT32_MAX ? 0 : __atomic_exchange_n(&s->buf_n[chunk], 0, __ATOMIC_ACQ_REL);
                if (buf_n == 0)
                        return -EINVAL;
                s_buf = s;
                if (m->size > (size_t) buf_n * p->pp.chunk_size) {
                        __atomic_store_n(&s->buf_n[chunk], (uint8_t) buf_n, __ATOMIC_RELEASE);
                        return -EINVAL;
                }
                n = chunks_for(p, m->size);
                if (n == 0)
                        s = NULL; /* empty: inline, the buffer goes back once sent */
        } else if (m->size > SHMZ_FRAME_INLINE_MAX) {
                if (m->size > p->max_msg)
                        return -EMSGSIZE;
                n = chunks_for(p, m->size);
                r = tx_claim(p, n, timeout_ns, deadline, &slot, &chunk);
                if (r < 0)
                        return r;
                s = atomic_load(&p->tx[slot]);
                memcpy(seg_chunk(p, s, chunk), m->data, m->size);
        }

        if (s) {
                d.flags |= SHMZ_FRAME_F_CHUNK;
                d.segment = slot;
                d.chunk = chunk;
                r = ring_put(p, &d, NULL, 0, m->fd, timeout_ns, deadline);
                if (r < 0) {
                        if (buf_n == 0)
                                seg_unclaim(p, s, chunk, n); /* our copy: the caller's data is still theirs */
                        else                                 /* not sent: the buffer is still the caller's */
                                __atomic_store_n(&s->buf_n[chunk], (uint8_t) buf_n, __ATOMIC_RELEASE);
                        return r;
                }
                if (buf_n > n) /* the tail of a larger buffer is not sent: back to the pool */
                        seg_unclaim(p, s, chunk + n, buf_n - n);
        } else {
                r = ring_put(p, &d, m->size > 0 ? m->data : NULL, m->size, m->fd, timeout_ns, deadline);
                if (r < 0) {
                        if (buf_n > 0)
                                __atomic_store_n(&s_buf->buf_n[chunk], (uint8_t) buf_n, __ATOMIC_RELEASE);
                        return r;
                }
                if (buf_n > 0)
                        seg_unclaim(p, s_buf, chunk, buf_n);
        }
        if (m->fd >= 0 && (m->flags & SHMZ_MSG_CLOSE_FD))
                safe_close(m->fd);
        return 0;
}

_public_ int shmz_port_send(struct shmz_port *p, const struct shmz_msg *m, int64_t timeout_ns) {
        int r;

        assert_return(p, -EINVAL);
        r = port_enter(p);
        if (r < 0)
                return r;
        r = port_send(p, m, timeout_ns);
        port_leave(p);
        return r;
}

/* ---- receiving ------------------------------------------------------------------------------------ */

/* The peer broke the protocol: nothing more from it. Returns -EBADMSG. */
static int violation(struct shmz_port *p, int *fds, size_t n_fds) {
        for (size_t i = 0; i < n_fds; i++)
                close_untrusted(p, fds[i]);
        port_set_gone(p);
        (void) shutdown(p->fd, SHUT_RDWR);
        return -EBADMSG;
}

static int recv_segment(struct shmz_port *p, const struct shmz_frame *f, const uint8_t *payload, size_t n, int *fds,
                        size_t n_fds) {
        struct shmz_frame_segment fs;
        struct seg *s;
        int r;

        if (n != sizeof(*f) + sizeof(fs) || f->size != sizeof(fs) || f->flags != 0 || n_fds != 1)
                return violation(p, fds, n_fds);
        memcpy(&fs, payload, sizeof(fs));
        /* The frame header's segment and chunk are not defined for SEGMENT frames: the payload says it all. */
        if (fs.slot >= p->max_slots || fs.reserved != 0 || fs.chunk_size != p->pp.chunk_size ||
            fs.n_chunks != p->pp.segment_chunks || atomic_load(&p->rx[fs.slot]))
                return violation(p, fds, n_fds);
        r = seg_map(p, fds[0], fs.id, false, &s);
        if (r == -EBADMSG)
                return violation(p, NULL, 0);
        if (r < 0) {
                /* We could not map it (out of memory, maps, fds): the frames that use the slot would
                 * look forged, and the peer is honest. The port ends here, with our errno. */
                port_set_gone(p);
                (void) shutdown(p->fd, SHUT_RDWR);
                return r;
        }
        atomic_store(&p->rx[fs.slot], s);
        return 0;
}

/*
 * An fd read ahead of the descriptor that takes it (recv_lock held). An
 * honest sender has at most SHMZ_PORT_FDS_MAX messages with fds in the ring
 * that we have not taken (it waits for our tail past the oldest), one of them
 * perhaps not published yet: more is a violation. -EDQUOT when this process
 * holds what it lets the peer's uid, or all peers, make it hold.
 */
static int rx_fd_push(struct shmz_port *p, int fd) {
        const uint32_t cap = SHMZ_PORT_FDS_MAX;
        int r;

        if (!p->rx_fds) {
                p->rx_fds = malloc(cap * sizeof(int));
                if (!p->rx_fds)
                        return -ENOMEM;
        }
        if (p->rx_fds_n >= cap)
                return -EBADMSG;
        r = peer_fds_charge(p->pp.peer_uid);
        if (r < 0)
                return r;
        p->rx_fds[(p->rx_fds_first + p->rx_fds_n++) % cap] = fd;
        return 0;
}

/* The oldest fd read ahead: the caller's now (a message's, or to be closed). */
static int rx_fd_pop(struct shmz_port *p) {
        int fd;

        if (p->rx_fds_n == 0)
                return -EBADF;
        fd = p->rx_fds[p->rx_fds_first];
        p->rx_fds_first = (p->rx_fds_first + 1) % SHMZ_PORT_FDS_MAX;
        p->rx_fds_n--;
        peer_fds_uncharge(p->pp.peer_uid);
        return fd;
}

/*
 * Reads one frame from the socket if one waits (recv_lock held): a segment is
 * mapped, an fd queued, a wake-up dropped. 0 when one was handled (*ret_wake:
 * it was a WAKE), -EAGAIN, -EPIPE at the socket's end, -EBADMSG on a
 * violation (the port is shut down), another -errno.
 */
static int sock_read_one(struct shmz_port *p, bool *ret_wake) {
        union {
                struct shmz_frame f;
                uint8_t buf[sizeof(struct shmz_frame) + sizeof(struct shmz_frame_segment)];
        } u;
        union {
                struct cmsghdr cmsg;
                uint8_t buf[CMSG_SPACE(sizeof(int) * FRAME_FDS_MAX)];
        } control;
        struct iovec iov = { .iov_base = u.buf, .iov_len = sizeof(u.buf) };
        struct msghdr mh = {
                .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)
        };
        int fds[FRAME_FDS_MAX];
        size_t n_fds = 0;
        ssize_t n;
        int r;

        *ret_wake = false;
        for (unsigned resets = 0;;) {
                n = recvmsg(p->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                if (n >= 0)
                        break;
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN)
                        return -EAGAIN;
                if (errno != ECONNRESET && errno != EPIPE && errno != ENOTCONN)
                        return -errno;
                atomic_store(&p->peer_eof, true);
                /* A peer that died with frames of ours unread leaves ECONNRESET, reported once before
                 * what it sent us: that is still queued, and the descriptors it published need it. */
                if (++resets > 1)
                        return -EPIPE;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                size_t k;

                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k && n_fds < FRAME_FDS_MAX; i++)
                        memcpy(&fds[n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
        if (n == 0) {
                /* End of file (a zero-length datagram is no frame either). */
                if (n_fds > 0)
                        return violation(p, fds, n_fds);
                atomic_store(&p->peer_eof, true);
                return -EPIPE;
        }
        if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || (size_t) n < sizeof(u.f))
                return violation(p, fds, n_fds);
        switch (u.f.kind) {
        case SHMZ_FRAME_SEGMENT:
                return recv_segment(p, &u.f, u.buf + sizeof(u.f), (size_t) n, fds, n_fds);
        case SHMZ_FRAME_FD:
        case SHMZ_FRAME_WAKE: {
                bool fd = u.f.kind == SHMZ_FRAME_FD;

                if ((size_t) n != sizeof(u.f) || u.f.flags != 0 || u.f.type != 0 || u.f.stream != 0 || u.f.size != 0 ||
                    u.f.segment != 0 || u.f.chunk != 0 || n_fds != (fd ? 1u : 0u))
                        return violation(p, fds, n_fds);
                if (!fd) {
                        *ret_wake = true;
                        return 0;
                }
                r = rx_fd_push(p, fds[0]);
                if (r == -EBADMSG)
                        return violation(p, fds, n_fds);
                if (r < 0) {
                        /* The message that takes it would come without its fd: the port ends with our errno. */
                        close_untrusted(p, fds[0]);
                        port_set_gone(p);
                        (void) shutdown(p->fd, SHUT_RDWR);
                }
                return r;
        }
        default:
                return violation(p, fds, n_fds);
        }
}

/*
 * What a descriptor needs from the socket, which its sender wrote there
 * before publishing it (an announced slot, an fd): frames are read until it
 * is there. It was queued before we saw the descriptor, so it is among the
 * frames queued when we start: we read at most those (every frame takes
 * sizeof(struct shmz_frame) bytes or more), never a flood sent since. Not
 * there by then: a violation.
 */
static int sock_read_until(struct shmz_port *p, uint32_t slot, bool want_fd) {
        int budget = -1;

        for (;;) {
                bool wake;
                int r;

                if (want_fd ? p->rx_fds_n > 0 : atomic_load(&p->rx[slot]) != NULL)
                        return 0;
                if (budget < 0) {
                        int queued = 0;

                        /* Bytes queued (SOCK_SEQPACKET: all frames). Cannot fail on our connected end;
                         * if it did, the port would end here. */
                        if (ioctl(p->fd, SIOCINQ, &queued) < 0)
                                queued = 0;
                        budget = queued / (int) sizeof(struct shmz_frame);
                }
                if (budget-- == 0)
                        return violation(p, NULL, 0);
                r = sock_read_one(p, &wake);
                if (r == -EAGAIN || r == -EPIPE)
                        return violation(p, NULL, 0);
                if (r < 0)
                        return r;
        }
}

/* The receiver is done with n slots: the sender may reuse them. */
/* Publishes our tail, and wakes a sender waiting for slots. */
static void ring_publish_tail(struct shmz_port *p) {
        if (p->rx_tail_pub == p->rx_tail)
                return;
        p->rx_tail_pub = p->rx_tail;
        __atomic_store_n(&p->rxd->tail, p->rx_tail, __ATOMIC_RELEASE);
        channel_released(p->ch, !p->pp.side);
}

/*
 * The receiver is done with n slots. The tail is published once a quarter of
 * the ring is done, and whenever the ring is found empty: a sender short of
 * room then always sees progress, and a stream costs no fence per message.
 */
static void ring_consumed(struct shmz_port *p, uint32_t n) {
        p->rx_tail += n;
        atomic_store_explicit(&p->rx_seen, p->rx_tail, memory_order_relaxed);
        if (p->rx_tail - p->rx_tail_pub >= SHMZ_RING_SLOTS / 4)
                ring_publish_tail(p);
}

/*
 * Checks a descriptor (our copy: the sender can still write the ring) and
 * turns it into a message; at points at its first slot, n_slots were checked
 * to lie in the published part of the ring.
 */
static int desc_take(struct shmz_port *p, const struct shmz_desc *d, const uint8_t *at, struct shmz_msg *ret) {
        const uint32_t known = SHMZ_FRAME_F_LAST | SHMZ_FRAME_F_CHUNK | SHMZ_FRAME_F_FD;
        struct shmz_msg m = {
                .type = d->type,
                .stream = d->stream,
                .flags = d->flags & SHMZ_FRAME_F_LAST ? SHMZ_MSG_LAST : 0,
                .fd = -1,
        };
        int r;

        if (d->flags & ~known)
                return violation(p, NULL, 0);
        if (d->flags & SHMZ_FRAME_F_CHUNK) {
                struct seg *s;
                uint64_t bits, old;
                uint32_t c, k;

                if (d->n_slots != 1 || d->size == 0 || d->size > p->max_msg || d->segment >= p->max_slots)
                        return violation(p, NULL, 0);
                k = chunks_for(p, (size_t) d->size);
                c = d->chunk;
                if (c >= p->pp.segment_chunks || k > p->pp.segment_chunks - c || c / 64 != (c + k - 1) / 64)
                        return violation(p, NULL, 0);
                r = sock_read_until(p, d->segment, false);
                if (r < 0)
                        return r;
                s = atomic_load(&p->rx[d->segment]);
                bits = run_mask(k) << (c % 64);
                /* The sender claimed them before publishing; a run we hold already is a replay. */
                if ((__atomic_load_n(&seg_hdr(s)->used[c / 64], __ATOMIC_ACQUIRE) & bits) != bits)
                        return violation(p, NULL, 0);
                old = atomic_fetch_or(&s->held[c / 64], bits);
                if (old & bits) {
                        atomic_fetch_and(&s->held[c / 64], ~(bits & ~old));
                        return violation(p, NULL, 0);
                }
                m.data = seg_chunk(p, s, c);
                m.size = (size_t) d->size;
                m.handle = HANDLE_CHUNK | (uint64_t) d->segment << 32 | (uint64_t) c << 8 | k;
        } else {
                if (d->size > SHMZ_FRAME_INLINE_MAX || d->n_slots != desc_slots((size_t) d->size) || d->segment != 0 ||
                    d->chunk != 0)
                        return violation(p, NULL, 0);
        }
        if (!(d->flags & SHMZ_FRAME_F_CHUNK) && d->size > 0) {
                void *copy = malloc((size_t) d->size);

                if (!copy)
                        return -ENOMEM; /* not taken: it stays in the ring for the next try */
                memcpy(copy, at + sizeof(*d), (size_t) d->size);
                m.data = copy;
                m.size = (size_t) d->size;
                m.handle = (uint64_t) (uintptr_t) copy;
        }
        if (d->flags & SHMZ_FRAME_F_FD) {
                r = sock_read_until(p, 0, true);
                if (r < 0) {
                        shmz_msg_release(p, &m);
                        return r;
                }
                m.fd = rx_fd_pop(p);
        }
        *ret = m;
        return 0;
}

/* The next message in the ring (recv_lock held): 0, -EAGAIN when it is empty, -EBADMSG on a violation. */
static int ring_take_locked(struct shmz_port *p, struct shmz_msg *ret) {
        for (;;) {
                uint32_t avail, idx;
                struct shmz_desc d;
                const uint8_t *at;
                int r;

                if (p->rx_tail == p->rx_head) {
                        uint32_t head = __atomic_load_n(&p->rxd->head, __ATOMIC_ACQUIRE);

                        if (head - p->rx_tail > SHMZ_RING_SLOTS)
                                return violation(p, NULL, 0);
                        p->rx_head = head;
                        if (head == p->rx_tail) {
                                ring_publish_tail(p);
                                return -EAGAIN;
                        }
                }
                avail = p->rx_head - p->rx_tail;
                idx = p->rx_tail & RING_MASK;
                at = ring_at(p->rx_ring, p->rx_tail);
                /* Copied once; only the copy is checked and used. */
                memcpy(&d, at, sizeof(d));
                if (d.n_slots == 0 || d.n_slots > avail || idx + d.n_slots > SHMZ_RING_SLOTS)
                        return violation(p, NULL, 0);
                if (d.kind == SHMZ_DESC_PAD) {
                        if (idx + d.n_slots != SHMZ_RING_SLOTS || d.flags != 0)
                                return violation(p, NULL, 0);
                        ring_consumed(p, d.n_slots);
                        continue;
                }
                if (d.kind != SHMZ_DESC_DATA)
                        return violation(p, NULL, 0);
                r = desc_take(p, &d, at, ret);
                if (r < 0)
                        return r;
                ring_consumed(p, d.n_slots);
                /* Its sender may wait for this to send its next fd (SHMZ_PORT_FDS_MAX). */
                if (d.flags & SHMZ_FRAME_F_FD)
                        ring_publish_tail(p);
                return 0;
        }
}

static bool ring_has_more(struct shmz_port *p) {
        return p->rx_tail != p->rx_head || __atomic_load_n(&p->rxd->head, __ATOMIC_ACQUIRE) != p->rx_tail;
}

/*
 * A message if one is there (recv_lock held). Else, for a caller that will
 * poll the port's fd (arm), senders are told to send a WAKE frame, and the
 * socket is read empty so that the fd is readable again only for something
 * new. -EAGAIN, -EPIPE once the peer is gone and its ring read to the end.
 */
static int recv_now_locked(struct shmz_port *p, struct shmz_msg *ret, bool arm) {
        unsigned budget = SOCK_DRAIN_MAX;

        *ret = (struct shmz_msg){ .fd = -1 }; /* whatever path returns 0, *ret is never stale */

        for (unsigned round = 0;; round++) {
                bool woke = false;
                int r;

                if (atomic_load(&p->gone))
                        return -EPIPE;
                r = ring_take_locked(p, ret);
                if (r == 0 && arm && atomic_load_explicit(&p->poll_fd, memory_order_relaxed) >= 0 &&
                    !atomic_load(&p->self_pending) && ring_has_more(p)) {
                        /* The caller may stop before the ring is empty, and nobody else would make the
                         * fd readable for what is left: we do, once, until it is read empty. */
                        uint64_t one = 1;

                        atomic_store(&p->self_pending, true);
                        (void) write(p->self_fd, &one, sizeof(one));
                }
                if (r != -EAGAIN)
                        return r;
                if (atomic_load(&p->peer_eof) || __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE)) {
                        /* It published everything before it went: one more look, then the end. */
                        r = ring_take_locked(p, ret);
                        if (r != -EAGAIN)
                                return r;
                        atomic_store(&p->gone, true);
                        return -EPIPE;
                }
                if (!arm)
                        return -EAGAIN;
                /* About to tell the caller to poll: say so, then look once more (see ring_wake_peer()). */
                __atomic_fetch_or(&p->rxd->rx_sleep, SHMZ_RX_SLEEP_FD, __ATOMIC_SEQ_CST);
                __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our store before our next look (see ring_wake_peer()) */
                r = ring_take_locked(p, ret);
                if (r != -EAGAIN)
                        return r;
                if (atomic_exchange(&p->self_pending, false)) {
                        uint64_t v;

                        (void) read(p->self_fd, &v, sizeof(v));
                }
                /* At most SOCK_DRAIN_MAX frames a call: a peer that floods the socket keeps the fd readable,
                 * and the caller comes back, but never stays here. */
                for (; budget > 0; budget--) {
                        bool wake;

                        r = sock_read_one(p, &wake);
                        if (r == -EAGAIN || r == -EPIPE)
                                break;
                        if (r < 0)
                                return r;
                        woke = woke || wake;
                }
                /* A WAKE we just read may be for a message published after our look: look again.
                 * A peer that floods WAKE frames keeps the fd readable; we do not loop for it. */
                if ((!woke || round >= 3) && !atomic_load(&p->peer_eof))
                        return -EAGAIN;
        }
}

/*
 * Waits (without recv_lock) until the ring may hold something, the port
 * ended, or deadline: 0 or -ETIMEDOUT. Spins first if the caller asked for
 * it, then sleeps on the futex (see ring_wake_peer() for why no wake-up is
 * lost).
 *
 * A receiver in the middle of a stream (STREAK_SPIN receives in a row found a
 * message at once with no send of ours between them, and no wait since needed
 * more than a look) that finds the
 * ring empty looks at it now and then for STREAM_SPIN_NS before it sleeps:
 * the next message is most likely a few hundred nanoseconds away, and each
 * sleep would cost its sender a wake-up call (microseconds, in which the
 * receiver drains the ring and sleeps again). A receiver that waits for each
 * message (request and reply, an idle port) sleeps at once, unless
 * shmz_port_set_spin() says otherwise.
 */
#define STREAK_SPIN 8u
#define STREAM_SPIN_NS UINT64_C(20000)
#define STREAM_LOOK_NS UINT64_C(2000)

static bool spin_ns_set(struct shmz_port *p) {
        return atomic_load_explicit(&p->spin_ns, memory_order_relaxed) > 0;
}

static int recv_sleep(struct shmz_port *p, uint64_t deadline, const atomic_uint *gen, unsigned gen_seen,
                      bool streaming) {
        struct shmz_channel_dir *d = p->rxd;
        uint32_t seen = atomic_load_explicit(&p->rx_seen, memory_order_relaxed), seq = 0;
        uint64_t spin = atomic_load_explicit(&p->spin_ns, memory_order_relaxed);
        bool slept;
        int r;

#define RX_READY()                                                                                                     \
        (__atomic_load_n(&d->head, __ATOMIC_ACQUIRE) != seen || atomic_load(&p->gone) || atomic_load(&p->peer_eof) ||  \
         __atomic_load_n(&p->ch->closed, __ATOMIC_ACQUIRE) || (gen && atomic_load(gen) != gen_seen))
        if (spin > 0 || streaming) {
                uint64_t now = now_nsec(CLOCK_MONOTONIC), until;

                spin = MAX(spin, streaming ? STREAM_SPIN_NS : 0);
                until = spin > deadline - MIN(now, deadline) ? deadline : now + spin;
                for (unsigned i = 1;; i++) {
                        if (RX_READY()) {
                                /* Found only after more than a look: a reply, not the next of a stream. Left in
                                 * stream mode, a request and reply would look every STREAM_LOOK_NS for good. */
                                if (i > 2 && !spin_ns_set(p))
                                        atomic_store_explicit(&p->rx_streak, 0, memory_order_relaxed);
                                slept = false;
                                r = 0;
                                goto woke;
                        }
                        if (spin_ns_set(p)) {
                                /* The caller wants the message the moment it is there. Each look yields: a peer
                                 * that shares our CPU (the scheduler puts a pair that wakes each other together)
                                 * runs at once instead of after our spin, and alone on it the yield is a system
                                 * call that returns at once. */
                                (void) sched_yield();
                                if (i % 16 == 0 && now_nsec(CLOCK_MONOTONIC) >= until)
                                        break;
                        } else {
                                /* A stream's receiver looks once per STREAM_LOOK_NS: every look takes the
                                 * head's line from the sender, and one that chases the head makes the sender
                                 * wait for it at each message; one that lags takes what came in one go. */
                                now = now_nsec(CLOCK_MONOTONIC);
                                if (now >= until)
                                        break;
                                while (now_nsec(CLOCK_MONOTONIC) < now + STREAM_LOOK_NS)
                                        cpu_relax();
                        }
                }
        }
        pthread_mutex_lock(&p->sleep_lock);
        p->futex_sleepers++;
        seq = __atomic_load_n(&d->wake_seq, __ATOMIC_SEQ_CST);
        __atomic_fetch_or(&d->rx_sleep, SHMZ_RX_SLEEP_FUTEX, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&p->sleep_lock);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our store before our next look (see ring_wake_peer()) */
        slept = !RX_READY();
#undef RX_READY
        if (slept) /* the stream paused for longer than a spin: request and reply, or idle */
                atomic_store_explicit(&p->rx_streak, 0, memory_order_relaxed);
        r = slept ? futex_sleep(&d->wake_seq, seq, deadline) : 0;
        /* A receiver that keeps up with a stream finds a message here instead of sleeping: without this,
         * its announcement would stay and cost the sender a futex call per message. Only the last of our
         * sleepers takes it back (under sleep_lock, which every announcement takes too). */
        pthread_mutex_lock(&p->sleep_lock);
        if (--p->futex_sleepers == 0)
                __atomic_fetch_and(&d->rx_sleep, ~SHMZ_RX_SLEEP_FUTEX, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&p->sleep_lock);
woke:
        /* Spun or slept, the wait ends alike: a moved *gen is not "ready" (the ring may still be empty). */
        if (r < 0)
                return r;
        if (gen && atomic_load(gen) != gen_seen)
                return -EINTR; /* a call due sooner than our caller knew: back to it */
        /* Not woken: the sleep's bound passed. A peer gone while no daemon watches shows only here. */
        if (slept && __atomic_load_n(&d->wake_seq, __ATOMIC_RELAXED) == seq && port_closed(p))
                atomic_store(&p->peer_eof, true);
        return 0;
}

static bool reply_claim_locked(struct shmz_port *p, const struct shmz_msg *m);

#if defined(__SANITIZE_THREAD__)
#define TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TSAN 1
#endif
#endif

/* recv_lock, waiting for it until deadline (CLOCK_MONOTONIC): 0, or a positive errno as pthread's. */
static int recv_lock_until(struct shmz_port *p, uint64_t deadline) {
        struct timespec abs;
#ifdef TSAN
        /* ThreadSanitizer (gcc 12, clang 14) intercepts no pthread_mutex_clocklock(): it would not see the
         * lock taken, and report races on all it guards. Under it, the same wait on the realtime clock. */
        uint64_t now = now_nsec(CLOCK_MONOTONIC), left = deadline > now ? deadline - now : 0;

        deadline = left > UINT64_MAX - now_nsec(CLOCK_REALTIME) ? UINT64_MAX : now_nsec(CLOCK_REALTIME) + left;
        abs = (struct timespec){ .tv_sec = (time_t) (deadline / 1000000000),
                                 .tv_nsec = (long) (deadline % 1000000000) };
        return pthread_mutex_timedlock(&p->recv_lock, &abs);
#else
        abs = (struct timespec){ .tv_sec = (time_t) (deadline / 1000000000),
                                 .tv_nsec = (long) (deadline % 1000000000) };
        return pthread_mutex_clocklock(&p->recv_lock, CLOCK_MONOTONIC, &abs);
#endif
}

/*
 * shmz_port_recv(); with gen, it also returns (as a timeout) when *gen moves
 * from gen_seen. 1: the message was a reply to a pending call, queued for its
 * handler (run handoff_run()).
 */
static int recv_timed(struct shmz_port *p, struct shmz_msg *ret, int64_t timeout_ns, const atomic_uint *gen,
                      unsigned gen_seen) {
        uint64_t deadline = deadline_of(timeout_ns);
        unsigned waited = 0;

        for (;;) {
                int r;

                if (timeout_ns == 0)
                        r = pthread_mutex_trylock(&p->recv_lock);
                else if (timeout_ns < 0)
                        r = pthread_mutex_lock(&p->recv_lock);
                else
                        r = recv_lock_until(p, deadline);
                if (r != 0) /* another thread is receiving, for at least as long */
                        return expired(timeout_ns);
                r = recv_now_locked(p, ret, timeout_ns == 0);
                /* Queued while no other receive can take the next one: a call's replies keep their order. */
                if (r == 0 && reply_claim_locked(p, ret))
                        r = 1;
                pthread_mutex_unlock(&p->recv_lock);
                if (r >= 0) {
                        unsigned k = atomic_load_explicit(&p->rx_streak, memory_order_relaxed);
                        /* Our own count (a peer that forges it only bends this guess). */
                        uint32_t tx = (uint32_t) __atomic_load_n(&p->txd->messages, __ATOMIC_RELAXED);

                        /* Found at once after a send of ours: most likely its answer, which came while we
                         * were still busy waking the peer, not the next of a stream. */
                        if (tx != atomic_exchange_explicit(&p->rx_streak_tx, tx, memory_order_relaxed))
                                atomic_store_explicit(&p->rx_streak, 0, memory_order_relaxed);
                        else if (waited == 0 && k < STREAK_SPIN)
                                atomic_store_explicit(&p->rx_streak, k + 1, memory_order_relaxed);
                }
                if (r != -EAGAIN || timeout_ns == 0)
                        return r;
                /* The rule of every wait (deadline_passed()): nothing woke us early enough to go round free. */
                if (deadline_passed(deadline))
                        return expired(timeout_ns);
                /* Sleep outside the lock, so that other receivers keep their own timeouts. */
                r = recv_sleep(p, deadline, gen, gen_seen,
                               atomic_load_explicit(&p->rx_streak, memory_order_relaxed) >= STREAK_SPIN);
                waited++;
                if (r < 0)
                        return expired(timeout_ns);
        }
}

static void handoff_run(struct shmz_port *p);

_public_ int shmz_port_recv(struct shmz_port *p, struct shmz_msg *ret, int64_t timeout_ns) {
        uint64_t deadline;
        int r;

        assert_return(p && ret, -EINVAL);
        r = port_enter(p);
        if (r < 0)
                return r;
        deadline = deadline_of(timeout_ns);
        for (;;) {
                int64_t t = timeout_ns;

                /* The time left of the caller's timeout, after replies handed on (the one deadline rule). */
                if (timeout_ns > 0 && deadline != UINT64_MAX) {
                        uint64_t now = now_nsec(CLOCK_MONOTONIC);

                        if (now >= deadline) {
                                r = -ETIMEDOUT;
                                break;
                        }
                        t = (int64_t) MIN(deadline - now, (uint64_t) INT64_MAX);
                }
                r = recv_timed(p, ret, t, NULL, 0);
                /* A reply to a pending call is its handler's, whichever receive takes it off the ring. */
                if (r != 1)
                        break;
                handoff_run(p);
        }
        port_leave(p);
        return r;
}

_public_ void shmz_msg_release(struct shmz_port *p, struct shmz_msg *m) {
        if (!p || !m || m->handle == 0)
                return;
        /* Chunks of a closing port go back with it (port_free()); an inline copy is ours alone. */
        if ((m->handle & HANDLE_CHUNK) && port_enter(p) >= 0) {
                uint32_t slot = (uint32_t) (m->handle >> 32) & 0x7fffffffu;
                uint32_t c = (uint32_t) (m->handle >> 8) & 0xffffffu, k = (uint32_t) m->handle & 0xffu;
                struct seg *s = slot < p->max_slots ? atomic_load(&p->rx[slot]) : NULL;
                uint64_t bits, old;

                if (!s || k == 0 || k > RUN_MAX || c >= p->pp.segment_chunks || c / 64 != (c + k - 1) / 64) {
                        port_leave(p);
                        return;
                }
                bits = run_mask(k) << (c % 64);
                /* Only the release that finds them held gives them back: a second one does nothing. */
                old = atomic_fetch_and(&s->held[c / 64], ~bits);
                if ((old & bits) == bits) {
                        __atomic_fetch_and(&seg_hdr(s)->used[c / 64], ~bits, __ATOMIC_RELEASE);
                        channel_released(p->ch, !p->pp.side);
                }
                port_leave(p);
        } else if (!(m->handle & HANDLE_CHUNK))
                free((void *) (uintptr_t) m->handle);
        m->handle = 0;
        m->data = NULL;
        m->size = 0;
}

static uint64_t count_bits(const struct shmz_port *p, _Atomic(struct seg *) *table, bool tx) {
        uint64_t total = 0;

        for (uint32_t i = 0; i < p->max_slots; i++) {
                struct seg *s = atomic_load(&table[i]);

                if (!s)
                        continue;
                for (uint32_t w = 0; w < p->n_words; w++) {
                        uint64_t v = tx ? __atomic_load_n(&seg_hdr(s)->used[w], __ATOMIC_RELAXED) & word_valid(p, w)
                                        : atomic_load(&s->held[w]);

                        total += (uint64_t) __builtin_popcountll(v);
                }
        }
        return total;
}

uint64_t port_tx_chunks_used(const struct shmz_port *p) {
        return count_bits(p, p->tx, true);
}

uint64_t port_rx_chunks_held(const struct shmz_port *p) {
        return count_bits(p, p->rx, false);
}

/* ---- a port's life ------------------------------------------------------------------------------ */

static int segment_create(struct shmz_port *p, void *userdata, int *ret_fd, uint64_t *ret_id) {
        struct shmz_msg_segment_info si;
        struct shmz_msg_port_ref req;
        int fd = -EBADF, r;

        (void) userdata;
        /* A daemon restart under the request changes the port's id and token (PORT_REJOIN): ask again with those. */
        for (unsigned tries = 0;; tries++) {
                struct shmz_msg_port_ref now;

                client_links_lock(p->client);
                req = (struct shmz_msg_port_ref){ .port_id = p->pp.port_id, .token = p->pp.token, .side = p->pp.side };
                client_links_unlock(p->client);
                r = client_request(p->client, SHMZ_MSG_SEGMENT_CREATE, &req, sizeof(req), &si, sizeof(si), &fd);
                if (r >= 0 || tries >= 2 || (r != -ECONNRESET && r != -ENOENT && r != -EPERM))
                        break;
                client_links_lock(p->client);
                now = (struct shmz_msg_port_ref){ .port_id = p->pp.port_id, .token = p->pp.token, .side = p->pp.side };
                client_links_unlock(p->client);
                if (r != -ECONNRESET && memcmp(&now, &req, sizeof(now)) == 0)
                        break;
        }
        if (r == -ENOENT)
                return -EPIPE; /* the daemon dropped the port already: the peer is gone */
        if (r < 0)
                return r;
        if (fd < 0 || si.port_id != req.port_id || si.side != p->pp.side || si.chunk_size != p->pp.chunk_size ||
            si.n_chunks != p->pp.segment_chunks || si.map_size != p->seg_map_size) {
                safe_close(fd);
                return -EPROTO;
        }
        *ret_fd = fd;
        *ret_id = si.id;
        return 0;
}

/*
 * PORT_REJOIN on a revive's connection (links lock held): the daemon is shown
 * our socket end and the channel, and watches our side again; it answers
 * with the port's id and our token from now on. A port that ended is left
 * out; a refusal leaves the port as it is, unwatched (its messages do not go
 * through the daemon), and SEGMENT_CREATE then fails for it.
 */
int port_link_rejoin(struct client_link *l, int fd, uint32_t *stream) {
        struct shmz_port *p = (struct shmz_port *) ((char *) l - offsetof(struct shmz_port, link));
        struct shmz_msg_port_rejoin req = {
                .side = p->pp.side,
                .chunk_size = p->pp.chunk_size,
                .segment_chunks = p->pp.segment_chunks,
        };
        struct shmz_msg_port_peer pe;
        int fds[2] = { p->fd, p->ch_fd }, r;

        if (atomic_load(&p->gone) || atomic_load(&p->peer_eof) || p->ch_fd < 0)
                return 0;
        r = client_raw_call(fd, stream, SHMZ_MSG_PORT_REJOIN, &req, sizeof(req), fds, 2, &pe, sizeof(pe));
        if (r == -ENOTCONN || r == -EPROTO)
                return r;
        if (r >= 0 && pe.side == p->pp.side && pe.chunk_size == p->pp.chunk_size &&
            pe.segment_chunks == p->pp.segment_chunks) {
                p->pp.port_id = pe.port_id;
                p->pp.token = pe.token;
        }
        return 0;
}

int port_new(int sock_fd, int channel_fd, const struct port_params *pp, struct shmz_client *client,
             port_segment_source_t source, void *userdata, struct shmz_port **ret) {
        _cleanup_close_ int sfd = sock_fd, cfd = channel_fd;
        struct shmz_port *p;
        uint64_t slots;
        int type = 0, r;
        socklen_t len = sizeof(type);

        /* Whatever fails, the end is shut down: the peer sees end of file, not a port that never answers. */
        if (!ret || (!source && !client))
                r = -EINVAL;
        else
                r = port_params_check(pp);
        if (r >= 0 && (getsockopt(sfd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET))
                r = -EPROTO;
        if (r >= 0) {
                r = shmem_fd_check(cfd, SHMZ_CHANNEL_SIZE);
                if (r == -EBADMSG)
                        r = -EPROTO;
        }
        p = r >= 0 ? calloc(1, sizeof(*p)) : NULL;
        if (r >= 0 && !p)
                r = -ENOMEM;
        if (r < 0) {
                if (sfd >= 0)
                        (void) shutdown(sfd, SHUT_RDWR);
                return r;
        }
        atomic_init(&p->users, USERS_ONE); /* the caller's handle */
        p->ch_fd = -EBADF;
        p->fd = TAKE_FD(sfd);
        p->pp = *pp;
        p->seg_map_size = SHMZ_SEGMENT_HEADER_SIZE + (size_t) pp->segment_chunks * pp->chunk_size;
        p->n_words = (pp->segment_chunks + 63) / 64;
        /* As the daemon counts a direction's memory: the chunks, not the header pages. */
        slots = pp->port_memory / ((uint64_t) pp->segment_chunks * pp->chunk_size);
        p->max_slots = (uint32_t) MAX(UINT64_C(1), MIN(slots, (uint64_t) MAX_SLOTS));
        p->max_msg = (size_t) MIN(RUN_MAX, pp->segment_chunks) * pp->chunk_size;
        p->source = source ?: segment_create;
        p->source_userdata = userdata;
        atomic_init(&p->n_tx, 0);
        atomic_init(&p->gone, false);
        atomic_init(&p->peer_eof, false);
        atomic_init(&p->rx_seen, 0);
        atomic_init(&p->spin_ns, 0);
        atomic_init(&p->rx_streak, 0);
        atomic_init(&p->rx_streak_tx, 0);
        atomic_init(&p->poll_fd, -EBADF);
        atomic_init(&p->self_pending, false);
        p->self_fd = -EBADF;
        atomic_init(&p->next_stream, 0);
        atomic_init(&p->dispatch_until, 0);
        atomic_init(&p->calls_gen, 0);
        (void) pthread_mutex_init(&p->create_lock, NULL);
        (void) pthread_mutex_init(&p->tx_lock, NULL);
        (void) pthread_mutex_init(&p->recv_lock, NULL);
        (void) pthread_mutex_init(&p->poll_lock, NULL);
        (void) pthread_mutex_init(&p->sleep_lock, NULL);
        (void) pthread_mutex_init(&p->rpc_lock, NULL);
        p->min_deadline = UINT64_MAX;
        p->tx = calloc(p->max_slots, sizeof(*p->tx));
        p->rx = calloc(p->max_slots, sizeof(*p->rx));
        p->ch = mmap(NULL, SHMZ_CHANNEL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
        if (p->ch == MAP_FAILED) {
                p->ch = NULL;
                shmz_port_close(p);
                return -EPROTO;
        }
        if (__atomic_load_n(&p->ch->magic, __ATOMIC_RELAXED) != SHMZ_CHANNEL_MAGIC) {
                shmz_port_close(p);
                return -EPROTO;
        }
        p->txd = &p->ch->dir[pp->side];
        p->rxd = &p->ch->dir[!pp->side];
        p->tx_ring = (uint8_t *) p->ch + SHMZ_CHANNEL_HEADER_SIZE + (size_t) pp->side * SHMZ_RING_SIZE;
        p->rx_ring = (uint8_t *) p->ch + SHMZ_CHANNEL_HEADER_SIZE + (size_t) !pp->side * SHMZ_RING_SIZE;
        /* Where the peer's ring stands when we come in (normally 0; the daemon zeroed the channel).
         * Hostile values show as a violation at the first receive or send. */
        p->tx_head = __atomic_load_n(&p->txd->head, __ATOMIC_ACQUIRE);
        p->rx_tail = __atomic_load_n(&p->rxd->tail, __ATOMIC_ACQUIRE);
        p->rx_head = p->rx_tail_pub = p->rx_tail;
        p->tx_tail = p->tx_head; /* checked against the shared tail when room runs short */
        atomic_store(&p->rx_seen, p->rx_tail);
        if (!p->tx || !p->rx) {
                shmz_port_close(p);
                return -ENOMEM;
        }
        if (client) {
                p->client = client_ref(client);
                p->ch_fd = TAKE_FD(cfd);
                client_link_add(client, &p->link, CLIENT_LINK_PORT);
        }
        *ret = p;
        return 0;
}

static int fail_calls(struct shmz_port *p, int error, bool only_expired);

/*
 * Ends the port for every thread at once: calls under way wake and return
 * -EPIPE, and the memory goes with the last of them (port_leave()). Closing
 * frees nothing a call in another thread may still use, and no fd is closed
 * under such a call (its number could be reused meanwhile).
 */
_public_ void shmz_port_close(struct shmz_port *p) {
        if (!p)
                return;
        if (atomic_fetch_or(&p->users, USERS_CLOSING) & USERS_CLOSING)
                return; /* a second close while the first one's calls end */
        if (p->fd >= 0)
                (void) shutdown(p->fd, SHUT_RDWR);
        atomic_store(&p->gone, true);
        if (p->ch) {
                /* Senders and receivers of either side asleep wake and see the port is gone. */
                __atomic_store_n(&p->ch->closed, 1, __ATOMIC_RELEASE);
                for (unsigned d = 0; d < 2; d++) {
                        channel_wake_senders(p->ch, d);
                        channel_wake_receiver(p->ch, d);
                }
        }
        (void) fail_calls(p, -EPIPE, false);
        port_leave(p);
}

static void port_free(struct shmz_port *p) {
        /* First: a revive uses the fds of the ports it finds linked. */
        if (p->client)
                client_link_del(p->client, &p->link);
        /* No call is left: one registered while the close ran is taken back by its caller, whose send
         * fails once the port is gone. */
        for (uint32_t i = 0; p->rx && i < p->max_slots; i++) {
                struct seg *s = atomic_load(&p->rx[i]);

                if (!s)
                        continue;
                /* Chunks still held go back to the sender. */
                for (uint32_t w = 0; w < p->n_words; w++) {
                        uint64_t held = atomic_load(&s->held[w]);

                        if (held)
                                __atomic_fetch_and(&seg_hdr(s)->used[w], ~held, __ATOMIC_RELEASE);
                }
                seg_free(s);
        }
        for (uint32_t i = 0; p->tx && i < p->max_slots; i++)
                seg_free(atomic_load(&p->tx[i]));
        seg_free(p->tx_unannounced);
        free(p->tx);
        free(p->rx);
        if (p->ch)
                (void) munmap(p->ch, SHMZ_CHANNEL_SIZE);
        safe_close(p->fd);
        safe_close(p->ch_fd);
        while (p->rx_fds_n > 0)
                close_untrusted(p, rx_fd_pop(p));
        free(p->rx_fds);
        safe_close(atomic_load(&p->poll_fd));
        safe_close(p->self_fd);
        client_unref(p->client);
        free(p->calls);
        /* Empty: every thread that queued ran the queue, or left it to one that did, before leaving. */
        free(p->hq);
        (void) pthread_mutex_destroy(&p->create_lock);
        (void) pthread_mutex_destroy(&p->tx_lock);
        (void) pthread_mutex_destroy(&p->recv_lock);
        (void) pthread_mutex_destroy(&p->poll_lock);
        (void) pthread_mutex_destroy(&p->sleep_lock);
        (void) pthread_mutex_destroy(&p->rpc_lock);
        free(p);
}

int port_raw_publish(struct shmz_port *p, const struct shmz_desc *d, const void *payload, size_t n, uint32_t advance) {
        size_t room;
        uint8_t *at;

        pthread_mutex_lock(&p->tx_lock);
        at = ring_at(p->tx_ring, p->tx_head);
        room = (size_t) (SHMZ_RING_SLOTS - (p->tx_head & RING_MASK)) * SHMZ_RING_SLOT_SIZE - sizeof(*d);
        memcpy(at, d, sizeof(*d));
        if (n > 0)
                memcpy(at + sizeof(*d), payload, MIN(n, room));
        p->tx_head += advance ?: d->n_slots;
        __atomic_store_n(&p->txd->head, p->tx_head, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&p->tx_lock);
        ring_wake_peer(p);
        return 0;
}

struct shmz_channel *port_channel(const struct shmz_port *p) {
        return p->ch;
}

int port_channel_fd(const struct shmz_port *p) {
        return p->ch_fd;
}

int port_socket_fd(const struct shmz_port *p) {
        return p->fd;
}

_public_ int shmz_port_set_spin(struct shmz_port *p, uint64_t ns) {
        assert_return(p, -EINVAL);
        if (port_enter(p) < 0)
                return -EPIPE;
        atomic_store_explicit(&p->spin_ns, ns, memory_order_relaxed);
        port_leave(p);
        return 0;
}

/*
 * The fd a caller polls: an epoll fd over the socket (WAKE frames, the peer's
 * end) and an eventfd only we write (messages a non-blocking receive left in
 * the ring). Made on first use: callers that never poll pay nothing.
 */
_public_ int shmz_port_fd(const struct shmz_port *cp) {
        struct shmz_port *p = (struct shmz_port *) cp; /* the fd is made once, on demand */
        _cleanup_close_ int ep = -EBADF, ev = -EBADF;
        struct epoll_event e = { .events = EPOLLIN };
        uint64_t one = 1;
        int fd;

        assert_return(p, -EINVAL);
        if (port_enter(p) < 0)
                return -EPIPE;
        fd = atomic_load(&p->poll_fd);
        if (fd >= 0) {
                port_leave(p);
                return fd;
        }
        pthread_mutex_lock(&p->poll_lock);
        fd = atomic_load(&p->poll_fd);
        if (fd >= 0)
                goto out;
        ep = epoll_create1(EPOLL_CLOEXEC);
        ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (ep < 0 || ev < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, p->fd, &e) < 0 ||
            epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e) < 0) {
                fd = -errno;
                goto out;
        }
        /* From now on senders must wake the fd; messages already waiting make it readable at once. */
        __atomic_fetch_or(&p->rxd->rx_sleep, SHMZ_RX_SLEEP_FD, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our store before our next look (see ring_wake_peer()) */
        if (__atomic_load_n(&p->rxd->head, __ATOMIC_ACQUIRE) != atomic_load(&p->rx_seen)) {
                (void) write(ev, &one, sizeof(one));
                atomic_store(&p->self_pending, true);
        }
        p->self_fd = TAKE_FD(ev);
        fd = TAKE_FD(ep);
        atomic_store(&p->poll_fd, fd);
out:
        pthread_mutex_unlock(&p->poll_lock);
        port_leave(p);
        return fd;
}

_public_ int shmz_port_peer(const struct shmz_port *cp, pid_t *pid, uid_t *uid, gid_t *gid) {
        struct shmz_port *p = (struct shmz_port *) cp; /* counted in, as every call */

        assert_return(p, -EINVAL);
        if (port_enter(p) < 0)
                return -EPIPE;
        if (pid)
                *pid = p->pp.peer_pid;
        if (uid)
                *uid = p->pp.peer_uid;
        if (gid)
                *gid = p->pp.peer_gid;
        port_leave(p);
        return 0;
}

/* ---- RPC ---------------------------------------------------------------------------------------- */

/*
 * Stream ids of calls carry the caller's side in bit 31, so a message whose
 * stream has our bit is a reply to one of our calls, never a call of the peer.
 */
static uint32_t stream_new(struct shmz_port *p) {
        for (;;) {
                uint32_t s = (atomic_fetch_add(&p->next_stream, 1) + 1) & 0x7fffffffu;

                if (s != 0)
                        return s | (p->pp.side ? 0x80000000u : 0);
        }
}

static bool stream_is_ours(const struct shmz_port *p, uint32_t stream) {
        return stream != 0 && !!(stream & 0x80000000u) == !!p->pp.side;
}

/* Takes out the call of stream (rpc_lock held); false if none. */
static bool call_take_locked(struct shmz_port *p, uint32_t stream, bool remove, struct call *ret) {
        for (size_t i = 0; i < p->n_calls; i++)
                if (p->calls[i].stream == stream) {
                        *ret = p->calls[i];
                        if (remove)
                                p->calls[i] = p->calls[--p->n_calls];
                        if (p->n_calls == 0)
                                p->min_deadline = UINT64_MAX; /* exact again for free */
                        return true;
                }
        return false;
}

static bool call_due(const struct call *c, bool only_expired, uint64_t now) {
        return !only_expired || (c->deadline_ns != 0 && c->deadline_ns <= now);
}

/*
 * Takes out up to n calls that are due (rpc_lock held) into ret, and returns
 * how many. A scan that takes them all also makes min_deadline exact again.
 */
static size_t calls_take_due_locked(struct shmz_port *p, bool only_expired, uint64_t now, struct call *ret, size_t n) {
        uint64_t min = UINT64_MAX;
        size_t k = 0;

        for (size_t i = 0; i < p->n_calls;) {
                if (call_due(&p->calls[i], only_expired, now) && k < n) {
                        ret[k++] = p->calls[i];
                        p->calls[i] = p->calls[--p->n_calls];
                        continue;
                }
                if (p->calls[i].deadline_ns != 0 && p->calls[i].deadline_ns < min)
                        min = p->calls[i].deadline_ns;
                i++;
        }
        if (k < n)
                p->min_deadline = min;
        return k;
}

/* Queues h (rpc_lock held); -ENOMEM. */
static int handoff_push_locked(struct shmz_port *p, const struct handoff *h) {
        if (p->hq_n == p->hq_cap) {
                size_t cap = MAX((size_t) 16, p->hq_cap * 2);
                struct handoff *a = malloc(cap * sizeof(*a));

                if (!a)
                        return -ENOMEM;
                /* In order from the first, so that the ring starts at 0 again. */
                for (size_t i = 0; i < p->hq_n; i++)
                        a[i] = p->hq[(p->hq_first + i) % p->hq_cap];
                free(p->hq);
                p->hq = a;
                p->hq_cap = cap;
                p->hq_first = 0;
        }
        p->hq[(p->hq_first + p->hq_n++) % p->hq_cap] = *h;
        return 0;
}

/* m was taken off the ring (recv_lock held): true if it is a reply to a pending call, now queued. */
static bool reply_claim_locked(struct shmz_port *p, const struct shmz_msg *m) {
        struct handoff h = { .m = *m };
        struct call c;
        bool queued = false;

        if (!stream_is_ours(p, m->stream))
                return false;
        pthread_mutex_lock(&p->rpc_lock);
        /* Out of memory for the queue: the message goes as one of no call (dropped, or to recv). */
        if (call_take_locked(p, m->stream, false, &c))
                queued = handoff_push_locked(p, &h) >= 0;
        pthread_mutex_unlock(&p->rpc_lock);
        return queued;
}

/*
 * Runs what the queue holds, unless another thread does already: that one
 * runs what we queued too. A handler that receives on its own port queues
 * what it takes, and its replies run after it returns.
 */
static void handoff_run(struct shmz_port *p) {
        pthread_mutex_lock(&p->rpc_lock);
        if (p->handing) {
                pthread_mutex_unlock(&p->rpc_lock);
                return;
        }
        p->handing = true;
        while (p->hq_n > 0) {
                struct handoff h = p->hq[p->hq_first];
                bool found = false;
                struct call c;

                p->hq_first = (p->hq_first + 1) % p->hq_cap;
                p->hq_n--;
                /* A reply's call may have ended since it was queued (timed out): then it is dropped. */
                if (h.error == 0)
                        found = call_take_locked(p, h.m.stream, h.m.flags & SHMZ_MSG_LAST, &c);
                pthread_mutex_unlock(&p->rpc_lock);
                if (h.error != 0)
                        h.handler(p, h.error, NULL, h.userdata);
                else if (found)
                        c.handler(p, 0, &h.m, c.userdata);
                else {
                        close_untrusted(p, h.m.fd);
                        shmz_msg_release(p, &h.m);
                }
                pthread_mutex_lock(&p->rpc_lock);
        }
        p->handing = false;
        pthread_mutex_unlock(&p->rpc_lock);
}

/*
 * Ends calls with error: all of them, or those whose deadline passed. Their
 * ends are queued behind the replies already taken (handoff_run()); one scan
 * of the pending calls takes out a batch, so ending k of n calls costs about
 * n + k, and finding none due costs nothing.
 */
static int fail_calls(struct shmz_port *p, int error, bool only_expired) {
        uint64_t now = only_expired ? now_nsec(CLOCK_MONOTONIC) : 0;
        int n = 0;

        for (;;) {
                struct call batch[32];
                size_t k = 0, unqueued = 0;

                pthread_mutex_lock(&p->rpc_lock);
                if (p->n_calls > 0 && (!only_expired || p->min_deadline <= now))
                        k = calls_take_due_locked(p, only_expired, now, batch, ELEMENTSOF(batch));
                for (size_t i = 0; i < k; i++) {
                        struct handoff h = { .error = error,
                                             .handler = batch[i].handler,
                                             .userdata = batch[i].userdata };

                        if (handoff_push_locked(p, &h) < 0)
                                batch[unqueued++] = batch[i];
                }
                pthread_mutex_unlock(&p->rpc_lock);
                /* Out of memory for the queue: told at once, out of order rather than never. */
                for (size_t i = 0; i < unqueued; i++)
                        batch[i].handler(p, error, NULL, batch[i].userdata);
                handoff_run(p);
                n += (int) k;
                if (k < ELEMENTSOF(batch))
                        return n;
        }
}

_public_ void shmz_port_set_handler(struct shmz_port *p, shmz_msg_handler_t handler, void *userdata) {
        if (!p || port_enter(p) < 0)
                return;
        pthread_mutex_lock(&p->rpc_lock);
        p->handler = handler;
        p->handler_userdata = userdata;
        pthread_mutex_unlock(&p->rpc_lock);
        port_leave(p);
}

static int port_call(struct shmz_port *p, const struct shmz_msg *m, uint64_t deadline_ns, shmz_reply_handler_t handler,
                     void *userdata, uint32_t *ret_stream) {
        struct shmz_msg req;
        struct call c;
        int64_t timeout = -1;
        int r;

        assert_return(p && m && handler, -EINVAL);
        if (atomic_load(&p->gone))
                return -EPIPE;
        if (deadline_ns != 0) {
                uint64_t now = now_nsec(CLOCK_MONOTONIC);

                if (deadline_ns <= now)
                        return -ETIMEDOUT;
                timeout = (int64_t) MIN(deadline_ns - now, (uint64_t) INT64_MAX);
        }
        req = *m;
        req.stream = stream_new(p);
        c = (struct call){ .stream = req.stream, .deadline_ns = deadline_ns, .handler = handler, .userdata = userdata };

        /* Registered before it is sent: another thread may dispatch the reply at once. */
        pthread_mutex_lock(&p->rpc_lock);
        if (p->n_calls == p->cap_calls) {
                size_t cap = MAX((size_t) 16, p->cap_calls * 2);
                struct call *a = realloc(p->calls, cap * sizeof(*a));

                if (!a) {
                        pthread_mutex_unlock(&p->rpc_lock);
                        return -ENOMEM;
                }
                p->calls = a;
                p->cap_calls = cap;
        }
        p->calls[p->n_calls++] = c;
        if (deadline_ns != 0 && deadline_ns < p->min_deadline)
                p->min_deadline = deadline_ns;
        pthread_mutex_unlock(&p->rpc_lock);
        if (deadline_ns != 0) {
                uint64_t until;

                /* A dispatcher asleep for longer than this call may wait must wake and look at the
                 * deadlines again: it read calls_gen before them, we raise it after registering. */
                atomic_fetch_add(&p->calls_gen, 1);
                until = atomic_load(&p->dispatch_until);
                if (until != 0 && deadline_ns < until)
                        channel_wake_receiver(p->ch, !p->pp.side);
        }

        r = shmz_port_send(p, &req, timeout);
        if (r < 0) {
                bool ours;

                pthread_mutex_lock(&p->rpc_lock);
                ours = call_take_locked(p, req.stream, true, &c);
                pthread_mutex_unlock(&p->rpc_lock);
                /* Another thread already ended the call (the peer died, the deadline passed) and told
                 * the handler: the handler owns the outcome, an error here would report it twice. */
                if (ours)
                        return r == -EAGAIN && timeout != 0 ? -ETIMEDOUT : r;
        }
        if (ret_stream)
                *ret_stream = req.stream;
        return 0;
}

_public_ int shmz_port_call(struct shmz_port *p, const struct shmz_msg *m, uint64_t deadline_ns,
                            shmz_reply_handler_t handler, void *userdata, uint32_t *ret_stream) {
        int r;

        assert_return(p, -EINVAL);
        r = port_enter(p);
        if (r < 0)
                return r;
        r = port_call(p, m, deadline_ns, handler, userdata, ret_stream);
        port_leave(p);
        return r;
}

_public_ uint64_t shmz_port_next_deadline(struct shmz_port *p) {
        uint64_t d = UINT64_MAX;

        if (!p || port_enter(p) < 0)
                return d;
        /* A lower bound: a dispatcher woken by a deadline that went with its call scans once and waits on. */
        pthread_mutex_lock(&p->rpc_lock);
        if (p->n_calls > 0)
                d = p->min_deadline;
        pthread_mutex_unlock(&p->rpc_lock);
        port_leave(p);
        return d;
}

/* Hands one received message that is no reply to a pending call to the port's handler. */
static void dispatch_one(struct shmz_port *p, struct shmz_msg *m) {
        shmz_msg_handler_t handler = NULL;
        void *userdata = NULL;

        if (!stream_is_ours(p, m->stream)) {
                pthread_mutex_lock(&p->rpc_lock);
                handler = p->handler;
                userdata = p->handler_userdata;
                pthread_mutex_unlock(&p->rpc_lock);
        }
        if (handler)
                handler(p, m, userdata);
        else {
                /* A reply nobody waits for any more (its call timed out), or no handler: dropped. */
                close_untrusted(p, m->fd);
                shmz_msg_release(p, m);
        }
}

/*
 * Several threads may sleep in dispatch: a call must wake them when its
 * deadline comes before any of theirs, so dispatch_until is the latest. One
 * that leaves cannot tell the others' times: it leaves UINT64_MAX (a call
 * with a deadline then wakes them, one wake too many at worst, never late).
 * The stores are sequentially consistent: against calls_gen (shmz_port_call()).
 */
static void dispatch_sleep_begin(struct shmz_port *p, uint64_t until) {
        pthread_mutex_lock(&p->rpc_lock);
        if (p->dispatch_asleep++ == 0 || until > atomic_load(&p->dispatch_until))
                atomic_store(&p->dispatch_until, until);
        pthread_mutex_unlock(&p->rpc_lock);
}

static void dispatch_sleep_end(struct shmz_port *p) {
        pthread_mutex_lock(&p->rpc_lock);
        atomic_store(&p->dispatch_until, --p->dispatch_asleep == 0 ? 0 : UINT64_MAX);
        pthread_mutex_unlock(&p->rpc_lock);
}

static int port_dispatch(struct shmz_port *p, int64_t timeout_ns) {
        uint64_t deadline;
        int handled;

        deadline = deadline_of(timeout_ns);
        handled = fail_calls(p, -ETIMEDOUT, true);
        for (;;) {
                /* Read before the deadlines: a call registered after this wakes the sleep below. */
                unsigned gen = atomic_load(&p->calls_gen);
                struct shmz_msg m;
                uint64_t next = shmz_port_next_deadline(p), until = MIN(deadline, next), now;
                int64_t t = 0;
                int r;

                /* Wait only while nothing was handled, and wake for the next call's deadline. */
                if (handled == 0 && timeout_ns != 0) {
                        now = now_nsec(CLOCK_MONOTONIC);
                        t = until == UINT64_MAX ? -1
                            : until > now       ? (int64_t) MIN(until - now, (uint64_t) INT64_MAX)
                                                : 0;
                }
                if (t != 0)
                        dispatch_sleep_begin(p, t < 0 ? UINT64_MAX : until);
                r = recv_timed(p, &m, t, &p->calls_gen, gen);
                if (t != 0)
                        dispatch_sleep_end(p);
                if (r == -EAGAIN || r == -ETIMEDOUT) {
                        handled += fail_calls(p, -ETIMEDOUT, true);
                        if (handled > 0)
                                return handled;
                        if (timeout_ns == 0)
                                return -EAGAIN;
                        if (deadline != UINT64_MAX && now_nsec(CLOCK_MONOTONIC) >= deadline)
                                return -ETIMEDOUT;
                        continue; /* woken for a deadline that moved: wait on */
                }
                if (r < 0) {
                        /* The peer is gone (or broke the protocol): every pending call ends. */
                        handled += fail_calls(p, -EPIPE, false);
                        return handled > 0 && r == -EPIPE ? handled : r;
                }
                if (r == 1)
                        handoff_run(p); /* a reply, queued for its call's handler */
                else
                        dispatch_one(p, &m);
                if (++handled >= DISPATCH_BATCH)
                        return handled;
        }
}

_public_ int shmz_port_dispatch(struct shmz_port *p, int64_t timeout_ns) {
        int r;

        assert_return(p, -EINVAL);
        r = port_enter(p);
        if (r < 0)
                return r;
        r = port_dispatch(p, timeout_ns);
        port_leave(p);
        return r;
}

/* ---- listeners and connections through the daemon -------------------------------------------------------- */

struct pending {
        struct shmz_msg_port_peer peer;
        int fds[2];
};

struct shmz_listener {
        struct shmz_client *client; /* the one listen() was called on: segments of accepted ports come from it */
        struct shmz_client *conn;   /* the dedicated connection */
        pthread_mutex_t lock;
        struct pending *queue;
        size_t n_queue, cap_queue;
        /*
         * Ports taken whose PORT_ACCEPTED the connection had no room for yet:
         * sent at the next accept or at close. A daemon that has notices queued
         * for us reads nothing from us until we read them, so waiting for room
         * here would wait for ourselves.
         */
        uint64_t *unsent;
        size_t n_unsent, cap_unsent;
        bool dead;
        /*
         * After a daemon restart: the connection ended (down) until the revive
         * thread published the name again on a new one (listener_resume()); a
         * name someone else took meanwhile is error, reported once.
         */
        bool published, down;
        int error;
        int epfd; /* shmz_listener_fd(): the connection (while up) and evfd, so that a new connection needs no
                   * new registration by the caller */
        int evfd; /* readable: error waits to be reported */
        uint32_t mode;
        char name[SHMZ_NAME_BUF];
};

static int params_from_peer(const struct shmz_msg_port_peer *pe, uint32_t side, struct port_params *ret) {
        *ret = (struct port_params){
                .port_id = pe->port_id,
                .token = pe->token,
                .side = pe->side,
                .peer_pid = (pid_t) pe->pid,
                .peer_uid = (uid_t) pe->uid,
                .peer_gid = (gid_t) pe->gid,
                .chunk_size = pe->chunk_size,
                .segment_chunks = pe->segment_chunks,
                .port_memory = pe->port_memory,
        };
        if (pe->side != side || !buf_is_cstr(pe->name, sizeof(pe->name)))
                return -EPROTO;
        return port_params_check(ret) < 0 ? -EPROTO : 0;
}

_public_ int shmz_port_connect(struct shmz_client *c, const char *name, struct shmz_port **ret) {
        struct shmz_msg_zone_name req;
        struct shmz_msg_port_peer pe;
        struct port_params pp;
        int fds[2] = { -EBADF, -EBADF }, r;

        assert_return(c && ret, -EINVAL);
        if (!name || !name_is_valid(name))
                return -EINVAL;
        strncpy_buf(req.name, sizeof(req.name), name);
        r = client_request_fds(c, SHMZ_MSG_PORT_CONNECT, &req, sizeof(req), &pe, sizeof(pe), fds, 2);
        if (r < 0)
                return r;
        r = params_from_peer(&pe, SHMZ_PORT_SIDE_CONNECTOR, &pp);
        if (r < 0 || fds[0] < 0 || fds[1] < 0) {
                if (fds[0] >= 0)
                        (void) shutdown(fds[0], SHUT_RDWR);
                safe_close(fds[0]);
                safe_close(fds[1]);
                /* The daemon keeps its copies of the ends until we shut ours down: closing both is enough. */
                return r < 0 ? r : -EPROTO;
        }
        return port_new(fds[0], fds[1], &pp, c, NULL, NULL, ret);
}

static void pending_close(struct pending *q) {
        if (q->fds[0] >= 0)
                (void) shutdown(q->fds[0], SHUT_RDWR);
        safe_close(q->fds[0]);
        safe_close(q->fds[1]);
}

/* Reads one message of a listener's connection fd (lock held): a NOTICE_PORT is queued. -ENOTCONN: it ended. */
static int listener_read_fd_locked(struct shmz_listener *l, int fd, uint16_t want_reply, uint32_t stream,
                                   void *ret_body, size_t body_size, bool *ret_got_reply) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h;
        int fds[PROTO_MAX_FDS], r;
        size_t size, n_fds;

        *ret_got_reply = false;
        r = proto_recv(fd, buf, sizeof(buf), &size, fds, &n_fds);
        if (r == -EAGAIN) {
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(fds[i]);
                return r;
        }
        if (r < 0) {
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(fds[i]);
                if (r == -EMSGSIZE)
                        return 0; /* dropped by proto_recv; not ours to understand */
                return -ENOTCONN;
        }
        memcpy(&h, buf, sizeof(h));
        if (h.type == SHMZ_MSG_NOTICE_PORT && !(h.flags & SHMZ_MSG_F_REPLY)) {
                struct pending q = { .fds = { -EBADF, -EBADF } };

                if (size - sizeof(h) != sizeof(q.peer) || n_fds != 2) {
                        for (size_t i = 0; i < n_fds; i++)
                                safe_close(fds[i]);
                        return 0; /* a notice that makes no sense is dropped */
                }
                memcpy(&q.peer, proto_body(buf), sizeof(q.peer));
                q.fds[0] = fds[0];
                q.fds[1] = fds[1];
                if (l->n_queue == l->cap_queue) {
                        size_t cap = MAX((size_t) 8, l->cap_queue * 2);
                        struct pending *a = realloc(l->queue, cap * sizeof(*a));

                        if (!a) {
                                pending_close(&q);
                                return -ENOMEM;
                        }
                        l->queue = a;
                        l->cap_queue = cap;
                }
                l->queue[l->n_queue++] = q;
                return 0;
        }
        for (size_t i = 0; i < n_fds; i++)
                safe_close(fds[i]);
        if (h.type == SHMZ_MSG_NOTICE_SHUTDOWN && !(h.flags & SHMZ_MSG_F_REPLY))
                return -ENOTCONN;
        if (want_reply && (h.flags & SHMZ_MSG_F_REPLY) && h.type == want_reply && h.stream == stream) {
                *ret_got_reply = true;
                if (h.status < 0)
                        return h.status;
                if (h.status > 0 || size - sizeof(h) != body_size)
                        return -EPROTO;
                memcpy(ret_body, proto_body(buf), body_size);
                return 0;
        }
        return -EPROTO;
}

/*
 * The same on the listener's connection. Once published, its end is a
 * daemon restart: the listener waits (down) for the revive thread to
 * publish it again rather than fail.
 */
static int listener_read_locked(struct shmz_listener *l, uint16_t want_reply, uint32_t stream, void *ret_body,
                                size_t body_size, bool *ret_got_reply) {
        int fd = client_fd(l->conn), r;

        r = listener_read_fd_locked(l, fd, want_reply, stream, ret_body, body_size, ret_got_reply);
        if (r == -ENOTCONN && l->published && !l->dead) {
                (void) epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
                l->down = true;
                return -EAGAIN;
        }
        if (r == -ENOTCONN || r == -EPROTO)
                l->dead = true;
        return r;
}

/* The revive's hook: PORT_LISTEN again on the new connection, whose notices may come before its reply. */
static int listener_resume(struct shmz_client *c, int fd, uint32_t *stream, void *data) {
        struct shmz_listener *l = data;
        struct shmz_msg_port_listen req = { .mode = l->mode };
        struct shmz_msg_port_info info;
        uint32_t st = ++*stream ?: ++*stream;
        bool got = false;
        int r, fl;

        (void) c;
        strncpy_buf(req.name, sizeof(req.name), l->name);
        r = proto_send(fd, SHMZ_MSG_PORT_LISTEN, 0, st, 0, &req, sizeof(req), -EBADF);
        if (r < 0)
                return -ENOTCONN;
        pthread_mutex_lock(&l->lock);
        while (r >= 0 && !got)
                r = listener_read_fd_locked(l, fd, SHMZ_MSG_PORT_LISTEN, st, &info, sizeof(info), &got);
        if (got && r < 0) {
                /* Refused (most often -EADDRINUSE: someone published the name meanwhile): told once, for good. */
                l->error = r;
                l->dead = true;
                (void) eventfd_write(l->evfd, 1);
                pthread_mutex_unlock(&l->lock);
                return -ECANCELED;
        }
        pthread_mutex_unlock(&l->lock);
        if (r < 0)
                return r == -EAGAIN ? -ENOTCONN : r;
        fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

static void listener_install(struct shmz_client *c, int old_fd, int new_fd, void *data) {
        struct shmz_listener *l = data;
        struct epoll_event ev = { .events = EPOLLIN };

        (void) c;
        pthread_mutex_lock(&l->lock);
        (void) epoll_ctl(l->epfd, EPOLL_CTL_DEL, old_fd, NULL);
        (void) epoll_ctl(l->epfd, EPOLL_CTL_ADD, new_fd, &ev);
        /* Ports taken before the restart: that daemon forgot them, this one never knew them. */
        l->n_unsent = 0;
        l->down = false;
        pthread_mutex_unlock(&l->lock);
}

static const struct client_revive_ops listener_revive_ops = {
        .resume = listener_resume,
        .install = listener_install,
};

_public_ int shmz_port_listen(struct shmz_client *c, const char *name, mode_t mode, struct shmz_listener **ret) {
        struct shmz_msg_port_listen req = { .mode = (uint32_t) mode };
        struct shmz_msg_port_info info;
        struct shmz_listener *l;
        int r;

        assert_return(c && ret, -EINVAL);
        if (!name || !name_is_valid(name) || (mode & ~(mode_t) 07777))
                return -EINVAL;
        strncpy_buf(req.name, sizeof(req.name), name);

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        (void) pthread_mutex_init(&l->lock, NULL);
        l->mode = req.mode;
        strncpy_buf(l->name, sizeof(l->name), name);
        l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (l->evfd < 0 || l->epfd < 0 ||
            epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->evfd, &(struct epoll_event){ .events = EPOLLIN }) < 0) {
                r = -errno;
                shmz_listener_close(l);
                return r;
        }
        /* A connection of its own: NOTICE_PORTs arrive there whenever, and c stays request/reply. */
        r = shmz_connect(client_path(c), &l->conn);
        if (r < 0) {
                shmz_listener_close(l);
                return r;
        }
        l->client = client_ref(c);
        /* Stream 1 was the hello's. */
        r = proto_send(client_fd(l->conn), SHMZ_MSG_PORT_LISTEN, 0, 2, 0, &req, sizeof(req), -EBADF);
        for (bool got = false; r >= 0 && !got;)
                r = listener_read_locked(l, SHMZ_MSG_PORT_LISTEN, 2, &info, sizeof(info), &got);
        if (r < 0) {
                shmz_listener_close(l);
                return r == -EPIPE || r == -ECONNRESET ? -ENOTCONN : r;
        }
        /* From now on reads must not block: several threads may accept. */
        r = fcntl(client_fd(l->conn), F_GETFL);
        if (r < 0 || fcntl(client_fd(l->conn), F_SETFL, r | O_NONBLOCK) < 0 ||
            epoll_ctl(l->epfd, EPOLL_CTL_ADD, client_fd(l->conn), &(struct epoll_event){ .events = EPOLLIN }) < 0) {
                r = -errno;
                shmz_listener_close(l);
                return r;
        }
        /* From now on a daemon restart is waited out: the revive thread publishes the name again. */
        l->published = true;
        client_set_revive_ops(l->conn, &listener_revive_ops, l);
        client_watch(l->conn);
        *ret = l;
        return 0;
}

_public_ int shmz_listener_fd(const struct shmz_listener *l) {
        assert_return(l, -EINVAL);
        return l->epfd;
}

int listener_socket_fd(const struct shmz_listener *l) {
        return client_fd(l->conn);
}

/* Sends what PORT_ACCEPTED it can without waiting (lock held); they are independent, so last first. */
static void listener_flush_locked(struct shmz_listener *l) {
        while (l->n_unsent > 0) {
                struct shmz_msg_port_ref ref = { .port_id = l->unsent[l->n_unsent - 1] };
                int r = proto_send(client_fd(l->conn), SHMZ_MSG_PORT_ACCEPTED, 0, 0, 0, &ref, sizeof(ref), -EBADF);

                if (r == -EAGAIN)
                        return;
                /* Sent, or the connection is gone (and with it every port not accepted: nothing to tell). */
                l->n_unsent--;
        }
}

/* Tells the daemon a port was taken (the daemon counts it accepted, and no longer drops it with the listener). */
static void listener_accepted(struct shmz_listener *l, uint64_t port_id) {
        struct shmz_msg_port_ref ref = { .port_id = port_id };

        pthread_mutex_lock(&l->lock);
        if (l->n_unsent == l->cap_unsent) {
                size_t cap = MAX((size_t) 8, l->cap_unsent * 2);
                uint64_t *a = realloc(l->unsent, cap * sizeof(*a));

                if (!a) {
                        /* Out of memory: one try now; a port not counted accepted ends with the listener. */
                        (void) proto_send(client_fd(l->conn), SHMZ_MSG_PORT_ACCEPTED, 0, 0, 0, &ref, sizeof(ref),
                                          -EBADF);
                        pthread_mutex_unlock(&l->lock);
                        return;
                }
                l->unsent = a;
                l->cap_unsent = cap;
        }
        l->unsent[l->n_unsent++] = port_id;
        listener_flush_locked(l);
        pthread_mutex_unlock(&l->lock);
}

_public_ int shmz_port_accept(struct shmz_listener *l, int64_t timeout_ns, struct shmz_port **ret) {
        uint64_t deadline;

        assert_return(l && ret, -EINVAL);
        deadline = deadline_of(timeout_ns);
        for (;;) {
                struct pending q;
                struct port_params pp;
                bool got;
                int r = 0;

                pthread_mutex_lock(&l->lock);
                if (!l->down)
                        listener_flush_locked(l);
                while (l->n_queue == 0 && r >= 0 && !l->dead && !l->down)
                        r = listener_read_locked(l, 0, 0, NULL, 0, &got);
                if (l->n_queue > 0) {
                        q = l->queue[0];
                        memmove(l->queue, l->queue + 1, --l->n_queue * sizeof(*l->queue));
                        r = 1;
                } else if (l->error < 0) {
                        /* Not published again after a restart: said once, -ENOTCONN after. */
                        r = l->error;
                        l->error = 0;
                        (void) eventfd_read(l->evfd, &(eventfd_t){ 0 });
                } else if (l->dead)
                        r = -ENOTCONN;
                else if (l->down)
                        r = -EAGAIN; /* the daemon restarts: the revive thread brings the name back */
                pthread_mutex_unlock(&l->lock);

                if (r == 1) {
                        r = params_from_peer(&q.peer, SHMZ_PORT_SIDE_ACCEPTOR, &pp);
                        if (r < 0) {
                                pending_close(&q);
                                continue; /* the daemon's problem, not the next connection's */
                        }
                        if (peer_refused(pp.peer_uid)) {
                                /* Shut down: the connector sees the end, the daemon drops the port. */
                                pending_close(&q);
                                listener_accepted(l, pp.port_id);
                                continue;
                        }
                        r = port_new(q.fds[0], q.fds[1], &pp, l->client, NULL, NULL, ret);
                        if (r < 0)
                                return r;
                        listener_accepted(l, pp.port_id);
                        return 0;
                }
                if (r != -EAGAIN)
                        return r;
                if (timeout_ns == 0)
                        return -EAGAIN;
                r = wait_fd(l->epfd, POLLIN, deadline);
                if (r < 0)
                        return r;
        }
}

/*
 * Ends the listener's connection and waits (a while) for the daemon to close
 * its side, which it does after unpublishing the name and shutting down the
 * connections never accepted: once we return, the name is free again.
 * Notices that still come are dropped, their ends shut down.
 */
/* Reads one message of the daemon's and drops it (a notice's socket end: its connector sees the end). */
static int listener_discard_one(int fd) {
        uint8_t buf[SHMZ_MSG_MAX];
        int fds[PROTO_MAX_FDS], r;
        size_t size, n_fds;

        r = proto_recv(fd, buf, sizeof(buf), &size, fds, &n_fds);
        for (size_t i = 0; i < n_fds; i++) {
                (void) shutdown(fds[i], SHUT_RDWR);
                safe_close(fds[i]);
        }
        return r == -EMSGSIZE || r == -EBADMSG ? 0 : r;
}

static void listener_hang_up(struct shmz_listener *l) {
        uint64_t deadline = now_nsec(CLOCK_MONOTONIC) + UINT64_C(2000000000);
        int fd = client_fd(l->conn);

        /*
         * Ports taken must reach the daemon before the hang-up, or it would end
         * them with the listener. Reading what it still sends lets it read us.
         */
        while (l->n_unsent > 0) {
                struct pollfd pfd = { .fd = fd, .events = POLLIN | POLLOUT };
                uint64_t now = now_nsec(CLOCK_MONOTONIC);
                int r;

                listener_flush_locked(l);
                if (l->n_unsent == 0 || now >= deadline)
                        break;
                r = poll(&pfd, 1, (int) MIN((deadline - now) / 1000000 + 1, (uint64_t) INT_MAX));
                if (r < 0 && errno != EINTR)
                        return;
                if (r > 0 && (pfd.revents & POLLIN)) {
                        r = listener_discard_one(fd);
                        if (r < 0 && r != -EAGAIN)
                                return;
                }
        }
        if (shutdown(fd, SHUT_WR) < 0)
                return;
        for (;;) {
                int r;

                if (wait_fd(fd, POLLIN, deadline) < 0)
                        return;
                r = listener_discard_one(fd);
                if (r < 0 && r != -EAGAIN)
                        return; /* end of file (or the connection broke): the daemon is done with it */
        }
}

_public_ void shmz_listener_close(struct shmz_listener *l) {
        if (!l)
                return;
        /* No revive from now on (one under way ends first: it uses l). */
        if (l->conn)
                client_set_revive_ops(l->conn, NULL, NULL);
        for (size_t i = 0; i < l->n_queue; i++)
                pending_close(&l->queue[i]);
        free(l->queue);
        if (l->conn && !l->dead && !l->down)
                listener_hang_up(l);
        free(l->unsent);
        /* Closing the connection unpublishes the name; the daemon shuts down ports never accepted. */
        shmz_disconnect(l->conn);
        client_unref(l->client);
        safe_close(l->epfd);
        safe_close(l->evfd);
        (void) pthread_mutex_destroy(&l->lock);
        free(l);
}

/* ---- listings ----------------------------------------------------------------------------------- */

struct port_list_ctx {
        int (*cb)(const struct shmz_msg_port_info *pi, void *userdata);
        void *userdata;
};

static int port_list_one(const void *reply, void *userdata) {
        struct port_list_ctx *ctx = userdata;
        struct shmz_msg_port_info pi;

        memcpy(&pi, reply, sizeof(pi));
        pi.name[sizeof(pi.name) - 1] = 0; /* the callee may treat it as a string whatever came */
        return ctx->cb(&pi, ctx->userdata);
}

_public_ int shmz_port_list(struct shmz_client *c, int (*cb)(const struct shmz_msg_port_info *pi, void *userdata),
                            void *userdata) {
        struct port_list_ctx ctx = { .cb = cb, .userdata = userdata };

        assert_return(c && cb, -EINVAL);
        return client_request_run(c, SHMZ_MSG_PORT_LIST, NULL, 0, sizeof(struct shmz_msg_port_info), port_list_one,
                                  &ctx);
}

struct segment_list_ctx {
        int (*cb)(const struct shmz_msg_segment_info *si, void *userdata);
        void *userdata;
};

static int segment_list_one(const void *reply, void *userdata) {
        struct segment_list_ctx *ctx = userdata;
        struct shmz_msg_segment_info si;

        memcpy(&si, reply, sizeof(si));
        return ctx->cb(&si, ctx->userdata);
}

_public_ int shmz_segment_list(struct shmz_client *c, int (*cb)(const struct shmz_msg_segment_info *si, void *userdata),
                               void *userdata) {
        struct segment_list_ctx ctx = { .cb = cb, .userdata = userdata };

        assert_return(c && cb, -EINVAL);
        return client_request_run(c, SHMZ_MSG_SEGMENT_LIST, NULL, 0, sizeof(struct shmz_msg_segment_info),
                                  segment_list_one, &ctx);
}
