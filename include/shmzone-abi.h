/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef SHMZONE_ABI_H
#define SHMZONE_ABI_H

/*
 * Layouts shared between processes: the zone header in shared memory and the
 * control protocol on the daemon's socket. Fixed-size structs of fixed-width
 * integers only, so that other languages can mirror them. Every field that
 * crosses a process boundary is untrusted by its reader and checked.
 *
 * Changing any layout here bumps SHMZ_ABI_VERSION (zones) or
 * SHMZ_PROTO_VERSION (wire).
 */

#include <stdint.h>

#define SHMZ_ABI_VERSION 2u   /* 2: the zone lock keeps no robust-list links */
#define SHMZ_PROTO_VERSION 3u /* 3: ports and segments; status grew */

/* Names: [A-Za-z0-9._-], 1..200 bytes, not "." or "..". Tags: printable, 0..63 bytes. */
#define SHMZ_NAME_MAX 200u
#define SHMZ_NAME_BUF 208u
#define SHMZ_TAG_MAX 63u
#define SHMZ_TAG_BUF 64u

/* ---- robust cross-process mutex ------------------------------------------------------- */

/*
 * The lock word follows the kernel's robust-futex convention: the owner's TID in
 * the low 30 bits, SHMZ_FUTEX_WAITERS and SHMZ_FUTEX_OWNER_DIED above it. The
 * rest is the owner's record, from which waiters judge whether it is still
 * alive, and figures. Every field is written by whoever holds the lock, and can
 * be written by anyone able to write the zone: no field holds an address, and no
 * reader follows one.
 *
 * While a thread holds a lock, the C library's robust_list_head of that thread
 * may name it in list_op_pending (the kernel then marks it OWNER_DIED and wakes a
 * waiter when the thread dies). That entry is &futex - futex_offset, offset 32
 * with glibc (futex_offset = -32): the kernel computes the lock word from it and
 * never reads the entry itself, so the word there stays reserved.
 */
#define SHMZ_FUTEX_WAITERS 0x80000000u
#define SHMZ_FUTEX_OWNER_DIED 0x40000000u
#define SHMZ_FUTEX_TID_MASK 0x3fffffffu

#define SHMZ_MUTEX_SIZE 64u

struct shmz_mutex {
        uint32_t futex;        /* 0: owner tid | WAITERS | OWNER_DIED */
        uint32_t state;        /* 4: SHMZ_MUTEX_STATE_* */
        uint64_t owner_start;  /* 8: owning thread's start time (clock ticks since boot), against tid reuse */
        uint32_t owner_pid;    /* 16: owner's process id, for liveness checks and force_unlock(pid) */
        uint32_t owner_tag;    /* 20: protection mode << 30 | owner tid; stored last */
        uint64_t owner_pidns;  /* 24: inode of the owner's pid namespace: its pids mean nothing elsewhere */
        uint64_t reserved;     /* 32: never written; the entry list_op_pending names (glibc) */
        uint64_t acquisitions; /* 40: figures: successful locks; also tells one holder from the next */
        uint64_t contended;    /* 48: figures: locks that had to wait */
        uint64_t owner_deaths; /* 56: figures: times a dead owner was found */
};

#define SHMZ_MUTEX_STATE_CONSISTENT 0u
#define SHMZ_MUTEX_STATE_INCONSISTENT 1u /* owner died; held by a repairer until consistent() */
#define SHMZ_MUTEX_STATE_NOTRECOVERABLE 2u

/* ---- zones ---------------------------------------------------------------------------- */

/*
 * A zone is a sealed memfd. Its first SHMZ_ZONE_HEADER_SIZE bytes are the header
 * below; the caller's bytes begin right after it. The header is self-describing
 * so that a bare memfd can be recognised again (after a daemon restart).
 */
#define SHMZ_ZONE_MAGIC UINT64_C(0x31454e4f5a5a4853) /* "SHZZONE1" */
#define SHMZ_ZONE_HEADER_SIZE 4096u
#define SHMZ_ZONE_ALLOC_STATE_SIZE 3072u /* allocator state kept inside the header page */

