/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The daemon's port requests on the raw wire (no library): listen, connect,
 * the notice with both fds, segments, listings, status, the watch on both
 * processes, and requests a hostile client makes.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534
#define CHUNK 4096u
#define CHUNKS 16u
#define SEG_BYTES (SHMZ_SEGMENT_HEADER_SIZE + CHUNK * CHUNKS)

static struct daemon_proc d;

/* The daemon must stop cleanly: exit 0, nothing from the sanitizers (leaks of ports, watches, segments). */
static void stop(void) {
        harness_stop_clean(&d);
}

static void start(void) {
        harness_init(&d, "[daemon]\nchunk_size = 4K\nsegment_chunks = 16\nport_memory = 128K\nport_backlog = 2\n"
                         "max_ports_per_uid = 256\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

TestSuite(portd, .init = start, .fini = stop, .timeout = 60);

struct reply {
        struct shmz_msg_header h;
        uint8_t body[SHMZ_MSG_MAX];
        size_t body_size;
        int fds[4];
        size_t n_fds;
};

static int send_raw(int fd, uint16_t type, uint32_t stream, const void *body, size_t size) {
        uint8_t buf[SHMZ_MSG_MAX + 64];
        struct shmz_msg_header h = { .size = (uint32_t) (sizeof(h) + size), .type = type, .stream = stream };

        memcpy(buf, &h, sizeof(h));
        if (size > 0)
                memcpy(buf + sizeof(h), body, size);
        return send(fd, buf, sizeof(h) + size, MSG_NOSIGNAL) == (ssize_t) (sizeof(h) + size) ? 0 : -errno;
}

/* One message with its fds; false on timeout or end of stream. */
static bool recv_msg(int fd, struct reply *r, int timeout_ms) {
        uint8_t buf[SHMZ_MSG_MAX];
        union {
                struct cmsghdr c;
                uint8_t b[CMSG_SPACE(sizeof(int) * 4)];
        } control;
        struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
        struct msghdr mh = {
                .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)
        };
        struct pollfd p = { .fd = fd, .events = POLLIN };
        ssize_t n;

        memset(r, 0, sizeof(*r));
        if (poll(&p, 1, timeout_ms) != 1)
                return false;
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < (ssize_t) sizeof(r->h))
                return false;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

                        for (size_t i = 0; i < k && r->n_fds < 4; i++)
                                memcpy(&r->fds[r->n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                }
        memcpy(&r->h, buf, sizeof(r->h));
        cr_assert_eq(r->h.size, (uint32_t) n);
        r->body_size = (size_t) n - sizeof(r->h);
        memcpy(r->body, buf + sizeof(r->h), r->body_size);
        return true;
}

/* A request and its reply (notices that come first are left out: a listener's connection is not used here). */
static void request(int fd, uint16_t type, const void *body, size_t size, struct reply *r) {
        static uint32_t stream = 100;

        cr_assert_eq(send_raw(fd, type, ++stream, body, size), 0);
        cr_assert(recv_msg(fd, r, 5000), "no reply to type %u", type);
        cr_assert_eq(r->h.type, type);
        cr_assert_eq(r->h.stream, stream);
        cr_assert(r->h.flags & SHMZ_MSG_F_REPLY);
}

static int raw_client(void) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct reply r;
        int fd = harness_raw_connect(d.socket);

        cr_assert_geq(fd, 0);
        request(fd, SHMZ_MSG_HELLO, &hello, sizeof(hello), &r);
        cr_assert_eq(r.h.status, 0);
        return fd;
}

static int listen_on(const char *name, uint32_t mode) {
        struct shmz_msg_port_listen m = { .mode = mode };
        struct shmz_msg_port_info info;
        struct reply r;
        int fd = raw_client();

        strncpy(m.name, name, sizeof(m.name) - 1);
        request(fd, SHMZ_MSG_PORT_LISTEN, &m, sizeof(m), &r);
        cr_assert_eq(r.h.status, 0, "listen: %d", r.h.status);
        cr_assert_eq(r.body_size, sizeof(info));
        memcpy(&info, r.body, sizeof(info));
        cr_assert_str_eq(info.name, name);
        cr_assert_eq(info.port_id, 0u);
        cr_assert_eq(info.mode, mode);
        cr_assert_eq(info.pid[1], (uint32_t) getpid());
        return fd;
}

/* PORT_CONNECT: status, and on success the peer message and both fds. */
static int connect_to(int fd, const char *name, struct shmz_msg_port_peer *peer, int *sock, int *chan) {
        struct shmz_msg_zone_name m = {};
        struct reply r;

        strncpy(m.name, name, sizeof(m.name) - 1);
        request(fd, SHMZ_MSG_PORT_CONNECT, &m, sizeof(m), &r);
        if (r.h.status < 0) {
                cr_assert_eq(r.n_fds, 0u);
                return r.h.status;
        }
        cr_assert_eq(r.body_size, sizeof(*peer));
        cr_assert_eq(r.n_fds, 2u);
        memcpy(peer, r.body, sizeof(*peer));
        *sock = r.fds[0];
        *chan = r.fds[1];
        return 0;
}

static void expect_notice(int lfd, struct shmz_msg_port_peer *peer, int *sock, int *chan) {
        struct reply r;

        cr_assert(recv_msg(lfd, &r, 5000), "no notice");
        cr_assert_eq(r.h.type, SHMZ_MSG_NOTICE_PORT);
        cr_assert_eq(r.h.stream, 0u);
        cr_assert_eq(r.h.flags, 0u);
        cr_assert_eq(r.body_size, sizeof(*peer));
        cr_assert_eq(r.n_fds, 2u);
        memcpy(peer, r.body, sizeof(*peer));
        *sock = r.fds[0];
        *chan = r.fds[1];
}

