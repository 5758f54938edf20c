/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The FUSE view: mount, the FUSE thread and its sd_event loop, the
 * invalidation thread, and the fixed part of the tree (root, status,
 * metrics, socket, the provider directories). Zone files live in
 * fuse-zones.c, the status texts in fuse-status.c.
 *
 * Threads: all requests are served by one FUSE thread (one sd_event loop;
 * the registry's critical sections never wait, so one thread keeps up; bulk
 * reads reply from a mapping of the memfd, see zones_read()). Invalidations go through a
 * second thread, because the kernel may make fuse_lowlevel_notify_inval_entry()
 * wait for a directory lock held by a request that only the FUSE thread can
 * answer: calling it from the FUSE thread itself could deadlock.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <systemd/sd-event.h>
#include <time.h>

#include "../daemon/config.h"
#include "daemon.h"
#include "fuse-internal.h"
#include "log.h"

/* ---- small helpers ------------------------------------------------------------------ */

void stat_from_usec(struct timespec *ts, uint64_t usec) {
        ts->tv_sec = (time_t) (usec / 1000000u);
        ts->tv_nsec = (long) (usec % 1000000u) * 1000;
}

void caller_from_req(fuse_req_t req, struct caller *ret) {
        const struct fuse_ctx *ctx = fuse_req_ctx(req);

        *ret = (struct caller){ .uid = ctx->uid, .gid = ctx->gid, .pid = ctx->pid };
}

struct vhandle *vhandle_new(struct fuse_view *v, uint64_t ino) {
        struct vhandle *h = calloc(1, sizeof(*h));

        if (!h)
                return NULL;
        h->ino = ino;
        h->next = v->handles.next;
        h->prev = &v->handles;
        v->handles.next->prev = h;
        v->handles.next = h;
        return h;
}

void vhandle_free(struct fuse_view *v, struct vhandle *h) {
        if (!h)
                return;
        h->prev->next = h->next;
        h->next->prev = h->prev;
        if (h->zone)
                zones_release(v, h);
        free(h->text);
        free(h->dirents);
        free(h);
}

static struct fuse_view *view_of(fuse_req_t req) {
        return fuse_req_userdata(req);
}

static struct vhandle *handle_of(const struct fuse_file_info *fi) {
        return fi ? (struct vhandle *) (uintptr_t) fi->fh : NULL;
}

static bool ino_is_zone(uint64_t ino) {
        return ino >= REGISTRY_FIRST_INO && ino < (UINT64_C(1) << INO_PROVIDER_SHIFT);
}

static bool ino_is_provider(uint64_t ino, enum fuse_view_dir *ret_dir, uint64_t *ret_id) {
        uint64_t d = ino >> INO_PROVIDER_SHIFT;

        if (d == 0 || d > _FUSE_VIEW_DIR_MAX)
                return false;
        *ret_dir = (enum fuse_view_dir)(d - 1);
        *ret_id = ino & FUSE_VIEW_ID_MAX;
        return true;
}

/* ---- invalidation queue ------------------------------------------------------------- */

void view_queue_inval(struct fuse_view *v, uint64_t parent, const char *name, uint64_t ino) {
        struct inval *q;

        pthread_mutex_lock(&v->qlock);
        if (v->stopping)
                goto out;
        if (v->n_queue == v->queue_cap) {
                size_t cap = MAX(v->queue_cap * 2, (size_t) 64);

                q = realloc(v->queue, cap * sizeof(*q));
                if (!q) {
                        v->queue_overflow = true; /* the 1 s timeouts still bound the staleness */
                        goto out;
                }
                v->queue = q;
                v->queue_cap = cap;
        }
        q = &v->queue[v->n_queue++];
        q->parent = parent;
        q->ino = ino;
        strncpy_buf(q->name, sizeof(q->name), name ?: "");
        pthread_cond_signal(&v->qcond);
out:
        pthread_mutex_unlock(&v->qlock);
}