#define SHMZ_ZONE_ALLOC_NONE 0u      /* raw bytes, no allocator yet */
#define SHMZ_ZONE_ALLOC_FORMATTED 1u /* allocator formatted (done once, under the zone lock) */

struct shmz_zone_header {
        uint64_t magic;          /* SHMZ_ZONE_MAGIC */
        uint32_t abi_version;    /* SHMZ_ABI_VERSION */
        uint32_t header_size;    /* SHMZ_ZONE_HEADER_SIZE */
        uint64_t map_size;       /* bytes of the memfd, header included */
        uint64_t size;           /* usable bytes after the header */
        uint64_t generation;     /* daemon-wide creation counter */
        uint64_t created_usec;   /* CLOCK_REALTIME */
        uint32_t uid, gid, mode; /* ACL when the zone was created (the daemon's copy is authoritative) */
        uint32_t alloc_state;    /* SHMZ_ZONE_ALLOC_*; written with release semantics */
        uint64_t root;           /* offset of the zone's top-level object, 0 = none */
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint8_t reserved0[168];                    /* pads to 512 */
        struct shmz_mutex lock;                    /* 512: the zone lock, for the allocator and user structures */
        uint8_t reserved1[448];                    /* pads to 1024 */
        uint8_t alloc[SHMZ_ZONE_ALLOC_STATE_SIZE]; /* 1024: allocator state, see slab.c */
};

/* ---- control protocol ----------------------------------------------------------------- */

/*
 * SOCK_SEQPACKET: one message per packet, each starting with shmz_msg_header.
 * A client sends requests; every request gets exactly one reply with the same
 * stream id (ZONE_LIST: a run of replies, the last one flagged LAST), except
 * ZONE_CLOSE, which is one-way so that detaching never waits. The daemon
 * may also send unsolicited notices (stream 0). File descriptors travel as
 * SCM_RIGHTS on replies only; the daemon refuses requests that carry any.
 */
#define SHMZ_MSG_MAX 1024u

enum {
        SHMZ_MSG_HELLO = 1,
        SHMZ_MSG_ZONE_OPEN = 2,
        SHMZ_MSG_ZONE_CLOSE = 3,
        SHMZ_MSG_ZONE_UNLINK = 4,
        SHMZ_MSG_ZONE_INFO = 5,
        SHMZ_MSG_ZONE_LIST = 6,
        SHMZ_MSG_ZONE_SETATTR = 7,
        SHMZ_MSG_ZONE_OPEN_TICKET = 8,
        SHMZ_MSG_STATUS = 9,
        SHMZ_MSG_PORT_LISTEN =
                10, /* shmz_msg_port_listen -> shmz_msg_port_info; the connection becomes the listener's */
        SHMZ_MSG_PORT_CONNECT = 11,    /* shmz_msg_zone_name -> shmz_msg_port_peer, fds: [socket end, channel] */
        SHMZ_MSG_PORT_ACCEPTED = 12,   /* one-way, on a listener connection: shmz_msg_port_ref (token 0) */
        SHMZ_MSG_SEGMENT_CREATE = 13,  /* shmz_msg_port_ref -> shmz_msg_segment_info, fd: the segment (read-write) */
        SHMZ_MSG_PORT_LIST = 14,       /* run of shmz_msg_port_info, then an empty LAST */
        SHMZ_MSG_SEGMENT_LIST = 15,    /* run of shmz_msg_segment_info, then an empty LAST */
        SHMZ_MSG_RELOAD = 16,          /* root only: () -> shmz_msg_reload_reply, once the reload is done */
        SHMZ_MSG_ZONE_REATTACH = 17,   /* after RESUME: shmz_msg_zone_reattach, fd: the zone's memfd -> zone_info */
        SHMZ_MSG_PORT_REJOIN = 18,     /* after RESUME: shmz_msg_port_rejoin, fds: [socket end, channel] -> peer */
        SHMZ_MSG_RESUME = 19,          /* () -> (): ZONE_REATTACH and PORT_REJOIN may carry fds until another request */
        SHMZ_MSG_ZONE_HOLDERS = 20,    /* shmz_msg_zone_holders_req -> shmz_msg_zone_holders (one page) */
        SHMZ_MSG_NOTICE_SHUTDOWN = 64, /* daemon -> client: the daemon is stopping */
        SHMZ_MSG_NOTICE_PORT = 65,     /* daemon -> listener: shmz_msg_port_peer, fds: [socket end, channel] */
};

