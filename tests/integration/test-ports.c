/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Ports end to end: a real shmzoned brokers them, two real processes (fork)
 * talk through them. Children report through their exit status (criterion's
 * asserts belong to the test process only); every child ends with _exit().
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "port.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534
#define NSEC_PER_MSEC INT64_C(1000000)
#define NSEC_PER_SEC INT64_C(1000000000)
#define KiB(n) ((size_t) (n) << 10)
#define MiB(n) ((size_t) (n) << 20)
/* The largest message with the default [daemon] keys: 64 chunks of 64 KiB. */
#define MAX_MSG MiB(4)

static struct daemon_proc d;

static void start_with(const char *config) {
        (void) unsetenv("SHMZONE_SOCKET");
        harness_init(&d, config);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

static void start(void) {
        start_with("[daemon]\nmemory_budget = 64M\n");
}

/* Backpressure: 2 segments of 16 chunks of 64 KiB per direction, 32 chunks in all. */
#define SMALL_CHUNKS 32
static void start_small(void) {
        start_with("[daemon]\nmemory_budget = 64M\nchunk_size = 64K\nsegment_chunks = 16\nport_memory = 2M\n");
}

/* Exit 0, and nothing from the sanitizers: the daemon leaked nothing of what the test made. */
static void stop(void) {
        harness_stop_clean(&d);
}

static void sleep_ms(unsigned ms) {
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long) (ms % 1000) * NSEC_PER_MSEC };

        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

static struct shmz_client *connect_or_die(void) {
        struct shmz_client *c = harness_connect(&d);

        cr_assert_not_null(c, "cannot connect to %s", d.socket);
        return c;
}

static struct shmz_listener *listen_or_die(struct shmz_client *c, const char *name, mode_t mode) {
        struct shmz_listener *l = NULL;
        int r = shmz_port_listen(c, name, mode, &l);

        cr_assert_eq(r, 0, "listen %s: %s", name, strerror(-r));
        return l;
}

static struct shmz_port *accept_or_die(struct shmz_listener *l) {
        struct shmz_port *p = NULL;
        int r = shmz_port_accept(l, 10 * NSEC_PER_SEC, &p);

        cr_assert_eq(r, 0, "accept: %s", strerror(-r));
        return p;
}

static int wait_child(pid_t pid) {
        return harness_wait_child(pid);
}

static struct shmz_port *child_connect(const char *name) {
        return harness_child_connect(&d, name);
}

static void fill(void *buf, size_t size, unsigned seed) {
        unsigned char *b = buf;

        for (size_t i = 0; i < size; i++)
                b[i] = (unsigned char) (i * 31u + seed + (i >> 12));
}

static bool check(const void *buf, size_t size, unsigned seed) {
        const unsigned char *b = buf;

        for (size_t i = 0; i < size; i++)
                if (b[i] != (unsigned char) (i * 31u + seed + (i >> 12)))
                        return false;
        return true;
}

/* Bytes [from, size) of what fill() wrote. */
static bool check_from(const void *buf, size_t from, size_t size, unsigned seed) {
        const unsigned char *b = buf;

        for (size_t i = from; i < size; i++)
                if (b[i] != (unsigned char) (i * 31u + seed + (i >> 12)))
                        return false;
        return true;
}

static int send_bytes(struct shmz_port *p, uint32_t type, uint32_t stream, uint32_t flags, const void *data,
                      size_t size, int64_t timeout) {
        struct shmz_msg m = {
                .type = type, .stream = stream, .flags = flags, .data = (void *) data, .size = size, .fd = -1
        };

        return shmz_port_send(p, &m, timeout);
}

static unsigned count_fds(pid_t pid) {
        return harness_count_fds(pid);
}

static bool fd_is_open(int fd) {
        return fcntl(fd, F_GETFD) >= 0;
}

/* A page both sides of a fork see. */
static void *shared_page(void) {
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

        cr_assert_neq(p, MAP_FAILED);
        memset(p, 0, 4096);
        return p;
}

/* ---- listen, connect, accept, names, permissions ------------------------------------------ */

TestSuite(ports, .init = start, .fini = stop, .timeout = 120);

/* Echo until the peer goes: each message comes back with its type, stream, flags and bytes (copied out of the
 * peer's chunk, so the library must not mistake another's memory for its own buffer). */
static int echo_loop(struct shmz_port *p) {
        for (;;) {
                struct shmz_msg m;
                int r = shmz_port_recv(p, &m, 30 * NSEC_PER_SEC);

                if (r == -EPIPE)
                        return 0;
                if (r < 0)
                        return 10;
                if (m.fd >= 0)
                        close(m.fd);
                r = send_bytes(p, m.type, m.stream, m.flags, m.data, m.size, -1);
                shmz_msg_release(p, &m);
                if (r < 0)
                        return r == -EPIPE ? 0 : 11;
        }
}

static pid_t fork_echo(const char *name) {
        pid_t pid = fork();

        cr_assert_geq(pid, 0);
        if (pid == 0)
                _exit(echo_loop(child_connect(name)));
        return pid;
}

Test(ports, connect_accept_and_peer_credentials) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "svc", 0600);
        struct shmz_daemon_status st;
        struct shmz_port *p;
        struct shmz_msg m;
        pid_t pid, ppid;
        uid_t uid;
        gid_t gid;
        int pfd, status_pipe[2];

        cr_assert_geq(shmz_listener_fd(l), 0);
        /* Nobody waits yet. */
        cr_assert_eq(shmz_port_accept(l, 0, &p), -EAGAIN);
        cr_assert_eq(shmz_port_accept(l, 20 * NSEC_PER_MSEC, &p), -ETIMEDOUT);

        cr_assert_eq(pipe(status_pipe), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("svc");
                pid_t lp;
                uid_t lu;
                gid_t lg;
                char ok;

                /* The connector sees the listener's process. */
                if (shmz_port_peer(cp, &lp, &lu, &lg) < 0 || lp != getppid() || lu != getuid() || lg != getgid())
                        _exit(20);
                if (send_bytes(cp, 7, 0, 0, "hello", 5, -1) < 0)
                        _exit(21);
                if (read(status_pipe[0], &ok, 1) != 1)
                        _exit(22);
                _exit(echo_loop(cp));
        }
        close(status_pipe[0]);

        /* The listener's fd becomes readable when the connection waits. */
        struct pollfd pf = { .fd = shmz_listener_fd(l), .events = POLLIN };
        cr_assert_eq(poll(&pf, 1, 10000), 1);
        p = accept_or_die(l);
        cr_assert_eq(shmz_port_peer(p, &ppid, &uid, &gid), 0);
        cr_assert_eq(ppid, pid);
        cr_assert_eq(uid, getuid());
        cr_assert_eq(gid, getgid());

        pfd = shmz_port_fd(p);
        cr_assert_geq(pfd, 0);
        pf = (struct pollfd){ .fd = pfd, .events = POLLIN };
        cr_assert_eq(poll(&pf, 1, 10000), 1, "the port's fd is not readable with a message waiting");
        cr_assert_eq(shmz_port_recv(p, &m, 0), 0);
        cr_assert_eq(m.type, 7);
        cr_assert_eq(m.size, 5);
        cr_assert_eq(memcmp(m.data, "hello", 5), 0);
        cr_assert_eq(m.fd, -1);
        shmz_msg_release(p, &m);
        cr_assert_eq(shmz_port_recv(p, &m, 0), -EAGAIN);
        cr_assert_eq(shmz_port_recv(p, &m, 20 * NSEC_PER_MSEC), -ETIMEDOUT);

        /* The daemon counts the listener and the port. */
        cr_assert_eq(shmz_daemon_status(c, &st), 0);
        cr_assert_eq(st.listeners, 1);
        cr_assert_eq(st.ports, 1);

        cr_assert_eq(write(status_pipe[1], "x", 1), 1);
        close(status_pipe[1]);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_port_close(NULL);
        shmz_listener_close(NULL);
        shmz_disconnect(c);
}

