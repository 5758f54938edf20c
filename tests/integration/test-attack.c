/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The attacks of an ordinary local user (uid 65534) on a real daemon and a
 * real mount, one test per hole that such an attack once found. Each test
 * failed on the code before its fix; SECURITY.md says what they defend.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client.h"
#include "harness.h"
#include "shmzone-abi.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534

static struct daemon_proc d;

static void start_mounted(void) {
        (void) unsetenv("SHMZONE_SOCKET");
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 32M\n");
        cr_assert_eq(harness_start(&d, NULL, true), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        static char log[65536];
        bool ran = d.pid > 0;
        int st = ran ? harness_stop(&d) : 0;

        snprintf(log, sizeof(log), "%s", harness_log(&d));
        harness_cleanup(&d);
        cr_assert_eq(st, 0, "daemon exit status %d: %s", st, log);
}

static struct shmz_client *client(void) {
        struct shmz_client *c = NULL;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        return c;
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
