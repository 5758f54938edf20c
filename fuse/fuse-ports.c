/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * ports/ and segments/: what the core's port table holds, read through the
 * functions of core/ports.h only (snapshots and a reference per open segment).
 *
 *   ports/<name>/        a published name: a directory whose mode is the
 *                        listener's (x wherever it gives r), owned by the listener
 *   ports/<name>/<id>    a live connection it brokered: text (peers, figures per
 *                        direction), 0444, owned by the acceptor
 *   segments/<id>        a segment's whole memfd, header included, 0440, owned by
 *                        its sending side; xattrs user.shmz.owner_pid, .port,
 *                        .chunks_free, .chunks_used
 *
 * Nothing here writes: chmod, chown, create, unlink and setting xattrs are
 * refused by fuse-view.c. Names come and go with the processes, so no dentry
 * is trusted (entry timeout 0) and the observer invalidates attributes.
 * Inode numbers are the core's (ranges in core/ports.h): ids are never reused
 * while the daemon runs, so generation 0 is enough.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/xattr.h>

#include "fuse-internal.h"

#define PX_PREFIX "user.shmz."
#define PX_OWNER_PID PX_PREFIX "owner_pid"
#define PX_PORT PX_PREFIX "port"
#define PX_CHUNKS_FREE PX_PREFIX "chunks_free"
#define PX_CHUNKS_USED PX_PREFIX "chunks_used"

static const char *const seg_xattrs[] = { PX_OWNER_PID, PX_PORT, PX_CHUNKS_FREE, PX_CHUNKS_USED };

/* Ids that fit their inode range. */
#define ID_LIMIT (UINT64_C(1) << 44)

enum kind { K_NONE, K_LISTENER, K_PORT, K_SEGMENT };

static enum kind kind_of(uint64_t ino) {
        if (ino >= PORTS_INO_LISTENER_BASE && ino < PORTS_INO_PORT_BASE)
                return K_LISTENER;
        if (ino >= PORTS_INO_PORT_BASE && ino < PORTS_INO_SEGMENT_BASE)
                return K_PORT;
        if (ino >= PORTS_INO_SEGMENT_BASE && ino < PORTS_INO_END)
                return K_SEGMENT;
        return K_NONE;
}

/* Strict decimal: no sign, blank or leading zero, so that one id has one name ("07" is not 7). */
static int parse_id(const char *s, uint64_t *ret) {
        uint64_t id = 0;

        if (!s[0] || (s[0] == '0' && s[1]) || strlen(s) > 20)
                return -ENOENT;
        for (; *s; s++) {
                if (*s < '0' || *s > '9')
                        return -ENOENT;
                if (id > (UINT64_MAX - 9) / 10)
                        return -ENOENT;
                id = id * 10 + (uint64_t) (*s - '0');
        }
        if (id == 0 || id >= ID_LIMIT)
                return -ENOENT;
        *ret = id;
        return 0;
}

/* ---- what each file shows ------------------------------------------------------------- */

/* r gives x as well (listing what one cannot enter is useless); w is who may connect, shown as it is. */
static mode_t listener_dir_mode(uint32_t mode) {
        mode_t m = mode & 0666;

        if (m & 0400)
                m |= 0100;
        if (m & 0040)
                m |= 0010;
        if (m & 0004)
                m |= 0001;
        return m;
}

static void listener_stat(const struct shmz_msg_port_info *i, uint64_t ino, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = ino,
                .st_mode = S_IFDIR | listener_dir_mode(i->mode),
                .st_nlink = 2,
                .st_uid = i->uid,
                .st_gid = i->gid,
                .st_blksize = VIEW_BLKSIZE,
        };
        stat_from_usec(&ret->st_mtim, i->created_usec);
        ret->st_atim = ret->st_ctim = ret->st_mtim;
}

static const char *const side_names[2] = { "connector", "acceptor" };

