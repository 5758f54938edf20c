/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Zones declared with persist = yes, written to the state directory so that
 * they outlive a stop and a reboot (systemd's fd store does not). One file a
 * zone, <dir>/<name>.zone: a header (identity, creation time, generation, a
 * checksum of the bytes and one of itself), then every byte of the memfd.
 * Written to a temporary file, synced and renamed over the last copy: a crash
 * while writing leaves the previous copy whole.
 *
 * Read back only when the fd store lacks the zone. A copy that is truncated,
 * fails a checksum or does not fit the declaration (size, tag) is refused and
 * renamed aside (<name>.zone.bad-<time>) for the administrator; nothing of it
 * reaches a zone.
 */

#include <stdint.h>

#include "registry.h"
#include "shmzone-abi.h"

/* Whether dir holds a copy of that zone. */
bool persist_exists(const char *dir, const char *name);
/* Writes the zone (its record, its memfd fd) to dir. 0 or -errno (logged). */
int persist_write(const char *dir, const struct shmz_msg_zone_info *info, int fd);
/*
 * Reads the copy of decl's zone: 0 with *ret_fd a sealed zone memfd (header
 * rewritten, lock free, allocator checked and repaired) and its history;
 * -ENOENT if there is none; another -errno if it was refused (logged, kept aside).
 */
int persist_read(const char *dir, const struct zone_decl *decl, int *ret_fd, struct zone_history *ret_hist);
