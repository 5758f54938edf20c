/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The control socket's port requests and the watch on every port.
 *
 * PORT_LISTEN makes a connection a listener's: from then on it gets
 * NOTICE_PORT (another worker may send it: one datagram, non-blocking) and
 * sends PORT_ACCEPTED. PORT_CONNECT makes the socketpair and the channel,
 * tells the listener, answers the connector, and watches both processes
 * (pidfds) and both ends (the daemon's copies, events 0: EPOLLHUP once a side
 * shut its end down) on the loop of the worker that handled it.
 *
 * One mutex, fe_lock, guards what two workers share: a listener (struct
 * port_listen: the listener's connection fd is only used under it, and it is
 * freed under it once unlisted from the core, so ports_connect() under it
 * never returns a freed owner) and the list of ports not accepted yet (their
 * acceptor end may be shut down from the listener's worker). A watch's event
 * sources are only touched on its own worker's thread. Order: fe_lock, then
 * the core's lock (the core's lock stays a leaf).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "daemon.h"
#include "futex.h"
#include "log.h"
#include "memfd.h"
#include "ports.h"
#include "proto.h"
#include "worker.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/* Entries per page of a running listing (a page of ZONE_LIST's size). */
#define PORT_LIST_PAGE 32

struct watch;

struct port_listen {
        struct listener *l;
        struct conn *conn;     /* the listener's connection: its fd takes notices from any worker (under fe_lock) */
        int pidfd;             /* the listener's process; each port gets a copy */
        struct watch *pending; /* ports not accepted yet (at most the backlog) */
};

struct watch {
        struct daemon *d;
        struct worker *w; /* whose loop has the sources */
        struct port *port;
        uint64_t id;
        int end[2];   /* the daemon's copies of both ends, never read */
        int pidfd[2]; /* per side */
        sd_event_source *end_src[2], *pid_src[2];
        struct shmz_channel *chan;   /* read-write: closed, release_seq */
        struct port_listen *pl;      /* while not accepted (fe_lock) */
        struct watch *pnext, *pprev; /* in pl->pending (fe_lock) */
        struct watch *next, *prev;   /* in watches (fe_lock) */
        struct watch *stop_next;     /* port_worker_stop()'s list (its own thread) */
};

static pthread_mutex_t fe_lock = PTHREAD_MUTEX_INITIALIZER;
static struct watch *watches;

/* The handlers' short name for conn_reply(). */
#define reply conn_reply

/* A pidfd of the process at the other end of a connection: the kernel's own (no pid reuse race), else by pid. */
static int peer_pidfd(int sock, pid_t pid) {
        socklen_t len = sizeof(int);
        int fd = -EBADF;

        if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) >= 0 && fd >= 0)
                return fd;
        fd = (int) syscall(SYS_pidfd_open, pid, 0);
        return fd < 0 ? -errno : fd;
}

static void pending_unlink(struct watch *w) {
        if (!w->pl)
                return;
        if (w->pprev)
                w->pprev->pnext = w->pnext;
        else
                w->pl->pending = w->pnext;
        if (w->pnext)
                w->pnext->pprev = w->pprev;
        w->pl = NULL;
        w->pnext = w->pprev = NULL;
}

/* Frees w (its worker's thread). The port must be dropped from the core already, or the core be going. */
static void watch_free(struct watch *w) {
        if (!w)
                return;
        pthread_mutex_lock(&fe_lock);
        pending_unlink(w);
        if (w->prev)
                w->prev->next = w->next;
        else if (watches == w)
                watches = w->next;
        if (w->next)
                w->next->prev = w->prev;
        w->next = w->prev = NULL;
        /* Under the lock: the listener's worker may be shutting end[1] down right now. */
        for (unsigned i = 0; i < 2; i++) {
                w->end_src[i] = sd_event_source_disable_unref(w->end_src[i]);
                w->pid_src[i] = sd_event_source_disable_unref(w->pid_src[i]);
                w->end[i] = safe_close(w->end[i]);
                w->pidfd[i] = safe_close(w->pidfd[i]);
        }
        pthread_mutex_unlock(&fe_lock);
        if (w->chan)
                (void) munmap(w->chan, SHMZ_CHANNEL_HEADER_SIZE);
        free(w);
}