/* The text of ports/<name>/<id>. The figures per side are what that side sent. */
static int port_text(const struct shmz_msg_port_info *i, char **ret, size_t *ret_len) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        fprintf(f,
                "port_id %" PRIu64 "\nlistener %.*s\ncreated_usec %" PRIu64 "\nsegments %" PRIu32 "\n\n"
                "%-10s %10s %10s %14s %16s %16s\n",
                i->port_id, (int) SHMZ_NAME_MAX, i->name, i->created_usec, i->segments, "side", "pid", "uid",
                "messages", "bytes", "chunks_in_flight");
        for (int s = 0; s < 2; s++)
                fprintf(f, "%-10s %10" PRIu32 " %10" PRIu32 " %14" PRIu64 " %16" PRIu64 " %16" PRIu64 "\n",
                        side_names[s], i->pid[s], i->uid_side[s], i->messages[s], i->bytes[s], i->chunks_in_flight[s]);
        if (fclose(f) != 0 || !buf) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        *ret_len = len;
        return 0;
}

static void port_stat(const struct shmz_msg_port_info *i, size_t text_len, bool linked, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = PORTS_INO_PORT_BASE + i->port_id,
                .st_mode = S_IFREG | 0444,
                .st_nlink = linked ? 1 : 0,
                .st_uid = i->uid,
                .st_gid = i->gid,
                .st_size = (off_t) text_len,
                .st_blksize = VIEW_BLKSIZE,
        };
        /* Its figures change by themselves: like status, it is as of now. */
        stat_from_usec(&ret->st_mtim, now_usec(CLOCK_REALTIME));
        stat_from_usec(&ret->st_ctim, i->created_usec);
        ret->st_atim = ret->st_mtim;
}

/* The size stat shows: that of the text an open would show now, so that tools trusting st_size read it all. */
static int port_stat_now(const struct shmz_msg_port_info *i, struct stat *ret) {
        _cleanup_free_ char *text = NULL;
        size_t len = 0;
        int r;

        r = port_text(i, &text, &len);
        if (r < 0)
                return r;
        port_stat(i, len, true, ret);
        return 0;
}

static void segment_stat(const struct shmz_msg_segment_info *i, bool linked, struct stat *ret) {
        *ret = (struct stat){
                .st_ino = PORTS_INO_SEGMENT_BASE + i->id,
                .st_mode = S_IFREG | 0440,
                .st_nlink = linked ? 1 : 0,
                .st_uid = i->owner_uid,
                .st_gid = i->owner_gid,
                .st_size = (off_t) MIN(i->map_size, (uint64_t) INT64_MAX),
                .st_blocks = (blkcnt_t) (i->map_size / 512),
                .st_blksize = VIEW_BLKSIZE,
        };
        stat_from_usec(&ret->st_mtim, i->created_usec);
        ret->st_atim = ret->st_ctim = ret->st_mtim;
}

/* ---- finding things --------------------------------------------------------------------- */

static int listener_by_ino(struct ports *pt, uint64_t ino, struct shmz_msg_port_info *ret) {
        int r;

        if (!pt)
                return -ENOENT;
        r = ports_listener_info_by_ino(pt, ino, ret);
        if (r >= 0)
                ret->name[SHMZ_NAME_BUF - 1] = 0;
        return r;
}

/* A listener by name, checked against the inode the caller knows (a name may be published again). */
static int listener_named(struct ports *pt, const char *name, uint64_t ino, struct shmz_msg_port_info *ret) {
        uint64_t li = 0;
        int r;

        if (!pt || !name[0])
                return -ENOENT;
        r = ports_listener_info(pt, name, ret, &li);
        if (r < 0)
                return r;
        return li == ino ? 0 : -ENOENT;
}

/* A connection of this listener (one of the same name published earlier does not count). */
static int connection_of(struct ports *pt, const char *listener, uint64_t port_id, struct shmz_msg_port_info *ret) {
        int r = ports_connection_info(pt, listener, port_id, ret);

        if (r >= 0)
                ret->name[SHMZ_NAME_BUF - 1] = 0;
        return r;
}

