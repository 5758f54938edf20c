/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internal helpers around the robust lock (mutex.c), for slab.c and the tests. */

#include <stdbool.h>

#include "shmzone.h"

/* True if the calling thread holds m. */
bool mutex_held_by_me(struct shmz_mutex *m);

/*
 * Unlocks m and leaves a death reported by SHMZ_OWNER_DEAD unacknowledged: the
 * next locker gets SHMZ_OWNER_DEAD too. For the allocator, which repairs only
 * its own state and must not swallow the death for the zone's other users.
 */
int mutex_unlock_pass_death(struct shmz_mutex *m);
/* True if this thread's last successful lock found its holder dead (not merely a death passed on). */
bool mutex_last_lock_found_death(void);

/* Tests: the lock SIGKILLs its own process at the n-th crash point it passes (0 = off): between every two
 * steps of a lock (slot, CAS, owner record, tag) and of an unlock (record, release, wake-up, slot). */
extern unsigned mutex_test_crash_countdown;
/* Tests: behave as if the C library had registered no robust list (liveness polling). */
void mutex_test_force_fallback(bool on);
