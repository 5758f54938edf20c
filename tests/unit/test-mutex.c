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
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include "mutex.h"
#include "shmzone.h"
#include "util.h"
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
        /* Mode in the top bits (1: parked in the kernel's pending slot, 2: waiters poll), the owner's tid below. */
        cr_assert_eq(sh->m.owner_tag >> 30, fallback ? 2u : 1u);
        cr_assert_eq(sh->m.owner_tag & SHMZ_FUTEX_TID_MASK, sh->m.futex & SHMZ_FUTEX_TID_MASK);
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
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 50 * 1000 * 1000), -ETIMEDOUT);
        uint64_t dt = now_nsec(CLOCK_MONOTONIC) - t0;
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
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 1000 * 1000 * 1000ULL, "the dead owner must be noticed promptly");
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

/*
 * The kernel's clean-up leaves the word free with OWNER_DIED: the fast path's
 * CAS fails on it, and the locker takes it while spinning, death reported.
 */
Test(mutex, dead_owner_word_taken_while_spinning) {
        pid_t pid = child_holding(false);
        kill(pid, SIGKILL);
        wait_child(pid);
        cr_assert_eq(sh->m.futex, SHMZ_FUTEX_OWNER_DIED, "the kernel did not clean up: %#x", sh->m.futex);
        cr_assert_eq(shmz_mutex_lock(&sh->m), SHMZ_OWNER_DEAD);
        cr_assert_eq(sh->m.contended, 1, "taken on the spin path, without sleeping");
        cr_assert_eq(sh->m.futex & ~SHMZ_FUTEX_TID_MASK, 0u, "no waiter was announced");
        cr_assert_eq(sh->m.owner_deaths, 1);
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

/* A holder that lets go while the locker spins hands over without anyone sleeping or waking. */
Test(mutex, spinning_locker_takes_a_released_lock) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                for (int i = 0; i < 200000; i++) {
                        if (shmz_mutex_lock(&sh->m) != 0)
                                _exit(1);
                        sh->counter++;
                        if (shmz_mutex_unlock(&sh->m) != 0)
                                _exit(2);
                }
                _exit(0);
        }
        for (int i = 0; i < 200000; i++) {
                cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
                sh->counter++;
                cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        }
        int status = wait_child(pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        cr_assert_eq(sh->counter, 400000);
        cr_assert_eq(sh->m.futex, 0);
        cr_assert_eq(sh->m.owner_deaths, 0);
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

/* A waiter asleep in the kernel is woken when the owner dies (kernel robust-list clean-up, no daemon). */
static void waiter_woken(bool fallback) {
        struct killer_arg a = { .pid = child_holding(fallback), .delay_ms = 100 };
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, killer, &a), 0);
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
        int r = shmz_mutex_lock(&sh->m);
        uint64_t dt = now_nsec(CLOCK_MONOTONIC) - t0;
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

/*
 * A holder that keeps letting go and taking the lock straight back wakes a
 * sleeping waiter every time; the waiter spins again after each wake-up. Once
 * the holder dies holding, the waiter must still learn of the death, from a
 * wake-up that lands in that spin or from its next sleep.
 */
static void barging_owner_dies(bool fallback) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (fallback)
                        mutex_test_force_fallback(true);
                if (shmz_mutex_lock(&sh->m) != 0)
                        _exit(10);
                atomic_store(&sh->ready, 1);
                for (int i = 0; i < 100; i++) {
                        usleep(500); /* long enough for the waiter to go to sleep */
                        if (shmz_mutex_unlock(&sh->m) != 0)
                                _exit(11);
                        if (shmz_mutex_lock(&sh->m) != 0)
                                _exit(12);
                }
                atomic_store(&sh->ready, 2);
                for (;;)
                        pause();
        }
        wait_ready(1);
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC), dead_at = 0;
        unsigned taken = 0;
        int r;
        for (;;) {
                /* Kill it once it has barged through all its rounds and holds the lock for good. */
                if (dead_at == 0 && atomic_load(&sh->ready) == 2) {
                        kill(pid, SIGKILL);
                        dead_at = now_nsec(CLOCK_MONOTONIC);
                }
                r = dead_at ? shmz_mutex_lock(&sh->m) : shmz_mutex_timedlock(&sh->m, 2 * 1000 * 1000);
                if (r == -ETIMEDOUT)
                        continue;
                if (r != 0)
                        break;
                /* We won a release: hand it back (the holder waits for it) and wait again. */
                taken++;
                cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
                cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 10 * 1000 * 1000 * 1000ULL);
        }
        wait_child(pid);
        cr_assert_eq(r, SHMZ_OWNER_DEAD, "got %d after taking it %u times", r, taken);
        cr_assert_neq(dead_at, 0, "the death was reported before the holder died");
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - dead_at, 1000 * 1000 * 1000ULL,
                     "the dead owner must be noticed promptly");
        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
}

