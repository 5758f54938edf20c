/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef SHMZONE_H
#define SHMZONE_H

/*
 * libshmzone: named shared-memory zones handed out by shmzoned.
 *
 * Every function that can fail returns 0 (or a non-negative value where noted)
 * on success and a negative errno on failure. The library never prints. A
 * client and the zones opened through it may be used from any thread.
 */

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <shmzone-abi.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHMZ_DEFAULT_SOCKET "/run/shmzone/shmzone.sock"
#define SHMZ_DEFAULT_MOUNT "/run/shmzone/fs"

struct shmz_client;
struct shmz_zone;

/* ---- connection ------------------------------------------------------------------------ */

/* socket_path NULL: $SHMZONE_SOCKET, then SHMZ_DEFAULT_SOCKET. */
int shmz_connect(const char *socket_path, struct shmz_client **ret);
/* Zones opened through c stay usable; the connection closes with the last of them. NULL is fine. */
void shmz_disconnect(struct shmz_client *c);
/* The daemon's pid (from the hello), or a negative errno. */
int shmz_client_daemon_pid(const struct shmz_client *c);

/* ---- zones ----------------------------------------------------------------------------- */

#define SHMZ_CREATE 0x1 /* create if missing */
#define SHMZ_EXCL 0x2   /* with CREATE: fail with -EEXIST if it exists */
#define SHMZ_RDONLY 0x4 /* map read-only */

/*
 * Opens (and with SHMZ_CREATE creates) the zone `name`, tagged `tag` (NULL: ""),
 * of `size` usable bytes (0: whatever size it has; required non-zero to create).
 * -ENOENT missing without CREATE, -EEXIST other tag (or EXCL), -EINVAL other size
 * or bad name, -EACCES not allowed, -EDQUOT over the per-uid quota, -ENOSPC over
 * the global budget, -EPROTO/-EBADMSG a daemon or zone that makes no sense.
 * Zones created by a client belong to its uid/gid with mode 0600.
 */
int shmz_zone_open(struct shmz_client *c, const char *name, uint64_t size, const char *tag, unsigned flags,
                   struct shmz_zone **ret);
/* Attach through the FUSE view: path is a file under .../zones/. Permission is the kernel's check. */
int shmz_zone_open_path(const char *path, unsigned flags, struct shmz_zone **ret);
void shmz_zone_close(struct shmz_zone *z); /* NULL is fine */

void *shmz_zone_base(struct shmz_zone *z);          /* first byte the caller may use */
uint64_t shmz_zone_size(const struct shmz_zone *z); /* bytes usable from base */
int shmz_zone_existed(const struct shmz_zone *z);   /* 1 if its data predates this open */
const char *shmz_zone_name(const struct shmz_zone *z);
/*
 * Whether the daemon counts this attachment: 1 yes, 0 a zone made without a
 * daemon. After a daemon restart the library proves each zone to the new
 * daemon, which checks the access again under the zone's current mode; a
 * refusal leaves the mapping as it is (nothing is unmapped under the
 * caller) and is returned here: -EACCES the mode no longer grants it,
 * -ENOENT or -ESTALE the zone of that name is gone or another one.
 */
int shmz_zone_attached(const struct shmz_zone *z);
int shmz_zone_unlink(struct shmz_client *c, const char *name);

/*
 * Figures structs only ever grow at their end. Functions that fill one are
 * macros passing sizeof(*ret), so a program built against an older header
 * gets the fields it knows and a newer library never writes past them.
 */

/* Figures of one zone, as the daemon sees them. */
struct shmz_zone_stat {
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint64_t size;
        uint64_t map_size;
        uint64_t generation;
        uint64_t created_usec;
        uint32_t uid, gid, mode;
        uint32_t attached;
        uint32_t flags; /* SHMZ_ZONE_INFO_* */
        uint64_t ino;   /* its inode number in the FUSE view */
        uint64_t mtime_usec, ctime_usec;
        uint32_t holders; /* processes attached (attached counts attachments); 0 from older daemons */
};

int shmz_zone_stat_sized(struct shmz_client *c, const char *name, struct shmz_zone_stat *ret, size_t ret_size);
#define shmz_zone_stat(c, name, ret) shmz_zone_stat_sized((c), (name), (ret), sizeof(*(ret)))
/* Calls cb for each zone; a negative return from cb stops the walk and is returned. */
int shmz_zone_list(struct shmz_client *c, int (*cb)(const struct shmz_zone_stat *st, void *userdata), void *userdata);
/* Like chmod(2)/chown(2) on the zone; (uid_t)-1 / (gid_t)-1 leave that part alone. */
int shmz_zone_chmod(struct shmz_client *c, const char *name, mode_t mode);
int shmz_zone_chown(struct shmz_client *c, const char *name, uid_t uid, gid_t gid);

