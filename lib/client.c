/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <assert.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "client.h"
#include "port.h"
#include "proto.h"
#include "shmzone.h"
#include "util.h"
#include "zone.h"

struct shmz_client {
        atomic_uint refs;     /* the caller's, plus one per open zone */
        pthread_mutex_t lock; /* one request at a time on the socket */
        pthread_cond_t cond;  /* a revive ended */
        int fd;
        uint32_t next_stream;
        int daemon_pid;
        uint32_t hello_stream;               /* not 0: the hello was sent, its reply is still to be read */
        bool dead;                           /* the daemon said it stops, or the socket broke */
        bool reviving;                       /* a thread is making the connection again (outside the lock) */
        bool given_up;                       /* a revive's hook said there is nothing to come back to */
        unsigned revivals;                   /* connections made again */
        char *path;                          /* the socket, for the dedicated connections of port listeners */
        const struct client_revive_ops *ops; /* NULL: zones and ports re-attached (client_resume_links) */
        void *ops_data;
        /* Zones and ports that came through c: the daemon counts and watches them again after a restart. */
        pthread_mutex_t links_lock; /* taken under lock, never the other way round */
        struct client_link *links;
        bool watched;      /* the revive thread watches fd */
        uint64_t retry_ns; /* the revive thread tries again then (0: not due) */
        uint32_t backoff_ms;
};

static void watcher_forget(struct shmz_client *c);

struct shmz_client *client_ref(struct shmz_client *c) {
        atomic_fetch_add(&c->refs, 1);
        return c;
}

/* A reference unless the last one went already (the revive thread finds clients by pointer). */
static bool client_ref_live(struct shmz_client *c) {
        unsigned v = atomic_load(&c->refs);

        while (v != 0)
                if (atomic_compare_exchange_weak(&c->refs, &v, v + 1))
                        return true;
        return false;
}

bool client_is_last_ref(struct shmz_client *c) {
        return atomic_load(&c->refs) == 1;
}

void client_unref(struct shmz_client *c) {
        if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
                return;
        watcher_forget(c);
        safe_close(c->fd);
        (void) pthread_mutex_destroy(&c->lock);
        (void) pthread_cond_destroy(&c->cond);
        (void) pthread_mutex_destroy(&c->links_lock);
        free(c->path);
        free(c);
}

/*
 * Receives the reply to `stream`, skipping notices. Called with c->lock held.
 * Up to max_fds passed fds are returned in ret_fds (the rest closed).
 */
static int recv_reply(struct shmz_client *c, uint16_t type, uint32_t stream, uint8_t *buf, size_t *ret_size,
                      int *ret_fds, size_t max_fds, size_t *ret_n_fds) {
        for (;;) {
                struct shmz_msg_header h;
                int fds[PROTO_MAX_FDS], r;
                size_t size, n_fds, keep;

                r = proto_recv(c->fd, buf, SHMZ_MSG_MAX, &size, fds, &n_fds);
                /* The daemon passes at most max_fds fds per reply; anything else goes. */
                keep = MIN(n_fds, max_fds);
                for (size_t i = keep; i < n_fds; i++)
                        safe_close(fds[i]);
                if (r >= 0) {
                        memcpy(&h, buf, sizeof(h));
                        if (h.type == SHMZ_MSG_NOTICE_SHUTDOWN && !(h.flags & SHMZ_MSG_F_REPLY))
                                r = -ENOTCONN;
                        /* Replies come in order: anything else means we no longer understand the daemon. */
                        else if (!(h.flags & SHMZ_MSG_F_REPLY) || h.type != type || h.stream != stream || h.status > 0)
                                r = -EPROTO;
                } else if (r == -ECONNRESET)
                        r = -ENOTCONN;
                if (r < 0) {
                        for (size_t i = 0; i < keep; i++)
                                safe_close(fds[i]);
                        c->dead = true;
                        return r;
                }
                for (size_t i = 0; i < keep; i++)
                        ret_fds[i] = fds[i];
                *ret_n_fds = keep;
                *ret_size = size;
                return 0;
        }
}

static int send_request(struct shmz_client *c, uint16_t type, const void *body, size_t body_size,
                        uint32_t *ret_stream) {
        uint32_t stream;
        int r;

        if (c->dead)
                return -ENOTCONN;
        stream = ++c->next_stream ?: ++c->next_stream; /* 0 is for notices */
        r = proto_send(c->fd, type, 0, stream, 0, body, body_size, -EBADF);
        if (r < 0) {
                c->dead = true;
                return r == -EPIPE || r == -ECONNRESET ? -ENOTCONN : r;
        }
        *ret_stream = stream;
        return 0;
}

/*
 * Reads the reply to a hello sent without waiting for it (client_connect()
 * with wait = false). Called with c->lock held, before the reply to any later
 * request: replies come in order.
 */
static int finish_hello(struct shmz_client *c) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_hello_reply reply;
        struct shmz_msg_header h;
        size_t size;
        int r;

        if (c->hello_stream == 0)
                return 0;
        r = recv_reply(c, SHMZ_MSG_HELLO, c->hello_stream, buf, &size, NULL, 0, &(size_t){ 0 });
        if (r < 0)
                return r;
        c->hello_stream = 0;
        memcpy(&h, buf, sizeof(h));
        if (h.status < 0)
                r = h.status;
        else if (size - sizeof(h) != sizeof(reply))
                r = -EPROTO;
        else {
                memcpy(&reply, proto_body(buf), sizeof(reply));
                if (reply.version != SHMZ_PROTO_VERSION)
                        r = -EPROTO;
                else
                        c->daemon_pid = (int) reply.pid;
        }
        if (r < 0)
                c->dead = true;
        return r;
}

