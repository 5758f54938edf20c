/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The zone registry: every zone the daemon owns, by name. One mutex guards it;
 * no critical section waits on I/O (memfd creation is the exception: it is a
 * few syscalls, never a peer). Callers from the worker threads, the main
 * thread and the FUSE thread identify who asks with a struct caller, taken
 * from the kernel (SO_PEERCRED/SO_PEERGROUPS or fuse_req_ctx), never from a
 * message.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

/* Zone inode numbers start here; the ones below belong to the FUSE view's fixed files and directories. */
#define REGISTRY_FIRST_INO 1024u

struct config;
struct registry;
struct zone;

struct caller {
        uid_t uid;
        gid_t gid;
        pid_t pid;
        const gid_t *groups; /* supplementary groups */
        size_t n_groups;
};

/* What the observer is told; name is the zone's name, ino its inode number. */
enum registry_event {
        REGISTRY_ZONE_ADDED,
        REGISTRY_ZONE_REMOVED, /* name gone (unlink, retire) */
        REGISTRY_ZONE_CHANGED, /* attributes (mode, owner, tag, size, attachments) */
};

typedef void (*registry_observer_t)(void *userdata, enum registry_event ev, const char *name, uint64_t ino);

/* A snapshot of one zone; what listings, FUSE getattr and the protocol's info show. */
struct zone_info {
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint64_t ino;
        uint64_t size, map_size; /* 0 while pending (created through FUSE, size not fixed yet) */
        uint64_t generation;
        uint64_t created_usec, mtime_usec, ctime_usec;
        uint32_t uid, gid, mode;
        uint32_t attached;
        bool declared, unlinked, pending;
};

struct registry_stats {
        uint64_t budget, budget_used, quota;
        uint64_t zones, zones_unlinked;
};

/* max_zones: zones one uid may create (config zones aside); each costs the daemon an fd. */
int registry_new(uint64_t budget, uint64_t quota, uint64_t max_zones, struct registry **ret);
struct registry *registry_free(struct registry *r);
void registry_set_observer(struct registry *r, registry_observer_t cb, void *userdata);
void registry_get_stats(struct registry *r, struct registry_stats *ret);

/*
 * Open (SHMZ_CREATE/EXCL/RDONLY flags) following the tag and size rules. On
 * success the caller holds an attachment: *ret_zone stays valid until
 * registry_detach(). *ret_fd is a new fd (read-only reopen for RDONLY).
 */
int registry_open(struct registry *r, const struct caller *c, const char *name, uint64_t size, const char *tag,
                  unsigned flags, struct zone **ret_zone, int *ret_fd, struct zone_info *ret_info, bool *ret_existed);
void registry_detach(struct registry *r, struct zone *z);

int registry_unlink(struct registry *r, const struct caller *c, const char *name);
/*
 * registry_setattr, registry_set_size and registry_set_tag act on the zone
 * called name; with ino != 0 only if it is still the zone of that inode number
 * (-ENOENT otherwise), for callers that hold an inode, not a name.
 */
/* mask of SHMZ_SETATTR_*; chmod: owner or root; chown: root, or owner to a group of theirs. */
int registry_setattr(struct registry *r, const struct caller *c, const char *name, uint64_t ino, uint32_t mask,
                     uint32_t mode, uint32_t uid, uint32_t gid);

int registry_info(struct registry *r, const char *name, struct zone_info *ret);
int registry_info_by_ino(struct registry *r, uint64_t ino, struct zone_info *ret);
/* A snapshot of every named zone, sorted by name; free() it. */
int registry_list(struct registry *r, struct zone_info **ret, size_t *ret_n);
/* Up to max zones whose names sort after `after` ("" for the first), in order: a listing one page at a time. */
int registry_list_page(struct registry *r, const char *after, struct zone_info *ret, size_t max, size_t *ret_n);

/* References for the FUSE view (an open file keeps its zone alive like an attachment does). */
int registry_ref_by_ino(struct registry *r, uint64_t ino, struct zone **ret);
void registry_unref(struct registry *r, struct zone *z);
/* A snapshot of a zone the caller holds a reference on (also once unlinked: an open file's fstat). */
void registry_info_of(struct registry *r, struct zone *z, struct zone_info *ret);
/* The zone's memfd (owned by the zone; valid while a reference is held), or -EBADF while pending. */
int zone_fd(struct zone *z);
/*
 * The zone's bytes, mapped read-only once for the whole daemon (the FUSE view
 * replies to reads from it) and unmapped with the zone; valid while a
 * reference is held. -EAGAIN while pending.
 */
int zone_view_map(struct zone *z, const void **ret);
/* Called after bytes were written through the FUSE view (mtime, "data exists"). */
void registry_touch(struct registry *r, struct zone *z);

/* FUSE create: a named zone without memory, owned by c, until registry_set_size() fixes its size. */
int registry_create_pending(struct registry *r, const struct caller *c, const char *name, uint32_t mode,
                            struct zone_info *ret);
/* Fixes the size of a pending zone (quota, budget apply); for a sized zone, only the same size is accepted. */
int registry_set_size(struct registry *r, const struct caller *c, const char *name, uint64_t ino, uint64_t size);
/* Tag of a zone nobody attached to yet: owner or root. */
int registry_set_tag(struct registry *r, const struct caller *c, const char *name, uint64_t ino, const char *tag);

/*
 * Tickets prove to the control socket that a process opened the zone's file in
 * the FUSE view: issued per open file, redeemed once, for the access that open
 * was granted.
 */
int registry_ticket_issue(struct registry *r, struct zone *z, bool writable, uint64_t ret_ticket[2]);
void registry_ticket_revoke(struct registry *r, const uint64_t ticket[2]);
int registry_ticket_redeem(struct registry *r, const uint64_t ticket[2], bool want_write, struct zone **ret_zone,
                           int *ret_fd, struct zone_info *ret_info, bool *ret_existed);

/*
 * Applies the zones of a (re)loaded config: keeps unchanged zones, creates new
 * ones, refuses a changed size or tag (logged, old zone kept) and retires zones
 * no longer declared (unlinked: memory freed after the last detach). Returns
 * the number of declarations refused, or a negative errno.
 */
int registry_apply_config(struct registry *r, const struct config *cfg);
