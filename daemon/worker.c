/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <systemd/sd-event.h>

#include "clients.h"
#include "daemon.h"
#include "log.h"
#include "proto.h"
#include "reaper.h"
#include "worker.h"

/*
 * Replies queued for a client that does not read. Requests are not read while
 * any wait and listings are made a page at a time, so this is never reached
 * by an honest client; a dishonest one is cut off.
 */
#define OUT_MAX_BYTES (64u << 10)
#define MAX_GROUPS 65536u

struct outmsg {
        struct outmsg *next;
        int fds[PROTO_SEND_MAX_FDS];
        size_t n_fds;
        size_t size;
        uint8_t buf[];
};

/* What the worker's own epoll watches: its sd_event loop, and the listening socket. */
enum { WATCH_EVENT = 0, WATCH_LISTEN = 1 };

/* New connections taken per wake-up: the rest go to whichever worker the kernel wakes next. */
#define ACCEPT_BATCH 4u

struct worker {
        struct daemon *daemon;
        unsigned index;
        pthread_t thread;
        sd_event *event;
        /*
         * The thread waits here, on its sd_event loop's fd and on the listening
         * socket, the latter with EPOLLEXCLUSIVE: a new connection wakes one idle
         * worker, which takes it itself (no hop through another thread). sd_event
         * cannot register EPOLLEXCLUSIVE, hence an epoll of our own around it.
         */
        int epoll_fd;
        bool listening; /* the listening socket is in epoll_fd */
        /*
         * Out of fds: accepting resumes after a pause. Made (off) at start, with
         * it the loop's timerfd: pausing must need no fd.
         */
        sd_event_source *listen_resume;
        int wake_fd; /* eventfd: worker_stop() wakes the thread through it */
        struct conn *conns;
        bool started;
        atomic_bool stop; /* set by worker_stop(): the thread ends at its next wake-up */
};

static void conn_free(struct conn *c) {
        struct worker *w = c->worker;

        /* Before the fd goes: another worker may be sending this listener a notice. */
        port_conn_closed(c);
        control_release(c);
        sd_event_source_disable_unref(c->source);
        sd_event_source_disable_unref(c->hello_timer);
        safe_close(c->fd);
        while (c->out_head) {
                struct outmsg *m = c->out_head;

                c->out_head = m->next;
                for (size_t i = 0; i < m->n_fds; i++)
                        safe_close(m->fds[i]);
                free(m);
        }
        if (c->prev)
                c->prev->next = c->next;
        else
                w->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        free(c->groups);
        clients_remove(w->daemon->clients, c->counted_uid);
        free(c);
}

static int flush_out(struct conn *c) {
        while (c->out_head) {
                struct outmsg *m = c->out_head;
                struct shmz_msg_header h;
                int r;

                memcpy(&h, m->buf, sizeof(h));
                r = proto_send_fds(c->fd, h.type, h.flags, h.stream, h.status, m->buf + sizeof(h), m->size - sizeof(h),
                                   m->fds, m->n_fds);
                if (r == -EAGAIN)
                        return 0;
                if (r < 0)
                        return r;
                c->out_head = m->next;
                if (!c->out_head)
                        c->out_tail = NULL;
                c->out_bytes -= m->size;
                for (size_t i = 0; i < m->n_fds; i++)
                        safe_close(m->fds[i]);
                free(m);
        }
        return 0;
}

/* While replies wait (or a listing runs), read no more requests: the client's backlog is its own to carry. */
static bool conn_busy(const struct conn *c) {
        return c->out_head || c->list.active;
}

static int conn_update_events(struct conn *c) {
        return sd_event_source_set_io_events(c->source, c->out_head ? EPOLLOUT : EPOLLIN);
}

void conn_hello_done(struct conn *c) {
        c->hello = true;
        c->hello_timer = sd_event_source_disable_unref(c->hello_timer);
}

static void close_all(const int *fds, size_t n_fds) {
        for (size_t i = 0; i < n_fds; i++)
                safe_close(fds[i]);
}

int conn_send_fds(struct conn *c, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
                  size_t body_size, const int *fds, size_t n_fds) {
        struct shmz_msg_header h = { .size = (uint32_t) (sizeof(h) + body_size),
                                     .type = type,
                                     .flags = flags,
                                     .stream = stream,
                                     .status = status };
        struct outmsg *m;
        int r;

        if (n_fds > PROTO_SEND_MAX_FDS) {
                close_all(fds, n_fds);
                return -EINVAL;
        }
        if (!c->out_head) {
                r = proto_send_fds(c->fd, type, flags, stream, status, body, body_size, fds, n_fds);
                if (r != -EAGAIN) {
                        close_all(fds, n_fds);
                        return r;
                }
        }
        if (c->out_bytes + h.size > OUT_MAX_BYTES) {
                close_all(fds, n_fds);
                return -ENOBUFS;
        }
        m = malloc(sizeof(*m) + h.size);
        if (!m) {
                close_all(fds, n_fds);
                return -ENOMEM;
        }
        m->next = NULL;
        memcpy(m->fds, fds, n_fds * sizeof(int));
        m->n_fds = n_fds;
        m->size = h.size;
        memcpy(m->buf, &h, sizeof(h));
        if (body_size > 0)
                memcpy(m->buf + sizeof(h), body, body_size);
        if (c->out_tail)
                c->out_tail->next = m;
        else
                c->out_head = m;
        c->out_tail = m;
        c->out_bytes += h.size;
        return conn_update_events(c);
}

