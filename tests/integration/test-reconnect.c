/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A daemon restart is invisible to clients: across a stop and start
 * (SIGTERM) and a crash (SIGKILL) with the fd store kept, as systemd does, a
 * client keeps its zone (counted again), its listener (published again) and
 * its port (watched again), messages keep flowing, and one whose access was
 * revoked meanwhile is refused. Then the daemon's checks of what a client
 * re-sends, against forgeries.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "harness.h"
#include "port.h"
#include "proto.h"
#include "shmzone.h"
#include "util.h"
#include "zone.h"

#define NOBODY 65534
#define MESSAGES 300

static struct daemon_proc d;

static void start(void) {
        harness_init(&d, "[daemon]\nmemory_budget = 64M\nuid_quota = 8M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

static void stop(void) {
        harness_cleanup(&d);
}

TestSuite(reconnect, .init = start, .fini = stop, .timeout = 90);

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

/* Stops the daemon (crash: SIGKILL) and starts it again with the fds it stored, as systemd does. */
static void restart(bool crash) {
        harness_stop_for_restart(&d, crash);
        /* A pause with no daemon at all: the clients' tries find no socket. */
        usleep(300000);
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not restart: %s", harness_log(&d));
}

struct found_port {
        pid_t pid0, pid1;
        bool found;
};

static int find_port(const struct shmz_msg_port_info *pi, void *userdata) {
        struct found_port *f = userdata;

        if (pi->port_id != 0 && (pid_t) pi->pid[0] == f->pid0 && (pid_t) pi->pid[1] == f->pid1)
                f->found = true;
        return 0;
}

/* Waits (up to 3 s) until the daemon lists a port between connector pid0 and acceptor pid1. */
static bool wait_port_listed(struct shmz_client *c, pid_t pid0, pid_t pid1) {
        for (int i = 0; i < 300; i++) {
                struct found_port f = { .pid0 = pid0, .pid1 = pid1 };

                if (shmz_port_list(c, find_port, &f) >= 0 && f.found)
                        return true;
                usleep(10000);
        }
        return false;
}

/* The connector: sends MESSAGES numbered messages, 5 ms apart, then waits to be killed. */
static void sender_child(int go_fd) {
        struct shmz_port *p = harness_child_connect(&d, "svc");
        char b;

        if (read(go_fd, &b, 1) != 1)
                _exit(102);
        for (uint32_t i = 1; i <= MESSAGES; i++) {
                struct shmz_msg m = { .type = 7, .data = &i, .size = sizeof(i), .fd = -1 };

                if (shmz_port_send(p, &m, 5000000000) < 0)
                        _exit(103);
                usleep(5000);
        }
        pause();
        _exit(0);
}

/* A client of uid nobody holding zone "pub" read-write; stopped during the restart, then checks its handle. */
static void nobody_child(int ready_fd, int result_fd) {
        struct shmz_client *c;
        struct shmz_zone *z;
        volatile uint8_t *p;
        int r;
        char b;

        if (setgroups(0, NULL) < 0 || setgid(NOBODY) < 0 || setuid(NOBODY) < 0)
                _exit(110);
        if (shmz_connect(d.socket, &c) < 0)
                _exit(111);
        if (shmz_zone_open(c, "pub", 0, "", 0, &z) < 0)
                _exit(112);
        p = shmz_zone_base(z);
        if (write(ready_fd, "r", 1) != 1)
                _exit(113);
        /* The parent stops us, restarts the daemon, revokes our access, lets us go on. */
        if (read(result_fd, &b, 1) != 1)
                _exit(114);
        for (int i = 0; i < 300 && shmz_zone_attached(z) == 1; i++)
                usleep(10000);
        r = shmz_zone_attached(z);
        if (r != -EACCES)
                _exit(120 + (r < 0 ? -r % 100 : r));
        /* The mapping stays: nothing is pulled from under the caller. */
        p[0] = 0x42;
        if (p[0] != 0x42)
                _exit(116);
        shmz_zone_close(z);
        shmz_disconnect(c);
        _exit(0);
}

static void through_restart(bool crash) {
        struct shmz_client *c = harness_connect(&d), *c2;
        struct shmz_zone *z, *pub;
        struct shmz_listener *l;
        struct shmz_port *pp, *np, *accepted;
        struct shmz_zone_stat st;
        volatile uint8_t *bytes;
        int go[2], ready[2], result[2];
        uint32_t next = 1;
        pid_t sender, nobody;
        uint64_t t0, t_ready;
        char b;
        int r;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "rz", 1 << 20, "t", SHMZ_CREATE, &z), 0);
        bytes = shmz_zone_base(z);
        for (size_t i = 0; i < 4096; i++)
                bytes[i] = (uint8_t) (i * 7);
        cr_assert_eq(shmz_zone_open(c, "pub", 65536, "", SHMZ_CREATE, &pub), 0);
        cr_assert_eq(shmz_zone_chmod(c, "pub", 0666), 0);
        cr_assert_eq(shmz_port_listen(c, "svc", 0666, &l), 0);

        cr_assert_eq(pipe2(go, O_CLOEXEC), 0);
        sender = fork();
        cr_assert_geq(sender, 0);
        if (sender == 0)
                sender_child(go[0]);
        cr_assert_eq(shmz_port_accept(l, 5000000000, &pp), 0);

        cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(result, O_CLOEXEC), 0);
        nobody = fork();
        cr_assert_geq(nobody, 0);
        if (nobody == 0)
                nobody_child(ready[1], result[0]);
        cr_assert_eq(read(ready[0], &b, 1), 1);
        cr_assert_eq(shmz_zone_stat(c, "pub", &st), 0);
        cr_assert_eq(st.attached, 2);

        cr_assert_eq(write(go[1], "g", 1), 1);
        /* Messages flow; the daemon goes in the middle of the stream. */
        while (next <= 40) {
                struct shmz_msg m;

                cr_assert_eq(shmz_port_recv(pp, &m, 5000000000), 0);
                cr_assert_eq(*(uint32_t *) m.data, next);
                next++;
                shmz_msg_release(pp, &m);
        }
        cr_assert_eq(kill(nobody, SIGSTOP), 0);
        restart(crash);
        t_ready = now_ns();

        /* A new peer reaches the listener within 1 s of the daemon being ready. */
        c2 = harness_connect(&d);
        cr_assert_not_null(c2);
        do
                r = shmz_port_connect(c2, "svc", &np);
        while (r < 0 && now_ns() - t_ready < 1000000000 && usleep(5000) == 0);
        cr_assert_eq(r, 0, "connect after the restart: %s", strerror(-r));
        cr_expect_lt(now_ns() - t_ready, UINT64_C(1000000000));
        cr_assert_eq(shmz_port_accept(l, 2000000000, &accepted), 0);

        /* The zone: the same mapping, counted again. */
        cr_assert_eq(shmz_zone_attached(z), 1);
        cr_assert_eq(shmz_zone_stat(c, "rz", &st), 0);
        cr_expect_eq(st.attached, 1, "the zone handle was not counted again");
        for (size_t i = 0; i < 4096; i++)
                cr_assert_eq(bytes[i], (uint8_t) (i * 7));
        cr_assert_gt(client_revivals(c), 0);

        /* The revoked client: its next attachment is refused, its mapping stays. */
        cr_assert_eq(shmz_zone_chmod(c, "pub", 0600), 0);
        cr_assert_eq(kill(nobody, SIGCONT), 0);
        cr_assert_eq(write(result[1], "c", 1), 1);
        cr_expect_eq(harness_wait_child(nobody), 0, "the revoked client was not refused");
        cr_assert_eq(shmz_zone_stat(c, "pub", &st), 0);
        cr_expect_eq(st.attached, 1);

        /* Every message, in order, none lost. */
        while (next <= MESSAGES) {
                struct shmz_msg m;

                cr_assert_eq(shmz_port_recv(pp, &m, 5000000000), 0, "message %u", next);
                cr_assert_eq(*(uint32_t *) m.data, next);
                next++;
                shmz_msg_release(pp, &m);
        }

        /* Watched again: the sender's death is told within 10 ms. */
        cr_assert(wait_port_listed(c, sender, getpid()), "the port was not rejoined");
        {
                struct shmz_msg m;
                uint64_t t1;

                t0 = now_ns();
                cr_assert_eq(kill(sender, SIGKILL), 0);
                r = shmz_port_recv(pp, &m, 2000000000);
                t1 = now_ns();
                cr_assert_eq(r, -EPIPE);
                cr_expect_lt(t1 - t0, UINT64_C(10000000), "death told after %.1f ms", (double) (t1 - t0) / 1e6);
        }
        (void) harness_wait_child(sender);

        shmz_port_close(np);
        shmz_port_close(accepted);
        shmz_port_close(pp);
        shmz_listener_close(l);
        shmz_zone_close(pub);
        shmz_zone_close(z);
        shmz_disconnect(c2);
        shmz_disconnect(c);
        close(go[0]);
        close(go[1]);
        close(ready[0]);
        close(ready[1]);
        close(result[0]);
        close(result[1]);
        harness_stop_clean(&d);
}

