/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Robust cross-process lock on a futex word.
 *
 * The lock word holds the owner's TID (kernel robust-futex convention). While a
 * thread holds a lock, the lock is linked into that thread's robust list, the
 * one glibc registered with the kernel (set_robust_list) for its own robust
 * mutexes: our robust_prev/robust_next words sit where glibc's pthread_mutex_t
 * keeps its list node, so the kernel, walking the list when the thread dies,
 * finds the lock word at node - 32, sets OWNER_DIED and wakes one waiter. The
 * next locker gets SHMZ_OWNER_DEAD without anybody else's help.
 *
 * If the thread has no usable robust list (another C library, another
 * futex_offset), we fall back: the owner records that the kernel will not
 * clean up after it, and waiters poll the owner's liveness (tgkill(pid, tid, 0)
 * plus the process start time against pid reuse) between timed futex waits.
 * That fallback assumes all users share one pid namespace.
 *
 * Like any process-shared robust pthread mutex, a held lock's list links point
 * into the owner's memory: a process able to write the zone can corrupt the
 * owner's robust list. Zone users are trusted with each other's integrity.
 */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>

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

#define ROBUST_NODE_OFFSET 32 /* offsetof(struct shmz_mutex, robust_next) */
#define FALLBACK_POLL_NS (20 * 1000 * 1000ULL)

_Static_assert(sizeof(struct shmz_mutex) == SHMZ_MUTEX_SIZE, "mutex size is ABI");
_Static_assert(__builtin_offsetof(struct shmz_mutex, futex) == 0, "futex word first");
_Static_assert(__builtin_offsetof(struct shmz_mutex, robust_next) == ROBUST_NODE_OFFSET, "robust node");
_Static_assert(__builtin_offsetof(struct shmz_mutex, robust_prev) == ROBUST_NODE_OFFSET - 8, "robust prev");

/*
 * reserved0 of struct shmz_mutex: how the current owner is protected, in the
 * top two bits, and which thread that is, in the low 30. A waiter trusts the
 * mode (and owner_pid/owner_start) only when the tid matches the lock word's:
 * between an owner's CAS and its writing them, they still describe the last one.
 */
#define OWNER_ROBUST 1u   /* linked into the kernel's robust list */
#define OWNER_FALLBACK 2u /* not linked: waiters must check liveness */
#define OWNER_TAG(mode, tid) (((mode) << 30) | ((tid) &SHMZ_FUTEX_TID_MASK))
#define OWNER_MODE(tag) ((tag) >> 30)
#define OWNER_TID(tag) ((tag) &SHMZ_FUTEX_TID_MASK)

struct thread_self {
        bool init;
        uint32_t tid;
        uint32_t pid;
        uint64_t start;                       /* process start time, clock ticks since boot */
        struct kernel_robust_list_head *head; /* NULL: fallback mode */
};

static __thread struct thread_self self __attribute__((tls_model("initial-exec")));
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_child(void) {
        /* Only the forking thread lives on in the child: new pid, new tid. */
        self.init = false;
}

static void atfork_register(void) {
        (void) pthread_atfork(NULL, NULL, atfork_child);
}

/* Field 22 of /proc/<pid>/stat; 0 if unreadable. */
static uint64_t proc_start_time(uint32_t pid) {
        char path[64], buf[1024];
        FILE *f;
        size_t n;
        char *p;
        unsigned long long v = 0;

        snprintf(path, sizeof(path), "/proc/%u/stat", pid);
        f = fopen(path, "re");
        if (!f)
                return 0;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        /* The command name may contain spaces and parentheses: start after the last ')'. */
        p = strrchr(buf, ')');
        if (!p)
                return 0;
        p++;
        for (int field = 2; field < 22 && p; field++)
                p = strchr(p + 1, ' ');
        if (!p || sscanf(p, " %llu", &v) != 1)
                return 0;
        return v;
}

