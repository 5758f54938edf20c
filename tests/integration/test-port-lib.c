/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The library's ports against a real daemon: listen, connect, accept, peer
 * credentials, segments made by the daemon, zero-copy and copied messages,
 * listings and status, a peer killed (the survivor's -EPIPE after what was
 * queued), access by mode, RPC across two processes.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "port.h"
#include "shmzone.h"
#include "util.h"

#define NOBODY 65534

static struct daemon_proc d;

/* The daemon must stop cleanly: exit 0, nothing from the sanitizers (leaks of ports, watches, segments). */
static void stop(void) {
        harness_stop_clean(&d);
}

static void start(void) {
        harness_init(&d, "[daemon]\nchunk_size = 64K\nsegment_chunks = 32\nport_memory = 8M\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

TestSuite(portlib, .init = start, .fini = stop, .timeout = 60);

static void fill(uint8_t *p, size_t n, unsigned seed) {
        for (size_t i = 0; i < n; i++)
                p[i] = (uint8_t) (i * 7 + seed);
}

static bool check(const uint8_t *p, size_t n, unsigned seed) {
        for (size_t i = 0; i < n; i++)
                if (p[i] != (uint8_t) (i * 7 + seed))
                        return false;
        return true;
}

struct seen {
        int listeners, ports, segments;
        uint64_t port_id;
};

static int on_port(const struct shmz_msg_port_info *pi, void *userdata) {
        struct seen *s = userdata;

        if (pi->port_id == 0 && streq(pi->name, "svc"))
                s->listeners++;
        else if (pi->port_id != 0) {
                s->ports++;
                s->port_id = pi->port_id;
        }
        return 0;
}

static int on_segment(const struct shmz_msg_segment_info *si, void *userdata) {
        struct seen *s = userdata;

        s->segments++;
        cr_assert_eq(si->chunk_size, 65536);
        cr_assert_eq(si->n_chunks, 32);
        return 0;
}

Test(portlib, listen_connect_send_both_ways) {
        struct shmz_client *c1, *c2;
        struct shmz_listener *l;
        struct shmz_port *cp, *ap;
        struct shmz_msg m = { .type = 5, .fd = -1 }, r;
        struct shmz_daemon_status st;
        struct seen seen = {};
        size_t big = 2 * 1024 * 1024;
        uint8_t *buf, *copy = malloc(100000);
        pid_t pid;
        uid_t uid;
        gid_t gid;

        cr_assert_eq(shmz_connect(d.socket, &c1), 0);
        cr_assert_eq(shmz_connect(d.socket, &c2), 0);
        cr_assert_eq(shmz_port_listen(c1, "svc", 0600, &l), 0);
        cr_assert_eq(shmz_port_listen(c2, "svc", 0600, &(struct shmz_listener *){ NULL }), -EADDRINUSE);
        cr_assert_eq(shmz_port_connect(c2, "nope", &cp), -ENOENT);
        cr_assert_eq(shmz_port_accept(l, 0, &ap), -EAGAIN);
        cr_assert_eq(shmz_port_connect(c2, "svc", &cp), 0);
        cr_assert_eq(shmz_port_accept(l, 2000000000, &ap), 0);
        cr_assert_eq(shmz_port_peer(cp, &pid, &uid, &gid), 0);
        cr_assert(pid == getpid() && uid == getuid() && gid == getgid());
        cr_assert_eq(shmz_port_peer(ap, &pid, NULL, NULL), 0);
        cr_assert_eq(pid, getpid());

        /* 2 MiB in place, through a segment the daemon made for the connector. */
        buf = shmz_port_buf(cp, big);
        cr_assert_not_null(buf, "buf: %m");
        fill(buf, big, 3);
        m.data = buf;
        m.size = big;
        cr_assert_eq(shmz_port_send(cp, &m, -1), 0);
        cr_assert_eq(shmz_port_recv(ap, &r, 2000000000), 0);
        cr_assert_eq(r.size, big);
        cr_assert(check(r.data, big, 3));
        shmz_msg_release(ap, &r);
        /* Copied, the other way (a segment of the acceptor's, asked for on c1). */
        fill(copy, 100000, 4);
        m = (struct shmz_msg){ .type = 6, .data = copy, .size = 100000, .fd = -1 };
        cr_assert_eq(shmz_port_send(ap, &m, -1), 0);
        cr_assert_eq(shmz_port_recv(cp, &r, 2000000000), 0);
        cr_assert(check(r.data, 100000, 4));

        cr_assert_eq(shmz_port_list(c2, on_port, &seen), 0);
        cr_assert_eq(seen.listeners, 1);
        cr_assert_eq(seen.ports, 1);
        cr_assert_eq(shmz_segment_list(c2, on_segment, &seen), 0);
        cr_assert_eq(seen.segments, 2);
        cr_assert_eq(shmz_daemon_status(c1, &st), 0);
        cr_assert_eq(st.listeners, 1);
        cr_assert_eq(st.ports, 1);
        cr_assert_eq(st.segment_bytes, 2 * (4096 + 32 * 65536));
        cr_assert_geq(st.messages, 2);
        shmz_msg_release(cp, &r);

        /* Closing one side: the other reads what is queued, then -EPIPE. */
        m = (struct shmz_msg){ .type = 7, .data = "bye", .size = 4, .fd = -1 };
        cr_assert_eq(shmz_port_send(cp, &m, 0), 0);
        shmz_port_close(cp);
        cr_assert_eq(shmz_port_recv(ap, &r, 2000000000), 0);
        cr_assert_str_eq(r.data, "bye");
        shmz_msg_release(ap, &r);
        cr_assert_eq(shmz_port_recv(ap, &r, 2000000000), -EPIPE);
        shmz_port_close(ap);
        shmz_listener_close(l);
        shmz_disconnect(c1);
        shmz_disconnect(c2);
        free(copy);
}

Test(portlib, mode_refuses_other_uid) {
        struct shmz_client *c;
        struct shmz_listener *l;
        pid_t child;
        int st;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "private", 0600, &l), 0);
        child = fork();
        cr_assert(child >= 0);
        if (child == 0) {
                struct shmz_client *o;
                struct shmz_port *p;

                if (setresgid(NOBODY, NOBODY, NOBODY) < 0 || setresuid(NOBODY, NOBODY, NOBODY) < 0)
                        _exit(2);
                if (shmz_connect(d.socket, &o) < 0)
                        _exit(3);
                _exit(shmz_port_connect(o, "private", &p) == -EACCES ? 0 : 1);
        }
        cr_assert(waitpid(child, &st, 0) == child);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(portlib, killed_peer_epipe_after_queued) {
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *p;
        struct shmz_msg m;
        int go[2], st;
        uint64_t t0, t_kill, waited;
        pid_t child;
        char x;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "victim", 0600, &l), 0);
        cr_assert(pipe(go) == 0);
        child = fork();
        cr_assert(child >= 0);
        if (child == 0) {
                struct shmz_client *o;
                struct shmz_port *cp;
                uint8_t *data = malloc(300000);

                fill(data, 300000, 9);
                if (shmz_connect(d.socket, &o) < 0 || shmz_port_connect(o, "victim", &cp) < 0)
                        _exit(1);
                for (int i = 0; i < 3; i++) {
                        struct shmz_msg s = { .type = (uint32_t) i, .data = data, .size = 300000, .fd = -1 };

                        if (shmz_port_send(cp, &s, -1) < 0)
                                _exit(2);
                }
                (void) !write(go[1], "x", 1);
                pause();
                _exit(0);
        }
        close(go[1]);
        cr_assert_eq(read(go[0], &x, 1), 1);
        close(go[0]);
        cr_assert_eq(shmz_port_accept(l, 2000000000, &p), 0);
        /*
         * From the moment the process is dead (reaped: its pidfd is readable for
         * the daemon too): the queued messages, then -EPIPE, within 10 ms. The
         * kernel's own teardown of a sanitized process is not counted.
         */
        t_kill = now_nsec(CLOCK_MONOTONIC);
        kill(child, SIGKILL);
        cr_assert(waitpid(child, &st, 0) == child);
        t0 = now_nsec(CLOCK_MONOTONIC);
        for (int i = 0; i < 3; i++) {
                cr_assert_eq(shmz_port_recv(p, &m, 2000000000), 0, "message %d", i);
                cr_assert_eq(m.size, 300000);
                cr_assert(((uint8_t *) m.data)[299999] == (uint8_t) (299999 * 7 + 9));
                shmz_msg_release(p, &m);
        }
        cr_assert_eq(shmz_port_recv(p, &m, 2000000000), -EPIPE);
        waited = now_nsec(CLOCK_MONOTONIC) - t0;
        fprintf(stderr, "FIGURE port_epipe_after_death_us %llu (after the kill: %llu)\n",
                (unsigned long long) (waited / 1000),
                (unsigned long long) ((now_nsec(CLOCK_MONOTONIC) - t_kill) / 1000));
        cr_assert_lt(waited, 10000000u, "-EPIPE after %llu ns", (unsigned long long) waited);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