static struct shmz_msg_status status(void) {
        struct shmz_msg_status st;
        struct reply r;
        int fd = raw_client();

        request(fd, SHMZ_MSG_STATUS, NULL, 0, &r);
        cr_assert_eq(r.h.status, 0);
        cr_assert_eq(r.body_size, sizeof(st));
        memcpy(&st, r.body, sizeof(st));
        close(fd);
        return st;
}

/* Polls status until no port, listener or segment is left (the watch works asynchronously). */
static struct shmz_msg_status wait_empty(void) {
        struct shmz_msg_status st;

        for (int i = 0; i < 500; i++) {
                st = status();
                if (st.ports == 0 && st.segments == 0 && st.listeners == 0 && st.segment_bytes == 0)
                        return st;
                usleep(10000);
        }
        cr_assert_fail("ports %lu segments %lu listeners %lu left", (unsigned long) st.ports,
                       (unsigned long) st.segments, (unsigned long) st.listeners);
        return st;
}

static void check_channel(int fd, uint64_t port_id) {
        struct stat st;
        const struct shmz_channel *ch;

        cr_assert_eq(fstat(fd, &st), 0);
        cr_assert_eq(st.st_size, SHMZ_CHANNEL_SIZE);
        cr_assert_eq(fcntl(fd, F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
        ch = mmap(NULL, SHMZ_CHANNEL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        cr_assert_neq(ch, MAP_FAILED);
        cr_assert_eq(ch->magic, SHMZ_CHANNEL_MAGIC);
        cr_assert_eq(ch->abi_version, SHMZ_ABI_VERSION);
        cr_assert_eq(ch->size, SHMZ_CHANNEL_SIZE);
        cr_assert_eq(ch->port_id, port_id);
        cr_assert_eq(ch->closed, 0u);
        munmap((void *) ch, SHMZ_CHANNEL_SIZE);
}

static int segment_create(int fd, uint64_t port_id, uint64_t token, uint32_t side, struct shmz_msg_segment_info *info,
                          int *seg) {
        struct shmz_msg_port_ref m = { .port_id = port_id, .token = token, .side = side };
        struct reply r;

        request(fd, SHMZ_MSG_SEGMENT_CREATE, &m, sizeof(m), &r);
        if (r.h.status < 0) {
                cr_assert_eq(r.n_fds, 0u);
                return r.h.status;
        }
        cr_assert_eq(r.body_size, sizeof(*info));
        cr_assert_eq(r.n_fds, 1u);
        memcpy(info, r.body, sizeof(*info));
        *seg = r.fds[0];
        return 0;
}

/* The PORT_LIST entry of listener name, waiting (PORT_ACCEPTED is one-way) until its backlog is want. */
static struct shmz_msg_port_info listener_entry(int fd, const char *name, uint32_t want_backlog) {
        struct shmz_msg_port_info pi = {}, found = {};

        for (int i = 0; i < 200; i++) {
                struct reply r;
                bool seen = false;

                request(fd, SHMZ_MSG_PORT_LIST, NULL, 0, &r);
                cr_assert_eq(r.h.status, 0);
                while (!(r.h.flags & SHMZ_MSG_F_LAST)) {
                        cr_assert_eq(r.body_size, sizeof(pi));
                        memcpy(&pi, r.body, sizeof(pi));
                        if (pi.port_id == 0 && streq(pi.name, name)) {
                                found = pi;
                                seen = true;
                        }
                        cr_assert(recv_msg(fd, &r, 5000));
                }
                cr_assert_eq(r.body_size, 0u);
                if (seen && found.backlog == want_backlog)
                        return found;
                usleep(10000);
        }
        cr_assert_fail("listener %s: backlog %u, want %u", name, found.backlog, want_backlog);
        return found;
}

static void accepted(int lfd, uint64_t port_id) {
        struct shmz_msg_port_ref m = { .port_id = port_id };

        cr_assert_eq(send_raw(lfd, SHMZ_MSG_PORT_ACCEPTED, 0, &m, sizeof(m)), 0);
}

Test(portd, listen_connect_notice_segment_lists) {
        struct shmz_msg_port_peer cp, ap;
        struct shmz_msg_segment_info si;
        struct shmz_msg_status st;
        struct reply r;
        int lfd, cfd, csock, cchan, asock, achan, seg;
        char buf[16];

        lfd = listen_on("svc", 0666);
        cfd = raw_client();
        cr_assert_eq(connect_to(cfd, "svc", &cp, &csock, &cchan), 0);
        cr_assert_eq(cp.side, SHMZ_PORT_SIDE_CONNECTOR);
        cr_assert_eq(cp.pid, (uint32_t) getpid());
        cr_assert_eq(cp.uid, 0u);
        cr_assert_eq(cp.chunk_size, CHUNK);
        cr_assert_eq(cp.segment_chunks, CHUNKS);
        cr_assert_eq(cp.port_memory, 128u << 10);
        cr_assert_str_eq(cp.name, "svc");
        expect_notice(lfd, &ap, &asock, &achan);
        cr_assert_eq(ap.side, SHMZ_PORT_SIDE_ACCEPTOR);
        cr_assert_eq(ap.port_id, cp.port_id);
        cr_assert_neq(ap.token, cp.token);
        cr_assert_str_eq(ap.name, "svc");
        check_channel(cchan, cp.port_id);
        check_channel(achan, cp.port_id);

        /* The ends are a pair: a datagram goes straight across. */
        cr_assert_eq(send(csock, "ping", 4, 0), 4);
        cr_assert_eq(recv(asock, buf, sizeof(buf), 0), 4);
        cr_assert_eq(memcmp(buf, "ping", 4), 0);
        accepted(lfd, ap.port_id);

        /* A segment: sealed, of the configured size, its header filled, its bitmap clear. */
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), 0);
        {
                struct stat s;
                struct shmz_segment_header h;

                cr_assert_eq(fstat(seg, &s), 0);
                cr_assert_eq((uint64_t) s.st_size, (uint64_t) SEG_BYTES);
                cr_assert_eq(si.map_size, (uint64_t) SEG_BYTES);
                cr_assert_eq(fcntl(seg, F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
                cr_assert_eq(fcntl(seg, F_GETFL) & O_ACCMODE, O_RDWR);
                cr_assert_eq(pread(seg, &h, sizeof(h), 0), (ssize_t) sizeof(h));
                cr_assert_eq(h.magic, SHMZ_SEGMENT_MAGIC);
                cr_assert_eq(h.id, si.id);
                cr_assert_eq(h.port_id, cp.port_id);
                cr_assert_eq(h.chunk_size, CHUNK);
                cr_assert_eq(h.n_chunks, CHUNKS);
                for (size_t i = 0; i < ELEMENTSOF(h.used); i++)
                        cr_assert_eq(h.used[i], 0u);
                /* Mark two chunks used: status counts them from the bitmap. */
                h.used[0] = 3;
                cr_assert_eq(pwrite(seg, &h.used[0], 8, offsetof(struct shmz_segment_header, used)), 8);
        }
        cr_assert_eq(si.owner_pid, (uint32_t) getpid());
        cr_assert_eq(si.side, 0u);
        cr_assert_eq(si.slot, 0u);

        st = status();
        cr_assert_eq(st.listeners, 1u);
        cr_assert_eq(st.ports, 1u);
        cr_assert_eq(st.segments, 1u);
        cr_assert_eq(st.segment_bytes, (uint64_t) SEG_BYTES);
        cr_assert_eq(st.chunks, CHUNKS);
        cr_assert_eq(st.chunks_used, 2u);

        /* PORT_LIST: the listener, then the connection; SEGMENT_LIST: the segment. */
        (void) listener_entry(cfd, "svc", 0);
        request(cfd, SHMZ_MSG_PORT_LIST, NULL, 0, &r);
        cr_assert_eq(r.h.status, 0);
        {
                struct shmz_msg_port_info pi;

                memcpy(&pi, r.body, sizeof(pi));
                cr_assert_str_eq(pi.name, "svc");
                cr_assert_eq(pi.port_id, 0u);
                cr_assert_eq(pi.connections, 1u);
                cr_assert_eq(pi.backlog, 0u);
                cr_assert(recv_msg(cfd, &r, 5000));
                memcpy(&pi, r.body, sizeof(pi));
                cr_assert_eq(pi.port_id, cp.port_id);
                cr_assert_eq(pi.segments, 1u);
                cr_assert_eq(pi.chunks_in_flight[0], 2u);
                cr_assert(recv_msg(cfd, &r, 5000));
                cr_assert_eq(r.h.flags, SHMZ_MSG_F_REPLY | SHMZ_MSG_F_LAST);
                cr_assert_eq(r.body_size, 0u);
        }
        request(cfd, SHMZ_MSG_SEGMENT_LIST, NULL, 0, &r);
        {
                struct shmz_msg_segment_info li;

                cr_assert_eq(r.body_size, sizeof(li));
                memcpy(&li, r.body, sizeof(li));
                cr_assert_eq(li.id, si.id);
                cr_assert_eq(li.chunks_used, 2u);
                cr_assert(recv_msg(cfd, &r, 5000));
                cr_assert_eq(r.h.flags, SHMZ_MSG_F_REPLY | SHMZ_MSG_F_LAST);
        }

        /* A side closes the port (shutdown): the daemon drops it and its segment, the peer sees end of file. */
        cr_assert_eq(shutdown(csock, SHUT_RDWR), 0);
        cr_assert_eq(recv(asock, buf, sizeof(buf), 0), 0);
        close(lfd);
        st = wait_empty();
        cr_assert_eq(st.ports_closed, 1u);
        cr_assert_eq(st.peers_died, 0u);
        close(seg);
        close(csock);
        close(cchan);
        close(asock);
        close(achan);
        close(cfd);
}

struct sleeper {
        uint32_t *word;
        uint32_t seen;
        bool woken;
};

static void *sleep_on(void *arg) {
        struct sleeper *s = arg;
        struct timespec ts = { .tv_sec = 5 };

        /* Shared (not private) futex: the daemon wakes it through its own mapping. */
        while (__atomic_load_n(s->word, __ATOMIC_ACQUIRE) == s->seen) {
                long r = syscall(SYS_futex, s->word, FUTEX_WAIT, s->seen, &ts, NULL, 0);

                if (r < 0 && errno == ETIMEDOUT)
                        return NULL;
        }
        s->woken = true;
        return NULL;
}

Test(portd, killed_connector_gives_eof_within_10ms) {
        struct shmz_msg_port_peer ap;
        struct shmz_msg_status st;
        int lfd, asock, achan, pipefd[2];
        char buf[16];
        pid_t pid;
        uint64_t t0, dt;
        struct shmz_channel *ch;

        lfd = listen_on("svc", 0666);
        cr_assert_eq(pipe(pipefd), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_msg_port_peer cp;
                struct shmz_msg_segment_info si;
                int cfd = raw_client(), csock, cchan, seg;

                close(pipefd[0]);
                if (connect_to(cfd, "svc", &cp, &csock, &cchan) < 0)
                        _exit(1);
                if (segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg) < 0)
                        _exit(2);
                if (send(csock, "last", 4, 0) != 4)
                        _exit(3);
                (void) !write(pipefd[1], "r", 1);
                for (;;)
                        pause();
        }
        close(pipefd[1]);
        cr_assert_eq(read(pipefd[0], buf, 1), 1, "the connector failed");
        close(pipefd[0]);
        expect_notice(lfd, &ap, &asock, &achan);
        accepted(lfd, ap.port_id);
        ch = mmap(NULL, SHMZ_CHANNEL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, achan, 0);
        cr_assert_neq(ch, MAP_FAILED);
        uint32_t seq0 = ch->dir[1].release_seq;
        cr_assert_eq(status().segments, 1u);
        /* A sender asleep for memory, as the library sleeps: it must be woken when the port ends. */
        struct sleeper sl = { .word = &ch->dir[1].release_seq, .seen = seq0 };
        pthread_t sleeper_thread;
        cr_assert_eq(pthread_create(&sleeper_thread, NULL, sleep_on, &sl), 0);

        /*
         * Two figures: from kill() (includes the kernel tearing the process
         * down, slow for a sanitized one), and from the moment its pidfd says
         * it is dead (the daemon's part). The daemon's part is held to 10 ms.
         */
        int pidfd = (int) syscall(SYS_pidfd_open, pid, 0);
        uint64_t t_dead;

        cr_assert_geq(pidfd, 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(kill(pid, SIGKILL), 0);
        {
                struct pollfd p = { .fd = pidfd, .events = POLLIN };

                cr_assert_eq(poll(&p, 1, 5000), 1);
                t_dead = now_nsec(CLOCK_MONOTONIC);
        }
        /* What was queued first, then end of file. */
        {
                struct pollfd p = { .fd = asock, .events = POLLIN };

                cr_assert_eq(poll(&p, 1, 5000), 1);
                cr_assert_eq(recv(asock, buf, sizeof(buf), 0), 4);
                cr_assert_eq(memcmp(buf, "last", 4), 0);
                cr_assert_eq(poll(&p, 1, 5000), 1);
                cr_assert_eq(recv(asock, buf, sizeof(buf), MSG_DONTWAIT), 0);
        }
        dt = now_nsec(CLOCK_MONOTONIC) - t0;
        fprintf(stderr, "FIGURE kill_to_eof_us %lu death_to_eof_us %lu\n", (unsigned long) (dt / 1000),
                (unsigned long) ((now_nsec(CLOCK_MONOTONIC) - t_dead) / 1000));
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t_dead, 10000000u, "end of file %lu us after the death",
                     (unsigned long) ((now_nsec(CLOCK_MONOTONIC) - t_dead) / 1000));
        cr_assert_lt(dt, 50000000u, "end of file %lu us after the kill", (unsigned long) (dt / 1000));
        close(pidfd);
        cr_assert_eq(waitpid(pid, NULL, 0), pid);

        /* The channel says closed and both release words moved (sleeping senders were woken). */
        for (int i = 0; i < 100 && !__atomic_load_n(&ch->closed, __ATOMIC_ACQUIRE); i++)
                usleep(1000);
        cr_assert_eq(ch->closed, 1u);
        cr_assert_neq(ch->dir[1].release_seq, seq0);
        pthread_join(sleeper_thread, NULL);
        cr_assert(sl.woken, "the sleeping sender was not woken");
        munmap(ch, SHMZ_CHANNEL_SIZE);

        close(lfd);
        st = wait_empty();
        cr_assert_eq(st.peers_died, 1u);
        cr_assert_eq(st.ports_closed, 1u);
        close(asock);
        close(achan);
}

Test(portd, killed_acceptor_gives_connector_eof) {
        struct shmz_msg_port_peer cp;
        int cfd, csock, cchan, pipefd[2];
        char buf[8];
        pid_t pid;

        cr_assert_eq(pipe(pipefd), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                int lfd = listen_on("svc", 0666), asock, achan;
                struct shmz_msg_port_peer ap;

                close(pipefd[0]);
                (void) !write(pipefd[1], "l", 1);
                expect_notice(lfd, &ap, &asock, &achan);
                accepted(lfd, ap.port_id);
                for (;;)
                        pause();
        }
        close(pipefd[1]);
        cr_assert_eq(read(pipefd[0], buf, 1), 1);
        close(pipefd[0]);
        cfd = raw_client();
        cr_assert_eq(connect_to(cfd, "svc", &cp, &csock, &cchan), 0);
        cr_assert_eq(cp.pid, (uint32_t) pid);
        (void) listener_entry(cfd, "svc", 0); /* the child took its port */
        cr_assert_eq(kill(pid, SIGKILL), 0);
        {
                struct pollfd p = { .fd = csock, .events = POLLIN };

                cr_assert_eq(poll(&p, 1, 5000), 1);
                cr_assert_eq(recv(csock, buf, sizeof(buf), MSG_DONTWAIT), 0);
        }
        cr_assert_eq(waitpid(pid, NULL, 0), pid);
        cr_assert_eq(wait_empty().peers_died, 1u);
        close(csock);
        close(cchan);
        close(cfd);
}

Test(portd, closing_the_listener_shuts_unaccepted_ports) {
        struct shmz_msg_port_peer cp[3], ap;
        int lfd, cfd, csock[3], cchan[3], asock, achan;
        char buf[8];

        lfd = listen_on("svc", 0666);
        cfd = raw_client();
        cr_assert_eq(connect_to(cfd, "svc", &cp[0], &csock[0], &cchan[0]), 0);
        cr_assert_eq(connect_to(cfd, "svc", &cp[1], &csock[1], &cchan[1]), 0);
        /* port_backlog = 2 */
        cr_assert_eq(connect_to(cfd, "svc", &cp[2], &csock[2], &cchan[2]), -EAGAIN);
        expect_notice(lfd, &ap, &asock, &achan);
        accepted(lfd, ap.port_id);
        close(asock);
        close(achan);
        expect_notice(lfd, &ap, &asock, &achan);
        close(asock);
        close(achan);
        /* One accepted: room for another. */
        (void) listener_entry(cfd, "svc", 1);
        cr_assert_eq(connect_to(cfd, "svc", &cp[2], &csock[2], &cchan[2]), 0);

        close(lfd);
        /* The two never accepted end; the accepted one lives on (its acceptor holds... nothing: closed above). */
        for (int i = 1; i < 3; i++) {
                struct pollfd p = { .fd = csock[i], .events = POLLIN };

                cr_assert_eq(poll(&p, 1, 5000), 1, "port %d still open", i);
                cr_assert_eq(recv(csock[i], buf, sizeof(buf), MSG_DONTWAIT), 0);
        }
        {
                struct shmz_msg_status st = status();

                for (int i = 0; i < 200 && (st.ports != 1 || st.listeners != 0); i++) {
                        usleep(10000);
                        st = status();
                }
                cr_assert_eq(st.listeners, 0u);
                cr_assert_eq(st.ports, 1u);
        }
        /* The name is free again at once. */
        int lfd2 = listen_on("svc", 0600);
        close(lfd2);
        cr_assert_eq(shutdown(csock[0], SHUT_RDWR), 0);
        wait_empty();
        for (int i = 0; i < 3; i++) {
                close(csock[i]);
                close(cchan[i]);
        }
        close(cfd);
}

static int connect_as_nobody(void *userdata) {
        struct shmz_msg_port_peer cp;
        int fd = raw_client(), s, ch;

        return -connect_to(fd, userdata, &cp, &s, &ch);
}

Test(portd, hostile_requests) {
        struct shmz_msg_port_peer cp, ap;
        struct shmz_msg_segment_info si;
        struct reply r;
        int lfd, cfd, csock, cchan, asock, achan, seg;

        lfd = listen_on("svc", 0600);
        cfd = raw_client();

        /* ACL: mode 0600, root's: nobody may not connect; 0602 lets it. */
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, connect_as_nobody, "svc"), EACCES);
        int lfd2 = listen_on("open", 0602);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, connect_as_nobody, "open"), 0);
        close(lfd2);

        /* Names: unknown, not terminated, not a name. */
        cr_assert_eq(connect_to(cfd, "nope", &cp, &csock, &cchan), -ENOENT);
        cr_assert_eq(connect_to(cfd, "a/b", &cp, &csock, &cchan), -EINVAL);
        {
                struct shmz_msg_zone_name m;

                memset(m.name, 'a', sizeof(m.name));
                request(cfd, SHMZ_MSG_PORT_CONNECT, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EINVAL);
                /* A body of the wrong size. */
                request(cfd, SHMZ_MSG_PORT_CONNECT, &m, sizeof(m) - 1, &r);
                cr_assert_eq(r.h.status, -EBADMSG);
        }
        {
                struct shmz_msg_port_listen m = { .mode = 0666 };
                int fd = raw_client();

                memset(m.name, 'x', sizeof(m.name));
                request(fd, SHMZ_MSG_PORT_LISTEN, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EINVAL);
                strcpy(m.name, "svc");
                request(fd, SHMZ_MSG_PORT_LISTEN, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EADDRINUSE);
                strcpy(m.name, "other");
                m.mode = 01666;
                request(fd, SHMZ_MSG_PORT_LISTEN, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EINVAL);
                m.mode = 0666;
                m.reserved = 1;
                request(fd, SHMZ_MSG_PORT_LISTEN, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EINVAL);
                close(fd);
        }

        cr_assert_eq(connect_to(cfd, "svc", &cp, &csock, &cchan), 0);
        expect_notice(lfd, &ap, &asock, &achan);

        /* Segments: a bad token, the wrong side's token, an unknown port, a side that does not exist. */
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token + 1, 0, &si, &seg), -EPERM);
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 1, &si, &seg), -EPERM);
        cr_assert_eq(segment_create(cfd, cp.port_id, ap.token, 0, &si, &seg), -EPERM);
        cr_assert_eq(segment_create(cfd, cp.port_id + 1000, cp.token, 0, &si, &seg), -ENOENT);
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 2, &si, &seg), -EINVAL);
        {
                struct shmz_msg_port_ref m = { .port_id = cp.port_id, .token = cp.token, .reserved = 9 };

                request(cfd, SHMZ_MSG_SEGMENT_CREATE, &m, sizeof(m), &r);
                cr_assert_eq(r.h.status, -EINVAL);
        }
        /* port_memory = 128K holds one segment of 16 x 4K (+ header) per direction. */
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), 0);
        close(seg);
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), 0);
        close(seg);
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), -ENOSPC);
        /* The acceptor's direction, on any connection that knows its token. */
        cr_assert_eq(segment_create(cfd, ap.port_id, ap.token, 1, &si, &seg), 0);
        cr_assert_eq(si.side, 1u);
        close(seg);

        /* A client may not send a notice; PORT_ACCEPTED off a listener's connection is ignored (one-way). */
        request(cfd, SHMZ_MSG_NOTICE_PORT, &ap, sizeof(ap), &r);
        cr_assert_eq(r.h.status, -EOPNOTSUPP);
        {
                struct shmz_msg_port_ref m = { .port_id = cp.port_id };
                uint64_t errors = status().errors;

                cr_assert_eq(send_raw(cfd, SHMZ_MSG_PORT_ACCEPTED, 0, &m, sizeof(m)), 0);
                /* Still served, nothing came back for the one-way message. */
                request(cfd, SHMZ_MSG_PORT_LIST, NULL, 0, &r);
                cr_assert_eq(r.h.status, 0);
                while (!(r.h.flags & SHMZ_MSG_F_LAST))
                        cr_assert(recv_msg(cfd, &r, 5000));
                cr_assert_gt(status().errors, errors);
        }
        /* A listener's connection carries nothing else; a forged accept for a stranger's id is ignored. */
        request(lfd, SHMZ_MSG_STATUS, NULL, 0, &r);
        cr_assert_eq(r.h.status, -EISCONN);
        cr_assert_eq(listener_entry(cfd, "svc", 1).connections, 1u);
        accepted(lfd, cp.port_id + 77);
        accepted(lfd, ap.port_id);
        accepted(lfd, ap.port_id); /* twice */
        cr_assert_eq(listener_entry(cfd, "svc", 0).connections, 1u);
        /* A connection that passes an fd is cut off, as for any request. */
        {
                int fd = raw_client(), one = lfd;
                struct shmz_msg_port_ref m = { .port_id = cp.port_id, .token = cp.token };
                struct shmz_msg_header h = { .size = sizeof(h) + sizeof(m),
                                             .type = SHMZ_MSG_SEGMENT_CREATE,
                                             .stream = 9 };
                uint8_t b[sizeof(h) + sizeof(m)];
                union {
                        struct cmsghdr c;
                        uint8_t x[CMSG_SPACE(sizeof(int))];
                } control = {};
                struct iovec iov = { .iov_base = b, .iov_len = sizeof(b) };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)
                };
                struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

                memcpy(b, &h, sizeof(h));
                memcpy(b + sizeof(h), &m, sizeof(m));
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(c), &one, sizeof(int));
                /* The kernel may refuse it already (the daemon turns SO_PASSRIGHTS off where it can). */
                if (sendmsg(fd, &mh, 0) == (ssize_t) sizeof(b))
                        cr_assert_not(recv_msg(fd, &r, 5000) && r.h.status == 0);
                close(fd);
        }

        close(lfd);
        cr_assert_eq(shutdown(asock, SHUT_RDWR), 0);
        wait_empty();
        close(csock);
        close(cchan);
        close(asock);
        close(achan);
        close(cfd);
}