Test(ports, names_in_use_missing_and_bad) {
        struct shmz_client *c = connect_or_die(), *c2 = connect_or_die();
        struct shmz_listener *l, *l2 = NULL;
        struct shmz_port *p = NULL;
        int r;

        l = listen_or_die(c, "taken", 0600);
        cr_assert_eq(shmz_port_listen(c, "taken", 0600, &l2), -EADDRINUSE);
        cr_assert_eq(shmz_port_listen(c2, "taken", 0666, &l2), -EADDRINUSE);
        cr_assert_eq(shmz_port_connect(c, "nobody-listens", &p), -ENOENT);
        cr_assert_eq(shmz_port_listen(c, "..", 0600, &l2), -EINVAL);
        cr_assert_eq(shmz_port_listen(c, "a/b", 0600, &l2), -EINVAL);
        cr_assert_eq(shmz_port_listen(c, "", 0600, &l2), -EINVAL);
        cr_assert_eq(shmz_port_connect(c, "a/b", &p), -EINVAL);

        /* The name goes with its listener and may be taken again. */
        shmz_listener_close(l);
        r = shmz_port_connect(c2, "taken", &p);
        cr_assert_eq(r, -ENOENT, "connect right after the listener closed: %d (%s)", r, strerror(-r));
        l2 = listen_or_die(c2, "taken", 0600);
        shmz_listener_close(l2);
        shmz_disconnect(c);
        shmz_disconnect(c2);
}

/* Run as another uid: connects, tells its pid on the port, returns -errno of the connect. */
static int connect_as_other(void *userdata) {
        struct shmz_client *c;
        struct shmz_port *p;
        pid_t me = getpid();
        int r;

        if (shmz_connect(d.socket, &c) < 0)
                return 100;
        r = shmz_port_connect(c, userdata, &p);
        if (r < 0)
                return -r;
        if (send_bytes(p, 1, 0, 0, &me, sizeof(me), -1) < 0)
                return 101;
        /* Wait for the other side to close: the message must be read while we live. */
        struct shmz_msg m;
        r = shmz_port_recv(p, &m, 30 * NSEC_PER_SEC);
        shmz_port_close(p);
        shmz_disconnect(c);
        return r == -EPIPE ? 0 : 102;
}

struct other_run {
        const char *name;
        int status;
};

static void *run_other(void *arg) {
        struct other_run *o = arg;

        o->status = harness_run_as(NOBODY, NOBODY, connect_as_other, (void *) o->name);
        return NULL;
}

Test(ports, mode_decides_who_may_connect) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *priv = listen_or_die(c, "private", 0600);
        struct shmz_listener *ro = listen_or_die(c, "readable", 0644);
        struct shmz_listener *pub = listen_or_die(c, "public", 0602);
        struct other_run o = { .name = "public" };
        struct shmz_port *p;
        struct shmz_msg m;
        pthread_t t;
        pid_t pid;
        uid_t uid;
        gid_t gid;

        cr_assert_eq(harness_run_as(NOBODY, NOBODY, connect_as_other, (void *) "private"), EACCES);
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, connect_as_other, (void *) "readable"), EACCES);
        /* Refused connections leave nothing to accept. */
        cr_assert_eq(shmz_port_accept(priv, 0, &p), -EAGAIN);
        cr_assert_eq(shmz_port_accept(ro, 0, &p), -EAGAIN);

        /* Others may write "public": the peer's credentials are the other process's, as the kernel says. */
        cr_assert_eq(pthread_create(&t, NULL, run_other, &o), 0);
        p = accept_or_die(pub);
        cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
        cr_assert_eq(m.size, sizeof(pid_t));
        cr_assert_eq(shmz_port_peer(p, &pid, &uid, &gid), 0);
        cr_assert_eq(pid, *(pid_t *) m.data, "peer pid %d, the process says it is %d", (int) pid,
                     (int) *(pid_t *) m.data);
        cr_assert_eq(uid, NOBODY);
        cr_assert_eq(gid, NOBODY);
        shmz_msg_release(p, &m);
        shmz_port_close(p);
        pthread_join(t, NULL);
        cr_assert_eq(o.status, 0);

        shmz_listener_close(priv);
        shmz_listener_close(ro);
        shmz_listener_close(pub);
        shmz_disconnect(c);
}

/* ---- messages --------------------------------------------------------------------------- */

static void round_trip(struct shmz_port *p, size_t size, bool in_place, uint32_t stream, uint32_t flags) {
        static unsigned seed;
        struct shmz_msg m = { .type = 40 + (uint32_t) (size & 0xff), .stream = stream, .flags = flags, .fd = -1 };
        void *buf;
        int r;

        seed++;
        if (in_place) {
                buf = shmz_port_buf(p, size);
                cr_assert_not_null(buf, "shmz_port_buf(%zu): %m", size);
        } else {
                buf = malloc(size ? size : 1);
                cr_assert_not_null(buf);
        }
        fill(buf, size, seed);
        m.data = buf;
        m.size = size;
        r = shmz_port_send(p, &m, 10 * NSEC_PER_SEC);
        cr_assert_eq(r, 0, "send %zu bytes: %s", size, strerror(-r));
        if (!in_place)
                free(buf);

        memset(&m, 0xff, sizeof(m));
        r = shmz_port_recv(p, &m, 10 * NSEC_PER_SEC);
        cr_assert_eq(r, 0, "recv %zu bytes: %s", size, strerror(-r));
        cr_assert_eq(m.size, size);
        cr_assert_eq(m.type, 40 + (size & 0xff));
        cr_assert_eq(m.stream, stream);
        cr_assert_eq(m.flags & SHMZ_MSG_LAST, flags & SHMZ_MSG_LAST);
        cr_assert_eq(m.fd, -1);
        cr_assert(size == 0 || check(m.data, size, seed), "%zu bytes came back changed", size);
        shmz_msg_release(p, &m);
}

Test(ports, round_trips_of_every_size) {
        static const size_t sizes[] = { 0, 1, 64, KiB(4) - 1, KiB(4), KiB(4) + 1, KiB(64), MiB(1), MAX_MSG };
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "echo", 0600);
        pid_t pid = fork_echo("echo");
        struct shmz_port *p = accept_or_die(l);

        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
                round_trip(p, sizes[i], false, (uint32_t) i, 0);
                if (sizes[i] > 0)
                        round_trip(p, sizes[i], true, (uint32_t) i + 100, i % 2 ? SHMZ_MSG_LAST : 0);
        }
        /* Many in a row: chunks come back to the sender and are used again. */
        for (int i = 0; i < 200; i++)
                round_trip(p, KiB(64) * (size_t) (1 + i % 8), i % 2, 0, 0);

        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(ports, too_large_is_emsgsize) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "big", 0600);
        pid_t pid = fork_echo("big");
        struct shmz_port *p = accept_or_die(l);
        char *big = calloc(1, MAX_MSG + 1);

        cr_assert_not_null(big);
        cr_assert_eq(send_bytes(p, 1, 0, 0, big, MAX_MSG + 1, 0), -EMSGSIZE);
        cr_assert_eq(send_bytes(p, 1, 0, 0, big, SIZE_MAX, 0), -EMSGSIZE);
        errno = 0;
        cr_assert_null(shmz_port_buf(p, MAX_MSG + 1));
        cr_assert_eq(errno, EMSGSIZE);
        cr_assert_null(shmz_port_buf(p, SIZE_MAX));
        cr_assert_eq(errno, EMSGSIZE);
        /* The port still works, at the largest size too. */
        round_trip(p, MAX_MSG, false, 0, 0);
        free(big);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* Is addr inside a shared (MAP_SHARED) mapping of this process? */
static bool in_shared_mapping(const void *addr) {
        uintptr_t a = (uintptr_t) addr;
        char line[512];
        bool found = false;
        FILE *f = fopen("/proc/self/maps", "re");

        if (!f)
                return false;
        while (fgets(line, sizeof(line), f)) {
                uintptr_t lo, hi;
                char perms[8];

                if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %7s", &lo, &hi, perms) == 3 && a >= lo && a < hi) {
                        found = perms[3] == 's';
                        break;
                }
        }
        fclose(f);
        return found;
}

