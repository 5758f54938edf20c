/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The control protocol's framing, shared by the library and the daemon. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

/*
 * Sends one message; pass_fd >= 0 travels as SCM_RIGHTS. Never raises SIGPIPE.
 * -EAGAIN when a non-blocking socket is full.
 */
int proto_send(int fd, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
               size_t body_size, int pass_fd);

/*
 * Receives one message into buf (at least SHMZ_MSG_MAX bytes) and checks its
 * framing: size as announced, known flags. ret_fd NULL: any fd that came along
 * is closed and the message refused (-EBADMSG). -ECONNRESET on end of stream,
 * -EMSGSIZE for a message larger than SHMZ_MSG_MAX (consumed and dropped).
 */
int proto_recv(int fd, void *buf, size_t buf_size, size_t *ret_size, int *ret_fd);

/* Expected body size of a request (or reply) of this type; -EBADMSG if the type is unknown. */
ssize_t proto_body_size(uint16_t type, bool reply);

/* A message's body, after proto_recv() succeeded. */
static inline const void *proto_body(const void *buf) {
        return (const uint8_t *) buf + sizeof(struct shmz_msg_header);
}