Test(portd, reload_applies_to_new_ports) {
        struct shmz_msg_port_peer cp[2], ap;
        int lfd, cfd, s[2], ch[2], asock, achan;

        lfd = listen_on("svc", 0666);
        cfd = raw_client();
        cr_assert_eq(connect_to(cfd, "svc", &cp[0], &s[0], &ch[0]), 0);
        expect_notice(lfd, &ap, &asock, &achan);
        accepted(lfd, ap.port_id);
        close(asock);
        close(achan);
        harness_write_config(&d, "[daemon]\nchunk_size = 8K\nsegment_chunks = 4\nport_memory = 1M\n");
        cr_assert_eq(harness_reload(&d), 0);
        cr_assert_eq(connect_to(cfd, "svc", &cp[1], &s[1], &ch[1]), 0);
        cr_assert_eq(cp[0].chunk_size, CHUNK);
        cr_assert_eq(cp[1].chunk_size, 8192u);
        cr_assert_eq(cp[1].segment_chunks, 4u);
        cr_assert_eq(cp[1].port_memory, 1u << 20);
        /* A bad combination is refused, the running limits stay. */
        harness_write_config(&d, "[daemon]\nchunk_size = 64K\nsegment_chunks = 64\nport_memory = 1M\n");
        cr_assert_eq(harness_reload(&d), 0);
        cr_assert(strstr(harness_log(&d), "port_memory"), "log: %s", harness_log(&d));
        close(lfd);
        for (int i = 0; i < 2; i++) {
                shutdown(s[i], SHUT_RDWR);
                close(s[i]);
                close(ch[i]);
        }
        wait_empty();
        close(cfd);
}

