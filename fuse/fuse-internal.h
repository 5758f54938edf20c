/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Shared by the files of the FUSE view; never used outside fuse/. */

#define FUSE_USE_VERSION 312

#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>

#include "fuse-view.h"
#include "ports.h"
#include "registry.h"
#include "util.h"

/* Fixed inodes; zones start at 1024 (the registry's numbers). */
enum {
        INO_ROOT = FUSE_ROOT_ID,
        INO_ZONES,
        INO_SEGMENTS,
        INO_PORTS,
        INO_STATUS,
        INO_METRICS,
        INO_SOCKET,
        INO_FIXED_MAX,
};

/*
 * Timeouts (seconds). Every change to a zone, whoever makes it, reaches the
 * kernel before the change is answered (view_zone_changed() in fuse-view.c,
 * called in the changing thread): a name that went or changed ends every
 * cached name (the connection's epoch, FUSE_NOTIFY_INC_EPOCH: each is looked
 * up again at its next use), and the inode's attributes are invalidated. So
 * names and attributes are cached, and a stat is answered by the kernel
 * alone. Neither notification takes a lock in the kernel (an entry's
 * invalidation would take the directory's, which any user can hold: see F8
 * in test-attack.c).
 *
 * A LOOKUP's entry: the kernel samples the epoch before it asks, so a reply
 * that raced with a change is looked up again; the timeout only bounds what
 * a lost notification would leave. Listings make no zone dentries (see
 * add_zone_dirent()). Without the epoch (kernels before 6.16) zone names are
 * never trusted (0): every walk asks.
 * Attributes: the same minute, invalidated the same way (a reply computed
 * before a change that gave the kernel its first copy of an inode is caught
 * by the notifier's second invalidation). status/metrics and ports/,
 * segments/ change by themselves: never cached.
 */
#define ZONE_ENTRY_TIMEOUT 60.0
#define ZONE_ATTR_TIMEOUT 60.0
#define FIXED_ENTRY_TIMEOUT 60.0 /* the names of the root never change */
#define FIXED_TIMEOUT 1.0

/* What the kernel is told about I/O sizes (stat's st_blksize: cat and cp size their buffers on it). */
#define VIEW_BLKSIZE (1u << 20)

/*
 * Inodes whose attributes the kernel must forget, for the notifier thread, as
 * a set: each inode once, however often it changed. Bounded; past that,
 * changes are dropped and the attribute timeout bounds how stale the kernel's
 * copy gets. ports/ and segments/ rely on it; zones are invalidated in the
 * changing thread, and again by the notifier (view_zone_changed()).
 */
#define INVAL_SLOTS 8192u /* a power of two */
#define INVAL_MAX (INVAL_SLOTS / 2)
#define NOTIFIER_DELAY_MSEC 20 /* a zone's second invalidation comes this long after its change */

/* The largest read the kernel sends us (max_pages is 256 with libfuse 3.14): 1 MiB. */
#define READ_BUF_SIZE (1u << 20)

/* ports/ and segments/ timeouts: figures change by themselves; names come and go (no dentry is trusted). */
#define PORTS_ENTRY_TIMEOUT 0.0
#define PORTS_ATTR_TIMEOUT 0.0   /* ports/<name>/<id>: its size is that of a text that changes */
#define SEGMENT_ATTR_TIMEOUT 1.0 /* segments/<id>: nothing but nlink changes, and that is invalidated */

/* One entry of a listing of ports/, ports/<name> or segments/, as it was when the listing began. */
struct view_dirent {
        struct stat st;
        char name[SHMZ_NAME_BUF];
};

