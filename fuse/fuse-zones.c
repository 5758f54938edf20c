/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * zones/<name>: a zone as a file. File offset 0 is the first usable byte
 * (the memfd's offset SHMZ_ZONE_HEADER_SIZE), the file size is the usable
 * size, so the header is neither visible nor writable here. Opens are
 * FOPEN_DIRECT_IO: reads and writes go to the memfd at once and are coherent
 * with every client's mapping; the kernel then refuses MAP_SHARED mmap
 * (ENODEV), which is what we want, since such a mapping would be the FUSE
 * inode's page cache, a copy, not the zone. Permission checks on open are the
 * kernel's (default_permissions); the registry applies the same rules to
 * chmod, chown, unlink and the tag as the control socket does.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/xattr.h>
#include <time.h>

#include "fuse-internal.h"
#include "log.h"
#include "shmzone.h"
#include "zone.h"

#define XATTR_PREFIX "user.shmzone."
#define XATTR_TAG XATTR_PREFIX "tag"
#define XATTR_ATTACHED XATTR_PREFIX "attached"
#define XATTR_GENERATION XATTR_PREFIX "generation"
#define XATTR_MAP_SIZE XATTR_PREFIX "map_size"
#define XATTR_HOLDERS XATTR_PREFIX "holders" /* who attached, as ipcs -p -t shows it */
#define XATTR_ALLOC XATTR_PREFIX "alloc"     /* only on zones whose allocator is formatted */

static const char *const xattr_names[] = { XATTR_TAG, XATTR_ATTACHED, XATTR_GENERATION, XATTR_MAP_SIZE, XATTR_HOLDERS };

/* A line each for SHMZ_HOLDERS_MAX holders and the zone's own: under the kernel's 64 KiB for a value. */
#define HOLDERS_TEXT_MAX 65536u

void zone_stat(const struct shmz_msg_zone_info *i, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = i->ino,
                .st_mode = S_IFREG | (i->mode & 07777),
                .st_nlink = (i->flags & SHMZ_ZONE_INFO_UNLINKED) ? 0 : 1,
                .st_uid = i->uid,
                .st_gid = i->gid,
                .st_size = (off_t) MIN(i->size, (uint64_t) INT64_MAX),
                .st_blocks = (blkcnt_t) (i->map_size / 512), /* memory it takes, header included */
                .st_blksize = VIEW_BLKSIZE,
        };
        stat_from_usec(&ret->st_mtim, i->mtime_usec);
        stat_from_usec(&ret->st_ctim, i->ctime_usec);
        ret->st_atim = ret->st_mtim;
}

static void entry_from_info(struct fuse_view *v, const struct shmz_msg_zone_info *i, struct fuse_entry_param *ret) {
        *ret = (struct fuse_entry_param){
                .ino = i->ino,
                .generation = i->generation,
                .attr_timeout = ZONE_ATTR_TIMEOUT,
                .entry_timeout = zone_entry_timeout(v),
        };
        zone_stat(i, &ret->attr);
}

int zones_lookup(struct fuse_view *v, const char *name, struct fuse_entry_param *ret) {
        struct shmz_msg_zone_info info;
        int r;

        /* Names a zone cannot have simply do not exist (no negative caching: a create may follow). */
        if (!name_is_valid(name))
                return -ENOENT;
        r = registry_info(v->registry, name, &info);
        if (r < 0)
                return r;
        entry_from_info(v, &info, ret);
        return 0;
}

static int zone_info_any(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct shmz_msg_zone_info *ret) {
        struct zone *z = h ? h->zone : NULL;

        if (!z) {
                if (registry_info_by_ino(v->registry, ino, ret) >= 0)
                        return 0;
                /* An unlinked zone is still there for whoever holds it open (fstat, fgetxattr). */
                for (h = view_handles_of(v, ino); h && !h->zone; h = h->ino_next)
                        ;
                if (!h)
                        return -ENOENT;
                z = h->zone;
        }
        registry_info_of(v->registry, z, ret);
        return 0;
}

