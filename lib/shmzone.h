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

void *shmz_zone_base(struct shmz_zone *z);           /* first byte the caller may use */
uint64_t shmz_zone_size(const struct shmz_zone *z);  /* bytes usable from base */
int shmz_zone_existed(const struct shmz_zone *z);    /* 1 if its data predates this open */
const char *shmz_zone_name(const struct shmz_zone *z);
int shmz_zone_unlink(struct shmz_client *c, const char *name);

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
};

int shmz_zone_stat(struct shmz_client *c, const char *name, struct shmz_zone_stat *ret);
/* Calls cb for each zone; a negative return from cb stops the walk and is returned. */
int shmz_zone_list(struct shmz_client *c, int (*cb)(const struct shmz_zone_stat *st, void *userdata),
                   void *userdata);
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
};
int shmz_daemon_status(struct shmz_client *c, struct shmz_daemon_status *ret);

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

/* ---- robust cross-process lock (mutex.c) ----------------------------------------------- */

#define SHMZ_OWNER_DEAD 1 /* returned by lock calls: you hold it, its last owner died holding it */

struct shmz_mutex *shmz_zone_mutex(struct shmz_zone *z);
int shmz_mutex_init(struct shmz_mutex *m);            /* a lock placed anywhere in a zone */
int shmz_mutex_lock(struct shmz_mutex *m);            /* 0 or SHMZ_OWNER_DEAD */
int shmz_mutex_trylock(struct shmz_mutex *m);         /* ... or -EBUSY */
int shmz_mutex_timedlock(struct shmz_mutex *m, uint64_t timeout_ns); /* ... or -ETIMEDOUT */
int shmz_mutex_unlock(struct shmz_mutex *m);          /* -EPERM if the caller does not hold it */
int shmz_mutex_consistent(struct shmz_mutex *m);      /* after repairing what the dead owner left */
int shmz_mutex_force_unlock(struct shmz_mutex *m, pid_t pid); /* nginx parity: release a lock held by pid */

#ifdef __cplusplus
}
#endif

#endif