static void serve(struct shmz_port *p, struct shmz_msg *m, void *userdata) {
        struct shmz_msg r = { .type = m->type + 1, .stream = m->stream, .flags = SHMZ_MSG_LAST, .fd = -1 };

        (void) userdata;
        r.data = m->data;
        r.size = m->size;
        (void) shmz_port_send(p, &r, -1);
        shmz_msg_release(p, m);
}

static void on_reply(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata) {
        int *out = userdata;

        *out = error < 0 ? error : (int) reply->type;
        if (reply)
                shmz_msg_release(p, reply);
}

Test(portlib, rpc_across_processes) {
        struct shmz_client *c;
        struct shmz_listener *l;
        struct shmz_port *p;
        struct shmz_msg m = { .type = 41, .data = "ping", .size = 5, .fd = -1 };
        int got = 0, st, r;
        pid_t child;

        cr_assert_eq(shmz_connect(d.socket, &c), 0);
        cr_assert_eq(shmz_port_listen(c, "echo", 0600, &l), 0);
        child = fork();
        cr_assert(child >= 0);
        if (child == 0) {
                struct shmz_client *o;
                struct shmz_port *sp;

                if (shmz_connect(d.socket, &o) < 0 || shmz_port_connect(o, "echo", &sp) < 0)
                        _exit(1);
                shmz_port_set_handler(sp, serve, NULL);
                while (shmz_port_dispatch(sp, -1) >= 0)
                        ;
                _exit(0);
        }
        cr_assert_eq(shmz_port_accept(l, 2000000000, &p), 0);
        cr_assert_eq(shmz_port_call(p, &m, now_nsec(CLOCK_MONOTONIC) + 2000000000u, on_reply, &got, NULL), 0);
        while (got == 0)
                cr_assert_geq(shmz_port_dispatch(p, -1), 0);
        cr_assert_eq(got, 42);
        /* The server dies: a pending call ends with -EPIPE. */
        got = 0;
        kill(child, SIGKILL);
        cr_assert(waitpid(child, &st, 0) == child);
        /* Either the call already sees the end (and its handler is never called), or the handler gets -EPIPE. */
        r = shmz_port_call(p, &m, 0, on_reply, &got, NULL);
        if (r == 0) {
                while (got == 0 && shmz_port_dispatch(p, -1) >= 0)
                        ;
                cr_assert_eq(got, -EPIPE);
        } else
                cr_assert_eq(r, -EPIPE);
        shmz_port_close(p);
        shmz_listener_close(l);
        shmz_disconnect(c);
}