Test(mutex, barging_owner_dies_while_waiter_spins_after_wakeups) {
        barging_owner_dies(false);
}

Test(mutex, barging_owner_dies_while_waiter_spins_after_wakeups_fallback) {
        barging_owner_dies(true);
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

/*
 * Our locks and glibc's robust mutexes share the thread's robust_list_head (glibc
 * takes the pending slot from us): interleave them, then die.
 */
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

/* ---- F2: the zone is written by others; the lock holds no address and follows none ---- */

/* What glibc registers with the kernel per thread (include/uapi/linux/futex.h). */
struct robust_head {
        void *next;
        long futex_offset;
        void *list_op_pending;
};

static struct robust_head *my_robust_head(void) {
        struct robust_head *head = NULL;
        size_t len = 0;

        if (syscall(SYS_get_robust_list, 0, &head, &len) < 0)
                return NULL;
        return head;
}

/* Like wait_ready(), but a child that gave up fails the test instead of hanging it. */
static void wait_ready_from(pid_t pid, uint32_t v) {
        int status = 0;

        while (atomic_load(&sh->ready) != v) {
                cr_assert_eq(waitpid(pid, &status, WNOHANG), 0, "child gave up: status %#x", (unsigned) status);
                usleep(100);
        }
}

static struct shmz_mutex *second_lock(void) {
        struct shmz_mutex *m2 = (struct shmz_mutex *) ((char *) shmz_zone_base(zone) + 4096);
        shmz_mutex_init(m2);
        return m2;
}

/* Variables of the holder a hostile co-writer would like the holder to write. */
static struct { uint64_t before, canary, after; } target = { 1, 2, 3 };

/*
 * Another process scribbles the canary's address over every byte of the held
 * locks but the lock word; keep_tag keeps the owner tag, so that the holder
 * still believes the lock is in its robust list.
 */
static void scribble(struct shmz_mutex **locks, size_t n, bool keep_tag) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                uint64_t a = (uint64_t) (uintptr_t) &target.canary;
                for (size_t i = 0; i < n; i++) {
                        uint8_t *b = (uint8_t *) locks[i];
                        for (size_t off = 4; off < sizeof(struct shmz_mutex); off++) {
                                if (keep_tag && off >= offsetof(struct shmz_mutex, owner_tag) &&
                                    off < offsetof(struct shmz_mutex, owner_tag) + 4)
                                        continue;
                                b[off] = (uint8_t) (a >> (8 * (off % 8)));
                        }
                }
                _exit(0);
        }
        int status = wait_child(pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void cowriter_scribbles(bool keep_tag) {
        struct shmz_mutex *m2 = second_lock();
        struct shmz_mutex *locks[] = { &sh->m, m2 };

        cr_assert_eq(shmz_mutex_lock(&sh->m), 0); /* parked in the pending slot */
        cr_assert_eq(shmz_mutex_lock(m2), 0);     /* nested: fallback mode */
        scribble(locks, 2, keep_tag);
        cr_assert_eq(shmz_mutex_unlock(m2), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(target.before, 1);
        cr_assert_eq(target.canary, 2, "the holder wrote where a co-writer pointed it");
        cr_assert_eq(target.after, 3);

        /* And the locks still work once reinitialised. */
        shmz_mutex_init(&sh->m);
        shmz_mutex_init(m2);
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(target.canary, 2);
}

Test(mutex, cowriter_cannot_make_holder_write) {
        cowriter_scribbles(true);
        cowriter_scribbles(false);
}

/* No 8-byte word of the whole mapping may point near our TCB, into our stack or into the mapping. */
static void assert_no_addresses(const char *what) {
        uintptr_t head = (uintptr_t) my_robust_head();
        uintptr_t map = (uintptr_t) zone->hdr, map_end = map + zone->map_size;
        uintptr_t stack, stack_end;
        pthread_attr_t a;
        void *stk;
        size_t stk_size;
        const uint64_t *w = (const uint64_t *) zone->hdr;

        cr_assert_neq(head, 0);
        cr_assert_eq(pthread_getattr_np(pthread_self(), &a), 0);
        cr_assert_eq(pthread_attr_getstack(&a, &stk, &stk_size), 0);
        pthread_attr_destroy(&a);
        stack = (uintptr_t) stk;
        stack_end = stack + stk_size;

        for (size_t i = 0; i < zone->map_size / 8; i++) {
                uint64_t v = w[i];
                if (v == 0)
                        continue;
                cr_assert(!(v >= head - 4096 && v < head + 4096), "%s: offset %zu holds %#lx, by the robust head %#lx",
                          what, i * 8, (unsigned long) v, (unsigned long) head);
                cr_assert(!(v >= stack && v < stack_end), "%s: offset %zu holds %#lx, in the stack", what, i * 8,
                          (unsigned long) v);
                cr_assert(!(v >= map && v < map_end), "%s: offset %zu holds %#lx, in the mapping", what, i * 8,
                          (unsigned long) v);
        }
}

Test(mutex, zone_holds_no_addresses) {
        struct shmz_mutex *m2 = second_lock();

        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_eq(sh->m.owner_tag >> 30, 1u, "parked in the pending slot");
        assert_no_addresses("robust");
        cr_assert_eq(shmz_mutex_lock(m2), 0);
        cr_assert_eq(m2->owner_tag >> 30, 2u, "nested: fallback mode");
        assert_no_addresses("nested");
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_eq(shmz_mutex_unlock(m2), 0);

        mutex_test_force_fallback(true);
        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_eq(sh->m.owner_tag >> 30, 2u);
        assert_no_addresses("fallback");
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        mutex_test_force_fallback(false);
}

/* ---- deaths the single pending slot must still catch ---- */

static void assert_owner_dead_soon(struct shmz_mutex *m) {
        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
        /* Bounded: a missed death fails the test instead of hanging it. */
        cr_assert_eq(shmz_mutex_timedlock(m, 5000 * 1000 * 1000ULL), SHMZ_OWNER_DEAD);
        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 2000 * 1000 * 1000ULL, "the dead owner must be noticed promptly");
        cr_assert_eq(shmz_mutex_consistent(m), 0);
        cr_assert_eq(shmz_mutex_unlock(m), 0);
}

Test(mutex, process_dies_holding_two_locks) {
        struct shmz_mutex *m2 = second_lock();
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (shmz_mutex_lock(&sh->m) != 0 || shmz_mutex_lock(m2) != 0)
                        _exit(10);
                atomic_store(&sh->ready, 1);
                for (;;)
                        pause();
        }
        wait_ready_from(pid, 1);
        cr_assert_eq(sh->m.owner_tag >> 30, 1u);
        cr_assert_eq(m2->owner_tag >> 30, 2u);
        kill(pid, SIGKILL);
        wait_child(pid);
        assert_owner_dead_soon(m2);
        assert_owner_dead_soon(&sh->m);
}