/* How long a request waits for a daemon that went away to come back, before -ENOTCONN. */
#define REVIVE_WAIT_NS (UINT64_C(5) * 1000000000)
/* A revive's connection waits this long for each reply (a socket unit holds the socket while the daemon starts). */
#define REVIVE_REPLY_TIMEOUT_SEC 5
#define BACKOFF_MIN_MS 5u
#define BACKOFF_MAX_MS 200u
/* A request whose connection ended under it is sent again at most this often. */
#define REQUEST_TRIES 3

static uint64_t mono_ns(void) {
        struct timespec ts;

        (void) clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

static int client_revive(struct shmz_client *c, uint64_t deadline);

/*
 * Whether a request whose connection ended after it was sent may be sent
 * again: the daemon may have carried it out before it went. Reading requests
 * and an open without SHMZ_CREATE are the same done twice (an attachment the
 * old daemon made went with it); anything that changes state is not, and
 * fails once with -ECONNRESET (libshmzone(3) lists them).
 */
static bool request_retry_safe(uint16_t type, const void *body, size_t body_size) {
        switch (type) {
        case SHMZ_MSG_ZONE_INFO:
        case SHMZ_MSG_ZONE_LIST:
        case SHMZ_MSG_STATUS:
        case SHMZ_MSG_PORT_LIST:
        case SHMZ_MSG_SEGMENT_LIST: {
                return true;
        }
        case SHMZ_MSG_ZONE_OPEN: {
                struct shmz_msg_zone_open m;

                if (body_size != sizeof(m))
                        return false;
                memcpy(&m, body, sizeof(m));
                return !(m.flags & SHMZ_CREATE);
        }
        default:
                return false;
        }
}

/*
 * Sends a request and reads its reply (or run of replies, through cb) with
 * c->lock held, coming back after a daemon restart: a connection found
 * ended before the send is made again first (any request: the daemon never
 * saw it); one that ends after the send is made again and the request sent
 * again only if request_retry_safe(), else -ECONNRESET once.
 */
static int request_locked_retry(struct shmz_client *c, uint16_t type, const void *body, size_t body_size,
                                int (*exchange)(struct shmz_client *c, uint32_t stream, bool *ret_got, void *userdata),
                                void *userdata) {
        uint64_t deadline = mono_ns() + REVIVE_WAIT_NS;
        bool got = false;
        int r = 0;

        for (unsigned tries = 0;; tries++) {
                uint32_t stream;
                bool sent = false;

                pthread_mutex_lock(&c->lock);
                /* A connection the daemon never greeted was refused (a limit), not ended by a restart. */
                if (c->dead && c->daemon_pid == 0) {
                        pthread_mutex_unlock(&c->lock);
                        return -ENOTCONN;
                }
                if (c->dead && !c->given_up) {
                        pthread_mutex_unlock(&c->lock);
                        r = client_revive(c, deadline);
                        if (r < 0)
                                return r == -ECONNRESET ? r : -ENOTCONN;
                        pthread_mutex_lock(&c->lock);
                }
                r = send_request(c, type, body, body_size, &stream);
                if (r >= 0) {
                        sent = true;
                        r = finish_hello(c);
                }
                if (r >= 0)
                        r = exchange(c, stream, &got, userdata);
                pthread_mutex_unlock(&c->lock);
                if (r != -ENOTCONN || c->daemon_pid == 0)
                        return r;
                /* The connection ended. */
                if (tries + 1 >= REQUEST_TRIES)
                        return -ENOTCONN;
                if (sent && (got || !request_retry_safe(type, body, body_size))) {
                        /* Come back for the next request, then tell this one. */
                        (void) client_revive(c, deadline);
                        return -ECONNRESET;
                }
        }
}

struct exchange_one {
        uint16_t type;
        uint8_t *buf;
        size_t size;
        int *fds;
        size_t n_fds, got;
};

static int exchange_one(struct shmz_client *c, uint32_t stream, bool *ret_got, void *userdata) {
        struct exchange_one *x = userdata;

        return recv_reply(c, x->type, stream, x->buf, &x->size, x->fds, x->n_fds, &x->got);
}

int client_request_fds(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, void *ret_reply,
                       size_t reply_size, int *ret_fds, size_t n_fds) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h;
        int fds[2] = { -EBADF, -EBADF };
        struct exchange_one x = { .type = type, .buf = buf, .fds = fds, .n_fds = n_fds };
        size_t size, got;
        int r;

        assert(n_fds <= ELEMENTSOF(fds));
        r = request_locked_retry(c, type, body, body_size, exchange_one, &x);
        if (r < 0)
                return r;
        size = x.size;
        got = x.got;

        memcpy(&h, buf, sizeof(h));
        if (h.status < 0)
                r = h.status;
        else if (size - sizeof(h) != reply_size)
                r = -EPROTO;
        if (r < 0) {
                for (size_t i = 0; i < got; i++)
                        safe_close(fds[i]);
                return r;
        }
        if (reply_size > 0)
                memcpy(ret_reply, proto_body(buf), reply_size);
        for (size_t i = 0; i < n_fds; i++)
                ret_fds[i] = i < got ? fds[i] : -EBADF;
        return 0;
}

