/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The attacks of an ordinary local user (uid 65534) on a real daemon and a
 * real mount, one test per hole that such an attack once found. Each test
 * failed on the code before its fix; SECURITY.md says what they defend.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "port.h"
#include "reaper.h"
#include "harness.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "stallfs.h"
#include "util.h"

#define NOBODY 65534

static struct daemon_proc d;
static struct stallfs *sf;

static void start_mounted(void) {
        (void) unsetenv("SHMZONE_SOCKET");
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        static char log[65536];
        bool ran;
        int st;

        /* Whatever the test left stuck on the stalling filesystem goes first. */
        if (sf)
                stallfs_release(sf);
        ran = d.pid > 0;
        st = ran ? harness_stop(&d) : 0;
        stallfs_stop(TAKE_PTR(sf));

        snprintf(log, sizeof(log), "%s", harness_log(&d));
        harness_cleanup(&d);
        cr_assert_eq(st, 0, "daemon exit status %d: %s", st, log);
}

static struct shmz_client *client(void) {
        struct shmz_client *c = NULL;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        return c;
}

static void make_zone_mode(struct shmz_client *c, const char *name, uint64_t size, mode_t mode) {
        struct shmz_zone *z = NULL;

        cr_assert_eq(shmz_zone_open(c, name, size, NULL, SHMZ_CREATE | SHMZ_EXCL, &z), 0, "create %s", name);
        shmz_zone_close(z);
        cr_assert_eq(shmz_zone_chmod(c, name, mode), 0);
}

/* ---- F1: a read-only attachment has no route to a writable mapping ------------------------ */

#define PATTERN "read-only bytes of root"

/*
 * Every way we know from a read-only fd to a write. Returns 0 if all are
 * refused, else the number of the route that went through.
 */
static int try_write_routes(int fd) {
        char path[64], buf[64];
        uint8_t *map, *priv;
        long page = sysconf(_SC_PAGESIZE);
        struct stat st;
        int nfd, memfd;

        if (fstat(fd, &st) < 0)
                return 90;
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        nfd = open(path, O_RDWR | O_CLOEXEC);
        if (nfd >= 0)
                return 1;
        nfd = open(path, O_WRONLY | O_CLOEXEC);
        if (nfd >= 0)
                return 2;
        if (mmap(NULL, (size_t) page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) != MAP_FAILED)
                return 3;
        map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
                return 91;
        if (mprotect(map, (size_t) page, PROT_READ | PROT_WRITE) == 0)
                return 4;
        if (pwrite(fd, "X", 1, SHMZ_ZONE_HEADER_SIZE) >= 0)
                return 5;
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, page) == 0)
                return 6;
        if (ftruncate(fd, 0) == 0)
                return 7;
        if (fchmod(fd, 0666) == 0)
                return 8;
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE) == 0)
                return 9;
        /* MADV_REMOVE punches a hole: zeroes for everybody. */
        if (madvise(map + SHMZ_ZONE_HEADER_SIZE, (size_t) page, MADV_REMOVE) == 0)
                return 10;
        /* /proc/self/mem writes with FOLL_FORCE, which must not break through a shared mapping. */
        memfd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
        if (memfd >= 0) {
                ssize_t n = pwrite(memfd, "X", 1, (off_t) (uintptr_t) (map + SHMZ_ZONE_HEADER_SIZE));

                close(memfd);
                if (n == 1)
                        return 11;
        }
        /* A private writable mapping is allowed, but it is a copy: the zone must not change. */
        priv = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (priv != MAP_FAILED) {
                priv[SHMZ_ZONE_HEADER_SIZE] = 'X';
                (void) munmap(priv, (size_t) st.st_size);
        }
        memcpy(buf, map + SHMZ_ZONE_HEADER_SIZE, sizeof(PATTERN));
        (void) munmap(map, (size_t) st.st_size);
        return memcmp(buf, PATTERN, sizeof(PATTERN)) == 0 ? 0 : 12;
}

static int attack_socket_route(void *userdata) {
        struct shmz_msg_zone_open req = { .flags = SHMZ_RDONLY };
        struct shmz_msg_zone_info info;
        struct shmz_client *c;
        int fd = -EBADF, r;

        if (shmz_connect(d.socket, &c) < 0)
                return 100;
        strncpy_buf(req.name, sizeof(req.name), userdata);
        /* The raw protocol: a hostile client keeps the fd the library would close. */
        r = client_request(c, SHMZ_MSG_ZONE_OPEN, &req, sizeof(req), &info, sizeof(info), &fd);
        if (r < 0 || fd < 0)
                return 101;
        r = try_write_routes(fd);
        close(fd);
        shmz_disconnect(c);
        return r;
}

static int attack_ticket_route(void *userdata) {
        struct shmz_msg_zone_ticket t = { .flags = SHMZ_RDONLY };
        struct shmz_msg_zone_info info;
        struct shmz_client *c;
        char path[256];
        int file, fd = -EBADF, r;

        snprintf(path, sizeof(path), "%s/zones/%s", d.mount, (const char *) userdata);
        file = open(path, O_RDONLY | O_CLOEXEC);
        if (file < 0)
                return 102;
        if (open(path, O_RDWR | O_CLOEXEC) >= 0)
                return 103;
        if (ioctl(file, SHMZ_IOC_TICKET, &t) < 0)
                return 104;
        t.flags = SHMZ_RDONLY;
        if (shmz_connect(d.socket, &c) < 0)
                return 105;
        r = client_request(c, SHMZ_MSG_ZONE_OPEN_TICKET, &t, sizeof(t), &info, sizeof(info), &fd);
        if (r < 0 || fd < 0)
                return 106;
        r = try_write_routes(fd);
        close(fd);
        close(file);
        shmz_disconnect(c);
        return r;
}

Test(attack, f1_read_only_attach_has_no_route_to_writing, .init = start_mounted, .fini = stop, .timeout = 60) {
        struct shmz_client *c = client();
        struct shmz_zone *z;
        int r;

        cr_assert_eq(shmz_zone_open(c, "rootro", 65536, NULL, SHMZ_CREATE, &z), 0);
        memcpy(shmz_zone_base(z), PATTERN, sizeof(PATTERN));
        cr_assert_eq(shmz_zone_chmod(c, "rootro", 0644), 0);

        r = harness_run_as(NOBODY, NOBODY, attack_socket_route, "rootro");
        cr_assert_eq(r, 0, "socket route: write route %d went through", r);
        r = harness_run_as(NOBODY, NOBODY, attack_ticket_route, "rootro");
        cr_assert_eq(r, 0, "ticket route: write route %d went through", r);
        cr_assert_str_eq(shmz_zone_base(z), PATTERN);
        shmz_zone_close(z);
        shmz_disconnect(c);
}

/* ---- F3: an fd whose close() blocks cannot stop a worker ------------------------------------ */

static int raw_connect(const char *path) {
        int fd = harness_raw_connect(path);

        cr_assert_geq(fd, 0, "connect %s: %s", path, strerror(-fd));
        return fd;
}

