/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The robust lock. Children never call criterion asserts: they report through
 * exit codes and the shared zone, and end with _exit.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

#include "mutex.h"
#include "shmzone.h"
#include "zone.h"

struct shared {
        struct shmz_mutex m;
        _Atomic uint32_t ready;
        uint64_t counter; /* plain: only the lock protects it */
        pthread_mutex_t pm;
};

static struct shmz_zone *zone;
static struct shared *sh;

static void setup(void) {
        cr_assert_eq(zone_new_anonymous("mutex-test", 1 << 20, &zone), 0);
        sh = shmz_zone_base(zone);
        cr_assert_eq(shmz_mutex_init(&sh->m), 0);
}

static void teardown(void) {
        shmz_zone_close(zone);
}

static uint64_t now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ULL + (uint64_t) ts.tv_nsec;
}

static void wait_ready(uint32_t v) {
        while (atomic_load(&sh->ready) != v)
                usleep(100);
}

static int wait_child(pid_t pid) {
        int status;
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        return status;
}

/* A child that takes the lock, says so, and then waits to be killed. */
static pid_t child_holding(bool fallback) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (fallback)
                        mutex_test_force_fallback(true);
                int r = shmz_mutex_lock(&sh->m);
                if (r < 0)
                        _exit(10);
                atomic_store(&sh->ready, 1);
                for (;;)
                        pause();
        }
        wait_ready(1);
        /* Mode in the top bits (1: in the kernel's robust list, 2: waiters poll), the owner's tid below. */
        cr_assert_eq(sh->m.reserved0 >> 30, fallback ? 2u : 1u);
        cr_assert_eq(sh->m.reserved0 & SHMZ_FUTEX_TID_MASK, sh->m.futex & SHMZ_FUTEX_TID_MASK);
        return pid;
}

TestSuite(mutex, .init = setup, .fini = teardown);

Test(mutex, basic) {
        cr_assert_eq(sizeof(struct shmz_mutex), SHMZ_MUTEX_SIZE);
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert(mutex_held_by_me(&sh->m));
        cr_assert_eq(shmz_mutex_trylock(&sh->m), -EBUSY);
        cr_assert_eq(shmz_mutex_lock(&sh->m), -EDEADLK);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), -EPERM);
        cr_assert_eq(shmz_mutex_trylock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), -EINVAL);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(sh->m.futex, 0);
        cr_assert_eq(sh->m.acquisitions, 2);
}

Test(mutex, other_process_cannot_unlock) {
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                int a = shmz_mutex_unlock(&sh->m), b = shmz_mutex_trylock(&sh->m);
                _exit(a == -EPERM && b == -EBUSY ? 0 : 1);
        }
        int status = wait_child(pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

Test(mutex, timedlock_times_out) {
        pid_t pid = child_holding(false);
        uint64_t t0 = now_ns();
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 50 * 1000 * 1000), -ETIMEDOUT);
        uint64_t dt = now_ns() - t0;
        cr_assert_geq(dt, 50 * 1000 * 1000ULL);
        cr_assert_lt(dt, 2000 * 1000 * 1000ULL);
        cr_assert_eq(shmz_mutex_trylock(&sh->m), -EBUSY);
        kill(pid, SIGKILL);
        wait_child(pid);
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 1000 * 1000 * 1000), SHMZ_OWNER_DEAD);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

static void owner_death(bool fallback) {
        pid_t pid = child_holding(fallback);
        kill(pid, SIGKILL);
        wait_child(pid);
        uint64_t t0 = now_ns();
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_lt(now_ns() - t0, 1000 * 1000 * 1000ULL, "the dead owner must be noticed promptly");
        cr_assert_eq(sh->m.owner_deaths, 1);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

Test(mutex, owner_killed_robust_list) {
        owner_death(false);
}

Test(mutex, owner_killed_fallback_polling) {
        owner_death(true);
}

struct killer_arg {
        pid_t pid;
        unsigned delay_ms;
};

static void *killer(void *p) {
        struct killer_arg *a = p;
        usleep(a->delay_ms * 1000);
        kill(a->pid, SIGKILL);
        return NULL;
}

/* A waiter asleep in the kernel is woken when the owner dies (kernel robust list, no daemon). */
static void waiter_woken(bool fallback) {
        struct killer_arg a = { .pid = child_holding(fallback), .delay_ms = 100 };
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, killer, &a), 0);
        uint64_t t0 = now_ns();
        int r = shmz_mutex_lock(&sh->m);
        uint64_t dt = now_ns() - t0;
        pthread_join(t, NULL);
        wait_child(a.pid);
        cr_assert_eq(r, SHMZ_OWNER_DEAD);
        cr_assert_geq(dt, 90 * 1000 * 1000ULL, "must have waited for the kill");
        cr_assert_lt(dt, 1000 * 1000 * 1000ULL);
        cr_assert_geq(sh->m.contended, 1);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

