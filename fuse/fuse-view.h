/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The FUSE view of the registry: its own thread with its own sd_event loop.
 * Started by the main thread after the registry exists; stopped (and
 * unmounted) before the registry is freed.
 *
 *   <mount>/zones/<name>     the zone's usable bytes (offset 0 = first byte after the header)
 *   <mount>/segments/, ports/  empty until ports exist
 *   <mount>/status, metrics  daemon-wide figures (text, Prometheus)
 *   <mount>/socket           symlink to the control socket (shmz_zone_open_path follows it)
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

struct daemon;
struct fuse_view;

/* Clears a stale mount at mountpoint, mounts, starts the thread. */
int fuse_view_start(struct daemon *d, const char *mountpoint, struct fuse_view **ret);
/* Stops the thread and unmounts. NULL is fine. */
void fuse_view_stop(struct fuse_view *v);
