/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Robust cross-process lock on a futex word.
 *
 * The lock lives in a zone that other processes, maybe hostile ones, can write.
 * So nothing in it is an address and nothing read from it is ever followed: it
 * holds the lock word (the owner's TID, kernel robust-futex convention), the
 * owner's record (pid, tid, thread start time, pid namespace) and figures, and
 * every value read from it is read once, checked, and used from a local.
 *
 * Kernel clean-up without a list: glibc registers one robust_list_head per
 * thread (set_robust_list). Linking our locks into its list would put list links,
 * addresses of the owner's memory, into the zone, and have the owner write
 * through whatever a co-writer left there. We only borrow the head's
 * list_op_pending slot. When the thread dies, the kernel takes that entry, adds
 * futex_offset, and if the word there holds the dying thread's TID sets
 * OWNER_DIED and wakes a waiter; it reads nothing at the entry itself. A thread
 * parks at most one lock there and remembers which in thread-local memory. The
 * slot is set before the CAS that may take the lock and cleared only after the
 * release and its wake-up: whenever the word holds our TID, the slot names it.
 *
 * A lock taken while the slot is busy (another of our locks is parked there, or
 * glibc is in the middle of a robust mutex operation) or without a usable head
 * is taken in fallback mode: waiters poll the owner's liveness between timed
 * futex waits. And glibc clears the slot whenever the thread locks or unlocks a
 * robust pthread mutex, so a parked lock can silently lose the kernel's help:
 * waiters check a robust-mode owner's liveness too, only after it has kept them
 * waiting for ROBUST_POLL_NS. Liveness is tgkill(pid, tid, 0), then the thread's
 * state and start time in /proc (against tid reuse), and is judged only for
 * owners in the waiter's pid namespace; other owners are left to the kernel.
 *
 * Liveness needs the owner's record, which names the owner only from its tag
 * store after the CAS to the clearing before the release. A fallback-mode lock
 * taken while our parked lock holds the slot therefore borrows the slot for
 * those two windows (the parked lock is left to its waiters' backstop
 * meanwhile), so that a death there is the kernel's to clean up. Without a
 * usable head there is nobody to lend: a death in those windows (a few
 * instructions, no system call) leaves the lock held until the zone is
 * reinitialised.
 *
 * What a co-writer can still do: break exclusion (clear or forge the word),
 * make waiters believe an owner died (forge its record) or keep them waiting,
 * like it can corrupt anything else in the zone. What it cannot: make a lock
 * holder write to memory of its choosing, or learn addresses in its memory.
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#include "futex.h"
#include "mutex.h"
#include "util.h"

/* Layout the kernel expects (include/uapi/linux/futex.h). */
struct kernel_robust_list {
        struct kernel_robust_list *next;
};
struct kernel_robust_list_head {
        struct kernel_robust_list list;
        long futex_offset;
        struct kernel_robust_list *list_op_pending;
};

#define FALLBACK_POLL_NS (20 * 1000 * 1000ULL)
/*
 * How long a robust-mode owner may keep a waiter waiting before the waiter checks
 * its liveness. The kernel wakes waiters at once when it cleans up; this only
 * catches owners glibc took the slot from. Long enough to keep waiters of busy
 * locks out of /proc, short enough to notice such a death within a fraction of
 * a second.
 */
#define ROBUST_POLL_NS (200 * 1000 * 1000ULL)
/*
 * How many times a locker looks at a held word before it sleeps. Zone critical
 * sections are short: the owner usually lets go within a few hundred
 * nanoseconds, while a sleep costs a system call on each side. Bounded, so
 * that a preempted or dead owner costs a waiter no more than this.
 */
#define SPIN_TRIES 64u

_Static_assert(sizeof(struct shmz_mutex) == SHMZ_MUTEX_SIZE, "mutex size is ABI");
_Static_assert(__builtin_offsetof(struct shmz_mutex, futex) == 0, "futex word first");

/*
 * owner_tag: how the current owner is protected, in the top two bits, and which
 * thread that is, in the low 30. The owner stores it last, with release: a
 * waiter trusts the mode and the rest of the record (owner_pid, owner_start,
 * owner_pidns, acquisitions) only when the tid matches the lock word's; between
 * an owner's CAS and that store, they still describe the last owner.
 */
#define OWNER_ROBUST 1u   /* parked in the thread's list_op_pending slot when taken */
#define OWNER_FALLBACK 2u /* not: waiters check liveness often */
#define OWNER_TAG(mode, tid) (((mode) << 30) | ((tid) &SHMZ_FUTEX_TID_MASK))
#define OWNER_MODE(tag) ((tag) >> 30)
#define OWNER_TID(tag) ((tag) &SHMZ_FUTEX_TID_MASK)

/* Thread-local, never in a zone. */
struct thread_self {
        bool init;
        uint32_t tid;
        uint32_t pid;
        uint64_t start;                       /* this thread's start time, clock ticks since boot; 0: unknown */
        uint64_t pidns;                       /* inode of our pid namespace; 0: unknown */
        struct kernel_robust_list_head *head; /* glibc's, for this thread; NULL: fallback mode only */
        long futex_offset;                    /* head->futex_offset */
        struct shmz_mutex *pending_lock;      /* the lock we parked in head->list_op_pending, if any */
        bool found_death;                     /* our last lock consumed a holder's death (OWNER_DIED) */
};

static __thread struct thread_self self __attribute__((tls_model("initial-exec")));
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

#define barrier() __asm__ __volatile__("" ::: "memory")

/*
 * Tests: SIGKILL ourselves at the n-th step of a lock or unlock we pass (0 =
 * never). The entry points test the countdown once and run a copy with crash
 * points only when it is set, so that the fast paths carry none.
 */
unsigned mutex_test_crash_countdown = 0;
#define TESTING() _unlikely_(mutex_test_crash_countdown != 0)
#define CRASH_POINT(t)                                                                                                 \
        do {                                                                                                           \
                if (t)                                                                                                 \
                        crash_point();                                                                                 \
        } while (0)

/* Not inlined: the call keeps the compiler from moving any step across it. */
__attribute__((noinline, cold)) static void crash_point(void) {
        if (mutex_test_crash_countdown && --mutex_test_crash_countdown == 0)
                (void) kill(getpid(), SIGKILL);
}

/* Our entry for m: the kernel adds futex_offset back and never reads the entry itself. */
static inline struct kernel_robust_list *entry_of(const struct thread_self *s, struct shmz_mutex *m) {
        return (struct kernel_robust_list *) ((uintptr_t) &m->futex - (uintptr_t) s->futex_offset);
}

/*
 * Park m in the slot if it is free: before the CAS, so that a death right after
 * it is covered (the kernel acts only if the word holds the dying thread's TID).
 */
static inline bool slot_take(struct thread_self *s, struct shmz_mutex *m) {
        if (!s->head || s->pending_lock || s->head->list_op_pending)
                return false;
        s->pending_lock = m;
        s->head->list_op_pending = entry_of(s, m);
        barrier();
        return true;
}

/* After the release: unless glibc has taken the slot over since, clear it. */
static inline void slot_release(struct thread_self *s, struct shmz_mutex *m) {
        barrier();
        if (s->head && s->head->list_op_pending == entry_of(s, m))
                s->head->list_op_pending = NULL;
        s->pending_lock = NULL;
}

/*
 * A lock taken in fallback mode (another of ours is parked) borrows the slot
 * for the steps where its word may hold our TID while its owner record does
 * not name us: from before its CAS to its tag store, and from clearing its
 * record to its wake-up. A death there would leave waiters nothing to judge
 * liveness by, so the kernel must clean it up. The parked lock, whose record is
 * whole, is left to its waiters' liveness backstop meanwhile (as when glibc
 * takes the slot). Only if the slot still holds our parked lock.
 */
static inline bool slot_lend(struct thread_self *s, struct shmz_mutex *m) {
        if (!s->head || !s->pending_lock || s->pending_lock == m ||
            s->head->list_op_pending != entry_of(s, s->pending_lock))
                return false;
        s->head->list_op_pending = entry_of(s, m);
        barrier();
        return true;
}

static inline void slot_return(struct thread_self *s, struct shmz_mutex *m) {
        barrier();
        if (s->head->list_op_pending == entry_of(s, m) && s->pending_lock)
                s->head->list_op_pending = entry_of(s, s->pending_lock);
}

static void atfork_child(void) {
        /* Only the forking thread lives on, with a new TID and none of the parent's locks. */
        if (self.pending_lock)
                slot_release(&self, self.pending_lock);
        self.init = false;
}

static void atfork_register(void) {
        (void) pthread_atfork(NULL, NULL, atfork_child);
}

/* State letter and start time (field 22, clock ticks since boot) from a /proc stat file: 0 or -errno. */
static int proc_stat(const char *path, char *ret_state, uint64_t *ret_start) {
        char buf[1024], *p, *end;
        unsigned long long v;
        ssize_t n;
        int fd, r;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        n = read(fd, buf, sizeof(buf) - 1);
        r = n < 0 ? -errno : 0;
        (void) close(fd);
        if (r < 0)
                return r;
        buf[n] = 0;
        /* The command name may contain spaces and parentheses: fields 3... start after the last ')'. */
        p = strrchr(buf, ')');
        if (!p || p[1] != ' ' || !p[2])
                return -EBADMSG;
        *ret_state = p[2];
        p += 2;
        for (int field = 3; field < 22 && p; field++)
                p = strchr(p + 1, ' ');
        if (!p)
                return -EBADMSG;
        errno = 0;
        v = strtoull(p + 1, &end, 10);
        if (errno != 0 || end == p + 1)
                return -EBADMSG;
        *ret_start = v;
        return 0;
}

static int proc_thread_stat(uint32_t pid, uint32_t tid, char *ret_state, uint64_t *ret_start) {
        char path[64];

        snprintf(path, sizeof(path), "/proc/%u/task/%u/stat", pid, tid);
        return proc_stat(path, ret_state, ret_start);
}

/* force_unlock(): is process pid gone, or a zombie? */
static bool process_is_dead(uint32_t pid) {
        char path[64], state;
        uint64_t start;
        bool eperm = false;
        int r;

        if (kill((pid_t) pid, 0) < 0) {
                if (errno != EPERM)
                        return errno == ESRCH;
                eperm = true; /* it exists, someone else's */
        }
        snprintf(path, sizeof(path), "/proc/%u/stat", pid);
        r = proc_stat(path, &state, &start);
        if (r < 0) /* gone since kill(), unless hidepid= hides someone else's process */
                return r == -ENOENT && !eperm;
        return state == 'Z' || state == 'X';
}

static void self_init_slow(void) {
        struct kernel_robust_list_head *head = NULL;
        struct stat st;
        size_t len = 0;
        char state;

        (void) pthread_once(&atfork_once, atfork_register);
        self.tid = (uint32_t) syscall(SYS_gettid);
        self.pid = (uint32_t) getpid();
        if (proc_stat("/proc/thread-self/stat", &state, &self.start) < 0)
                self.start = 0;
        self.pidns = stat("/proc/self/ns/pid", &st) >= 0 ? (uint64_t) st.st_ino : 0;
        self.head = NULL;
        /* An odd entry would read as a PI futex to the kernel. */
        if (syscall(SYS_get_robust_list, 0, &head, &len) == 0 && head && len == sizeof(*head) &&
            (head->futex_offset & 1) == 0) {
                self.head = head;
                self.futex_offset = head->futex_offset;
        }
        self.init = true;
}

static inline struct thread_self *self_get(void) {
        if (_unlikely_(!self.init))
                self_init_slow();
        return &self;
}

void mutex_test_force_fallback(bool on) {
        self_get();
        if (on)
                self.head = NULL;
        else
                self_init_slow();
}

static inline _Atomic uint32_t *futex_word(struct shmz_mutex *m) {
        return (_Atomic uint32_t *) &m->futex;
}

static struct timespec ns_to_ts(uint64_t ns) {
        return (struct timespec){ .tv_sec = (time_t) (ns / 1000000000ULL), .tv_nsec = (long) (ns % 1000000000ULL) };
}

/*
 * Is the owner that word value v and owner tag `tag` (already read) name gone?
 * Errs towards "alive": a wrong "dead" breaks exclusion, a wrong "alive" costs
 * another poll. Rechecked by the caller's CAS on v.
 */
static bool owner_is_dead(const struct thread_self *s, struct shmz_mutex *m, uint32_t v, uint32_t tag) {
        uint32_t tid = v & SHMZ_FUTEX_TID_MASK, pid;
        uint64_t gen, start, pidns, now_start;
        bool dead;
        char state;

        /* The rest of the record is this owner's only once its tag (stored last, with release) names it. */
        if (OWNER_TID(tag) != tid)
                return false;
        gen = __atomic_load_n(&m->acquisitions, __ATOMIC_ACQUIRE);
        pid = __atomic_load_n(&m->owner_pid, __ATOMIC_ACQUIRE);
        start = __atomic_load_n(&m->owner_start, __ATOMIC_ACQUIRE);
        pidns = __atomic_load_n(&m->owner_pidns, __ATOMIC_ACQUIRE);
        /* Another pid namespace's pid and tid would name some unrelated thread here. */
        if (pid == 0 || pid > INT_MAX || tid == 0 || pidns != s->pidns)
                return false;

        if (syscall(SYS_tgkill, (pid_t) pid, (pid_t) tid, 0) < 0) {
                if (errno == ESRCH)
                        dead = true;
                else if (errno == EPERM) /* it exists, someone else's: /proc may still tell */
                        dead = false;
                else
                        return false;
        } else
                dead = false;
        /*
         * A zombie still takes signals, and a reused tid is alive. /proc we may not
         * be able to read (hidepid=): that says nothing.
         */
        if (!dead && proc_thread_stat(pid, tid, &state, &now_start) >= 0)
                dead = state == 'Z' || state == 'X' || (start != 0 && now_start != start);
        if (!dead)
                return false;

        /* The record must not have changed meanwhile: the tid and the generation tell one hold from the next. */
        atomic_thread_fence(memory_order_acquire);
        return __atomic_load_n(&m->owner_tag, __ATOMIC_RELAXED) == tag &&
               __atomic_load_n(&m->acquisitions, __ATOMIC_RELAXED) == gen;
}

enum { MODE_BLOCK, MODE_TRY, MODE_TIMED };

static inline __attribute__((always_inline)) int acquired(struct thread_self *s, struct shmz_mutex *m, bool robust,
                                                          bool died, bool waited, bool t) {
        uint32_t state;

        CRASH_POINT(t); /* the word is ours, nothing else yet */
        /* The record waiters judge our liveness by; the tag, stored last, vouches for it. */
        __atomic_store_n(&m->owner_pid, s->pid, __ATOMIC_RELAXED);
        __atomic_store_n(&m->owner_start, s->start, __ATOMIC_RELAXED);
        __atomic_store_n(&m->owner_pidns, s->pidns, __ATOMIC_RELAXED);
        __atomic_store_n(&m->acquisitions, __atomic_load_n(&m->acquisitions, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
        if (waited)
                m->contended++;
        s->found_death = died;
        CRASH_POINT(t);
        __atomic_store_n(&m->owner_tag, OWNER_TAG(robust ? OWNER_ROBUST : OWNER_FALLBACK, s->tid), __ATOMIC_RELEASE);
        CRASH_POINT(t);

        state = __atomic_load_n(&m->state, __ATOMIC_RELAXED);
        if (_unlikely_(state == SHMZ_MUTEX_STATE_NOTRECOVERABLE)) {
                (void) shmz_mutex_unlock(m);
                return -ENOTRECOVERABLE;
        }
        if (_unlikely_(died)) {
                m->owner_deaths++;
                m->state = SHMZ_MUTEX_STATE_INCONSISTENT;
                return SHMZ_OWNER_DEAD;
        }
        /* A repairer may have died too: the next one repairs again. */
        if (_unlikely_(state == SHMZ_MUTEX_STATE_INCONSISTENT))
                return SHMZ_OWNER_DEAD;
        return 0;
}

__attribute__((noinline)) static int lock_slow(struct thread_self *s, struct shmz_mutex *m, bool robust, int mode,
                                               uint64_t timeout_ns) {
        _Atomic uint32_t *w = futex_word(m);
        uint64_t deadline = UINT64_MAX;
        bool waited = false, overdue = false, t = TESTING();
        int r;

        if (mode == MODE_TIMED) {
                uint64_t now = now_nsec(CLOCK_MONOTONIC);
                deadline = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
        }

        /* Spin first; a death, our own hold and everything else are the loop's business below. */
        for (unsigned i = 0; mode != MODE_TRY && i < SPIN_TRIES; i++) {
                uint32_t v = atomic_load_explicit(w, memory_order_relaxed);

                if ((v & SHMZ_FUTEX_TID_MASK) == 0) {
                        if (atomic_compare_exchange_weak_explicit(w, &v, s->tid | (v & SHMZ_FUTEX_WAITERS),
                                                                  memory_order_acquire, memory_order_relaxed))
                                return acquired(s, m, robust, v & SHMZ_FUTEX_OWNER_DIED, true, t);
                        continue;
                }
                if ((v & SHMZ_FUTEX_TID_MASK) == s->tid)
                        break;
                cpu_relax();
        }

        for (;;) {
                uint32_t v = atomic_load_explicit(w, memory_order_relaxed), tag;
                struct timespec ts;
                uint64_t until;
                bool often;

                if ((v & SHMZ_FUTEX_TID_MASK) == 0) {
                        /* Free (maybe after a death). Having slept, assume others still wait. */
                        uint32_t nv = s->tid | (v & SHMZ_FUTEX_WAITERS) | (waited ? SHMZ_FUTEX_WAITERS : 0);

                        if (atomic_compare_exchange_weak_explicit(w, &v, nv, memory_order_acquire,
                                                                  memory_order_relaxed))
                                return acquired(s, m, robust, v & SHMZ_FUTEX_OWNER_DIED, waited, t);
                        continue;
                }
                if (mode == MODE_TRY) {
                        r = -EBUSY;
                        break;
                }
                if ((v & SHMZ_FUTEX_TID_MASK) == s->tid) {
                        r = -EDEADLK;
                        break;
                }

                /*
                 * A fallback-mode owner, or one whose tag does not name it yet (it is
                 * stored after the CAS), is checked at every poll; a robust-mode one
                 * once it has kept us waiting a whole ROBUST_POLL_NS.
                 */
                tag = __atomic_load_n(&m->owner_tag, __ATOMIC_ACQUIRE);
                often = OWNER_MODE(tag) != OWNER_ROBUST || OWNER_TID(tag) != (v & SHMZ_FUTEX_TID_MASK);
                if ((often || overdue) && owner_is_dead(s, m, v, tag)) {
                        uint32_t nv = (v & SHMZ_FUTEX_WAITERS) | SHMZ_FUTEX_OWNER_DIED;
                        (void) atomic_compare_exchange_strong(w, &v, nv);
                        overdue = false;
                        continue;
                }

                if (!(v & SHMZ_FUTEX_WAITERS)) {
                        if (!atomic_compare_exchange_weak_explicit(w, &v, v | SHMZ_FUTEX_WAITERS, memory_order_relaxed,
                                                                   memory_order_relaxed))
                                continue;
                        v |= SHMZ_FUTEX_WAITERS;
                }

                /* Every round, whatever woke the last wait (a holder that let go to another waiter, say): a
                 * lock that keeps changing hands must not keep a timed waiter past its deadline. */
                until = now_nsec(CLOCK_MONOTONIC);
                if (mode == MODE_TIMED && until >= deadline) {
                        r = -ETIMEDOUT;
                        break;
                }
                until += often ? FALLBACK_POLL_NS : ROBUST_POLL_NS;
                if (until > deadline)
                        until = deadline;
                waited = true;
                ts = ns_to_ts(until);
                r = futex_wait_abs(w, v, &ts);
                /* Timed out: the word did not change for a whole poll. */
                overdue = r == -ETIMEDOUT;
                if (r == -ETIMEDOUT && mode == MODE_TIMED && now_nsec(CLOCK_MONOTONIC) >= deadline) {
                        r = -ETIMEDOUT;
                        break;
                }
        }

        if (robust)
                slot_release(s, m);
        return r;
}

/* Fallback mode: the slot is lent to m while it is taken (and while it is waited for). */
__attribute__((noinline)) static int lock_nested(struct thread_self *s, struct shmz_mutex *m, int mode,
                                                 uint64_t timeout_ns) {
        bool lent = slot_lend(s, m), t = TESTING();
        uint32_t zero = 0;
        int r;

        CRASH_POINT(t);
        if (atomic_compare_exchange_strong_explicit(futex_word(m), &zero, s->tid, memory_order_acquire,
                                                    memory_order_relaxed))
                r = acquired(s, m, false, false, false, t);
        else
                r = lock_slow(s, m, false, mode, timeout_ns);
        if (lent)
                slot_return(s, m);
        return r;
}

static inline __attribute__((always_inline)) int lock_common(struct shmz_mutex *m, int mode, uint64_t timeout_ns,
                                                             bool t) {
        struct thread_self *s;
        uint32_t zero = 0;
        bool robust;

        assert_return(m, -EINVAL);
        s = self_get();
        robust = slot_take(s, m);
        if (_unlikely_(!robust))
                return lock_nested(s, m, mode, timeout_ns);
        CRASH_POINT(t);
        if (_likely_(atomic_compare_exchange_strong_explicit(futex_word(m), &zero, s->tid, memory_order_acquire,
                                                             memory_order_relaxed)))
                return acquired(s, m, true, false, false, t);
        return lock_slow(s, m, true, mode, timeout_ns);
}

_public_ int shmz_mutex_init(struct shmz_mutex *m) {
        assert_return(m, -EINVAL);
        memset(m, 0, sizeof(*m));
        return 0;
}

_public_ int shmz_mutex_lock(struct shmz_mutex *m) {
        return TESTING() ? lock_common(m, MODE_BLOCK, 0, true) : lock_common(m, MODE_BLOCK, 0, false);
}

_public_ int shmz_mutex_trylock(struct shmz_mutex *m) {
        return TESTING() ? lock_common(m, MODE_TRY, 0, true) : lock_common(m, MODE_TRY, 0, false);
}

_public_ int shmz_mutex_timedlock(struct shmz_mutex *m, uint64_t timeout_ns) {
        return TESTING() ? lock_common(m, MODE_TIMED, timeout_ns, true) : lock_common(m, MODE_TIMED, timeout_ns, false);
}

/* The release, after the caller checked that the word names us; parked: m is in the slot, lent: borrowed it. */
static inline __attribute__((always_inline)) int release(struct thread_self *s, struct shmz_mutex *m,
                                                         bool keep_inconsistent, bool parked, bool lent, bool t) {
        uint32_t v;

        /* Unlocked without consistent(): nobody repaired, so nobody may trust it again (pthread semantics). */
        CRASH_POINT(t);
        if (!keep_inconsistent && __atomic_load_n(&m->state, __ATOMIC_RELAXED) == SHMZ_MUTEX_STATE_INCONSISTENT)
                m->state = SHMZ_MUTEX_STATE_NOTRECOVERABLE;
        __atomic_store_n(&m->owner_tag, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&m->owner_pid, 0, __ATOMIC_RELAXED);
        CRASH_POINT(t);

        v = atomic_exchange_explicit(futex_word(m), 0, memory_order_release);
        CRASH_POINT(t);
        if (v & SHMZ_FUTEX_WAITERS)
                futex_wake(futex_word(m), 1);
        CRASH_POINT(t);
        /* Only now: dying between the release and the wake-up, the kernel wakes a waiter for us. */
        if (parked)
                slot_release(s, m);
        else if (lent)
                slot_return(s, m);
        CRASH_POINT(t);
        return 0;
}

/* A lock taken in fallback mode: released with the slot borrowed, if our parked lock holds it. */
__attribute__((noinline)) static int release_unparked(struct thread_self *s, struct shmz_mutex *m,
                                                      bool keep_inconsistent, bool t) {
        return release(s, m, keep_inconsistent, false, slot_lend(s, m), t);
}

static inline __attribute__((always_inline)) int unlock_common(struct shmz_mutex *m, bool keep_inconsistent, bool t) {
        struct thread_self *s;
        uint32_t v;
        bool parked;

        assert_return(m, -EINVAL);
        s = self_get();
        /* Which lock is parked we know from our own memory, never from the zone's owner tag. */
        parked = s->pending_lock == m;
        v = atomic_load_explicit(futex_word(m), memory_order_relaxed);
        if ((v & SHMZ_FUTEX_TID_MASK) != s->tid) {
                /* Taken from us (a co-writer's doing): at least free the slot. */
                if (parked)
                        slot_release(s, m);
                return -EPERM;
        }
        if (_unlikely_(!parked))
                return release_unparked(s, m, keep_inconsistent, t);
        return release(s, m, keep_inconsistent, true, false, t);
}

_public_ int shmz_mutex_unlock(struct shmz_mutex *m) {
        return TESTING() ? unlock_common(m, false, true) : unlock_common(m, false, false);
}

int mutex_unlock_pass_death(struct shmz_mutex *m) {
        return TESTING() ? unlock_common(m, true, true) : unlock_common(m, true, false);
}

bool mutex_last_lock_found_death(void) {
        return self_get()->found_death;
}

_public_ int shmz_mutex_consistent(struct shmz_mutex *m) {
        uint32_t v;

        assert_return(m, -EINVAL);
        v = atomic_load_explicit(futex_word(m), memory_order_relaxed);
        if ((v & SHMZ_FUTEX_TID_MASK) != self_get()->tid)
                return -EPERM;
        if (__atomic_load_n(&m->state, __ATOMIC_RELAXED) != SHMZ_MUTEX_STATE_INCONSISTENT)
                return -EINVAL;
        m->state = SHMZ_MUTEX_STATE_CONSISTENT;
        return 0;
}

_public_ int shmz_mutex_force_unlock(struct shmz_mutex *m, pid_t pid) {
        _Atomic uint32_t *w;
        uint32_t v;

        assert_return(m, -EINVAL);
        assert_return(pid > 0, -EINVAL);
        w = futex_word(m);
        v = atomic_load_explicit(w, memory_order_relaxed);
        if ((v & SHMZ_FUTEX_TID_MASK) == 0 || __atomic_load_n(&m->owner_pid, __ATOMIC_RELAXED) != (uint32_t) pid)
                return 0;
        /* Releasing a live owner's lock would break exclusion: only dead (or zombie) owners qualify. */
        if (!process_is_dead((uint32_t) pid))
                return -EBUSY;
        /* Like the kernel does on death: the next locker learns that the owner died. */
        if (!atomic_compare_exchange_strong(w, &v, (v & SHMZ_FUTEX_WAITERS) | SHMZ_FUTEX_OWNER_DIED))
                return -EAGAIN;
        futex_wake(w, 1);
        return 1;
}

bool mutex_held_by_me(struct shmz_mutex *m) {
        uint32_t v = atomic_load_explicit(futex_word(m), memory_order_relaxed);
        return (v & SHMZ_FUTEX_TID_MASK) == self_get()->tid;
}