static bool proc_is_zombie(uint32_t pid) {
        char path[64], buf[512];
        FILE *f;
        size_t n;
        char *p;

        snprintf(path, sizeof(path), "/proc/%u/stat", pid);
        f = fopen(path, "re");
        if (!f)
                return errno == ENOENT || errno == ESRCH; /* EMFILE and friends say nothing about the owner */
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        p = strrchr(buf, ')');
        return p && p[1] != 0 && (p[2] == 'Z' || p[2] == 'X');
}

static void self_init_slow(void) {
        struct kernel_robust_list_head *head = NULL;
        size_t len = 0;

        (void) pthread_once(&atfork_once, atfork_register);
        self.tid = (uint32_t) syscall(SYS_gettid);
        self.pid = (uint32_t) getpid();
        self.start = proc_start_time(self.pid);
        self.head = NULL;
        if (syscall(SYS_get_robust_list, 0, &head, &len) == 0 && head && len == sizeof(*head) &&
            head->futex_offset == -ROBUST_NODE_OFFSET)
                self.head = head;
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

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline uintptr_t node_of(struct shmz_mutex *m) {
        return (uintptr_t) &m->robust_next;
}

/* The list operations glibc performs for its robust mutexes: insert at the head. */
static inline void robust_enqueue(struct thread_self *s, struct shmz_mutex *m) {
        uintptr_t first = (uintptr_t) s->head->list.next;
        uintptr_t node = node_of(m);

        /* first's prev word sits right before its next word (glibc keeps one before the head too). */
        *(uintptr_t *) ((first & ~(uintptr_t) 1) - 8) = node;
        m->robust_next = first;
        m->robust_prev = (uintptr_t) &s->head->list;
        barrier();
        s->head->list.next = (struct kernel_robust_list *) node;
}

/* Unlink by neighbours: glibc may have inserted its own mutexes around ours. */
static inline void robust_dequeue(struct shmz_mutex *m) {
        uintptr_t next = (uintptr_t) m->robust_next, prev = (uintptr_t) m->robust_prev;

        *(uintptr_t *) ((next & ~(uintptr_t) 1) - 8) = prev;
        *(uintptr_t *) (prev & ~(uintptr_t) 1) = next;
        barrier();
        m->robust_prev = 0;
        m->robust_next = 0;
}

static inline void pending_set(struct thread_self *s, struct shmz_mutex *m) {
        if (s->head) {
                s->head->list_op_pending = (struct kernel_robust_list *) node_of(m);
                barrier();
        }
}

static inline void pending_clear(struct thread_self *s) {
        if (s->head) {
                barrier();
                s->head->list_op_pending = NULL;
        }
}

static inline _Atomic uint32_t *futex_word(struct shmz_mutex *m) {
        return (_Atomic uint32_t *) &m->futex;
}

static int futex_wait_abs(_Atomic uint32_t *w, uint32_t val, const struct timespec *abs) {
        long r;

        /* Shared (not PRIVATE): the kernel's robust-list wake-up on owner death uses shared futexes. */
        r = syscall(SYS_futex, w, FUTEX_WAIT_BITSET, val, abs, NULL, FUTEX_BITSET_MATCH_ANY);
        return r < 0 ? -errno : 0;
}

static void futex_wake(_Atomic uint32_t *w, int n) {
        (void) syscall(SYS_futex, w, FUTEX_WAKE, n, NULL, NULL, 0);
}

static uint64_t mono_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ULL + (uint64_t) ts.tv_nsec;
}

static struct timespec ns_to_ts(uint64_t ns) {
        return (struct timespec){ .tv_sec = (time_t) (ns / 1000000000ULL), .tv_nsec = (long) (ns % 1000000000ULL) };
}