/* A STATUS request with fd riding along; returns sendmsg()'s result (-errno on failure). */
static int send_with_fd(int sock, int fd) {
        struct shmz_msg_header h = { .size = sizeof(h), .type = SHMZ_MSG_STATUS, .stream = 1 };
        union {
                struct cmsghdr c;
                char b[CMSG_SPACE(sizeof(int))];
        } ctl = {};
        struct iovec iov = { .iov_base = &h, .iov_len = sizeof(h) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof(ctl.b) };
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
        return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* The daemon answers a new client within two seconds. */
static bool daemon_answers(void) {
        struct shmz_client *c = NULL;
        struct shmz_daemon_status st;
        bool ok;

        if (shmz_connect(d.socket, &c) < 0)
                return false;
        ok = shmz_daemon_status(c, &st) == 0;
        shmz_disconnect(c);
        return ok;
}

static void *answers_thread(void *arg) {
        return (void *) (uintptr_t) daemon_answers();
}

/* Like daemon_answers(), but gives up after two seconds instead of hanging with a stuck daemon. */
static bool daemon_answers_soon(void) {
        pthread_t t;
        struct timespec ts;
        void *ret = NULL;

        cr_assert_eq(pthread_create(&t, NULL, answers_thread, NULL), 0);
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 5;
        if (pthread_timedjoin_np(t, &ret, &ts) != 0) {
                (void) pthread_detach(t);
                return false;
        }
        return (bool) (uintptr_t) ret;
}

/*
 * A file whose close() by the daemon never returns: its FLUSH waits on a FUSE
 * server that a user mounted (any user can). Each connection passes it once.
 */
static void passed_fds_do_not_stall(bool kernel_refuses) {
        char dir[192];
        int fd, socks[4];

        snprintf(dir, sizeof(dir), "%s/stall", d.dir);
        fd = stallfs_start_with_stalling_fd(dir, &sf);
        cr_assert_geq(fd, 0, "stallfs at %s: %s", dir, strerror(-fd));

        /* More connections than workers: each one's fd would stop its worker. */
        for (size_t i = 0; i < ELEMENTSOF(socks); i++) {
                int r;

                socks[i] = raw_connect(d.socket);
                r = send_with_fd(socks[i], fd);
                if (kernel_refuses)
                        cr_assert_eq(r, -EPERM, "the kernel should refuse the fd: %d", r);
                else
                        cr_assert_eq(r, 0);
        }
        close(fd);
        cr_assert(daemon_answers_soon(), "a passed fd stalled the daemon");
        if (!kernel_refuses) {
                /* The fd reached the daemon, whose close of it is stuck for good. */
                for (int i = 0; i < 500 && stallfs_stalled(sf) == 0; i++)
                        usleep(10000);
                cr_assert_gt(stallfs_stalled(sf), 0, "the daemon never closed the fd");
                cr_assert(daemon_answers_soon(), "a passed fd stalled the daemon");
        }
        for (size_t i = 0; i < ELEMENTSOF(socks); i++) {
                char b[64];
                ssize_t n;

                /* Refused by the kernel: the connection serves on. Taken: the connection ends. */
                if (kernel_refuses) {
                        struct shmz_msg_header h = { .size = sizeof(h), .type = SHMZ_MSG_HELLO, .stream = 2 };

                        cr_assert_eq(send(socks[i], &h, sizeof(h), 0), (ssize_t) sizeof(h));
                        n = recv(socks[i], b, sizeof(b), 0);
                        cr_assert_gt(n, 0, "connection ended after a refused fd");
                } else {
                        n = recv(socks[i], b, sizeof(b), 0);
                        cr_assert_eq(n, 0, "an fd in a request must end the connection");
                }
                close(socks[i]);
        }
        /*
         * Stopping must not wait for the close that hangs: the daemon finishes
         * its shutdown. (The kernel keeps a thread inside a FUSE FLUSH that
         * was read by its server until the server answers, whatever signal
         * comes; only then is the process gone.)
         */
        cr_assert_eq(kill(d.pid, SIGTERM), 0);
        cr_assert_eq(harness_wait_log(&d, "Stopped.", 20), 0, "shutdown stuck: %s", harness_log(&d));
        stallfs_release(sf);
        cr_assert_eq(harness_stop(&d), 0, "stop: %s", harness_log(&d));
}

static bool kernel_has_passrights(void) {
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), v = 0;
        socklen_t len = sizeof(v);
        bool ok = getsockopt(fd, SOL_SOCKET, 83 /* SO_PASSRIGHTS */, &v, &len) == 0;

        close(fd);
        return ok;
}

static void start_one_worker(void) {
        harness_init(&d, "[daemon]\nthreads = 1\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

Test(attack, f3_passed_fds_are_refused_by_the_kernel, .fini = stop, .timeout = 60) {
        if (!kernel_has_passrights())
                cr_skip_test("this kernel has no SO_PASSRIGHTS");
        start_one_worker();
        passed_fds_do_not_stall(true);
}

Test(attack, f3_passed_fds_never_block_a_worker, .fini = stop, .timeout = 60) {
        /* The path of kernels without SO_PASSRIGHTS: the daemon takes the fds and must not close them inline. */
        cr_assert_eq(setenv("SHMZONE_TEST_ACCEPT_FDS", "1", 1), 0);
        start_one_worker();
        (void) unsetenv("SHMZONE_TEST_ACCEPT_FDS");
        passed_fds_do_not_stall(false);
}

/* ---- F4: replies nobody reads cost the daemon a page, not the list -------------------------- */

static long daemon_rss_kib(void) {
        char path[64], line[256];
        long kib = -1;
        FILE *f;

        snprintf(path, sizeof(path), "/proc/%d/status", (int) d.pid);
        f = fopen(path, "re");
        cr_assert_not_null(f);
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
                        break;
        fclose(f);
        return kib;
}

static uint64_t daemon_requests(void) {
        struct shmz_client *c = client();
        struct shmz_daemon_status st;

        cr_assert_eq(shmz_daemon_status(c, &st), 0);
        shmz_disconnect(c);
        return st.requests;
}

static void send_request(int fd, uint16_t type, uint32_t stream, const void *body, size_t size) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h = { .size = (uint32_t) (sizeof(h) + size), .type = type, .stream = stream };

        memcpy(buf, &h, sizeof(h));
        if (size > 0)
                memcpy(buf + sizeof(h), body, size);
        cr_assert_eq(send(fd, buf, sizeof(h) + size, MSG_NOSIGNAL), (ssize_t) (sizeof(h) + size));
}

static void say_hello(int fd) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h;

        send_request(fd, SHMZ_MSG_HELLO, 1, &hello, sizeof(hello));
        cr_assert_gt(recv(fd, buf, sizeof(buf), 0), 0);
        memcpy(&h, buf, sizeof(h));
        cr_assert_eq(h.status, 0);
}

#define N_ZONES 3000
#define N_READERS_WHO_NEVER_READ 300