#define SHMZ_MSG_F_REPLY 0x1u
#define SHMZ_MSG_F_LAST 0x2u /* last reply of a run */

struct shmz_msg_header {
        uint32_t size;   /* whole message, header included */
        uint16_t type;   /* SHMZ_MSG_* */
        uint16_t flags;  /* SHMZ_MSG_F_* */
        uint32_t stream; /* request id, echoed by the reply; 0 for notices */
        int32_t status;  /* replies: 0 or a negative errno */
};

struct shmz_msg_hello {
        uint32_t version_min;
        uint32_t version_max;
        uint64_t features; /* none defined yet; must be 0 */
};

struct shmz_msg_hello_reply {
        uint32_t version; /* the version chosen */
        uint32_t pid;     /* the daemon's pid */
        uint64_t features;
        uint64_t budget; /* global memory budget, bytes */
        uint64_t quota;  /* per-uid quota, bytes */
};

/* flags of shmz_msg_zone_open.flags are the public SHMZ_CREATE/EXCL/RDONLY */
struct shmz_msg_zone_open {
        uint64_t size; /* usable bytes; 0 = whatever it has */
        uint32_t flags;
        uint32_t reserved;
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
};

#define SHMZ_ZONE_INFO_EXISTED 0x1u  /* open: the data predates this open */
#define SHMZ_ZONE_INFO_DECLARED 0x2u /* declared in the config file */
#define SHMZ_ZONE_INFO_RDONLY 0x4u   /* open: the fd passed is read-only */
#define SHMZ_ZONE_INFO_UNLINKED 0x8u /* the name is gone, the memory lives on */
#define SHMZ_ZONE_INFO_PENDING 0x10u /* made in the FUSE view, size not fixed yet: no memory */

/* The one record of a zone: what the daemon keeps, sends and shows in its view. */
struct shmz_msg_zone_info {
        uint64_t size;     /* usable bytes (0 while pending) */
        uint64_t map_size; /* memfd bytes */
        uint64_t generation;
        uint64_t created_usec;
        uint64_t handle; /* open: the attachment, for ZONE_CLOSE */
        uint32_t uid, gid, mode;
        uint32_t attached;               /* attachments right now */
        uint32_t flags;                  /* SHMZ_ZONE_INFO_* */
        uint32_t holders;                /* processes attached right now (0 from daemons before it was counted) */
        uint64_t ino;                    /* inode number in the FUSE view */
        uint64_t mtime_usec, ctime_usec; /* bytes written through the view; attributes changed */
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
};

struct shmz_msg_zone_name {
        char name[SHMZ_NAME_BUF];
};

struct shmz_msg_zone_close {
        uint64_t handle;
};

#define SHMZ_SETATTR_MODE 0x1u
#define SHMZ_SETATTR_UID 0x2u
#define SHMZ_SETATTR_GID 0x4u

struct shmz_msg_zone_setattr {
        uint32_t mask; /* SHMZ_SETATTR_* */
        uint32_t mode;
        uint32_t uid;
        uint32_t gid;
        char name[SHMZ_NAME_BUF];
};

struct shmz_msg_zone_ticket {
        uint64_t ticket[2]; /* handed out by the FUSE ioctl on an open zone file */
        uint32_t flags;     /* SHMZ_RDONLY */
        uint32_t reserved;
};