static void *thread_lock_two_and_exit(void *p) {
        struct shmz_mutex *m2 = p;
        if (shmz_mutex_lock(&sh->m) != 0 || shmz_mutex_lock(m2) != 0)
                return (void *) 1;
        return NULL;
}

Test(mutex, thread_exits_holding_two_locks) {
        struct shmz_mutex *m2 = second_lock();
        pthread_t t;
        void *r;

        cr_assert_eq(pthread_create(&t, NULL, thread_lock_two_and_exit, m2), 0);
        pthread_join(t, &r);
        cr_assert_null(r);
        assert_owner_dead_soon(&sh->m);
        assert_owner_dead_soon(m2);
}

/*
 * glibc clears the pending slot when the holder locks and unlocks a robust
 * pthread mutex: the kernel no longer knows about our lock, so waiters must
 * find out for themselves. The waiter is asleep when the holder dies, and the
 * dead holder stays a zombie (not reaped) until the waiter is done.
 */
Test(mutex, owner_dies_after_glibc_took_the_slot) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        cr_assert_eq(pthread_mutex_init(&sh->pm, &a), 0);

        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                struct robust_head *head = my_robust_head();
                if (!head || shmz_mutex_lock(&sh->m) != 0)
                        _exit(10);
                if (head->list_op_pending == NULL)
                        _exit(11); /* not parked: the test would prove nothing */
                if (pthread_mutex_lock(&sh->pm) != 0 || pthread_mutex_unlock(&sh->pm) != 0)
                        _exit(12);
                if (head->list_op_pending != NULL)
                        _exit(13);
                atomic_store(&sh->ready, 1);
                for (;;)
                        pause();
        }
        struct killer_arg k = { .pid = pid, .delay_ms = 100 };
        pthread_t t;
        wait_ready_from(pid, 1);
        cr_assert_eq(sh->m.owner_tag >> 30, 1u);
        cr_assert_eq(pthread_create(&t, NULL, killer, &k), 0);
        assert_owner_dead_soon(&sh->m);
        pthread_join(t, NULL);
        int status = wait_child(pid);
        cr_assert(WIFSIGNALED(status), "child exited with %d", WEXITSTATUS(status));
}