int client_request(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, void *ret_reply,
                   size_t reply_size, int *ret_fd) {
        int fd = -EBADF, r;

        r = client_request_fds(c, type, body, body_size, ret_reply, reply_size, &fd, 1);
        if (r < 0)
                return r;
        if (ret_fd)
                *ret_fd = fd;
        else
                safe_close(fd);
        return 0;
}

int client_send_oneway(struct shmz_client *c, uint16_t type, const void *body, size_t body_size) {
        uint64_t deadline = mono_ns() + REVIVE_WAIT_NS;
        uint32_t stream;
        int r;

        pthread_mutex_lock(&c->lock);
        /* A revive under way may be counting this very attachment again: let it finish, start none. */
        while (c->reviving) {
                struct timespec ts;

                (void) clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_sec += 1;
                (void) pthread_cond_timedwait(&c->cond, &c->lock, &ts);
                if (mono_ns() >= deadline)
                        break;
        }
        r = send_request(c, type, body, body_size, &stream);
        pthread_mutex_unlock(&c->lock);
        return r;
}

struct exchange_run {
        uint16_t type;
        size_t reply_size;
        int (*cb)(const void *reply, void *userdata);
        void *userdata;
        int cb_r;
};

static int exchange_run(struct shmz_client *c, uint32_t stream, bool *ret_got, void *userdata) {
        struct exchange_run *x = userdata;
        uint8_t buf[SHMZ_MSG_MAX];
        int r;

        for (;;) {
                struct shmz_msg_header h;
                size_t size;

                r = recv_reply(c, x->type, stream, buf, &size, NULL, 0, &(size_t){ 0 });
                if (r < 0)
                        return r;
                memcpy(&h, buf, sizeof(h));
                if (h.status < 0)
                        return h.status;
                if (size - sizeof(h) == x->reply_size && x->cb_r >= 0) {
                        /* After cb asked to stop, the rest of the run is still read, to stay in step. */
                        *ret_got = true; /* cb saw part of it: the run cannot be sent again */
                        x->cb_r = x->cb(proto_body(buf), x->userdata);
                } else if (size - sizeof(h) != 0 || !(h.flags & SHMZ_MSG_F_LAST)) {
                        if (size - sizeof(h) != x->reply_size) {
                                c->dead = true;
                                return -EPROTO;
                        }
                }
                if (h.flags & SHMZ_MSG_F_LAST)
                        return 0;
        }
}

int client_request_run(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, size_t reply_size,
                       int (*cb)(const void *reply, void *userdata), void *userdata) {
        struct exchange_run x = { .type = type, .reply_size = reply_size, .cb = cb, .userdata = userdata };
        int r;

        r = request_locked_retry(c, type, body, body_size, exchange_run, &x);
        return r < 0 ? r : x.cb_r < 0 ? x.cb_r : 0;
}

static int connect_path(const char *path, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -EBADF;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strncpy(sa.sun_path, path, sizeof(sa.sun_path) - 1);
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        return 0;
}

/*
 * Connects and says hello. With wait, the hello's reply is read here (a
 * daemon that refuses the connection, e.g. over a limit, fails this call);
 * without, it is read before the reply to the first request, which then costs
 * one round trip with the hello (for a connection made for one request).
 */
static int client_connect(const char *socket_path, bool wait, struct shmz_client **ret) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct shmz_client *c;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        atomic_init(&c->refs, 1);
        (void) pthread_mutex_init(&c->lock, NULL);
        (void) pthread_mutex_init(&c->links_lock, NULL);
        {
                pthread_condattr_t ca;

                (void) pthread_condattr_init(&ca);
                (void) pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                (void) pthread_cond_init(&c->cond, &ca);
                (void) pthread_condattr_destroy(&ca);
        }
        c->fd = -EBADF;
        c->path = strdup(socket_path);
        r = c->path ? connect_path(socket_path, &c->fd) : -ENOMEM;
        if (r >= 0)
                r = send_request(c, SHMZ_MSG_HELLO, &hello, sizeof(hello), &c->hello_stream);
        if (r >= 0 && wait)
                r = finish_hello(c);
        if (r < 0) {
                client_unref(c);
                return r;
        }
        *ret = c;
        return 0;
}

/* ---- coming back after a daemon restart ---------------------------------------------------------------- */

/*
 * One request and its reply on a connection being made again (not yet c's):
 * the revive's own, with a receive timeout. No fd is expected back.
 */
