/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shmzone.h"

/*
 * One request, one reply. The reply body must be exactly reply_size bytes
 * (or, on error, empty). With ret_fd, a passed fd is returned (else -EBADF);
 * fds not asked for are closed. Returns the reply's status.
 */
int client_request(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, void *ret_reply,
                   size_t reply_size, int *ret_fd);

/* The same, with up to 2 passed fds in ret_fds (-EBADF where none came). */
int client_request_fds(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, void *ret_reply,
                       size_t reply_size, int *ret_fds, size_t n_fds);

/* A one-way message (ZONE_CLOSE): no reply comes. */
int client_send_oneway(struct shmz_client *c, uint16_t type, const void *body, size_t body_size);

/* One request, a run of replies: cb is called with each body until the one flagged LAST. */
int client_request_run(struct shmz_client *c, uint16_t type, const void *body, size_t body_size, size_t reply_size,
                       int (*cb)(const void *reply, void *userdata), void *userdata);

/* The control connection's fd and the socket path it was made to. */
int client_fd(const struct shmz_client *c);
const char *client_path(const struct shmz_client *c);

struct shmz_client *client_ref(struct shmz_client *c);
void client_unref(struct shmz_client *c);
/* Whether the caller's reference is the only one left (then no other thread can take one). */
bool client_is_last_ref(struct shmz_client *c);
