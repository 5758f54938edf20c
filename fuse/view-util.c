/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The view's shared helpers: open-file records (by inode, so that a file gone
 * from the tables still answers from an open handle), directory entries,
 * times and callers. Used by the dispatcher and every kind; calls none of them.
 */
#include <search.h>
#include <stdlib.h>
#include <time.h>

#include "fuse-internal.h"

void stat_from_usec(struct timespec *ts, uint64_t usec) {
        ts->tv_sec = (time_t) (usec / 1000000u);
        ts->tv_nsec = (long) (usec % 1000000u) * 1000;
}

void caller_from_req(fuse_req_t req, struct caller *ret) {
        const struct fuse_ctx *ctx = fuse_req_ctx(req);

        *ret = (struct caller){ .uid = ctx->uid, .gid = ctx->gid, .pid = ctx->pid };
}

/*
 * The open handles by inode, a chain each: an inode gone from the tables (an
 * unlinked zone, a port or segment that ended) still answers fstat and
 * fgetxattr from an open file of it. A lookup, not a walk of every open
 * file: any user can hold many of those, and one thread serves the view.
 */
struct open_ino {
        uint64_t ino;
        struct vhandle *first;
};

static int open_ino_cmp(const void *a, const void *b) {
        uint64_t x = ((const struct open_ino *) a)->ino, y = ((const struct open_ino *) b)->ino;

        return x < y ? -1 : x > y;
}

static struct open_ino *open_ino_find(struct fuse_view *v, uint64_t ino) {
        struct open_ino key = { .ino = ino }, **p = tfind(&key, &v->open_inos, open_ino_cmp);

        return p ? *p : NULL;
}

struct vhandle *view_handles_of(struct fuse_view *v, uint64_t ino) {
        struct open_ino *o = open_ino_find(v, ino);

        return o ? o->first : NULL;
}

struct vhandle *vhandle_new(struct fuse_view *v, uint64_t ino) {
        struct open_ino *o = open_ino_find(v, ino);
        struct vhandle *h = calloc(1, sizeof(*h));

        if (!h)
                return NULL;
        if (!o) {
                o = calloc(1, sizeof(*o));
                if (o)
                        o->ino = ino;
                if (!o || !tsearch(o, &v->open_inos, open_ino_cmp)) {
                        free(o);
                        free(h);
                        return NULL;
                }
        }
        h->ino = ino;
        h->ino_next = o->first;
        if (o->first)
                o->first->ino_prev = h;
        o->first = h;
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
        if (h->ino_next)
                h->ino_next->ino_prev = h->ino_prev;
        if (h->ino_prev)
                h->ino_prev->ino_next = h->ino_next;
        else {
                struct open_ino *o = open_ino_find(v, h->ino);

                if (o) {
                        o->first = h->ino_next;
                        if (!o->first) {
                                (void) tdelete(o, &v->open_inos, open_ino_cmp);
                                free(o);
                        }
                }
        }
        /* The kind drops what it holds (zone, segment); set by the kind, so that this file calls none. */
        if (h->release)
                h->release(v, h);
        free(h->dents);
        free(h->text);
        free(h);
}

/* One entry at offset next_off - 1, with ep for READDIRPLUS (NULL: a plain one); false when it does not fit. */
bool put_dirent(fuse_req_t req, const struct fuse_entry_param *ep, char *buf, size_t size, size_t *used,
                const char *name, const struct stat *st, uint64_t next_off) {
        size_t n = ep ? fuse_add_direntry_plus(req, buf + *used, size - *used, name, ep, (off_t) next_off)
                      : fuse_add_direntry(req, buf + *used, size - *used, name, st, (off_t) next_off);

        if (n > size - *used)
                return false;
        *used += n;
        return true;
}

/* Adds one entry at offset next_off - 1; false when it does not fit (nothing added). */
bool add_dirent(fuse_req_t req, bool plus, char *buf, size_t size, size_t *used, const char *name,
                const struct stat *st, uint64_t generation, double entry_timeout, double attr_timeout,
                uint64_t next_off) {
        struct fuse_entry_param ep = {
                .ino = st->st_ino,
                .generation = generation,
                .attr = *st,
                .attr_timeout = attr_timeout,
                .entry_timeout = entry_timeout,
        };

        return put_dirent(req, plus ? &ep : NULL, buf, size, used, name, st, next_off);
}

/* An xattr's reply: its size for a probe (size 0), ERANGE when the buffer is short. */
void reply_xattr(fuse_req_t req, int r, const char *buf, size_t len, size_t size) {
        if (r < 0)
                (void) fuse_reply_err(req, -r);
        else if (size == 0)
                (void) fuse_reply_xattr(req, len);
        else if (size < len)
                (void) fuse_reply_err(req, ERANGE);
        else
                (void) fuse_reply_buf(req, buf, len);
}