/*
 * The port ends: a process died (died: the side whose end is shut down, so
 * that the survivor reads what is queued, then end of file) or a side shut
 * its end down. Senders sleeping for memory wake and see closed.
 */
static void watch_end(struct watch *w, int died_side) {
        if (died_side >= 0)
                (void) shutdown(w->end[died_side], SHUT_RDWR);
        if (w->chan) {
                __atomic_store_n(&w->chan->closed, 1, __ATOMIC_RELEASE);
                for (unsigned d = 0; d < 2; d++) {
                        __atomic_fetch_add(&w->chan->dir[d].release_seq, 1, __ATOMIC_RELEASE);
                        futex_wake(&w->chan->dir[d].release_seq, INT_MAX);
                        /* Receivers asleep on the ring too (those polling the socket see its end). */
                        __atomic_fetch_add(&w->chan->dir[d].wake_seq, 1, __ATOMIC_RELEASE);
                        futex_wake(&w->chan->dir[d].wake_seq, INT_MAX);
                }
        }
        log_debug("Port %" PRIu64 " ended (%s).", w->id,
                  died_side == 0   ? "the connector died"
                  : died_side == 1 ? "the acceptor died"
                                   : "shut down");
        if (w->port)
                ports_port_drop(w->d->ports, w->port, died_side >= 0);
        else
                ports_port_drop_id(w->d->ports, w->id, died_side >= 0); /* rejoined: a watch per side */
        watch_free(w);
}

static int on_pid(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct watch *w = userdata;

        watch_end(w, s == w->pid_src[0] ? 0 : 1);
        return 0;
}

static int on_end(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct watch *w = userdata;

        watch_end(w, -1);
        return 0;
}