Test(ports, port_buf_travels_in_place) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "zc", 0600);
        struct shmz_port *p;
        unsigned char *buf;
        struct shmz_msg m;
        pid_t pid;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("zc");
                struct shmz_msg big, poke;
                volatile unsigned char *v;

                if (shmz_port_recv(cp, &big, 10 * NSEC_PER_SEC) < 0 || big.size != MiB(1))
                        _exit(20);
                if (!check(big.data, big.size, 9))
                        _exit(21);
                if (!in_shared_mapping(big.data))
                        _exit(22);
                if (send_bytes(cp, 1, 0, 0, "got", 3, -1) < 0)
                        _exit(23);
                /* The sender writes again into the buffer it gave away: the bytes we hold change. */
                if (shmz_port_recv(cp, &poke, 10 * NSEC_PER_SEC) < 0)
                        _exit(24);
                shmz_msg_release(cp, &poke);
                v = big.data;
                if (v[0] != 0xAB || v[MiB(1) - 1] != 0xCD)
                        _exit(25);
                shmz_msg_release(cp, &big);
                _exit(echo_loop(cp));
        }
        p = accept_or_die(l);
        buf = shmz_port_buf(p, MiB(1));
        cr_assert_not_null(buf);
        cr_assert(in_shared_mapping(buf));
        fill(buf, MiB(1), 9);
        m = (struct shmz_msg){ .type = 1, .data = buf, .size = MiB(1), .fd = -1 };
        cr_assert_eq(shmz_port_send(p, &m, -1), 0);
        cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
        shmz_msg_release(p, &m);
        /* Not allowed by the API, done here only to prove the memory is the same. */
        buf[0] = 0xAB;
        buf[MiB(1) - 1] = 0xCD;
        cr_assert_eq(send_bytes(p, 2, 0, 0, "look", 4, -1), 0);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);

        /* A buffer that is not sent goes back. */
        pid = fork_echo("zc");
        p = accept_or_die(l);
        for (int i = 0; i < 1000; i++) {
                void *b = shmz_port_buf(p, MiB(1));

                cr_assert_not_null(b, "buffer %d: %m (buf_free gives nothing back?)", i);
                shmz_port_buf_free(p, b);
        }
        round_trip(p, MiB(1), true, 0, 0);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(ports, fds_ride_along) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "fds", 0600);
        struct shmz_port *p;
        struct shmz_msg m;
        int pp[2];
        unsigned before;
        char got[8] = "";
        pid_t pid;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("fds");
                struct shmz_msg in, out;
                int mfd;

                /* An fd with an inline message and with a chunked one. */
                for (int i = 0; i < 2; i++) {
                        if (shmz_port_recv(cp, &in, 10 * NSEC_PER_SEC) < 0 || in.fd < 0)
                                _exit(20 + i);
                        if (write(in.fd, i ? "B" : "A", 1) != 1)
                                _exit(22);
                        close(in.fd);
                        shmz_msg_release(cp, &in);
                }
                /* One back: a memfd with bytes in it, closed here once sent. */
                mfd = memfd_create("ride", MFD_CLOEXEC);
                if (mfd < 0 || write(mfd, "memfd", 5) != 5)
                        _exit(23);
                out = (struct shmz_msg){ .type = 3, .data = "x", .size = 1, .fd = mfd, .flags = SHMZ_MSG_CLOSE_FD };
                if (shmz_port_send(cp, &out, -1) < 0)
                        _exit(24);
                if (fd_is_open(mfd))
                        _exit(25);
                _exit(echo_loop(cp));
        }
        /* The port's own fds (socket, channel, segments) come and go with it: count around it. */
        before = count_fds(0);
        p = accept_or_die(l);
        cr_assert_eq(pipe(pp), 0);

        /* Without CLOSE_FD the sender keeps its fd. */
        m = (struct shmz_msg){ .type = 1, .data = "a", .size = 1, .fd = pp[1] };
        cr_assert_eq(shmz_port_send(p, &m, -1), 0);
        cr_assert(fd_is_open(pp[1]));
        char *big = malloc(KiB(64));
        fill(big, KiB(64), 3);
        m = (struct shmz_msg){ .type = 2, .data = big, .size = KiB(64), .fd = pp[1], .flags = SHMZ_MSG_CLOSE_FD };
        cr_assert_eq(shmz_port_send(p, &m, -1), 0);
        free(big);
        cr_assert_not(fd_is_open(pp[1]), "CLOSE_FD left the fd open");
        /* The child writes one byte per message it gets: both, in time. */
        for (size_t have = 0; have < 2;) {
                ssize_t k = read(pp[0], got + have, 2 - have);

                cr_assert_gt(k, 0);
                have += (size_t) k;
        }
        cr_assert_eq(memcmp(got, "AB", 2), 0);
        close(pp[0]);

        cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
        cr_assert_eq(m.type, 3);
        cr_assert_geq(m.fd, 0);
        cr_assert_eq(pread(m.fd, got, 5, 0), 5);
        cr_assert_eq(memcmp(got, "memfd", 5), 0);
        close(m.fd);
        shmz_msg_release(p, &m);

        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        cr_assert_eq(count_fds(0), before, "fds leaked: %u, were %u", count_fds(0), before);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(ports, last_and_streams_come_through) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "last", 0600);
        pid_t pid = fork_echo("last");
        struct shmz_port *p = accept_or_die(l);

        round_trip(p, 10, false, 77, SHMZ_MSG_LAST);
        round_trip(p, KiB(100), false, 78, SHMZ_MSG_LAST);
        round_trip(p, KiB(100), true, 0xffffffffu, SHMZ_MSG_LAST);
        round_trip(p, 0, false, 79, SHMZ_MSG_LAST);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- backpressure ----------------------------------------------------------------------- */

/* A suite of its own: a test's .init runs after the suite's, which would start a second daemon. */
TestSuite(ports_small, .init = start_small, .fini = stop, .timeout = 120);

/* Fills the port's memory for this direction with 64 KiB messages the peer does not read yet. */
static void fill_port_memory(struct shmz_port *p) {
        static char chunk[KiB(64)];
        int n = 0, r;

        for (;;) {
                r = send_bytes(p, 5, 0, 0, chunk, sizeof(chunk), 0);
                if (r < 0)
                        break;
                n++;
                cr_assert_leq(n, SMALL_CHUNKS, "more than port_memory went out");
        }
        cr_assert_eq(r, -EAGAIN, "send on a full port: %s", strerror(-r));
        cr_assert_eq(n, SMALL_CHUNKS, "only %d chunks of %d before -EAGAIN", n, SMALL_CHUNKS);
}

/* A suite whose uid may have 2 segments (1 MiB + a header page each) over all its ports, 4 per port otherwise. */
static void start_capped(void) {
        start_with("[daemon]\nmemory_budget = 64M\nchunk_size = 64K\nsegment_chunks = 16\nport_memory = 4M\n"
                   "uid_segment_memory = 3M\n");
}

TestSuite(ports_capped, .init = start_capped, .fini = stop, .timeout = 120);

/* 64 KiB messages on p with timeout 0 until it refuses: how many went. */
static int send_until_full(struct shmz_port *p) {
        static char chunk[KiB(64)];
        int n = 0, r;

        while ((r = send_bytes(p, 5, 0, 0, chunk, sizeof(chunk), 0)) == 0)
                n++;
        cr_assert_eq(r, -EAGAIN, "send: %s", strerror(-r));
        return n;
}

Test(ports_capped, segment_memory_of_a_uid_spans_its_ports) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "capped", 0600);
        struct shmz_port *p1, *p2;
        int go[2];
        pid_t pid;

        cr_assert_eq(pipe(go), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                /* Two ports that never read; they go when the pipe does. */
                char b;

                close(go[1]);
                (void) child_connect("capped");
                (void) child_connect("capped");
                (void) !read(go[0], &b, 1);
                _exit(0);
        }
        close(go[0]);
        p1 = accept_or_die(l);
        p2 = accept_or_die(l);
        /* Our uid gets two segments in all, though each port may hold four. */
        cr_assert_eq(send_until_full(p1), 32);
        cr_assert_eq(send_until_full(p2), 0);
        /* Inline messages need no segment. */
        cr_assert_eq(send_bytes(p2, 6, 0, 0, "small", 5, 0), 0);
        /* The first port ends: once the daemon drops it, its share goes to the other port. */
        shmz_port_close(p1);
        {
                int n = 0;

                for (int i = 0; i < 200 && n < 32; i++) {
                        n += send_until_full(p2);
                        if (n < 32)
                                sleep_ms(10);
                }
                cr_assert_eq(n, 32, "the second port got %d chunks", n);
        }
        {
                struct shmz_daemon_status st;

                cr_assert_eq(shmz_daemon_status(c, &st), 0);
                cr_assert_eq(st.segments, 2, "segments: %" PRIu64, st.segments);
        }
        close(go[1]);
        shmz_port_close(p2);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

struct wake_page {
        _Atomic uint64_t released_ns;
};

