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
#define SHMZ_PROTO_VERSION 2u /* 2: zone info carries ino, mtime, ctime */

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
        SHMZ_MSG_NOTICE_SHUTDOWN = 64, /* daemon -> client: the daemon is stopping */
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
        uint32_t attached; /* attachments right now */
        uint32_t flags;    /* SHMZ_ZONE_INFO_* */
        uint32_t reserved;
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
};

#endif