Test(mutex, sleeping_waiter_woken_on_death) {
        waiter_woken(false);
}

Test(mutex, sleeping_waiter_woken_on_death_fallback) {
        waiter_woken(true);
}

Test(mutex, not_made_consistent_becomes_unrecoverable) {
        pid_t pid = child_holding(false);
        kill(pid, SIGKILL);
        wait_child(pid);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_lock(&sh->m), -ENOTRECOVERABLE);
        cr_assert_eq(shmz_mutex_trylock(&sh->m), -ENOTRECOVERABLE);
        cr_assert_eq(shmz_mutex_init(&sh->m), 0);
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

static void *thread_lock_and_exit(void *p) {
        return (void *) (intptr_t) shmz_mutex_lock(&sh->m);
}

Test(mutex, thread_exit_while_holding) {
        pthread_t t;
        void *r;
        cr_assert_eq(pthread_create(&t, NULL, thread_lock_and_exit, NULL), 0);
        pthread_join(t, &r);
        cr_assert_eq((intptr_t) r, 0);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

/* Our locks and glibc's robust mutexes share the thread's robust list: interleave them, then die. */
Test(mutex, shares_robust_list_with_glibc) {
        pthread_mutexattr_t a;
        struct shmz_mutex *m2 = (struct shmz_mutex *) ((char *) shmz_zone_base(zone) + 4096);

        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        cr_assert_eq(pthread_mutex_init(&sh->pm, &a), 0);
        shmz_mutex_init(m2);

        /* In this process first: links stay sane when released out of order. */
        for (int i = 0; i < 3; i++) {
                cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
                cr_assert_eq(pthread_mutex_lock(&sh->pm), 0);
                cr_assert_eq(shmz_mutex_lock(m2), 0);
                cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
                cr_assert_eq(pthread_mutex_unlock(&sh->pm), 0);
                cr_assert_eq(shmz_mutex_unlock(m2), 0);
        }

        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (shmz_mutex_lock(&sh->m) != 0 || pthread_mutex_lock(&sh->pm) != 0 || shmz_mutex_lock(m2) != 0)
                        _exit(1);
                if (shmz_mutex_unlock(m2) != 0 || shmz_mutex_lock(m2) != 0)
                        _exit(2);
                atomic_store(&sh->ready, 1);
                for (;;)
                        pause();
        }
        wait_ready(1);
        kill(pid, SIGKILL);
        wait_child(pid);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_eq(pthread_mutex_lock(&sh->pm), EOWNERDEAD);
        cr_assert_eq(shmz_mutex_lock(m2), SHMZ_OWNER_DEAD);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_consistent(m2), 0);
        cr_assert_eq(pthread_mutex_consistent(&sh->pm), 0);
        cr_assert_eq(shmz_mutex_unlock(m2), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(pthread_mutex_unlock(&sh->pm), 0);
}

Test(mutex, force_unlock_dead_owner_only) {
        pid_t pid = child_holding(true);
        cr_assert_eq(shmz_mutex_force_unlock(&sh->m, pid), -EBUSY, "a live owner keeps its lock");
        cr_assert_eq(shmz_mutex_force_unlock(&sh->m, pid + 1000000), 0, "not held by that pid");
        kill(pid, SIGKILL);
        wait_child(pid);
        cr_assert_eq(shmz_mutex_force_unlock(&sh->m, pid), 1);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

static void exclusion(int nproc, bool fallback) {
        const int iters = 20000;
        pid_t pids[8];

        for (int i = 0; i < nproc; i++) {
                pids[i] = fork();
                cr_assert_geq(pids[i], 0);
                if (pids[i] == 0) {
                        if (fallback)
                                mutex_test_force_fallback(true);
                        for (int k = 0; k < iters; k++) {
                                if (shmz_mutex_lock(&sh->m) != 0)
                                        _exit(1);
                                uint64_t v = sh->counter;
                                if ((k & 63) == 0)
                                        sched_yield(); /* widen the window a lost exclusion would show in */
                                sh->counter = v + 1;
                                if (shmz_mutex_unlock(&sh->m) != 0)
                                        _exit(2);
                        }
                        _exit(0);
                }
        }
        for (int i = 0; i < nproc; i++) {
                int status = wait_child(pids[i]);
                cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        cr_assert_eq(sh->counter, (uint64_t) nproc * iters);
        cr_assert_eq(sh->m.futex, 0);
        cr_assert_eq(sh->m.acquisitions, (uint64_t) nproc * iters);
}

Test(mutex, exclusion_four_processes) {
        exclusion(4, false);
}

Test(mutex, exclusion_fallback) {
        exclusion(2, true);
}