Test(ports_small, backpressure_waits_for_a_release) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "bp", 0600);
        struct wake_page *w = shared_page();
        static char chunk[KiB(64)];
        struct shmz_port *p;
        uint64_t t0, t1;
        int go[2], r;
        pid_t pid;

        cr_assert_eq(pipe(go), 0);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("bp");
                struct shmz_msg m;
                char b;

                if (read(go[0], &b, 1) != 1)
                        _exit(20);
                sleep_ms(200);
                if (shmz_port_recv(cp, &m, 0) < 0)
                        _exit(21);
                atomic_store(&w->released_ns, now_nsec(CLOCK_MONOTONIC));
                shmz_msg_release(cp, &m);
                /* Read the rest until the other side closes. */
                for (;;) {
                        r = shmz_port_recv(cp, &m, 30 * NSEC_PER_SEC);
                        if (r == -EPIPE)
                                _exit(0);
                        if (r < 0)
                                _exit(22);
                        shmz_msg_release(cp, &m);
                }
        }
        p = accept_or_die(l);
        fill_port_memory(p);
        errno = 0;
        cr_assert_null(shmz_port_buf(p, KiB(64)));
        cr_assert_eq(errno, EAGAIN);
        /* Inline messages need no chunk: they still go. */
        cr_assert_eq(send_bytes(p, 6, 0, 0, "small", 5, 0), 0);

        t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(send_bytes(p, 5, 0, 0, chunk, sizeof(chunk), 50 * NSEC_PER_MSEC), -ETIMEDOUT);
        t1 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_geq(t1 - t0, 45 * NSEC_PER_MSEC);
        cr_assert_lt(t1 - t0, 1000 * NSEC_PER_MSEC);

        /* A sender sleeping without a timeout wakes as soon as the receiver releases one chunk. */
        cr_assert_eq(write(go[1], "g", 1), 1);
        t0 = now_nsec(CLOCK_MONOTONIC);
        r = send_bytes(p, 5, 0, 0, chunk, sizeof(chunk), -1);
        t1 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(r, 0, "send: %s", strerror(-r));
        cr_assert_geq(t1 - t0, 150 * NSEC_PER_MSEC, "the sender did not wait");
        cr_assert_neq(atomic_load(&w->released_ns), 0);
        cr_assert_lt(t1 - atomic_load(&w->released_ns), 20 * NSEC_PER_MSEC, "woke %.1f ms after the release",
                     (double) (t1 - atomic_load(&w->released_ns)) / 1e6);

        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

struct killer {
        pid_t pid;
        unsigned delay_us;
};

static void *killer_main(void *arg) {
        struct killer *k = arg;

        usleep(k->delay_us);
        kill(k->pid, SIGKILL);
        return NULL;
}

Test(ports_small, sender_waiting_for_memory_sees_its_peer_die) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "bpdie", 0600);
        static char chunk[KiB(64)];
        struct shmz_port *p;
        struct killer k;
        pthread_t t;
        uint64_t t0, t1;
        pid_t pid;
        int r;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                (void) child_connect("bpdie");
                for (;;)
                        pause();
        }
        p = accept_or_die(l);
        fill_port_memory(p);
        k = (struct killer){ .pid = pid, .delay_us = 100000 };
        cr_assert_eq(pthread_create(&t, NULL, killer_main, &k), 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        r = send_bytes(p, 5, 0, 0, chunk, sizeof(chunk), -1);
        t1 = now_nsec(CLOCK_MONOTONIC);
        pthread_join(t, NULL);
        cr_assert_eq(r, -EPIPE, "send: %s", strerror(-r));
        cr_assert_geq(t1 - t0, 90 * NSEC_PER_MSEC);
        cr_assert_lt(t1 - t0, 200 * NSEC_PER_MSEC, "woke %.1f ms after the kill", (double) (t1 - t0) / 1e6 - 100);
        cr_assert_eq(wait_child(pid), 128 + SIGKILL);
        errno = 0;
        cr_assert_null(shmz_port_buf(p, KiB(64)));
        cr_assert_eq(errno, EPIPE);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- a peer that dies ------------------------------------------------------------------- */

Test(ports, killed_peer_queued_messages_then_epipe) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "die", 0600);
        struct shmz_daemon_status before, after;
        uint64_t t0, t1;
        int ready[2], r;
        struct shmz_port *p;
        struct shmz_msg m;
        pid_t pid;
        char b;

        cr_assert_eq(shmz_daemon_status(c, &before), 0);
        for (int round = 0; round < 3; round++) {
                cr_assert_eq(pipe(ready), 0);
                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        struct shmz_port *cp = child_connect("die");
                        char *big = malloc(KiB(64)), *inplace;

                        fill(big, KiB(64), 2);
                        if (send_bytes(cp, 1, 0, 0, "one", 3, -1) < 0 || send_bytes(cp, 2, 0, 0, big, KiB(64), -1) < 0)
                                _exit(20);
                        inplace = shmz_port_buf(cp, MiB(1));
                        if (!inplace)
                                _exit(21);
                        fill(inplace, MiB(1), 3);
                        struct shmz_msg out = { .type = 3, .data = inplace, .size = MiB(1), .fd = -1 };
                        if (shmz_port_send(cp, &out, -1) < 0)
                                _exit(22);
                        /* And a chunk claimed but never sent, and one of the parent's chunks held. */
                        if (!shmz_port_buf(cp, KiB(64)))
                                _exit(23);
                        struct shmz_msg held;
                        if (shmz_port_recv(cp, &held, 10 * NSEC_PER_SEC) < 0)
                                _exit(24);
                        if (write(ready[1], "r", 1) != 1)
                                _exit(25);
                        for (;;)
                                pause();
                }
                close(ready[1]);
                p = accept_or_die(l);
                /* A chunk of ours that the child holds when it dies. */
                static char mine[KiB(64)];
                cr_assert_eq(send_bytes(p, 9, 0, 0, mine, sizeof(mine), -1), 0);
                cr_assert_eq(read(ready[0], &b, 1), 1);
                close(ready[0]);
                cr_assert_eq(kill(pid, SIGKILL), 0);
                cr_assert_eq(wait_child(pid), 128 + SIGKILL);
                /* Timed from the death (reaped) to -EPIPE; the checks of what came wait until after. */
                struct shmz_msg q[3];
                t0 = now_nsec(CLOCK_MONOTONIC);
                for (int i = 0; i < 3; i++)
                        cr_assert_eq(shmz_port_recv(p, &q[i], NSEC_PER_SEC), 0, "queued message %d lost", i);
                r = shmz_port_recv(p, &m, NSEC_PER_SEC);
                t1 = now_nsec(CLOCK_MONOTONIC);
                cr_assert_eq(r, -EPIPE, "recv after the queued messages: %s", strerror(-r));
                cr_log_info("-EPIPE %.2f ms after the death", (double) (t1 - t0) / 1e6);
                cr_assert_lt(t1 - t0, 10 * NSEC_PER_MSEC, "-EPIPE %.2f ms after the death", (double) (t1 - t0) / 1e6);
                cr_assert_eq(q[0].type, 1);
                cr_assert_eq(q[0].size, 3);
                cr_assert_eq(q[1].type, 2);
                cr_assert(q[1].size == KiB(64) && check(q[1].data, KiB(64), 2));
                cr_assert_eq(q[2].type, 3);
                cr_assert(q[2].size == MiB(1) && check(q[2].data, MiB(1), 3));
                /* Released after the end: the dead peer's segment stays mapped until then. */
                for (int i = 0; i < 3; i++)
                        shmz_msg_release(p, &q[i]);
                cr_assert_eq(shmz_port_recv(p, &m, 0), -EPIPE);
                cr_assert_eq(send_bytes(p, 1, 0, 0, "x", 1, 0), -EPIPE);
                cr_assert_eq(send_bytes(p, 1, 0, 0, "x", 1, -1), -EPIPE);
                struct pollfd pf = { .fd = shmz_port_fd(p), .events = POLLIN };
                cr_assert_eq(poll(&pf, 1, 0), 1, "the port's fd is not readable after the peer died");
                shmz_port_close(p);
        }

        /* Every chunk and segment of those ports comes back; the daemon counted the deaths. */
        for (int i = 0; i < 300; i++) {
                cr_assert_eq(shmz_daemon_status(c, &after), 0);
                if (after.ports == before.ports && after.segments == before.segments &&
                    after.chunks_used == before.chunks_used)
                        break;
                sleep_ms(10);
        }
        cr_assert_eq(after.ports, before.ports);
        cr_assert_eq(after.segments, before.segments);
        cr_assert_eq(after.chunks_used, before.chunks_used);
        cr_assert_eq(after.segment_bytes, before.segment_bytes);
        cr_assert_geq(after.peers_died, before.peers_died + 3);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* What the daemon and this process hold, to compare before and after. */
