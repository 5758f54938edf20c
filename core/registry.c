/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The zone table: zones by name and by inode number, their life (create,
 * attach, detach, unlink, the last reference), and the lock that guards it
 * all. ACL, quota, memory, tickets and reload have files of their own.
 */
#include <fcntl.h>
#include <search.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "registry-internal.h"
#include "zone-header.h"

static pid_t gettid_cached(void) {
        static __thread pid_t tid;

        if (tid == 0)
                tid = (pid_t) syscall(SYS_gettid);
        return tid;
}

void registry_lock(struct registry *reg) {
        pthread_mutex_lock(&reg->lock);
        reg->owner = gettid_cached();
}

bool registry_locked_by_me(struct registry *reg) {
        return __atomic_load_n(&reg->owner, __ATOMIC_RELAXED) == gettid_cached();
}

/*
 * Delivers store changes in the order they were made: a chmod's removal and
 * store must reach systemd in that order across threads too, or a stale ACL
 * could be the one a restart finds. One thread delivers at a time; one that
 * finds a delivery running leaves its changes to it. The lock is not held
 * while delivering: the store talks to systemd.
 */
static void store_deliver(struct registry *reg, const struct registry_store *store, void *data,
                          struct registry_store_change *batch) {
        while (batch) {
                while (batch) {
                        struct registry_store_change *c = batch;

                        batch = c->next;
                        if (c->update) {
                                if (store->updated)
                                        store->updated(data, &c->id);
                        } else if (c->fd < 0)
                                store->removed(data, &c->id);
                        else
                                store->stored(data, &c->id, c->fd);
                        safe_close(c->fd);
                        free(c);
                }
                pthread_mutex_lock(&reg->lock);
                batch = reg->store_head;
                reg->store_head = reg->store_tail = NULL;
                if (!batch)
                        reg->store_delivering = false;
                pthread_mutex_unlock(&reg->lock);
        }
}

void registry_unlock(struct registry *reg) {
        struct registry_change changes[REGISTRY_MAX_CHANGES];
        struct registry_store_change *batch = NULL;
        registry_observer_t observer = reg->observer;
        const struct registry_store *store = reg->store;
        void *data = reg->observer_data, *store_data = reg->store_data;
        size_t n = reg->n_changes;

        assert_locked(reg);
        memcpy(changes, reg->changes, n * sizeof(changes[0]));
        reg->n_changes = 0;
        if (reg->store_head && !reg->store_delivering) {
                batch = reg->store_head;
                reg->store_head = reg->store_tail = NULL;
                reg->store_delivering = true;
        }
        reg->owner = 0;
        pthread_mutex_unlock(&reg->lock);
        /* Outside the lock: the store talks to systemd, the observer may call back into the registry. */
        store_deliver(reg, store, store_data, batch);
        for (size_t i = 0; observer && i < n; i++)
                observer(data, changes[i].ev, changes[i].name, changes[i].ino);
}

void zone_identity_of(const struct zone *z, struct zone_identity *ret) {
        *ret = (struct zone_identity){
                .uid = z->uid,
                .gid = z->gid,
                .mode = z->mode,
                .charged_uid = z->charged_uid,
                .declared = z->declared,
                .hist = {
                        .ino = z->ino,
                        .generation = z->generation,
                        .created_usec = z->created_usec,
                        .mtime_usec = z->mtime_usec,
                        .ctime_usec = z->ctime_usec,
                        .creator_pid = (uint32_t) z->creator_pid,
                },
        };
        strncpy_buf(ret->name, sizeof(ret->name), z->name);
        strncpy_buf(ret->hist.tag, sizeof(ret->hist.tag), z->tag);
}

/* The same FDNAME. */
static bool identity_eq(const struct zone_identity *a, const struct zone_identity *b) {
        return streq(a->name, b->name) && a->uid == b->uid && a->gid == b->gid && a->mode == b->mode &&
               a->charged_uid == b->charged_uid && a->declared == b->declared;
}

