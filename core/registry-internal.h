/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Inside the core: the records behind struct registry and struct zone, and the
 * helpers its files share. Front ends include registry.h only.
 *
 * Locking: one mutex, reg->lock, guards everything below except what says
 * otherwise. Functions named *_locked and every static helper that touches
 * these records expect it held (assert_locked()); none waits on a peer or
 * calls out. Observers are told after the lock is gone (registry_unlock()).
 */

#include <assert.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "registry.h"
#include "shmzone.h"
#include "util.h"

/* Changes one locked section can make: a section touches one zone (two events at most). */
#define REGISTRY_MAX_CHANGES 4

/* A process attached to a zone: one record however often it attached (holders.c). */
struct zone_holder {
        pid_t pid;
        uid_t uid;
        gid_t gid;
        uint32_t attachments;
        uint64_t since_usec;
        char comm[SHMZ_COMM_BUF];
};

struct zone {
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint64_t ino;
        uint64_t size, map_size;
        uint64_t generation;
        uint64_t created_usec, mtime_usec, ctime_usec;
        uint32_t uid, gid, mode;
        uid_t charged_uid; /* quota is charged to the creator, whoever owns it later */
        int fd;            /* memfd; -EBADF while pending */
        void *view_map;    /* read-only mapping for the FUSE view, made at its first read; NULL before */
        unsigned refs;     /* the name (while linked), attachments, FUSE opens */
        unsigned attached; /* attachments only */
        bool declared, unlinked, used;
        bool counted; /* created by a client: counts against its uid's zone quota until freed */
        bool stored;  /* the daemon's store holds the memfd under stored_id */
        struct zone_identity stored_id;
        /* Who holds it (ipcs -p -t): creator, last attach and detach, the attached processes by pid. */
        pid_t creator_pid; /* 0: the config's (or a zone older than the history record's creator field) */
        pid_t last_pid;
        uint64_t attach_usec, detach_usec; /* CLOCK_REALTIME, 0: none yet */
        struct zone_holder *holders;       /* sorted by pid, at most SHMZ_HOLDERS_MAX */
        uint32_t n_holders, cap_holders;
        uint32_t untracked; /* attachments of processes past that bound */
};

struct quota_entry {
        uid_t uid;
        uint64_t used;  /* bytes */
        uint64_t zones; /* zones alive, pending and unlinked ones included: each may hold an fd */
};

struct ticket {
        uint64_t id[2];
        struct zone *zone; /* holds a reference */
        bool writable;
};

struct registry {
        pthread_mutex_t lock;
        struct zone **names; /* named zones sorted by name: lookups bisect, listings page through it */
        size_t n_names, cap_names;
        void *by_ino; /* the same zones, by inode number (FUSE asks by inode) */
        uint64_t budget, budget_used, quota, max_zones;
        uint64_t zones, zones_unlinked;
        uint64_t next_ino, next_generation;
        struct quota_entry *quotas;
        size_t n_quotas;
        struct ticket *tickets;
        size_t n_tickets;
        registry_observer_t observer;
        void *observer_data;
        pid_t owner; /* thread holding lock, 0 = none: for assert_locked() */
        /* Changes made under the lock, told to the observer once it is released. */
        struct registry_change {
                enum registry_event ev;
                uint64_t ino;
                char name[SHMZ_NAME_BUF];
        } changes[REGISTRY_MAX_CHANGES];
        size_t n_changes;
        const struct registry_store *store;
        void *store_data;
        /*
         * Store changes made under the lock, in order, delivered once it is
         * released by one thread at a time (store_delivering), so that systemd
         * sees them in that order too; fd -EBADF: removed.
         */
        struct registry_store_change {
                struct registry_store_change *next;
                struct zone_identity id;
                int fd;      /* -EBADF: removed (or updated) */
                bool update; /* only id.hist changed */
        } * store_head, *store_tail;
        bool store_delivering;
};

