/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The FUSE view: mount, the FUSE thread and its sd_event loop, the lowlevel
 * ops and their dispatch, and the fixed part of the tree (root, status,
 * metrics, socket, the provider directories). Zone files live in
 * fuse-zones.c, ports/ and segments/ in fuse-ports.c, the status texts in
 * fuse-status.c, the invalidations and the notifier thread in view-notify.c,
 * the shared helpers in view-util.c.
 *
 * Threads: all requests are served by one FUSE thread (one sd_event loop;
 * the registry's critical sections never wait, so one thread keeps up; bulk
 * reads reply from a mapping of the memfd, see zones_read()). A zone's change
 * reaches the kernel in the thread that made it, before it is answered (see
 * view_zone_changed()); the notifications used take no lock in the kernel, so
 * any thread may send them, the FUSE thread included. Those of ports/ and
 * segments/ go through a second thread, the notifier.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <libmount.h>
#include <limits.h>
#include <search.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <systemd/sd-event.h>
#include <time.h>

#include "fuse-internal.h"
#include "log.h"

static struct fuse_view *view_of(fuse_req_t req) {
        return fuse_req_userdata(req);
}

static struct vhandle *handle_of(const struct fuse_file_info *fi) {
        return fi ? (struct vhandle *) (uintptr_t) fi->fh : NULL;
}

static bool ino_is_zone(uint64_t ino) {
        return ino >= REGISTRY_FIRST_INO && ino < PORTS_INO_LISTENER_BASE;
}

/* ---- fixed files --------------------------------------------------------------------- */

static const struct {
        const char *name;
        uint64_t ino;
} root_entries[] = {
        { "zones", INO_ZONES },   { "segments", INO_SEGMENTS }, { "ports", INO_PORTS },
        { "status", INO_STATUS }, { "metrics", INO_METRICS },   { "socket", INO_SOCKET },
};

static int fixed_stat(struct fuse_view *v, uint64_t ino, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = ino,
                .st_uid = v->uid,
                .st_gid = v->gid,
                .st_blksize = VIEW_BLKSIZE,
        };
        stat_from_usec(&ret->st_mtim, v->start_usec);
        switch (ino) {
        case INO_ROOT:
                ret->st_mode = S_IFDIR | 0755;
                ret->st_nlink = 5;
                break;
        case INO_ZONES:
                /* Anyone may create a zone (quotas apply); the sticky bit: only owners remove theirs. */
                ret->st_mode = S_IFDIR | 01777;
                ret->st_nlink = 2;
                stat_from_usec(&ret->st_mtim, atomic_load(&v->zones_mtime_usec));
                break;
        case INO_SEGMENTS:
                ret->st_mode = S_IFDIR | 0555;
                ret->st_nlink = 2;
                stat_from_usec(&ret->st_mtim, atomic_load(&v->segments_mtime_usec));
                break;
        case INO_PORTS: {
                struct ports_stats ps = {};

                if (view_ports(v))
                        ports_get_stats(view_ports(v), &ps);
                ret->st_mode = S_IFDIR | 0555;
                ret->st_nlink = 2 + (nlink_t) MIN(ps.listeners, (uint64_t) UINT32_MAX); /* a subdirectory each */
                stat_from_usec(&ret->st_mtim, atomic_load(&v->ports_mtime_usec));
                break;
        }
        case INO_STATUS:
        case INO_METRICS: {
                _cleanup_free_ char *text = NULL;
                size_t len = 0;

                /* The size of what an open would show now, so that tools trusting st_size read it all. */
                if (status_text(v, ino == INO_METRICS, &text, &len) < 0)
                        len = 0;
                ret->st_mode = S_IFREG | 0444;
                ret->st_nlink = 1;
                ret->st_size = (off_t) len;
                stat_from_usec(&ret->st_mtim, now_usec(CLOCK_REALTIME));
                break;
        }
        case INO_SOCKET:
                ret->st_mode = S_IFLNK | 0777;
                ret->st_nlink = 1;
                ret->st_size = (off_t) strlen(v->socket_link);
                break;
        default:
                return -ENOENT;
        }
        ret->st_ctim = ret->st_atim = ret->st_mtim;
        return 0;
}

