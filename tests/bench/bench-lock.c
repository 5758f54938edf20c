/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The robust zone lock side by side with a process-shared robust
 * pthread_mutex_t and a bare futex word (no robustness at all), uncontended and
 * with two processes contending. Medians of several runs; one line per
 * comparison: RATIO <metric>/<anchor> <x>, x = anchor time / our time.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench-util.h"
#include "shmzone.h"
#include "zone.h"

#define RUNS 5

struct shared {
        struct shmz_mutex m;
        pthread_mutex_t pm;
        _Atomic uint32_t fw;
        uint64_t counter;
};

static struct shared *sh;

/* Drepper's three-state futex mutex ("Futexes are tricky"): 0 free, 1 locked, 2 locked with waiters. */
static void futex_lock(_Atomic uint32_t *w) {
        uint32_t c = 0;
        if (atomic_compare_exchange_strong(w, &c, 1))
                return;
        if (c != 2)
                c = atomic_exchange(w, 2);
        while (c != 0) {
                syscall(SYS_futex, w, FUTEX_WAIT, 2, NULL, NULL, 0);
                c = atomic_exchange(w, 2);
        }
}

static void futex_unlock(_Atomic uint32_t *w) {
        if (atomic_fetch_sub(w, 1) != 1) {
                atomic_store(w, 0);
                syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
        }
}

enum { SHMZ, PTHREAD, FUTEX };
static const char *const names[] = { "shmzone", "pthread_robust", "futex" };

static void lock(int kind) {
        if (kind == SHMZ)
                (void) shmz_mutex_lock(&sh->m);
        else if (kind == PTHREAD)
                (void) pthread_mutex_lock(&sh->pm);
        else
                futex_lock(&sh->fw);
}

static void unlock(int kind) {
        if (kind == SHMZ)
                (void) shmz_mutex_unlock(&sh->m);
        else if (kind == PTHREAD)
                (void) pthread_mutex_unlock(&sh->pm);
        else
                futex_unlock(&sh->fw);
}

static void loop(int kind, long iters) {
        for (long i = 0; i < iters; i++) {
                lock(kind);
                sh->counter++;
                unlock(kind);
        }
}

/* ns per lock+unlock, one process. */
static double uncontended(int kind) {
        const long iters = 5000000;
        double r[RUNS];
        for (int run = 0; run < RUNS; run++) {
                double t0 = now_ns();
                loop(kind, iters);
                r[run] = (now_ns() - t0) / (double) iters;
        }
        return median(r, RUNS);
}

/* ns of wall time per lock+unlock, two processes hammering the same lock. */
static double contended(int kind) {
        const long iters = 500000;
        double r[RUNS];
        for (int run = 0; run < RUNS; run++) {
                pid_t pids[2];
                sh->counter = 0;
                double t0 = now_ns();
                for (int i = 0; i < 2; i++) {
                        pids[i] = fork();
                        if (pids[i] < 0) {
                                perror("fork");
                                exit(1);
                        }
                        if (pids[i] == 0) {
                                loop(kind, iters);
                                _exit(0);
                        }
                }
                for (int i = 0; i < 2; i++)
                        waitpid(pids[i], NULL, 0);
                r[run] = (now_ns() - t0) / (double) (2 * iters);
                if (sh->counter != 2 * (uint64_t) iters) {
                        fprintf(stderr, "%s lost updates: %lu\n", names[kind], (unsigned long) sh->counter);
                        exit(1);
                }
        }
        return median(r, RUNS);
}

int main(void) {
        struct shmz_zone *z;
        pthread_mutexattr_t a;
        double u[3], c[3];

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (zone_new_anonymous("bench-lock", 1 << 20, &z) < 0) {
                perror("zone_new_anonymous");
                return 1;
        }
        sh = shmz_zone_base(z);
        shmz_mutex_init(&sh->m);
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&sh->pm, &a);

        printf("# lock+unlock, median of %d runs, ns per pair\n", RUNS);
        for (int k = 0; k < 3; k++)
                u[k] = uncontended(k);
        printf("uncontended shmzone %.1f pthread_robust %.1f futex %.1f\n", u[SHMZ], u[PTHREAD], u[FUTEX]);
        for (int k = 0; k < 3; k++)
                c[k] = contended(k);
        printf("contended_2proc shmzone %.1f pthread_robust %.1f futex %.1f\n", c[SHMZ], c[PTHREAD], c[FUTEX]);

        printf("RATIO lock_uncontended/pthread_robust %.2f\n", u[PTHREAD] / u[SHMZ]);
        printf("RATIO lock_uncontended/futex %.2f\n", u[FUTEX] / u[SHMZ]);
        printf("RATIO lock_contended_2proc/pthread_robust %.2f\n", c[PTHREAD] / c[SHMZ]);
        printf("RATIO lock_contended_2proc/futex %.2f\n", c[FUTEX] / c[SHMZ]);
        printf("# goal: lock_uncontended/pthread_robust >= 1\n");
        shmz_zone_close(z);
        return 0;
}