/*
 * ioctl on an open file of the FUSE view's zones/: fills ticket[] (flags and
 * reserved are 0) with a one-time proof of that open, redeemed with
 * SHMZ_MSG_ZONE_OPEN_TICKET on the control socket. _IOR('z', 1, 24 bytes).
 */
#define SHMZ_IOC_TICKET 0x80187a01u

struct shmz_msg_status {
        uint64_t budget, budget_used;
        uint64_t quota;
        uint64_t zones, zones_unlinked;
        uint64_t clients;
        uint64_t requests, errors;
        uint64_t segments;
        uint64_t uptime_usec;
        /* protocol 3 */
        uint64_t listeners;                /* published port names */
        uint64_t ports;                    /* connections between two processes */
        uint64_t segment_bytes;            /* memory of all segments */
        uint64_t chunks, chunks_used;      /* of all segments; used = claimed by a sender, not yet released */
        uint64_t messages, message_bytes;  /* sent on ports since start, as their channels counted them */
        uint64_t ports_closed, peers_died; /* since start: ports that ended, and of those, by a process's death */
};

/*
 * Who holds a zone, as ipcs(1) shows it for System V segments. Every figure is
 * the daemon's, from the kernel (SO_PEERCRED of the attaching connection,
 * /proc/PID/comm when it first attached), never from a message. The daemon
 * keeps one record per process (its attachments counted), at most
 * SHMZ_HOLDERS_MAX per zone; attachments of further processes are only
 * counted (untracked). A page lists the holders with pids above after_pid, by
 * pid: ask again with the last pid of a full page for the next one.
 */
#define SHMZ_HOLDERS_MAX 512u
#define SHMZ_HOLDERS_PER_MSG 24u
#define SHMZ_COMM_BUF 16u

struct shmz_msg_zone_holders_req {
        uint32_t after_pid; /* 0 for the first page */
        uint32_t reserved;
        char name[SHMZ_NAME_BUF];
};

struct shmz_msg_zone_holder {
        uint32_t pid, uid, gid;
        uint32_t attachments;     /* of this process to this zone */
        uint64_t since_usec;      /* CLOCK_REALTIME of its first attachment that is still held */
        char comm[SHMZ_COMM_BUF]; /* /proc/PID/comm then, non-printable bytes replaced by '?' */
};

struct shmz_msg_zone_holders {
        uint32_t creator_pid; /* 0: the config file's, or unknown (a zone from before the daemon kept it) */
        uint32_t creator_uid;
        uint64_t attach_usec, detach_usec; /* CLOCK_REALTIME of the last attach and detach, 0: none since start */
        uint32_t last_pid;                 /* of the last attach or detach */
        uint32_t processes;                /* holders, all of them (tracked ones: at most SHMZ_HOLDERS_MAX) */
        uint32_t untracked;                /* attachments of processes past SHMZ_HOLDERS_MAX */
        uint32_t n;                        /* entries of holders[] in this page */
        struct shmz_msg_zone_holder holders[SHMZ_HOLDERS_PER_MSG];
};

/* The outcome of a reload: status 0 with this body, whether the file was applied or refused. */
struct shmz_msg_reload_reply {
        int32_t result;    /* 0 applied, -EINVAL the file was refused (nothing changed) */
        uint32_t refused;  /* applied: zone declarations refused (a changed size or tag: the zone stays) */
        char errors[1000]; /* refused: "path:line: message" lines, cut short to fit (the journal has them all) */
};

/*
 * Coming back after a daemon restart (the library's reconnect): a client
 * sends RESUME, then one ZONE_REATTACH per zone it holds, with the zone's
 * memfd (the fd it was given), and one PORT_REJOIN per port side, with its
 * socket end and the channel. The daemon takes each fd only as a proof it
 * checks (the zone of that name and that inode, the access again under the
 * current mode; a channel memfd the daemon made, a socket pair the daemon
 * made) and closes it. Any other request ends the RESUME: fds are refused
 * again from then on.
 */