int zones_getattr(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret) {
        struct shmz_msg_zone_info info;
        int r;

        r = zone_info_any(v, ino, h, &info);
        if (r < 0)
                return r;
        zone_stat(&info, ret);
        return 0;
}

static void open_reply(struct fuse_view *v, fuse_req_t req, struct vhandle *h, const struct fuse_entry_param *e,
                       struct fuse_file_info *fi) {
        int acc = fi->flags & O_ACCMODE;

        h->readable = acc != O_WRONLY;
        h->writable = acc != O_RDONLY;
        fi->fh = (uintptr_t) h;
        fi->direct_io = 1;
        fi->keep_cache = 0;
        /* O_TRUNC (FUSE_CAP_ATOMIC_O_TRUNC) is ignored, as on a device: zones never change size. */
        if ((e ? fuse_reply_create(req, e, fi) : fuse_reply_open(req, fi)) < 0)
                vhandle_free(v, h); /* interrupted: no release will come */
}

void zones_open(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct vhandle *h;
        struct zone *z;
        int r;

        r = registry_ref_by_ino(v->registry, ino, &z);
        if (r < 0) {
                (void) fuse_reply_err(req, -r);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                registry_unref(v->registry, z);
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        h->zone = z;
        h->release = zones_release;
        open_reply(v, req, h, NULL, fi);
}

void zones_create(struct fuse_view *v, fuse_req_t req, const char *name, mode_t mode, struct fuse_file_info *fi) {
        struct fuse_entry_param e;
        struct shmz_msg_zone_info info;
        struct vhandle *h;
        struct caller c;
        struct zone *z;
        int r;

        if (strlen(name) > SHMZ_NAME_MAX) {
                (void) fuse_reply_err(req, ENAMETOOLONG);
                return;
        }
        if (!name_is_valid(name)) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        caller_from_req(req, &c);
        /* With POSIX ACLs on (op_init()) the kernel leaves the creator's umask to us. */
        mode &= ~fuse_req_ctx(req)->umask;
        /* No memory yet: the truncate that follows fixes the size (quota and budget apply then). */
        r = registry_create_pending(v->registry, &c, name, mode & 07777, &info);
        if (r >= 0)
                r = registry_ref_by_ino(v->registry, info.ino, &z);
        if (r < 0) {
                (void) fuse_reply_err(req, -r);
                return;
        }
        h = vhandle_new(v, info.ino);
        if (!h) {
                registry_unref(v->registry, z);
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        h->zone = z;
        h->release = zones_release;
        h->created = true;
        entry_from_info(v, &info, &e);
        open_reply(v, req, h, &e, fi);
}

/* The usable size of an open zone, 0 while pending (its size is then fixed at most once). */
static uint64_t handle_size(struct fuse_view *v, struct vhandle *h) {
        struct shmz_msg_zone_info info;

        if (h->size == 0) {
                registry_info_of(v->registry, h->zone, &info);
                if (!(info.flags & SHMZ_ZONE_INFO_PENDING)) {
                        h->size = info.size;
                        h->map_size = info.map_size;
                }
        }
        return h->size;
}

/* Whether every page of [p, p+len) is in memory; p page-aligned, len at most READ_BUF_SIZE rounded up. */
static bool range_resident(void *p, size_t len) {
        unsigned char vec[READ_BUF_SIZE / 4096 + 1];
        size_t n = (len + 4095) / 4096;

        if (n > sizeof(vec) || mincore(p, len, vec) < 0)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!(vec[i] & 1))
                        return false;
        return true;
}

void zones_read(struct fuse_view *v, fuse_req_t req, struct vhandle *h, size_t size, off_t off) {
        uint64_t zsize = handle_size(v, h), start, end, page;
        int fd = zone_fd(h->zone);

        if (!h->readable) {
                (void) fuse_reply_err(req, EBADF);
                return;
        }
        if (fd < 0 || (uint64_t) off >= zsize || size == 0) {
                (void) fuse_reply_buf(req, NULL, 0);
                return;
        }
        size = (size_t) MIN((uint64_t) size, zsize - (uint64_t) off);
        start = (uint64_t) off + SHMZ_ZONE_HEADER_SIZE;

        /* One mapping per zone, not per open file: opens would otherwise use up our mappings. */
        if (!h->map) {
                int r = zone_view_map(h->zone, &h->map);

                if (r < 0) {
                        (void) fuse_reply_err(req, -r);
                        return;
                }
        }
        end = ALIGN_TO(start + size, (uint64_t) 4096);
        page = start & ~(uint64_t) 4095;

        /*
         * Pages nobody wrote are holes in the memfd. A fault on a shared mapping
         * of shmem allocates such a page, so a `cat` of a sparse zone would commit
         * all of it; pread() returns zeros for holes without allocating. Ranges
         * whose pages all exist (mincore(), which faults nothing in) reply straight
         * from the mapping: the kernel copies once, into the reader's buffer.
         * (SEEK_HOLE would do, but on shmem it scans from the offset to the first
         * hole, the whole zone for a full one.)
         */
        if (!range_resident((char *) h->map + page, end - page)) {
                ssize_t n;

                if (!v->read_buf) {
                        v->read_buf = malloc(READ_BUF_SIZE);
                        if (!v->read_buf) {
                                (void) fuse_reply_err(req, ENOMEM);
                                return;
                        }
                }
                n = pread(fd, v->read_buf, MIN(size, (size_t) READ_BUF_SIZE), (off_t) start);
                if (n < 0)
                        (void) fuse_reply_err(req, errno);
                else
                        (void) fuse_reply_buf(req, v->read_buf, (size_t) n);
                return;
        }
        /*
         * No MADV_POPULATE_READ here: it walks every page of the range on each
         * read even when our page tables have them all (the common case after
         * the first read), over a tenth of our time per request; the kernel's copy
         * faults in whatever is missing, and every page is known to exist.
         */
        (void) fuse_reply_buf(req, (const char *) h->map + start, size);
}

/*
 * Any user can create and write many files: at most one such log line a
 * second (only the FUSE thread asks).
 */
static bool nospc_log_allowed(void) {
        static uint64_t last_usec;
        uint64_t now = now_usec(CLOCK_MONOTONIC);

        if (last_usec != 0 && now - last_usec < 1000000u)
                return false;
        last_usec = now;
        return true;
}

void zones_write(struct fuse_view *v, fuse_req_t req, struct vhandle *h, const char *buf, size_t size, off_t off) {
        uint64_t zsize = handle_size(v, h);
        int fd = zone_fd(h->zone);
        size_t n, done = 0;

        if (off < 0) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        if (size == 0) {
                (void) fuse_reply_write(req, 0);
                return;
        }
        /* A zone is a fixed-size device: writing at or past its end is "no space", a straddling write is short. */
        if (fd < 0 || (uint64_t) off >= zsize) {
                /*
                 * cp and shell redirections create, then write: all they can say is "No space left on
                 * device", which reads as a full disk. The log says what it is (once per open file, at most a line a
                 * second).
                 */
                if (fd < 0 && !h->told_nospc && nospc_log_allowed()) {
                        struct shmz_msg_zone_info info;

                        registry_info_of(v->registry, h->zone, &info);
                        log_notice("View: zones/%s was written before it had a size (pid %d): refused with ENOSPC. "
                                   "A zone takes its size from a truncate first: truncate -s SIZE zones/%s; "
                                   "unsized, it goes when the file that made it is closed.",
                                   info.name, (int) fuse_req_ctx(req)->pid, info.name);
                        h->told_nospc = true;
                }
                (void) fuse_reply_err(req, ENOSPC);
                return;
        }
        n = (size_t) MIN((uint64_t) size, zsize - (uint64_t) off);
        while (done < n) {
                ssize_t k = pwrite(fd, buf + done, n - done, (off_t) ((uint64_t) off + SHMZ_ZONE_HEADER_SIZE + done));

                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        if (done == 0) {
                                (void) fuse_reply_err(req, k < 0 ? errno : EIO);
                                return;
                        }
                        break;
                }
                done += (size_t) k;
        }
        registry_touch(v->registry, h->zone);
        (void) fuse_reply_write(req, done);
}