/* false if out of memory (the change is lost: a removal leaves a stale entry, a store an unkept zone). */
static bool store_queue(struct registry *reg, const struct zone_identity *id, int fd, bool update) {
        struct registry_store_change *c = malloc(sizeof(*c));

        assert_locked(reg);
        if (!c) {
                safe_close(fd);
                return false;
        }
        *c = (struct registry_store_change){ .id = *id, .fd = fd, .update = update };
        if (reg->store_tail)
                reg->store_tail->next = c;
        else
                reg->store_head = c;
        reg->store_tail = c;
        return true;
}

void registry_store_sync(struct registry *reg, struct zone *z) {
        struct zone_identity id;
        bool want = !z->unlinked && z->fd >= 0;
        int fd;

        assert_locked(reg);
        zone_identity_of(z, &id);
        if (z->stored && want && identity_eq(&id, &z->stored_id)) {
                /* The same FDNAME: only the history record may need the new tag or creator. */
                if (reg->store && (!streq(id.hist.tag, z->stored_id.hist.tag) ||
                                   id.hist.creator_pid != z->stored_id.hist.creator_pid))
                        (void) store_queue(reg, &id, -EBADF, true);
                z->stored_id = id;
                return;
        }
        if (z->stored) {
                /* The old name goes first: a restarted daemon must never find a stale ACL or an unlinked zone. */
                if (reg->store)
                        (void) store_queue(reg, &z->stored_id, -EBADF, false);
                z->stored = false;
        }
        if (!want || z->stored || !reg->store)
                return;
        /* A copy for the store to send once the lock is gone: z (and its fd) may be freed by then. */
        fd = fcntl(z->fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return; /* out of fds: the zone works, it only would not survive a restart */
        if (!store_queue(reg, &id, fd, false))
                return;
        z->stored = true;
        z->stored_id = id;
}

void registry_changed(struct registry *reg, enum registry_event ev, const struct zone *z) {
        struct registry_change *c;

        assert_locked(reg);
        /* A locked section touches one zone; more would be a bug of ours, not of a caller. */
        assert(reg->n_changes < REGISTRY_MAX_CHANGES);
        if (reg->n_changes >= REGISTRY_MAX_CHANGES)
                return;
        c = &reg->changes[reg->n_changes++];
        c->ev = ev;
        c->ino = z->ino;
        strncpy_buf(c->name, sizeof(c->name), z->name);
}

/* Where name is in reg->names, or where it would go; *ret_found says which. */
static size_t name_index(struct registry *reg, const char *name, bool *ret_found) {
        return sorted_name_index((void *const *) reg->names, reg->n_names, offsetof(struct zone, name), name,
                                 ret_found);
}

static int names_insert(struct registry *reg, struct zone *z) {
        bool found;
        size_t i = name_index(reg, z->name, &found);

        assert_locked(reg);
        if (found)
                return -EEXIST;
        if (reg->n_names == reg->cap_names) {
                size_t cap = MAX(reg->cap_names * 2, (size_t) 64);
                struct zone **v = realloc(reg->names, cap * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                reg->names = v;
                reg->cap_names = cap;
        }
        memmove(reg->names + i + 1, reg->names + i, (reg->n_names - i) * sizeof(*reg->names));
        reg->names[i] = z;
        reg->n_names++;
        return 0;
}

static void names_remove(struct registry *reg, struct zone *z) {
        bool found;
        size_t i = name_index(reg, z->name, &found);

        assert_locked(reg);
        if (!found || reg->names[i] != z)
                return;
        memmove(reg->names + i, reg->names + i + 1, (reg->n_names - i - 1) * sizeof(*reg->names));
        reg->n_names--;
}

static int zone_ino_cmp(const void *a, const void *b) {
        uint64_t x = ((const struct zone *) a)->ino, y = ((const struct zone *) b)->ino;

        return x < y ? -1 : x > y;
}

int registry_new(const struct registry_limits *lim, struct registry **ret) {
        struct registry *reg;

        reg = calloc(1, sizeof(*reg));
        if (!reg)
                return -ENOMEM;
        (void) pthread_mutex_init(&reg->lock, NULL);
        reg->budget = lim->budget;
        reg->quota = lim->quota;
        reg->max_zones = lim->max_zones;
        reg->next_ino = REGISTRY_FIRST_INO;
        reg->next_generation = 1;
        *ret = reg;
        return 0;
}

struct registry *registry_free(struct registry *reg) {
        if (!reg)
                return NULL;
        tickets_free(reg);
        /* Zones still attached at exit go with the process; close what the table holds. */
        for (size_t i = 0; i < reg->n_names; i++) {
                struct zone *z = reg->names[i];

                (void) tdelete(z, &reg->by_ino, zone_ino_cmp);
                if (--z->refs == 0)
                        zone_destroy(z);
        }
        while (reg->store_head) {
                struct registry_store_change *c = reg->store_head;

                reg->store_head = c->next;
                safe_close(c->fd);
                free(c);
        }
        free(reg->names);
        free(reg->quotas);
        (void) pthread_mutex_destroy(&reg->lock);
        free(reg);
        return NULL;
}

void registry_set_observer(struct registry *reg, registry_observer_t cb, void *userdata) {
        registry_lock(reg);
        reg->observer = cb;
        reg->observer_data = userdata;
        registry_unlock(reg);
}

void registry_set_store(struct registry *reg, const struct registry_store *store, void *userdata) {
        registry_lock(reg);
        reg->store = store;
        reg->store_data = userdata;
        registry_unlock(reg);
}

bool registry_has_store(struct registry *reg) {
        bool r;

        registry_lock(reg);
        r = reg->store != NULL;
        registry_unlock(reg);
        return r;
}

void registry_get_stats(struct registry *reg, struct registry_stats *ret) {
        registry_lock(reg);
        *ret = (struct registry_stats){
                .budget = reg->budget,
                .budget_used = reg->budget_used,
                .quota = reg->quota,
                .zones = reg->zones,
                .zones_unlinked = reg->zones_unlinked,
        };
        registry_unlock(reg);
}

struct zone *registry_lookup(struct registry *reg, const char *name) {
        bool found;
        size_t i = name_index(reg, name, &found);

        assert_locked(reg);
        return found ? reg->names[i] : NULL;
}

/*
 * The zone of that name, if it is the one with inode number ino (0: whichever
 * it is). The FUSE view acts on inodes but the registry on names: a zone
 * removed and made again in between must not receive the change.
 */
struct zone *registry_lookup_as(struct registry *reg, const char *name, uint64_t ino) {
        struct zone *z = registry_lookup(reg, name);

        assert_locked(reg);
        return z && (ino == 0 || z->ino == ino) ? z : NULL;
}

void zone_info_fill(const struct zone *z, struct shmz_msg_zone_info *ret) {
        *ret = (struct shmz_msg_zone_info){
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
                .holders = holders_processes(z),
                .flags = (z->declared ? SHMZ_ZONE_INFO_DECLARED : 0) | (z->unlinked ? SHMZ_ZONE_INFO_UNLINKED : 0) |
                         (z->fd < 0 ? SHMZ_ZONE_INFO_PENDING : 0),
        };
        memcpy(ret->name, z->name, sizeof(ret->name));
        memcpy(ret->tag, z->tag, sizeof(ret->tag));
}

void registry_unref_locked(struct registry *reg, struct zone *z) {
        assert_locked(reg);
        if (--z->refs > 0)
                return;
        if (z->map_size > 0)
                quota_uncharge(reg, z, z->map_size);
        if (z->counted)
                quota_uncount_zone(reg, z->charged_uid);
        if (z->unlinked)
                reg->zones_unlinked--;
        zone_destroy(z);
}

/* A new named zone; size 0 leaves it pending (no memory until a size is fixed). */
int registry_create_locked(struct registry *reg, const char *name, const char *tag, uint64_t size, uid_t uid, gid_t gid,
                           uint32_t mode, bool declared, struct zone **ret) {
        uint64_t now = now_usec(CLOCK_REALTIME), map_size = 0;
        struct zone *z;
        int r;

        assert_locked(reg);
        if (size > 0) {
                map_size = zone_map_size(size);
                if (map_size == 0)
                        return -EINVAL;
        }
        z = calloc(1, sizeof(*z));
        if (!z)
                return -ENOMEM;
        *z = (struct zone){
                .generation = reg->next_generation,
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
                r = quota_count_zone(reg, uid);
                if (r < 0)
                        goto fail_free;
        }
        if (size > 0) {
                r = quota_charge(reg, z, map_size);
                if (r < 0)
                        goto fail_count;
                r = zone_memory_make(z, size);
                if (r < 0)
                        goto fail_charge;
        }
        z->ino = reg->next_ino;
        r = names_insert(reg, z);
        if (r < 0)
                goto fail_charge;
        if (!tsearch(z, &reg->by_ino, zone_ino_cmp)) {
                names_remove(reg, z);
                r = -ENOMEM;
                goto fail_charge;
        }
        reg->next_ino++;
        reg->next_generation++;
        reg->zones++;
        registry_changed(reg, REGISTRY_ZONE_ADDED, z);
        registry_store_sync(reg, z);
        *ret = z;
        return 0;

fail_charge:
        if (map_size > 0)
                quota_uncharge(reg, z, map_size);
fail_count:
        if (z->counted)
                quota_uncount_zone(reg, uid);
fail_free:
        zone_destroy(z);
        return r;
}

void registry_reserve(struct registry *reg, uint64_t next_ino, uint64_t next_generation) {
        registry_lock(reg);
        reg->next_ino = MAX(reg->next_ino, next_ino);
        reg->next_generation = MAX(reg->next_generation, next_generation);
        registry_unlock(reg);
}

int registry_adopt_locked(struct registry *reg, struct zone *z) {
        int r, past;

        assert_locked(reg);
        if (registry_lookup(reg, z->name))
                return -EEXIST;
        /* Its recorded inode number, unless it is not one of a zone's or another zone has it. */
        if (z->ino < REGISTRY_FIRST_INO || z->ino >= UINT64_MAX / 2 || tfind(z, &reg->by_ino, zone_ino_cmp))
                z->ino = reg->next_ino;
        if (z->generation == 0 || z->generation >= UINT64_MAX / 2)
                z->generation = reg->next_generation;
        r = names_insert(reg, z);
        if (r < 0)
                return r;
        if (!tsearch(z, &reg->by_ino, zone_ino_cmp)) {
                names_remove(reg, z);
                return -ENOMEM;
        }
        past = quota_adopt(reg, z);
        if (past == -ENOMEM) {
                (void) tdelete(z, &reg->by_ino, zone_ino_cmp);
                names_remove(reg, z);
                return -ENOMEM;
        }
        reg->next_ino = MAX(reg->next_ino, z->ino + 1);
        reg->next_generation = MAX(reg->next_generation, z->generation + 1);
        reg->zones++;
        registry_changed(reg, REGISTRY_ZONE_ADDED, z);
        return past < 0 ? 1 : 0;
}

/* Removes the name; the memory lives on while attachments or open files hold it. */
void registry_unlink_locked(struct registry *reg, struct zone *z) {
        assert_locked(reg);
        names_remove(reg, z);
        (void) tdelete(z, &reg->by_ino, zone_ino_cmp);
        z->unlinked = true;
        reg->zones--;
        reg->zones_unlinked++;
        registry_changed(reg, REGISTRY_ZONE_REMOVED, z);
        registry_store_sync(reg, z);
        registry_unref_locked(reg, z);
}

int registry_attach_locked(struct registry *reg, struct zone *z, const struct caller *c, bool rdonly,
                           struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info,
                           bool *ret_existed) {
        int fd;

        assert_locked(reg);
        if (z->fd < 0)
                return -EAGAIN; /* pending: its size is not fixed yet */
        /* A re-attachment after a restart (no ret_fd) keeps the mapping it has: no new fd. */
        fd = ret_fd ? zone_memory_reopen(z, rdonly) : -EBADF;
        if (ret_fd && fd < 0)
                return fd;
        if (ret_existed)
                *ret_existed = z->used;
        z->used = true;
        z->refs++;
        z->attached++;
        holders_attach(z, c);
        if (ret_info)
                zone_info_fill(z, ret_info);
        *ret_zone = z;
        if (ret_fd)
                *ret_fd = fd;
        return 0;
}

int registry_reattach(struct registry *reg, const struct caller *c, const char *name, dev_t dev, ino_t ino, bool rdonly,
                      struct zone **ret_zone, struct shmz_msg_zone_info *ret_info) {
        struct stat st;
        struct zone *z;
        int r;

        if (!name_is_valid(name))
                return -EINVAL;
        registry_lock(reg);
        z = registry_lookup(reg, name);
        if (!z || z->fd < 0) {
                r = -ENOENT;
                goto out;
        }
        /* The current mode decides, whatever the caller was allowed before the restart. */
        r = acl_check_access(c, z->uid, z->gid, z->mode, rdonly ? R_OK : R_OK | W_OK);
        if (r < 0)
                goto out;
        /* The fd proves which zone the caller maps: ours of that name, not another one or its own memfd. */
        if (fstat(z->fd, &st) < 0) {
                r = -errno;
                goto out;
        }
        if (st.st_dev != dev || st.st_ino != ino) {
                r = -ESTALE;
                goto out;
        }
        r = registry_attach_locked(reg, z, c, rdonly, ret_zone, NULL, ret_info, NULL);
out:
        registry_unlock(reg);
        return r;
}

int registry_open(struct registry *reg, const struct caller *c, const char *name, uint64_t size, const char *tag,
                  unsigned flags, struct zone **ret_zone, int *ret_fd, struct shmz_msg_zone_info *ret_info,
                  bool *ret_existed) {
        bool rdonly = flags & SHMZ_RDONLY;
        struct zone *z;
        int r;

        if (!name_is_valid(name) || (tag && !tag_is_valid(tag)))
                return -EINVAL;
        if (flags & ~(unsigned) (SHMZ_CREATE | SHMZ_EXCL | SHMZ_RDONLY))
                return -EINVAL;
        tag = tag ?: "";

        registry_lock(reg);
        z = registry_lookup(reg, name);
        if (!z) {
                if (!(flags & SHMZ_CREATE)) {
                        r = -ENOENT;
                        goto out;
                }
                if (size == 0) {
                        r = -EINVAL;
                        goto out;
                }
                r = registry_create_locked(reg, name, tag, size, c->uid, c->gid, 0600, false, &z);
                if (r < 0)
                        goto out;
                z->creator_pid = c->pid;
                registry_store_sync(reg, z); /* the history record keeps the creator */
        } else {
                /* Permission first, so that a stranger learns nothing of tag or size. */
                r = acl_check_access(c, z->uid, z->gid, z->mode, rdonly ? R_OK : R_OK | W_OK);
                if (r < 0)
                        goto out;
                if ((flags & (SHMZ_CREATE | SHMZ_EXCL)) == (SHMZ_CREATE | SHMZ_EXCL) || !streq(z->tag, tag)) {
                        r = -EEXIST;
                        goto out;
                }
                /* Sizes are rounded up to whole pages: compare what the zone would take. */
                if (size != 0 && zone_map_size(size) != z->map_size && z->fd >= 0) {
                        r = -EINVAL;
                        goto out;
                }
        }
        r = registry_attach_locked(reg, z, c, rdonly, ret_zone, ret_fd, ret_info, ret_existed);
out:
        registry_unlock(reg);
        return r;
}

void registry_detach(struct registry *reg, struct zone *z, const struct caller *c) {
        if (!z)
                return;
        /* No observer call: "attached" is no file attribute (the view reads it afresh as an xattr). */
        registry_lock(reg);
        z->attached--;
        holders_detach(z, c);
        registry_unref_locked(reg, z);
        registry_unlock(reg);
}

int registry_holders(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint32_t after_pid,
                     struct shmz_msg_zone_holders *ret) {
        struct zone *z;
        int r = 0;

        if (!name_is_valid(name))
                return -EINVAL;
        registry_lock(reg);
        z = registry_lookup_as(reg, name, ino);
        if (!z)
                r = -ENOENT;
        else if (c)
                r = acl_check_access(c, z->uid, z->gid, z->mode, R_OK);
        if (r >= 0)
                holders_fill(z, after_pid, ret);
        registry_unlock(reg);
        return r;
}

int registry_unlink(struct registry *reg, const struct caller *c, const char *name) {
        struct zone *z;
        int r = 0;

        if (!name_is_valid(name))
                return -EINVAL;
        registry_lock(reg);
        z = registry_lookup(reg, name);
        if (!z)
                r = -ENOENT;
        else if (!acl_owns(c, z))
                r = -EPERM;
        else
                registry_unlink_locked(reg, z);
        registry_unlock(reg);
        return r;
}

int registry_setattr(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint32_t mask,
                     uint32_t mode, uint32_t uid, uint32_t gid) {
        struct zone *z;
        int r = 0;

        if (!name_is_valid(name) || (mask & ~(SHMZ_SETATTR_MODE | SHMZ_SETATTR_UID | SHMZ_SETATTR_GID)))
                return -EINVAL;
        if ((mask & SHMZ_SETATTR_MODE) && (mode & ~07777u))
                return -EINVAL;
        registry_lock(reg);
        z = registry_lookup_as(reg, name, ino);
        if (!z) {
                r = -ENOENT;
                goto out;
        }
        r = acl_check_setattr(c, z, mask, uid, gid);
        /* Nothing asked, nothing changed: no new ctime, no header write, no event, for anybody. */
        if (r < 0 || mask == 0)
                goto out;
        if (mask & SHMZ_SETATTR_MODE)
                z->mode = mode;
        if (mask & SHMZ_SETATTR_UID)
                z->uid = uid;
        if (mask & SHMZ_SETATTR_GID)
                z->gid = gid;
        z->ctime_usec = now_usec(CLOCK_REALTIME);
        zone_memory_sync_acl(z);
        registry_changed(reg, REGISTRY_ZONE_CHANGED, z);
        registry_store_sync(reg, z);
out:
        registry_unlock(reg);
        return r;
}

/* The record of z, if there is one (lock held). */
static int info_of_locked(struct registry *reg, const struct zone *z, struct shmz_msg_zone_info *ret) {
        assert_locked(reg);
        if (!z)
                return -ENOENT;
        zone_info_fill(z, ret);
        return 0;
}

int registry_info(struct registry *reg, const char *name, struct shmz_msg_zone_info *ret) {
        int r;

        if (!name_is_valid(name))
                return -EINVAL;
        registry_lock(reg);
        r = info_of_locked(reg, registry_lookup(reg, name), ret);
        registry_unlock(reg);
        return r;
}

int registry_list(struct registry *reg, struct shmz_msg_zone_info **ret, size_t *ret_n) {
        struct shmz_msg_zone_info *v;
        size_t n;

        registry_lock(reg);
        n = reg->n_names;
        v = calloc(n + 1, sizeof(*v));
        for (size_t i = 0; v && i < n; i++)
                zone_info_fill(reg->names[i], &v[i]);
        registry_unlock(reg);
        if (!v)
                return -ENOMEM;
        *ret = v;
        *ret_n = n;
        return 0;
}

int registry_list_page(struct registry *reg, const char *after, struct shmz_msg_zone_info *ret, size_t max,
                       size_t *ret_n) {
        bool found;
        size_t i, n = 0;

        registry_lock(reg);
        i = name_index(reg, after, &found);
        if (found)
                i++;
        for (; i < reg->n_names && n < max; i++)
                zone_info_fill(reg->names[i], &ret[n++]);
        registry_unlock(reg);
        *ret_n = n;
        return 0;
}

static struct zone *lookup_ino(struct registry *reg, uint64_t ino) {
        struct zone key = { .ino = ino }, **p;

        assert_locked(reg);
        p = tfind(&key, &reg->by_ino, zone_ino_cmp);
        return p ? *p : NULL;
}

int registry_info_by_ino(struct registry *reg, uint64_t ino, struct shmz_msg_zone_info *ret) {
        int r;

        registry_lock(reg);
        r = info_of_locked(reg, lookup_ino(reg, ino), ret);
        registry_unlock(reg);
        return r;
}

int registry_ref_by_ino(struct registry *reg, uint64_t ino, struct zone **ret) {
        struct zone *z;

        registry_lock(reg);
        z = lookup_ino(reg, ino);
        if (z)
                z->refs++;
        registry_unlock(reg);
        if (!z)
                return -ENOENT;
        *ret = z;
        return 0;
}

void registry_unref(struct registry *reg, struct zone *z) {
        if (!z)
                return;
        registry_lock(reg);
        registry_unref_locked(reg, z);
        registry_unlock(reg);
}

void registry_info_of(struct registry *reg, struct zone *z, struct shmz_msg_zone_info *ret) {
        registry_lock(reg);
        zone_info_fill(z, ret);
        registry_unlock(reg);
}

void registry_touch(struct registry *reg, struct zone *z) {
        registry_lock(reg);
        z->used = true;
        z->mtime_usec = now_usec(CLOCK_REALTIME);
        registry_unlock(reg);
}

int registry_create_pending(struct registry *reg, const struct caller *c, const char *name, uint32_t mode,
                            struct shmz_msg_zone_info *ret) {
        struct zone *z;
        int r;

        if (!name_is_valid(name))
                return -EINVAL;
        registry_lock(reg);
        if (registry_lookup(reg, name))
                r = -EEXIST;
        else
                r = registry_create_locked(reg, name, "", 0, c->uid, c->gid, mode, false, &z);
        if (r >= 0) {
                z->creator_pid = c->pid;
                registry_store_sync(reg, z);
        }
        if (r >= 0 && ret)
                zone_info_fill(z, ret);
        registry_unlock(reg);
        return r;
}

int registry_drop_pending(struct registry *reg, struct zone *z) {
        int r = 0;

        registry_lock(reg);
        if (z->unlinked)
                r = -ENOENT;
        else if (z->fd >= 0)
                r = -EBUSY;
        else
                registry_unlink_locked(reg, z); /* the caller's reference keeps it until released */
        registry_unlock(reg);
        return r;
}

int registry_set_size(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, uint64_t size) {
        struct zone *z;
        uint64_t map_size;
        int r;

        registry_lock(reg);
        z = registry_lookup_as(reg, name, ino);
        if (!z) {
                r = -ENOENT;
                goto out;
        }
        if (z->fd >= 0) {
                /* Zones never change size; compare the pages it takes, as an open does. */
                r = zone_map_size(size) == z->map_size ? 0 : -EINVAL;
                goto out;
        }
        r = acl_check_access(c, z->uid, z->gid, z->mode, W_OK);
        if (r < 0)
                goto out;
        map_size = zone_map_size(size);
        if (size == 0 || map_size == 0) {
                r = -EINVAL;
                goto out;
        }
        r = quota_charge(reg, z, map_size);
        if (r < 0)
                goto out;
        r = zone_memory_make(z, size);
        if (r < 0) {
                quota_uncharge(reg, z, map_size);
                goto out;
        }
        z->mtime_usec = z->ctime_usec = now_usec(CLOCK_REALTIME);
        registry_changed(reg, REGISTRY_ZONE_CHANGED, z);
        registry_store_sync(reg, z);
out:
        registry_unlock(reg);
        return r;
}

int registry_set_tag(struct registry *reg, const struct caller *c, const char *name, uint64_t ino, const char *tag) {
        struct zone *z;
        int r = 0;

        if (!tag_is_valid(tag))
                return -EINVAL;
        registry_lock(reg);
        z = registry_lookup_as(reg, name, ino);
        if (!z)
                r = -ENOENT;
        else if (!acl_owns(c, z))
                r = -EPERM;
        else if (z->used || z->attached > 0)
                r = -EBUSY; /* a tag says what the bytes mean: fixed once somebody used them */
        else {
                strncpy_buf(z->tag, sizeof(z->tag), tag);
                zone_memory_sync_tag(z);
                z->ctime_usec = now_usec(CLOCK_REALTIME);
                registry_changed(reg, REGISTRY_ZONE_CHANGED, z);
                registry_store_sync(reg, z);
        }
        registry_unlock(reg);
        return r;
}
