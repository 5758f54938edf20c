/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The core's zone registry: every zone the daemon owns, by name and by inode
 * number. The front ends (the control socket, the FUSE view) translate their
 * protocol into these calls and nothing else. Any thread may call; one mutex
 * inside guards it all, no critical section waits on a peer (memfd creation
 * is a few syscalls), and the observer is called after the mutex is released.
 * Who asks is a struct caller taken from the kernel (SO_PEERCRED and
 * SO_PEERGROUPS, or fuse_req_ctx), never from a message. The core does no I/O
 * but on the memfds it owns, and logs nothing: it returns errors, and reload
 * reports what it did through a callback.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

/* Zone inode numbers start here; the ones below belong to the FUSE view's fixed files and directories. */
#define REGISTRY_FIRST_INO 1024u

struct registry;
struct zone;

struct caller {
        uid_t uid;
        gid_t gid;
        pid_t pid;
        const gid_t *groups; /* supplementary groups */
        size_t n_groups;
        const char *comm; /* /proc/PID/comm as the front end read it, or NULL: shown as who holds a zone */
};

/* What the observer is told; name is the zone's name, ino its inode number. */
enum registry_event {
        REGISTRY_ZONE_ADDED,
        REGISTRY_ZONE_REMOVED, /* name gone (unlink, retire) */
        REGISTRY_ZONE_CHANGED, /* attributes (mode, owner, tag, size, attachments) */
};

typedef void (*registry_observer_t)(void *userdata, enum registry_event ev, const char *name, uint64_t ino);

/*
 * What a restarted daemon needs, besides the memfd, to rebuild a zone's entry:
 * its ACL and its quota bookkeeping. Kept outside the zone (systemd's fd store
 * keeps it as the fd's FDNAME=): the header's copy is writable by the zone's
 * writers, so it never is the source of an ACL.
 */
/*
 * What a zone has been since it was made: kept across restarts beside its
 * identity (the daemon's history record, not the FDNAME: too long for it), so
 * that inode numbers, times and generations do not move. The tag too: the
 * header's copy is the writers'.
 */
struct zone_history {
        uint64_t ino, generation;
        uint64_t created_usec, mtime_usec, ctime_usec;
        char tag[SHMZ_TAG_BUF];
        uint32_t creator_pid; /* 0: unknown (the config's, or a record older than the field) */
};

struct zone_identity {
        char name[SHMZ_NAME_BUF];
        uint32_t uid, gid, mode;
        uint32_t charged_uid;     /* whose quota a client's zone counts against */
        bool declared;            /* the config's (nobody's quota) */
        struct zone_history hist; /* not in the FDNAME */
};

/*
 * FDNAME= of a stored zone: "shmz.<uid>.<gid>.<mode, octal>.<flags, hex>.<charged uid>.<name>",
 * decimal unless said, the name last (it may hold dots). systemd takes at most
 * 255 characters and no ':' or control characters; a zone name (at most
 * SHMZ_NAME_MAX of [A-Za-z0-9._-]) makes it 242 at most.
 */
#define ZONE_FDNAME_PREFIX "shmz."
#define ZONE_FDNAME_MAX 255u
#define ZONE_FDNAME_DECLARED 0x1u
/* 0, or -ENAMETOOLONG if it would not fit in size (or in ZONE_FDNAME_MAX). */
int zone_identity_format(const struct zone_identity *id, char *buf, size_t size);
/* 0, or -EBADMSG unless fdname is exactly what zone_identity_format() makes. */
int zone_identity_parse(const char *fdname, struct zone_identity *ret);

/*
 * The daemon keeps every zone's memfd outside itself (systemd's fd store), so
 * that zones survive its restart. stored(): z got its memory, or its identity
 * changed (after removed() of the old one); fd is a copy, valid during the
 * call only. removed(): that identity is gone (unlink, retire, or changed).
 * Called outside the registry lock, in the order the changes were made (one
 * thread delivers at a time; it may be another thread than the one that made
 * the change).
 */
struct registry_store {
        void (*stored)(void *userdata, const struct zone_identity *id, int fd);
        void (*removed)(void *userdata, const struct zone_identity *id);
        /* Optional: only id->hist changed (the tag); the stored fd and its FDNAME stay. */
        void (*updated)(void *userdata, const struct zone_identity *id);
};

