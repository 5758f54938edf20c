/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
#include <search.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "clients.h"
#include "reaper.h"
#include "util.h"

struct uid_count {
        uid_t uid;
        unsigned n;
};

struct clients {
        pthread_mutex_t lock;
        void *by_uid; /* tsearch tree of struct uid_count; an entry lives while its uid has connections */
        unsigned total;
        unsigned max, uid_max;
        _Atomic uint64_t hello_timeout_usec;
};

static int uid_cmp(const void *a, const void *b) {
        uid_t x = ((const struct uid_count *) a)->uid, y = ((const struct uid_count *) b)->uid;

        return x < y ? -1 : x > y;
}

int clients_new(struct clients **ret) {
        struct clients *cl = calloc(1, sizeof(*cl));

        if (!cl)
                return -ENOMEM;
        (void) pthread_mutex_init(&cl->lock, NULL);
        *ret = cl;
        return 0;
}

struct clients *clients_free(struct clients *cl) {
        if (!cl)
                return NULL;
        tdestroy(cl->by_uid, free);
        (void) pthread_mutex_destroy(&cl->lock);
        free(cl);
        return NULL;
}

void clients_set_limits(struct clients *cl, unsigned max_clients, unsigned uid_max_clients,
                        uint64_t hello_timeout_usec) {
        pthread_mutex_lock(&cl->lock);
        cl->max = max_clients;
        cl->uid_max = uid_max_clients;
        pthread_mutex_unlock(&cl->lock);
        atomic_store(&cl->hello_timeout_usec, hello_timeout_usec);
}

int clients_add(struct clients *cl, uid_t uid) {
        struct uid_count key = { .uid = uid }, *e, **p;
        int r = 0;

        pthread_mutex_lock(&cl->lock);
        if (cl->total >= cl->max + (uid == 0 ? CLIENTS_ROOT_RESERVE : 0)) {
                r = -EUSERS;
                goto out;
        }
        p = tfind(&key, &cl->by_uid, uid_cmp);
        e = p ? *p : NULL;
        /* Root is the administrator: only the global limit applies. A uid whose passed fds wait to be
         * closed (their close may never return) makes no new connection to pass more. */
        if (uid != 0 && ((e && e->n >= cl->uid_max) || reaper_held(uid) >= REAPER_TAG_REFUSE)) {
                r = -EDQUOT;
                goto out;
        }
        if (!e) {
                e = calloc(1, sizeof(*e));
                if (!e) {
                        r = -ENOMEM;
                        goto out;
                }
                e->uid = uid;
                if (!tsearch(e, &cl->by_uid, uid_cmp)) {
                        free(e);
                        r = -ENOMEM;
                        goto out;
                }
        }
        e->n++;
        cl->total++;
out:
        pthread_mutex_unlock(&cl->lock);
        return r;
}

void clients_remove(struct clients *cl, uid_t uid) {
        struct uid_count key = { .uid = uid }, *e, **p;

        pthread_mutex_lock(&cl->lock);
        p = tfind(&key, &cl->by_uid, uid_cmp);
        e = p ? *p : NULL;
        if (e && --e->n == 0) {
                (void) tdelete(e, &cl->by_uid, uid_cmp);
                free(e);
        }
        if (e && cl->total > 0)
                cl->total--;
        pthread_mutex_unlock(&cl->lock);
}

unsigned clients_count(struct clients *cl) {
        unsigned n;

        pthread_mutex_lock(&cl->lock);
        n = cl->total;
        pthread_mutex_unlock(&cl->lock);
        return n;
}

uint64_t clients_hello_timeout_usec(struct clients *cl) {
        return atomic_load(&cl->hello_timeout_usec);
}