int conn_send(struct conn *c, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
              size_t body_size, int fd) {
        return conn_send_fds(c, type, flags, stream, status, body, body_size, &fd, fd >= 0 ? 1 : 0);
}

int conn_reply(struct conn *c, const struct shmz_msg_header *req, int status, const void *body, size_t size, int fd) {
        if (status < 0) {
                /* errors_total counts these: each one is logged, so that a rise can be explained. */
                atomic_fetch_add(&c->daemon->errors, 1);
                log_debug_errno(status, "Client pid %d: request %u (stream %u) refused: %m", (int) c->caller.pid,
                                (unsigned) req->type, (unsigned) req->stream);
                body = NULL;
                size = 0;
        }
        return conn_send(c, req->type, SHMZ_MSG_F_REPLY, req->stream, status, body, size, fd);
}

/* Reads and handles what c sent. A negative return: c must go. */
static int conn_read(struct conn *c) {
        uint8_t buf[SHMZ_MSG_MAX];
        int r;

        /* A bounded batch per wake-up keeps one busy client from starving the others. */
        for (unsigned i = 0; i < 64 && !conn_busy(c); i++) {
                int fds[PROTO_MAX_FDS];
                size_t size, n_fds;

                r = proto_recv(c->fd, buf, sizeof(buf), &size, fds, &n_fds);
                /* After RESUME, the proofs of a re-attachment ride along: control.c checks and closes them. */
                if (r >= 0 && n_fds > 0 && c->resuming && control_takes_fds(buf, size, n_fds)) {
                        atomic_fetch_add(&c->daemon->requests, 1);
                        r = control_dispatch_fds(c, buf, size, fds, n_fds);
                        if (r < 0)
                                return r;
                        continue;
                }
                /* No other request carries an fd; closing one here could stall every client of this thread. */
                for (size_t k = 0; k < n_fds; k++)
                        if (!reaper_take(fds[k], c->caller.uid)) {
                                /* No thread, no memory: the one risk left is ours to take. */
                                log_warning("Closing a client's fd in a serving thread; it may block.");
                                safe_close(fds[k]);
                        }
                if (r >= 0 && n_fds > 0)
                        r = -EBADMSG;
                if (r == -EAGAIN)
                        return 0;
                if (r == -ECONNRESET)
                        return r;
                if (r < 0) {
                        atomic_fetch_add(&c->daemon->errors, 1);
                        log_debug_errno(r, "Client pid %d: unreadable message, disconnecting: %m", (int) c->caller.pid);
                        return r;
                }
                atomic_fetch_add(&c->daemon->requests, 1);
                r = control_dispatch(c, buf, size);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int on_conn_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct conn *c = userdata;
        int r;

        /*
         * Waiting replies are flushed on a hang-up or error too, not only on
         * EPOLLOUT: reading does nothing while they wait, and the hang-up
         * (level-triggered) would come back at once, for good. A send then
         * fails and c goes; replies still stuck after a hang-up can never go.
         */
        if ((revents & EPOLLOUT) || c->out_head) {
                r = flush_out(c);
                if (r >= 0 && c->out_head && (revents & (EPOLLHUP | EPOLLERR)))
                        r = -ECONNRESET;
                if (r >= 0)
                        r = control_list_pump(c);
                if (r >= 0)
                        r = conn_update_events(c);
        } else
                r = conn_read(c);
        if (r < 0)
                conn_free(c);
        return 0;
}

static int read_peer(struct conn *c) {
        struct ucred cred;
        socklen_t len = sizeof(cred);
        gid_t *groups = NULL;

        if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                return -errno;
        c->caller.uid = cred.uid;
        c->caller.gid = cred.gid;
        c->caller.pid = cred.pid;

        /* The supplementary groups as of connect(): the kernel's word, like the uid. */
        len = 64 * sizeof(gid_t);
        for (;;) {
                gid_t *g = realloc(groups, len);

                if (!g) {
                        free(groups);
                        return -ENOMEM;
                }
                groups = g;
                if (getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) >= 0)
                        break;
                if (errno != ERANGE || len > MAX_GROUPS * sizeof(gid_t)) {
                        free(groups);
                        return -errno;
                }
        }
        c->groups = groups;
        c->caller.groups = groups;
        c->caller.n_groups = len / sizeof(gid_t);
        return 0;
}