static int daemon_fds(void) {
        char path[64];
        int n = 0;
        DIR *dir;
        struct dirent *de;

        snprintf(path, sizeof(path), "/proc/%d/fd", (int) d.pid);
        dir = opendir(path);
        cr_assert_not_null(dir);
        while ((de = readdir(dir)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(dir);
        return n;
}

/* Connectors killed at different points, ports shut by either side: the daemon keeps no fd, port or segment. */
#define N_CHURN 40
Test(portd, churn_leaves_nothing_behind) {
        int lfd, fds0, fds1;
        struct shmz_msg_status st;

        lfd = listen_on("svc", 0666);
        (void) status();
        /* Once the status connection is gone on the daemon's side too. */
        fds0 = daemon_fds();
        for (int i = 0; i < 50; i++) {
                usleep(20000);
                fds1 = daemon_fds();
                if (fds1 == fds0)
                        break;
                fds0 = fds1;
        }
        for (int i = 0; i < N_CHURN; i++) {
                struct shmz_msg_port_peer ap;
                int asock, achan, pipefd[2];
                char b;
                pid_t pid;

                cr_assert_eq(pipe(pipefd), 0);
                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        struct shmz_msg_port_peer cp;
                        struct shmz_msg_segment_info si;
                        int cfd = raw_client(), csock, cchan, seg;

                        close(pipefd[0]);
                        if (connect_to(cfd, "svc", &cp, &csock, &cchan) < 0)
                                _exit(1);
                        for (int k = 0; k < i % 3; k++)
                                if (segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg) < 0)
                                        _exit(2);
                        if (i % 4 == 3)
                                shutdown(csock, SHUT_RDWR); /* closes the port itself, then dies */
                        (void) !write(pipefd[1], "r", 1);
                        for (;;)
                                pause();
                }
                close(pipefd[1]);
                cr_assert_eq(read(pipefd[0], &b, 1), 1, "connector %d failed", i);
                close(pipefd[0]);
                expect_notice(lfd, &ap, &asock, &achan);
                if (i % 2)
                        accepted(lfd, ap.port_id);
                cr_assert_eq(kill(pid, SIGKILL), 0);
                cr_assert_eq(waitpid(pid, NULL, 0), pid);
                close(asock);
                close(achan);
        }
        for (int i = 0; i < 500; i++) {
                st = status();
                if (st.ports == 0 && st.segments == 0)
                        break;
                usleep(10000);
        }
        cr_assert_eq(st.ports, 0u);
        cr_assert_eq(st.segments, 0u);
        cr_assert_eq(st.segment_bytes, 0u);
        cr_assert_eq(st.ports_closed, N_CHURN);
        cr_assert_eq(st.listeners, 1u);
        /* The status connection of the last call may still be closing. */
        for (int i = 0; i < 100 && (fds1 = daemon_fds()) > fds0; i++)
                usleep(10000);
        cr_assert_eq(fds1, fds0, "the daemon holds %d fds, %d before", fds1, fds0);
        fprintf(stderr, "FIGURE churn_ports %d peers_died %lu\n", N_CHURN, (unsigned long) st.peers_died);
        close(lfd);
        wait_empty();
}