Test(reconnect, through_a_stop_and_start) {
        through_restart(false);
}

Test(reconnect, through_a_crash) {
        through_restart(true);
}

/* Reading and opening requests are sent again; a change interrupted fails once; a name taken meanwhile. */
Test(reconnect, requests_and_a_name_taken_meanwhile) {
        struct shmz_client *c = harness_connect(&d), *other;
        struct shmz_daemon_status ds;
        struct shmz_listener *l, *l2;
        struct shmz_port *p;
        int r;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_port_listen(c, "taken", 0666, &l), 0);
        harness_drain_notify(&d);
        cr_assert_eq(harness_stop(&d), 0);
        cr_assert_eq(harness_start(&d, NULL, false), 0);
        /* Someone else publishes the name before our listener comes back: its revive races ours. */
        other = harness_connect(&d);
        cr_assert_not_null(other);
        r = shmz_port_listen(other, "taken", 0666, &l2);
        if (r == 0) {
                /* Ours reports it once, then the listener is gone for good. */
                for (int i = 0; i < 200 && (r = shmz_port_accept(l, 0, &p)) == -EAGAIN; i++)
                        usleep(10000);
                cr_expect_eq(r, -EADDRINUSE);
                cr_expect_eq(shmz_port_accept(l, 0, &p), -ENOTCONN);
                shmz_listener_close(l2);
        } else
                cr_expect_eq(r, -EADDRINUSE); /* ours came back first */
        /* A plain request comes back by itself. */
        cr_expect_eq(shmz_daemon_status(c, &ds), 0);
        shmz_listener_close(l);
        shmz_disconnect(other);
        shmz_disconnect(c);
        harness_stop_clean(&d);
}