/* An open file of a port or segment gone from the table still answers fstat and fgetxattr. */
static struct vhandle *open_handle_of(struct fuse_view *v, uint64_t ino) {
        for (struct vhandle *h = view_handles_of(v, ino); h; h = h->ino_next)
                if (h->segment || h->is_port)
                        return h;
        return NULL;
}

/* ---- operations --------------------------------------------------------------------------- */

void view_ports_event(void *userdata, enum ports_event ev, const char *name, uint64_t ino) {
        struct fuse_view *v = userdata;
        struct shmz_msg_port_info info;
        uint64_t li = 0;

        switch (ev) {
        case PORTS_LISTENER_ADDED:
        case PORTS_LISTENER_REMOVED:
                atomic_store(&v->ports_mtime_usec, now_usec(CLOCK_REALTIME));
                view_queue_inval(v, INO_PORTS);
                break;
        case PORTS_PORT_ADDED:
        case PORTS_PORT_REMOVED:
                /* Called outside the core's lock: asking it for the listener's inode is allowed. */
                if (name && view_ports(v) && ports_listener_info(view_ports(v), name, &info, &li) >= 0)
                        view_queue_inval(v, li);
                break;
        case PORTS_SEGMENT_ADDED:
        case PORTS_SEGMENT_REMOVED:
                atomic_store(&v->segments_mtime_usec, now_usec(CLOCK_REALTIME));
                view_queue_inval(v, INO_SEGMENTS);
                break;
        }
        /* Removed: nlink goes to 0 for whoever holds it open; added: nothing cached yet. */
        if (ev == PORTS_LISTENER_REMOVED || ev == PORTS_PORT_REMOVED || ev == PORTS_SEGMENT_REMOVED)
                view_queue_inval(v, ino);
}

uint64_t view_ports_parent(uint64_t ino) {
        return kind_of(ino) == K_LISTENER ? INO_PORTS : INO_ROOT;
}

int view_ports_getattr(struct fuse_view *v, uint64_t ino, struct vhandle *h, struct stat *ret, double *ret_timeout) {
        struct ports *pt = view_ports(v);
        struct shmz_msg_segment_info si;
        struct shmz_msg_port_info pi;
        int r;

        switch (kind_of(ino)) {
        case K_LISTENER:
                *ret_timeout = SEGMENT_ATTR_TIMEOUT;
                /* An open directory knows its name: no walk. */
                r = h && h->ino == ino ? listener_named(pt, h->listener, ino, &pi) : -ENOENT;
                if (r < 0)
                        r = listener_by_ino(pt, ino, &pi);
                if (r < 0)
                        return r;
                listener_stat(&pi, ino, ret);
                return 0;
        case K_PORT:
                *ret_timeout = PORTS_ATTR_TIMEOUT;
                if (pt && ports_port_info(pt, ino - PORTS_INO_PORT_BASE, &pi) >= 0) {
                        pi.name[SHMZ_NAME_BUF - 1] = 0;
                        return port_stat_now(&pi, ret);
                }
                if (!h || h->ino != ino)
                        h = open_handle_of(v, ino);
                if (!h || !h->is_port)
                        return -ENOENT;
                port_stat(&h->port_info, h->text_len, false, ret);
                return 0;
        case K_SEGMENT:
                *ret_timeout = SEGMENT_ATTR_TIMEOUT;
                if (pt && ports_segment_info(pt, ino - PORTS_INO_SEGMENT_BASE, &si) >= 0) {
                        segment_stat(&si, true, ret);
                        return 0;
                }
                if (!h || h->ino != ino)
                        h = open_handle_of(v, ino);
                if (!h || !h->segment)
                        return -ENOENT;
                segment_stat(&h->seg_info, false, ret);
                return 0;
        default:
                return -ENOENT;
        }
}