/* A figure, not a bound: what brokering one port costs (connect, reply, notice; then a shutdown). */
Test(portd, connect_figure) {
        int lfd = listen_on("svc", 0666), cfd = raw_client();
        uint64_t t0, total = 0;
        const int n = 200;

        for (int i = 0; i < n; i++) {
                struct shmz_msg_port_peer cp, ap;
                int csock, cchan, asock, achan;

                t0 = now_nsec(CLOCK_MONOTONIC);
                cr_assert_eq(connect_to(cfd, "svc", &cp, &csock, &cchan), 0);
                expect_notice(lfd, &ap, &asock, &achan);
                total += now_nsec(CLOCK_MONOTONIC) - t0;
                accepted(lfd, ap.port_id);
                shutdown(csock, SHUT_RDWR);
                close(csock);
                close(cchan);
                close(asock);
                close(achan);
                /* The daemon drops the port on its own loop: without waiting, a loaded machine
                 * piles up ports until the per-uid limit refuses a connect. */
                for (int j = 0; j < 500 && status().ports > 0; j++)
                        usleep(1000);
        }
        fprintf(stderr, "FIGURE port_connect_us %.1f (connect + reply + notice)\n", (double) total / n / 1000.0);
        close(lfd);
        wait_empty();
        close(cfd);
}