void zones_release(struct fuse_view *v, struct vhandle *h) {
        /* A ticket not redeemed by now dies with the open it proved. */
        if (h->has_ticket)
                registry_ticket_revoke(v->registry, h->ticket);
        h->has_ticket = false;
        h->map = NULL; /* the zone's, gone with its last reference */
        /* cp or a redirection that made a zone and never sized it leaves nothing behind (no 0-byte zone). */
        if (h->created && h->zone)
                (void) registry_drop_pending(v->registry, h->zone);
        registry_unref(v->registry, TAKE_PTR(h->zone));
}

/* The caller with its supplementary groups (chown to a group of theirs); *ret_groups is free()d by the caller. */
static void caller_with_groups(fuse_req_t req, struct caller *c, gid_t **ret_groups) {
        gid_t *g = NULL;
        int n = 32;

        caller_from_req(req, c);
        *ret_groups = NULL;
        for (int tries = 0; tries < 3; tries++) {
                gid_t *ng = realloc(g, (size_t) n * sizeof(*g));
                int k;

                if (!ng)
                        break;
                g = ng;
                k = fuse_req_getgroups(req, n, g);
                if (k < 0)
                        break; /* no /proc view of the caller: primary group only */
                if (k <= n) {
                        c->groups = g;
                        c->n_groups = (size_t) k;
                        *ret_groups = g;
                        return;
                }
                n = k;
        }
        free(g);
}