struct shmz_daemon_status {
        uint64_t budget, budget_used;
        uint64_t quota;
        uint64_t zones, zones_unlinked;
        uint64_t clients;
        uint64_t requests, errors;
        uint64_t segments;
        uint64_t uptime_usec;
        /* since protocol 3 (0 from an older daemon) */
        uint64_t listeners, ports;
        uint64_t segment_bytes, chunks, chunks_used;
        uint64_t messages, message_bytes;
        uint64_t ports_closed, peers_died;
};
int shmz_daemon_status_sized(struct shmz_client *c, struct shmz_daemon_status *ret, size_t ret_size);
#define shmz_daemon_status(c, ret) shmz_daemon_status_sized((c), (ret), sizeof(*(ret)))

/* ---- ports: messages between processes (port.c) ---------------------------------------- */

/*
 * A port is a connection between two processes that the daemon brokers and
 * then watches: payloads travel through shared-memory chunks, written once and
 * never copied by the kernel. Every call is safe from several threads at once.
 * Timeouts are in nanoseconds: 0 = do not wait (-EAGAIN), -1 = wait forever,
 * else -ETIMEDOUT once that long has passed.
 */
struct shmz_listener;
struct shmz_port;

/* Publish `name` (zone name rules); only uids/gids that `mode` lets write may connect. -EADDRINUSE while a live
 * listener has it. */
int shmz_port_listen(struct shmz_client *c, const char *name, mode_t mode, struct shmz_listener **ret);
int shmz_listener_fd(const struct shmz_listener *l); /* readable when a connection waits */
int shmz_port_accept(struct shmz_listener *l, int64_t timeout_ns, struct shmz_port **ret);
void shmz_listener_close(struct shmz_listener *l); /* the name goes; NULL is fine */
/* -ENOENT no such listener, -EACCES its mode refuses us, -EAGAIN its backlog is full. */
int shmz_port_connect(struct shmz_client *c, const char *name, struct shmz_port **ret);
/* NULL is fine. Calls under way in other threads return -EPIPE; the memory goes with the last of them.
 * A call begun after the close is a use after free, as with free(3). */
void shmz_port_close(struct shmz_port *p);
int shmz_port_fd(const struct shmz_port *p); /* readable: a message waits, or the peer is gone */
int shmz_port_peer(const struct shmz_port *p, pid_t *pid, uid_t *uid, gid_t *gid); /* as the daemon saw it */

#define SHMZ_MSG_LAST 0x1     /* the stream ends; reply handlers for it are dropped */
#define SHMZ_MSG_CLOSE_FD 0x2 /* send: close m->fd once it is sent */

struct shmz_msg {
        uint32_t type;   /* the application's */
        uint32_t stream; /* 0: none */
        uint32_t flags;  /* SHMZ_MSG_* */
        void *data;      /* received: the payload in place */
        size_t size;
        int fd;          /* -1, or an fd riding along (received: the caller owns it) */
        uint64_t handle; /* received: the library's, for shmz_msg_release() */
};

/*
 * A send buffer inside the port's shared memory: fill it, then send it with
 * m->data pointing at it (ownership passes, nothing is copied). NULL with
 * errno EAGAIN when the port's shared memory is used up, EMSGSIZE when size
 * exceeds a segment, EPIPE when the peer is gone.
 */
void *shmz_port_buf(struct shmz_port *p, size_t size);
/* The same, waiting up to timeout_ns (-1: for good) for the receiver to release memory: then ETIMEDOUT. */
void *shmz_port_buf_wait(struct shmz_port *p, size_t size, int64_t timeout_ns);
/* A buffer from shmz_port_buf() that will not be sent. */
void shmz_port_buf_free(struct shmz_port *p, void *buf);
/*
 * Data from shmz_port_buf() travels in place; any other data is copied (inline
 * when small, through a chunk when large). -EAGAIN (timeout 0) or -ETIMEDOUT when
 * memory stays used up, -EPIPE when the peer is gone, -EMSGSIZE too large.
 */
int shmz_port_send(struct shmz_port *p, const struct shmz_msg *m, int64_t timeout_ns);
/*
 * 0 and a message; -EAGAIN / -ETIMEDOUT; -EPIPE once the peer is gone and
 * nothing is left; -EBADMSG once for a peer that broke the protocol (the port
 * is then closed down, -EPIPE after). A payload that came in chunks (any over
 * 4 KiB, every shmz_port_buf() buffer) is the sender's shared memory, which
 * the sender can still write: copy what you validate before you rely on it.
 * A reply to a pending shmz_port_call() goes to its handler, never to the caller.
 */
