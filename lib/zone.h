/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Internal view of a mapped zone, shared by zone.c, slab.c, the daemon and the tests. */

#include <stdbool.h>
#include <stdint.h>

#include "shmzone.h"

struct shmz_client;

struct shmz_zone {
        struct shmz_zone_header *hdr; /* the mapping starts with the header */
        uint64_t map_size;            /* bytes mapped */
        uint64_t size;                /* usable bytes after the header */
        uint64_t handle;              /* the daemon's attachment id, 0 = none */
        struct shmz_client *client;   /* holds a reference; NULL for anonymous zones */
        bool rdonly;
        bool existed;
        char name[SHMZ_NAME_BUF];
};

static inline uint8_t *zone_bytes(const struct shmz_zone *z) {
        return (uint8_t *) z->hdr;
}

/* Writes a fresh header into the first SHMZ_ZONE_HEADER_SIZE bytes of a zone of map_size bytes. */
void zone_header_init(struct shmz_zone_header *h, const char *name, const char *tag, uint64_t map_size, uint32_t uid,
                      uint32_t gid, uint32_t mode, uint64_t generation);

/*
 * Checks a header read from shared memory against what its reader knows (the
 * mapped size and, if not NULL, the name): -EBADMSG if it does not describe this zone.
 */
int zone_header_check(const struct shmz_zone_header *h, uint64_t map_size, const char *name);

/* Bytes of memfd a zone of `size` usable bytes takes; 0 if that overflows. */
uint64_t zone_map_size(uint64_t size);

/*
 * A zone without a daemon: a sealed memfd mapped shared, header formatted. For
 * tests and benchmarks (fork after it to share it between processes).
 */
int zone_new_anonymous(const char *name, uint64_t size, struct shmz_zone **ret);

/* Maps memfd `fd` (size from fstat) and checks its header; does not take fd. */
int zone_map_fd(int fd, bool rdonly, const char *name, struct shmz_zone **ret);
