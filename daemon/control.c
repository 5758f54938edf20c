/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clients.h"
#include "daemon.h"
#include "log.h"
#include "ports.h"
#include "proto.h"
#include "reaper.h"
#include "registry.h"
#include "shmzone.h"
#include "worker.h"

/* One client cannot pin an unbounded number of attachments. */
#define MAX_ATTACHMENTS_PER_CLIENT 65536u

/* The handlers' short name for conn_reply(). */
#define reply conn_reply

/*
 * The caller's process name, read once, at its first attach: shown among the
 * zone's holders (informational, as in ps: the process sets it itself). An
 * unreadable one (hidden /proc, a pid from another namespace) stays empty.
 */
static const struct caller *attach_caller(struct conn *c) {
        if (!c->caller.comm && c->caller.pid > 0) {
                char path[32];
                int fd;

                (void) snprintf(path, sizeof(path), "/proc/%d/comm", (int) c->caller.pid);
                fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
                if (fd >= 0) {
                        ssize_t n = read(fd, c->comm, sizeof(c->comm) - 1);

                        c->comm[MAX(n, (ssize_t) 0)] = 0;
                        c->comm[strcspn(c->comm, "\n")] = 0;
                        safe_close(fd);
                }
        }
        c->caller.comm = c->comm;
        return &c->caller;
}

static int add_attachment(struct conn *c, struct zone *z, uint64_t *ret_handle) {
        struct attachment *a;

        a = realloc(c->attachments, (c->n_attachments + 1) * sizeof(*a));
        if (!a)
                return -ENOMEM;
        c->attachments = a;
        a[c->n_attachments++] = (struct attachment){ .handle = c->next_handle, .zone = z };
        *ret_handle = c->next_handle++;
        return 0;
}

/* Common tail of OPEN and OPEN_TICKET: record the attachment and pass the fd. */
static int reply_attached(struct conn *c, const struct shmz_msg_header *h, struct zone *z, int fd,
                          struct shmz_msg_zone_info *out, bool existed, bool rdonly) {
        int r;

        r = add_attachment(c, z, &out->handle);
        if (r < 0) {
                registry_detach(c->daemon->registry, z, &c->caller);
                safe_close(fd);
                return reply(c, h, r, NULL, 0, -EBADF);
        }
        out->flags |= (existed ? SHMZ_ZONE_INFO_EXISTED : 0) | (rdonly ? SHMZ_ZONE_INFO_RDONLY : 0);
        return reply(c, h, 0, out, sizeof(*out), fd);
}

static int do_open(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_open *m) {
        struct shmz_msg_zone_info info;
        struct zone *z;
        bool existed;
        int fd, r;

        if (!buf_is_cstr(m->name, sizeof(m->name)) || !buf_is_cstr(m->tag, sizeof(m->tag)) || m->reserved != 0)
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        if (c->n_attachments >= MAX_ATTACHMENTS_PER_CLIENT)
                return reply(c, h, -EMFILE, NULL, 0, -EBADF);
        r = registry_open(c->daemon->registry, attach_caller(c), m->name, m->size, m->tag, m->flags, &z, &fd, &info,
                          &existed);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply_attached(c, h, z, fd, &info, existed, m->flags & SHMZ_RDONLY);
}

static int do_ticket(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_ticket *m) {
        struct shmz_msg_zone_info info;
        struct zone *z;
        bool existed;
        int fd, r;

        if ((m->flags & ~(uint32_t) SHMZ_RDONLY) || m->reserved != 0)
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        if (c->n_attachments >= MAX_ATTACHMENTS_PER_CLIENT)
                return reply(c, h, -EMFILE, NULL, 0, -EBADF);
        r = registry_ticket_redeem(c->daemon->registry, attach_caller(c), m->ticket, !(m->flags & SHMZ_RDONLY), &z, &fd,
                                   &info, &existed);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply_attached(c, h, z, fd, &info, existed, m->flags & SHMZ_RDONLY);
}

/* ZONE_CLOSE is one-way: detaching never waits for the daemon. */
static int do_close(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_close *m) {
        for (size_t i = 0; i < c->n_attachments; i++)
                if (c->attachments[i].handle == m->handle) {
                        registry_detach(c->daemon->registry, c->attachments[i].zone, &c->caller);
                        c->attachments[i] = c->attachments[--c->n_attachments];
                        return 0;
                }
        atomic_fetch_add(&c->daemon->errors, 1);
        log_debug("Client pid %d: ZONE_CLOSE of handle %" PRIu64 ", which it does not hold: ignored.",
                  (int) c->caller.pid, (uint64_t) m->handle);
        return 0;
}

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83 /* Linux 6.16 */
#endif