static int on_hello_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        struct conn *c = userdata;

        log_debug("Client pid %d said no hello in time; disconnecting.", (int) c->caller.pid);
        conn_free(c);
        return 0;
}

/*
 * A connection the worker accepted: its credentials (the kernel's word, as of
 * connect()), counted against the limits, then read at once. A client sends
 * its hello right after connect(), so it is usually there already: answered
 * without waiting for another wake-up, and no deadline is armed. Over a
 * limit: closed at once, the client sees the connection end before its hello
 * (clients_add() counts under its lock: workers accepting at the same time
 * cannot overshoot a limit together).
 */
static void conn_new(struct worker *w, int fd) {
        struct conn *c;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c) {
                log_oom();
                safe_close(fd);
                return;
        }
        c->worker = w;
        c->daemon = w->daemon;
        c->fd = fd;
        c->next_handle = 1;
        r = read_peer(c);
        if (r < 0) {
                log_warning_errno(r, "Cannot read the credentials of a new client: %m");
                free(c->groups);
                free(c);
                safe_close(fd);
                return;
        }
        r = clients_add(w->daemon->clients, c->caller.uid);
        if (r < 0) {
                log_debug_errno(r, "Refusing a connection of uid %u: %m", (unsigned) c->caller.uid);
                free(c->groups);
                free(c);
                safe_close(fd);
                return;
        }
        /* From here on conn_free() gives the count back. */
        c->counted_uid = c->caller.uid;
        c->next = w->conns;
        if (w->conns)
                w->conns->prev = c;
        w->conns = c;

        r = sd_event_add_io(w->event, (sd_event_source **) &c->source, fd, EPOLLIN, on_conn_io, c);
        if (r < 0) {
                conn_free(c);
                return;
        }
        log_debug("Worker %u: client pid %d uid %u connected.", w->index, (int) c->caller.pid,
                  (unsigned) c->caller.uid);
        if (conn_read(c) < 0) {
                conn_free(c);
                return;
        }
        if (c->hello)
                return;
        /* A slot held by a silent connection is a slot taken from somebody else. */
        r = sd_event_add_time_relative(w->event, (sd_event_source **) &c->hello_timer, CLOCK_MONOTONIC,
                                       clients_hello_timeout_usec(w->daemon->clients), 0, on_hello_timeout, c);
        if (r < 0)
                conn_free(c);
}

static int listen_watch(struct worker *w, bool on) {
        struct epoll_event ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.u32 = WATCH_LISTEN };
        int r;

        if (w->listening == on)
                return 0;
        r = epoll_ctl(w->epoll_fd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, w->daemon->listen_fd, on ? &ev : NULL);
        if (r < 0)
                return -errno;
        w->listening = on;
        return 0;
}

