/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The core's port table: published names (listeners), the connections the
 * daemon brokered between two processes (ports), and the segment table. Like
 * the registry it does no socket or FUSE I/O and logs nothing; the control
 * front end (daemon/) makes the socketpairs and watches the processes, the
 * FUSE view shows what is here. One mutex guards listeners and ports; the
 * segment table is an array of pointers that only grows (blocks are added,
 * never moved or freed while the table lives), so a reader finds a segment by
 * id without any lock; a segment's memory stays until its last reference goes.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "registry.h"
#include "shmzone-abi.h"

struct ports;
struct listener;
struct port;
struct segment;

/*
 * Inode numbers of the view's ports/ and segments/ entries, from ranges zones
 * never reach (the registry counts zone inodes up from REGISTRY_FIRST_INO).
 */
#define PORTS_INO_LISTENER_BASE (UINT64_C(1) << 44) /* ports/<name>: + listener serial */
#define PORTS_INO_PORT_BASE (UINT64_C(2) << 44)     /* ports/<name>/<port id>: + port id */
#define PORTS_INO_SEGMENT_BASE (UINT64_C(3) << 44)  /* segments/<id>: + segment id */
#define PORTS_INO_END (UINT64_C(4) << 44)

/* [daemon] keys. */
struct ports_limits {
        uint32_t chunk_size;         /* bytes, a power of two, >= 4096 */
        uint32_t segment_chunks;     /* chunks per segment, <= SHMZ_SEGMENT_MAX_CHUNKS */
        uint64_t port_memory;        /* segment bytes one direction of one port may hold */
        uint32_t max_ports_per_uid;  /* live ports a uid connected and listeners it holds */
        uint32_t backlog;            /* connections a listener may leave unaccepted */
        uint32_t uid_connections;    /* live connections of one uid to one listener (not its owner's, not root's) */
        uint64_t segment_memory;     /* segment bytes (headers included) of all ports together */
        uint64_t uid_segment_memory; /* segment bytes the ports of one uid may send from */
};

struct ports_stats {
        uint64_t listeners, ports, segments, segment_bytes, chunks, chunks_used;
        uint64_t messages, message_bytes; /* since start: ended ports as last seen, live ones as their channels say */
        uint64_t ports_closed, peers_died;
};

/* What the observer is told (view invalidation); ino as above, name the listener's. */
enum ports_event {
        PORTS_LISTENER_ADDED,
        PORTS_LISTENER_REMOVED,
        PORTS_PORT_ADDED,
        PORTS_PORT_REMOVED,
        PORTS_SEGMENT_ADDED,
        PORTS_SEGMENT_REMOVED,
};
typedef void (*ports_observer_t)(void *userdata, enum ports_event ev, const char *name, uint64_t ino);

/*
 * A name the config reserves ([port NAME]): only uid (or root), or a member
 * of gid when mode grants the group write, may publish it; the listener's
 * ACL is then uid, gid and mode, whatever the publisher asked.
 */
struct port_decl {
        char name[SHMZ_NAME_BUF];
        uint32_t uid, gid, mode;
};

int ports_new(const struct ports_limits *lim, struct ports **ret);
/* Replaces the reserved names (start, reload): publishing from then on follows them. 0 or -ENOMEM, -EINVAL. */
int ports_set_reserved(struct ports *pt, const struct port_decl *v, size_t n);
struct ports *ports_free(struct ports *pt);
/* Reload: applies to ports and segments made from now on. */
void ports_set_limits(struct ports *pt, const struct ports_limits *lim);
/* Called after the lock is released, from whichever thread made the change. */
void ports_set_observer(struct ports *pt, ports_observer_t cb, void *userdata);
void ports_get_stats(struct ports *pt, struct ports_stats *ret);

/*
 * Publishes name for c. owner is the front end's (its connection), returned
 * by ports_connect() so that it can tell the listener. -EADDRINUSE, -EINVAL
 * (name, mode), -EUSERS (c's uid holds max_ports_per_uid already), -EACCES
 * (a reserved name c may not publish).
 */
int ports_listen(struct ports *pt, const struct caller *c, const char *name, uint32_t mode, void *owner,
                 struct listener **ret);
/* The name goes; ports not accepted yet are returned (their acceptor ends are the front end's to shut). */
void ports_unlisten(struct ports *pt, struct listener *l);

/*
 * A connection from c to the listener called name: checks the listener's
 * mode against c (write permission), its backlog and c's limit, and records
 * the port (ids, tokens, both sides' credentials; the acceptor's from the
 * listener). The port counts for c's uid only; a uid other than the
 * listener's and root holds at most uid_connections of its connections and
 * half its backlog. *ret_owner is the listener's owner. The front end then makes the
 * socketpair and the channel and hands them out; ports_port_drop() if that
 * fails. -ENOENT, -EACCES, -EAGAIN (backlog full), -EUSERS.
 */