/* A zone the config file declares. */
struct zone_decl {
        char name[SHMZ_NAME_BUF];
        char tag[SHMZ_TAG_BUF];
        uint64_t size;
        uint32_t uid;
        uint32_t gid;
        uint32_t mode;
        bool persist; /* written to the state directory, restored when systemd's fd store lacks it */
};

/* What every uid may take, and all of them together. */
struct registry_limits {
        uint64_t budget;    /* bytes of all zones */
        uint64_t quota;     /* bytes of the zones one uid created */
        uint64_t max_zones; /* zones one uid may create (declared zones aside); each costs the daemon an fd */
};

struct registry_stats {
        uint64_t budget, budget_used, quota;
        uint64_t zones, zones_unlinked;
};

int registry_new(const struct registry_limits *lim, struct registry **ret);
struct registry *registry_free(struct registry *reg);
void registry_set_observer(struct registry *reg, registry_observer_t cb, void *userdata);
void registry_get_stats(struct registry *reg, struct registry_stats *ret);
/* Set before zones are made: zones made earlier are not offered. store must outlive reg. */
void registry_set_store(struct registry *reg, const struct registry_store *store, void *userdata);
bool registry_has_store(struct registry *reg);

/*
 * Takes back a zone memfd a previous daemon stored under fdname (see
 * zone_identity_format()), before the config is applied. Checks that fd is a
 * memfd of ours for that name, sealed as zones are, whole pages, the name
 * free; then the zone is charged to the budget and quota as before (past a
 * limit too: its memory exists already) and counts as stored (systemd keeps
 * its copy). hist (may be NULL) is its history as recorded: its inode number,
 * generation, times and tag are kept (a number another zone took already is
 * not). A header a writer damaged does not lose the zone: the fields the
 * daemon owns are rewritten from the FDNAME, hist and the memfd's size.
 * On success the zone owns fd; the result has ADOPT_PAST_LIMIT and/or
 * ADOPT_REPAIRED set, and *ret_why says what in words. On failure fd is
 * still the caller's and *ret_why says why.
 */
#define ADOPT_PAST_LIMIT 0x1
#define ADOPT_REPAIRED 0x2
int registry_adopt(struct registry *reg, const char *fdname, int fd, const struct zone_history *hist,
                   const char **ret_why);
/*
 * A declared zone restored from a copy (fd: a sealed zone memfd, as
 * registry_adopt() checks it): taken in as if adopted under decl's identity,
 * then stored (systemd's fd store did not have it). Same results.
 */
int registry_restore(struct registry *reg, const struct zone_decl *decl, int fd, const struct zone_history *hist,
                     const char **ret_why);
/* Numbers the zones of a previous run used: new zones get higher ones (inode numbers are never reused). */
void registry_reserve(struct registry *reg, uint64_t next_ino, uint64_t next_generation);

/*
 * Open (SHMZ_CREATE/EXCL/RDONLY flags) following the tag and size rules. On
 * success the caller holds an attachment: *ret_zone stays valid until
 * registry_detach() with the same caller. *ret_fd is a new fd (read-only
 * reopen for RDONLY). Every attachment is recorded under c's pid (the
 * zone's holders, registry_holders()).
 */
int registry_open(struct registry *reg, const struct caller *c, const char *name, uint64_t size, const char *tag,
                  unsigned flags, struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info,
                  bool *ret_existed);
void registry_detach(struct registry *reg, struct zone *z, const struct caller *c);
/*
 * Who holds the zone called name (ino as for registry_setattr): the zone's
 * attach figures and one page of its holders, those with pids above
 * after_pid, by pid. Unlinked zones are not found. c needs read permission
 * (-EACCES: a stranger learns nothing of who uses a zone); NULL for a
 * front end that checked it already (the kernel, for the view's xattr).
 */
int registry_holders(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint32_t after_pid,
                     struct shmz_msg_zone_holders *ret);

/*
 * A client that mapped a zone before the daemon restarted is counted again:
 * the zone called name must be the one whose memfd has inode (dev, ino) (the
 * caller proved it with the fd it holds), and the current mode must grant
 * the access. The same attachment as registry_open(), without a new fd.
 * -ENOENT, -EACCES, -ESTALE (another zone has that name now).
 */