int view_ports_lookup(struct fuse_view *v, uint64_t parent, const char *name, struct fuse_entry_param *ret) {
        struct ports *pt = view_ports(v);
        struct shmz_msg_segment_info si;
        struct shmz_msg_port_info pi, li;
        uint64_t id, ino = 0;
        int r;

        *ret = (struct fuse_entry_param){ .entry_timeout = PORTS_ENTRY_TIMEOUT };
        if (parent == INO_PORTS) {
                if (!pt || !name_is_valid(name))
                        return -ENOENT;
                r = ports_listener_info(pt, name, &pi, &ino);
                if (r < 0)
                        return r;
                if (kind_of(ino) != K_LISTENER)
                        return -EIO; /* the core broke its own ranges */
                listener_stat(&pi, ino, &ret->attr);
                ret->attr_timeout = SEGMENT_ATTR_TIMEOUT;
        } else if (parent == INO_SEGMENTS) {
                if (!pt || parse_id(name, &id) < 0)
                        return -ENOENT;
                r = ports_segment_info(pt, id, &si);
                if (r < 0)
                        return r;
                segment_stat(&si, true, &ret->attr);
                ret->attr_timeout = SEGMENT_ATTR_TIMEOUT;
        } else if (kind_of(parent) == K_LISTENER) {
                r = listener_by_ino(pt, parent, &li);
                if (r < 0)
                        return r;
                if (parse_id(name, &id) < 0)
                        return -ENOENT;
                r = connection_of(pt, li.name, id, &pi);
                if (r < 0)
                        return r;
                r = port_stat_now(&pi, &ret->attr);
                if (r < 0)
                        return r;
                ret->attr_timeout = PORTS_ATTR_TIMEOUT;
        } else
                return kind_of(parent) == K_NONE ? -ENOENT : -ENOTDIR;
        ret->ino = ret->attr.st_ino;
        return 0;
}

int view_ports_opendir(struct fuse_view *v, uint64_t ino, struct vhandle *h) {
        struct shmz_msg_port_info pi;
        int r;

        if (ino == INO_PORTS || ino == INO_SEGMENTS)
                return 0;
        if (kind_of(ino) != K_LISTENER)
                return kind_of(ino) == K_NONE ? -ENOENT : -ENOTDIR;
        r = listener_by_ino(view_ports(v), ino, &pi);
        if (r < 0)
                return r;
        strncpy_buf(h->listener, sizeof(h->listener), pi.name);
        return 0;
}

/* Grows *a to hold n + 1 entries. */
static int dents_reserve(struct view_dirent **a, size_t n, size_t *cap) {
        struct view_dirent *na;

        if (n < *cap)
                return 0;
        *cap = MAX(*cap * 2, (size_t) 16);
        na = reallocarray(*a, *cap, sizeof(**a));
        if (!na)
                return -ENOMEM;
        *a = na;
        return 0;
}

/* What the directory holds now, as stat()s: one listing shows one moment, whatever its buffer sizes. */
static int snapshot(struct fuse_view *v, struct vhandle *h) {
        struct ports *pt = view_ports(v);
        _cleanup_free_ struct view_dirent *d = NULL;
        size_t n = 0, cap = 0;
        int r;

        if (!pt)
                goto done;
        if (h->ino == INO_SEGMENTS) {
                _cleanup_free_ struct shmz_msg_segment_info *s = NULL;
                size_t k = 0;

                r = ports_list_segments(pt, &s, &k);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < k; i++) {
                        if (s[i].id == 0 || s[i].id >= ID_LIMIT)
                                continue;
                        r = dents_reserve(&d, n, &cap);
                        if (r < 0)
                                return r;
                        segment_stat(&s[i], true, &d[n].st);
                        snprintf(d[n].name, sizeof(d[n].name), "%" PRIu64, s[i].id);
                        n++;
                }
        } else {
                _cleanup_free_ struct shmz_msg_port_info *p = NULL;
                size_t k = 0;

                r = h->ino == INO_PORTS ? ports_list_listeners(pt, &p, &k)
                                        : ports_list_connections(pt, h->listener, &p, &k);
                if (r == -ENOENT)
                        k = 0; /* the listener went since opendir: empty */
                else if (r < 0)
                        return r;
                for (size_t i = 0; i < k; i++) {
                        uint64_t ino = 0;

                        p[i].name[SHMZ_NAME_BUF - 1] = 0;
                        r = dents_reserve(&d, n, &cap);
                        if (r < 0)
                                return r;
                        if (h->ino == INO_PORTS) {
                                struct shmz_msg_port_info li;

                                /* Gone since the list was taken: not shown. */
                                if (ports_listener_info(pt, p[i].name, &li, &ino) < 0 || kind_of(ino) != K_LISTENER)
                                        continue;
                                listener_stat(&li, ino, &d[n].st);
                                strncpy_buf(d[n].name, sizeof(d[n].name), li.name);
                        } else {
                                if (p[i].port_id == 0 || p[i].port_id >= ID_LIMIT)
                                        continue;
                                r = port_stat_now(&p[i], &d[n].st);
                                if (r < 0)
                                        return r;
                                snprintf(d[n].name, sizeof(d[n].name), "%" PRIu64, p[i].port_id);
                        }
                        n++;
                }
        }