/* Listings longer than a page (32) come whole, in order, a page at a time. */
#define N_LIST 35
Test(portd, listings_page_through) {
        int lfd[N_LIST], cfd, csock[N_LIST], cchan[N_LIST], asock, achan, seg;
        struct shmz_msg_port_peer cp, ap;
        struct shmz_msg_segment_info si;
        struct reply r;
        char name[32], prev[SHMZ_NAME_BUF] = "";
        unsigned n_listeners = 0, n_ports = 0, n_segments = 0;
        uint64_t last_id = 0;

        cfd = raw_client();
        for (int i = 0; i < N_LIST; i++) {
                /* Names whose order differs from the order they are made in. */
                snprintf(name, sizeof(name), "p%02d", (i * 17) % N_LIST);
                lfd[i] = listen_on(name, 0666);
                cr_assert_eq(connect_to(cfd, name, &cp, &csock[i], &cchan[i]), 0);
                expect_notice(lfd[i], &ap, &asock, &achan);
                accepted(lfd[i], ap.port_id);
                close(asock); /* the daemon's copy keeps the port */
                close(achan);
                for (int k = 0; k < 2; k++) {
                        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), 0);
                        close(seg);
                }
        }
        request(cfd, SHMZ_MSG_PORT_LIST, NULL, 0, &r);
        while (!(r.h.flags & SHMZ_MSG_F_LAST)) {
                struct shmz_msg_port_info pi;

                cr_assert_eq(r.h.status, 0);
                cr_assert_eq(r.body_size, sizeof(pi));
                memcpy(&pi, r.body, sizeof(pi));
                if (pi.port_id == 0) {
                        cr_assert_eq(n_ports, 0u, "listeners come first");
                        cr_assert_gt(strcmp(pi.name, prev), 0, "%s after %s", pi.name, prev);
                        strncpy_buf(prev, sizeof(prev), pi.name);
                        n_listeners++;
                } else {
                        cr_assert_gt(pi.port_id, last_id);
                        last_id = pi.port_id;
                        cr_assert_eq(pi.segments, 2u);
                        n_ports++;
                }
                cr_assert(recv_msg(cfd, &r, 5000));
        }
        cr_assert_eq(n_listeners, N_LIST);
        cr_assert_eq(n_ports, N_LIST);
        last_id = 0;
        request(cfd, SHMZ_MSG_SEGMENT_LIST, NULL, 0, &r);
        while (!(r.h.flags & SHMZ_MSG_F_LAST)) {
                struct shmz_msg_segment_info li;

                cr_assert_eq(r.body_size, sizeof(li));
                memcpy(&li, r.body, sizeof(li));
                cr_assert_gt(li.id, last_id);
                last_id = li.id;
                n_segments++;
                cr_assert(recv_msg(cfd, &r, 5000));
        }
        cr_assert_eq(n_segments, 2 * N_LIST);
        cr_assert_eq(status().segments, 2u * N_LIST);
        for (int i = 0; i < N_LIST; i++) {
                close(lfd[i]);
                shutdown(csock[i], SHUT_RDWR);
                close(csock[i]);
                close(cchan[i]);
        }
        wait_empty();
        close(cfd);
}