/* RESUME opens the connection to fds (the proofs of ZONE_REATTACH, PORT_REJOIN); any other request shuts it. */
static void set_resuming(struct conn *c, bool on) {
        int v = on;

        if (c->resuming == on)
                return;
        c->resuming = on;
        if (secure_getenv("SHMZONE_TEST_ACCEPT_FDS"))
                return;
        if (setsockopt(c->fd, SOL_SOCKET, SO_PASSRIGHTS, &v, sizeof(v)) < 0 && errno != ENOPROTOOPT)
                log_debug_errno(errno, "SO_PASSRIGHTS: %m");
}

void control_close_proof(struct conn *c, int fd) {
        if (fd < 0)
                return;
        /* Sealed shared memory (F_GET_SEALS looks at nothing else) closes at once; anything else may block. */
        if (fcntl(fd, F_GET_SEALS) >= 0 || !reaper_take(fd, c->caller.uid))
                safe_close(fd);
}

static int do_resume(struct conn *c, const struct shmz_msg_header *h) {
        if (c->port_listener)
                return reply(c, h, -EISCONN, NULL, 0, -EBADF);
        set_resuming(c, true);
        return reply(c, h, 0, NULL, 0, -EBADF);
}

/*
 * A zone mapped before a restart, counted again. The fd is only a proof: it
 * must be a sealed memfd whose inode is the zone of that name (not a memfd of
 * the caller's, not another zone's), open for at least the access asked, and
 * the current mode must grant that access (registry_reattach()).
 */
static int do_reattach(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_reattach *m,
                       int fd) {
        struct shmz_msg_zone_info info = {};
        bool rdonly = m->flags & SHMZ_RDONLY;
        struct zone *z = NULL;
        struct stat st;
        int seals, fl, r;

        if (!buf_is_cstr(m->name, sizeof(m->name)) || (m->flags & ~(uint32_t) SHMZ_RDONLY) || m->reserved != 0)
                r = -EINVAL;
        else if (c->n_attachments >= MAX_ATTACHMENTS_PER_CLIENT)
                r = -EMFILE;
        else if ((seals = fcntl(fd, F_GET_SEALS)) < 0 || seals != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
                r = -EBADF; /* not a zone's memfd; nothing else was touched (fstat could wait on a FUSE server) */
        else if (fstat(fd, &st) < 0 || (fl = fcntl(fd, F_GETFL)) < 0)
                r = -errno;
        else if (!rdonly && (fl & O_ACCMODE) != O_RDWR)
                r = -EACCES; /* a reader's fd does not make a writer */
        else
                r = registry_reattach(c->daemon->registry, attach_caller(c), m->name, st.st_dev, st.st_ino, rdonly, &z,
                                      &info);
        control_close_proof(c, fd);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply_attached(c, h, z, -EBADF, &info, true, rdonly);
}

bool control_takes_fds(const void *msg, size_t size, size_t n_fds) {
        struct shmz_msg_header h;

        if (size < sizeof(h))
                return false;
        memcpy(&h, msg, sizeof(h));
        if (h.flags & SHMZ_MSG_F_REPLY)
                return false;
        return (h.type == SHMZ_MSG_ZONE_REATTACH && n_fds == 1) || (h.type == SHMZ_MSG_PORT_REJOIN && n_fds == 2);
}

int control_dispatch_fds(struct conn *c, const void *msg, size_t size, int *fds, size_t n_fds) {
        struct shmz_msg_header h;

        memcpy(&h, msg, sizeof(h));
        if (!c->hello || c->port_listener || (size_t) proto_body_size(h.type, false) != size - sizeof(h)) {
                for (size_t i = 0; i < n_fds; i++)
                        control_close_proof(c, fds[i]);
                return reply(c, &h, !c->hello ? -EPROTO : c->port_listener ? -EISCONN : -EBADMSG, NULL, 0, -EBADF);
        }
        if (h.type == SHMZ_MSG_ZONE_REATTACH)
                return do_reattach(c, &h, proto_body(msg), fds[0]);
        return port_rejoin(c, &h, proto_body(msg), fds);
}

static int do_info(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_name *m) {
        struct shmz_msg_zone_info info;
        int r;

        if (!buf_is_cstr(m->name, sizeof(m->name)))
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        r = registry_info(c->daemon->registry, m->name, &info);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply(c, h, 0, &info, sizeof(info), -EBADF);
}

/* Who may read the zone may see who holds it (as the view's xattr: the kernel checks read permission). */
static int do_holders(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_holders_req *m) {
        struct shmz_msg_zone_holders out;
        int r;

        if (!buf_is_cstr(m->name, sizeof(m->name)) || m->reserved != 0)
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        r = registry_holders(c->daemon->registry, &c->caller, m->name, 0, m->after_pid, &out);
        if (r < 0)
                return reply(c, h, r, NULL, 0, -EBADF);
        return reply(c, h, 0, &out, sizeof(out), -EBADF);
}

/* Zones per registry call while a listing runs. */
#define LIST_PAGE 32

/*
 * A listing is sent a page at a time, and only while the client reads: the
 * next page is made when the last one left (the worker calls this again once
 * the socket drained). So what a client that never reads costs us is one
 * page, however many zones there are.
 */
int control_list_pump(struct conn *c) {
        if (c->list.active && c->list.type != SHMZ_MSG_ZONE_LIST)
                return port_list_pump(c);
        while (c->list.active && !c->out_head) {
                struct shmz_msg_zone_info v[LIST_PAGE];
                size_t n;
                int r;

                r = registry_list_page(c->daemon->registry, c->list.after, v, LIST_PAGE, &n);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < n; i++) {
                        r = conn_send(c, SHMZ_MSG_ZONE_LIST, SHMZ_MSG_F_REPLY, c->list.stream, 0, &v[i], sizeof(v[i]),
                                      -EBADF);
                        if (r < 0)
                                return r;
                }
                if (n > 0)
                        strncpy_buf(c->list.after, sizeof(c->list.after), v[n - 1].name);
                if (n < LIST_PAGE) {
                        c->list.active = false;
                        return conn_send(c, SHMZ_MSG_ZONE_LIST, SHMZ_MSG_F_REPLY | SHMZ_MSG_F_LAST, c->list.stream, 0,
                                         NULL, 0, -EBADF);
                }
        }
        return 0;
}