/* The channel: a sealed memfd (header page, two rings), its header filled; *ret_map the daemon's read-write mapping. */
static int channel_make(uint64_t port_id, int *ret_fd, struct shmz_channel **ret_map) {
        _cleanup_close_ int fd = -EBADF;
        struct shmz_channel *m;
        char name[64];
        int r;

        (void) snprintf(name, sizeof(name), "shmzone-channel:%" PRIu64, port_id);
        r = memfd_new_sealed(name, SHMZ_CHANNEL_SIZE, true, &fd);
        if (r < 0)
                return r;
        m = mmap(NULL, SHMZ_CHANNEL_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                 0); /* the rings are not ours */
        if (m == MAP_FAILED)
                return -errno;
        m->magic = SHMZ_CHANNEL_MAGIC;
        m->abi_version = SHMZ_ABI_VERSION;
        m->size = SHMZ_CHANNEL_SIZE;
        m->port_id = port_id;
        /* Both receivers start as if they polled their fd: the first message sends a WAKE frame, so a
         * caller that polls before it ever received is woken. */
        m->dir[0].rx_sleep = m->dir[1].rx_sleep = SHMZ_RX_SLEEP_FD;
        *ret_map = m;
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static int do_listen(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_port_listen *m) {
        struct daemon *d = c->daemon;
        struct shmz_msg_port_info info;
        struct port_listen *pl;
        int r;

        if (!buf_is_cstr(m->name, sizeof(m->name)) || m->reserved != 0 || (m->mode & ~0777u))
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        if (c->n_attachments > 0 || c->list.active)
                return reply(c, h, -EBUSY, NULL, 0, -EBADF);
        pl = calloc(1, sizeof(*pl));
        if (!pl)
                return reply(c, h, -ENOMEM, NULL, 0, -EBADF);
        pl->conn = c;
        pl->pidfd = peer_pidfd(c->fd, c->caller.pid);
        if (pl->pidfd < 0) {
                r = pl->pidfd;
                free(pl);
                return reply(c, h, r == -ESRCH ? -ECONNREFUSED : r, NULL, 0, -EBADF);
        }
        pthread_mutex_lock(&fe_lock);
        r = ports_listen(d->ports, &c->caller, m->name, m->mode, pl, &pl->l);
        if (r >= 0)
                r = ports_listener_info(d->ports, m->name, &info, NULL);
        if (r >= 0)
                c->port_listener = pl;
        else if (pl->l)
                ports_unlisten(d->ports, pl->l);
        pthread_mutex_unlock(&fe_lock);
        if (r < 0) {
                safe_close(pl->pidfd);
                free(pl);
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        log_debug("Port %s published by pid %d uid %u.", m->name, (int) c->caller.pid, (unsigned) c->caller.uid);
        return reply(c, h, 0, &info, sizeof(info), -EBADF);
}

static int do_connect(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_name *m) {
        struct daemon *d = c->daemon;
        struct shmz_msg_port_peer mine, theirs;
        struct port_listen *pl;
        struct port *p = NULL;
        struct watch *w;
        void *owner = NULL;
        int chan = -EBADF, fds[2], r;

        if (!buf_is_cstr(m->name, sizeof(m->name)))
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        if (c->port_listener)
                return reply(c, h, -EISCONN, NULL, 0, -EBADF);
        w = calloc(1, sizeof(*w));
        if (!w)
                return reply(c, h, -ENOMEM, NULL, 0, -EBADF);
        *w = (struct watch){ .d = d, .w = c->worker, .end = { -EBADF, -EBADF }, .pidfd = { -EBADF, -EBADF } };
        w->pidfd[SHMZ_PORT_SIDE_CONNECTOR] = peer_pidfd(c->fd, c->caller.pid);
        if (w->pidfd[SHMZ_PORT_SIDE_CONNECTOR] < 0) {
                r = w->pidfd[SHMZ_PORT_SIDE_CONNECTOR];
                free(w);
                return reply(c, h, r, NULL, 0, -EBADF);
        }

        pthread_mutex_lock(&fe_lock);
        r = ports_connect(d->ports, &c->caller, m->name, &p, &owner);
        if (r < 0)
                goto fail_locked;
        pl = owner;
        w->port = p;
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, w->end) < 0) {
                r = -errno;
                goto fail_locked;
        }
        ports_port_peer(d->ports, p, SHMZ_PORT_SIDE_CONNECTOR, &mine);
        ports_port_peer(d->ports, p, SHMZ_PORT_SIDE_ACCEPTOR, &theirs);
        w->id = mine.port_id;
        r = channel_make(w->id, &chan, &w->chan);
        if (r < 0)
                goto fail_locked;
        r = ports_port_set_channel(d->ports, p, chan);
        if (r < 0)
                goto fail_locked;
        w->pidfd[SHMZ_PORT_SIDE_ACCEPTOR] = fcntl(pl->pidfd, F_DUPFD_CLOEXEC, 3);
        if (w->pidfd[SHMZ_PORT_SIDE_ACCEPTOR] < 0) {
                r = -errno;
                goto fail_locked;
        }
        /* One datagram, never waiting: a listener that does not read costs the connector -EAGAIN. */
        fds[0] = w->end[SHMZ_PORT_SIDE_ACCEPTOR];
        fds[1] = chan;
        r = proto_send_fds(pl->conn->fd, SHMZ_MSG_NOTICE_PORT, 0, 0, 0, &theirs, sizeof(theirs), fds, 2);
        if (r < 0) {
                r = -EAGAIN;
                goto fail_locked;
        }
        w->pl = pl;
        w->pnext = pl->pending;
        if (pl->pending)
                pl->pending->pprev = w;
        pl->pending = w;
        w->next = watches;
        if (watches)
                watches->prev = w;
        watches = w;
        pthread_mutex_unlock(&fe_lock);

        for (unsigned i = 0; i < 2; i++) {
                r = sd_event_add_io(sd_event_source_get_event(c->source), &w->end_src[i], w->end[i], 0, on_end, w);
                if (r >= 0)
                        r = sd_event_add_io(sd_event_source_get_event(c->source), &w->pid_src[i], w->pidfd[i], EPOLLIN,
                                            on_pid, w);
                if (r < 0)
                        break;
        }
        if (r < 0) {
                /* Unwatched, the port would outlive its processes: end it now (the acceptor sees end of file). */
                (void) shutdown(w->end[SHMZ_PORT_SIDE_ACCEPTOR], SHUT_RDWR);
                ports_port_drop(d->ports, p, false);
                watch_free(w);
                safe_close(chan);
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        log_debug("Port %" PRIu64 " to %s: pid %d -> pid %d.", w->id, m->name, (int) c->caller.pid, (int) theirs.pid);

        fds[0] = fcntl(w->end[SHMZ_PORT_SIDE_CONNECTOR], F_DUPFD_CLOEXEC, 3);
        fds[1] = chan;
        if (fds[0] < 0) {
                r = -errno;
                safe_close(chan);
                (void) shutdown(w->end[SHMZ_PORT_SIDE_CONNECTOR], SHUT_RDWR); /* the watch ends it */
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        r = conn_send_fds(c, h->type, SHMZ_MSG_F_REPLY, h->stream, 0, &mine, sizeof(mine), fds, 2);
        if (r < 0)
                /* The connector never gets its end: end the port (the watch drops it), then the connection. */
                (void) shutdown(w->end[SHMZ_PORT_SIDE_CONNECTOR], SHUT_RDWR);
        return r;

fail_locked:
        pthread_mutex_unlock(&fe_lock);
        if (p)
                ports_port_drop(d->ports, p, false);
        w->port = NULL;
        watch_free(w);
        safe_close(chan);
        return reply(c, h, r, NULL, 0, -EBADF);
}

/* One-way, on the listener's connection: the library took that port. */
static int do_accepted(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_port_ref *m) {
        struct port_listen *pl = c->port_listener;
        int r = -ENOENT;

        if (!pl || m->token != 0 || m->reserved != 0) {
                atomic_fetch_add(&c->daemon->errors, 1);
                log_debug("Client pid %d: PORT_ACCEPTED %s: ignored.", (int) c->caller.pid,
                          pl ? "with non-zero reserved fields" : "on a connection that does not listen");
                return 0;
        }
        pthread_mutex_lock(&fe_lock);
        for (struct watch *w = pl->pending; w; w = w->pnext)
                if (w->id == m->port_id) {
                        pending_unlink(w);
                        r = ports_accepted(c->daemon->ports, pl->l, m->port_id);
                        break;
                }
        pthread_mutex_unlock(&fe_lock);
        if (r < 0) {
                /* Not pending any more: most often its connector went (died, or closed) before the
                 * listener took it, and the daemon already dropped the port. */
                atomic_fetch_add(&c->daemon->errors, 1);
                log_debug_errno(r, "Client pid %d: PORT_ACCEPTED for port %" PRIu64 ", not pending: %m",
                                (int) c->caller.pid, (uint64_t) m->port_id);
        }
        return 0;
}

static int do_segment_create(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_port_ref *m) {
        struct shmz_msg_segment_info info;
        int fd = -EBADF, r;

        if (m->reserved != 0 || m->side > SHMZ_PORT_SIDE_ACCEPTOR)
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        r = ports_segment_create(c->daemon->ports, m->port_id, m->token, m->side, &info, &fd);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply(c, h, 0, &info, sizeof(info), fd);
}

/*
 * A channel a daemon made (channel_make()): sealed exactly, the daemon's uid,
 * mode 0400, its size, and the memfd name only the maker sets. Nothing here
 * can wait: F_GET_SEALS looks at shared memory only, and goes first.
 */
static int channel_check(int fd) {
        char path[64], target[128];
        struct stat st;
        ssize_t n;

        if (fcntl(fd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
                return -EBADF;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 07777) != 0400 ||
            st.st_size != SHMZ_CHANNEL_SIZE)
                return -EPERM;
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n = readlink(path, target, sizeof(target) - 1);
        if (n < 0)
                return -errno;
        target[n] = 0;
        if (strncmp(target, "/memfd:shmzone-channel:", strlen("/memfd:shmzone-channel:")) != 0)
                return -EPERM;
        return 0;
}

/* A socket end of a pair a daemon made: SO_PEERCRED of a socketpair() is its maker's. Never waits either. */
static int end_check(int fd) {
        int domain = 0, type = 0;
        socklen_t len = sizeof(int);
        struct ucred cred;

        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0)
                return errno == ENOTSOCK ? -EBADF : -errno;
        len = sizeof(int);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
                return -errno;
        if (domain != AF_UNIX || type != SOCK_SEQPACKET)
                return -EBADF;
        len = sizeof(cred);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                return -errno;
        if (cred.uid != geteuid())
                return -EPERM;
        return 0;
}

/*
 * PORT_REJOIN: a side of a port made before a restart asks to be watched
 * again. fds[0] its socket end, fds[1] the channel; both checked, the channel
 * identifies the port (its inode; both sides must prove the same one). Each
 * side gets a watch of its own on its own worker: its pidfd (taken from this
 * connection) and its end. Either ends the port for both: a death shuts the
 * dead side's end down, so the other side's watch sees the hang-up.
 */
int port_rejoin(struct conn *c, const struct shmz_msg_header *h, const void *body, int *fds) {
        struct daemon *d = c->daemon;
        struct shmz_msg_port_rejoin m;
        struct shmz_msg_port_peer peer;
        struct watch *w = NULL;
        int r;

        memcpy(&m, body, sizeof(m));
        if (!d->ports)
                r = -EOPNOTSUPP;
        else if (m.reserved != 0 || m.side > SHMZ_PORT_SIDE_ACCEPTOR)
                r = -EINVAL;
        else
                r = channel_check(fds[1]);
        if (r >= 0)
                r = end_check(fds[0]);
        if (r >= 0) {
                w = calloc(1, sizeof(*w));
                r = w ? 0 : -ENOMEM;
        }
        if (r >= 0) {
                *w = (struct watch){ .d = d, .w = c->worker, .end = { -EBADF, -EBADF }, .pidfd = { -EBADF, -EBADF } };
                w->pidfd[m.side] = peer_pidfd(c->fd, c->caller.pid);
                r = w->pidfd[m.side] < 0 ? w->pidfd[m.side] : 0;
        }
        if (r >= 0) {
                w->chan = mmap(NULL, SHMZ_CHANNEL_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
                if (w->chan == MAP_FAILED) {
                        w->chan = NULL;
                        r = -errno;
                }
        }
        if (r >= 0)
                r = ports_rejoin(d->ports, &c->caller, m.side, fds[1], m.chunk_size, m.segment_chunks, &peer);
        control_close_proof(c, fds[1]);
        if (r < 0) {
                control_close_proof(c, fds[0]);
                if (w)
                        watch_free(w);
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        w->id = peer.port_id;
        w->end[m.side] = fds[0];
        r = sd_event_add_io(sd_event_source_get_event(c->source), &w->end_src[m.side], w->end[m.side], 0, on_end, w);
        if (r >= 0)
                r = sd_event_add_io(sd_event_source_get_event(c->source), &w->pid_src[m.side], w->pidfd[m.side],
                                    EPOLLIN, on_pid, w);
        if (r < 0) {
                ports_port_drop_id(d->ports, w->id, false);
                w->end[m.side] = -EBADF;
                control_close_proof(c, fds[0]);
                watch_free(w);
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        pthread_mutex_lock(&fe_lock);
        w->next = watches;
        if (watches)
                watches->prev = w;
        watches = w;
        pthread_mutex_unlock(&fe_lock);
        log_debug("Port %" PRIu64 ": side %u (pid %d) rejoined.", w->id, (unsigned) m.side, (int) c->caller.pid);
        return reply(c, h, 0, &peer, sizeof(peer), -EBADF);
}

/* A page of a listing after the last entry sent: a client that does not read holds one page, as for ZONE_LIST. */
static int port_list_page(struct conn *c, struct shmz_msg_port_info *out, size_t *ret_n) {
        int r;

        if (c->list.phase == 0) {
                r = ports_list_listeners_page(c->daemon->ports, c->list.after, out, PORT_LIST_PAGE, ret_n);
                if (r < 0)
                        return r;
                if (*ret_n > 0)
                        strncpy_buf(c->list.after, sizeof(c->list.after), out[*ret_n - 1].name);
                if (*ret_n < PORT_LIST_PAGE)
                        c->list.phase = 1;
                return 0;
        }
        r = ports_list_ports_page(c->daemon->ports, c->list.after_id, out, PORT_LIST_PAGE, ret_n);
        if (r < 0)
                return r;
        if (*ret_n > 0)
                c->list.after_id = out[*ret_n - 1].port_id;
        if (*ret_n < PORT_LIST_PAGE)
                c->list.phase = 2;
        return 0;
}

static int segment_list_page(struct conn *c, struct shmz_msg_segment_info *out, size_t *ret_n) {
        int r;

        r = ports_list_segments_page(c->daemon->ports, c->list.after_id, out, PORT_LIST_PAGE, ret_n);
        if (r < 0)
                return r;
        if (*ret_n > 0)
                c->list.after_id = out[*ret_n - 1].id;
        if (*ret_n < PORT_LIST_PAGE)
                c->list.phase = 2;
        return 0;
}

int port_list_pump(struct conn *c) {
        while (c->list.active && !c->out_head) {
                union {
                        struct shmz_msg_port_info p[PORT_LIST_PAGE];
                        struct shmz_msg_segment_info s[PORT_LIST_PAGE];
                } page;
                size_t n, size;
                bool ports = c->list.type == SHMZ_MSG_PORT_LIST;
                int r;

                r = ports ? port_list_page(c, page.p, &n) : segment_list_page(c, page.s, &n);
                if (r < 0)
                        return r;
                size = ports ? sizeof(page.p[0]) : sizeof(page.s[0]);
                for (size_t i = 0; i < n; i++) {
                        r = conn_send(c, c->list.type, SHMZ_MSG_F_REPLY, c->list.stream, 0,
                                      ports ? (const void *) &page.p[i] : (const void *) &page.s[i], size, -EBADF);
                        if (r < 0)
                                return r;
                }
                if (c->list.phase >= 2) {
                        c->list.active = false;
                        return conn_send(c, c->list.type, SHMZ_MSG_F_REPLY | SHMZ_MSG_F_LAST, c->list.stream, 0, NULL,
                                         0, -EBADF);
                }
        }
        return 0;
}

int port_dispatch(struct conn *c, const struct shmz_msg_header *h, const void *body) {
        if (!c->daemon->ports)
                return reply(c, h, -EOPNOTSUPP, NULL, 0, -EBADF);
        switch (h->type) {
        case SHMZ_MSG_PORT_LISTEN:
                return do_listen(c, h, body);
        case SHMZ_MSG_PORT_CONNECT:
                return do_connect(c, h, body);
        case SHMZ_MSG_PORT_ACCEPTED:
                return do_accepted(c, h, body);
        case SHMZ_MSG_SEGMENT_CREATE:
                return do_segment_create(c, h, body);
        case SHMZ_MSG_PORT_LIST:
        case SHMZ_MSG_SEGMENT_LIST:
                c->list.active = true;
                c->list.type = h->type;
                c->list.stream = h->stream;
                c->list.after[0] = 0;
                c->list.after_id = 0;
                c->list.phase = h->type == SHMZ_MSG_PORT_LIST ? 0 : 1;
                return port_list_pump(c);
        default:
                return reply(c, h, -EOPNOTSUPP, NULL, 0, -EBADF);
        }
}

void port_conn_closed(struct conn *c) {
        struct port_listen *pl = c->port_listener;

        if (!pl)
                return;
        c->port_listener = NULL;
        pthread_mutex_lock(&fe_lock);
        ports_unlisten(c->daemon->ports, pl->l);
        /* Never accepted: nobody will. The connector reads end of file; each watch drops its port. */
        while (pl->pending) {
                struct watch *w = pl->pending;

                (void) shutdown(w->end[SHMZ_PORT_SIDE_ACCEPTOR], SHUT_RDWR);
                pending_unlink(w);
        }
        pthread_mutex_unlock(&fe_lock);
        safe_close(pl->pidfd);
        free(pl);
}

void port_worker_stop(struct worker *wk) {
        struct watch *mine = NULL;

        /* One pass: only this thread frees its watches, so the ones collected stay until freed below. */
        pthread_mutex_lock(&fe_lock);
        for (struct watch *w = watches; w; w = w->next)
                if (w->w == wk) {
                        w->stop_next = mine;
                        mine = w;
                }
        pthread_mutex_unlock(&fe_lock);
        while (mine) {
                struct watch *w = mine;

                mine = w->stop_next;
                /* The daemon stops: the processes keep their port, nobody watches it any more. */
                w->port = NULL;
                watch_free(w);
        }
}
