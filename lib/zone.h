/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internal view of a mapped zone, shared by zone.c, slab.c, the daemon and the tests. */

#include <stdbool.h>
#include <stdint.h>

#include "client.h"
#include "shmzone.h"
#include "zone-header.h"

struct shmz_client;

struct shmz_zone {
        struct shmz_zone_header *hdr; /* the mapping starts with the header */
        uint64_t map_size;            /* bytes mapped */
        uint64_t size;                /* usable bytes after the header */
        uint64_t handle;              /* the daemon's attachment id, 0 = none */
        struct shmz_client *client;   /* holds a reference; NULL for anonymous zones */
        int fd;                       /* the memfd, kept to prove this mapping after a daemon restart */
        int reattach_error;           /* 0, or why the daemon refused to count it again after a restart (__atomic) */
        struct client_link link;      /* in client's links (its lock guards handle after the open) */
        bool rdonly;
        bool existed;
        /* The allocator's layout as this process last checked it against map_size (slab.c); 0: not yet. */
        uint32_t slab_npages;
        uint64_t slab_pages_off;
        char name[SHMZ_NAME_BUF];
};

static inline uint8_t *zone_bytes(const struct shmz_zone *z) {
        return (uint8_t *) z->hdr;
}

/*
 * A zone without a daemon: a sealed memfd mapped shared, header formatted. For
 * tests and benchmarks (fork after it to share it between processes).
 */
int zone_new_anonymous(const char *name, uint64_t size, struct shmz_zone **ret);

/* Maps memfd `fd` (size from fstat) and checks its header; does not take fd. */
int zone_map_fd(int fd, bool rdonly, const char *name, struct shmz_zone **ret);
