/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>

#include "reaper.h"
#include "util.h"

/*
 * One process-wide queue: its memory is never freed, so that a thread stuck in
 * close() at exit still finds it (the process ends around it).
 */
static struct {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        int *fds;
        size_t n, cap;
        bool running, stopping;
} q = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void *reaper_main(void *arg) {
        pthread_mutex_lock(&q.lock);
        for (;;) {
                int fd;

                while (q.n == 0 && !q.stopping)
                        pthread_cond_wait(&q.cond, &q.lock);
                if (q.n == 0)
                        break;
                fd = q.fds[--q.n];
                pthread_mutex_unlock(&q.lock);
                safe_close(fd); /* may take as long as the sender wants */
                pthread_mutex_lock(&q.lock);
        }
        q.running = false;
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
        /* The thread stayed in the parent: the child starts its own when it needs one (and closes the
         * copies of what was queued then). */
        pthread_mutex_unlock(&q.lock);
        (void) pthread_cond_init(&q.cond, NULL);
        q.running = false;
}

static void atfork_register(void) {
        (void) pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* q.lock held. */
static int start_locked(void) {
        pthread_attr_t attr;
        sigset_t all, old;
        pthread_t t;
        int r;

        if (q.running)
                return 0;
        r = -pthread_attr_init(&attr);
        if (r < 0)
                return r;
        /* Never joined: stopping must not wait for a close that hangs. No signal is its to take. */
        (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        sigfillset(&all);
        (void) pthread_sigmask(SIG_SETMASK, &all, &old);
        r = -pthread_create(&t, &attr, reaper_main, NULL);
        (void) pthread_sigmask(SIG_SETMASK, &old, NULL);
        (void) pthread_attr_destroy(&attr);
        q.running = r == 0;
        return r;
}

int reaper_start(void) {
        int r;

        (void) pthread_once(&atfork_once, atfork_register);
        pthread_mutex_lock(&q.lock);
        q.stopping = false;
        r = start_locked();
        pthread_mutex_unlock(&q.lock);
        return r;
}

bool reaper_take(int fd) {
        bool ok = false;

        (void) pthread_once(&atfork_once, atfork_register);
        pthread_mutex_lock(&q.lock);
        if (start_locked() < 0)
                goto out;
        if (q.n == q.cap) {
                size_t cap = MAX(q.cap * 2, (size_t) 64);
                int *v = realloc(q.fds, cap * sizeof(*v));

                if (!v)
                        goto out;
                q.fds = v;
                q.cap = cap;
        }
        q.fds[q.n++] = fd;
        pthread_cond_signal(&q.cond);
        ok = true;
out:
        pthread_mutex_unlock(&q.lock);
        return ok;
}

void reaper_stop(void) {
        pthread_mutex_lock(&q.lock);
        q.stopping = true;
        pthread_cond_signal(&q.cond);
        pthread_mutex_unlock(&q.lock);
}