/* Attributes: zones/ is invalidated whenever a name comes or goes; the others change by themselves. */
static double fixed_timeout(uint64_t ino) {
        if (ino == INO_ZONES)
                return ZONE_ATTR_TIMEOUT;
        return ino == INO_STATUS || ino == INO_METRICS || ino == INO_PORTS || ino == INO_SEGMENTS ? 0.0 : FIXED_TIMEOUT;
}

/* ---- operations ---------------------------------------------------------------------- */

static void op_init(void *userdata, struct fuse_conn_info *conn) {
        /* O_TRUNC reaches open(): ignored there, as on a device; zones never change size. */
        if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
                conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
        /* Reads reply from a mapping of the memfd (one copy); splice would only add a pipe. */
        conn->want &= ~(unsigned) (FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE |
                                   FUSE_CAP_SPLICE_READ);
        /*
         * The kernel keeps what it was told about POSIX ACLs (that there are
         * none: ENODATA) with the inode, instead of asking for it at every
         * getxattr("system.posix_acl_access"), which ls -l makes for every file;
         * it forgets it with the attributes. Its permission checks stay the mode
         * bits. It then leaves the umask to us (zones_create()).
         */
        if (conn->capable & FUSE_CAP_POSIX_ACL)
                conn->want |= FUSE_CAP_POSIX_ACL;
        /* Listings carry each entry's attributes (ls -l then asks nothing more). */
        if (conn->capable & FUSE_CAP_READDIRPLUS)
                conn->want |= FUSE_CAP_READDIRPLUS;
        conn->time_gran = 1000;
}

static void reply_entry_stat(fuse_req_t req, const struct stat *st, uint64_t generation, double entry_timeout,
                             double attr_timeout) {
        struct fuse_entry_param e = {
                .ino = st->st_ino,
                .generation = generation,
                .attr = *st,
                .attr_timeout = attr_timeout,
                .entry_timeout = entry_timeout,
        };

        (void) fuse_reply_entry(req, &e);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
        struct fuse_view *v = view_of(req);
        struct stat st;
        int r;

        if (strlen(name) > SHMZ_NAME_MAX) {
                (void) fuse_reply_err(req, ENAMETOOLONG);
                return;
        }
        if (parent == INO_ROOT) {
                for (size_t i = 0; i < ELEMENTSOF(root_entries); i++)
                        if (streq(name, root_entries[i].name)) {
                                (void) fixed_stat(v, root_entries[i].ino, &st);
                                reply_entry_stat(req, &st, 0, FIXED_ENTRY_TIMEOUT, fixed_timeout(root_entries[i].ino));
                                return;
                        }
                (void) fuse_reply_err(req, ENOENT);
                return;
        }
        if (parent == INO_ZONES) {
                struct fuse_entry_param e;

                r = zones_lookup(v, name, &e);
                if (r < 0)
                        (void) fuse_reply_err(req, -r);
                else
                        (void) fuse_reply_entry(req, &e);
                return;
        }
        if (parent == INO_SEGMENTS || parent == INO_PORTS || ino_is_ports(parent)) {
                struct fuse_entry_param e;

                r = view_ports_lookup(v, parent, name, &e);
                if (r < 0)
                        (void) fuse_reply_err(req, -r);
                else
                        (void) fuse_reply_entry(req, &e);
                return;
        }
        (void) fuse_reply_err(req, ENOTDIR);
}

