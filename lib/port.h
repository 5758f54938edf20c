/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internals of ports (port.c): not installed, not exported; tests build ports from their own socketpairs. */

#include <stdint.h>
#include <sys/types.h>

#include "shmzone.h"

/* What the daemon told one side about its port (shmz_msg_port_peer, checked). */
struct port_params {
        uint64_t port_id;
        uint64_t token;
        uint32_t side; /* SHMZ_PORT_SIDE_* of this end */
        pid_t peer_pid;
        uid_t peer_uid;
        gid_t peer_gid;
        uint32_t chunk_size;     /* a power of two, >= 4096 */
        uint32_t segment_chunks; /* 1..SHMZ_SEGMENT_MAX_CHUNKS */
        uint64_t port_memory;    /* segment bytes one direction may hold */
};

/*
 * Where a sender's new segments come from: a read-write fd of a sealed memfd
 * of SHMZ_SEGMENT_HEADER_SIZE + segment_chunks * chunk_size bytes, and its id.
 * -ENOSPC when the direction holds port_memory already. Real ports ask the
 * daemon (SEGMENT_CREATE); unit tests make memfds.
 */
typedef int (*port_segment_source_t)(struct shmz_port *p, void *userdata, int *ret_fd, uint64_t *ret_id);

/*
 * A port from a SOCK_SEQPACKET end and a channel memfd. Takes both fds
 * whatever the result. client may be NULL when source is given; with source
 * NULL, segments come from SEGMENT_CREATE on client.
 */
int port_new(int sock_fd, int channel_fd, const struct port_params *pp, struct shmz_client *client,
             port_segment_source_t source, void *userdata, struct shmz_port **ret);

/*
 * Tests: writes d as given (a lying n_slots included) and n payload bytes at
 * our ring's head, publishes head + advance (0: d->n_slots) and wakes the
 * peer, as a peer that skips the library would.
 */
int port_raw_publish(struct shmz_port *p, const struct shmz_desc *d, const void *payload, size_t n, uint32_t advance);

/* The channel as this process maps it (tests: a forked third process scribbles on it). */
struct shmz_channel *port_channel(const struct shmz_port *p);

/* The port's socket (shmz_port_fd() is an epoll fd over it): tests shut it down. */
int port_socket_fd(const struct shmz_port *p);

/* Checks pp (from the daemon): sizes, powers of two, overflow. */
int port_params_check(const struct port_params *pp);

/* Segment slots per direction: port_memory / (segment_chunks * chunk_size), at least 1. */
uint32_t port_max_slots(const struct shmz_port *p);
/* Chunks this side has claimed in its own segments, and chunks it holds of the peer's (received, unreleased). */
uint64_t port_tx_chunks_used(const struct shmz_port *p);
uint64_t port_rx_chunks_held(const struct shmz_port *p);

/* The listener's connection to the daemon (shmz_listener_fd() is an epoll fd over it): tests set its buffers. */
int listener_socket_fd(const struct shmz_listener *l);
/* The channel's fd a port keeps to prove itself after a daemon restart (-EBADF without a client): tests. */
int port_channel_fd(const struct shmz_port *p);