static int do_list(struct conn *c, const struct shmz_msg_header *h) {
        c->list.active = true;
        c->list.type = SHMZ_MSG_ZONE_LIST;
        c->list.stream = h->stream;
        c->list.after[0] = 0;
        return control_list_pump(c);
}

static int do_unlink(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_name *m) {
        if (!buf_is_cstr(m->name, sizeof(m->name)))
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        return reply(c, h, registry_unlink(c->daemon->registry, &c->caller, m->name), NULL, 0, -EBADF);
}

static int do_setattr(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_zone_setattr *m) {
        if (!buf_is_cstr(m->name, sizeof(m->name)))
                return reply(c, h, -EINVAL, NULL, 0, -EBADF);
        return reply(c, h,
                     registry_setattr(c->daemon->registry, &c->caller, m->name, 0, m->mask, m->mode, m->uid, m->gid),
                     NULL, 0, -EBADF);
}

static int do_status(struct conn *c, const struct shmz_msg_header *h) {
        struct registry_stats st;
        struct ports_stats ps = {};
        struct shmz_msg_status out;

        registry_get_stats(c->daemon->registry, &st);
        if (c->daemon->ports)
                ports_get_stats(c->daemon->ports, &ps);
        out = (struct shmz_msg_status){
                .budget = st.budget,
                .budget_used = st.budget_used,
                .quota = st.quota,
                .zones = st.zones,
                .zones_unlinked = st.zones_unlinked,
                .clients = clients_count(c->daemon->clients),
                .requests = atomic_load(&c->daemon->requests),
                .errors = atomic_load(&c->daemon->errors),
                .segments = ps.segments,
                .uptime_usec = now_usec(CLOCK_MONOTONIC) - c->daemon->start_usec,
                .listeners = ps.listeners,
                .ports = ps.ports,
                .segment_bytes = ps.segment_bytes,
                .chunks = ps.chunks,
                .chunks_used = ps.chunks_used,
                .messages = ps.messages,
                .message_bytes = ps.message_bytes,
                .ports_closed = ps.ports_closed,
                .peers_died = ps.peers_died,
        };
        return reply(c, h, 0, &out, sizeof(out), -EBADF);
}

/*
 * A reload its caller waits for, with the errors in the reply (systemctl
 * reload runs shmzctl reload). Runs on this worker: its other connections
 * wait the few milliseconds it takes.
 */
static int do_reload(struct conn *c, const struct shmz_msg_header *h) {
        _cleanup_free_ char *errors = NULL;
        struct shmz_msg_reload_reply out = {};
        int refused, r;

        if (c->caller.uid != 0)
                return reply(c, h, -EPERM, NULL, 0, -EBADF);
        if (!c->daemon->reload)
                return reply(c, h, -EOPNOTSUPP, NULL, 0, -EBADF);
        r = c->daemon->reload(c->daemon, &errors, &refused);
        out.result = r;
        out.refused = (uint32_t) MAX(refused, 0);
        if (errors) {
                size_t n = strlen(errors);

                /* Whole lines only, so that a cut never leaves half a message. */
                if (n >= sizeof(out.errors)) {
                        n = sizeof(out.errors) - 1;
                        while (n > 0 && errors[n - 1] != '\n')
                                n--;
                }
                memcpy(out.errors, errors, n);
        }
        return reply(c, h, 0, &out, sizeof(out), -EBADF);
}