void zones_setattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                   struct vhandle *h) {
        _cleanup_free_ gid_t *groups = NULL;
        struct shmz_msg_zone_info info;
        struct caller c;
        uint32_t mask = 0;
        struct stat st;
        int r;

        r = zone_info_any(v, ino, h, &info);
        if (r < 0) {
                (void) fuse_reply_err(req, -r);
                return;
        }
        if (to_set & FUSE_SET_ATTR_MODE)
                mask |= SHMZ_SETATTR_MODE;
        if (to_set & FUSE_SET_ATTR_UID)
                mask |= SHMZ_SETATTR_UID;
        if (to_set & FUSE_SET_ATTR_GID)
                mask |= SHMZ_SETATTR_GID;
        /* An unlinked zone has no name left to change anything through (times are ignored anyway). */
        if ((info.flags & SHMZ_ZONE_INFO_UNLINKED) && (mask || (to_set & FUSE_SET_ATTR_SIZE))) {
                (void) fuse_reply_err(req, ENOENT);
                return;
        }
        caller_with_groups(req, &c, &groups);
        if (mask) {
                r = registry_setattr(v->registry, &c, info.name, info.ino, mask, (uint32_t) attr->st_mode & 07777,
                                     (uint32_t) attr->st_uid, (uint32_t) attr->st_gid);
                if (r < 0) {
                        (void) fuse_reply_err(req, -r);
                        return;
                }
        }
        if (to_set & FUSE_SET_ATTR_SIZE) {
                /* The one truncate after a create fixes the size; any other size is refused. */
                r = attr->st_size < 0
                            ? -EINVAL
                            : registry_set_size(v->registry, &c, info.name, info.ino, (uint64_t) attr->st_size);
                if (r < 0) {
                        (void) fuse_reply_err(req, -r);
                        return;
                }
        }
        /* atime/mtime: the view keeps its own (last write through the view); accepted and ignored. */
        r = zone_info_any(v, ino, h, &info);
        if (r < 0) {
                (void) fuse_reply_err(req, -r);
                return;
        }
        zone_stat(&info, &st);
        (void) fuse_reply_attr(req, &st, ZONE_ATTR_TIMEOUT);
}

