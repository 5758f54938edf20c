/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Zones that outlive the daemon: the name a zone's memfd is kept under in
 * systemd's fd store, and taking such a memfd back after a restart.
 *
 * The FDNAME is trusted: systemd accepts FDSTORE= only from the service's own
 * main process (NotifyAccess=main), so only a daemon of ours wrote it. The
 * checks on the fd are against corruption and foreign fds (a mix-up, another
 * program's store replayed), not against the sender.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include "registry-internal.h"
#include "zone-header.h"

int zone_identity_format(const struct zone_identity *id, char *buf, size_t size) {
        int n;

        n = snprintf(buf, size, ZONE_FDNAME_PREFIX "%" PRIu32 ".%" PRIu32 ".%" PRIo32 ".%x.%" PRIu32 ".%s", id->uid,
                     id->gid, id->mode, id->declared ? ZONE_FDNAME_DECLARED : 0u, id->charged_uid, id->name);
        if (n < 0 || (size_t) n >= size || (size_t) n > ZONE_FDNAME_MAX)
                return -ENAMETOOLONG;
        return 0;
}

/* One field up to the next '.': digits of base only, no sign, no overflow of uint32_t. */
static int parse_field(const char **p, unsigned base, uint32_t *ret) {
        uint64_t v = 0;
        const char *s = *p;

        if (*s == '.')
                return -EBADMSG;
        for (; *s && *s != '.'; s++) {
                unsigned d;

                if (*s >= '0' && *s <= '9')
                        d = (unsigned) (*s - '0');
                else if (base == 16 && *s >= 'a' && *s <= 'f')
                        d = (unsigned) (*s - 'a' + 10);
                else
                        return -EBADMSG;
                if (d >= base)
                        return -EBADMSG;
                v = v * base + d;
                if (v > UINT32_MAX)
                        return -EBADMSG;
        }
        if (*s != '.')
                return -EBADMSG;
        *p = s + 1;
        *ret = (uint32_t) v;
        return 0;
}

int zone_identity_parse(const char *fdname, struct zone_identity *ret) {
        struct zone_identity id = {};
        const char *p = fdname;
        uint32_t flags;
        char again[ZONE_FDNAME_MAX + 1];

        if (strncmp(p, ZONE_FDNAME_PREFIX, strlen(ZONE_FDNAME_PREFIX)) != 0)
                return -EBADMSG;
        p += strlen(ZONE_FDNAME_PREFIX);
        /* Fields from the left; the name takes the rest, dots and all. */
        if (parse_field(&p, 10, &id.uid) < 0 || parse_field(&p, 10, &id.gid) < 0 || parse_field(&p, 8, &id.mode) < 0 ||
            parse_field(&p, 16, &flags) < 0 || parse_field(&p, 10, &id.charged_uid) < 0)
                return -EBADMSG;
        if (id.mode > 07777 || (flags & ~ZONE_FDNAME_DECLARED) || !name_is_valid(p))
                return -EBADMSG;
        id.declared = flags & ZONE_FDNAME_DECLARED;
        strncpy_buf(id.name, sizeof(id.name), p);
        /* One spelling per identity (no leading zeros): FDSTOREREMOVE= must hit the name it was stored under. */
        if (zone_identity_format(&id, again, sizeof(again)) < 0 || !streq(again, fdname))
                return -EBADMSG;
        *ret = id;
        return 0;
}

static int refuse(const char **ret_why, const char *why, int r) {
        *ret_why = why;
        return r;
}

/*
 * Rewrites the header fields the daemon owns (what zone_header_init() writes
 * but the lock, the allocator's state and the root offset, which are the
 * zone's users'). A writer may have changed them; the zone's identity comes
 * from elsewhere.
 */
static int header_repair(int fd, const struct zone *z) {
        struct shmz_zone_header h;

        zone_header_init(&h, z->name, z->tag, z->map_size, z->uid, z->gid, z->mode, z->generation);
        h.created_usec = z->created_usec;
        /* From the magic up to the lock, but the users' alloc_state and root. */
        if (pwrite(fd, &h, offsetof(struct shmz_zone_header, alloc_state), 0) !=
                    (ssize_t) offsetof(struct shmz_zone_header, alloc_state) ||
            pwrite(fd, (const char *) &h + offsetof(struct shmz_zone_header, name),
                   offsetof(struct shmz_zone_header, lock) - offsetof(struct shmz_zone_header, name),
                   offsetof(struct shmz_zone_header, name)) !=
                    (ssize_t) (offsetof(struct shmz_zone_header, lock) - offsetof(struct shmz_zone_header, name)))
                return -EIO;
        return 0;
}

static int adopt(struct registry *reg, const char *fdname, int fd, const struct zone_history *hist, bool stored,
                 const char **ret_why) {
        struct zone_identity id;
        struct shmz_zone_header h;
        char path[64], link[SHMZ_NAME_BUF + 64], want[SHMZ_NAME_BUF + 64];
        uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE), now = now_usec(CLOCK_REALTIME);
        bool damaged;
        struct stat st;
        struct zone *z;
        ssize_t n;
        int r;

        *ret_why = NULL;
        if (zone_identity_parse(fdname, &id) < 0)
                return refuse(ret_why, "its FDNAME does not parse", -EBADMSG);
        if (fstat(fd, &st) < 0)
                return refuse(ret_why, "fstat() failed", -errno);
        /* Our memfds are named "shmzone:<zone>" (zone_memory_make()): a pipe, a file or another program's memfd are
         * not. */
        (void) snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n = readlink(path, link, sizeof(link) - 1);
        (void) snprintf(want, sizeof(want), "/memfd:shmzone:%s (deleted)", id.name);
        if (!S_ISREG(st.st_mode) || n < 0 || (size_t) n != strlen(want) || memcmp(link, want, (size_t) n) != 0)
                return refuse(ret_why, "it is not a shmzone memfd of that name", -EBADF);
        /* Exactly a zone's seals: without them a holder could shrink it under the others; with more, writes fail. */
        if (fcntl(fd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
                return refuse(ret_why, "it is not sealed as a zone is", -EPERM);
        if (st.st_size <= 0 || (uint64_t) st.st_size % page != 0 || (uint64_t) st.st_size < SHMZ_ZONE_HEADER_SIZE)
                return refuse(ret_why, "its size is not whole pages", -EBADMSG);
        /*
         * A copy, read once: writers may change the header at any time. It is
         * never what decides: a damaged one is rewritten, not a reason to drop
         * the zone (a writer could delete it so, and take its name).
         */
        if (pread(fd, &h, sizeof(h), 0) != (ssize_t) sizeof(h))
                return refuse(ret_why, "its header cannot be read", -EIO);
        damaged = zone_header_check(&h, (uint64_t) st.st_size, id.name) < 0 || !tag_is_valid(h.tag);
        /* Owner read-only, as zone_memory_make() left it: else a reader could reopen it writable. */
        if ((st.st_mode & 07777) != 0400 && fchmod(fd, 0400) < 0)
                return refuse(ret_why, "cannot make its inode mode 0400", -errno);

        z = calloc(1, sizeof(*z));
        if (!z)
                return refuse(ret_why, "out of memory", -ENOMEM);
        *z = (struct zone){
                .created_usec = now,
                .mtime_usec = now,
                .ctime_usec = now,
                .uid = id.uid,
                .gid = id.gid,
                .mode = id.mode,
                .charged_uid = id.charged_uid,
                .fd = fd,
                .size = (uint64_t) st.st_size - SHMZ_ZONE_HEADER_SIZE,
                .map_size = (uint64_t) st.st_size,
                .refs = 1,
                .declared = id.declared,
                .counted = !id.declared,
                .used = true,     /* its bytes predate us */
                .stored = stored, /* systemd kept its copy: nothing to store again */
                .stored_id = id,
        };
        strncpy_buf(z->name, sizeof(z->name), id.name);
        if (hist && tag_is_valid(hist->tag)) {
                z->ino = hist->ino;
                z->generation = hist->generation;
                z->created_usec = hist->created_usec;
                z->mtime_usec = hist->mtime_usec;
                z->ctime_usec = hist->ctime_usec;
                /* A pid may have been reused meanwhile: shown as the creator's, as ipcs shows a gone creator's. */
                z->creator_pid = (pid_t) MIN(hist->creator_pid, (uint32_t) INT32_MAX);
                strncpy_buf(z->tag, sizeof(z->tag), hist->tag);
        } else if (!damaged) {
                /* No record (a daemon before records were kept): what the header says, as then. */
                strncpy_buf(z->tag, sizeof(z->tag), h.tag);
                z->created_usec = h.created_usec;
        }

        registry_lock(reg);
        r = registry_adopt_locked(reg, z);
        if (r >= 0) {
                /* The header's copies follow the FDNAME and the record, never the reverse. */
                if (damaged)
                        (void) header_repair(fd, z);
                else if (!streq(h.tag, z->tag))
                        zone_memory_sync_tag(z);
                zone_memory_sync_acl(z);
                if (stored)
                        zone_identity_of(z, &z->stored_id);
                else
                        registry_store_sync(reg, z);
        }
        registry_unlock(reg);
        if (r < 0) {
                z->fd = -EBADF; /* still the caller's */
                zone_destroy(z);
                return refuse(ret_why, r == -EEXIST ? "a zone of that name exists already" : "out of memory", r);
        }
        r = (r > 0 ? ADOPT_PAST_LIMIT : 0) | (damaged ? ADOPT_REPAIRED : 0);
        if (r == (ADOPT_PAST_LIMIT | ADOPT_REPAIRED))
                *ret_why = "its header was damaged: the daemon's fields were rewritten; adopted past the memory "
                           "budget or its uid's quota";
        else if (r == ADOPT_REPAIRED)
                *ret_why = "its header was damaged: the daemon's fields were rewritten";
        else if (r == ADOPT_PAST_LIMIT)
                *ret_why = "adopted past the memory budget or its uid's quota";
        return r;
}

int registry_adopt(struct registry *reg, const char *fdname, int fd, const struct zone_history *hist,
                   const char **ret_why) {
        return adopt(reg, fdname, fd, hist, true, ret_why);
}

int registry_restore(struct registry *reg, const struct zone_decl *decl, int fd, const struct zone_history *hist,
                     const char **ret_why) {
        struct zone_identity id = { .uid = decl->uid, .gid = decl->gid, .mode = decl->mode, .declared = true };
        char fdname[ZONE_FDNAME_MAX + 1];

        strncpy_buf(id.name, sizeof(id.name), decl->name);
        if (zone_identity_format(&id, fdname, sizeof(fdname)) < 0) {
                *ret_why = "its identity is too long";
                return -ENAMETOOLONG;
        }
        return adopt(reg, fdname, fd, hist, false, ret_why);
}