int ports_connect(struct ports *pt, const struct caller *c, const char *name, struct port **ret, void **ret_owner);
/* The port as the given side is told of it (peer = the other side). */
void ports_port_peer(struct ports *pt, struct port *p, uint32_t side, struct shmz_msg_port_peer *ret);
/* The channel memfd (the front end makes it, the port keeps it and maps it read-only for figures). */
int ports_port_set_channel(struct ports *pt, struct port *p, int channel_fd);
/* The acceptor took the port (PORT_ACCEPTED on the listener's connection): it leaves the backlog. */
int ports_accepted(struct ports *pt, struct listener *l, uint64_t port_id);
/* The port ended (a side shut it down, or died: died = true). Its segments go with it. */
void ports_port_drop(struct ports *pt, struct port *p, bool died);
/* The same by id, for a port several watches end (each side of a rejoined one): the first call drops it. */
void ports_port_drop_id(struct ports *pt, uint64_t id, bool died);

/*
 * A side of a port made before a restart comes back (PORT_REJOIN): the front
 * end has checked that channel_fd is a channel a daemon made. The first side
 * with that channel (its inode) makes a port record with a new id and fresh
 * tokens; the other side joins it. The connector's uid is charged as for a
 * connect. *ret is what this side is told (its id and token from now on; the
 * peer's uid -1 while it has not come back). -EEXIST that side came back
 * already, -ESTALE chunk_size or segment_chunks are no longer the daemon's,
 * -EUSERS.
 */
int ports_rejoin(struct ports *pt, const struct caller *c, uint32_t side, int channel_fd, uint32_t chunk_size,
                 uint32_t segment_chunks, struct shmz_msg_port_peer *ret);

/*
 * A new segment for side `side` of port_id, whose token must match: a sealed
 * memfd of chunk_size * segment_chunks bytes after a header the core fills,
 * indexed in the segment table. -ENOENT, -EPERM (token), -ENOSPC (the
 * direction holds port_memory already, the sending side's uid holds
 * uid_segment_memory, or all ports together hold segment_memory). *ret_fd is
 * a new read-write fd. A segment is charged to its sending side's uid until
 * its memory goes.
 */
int ports_segment_create(struct ports *pt, uint64_t port_id, uint64_t token, uint32_t side,
                         struct shmz_msg_segment_info *ret_info, int *ret_fd);

/* For the view and the control socket's listings: snapshots, free() them. Listeners sorted by name. */
int ports_list_listeners(struct ports *pt, struct shmz_msg_port_info **ret, size_t *ret_n);
/* The connections a listener brokered that are still alive, by port id. -ENOENT without that listener. */
int ports_list_connections(struct ports *pt, const char *name, struct shmz_msg_port_info **ret, size_t *ret_n);
/* Every live connection (shmzctl's list), by port id. */
int ports_list_ports(struct ports *pt, struct shmz_msg_port_info **ret, size_t *ret_n);
int ports_listener_info(struct ports *pt, const char *name, struct shmz_msg_port_info *ret, uint64_t *ret_ino);
int ports_port_info(struct ports *pt, uint64_t port_id, struct shmz_msg_port_info *ret);
/* The view's lookups, copying one record: the listener with this inode; a port of the listener named so. */
int ports_listener_info_by_ino(struct ports *pt, uint64_t ino, struct shmz_msg_port_info *ret);
int ports_connection_info(struct ports *pt, const char *listener, uint64_t port_id, struct shmz_msg_port_info *ret);
/* Segments by id. */
int ports_list_segments(struct ports *pt, struct shmz_msg_segment_info **ret, size_t *ret_n);
/*
 * A listing one page at a time, for the control socket: up to max entries
 * after the last one sent (a name, "" for the first; an id, 0 for the first),
 * in the order of the calls above. Nothing is allocated.
 */
int ports_list_listeners_page(struct ports *pt, const char *after, struct shmz_msg_port_info *ret, size_t max,
                              size_t *ret_n);
int ports_list_ports_page(struct ports *pt, uint64_t after_id, struct shmz_msg_port_info *ret, size_t max,
                          size_t *ret_n);
int ports_list_segments_page(struct ports *pt, uint64_t after_id, struct shmz_msg_segment_info *ret, size_t max,
                             size_t *ret_n);
/* Lock-free lookup in the segment table. */
int ports_segment_info(struct ports *pt, uint64_t id, struct shmz_msg_segment_info *ret);

/* Chunks claimed in a segment's bitmap (bits past n_chunks ignored): figures, never trusted for more. */
uint64_t segment_chunks_used(const struct shmz_segment_header *h, uint32_t n_chunks);

/* A reference that keeps a segment's memory (the view reads it while a file is open). */
int ports_segment_ref(struct ports *pt, uint64_t id, struct segment **ret);
void ports_segment_unref(struct ports *pt, struct segment *s);
/* The segment's bytes, mapped read-only once, valid while a reference is held. */
int segment_view_map(struct segment *s, const void **ret, size_t *ret_size);