int client_raw_call(int fd, uint32_t *stream, uint16_t type, const void *body, size_t body_size, const int *fds,
                    size_t n_fds, void *ret_reply, size_t reply_size) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h;
        int got[PROTO_MAX_FDS], r;
        size_t size, n_got;
        uint32_t st = ++*stream ?: ++*stream;

        r = proto_send_fds(fd, type, 0, st, 0, body, body_size, fds, n_fds);
        if (r < 0)
                return r == -EPIPE || r == -ECONNRESET ? -ENOTCONN : r;
        r = proto_recv(fd, buf, sizeof(buf), &size, got, &n_got);
        for (size_t i = 0; i < n_got; i++)
                safe_close(got[i]); /* none is ever sent with these replies */
        if (r == -EAGAIN || r == -ECONNRESET)
                return -ENOTCONN;
        if (r < 0)
                return r;
        memcpy(&h, buf, sizeof(h));
        if (!(h.flags & SHMZ_MSG_F_REPLY))
                return -ENOTCONN; /* NOTICE_SHUTDOWN: that daemon stops too */
        if (h.type != type || h.stream != st || h.status > 0)
                return -EPROTO;
        if (h.status < 0)
                return h.status;
        if (size - sizeof(h) != reply_size)
                return -EPROTO;
        if (reply_size > 0)
                memcpy(ret_reply, proto_body(buf), reply_size);
        return 0;
}

void client_link_add(struct shmz_client *c, struct client_link *l, unsigned kind) {
        l->kind = kind;
        pthread_mutex_lock(&c->links_lock);
        l->prev = NULL;
        l->next = c->links;
        if (c->links)
                c->links->prev = l;
        c->links = l;
        pthread_mutex_unlock(&c->links_lock);
        client_watch(c);
}

void client_link_del(struct shmz_client *c, struct client_link *l) {
        pthread_mutex_lock(&c->links_lock);
        if (l->prev)
                l->prev->next = l->next;
        else if (c->links == l)
                c->links = l->next;
        if (l->next)
                l->next->prev = l->prev;
        l->next = l->prev = NULL;
        pthread_mutex_unlock(&c->links_lock);
}

void client_links_lock(struct shmz_client *c) {
        pthread_mutex_lock(&c->links_lock);
}

void client_links_unlock(struct shmz_client *c) {
        pthread_mutex_unlock(&c->links_lock);
}

/* A zone is counted again (ZONE_REATTACH with the memfd it holds); refused: its mapping stays, uncounted. */
static void zone_reattach(struct shmz_zone *z, int fd, uint32_t *stream) {
        struct shmz_msg_zone_reattach req = { .flags = z->rdonly ? SHMZ_RDONLY : 0 };
        struct shmz_msg_zone_info info;
        int r;

        if (z->fd < 0) {
                z->handle = 0;
                __atomic_store_n(&z->reattach_error, -EBADF, __ATOMIC_RELAXED);
                return;
        }
        strncpy_buf(req.name, sizeof(req.name), z->name);
        r = client_raw_call(fd, stream, SHMZ_MSG_ZONE_REATTACH, &req, sizeof(req), &z->fd, 1, &info, sizeof(info));
        z->handle = r >= 0 ? info.handle : 0;
        __atomic_store_n(&z->reattach_error, r >= 0 ? 0 : r, __ATOMIC_RELAXED);
}

/* The default revive hook: every zone and port that came through c is proven again on the new connection. */
static int client_resume_links(struct shmz_client *c, int fd, uint32_t *stream) {
        int r = 0;

        pthread_mutex_lock(&c->links_lock);
        if (c->links)
                r = client_raw_call(fd, stream, SHMZ_MSG_RESUME, NULL, 0, NULL, 0, NULL, 0);
        for (struct client_link *l = c->links; r >= 0 && l; l = l->next) {
                if (l->kind == CLIENT_LINK_ZONE)
                        zone_reattach((struct shmz_zone *) ((char *) l - offsetof(struct shmz_zone, link)), fd, stream);
                else
                        r = port_link_rejoin(l, fd, stream);
        }
        pthread_mutex_unlock(&c->links_lock);
        /* A broken connection is tried again; a refusal of one object is that object's. */
        return r == -ENOTCONN || r == -EPROTO ? r : 0;
}

static int revive_once(struct shmz_client *c, const struct client_revive_ops *ops, void *ops_data, int *ret_fd,
                       uint32_t *ret_stream, int *ret_pid) {
        struct shmz_msg_hello hello = { .version_min = SHMZ_PROTO_VERSION, .version_max = SHMZ_PROTO_VERSION };
        struct timeval tv = { .tv_sec = REVIVE_REPLY_TIMEOUT_SEC };
        struct shmz_msg_hello_reply hr;
        _cleanup_close_ int fd = -EBADF;
        uint32_t stream = 0;
        int r;

        r = connect_path(c->path, &fd);
        if (r < 0)
                return r;
        /* A socket unit accepts for a daemon still starting: wait for it, not for good. */
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        r = client_raw_call(fd, &stream, SHMZ_MSG_HELLO, &hello, sizeof(hello), NULL, 0, &hr, sizeof(hr));
        if (r < 0)
                return r;
        if (hr.version != SHMZ_PROTO_VERSION)
                return -EPROTO;
        r = ops ? ops->resume(c, fd, &stream, ops_data) : client_resume_links(c, fd, &stream);
        if (r < 0)
                return r;
        tv = (struct timeval){};
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        *ret_fd = TAKE_FD(fd);
        *ret_stream = stream;
        *ret_pid = (int) hr.pid;
        return 0;
}

static void watcher_rearm(struct shmz_client *c, int fd);

/*
 * Makes c's connection again: one thread at a time (the others wait for it,
 * until deadline), with a backoff between tries (BACKOFF_MIN_MS doubling up
 * to BACKOFF_MAX_MS) until deadline. No lock is held while it talks to the
 * daemon; the new connection is put in place once everything on it is done.
 */