void zones_unlink(struct fuse_view *v, fuse_req_t req, const char *name) {
        struct caller c;

        if (strlen(name) > SHMZ_NAME_MAX) {
                (void) fuse_reply_err(req, ENAMETOOLONG);
                return;
        }
        if (!name_is_valid(name)) {
                (void) fuse_reply_err(req, ENOENT);
                return;
        }
        caller_from_req(req, &c);
        /* The name goes at once; attached clients and open files keep the memory until they let go. */
        (void) fuse_reply_err(req, -registry_unlink(v->registry, &c, name));
}

void zones_ioctl(struct fuse_view *v, fuse_req_t req, struct vhandle *h, unsigned cmd, unsigned flags, size_t in_bufsz,
                 size_t out_bufsz) {
        struct shmz_msg_zone_ticket t = {};
        int r;

        /* Restricted ioctl: the kernel sized the buffers from the command's _IOC_SIZE. */
        if (cmd != SHMZ_IOC_TICKET) {
                (void) fuse_reply_err(req, ENOTTY);
                return;
        }
        if (in_bufsz != 0 || out_bufsz < sizeof(t)) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        /* Any attachment maps the zone readable: a write-only open proves too little. */
        if (!h->readable) {
                (void) fuse_reply_err(req, EACCES);
                return;
        }
        if (h->has_ticket) {
                registry_ticket_revoke(v->registry, h->ticket);
                h->has_ticket = false;
        }
        r = registry_ticket_issue(v->registry, h->zone, h->writable, t.ticket);
        if (r < 0) {
                (void) fuse_reply_err(req, -r);
                return;
        }
        memcpy(h->ticket, t.ticket, sizeof(h->ticket));
        h->has_ticket = true;
        (void) fuse_reply_ioctl(req, 0, &t, sizeof(t));
}

static int xattr_value(const struct shmz_msg_zone_info *i, const char *name, char *buf, size_t size, size_t *ret_len) {
        int n;

        if (streq(name, XATTR_TAG))
                n = snprintf(buf, size, "%s", i->tag);
        else if (streq(name, XATTR_ATTACHED))
                n = snprintf(buf, size, "%" PRIu32, i->attached);
        else if (streq(name, XATTR_GENERATION))
                n = snprintf(buf, size, "%" PRIu64, i->generation);
        else if (streq(name, XATTR_MAP_SIZE))
                n = snprintf(buf, size, "%" PRIu64, i->map_size);
        else
                return -ENODATA;
        if (n < 0 || (size_t) n >= size)
                return -EIO;
        *ret_len = (size_t) n;
        return 0;
}

/*
 * The allocator's figures, read through a read-only mapping of the zone: what
 * clients wrote there is untrusted, and shmz_zone_alloc_stats() bound-checks
 * it. -ENODATA for a zone without an allocator (raw bytes, or pending).
 */