/* Watching the listening socket again failed (out of memory): try again in 100 ms rather than never. */
static void listen_retry_later(struct worker *w) {
        int r;

        r = sd_event_source_set_time_relative(w->listen_resume, 100 * 1000);
        if (r >= 0)
                r = sd_event_source_set_enabled(w->listen_resume, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Worker %u: cannot schedule watching the listening socket: %m", w->index);
}

static int on_listen_resume(sd_event_source *s, uint64_t usec, void *userdata) {
        struct worker *w = userdata;
        int r;

        r = listen_watch(w, true);
        if (r < 0) {
                log_error_errno(r, "Worker %u: cannot watch the listening socket again: %m", w->index);
                listen_retry_later(w);
        }
        return 0;
}

static void worker_accept(struct worker *w) {
        unsigned n;
        int r;

        for (n = 0; n < ACCEPT_BATCH; n++) {
                int fd = accept4(w->daemon->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

                if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
                        /* Out of fds: the listening socket stays readable, so pause rather than spin. */
                        log_warning_errno(errno, "Cannot accept clients: %m; worker %u pauses accepting for 100 ms.",
                                          w->index);
                        r = listen_watch(w, false);
                        if (r >= 0)
                                r = sd_event_source_set_time_relative(w->listen_resume, 100 * 1000);
                        if (r >= 0)
                                r = sd_event_source_set_enabled(w->listen_resume, SD_EVENT_ONESHOT);
                        if (r < 0) {
                                /* Without the timer the pause would last for good: rather spin. */
                                log_warning_errno(r, "Worker %u: cannot pause accepting: %m", w->index);
                                (void) listen_watch(w, true);
                        }
                        return;
                }
                if (fd < 0) {
                        /* EAGAIN: another worker was quicker. */
                        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                                log_warning_errno(errno, "accept(): %m");
                        break;
                }
                conn_new(w, fd);
        }
        /*
         * Exclusive wake-ups go to the first idle waiter in the socket's queue:
         * joining it again at its tail hands the next connection to another idle
         * worker, so that connections spread over the workers as round robin did.
         */
        if (n > 0 && w->listening) {
                r = listen_watch(w, false);
                if (r >= 0)
                        r = listen_watch(w, true);
                if (r < 0) {
                        log_error_errno(r, "Worker %u: cannot watch the listening socket again: %m", w->index);
                        if (!w->listening)
                                listen_retry_later(w);
                }
        }
}

static void shutdown_clients(struct worker *w) {
        /* The ports this thread watches: the processes keep talking, the daemon stops watching. */
        port_worker_stop(w);
        while (w->conns) {
                struct conn *c = w->conns;

                /* Best effort, non-blocking: a client that does not read just sees EOF. */
                (void) proto_send(c->fd, SHMZ_MSG_NOTICE_SHUTDOWN, 0, 0, 0, NULL, 0, -EBADF);
                conn_free(c);
        }
}

static int on_wake(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct worker *w = userdata;
        uint64_t v;

        (void) read(fd, &v, sizeof(v));
        if (atomic_load(&w->stop))
                (void) sd_event_exit(w->event, 0);
        return 0;
}

/* sd_event_loop() with the listening socket beside it: see struct worker. */
static int worker_loop(struct worker *w) {
        for (;;) {
                int r;

                r = sd_event_prepare(w->event);
                if (r == 0) {
                        struct epoll_event ev[2];
                        bool incoming = false;
                        int n;

                        n = epoll_wait(w->epoll_fd, ev, ELEMENTSOF(ev), -1);
                        if (n < 0 && errno != EINTR)
                                return -errno;
                        for (int i = 0; i < n; i++)
                                if (ev[i].data.u32 == WATCH_LISTEN)
                                        incoming = true;
                        r = sd_event_wait(w->event, 0);
                        if (r >= 0 && incoming)
                                worker_accept(w);
                }
                if (r > 0)
                        r = sd_event_dispatch(w->event);
                if (r < 0)
                        return r;
                if (sd_event_get_state(w->event) == SD_EVENT_FINISHED)
                        return 0;
        }
}

static void *worker_main(void *userdata) {
        struct worker *w = userdata;
        int r;

        r = worker_loop(w);
        if (r < 0)
                log_error_errno(r, "Worker %u: event loop failed: %m", w->index);
        shutdown_clients(w);
        return NULL;
}

static struct worker *worker_free(struct worker *w) {
        if (!w)
                return NULL;
        sd_event_source_unref(w->listen_resume);
        sd_event_unref(w->event);
        safe_close(w->epoll_fd);
        safe_close(w->wake_fd);
        free(w);
        return NULL;
}

int worker_start(struct daemon *d, unsigned index, struct worker **ret) {
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = WATCH_EVENT };
        struct worker *w;
        int r;

        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->daemon = d;
        w->index = index;
        w->epoll_fd = -EBADF;
        w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->wake_fd < 0) {
                r = -errno;
                goto fail;
        }
        /* A loop of its own, created here but only ever run by the worker's thread. */
        r = sd_event_new(&w->event);
        if (r < 0)
                goto fail;
        r = sd_event_add_io(w->event, NULL, w->wake_fd, EPOLLIN, on_wake, w);
        if (r < 0)
                goto fail;
        w->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (w->epoll_fd < 0 || epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, sd_event_get_fd(w->event), &ev) < 0) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_time(w->event, &w->listen_resume, CLOCK_MONOTONIC, UINT64_MAX, 0, on_listen_resume, w);
        if (r >= 0)
                r = sd_event_source_set_enabled(w->listen_resume, SD_EVENT_OFF);
        if (r >= 0)
                r = listen_watch(w, true);
        if (r < 0)
                goto fail;
        r = -pthread_create(&w->thread, NULL, worker_main, w);
        if (r < 0)
                goto fail;
        w->started = true;
        *ret = w;
        return 0;
fail:
        worker_free(w);
        return r;
}

static int wake(struct worker *w) {
        uint64_t one = 1;

        /* Only fails once the counter is at its maximum, and then a wake-up is pending anyway. */
        if (write(w->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                return -errno;
        return 0;
}

void worker_stop(struct worker *w) {
        if (!w)
                return;
        if (w->started) {
                /* A flag, not a message: stopping needs no memory, and no worker blocks (fds go to the reaper). */
                atomic_store(&w->stop, true);
                (void) wake(w);
                (void) pthread_join(w->thread, NULL);
        }
        worker_free(w);
}
