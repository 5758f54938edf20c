/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Attach latency: connect + open + map of a zone served by a real shmzoned,
 * against shm_open + mmap of a /dev/shm file, side by side in one run.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../bench-util.h"
#include "harness.h"
#include "shmzone.h"

#define ZONE_SIZE (1u << 20)
#define ITERATIONS 2000
#define RUNS 7

/* Each timed op touches the first page, so that the mapping is really usable. */
static double run_shmz_full(const char *sock) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                struct shmz_client *c;
                struct shmz_zone *z;

                if (shmz_connect(sock, &c) < 0 || shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                        abort();
                ((volatile char *) shmz_zone_base(z))[0]++;
                shmz_zone_close(z);
                shmz_disconnect(c);
        }
        return (now_ns() - t0) / ITERATIONS;
}

static double run_shmz_open(struct shmz_client *c) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                struct shmz_zone *z;

                if (shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                        abort();
                ((volatile char *) shmz_zone_base(z))[0]++;
                shmz_zone_close(z);
        }
        return (now_ns() - t0) / ITERATIONS;
}

/* What both anchors do with the fd they got: map, touch the first page, unmap, close. */
static void map_touch_close(int fd) {
        void *p;

        if (fd < 0)
                abort();
        p = mmap(NULL, ZONE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
                abort();
        ((volatile char *) p)[0]++;
        munmap(p, ZONE_SIZE);
        close(fd);
}

static double run_shm_open(const char *name) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++)
                map_touch_close(shm_open(name, O_RDWR | O_CLOEXEC, 0));
        return (now_ns() - t0) / ITERATIONS;
}

/*
 * The floor of any attach a daemon brokers: one request over a SEQPACKET
 * socket to another process, answered with an fd (SCM_RIGHTS), then the same
 * mmap + touch + munmap. No name lookup, no checks, no header: what is left of
 * attach_connected when everything of ours costs nothing.
 */
static int send_fd(int sock, int fd) {
        char byte = 0, cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
        struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
        return sendmsg(sock, &mh, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

static int recv_fd(int sock) {
        char byte, cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
        struct cmsghdr *cm;
        int fd;

        if (recvmsg(sock, &mh, MSG_CMSG_CLOEXEC) != 1)
                return -1;
        cm = CMSG_FIRSTHDR(&mh);
        if (!cm || cm->cmsg_type != SCM_RIGHTS)
                return -1;
        memcpy(&fd, CMSG_DATA(cm), sizeof(int));
        return fd;
}

static double run_fd_roundtrip(int sock) {
        double t0 = now_ns();

        for (int i = 0; i < ITERATIONS; i++) {
                char byte = 1;

                if (send(sock, &byte, 1, MSG_NOSIGNAL) != 1)
                        abort();
                map_touch_close(recv_fd(sock));
        }
        return (now_ns() - t0) / ITERATIONS;
}

/* The broker side of the floor: answers each byte with the fd, until the socket closes. */
static pid_t fd_server(const char *shm_name, int *ret_sock) {
        int sv[2];
        pid_t pid;

        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
                return -1;
        pid = fork();
        if (pid == 0) {
                int fd = shm_open(shm_name, O_RDWR | O_CLOEXEC, 0);
                char byte;

                close(sv[0]);
                while (fd >= 0 && recv(sv[1], &byte, 1, 0) == 1)
                        if (send_fd(sv[1], fd) < 0)
                                break;
                _exit(0);
        }
        close(sv[1]);
        *ret_sock = sv[0];
        return pid;
}

int main(int argc, char *argv[]) {
        double full[RUNS], open_only[RUNS], anchor[RUNS], floor_rt[RUNS];
        struct daemon_proc d;
        struct shmz_client *c;
        struct shmz_zone *z;
        char shm_name[64];
        int fd, sock;
        pid_t server;

        harness_init(&d, "[daemon]\nmemory_budget = 64M\n[zone bench]\nsize = 1M\nmode = 0600\n");
        if (harness_start(&d, NULL, false) != 0) {
                fprintf(stderr, "daemon did not start: %s\n", harness_log(&d));
                harness_cleanup(&d);
                return 1;
        }
        snprintf(shm_name, sizeof(shm_name), "/shmz-bench-%d", (int) getpid());
        fd = shm_open(shm_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, ZONE_SIZE) < 0)
                return 1;
        close(fd);
        if (shmz_connect(d.socket, &c) < 0 || shmz_zone_open(c, "bench", 0, NULL, 0, &z) < 0)
                return 1;
        shmz_zone_close(z);
        server = fd_server(shm_name, &sock);
        if (server < 0)
                return 1;

        /* Interleaved runs: machine noise hits both sides alike. */
        for (int r = 0; r < RUNS; r++) {
                anchor[r] = run_shm_open(shm_name);
                full[r] = run_shmz_full(d.socket);
                open_only[r] = run_shmz_open(c);
                floor_rt[r] = run_fd_roundtrip(sock);
        }
        close(sock);
        (void) waitpid(server, NULL, 0);
        shmz_disconnect(c);
        shm_unlink(shm_name);
        harness_cleanup(&d);

        printf("attach (connect+open+map+touch+close), shmzone: %.0f ns median of %d runs x %d\n", median(full, RUNS),
               RUNS, ITERATIONS);
        printf("attach (open+map+touch+close on a connection), shmzone: %.0f ns\n", median(open_only, RUNS));
        printf("attach (shm_open+mmap+touch+munmap), /dev/shm: %.0f ns\n", median(anchor, RUNS));
        printf("RATIO attach/shm_open %.3f\n", median(anchor, RUNS) / median(full, RUNS));
        printf("attach floor (fd over a socket round trip+map+touch+munmap): %.0f ns\n", median(floor_rt, RUNS));
        printf("RATIO attach_connected/shm_open %.3f\n", median(anchor, RUNS) / median(open_only, RUNS));
        /* How near the bare broker round trip we are, and the best attach_connected/shm_open any broker allows. */
        printf("RATIO attach_connected/fd_roundtrip %.3f\n", median(floor_rt, RUNS) / median(open_only, RUNS));
        printf("# floor: a brokered attach is at best %.3f of shm_open here\n",
               median(anchor, RUNS) / median(floor_rt, RUNS));
        return 0;
}