/* The daemon stops with live ports and listeners: it lets go of them (exit 0, no leak); the peers keep talking. */
Test(portd, stop_with_live_ports) {
        struct shmz_msg_port_peer cp, ap;
        struct shmz_msg_segment_info si;
        int lfd, cfd, csock, cchan, asock, achan, seg;
        char buf[8];

        lfd = listen_on("svc", 0666);
        cfd = raw_client();
        cr_assert_eq(connect_to(cfd, "svc", &cp, &csock, &cchan), 0);
        expect_notice(lfd, &ap, &asock, &achan);
        cr_assert_eq(segment_create(cfd, cp.port_id, cp.token, 0, &si, &seg), 0);
        accepted(lfd, ap.port_id); /* not accepted, it would end with its listener's connection */
        (void) listener_entry(cfd, "svc", 0);
        cr_assert_eq(harness_stop(&d), 0, "log: %s", harness_log(&d));
        cr_assert_null(strstr(harness_log(&d), "Sanitizer"), "log: %s", harness_log(&d));
        cr_assert_eq(send(csock, "after", 5, 0), 5);
        cr_assert_eq(recv(asock, buf, sizeof(buf), 0), 5);
        close(seg);
        close(csock);
        close(cchan);
        close(asock);
        close(achan);
        close(lfd);
        close(cfd);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}