static int alloc_value(struct fuse_view *v, uint64_t ino, char *buf, size_t size, size_t *ret_len) {
        struct shmz_alloc_stats st;
        struct shmz_zone *mapped = NULL;
        struct zone *z;
        size_t len = 0;
        int n, r;

        r = registry_ref_by_ino(v->registry, ino, &z);
        if (r < 0)
                return -ENODATA;
        r = zone_fd(z) < 0 ? -ENODATA : zone_map_fd(zone_fd(z), true, NULL, &mapped);
        if (r >= 0)
                r = shmz_zone_alloc_stats(mapped, &st);
        shmz_zone_close(mapped);
        registry_unref(v->registry, z);
        if (r < 0 || st.pages_total == 0)
                return -ENODATA;

        n = snprintf(buf, size,
                     "page_size=%" PRIu64 " pages_total=%" PRIu64 " pages_free=%" PRIu64 " pages_slab=%" PRIu64
                     " pages_large=%" PRIu64 " largest_free_run=%" PRIu64 " large_used=%" PRIu64 " large_reqs=%" PRIu64
                     " large_fails=%" PRIu64 " faults=%" PRIu64 " repairs=%" PRIu64 "\n",
                     st.page_size, st.pages_total, st.pages_free, st.pages_slab, st.pages_large, st.largest_free_run,
                     st.large_used, st.large_reqs, st.large_fails, st.faults, st.repairs);
        if (n < 0 || (size_t) n >= size)
                return -EIO;
        len = (size_t) n;
        /* One line per size class that was ever asked for: size total used requests failures. */
        for (uint32_t i = 0; i < MIN(st.nclasses, (uint32_t) SHMZ_ALLOC_CLASSES); i++) {
                const struct shmz_alloc_class_stats *k = &st.classes[i];

                if (k->reqs == 0 && k->total == 0)
                        continue;
                n = snprintf(buf + len, size - len,
                             "class=%" PRIu64 " total=%" PRIu64 " used=%" PRIu64 " reqs=%" PRIu64 " fails=%" PRIu64
                             "\n",
                             k->size, k->total, k->used, k->reqs, k->fails);
                if (n < 0 || (size_t) n >= size - len)
                        return -EIO;
                len += (size_t) n;
        }
        *ret_len = len;
        return 0;
}

/* Whether the zone's header says its allocator is formatted: one small read, no mapping. */
static bool zone_has_allocator(struct fuse_view *v, uint64_t ino) {
        uint32_t state = SHMZ_ZONE_ALLOC_NONE;
        struct zone *z;

        if (registry_ref_by_ino(v->registry, ino, &z) < 0)
                return false;
        if (zone_fd(z) >= 0)
                (void) pread(zone_fd(z), &state, sizeof(state), offsetof(struct shmz_zone_header, alloc_state));
        registry_unref(v->registry, z);
        return state == SHMZ_ZONE_ALLOC_FORMATTED;
}

/*
 * Who holds the zone: a line for the zone, then one per attached process,
 * by pid; times in microseconds since the epoch (0: none since the daemon
 * started), the process name last (it may hold spaces).
 */