/* registry.c */
void registry_lock(struct registry *reg);
/* Releases the lock, then tells the observer what changed while it was held. */
void registry_unlock(struct registry *reg);
bool registry_locked_by_me(struct registry *reg);
#define assert_locked(reg) assert(registry_locked_by_me(reg))
/* Records a change for the observer (lock held). */
void registry_changed(struct registry *reg, enum registry_event ev, const struct zone *z);
/*
 * Brings the store in step with z (lock held): removes the entry whose name or
 * ACL is no longer z's (or all of it once z is unlinked), stores one for a zone
 * with memory that has none.
 */
void registry_store_sync(struct registry *reg, struct zone *z);
void zone_identity_of(const struct zone *z, struct zone_identity *ret);
/* Inserts an adopted zone (fd and map_size set, not charged yet): 0 or 1 past a limit, or -errno. */
int registry_adopt_locked(struct registry *reg, struct zone *z);
struct zone *registry_lookup(struct registry *reg, const char *name);
/* The zone of that name only if it is the one with inode number ino (0: whichever). */
struct zone *registry_lookup_as(struct registry *reg, const char *name, uint64_t ino);
int registry_create_locked(struct registry *reg, const char *name, const char *tag, uint64_t size, uid_t uid, gid_t gid,
                           uint32_t mode, bool declared, struct zone **ret);
/* An attachment of c (recorded among the zone's holders). */
int registry_attach_locked(struct registry *reg, struct zone *z, const struct caller *c, bool rdonly,
                           struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info, bool *ret_existed);
void registry_unlink_locked(struct registry *reg, struct zone *z);
void registry_unref_locked(struct registry *reg, struct zone *z);
void zone_info_fill(const struct zone *z, struct shmz_msg_zone_info *ret);

/* acl.c: who may do what to a zone, by the mode bits as for a file. */
bool acl_in_group(const struct caller *c, gid_t gid);
/* 0 or -EACCES: root passes, else the owner, group (primary or supplementary) or other bits. */
int acl_check_access(const struct caller *c, uint32_t uid, uint32_t gid, uint32_t mode, int want);
/* Owner or root: chmod, unlink, the tag. */
bool acl_owns(const struct caller *c, const struct zone *z);
/* chmod(2)/chown(2) rules for a SHMZ_SETATTR_* mask: 0 or -EPERM. */
int acl_check_setattr(const struct caller *c, const struct zone *z, uint32_t mask, uint32_t uid, uint32_t gid);

/* quota.c: the global budget, bytes and zones per uid. */
/* Charges map_size to the budget and, for a client's zone, to its creator's quota: 0, -ENOSPC, -EDQUOT. */
int quota_charge(struct registry *reg, const struct zone *z, uint64_t map_size);
void quota_uncharge(struct registry *reg, const struct zone *z, uint64_t map_size);
/* One more zone for uid: 0 or -EDQUOT. */
int quota_count_zone(struct registry *reg, uid_t uid);
void quota_uncount_zone(struct registry *reg, uid_t uid);
/*
 * An adopted zone: counts and charges it even past a limit (its memory exists
 * already; refusing it would destroy data). 0, -ENOSPC or -EDQUOT if past one
 * (charged anyway), -ENOMEM (nothing charged).
 */
int quota_adopt(struct registry *reg, const struct zone *z);

/* zone-memory.c: the memfd, its seals and mode, the header's copies, the view's mapping. */
int zone_memory_make(struct zone *z, uint64_t size);
/* A new fd for a client: the same open file (writable), or a read-only reopen. */
int zone_memory_reopen(struct zone *z, bool rdonly);
void zone_memory_sync_acl(struct zone *z);
void zone_memory_sync_tag(struct zone *z);
void zone_destroy(struct zone *z);

/* holders.c: who holds a zone. Never fail an attach: past the bound or out of memory, only counted. */
void holders_attach(struct zone *z, const struct caller *c);
void holders_detach(struct zone *z, const struct caller *c);
void holders_fill(const struct zone *z, uint32_t after_pid, struct shmz_msg_zone_holders *ret);
uint32_t holders_processes(const struct zone *z);
void holders_free(struct zone *z);

/* tickets.c */
void tickets_free(struct registry *reg);
