/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The wire written by hand, for the tests and fuzzers that play a (hostile)
 * peer on a bare socket: memfds, a port's channel as the daemon makes it,
 * datagrams with fds.
 */

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

/* A memfd of size bytes, sealed as the daemon seals its own (seal) or not sealed at all: the fd or -errno. */
int wire_memfd(size_t size, bool seal);
/* The channel as the daemon makes it (both receivers start as pollers), sealed: the fd or -errno. */
int wire_channel_new(void);
/* One datagram of the n_iov buffers, with n_fds fds (SCM_RIGHTS, at most PROTO_SENDMSG_MAX_FDS): 0 or -errno. */
int wire_send(int sock, const struct iovec *iov, size_t n_iov, const int *fds, size_t n_fds, int flags);