static int do_hello(struct conn *c, const struct shmz_msg_header *h, const struct shmz_msg_hello *m) {
        struct registry_stats st;
        struct shmz_msg_hello_reply out;

        if (m->version_min > SHMZ_PROTO_VERSION || m->version_max < SHMZ_PROTO_VERSION ||
            m->version_min > m->version_max) {
                (void) reply(c, h, -EPROTONOSUPPORT, NULL, 0, -EBADF);
                return -EPROTONOSUPPORT;
        }
        registry_get_stats(c->daemon->registry, &st);
        out = (struct shmz_msg_hello_reply){
                .version = SHMZ_PROTO_VERSION,
                .pid = (uint32_t) getpid(),
                .budget = st.budget,
                .quota = st.quota,
        };
        conn_hello_done(c);
        return reply(c, h, 0, &out, sizeof(out), -EBADF);
}

int control_dispatch(struct conn *c, const void *msg, size_t size) {
        struct shmz_msg_header h;
        const void *body = proto_body(msg);
        ssize_t want;

        memcpy(&h, msg, sizeof(h));
        if (h.flags & SHMZ_MSG_F_REPLY)
                return reply(c, &h, -EBADMSG, NULL, 0, -EBADF);
        want = proto_body_size(h.type, false);
        if (want < 0 || h.type == SHMZ_MSG_NOTICE_SHUTDOWN || h.type == SHMZ_MSG_NOTICE_PORT)
                return reply(c, &h, -EOPNOTSUPP, NULL, 0, -EBADF);
        if ((size_t) want != size - sizeof(h))
                return reply(c, &h, -EBADMSG, NULL, 0, -EBADF);
        if (!c->hello && h.type != SHMZ_MSG_HELLO)
                return reply(c, &h, -EPROTO, NULL, 0, -EBADF);
        /* Without its fds, a re-attachment proves nothing; any other request ends the RESUME. */
        if (h.type == SHMZ_MSG_ZONE_REATTACH || h.type == SHMZ_MSG_PORT_REJOIN)
                return reply(c, &h, c->resuming ? -EBADF : -EPROTO, NULL, 0, -EBADF);
        if (h.type != SHMZ_MSG_RESUME)
                set_resuming(c, false);
        /* A listener's connection carries notices and PORT_ACCEPTED only. */
        if (c->port_listener && h.type != SHMZ_MSG_PORT_ACCEPTED)
                return reply(c, &h, -EISCONN, NULL, 0, -EBADF);

        switch (h.type) {
        case SHMZ_MSG_HELLO:
                return do_hello(c, &h, body);
        case SHMZ_MSG_ZONE_OPEN:
                return do_open(c, &h, body);
        case SHMZ_MSG_ZONE_CLOSE:
                return do_close(c, &h, body);
        case SHMZ_MSG_ZONE_UNLINK:
                return do_unlink(c, &h, body);
        case SHMZ_MSG_ZONE_INFO:
                return do_info(c, &h, body);
        case SHMZ_MSG_ZONE_LIST:
                return do_list(c, &h);
        case SHMZ_MSG_ZONE_SETATTR:
                return do_setattr(c, &h, body);
        case SHMZ_MSG_ZONE_OPEN_TICKET:
                return do_ticket(c, &h, body);
        case SHMZ_MSG_STATUS:
                return do_status(c, &h);
        case SHMZ_MSG_RELOAD:
                return do_reload(c, &h);
        case SHMZ_MSG_RESUME:
                return do_resume(c, &h);
        case SHMZ_MSG_ZONE_HOLDERS:
                return do_holders(c, &h, body);
        case SHMZ_MSG_PORT_LISTEN:
        case SHMZ_MSG_PORT_CONNECT:
        case SHMZ_MSG_PORT_ACCEPTED:
        case SHMZ_MSG_SEGMENT_CREATE:
        case SHMZ_MSG_PORT_LIST:
        case SHMZ_MSG_SEGMENT_LIST:
                return port_dispatch(c, &h, body);
        default:
                return reply(c, &h, -EOPNOTSUPP, NULL, 0, -EBADF);
        }
}

void control_release(struct conn *c) {
        for (size_t i = 0; i < c->n_attachments; i++)
                registry_detach(c->daemon->registry, c->attachments[i].zone, &c->caller);
        free(c->attachments);
        c->attachments = NULL;
        c->n_attachments = 0;
}
