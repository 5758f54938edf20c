/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "reaper.h"
#include "util.h"

struct item {
        int fd;
        uint32_t tag;
};

/* Per tag: fds held (queued or being closed), and of those being closed. */
struct tag_count {
        uint32_t tag;
        unsigned held, closing;
};

/*
 * One process-wide queue: its memory is never freed, so that a thread stuck in
 * close() at exit still finds it (the process ends around it).
 */
static struct {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        struct item *items; /* in arrival order */
        size_t n, cap;
        struct tag_count *tags;
        size_t n_tags, cap_tags;
        unsigned held;    /* queued + being closed */
        unsigned threads; /* running */
        unsigned idle;    /* of those, waiting for work */
        bool stopping;
} q = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* q.lock held. */
static struct tag_count *tag_find(uint32_t tag) {
        for (size_t i = 0; i < q.n_tags; i++)
                if (q.tags[i].tag == tag)
                        return &q.tags[i];
        return NULL;
}

/* q.lock held: the first queued fd whose tag may start a close now, or -1. */
static ssize_t next_eligible(void) {
        for (size_t i = 0; i < q.n; i++) {
                struct tag_count *t = tag_find(q.items[i].tag);

                if (!t || t->closing < REAPER_TAG_CLOSING)
                        return (ssize_t) i;
        }
        return -1;
}

static void tag_done(uint32_t tag) {
        struct tag_count *t = tag_find(tag);

        if (!t)
                return;
        if (t->closing > 0)
                t->closing--;
        if (t->held > 0)
                t->held--;
        if (t->held == 0)
                *t = q.tags[--q.n_tags];
}

static void *reaper_main(void *arg) {
        pthread_mutex_lock(&q.lock);
        for (;;) {
                struct item it;
                ssize_t i = next_eligible();

                if (i < 0) {
                        if (q.n == 0 && q.stopping)
                                break;
                        q.idle++;
                        pthread_cond_wait(&q.cond, &q.lock);
                        q.idle--;
                        continue;
                }
                it = q.items[i];
                memmove(&q.items[i], &q.items[i + 1], (q.n - (size_t) i - 1) * sizeof(*q.items));
                q.n--;
                tag_find(it.tag)->closing++;
                pthread_mutex_unlock(&q.lock);
                safe_close(it.fd); /* may take as long as the sender wants */
                pthread_mutex_lock(&q.lock);
                tag_done(it.tag);
                q.held--;
                /* Another thread may wait for this tag's turn. */
                pthread_cond_broadcast(&q.cond);
        }
        q.threads--;
        pthread_mutex_unlock(&q.lock);
        return NULL;
}

static void atfork_prepare(void) {
        pthread_mutex_lock(&q.lock);
}

static void atfork_parent(void) {
        pthread_mutex_unlock(&q.lock);
}

static void atfork_child(void) {
        /* The threads stayed in the parent: the child starts its own when it needs them (and closes the
         * copies of what was queued then). What they were closing is the parent's to finish. */
        pthread_mutex_unlock(&q.lock);
        (void) pthread_cond_init(&q.cond, NULL);
        q.threads = q.idle = 0;
        for (size_t i = 0; i < q.n_tags;) {
                struct tag_count *t = &q.tags[i];

                t->held -= MIN(t->held, t->closing);
                q.held -= MIN(q.held, t->closing);
                t->closing = 0;
                if (t->held == 0)
                        *t = q.tags[--q.n_tags];
                else
                        i++;
        }
}

static void atfork_register(void) {
        (void) pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* q.lock held. */
static int spawn_locked(void) {
        pthread_attr_t attr;
        sigset_t all, old;
        pthread_t t;
        int r;

        r = -pthread_attr_init(&attr);
        if (r < 0)
                return r;
        /* Never joined: stopping must not wait for a close that hangs. No signal is its to take. */
        (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* It only calls close(): a small stack, so that stuck ones cost little. */
        (void) pthread_attr_setstacksize(&attr, 256 * 1024);
        sigfillset(&all);
        (void) pthread_sigmask(SIG_SETMASK, &all, &old);
        r = -pthread_create(&t, &attr, reaper_main, NULL);
        (void) pthread_sigmask(SIG_SETMASK, &old, NULL);
        (void) pthread_attr_destroy(&attr);
        if (r == 0)
                q.threads++;
        return r;
}

int reaper_start(void) {
        int r = 0;

        (void) pthread_once(&atfork_once, atfork_register);
        pthread_mutex_lock(&q.lock);
        q.stopping = false;
        if (q.threads == 0)
                r = spawn_locked();
        pthread_mutex_unlock(&q.lock);
        return r;
}

bool reaper_take(int fd, uint32_t tag) {
        struct tag_count *t;
        bool ok = false;

        (void) pthread_once(&atfork_once, atfork_register);
        pthread_mutex_lock(&q.lock);
        if (q.held >= REAPER_MAX)
                goto out;
        /* Every running thread may be stuck in a close: a new one for this fd, up to the bound. */
        if (q.idle == 0 && q.threads < REAPER_THREADS_MAX && spawn_locked() < 0 && q.threads == 0)
                goto out;
        if (q.n == q.cap) {
                size_t cap = MAX(q.cap * 2, (size_t) 64);
                struct item *v = realloc(q.items, cap * sizeof(*v));

                if (!v)
                        goto out;
                q.items = v;
                q.cap = cap;
        }
        t = tag_find(tag);
        if (!t) {
                if (q.n_tags == q.cap_tags) {
                        size_t cap = MAX(q.cap_tags * 2, (size_t) 16);
                        struct tag_count *v = realloc(q.tags, cap * sizeof(*v));

                        if (!v)
                                goto out;
                        q.tags = v;
                        q.cap_tags = cap;
                }
                t = &q.tags[q.n_tags++];
                *t = (struct tag_count){ .tag = tag };
        }
        t->held++;
        q.held++;
        q.items[q.n++] = (struct item){ .fd = fd, .tag = tag };
        /* Idle threads may be waiting for another tag's turn: every one looks. */
        pthread_cond_broadcast(&q.cond);
        ok = true;
out:
        pthread_mutex_unlock(&q.lock);
        return ok;
}

unsigned reaper_held(uint32_t tag) {
        struct tag_count *t;
        unsigned n;

        pthread_mutex_lock(&q.lock);
        t = tag_find(tag);
        n = t ? t->held : 0;
        pthread_mutex_unlock(&q.lock);
        return n;
}

unsigned reaper_held_total(void) {
        unsigned n;

        pthread_mutex_lock(&q.lock);
        n = q.held;
        pthread_mutex_unlock(&q.lock);
        return n;
}

void reaper_stop(void) {
        pthread_mutex_lock(&q.lock);
        q.stopping = true;
        pthread_cond_broadcast(&q.cond);
        pthread_mutex_unlock(&q.lock);
}