/* Fallback only: is the recorded owner of word value v gone? Read racily; rechecked by CAS. */
static bool owner_is_dead(struct shmz_mutex *m, uint32_t v) {
        uint32_t tid = v & SHMZ_FUTEX_TID_MASK;
        uint32_t tag = __atomic_load_n(&m->reserved0, __ATOMIC_ACQUIRE);
        uint32_t pid = __atomic_load_n(&m->owner_pid, __ATOMIC_RELAXED);
        uint64_t start = __atomic_load_n(&m->owner_start, __ATOMIC_RELAXED);
        uint64_t now;

        /* pid and start are this owner's only once its tag (written last, with release) names it. */
        if (OWNER_MODE(tag) != OWNER_FALLBACK || OWNER_TID(tag) != tid || pid == 0 || pid > INT_MAX)
                return false;
        if (syscall(SYS_tgkill, (pid_t) pid, (pid_t) tid, 0) < 0)
                return errno == ESRCH;
        if (proc_is_zombie(pid))
                return true;
        now = proc_start_time(pid);
        return start != 0 && now != 0 && now != start;
}

enum { MODE_BLOCK, MODE_TRY, MODE_TIMED };

static int acquired(struct thread_self *s, struct shmz_mutex *m, bool died, bool waited) {
        m->owner_pid = s->pid;
        if (s->head) {
                robust_enqueue(s, m);
                pending_clear(s);
                __atomic_store_n(&m->reserved0, OWNER_TAG(OWNER_ROBUST, s->tid), __ATOMIC_RELEASE);
        } else {
                /* Only waiters polling for liveness need the start time (against pid reuse). */
                m->owner_start = s->start;
                __atomic_store_n(&m->reserved0, OWNER_TAG(OWNER_FALLBACK, s->tid), __ATOMIC_RELEASE);
        }
        m->acquisitions++;
        if (waited)
                m->contended++;

        if (_unlikely_(m->state == SHMZ_MUTEX_STATE_NOTRECOVERABLE)) {
                (void) shmz_mutex_unlock(m);
                return -ENOTRECOVERABLE;
        }
        if (_unlikely_(died)) {
                m->owner_deaths++;
                m->state = SHMZ_MUTEX_STATE_INCONSISTENT;
                return SHMZ_OWNER_DEAD;
        }
        /* A repairer may have died too: the next one repairs again. */
        if (_unlikely_(m->state == SHMZ_MUTEX_STATE_INCONSISTENT))
                return SHMZ_OWNER_DEAD;
        return 0;
}

__attribute__((noinline)) static int lock_slow(struct thread_self *s, struct shmz_mutex *m, int mode,
                                               uint64_t timeout_ns) {
        _Atomic uint32_t *w = futex_word(m);
        uint64_t deadline = 0;
        bool waited = false;

        if (mode == MODE_TIMED) {
                uint64_t now = mono_ns();
                deadline = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
        }

        for (;;) {
                uint32_t v = atomic_load_explicit(w, memory_order_relaxed);
                struct timespec ts;
                uint64_t until;
                bool poll;
                uint32_t tag;
                int r;

                if ((v & SHMZ_FUTEX_TID_MASK) == 0) {
                        /* Free (maybe after a death). Having slept, assume others still wait. */
                        uint32_t nv = s->tid | (v & SHMZ_FUTEX_WAITERS) | (waited ? SHMZ_FUTEX_WAITERS : 0);

                        if (atomic_compare_exchange_weak_explicit(w, &v, nv, memory_order_acquire,
                                                                  memory_order_relaxed))
                                return acquired(s, m, v & SHMZ_FUTEX_OWNER_DIED, waited);
                        continue;
                }
                if (mode == MODE_TRY) {
                        pending_clear(s);
                        return -EBUSY;
                }
                if ((v & SHMZ_FUTEX_TID_MASK) == s->tid) {
                        pending_clear(s);
                        return -EDEADLK;
                }

                /* Owner without kernel clean-up: find out ourselves whether it died. */
                /* Until the owner's tag names it as robust (it is written after the CAS), poll. */
                tag = __atomic_load_n(&m->reserved0, __ATOMIC_ACQUIRE);
                poll = OWNER_MODE(tag) != OWNER_ROBUST || OWNER_TID(tag) != (v & SHMZ_FUTEX_TID_MASK);
                if (poll && owner_is_dead(m, v)) {
                        uint32_t nv = (v & SHMZ_FUTEX_WAITERS) | SHMZ_FUTEX_OWNER_DIED;
                        (void) atomic_compare_exchange_strong(w, &v, nv);
                        continue;
                }

                if (!(v & SHMZ_FUTEX_WAITERS)) {
                        if (!atomic_compare_exchange_weak_explicit(w, &v, v | SHMZ_FUTEX_WAITERS, memory_order_relaxed,
                                                                   memory_order_relaxed))
                                continue;
                        v |= SHMZ_FUTEX_WAITERS;
                }

                until = deadline;
                if (poll) {
                        uint64_t p = mono_ns() + FALLBACK_POLL_NS;
                        if (mode != MODE_TIMED || p < until)
                                until = p;
                }
                waited = true;
                if (mode == MODE_TIMED || poll) {
                        ts = ns_to_ts(until);
                        r = futex_wait_abs(w, v, &ts);
                } else
                        r = futex_wait_abs(w, v, NULL);
                if (r == -ETIMEDOUT && mode == MODE_TIMED && mono_ns() >= deadline) {
                        pending_clear(s);
                        return -ETIMEDOUT;
                }
        }
}