/* Log lines of the daemon's with what in them. */
static unsigned log_count(const char *what) {
        const char *s = harness_log(&d);
        unsigned n = 0;

        for (const char *at = strstr(s, what); at; at = strstr(at + 1, what))
                n++;
        return n;
}

/*
 * What errors_total counts, the daemon logs (at debug level): a refused
 * request, and a PORT_ACCEPTED for a port whose connector went before the
 * listener took it (the daemon had dropped the port: what peer deaths leave).
 */
Test(portd, every_error_counted_is_logged) {
        const char *verbose[] = { "--verbose", NULL };
        struct shmz_daemon_status before, after;
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *a, *b;
        unsigned refused, accepted;

        cr_assert_eq(harness_stop(&d), 0);
        cr_assert_eq(harness_start(&d, verbose, false), 0, "log: %s", harness_log(&d));
        c = harness_connect(&d);
        cr_assert_not_null(c);
        cr_assert_eq(shmz_port_listen(c, "errs", 0600, &l), 0);
        cr_assert_eq(shmz_daemon_status(c, &before), 0);
        refused = log_count(" refused: ");
        accepted = log_count("PORT_ACCEPTED for port");

        cr_assert_eq(shmz_port_connect(c, "no-such-port", &a), -ENOENT);
        cr_assert_eq(shmz_port_connect(c, "errs", &a), 0);
        shmz_port_close(a);
        /* The daemon drops the port once the connector's end is shut down. */
        cr_assert_eq(harness_wait_log(&d, "ended", 5), 0, "log: %s", harness_log(&d));
        cr_assert_eq(shmz_port_accept(l, 5000000000, &b), 0);
        cr_assert_eq(shmz_daemon_status(c, &after), 0); /* after our ACCEPTED, on another connection: */
        for (int i = 0; i < 500 && after.errors < before.errors + 2; i++) {
                usleep(10000);
                cr_assert_eq(shmz_daemon_status(c, &after), 0);
        }
        cr_assert_eq(after.errors, before.errors + 2, "errors %llu -> %llu", (unsigned long long) before.errors,
                     (unsigned long long) after.errors);
        cr_assert_eq(harness_wait_log(&d, "PORT_ACCEPTED for port", 5), 0, "log: %s", harness_log(&d));
        cr_assert_eq(log_count(" refused: "), refused + 1, "log: %s", harness_log(&d));
        cr_assert_eq(log_count("PORT_ACCEPTED for port"), accepted + 1, "log: %s", harness_log(&d));
        shmz_port_close(b);
        shmz_listener_close(l);
        shmz_disconnect(c);
}
