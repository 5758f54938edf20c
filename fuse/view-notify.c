/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The view's invalidations: what the kernel must forget after a change, sent
 * in the changing thread (zones) or queued for the notifier thread (ports/,
 * segments/, and each zone's second invalidation).
 */
#include <errno.h>
#include <inttypes.h>
#include <unistd.h>

#include "fuse-internal.h"
#include "log.h"

/*
 * Entries are never invalidated one by one: fuse_lowlevel_notify_inval_entry()
 * (and its "expire only" form) takes the directory's lock in the kernel, which
 * any user can hold for as long as they like (a readdir into a buffer mapped
 * from a FUSE file of their own that never answers; F8 in test-attack.c). What
 * is used instead takes no lock a user can hold: an inode's attributes
 * (fuse_lowlevel_notify_inval_inode() without a range), and the connection's
 * epoch (FUSE_NOTIFY_INC_EPOCH, Linux 6.16), which makes every cached name be
 * looked up again at its next use. A missing name is never cached (a LOOKUP's
 * ENOENT leaves a negative dentry with no timeout), so a new zone needs no
 * invalidation of names.
 */

static void view_queue_inval_later(struct fuse_view *v, uint64_t ino);

/* Not in libfuse 3.14's headers: the notification is a bare header. */
#define NOTIFY_INC_EPOCH 8

struct notify_header {
        uint32_t len;
        int32_t code; /* the header's error field carries the notification's code */
        uint64_t unique;
};

int notify_inc_epoch(struct fuse_view *v) {
        struct notify_header oh = { .len = sizeof(oh), .code = NOTIFY_INC_EPOCH };
        ssize_t n = write(fuse_session_fd(v->se), &oh, sizeof(oh));

        if (n < 0)
                return -errno;
        return n == (ssize_t) sizeof(oh) ? 0 : -EIO;
}

double zone_entry_timeout(struct fuse_view *v) {
        return atomic_load(&v->epoch_works) ? ZONE_ENTRY_TIMEOUT : 0.0;
}

static void inval_inode_now(struct fuse_view *v, uint64_t ino) {
        static atomic_bool logged = false;
        int r = fuse_lowlevel_notify_inval_inode(v->se, ino, -1, 0);

        /* -ENOENT: the kernel had nothing cached. -ENODEV: unmounted, nothing is cached any more. Logged once. */
        if (r < 0 && r != -ENOENT && r != -ENODEV && !atomic_exchange(&logged, true))
                log_warning_errno(r,
                                  "FUSE view: invalidating inode %" PRIu64 " failed (%m); attributes may be "
                                  "stale until they time out.",
                                  ino);
}

/* Every cached name is looked up again; on failure names are no longer cached (their timeout bounds the rest). */
static void inval_names_now(struct fuse_view *v) {
        int r;

        if (!atomic_load(&v->epoch_works))
                return;
        r = notify_inc_epoch(v);
        if (r < 0 && r != -ENODEV && atomic_exchange(&v->epoch_works, false))
                log_warning_errno(r, "FUSE view: the kernel refused to forget cached names (%m); names are "
                                     "looked up at every use from now on.");
}

/*
 * What the kernel must forget after a zone changed, sent before the change is
 * answered to whoever made it (socket, reload or the view itself).
 */
static void view_zone_changed(struct fuse_view *v, enum registry_event ev, uint64_t ino) {
        /* zones/ itself changes (mtime) when a name comes or goes. */
        if (ev == REGISTRY_ZONE_ADDED || ev == REGISTRY_ZONE_REMOVED) {
                atomic_store(&v->zones_mtime_usec, now_usec(CLOCK_REALTIME));
                inval_inode_now(v, INO_ZONES);
                /* A GETATTR of zones/ answered before the change may land after it, as a zone's can. */
                view_queue_inval_later(v, INO_ZONES);
        }
        if (ev == REGISTRY_ZONE_ADDED)
                return;
        /*
         * Removed: the name must go. Changed: a LOOKUP answered before the change
         * may have handed the kernel its first copy of the inode, which the
         * inode's invalidation (sent before it existed) missed; the name's next
         * lookup corrects it.
         */
        inval_names_now(v);
        inval_inode_now(v, ino);
        /*
         * A LOOKUP answered before the change but read by the kernel after it
         * hands the kernel the old attributes of an inode it did not have when
         * it was told to forget them: path walks look the name up again (the
         * epoch), but fstat() of a file opened through that walk would keep them.
         * The notifier tells the kernel once more, a moment later.
         */
        view_queue_inval_later(v, ino);
}

/* Adds ino to an open-addressed set of INVAL_SLOTS (qlock held); false if it was there or the set is full. */
static bool inval_set_add(struct fuse_view *v, uint64_t *set, size_t *n, uint64_t ino) {
        size_t i;

        for (i = (size_t) (ino * UINT64_C(0x9E3779B97F4A7C15) >> 51) & (INVAL_SLOTS - 1); set[i] != 0;
             i = (i + 1) & (INVAL_SLOTS - 1))
                if (set[i] == ino)
                        return false; /* queued already: once is enough */
        if (*n >= INVAL_MAX) {
                v->dropped++;
                return false;
        }
        set[i] = ino;
        (*n)++;
        return true;
}

/* Moves the set's inodes to out (qlock held); returns how many. */
static size_t inval_set_take(uint64_t *set, size_t *n, uint64_t *out) {
        size_t k = 0;

        for (size_t i = 0; i < INVAL_SLOTS && k < *n; i++)
                if (set[i] != 0) {
                        out[k++] = set[i];
                        set[i] = 0;
                }
        *n = 0;
        return k;
}

void view_queue_inval(struct fuse_view *v, uint64_t ino) {
        if (ino == 0)
                return;
        pthread_mutex_lock(&v->qlock);
        if (!v->stopping && v->inval && inval_set_add(v, v->inval, &v->n_inval, ino))
                pthread_cond_signal(&v->qcond);
        pthread_mutex_unlock(&v->qlock);
}

/*
 * The same, NOTIFIER_DELAY_MSEC later (view_zone_changed()). A window's
 * changes go together; one that comes when less than half the delay is left
 * goes with the next window, so that each waits at least half the delay.
 */
static void view_queue_inval_later(struct fuse_view *v, uint64_t ino) {
        const uint64_t delay = NOTIFIER_DELAY_MSEC * 1000u;
        uint64_t now = now_usec(CLOCK_REALTIME);
        bool added = false;

        pthread_mutex_lock(&v->qlock);
        if (!v->stopping && v->later && v->later2) {
                if (v->n_later == 0)
                        v->later_usec = now + delay;
                if (v->later_usec >= now + delay / 2)
                        added = inval_set_add(v, v->later, &v->n_later, ino);
                else {
                        if (v->n_later2 == 0)
                                v->later2_usec = now + delay;
                        added = inval_set_add(v, v->later2, &v->n_later2, ino);
                }
        }
        if (added)
                pthread_cond_signal(&v->qcond);
        pthread_mutex_unlock(&v->qlock);
}

/* The window that came due was taken (qlock held): the next one becomes the current. */
static void later_advance(struct fuse_view *v) {
        uint64_t *t = v->later;

        v->later = v->later2;
        v->n_later = v->n_later2;
        v->later_usec = v->later2_usec;
        v->later2 = t;
        v->n_later2 = 0;
}

void *notifier_thread(void *arg) {
        struct fuse_view *v = arg;
        /* Both sets at once: 2 * INVAL_MAX fit. */
        _cleanup_free_ uint64_t *batch = calloc(INVAL_SLOTS, sizeof(*batch));

        if (!batch) {
                log_error("FUSE view: out of memory for the invalidation thread; the kernel's copies of "
                          "attributes will age out instead.");
                return NULL;
        }
        for (;;) {
                uint64_t dropped;
                size_t n;

                pthread_mutex_lock(&v->qlock);
                while (!v->stopping && v->n_inval == 0) {
                        struct timespec ts;

                        if (v->n_later == 0) {
                                pthread_cond_wait(&v->qcond, &v->qlock);
                                continue;
                        }
                        if (now_usec(CLOCK_REALTIME) >= v->later_usec)
                                break;
                        stat_from_usec(&ts, v->later_usec);
                        (void) pthread_cond_timedwait(&v->qcond, &v->qlock, &ts);
                }
                if (v->stopping) {
                        pthread_mutex_unlock(&v->qlock);
                        break;
                }
                n = inval_set_take(v->inval, &v->n_inval, batch);
                if (v->n_later > 0 && now_usec(CLOCK_REALTIME) >= v->later_usec) {
                        n += inval_set_take(v->later, &v->n_later, batch + n);
                        later_advance(v);
                }
                dropped = v->dropped;
                v->dropped = 0;
                pthread_mutex_unlock(&v->qlock);

                if (dropped > 0)
                        log_debug("FUSE view: %" PRIu64 " invalidations dropped (queue full); attributes age "
                                  "out instead.",
                                  dropped);
                for (size_t i = 0; i < n; i++)
                        /* -ENOENT: the kernel had nothing cached; nothing to do. */
                        (void) fuse_lowlevel_notify_inval_inode(v->se, batch[i], -1, 0);
        }
        return NULL;
}

/*
 * Registry observer: called by the thread that made the change, after the
 * registry lock is gone and before the change is answered. The workers are
 * joined before the view stops, and the FUSE thread and the main thread (reload)
 * are the others: none can call this once fuse_view_stop() freed the session.
 */
void on_registry_event(void *userdata, enum registry_event ev, const char *name, uint64_t ino) {
        view_zone_changed(userdata, ev, ino);
}