static inline int lock_common(struct shmz_mutex *m, int mode, uint64_t timeout_ns) {
        struct thread_self *s;
        uint32_t zero = 0;

        assert_return(m, -EINVAL);
        s = self_get();
        pending_set(s, m);
        if (_likely_(atomic_compare_exchange_strong_explicit(futex_word(m), &zero, s->tid, memory_order_acquire,
                                                             memory_order_relaxed)))
                return acquired(s, m, false, false);
        return lock_slow(s, m, mode, timeout_ns);
}

_public_ int shmz_mutex_init(struct shmz_mutex *m) {
        assert_return(m, -EINVAL);
        memset(m, 0, sizeof(*m));
        return 0;
}

_public_ int shmz_mutex_lock(struct shmz_mutex *m) {
        return lock_common(m, MODE_BLOCK, 0);
}

_public_ int shmz_mutex_trylock(struct shmz_mutex *m) {
        return lock_common(m, MODE_TRY, 0);
}

_public_ int shmz_mutex_timedlock(struct shmz_mutex *m, uint64_t timeout_ns) {
        return lock_common(m, MODE_TIMED, timeout_ns);
}

_public_ int shmz_mutex_unlock(struct shmz_mutex *m) {
        struct thread_self *s;
        uint32_t v;

        assert_return(m, -EINVAL);
        s = self_get();
        v = atomic_load_explicit(futex_word(m), memory_order_relaxed);
        if ((v & SHMZ_FUTEX_TID_MASK) != s->tid)
                return -EPERM;

        /* Unlocked without consistent(): nobody repaired, so nobody may trust it again (pthread semantics). */
        if (m->state == SHMZ_MUTEX_STATE_INCONSISTENT)
                m->state = SHMZ_MUTEX_STATE_NOTRECOVERABLE;
        m->owner_pid = 0;

        pending_set(s, m);
        if (OWNER_MODE(m->reserved0) == OWNER_ROBUST && s->head)
                robust_dequeue(m);
        __atomic_store_n(&m->reserved0, 0, __ATOMIC_RELAXED);
        v = atomic_exchange_explicit(futex_word(m), 0, memory_order_release);
        if (v & SHMZ_FUTEX_WAITERS)
                futex_wake(futex_word(m), 1);
        pending_clear(s);
        return 0;
}

_public_ int shmz_mutex_consistent(struct shmz_mutex *m) {
        uint32_t v;

        assert_return(m, -EINVAL);
        v = atomic_load_explicit(futex_word(m), memory_order_relaxed);
        if ((v & SHMZ_FUTEX_TID_MASK) != self_get()->tid)
                return -EPERM;
        if (m->state != SHMZ_MUTEX_STATE_INCONSISTENT)
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
        /*
         * Releasing a live owner's lock would break exclusion and leave the lock
         * linked in its robust list: only dead (or zombie) owners qualify.
         */
        if (kill(pid, 0) == 0 && !proc_is_zombie((uint32_t) pid))
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