static void *notifier_thread(void *arg) {
        struct fuse_view *v = arg;

        for (;;) {
                struct inval *batch;
                size_t n;
                bool overflow;

                pthread_mutex_lock(&v->qlock);
                while (!v->stopping && v->n_queue == 0)
                        pthread_cond_wait(&v->qcond, &v->qlock);
                if (v->stopping) {
                        pthread_mutex_unlock(&v->qlock);
                        break;
                }
                batch = TAKE_PTR(v->queue);
                n = v->n_queue;
                v->n_queue = v->queue_cap = 0;
                overflow = v->queue_overflow;
                v->queue_overflow = false;
                pthread_mutex_unlock(&v->qlock);

                if (overflow)
                        log_warning("FUSE view: out of memory queueing invalidations; the kernel may show "
                                    "stale entries for up to a second.");
                for (size_t i = 0; i < n; i++) {
                        /* -ENOENT: the kernel had nothing cached; nothing to do. */
                        if (batch[i].parent && batch[i].name[0])
                                (void) fuse_lowlevel_notify_inval_entry(v->se, batch[i].parent, batch[i].name,
                                                                        strlen(batch[i].name));
                        if (batch[i].ino)
                                (void) fuse_lowlevel_notify_inval_inode(v->se, batch[i].ino, -1, 0);
                }
                free(batch);
        }
        return NULL;
}

/* Registry observer: called with the registry lock held, so it only queues. */
static void on_registry_event(void *userdata, enum registry_event ev, const char *name, uint64_t ino) {
        struct fuse_view *v = userdata;

        switch (ev) {
        case REGISTRY_ZONE_ADDED:
                /* A negative dentry may be cached for the name. */
                atomic_store(&v->zones_mtime_usec, now_usec(CLOCK_REALTIME));
                view_queue_inval(v, INO_ZONES, name, INO_ZONES);
                break;
        case REGISTRY_ZONE_REMOVED:
                atomic_store(&v->zones_mtime_usec, now_usec(CLOCK_REALTIME));
                view_queue_inval(v, INO_ZONES, name, ino);
                break;
        case REGISTRY_ZONE_CHANGED:
                view_queue_inval(v, 0, NULL, ino);
                break;
        }
}

void fuse_view_changed(struct fuse_view *v, enum fuse_view_dir dir, uint64_t parent, const char *name, uint64_t id) {
        uint64_t pino;

        if (!v || dir >= _FUSE_VIEW_DIR_MAX || parent > FUSE_VIEW_ID_MAX || id > FUSE_VIEW_ID_MAX)
                return;
        pino = parent == 0 ? provider_dir_ino(dir) : provider_ino(dir, parent);
        view_queue_inval(v, pino, name, id ? provider_ino(dir, id) : 0);
}

void fuse_view_register(struct fuse_view *v, enum fuse_view_dir dir, const struct fuse_view_provider *p,
                        void *userdata) {
        if (!v || dir >= _FUSE_VIEW_DIR_MAX)
                return;
        pthread_mutex_lock(&v->plock);
        v->providers[dir].ops = p;
        v->providers[dir].userdata = userdata;
        pthread_mutex_unlock(&v->plock);
        view_queue_inval(v, 0, NULL, provider_dir_ino(dir));
}

static const struct fuse_view_provider *provider_get(struct fuse_view *v, enum fuse_view_dir dir, void **ret_data) {
        const struct fuse_view_provider *p;

        pthread_mutex_lock(&v->plock);
        p = v->providers[dir].ops;
        *ret_data = v->providers[dir].userdata;
        pthread_mutex_unlock(&v->plock);
        return p;
}

static void provider_stat(enum fuse_view_dir dir, const struct fuse_view_entry *e, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = provider_ino(dir, e->id),
                .st_mode = S_ISDIR(e->mode) ? (S_IFDIR | (e->mode & 0555)) : (S_IFREG | (e->mode & 0444)),
                .st_nlink = S_ISDIR(e->mode) ? 2 : 1,
                .st_uid = e->uid,
                .st_gid = e->gid,
                .st_size = (off_t) MIN(e->size, (uint64_t) INT64_MAX),
                .st_blksize = VIEW_BLKSIZE,
        };
        stat_from_usec(&ret->st_mtim, e->mtime_usec);
        ret->st_ctim = ret->st_atim = ret->st_mtim;
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
        case INO_PORTS:
                ret->st_mode = S_IFDIR | 0555;
                ret->st_nlink = 2;
                break;
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