Test(portlib, listener_close_keeps_accepted_ports) {
        struct shmz_client *c1, *c2;
        struct shmz_listener *l;
        struct shmz_port *p1, *p2, *ap;
        struct shmz_msg m = { .type = 1, .data = "x", .size = 2, .fd = -1 }, r;

        cr_assert_eq(shmz_connect(d.socket, &c1), 0);
        cr_assert_eq(shmz_connect(d.socket, &c2), 0);
        cr_assert_eq(shmz_port_listen(c1, "door", 0666, &l), 0);
        cr_assert_geq(shmz_listener_fd(l), 0);
        cr_assert_eq(shmz_port_connect(c2, "door", &p1), 0);
        cr_assert_eq(shmz_port_connect(c2, "door", &p2), 0);
        cr_assert_eq(shmz_port_accept(l, 2000000000, &ap), 0);
        shmz_listener_close(l);
        /* The name is gone; the connection never accepted is shut down; the accepted one lives. */
        cr_assert_eq(shmz_port_connect(c2, "door", &(struct shmz_port *){ NULL }), -ENOENT);
        cr_assert_eq(shmz_port_recv(p2, &r, 2000000000), -EPIPE);
        cr_assert_eq(shmz_port_send(p1, &m, 0), 0);
        cr_assert_eq(shmz_port_recv(ap, &r, 2000000000), 0);
        shmz_msg_release(ap, &r);
        shmz_port_close(p1);
        shmz_port_close(p2);
        shmz_port_close(ap);
        /* The name may be published again. */
        cr_assert_eq(shmz_port_listen(c2, "door", 0600, &l), 0);
        shmz_listener_close(l);
        shmz_disconnect(c1);
        shmz_disconnect(c2);
}