/* An open file or directory; listed so that fuse_view_stop() frees what the kernel never released. */
struct vhandle {
        struct vhandle *prev, *next;
        uint64_t ino;
        struct zone *zone; /* zones: a reference held while open */
        uint64_t size;     /* zones: usable bytes, once fixed (sizes never change after that) */
        uint64_t map_size; /* zones: bytes of the memfd */
        const void *map;   /* zones: the zone's read-only mapping (the registry's, shared by every open) */
        struct vhandle *ino_prev, *ino_next; /* the other open handles of ino (fuse_view.open_inos) */
        bool readable, writable;
        bool has_ticket;
        bool created;    /* zones: this open made the zone (pending): it goes at release if still pending */
        bool told_nospc; /* zones: the log has heard of a write before the size was set */
        uint64_t ticket[2];
        char *text; /* status/metrics: generated at open */
        size_t text_len;
        /* zones/: where a listing stands, so that it continues by name, not from a copy of the directory */
        uint64_t dir_pos;              /* offset of the next entry */
        char dir_after[SHMZ_NAME_BUF]; /* the last zone listed */
        /* ports/, segments/ (fuse-ports.c) */
        struct view_dirent *dents; /* a listing's snapshot, taken at offset 0 */
        size_t n_dents;
        char listener[SHMZ_NAME_BUF]; /* ports/<name>: the name */
        struct segment *segment;      /* segments/<id>: a reference held while open */
        const void *seg_map;          /* its read-only mapping (the core's, one per segment) */
        size_t seg_size;
        struct shmz_msg_segment_info seg_info; /* as at open: fstat and xattrs after the segment went */
        struct ports *seg_ports;               /* whose reference that is */
        struct shmz_msg_port_info port_info;   /* ports/<name>/<id>: as at open (h->text is its text) */
        bool is_port;
        /* Set by the kind that took a reference (zone, segment): vhandle_free() calls it. */
        void (*release)(struct fuse_view *v, struct vhandle *h);
};

struct fuse_view {
        fuse_view_figures_t figures;
        void *figures_data;
        struct registry *registry;
        struct fuse_session *se;
        char *mountpoint;
        char *socket_link; /* absolute path of the control socket */
        bool mounted;
        uid_t uid; /* owner of the fixed files: the daemon's user */
        gid_t gid;
        uint64_t start_usec;
        atomic_uint_fast64_t zones_mtime_usec; /* zones/ changes: its mtime */
        _Atomic(struct ports *) ports;         /* fuse_view_start()'s; NULL: ports/ and segments/ look empty */
        atomic_uint_fast64_t ports_mtime_usec; /* a listener came or went */
        atomic_uint_fast64_t segments_mtime_usec;
        atomic_bool epoch_works; /* the kernel takes FUSE_NOTIFY_INC_EPOCH: zone names may be cached */

        pthread_t thread;
        bool thread_started;
        int stop_fd; /* eventfd: fuse_view_stop() -> FUSE thread */
        pthread_mutex_t start_lock;
        pthread_cond_t start_cond;
        int start_result; /* 1 while starting */

        /* Invalidations: observers (any thread) -> notifier thread. */
        pthread_t notifier;
        bool notifier_started;
        pthread_mutex_t qlock;
        pthread_cond_t qcond;
        uint64_t *inval; /* INVAL_SLOTS, 0 = free: an open-addressed set of inode numbers */
        size_t n_inval;  /* used slots, at most INVAL_MAX */
        uint64_t *later; /* the same, sent at later_usec (zones: a second invalidation) */
        size_t n_later;
        uint64_t later_usec; /* CLOCK_REALTIME */
        uint64_t *later2;    /* changes too close to later_usec: the window after it */
        size_t n_later2;
        uint64_t later2_usec;
        uint64_t dropped; /* changes not queued since the notifier last looked */
        bool stopping;

        struct vhandle handles;   /* list head, FUSE thread only */
        void *open_inos;          /* FUSE thread only: the open handles by inode (vhandle_new()) */
        void *read_buf;           /* FUSE thread only: replies for ranges with holes */
        struct fuse_buf fuse_buf; /* FUSE thread only: the request being served */
};