static double fixed_timeout(uint64_t ino) {
        return ino == INO_STATUS || ino == INO_METRICS || ino == INO_ZONES ? 0.0 : FIXED_TIMEOUT;
}

/* ---- operations ---------------------------------------------------------------------- */

static void op_init(void *userdata, struct fuse_conn_info *conn) {
        /* O_TRUNC reaches open(): ignored there, as on a device; zones never change size. */
        if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
                conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
        /* Reads reply from a mapping of the memfd (one copy); splice would only add a pipe. */
        conn->want &= ~(unsigned) (FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE |
                                   FUSE_CAP_SPLICE_READ);
        conn->time_gran = 1000;
}

static void reply_entry_stat(fuse_req_t req, const struct stat *st, uint64_t generation, double timeout) {
        struct fuse_entry_param e = {
                .ino = st->st_ino,
                .generation = generation,
                .attr = *st,
                .attr_timeout = timeout,
                .entry_timeout = timeout,
        };

        (void) fuse_reply_entry(req, &e);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
        struct fuse_view *v = view_of(req);
        enum fuse_view_dir dir;
        uint64_t id;
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
                                reply_entry_stat(req, &st, 0, fixed_timeout(root_entries[i].ino));
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
        if (parent == INO_SEGMENTS || parent == INO_PORTS || ino_is_provider(parent, &dir, &id)) {
                const struct fuse_view_provider *p;
                struct fuse_view_entry ent;
                void *data;

                if (parent == INO_SEGMENTS || parent == INO_PORTS) {
                        dir = parent == INO_SEGMENTS ? FUSE_VIEW_SEGMENTS : FUSE_VIEW_PORTS;
                        id = 0;
                }
                p = provider_get(v, dir, &data);
                r = p && p->lookup ? p->lookup(data, id, name, &ent) : -ENOENT;
                if (r >= 0 && (ent.id == 0 || ent.id > FUSE_VIEW_ID_MAX))
                        r = -EIO;
                if (r < 0) {
                        (void) fuse_reply_err(req, -r);
                        return;
                }
                provider_stat(dir, &ent, &st);
                reply_entry_stat(req, &st, 0, PROVIDER_TIMEOUT);
                return;
        }
        (void) fuse_reply_err(req, ino_is_zone(parent) || parent < INO_FIXED_MAX ? ENOTDIR : ENOENT);
}

