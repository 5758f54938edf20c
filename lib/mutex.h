/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internal helpers around the robust lock (mutex.c), for slab.c and the tests. */

#include <stdbool.h>

#include "shmzone.h"

/* True if the calling thread holds m. */
bool mutex_held_by_me(struct shmz_mutex *m);

/* Tests: behave as if the C library had registered no robust list (liveness polling). */
void mutex_test_force_fallback(bool on);
