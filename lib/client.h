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

/*
 * Coming back after a daemon restart. Zones and ports that came through a
 * client are linked to it (a client_link in each), so that the client's
 * revive can prove them to the new daemon on the new connection.
 */
enum {
        CLIENT_LINK_ZONE = 1,
        CLIENT_LINK_PORT = 2,
};

struct client_link {
        struct client_link *next, *prev;
        unsigned kind;
};

/* Links l (kind CLIENT_LINK_*) to c and has c watched by the revive thread. */
void client_link_add(struct shmz_client *c, struct client_link *l, unsigned kind);
/* Unlinks l; once this returns no revive uses it. */
void client_link_del(struct shmz_client *c, struct client_link *l);
/* The lock of c's links (a revive holds it while it proves them): zone and port state it guards. */
void client_links_lock(struct shmz_client *c);
void client_links_unlock(struct shmz_client *c);

/* port.c: PORT_REJOIN of the port linked by l, on the revive's connection fd. */
int port_link_rejoin(struct client_link *l, int fd, uint32_t *stream);

/*
 * A client whose connection is not a plain one (a listener's) says how it
 * comes back: resume() runs on the new connection fd after its hello, with
 * no lock held (stream: the last stream used on it; -ECANCELED: never come
 * back), install() with c's lock held once fd replaced old. ops NULL: the
 * owner goes, no revive any more (waits for one under way).
 */
struct client_revive_ops {
        int (*resume)(struct shmz_client *c, int fd, uint32_t *stream, void *data);
        void (*install)(struct shmz_client *c, int old_fd, int new_fd, void *data);
};
void client_set_revive_ops(struct shmz_client *c, const struct client_revive_ops *ops, void *data);
/* Has the revive thread watch c's connection (started on first use). */
void client_watch(struct shmz_client *c);
/* Times c's connection was made again (tests). */
unsigned client_revivals(struct shmz_client *c);

/* One request and its reply on a connection a revive is making (receive timeout set; no fd back). */
int client_raw_call(int fd, uint32_t *stream, uint16_t type, const void *body, size_t body_size, const int *fds,
                    size_t n_fds, void *ret_reply, size_t reply_size);