static int holders_value(struct fuse_view *v, const struct shmz_msg_zone_info *i, char **ret, size_t *ret_len) {
        _cleanup_free_ char *buf = malloc(HOLDERS_TEXT_MAX);
        struct shmz_msg_zone_holders page;
        uint32_t after = 0;
        size_t len = 0;
        int n, r;

        if (!buf)
                return -ENOMEM;
        if (i->flags & SHMZ_ZONE_INFO_UNLINKED)
                return -ENODATA; /* nobody can attach any more; its holders are the attachments left */
        for (bool first = true;; first = false) {
                r = registry_holders(v->registry, NULL, i->name, i->ino, after, &page);
                if (r < 0)
                        return r == -ENOENT ? -ENODATA : r;
                if (first) {
                        n = snprintf(buf, HOLDERS_TEXT_MAX,
                                     "creator_pid=%" PRIu32 " creator_uid=%" PRIu32 " attach_usec=%" PRIu64
                                     " detach_usec=%" PRIu64 " last_pid=%" PRIu32 " processes=%" PRIu32
                                     " untracked=%" PRIu32 "\n",
                                     page.creator_pid, page.creator_uid, page.attach_usec, page.detach_usec,
                                     page.last_pid, page.processes, page.untracked);
                        if (n < 0 || (size_t) n >= HOLDERS_TEXT_MAX)
                                return -EIO;
                        len = (size_t) n;
                }
                for (uint32_t k = 0; k < MIN(page.n, SHMZ_HOLDERS_PER_MSG); k++) {
                        const struct shmz_msg_zone_holder *o = &page.holders[k];

                        n = snprintf(buf + len, HOLDERS_TEXT_MAX - len,
                                     "pid=%" PRIu32 " uid=%" PRIu32 " gid=%" PRIu32 " attachments=%" PRIu32
                                     " since_usec=%" PRIu64 " comm=%.*s\n",
                                     o->pid, o->uid, o->gid, o->attachments, o->since_usec, (int) sizeof(o->comm),
                                     o->comm);
                        /* The holders may change between pages: a full buffer ends the list there. */
                        if (n < 0 || (size_t) n >= HOLDERS_TEXT_MAX - len)
                                goto done;
                        len += (size_t) n;
                        after = o->pid;
                }
                if (page.n < SHMZ_HOLDERS_PER_MSG || after == 0)
                        break;
        }
done:
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

void zones_getxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
        struct shmz_msg_zone_info info;
        _cleanup_free_ char *text = NULL;
        char buf[8192];
        size_t len = 0;
        int r;

        /* Ours only: ls -l asks every file for system.posix_acl_access (op_getxattr() answered the rest). */
        if (strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX)) != 0) {
                (void) fuse_reply_err(req, ENODATA);
                return;
        }
        r = zone_info_any(v, ino, NULL, &info);
        if (r >= 0 && streq(name, XATTR_HOLDERS)) {
                r = holders_value(v, &info, &text, &len);
                reply_xattr(req, r, text, len, size);
                return;
        }
        if (r >= 0 && streq(name, XATTR_ALLOC))
                r = alloc_value(v, ino, buf, sizeof(buf), &len);
        else if (r >= 0)
                r = xattr_value(&info, name, buf, sizeof(buf), &len);
        reply_xattr(req, r, buf, len, size);
}

void zones_listxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, size_t size) {
        char buf[256];
        size_t len = 0;

        for (size_t i = 0; i < ELEMENTSOF(xattr_names); i++) {
                size_t n = strlen(xattr_names[i]) + 1;

                memcpy(buf + len, xattr_names[i], n);
                len += n;
        }
        if (zone_has_allocator(v, ino)) {
                memcpy(buf + len, XATTR_ALLOC, sizeof(XATTR_ALLOC));
                len += sizeof(XATTR_ALLOC);
        }
        reply_xattr(req, 0, buf, len, size);
}

static int set_tag(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *value, size_t size, int flags) {
        char tag[SHMZ_TAG_BUF];
        struct shmz_msg_zone_info info;
        struct caller c;
        int r;

        r = zone_info_any(v, ino, NULL, &info);
        if (r < 0)
                return r;
        if ((info.flags & SHMZ_ZONE_INFO_UNLINKED))
                return -ENOENT;
        /* The value is raw bytes from anyone: bounded, no NUL inside, printable (tag_is_valid). */
        if (size > SHMZ_TAG_MAX || (size > 0 && memchr(value, 0, size)))
                return -EINVAL;
        memcpy(tag, value, size);
        tag[size] = 0;
        if ((flags & XATTR_CREATE) && info.tag[0])
                return -EEXIST;
        if ((flags & XATTR_REPLACE) && !info.tag[0])
                return -ENODATA;
        caller_from_req(req, &c);
        return registry_set_tag(v->registry, &c, info.name, info.ino, tag);
}

void zones_setxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                    size_t size, int flags) {
        int r;

        if (streq(name, XATTR_TAG))
                r = set_tag(v, req, ino, value, size, flags);
        else if (strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX)) == 0)
                r = -EPERM; /* the figures are the daemon's */
        else
                r = -ENOTSUP;
        (void) fuse_reply_err(req, -r);
}

void zones_removexattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name) {
        int r;

        if (streq(name, XATTR_TAG))
                r = set_tag(v, req, ino, "", 0, 0);
        else if (strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX)) == 0)
                r = -EPERM;
        else
                r = -ENODATA;
        (void) fuse_reply_err(req, -r);
}
