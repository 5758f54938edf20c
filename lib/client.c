/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <assert.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "client.h"
#include "proto.h"
#include "shmzone.h"
#include "util.h"
#include "zone.h"

struct shmz_client {
        atomic_uint refs;     /* the caller's, plus one per open zone */
        pthread_mutex_t lock; /* one request at a time on the socket */
        int fd;
        uint32_t next_stream;
        int daemon_pid;
        uint32_t hello_stream; /* not 0: the hello was sent, its reply is still to be read */
        bool dead;             /* the daemon said it stops, or the socket broke */
        char *path;            /* the socket, for the dedicated connections of port listeners */
};

struct shmz_client *client_ref(struct shmz_client *c) {
        atomic_fetch_add(&c->refs, 1);
        return c;
}

bool client_is_last_ref(struct shmz_client *c) {
        return atomic_load(&c->refs) == 1;
}

void client_unref(struct shmz_client *c) {
        if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
                return;
        safe_close(c->fd);
        (void) pthread_mutex_destroy(&c->lock);
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

int client_request_fds(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, void *ret_reply,
                       size_t reply_size, int *ret_fds, size_t n_fds) {
        uint8_t buf[SHMZ_MSG_MAX];
        struct shmz_msg_header h;
        int fds[2] = { -EBADF, -EBADF };
        uint32_t stream;
        size_t size, got = 0;
        int r;

        assert(n_fds <= ELEMENTSOF(fds));
        pthread_mutex_lock(&c->lock);
        r = send_request(c, type, body, body_size, &stream);
        if (r >= 0)
                r = finish_hello(c);
        if (r >= 0)
                r = recv_reply(c, type, stream, buf, &size, fds, n_fds, &got);
        pthread_mutex_unlock(&c->lock);
        if (r < 0)
                return r;

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
        uint32_t stream;
        int r;

        pthread_mutex_lock(&c->lock);
        r = send_request(c, type, body, body_size, &stream);
        pthread_mutex_unlock(&c->lock);
        return r;
}

int client_request_run(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, size_t reply_size,
                       int (*cb)(const void *reply, void *userdata), void *userdata) {
        uint8_t buf[SHMZ_MSG_MAX];
        uint32_t stream;
        int r, cb_r = 0;

        pthread_mutex_lock(&c->lock);
        r = send_request(c, type, body, body_size, &stream);
        if (r >= 0)
                r = finish_hello(c);
        while (r >= 0) {
                struct shmz_msg_header h;
                size_t size;

                r = recv_reply(c, type, stream, buf, &size, NULL, 0, &(size_t){ 0 });
                if (r < 0)
                        break;
                memcpy(&h, buf, sizeof(h));
                if (h.status < 0) {
                        r = h.status;
                        break;
                }
                if (size - sizeof(h) == reply_size && cb_r >= 0)
                        /* After cb asked to stop, the rest of the run is still read, to stay in step. */
                        cb_r = cb(proto_body(buf), userdata);
                else if (size - sizeof(h) != 0 || !(h.flags & SHMZ_MSG_F_LAST)) {
                        if (size - sizeof(h) != reply_size) {
                                c->dead = true;
                                r = -EPROTO;
                                break;
                        }
                }
                if (h.flags & SHMZ_MSG_F_LAST)
                        break;
        }
        pthread_mutex_unlock(&c->lock);
        return r < 0 ? r : cb_r < 0 ? cb_r : 0;
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