static int client_revive(struct shmz_client *c, uint64_t deadline) {
        const struct client_revive_ops *ops;
        uint32_t backoff = BACKOFF_MIN_MS, stream = 0;
        int fd = -EBADF, old = -EBADF, pid = 0, r;
        void *ops_data;

        pthread_mutex_lock(&c->lock);
        while (c->dead && c->reviving) {
                struct timespec ts = { .tv_sec = (time_t) (deadline / 1000000000),
                                       .tv_nsec = (long) (deadline % 1000000000) };

                if (pthread_cond_timedwait(&c->cond, &c->lock, &ts) == ETIMEDOUT && c->reviving) {
                        pthread_mutex_unlock(&c->lock);
                        return -ENOTCONN;
                }
        }
        if (!c->dead || c->given_up) {
                r = c->dead ? -ENOTCONN : 0;
                pthread_mutex_unlock(&c->lock);
                return r;
        }
        c->reviving = true;
        ops = c->ops;
        ops_data = c->ops_data;
        pthread_mutex_unlock(&c->lock);

        for (;;) {
                r = revive_once(c, ops, ops_data, &fd, &stream, &pid);
                if (r >= 0 || r == -ECANCELED)
                        break;
                if (mono_ns() + (uint64_t) backoff * 1000000 >= deadline)
                        break;
                (void) nanosleep(&(struct timespec){ .tv_nsec = (long) backoff * 1000000 }, NULL);
                backoff = MIN(backoff * 2, BACKOFF_MAX_MS);
        }

        pthread_mutex_lock(&c->lock);
        c->reviving = false;
        if (r >= 0) {
                old = c->fd;
                c->fd = fd;
                c->dead = false;
                c->hello_stream = 0;
                c->next_stream = stream;
                c->daemon_pid = pid;
                c->revivals++;
                if (ops && ops->install)
                        ops->install(c, old, fd, ops_data);
        } else if (r == -ECANCELED)
                c->given_up = true;
        (void) pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
        if (r >= 0) {
                safe_close(old);
                watcher_rearm(c, fd);
        }
        return r < 0 ? -ENOTCONN : 0;
}

void client_set_revive_ops(struct shmz_client *c, const struct client_revive_ops *ops, void *data) {
        pthread_mutex_lock(&c->lock);
        /* A revive under way uses the hooks it took: wait for it before they go. */
        while (c->reviving)
                (void) pthread_cond_wait(&c->cond, &c->lock);
        c->ops = ops;
        c->ops_data = data;
        if (!ops)
                c->given_up = true; /* the hooks' owner goes: nothing to come back for */
        pthread_mutex_unlock(&c->lock);
}

unsigned client_revivals(struct shmz_client *c) {
        unsigned n;

        pthread_mutex_lock(&c->lock);
        n = c->revivals;
        pthread_mutex_unlock(&c->lock);
        return n;
}

/*
 * The revive thread: one per process, started with the first client that
 * holds something the daemon must know of again (a zone, a port, a
 * listener). It waits for the hang-up of each such connection (EPOLLRDHUP:
 * it never reads, the requests and accepts do) and makes it again at once,
 * then after 5, 10, 20 ... 200 ms while the daemon is away, so that zones
 * are counted, ports watched and listeners published again without any call
 * of the application's.
 */
static struct {
        pthread_mutex_t lock;
        pthread_once_t once;
        int epfd;
        pid_t pid;
        bool started;
        struct shmz_client **v;
        size_t n, cap;
} W = { .lock = PTHREAD_MUTEX_INITIALIZER, .once = PTHREAD_ONCE_INIT, .epfd = -EBADF };

static void watcher_atfork_child(void) {
        /* The thread is the parent's; the epoll instance too (shared with it): start afresh when needed. */
        (void) pthread_mutex_init(&W.lock, NULL);
        for (size_t i = 0; i < W.n; i++)
                W.v[i]->watched = false;
        free(W.v);
        W.v = NULL;
        W.n = W.cap = 0;
        safe_close(W.epfd);
        W.epfd = -EBADF;
        W.started = false;
}

static void watcher_init_once(void) {
        (void) pthread_atfork(NULL, NULL, watcher_atfork_child);
}

static struct shmz_client *watcher_take_locked(struct shmz_client *c) {
        for (size_t i = 0; i < W.n; i++)
                if (W.v[i] == c)
                        return client_ref_live(c) ? c : NULL;
        return NULL;
}

static void watcher_process(struct shmz_client *c) {
        struct pollfd pfd = { .events = POLLRDHUP };
        bool dead;
        int r;

        pthread_mutex_lock(&c->lock);
        pfd.fd = c->fd;
        if (!c->dead && !c->reviving && pfd.fd >= 0 && poll(&pfd, 1, 0) > 0 &&
            (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)))
                c->dead = true; /* NOTICE_SHUTDOWN, then the end: either way this daemon is gone */
        dead = c->dead && !c->given_up && !c->reviving;
        if (c->dead && c->fd >= 0)
                (void) epoll_ctl(W.epfd, EPOLL_CTL_DEL, c->fd, NULL); /* level-triggered: stop its events */
        pthread_mutex_unlock(&c->lock);
        if (!dead)
                return;
        r = client_revive(c, 0); /* one try; the next after a backoff */
        pthread_mutex_lock(&W.lock);
        if (r >= 0) {
                c->backoff_ms = 0;
                c->retry_ns = 0;
        } else {
                c->backoff_ms = MIN(MAX(c->backoff_ms * 2, BACKOFF_MIN_MS), BACKOFF_MAX_MS);
                c->retry_ns = mono_ns() + (uint64_t) c->backoff_ms * 1000000;
        }
        pthread_mutex_unlock(&W.lock);
}