struct census {
        unsigned my_fds, daemon_fds;
        uint64_t ports, listeners, segments, segment_bytes, chunks, chunks_used;
};

static void take_census(struct census *ret) {
        struct shmz_daemon_status st;
        struct shmz_client *c;

        ret->my_fds = count_fds(0);
        /* The status needs a client; it is gone again before the daemon's fds are counted. */
        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_daemon_status(c, &st), 0);
        shmz_disconnect(c);
        ret->ports = st.ports;
        ret->listeners = st.listeners;
        ret->segments = st.segments;
        ret->segment_bytes = st.segment_bytes;
        ret->chunks = st.chunks;
        ret->chunks_used = st.chunks_used;
        /* The daemon closes a client's socket after it sees the end: a moment later. */
        sleep_ms(20);
        ret->daemon_fds = count_fds(d.pid);
}

static bool census_eq(const struct census *a, const struct census *b) {
        return a->my_fds == b->my_fds && a->daemon_fds == b->daemon_fds && a->ports == b->ports &&
               a->listeners == b->listeners && a->segments == b->segments && a->segment_bytes == b->segment_bytes &&
               a->chunks == b->chunks && a->chunks_used == b->chunks_used;
}

/* A peer doing a bit of everything, at random, until it is killed. */
static _Noreturn void random_peer(const char *name, unsigned seed) {
        struct shmz_port *p = child_connect(name);
        static char src[MiB(1)];

        for (;;) {
                size_t size = (size_t) rand_r(&seed) % MiB(1);
                struct shmz_msg m;
                void *b;

                switch (rand_r(&seed) % 6) {
                case 0:
                        (void) send_bytes(p, 1, 0, 0, src, size % KiB(4), 0);
                        break;
                case 1:
                        (void) send_bytes(p, 2, 0, 0, src, size, 0);
                        break;
                case 2:
                        b = shmz_port_buf(p, size + 1);
                        if (b) {
                                memset(b, 1, size % 4096);
                                m = (struct shmz_msg){ .type = 3, .data = b, .size = size + 1, .fd = -1 };
                                /* Sent, or kept claimed until death. */
                                if (rand_r(&seed) % 2)
                                        (void) shmz_port_send(p, &m, 0);
                        }
                        break;
                case 3:
                case 4:
                        if (shmz_port_recv(p, &m, (int64_t) (rand_r(&seed) % 1000) * 1000) == 0) {
                                if (m.fd >= 0)
                                        close(m.fd);
                                /* Released, or held until death. */
                                if (rand_r(&seed) % 3)
                                        shmz_msg_release(p, &m);
                        }
                        break;
                default: {
                        int fd = memfd_create("peer", MFD_CLOEXEC);

                        m = (struct shmz_msg){
                                .type = 4, .data = src, .size = size % 100, .fd = fd, .flags = SHMZ_MSG_CLOSE_FD
                        };
                        if (fd >= 0 && shmz_port_send(p, &m, 0) < 0)
                                close(fd);
                        break;
                }
                }
        }
}

/* Talks with a random peer until it is gone; then closes the port. */
static void serve_until_gone(struct shmz_port *p, unsigned *seed) {
        static char src[KiB(256)];
        bool send_ok = true;

        for (;;) {
                struct shmz_msg m;
                int r = shmz_port_recv(p, &m, NSEC_PER_MSEC);

                /* The peer is killed, never hostile: a refused frame is a bug of ours. */
                if (r == -EPIPE)
                        break;
                cr_assert(r == 0 || r == -ETIMEDOUT, "recv: %s", strerror(-r));
                if (r == 0) {
                        if (m.fd >= 0)
                                close(m.fd);
                        shmz_msg_release(p, &m);
                }
                if (send_ok) {
                        r = send_bytes(p, 7, 0, 0, src, (size_t) rand_r(seed) % sizeof(src), 0);
                        cr_assert(r == 0 || r == -EAGAIN || r == -EPIPE, "send: %s", strerror(-r));
                        send_ok = r != -EPIPE;
                }
        }
        shmz_port_close(p);
}

Test(ports, hundred_kills_leak_nothing, .timeout = 300) {
        struct census before, after;
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *p;
        unsigned seed = (unsigned) time(NULL);

        cr_log_info("seed %u", seed);
        /* One port first, so that whatever the library sets up once per process is there in both censuses. */
        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        l = listen_or_die(c, "warm", 0600);
        pid_t pid = fork_echo("warm");
        p = accept_or_die(l);
        round_trip(p, KiB(64), true, 0, 0);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);

        take_census(&before);
        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        l = listen_or_die(c, "victim", 0600);
        for (int i = 0; i < 100; i++) {
                struct killer k;
                pthread_t t;
                unsigned child_seed = rand_r(&seed);

                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0)
                        random_peer("victim", child_seed);
                /* Killed anywhere from before its connect to deep in its traffic. */
                k = (struct killer){ .pid = pid, .delay_us = (unsigned) rand_r(&seed) % 30000 };
                cr_assert_eq(pthread_create(&t, NULL, killer_main, &k), 0);
                for (;;) {
                        int r = shmz_port_accept(l, 10 * NSEC_PER_MSEC, &p);

                        if (r == 0) {
                                serve_until_gone(p, &seed);
                                continue;
                        }
                        cr_assert_eq(r, -ETIMEDOUT, "accept: %s", strerror(-r));
                        if (waitpid(pid, NULL, WNOHANG) == pid)
                                break;
                }
                pthread_join(t, NULL);
        }
        /* Connections whose news came late. */
        while (shmz_port_accept(l, 100 * NSEC_PER_MSEC, &p) == 0)
                serve_until_gone(p, &seed);
        shmz_listener_close(l);
        shmz_disconnect(c);

        for (int i = 0; i < 100; i++) {
                take_census(&after);
                if (census_eq(&before, &after))
                        break;
                sleep_ms(30);
        }
        cr_assert_eq(after.my_fds, before.my_fds, "fds of the test process: %u, were %u", after.my_fds, before.my_fds);
        cr_assert_eq(after.daemon_fds, before.daemon_fds, "fds of the daemon: %u, were %u", after.daemon_fds,
                     before.daemon_fds);
        cr_assert_eq(after.ports, before.ports, "ports: %" PRIu64, after.ports);
        cr_assert_eq(after.listeners, before.listeners);
        cr_assert_eq(after.segments, before.segments, "segments: %" PRIu64 ", were %" PRIu64, after.segments,
                     before.segments);
        cr_assert_eq(after.segment_bytes, before.segment_bytes);
        cr_assert_eq(after.chunks, before.chunks);
        cr_assert_eq(after.chunks_used, before.chunks_used, "chunks used: %" PRIu64 ", were %" PRIu64,
                     after.chunks_used, before.chunks_used);
}

/* ---- a hostile peer --------------------------------------------------------------------- */