/* ---- the daemon's checks of what a client re-sends ------------------------------------------------- */

/* A raw connection that said hello and RESUME; the fds it may then pass are proofs only. */
static int resumed_raw(void) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct shmz_msg_hello_reply hr;
        uint32_t stream = 0;
        int fd = harness_raw_connect(d.socket);

        if (fd < 0)
                return fd;
        if (client_raw_call(fd, &stream, SHMZ_MSG_HELLO, &hello, sizeof(hello), NULL, 0, &hr, sizeof(hr)) < 0 ||
            client_raw_call(fd, &stream, SHMZ_MSG_RESUME, NULL, 0, NULL, 0, NULL, 0) < 0) {
                close(fd);
                return -EPROTO;
        }
        return fd;
}

static int reattach(int fd, const char *name, bool rdonly, int proof) {
        struct shmz_msg_zone_reattach req = { .flags = rdonly ? SHMZ_RDONLY : 0 };
        struct shmz_msg_zone_info info;
        uint32_t stream = 100;

        strncpy_buf(req.name, sizeof(req.name), name);
        return client_raw_call(fd, &stream, SHMZ_MSG_ZONE_REATTACH, &req, sizeof(req), &proof, 1, &info, sizeof(info));
}

static int rejoin(int fd, int end, int channel) {
        struct shmz_msg_port_rejoin req = { .side = SHMZ_PORT_SIDE_CONNECTOR,
                                            .chunk_size = 16384,
                                            .segment_chunks = 640 };
        struct shmz_msg_port_peer pe;
        int fds[2] = { end, channel };
        uint32_t stream = 200;

        return client_raw_call(fd, &stream, SHMZ_MSG_PORT_REJOIN, &req, sizeof(req), fds, 2, &pe, sizeof(pe));
}

