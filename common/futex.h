/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Futexes on 32-bit words in memory other processes map: never PRIVATE (and
 * the kernel's robust-list wake-up on an owner's death wakes shared futexes).
 */

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Sleeps while *word holds val, at most rel (NULL: no bound): 0 when woken, -ETIMEDOUT, -EAGAIN, -EINTR. */
static inline int futex_wait(void *word, uint32_t val, const struct timespec *rel) {
        return syscall(SYS_futex, word, FUTEX_WAIT, val, rel, NULL, 0) < 0 ? -errno : 0;
}

/* The same until abs on CLOCK_MONOTONIC. */
static inline int futex_wait_abs(void *word, uint32_t val, const struct timespec *abs) {
        return syscall(SYS_futex, word, FUTEX_WAIT_BITSET, val, abs, NULL, FUTEX_BITSET_MATCH_ANY) < 0 ? -errno : 0;
}

/* Wakes up to n sleepers on word (INT_MAX: all). */
static inline void futex_wake(void *word, int n) {
        (void) syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
}
