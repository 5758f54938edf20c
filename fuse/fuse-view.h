/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The FUSE view of the registry: its own thread with its own sd_event loop.
 * Started by the main thread after the registry exists; stopped (and
 * unmounted) before the registry is freed.
 *
 *   <mount>/zones/<name>     the zone's usable bytes (offset 0 = first byte after the header)
 *   <mount>/ports/<name>/    a published port name; one read-only file per live connection, named by port id
 *   <mount>/segments/<id>    a segment's bytes (its whole memfd, header included), read-only
 *   <mount>/status, metrics  daemon-wide figures (text, Prometheus)
 *   <mount>/socket           symlink to the control socket (shmz_zone_open_path follows it)
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "shmzone-abi.h"

struct fuse_view;
struct ports;
struct registry;

/* Daemon-wide figures the view shows in status and metrics, besides the registry's own. */
struct fuse_view_figures {
        uint64_t clients;
        uint64_t requests, errors; /* on the control socket, since start */
        uint64_t uptime_usec;
        uint64_t start_usec;      /* CLOCK_REALTIME when the daemon started */
        uint64_t config_degraded; /* 1: the config file was refused at start; zones kept, built-in defaults */
        uint64_t config_errors;   /* errors of the config file last refused (start or reload); 0 once applied */
};

typedef void (*fuse_view_figures_t)(void *userdata, struct fuse_view_figures *ret);

/*
 * Clears a stale mount at mountpoint, mounts, starts the thread. The view
 * serves reg and ports (which must outlive it; ports may be NULL), links <mount>/socket to socket_path, and
 * asks figures() (from its own thread) for what status and metrics show.
 */
int fuse_view_start(struct registry *reg, struct ports *ports, const char *mountpoint, const char *socket_path,
                    fuse_view_figures_t figures, void *figures_data, struct fuse_view **ret);
/* Stops the thread and unmounts. NULL is fine. */
void fuse_view_stop(struct fuse_view *v);
