/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <stddef.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "proto.h"
#include "util.h"

/* The layouts are ABI: pin their sizes and the offsets other code relies on. */
_Static_assert(sizeof(struct shmz_mutex) == SHMZ_MUTEX_SIZE, "shmz_mutex size");
_Static_assert(offsetof(struct shmz_mutex, reserved) == 32, "robust list entry offset (glibc futex_offset -32)");
_Static_assert(sizeof(struct shmz_zone_header) == SHMZ_ZONE_HEADER_SIZE, "zone header size");
_Static_assert(offsetof(struct shmz_zone_header, lock) == 512, "zone lock offset");
_Static_assert(offsetof(struct shmz_zone_header, alloc) == 1024, "allocator state offset");
_Static_assert(sizeof(struct shmz_msg_header) == 16, "message header size");
_Static_assert(sizeof(struct shmz_msg_zone_open) == 16 + SHMZ_NAME_BUF + SHMZ_TAG_BUF, "open size");
_Static_assert(sizeof(struct shmz_msg_zone_info) == 88 + SHMZ_NAME_BUF + SHMZ_TAG_BUF, "info size");
_Static_assert(sizeof(struct shmz_msg_zone_info) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");
_Static_assert(sizeof(struct shmz_msg_reload_reply) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");
_Static_assert(sizeof(struct shmz_segment_header) == SHMZ_SEGMENT_HEADER_SIZE, "segment header size");
_Static_assert(offsetof(struct shmz_segment_header, used) == 128, "segment bitmap offset");
_Static_assert(sizeof(struct shmz_channel_dir) == 192, "channel direction size");
_Static_assert(offsetof(struct shmz_channel_dir, tail) == 64, "receiver's line");
_Static_assert(offsetof(struct shmz_channel_dir, rx_sleep) == 128, "wake-up line");
_Static_assert(sizeof(struct shmz_channel) <= SHMZ_CHANNEL_HEADER_SIZE, "channel fits its header page");
_Static_assert(sizeof(struct shmz_desc) == 32, "descriptor header size");
_Static_assert((SHMZ_RING_SLOTS & (SHMZ_RING_SLOTS - 1)) == 0, "ring slots: a power of two");
_Static_assert(sizeof(struct shmz_frame) == 32, "frame header size");
_Static_assert(sizeof(struct shmz_msg_port_info) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");
_Static_assert(sizeof(struct shmz_msg_port_peer) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");
_Static_assert(sizeof(struct shmz_msg_segment_info) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");
_Static_assert(sizeof(struct shmz_msg_status) + sizeof(struct shmz_msg_header) <= SHMZ_MSG_MAX, "fits");

int proto_send_fds(int fd, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
                   size_t body_size, const int *fds, size_t n_fds) {
        struct shmz_msg_header h = {
                .size = (uint32_t) (sizeof(h) + body_size),
                .type = type,
                .flags = flags,
                .stream = stream,
                .status = status,
        };
        struct iovec iov[2] = {
                { .iov_base = &h, .iov_len = sizeof(h) },
                { .iov_base = (void *) body, .iov_len = body_size },
        };
        ssize_t n;

        if (sizeof(h) + body_size > SHMZ_MSG_MAX || n_fds > PROTO_SEND_MAX_FDS)
                return -EMSGSIZE;
        do
                n = proto_sendmsg(fd, iov, body_size > 0 ? 2 : 1, fds, n_fds, 0);
        while (n == -EINTR);
        if (n < 0)
                return (int) n;
        return n == (ssize_t) h.size ? 0 : -EIO;
}

ssize_t proto_sendmsg(int sock, const struct iovec *iov, size_t n_iov, const int *fds, size_t n_fds, int flags) {
        union {
                struct cmsghdr cmsg;
                uint8_t buf[CMSG_SPACE(sizeof(int) * PROTO_SENDMSG_MAX_FDS)];
        } control = {};
        struct msghdr mh = { .msg_iov = (struct iovec *) iov, .msg_iovlen = n_iov };
        ssize_t n;

        if (n_fds > PROTO_SENDMSG_MAX_FDS)
                return -EINVAL;
        if (n_fds > 0) {
                struct cmsghdr *c;

                mh.msg_control = &control;
                mh.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
                c = CMSG_FIRSTHDR(&mh);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
                memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
        }
        n = sendmsg(sock, &mh, flags | MSG_NOSIGNAL);
        return n < 0 ? -errno : n;
}

int proto_send(int fd, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
               size_t body_size, int pass_fd) {
        return proto_send_fds(fd, type, flags, stream, status, body, body_size, &pass_fd, pass_fd >= 0 ? 1 : 0);
}

int proto_recv(int fd, void *buf, size_t buf_size, size_t *ret_size, int ret_fds[static PROTO_MAX_FDS],
               size_t *ret_n_fds) {
        /* Room for all the kernel passes in one message: none is left for it to drop (and close) here. */
        union {
                struct cmsghdr cmsg;
                uint8_t buf[CMSG_SPACE(sizeof(int) * PROTO_MAX_FDS)];
        } control;
        struct iovec iov = { .iov_base = buf, .iov_len = buf_size };
        struct msghdr mh = {
                .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control)
        };
        struct shmz_msg_header h;
        size_t n_fds = 0;
        ssize_t n;

        *ret_n_fds = 0;
        do
                n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return -errno;

        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                size_t k;

                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k && n_fds < PROTO_MAX_FDS; i++)
                        memcpy(&ret_fds[n_fds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
        *ret_n_fds = n_fds;
        if (n == 0)
                return -ECONNRESET;
        if (mh.msg_flags & MSG_TRUNC)
                return -EMSGSIZE;
        if ((mh.msg_flags & MSG_CTRUNC) || (size_t) n < sizeof(h))
                return -EBADMSG;
        memcpy(&h, buf, sizeof(h));
        if (h.size != (size_t) n || (h.flags & ~(SHMZ_MSG_F_REPLY | SHMZ_MSG_F_LAST)))
                return -EBADMSG;
        *ret_size = (size_t) n;
        return 0;
}

ssize_t proto_body_size(uint16_t type, bool reply) {
        switch (type) {
        case SHMZ_MSG_HELLO:
                return reply ? sizeof(struct shmz_msg_hello_reply) : sizeof(struct shmz_msg_hello);
        case SHMZ_MSG_ZONE_OPEN:
                return reply ? sizeof(struct shmz_msg_zone_info) : sizeof(struct shmz_msg_zone_open);
        case SHMZ_MSG_ZONE_CLOSE:
                return reply ? 0 : sizeof(struct shmz_msg_zone_close);
        case SHMZ_MSG_ZONE_UNLINK:
                return reply ? 0 : sizeof(struct shmz_msg_zone_name);
        case SHMZ_MSG_ZONE_INFO:
                return reply ? sizeof(struct shmz_msg_zone_info) : sizeof(struct shmz_msg_zone_name);
        case SHMZ_MSG_ZONE_LIST:
                return reply ? sizeof(struct shmz_msg_zone_info) : 0;
        case SHMZ_MSG_ZONE_SETATTR:
                return reply ? 0 : sizeof(struct shmz_msg_zone_setattr);
        case SHMZ_MSG_ZONE_OPEN_TICKET:
                return reply ? sizeof(struct shmz_msg_zone_info) : sizeof(struct shmz_msg_zone_ticket);
        case SHMZ_MSG_STATUS:
                return reply ? sizeof(struct shmz_msg_status) : 0;
        case SHMZ_MSG_PORT_LISTEN:
                return reply ? sizeof(struct shmz_msg_port_info) : sizeof(struct shmz_msg_port_listen);
        case SHMZ_MSG_PORT_CONNECT:
                return reply ? sizeof(struct shmz_msg_port_peer) : sizeof(struct shmz_msg_zone_name);
        case SHMZ_MSG_PORT_ACCEPTED:
                return reply ? -EBADMSG : (ssize_t) sizeof(struct shmz_msg_port_ref); /* one-way */
        case SHMZ_MSG_SEGMENT_CREATE:
                return reply ? sizeof(struct shmz_msg_segment_info) : sizeof(struct shmz_msg_port_ref);
        case SHMZ_MSG_PORT_LIST:
                return reply ? sizeof(struct shmz_msg_port_info) : 0;
        case SHMZ_MSG_SEGMENT_LIST:
                return reply ? sizeof(struct shmz_msg_segment_info) : 0;
        case SHMZ_MSG_RELOAD:
                return reply ? sizeof(struct shmz_msg_reload_reply) : 0;
        case SHMZ_MSG_ZONE_REATTACH:
                return reply ? sizeof(struct shmz_msg_zone_info) : sizeof(struct shmz_msg_zone_reattach);
        case SHMZ_MSG_PORT_REJOIN:
                return reply ? sizeof(struct shmz_msg_port_peer) : sizeof(struct shmz_msg_port_rejoin);
        case SHMZ_MSG_RESUME:
                return 0;
        case SHMZ_MSG_ZONE_HOLDERS:
                return reply ? sizeof(struct shmz_msg_zone_holders) : sizeof(struct shmz_msg_zone_holders_req);
        case SHMZ_MSG_NOTICE_SHUTDOWN:
                return reply ? -EBADMSG : 0;
        case SHMZ_MSG_NOTICE_PORT:
                return reply ? -EBADMSG : (ssize_t) sizeof(struct shmz_msg_port_peer);
        default:
                return -EBADMSG;
        }
}
_Static_assert(sizeof(struct shmz_msg_zone_ticket) == 24, "ticket ioctl size");
_Static_assert(offsetof(struct shmz_zone_header, mode) == offsetof(struct shmz_zone_header, uid) + 8,
               "uid, gid, mode are written as one");