static int getattr_any(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret, double *ret_timeout) {
        enum fuse_view_dir dir;
        uint64_t id;

        if (ino < INO_FIXED_MAX) {
                *ret_timeout = fixed_timeout(ino);
                return fixed_stat(v, ino, ret);
        }
        if (ino_is_zone(ino)) {
                *ret_timeout = ZONE_ATTR_TIMEOUT;
                return zones_getattr(v, ino, h, ret);
        }
        if (ino_is_provider(ino, &dir, &id)) {
                const struct fuse_view_provider *p;
                struct fuse_view_entry ent;
                void *data;
                int r;

                p = provider_get(v, dir, &data);
                r = p && p->get ? p->get(data, id, &ent) : -ENOENT;
                if (r < 0)
                        return r;
                ent.id = id;
                provider_stat(dir, &ent, ret);
                *ret_timeout = PROVIDER_TIMEOUT;
                return 0;
        }
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
        enum fuse_view_dir dir;
        struct vhandle *h;
        uint64_t id;
        int r;

        if (ino_is_zone(ino)) {
                zones_open(v, req, ino, fi);
                return;
        }
        if ((fi->flags & O_ACCMODE) != O_RDONLY) {
                (void) fuse_reply_err(req, EACCES);
                return;
        }
        if (ino != INO_STATUS && ino != INO_METRICS && !ino_is_provider(ino, &dir, &id)) {
                (void) fuse_reply_err(req, ino < INO_FIXED_MAX ? EISDIR : ENOENT);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        h->readable = true;
        if (ino == INO_STATUS || ino == INO_METRICS) {
                /* One snapshot per open: a reader sees one consistent text, whatever its read sizes. */
                r = status_text(v, ino == INO_METRICS, &h->text, &h->text_len);
                if (r < 0) {
                        vhandle_free(v, h);
                        (void) fuse_reply_err(req, -r);
                        return;
                }
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
        enum fuse_view_dir dir;
        uint64_t id;

        if (!h || off < 0) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        if (h->zone) {
                zones_read(v, req, h, size, off);
                return;
        }
        if (h->text) {
                size_t o = (uint64_t) off >= h->text_len ? h->text_len : (size_t) off;

                (void) fuse_reply_buf(req, h->text + o, MIN(size, h->text_len - o));
                return;
        }
        if (ino_is_provider(ino, &dir, &id)) {
                const struct fuse_view_provider *p;
                _cleanup_free_ char *buf = NULL;
                void *data;
                ssize_t n;

                p = provider_get(v, dir, &data);
                if (!p || !p->read) {
                        (void) fuse_reply_buf(req, NULL, 0);
                        return;
                }
                size = MIN(size, (size_t) VIEW_BLKSIZE);
                buf = malloc(size);
                if (!buf) {
                        (void) fuse_reply_err(req, ENOMEM);
                        return;
                }
                n = p->read(data, id, buf, size, (uint64_t) off);
                if (n < 0)
                        (void) fuse_reply_err(req, (int) -n);
                else
                        (void) fuse_reply_buf(req, buf, MIN((size_t) n, size));
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
        enum fuse_view_dir dir;
        struct vhandle *h;
        uint64_t id;

        if (!(ino == INO_ROOT || ino == INO_ZONES || ino == INO_SEGMENTS || ino == INO_PORTS ||
              ino_is_provider(ino, &dir, &id))) {
                (void) fuse_reply_err(req, ENOTDIR);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        fi->fh = (uintptr_t) h;
        if (fuse_reply_open(req, fi) < 0)
                vhandle_free(v, h);
}

static int dirents_add(struct vhandle *h, size_t *cap, const char *name, const struct stat *st, uint64_t gen,
                       double entry_timeout, double attr_timeout) {
        if (h->n_dirents == *cap) {
                size_t ncap = MAX(*cap * 2, (size_t) 16);
                struct vdirent *n = realloc(h->dirents, ncap * sizeof(*n));

                if (!n)
                        return -ENOMEM;
                h->dirents = n;
                *cap = ncap;
        }
        strncpy_buf(h->dirents[h->n_dirents].name, SHMZ_NAME_BUF, name);
        h->dirents[h->n_dirents].st = *st;
        h->dirents[h->n_dirents].generation = gen;
        h->dirents[h->n_dirents].entry_timeout = entry_timeout;
        h->dirents[h->n_dirents].attr_timeout = attr_timeout;
        h->n_dirents++;
        return 0;
}

static int provider_snapshot(struct fuse_view *v, struct vhandle *h, enum fuse_view_dir dir, uint64_t parent,
                             size_t *cap) {
        _cleanup_free_ struct fuse_view_entry *ents = NULL;
        const struct fuse_view_provider *p;
        size_t n = 0;
        void *data;
        int r;

        p = provider_get(v, dir, &data);
        if (!p || !p->list)
                return 0;
        r = p->list(data, parent, &ents, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                struct stat st;

                /* The provider's names become file names: the same rules as zones. */
                if (ents[i].id == 0 || ents[i].id > FUSE_VIEW_ID_MAX ||
                    !buf_is_cstr(ents[i].name, sizeof(ents[i].name)) || !shmz_name_is_valid(ents[i].name))
                        continue;
                provider_stat(dir, &ents[i], &st);
                r = dirents_add(h, cap, ents[i].name, &st, 0, PROVIDER_TIMEOUT, PROVIDER_TIMEOUT);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The directory's entries as they are now, "." and ".." first; offsets index this snapshot. */
static int dir_snapshot(struct fuse_view *v, struct vhandle *h) {
        enum fuse_view_dir dir;
        struct stat st;
        size_t cap = 0;
        uint64_t id;
        int r;

        free(TAKE_PTR(h->dirents));
        h->n_dirents = 0;
        if (h->ino < INO_FIXED_MAX)
                (void) fixed_stat(v, h->ino, &st);
        else {
                double t;

                r = getattr_any(v, h->ino, NULL, &st, &t);
                if (r < 0)
                        return r;
        }
        r = dirents_add(h, &cap, ".", &st, 0, 0, 0);
        if (r < 0)
                return r;
        (void) fixed_stat(v, INO_ROOT, &st);
        r = dirents_add(h, &cap, "..", &st, 0, 0, 0);
        if (r < 0)
                return r;

        switch (h->ino) {
        case INO_ROOT:
                for (size_t i = 0; i < ELEMENTSOF(root_entries); i++) {
                        (void) fixed_stat(v, root_entries[i].ino, &st);
                        r = dirents_add(h, &cap, root_entries[i].name, &st, 0, fixed_timeout(root_entries[i].ino),
                                        fixed_timeout(root_entries[i].ino));
                        if (r < 0)
                                return r;
                }
                return 0;
        case INO_ZONES: {
                _cleanup_free_ struct zone_info *zi = NULL;
                size_t n = 0;

                r = registry_list(v->registry, &zi, &n);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < n; i++) {
                        zone_stat(&zi[i], &st);
                        r = dirents_add(h, &cap, zi[i].name, &st, zi[i].generation, ZONE_ENTRY_TIMEOUT,
                                        ZONE_ATTR_TIMEOUT);
                        if (r < 0)
                                return r;
                }
                return 0;
        }
        case INO_SEGMENTS:
                return provider_snapshot(v, h, FUSE_VIEW_SEGMENTS, 0, &cap);
        case INO_PORTS:
                return provider_snapshot(v, h, FUSE_VIEW_PORTS, 0, &cap);
        default:
                if (ino_is_provider(h->ino, &dir, &id))
                        return provider_snapshot(v, h, dir, id, &cap);
                return -ENOTDIR;
        }
}

static void do_readdir(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi, bool plus) {
        struct fuse_view *v = view_of(req);
        struct vhandle *h = handle_of(fi);
        _cleanup_free_ char *buf = NULL;
        size_t used = 0;
        int r;

        if (!h || off < 0) {
                (void) fuse_reply_err(req, EINVAL);
                return;
        }
        /* A new listing (or rewinddir) takes a new snapshot; later offsets continue the same one. */
        if (off == 0 || !h->dirents) {
                r = dir_snapshot(v, h);
                if (r < 0) {
                        (void) fuse_reply_err(req, -r);
                        return;
                }
        }
        size = MIN(size, (size_t) READ_BUF_SIZE);
        buf = malloc(size);
        if (!buf) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        for (size_t i = (size_t) off; i < h->n_dirents; i++) {
                const struct vdirent *e = &h->dirents[i];
                size_t n;

                if (plus) {
                        struct fuse_entry_param ep = {
                                .ino = e->st.st_ino,
                                .generation = e->generation,
                                .attr = e->st,
                                .attr_timeout = e->attr_timeout,
                                .entry_timeout = e->entry_timeout,
                        };

                        n = fuse_add_direntry_plus(req, buf + used, size - used, e->name, &ep, (off_t) i + 1);
                } else
                        n = fuse_add_direntry(req, buf + used, size - used, e->name, &e->st, (off_t) i + 1);
                if (n > size - used)
                        break;
                used += n;
        }
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

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
        if (ino_is_zone(ino))
                zones_getxattr(view_of(req), req, ino, name, size);
        else
                (void) fuse_reply_err(req, ENODATA);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
        if (ino_is_zone(ino))
                zones_listxattr(view_of(req), req, ino, size);
        else if (size == 0)
                (void) fuse_reply_xattr(req, 0);
        else
                (void) fuse_reply_buf(req, NULL, 0);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags) {
        if (ino_is_zone(ino))
                zones_setxattr(view_of(req), req, ino, name, value, size, flags);
        else
                (void) fuse_reply_err(req, ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) {
        if (ino_is_zone(ino))
                zones_removexattr(view_of(req), req, ino, name);
        else
                (void) fuse_reply_err(req, ENOTSUP);
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

/* mountinfo escapes blanks, tabs, newlines and backslashes as \ooo. */
static void unescape_mountinfo(char *s) {
        char *o = s;

        for (; *s; s++) {
                if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
                    s[3] <= '7') {
                        *o++ = (char) ((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
                        s += 3;
                } else
                        *o++ = *s;
        }
        *o = 0;
}

/* Is there a FUSE file system mounted exactly at path? */
static bool fuse_mounted_at(const char *path) {
        _cleanup_free_ char *line = NULL;
        size_t cap = 0;
        bool found = false;
        FILE *f;

        f = fopen("/proc/self/mountinfo", "re");
        if (!f)
                return false;
        while (!found && getline(&line, &cap, f) > 0) {
                char mnt[PATH_MAX], fstype[64];
                const char *sep;

                /* "id parent maj:min root mountpoint options ... - fstype source superoptions" */
                if (sscanf(line, "%*s %*s %*s %*s %4095s", mnt) != 1)
                        continue;
                sep = strstr(line, " - ");
                if (!sep || sscanf(sep + 3, "%63s", fstype) != 1)
                        continue;
                unescape_mountinfo(mnt);
                found = streq(mnt, path) && (streq(fstype, "fuse") || strncmp(fstype, "fuse.", 5) == 0);
        }
        fclose(f);
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
        static _Thread_local struct fuse_buf buf;
        uint64_t deadline = 0;

        if (!s) { /* end of the thread: free the buffer */
                free(buf.mem);
                buf = (struct fuse_buf){};
                return 0;
        }
        /* A bounded batch, so that the stop eventfd is looked at now and then. */
        for (int i = 0; i < 100000; i++) {
                int r = fuse_session_receive_buf(v->se, &buf);

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
                fuse_session_process_buf(v->se, &buf);
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
        (void) on_fuse_io(NULL, -1, 0, v);
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
        free(v->queue);
        free(v->read_buf);
        free(v->mountpoint);
        free(v->socket_link);
        pthread_mutex_destroy(&v->qlock);
        pthread_cond_destroy(&v->qcond);
        pthread_mutex_destroy(&v->plock);
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

int fuse_view_start(struct daemon *d, const char *mountpoint, struct fuse_view **ret) {
        char *argv[] = { (char *) "shmzoned", (char *) "-o",
                         (char *) "allow_other,default_permissions,fsname=shmzone,subtype=shmzone", NULL };
        struct fuse_args args = FUSE_ARGS_INIT(3, argv);
        struct fuse_view *v;
        int r, flags;

        v = calloc(1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        v->daemon = d;
        v->registry = d->registry;
        v->stop_fd = -EBADF;
        v->uid = geteuid();
        v->gid = getegid();
        v->start_usec = now_usec(CLOCK_REALTIME);
        atomic_init(&v->zones_mtime_usec, v->start_usec);
        v->handles.next = v->handles.prev = &v->handles;
        pthread_mutex_init(&v->qlock, NULL);
        pthread_cond_init(&v->qcond, NULL);
        pthread_mutex_init(&v->plock, NULL);
        pthread_mutex_init(&v->start_lock, NULL);
        pthread_cond_init(&v->start_cond, NULL);
        v->start_result = 1;

        r = absolute_path(mountpoint, &v->mountpoint);
        if (r < 0)
                goto fail;
        r = absolute_path(d->cfg->socket_path, &v->socket_link);
        if (r < 0)
                goto fail;
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
        registry_set_observer(v->registry, on_registry_event, v);
        log_info("FUSE view mounted at %s.", v->mountpoint);
        *ret = v;
        return 0;

fail:
        fuse_view_stop(v);
        return r;
}

void fuse_view_stop(struct fuse_view *v) {
        if (!v)
                return;
        if (v->registry)
                registry_set_observer(v->registry, NULL, NULL);
        /* The notifier first: the FUSE thread must keep serving whatever request it may wait for. */
        pthread_mutex_lock(&v->qlock);
        v->stopping = true;
        pthread_cond_signal(&v->qcond);
        pthread_mutex_unlock(&v->qlock);
        if (v->notifier_started)
                (void) pthread_join(v->notifier, NULL);
        if (v->thread_started) {
                uint64_t one = 1;

                (void) !write(v->stop_fd, &one, sizeof(one));
                (void) pthread_join(v->thread, NULL);
        }
        if (v->mounted)
                log_info("FUSE view: unmounting %s.", v->mountpoint);
        view_free(v);
}
