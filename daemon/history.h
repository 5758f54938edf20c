/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The zones' history record: for every zone in systemd's fd store, its inode
 * number, generation, times and tag (struct zone_history), and the numbers the
 * next zones get. A memfd only the daemon holds, kept in the fd store beside
 * the zones (FDNAME=shmz.history), so it lives exactly as long as they do:
 * restart, crash and package upgrade keep both, a stop drops both. The
 * FDNAME keeps the ACL; this keeps what does not fit in 255 characters.
 *
 * One fixed-size entry per zone, each written by one pwrite() within a page
 * (a daemon killed meanwhile leaves it whole) and checksummed all the same: an
 * entry that does not check is ignored (that zone gets new numbers), never
 * trusted. Called by one thread at a time (the registry's store delivers so).
 */

#include <stdbool.h>
#include <stdint.h>

#include "registry.h"

#define HISTORY_FDNAME "shmz.history"

struct history;

/*
 * Takes fd (the record a previous daemon stored; -EBADF: none) or makes a new
 * one. A record that does not check is replaced by a new one (logged). NULL
 * on out of memory or fds.
 */
struct history *history_open(int fd, bool *ret_new);
void history_free(struct history *h);
/* The record's memfd, to store with systemd (owned by h). */
int history_fd(struct history *h);
/* The entry of that zone name, if one checks: 0 or -ENOENT. */
int history_lookup(struct history *h, const char *name, struct zone_history *ret);
/* What the last run's next zone would have had (0 if no record said). */
void history_next(struct history *h, uint64_t *ret_ino, uint64_t *ret_generation);
/* Records (or rewrites) the entry of id->name from id->hist. 0 or -errno. */
int history_put(struct history *h, const struct zone_identity *id);
/* Drops the entry of that name, if any. */
void history_drop(struct history *h, const char *name);
/* Drops every entry whose name keep() refuses (zones no longer in the store). */
void history_retain(struct history *h, bool (*keep)(const char *name, void *userdata), void *userdata);
