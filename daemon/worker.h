/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "registry.h"

struct daemon;
struct worker;

/* One attachment a client holds: handle ids are per connection. */
struct attachment {
        uint64_t handle;
        struct zone *zone;
};

struct outmsg;

/* A client connection; owned by exactly one worker thread. */
struct conn {
        struct worker *worker;
        struct daemon *daemon;
        int fd;
        void *source; /* sd_event_source */
        struct caller caller;
        char comm[SHMZ_COMM_BUF]; /* /proc/PID/comm at the first attach (caller.comm then points here) */
        uid_t counted_uid;        /* what clients_add() counted this connection as */
        void *hello_timer;        /* sd_event_source: ends a connection that never says hello */
        gid_t *groups;
        bool hello;
        struct attachment *attachments;
        size_t n_attachments;
        uint64_t next_handle;
        struct outmsg *out_head, *out_tail; /* replies the socket could not take yet */
        struct {
                bool active;   /* a listing is being sent: no request is read until it ends */
                uint16_t type; /* ZONE_LIST, PORT_LIST, SEGMENT_LIST */
                uint32_t stream;
                char after[SHMZ_NAME_BUF]; /* the last name sent */
                unsigned phase;            /* PORT_LIST: 0 listeners (by name), 1 connections (by id) */
                uint64_t after_id;         /* the last id sent */
        } list;
        struct port_listen *port_listener; /* PORT_LISTEN made this connection a listener's (daemon/control-ports.c) */
        bool resuming; /* RESUME: ZONE_REATTACH and PORT_REJOIN may carry their fds until another request */
        size_t out_bytes;
        struct conn *next, *prev;
};

/*
 * Starts a worker thread. It takes new connections from d->listen_fd itself
 * (which must be open, and stay open until worker_stop()).
 */
int worker_start(struct daemon *d, unsigned index, struct worker **ret);
/* Tells the worker's clients that the daemon stops, closes them, joins the thread. */
void worker_stop(struct worker *w);

/* The client said hello: its deadline for that is gone. */
void conn_hello_done(struct conn *c);
/* Queues a reply (or sends it at once); fd, if >= 0, is passed and then closed. */
int conn_send(struct conn *c, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
              size_t body_size, int fd);

/* Answers request req with status; body and fd (passed, then closed) only with a status >= 0. */
int conn_reply(struct conn *c, const struct shmz_msg_header *req, int status, const void *body, size_t size, int fd);

/* The same with up to PROTO_SEND_MAX_FDS fds, all passed and then closed. */
int conn_send_fds(struct conn *c, uint16_t type, uint16_t flags, uint32_t stream, int32_t status, const void *body,
                  size_t body_size, const int *fds, size_t n_fds);

/* control-ports.c: the port requests, the watch on both processes of each port. */
int port_dispatch(struct conn *c, const struct shmz_msg_header *h, const void *body);
/* Sends more of a running PORT_LIST or SEGMENT_LIST. */
int port_list_pump(struct conn *c);
/* c ends: if it is a listener's, the name goes and ports not accepted yet are shut down. */
void port_conn_closed(struct conn *c);
/* w stops (on its thread): its watches go. */
void port_worker_stop(struct worker *w);

/* control.c: handles one framed message from c. A negative return ends the connection. */
int control_dispatch(struct conn *c, const void *msg, size_t size);
/* Sends more of a running listing, if the client took what was sent. */
int control_list_pump(struct conn *c);
/* Whether msg is a request that may carry these fds while c resumes (ZONE_REATTACH: 1, PORT_REJOIN: 2). */
bool control_takes_fds(const void *msg, size_t size, size_t n_fds);
/* Handles such a request; takes the fds whatever happens (checked, then closed or given to the reaper). */
int control_dispatch_fds(struct conn *c, const void *msg, size_t size, int *fds, size_t n_fds);
/* Closes an fd a client passed as a proof: at once if sealed shared memory, else in the reaper. */
void control_close_proof(struct conn *c, int fd);
/* ports.c: PORT_REJOIN (fds: [socket end, channel], taken). */
int port_rejoin(struct conn *c, const struct shmz_msg_header *h, const void *body, int *fds);
/* Drops every attachment c holds (the connection ends). */
void control_release(struct conn *c);
