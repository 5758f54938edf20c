/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The self-describing zone header: written by the daemon, checked by everyone who maps a zone. */

#include <stdint.h>

#include "shmzone-abi.h"

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