/* A frame on the port's own socket, as a peer that skips the library would send it. */
static int raw_send(int fd, const struct shmz_frame *f, size_t frame_len, const void *payload, size_t plen,
                    const int *fds, size_t n_fds) {
        union {
                struct cmsghdr h;
                char buf[CMSG_SPACE(sizeof(int) * 4)];
        } cm;
        struct iovec iov[2] = { { (void *) f, frame_len }, { (void *) payload, plen } };
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = plen ? 2 : 1 };

        memset(&cm, 0, sizeof(cm));
        if (n_fds > 0) {
                mh.msg_control = cm.buf;
                mh.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
                cm.h.cmsg_level = SOL_SOCKET;
                cm.h.cmsg_type = SCM_RIGHTS;
                cm.h.cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
                memcpy(CMSG_DATA(&cm.h), fds, sizeof(int) * n_fds);
        }
        return sendmsg(fd, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* A segment memfd of size bytes, sealed as the daemon seals them (or not). */
static int fake_segment(size_t size, bool sealed) {
        int fd = memfd_create("fake-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING);

        if (fd < 0 || ftruncate(fd, (off_t) size) < 0)
                _exit(90);
        if (sealed && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
                _exit(91);
        return fd;
}

enum {
        /* Descriptors in the ring. */
        BAD_SLOT_UNANNOUNCED,
        BAD_SLOT_BEYOND_TABLE,
        BAD_CHUNK_OUT_OF_RANGE,
        BAD_RUN_PAST_END,
        BAD_LENGTH_OVERFLOW,
        BAD_LENGTH_TOO_MANY_CHUNKS,
        BAD_INLINE_SIZE_FORGED_SHORT,
        BAD_INLINE_SIZE_FORGED_LONG,
        BAD_INLINE_TOO_LARGE,
        BAD_FD_FLAG_WITHOUT_FD,
        BAD_DESC_KIND,
        BAD_DESC_FLAG,
        BAD_SLOTS_PAST_HEAD,
        BAD_HEAD_RUNS_AWAY,
        /* Segments announced on the socket, then named by a descriptor. */
        BAD_SEGMENT_WRONG_SIZE,
        BAD_SEGMENT_UNSEALED,
        BAD_SEGMENT_NO_FD,
        BAD_SEGMENT_OTHER_CHUNK_SIZE,
        BAD_SEGMENT_SLOT_BEYOND_TABLE,
        BAD_SEGMENT_NOT_A_MEMFD,
        /* Frames on the socket alone: seen when the receiver reads it (a poller's receive). */
        BAD_SOCKET_FIRST,
        BAD_SEGMENT_SLOT_REUSED = BAD_SOCKET_FIRST,
        BAD_FD_FRAME_WITH_PAYLOAD,
        BAD_TWO_FDS,
        BAD_KIND,
        BAD_MESSAGE_ON_SOCKET,
        BAD_TRUNCATED_HEADER,
        N_BAD
};

static const char *const bad_names[N_BAD] = {
        "slot never announced",
        "slot beyond the table",
        "chunk out of range",
        "run past the segment's end",
        "length that overflows",
        "length over 64 chunks",
        "inline size longer than its slots",
        "inline size shorter than its slots",
        "inline payload over INLINE_MAX",
        "F_FD without an FD frame",
        "unknown descriptor kind",
        "unknown descriptor flag",
        "descriptor past the published head",
        "head more than a ring ahead",
        "segment of the wrong size",
        "unsealed segment",
        "SEGMENT without fd",
        "segment with another chunk size",
        "SEGMENT slot beyond the table",
        "segment fd that is a pipe",
        "slot announced twice",
        "FD frame with a payload",
        "FD frame with two fds",
        "unknown frame kind",
        "a message on the socket",
        "truncated header",
};

#define SEG_BYTES (SHMZ_SEGMENT_HEADER_SIZE + 64 * KiB(64))

static uint16_t desc_slots_for(size_t inline_size) {
        return (uint16_t) (inline_size <= 32 ? 1 : 1 + (inline_size - 32 + 63) / 64);
}

/* In the child: a valid chunked message first (the library announces slot 0 with it), then one bad thing. */
static _Noreturn void hostile_peer(const char *name, int which) {
        struct shmz_port *p = child_connect(name);
        struct shmz_desc dd = { .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = SHMZ_FRAME_F_CHUNK, .type = 66 };
        struct shmz_frame f = {};
        struct shmz_frame_segment fs = { .id = 4242, .slot = 1, .chunk_size = KiB(64), .n_chunks = 64 };
        static char payload[KiB(8)];
        int fd = port_socket_fd(p), fds[2], pp[2], r = 0;
        struct shmz_msg m;

        fill(payload, sizeof(payload), 1);
        {
                static char good[KiB(64)];
                fill(good, sizeof(good), 5);
                if (send_bytes(p, 1, 0, 0, good, sizeof(good), -1) < 0)
                        _exit(80);
        }
        /* The bad part only once the good message was taken: a runaway head would otherwise be seen first. */
        if (shmz_port_recv(p, &m, 10 * NSEC_PER_SEC) < 0)
                _exit(84);
        shmz_msg_release(p, &m);
        if (pipe(pp) < 0)
                _exit(81);
        switch (which) {
        case BAD_SLOT_UNANNOUNCED:
                dd.size = 100, dd.segment = 7;
                break;
        case BAD_SLOT_BEYOND_TABLE:
                dd.size = 100, dd.segment = UINT32_MAX;
                break;
        case BAD_CHUNK_OUT_OF_RANGE:
                dd.size = 100, dd.chunk = 64;
                break;
        case BAD_RUN_PAST_END:
                dd.size = 2 * KiB(64), dd.chunk = 63;
                break;
        case BAD_LENGTH_OVERFLOW:
                dd.size = UINT64_MAX;
                break;
        case BAD_LENGTH_TOO_MANY_CHUNKS:
                dd.size = 65 * KiB(64);
                break;
        case BAD_INLINE_SIZE_FORGED_SHORT:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = desc_slots_for(10), .size = 100 };
                break;
        case BAD_INLINE_SIZE_FORGED_LONG:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = desc_slots_for(100), .size = 10 };
                break;
        case BAD_INLINE_TOO_LARGE:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA,
                                         .n_slots = desc_slots_for(SHMZ_FRAME_INLINE_MAX + 1),
                                         .size = SHMZ_FRAME_INLINE_MAX + 1 };
                break;
        case BAD_FD_FLAG_WITHOUT_FD:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = SHMZ_FRAME_F_FD, .size = 4 };
                break;
        case BAD_DESC_KIND:
                dd = (struct shmz_desc){ .kind = 77, .n_slots = 1 };
                break;
        case BAD_DESC_FLAG:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .flags = 0x8000 };
                break;
        case BAD_SLOTS_PAST_HEAD:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = desc_slots_for(4000), .size = 4000 };
                r = port_raw_publish(p, &dd, payload, 4000, 1);
                break;
        case BAD_HEAD_RUNS_AWAY:
                dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA, .n_slots = 1, .size = 4 };
                r = port_raw_publish(p, &dd, payload, 4, SHMZ_RING_SLOTS + 5);
                break;
        case BAD_SEGMENT_WRONG_SIZE:
        case BAD_SEGMENT_UNSEALED:
        case BAD_SEGMENT_NO_FD:
        case BAD_SEGMENT_OTHER_CHUNK_SIZE:
        case BAD_SEGMENT_SLOT_REUSED:
        case BAD_SEGMENT_SLOT_BEYOND_TABLE:
        case BAD_SEGMENT_NOT_A_MEMFD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs) };
                fds[0] = fake_segment(which == BAD_SEGMENT_WRONG_SIZE ? SEG_BYTES - KiB(64) : SEG_BYTES,
                                      which != BAD_SEGMENT_UNSEALED);
                if (which == BAD_SEGMENT_OTHER_CHUNK_SIZE)
                        fs.chunk_size = KiB(32), fs.n_chunks = 128;
                if (which == BAD_SEGMENT_SLOT_REUSED)
                        fs.slot = 0;
                if (which == BAD_SEGMENT_SLOT_BEYOND_TABLE)
                        fs.slot = 1000;
                if (which == BAD_SEGMENT_NOT_A_MEMFD)
                        fds[0] = pp[0];
                r = raw_send(fd, &f, sizeof(f), &fs, sizeof(fs), fds, which == BAD_SEGMENT_NO_FD ? 0 : 1);
                /* And a descriptor that uses it, so that the receiver must read the announcement. */
                dd.size = 100, dd.segment = fs.slot;
                break;
        case BAD_FD_FRAME_WITH_PAYLOAD:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_FD, .size = 4 };
                r = raw_send(fd, &f, sizeof(f), payload, 4, &pp[1], 1);
                break;
        case BAD_TWO_FDS:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_FD };
                r = raw_send(fd, &f, sizeof(f), NULL, 0, pp, 2);
                break;
        case BAD_KIND:
                f = (struct shmz_frame){ .kind = 77 };
                r = raw_send(fd, &f, sizeof(f), NULL, 0, NULL, 0);
                break;
        case BAD_MESSAGE_ON_SOCKET:
                f = (struct shmz_frame){ .kind = 1, .size = 4 };
                r = raw_send(fd, &f, sizeof(f), payload, 4, NULL, 0);
                break;
        case BAD_TRUNCATED_HEADER:
                f = (struct shmz_frame){ .kind = SHMZ_FRAME_WAKE };
                r = raw_send(fd, &f, 10, NULL, 0, NULL, 0);
                break;
        }
        if (r < 0)
                _exit(82);
        if (which < BAD_SOCKET_FIRST && which != BAD_SLOTS_PAST_HEAD && which != BAD_HEAD_RUNS_AWAY)
                (void) port_raw_publish(p, &dd, payload,
                                        dd.flags & SHMZ_FRAME_F_CHUNK
                                                ? 0
                                                : (size_t) (dd.size < sizeof(payload) ? dd.size : sizeof(payload)),
                                        0);
        /* The receiver drops us: we see the port end. */
        r = shmz_port_recv(p, &m, 10 * NSEC_PER_SEC);
        _exit(r == -EPIPE ? 0 : 83);
}