Test(attack, f4_unread_listings_do_not_grow_the_daemon, .fini = stop, .timeout = 240) {
        struct shmz_client *c;
        static int socks[N_READERS_WHO_NEVER_READ];
        uint64_t before;
        long rss0, rss1;

        harness_init(&d, "[daemon]\nmemory_budget = 1G\nuid_quota = 1G\nuid_max_zones = 10000\n"
                         "uid_max_clients = 1000\nmax_clients = 2000\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
        c = client();
        for (int i = 0; i < N_ZONES; i++) {
                struct shmz_zone *z;
                char name[32];

                snprintf(name, sizeof(name), "z%05d", i);
                cr_assert_eq(shmz_zone_open(c, name, 1, NULL, SHMZ_CREATE, &z), 0);
                shmz_zone_close(z);
        }
        shmz_disconnect(c);

        rss0 = daemon_rss_kib();
        before = daemon_requests();
        for (int i = 0; i < N_READERS_WHO_NEVER_READ; i++) {
                socks[i] = raw_connect(d.socket);
                say_hello(socks[i]);
                send_request(socks[i], SHMZ_MSG_ZONE_LIST, 2, NULL, 0);
        }
        /* Every listing has been started (the status request is counted too). */
        for (int i = 0; i < 2000 && daemon_requests() < before + 2 * N_READERS_WHO_NEVER_READ; i++)
                usleep(10000);
        rss1 = daemon_rss_kib();
        /* Before the fix: 300 x 3000 queued replies, about 300 MiB. */
        cr_assert_lt(rss1 - rss0, 48 * 1024, "the daemon grew by %ld KiB for listings nobody reads", rss1 - rss0);

        /* The listings are whole and in order for those who read them after all. */
        for (int i = 0; i < 3; i++) {
                uint8_t buf[SHMZ_MSG_MAX];
                char prev[SHMZ_NAME_BUF] = "";
                int n = 0;

                for (;;) {
                        struct shmz_msg_header h;
                        struct shmz_msg_zone_info info;
                        ssize_t got = recv(socks[i], buf, sizeof(buf), 0);

                        cr_assert_geq(got, (ssize_t) sizeof(h));
                        memcpy(&h, buf, sizeof(h));
                        cr_assert_eq(h.status, 0);
                        if (h.flags & SHMZ_MSG_F_LAST)
                                break;
                        memcpy(&info, buf + sizeof(h), sizeof(info));
                        cr_assert_gt(strcmp(info.name, prev), 0, "%s after %s", info.name, prev);
                        strncpy_buf(prev, sizeof(prev), info.name);
                        n++;
                }
                cr_assert_eq(n, N_ZONES);
        }
        for (int i = 0; i < N_READERS_WHO_NEVER_READ; i++)
                close(socks[i]);
}

/* ---- F5: one uid cannot take every slot, and a slot needs a hello ----------------------------- */

struct hold {
        int ready[2], go[2]; /* pipes: child -> parent, parent -> child */
};

static int hold_eight_connections(void *userdata) {
        struct hold *h = userdata;
        int socks[8], extra;
        char b[64];
        struct pollfd p;

        for (int i = 0; i < 8; i++) {
                socks[i] = harness_raw_connect(d.socket);
                if (socks[i] < 0)
                        return 10;
        }
        for (int i = 0; i < 8; i++) {
                struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
                struct {
                        struct shmz_msg_header h;
                        struct shmz_msg_hello b;
                } m = { { .size = sizeof(m), .type = SHMZ_MSG_HELLO, .stream = 1 }, hello };

                if (send(socks[i], &m, sizeof(m), 0) != (ssize_t) sizeof(m) || recv(socks[i], b, sizeof(b), 0) <= 0)
                        return 11;
        }
        /* The ninth connection of this uid ends before its hello. */
        extra = harness_raw_connect(d.socket);
        if (extra < 0)
                return 12;
        p = (struct pollfd){ .fd = extra, .events = POLLIN };
        if (poll(&p, 1, 5000) != 1 || recv(extra, b, sizeof(b), 0) != 0)
                return 13;
        close(extra);
        (void) !write(h->ready[1], "r", 1);
        (void) !read(h->go[0], b, 1);
        for (int i = 0; i < 8; i++)
                close(socks[i]);
        return 0;
}

static void *hold_thread(void *arg) {
        return (void *) (intptr_t) harness_run_as(NOBODY, NOBODY, hold_eight_connections, arg);
}

Test(attack, f5_one_uid_cannot_take_every_slot, .fini = stop, .timeout = 60) {
        struct hold h;
        pthread_t t;
        void *ret;
        char b[64];
        struct pollfd p;
        int idle;

        harness_init(&d, "[daemon]\nuid_max_clients = 8\nhello_timeout = 1\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
        cr_assert_eq(pipe2(h.ready, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(h.go, O_CLOEXEC), 0);
        cr_assert_eq(pthread_create(&t, NULL, hold_thread, &h), 0);
        p = (struct pollfd){ .fd = h.ready[0], .events = POLLIN };
        if (poll(&p, 1, 20000) == 1) {
                /* With nobody's eight slots taken, others still get in. */
                cr_assert(daemon_answers_soon(), "root was locked out");
        }
        (void) !write(h.go[1], "g", 1);
        cr_assert_eq(pthread_join(t, &ret), 0);
        cr_assert_eq((intptr_t) ret, 0, "nobody's connections: step %d failed", (int) (intptr_t) ret);

        /* A connection that never says hello gives its slot back. */
        idle = raw_connect(d.socket);
        p = (struct pollfd){ .fd = idle, .events = POLLIN };
        cr_assert_eq(poll(&p, 1, 10000), 1, "a silent connection was kept");
        cr_assert_eq(recv(idle, b, sizeof(b), 0), 0);
        close(idle);
}

/* ---- F8: a user holding the zones/ directory lock stalls nothing of ours --------------------- */

struct dents {
        int dirfd;
        void *buf;
        long r;
};

static void *getdents_thread(void *arg) {
        struct dents *g = arg;

        /* Writing the first entry faults on a page only the stalling server can provide, lock held. */
        g->r = syscall(SYS_getdents64, g->dirfd, g->buf, 65536);
        return NULL;
}

Test(attack, f8_a_held_directory_lock_stalls_nothing, .init = start_mounted, .fini = stop, .timeout = 120) {
        struct shmz_client *c = client();
        struct dents g = {};
        char dir[192], path[256];
        pthread_t t;
        int fd;

        snprintf(dir, sizeof(dir), "%s/stall", d.dir);
        cr_assert_eq(stallfs_start(dir, &sf), 0);
        snprintf(path, sizeof(path), "%s/file", dir);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        cr_assert_geq(fd, 0);
        g.buf = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        cr_assert_neq(g.buf, MAP_FAILED);
        close(fd);
        snprintf(path, sizeof(path), "%s/zones", d.mount);
        g.dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        cr_assert_geq(g.dirfd, 0);
        cr_assert_eq(pthread_create(&t, NULL, getdents_thread, &g), 0);
        for (int i = 0; i < 500 && stallfs_stalled(sf) == 0; i++)
                usleep(10000);
        cr_assert_gt(stallfs_stalled(sf), 0, "getdents did not get stuck");

        /* Churn: every create and unlink changes zones/ (its lock is held for good now). */
        for (int i = 0; i < 2000; i++) {
                struct shmz_zone *z;
                char name[32];

                snprintf(name, sizeof(name), "churn%d", i % 50);
                cr_assert_eq(shmz_zone_open(c, name, 4096, NULL, SHMZ_CREATE, &z), 0);
                shmz_zone_close(z);
                cr_assert_eq(shmz_zone_unlink(c, name), 0);
        }
        shmz_disconnect(c);
        cr_assert(daemon_answers_soon());

        /* The daemon stops, unmount included, while the lock is still held. */
        cr_assert_eq(kill(d.pid, SIGTERM), 0);
        cr_assert_eq(harness_wait_log(&d, "Stopped.", 20), 0, "shutdown stuck: %s", harness_log(&d));
        stallfs_release(sf);
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_eq(g.r, -1, "getdents into an unreadable buffer");
        close(g.dirfd);
        (void) munmap(g.buf, 65536);
        cr_assert_eq(harness_stop(&d), 0, "stop: %s", harness_log(&d));
}

/* ---- F9: open zone files and directories cost the daemon a bounded amount ------------------- */

static unsigned daemon_mappings_of(const char *memfd_name) {
        char path[64], line[512];
        unsigned n = 0;
        FILE *f;

        snprintf(path, sizeof(path), "/proc/%d/maps", (int) d.pid);
        f = fopen(path, "re");
        cr_assert_not_null(f);
        while (fgets(line, sizeof(line), f))
                if (strstr(line, memfd_name))
                        n++;
        fclose(f);
        return n;
}

#define N_OPENS 2000

Test(attack, f9_open_zone_files_share_one_mapping, .init = start_mounted, .fini = stop, .timeout = 120) {
        struct shmz_client *c = client();
        struct rlimit rl;
        char path[256];
        static int fds[N_OPENS];

        make_zone_mode(c, "many", 65536, 0644);
        cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
        rl.rlim_cur = rl.rlim_max;
        (void) setrlimit(RLIMIT_NOFILE, &rl);
        snprintf(path, sizeof(path), "%s/zones/many", d.mount);
        for (int i = 0; i < N_OPENS; i++) {
                char b;

                fds[i] = open(path, O_RDONLY | O_CLOEXEC);
                cr_assert_geq(fds[i], 0, "open %d: %m", i);
                cr_assert_eq(pread(fds[i], &b, 1, 0), 1);
        }
        /* Before the fix: one mapping per open file that was read. */
        cr_assert_eq(daemon_mappings_of("shmzone:many"), 1);
        for (int i = 0; i < N_OPENS; i++)
                close(fds[i]);
        shmz_disconnect(c);
}

#define N_DIR_ZONES 3000
#define N_DIR_OPENS 200

Test(attack, f9_open_directories_hold_no_copy_of_the_listing, .init = start_mounted, .fini = stop, .timeout = 240) {
        struct shmz_client *c = client();
        static int dirs[N_DIR_OPENS];
        char path[256], buf[4096];
        long rss0, rss1;

        for (int i = 0; i < N_DIR_ZONES; i++) {
                struct shmz_zone *z;
                char name[32];

                snprintf(name, sizeof(name), "d%05d", i);
                cr_assert_eq(shmz_zone_open(c, name, 1, NULL, SHMZ_CREATE, &z), 0, "zone %d", i);
                shmz_zone_close(z);
        }
        snprintf(path, sizeof(path), "%s/zones", d.mount);
        rss0 = daemon_rss_kib();
        /* Each open directory starts a listing and stops after one small read. */
        for (int i = 0; i < N_DIR_OPENS; i++) {
                dirs[i] = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                cr_assert_geq(dirs[i], 0);
                cr_assert_gt(syscall(SYS_getdents64, dirs[i], buf, sizeof(buf)), 0);
        }
        rss1 = daemon_rss_kib();
        /* Before the fix: a copy of the listing per open directory, about 220 MiB here. */
        cr_assert_lt(rss1 - rss0, 48 * 1024, "the daemon grew by %ld KiB for open directories", rss1 - rss0);
        for (int i = 0; i < N_DIR_OPENS; i++)
                close(dirs[i]);
        /* And a listing read to the end is whole. */
        {
                char out[64];
                FILE *p;
                char cmd[320];

                snprintf(cmd, sizeof(cmd), "ls %s | wc -l", path);
                p = popen(cmd, "re");
                cr_assert_not_null(p);
                cr_assert_not_null(fgets(out, sizeof(out), p));
                pclose(p);
                cr_assert_eq(atoi(out), N_DIR_ZONES);
        }
        shmz_disconnect(c);
}

/* ---- A review's finding: a client that hangs up on unread replies cannot spin a worker ------------- */

/* The daemon's CPU time (user + system), in clock ticks. */
static unsigned long long daemon_cpu_ticks(void) {
        char path[64], buf[1024], *p;
        unsigned long long utime = 0, stime = 0;
        FILE *f;

        snprintf(path, sizeof(path), "/proc/%d/stat", (int) d.pid);
        f = fopen(path, "re");
        cr_assert_not_null(f);
        cr_assert_not_null(fgets(buf, sizeof(buf), f));
        fclose(f);
        /* After "(comm)": state is field 3, utime 14, stime 15. */
        p = strrchr(buf, ')');
        cr_assert_not_null(p);
        cr_assert_eq(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime), 2);
        return utime + stime;
}

Test(attack, review_hangup_with_unread_replies_does_not_spin, .fini = stop, .timeout = 60) {
        struct shmz_msg_header h = { .size = sizeof(h), .type = SHMZ_MSG_STATUS, .stream = 2 };
        unsigned long long t0, t1;
        long hz = sysconf(_SC_CLK_TCK);
        int fd, sent = 0;

        start_one_worker();
        fd = raw_connect(d.socket);
        say_hello(fd);
        /* Requests until the daemon's replies fill the socket and wait in its queue (it then reads no more). */
        for (int i = 0, full = 0; i < 20000 && full < 100; i++) {
                if (send(fd, &h, sizeof(h), MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
                        cr_assert_eq(errno, EAGAIN, "send: %m");
                        full++;
                        usleep(1000);
                        continue;
                }
                full = 0;
                sent++;
        }
        cr_assert_gt(sent, 0);
        usleep(200 * 1000);
        /* Neither side sends or receives any more; the fd stays open, the replies stay unread. */
        cr_assert_eq(shutdown(fd, SHUT_RDWR), 0);
        usleep(100 * 1000);
        t0 = daemon_cpu_ticks();
        usleep(1000 * 1000);
        t1 = daemon_cpu_ticks();
        /* Before the fix: the hang-up was reported again and again with nothing done, a whole core. */
        cr_assert_lt(t1 - t0, (unsigned long long) hz / 4, "the daemon used %llu of %ld ticks in a second", t1 - t0,
                     hz);
        cr_assert(daemon_answers_soon(), "the daemon does not answer");
        close(fd);
}

/* ---- A review's finding: open files cannot make each request on a gone zone walk them all ---- */

#define N_HOLDERS 4
#define N_OPENS_PER_HOLDER 18000
#define N_XATTR_CALLS 300

static double now_sec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* Seconds for N_XATTR_CALLS fgetxattr()s on fd: never cached by the kernel, each one is a request. */
static double xattr_calls_sec(int fd) {
        double t0 = now_sec();

        for (int i = 0; i < N_XATTR_CALLS; i++) {
                char b[64];

                cr_assert_gt(fgetxattr(fd, "user.shmzone.generation", b, sizeof(b)), 0, "fgetxattr: %m");
        }
        return now_sec() - t0;
}

/* A child that opens path as often as its fd limit allows, says so on ready, and holds them until hold closes. */
static pid_t hold_open_files(const char *path, int ready, const int hold[2]) {
        pid_t pid = fork();
        char b = 1;

        cr_assert_geq(pid, 0);
        if (pid > 0)
                return pid;
        close(hold[1]); /* the parent's alone: its close ends every child */
        for (int i = 0; i < N_OPENS_PER_HOLDER; i++)
                if (open(path, O_RDONLY | O_CLOEXEC) < 0)
                        _exit(1);
        if (write(ready, &b, 1) != 1)
                _exit(2);
        (void) read(hold[0], &b, 1);
        _exit(0);
}

/* N_HOLDERS children each hold N_OPENS_PER_HOLDER opens of path, until *ret_hold is closed. */
static void hold_many_open_files(const char *path, pid_t holders[static N_HOLDERS], int *ret_hold) {
        int ready[2], hold[2];

        cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(hold, O_CLOEXEC), 0);
        for (int i = 0; i < N_HOLDERS; i++)
                holders[i] = hold_open_files(path, ready[1], hold);
        close(ready[1]);
        close(hold[0]);
        for (int i = 0; i < N_HOLDERS; i++) {
                char b;

                cr_assert_eq(read(ready[0], &b, 1), 1, "a child could not open its files");
        }
        close(ready[0]);
        *ret_hold = hold[1];
}

/* Lets the holders go and reaps them. */
static void release_holders(const pid_t holders[static N_HOLDERS], int hold) {
        close(hold);
        for (int i = 0; i < N_HOLDERS; i++)
                cr_assert_eq(harness_wait_child(holders[i]), 0);
}

Test(attack, review_open_files_do_not_slow_requests_on_an_unlinked_zone, .init = start_mounted, .fini = stop,
     .timeout = 240) {
        struct shmz_client *c = client();
        pid_t holders[N_HOLDERS];
        int hold, fd;
        double before, after;
        struct rlimit rl;
        char path[256];

        cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
        if (rl.rlim_max < N_OPENS_PER_HOLDER + 64)
                cr_skip_test("the fd limit is %llu", (unsigned long long) rl.rlim_max);
        rl.rlim_cur = rl.rlim_max;
        cr_assert_eq(setrlimit(RLIMIT_NOFILE, &rl), 0);
        make_zone_mode(c, "gone", 4096, 0644);
        make_zone_mode(c, "many", 4096, 0644);
        snprintf(path, sizeof(path), "%s/zones/gone", d.mount);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        cr_assert_geq(fd, 0, "open %s: %m", path);
        cr_assert_eq(shmz_zone_unlink(c, "gone"), 0);
        before = xattr_calls_sec(fd);

        /* Any user can hold that many open files of the view, over a few processes. */
        snprintf(path, sizeof(path), "%s/zones/many", d.mount);
        hold_many_open_files(path, holders, &hold);
        /* The best of three: the machine is shared. */
        after = xattr_calls_sec(fd);
        for (int i = 0; i < 2; i++)
                after = MIN(after, xattr_calls_sec(fd));
        release_holders(holders, hold);
        /* Before the fix: every request walked every open file of the view (dozens of times slower). */
        cr_assert_lt(after, 5 * before + 0.1, "%d requests took %.3f s with %d other files open, %.3f s before",
                     N_XATTR_CALLS, after, N_HOLDERS * N_OPENS_PER_HOLDER, before);
        close(fd);
        shmz_disconnect(c);
}

/* The same for a segment of a port that ended, held open (its figures come from the mapping held). */
Test(attack, review_open_files_do_not_slow_requests_on_a_gone_segment, .init = start_mounted, .fini = stop,
     .timeout = 240) {
        struct shmz_client *c = client();
        struct shmz_listener *l = NULL;
        struct shmz_port *pa = NULL, *pb = NULL;
        struct shmz_msg m = { .type = 1, .size = 8192, .fd = -1 };
        pid_t holders[N_HOLDERS];
        int hold, fd = -1;
        char path[512], zone[256], payload[8192] = "x";
        double before, after;
        struct rlimit rl;
        struct dirent *de;
        DIR *dir;

        cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
        if (rl.rlim_max < N_OPENS_PER_HOLDER + 64)
                cr_skip_test("the fd limit is %llu", (unsigned long long) rl.rlim_max);
        /* A port whose connector sent through a segment of its own. */
        cr_assert_eq(shmz_port_listen(c, "seg", 0600, &l), 0);
        cr_assert_eq(shmz_port_connect(c, "seg", &pb), 0);
        cr_assert_eq(shmz_port_accept(l, 10 * 1000000000LL, &pa), 0);
        m.data = payload;
        cr_assert_eq(shmz_port_send(pb, &m, 10 * 1000000000LL), 0);
        snprintf(path, sizeof(path), "%s/segments", d.mount);
        dir = opendir(path);
        cr_assert_not_null(dir);
        while ((de = readdir(dir)))
                if (de->d_name[0] != '.') {
                        snprintf(path, sizeof(path), "%s/segments/%s", d.mount, de->d_name);
                        fd = open(path, O_RDONLY | O_CLOEXEC);
                        break;
                }
        closedir(dir);
        cr_assert_geq(fd, 0, "no segment to open: %m");
        shmz_port_close(pa);
        shmz_port_close(pb);
        shmz_listener_close(l);
        for (int i = 0; i < 500 && access(path, F_OK) == 0; i++)
                usleep(10000);
        cr_assert_neq(access(path, F_OK), 0, "%s is still there", path);
        {
                char b[64];

                cr_assert_gt(fgetxattr(fd, "user.shmz.chunks_used", b, sizeof(b)), 0, "fgetxattr: %m");
        }
        before = now_sec();
        for (int i = 0; i < N_XATTR_CALLS; i++) {
                char b[64];

                cr_assert_gt(fgetxattr(fd, "user.shmz.chunks_used", b, sizeof(b)), 0);
        }
        before = now_sec() - before;

        make_zone_mode(c, "many", 4096, 0644);
        snprintf(zone, sizeof(zone), "%s/zones/many", d.mount);
        hold_many_open_files(zone, holders, &hold);
        after = 1e9;
        for (int k = 0; k < 3; k++) {
                double t0 = now_sec();

                for (int i = 0; i < N_XATTR_CALLS; i++) {
                        char b[64];

                        cr_assert_gt(fgetxattr(fd, "user.shmz.chunks_used", b, sizeof(b)), 0);
                }
                after = MIN(after, now_sec() - t0);
        }
        release_holders(holders, hold);
        cr_assert_lt(after, 5 * before + 0.1, "%d requests took %.3f s with %d other files open, %.3f s before",
                     N_XATTR_CALLS, after, N_HOLDERS * N_OPENS_PER_HOLDER, before);
        close(fd);
        shmz_disconnect(c);
}

/* ---- Port peers: what one uid holds of a service is bounded, and paid by that uid ---------------- */

#define SERVICE_UID 1000
#define OTHER_UID 1001

/* A pipe pair to talk to a child: it says on ready[1], the parent on go[1]. */
struct peer_sync {
        int ready[2], go[2];
};

static void peer_sync_init(struct peer_sync *s) {
        cr_assert_eq(pipe2(s->ready, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(s->go, O_CLOEXEC), 0);
}

static void peer_sync_close(struct peer_sync *s) {
        for (int i = 0; i < 2; i++) {
                close(s->ready[i]);
                close(s->go[i]);
        }
}

/* Child side: one byte to the parent, then one from it. */
static int child_say(struct peer_sync *s, unsigned char b) {
        return write(s->ready[1], &b, 1) == 1 ? 0 : -1;
}

static int child_wait(struct peer_sync *s) {
        unsigned char b;

        return read(s->go[0], &b, 1) == 1 ? b : -1;
}

/* Parent side: the child's next byte (-1 if it ended first or took more than 30 s). */
static int parent_hear(struct peer_sync *s) {
        struct pollfd p = { .fd = s->ready[0], .events = POLLIN };
        unsigned char b;

        if (poll(&p, 1, 30000) != 1 || read(s->ready[0], &b, 1) != 1)
                return -1;
        return b;
}

static void parent_say(struct peer_sync *s, unsigned char b) {
        cr_assert_eq(write(s->go[1], &b, 1), 1);
}

/* fn in a child of uid (and gid uid), not waited for; it dies with the test's process. */
static pid_t spawn_as(uid_t uid, int (*fn)(void *), void *userdata) {
        pid_t parent = getpid(), pid = fork();

        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (setgroups(0, NULL) < 0 || setgid(uid) < 0 || setuid(uid) < 0)
                        _exit(126);
                /* After setuid(), which clears it. */
                if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
                        _exit(127);
                _exit(fn(userdata));
        }
        return pid;
}

/* The service (uid 1000): publishes "svc", then, when told, publishes "svc-b" and connects to it. */
static int f11_service(void *userdata) {
        struct peer_sync *s = userdata;
        struct shmz_client *c;
        struct shmz_listener *l, *l2;
        struct shmz_port *p;

        if (shmz_connect(d.socket, &c) < 0 || shmz_port_listen(c, "svc", 0666, &l) < 0)
                return 10;
        if (child_say(s, 'r') < 0 || child_wait(s) < 0)
                return 11;
        if (shmz_port_listen(c, "svc-b", 0600, &l2) < 0)
                return 12;
        if (shmz_port_connect(c, "svc-b", &p) < 0)
                return 13;
        if (child_say(s, 'k') < 0 || child_wait(s) < 0)
                return 14;
        return 0;
}

/* The attacker (nobody): as many idle ports to "svc" as it is given; says how many. */
static int f11_attacker(void *userdata) {
        struct peer_sync *s = userdata;
        struct shmz_client *c;
        int n = 0, r = 0;

        if (shmz_connect(d.socket, &c) < 0)
                return 20;
        while (n < 200) {
                struct shmz_port *p;

                r = shmz_port_connect(c, "svc", &p);
                if (r < 0)
                        break;
                n++;
        }
        if (r != -EUSERS)
                return 21;
        if (child_say(s, (unsigned char) n) < 0 || child_wait(s) < 0)
                return 22;
        return 0;
}

/* Another client of the service (uid 1001). */
static int f11_client(void *userdata) {
        struct shmz_client *c;
        struct shmz_port *p;

        if (shmz_connect(d.socket, &c) < 0)
                return 30;
        return shmz_port_connect(c, "svc", &p) == 0 ? 0 : 31;
}

Test(attack, f11_idle_ports_of_one_uid_spend_none_of_the_services_slots, .fini = stop, .timeout = 60) {
        struct peer_sync svc, att;
        pid_t ps, pa;
        int n;

        harness_init(&d, "[daemon]\nmax_ports_per_uid = 16\nport_uid_connections = 8\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
        peer_sync_init(&svc);
        peer_sync_init(&att);
        ps = spawn_as(SERVICE_UID, f11_service, &svc);
        cr_assert_eq(parent_hear(&svc), 'r', "the service did not publish");
        pa = spawn_as(NOBODY, f11_attacker, &att);
        n = parent_hear(&att);
        /* Before the fix: each port counted for the service's uid too, and nobody took 15 (16 with its name). */
        cr_assert_eq(n, 8, "nobody holds %d ports to the service", n);
        cr_assert_eq(harness_run_as(OTHER_UID, OTHER_UID, f11_client, NULL), 0, "another user could not connect");
        parent_say(&svc, 'g');
        cr_assert_eq(parent_hear(&svc), 'k', "the service could not publish or connect any more");
        parent_say(&svc, 'g');
        parent_say(&att, 'g');
        cr_assert_eq(harness_wait_child(ps), 0);
        cr_assert_eq(harness_wait_child(pa), 0);
        peer_sync_close(&svc);
        peer_sync_close(&att);
}

/* ---- F10: a port peer cannot fill an honest receiver's fd table --------------------------------- */

#define F10_PORTS 5
#define F10_FRAMES 1025

/* The honest service (uid 1000): an event loop that accepts and echoes, fd limit 1024, until told to stop. */
static void echo_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct shmz_msg r = { .type = m->type, .stream = m->stream, .data = m->data, .size = m->size, .fd = -1 };

        (void) shmz_port_send(p, &r, 0);
        if (m->fd >= 0)
                close(m->fd);
        shmz_msg_release(p, m);
}

/*
 * A service (a child, as its own user) on the port "svc": accepts up to
 * max_ports (at most 64) ports, handler on each, dispatches until the parent
 * says go. 41, 42: it could not listen, or tell the parent it does.
 */
static int serve_svc(struct peer_sync *s, shmz_msg_handler_t handler, size_t max_ports) {
        struct shmz_port *ports[64];
        struct shmz_listener *l;
        struct shmz_client *c;
        size_t n = 0;

        if (shmz_connect(d.socket, &c) < 0 || shmz_port_listen(c, "svc", 0666, &l) < 0)
                return 41;
        if (child_say(s, 'r') < 0)
                return 42;
        for (;;) {
                struct pollfd pf = { .fd = s->go[0], .events = POLLIN };
                struct shmz_port *np;

                if (poll(&pf, 1, 1) == 1)
                        return 0;
                if (n < MIN(max_ports, ELEMENTSOF(ports)) && shmz_port_accept(l, 0, &np) == 0) {
                        shmz_port_set_handler(np, handler, NULL);
                        ports[n++] = np;
                }
                for (size_t i = 0; i < n;) {
                        int r = shmz_port_dispatch(ports[i], 0);

                        if (r < 0 && r != -EAGAIN && r != -ETIMEDOUT) {
                                shmz_port_close(ports[i]);
                                ports[i] = ports[--n];
                        } else
                                i++;
                }
        }
}

static int f10_service(void *userdata) {
        struct rlimit rl = { .rlim_cur = 1024, .rlim_max = 1024 };

        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
                return 40;
        return serve_svc(userdata, echo_handler, 64);
}

/* A loopback TCP socket whose close() lingers: a minute's linger, a send queue the peer never reads. */
static int lingering_socket(void) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        struct linger lg = { .l_onoff = 1, .l_linger = 60 };
        socklen_t len = sizeof(sa);
        char buf[65536] = { 0 };
        int lfd, fd;

        lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfd < 0 || bind(lfd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0 ||
            getsockname(lfd, (struct sockaddr *) &sa, &len) < 0)
                return -1;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -1;
        if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0)
                return -1;
        /* Nobody accepts or reads: the queue fills up. lfd stays open (the connection with it). */
        while (send(fd, buf, sizeof(buf), MSG_DONTWAIT | MSG_NOSIGNAL) > 0)
                ;
        return fd;
}

