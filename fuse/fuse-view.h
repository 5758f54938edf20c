/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The FUSE view of the registry: its own thread with its own sd_event loop.
 * Started by the main thread after the registry exists; stopped (and
 * unmounted) before the registry is freed.
 *
 *   <mount>/zones/<name>     the zone's usable bytes (offset 0 = first byte after the header)
 *   <mount>/segments/<id>    read-only bytes of a port segment  (a provider)
 *   <mount>/ports/<name>/    a published port                   (a provider)
 *   <mount>/status, metrics  daemon-wide figures (text, Prometheus)
 *   <mount>/socket           symlink to the control socket (shmz_zone_open_path follows it)
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

struct daemon;
struct fuse_view;

/* Clears a stale mount at mountpoint, mounts, starts the thread. */
int fuse_view_start(struct daemon *d, const char *mountpoint, struct fuse_view **ret);
/* Stops the thread and unmounts. NULL is fine. */
void fuse_view_stop(struct fuse_view *v);

/*
 * Providers: segments/ and ports/ are filled by whoever owns those objects.
 * The view asks the provider (from the FUSE thread, without any view lock
 * held) and never caches what it answers beyond the kernel's short timeouts.
 * An object is a read-only file or a directory; ids are the provider's own,
 * 1 .. FUSE_VIEW_ID_MAX, stable while the object lives and never reused for
 * another object (they become inode numbers). parent 0 is the provider's
 * top directory (segments/ or ports/); a directory object's id is the parent
 * of its children.
 */
enum fuse_view_dir {
        FUSE_VIEW_SEGMENTS,
        FUSE_VIEW_PORTS,
        _FUSE_VIEW_DIR_MAX,
};

#define FUSE_VIEW_ID_MAX ((UINT64_C(1) << 56) - 1)

struct fuse_view_entry {
        char name[SHMZ_NAME_BUF];
        uint64_t id;
        uint64_t size;
        uint32_t uid, gid;
        uint32_t mode; /* S_IFREG or S_IFDIR | permission bits (writes are refused whatever they say) */
        uint64_t mtime_usec;
};

struct fuse_view_provider {
        /* The children of parent, in a stable order; *ret is free()d by the view. */
        int (*list)(void *userdata, uint64_t parent, struct fuse_view_entry **ret, size_t *ret_n);
        /* One child of parent by name: 0 or -ENOENT. */
        int (*lookup)(void *userdata, uint64_t parent, const char *name, struct fuse_view_entry *ret);
        /* An object by id: 0 or -ENOENT. */
        int (*get)(void *userdata, uint64_t id, struct fuse_view_entry *ret);
        /* Bytes of a file object: the count copied (0 at or past the end) or -errno. May be NULL. */
        ssize_t (*read)(void *userdata, uint64_t id, void *buf, size_t size, uint64_t offset);
};

/*
 * Hooks a provider into its directory (any thread; NULL p unhooks it). The FUSE
 * thread may still be inside the old provider's calls when this returns: free
 * the old userdata only after fuse_view_stop().
 */
void fuse_view_register(struct fuse_view *v, enum fuse_view_dir dir, const struct fuse_view_provider *p,
                        void *userdata);
/*
 * Tells the view that an object appeared, changed or went away, so that the
 * kernel forgets what it cached. Only queues work: safe under the provider's
 * own locks, from any thread. parent as in the provider (0 = top directory).
 */
void fuse_view_changed(struct fuse_view *v, enum fuse_view_dir dir, uint64_t parent, const char *name, uint64_t id);
