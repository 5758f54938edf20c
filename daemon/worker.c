/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
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

/* A connection handed over by the main thread. */
struct post {
        int fd;
        uid_t uid;
        struct post *next;
};

struct worker {
        struct daemon *daemon;
        unsigned index;
        pthread_t thread;
        sd_event *event;
        int wake_fd; /* eventfd: other threads post work to this one through it */
        pthread_mutex_t lock;
        struct post *posts, *posts_tail; /* guarded by lock */
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

static int on_conn_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct conn *c = userdata;
        uint8_t buf[SHMZ_MSG_MAX];
        int r;

        if (revents & EPOLLOUT) {
                r = flush_out(c);
                if (r >= 0)
                        r = control_list_pump(c);
                if (r < 0)
                        goto drop;
                r = conn_update_events(c);
                if (r < 0)
                        goto drop;
                return 0;
        }
        /* A bounded batch per wake-up keeps one busy client from starving the others. */
        for (unsigned i = 0; i < 64 && !conn_busy(c); i++) {
                int fds[PROTO_MAX_FDS];
                size_t size, n_fds;

                r = proto_recv(fd, buf, sizeof(buf), &size, fds, &n_fds);
                /* No request carries an fd; closing one here could stall every client of this thread. */
                for (size_t k = 0; k < n_fds; k++)
                        reaper_close(fds[k]);
                if (r >= 0 && n_fds > 0)
                        r = -EBADMSG;
                if (r == -EAGAIN)
                        return 0;
                if (r == -ECONNRESET)
                        goto drop;
                if (r < 0) {
                        atomic_fetch_add(&c->daemon->errors, 1);
                        log_debug_errno(r, "Client pid %d: unreadable message, disconnecting: %m", (int) c->caller.pid);
                        goto drop;
                }
                atomic_fetch_add(&c->daemon->requests, 1);
                r = control_dispatch(c, buf, size);
                if (r < 0)
                        goto drop;
        }
        return 0;
drop:
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

static int conn_new(struct worker *w, int fd, uid_t counted_uid) {
        struct conn *c;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c) {
                safe_close(fd);
                clients_remove(w->daemon->clients, counted_uid);
                return -ENOMEM;
        }
        c->worker = w;
        c->daemon = w->daemon;
        c->fd = fd;
        c->counted_uid = counted_uid;
        c->next_handle = 1;
        c->next = w->conns;
        if (w->conns)
                w->conns->prev = c;
        w->conns = c;

        r = read_peer(c);
        if (r < 0) {
                log_warning_errno(r, "Cannot read the credentials of a new client: %m");
                conn_free(c);
                return r;
        }
        r = sd_event_add_io(w->event, (sd_event_source **) &c->source, fd, EPOLLIN, on_conn_io, c);
        if (r >= 0)
                /* A slot held by a silent connection is a slot taken from somebody else. */
                r = sd_event_add_time_relative(w->event, (sd_event_source **) &c->hello_timer, CLOCK_MONOTONIC,
                                               clients_hello_timeout_usec(w->daemon->clients), 0, on_hello_timeout, c);
        if (r < 0) {
                conn_free(c);
                return r;
        }
        log_debug("Worker %u: client pid %d uid %u connected.", w->index, (int) c->caller.pid,
                  (unsigned) c->caller.uid);
        return 0;
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
        struct post *p;
        uint64_t v;

        (void) read(fd, &v, sizeof(v));
        pthread_mutex_lock(&w->lock);
        p = w->posts;
        w->posts = w->posts_tail = NULL;
        pthread_mutex_unlock(&w->lock);

        while (p) {
                struct post *next = p->next;

                (void) conn_new(w, p->fd, p->uid);
                free(p);
                p = next;
        }
        if (atomic_load(&w->stop)) {
                shutdown_clients(w);
                (void) sd_event_exit(w->event, 0);
        }
        return 0;
}

static void *worker_main(void *userdata) {
        struct worker *w = userdata;
        int r;

        r = sd_event_loop(w->event);
        if (r < 0)
                log_error_errno(r, "Worker %u: event loop failed: %m", w->index);
        shutdown_clients(w);
        return NULL;
}

static struct worker *worker_free(struct worker *w) {
        if (!w)
                return NULL;
        /* Posts never consumed (stop before start) still own their fds. */
        while (w->posts) {
                struct post *p = w->posts;

                w->posts = p->next;
                safe_close(p->fd);
                free(p);
        }
        sd_event_unref(w->event);
        safe_close(w->wake_fd);
        (void) pthread_mutex_destroy(&w->lock);
        free(w);
        return NULL;
}

int worker_start(struct daemon *d, unsigned index, struct worker **ret) {
        struct worker *w;
        int r;

        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->daemon = d;
        w->index = index;
        (void) pthread_mutex_init(&w->lock, NULL);
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

static int post_client(struct worker *w, int fd, uid_t uid) {
        struct post *p;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->fd = fd;
        p->uid = uid;
        pthread_mutex_lock(&w->lock);
        if (w->posts_tail)
                w->posts_tail->next = p;
        else
                w->posts = p;
        w->posts_tail = p;
        pthread_mutex_unlock(&w->lock);
        return wake(w);
}

int worker_add_client(struct worker *w, int fd, uid_t counted_uid) {
        int r = post_client(w, fd, counted_uid);

        if (r < 0)
                safe_close(fd);
        return r;
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