struct shmz_msg_zone_reattach {
        uint32_t flags; /* SHMZ_RDONLY: the attachment is read-only (the fd must be at least that) */
        uint32_t reserved;
        char name[SHMZ_NAME_BUF];
};

/* PORT_REJOIN: the reply is a shmz_msg_port_peer with the port's id and this side's token from now on. */
struct shmz_msg_port_rejoin {
        uint32_t side;           /* SHMZ_PORT_SIDE_* of the sender */
        uint32_t chunk_size;     /* as the port was made: must be the daemon's */
        uint32_t segment_chunks; /* likewise */
        uint32_t reserved;
};

/* ---- ports ----------------------------------------------------------------------------- */

/*
 * A port is a SOCK_SEQPACKET socketpair the daemon makes between a listener and
 * a connector, plus a channel memfd both sides map (figures, the sender's wait
 * word). Each side has a token, a random secret the daemon gives it with its
 * end: SEGMENT_CREATE for that side of that port needs it. The daemon keeps a
 * copy of both ends and a pidfd of both processes, and shuts the port down
 * (shutdown(2) on the dead side's end: the survivor reads what is queued, then
 * end of file) when either process dies; when a side shuts its end down itself
 * (closing a port), the daemon drops the port and its segments.
 *
 * Side 0 is the connector, side 1 the acceptor. Direction d carries what side d sends.
 */
#define SHMZ_PORT_SIDE_CONNECTOR 0u
#define SHMZ_PORT_SIDE_ACCEPTOR 1u

struct shmz_msg_port_listen {
        uint32_t mode; /* who may connect: write permission of mode against uid/gid of the listener */
        uint32_t reserved;
        char name[SHMZ_NAME_BUF];
};

/* CONNECT reply (peer = the listener) and NOTICE_PORT (peer = the connector). */
struct shmz_msg_port_peer {
        uint64_t port_id;         /* daemon-wide, never reused while the daemon runs */
        uint64_t token;           /* this side's secret */
        uint32_t side;            /* SHMZ_PORT_SIDE_* of the receiver of this message */
        uint32_t pid, uid, gid;   /* the peer's, from the kernel (SO_PEERCRED of its connection) */
        uint32_t chunk_size;      /* [daemon] chunk_size: segments of this port are cut in chunks of this */
        uint32_t segment_chunks;  /* chunks per segment */
        uint64_t port_memory;     /* [daemon] port_memory: segment bytes one direction may have */
        char name[SHMZ_NAME_BUF]; /* the listener's name */
};

/* SEGMENT_CREATE: for side `side` of port_id (token checked); PORT_ACCEPTED: token 0. */
struct shmz_msg_port_ref {
        uint64_t port_id;
        uint64_t token;
        uint32_t side;
        uint32_t reserved;
};

/* PORT_LISTEN reply and PORT_LIST entries: a published name, or (listener 0) a connection. */
struct shmz_msg_port_info {
        uint64_t port_id;        /* 0 for a listener */
        uint32_t mode, uid, gid; /* a listener's ACL; for a connection, the acceptor's uid/gid */
        uint32_t pid[2];         /* per side (listener: pid[1]) */
        uint32_t uid_side[2];
        uint32_t backlog;     /* listener: connections not accepted yet */
        uint32_t segments;    /* connection: both directions */
        uint64_t connections; /* listener: live connections */
        uint64_t messages[2]; /* connection, per direction, as the channel counts them (figures) */
        uint64_t bytes[2];
        uint64_t chunks_in_flight[2]; /* claimed and not released, from the segments' bitmaps */
        uint64_t created_usec;
        char name[SHMZ_NAME_BUF];
};

