/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internal view of the allocator inside a zone (slab.c), for the tests. */

#include <stdbool.h>
#include <stdint.h>

#include "zone.h"

#define SLAB_PAGE_SHIFT 12u
#define SLAB_PAGE_SIZE (1u << SLAB_PAGE_SHIFT) /* internal page, independent of the OS page size */

/* Size class of a request of n bytes (n <= largest class), or -1. */
int slab_class_of(size_t n);
/* Slot size of class c; 0 if c is out of range. */
uint32_t slab_class_size(unsigned c);

/* Tests: the allocator SIGKILLs its own process at the n-th crash point it passes (0 = off). */
extern unsigned slab_test_crash_countdown;