/* The liveness backstop leaves a live robust-mode owner alone, however long it holds the lock. */
Test(mutex, backstop_spares_live_owner) {
        pid_t pid = child_holding(false);
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 700 * 1000 * 1000ULL), -ETIMEDOUT);
        cr_assert_eq(sh->m.owner_deaths, 0);
        kill(pid, SIGKILL);
        wait_child(pid);
        assert_owner_dead_soon(&sh->m);
}

/* A live fallback-mode owner whose address space grew is still alive (start time, not its size). */
Test(mutex, fallback_owner_growing_stays_alive) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                mutex_test_force_fallback(true);
                if (shmz_mutex_lock(&sh->m) != 0)
                        _exit(10);
                void *p = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (p == MAP_FAILED)
                        _exit(11);
                atomic_store(&sh->ready, 1);
                for (;;)
                        pause();
        }
        wait_ready_from(pid, 1);
        cr_assert_eq(sh->m.owner_tag >> 30, 2u);
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 300 * 1000 * 1000ULL), -ETIMEDOUT, "a live owner lost its lock");
        kill(pid, SIGKILL);
        wait_child(pid);
        assert_owner_dead_soon(&sh->m);
}

/* A child forked while its parent holds a parked lock starts with a free slot. */
Test(mutex, fork_child_gets_a_free_slot) {
        struct shmz_mutex *m2 = second_lock();

        cr_assert_eq(shmz_mutex_lock(&sh->m), 0);
        cr_assert_not_null(my_robust_head()->list_op_pending);
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
                if (my_robust_head()->list_op_pending != NULL)
                        _exit(10);
                if (shmz_mutex_lock(m2) != 0 || m2->owner_tag >> 30 != 1u)
                        _exit(11);
                if (shmz_mutex_unlock(m2) != 0 || my_robust_head()->list_op_pending != NULL)
                        _exit(12);
                _exit(0);
        }
        int status = wait_child(pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: %d", WEXITSTATUS(status));
        cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
        cr_assert_null(my_robust_head()->list_op_pending);
}

/* Failed lock attempts give the slot back. */
Test(mutex, failed_attempts_free_the_slot) {
        pid_t pid = child_holding(false);

        cr_assert_eq(shmz_mutex_trylock(&sh->m), -EBUSY);
        cr_assert_null(my_robust_head()->list_op_pending);
        cr_assert_eq(shmz_mutex_timedlock(&sh->m, 10 * 1000 * 1000ULL), -ETIMEDOUT);
        cr_assert_null(my_robust_head()->list_op_pending);
        kill(pid, SIGKILL);
        wait_child(pid);
        assert_owner_dead_soon(&sh->m);

        struct shmz_mutex *m2 = second_lock();
        mutex_test_force_fallback(true);
        cr_assert_eq(shmz_mutex_lock(m2), 0);
        mutex_test_force_fallback(false);
        cr_assert_eq(shmz_mutex_lock(m2), -EDEADLK);
        cr_assert_null(my_robust_head()->list_op_pending);
        cr_assert_eq(shmz_mutex_unlock(m2), 0);
        cr_assert_eq(shmz_mutex_lock(m2), 0);
        cr_assert_not_null(my_robust_head()->list_op_pending);
        cr_assert_eq(shmz_mutex_unlock(m2), 0);
        cr_assert_null(my_robust_head()->list_op_pending);
}