static void *watcher_main(void *arg) {
        (void) arg;
        for (;;) {
                struct epoll_event ev[16];
                struct shmz_client *todo[32];
                size_t n_todo = 0;
                uint64_t now, next = UINT64_MAX;
                int n, timeout = -1;

                pthread_mutex_lock(&W.lock);
                for (size_t i = 0; i < W.n; i++)
                        if (W.v[i]->retry_ns != 0)
                                next = MIN(next, W.v[i]->retry_ns);
                pthread_mutex_unlock(&W.lock);
                now = mono_ns();
                if (next != UINT64_MAX)
                        timeout = next <= now ? 0 : (int) MIN((next - now + 999999) / 1000000, (uint64_t) INT_MAX);
                n = epoll_wait(W.epfd, ev, (int) ELEMENTSOF(ev), timeout);
                now = mono_ns();
                pthread_mutex_lock(&W.lock);
                for (int i = 0; i < n && n_todo < ELEMENTSOF(todo); i++) {
                        struct shmz_client *c = watcher_take_locked(ev[i].data.ptr);

                        if (c)
                                todo[n_todo++] = c;
                }
                for (size_t i = 0; i < W.n && n_todo < ELEMENTSOF(todo); i++)
                        if (W.v[i]->retry_ns != 0 && W.v[i]->retry_ns <= now && client_ref_live(W.v[i])) {
                                W.v[i]->retry_ns = 0;
                                todo[n_todo++] = W.v[i];
                        }
                pthread_mutex_unlock(&W.lock);
                for (size_t i = 0; i < n_todo; i++) {
                        watcher_process(todo[i]);
                        client_unref(todo[i]);
                }
        }
        return NULL;
}

static void watcher_rearm(struct shmz_client *c, int fd) {
        struct epoll_event ev = { .events = EPOLLRDHUP, .data.ptr = c };

        pthread_mutex_lock(&W.lock);
        if (c->watched && W.epfd >= 0)
                (void) epoll_ctl(W.epfd, EPOLL_CTL_ADD, fd, &ev);
        pthread_mutex_unlock(&W.lock);
}