static int getattr_any(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret, double *ret_timeout) {
        if (ino < INO_FIXED_MAX) {
                *ret_timeout = fixed_timeout(ino);
                return fixed_stat(v, ino, ret);
        }
        if (ino_is_zone(ino)) {
                *ret_timeout = ZONE_ATTR_TIMEOUT;
                return zones_getattr(v, ino, h, ret);
        }
        if (ino_is_ports(ino))
                return view_ports_getattr(v, ino, h, ret, ret_timeout);
        return -ENOENT;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct stat st;
        double timeout;
        int r;

        r = getattr_any(view_of(req), ino, handle_of(fi), &st, &timeout);
        if (r < 0)
                (void) fuse_reply_err(req, -r);
        else
                (void) fuse_reply_attr(req, &st, timeout);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
        struct fuse_view *v = view_of(req);

        if (ino_is_zone(ino))
                zones_setattr(v, req, ino, attr, to_set, handle_of(fi));
        else
                (void) fuse_reply_err(req, EPERM);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino) {
        if (ino == INO_SOCKET)
                (void) fuse_reply_readlink(req, view_of(req)->socket_link);
        else
                (void) fuse_reply_err(req, EINVAL);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct fuse_view *v = view_of(req);
        struct vhandle *h;
        int r;

        if (ino_is_zone(ino)) {
                zones_open(v, req, ino, fi);
                return;
        }
        if (ino_is_ports(ino)) {
                view_ports_open(v, req, ino, fi);
                return;
        }
        if ((fi->flags & O_ACCMODE) != O_RDONLY) {
                (void) fuse_reply_err(req, EACCES);
                return;
        }
        if (ino != INO_STATUS && ino != INO_METRICS) {
                (void) fuse_reply_err(req, ino < INO_FIXED_MAX ? EISDIR : ENOENT);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        h->readable = true;
        /* One snapshot per open: a reader sees one consistent text, whatever its read sizes. */
        r = status_text(v, ino == INO_METRICS, &h->text, &h->text_len);
        if (r < 0) {
                vhandle_free(v, h);
                (void) fuse_reply_err(req, -r);
                return;
        }
        fi->fh = (uintptr_t) h;
        fi->direct_io = 1;
        fi->keep_cache = 0;
        fi->nonseekable = 0;
        if (fuse_reply_open(req, fi) < 0)
                vhandle_free(v, h); /* interrupted: no release will come */
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        struct fuse_view *v = view_of(req);
        struct vhandle *h = handle_of(fi);

        if (!h || off < 0) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        if (h->zone) {
                zones_read(v, req, h, size, off);
                return;
        }
        if (h->segment) {
                view_ports_read(v, req, h, size, off);
                return;
        }
        if (h->text) {
                size_t o = (uint64_t) off >= h->text_len ? h->text_len : (size_t) off;

                (void) fuse_reply_buf(req, h->text + o, MIN(size, h->text_len - o));
                return;
        }
        (void) fuse_reply_buf(req, NULL, 0);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
        struct vhandle *h = handle_of(fi);

        if (!h || !h->zone || !h->writable) {
                (void) fuse_reply_err(req, EBADF);
                return;
        }
        zones_write(view_of(req), req, h, buf, size, off);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        (void) fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
        /* Writes went straight into the memfd: nothing is pending. */
        (void) fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        vhandle_free(view_of(req), handle_of(fi));
        (void) fuse_reply_err(req, 0);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct fuse_view *v = view_of(req);
        struct vhandle *h;
        int r;

        if (!(ino == INO_ROOT || ino == INO_ZONES || ino == INO_SEGMENTS || ino == INO_PORTS || ino_is_ports(ino))) {
                (void) fuse_reply_err(req, ENOTDIR);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        if (ino == INO_SEGMENTS || ino == INO_PORTS || ino_is_ports(ino)) {
                r = view_ports_opendir(v, ino, h);
                if (r < 0) {
                        vhandle_free(v, h);
                        (void) fuse_reply_err(req, -r);
                        return;
                }
        }
        fi->fh = (uintptr_t) h;
        if (fuse_reply_open(req, fi) < 0)
                vhandle_free(v, h);
}

/*
 * A zone's entry in a listing. READDIRPLUS gets it without a node id, which
 * tells the kernel to make no dentry of it (and to leave one it has alone):
 * the kernel samples the epoch when it reads a listing's reply, not when it
 * asks, so a zone removed between our reading the registry and its reading
 * our reply would otherwise stay cached, with its timeout; and a dentry that a
 * LOOKUP cached for a minute would be cut to a listing's. Names come from
 * LOOKUPs only, which sample the epoch before they ask: the first ls -l of a
 * name looks it up once, later ones find it cached.
 */
static bool add_zone_dirent(fuse_req_t req, bool plus, char *buf, size_t size, size_t *used, const char *name,
                            const struct stat *st, uint64_t next_off) {
        struct fuse_entry_param ep = { .ino = 0, .attr = *st }; /* attr: the entry's inode number and type */

        return put_dirent(req, plus ? &ep : NULL, buf, size, used, name, st, next_off);
}

/* Zones per registry call while listing zones/. */
#define DIR_PAGE 64

/*
 * Offsets: 1 after ".", 2 after "..", then one per entry. zones/ is listed a
 * page at a time by name from where the handle stands, so an open directory
 * costs one name, not a copy of the directory. A seek elsewhere (telldir and
 * seekdir) walks again from the start.
 */
static void do_readdir(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi, bool plus) {
        struct fuse_view *v = view_of(req);
        struct vhandle *h = handle_of(fi);
        _cleanup_free_ char *buf = NULL;
        uint64_t pos = (uint64_t) off;
        size_t used = 0;
        struct stat st;
        double timeout;

        if (!h || off < 0) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        size = MIN(size, (size_t) READ_BUF_SIZE);
        buf = malloc(size);
        if (!buf) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        if (pos == 0) {
                if (getattr_any(v, h->ino, h, &st, &timeout) < 0) {
                        (void) fuse_reply_err(req, ENOENT); /* ports/<name> went */
                        return;
                }
                if (!add_dirent(req, plus, buf, size, &used, ".", &st, 0, 0, 0, 1))
                        goto reply;
                pos = 1;
        }
        if (pos == 1) {
                uint64_t parent = ino_is_ports(h->ino) ? view_ports_parent(h->ino) : INO_ROOT;

                if (getattr_any(v, parent, NULL, &st, &timeout) < 0)
                        (void) fixed_stat(v, INO_ROOT, &st);
                if (!add_dirent(req, plus, buf, size, &used, "..", &st, 0, 0, 0, 2))
                        goto reply;
                pos = 2;
        }
        if (h->ino == INO_ROOT) {
                for (; pos - 2 < ELEMENTSOF(root_entries); pos++) {
                        uint64_t ino = root_entries[pos - 2].ino;

                        (void) fixed_stat(v, ino, &st);
                        if (!add_dirent(req, plus, buf, size, &used, root_entries[pos - 2].name, &st, 0,
                                        FIXED_ENTRY_TIMEOUT, fixed_timeout(ino), pos + 1))
                                break;
                }
                goto reply;
        }
        if (h->ino != INO_ZONES) {
                view_ports_readdir(v, req, h, plus, off, buf, size, &used);
                goto reply;
        }

        if (pos != h->dir_pos) {
                /* Not where we stopped: walk from the first zone to pos. */
                h->dir_pos = 2;
                h->dir_after[0] = 0;
        }
        for (;;) {
                struct shmz_msg_zone_info zi[DIR_PAGE];
                size_t n = 0;

                if (registry_list_page(v->registry, h->dir_after, zi, DIR_PAGE, &n) < 0 || n == 0)
                        break;
                for (size_t i = 0; i < n; i++) {
                        if (h->dir_pos >= pos) {
                                zone_stat(&zi[i], &st);
                                if (!add_zone_dirent(req, plus, buf, size, &used, zi[i].name, &st, h->dir_pos + 1))
                                        goto reply;
                        }
                        h->dir_pos++;
                        strncpy_buf(h->dir_after, sizeof(h->dir_after), zi[i].name);
                }
                if (n < DIR_PAGE)
                        break;
        }
reply:
        (void) fuse_reply_buf(req, buf, used);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        do_readdir(req, size, off, fi, false);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        do_readdir(req, size, off, fi, true);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        vhandle_free(view_of(req), handle_of(fi));
        (void) fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
        struct fuse_view *v = view_of(req);
        struct registry_stats st;
        struct statvfs sv = {};
        uint64_t free_bytes;

        registry_get_stats(v->registry, &st);
        free_bytes = st.budget > st.budget_used ? st.budget - st.budget_used : 0;
        /* The budget is the file system's size; what it leaves is the free space. */
        sv.f_bsize = sv.f_frsize = 4096;
        sv.f_blocks = st.budget / 4096;
        sv.f_bfree = sv.f_bavail = free_bytes / 4096;
        sv.f_files = st.zones + st.zones_unlinked;
        sv.f_ffree = sv.f_favail = sv.f_bfree;
        sv.f_namemax = SHMZ_NAME_MAX;
        (void) fuse_reply_statfs(req, &sv);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
        if (parent != INO_ZONES) {
                (void) fuse_reply_err(req, parent == INO_ROOT ? EPERM : EACCES);
                return;
        }
        zones_create(view_of(req), req, name, mode, fi);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
        if (parent != INO_ZONES) {
                (void) fuse_reply_err(req, EPERM);
                return;
        }
        zones_unlink(view_of(req), req, name);
}

/*
 * Names here are user.* ones (and POSIX ACLs, of which there are none:
 * ENODATA). Other namespaces are not supported, and saying so (ENOTSUP rather
 * than ENODATA) matters: ls -l asks every file for security.selinux, unless the
 * file system said it does not support it, which the kernel cannot answer for
 * us (it never caches xattrs).
 */
static bool xattr_namespace_ours(const char *name) {
        return strncmp(name, "user.", 5) == 0 || strncmp(name, "system.posix_acl_", 17) == 0;
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
        if (!xattr_namespace_ours(name))
                (void) fuse_reply_err(req, ENOTSUP);
        else if (ino_is_zone(ino))
                zones_getxattr(view_of(req), req, ino, name, size);
        else if (ino_is_ports(ino))
                view_ports_getxattr(view_of(req), req, ino, name, size);
        else
                (void) fuse_reply_err(req, ENODATA);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
        if (ino_is_zone(ino))
                zones_listxattr(view_of(req), req, ino, size);
        else if (ino_is_ports(ino))
                view_ports_listxattr(view_of(req), req, ino, size);
        else if (size == 0)
                (void) fuse_reply_xattr(req, 0);
        else
                (void) fuse_reply_buf(req, NULL, 0);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags) {
        if (ino_is_zone(ino))
                zones_setxattr(view_of(req), req, ino, name, value, size, flags);
        else
                /* The figures are the daemon's; nothing else can be stored here. */
                (void) fuse_reply_err(req, ino_is_ports(ino) && view_ports_xattr_is_ours(name) ? EPERM : ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) {
        if (ino_is_zone(ino))
                zones_removexattr(view_of(req), req, ino, name);
        else
                (void) fuse_reply_err(req, ino_is_ports(ino) && view_ports_xattr_is_ours(name) ? EPERM : ENOTSUP);
}

static void op_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned cmd, void *arg, struct fuse_file_info *fi, unsigned flags,
                     const void *in_buf, size_t in_bufsz, size_t out_bufsz) {
        struct vhandle *h = handle_of(fi);

        if (!h || !h->zone || (flags & FUSE_IOCTL_DIR)) {
                (void) fuse_reply_err(req, ENOTTY);
                return;
        }
        zones_ioctl(view_of(req), req, h, cmd, flags, in_bufsz, out_bufsz);
}

static const struct fuse_lowlevel_ops view_ops = {
        .init = op_init,
        .lookup = op_lookup,
        .getattr = op_getattr,
        .setattr = op_setattr,
        .readlink = op_readlink,
        .unlink = op_unlink,
        .open = op_open,
        .read = op_read,
        .write = op_write,
        .flush = op_flush,
        .release = op_release,
        .fsync = op_fsync,
        .opendir = op_opendir,
        .readdir = op_readdir,
        .readdirplus = op_readdirplus,
        .releasedir = op_releasedir,
        .statfs = op_statfs,
        .setxattr = op_setxattr,
        .getxattr = op_getxattr,
        .listxattr = op_listxattr,
        .removexattr = op_removexattr,
        .create = op_create,
        .ioctl = op_ioctl,
};

/* ---- mount and threads --------------------------------------------------------------- */

/* Is there a FUSE file system mounted exactly at path? (libmount reads /proc/self/mountinfo.) */
static bool fuse_mounted_at(const char *path) {
        struct libmnt_table *t = mnt_new_table();
        struct libmnt_iter *it = mnt_new_iter(MNT_ITER_FORWARD);
        struct libmnt_fs *fs;
        bool found = false;

        if (t && it && mnt_table_parse_file(t, "/proc/self/mountinfo") == 0)
                while (!found && mnt_table_next_fs(t, it, &fs) == 0) {
                        const char *type = mnt_fs_get_fstype(fs);

                        found = mnt_fs_streq_target(fs, path) && type &&
                                (streq(type, "fuse") || strncmp(type, "fuse.", 5) == 0);
                }
        mnt_free_iter(it);
        mnt_unref_table(t);
        return found;
}

/*
 * A daemon that crashed leaves its mount behind ("Transport endpoint is not
 * connected"); libfuse cannot adopt it, so detach it (and any FUSE mount
 * stacked at the same place) before mounting again.
 */
static void clear_stale_mount(const char *path) {
        struct stat st;

        for (int i = 0; i < 16; i++) {
                bool dead = stat(path, &st) < 0 && errno == ENOTCONN;

                if (!dead && !fuse_mounted_at(path))
                        return;
                if (umount2(path, MNT_DETACH) < 0) {
                        log_warning_errno(errno, "Cannot detach the old FUSE mount at %s: %m", path);
                        return;
                }
                log_notice("Detached a %s FUSE mount left at %s.", dead ? "dead" : "leftover", path);
        }
}

/*
 * After a request, keep polling the (non-blocking) fd for SPIN_USEC before
 * going back to epoll: a request/reply exchange otherwise costs two sleeping
 * wake-ups, which on this kind of (virtual) machine are ~50 us each. The spin
 * only runs while requests keep coming; an idle view sleeps.
 */
#define SPIN_USEC 50

static int on_fuse_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct fuse_view *v = userdata;
        uint64_t deadline = 0;

        /* A bounded batch, so that the stop eventfd is looked at now and then. */
        for (int i = 0; i < 100000; i++) {
                int r = fuse_session_receive_buf(v->se, &v->fuse_buf);

                if (r == -EINTR || r == -EAGAIN) {
                        uint64_t t = now_usec(CLOCK_MONOTONIC);

                        if (deadline == 0)
                                deadline = t + SPIN_USEC;
                        if (t >= deadline)
                                return 0;
                        continue;
                }
                if (r <= 0 || fuse_session_exited(v->se)) {
                        if (r < 0)
                                log_error_errno(r, "FUSE view: reading /dev/fuse failed: %m");
                        else
                                log_notice("FUSE view: %s was unmounted; the view stops.", v->mountpoint);
                        return sd_event_exit(sd_event_source_get_event(s), 0);
                }
                fuse_session_process_buf(v->se, &v->fuse_buf);
                deadline = 0;
        }
        return 0;
}

static int on_stop(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

static void start_done(struct fuse_view *v, int r) {
        pthread_mutex_lock(&v->start_lock);
        v->start_result = r;
        pthread_cond_signal(&v->start_cond);
        pthread_mutex_unlock(&v->start_lock);
}

static void *fuse_thread(void *arg) {
        struct fuse_view *v = arg;
        sd_event *e = NULL;
        int r;

        r = sd_event_new(&e);
        if (r >= 0)
                r = sd_event_add_io(e, NULL, fuse_session_fd(v->se), EPOLLIN, on_fuse_io, v);
        if (r >= 0)
                r = sd_event_add_io(e, NULL, v->stop_fd, EPOLLIN, on_stop, v);
        start_done(v, MIN(r, 0));
        if (r >= 0) {
                r = sd_event_loop(e);
                if (r < 0)
                        log_error_errno(r, "FUSE view: event loop failed: %m");
        }
        sd_event_unref(e);
        return NULL;
}

static void view_free(struct fuse_view *v) {
        if (v->se) {
                if (v->mounted)
                        fuse_session_unmount(v->se);
                fuse_session_destroy(v->se);
        }
        while (v->handles.next != &v->handles)
                vhandle_free(v, v->handles.next);
        safe_close(v->stop_fd);
        free(v->inval);
        free(v->later);
        free(v->later2);
        free(v->read_buf);
        free(v->fuse_buf.mem);
        free(v->mountpoint);
        free(v->socket_link);
        pthread_mutex_destroy(&v->qlock);
        pthread_cond_destroy(&v->qcond);
        pthread_mutex_destroy(&v->start_lock);
        pthread_cond_destroy(&v->start_cond);
        free(v);
}

static int absolute_path(const char *p, char **ret) {
        char cwd[PATH_MAX];

        if (p[0] == '/')
                *ret = strdup(p);
        else if (!getcwd(cwd, sizeof(cwd)))
                return -errno;
        else if (asprintf(ret, "%s/%s", cwd, p) < 0)
                *ret = NULL;
        return *ret ? 0 : -ENOMEM;
}

int fuse_view_start(struct registry *reg, struct ports *ports, const char *mountpoint, const char *socket_path,
                    fuse_view_figures_t figures, void *figures_data, struct fuse_view **ret) {
        char *argv[] = { (char *) "shmzoned", (char *) "-o",
                         (char *) "allow_other,default_permissions,fsname=shmzone,subtype=shmzone", NULL };
        struct fuse_args args = FUSE_ARGS_INIT(3, argv);
        struct fuse_view *v;
        int r, flags;

        v = calloc(1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        v->registry = reg;
        v->figures = figures;
        v->figures_data = figures_data;
        v->stop_fd = -EBADF;
        v->uid = geteuid();
        v->gid = getegid();
        v->start_usec = now_usec(CLOCK_REALTIME);
        atomic_init(&v->zones_mtime_usec, v->start_usec);
        atomic_init(&v->ports, ports);
        atomic_init(&v->ports_mtime_usec, v->start_usec);
        atomic_init(&v->segments_mtime_usec, v->start_usec);
        atomic_init(&v->epoch_works, false);
        v->handles.next = v->handles.prev = &v->handles;
        pthread_mutex_init(&v->qlock, NULL);
        pthread_cond_init(&v->qcond, NULL);
        pthread_mutex_init(&v->start_lock, NULL);
        pthread_cond_init(&v->start_cond, NULL);
        v->start_result = 1;

        r = absolute_path(mountpoint, &v->mountpoint);
        if (r < 0)
                goto fail;
        r = absolute_path(socket_path, &v->socket_link);
        if (r < 0)
                goto fail;
        v->inval = calloc(INVAL_SLOTS, sizeof(*v->inval));
        v->later = calloc(INVAL_SLOTS, sizeof(*v->later));
        v->later2 = calloc(INVAL_SLOTS, sizeof(*v->later2));
        if (!v->inval || !v->later || !v->later2) {
                r = -ENOMEM;
                goto fail;
        }
        v->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (v->stop_fd < 0) {
                r = -errno;
                goto fail;
        }

        clear_stale_mount(v->mountpoint);
        r = mkdir_parents(v->mountpoint, 0755, true);
        if (r < 0) {
                log_error_errno(r, "Cannot create the mount point %s: %m", v->mountpoint);
                goto fail;
        }

        v->se = fuse_session_new(&args, &view_ops, sizeof(view_ops), v);
        fuse_opt_free_args(&args);
        if (!v->se) {
                r = -EINVAL;
                goto fail;
        }
        if (fuse_session_mount(v->se, v->mountpoint) != 0) {
                r = -EIO;
                goto fail;
        }
        v->mounted = true;
        flags = fcntl(fuse_session_fd(v->se), F_GETFL);
        if (flags < 0 || fcntl(fuse_session_fd(v->se), F_SETFL, flags | O_NONBLOCK) < 0) {
                r = -errno;
                goto fail;
        }

        /*
         * Changes are watched before the first request is answered: one made in
         * between would never reach the kernel, and a file opened meanwhile
         * could show old attributes for their whole timeout. Until the epoch is
         * known to work no name is cached, so the early ones only cost a write.
         */
        registry_set_observer(v->registry, on_registry_event, v);
        if (ports)
                ports_set_observer(ports, view_ports_event, v);

        r = -pthread_create(&v->thread, NULL, fuse_thread, v);
        if (r < 0)
                goto fail;
        v->thread_started = true;
        pthread_mutex_lock(&v->start_lock);
        while (v->start_result > 0)
                pthread_cond_wait(&v->start_cond, &v->start_lock);
        r = v->start_result;
        pthread_mutex_unlock(&v->start_lock);
        if (r < 0)
                goto fail;

        r = -pthread_create(&v->notifier, NULL, notifier_thread, v);
        if (r < 0)
                goto fail;
        v->notifier_started = true;
        /* Zone names are cached only if the kernel can be told to forget them all (Linux 6.16). */
        r = notify_inc_epoch(v);
        atomic_store(&v->epoch_works, r >= 0);
        if (r < 0)
                log_full_errno(LOG_INFO, r,
                               "FUSE view: the kernel cannot be told to forget cached names (%m); zone names "
                               "are looked up at every use.");
        log_info("FUSE view mounted at %s.", v->mountpoint);
        *ret = v;
        return 0;

fail:
        fuse_view_stop(v);
        return r;
}

void fuse_view_stop(struct fuse_view *v) {
        bool stuck = false;

        if (!v)
                return;
        if (v->registry)
                registry_set_observer(v->registry, NULL, NULL);
        if (view_ports(v))
                ports_set_observer(view_ports(v), NULL, NULL); /* the view keeps pt for the references it holds */
        /* The notifier first: the FUSE thread must keep serving whatever request it may wait for. */
        pthread_mutex_lock(&v->qlock);
        v->stopping = true;
        pthread_cond_signal(&v->qcond);
        pthread_mutex_unlock(&v->qlock);
        if (v->notifier_started) {
                struct timespec ts;

                /* It sends nothing that waits on a lock a user can hold; should the kernel differ, do not wait. */
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_sec += 5;
                if (pthread_timedjoin_np(v->notifier, NULL, &ts) != 0) {
                        log_warning("FUSE view: the invalidation thread is stuck in the kernel; leaving it.");
                        stuck = true;
                }
        }
        if (v->thread_started) {
                uint64_t one = 1;

                (void) !write(v->stop_fd, &one, sizeof(one));
                (void) pthread_join(v->thread, NULL);
        }
        if (v->mounted)
                log_info("FUSE view: unmounting %s.", v->mountpoint);
        if (stuck) {
                /* The stuck thread still uses the session: unmount, but free nothing it may touch. */
                if (v->mounted)
                        fuse_session_unmount(v->se);
                return;
        }
        view_free(v);
}