Test(ports, hostile_frames_are_refused, .timeout = 300) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "hostile", 0600);

        for (int which = 0; which < N_BAD; which++) {
                struct shmz_port *p;
                struct shmz_msg m;
                unsigned fds_before;
                pid_t pid;
                int r;

                pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0)
                        hostile_peer("hostile", which);
                fds_before = count_fds(0);
                p = accept_or_die(l);
                r = shmz_port_recv(p, &m, 10 * NSEC_PER_SEC);
                cr_assert_eq(r, 0, "%s: the good message: %s", bad_names[which], strerror(-r));
                cr_assert(m.size == KiB(64) && check(m.data, KiB(64), 5));
                shmz_msg_release(p, &m);
                cr_assert_eq(send_bytes(p, 2, 0, 0, "go", 2, 0), 0);
                if (which < BAD_SOCKET_FIRST)
                        r = shmz_port_recv(p, &m, 10 * NSEC_PER_SEC);
                else {
                        /* As an event loop does: wait for the fd, receive without waiting. */
                        struct pollfd pfd = { .fd = shmz_port_fd(p), .events = POLLIN };
                        uint64_t until = now_nsec(CLOCK_MONOTONIC) + (uint64_t) (10 * NSEC_PER_SEC);

                        do {
                                cr_assert_geq(poll(&pfd, 1, 10000), 0);
                                r = shmz_port_recv(p, &m, 0);
                        } while (r == -EAGAIN && now_nsec(CLOCK_MONOTONIC) < until);
                }
                cr_assert_eq(r, -EBADMSG, "%s: recv gave %d (%s), not -EBADMSG", bad_names[which], r, strerror(-r));
                r = shmz_port_recv(p, &m, 0);
                cr_assert_eq(r, -EPIPE, "%s: recv after -EBADMSG: %s", bad_names[which], strerror(-r));
                cr_assert_eq(send_bytes(p, 1, 0, 0, "x", 1, 0), -EPIPE);
                shmz_port_close(p);
                cr_assert_eq(wait_child(pid), 0, "%s: the hostile peer was not dropped", bad_names[which]);
                cr_assert_eq(count_fds(0), fds_before, "%s: fds leaked", bad_names[which]);
        }

        /* The daemon serves on as before. */
        cr_assert_eq(kill(d.pid, 0), 0);
        pid_t pid = fork_echo("hostile");
        struct shmz_port *p = accept_or_die(l);
        round_trip(p, MiB(1), true, 0, 0);
        round_trip(p, 64, false, 0, 0);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* A segment the peer made itself, right size and seals but a header full of lies: the receiver uses what the
 * port says (chunk size, chunk count), never the header. */
Test(ports, segment_header_is_not_trusted) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "liar", 0600);
        struct shmz_port *p;
        struct shmz_msg m;
        pid_t pid;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("liar");
                struct shmz_frame_segment fs = { .id = 4242, .slot = 1, .chunk_size = KiB(64), .n_chunks = 64 };
                struct shmz_frame f = { .kind = SHMZ_FRAME_SEGMENT, .size = sizeof(fs), .segment = 1 };
                struct shmz_segment_header *h;
                int sfd = fake_segment(SEG_BYTES, false);
                char *base;

                base = mmap(NULL, SEG_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
                if (base == MAP_FAILED)
                        _exit(20);
                h = (struct shmz_segment_header *) base;
                memset(h, 0xff, sizeof(*h));
                h->magic = SHMZ_SEGMENT_MAGIC;
                h->chunk_size = 1u << 31;
                h->n_chunks = UINT32_MAX;
                h->header_size = 16;
                h->map_size = UINT64_MAX;
                memset(h->used, 0, sizeof(h->used));
                h->used[0] = 1 | (UINT64_C(1) << 63);
                fill(base + SHMZ_SEGMENT_HEADER_SIZE, 100, 6);
                fill(base + SHMZ_SEGMENT_HEADER_SIZE + 63 * KiB(64), KiB(64), 7);
                if (fcntl(sfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
                        _exit(21);
                if (raw_send(port_socket_fd(cp), &f, sizeof(f), &fs, sizeof(fs), &sfd, 1) < 0)
                        _exit(22);
                {
                        struct shmz_desc dd = { .kind = SHMZ_DESC_DATA,
                                                .n_slots = 1,
                                                .flags = SHMZ_FRAME_F_CHUNK,
                                                .type = 1,
                                                .size = 100,
                                                .segment = 1 };

                        if (port_raw_publish(cp, &dd, NULL, 0, 0) < 0)
                                _exit(23);
                        dd = (struct shmz_desc){ .kind = SHMZ_DESC_DATA,
                                                 .n_slots = 1,
                                                 .flags = SHMZ_FRAME_F_CHUNK,
                                                 .type = 2,
                                                 .size = KiB(64),
                                                 .segment = 1,
                                                 .chunk = 63 };
                        if (port_raw_publish(cp, &dd, NULL, 0, 0) < 0)
                                _exit(24);
                }
                _exit(echo_loop(cp));
        }
        p = accept_or_die(l);
        cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
        cr_assert_eq(m.type, 1);
        cr_assert_eq(m.size, 100);
        cr_assert(check(m.data, 100, 6));
        shmz_msg_release(p, &m);
        cr_assert_eq(shmz_port_recv(p, &m, 10 * NSEC_PER_SEC), 0);
        cr_assert_eq(m.type, 2);
        cr_assert_eq(m.size, KiB(64));
        cr_assert(check(m.data, KiB(64), 7));
        shmz_msg_release(p, &m);
        round_trip(p, KiB(64), true, 0, 0);
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- threads ---------------------------------------------------------------------------- */

#define SENDERS 4
#define PER_SENDER 400

struct stamp {
        uint32_t thread, seq;
};

struct sender {
        struct shmz_port *p;
        uint32_t id;
        int result;
};

static size_t thread_msg_size(uint32_t seq) {
        static const size_t sizes[] = { sizeof(struct stamp), 1000, KiB(4), KiB(20), KiB(64), KiB(200) };

        return sizes[seq % 6];
}

static void *sender_main(void *arg) {
        struct sender *s = arg;
        char *tmp = malloc(KiB(200));

        for (uint32_t seq = 0; seq < PER_SENDER; seq++) {
                size_t size = thread_msg_size(seq);
                struct stamp st = { s->id, seq };
                struct shmz_msg m = { .type = s->id, .size = size, .fd = -1 };
                bool in_place = seq % 4 == 3;
                char *b = in_place ? shmz_port_buf(s->p, size) : tmp;
                int r;

                if (!b) {
                        s->result = 30;
                        break;
                }
                fill(b, size, s->id * 7 + seq);
                memcpy(b, &st, sizeof(st));
                m.data = b;
                r = shmz_port_send(s->p, &m, 30 * NSEC_PER_SEC);
                if (r < 0) {
                        s->result = 31;
                        break;
                }
        }
        free(tmp);
        return NULL;
}

Test(ports, threads_send_on_one_port_at_once) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "threads", 0600);
        uint32_t next[SENDERS] = { 0 };
        struct shmz_port *p;
        pid_t pid;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("threads");
                struct sender s[SENDERS];
                pthread_t t[SENDERS];
                struct shmz_msg m;

                for (uint32_t i = 0; i < SENDERS; i++) {
                        s[i] = (struct sender){ .p = cp, .id = i };
                        if (pthread_create(&t[i], NULL, sender_main, &s[i]) != 0)
                                _exit(20);
                }
                for (uint32_t i = 0; i < SENDERS; i++) {
                        pthread_join(t[i], NULL);
                        if (s[i].result)
                                _exit(s[i].result);
                }
                /* Wait until the receiver is done. */
                _exit(shmz_port_recv(cp, &m, 60 * NSEC_PER_SEC) == -EPIPE ? 0 : 21);
        }
        p = accept_or_die(l);
        for (int i = 0; i < SENDERS * PER_SENDER; i++) {
                struct shmz_msg m;
                struct stamp st;
                int r = shmz_port_recv(p, &m, 30 * NSEC_PER_SEC);

                cr_assert_eq(r, 0, "message %d: %s", i, strerror(-r));
                cr_assert_geq(m.size, sizeof(st));
                memcpy(&st, m.data, sizeof(st));
                cr_assert_lt(st.thread, SENDERS);
                cr_assert_eq(m.type, st.thread);
                /* Each thread's messages arrive in its order, whole. */
                cr_assert_eq(st.seq, next[st.thread], "thread %u: message %u after %u", st.thread, st.seq,
                             next[st.thread]);
                cr_assert_eq(m.size, thread_msg_size(st.seq));
                cr_assert(check_from(m.data, sizeof(st), m.size, st.thread * 7 + st.seq),
                          "thread %u message %u: bytes changed", st.thread, st.seq);
                next[st.thread]++;
                shmz_msg_release(p, &m);
        }
        shmz_port_close(p);
        cr_assert_eq(wait_child(pid), 0);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

