/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The control protocol's framing, shared by the library and the daemon. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "shmzone-abi.h"

/*
 * Sends one message; pass_fd >= 0 travels as SCM_RIGHTS. Never raises SIGPIPE.
 * -EAGAIN when a non-blocking socket is full.
 */
int proto_send(int fd, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
               size_t body_size, int pass_fd);

/* The most fds one message of ours carries (a port's socket end and its channel). */
#define PROTO_SEND_MAX_FDS 2
/* The same with n_fds (at most PROTO_SEND_MAX_FDS) fds; none of them is closed. */
int proto_send_fds(int fd, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
                   size_t body_size, const int *fds, size_t n_fds);

/* The most fds one proto_sendmsg() passes (a test's peer sends a few more than we ever do). */
#define PROTO_SENDMSG_MAX_FDS 4
/*
 * One sendmsg() of the n_iov buffers with n_fds fds as SCM_RIGHTS, never
 * raising SIGPIPE: the bytes sent or -errno (-EINTR too: the caller decides).
 */
ssize_t proto_sendmsg(int sock, const struct iovec *iov, size_t n_iov, const int *fds, size_t n_fds, int flags);

/* The most fds the kernel passes with one message (SCM_MAX_FD). */
#define PROTO_MAX_FDS 253

/*
 * Receives one message into buf (at least SHMZ_MSG_MAX bytes) and checks its
 * framing: size as announced, known flags. Every fd that came along is stored
 * in ret_fds, *ret_n_fds of them, and belongs to the caller whatever the
 * result (closing one may block: a lingering socket, a stalled filesystem).
 * -ECONNRESET on end of stream, -EMSGSIZE for a message larger than buf_size
 * (consumed and dropped), -EBADMSG for broken framing.
 */
int proto_recv(int fd, void *buf, size_t buf_size, size_t *ret_size, int ret_fds[static PROTO_MAX_FDS],
               size_t *ret_n_fds);

/* Expected body size of a request (or reply) of this type; -EBADMSG if the type is unknown. */
ssize_t proto_body_size(uint16_t type, bool reply);

/* A message's body, after proto_recv() succeeded. */
static inline const void *proto_body(const void *buf) {
        return (const uint8_t *) buf + sizeof(struct shmz_msg_header);
}