/* SEGMENT_CREATE reply and SEGMENT_LIST entries. */
struct shmz_msg_segment_info {
        uint64_t id;      /* daemon-wide segment id, never reused while the daemon runs */
        uint64_t port_id; /* the port whose direction `side` owns it */
        uint32_t side;
        uint32_t slot;       /* index among that direction's segments, 0.. */
        uint32_t chunk_size; /* bytes */
        uint32_t n_chunks;
        uint64_t map_size;                        /* memfd bytes: SHMZ_SEGMENT_HEADER_SIZE + n_chunks * chunk_size */
        uint32_t chunks_used;                     /* list only */
        uint32_t owner_pid, owner_uid, owner_gid; /* the sending side's process */
        uint64_t created_usec;
};

/*
 * The channel: a sealed memfd both sides map read-write: a header page (the
 * rings' indices, wake-up words, figures), then one descriptor ring per
 * direction. Neither side trusts anything it reads here: an index is checked
 * against the ring's size, a descriptor is copied out before it is checked.
 *
 * Each ring has one producer (the sending side, whose threads take a
 * per-port lock) and one consumer. The sender writes descriptors at its own
 * private head and publishes it in `head` (release); the receiver copies
 * them out from its private tail and publishes that in `tail`. Wake-ups:
 * a receiver about to sleep sets bits in `rx_sleep`, then (seq_cst fence)
 * looks at `head` once more; a sender publishes `head`, then (seq_cst fence)
 * reads `rx_sleep` and wakes only if a bit is set: FUTEX -> bump `wake_seq`
 * and FUTEX_WAKE it, FD -> one WAKE frame on the socket, so that a caller
 * polling the port's fd wakes. A sender short of ring slots or chunks sleeps
 * on `release_seq` with `sender_waits` raised, the same way round.
 */
#define SHMZ_CHANNEL_MAGIC UINT64_C(0x324e48435a5a4853) /* "SHZZCHN2" */
#define SHMZ_CHANNEL_HEADER_SIZE 4096u
#define SHMZ_RING_SLOTS 1024u   /* per direction, a power of two */
#define SHMZ_RING_SLOT_SIZE 64u /* a descriptor takes one or more consecutive slots */
#define SHMZ_RING_SIZE (SHMZ_RING_SLOTS * SHMZ_RING_SLOT_SIZE)
#define SHMZ_CHANNEL_SIZE (SHMZ_CHANNEL_HEADER_SIZE + 2u * SHMZ_RING_SIZE)

#define SHMZ_RX_SLEEP_FUTEX 0x1u /* a receiver sleeps on wake_seq */
#define SHMZ_RX_SLEEP_FD 0x2u    /* a receiver polls the socket: send a WAKE frame */

struct shmz_channel_dir {
        /* Written by the sender. */
        uint32_t head;         /* slots published, free-running */
        uint32_t sender_waits; /* non-zero while a sender sleeps on release_seq */
        uint64_t messages;     /* figures */
        uint64_t bytes;
        uint8_t reserved0[40];
        /* Written by the receiver. */
        uint32_t tail;        /* slots consumed, free-running */
        uint32_t release_seq; /* futex: bumped after ring slots or chunks went back while a sender waits */
        uint8_t reserved1[56];
        /* Written by both: the receiver sets bits, a sender that wakes it clears them. */
        uint32_t rx_sleep; /* SHMZ_RX_SLEEP_* */
        uint32_t wake_seq; /* futex the receiver sleeps on */
        uint8_t reserved2[56];
};

struct shmz_channel {
        uint64_t magic; /* SHMZ_CHANNEL_MAGIC */
        uint32_t abi_version;
        uint32_t size; /* SHMZ_CHANNEL_SIZE */
        uint64_t port_id;
        uint32_t closed; /* the daemon sets it (and wakes every waiter) when the port ends */
        uint32_t reserved1;
        uint8_t reserved0[32];          /* pads to 64 */
        struct shmz_channel_dir dir[2]; /* 64: per direction (side that sends) */
};

/*
 * A descriptor: the first SHMZ_RING_SLOT_SIZE bytes of its slots start with
 * this; an inline payload follows it in the same slots (never across the
 * ring's end: a PAD descriptor fills the slots up to the end instead). With
 * SHMZ_FRAME_F_CHUNK it names chunks [chunk, chunk + ceil(size / chunk_size))
 * of the sender's segment `segment` (a slot announced on the socket first).
 * With SHMZ_FRAME_F_FD the message's fd is the next FD frame on the socket.
 */
