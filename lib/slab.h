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
/* Tests: called at a few points just after the allocator read the descriptor of page pg (where: the function), so
 * that a test can play a co-writer that changes it at the worst moment. NULL = off. */
extern void (*slab_test_race)(const char *where, uint32_t pg);

/* The layout inside the zone: the header's alloc[] holds struct slab_state, the usable area begins with
 * one struct pdesc per page. Here so that tests can play the hostile co-user. */
#define SLAB_MAGIC 0x42414c53u /* "SLAB" */
#define SLAB_VERSION 1u
#define SLAB_NONE UINT32_MAX
#define SLAB_NCLASSES SHMZ_ALLOC_CLASSES
#define SLAB_NBINS 96u
#define SLAB_EXACT_BINS 64u
#define SLAB_MAX_SPAN_PAGES 16u
#define SLAB_DESC_OFF SHMZ_ZONE_HEADER_SIZE
#define SLAB_MAP_CORRUPT ((void *) 1) /* internal: metadata found inconsistent */

enum {
        SLAB_PD_UNUSED = 0,
        SLAB_PD_FREE,      /* head of a free run */
        SLAB_PD_FREE_TAIL, /* last page of a free run of more than one page */
        SLAB_PD_SLAB,      /* head of a span of one size class */
        SLAB_PD_LARGE,     /* head of a large block */
        SLAB_PD_CONT,      /* other page of a span or large block */
        SLAB_PD_FREE_CONT, /* inside a free run (stale) */
};

struct pdesc {
        uint8_t type;
        uint8_t cls;
        uint16_t nfree;  /* SLAB: free slots */
        uint32_t npages; /* heads: pages of the run */
        uint32_t next;   /* list links, page index or SLAB_NONE */
        uint32_t prev;
        uint32_t head; /* CONT, FREE_TAIL: the head's index */
        uint32_t reserved;
        uint64_t bits; /* SLAB: free-slot bitmap, or the summary of the in-span bitmap */
};
_Static_assert(sizeof(struct pdesc) == 32, "page descriptor size");

struct slab_class_state {
        uint32_t partial; /* first span with free slots */
        uint32_t empty;   /* spans with every slot free */
        uint64_t spans;
        uint64_t used;
        uint64_t reqs;
        uint64_t fails;
};

struct slab_state {
        uint32_t magic;
        uint32_t version;
        uint32_t npages;
        uint32_t busy;       /* an operation is under way (or its process died) */
        uint64_t pages_off;  /* zone offset of page 0 */
        uint64_t intent_off; /* the block that operation is about, 0 = none yet */
        uint64_t free_pages, large_pages, large_used, large_reqs, large_fails;
        uint64_t faults, repairs, last_fault_off;
        int32_t last_fault;
        uint32_t reserved;
        uint64_t bin_mask[2];
        uint32_t bins[SLAB_NBINS];
        struct slab_class_state cls[SLAB_NCLASSES];
};
_Static_assert(sizeof(struct slab_state) <= SHMZ_ZONE_ALLOC_STATE_SIZE, "allocator state fits the header");