int shmz_port_recv(struct shmz_port *p, struct shmz_msg *ret, int64_t timeout_ns);
void shmz_msg_release(struct shmz_port *p, struct shmz_msg *m); /* its chunks go back to the sender */
/*
 * Before a receive (recv, dispatch) with a timeout goes to sleep, it looks at
 * the ring for up to ns nanoseconds (0, the default: it sleeps at once). For
 * latency-critical callers that own a core; a spinning receiver wakes in
 * well under a microsecond and costs its sender no system call. It yields
 * its CPU at each look, to a peer that may share it.
 */
int shmz_port_set_spin(struct shmz_port *p, uint64_t ns);

/*
 * RPC on a port. shmz_port_call() sends m on a new stream (its m->stream is
 * ignored) and calls handler for each reply on that stream: with error 0 and
 * the reply (which the handler releases or keeps), until a reply flagged
 * SHMZ_MSG_LAST; with -EPIPE when the peer dies, -ETIMEDOUT when deadline_ns
 * (CLOCK_MONOTONIC, 0 = none) passes first; each ends the call. A negative
 * return from shmz_port_call() means the handler is never called for it.
 * shmz_port_dispatch() receives what waits (timeout as for recv), hands
 * replies to their handlers and anything else to the port's handler
 * (shmz_port_set_handler), fires timeouts, and returns the number of
 * messages handled or a negative errno. For event loops: watch shmz_port_fd()
 * for reading, and wake at shmz_port_next_deadline() (CLOCK_MONOTONIC ns,
 * UINT64_MAX = none); call shmz_port_dispatch(p, 0) on either.
 */
typedef void (*shmz_reply_handler_t)(struct shmz_port *p, int error, struct shmz_msg *reply, void *userdata);
typedef void (*shmz_msg_handler_t)(struct shmz_port *p, struct shmz_msg *m, void *userdata);
void shmz_port_set_handler(struct shmz_port *p, shmz_msg_handler_t handler, void *userdata);
int shmz_port_call(struct shmz_port *p, const struct shmz_msg *m, uint64_t deadline_ns, shmz_reply_handler_t handler,
                   void *userdata, uint32_t *ret_stream);
int shmz_port_dispatch(struct shmz_port *p, int64_t timeout_ns);
uint64_t shmz_port_next_deadline(struct shmz_port *p);

/* Ports and segments the daemon knows of (anyone may list: names and figures). */
int shmz_port_list(struct shmz_client *c, int (*cb)(const struct shmz_msg_port_info *pi, void *userdata),
                   void *userdata);
int shmz_segment_list(struct shmz_client *c, int (*cb)(const struct shmz_msg_segment_info *si, void *userdata),
                      void *userdata);

/* ---- allocator inside a zone (slab.c) -------------------------------------------------- */

void *shmz_alloc(struct shmz_zone *z, size_t n); /* NULL when full */
void *shmz_calloc(struct shmz_zone *z, size_t n);
void shmz_free(struct shmz_zone *z, void *p);
void *shmz_alloc_locked(struct shmz_zone *z, size_t n); /* caller holds shmz_zone_mutex(z) */
void shmz_free_locked(struct shmz_zone *z, void *p);
uint64_t shmz_offset(const struct shmz_zone *z, const void *p); /* position-independent handle */
void *shmz_pointer(struct shmz_zone *z, uint64_t off);
void *shmz_zone_root(struct shmz_zone *z); /* the zone's top-level object (nginx's shpool->data) */
int shmz_zone_set_root(struct shmz_zone *z, void *p);

/*
 * A zone is used either raw (shmz_zone_base) or through this allocator, which
 * formats the zone's usable bytes on first use; mixing both is the caller's
 * problem. Blocks are 8-byte aligned, 16-byte aligned when the size class is a
 * multiple of 16, and page (4 KiB) aligned above SHMZ_ALLOC_MAX_CLASS bytes.
 * Calls on a read-only zone fail (NULL with errno EROFS, or -EROFS).
 *
 * The allocator repairs itself when it finds that a process died in the middle
 * of one of its operations, or when it takes the zone lock with SHMZ_OWNER_DEAD:
 * a block being allocated is given back, a block being freed is freed. It
 * repairs only its own state and never calls shmz_mutex_consistent(): after a
 * holder of the zone lock died, every shmz_mutex_lock() of that lock returns
 * SHMZ_OWNER_DEAD (shmz_alloc() and friends in between included) until somebody
 * calls shmz_mutex_consistent(). So users who keep their own structures under
 * the zone lock always learn of the death: they repair or validate their
 * structures, then call shmz_mutex_consistent() before unlocking (or the lock
 * becomes unrecoverable, see below). Users of the allocator alone need do
 * nothing; the lock stays in that state, and the allocator works on.
 */
#define SHMZ_ALLOC_CLASSES 44
#define SHMZ_ALLOC_MAX_CLASS 16384u