/* One bare FD frame (no descriptor will ever take it). */
static int send_fd_frame(int sock, int fd) {
        struct shmz_frame f = { .kind = SHMZ_FRAME_FD };
        union {
                struct cmsghdr c;
                char b[CMSG_SPACE(sizeof(int))];
        } ctl = {};
        struct iovec iov = { .iov_base = &f, .iov_len = sizeof(f) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof(ctl.b) };
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
        return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* The attacker (nobody): F10_PORTS ports, each sent the lingering socket and then /dev/null, again and again. */
static int f10_attacker(void *userdata) {
        struct peer_sync *s = userdata;
        struct timeval tv = { .tv_sec = 2 };
        struct shmz_client *c;
        struct shmz_port *ports[F10_PORTS];
        int tcp = lingering_socket(), null = open("/dev/null", O_RDONLY | O_CLOEXEC);

        if (tcp < 0 || null < 0)
                return 50;
        if (shmz_connect(d.socket, &c) < 0)
                return 51;
        for (int i = 0; i < F10_PORTS; i++) {
                int sock;

                if (shmz_port_connect(c, "svc", &ports[i]) < 0)
                        return 52;
                sock = port_socket_fd(ports[i]);
                (void) setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
                /* Sent until the port ends (the fix) or all are sent (before it). */
                for (int k = 0; k < F10_FRAMES; k++)
                        if (send_fd_frame(sock, k == 0 ? tcp : null) < 0)
                                break;
        }
        if (child_say(s, 'a') < 0 || child_wait(s) < 0)
                return 53;
        return 0;
}

/*
 * Another client of the service (run as uid 1001): sends m on a port of its
 * own and needs an answer within 5 s; 0 if check_reply likes it.
 */
static int svc_round_trip(const struct shmz_msg *m, bool (*check_reply)(const struct shmz_msg *r)) {
        struct shmz_msg r;
        struct shmz_client *c;
        struct shmz_port *p;

        if (shmz_connect(d.socket, &c) < 0)
                return 60;
        if (shmz_port_connect(c, "svc", &p) < 0)
                return 61;
        if (shmz_port_send(p, m, 5 * 1000000000LL) < 0)
                return 62;
        if (shmz_port_recv(p, &r, 5 * 1000000000LL) < 0)
                return 63;
        return check_reply(&r) ? 0 : 64;
}

/* The service's half of an attack: the daemon with config, the service (SERVICE_UID) publishing "svc". */
static pid_t start_service(const char *config, int (*service)(void *), struct peer_sync *svc, struct peer_sync *att) {
        pid_t ps;

        harness_init(&d, config);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
        peer_sync_init(svc);
        peer_sync_init(att);
        ps = spawn_as(SERVICE_UID, service, svc);
        cr_assert_eq(parent_hear(svc), 'r', "the service did not publish");
        return ps;
}

/* The attacker, then the service, told to go; both must exit 0. */
static void stop_service(struct peer_sync *svc, pid_t ps, struct peer_sync *att, pid_t pa) {
        parent_say(att, 'g');
        cr_assert_eq(harness_wait_child(pa), 0);
        parent_say(svc, 'g');
        cr_assert_eq(harness_wait_child(ps), 0);
        peer_sync_close(svc);
        peer_sync_close(att);
}

static bool is_ping(const struct shmz_msg *r) {
        return r->type == 7 && r->size == 4 && memcmp(r->data, "ping", 4) == 0;
}

static int f10_client(void *userdata) {
        struct shmz_msg m = { .type = 7, .data = "ping", .size = 4, .fd = -1 };

        return svc_round_trip(&m, is_ping);
}

Test(attack, f10_a_port_peer_cannot_fill_the_receivers_fd_table, .fini = stop, .timeout = 120) {
        struct peer_sync svc, att;
        unsigned before, peak = 0;
        pid_t ps, pa;

        ps = start_service("[daemon]\n", f10_service, &svc, &att);
        before = harness_count_fds(ps);
        pa = spawn_as(NOBODY, f10_attacker, &att);
        cr_assert_eq(parent_hear(&att), 'a', "the attacker did not get its ports");
        /* The service reads what came. */
        for (int i = 0; i < 100; i++) {
                peak = MAX(peak, harness_count_fds(ps));
                usleep(10000);
        }
        /*
         * Before the fix: every bare FD frame installed and kept, up to 1025 a port, and what it
         * dropped stuck behind the lingering socket's close: the service at its limit (1024).
         * Now: 64 a port, half of a quarter of the limit for one peer uid.
         */
        cr_assert_lt(peak, before + 160, "the service went from %u to %u open fds", before, peak);
        cr_assert_eq(harness_run_as(OTHER_UID, OTHER_UID, f10_client, NULL), 0,
                     "another client of the service got no answer");
        stop_service(&svc, ps, &att, pa);
}

/* One sender's closes that never return hold up its own next fds, nobody else's, and are counted. */
Test(attack, f10_stuck_closes_of_one_peer_hold_up_no_one_else, .fini = stop, .timeout = 60) {
        char dir[192];
        int fd, pipes[2];
        struct pollfd pf;

        harness_init(&d, NULL);
        snprintf(dir, sizeof(dir), "%s/stall", d.dir);
        fd = stallfs_start_with_stalling_fd(dir, &sf);
        cr_assert_geq(fd, 0, "stallfs at %s: %s", dir, strerror(-fd));
        for (int i = 0; i < 3; i++)
                cr_assert(reaper_take(fcntl(fd, F_DUPFD_CLOEXEC, 3), NOBODY));
        close(fd);
        for (int i = 0; i < 500 && stallfs_stalled(sf) < REAPER_TAG_CLOSING; i++)
                usleep(10000);
        usleep(100 * 1000);
        /* Two closes of nobody's at once; its third waits behind them. */
        cr_assert_eq(stallfs_stalled(sf), REAPER_TAG_CLOSING);
        cr_assert_eq(reaper_held(NOBODY), 3u);
        /* Another sender's fd is closed at once: the read end sees the write end go. */
        cr_assert_eq(pipe2(pipes, O_CLOEXEC), 0);
        cr_assert(reaper_take(pipes[1], SERVICE_UID));
        pf = (struct pollfd){ .fd = pipes[0], .events = POLLIN };
        cr_assert_eq(poll(&pf, 1, 5000), 1, "a close waited behind another sender's stuck one");
        cr_assert(pf.revents & POLLHUP);
        close(pipes[0]);
        stallfs_release(sf);
        for (int i = 0; i < 500 && reaper_held(NOBODY) > 0; i++)
                usleep(10000);
        cr_assert_eq(reaper_held(NOBODY), 0u);
        cr_assert_eq(reaper_held_total(), 0u);
}

/* ---- F13: a name the config reserves cannot be squatted ------------------------------------------ */

static int f13_squatter(void *userdata) {
        struct shmz_client *c;
        struct shmz_listener *l;
        int r;

        if (shmz_connect(d.socket, &c) < 0)
                return 70;
        r = shmz_port_listen(c, "svc", 0666, &l);
        if (r == 0)
                return 71; /* published: the service would get EADDRINUSE, its clients the squatter */
        return r == -EACCES ? 0 : 72;
}

static int f13_service(void *userdata) {
        struct peer_sync *s = userdata;
        struct shmz_client *c;
        struct shmz_listener *l;

        if (shmz_connect(d.socket, &c) < 0)
                return 80;
        /* Asks for 0666: the reservation's mode is what counts. */
        if (shmz_port_listen(c, "svc", 0666, &l) < 0)
                return 81;
        if (child_say(s, 'r') < 0 || child_wait(s) < 0)
                return 82;
        return 0;
}

static int f13_connect(void *userdata) {
        struct shmz_client *c;
        struct shmz_port *p;
        int r;

        if (shmz_connect(d.socket, &c) < 0)
                return 90;
        r = shmz_port_connect(c, "svc", &p);
        return r == 0 ? 0 : r == -EACCES ? 91 : 92;
}

Test(attack, f13_a_reserved_port_name_cannot_be_squatted, .fini = stop, .timeout = 60) {
        struct peer_sync svc;
        char conf[256];
        pid_t ps;

        snprintf(conf, sizeof(conf), "[port svc]\nuser = %d\ngroup = %d\nmode = 0620\n", SERVICE_UID, OTHER_UID);
        harness_init(&d, conf);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
        /* Before the fix: nobody published the name first. */
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, f13_squatter, NULL), 0, "nobody published a reserved name");
        peer_sync_init(&svc);
        ps = spawn_as(SERVICE_UID, f13_service, &svc);
        cr_assert_eq(parent_hear(&svc), 'r', "the service could not publish its name");
        /* The group may connect (0620), others may not. */
        cr_assert_eq(harness_run_as(OTHER_UID, OTHER_UID, f13_connect, NULL), 0, "the group could not connect");
        cr_assert_eq(harness_run_as(NOBODY, NOBODY, f13_connect, NULL), 91, "others could connect");
        parent_say(&svc, 'g');
        cr_assert_eq(harness_wait_child(ps), 0);
        peer_sync_close(&svc);
}