/* ---- a death between any two steps of a lock or an unlock ---- */

/* What the child's script does: the lock, lock or unlock, and whether that lock is (or was last) taken parked. */
static const struct {
        int which; /* 0: sh->m, 1: the second lock */
        bool lock;
        bool parked;
} crash_script[] = {
        { 0, true, true },   { 0, false, true },                     /* alone: parked in the pending slot */
        { 0, true, true },   { 1, true, false },                     /* nested: the second one in fallback mode */
        { 1, false, false }, { 0, false, true },  { 1, true, true }, /* the other way round */
        { 0, true, false },  { 0, false, false }, { 1, false, true }, { 0, true, true }, /* trylock */
        { 0, false, true },
};

/*
 * A child runs crash_script and SIGKILLs itself at its k-th crash point inside
 * the lock, for every k: between slot and CAS, CAS and owner record, record and
 * tag, tag and return; between the unlock's check, record, release, wake-up and
 * slot. Whatever the step, the survivor gets both locks promptly, with
 * SHMZ_OWNER_DEAD exactly when the child died holding one; and the kernel has
 * cleaned up every lock that was parked: the dead child's tid is left in a word
 * only for a lock it took in fallback mode.
 */
Test(mutex, killed_at_every_step_of_lock_and_unlock) {
        struct shmz_mutex *m2 = second_lock();
        struct shmz_mutex *locks[] = { &sh->m, m2 };
        unsigned k, completed = 0, kernel_cleaned = 0, polled = 0, free_after = 0;

        for (k = 1; k < 400; k++) {
                shmz_mutex_init(&sh->m);
                shmz_mutex_init(m2);
                atomic_store(&sh->ready, UINT32_MAX);
                pid_t pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        mutex_test_crash_countdown = k;
                        for (unsigned i = 0; i < ELEMENTSOF(crash_script); i++) {
                                struct shmz_mutex *m = locks[crash_script[i].which];
                                int r;

                                atomic_store(&sh->ready, i);
                                if (!crash_script[i].lock)
                                        r = shmz_mutex_unlock(m);
                                else if (i == ELEMENTSOF(crash_script) - 2)
                                        r = shmz_mutex_trylock(m);
                                else
                                        r = shmz_mutex_lock(m);
                                if (r != 0)
                                        _exit(10 + (int) i);
                                if (crash_script[i].lock && (m->owner_tag >> 30) != (crash_script[i].parked ? 1u : 2u))
                                        _exit(50 + (int) i); /* the script's modes are wrong: proves nothing */
                        }
                        mutex_test_crash_countdown = 0;
                        _exit(0);
                }
                int status = wait_child(pid);
                if (WIFEXITED(status)) {
                        cr_assert_eq(WEXITSTATUS(status), 0, "step %u: child exited with %d", k, WEXITSTATUS(status));
                        completed = k;
                        break; /* the script ran out of crash points */
                }
                cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "step %u", k);

                uint32_t at = atomic_load(&sh->ready);
                cr_assert_lt(at, ELEMENTSOF(crash_script), "step %u: died outside the script", k);
                for (int l = 0; l < 2; l++) {
                        uint32_t word = __atomic_load_n(&locks[l]->futex, __ATOMIC_ACQUIRE);
                        bool parked = false, held;
                        int expect;

                        /* How the child last took this lock, up to the call it died in. */
                        for (uint32_t i = 0; i <= at; i++)
                                if (crash_script[i].which == l && crash_script[i].lock)
                                        parked = crash_script[i].parked;
                        /* The other lock, in fallback mode, may have borrowed the slot for the call it died in. */
                        bool other_parked = true;
                        for (uint32_t i = 0; i <= at; i++)
                                if (crash_script[i].which != l && crash_script[i].lock)
                                        other_parked = crash_script[i].parked;
                        bool other_borrowed = crash_script[at].which != l && !other_parked;
                        if ((word & SHMZ_FUTEX_TID_MASK) == (uint32_t) pid) {
                                cr_assert(!parked || other_borrowed,
                                          "step %u (call %u): lock %d was parked, the kernel left it held", k, at, l);
                                held = true;
                                polled++;
                        } else {
                                cr_assert_eq(word & SHMZ_FUTEX_TID_MASK, 0u, "step %u: lock %d: word %#x", k, l, word);
                                held = word & SHMZ_FUTEX_OWNER_DIED;
                                kernel_cleaned += held;
                                free_after += !held;
                        }
                        expect = held ? SHMZ_OWNER_DEAD : 0;
                        uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
                        cr_assert_eq(shmz_mutex_timedlock(locks[l], 5000 * 1000 * 1000ULL), expect,
                                     "step %u (call %u): lock %d", k, at, l);
                        cr_assert_lt(now_nsec(CLOCK_MONOTONIC) - t0, 2000 * 1000 * 1000ULL,
                                     "step %u: lock %d taken late", k, l);
                        if (held)
                                cr_assert_eq(shmz_mutex_consistent(locks[l]), 0);
                        cr_assert_eq(shmz_mutex_unlock(locks[l]), 0);
                }
                cr_assert_null(my_robust_head()->list_op_pending);
        }
        cr_assert_gt(completed, 40, "the script passes many crash points (%u)", completed);
        cr_assert_gt(kernel_cleaned, 0);
        cr_assert_gt(polled, 0);
        cr_assert_gt(free_after, 0);
        cr_log_info("killed at each of %u steps: %u kernel clean-ups, %u left to polling, %u free", completed - 1,
                    kernel_cleaned, polled, free_after);
}