void client_watch(struct shmz_client *c) {
        struct epoll_event ev = { .events = EPOLLRDHUP, .data.ptr = c };
        int fd;

        (void) pthread_once(&W.once, watcher_init_once);
        pthread_mutex_lock(&c->lock);
        fd = c->dead ? -EBADF : c->fd;
        pthread_mutex_unlock(&c->lock);
        pthread_mutex_lock(&W.lock);
        if (c->watched)
                goto out;
        if (!W.started) {
                pthread_attr_t attr;
                pthread_t t;
                sigset_t all, old;

                if (W.epfd < 0)
                        W.epfd = epoll_create1(EPOLL_CLOEXEC);
                if (W.epfd < 0)
                        goto out;
                (void) pthread_attr_init(&attr);
                (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                /* Signals are the application's: the thread takes none. */
                (void) sigfillset(&all);
                (void) pthread_sigmask(SIG_BLOCK, &all, &old);
                W.started = pthread_create(&t, &attr, watcher_main, NULL) == 0;
                (void) pthread_sigmask(SIG_SETMASK, &old, NULL);
                (void) pthread_attr_destroy(&attr);
                if (!W.started)
                        goto out; /* no thread: requests still revive c when they find it gone */
        }
        if (W.n == W.cap) {
                size_t cap = MAX((size_t) 8, W.cap * 2);
                struct shmz_client **v = realloc(W.v, cap * sizeof(*v));

                if (!v)
                        goto out;
                W.v = v;
                W.cap = cap;
        }
        W.v[W.n++] = c;
        c->watched = true;
        if (fd >= 0)
                (void) epoll_ctl(W.epfd, EPOLL_CTL_ADD, fd, &ev);
        else
                c->retry_ns = mono_ns();
out:
        pthread_mutex_unlock(&W.lock);
}

static void watcher_forget(struct shmz_client *c) {
        pthread_mutex_lock(&W.lock);
        for (size_t i = 0; i < W.n; i++)
                if (W.v[i] == c) {
                        W.v[i] = W.v[--W.n];
                        break;
                }
        c->watched = false;
        pthread_mutex_unlock(&W.lock);
}

_public_ int shmz_connect(const char *socket_path, struct shmz_client **ret) {
        assert_return(ret, -EINVAL);
        if (!socket_path)
                socket_path = secure_getenv("SHMZONE_SOCKET") ?: SHMZ_DEFAULT_SOCKET;
        return client_connect(socket_path, true, ret);
}

int client_fd(const struct shmz_client *c) {
        return c->fd;
}

const char *client_path(const struct shmz_client *c) {
        return c->path;
}

_public_ void shmz_disconnect(struct shmz_client *c) {
        client_unref(c);
}

_public_ int shmz_client_daemon_pid(const struct shmz_client *c) {
        assert_return(c, -EINVAL);
        return c->daemon_pid;
}

static int name_request(const char *name, struct shmz_msg_zone_name *ret) {
        if (!name_is_valid(name))
                return -EINVAL;
        strncpy_buf(ret->name, sizeof(ret->name), name);
        return 0;
}

/* Maps what the daemon sent and checks it against its own reply. */
static int zone_from_reply(struct shmz_client *c, int fd, const struct shmz_msg_zone_info *info, bool rdonly,
                           const char *name, struct shmz_zone **ret) {
        struct shmz_zone *z;
        int r;

        if (fd < 0 || !buf_is_cstr(info->name, sizeof(info->name)))
                return -EPROTO;
        r = zone_map_fd(fd, rdonly, name ?: info->name, &z);
        if (r < 0)
                return r;
        if (z->map_size != info->map_size) {
                shmz_zone_close(z);
                return -EBADMSG;
        }
        z->handle = info->handle;
        z->existed = info->flags & SHMZ_ZONE_INFO_EXISTED;
        z->client = client_ref(c);
        /* Kept: after a daemon restart it proves which zone this mapping is (ZONE_REATTACH). */
        z->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        client_link_add(c, &z->link, CLIENT_LINK_ZONE);
        *ret = z;
        return 0;
}

_public_ int shmz_zone_open(struct shmz_client *c, const char *name, uint64_t size, const char *tag, unsigned flags,
                            struct shmz_zone **ret) {
        struct shmz_msg_zone_open req = { .size = size, .flags = flags };
        struct shmz_msg_zone_info info;
        _cleanup_close_ int fd = -EBADF;
        int r;

        assert_return(c && ret, -EINVAL);
        if (!name_is_valid(name) || (tag && !tag_is_valid(tag)))
                return -EINVAL;
        if (flags & ~(unsigned) (SHMZ_CREATE | SHMZ_EXCL | SHMZ_RDONLY))
                return -EINVAL;
        strncpy_buf(req.name, sizeof(req.name), name);
        strncpy_buf(req.tag, sizeof(req.tag), tag ?: "");

        r = client_request(c, SHMZ_MSG_ZONE_OPEN, &req, sizeof(req), &info, sizeof(info), &fd);
        if (r < 0)
                return r;
        r = zone_from_reply(c, fd, &info, flags & SHMZ_RDONLY, name, ret);
        if (r < 0) {
                struct shmz_msg_zone_close cl = { .handle = info.handle };

                (void) client_send_oneway(c, SHMZ_MSG_ZONE_CLOSE, &cl, sizeof(cl));
        }
        return r;
}

/*
 * The daemon behind a FUSE view: $SHMZONE_SOCKET if set, else where the view's
 * "socket" symlink (beside zones/) points, else the default.
 */
static int view_socket(const char *zone_path, char *ret, size_t size) {
        char dir[PATH_MAX], link[PATH_MAX];
        const char *env = secure_getenv("SHMZONE_SOCKET");
        char *slash;
        ssize_t n;

        if (env) {
                (void) snprintf(ret, size, "%s", env);
                return 0;
        }
        (void) snprintf(ret, size, "%s", SHMZ_DEFAULT_SOCKET);
        if (!realpath(zone_path, dir))
                return -errno;
        /* <mount>/zones/<name> -> <mount> */
        for (int i = 0; i < 2; i++) {
                slash = strrchr(dir, '/');
                if (!slash || slash == dir)
                        return 0;
                *slash = 0;
        }
        if (strlen(dir) + sizeof("/socket") > sizeof(link))
                return 0;
        strcat(dir, "/socket");
        n = readlink(dir, link, sizeof(link) - 1);
        if (n > 0 && link[0] == '/') {
                link[n] = 0;
                (void) snprintf(ret, size, "%s", link);
        }
        return 0;
}

_public_ int shmz_zone_open_path(const char *path, unsigned flags, struct shmz_zone **ret) {
        struct shmz_msg_zone_ticket t = {};
        struct shmz_msg_zone_info info;
        _cleanup_close_ int file = -EBADF, fd = -EBADF;
        struct shmz_client *c = NULL;
        char sock[PATH_MAX];
        int r;

        assert_return(path && ret, -EINVAL);
        if (flags & ~(unsigned) SHMZ_RDONLY)
                return -EINVAL;
        /* The kernel checks the caller against the file's mode here (default_permissions). */
        file = open(path, ((flags & SHMZ_RDONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY);
        if (file < 0)
                return -errno;
        /* The view hands out a one-time ticket bound to this open file and its access mode. */
        if (ioctl(file, SHMZ_IOC_TICKET, &t) < 0)
                return -errno;
        r = view_socket(path, sock, sizeof(sock));
        if (r < 0)
                return r;
        /* A connection for one request: the hello and the request go together, one round trip. */
        r = client_connect(sock, false, &c);
        if (r < 0)
                return r;
        t.flags = flags & SHMZ_RDONLY;
        r = client_request(c, SHMZ_MSG_ZONE_OPEN_TICKET, &t, sizeof(t), &info, sizeof(info), &fd);
        if (r >= 0)
                r = zone_from_reply(c, fd, &info, flags & SHMZ_RDONLY, NULL, ret);
        shmz_disconnect(c); /* the zone keeps its own reference */
        return r;
}

_public_ int shmz_zone_unlink(struct shmz_client *c, const char *name) {
        struct shmz_msg_zone_name req;
        int r;

        assert_return(c, -EINVAL);
        r = name_request(name, &req);
        if (r < 0)
                return r;
        return client_request(c, SHMZ_MSG_ZONE_UNLINK, &req, sizeof(req), NULL, 0, NULL);
}

static void stat_from_wire(const struct shmz_msg_zone_info *i, struct shmz_zone_stat *ret) {
        *ret = (struct shmz_zone_stat){
                .size = i->size,
                .map_size = i->map_size,
                .generation = i->generation,
                .created_usec = i->created_usec,
                .uid = i->uid,
                .gid = i->gid,
                .mode = i->mode,
                .attached = i->attached,
                .holders = i->holders,
                .flags = i->flags,
                .ino = i->ino,
                .mtime_usec = i->mtime_usec,
                .ctime_usec = i->ctime_usec,
        };
        strncpy_buf(ret->name, sizeof(ret->name), buf_is_cstr(i->name, sizeof(i->name)) ? i->name : "");
        strncpy_buf(ret->tag, sizeof(ret->tag), buf_is_cstr(i->tag, sizeof(i->tag)) ? i->tag : "");
}

_public_ int shmz_zone_stat_sized(struct shmz_client *c, const char *name, struct shmz_zone_stat *ret,
                                  size_t ret_size) {
        struct shmz_msg_zone_name req;
        struct shmz_msg_zone_info info;
        struct shmz_zone_stat st;
        int r;

        assert_return(c && ret, -EINVAL);
        r = name_request(name, &req);
        if (r < 0)
                return r;
        r = client_request(c, SHMZ_MSG_ZONE_INFO, &req, sizeof(req), &info, sizeof(info), NULL);
        if (r < 0)
                return r;
        stat_from_wire(&info, &st);
        copy_sized(ret, ret_size, &st, sizeof(st));
        return 0;
}

struct list_ctx {
        int (*cb)(const struct shmz_zone_stat *st, void *userdata);
        void *userdata;
};

static int list_one(const void *reply, void *userdata) {
        struct list_ctx *ctx = userdata;
        struct shmz_zone_stat st;

        stat_from_wire(reply, &st);
        return ctx->cb(&st, ctx->userdata);
}

_public_ int shmz_zone_list(struct shmz_client *c, int (*cb)(const struct shmz_zone_stat *st, void *userdata),
                            void *userdata) {
        struct list_ctx ctx = { .cb = cb, .userdata = userdata };

        assert_return(c && cb, -EINVAL);
        return client_request_run(c, SHMZ_MSG_ZONE_LIST, NULL, 0, sizeof(struct shmz_msg_zone_info), list_one, &ctx);
}

static int setattr(struct shmz_client *c, const char *name, uint32_t mask, uint32_t mode, uint32_t uid, uint32_t gid) {
        struct shmz_msg_zone_setattr req = { .mask = mask, .mode = mode, .uid = uid, .gid = gid };

        assert_return(c, -EINVAL);
        if (!name_is_valid(name))
                return -EINVAL;
        strncpy_buf(req.name, sizeof(req.name), name);
        return client_request(c, SHMZ_MSG_ZONE_SETATTR, &req, sizeof(req), NULL, 0, NULL);
}

_public_ int shmz_zone_chmod(struct shmz_client *c, const char *name, mode_t mode) {
        return setattr(c, name, SHMZ_SETATTR_MODE, (uint32_t) mode, 0, 0);
}

_public_ int shmz_zone_chown(struct shmz_client *c, const char *name, uid_t uid, gid_t gid) {
        uint32_t mask = (uid != (uid_t) -1 ? SHMZ_SETATTR_UID : 0) | (gid != (gid_t) -1 ? SHMZ_SETATTR_GID : 0);

        return setattr(c, name, mask, 0, (uint32_t) uid, (uint32_t) gid);
}

_public_ int shmz_daemon_status_sized(struct shmz_client *c, struct shmz_daemon_status *ret, size_t ret_size) {
        struct shmz_daemon_status out;
        struct shmz_msg_status st;
        int r;

        assert_return(c && ret, -EINVAL);
        r = client_request(c, SHMZ_MSG_STATUS, NULL, 0, &st, sizeof(st), NULL);
        if (r < 0)
                return r;
        out = (struct shmz_daemon_status){
                .budget = st.budget,
                .budget_used = st.budget_used,
                .quota = st.quota,
                .zones = st.zones,
                .zones_unlinked = st.zones_unlinked,
                .clients = st.clients,
                .requests = st.requests,
                .errors = st.errors,
                .segments = st.segments,
                .uptime_usec = st.uptime_usec,
                .listeners = st.listeners,
                .ports = st.ports,
                .segment_bytes = st.segment_bytes,
                .chunks = st.chunks,
                .chunks_used = st.chunks_used,
                .messages = st.messages,
                .message_bytes = st.message_bytes,
                .ports_closed = st.ports_closed,
                .peers_died = st.peers_died,
        };
        copy_sized(ret, ret_size, &out, sizeof(out));
        return 0;
}

_public_ int shmz_zone_attached(const struct shmz_zone *z) {
        int r;

        if (!z)
                return -EINVAL;
        if (!z->client)
                return 0;
        r = __atomic_load_n(&z->reattach_error, __ATOMIC_RELAXED);
        return r < 0 ? r : 1;
}