struct shmz_alloc_class_stats {
        uint64_t size;  /* slot bytes */
        uint64_t total; /* slots in this class's spans */
        uint64_t used;  /* slots handed out */
        uint64_t reqs;  /* requests, failed ones included */
        uint64_t fails; /* requests that found no memory */
};

struct shmz_alloc_stats {
        uint64_t page_size;        /* internal page, bytes */
        uint64_t pages_total;      /* pages the allocator manages (0: not formatted yet) */
        uint64_t pages_free;       /* in free runs */
        uint64_t pages_slab;       /* in spans of size classes */
        uint64_t pages_large;      /* in blocks larger than SHMZ_ALLOC_MAX_CLASS */
        uint64_t largest_free_run; /* pages */
        uint64_t large_used;       /* large blocks handed out */
        uint64_t large_reqs, large_fails;
        uint64_t faults;            /* bad frees and corrupt metadata found */
        uint64_t repairs;           /* times the allocator was rebuilt */
        uint64_t last_fault_offset; /* zone offset involved in the last fault */
        int32_t last_fault;         /* negative errno of the last fault, 0 = none */
        uint32_t nclasses;
        struct shmz_alloc_class_stats classes[SHMZ_ALLOC_CLASSES];
};

/* Figures of the allocator; takes the zone lock unless the zone is mapped read-only. */
int shmz_zone_alloc_stats_sized(struct shmz_zone *z, struct shmz_alloc_stats *ret, size_t ret_size);
#define shmz_zone_alloc_stats(z, ret) shmz_zone_alloc_stats_sized((z), (ret), sizeof(*(ret)))

/*
 * shmz_free() that says what went wrong: -EINVAL not a block of this zone (foreign
 * or interior pointer), -EALREADY not allocated (double free), -EUCLEAN metadata
 * found corrupt (the allocator was rebuilt). Every such fault is also counted in
 * the figures, so shmz_free()'s callers are not left in the dark either.
 */
int shmz_free_checked(struct shmz_zone *z, void *p);
int shmz_free_checked_locked(struct shmz_zone *z, void *p);

/*
 * Validates the whole allocator: 0 if consistent, -EUCLEAN if not. With
 * SHMZ_CHECK_REPAIR an inconsistent allocator is rebuilt from its page
 * descriptors and bitmaps, and 1 is returned. shmz_zone_check() takes the lock.
 */
#define SHMZ_CHECK_REPAIR 0x1u
int shmz_zone_check(struct shmz_zone *z);
int shmz_zone_check_locked(struct shmz_zone *z, unsigned flags);

/* ---- robust cross-process lock (mutex.c) ----------------------------------------------- */

#define SHMZ_OWNER_DEAD 1 /* returned by lock calls: you hold it, its last owner died holding it */

/*
 * A zeroed shmz_mutex is an unlocked one. A lock whose holder dies (process or
 * thread) is handed to the next locker with SHMZ_OWNER_DEAD: repair what it
 * protects, then call shmz_mutex_consistent() before unlocking, or the lock
 * becomes unrecoverable (-ENOTRECOVERABLE for everyone until shmz_mutex_init()).
 * Lock calls also return -EDEADLK if the calling thread already holds it.
 * Waiters sleep in the kernel; the lock word must be in memory shared by
 * MAP_SHARED (the kernel's robust-list clean-up uses shared futexes).
 *
 * The kernel reports a holder's death at once for the first lock a thread
 * holds. Locks it takes while holding another, or holds across locking or
 * unlocking a robust pthread mutex, are recovered by waiters checking whether
 * the holder still lives, within a fraction of a second. Those checks work
 * between processes of one pid namespace; waiters in another one keep waiting
 * rather than risk taking a live holder's lock.
 *
 * The lock keeps no address in shared memory and follows none it reads there:
 * a process that can write the zone can break the lock's exclusion or fake a
 * holder's death, but cannot make a holder write to its own memory.
 */
struct shmz_mutex *shmz_zone_mutex(struct shmz_zone *z);
int shmz_mutex_init(struct shmz_mutex *m);                           /* a lock placed anywhere in a zone */
int shmz_mutex_lock(struct shmz_mutex *m);                           /* 0 or SHMZ_OWNER_DEAD */
int shmz_mutex_trylock(struct shmz_mutex *m);                        /* ... or -EBUSY */
int shmz_mutex_timedlock(struct shmz_mutex *m, uint64_t timeout_ns); /* ... or -ETIMEDOUT */
int shmz_mutex_unlock(struct shmz_mutex *m);                         /* -EPERM if the caller does not hold it */
int shmz_mutex_consistent(struct shmz_mutex *m);                     /* after repairing what the dead owner left */
int shmz_mutex_force_unlock(struct shmz_mutex *m, pid_t pid);        /* nginx parity: release a lock held by pid */

#ifdef __cplusplus
}
#endif

#endif