/* ---- Segment memory: a receiver that never releases pins what its sender's uid may hold for it alone ---- */

#define PIN_REPLY 60000 /* 15 chunks of 4K: one reply a segment of 16 */
#define PIN_PORTS 4

static char pin_reply[PIN_REPLY];

/* Every message gets a large reply, sent without waiting (an event loop does not block on one peer). */
static void pin_handler(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct shmz_msg r = { .type = m->type, .stream = m->stream, .data = pin_reply, .size = PIN_REPLY, .fd = -1 };

        (void) shmz_port_send(p, &r, 0);
        shmz_msg_release(p, m);
}

static int pin_service(void *userdata) {
        memset(pin_reply, 'r', sizeof(pin_reply));
        return serve_svc(userdata, pin_handler, 16);
}

/* The attacker (nobody): asks each of its ports for large replies and keeps every one it gets. */
static int pin_attacker(void *userdata) {
        struct peer_sync *s = userdata;
        struct shmz_client *c;
        unsigned kept = 0;

        if (shmz_connect(d.socket, &c) < 0)
                return 50;
        for (int i = 0; i < PIN_PORTS; i++) {
                struct shmz_port *p;

                if (shmz_port_connect(c, "svc", &p) < 0)
                        return 51;
                for (int k = 0; k < 3; k++) {
                        struct shmz_msg m = { .type = 1, .data = "more", .size = 4, .fd = -1 }, r;

                        if (shmz_port_send(p, &m, 1000000000LL) < 0)
                                return 52;
                        if (shmz_port_recv(p, &r, 500000000LL) == 0)
                                kept++; /* never released */
                }
        }
        if (child_say(s, (unsigned char) kept) < 0 || child_wait(s) < 0)
                return 53;
        return 0;
}