/* A memfd sealed as the daemon seals its own, named as it names them. */
static int forged_memfd(const char *name, size_t size, mode_t mode) {
        int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

        if (fd < 0 || ftruncate(fd, (off_t) size) < 0 || fchmod(fd, mode) < 0 ||
            fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
                return -1;
        return fd;
}

/* As uid nobody: every forgery refused with its reason, the connection still served. */
static int forgeries(void *userdata) {
        struct shmz_client *c;
        struct shmz_zone *mine, *ro;
        struct shmz_port *p;
        struct shmz_listener *l;
        int fd, own, sp[2], r;

        (void) userdata;
        if (shmz_connect(d.socket, &c) < 0)
                return 10;
        if (shmz_zone_open(c, "mine", 65536, "", SHMZ_CREATE, &mine) < 0)
                return 11;
        if (shmz_zone_open(c, "readable", 0, "", SHMZ_RDONLY, &ro) < 0)
                return 12;
        fd = resumed_raw();
        if (fd < 0)
                return 13;
        /* A memfd of our own, named and sealed as the zone's: not the zone's inode. */
        own = forged_memfd("shmzone:readable", 65536 + 4096, 0400);
        if (own < 0)
                return 14;
        if ((r = reattach(fd, "readable", true, own)) != -ESTALE)
                return 20 + (-r % 50);
        /* The mode decides first: a zone we may not open, whatever we send. */
        if ((r = reattach(fd, "target", true, own)) != -EACCES)
                return 15;
        /* Another zone's fd (ours, honestly held) for the one we may not open. */
        if ((r = reattach(fd, "target", true, mine->fd)) != -EACCES)
                return 70 + (-r % 50);
        /* Another zone's fd for a zone we may read: still not that zone. */
        if ((r = reattach(fd, "readable", true, mine->fd)) != -ESTALE)
                return 120 + (-r % 50);
        /* A reader's fd does not make a writer. */
        if ((r = reattach(fd, "readable", false, ro->fd)) != -EACCES)
                return 170 + (-r % 50);
        /* Something that is no memfd at all. */
        if ((r = reattach(fd, "readable", true, fd)) != -EBADF)
                return 220;
        /* The honest one passes: the same zone, read-only. */
        if ((r = reattach(fd, "readable", true, ro->fd)) != 0)
                return 221;

        /* A channel we made, named and sealed as the daemon's, but ours. */
        close(own);
        own = forged_memfd("shmzone-channel:1", SHMZ_CHANNEL_SIZE, 0400);
        if (own < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0)
                return 222;
        if ((r = rejoin(fd, sp[0], own)) != -EPERM)
                return 223;
        /* A zone's memfd (the daemon's, mode 0400) passed as a channel: not one by its size or name. */
        if ((r = rejoin(fd, sp[0], ro->fd)) != -EPERM)
                return 224;
        /* A real channel (of a port of ours) with a socket pair of ours: the end is not the daemon's. */
        if (shmz_port_listen(c, "forge", 0666, &l) < 0 || shmz_port_connect(c, "forge", &p) < 0)
                return 225;
        if ((r = rejoin(fd, sp[0], port_channel_fd(p))) != -EPERM)
                return 226;
        close(own);
        close(sp[0]);
        close(sp[1]);
        close(fd);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_zone_close(ro);
        shmz_zone_close(mine);
        shmz_disconnect(c);
        return 0;
}

Test(reconnect, forged_proofs_are_refused) {
        struct shmz_client *c = harness_connect(&d);
        struct shmz_zone *t, *r;

        cr_assert_not_null(c);
        cr_assert_eq(shmz_zone_open(c, "target", 65536, "", SHMZ_CREATE, &t), 0);
        cr_assert_eq(shmz_zone_open(c, "readable", 65536, "", SHMZ_CREATE, &r), 0);
        cr_assert_eq(shmz_zone_chmod(c, "readable", 0644), 0);
        {
                int status = harness_run_as(NOBODY, NOBODY, forgeries, NULL);

                cr_assert_eq(status, 0, "forgery step %d", status);
        }
        /* Nothing forged was counted. */
        {
                struct shmz_zone_stat st;

                cr_assert_eq(shmz_zone_stat(c, "target", &st), 0);
                cr_expect_eq(st.attached, 1);
        }
        shmz_zone_close(r);
        shmz_zone_close(t);
        shmz_disconnect(c);
        harness_stop_clean(&d);
}

/* Without RESUME the kernel refuses fds on the control socket, and a REATTACH without its fd proves nothing. */
Test(reconnect, proofs_need_resume) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct shmz_msg_zone_reattach req = {};
        struct shmz_msg_hello_reply hr;
        struct shmz_msg_zone_info info;
        uint32_t stream = 0;
        int fd = harness_raw_connect(d.socket), mfd;

        cr_assert_geq(fd, 0);
        cr_assert_eq(client_raw_call(fd, &stream, SHMZ_MSG_HELLO, &hello, sizeof(hello), NULL, 0, &hr, sizeof(hr)), 0);
        strncpy_buf(req.name, sizeof(req.name), "x");
        cr_expect_eq(
                client_raw_call(fd, &stream, SHMZ_MSG_ZONE_REATTACH, &req, sizeof(req), NULL, 0, &info, sizeof(info)),
                -EPROTO);
        mfd = memfd_create("x", MFD_CLOEXEC);
        cr_assert_geq(mfd, 0);
        cr_expect_eq(proto_send_fds(fd, SHMZ_MSG_ZONE_REATTACH, 0, 9, 0, &req, sizeof(req), &mfd, 1), -EPERM);
        close(mfd);
        close(fd);
        harness_stop_clean(&d);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, true, false);
}