done:
        free(h->dents);
        h->dents = TAKE_PTR(d);
        h->n_dents = n;
        if (!h->dents) {
                /* Taken, and empty: remember that. */
                h->dents = calloc(1, sizeof(*h->dents));
                if (!h->dents)
                        return -ENOMEM;
        }
        return 0;
}

/* Entries from offset off (2 = the first after "." and ".."), each at its index + 3. */
void view_ports_readdir(struct fuse_view *v, fuse_req_t req, struct vhandle *h, bool plus, off_t off, char *buf,
                        size_t size, size_t *used) {
        uint64_t pos = MAX((uint64_t) off, (uint64_t) 2);
        double attr_timeout = h->ino == INO_PORTS || h->ino == INO_SEGMENTS ? SEGMENT_ATTR_TIMEOUT : PORTS_ATTR_TIMEOUT;

        /* Offset 0 is a new listing (or rewinddir): look again. */
        if ((off == 0 || !h->dents) && snapshot(v, h) < 0)
                return;
        for (uint64_t i = pos - 2; i < h->n_dents; i++)
                if (!add_dirent(req, plus, buf, size, used, h->dents[i].name, &h->dents[i].st, 0, PORTS_ENTRY_TIMEOUT,
                                attr_timeout, i + 3))
                        break;
}

void view_ports_open(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct ports *pt = view_ports(v);
        struct shmz_msg_segment_info si;
        struct shmz_msg_port_info pi;
        struct vhandle *h;
        int r;

        if ((fi->flags & O_ACCMODE) != O_RDONLY) {
                (void) fuse_reply_err(req, kind_of(ino) == K_LISTENER ? EISDIR : EACCES);
                return;
        }
        if (kind_of(ino) == K_LISTENER) {
                (void) fuse_reply_err(req, EISDIR);
                return;
        }
        if (!pt || kind_of(ino) == K_NONE) {
                (void) fuse_reply_err(req, ENOENT);
                return;
        }
        h = vhandle_new(v, ino);
        if (!h) {
                (void) fuse_reply_err(req, ENOMEM);
                return;
        }
        h->readable = true;
        if (kind_of(ino) == K_PORT) {
                r = ports_port_info(pt, ino - PORTS_INO_PORT_BASE, &pi);
                if (r >= 0) {
                        pi.name[SHMZ_NAME_BUF - 1] = 0;
                        h->port_info = pi;
                        h->is_port = true;
                        /* One snapshot per open: a reader sees one consistent text, whatever its read sizes. */
                        r = port_text(&pi, &h->text, &h->text_len);
                }
        } else {
                r = ports_segment_info(pt, ino - PORTS_INO_SEGMENT_BASE, &si);
                if (r >= 0)
                        r = ports_segment_ref(pt, si.id, &h->segment);
                if (r >= 0) {
                        h->release = view_ports_release;
                        h->seg_ports = pt;
                        h->seg_info = si;
                        /* The core's one read-only mapping of the segment, valid while the reference is held. */
                        r = segment_view_map(h->segment, &h->seg_map, &h->seg_size);
                }
        }
        if (r < 0) {
                vhandle_free(v, h);
                (void) fuse_reply_err(req, -r);
                return;
        }
        fi->fh = (uintptr_t) h;
        /* The bytes change under us (senders, receivers): never from the page cache; no shared mmap either. */
        fi->direct_io = 1;
        fi->keep_cache = 0;
        if (fuse_reply_open(req, fi) < 0)
                vhandle_free(v, h); /* interrupted: no release will come */
}