int main(int argc, char *argv[]) {
        return harness_main(argc, argv, /* need_root= */ true, /* need_fuse= */ false);
}

/* ---- a listener whose daemon reads nothing for a while --------------------------------- */

#define STORM 100

static void start_storm(void) {
        harness_init(&d, "[daemon]\nport_backlog = 1024\nmax_ports_per_uid = 1024\n");
        cr_assert_eq(harness_start(&d, NULL, false), 0, "daemon did not start: %s", harness_log(&d));
}

TestSuite(portstorm, .init = start_storm, .fini = stop, .timeout = 120);

/*
 * Connections wait for a listener whose connection has room for only a few
 * messages, and the daemon reads nothing (stopped). Taking them must not wait
 * for that room (each PORT_ACCEPTED waits in the listener instead), and the
 * listener's close must deliver every one before it hangs up: no port taken
 * ends with the listener.
 */
Test(portstorm, accepts_never_wait_for_the_daemon_and_every_port_taken_is_kept) {
        static struct shmz_port *cp[STORM], *ap[STORM];
        struct shmz_client *c1, *c2;
        struct shmz_listener *l;
        int one = 1, failed = -1, fr = 0;
        uint64_t t0, took;

        cr_assert_eq(shmz_connect(d.socket, &c1), 0);
        cr_assert_eq(shmz_connect(d.socket, &c2), 0);
        cr_assert_eq(shmz_port_listen(c1, "storm", 0600, &l), 0);
        for (int i = 0; i < STORM; i++) {
                int r = shmz_port_connect(c2, "storm", &cp[i]);

                cr_assert_eq(r, 0, "connect %d: %s", i, strerror(-r));
        }
        /* The smallest send buffer the kernel allows: a handful of PORT_ACCEPTED fill it. */
        cr_assert_eq(setsockopt(listener_socket_fd(l), SOL_SOCKET, SO_SNDBUF, &one, sizeof(one)), 0);

        cr_assert_eq(kill(d.pid, SIGSTOP), 0);
        t0 = now_nsec(CLOCK_MONOTONIC);
        for (int i = 0; i < STORM && failed < 0; i++) {
                fr = shmz_port_accept(l, 5000000000, &ap[i]);
                if (fr < 0)
                        failed = i;
        }
        took = now_nsec(CLOCK_MONOTONIC) - t0;
        cr_assert_eq(kill(d.pid, SIGCONT), 0);
        cr_assert_eq(failed, -1, "accept %d: %s", failed, strerror(-fr));
        fprintf(stderr, "FIGURE accept_%d_daemon_stopped_ms %llu\n", STORM, (unsigned long long) (took / 1000000));
        cr_assert_lt(took, UINT64_C(2000000000), "%d accepts took %llu ms", STORM,
                     (unsigned long long) (took / 1000000));

        t0 = now_nsec(CLOCK_MONOTONIC);
        shmz_listener_close(l);
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, UINT64_C(3000000000));
        for (int i = 0; i < STORM; i++) {
                struct shmz_msg m = { .type = 7, .data = &i, .size = sizeof(i), .fd = -1 }, r;

                cr_assert_eq(shmz_port_send(cp[i], &m, 2000000000), 0, "port %d", i);
                cr_assert_eq(shmz_port_recv(ap[i], &r, 2000000000), 0, "port %d", i);
                cr_assert_eq(r.type, 7);
                shmz_msg_release(ap[i], &r);
        }
        for (int i = 0; i < STORM; i++) {
                shmz_port_close(cp[i]);
                shmz_port_close(ap[i]);
        }
        shmz_disconnect(c2);
        shmz_disconnect(c1);
}