/* view-notify.c: invalidations and the notifier thread. */
void view_queue_inval(struct fuse_view *v, uint64_t ino);
double zone_entry_timeout(struct fuse_view *v);
void *notifier_thread(void *arg);
int notify_inc_epoch(struct fuse_view *v);
void on_registry_event(void *userdata, enum registry_event ev, const char *name, uint64_t ino);

/* view-util.c: helpers shared by the dispatcher and the kinds. */
struct vhandle *vhandle_new(struct fuse_view *v, uint64_t ino);
/* The open handles of ino (the rest through ->ino_next), NULL if none: one lookup, whatever is open. */
struct vhandle *view_handles_of(struct fuse_view *v, uint64_t ino);
void vhandle_free(struct fuse_view *v, struct vhandle *h);
void caller_from_req(fuse_req_t req, struct caller *ret);
void stat_from_usec(struct timespec *ts, uint64_t usec);
bool add_dirent(fuse_req_t req, bool plus, char *buf, size_t size, size_t *used, const char *name,
                const struct stat *st, uint64_t generation, double entry_timeout, double attr_timeout,
                uint64_t next_off);
bool put_dirent(fuse_req_t req, const struct fuse_entry_param *ep, char *buf, size_t size, size_t *used,
                const char *name, const struct stat *st, uint64_t next_off);
void reply_xattr(fuse_req_t req, int r, const char *buf, size_t len, size_t size);

/* fuse-zones.c: zones/ and its files. */
void zone_stat(const struct shmz_msg_zone_info *i, struct stat *ret);
int zones_lookup(struct fuse_view *v, const char *name, struct fuse_entry_param *ret);
int zones_getattr(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret);
void zones_open(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void zones_create(struct fuse_view *v, fuse_req_t req, const char *name, mode_t mode, struct fuse_file_info *fi);
void zones_read(struct fuse_view *v, fuse_req_t req, struct vhandle *h, size_t size, off_t off);
void zones_write(struct fuse_view *v, fuse_req_t req, struct vhandle *h, const char *buf, size_t size, off_t off);
void zones_release(struct fuse_view *v, struct vhandle *h);
void zones_setattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                   struct vhandle *h);
void zones_unlink(struct fuse_view *v, fuse_req_t req, const char *name);
void zones_ioctl(struct fuse_view *v, fuse_req_t req, struct vhandle *h, unsigned cmd, unsigned flags, size_t in_bufsz,
                 size_t out_bufsz);
void zones_getxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);
void zones_listxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, size_t size);
void zones_setxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                    size_t size, int flags);
void zones_removexattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name);

/* fuse-ports.c: ports/ and segments/. Inode numbers from the ranges in core/ports.h. */
static inline bool ino_is_ports(uint64_t ino) {
        return ino >= PORTS_INO_LISTENER_BASE && ino < PORTS_INO_END;
}
static inline struct ports *view_ports(struct fuse_view *v) {
        return atomic_load(&v->ports);
}
void view_ports_event(void *userdata, enum ports_event ev, const char *name, uint64_t ino);
int view_ports_lookup(struct fuse_view *v, uint64_t parent, const char *name, struct fuse_entry_param *ret);
int view_ports_getattr(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret, double *ret_timeout);
uint64_t view_ports_parent(uint64_t ino);
int view_ports_opendir(struct fuse_view *v, uint64_t ino, struct vhandle *h);
void view_ports_readdir(struct fuse_view *v, fuse_req_t req, struct vhandle *h, bool plus, off_t off, char *buf,
                        size_t size, size_t *used);
void view_ports_open(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void view_ports_read(struct fuse_view *v, fuse_req_t req, struct vhandle *h, size_t size, off_t off);
void view_ports_release(struct fuse_view *v, struct vhandle *h);
void view_ports_getxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);
void view_ports_listxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, size_t size);
bool view_ports_xattr_is_ours(const char *name);

/* fuse-status.c: status and metrics. */
int status_text(struct fuse_view *v, bool prometheus, char **ret, size_t *ret_len);