static bool is_pin_reply(const struct shmz_msg *r) {
        return r->size == PIN_REPLY;
}

/* Another client: one large reply within 5 s. */
static int pin_client(void *userdata) {
        struct shmz_msg m = { .type = 1, .data = "one", .size = 3, .fd = -1 };

        return svc_round_trip(&m, is_pin_reply);
}

Test(attack, segment_memory_a_peer_pins_is_bounded_per_peer_uid, .fini = stop, .timeout = 60) {
        struct peer_sync svc, att;
        pid_t ps, pa;
        int kept;

        /* Segments of 16 chunks of 4K (68K with the header); two a direction; six for the service's uid. */
        ps = start_service("[daemon]\nchunk_size = 4K\nsegment_chunks = 16\nport_memory = 128K\n"
                           "uid_segment_memory = 408K\n",
                           pin_service, &svc, &att);
        pa = spawn_as(NOBODY, pin_attacker, &att);
        kept = parent_hear(&att);
        cr_assert_geq(kept, 3, "nobody kept only %d replies", kept);
        /* Before the fix: nobody's ports held all six segments the service's uid may have. */
        cr_assert_eq(harness_run_as(OTHER_UID, OTHER_UID, pin_client, NULL), 0,
                     "another client got no large reply while nobody pinned the service's segments");
        stop_service(&svc, ps, &att, pa);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ true);
}
