/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <search.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "registry.h"
#include "shmzone.h"
#include "zone.h"

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
};

/* Where name is in r->names, or where it would go; *ret_found says which. */
static size_t name_index(struct registry *r, const char *name, bool *ret_found) {
        size_t lo = 0, hi = r->n_names;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = strcmp(r->names[mid]->name, name);

                if (c == 0) {
                        *ret_found = true;
                        return mid;
                }
                if (c < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *ret_found = false;
        return lo;
}

static int names_insert(struct registry *r, struct zone *z) {
        bool found;
        size_t i = name_index(r, z->name, &found);

        if (found)
                return -EEXIST;
        if (r->n_names == r->cap_names) {
                size_t cap = MAX(r->cap_names * 2, (size_t) 64);
                struct zone **v = realloc(r->names, cap * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                r->names = v;
                r->cap_names = cap;
        }
        memmove(r->names + i + 1, r->names + i, (r->n_names - i) * sizeof(*r->names));
        r->names[i] = z;
        r->n_names++;
        return 0;
}

static void names_remove(struct registry *r, struct zone *z) {
        bool found;
        size_t i = name_index(r, z->name, &found);

        if (!found || r->names[i] != z)
                return;
        memmove(r->names + i, r->names + i + 1, (r->n_names - i - 1) * sizeof(*r->names));
        r->n_names--;
}

static int zone_ino_cmp(const void *a, const void *b) {
        uint64_t x = ((const struct zone *) a)->ino, y = ((const struct zone *) b)->ino;

        return x < y ? -1 : x > y;
}

int registry_new(uint64_t budget, uint64_t quota, uint64_t max_zones, struct registry **ret) {
        struct registry *r;

        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        (void) pthread_mutex_init(&r->lock, NULL);
        r->budget = budget;
        r->quota = quota;
        r->max_zones = max_zones;
        r->next_ino = REGISTRY_FIRST_INO;
        r->next_generation = 1;
        *ret = r;
        return 0;
}

static void zone_destroy(struct zone *z) {
        if (z->view_map)
                (void) munmap(z->view_map, z->map_size);
        safe_close(z->fd);
        free(z);
}

struct registry *registry_free(struct registry *r) {
        if (!r)
                return NULL;
        /* Tickets never redeemed still hold their zones (unlinked ones only through them). */
        for (size_t i = 0; i < r->n_tickets; i++)
                if (--r->tickets[i].zone->refs == 0)
                        zone_destroy(r->tickets[i].zone);
        free(r->tickets);
        /* Zones still attached at exit go with the process; close what the tree holds. */
        for (size_t i = 0; i < r->n_names; i++) {
                struct zone *z = r->names[i];

                (void) tdelete(z, &r->by_ino, zone_ino_cmp);
                if (--z->refs == 0)
                        zone_destroy(z);
        }
        free(r->names);
        free(r->quotas);
        (void) pthread_mutex_destroy(&r->lock);
        free(r);
        return NULL;
}

void registry_set_observer(struct registry *r, registry_observer_t cb, void *userdata) {
        pthread_mutex_lock(&r->lock);
        r->observer = cb;
        r->observer_data = userdata;
        pthread_mutex_unlock(&r->lock);
}

void registry_get_stats(struct registry *r, struct registry_stats *ret) {
        pthread_mutex_lock(&r->lock);
        *ret = (struct registry_stats){
                .budget = r->budget,
                .budget_used = r->budget_used,
                .quota = r->quota,
                .zones = r->zones,
                .zones_unlinked = r->zones_unlinked,
        };
        pthread_mutex_unlock(&r->lock);
}

/* Observers are called with the lock held: they must only queue work (FUSE invalidation does). */
static void notify(struct registry *r, enum registry_event ev, const struct zone *z) {
        if (r->observer)
                r->observer(r->observer_data, ev, z->name, z->ino);
}

static bool caller_in_group(const struct caller *c, gid_t gid) {
        if (c->gid == gid)
                return true;
        for (size_t i = 0; i < c->n_groups; i++)
                if (c->groups[i] == gid)
                        return true;
        return false;
}

/* Mode bits as for a file: root passes, else owner, group (primary or supplementary) or other bits. */
static int caller_may_access(const struct caller *c, uint32_t uid, uint32_t gid, uint32_t mode, int want) {
        unsigned bits = 0, need = 0;

        if (c->uid == 0)
                return 0;
        if (c->uid == uid)
                bits = (mode >> 6) & 7;
        else if (caller_in_group(c, gid))
                bits = (mode >> 3) & 7;
        else
                bits = mode & 7;
        if (want & R_OK)
                need |= 4;
        if (want & W_OK)
                need |= 2;
        return (bits & need) == need ? 0 : -EACCES;
}

static struct zone *lookup(struct registry *r, const char *name) {
        bool found;
        size_t i = name_index(r, name, &found);

        return found ? r->names[i] : NULL;
}

/*
 * The zone of that name, if it is the one with inode number ino (0: whichever
 * it is). The FUSE view acts on inodes but the registry on names: a zone
 * removed and made again in between must not receive the change.
 */
static struct zone *lookup_as(struct registry *r, const char *name, uint64_t ino) {
        struct zone *z = lookup(r, name);

        return z && (ino == 0 || z->ino == ino) ? z : NULL;
}

static struct quota_entry *quota_entry(struct registry *r, uid_t uid, bool create) {
        struct quota_entry *q;

        for (size_t i = 0; i < r->n_quotas; i++)
                if (r->quotas[i].uid == uid)
                        return &r->quotas[i];
        if (!create)
                return NULL;
        q = realloc(r->quotas, (r->n_quotas + 1) * sizeof(*q));
        if (!q)
                return NULL;
        r->quotas = q;
        q[r->n_quotas] = (struct quota_entry){ .uid = uid };
        return &q[r->n_quotas++];
}

/*
 * Charges map_size more bytes to the budget and, for zones a client made
 * (z->counted), to the quota of the uid that made them. Declared zones are the
 * administrator's: they count against nobody's quota.
 */
static int charge(struct registry *r, const struct zone *z, uint64_t map_size) {
        struct quota_entry *q = NULL;

        if (map_size > r->budget || r->budget_used > r->budget - map_size)
                return -ENOSPC;
        if (z->counted) {
                q = quota_entry(r, z->charged_uid, true);
                if (!q)
                        return -ENOMEM;
                if (map_size > r->quota || q->used > r->quota - map_size)
                        return -EDQUOT;
                q->used += map_size;
        }
        r->budget_used += map_size;
        return 0;
}

static void uncharge(struct registry *r, const struct zone *z, uint64_t map_size) {
        struct quota_entry *q = z->counted ? quota_entry(r, z->charged_uid, false) : NULL;

        if (q)
                q->used -= MIN(q->used, map_size);
        r->budget_used -= MIN(r->budget_used, map_size);
}

/* Every zone costs the daemon an fd and some memory, whatever its size: count them per uid too. */
static int count_zone(struct registry *r, uid_t uid) {
        struct quota_entry *q = quota_entry(r, uid, true);

        if (!q)
                return -ENOMEM;
        if (q->zones >= r->max_zones)
                return -EDQUOT;
        q->zones++;
        return 0;
}

static void uncount_zone(struct registry *r, uid_t uid) {
        struct quota_entry *q = quota_entry(r, uid, false);

        if (q && q->zones > 0)
                q->zones--;
}

static void zone_info_fill(const struct zone *z, struct zone_info *ret) {
        *ret = (struct zone_info){
                .ino = z->ino,
                .size = z->size,
                .map_size = z->map_size,
                .generation = z->generation,
                .created_usec = z->created_usec,
                .mtime_usec = z->mtime_usec,
                .ctime_usec = z->ctime_usec,
                .uid = z->uid,
                .gid = z->gid,
                .mode = z->mode,
                .attached = z->attached,
                .declared = z->declared,
                .unlinked = z->unlinked,
                .pending = z->fd < 0,
        };
        memcpy(ret->name, z->name, sizeof(ret->name));
        memcpy(ret->tag, z->tag, sizeof(ret->tag));
}

static void unref_locked(struct registry *r, struct zone *z) {
        if (--z->refs > 0)
                return;
        if (z->map_size > 0)
                uncharge(r, z, z->map_size);
        if (z->counted)
                uncount_zone(r, z->charged_uid);
        if (z->unlinked)
                r->zones_unlinked--;
        zone_destroy(z);
}

/* Makes the memfd of z at its size: sealed so that nobody can shrink it under the others. */
static int zone_make_memory(struct zone *z, uint64_t size) {
        _cleanup_close_ int fd = -EBADF;
        struct shmz_zone_header h;
        char memfd_name[16 + SHMZ_NAME_BUF];
        uint64_t map_size = zone_map_size(size);

        if (size == 0 || map_size == 0)
                return -EINVAL;
        (void) snprintf(memfd_name, sizeof(memfd_name), "shmzone:%s", z->name);
        fd = memfd_create(memfd_name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
                return -errno;
        if (ftruncate(fd, (off_t) map_size) < 0)
                return -errno;
        zone_header_init(&h, z->name, z->tag, map_size, z->uid, z->gid, z->mode, z->generation);
        h.created_usec = z->created_usec;
        if (pwrite(fd, &h, sizeof(h), 0) != (ssize_t) sizeof(h))
                return -EIO;
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
                return -errno;
        /*
         * A memfd's inode is mode 0777: anyone holding a read-only fd could
         * reopen /proc/self/fd/N for writing. Owner-read only, so that only the
         * daemon's uid (which hands out the writable fds anyway) can reopen it.
         */
        if (fchmod(fd, 0400) < 0)
                return -errno;
        z->size = map_size - SHMZ_ZONE_HEADER_SIZE;
        z->map_size = map_size;
        /* zone_fd() reads it without the lock (FUSE reads of a zone that was pending a moment ago): sizes first. */
        __atomic_store_n(&z->fd, TAKE_FD(fd), __ATOMIC_RELEASE);
        return 0;
}

/* A new named zone; size 0 leaves it pending (no memory until a size is fixed). */
static int zone_create_locked(struct registry *r, const char *name, const char *tag, uint64_t size, uid_t uid,
                              gid_t gid, uint32_t mode, bool declared, struct zone **ret) {
        uint64_t now = now_usec(CLOCK_REALTIME), map_size = 0;
        struct zone *z;
        int r_;

        if (size > 0) {
                map_size = zone_map_size(size);
                if (map_size == 0)
                        return -EINVAL;
        }
        z = calloc(1, sizeof(*z));
        if (!z)
                return -ENOMEM;
        *z = (struct zone){
                .generation = r->next_generation,
                .created_usec = now,
                .mtime_usec = now,
                .ctime_usec = now,
                .uid = uid,
                .gid = gid,
                .mode = mode & 07777,
                .charged_uid = uid,
                .fd = -EBADF,
                .refs = 1,
                .declared = declared,
                .counted = !declared,
        };
        strncpy_buf(z->name, sizeof(z->name), name);
        strncpy_buf(z->tag, sizeof(z->tag), tag ?: "");

        if (z->counted) {
                r_ = count_zone(r, uid);
                if (r_ < 0)
                        goto fail_free;
        }
        if (size > 0) {
                r_ = charge(r, z, map_size);
                if (r_ < 0)
                        goto fail_count;
                r_ = zone_make_memory(z, size);
                if (r_ < 0)
                        goto fail_charge;
        }
        z->ino = r->next_ino;
        r_ = names_insert(r, z);
        if (r_ < 0)
                goto fail_charge;
        if (!tsearch(z, &r->by_ino, zone_ino_cmp)) {
                names_remove(r, z);
                r_ = -ENOMEM;
                goto fail_charge;
        }
        r->next_ino++;
        r->next_generation++;
        r->zones++;
        notify(r, REGISTRY_ZONE_ADDED, z);
        *ret = z;
        return 0;

fail_charge:
        if (map_size > 0)
                uncharge(r, z, map_size);
fail_count:
        if (z->counted)
                uncount_zone(r, uid);
fail_free:
        zone_destroy(z);
        return r_;
}

/*
 * The header's copy of the ACL follows the registry's, so that the zone stays
 * self-describing. The registry's copy is the one that counts: clients with
 * write access can scribble on the header.
 */
static void header_sync_acl(struct zone *z) {
        uint32_t acl[3] = { z->uid, z->gid, z->mode };

        if (z->fd >= 0)
                (void) pwrite(z->fd, acl, sizeof(acl), offsetof(struct shmz_zone_header, uid));
}

/* Removes the name; the memory lives on while attachments or open files hold it. */
static void unlink_locked(struct registry *r, struct zone *z) {
        names_remove(r, z);
        (void) tdelete(z, &r->by_ino, zone_ino_cmp);
        z->unlinked = true;
        r->zones--;
        r->zones_unlinked++;
        notify(r, REGISTRY_ZONE_REMOVED, z);
        unref_locked(r, z);
}

static int reopen_fd(int fd, bool rdonly) {
        char path[64];
        int nfd;

        if (!rdonly) {
                nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
                return nfd < 0 ? -errno : nfd;
        }
        /* A new open file description, read-only: the client cannot mprotect its way to writing. */
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        nfd = open(path, O_RDONLY | O_CLOEXEC);
        return nfd < 0 ? -errno : nfd;
}

static int attach_locked(struct registry *r, struct zone *z, bool rdonly, struct zone **ret_zone, int *ret_fd,
                         struct zone_info *ret_info, bool *ret_existed) {
        int fd;

        if (z->fd < 0)
                return -EAGAIN; /* pending: its size is not fixed yet */
        fd = reopen_fd(z->fd, rdonly);
        if (fd < 0)
                return fd;
        if (ret_existed)
                *ret_existed = z->used;
        z->used = true;
        z->refs++;
        z->attached++;
        if (ret_info)
                zone_info_fill(z, ret_info);
        *ret_zone = z;
        *ret_fd = fd;
        return 0;
}

int registry_open(struct registry *r, const struct caller *c, const char *name, uint64_t size, const char *tag,
                  unsigned flags, struct zone **ret_zone, int *ret_fd, struct zone_info *ret_info, bool *ret_existed) {
        bool rdonly = flags & SHMZ_RDONLY;
        struct zone *z;
        int r_;

        if (!shmz_name_is_valid(name) || (tag && !shmz_tag_is_valid(tag)))
                return -EINVAL;
        if (flags & ~(unsigned) (SHMZ_CREATE | SHMZ_EXCL | SHMZ_RDONLY))
                return -EINVAL;
        tag = tag ?: "";

        pthread_mutex_lock(&r->lock);
        z = lookup(r, name);
        if (!z) {
                if (!(flags & SHMZ_CREATE)) {
                        r_ = -ENOENT;
                        goto out;
                }
                if (size == 0) {
                        r_ = -EINVAL;
                        goto out;
                }
                r_ = zone_create_locked(r, name, tag, size, c->uid, c->gid, 0600, false, &z);
                if (r_ < 0)
                        goto out;
        } else {
                /* Permission first, so that a stranger learns nothing of tag or size. */
                r_ = caller_may_access(c, z->uid, z->gid, z->mode, rdonly ? R_OK : R_OK | W_OK);
                if (r_ < 0)
                        goto out;
                if ((flags & (SHMZ_CREATE | SHMZ_EXCL)) == (SHMZ_CREATE | SHMZ_EXCL) || !streq(z->tag, tag)) {
                        r_ = -EEXIST;
                        goto out;
                }
                /* Sizes are rounded up to whole pages: compare what the zone would take. */
                if (size != 0 && zone_map_size(size) != z->map_size && z->fd >= 0) {
                        r_ = -EINVAL;
                        goto out;
                }
        }
        r_ = attach_locked(r, z, rdonly, ret_zone, ret_fd, ret_info, ret_existed);
out:
        pthread_mutex_unlock(&r->lock);
        return r_;
}

void registry_detach(struct registry *r, struct zone *z) {
        if (!z)
                return;
        /* No observer call: "attached" is no file attribute (the view reads it afresh as an xattr). */
        pthread_mutex_lock(&r->lock);
        z->attached--;
        unref_locked(r, z);
        pthread_mutex_unlock(&r->lock);
}

static bool caller_owns(const struct caller *c, const struct zone *z) {
        return c->uid == 0 || c->uid == z->uid;
}

int registry_unlink(struct registry *r, const struct caller *c, const char *name) {
        struct zone *z;
        int r_ = 0;

        if (!shmz_name_is_valid(name))
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        z = lookup(r, name);
        if (!z)
                r_ = -ENOENT;
        else if (!caller_owns(c, z))
                r_ = -EPERM;
        else
                unlink_locked(r, z);
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_setattr(struct registry *r, const struct caller *c, const char *name, uint64_t ino, uint32_t mask,
                     uint32_t mode, uint32_t uid, uint32_t gid) {
        struct zone *z;
        int r_ = 0;

        if (!shmz_name_is_valid(name) || (mask & ~(SHMZ_SETATTR_MODE | SHMZ_SETATTR_UID | SHMZ_SETATTR_GID)))
                return -EINVAL;
        if ((mask & SHMZ_SETATTR_MODE) && (mode & ~07777u))
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        z = lookup_as(r, name, ino);
        if (!z) {
                r_ = -ENOENT;
                goto out;
        }
        /* chown(2) rules: only root gives a zone away; the owner may pick one of its groups. */
        if ((mask & SHMZ_SETATTR_UID) && uid != z->uid && c->uid != 0) {
                r_ = -EPERM;
                goto out;
        }
        if ((mask & SHMZ_SETATTR_GID) && gid != z->gid && c->uid != 0 &&
            !(c->uid == z->uid && caller_in_group(c, gid))) {
                r_ = -EPERM;
                goto out;
        }
        if ((mask & (SHMZ_SETATTR_MODE | SHMZ_SETATTR_UID | SHMZ_SETATTR_GID)) && !caller_owns(c, z)) {
                r_ = -EPERM;
                goto out;
        }
        if (mask & SHMZ_SETATTR_MODE)
                z->mode = mode;
        if (mask & SHMZ_SETATTR_UID)
                z->uid = uid;
        if (mask & SHMZ_SETATTR_GID)
                z->gid = gid;
        z->ctime_usec = now_usec(CLOCK_REALTIME);
        header_sync_acl(z);
        notify(r, REGISTRY_ZONE_CHANGED, z);
out:
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_info(struct registry *r, const char *name, struct zone_info *ret) {
        struct zone *z;
        int r_ = 0;

        if (!shmz_name_is_valid(name))
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        z = lookup(r, name);
        if (z)
                zone_info_fill(z, ret);
        else
                r_ = -ENOENT;
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_list(struct registry *r, struct zone_info **ret, size_t *ret_n) {
        struct zone_info *v;
        size_t n;

        pthread_mutex_lock(&r->lock);
        n = r->n_names;
        v = calloc(n + 1, sizeof(*v));
        for (size_t i = 0; v && i < n; i++)
                zone_info_fill(r->names[i], &v[i]);
        pthread_mutex_unlock(&r->lock);
        if (!v)
                return -ENOMEM;
        *ret = v;
        *ret_n = n;
        return 0;
}

int registry_list_page(struct registry *r, const char *after, struct zone_info *ret, size_t max, size_t *ret_n) {
        bool found;
        size_t i, n = 0;

        pthread_mutex_lock(&r->lock);
        i = name_index(r, after, &found);
        if (found)
                i++;
        for (; i < r->n_names && n < max; i++)
                zone_info_fill(r->names[i], &ret[n++]);
        pthread_mutex_unlock(&r->lock);
        *ret_n = n;
        return 0;
}

static struct zone *lookup_ino(struct registry *r, uint64_t ino) {
        struct zone key = { .ino = ino }, **p;

        p = tfind(&key, &r->by_ino, zone_ino_cmp);
        return p ? *p : NULL;
}

int registry_info_by_ino(struct registry *r, uint64_t ino, struct zone_info *ret) {
        struct zone *z;
        int r_ = 0;

        pthread_mutex_lock(&r->lock);
        z = lookup_ino(r, ino);
        if (z)
                zone_info_fill(z, ret);
        else
                r_ = -ENOENT;
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_ref_by_ino(struct registry *r, uint64_t ino, struct zone **ret) {
        struct zone *z;

        pthread_mutex_lock(&r->lock);
        z = lookup_ino(r, ino);
        if (z)
                z->refs++;
        pthread_mutex_unlock(&r->lock);
        if (!z)
                return -ENOENT;
        *ret = z;
        return 0;
}

void registry_unref(struct registry *r, struct zone *z) {
        if (!z)
                return;
        pthread_mutex_lock(&r->lock);
        unref_locked(r, z);
        pthread_mutex_unlock(&r->lock);
}

void registry_info_of(struct registry *r, struct zone *z, struct zone_info *ret) {
        pthread_mutex_lock(&r->lock);
        zone_info_fill(z, ret);
        pthread_mutex_unlock(&r->lock);
}

int zone_fd(struct zone *z) {
        return __atomic_load_n(&z->fd, __ATOMIC_ACQUIRE);
}

int zone_view_map(struct zone *z, const void **ret) {
        void *m = __atomic_load_n(&z->view_map, __ATOMIC_ACQUIRE), *expected = NULL;
        int fd = zone_fd(z);

        if (m) {
                *ret = m;
                return 0;
        }
        if (fd < 0)
                return -EAGAIN;
        /* Sealed against shrinking: the mapping can never SIGBUS. */
        m = mmap(NULL, z->map_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
                return -errno;
        /* Two first readers at once: one mapping stays. */
        if (!__atomic_compare_exchange_n(&z->view_map, &expected, m, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                (void) munmap(m, z->map_size);
                m = expected;
        }
        *ret = m;
        return 0;
}

void registry_touch(struct registry *r, struct zone *z) {
        pthread_mutex_lock(&r->lock);
        z->used = true;
        z->mtime_usec = now_usec(CLOCK_REALTIME);
        pthread_mutex_unlock(&r->lock);
}

int registry_create_pending(struct registry *r, const struct caller *c, const char *name, uint32_t mode,
                            struct zone_info *ret) {
        struct zone *z;
        int r_;

        if (!shmz_name_is_valid(name))
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        if (lookup(r, name))
                r_ = -EEXIST;
        else
                r_ = zone_create_locked(r, name, "", 0, c->uid, c->gid, mode, false, &z);
        if (r_ >= 0 && ret)
                zone_info_fill(z, ret);
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_set_size(struct registry *r, const struct caller *c, const char *name, uint64_t ino, uint64_t size) {
        struct zone *z;
        uint64_t map_size;
        int r_;

        pthread_mutex_lock(&r->lock);
        z = lookup_as(r, name, ino);
        if (!z) {
                r_ = -ENOENT;
                goto out;
        }
        if (z->fd >= 0) {
                r_ = size == z->size ? 0 : -EINVAL; /* zones never change size */
                goto out;
        }
        r_ = caller_may_access(c, z->uid, z->gid, z->mode, W_OK);
        if (r_ < 0)
                goto out;
        map_size = zone_map_size(size);
        if (size == 0 || map_size == 0) {
                r_ = -EINVAL;
                goto out;
        }
        r_ = charge(r, z, map_size);
        if (r_ < 0)
                goto out;
        r_ = zone_make_memory(z, size);
        if (r_ < 0) {
                uncharge(r, z, map_size);
                goto out;
        }
        z->mtime_usec = z->ctime_usec = now_usec(CLOCK_REALTIME);
        notify(r, REGISTRY_ZONE_CHANGED, z);
out:
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_set_tag(struct registry *r, const struct caller *c, const char *name, uint64_t ino, const char *tag) {
        struct zone *z;
        int r_ = 0;

        if (!shmz_tag_is_valid(tag))
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        z = lookup_as(r, name, ino);
        if (!z)
                r_ = -ENOENT;
        else if (!caller_owns(c, z))
                r_ = -EPERM;
        else if (z->used || z->attached > 0)
                r_ = -EBUSY; /* a tag says what the bytes mean: fixed once somebody used them */
        else {
                strncpy_buf(z->tag, sizeof(z->tag), tag);
                if (z->fd >= 0) {
                        struct shmz_zone_header h;

                        /* Keep the self-describing header in step. */
                        if (pread(z->fd, &h, sizeof(h), 0) == (ssize_t) sizeof(h)) {
                                strncpy_buf(h.tag, sizeof(h.tag), tag);
                                (void) pwrite(z->fd, h.tag, sizeof(h.tag), offsetof(struct shmz_zone_header, tag));
                        }
                }
                z->ctime_usec = now_usec(CLOCK_REALTIME);
                notify(r, REGISTRY_ZONE_CHANGED, z);
        }
        pthread_mutex_unlock(&r->lock);
        return r_;
}

int registry_ticket_issue(struct registry *r, struct zone *z, bool writable, uint64_t ret_ticket[2]) {
        struct ticket *t;
        uint64_t id[2];

        /* 128 random bits: guessing one is not a way in. */
        if (getrandom(id, sizeof(id), 0) != (ssize_t) sizeof(id))
                return -EIO;
        pthread_mutex_lock(&r->lock);
        t = realloc(r->tickets, (r->n_tickets + 1) * sizeof(*t));
        if (!t) {
                pthread_mutex_unlock(&r->lock);
                return -ENOMEM;
        }
        r->tickets = t;
        z->refs++;
        t[r->n_tickets++] = (struct ticket){ .id = { id[0], id[1] }, .zone = z, .writable = writable };
        pthread_mutex_unlock(&r->lock);
        ret_ticket[0] = id[0];
        ret_ticket[1] = id[1];
        return 0;
}

static ssize_t ticket_find(struct registry *r, const uint64_t id[2]) {
        for (size_t i = 0; i < r->n_tickets; i++)
                if (r->tickets[i].id[0] == id[0] && r->tickets[i].id[1] == id[1])
                        return (ssize_t) i;
        return -1;
}

static struct zone *ticket_take_locked(struct registry *r, size_t i) {
        struct zone *z = r->tickets[i].zone;

        r->tickets[i] = r->tickets[--r->n_tickets];
        return z;
}

void registry_ticket_revoke(struct registry *r, const uint64_t ticket[2]) {
        ssize_t i;

        pthread_mutex_lock(&r->lock);
        i = ticket_find(r, ticket);
        if (i >= 0)
                unref_locked(r, ticket_take_locked(r, (size_t) i));
        pthread_mutex_unlock(&r->lock);
}

int registry_ticket_redeem(struct registry *r, const uint64_t ticket[2], bool want_write, struct zone **ret_zone,
                           int *ret_fd, struct zone_info *ret_info, bool *ret_existed) {
        struct zone *z;
        bool writable;
        ssize_t i;
        int r_;

        pthread_mutex_lock(&r->lock);
        i = ticket_find(r, ticket);
        if (i < 0) {
                pthread_mutex_unlock(&r->lock);
                return -EACCES;
        }
        writable = r->tickets[i].writable;
        z = ticket_take_locked(r, (size_t) i); /* one use, whatever the outcome */
        if (want_write && !writable)
                r_ = -EACCES;
        else
                r_ = attach_locked(r, z, !want_write, ret_zone, ret_fd, ret_info, ret_existed);
        unref_locked(r, z);
        pthread_mutex_unlock(&r->lock);
        return r_;
}

static bool decl_same_acl(const struct zone *z, const struct zone_decl *d) {
        return z->uid == d->uid && z->gid == d->gid && z->mode == d->mode;
}

/* Applies one declaration under the lock; what to log is written to msg (logged once the lock is gone). */
static int apply_decl_locked(struct registry *r, const struct zone_decl *d, char *msg, size_t size) {
        struct zone *z = lookup(r, d->name);
        int r_;

        if (!z) {
                r_ = zone_create_locked(r, d->name, d->tag, d->size, d->uid, d->gid, d->mode, true, &z);
                if (r_ < 0)
                        (void) snprintf(msg, size, "Zone '%s': cannot create it: %s", d->name, strerror(-r_));
                else
                        (void) snprintf(msg, size, "Zone '%s': created, %" PRIu64 " bytes.", d->name, z->size);
                return r_;
        }
        /*
         * A zone some client made under that name is never adopted: its creator
         * may still hold a writable mapping of what would become the declared zone.
         */
        if (!z->declared) {
                (void) snprintf(msg, size,
                                "Zone '%s': a zone of that name was created by uid %u; not declaring it (remove "
                                "that zone and reload).",
                                d->name, (unsigned) z->charged_uid);
                return -EEXIST;
        }
        if (zone_map_size(d->size) != z->map_size) {
                (void) snprintf(msg, size,
                                "Zone '%s': size changed from %" PRIu64 " to %" PRIu64
                                " bytes; keeping the running zone and its data (remove it to resize).",
                                d->name, z->size, d->size);
                return -EINVAL;
        }
        if (!streq(z->tag, d->tag)) {
                (void) snprintf(msg, size, "Zone '%s': tag changed from '%s' to '%s'; keeping the running zone.",
                                d->name, z->tag, d->tag);
                return -EEXIST;
        }
        if (!decl_same_acl(z, d)) {
                z->uid = d->uid;
                z->gid = d->gid;
                z->mode = d->mode;
                z->ctime_usec = now_usec(CLOCK_REALTIME);
                header_sync_acl(z);
                notify(r, REGISTRY_ZONE_CHANGED, z);
                (void) snprintf(msg, size, "Zone '%s': owner %u:%u, mode %04o.", d->name, d->uid, d->gid, d->mode);
        }
        return 0;
}

static bool is_declared_in(const struct config *cfg, const char *name) {
        for (size_t i = 0; i < cfg->n_zones; i++)
                if (streq(cfg->zones[i].name, name))
                        return true;
        return false;
}

int registry_apply_config(struct registry *r, const struct config *cfg) {
        _cleanup_free_ struct zone_info *v = NULL;
        int refused = 0, r_;
        size_t n;

        pthread_mutex_lock(&r->lock);
        r->budget = cfg->budget;
        r->quota = cfg->quota;
        r->max_zones = cfg->max_zones;
        pthread_mutex_unlock(&r->lock);

        /* One declaration at a time, logging outside the lock: a slow journal must not stall clients. */
        for (size_t i = 0; i < cfg->n_zones; i++) {
                char msg[512] = "";

                pthread_mutex_lock(&r->lock);
                r_ = apply_decl_locked(r, &cfg->zones[i], msg, sizeof(msg));
                pthread_mutex_unlock(&r->lock);
                if (r_ < 0) {
                        log_error("%s", msg);
                        refused++;
                } else if (msg[0])
                        log_info("%s", msg);
        }

        /* Declared zones that the new config no longer has are retired. */
        r_ = registry_list(r, &v, &n);
        if (r_ < 0)
                return r_;
        for (size_t i = 0; i < n; i++) {
                struct zone *z;
                unsigned attached = 0;

                if (!v[i].declared || is_declared_in(cfg, v[i].name))
                        continue;
                pthread_mutex_lock(&r->lock);
                z = lookup(r, v[i].name);
                if (z && z->declared) {
                        attached = z->attached;
                        z->declared = false;
                        unlink_locked(r, z);
                }
                pthread_mutex_unlock(&r->lock);
                if (z)
                        log_info("Zone '%s': no longer declared; retired (freed after its last detach, %u attached).",
                                 v[i].name, attached);
        }
        return refused;
}