void view_ports_read(struct fuse_view *v, fuse_req_t req, struct vhandle *h, size_t size, off_t off) {
        size_t n;

        if (!h->seg_map || (uint64_t) off >= h->seg_size) {
                (void) fuse_reply_buf(req, NULL, 0);
                return;
        }
        /*
         * Straight from the mapping. Pages of the memfd nobody touched are
         * allocated by the fault; a segment's size is already charged to its
         * port (port_memory), so that is within what the daemon allows.
         */
        n = MIN(size, h->seg_size - (size_t) off);
        (void) fuse_reply_buf(req, (const char *) h->seg_map + off, n);
}

void view_ports_release(struct fuse_view *v, struct vhandle *h) {
        h->seg_map = NULL;
        if (h->segment)
                ports_segment_unref(h->seg_ports, TAKE_PTR(h->segment));
}

/* Chunks claimed in the segment's bitmap (written by its peers: figures only, bounded by what the core says). */
static uint64_t count_used(const void *map, size_t size, uint32_t n_chunks) {
        if (!map || size < SHMZ_SEGMENT_HEADER_SIZE)
                return 0;
        return segment_chunks_used(map, n_chunks);
}

static int segment_xattr(struct fuse_view *v, uint64_t ino, const char *name, char *buf, size_t size, size_t *ret_len) {
        struct ports *pt = view_ports(v);
        struct shmz_msg_segment_info si;
        struct vhandle *h;
        uint64_t value, used;
        int n;

        if (pt && ports_segment_info(pt, ino - PORTS_INO_SEGMENT_BASE, &si) >= 0)
                used = si.chunks_used; /* the core counts the bitmap */
        else if ((h = open_handle_of(v, ino)) && h->segment) {
                /* Gone from the table, still open here: count what the mapping we hold shows. */
                si = h->seg_info;
                used = count_used(h->seg_map, h->seg_size, si.n_chunks);
        } else
                return -ENOENT;

        if (streq(name, PX_OWNER_PID))
                value = si.owner_pid;
        else if (streq(name, PX_PORT))
                value = si.port_id;
        else if (streq(name, PX_CHUNKS_USED))
                value = used;
        else if (streq(name, PX_CHUNKS_FREE))
                value = si.n_chunks > used ? si.n_chunks - used : 0;
        else
                return -ENODATA;
        n = snprintf(buf, size, "%" PRIu64, value);
        if (n < 0 || (size_t) n >= size)
                return -EIO;
        *ret_len = (size_t) n;
        return 0;
}

void view_ports_getxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
        char buf[64];
        size_t len = 0;
        int r;

        r = kind_of(ino) == K_SEGMENT ? segment_xattr(v, ino, name, buf, sizeof(buf), &len) : -ENODATA;
        reply_xattr(req, r, buf, len, size);
}

void view_ports_listxattr(struct fuse_view *v, fuse_req_t req, fuse_ino_t ino, size_t size) {
        char buf[256];
        size_t len = 0;

        if (kind_of(ino) == K_SEGMENT)
                for (size_t i = 0; i < ELEMENTSOF(seg_xattrs); i++) {
                        size_t n = strlen(seg_xattrs[i]) + 1;

                        memcpy(buf + len, seg_xattrs[i], n);
                        len += n;
                }
        reply_xattr(req, 0, buf, len, size);
}

bool view_ports_xattr_is_ours(const char *name) {
        return strncmp(name, PX_PREFIX, strlen(PX_PREFIX)) == 0;
}