enum {
        SHMZ_DESC_DATA = 1,
        SHMZ_DESC_PAD = 2,
};

struct shmz_desc {
        uint16_t kind;    /* SHMZ_DESC_* */
        uint16_t n_slots; /* slots it takes: 1 + ceil((inline bytes - 32) / 64); PAD: to the ring's end */
        uint32_t flags;   /* SHMZ_FRAME_F_* */
        uint32_t type, stream;
        uint64_t size; /* payload bytes */
        uint32_t segment, chunk;
};

/*
 * A segment: a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) made by
 * the daemon for one direction of one port. Header page, then n_chunks chunks.
 * A chunk's bit in used[] is set by the sender when it claims it and cleared by
 * the receiver when it releases it (atomics). The daemon fills the header; the
 * receiver checks the segment against what it was told and the fd's own size
 * and seals, never against the header.
 */
#define SHMZ_SEGMENT_MAGIC UINT64_C(0x314745535a5a4853) /* "SHZZSEG1" */
#define SHMZ_SEGMENT_HEADER_SIZE 4096u
#define SHMZ_SEGMENT_MAX_CHUNKS 16384u /* the bitmap's capacity */

struct shmz_segment_header {
        uint64_t magic; /* SHMZ_SEGMENT_MAGIC */
        uint32_t abi_version;
        uint32_t header_size; /* SHMZ_SEGMENT_HEADER_SIZE */
        uint64_t map_size;
        uint64_t id;
        uint64_t port_id;
        uint32_t side, slot;
        uint32_t chunk_size, n_chunks;
        uint8_t reserved[72];                        /* pads to 128 */
        uint64_t used[SHMZ_SEGMENT_MAX_CHUNKS / 64]; /* 128: bit c of used[c / 64]: chunk c claimed */
        uint8_t reserved1[SHMZ_SEGMENT_HEADER_SIZE - 128 - SHMZ_SEGMENT_MAX_CHUNKS / 8];
};

/*
 * Frames on a port's socket, peer to peer: what must be ordered with the
 * kernel. Messages travel in the ring; the socket carries a new segment's fd
 * (SEGMENT: payload shmz_frame_segment, one fd, sent before any descriptor
 * that names its slot), a message's fd (FD: no payload, one fd, sent before
 * the descriptor that takes it), a wake-up (WAKE: nothing) and, by its end,
 * the peer's going. Anything else (unknown kind or flag, a size that
 * disagrees, an fd where none belongs) is a protocol violation: the receiver
 * drops the port.
 */
enum {
        SHMZ_FRAME_SEGMENT = 2,
        SHMZ_FRAME_FD = 3,
        SHMZ_FRAME_WAKE = 4,
};
#define SHMZ_FRAME_F_LAST 0x1u /* = SHMZ_MSG_LAST (descriptors) */
#define SHMZ_FRAME_F_CHUNK 0x100u
#define SHMZ_FRAME_F_FD 0x200u
#define SHMZ_FRAME_INLINE_MAX 4096u /* largest payload carried in the ring itself */
/*
 * Messages with an fd (F_FD) a sender may have in its ring that the receiver
 * has not taken, as its published tail says: the sender waits for the tail
 * to pass the oldest before it sends another FD frame. A receiver that finds
 * more fds read ahead than this drops the port.
 */
#define SHMZ_PORT_FDS_MAX 64u

struct shmz_frame {
        uint32_t kind; /* SHMZ_FRAME_* */
        uint32_t flags;
        uint32_t type, stream; /* 0 */
        uint64_t size;         /* payload bytes */
        uint32_t segment, chunk;
};

struct shmz_frame_segment {
        uint64_t id;
        uint32_t slot;
        uint32_t chunk_size;
        uint32_t n_chunks;
        uint32_t reserved;
};

#endif
