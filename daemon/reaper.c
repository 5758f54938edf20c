/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "log.h"
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

int reaper_start(void) {
        pthread_attr_t attr;
        pthread_t t;
        int r;

        (void) pthread_attr_init(&attr);
        /* Never joined: stopping must not wait for a close that hangs. */
        (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_mutex_lock(&q.lock);
        q.stopping = false;
        r = -pthread_create(&t, &attr, reaper_main, NULL);
        q.running = r == 0;
        pthread_mutex_unlock(&q.lock);
        (void) pthread_attr_destroy(&attr);
        return r;
}

void reaper_close(int fd) {
        if (fd < 0)
                return;
        pthread_mutex_lock(&q.lock);
        if (q.running && q.n == q.cap) {
                size_t cap = MAX(q.cap * 2, (size_t) 64);
                int *v = realloc(q.fds, cap * sizeof(*v));

                if (v) {
                        q.fds = v;
                        q.cap = cap;
                }
        }
        if (q.running && q.n < q.cap) {
                q.fds[q.n++] = fd;
                pthread_cond_signal(&q.cond);
                fd = -EBADF;
        }
        pthread_mutex_unlock(&q.lock);
        if (fd >= 0) {
                /* No thread (start failed, or out of memory): the one risk left is ours to take. */
                log_warning("Closing a client's fd in a serving thread; it may block.");
                safe_close(fd);
        }
}

void reaper_stop(void) {
        pthread_mutex_lock(&q.lock);
        q.stopping = true;
        pthread_cond_signal(&q.cond);
        pthread_mutex_unlock(&q.lock);
}