/*
 * The same for the unlock with a waiter asleep in the kernel: the holder dies
 * between any two steps of its unlock, release and wake-up included. The
 * waiter is woken promptly and learns of the death exactly when the holder
 * died still holding; also when the lock was taken in fallback mode, nested in
 * another.
 */
static void killed_unlocking_with_a_sleeper(bool nested) {
        struct shmz_mutex *m2 = second_lock();
        unsigned k, completed = 0;

        for (k = 1; k < 20; k++) {
                shmz_mutex_init(&sh->m);
                shmz_mutex_init(m2);
                atomic_store(&sh->ready, 0);
                pid_t pid = fork();
                cr_assert_geq(pid, 0);
                if (pid == 0) {
                        /* Nested: m2 is parked, sh->m taken in fallback mode (it borrows the slot to unlock). */
                        if (nested && shmz_mutex_lock(m2) != 0)
                                _exit(9);
                        if (shmz_mutex_lock(&sh->m) != 0 || (sh->m.owner_tag >> 30) != (nested ? 2u : 1u))
                                _exit(10);
                        atomic_store(&sh->ready, 1);
                        /* The waiter announces itself just before it sleeps. */
                        while (!(__atomic_load_n(&sh->m.futex, __ATOMIC_ACQUIRE) & SHMZ_FUTEX_WAITERS))
                                usleep(100);
                        usleep(20 * 1000);
                        mutex_test_crash_countdown = k;
                        if (shmz_mutex_unlock(&sh->m) != 0)
                                _exit(11);
                        mutex_test_crash_countdown = 0;
                        _exit(0);
                }
                wait_ready_from(pid, 1);
                uint64_t t0 = now_nsec(CLOCK_MONOTONIC);
                int r = shmz_mutex_timedlock(&sh->m, 5000 * 1000 * 1000ULL);
                uint64_t dt = now_nsec(CLOCK_MONOTONIC) - t0;
                int status = wait_child(pid);
                bool died = WIFSIGNALED(status);

                cr_assert(died || (WIFEXITED(status) && WEXITSTATUS(status) == 0), "step %u: status %#x", k,
                          (unsigned) status);
                cr_assert_lt(dt, 2000 * 1000 * 1000ULL, "step %u: the waiter slept on", k);
                /* The first two steps come before the release: the holder died holding. */
                cr_assert_eq(r, died && k <= 2 ? SHMZ_OWNER_DEAD : 0, "step %u: %d", k, r);
                if (r == SHMZ_OWNER_DEAD)
                        cr_assert_eq(shmz_mutex_consistent(&sh->m), 0);
                cr_assert_eq(shmz_mutex_unlock(&sh->m), 0);
                if (!died) {
                        completed = k;
                        break;
                }
        }
        cr_assert_eq(completed, 6, "an unlock has five crash points, not %u", completed ? completed - 1 : 0);
}

Test(mutex, killed_unlocking_with_a_sleeper) {
        killed_unlocking_with_a_sleeper(false);
}

Test(mutex, killed_unlocking_with_a_sleeper_nested) {
        killed_unlocking_with_a_sleeper(true);
}
