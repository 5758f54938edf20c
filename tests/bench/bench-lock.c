/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The robust zone lock side by side with a process-shared robust
 * pthread_mutex_t and a bare futex word (no robustness at all), uncontended and
 * with two processes contending. Medians of several runs, the kinds taking
 * turns run by run so that a busy machine weighs on all of them alike; one line
 * per comparison: RATIO <metric>/<anchor> <x>, x = anchor time / our time.
 *
 * The bare futex lock is inlined into its loop; futex_call is the same lock
 * called out of line, as any library's lock is: the difference between the two
 * is the call, the rest is what robustness costs.
 *
 * Contended: two processes start together at a gate and each lock iters times;
 * the time runs from the gate to the last one's end. Once on two CPUs (one
 * process pinned to each, when there are two), where they really race for the
 * line, and once both pinned to one CPU, where they only meet when one is
 * preempted holding the lock.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
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

#define RUNS 11

struct shared {
        struct shmz_mutex m;
        pthread_mutex_t pm;
        _Atomic uint32_t fw;
        uint64_t counter;
        _Atomic uint32_t ready, go;
        double end[2];
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

__attribute__((noinline)) static void futex_lock_call(_Atomic uint32_t *w) {
        futex_lock(w);
}

__attribute__((noinline)) static void futex_unlock_call(_Atomic uint32_t *w) {
        futex_unlock(w);
}

enum { SHMZ, PTHREAD, FUTEX, FUTEX_CALL, KINDS };
static const char *const names[] = { "shmzone", "pthread_robust", "futex", "futex_call" };

static void lock(int kind) {
        if (kind == SHMZ)
                (void) shmz_mutex_lock(&sh->m);
        else if (kind == PTHREAD)
                (void) pthread_mutex_lock(&sh->pm);
        else if (kind == FUTEX)
                futex_lock(&sh->fw);
        else
                futex_lock_call(&sh->fw);
}

static void unlock(int kind) {
        if (kind == SHMZ)
                (void) shmz_mutex_unlock(&sh->m);
        else if (kind == PTHREAD)
                (void) pthread_mutex_unlock(&sh->pm);
        else if (kind == FUTEX)
                futex_unlock(&sh->fw);
        else
                futex_unlock_call(&sh->fw);
}

static void loop(int kind, long iters) {
        for (long i = 0; i < iters; i++) {
                lock(kind);
                sh->counter++;
                unlock(kind);
        }
}

/* ns per lock+unlock, one process, in r[kind][run]. */
static void uncontended(double r[KINDS][RUNS]) {
        const long iters = 2000000;
        for (int run = 0; run < RUNS; run++)
                for (int kind = 0; kind < KINDS; kind++) {
                        double t0 = now_ns();
                        loop(kind, iters);
                        r[kind][run] = (now_ns() - t0) / (double) iters;
                }
}

static void pin(int cpu) {
        cpu_set_t set;

        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        (void) sched_setaffinity(0, sizeof(set), &set);
}

/* ns of wall time per lock+unlock, two processes hammering the same lock, on cpus[0] and cpus[1]. */
static double contended_once(int kind, const int cpus[2]) {
        const long iters = 200000;
        pid_t pids[2];
        double t0;

        sh->counter = 0;
        sh->ready = sh->go = 0;
        for (int i = 0; i < 2; i++) {
                pids[i] = fork();
                if (pids[i] < 0) {
                        perror("fork");
                        exit(1);
                }
                if (pids[i] == 0) {
                        pin(cpus[i]);
                        /* Fault in and set up everything a first lock touches before the gate opens. */
                        lock(kind);
                        unlock(kind);
                        atomic_fetch_add(&sh->ready, 1);
                        while (!atomic_load(&sh->go))
                                ;
                        loop(kind, iters);
                        sh->end[i] = now_ns();
                        _exit(0);
                }
        }
        while (atomic_load(&sh->ready) < 2)
                usleep(100);
        t0 = now_ns();
        atomic_store(&sh->go, 1);
        for (int i = 0; i < 2; i++)
                waitpid(pids[i], NULL, 0);
        if (sh->counter != 2 * (uint64_t) iters) {
                fprintf(stderr, "%s lost updates: %lu\n", names[kind], (unsigned long) sh->counter);
                exit(1);
        }
        return ((sh->end[0] > sh->end[1] ? sh->end[0] : sh->end[1]) - t0) / (double) (2 * iters);
}

static void contended(const int cpus[2], double r[KINDS][RUNS]) {
        for (int run = 0; run < RUNS; run++)
                for (int kind = 0; kind < KINDS; kind++)
                        r[kind][run] = contended_once(kind, cpus);
}

int main(void) {
        struct shmz_zone *z;
        static double r[KINDS][RUNS];
        double u[KINDS], c[KINDS], c1[KINDS];
        int two[2] = { -1, -1 }, one[2];
        pthread_mutexattr_t a;
        cpu_set_t set;

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
        uncontended(r);
        for (int k = 0; k < KINDS; k++)
                u[k] = median(r[k], RUNS);
        printf("uncontended shmzone %.1f pthread_robust %.1f futex %.1f futex_call %.1f\n", u[SHMZ], u[PTHREAD],
               u[FUTEX], u[FUTEX_CALL]);

        if (sched_getaffinity(0, sizeof(set), &set) < 0) {
                perror("sched_getaffinity");
                return 1;
        }
        for (int cpu = 0, n = 0; cpu < CPU_SETSIZE && n < 2; cpu++)
                if (CPU_ISSET(cpu, &set))
                        two[n++] = cpu;
        if (two[1] < 0)
                two[1] = two[0];
        contended(two, r);
        for (int k = 0; k < KINDS; k++)
                c[k] = median(r[k], RUNS);
        printf("contended_2proc (cpus %d,%d) shmzone %.1f pthread_robust %.1f futex %.1f\n", two[0], two[1], c[SHMZ],
               c[PTHREAD], c[FUTEX]);
        one[0] = one[1] = two[0];
        contended(one, r);
        for (int k = 0; k < KINDS; k++)
                c1[k] = median(r[k], RUNS);
        printf("contended_2proc_1cpu (cpu %d) shmzone %.1f pthread_robust %.1f futex %.1f\n", one[0], c1[SHMZ],
               c1[PTHREAD], c1[FUTEX]);

        printf("RATIO lock_uncontended/pthread_robust %.2f\n", u[PTHREAD] / u[SHMZ]);
        printf("RATIO lock_uncontended/futex %.2f\n", u[FUTEX] / u[SHMZ]);
        printf("RATIO lock_uncontended/futex_call %.2f\n", u[FUTEX_CALL] / u[SHMZ]);
        printf("RATIO lock_contended_2proc/pthread_robust %.2f\n", c[PTHREAD] / c[SHMZ]);
        printf("RATIO lock_contended_2proc/futex %.2f\n", c[FUTEX] / c[SHMZ]);
        printf("RATIO lock_contended_1cpu/pthread_robust %.2f\n", c1[PTHREAD] / c1[SHMZ]);
        printf("# goals: lock_uncontended/pthread_robust >= 1, lock_uncontended/futex >= 0.95, "
               "lock_contended_2proc/pthread_robust >= 1.2\n");
        shmz_zone_close(z);
        return 0;
}