/* ---- RPC -------------------------------------------------------------------------------- */

enum { RPC_TWO_REPLIES = 1, RPC_NEVER = 2, RPC_DIE = 3, RPC_LATE = 4 };

static void server_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        uint32_t type = m->type, stream = m->stream;

        shmz_msg_release(p, m);
        switch (type) {
        case RPC_TWO_REPLIES:
                if (send_bytes(p, 11, stream, 0, "r1", 2, -1) < 0 ||
                    send_bytes(p, 12, stream, SHMZ_MSG_LAST, "r2", 2, -1) < 0)
                        _exit(30);
                break;
        case RPC_LATE:
                sleep_ms(200);
                (void) send_bytes(p, 13, stream, SHMZ_MSG_LAST, "late", 4, -1);
                break;
        case RPC_DIE:
                _exit(0);
        default:
                break;
        }
}

struct call_log {
        int n;
        int error[8];
        uint32_t type[8], flags[8];
        char data[8][8];
        uint64_t at[8];
};

static void reply_handler(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        struct call_log *log = userdata;
        int i = log->n++;

        if (i >= 8)
                return;
        log->error[i] = error;
        log->at[i] = now_nsec(CLOCK_MONOTONIC);
        if (error == 0 && reply) {
                log->type[i] = reply->type;
                log->flags[i] = reply->flags;
                memcpy(log->data[i], reply->data, reply->size < 7 ? reply->size : 7);
                shmz_msg_release(p, reply);
        }
}

static int strays;

static void stray_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        strays++;
        shmz_msg_release(p, m);
}

/* One turn of an epoll loop: wait for the port's fd or its next deadline, then dispatch. */
static void epoll_turn(int ep, struct shmz_port *p) {
        uint64_t next = shmz_port_next_deadline(p), now = now_nsec(CLOCK_MONOTONIC);
        struct epoll_event ev;
        int timeout_ms = 1000, r;

        if (next != UINT64_MAX)
                timeout_ms = next <= now ? 0 : (int) ((next - now + NSEC_PER_MSEC - 1) / NSEC_PER_MSEC);
        if (timeout_ms > 1000)
                timeout_ms = 1000;
        r = epoll_wait(ep, &ev, 1, timeout_ms);
        cr_assert_geq(r, 0);
        r = shmz_port_dispatch(p, 0);
        cr_assert(r >= 0 || r == -EAGAIN || r == -EPIPE, "dispatch: %s", strerror(-r));
}

Test(ports, rpc_from_an_epoll_loop) {
        struct shmz_client *c = connect_or_die();
        struct shmz_listener *l = listen_or_die(c, "rpc", 0600);
        struct call_log a = { 0 }, b = { 0 }, cc = { 0 }, e = { 0 }, f = { 0 };
        struct epoll_event ev = { .events = EPOLLIN };
        uint32_t sa = 0, sb = 0, sc = 0, se = 0, sf = 0;
        struct shmz_port *p;
        struct shmz_msg m;
        uint64_t deadline, t0;
        pid_t pid;
        int ep, r;

        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct shmz_port *cp = child_connect("rpc");

                shmz_port_set_handler(cp, server_handler, NULL);
                for (;;) {
                        r = shmz_port_dispatch(cp, -1);
                        if (r == -EPIPE)
                                _exit(0);
                        if (r < 0)
                                _exit(10);
                }
        }
        p = accept_or_die(l);
        shmz_port_set_handler(p, stray_handler, NULL);
        ep = epoll_create1(EPOLL_CLOEXEC);
        cr_assert_geq(ep, 0);
        cr_assert_eq(epoll_ctl(ep, EPOLL_CTL_ADD, shmz_port_fd(p), &ev), 0);
        cr_assert_eq(shmz_port_next_deadline(p), UINT64_MAX);

        m = (struct shmz_msg){ .type = RPC_TWO_REPLIES, .data = "q", .size = 1, .fd = -1 };
        cr_assert_eq(shmz_port_call(p, &m, 0, reply_handler, &a, &sa), 0);
        deadline = now_nsec(CLOCK_MONOTONIC) + 100 * NSEC_PER_MSEC;
        m.type = RPC_LATE;
        cr_assert_eq(shmz_port_call(p, &m, deadline, reply_handler, &b, &sb), 0);
        cr_assert_eq(shmz_port_next_deadline(p), deadline);
        m.type = RPC_NEVER;
        cr_assert_eq(shmz_port_call(p, &m, 0, reply_handler, &cc, &sc), 0);
        cr_assert(sa != 0 && sb != 0 && sc != 0 && sa != sb && sb != sc && sa != sc, "streams %u %u %u", sa, sb, sc);

        t0 = now_nsec(CLOCK_MONOTONIC);
        while ((a.n < 2 || b.n < 1) && now_nsec(CLOCK_MONOTONIC) - t0 < 5 * NSEC_PER_SEC)
                epoll_turn(ep, p);
        /* Two replies, the second LAST, then the handler is gone. */
        cr_assert_eq(a.n, 2);
        cr_assert_eq(a.error[0], 0);
        cr_assert_eq(a.type[0], 11);
        cr_assert_str_eq(a.data[0], "r1");
        cr_assert_eq(a.flags[0] & SHMZ_MSG_LAST, 0);
        cr_assert_eq(a.error[1], 0);
        cr_assert_eq(a.type[1], 12);
        cr_assert_neq(a.flags[1] & SHMZ_MSG_LAST, 0);
        /* The deadline fired from the loop's own timer, on time. */
        cr_assert_eq(b.n, 1);
        cr_assert_eq(b.error[0], -ETIMEDOUT);
        cr_assert_geq(b.at[0], deadline);
        cr_assert_lt(b.at[0] - deadline, 30 * NSEC_PER_MSEC, "-ETIMEDOUT %.1f ms late",
                     (double) (b.at[0] - deadline) / 1e6);
        cr_assert_eq(shmz_port_next_deadline(p), UINT64_MAX);

        /* The late reply comes after the timeout: the timed-out call hears nothing more. */
        t0 = now_nsec(CLOCK_MONOTONIC);
        while (now_nsec(CLOCK_MONOTONIC) - t0 < 300 * NSEC_PER_MSEC)
                epoll_turn(ep, p);
        cr_assert_eq(b.n, 1);
        cr_assert_eq(a.n, 2);
        cr_assert_eq(cc.n, 0);

        /* Blocking dispatch works too. */
        m.type = RPC_TWO_REPLIES;
        cr_assert_eq(shmz_port_call(p, &m, now_nsec(CLOCK_MONOTONIC) + 10 * NSEC_PER_SEC, reply_handler, &e, &se), 0);
        cr_assert(se != sa && se != sb && se != sc);
        t0 = now_nsec(CLOCK_MONOTONIC);
        while (e.n < 2 && now_nsec(CLOCK_MONOTONIC) - t0 < 5 * NSEC_PER_SEC) {
                r = shmz_port_dispatch(p, NSEC_PER_SEC);
                cr_assert(r >= 0 || r == -ETIMEDOUT, "dispatch: %s", strerror(-r));
        }
        cr_assert_eq(e.n, 2);
        cr_assert_neq(e.flags[1] & SHMZ_MSG_LAST, 0);

        /* The server dies: the pending call ends with -EPIPE. */
        cr_assert_eq(send_bytes(p, RPC_DIE, 0, 0, "die", 3, -1), 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        while (cc.n < 1 && now_nsec(CLOCK_MONOTONIC) - t0 < 5 * NSEC_PER_SEC)
                epoll_turn(ep, p);
        cr_assert_eq(cc.n, 1);
        cr_assert_eq(cc.error[0], -EPIPE);
        cr_assert_eq(wait_child(pid), 0);
        r = shmz_port_call(p, &m, 0, reply_handler, &f, &sf);
        cr_assert(r == -EPIPE || (r == 0 && (shmz_port_dispatch(p, NSEC_PER_SEC), f.n == 1 && f.error[0] == -EPIPE)),
                  "call on a dead port: %s", strerror(-r));
        cr_assert_eq(shmz_port_dispatch(p, 0), -EPIPE);

        close(ep);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}