int registry_reattach(struct registry *reg, const struct caller *c, const char *name, dev_t dev, ino_t ino, bool rdonly,
                      struct zone **ret_zone, struct shmz_msg_zone_info *ret_info);
int registry_unlink(struct registry *reg, const struct caller *c, const char *name);
/*
 * registry_setattr, registry_set_size and registry_set_tag act on the zone
 * called name; with ino != 0 only if it is still the zone of that inode number
 * (-ENOENT otherwise), for callers that hold an inode, not a name.
 */
/* mask of SHMZ_SETATTR_*; chmod: owner or root; chown: root, or owner to a group of theirs. */
int registry_setattr(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint32_t mask,
                     uint32_t mode, uint32_t uid, uint32_t gid);

int registry_info(struct registry *reg, const char *name, struct shmz_msg_zone_info *ret);
int registry_info_by_ino(struct registry *reg, uint64_t ino, struct shmz_msg_zone_info *ret);
/* A snapshot of every named zone, sorted by name; free() it. */
int registry_list(struct registry *reg, struct shmz_msg_zone_info **ret, size_t *ret_n);
/* Up to max zones whose names sort after `after` ("" for the first), in order: a listing one page at a time. */
int registry_list_page(struct registry *reg, const char *after, struct shmz_msg_zone_info *ret, size_t max,
                       size_t *ret_n);

/* References for the FUSE view (an open file keeps its zone alive like an attachment does). */
int registry_ref_by_ino(struct registry *reg, uint64_t ino, struct zone **ret);
void registry_unref(struct registry *reg, struct zone *z);
/* A snapshot of a zone the caller holds a reference on (also once unlinked: an open file's fstat). */
void registry_info_of(struct registry *reg, struct zone *z, struct shmz_msg_zone_info *ret);
/* The zone's memfd (owned by the zone; valid while a reference is held), or -EBADF while pending. */
int zone_fd(struct zone *z);
/*
 * The zone's bytes, mapped read-only once for the whole daemon (the FUSE view
 * replies to reads from it) and unmapped with the zone; valid while a
 * reference is held. -EAGAIN while pending.
 */
int zone_view_map(struct zone *z, const void **ret);
/* Called after bytes were written through the FUSE view (mtime, "data exists"). */
void registry_touch(struct registry *reg, struct zone *z);

/*
 * FUSE create: a named zone without memory, owned by c, until registry_set_size() fixes its size.
 * registry_drop_pending() (z: the caller's reference) unlinks it again if it is still pending (the
 * creating open ended without a size): 0, -ENOENT if unlinked already, -EBUSY once it has a size.
 */
int registry_create_pending(struct registry *reg, const struct caller *c, const char *name, uint32_t mode,
                            struct shmz_msg_zone_info *ret);
int registry_drop_pending(struct registry *reg, struct zone *z);
/* Fixes the size of a pending zone (quota, budget apply); for a sized zone, only the same size is accepted. */
int registry_set_size(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint64_t size);
/* Tag of a zone nobody attached to yet: owner or root. */
int registry_set_tag(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, const char *tag);

/*
 * Tickets prove to the control socket that a process opened the zone's file in
 * the FUSE view: issued per open file, redeemed once, for the access that open
 * was granted.
 */
int registry_ticket_issue(struct registry *reg, struct zone *z, bool writable, uint64_t ret_ticket[2]);
void registry_ticket_revoke(struct registry *reg, const uint64_t ticket[2]);
int registry_ticket_redeem(struct registry *reg, const struct caller *c, const uint64_t ticket[2], bool want_write,
                           struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info, bool *ret_existed);

/*
 * Applies a (re)loaded config: its limits, then its zones. Keeps unchanged
 * zones, creates new ones, refuses a changed size or tag (the old zone and its
 * data stay) and retires zones no longer declared (unlinked: memory freed
 * after the last detach). Each outcome worth a log line goes to report (with
 * a syslog priority), outside the lock. Returns the number of declarations
 * refused, or a negative errno.
 */
typedef void (*registry_report_t)(void *userdata, int priority, const char *msg);
int registry_apply_config(struct registry *reg, const struct registry_limits *lim, const struct zone_decl *decls,
                          size_t n_decls, registry_report_t report, void *userdata);
