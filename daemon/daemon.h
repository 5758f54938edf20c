/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdatomic.h>
#include <stdint.h>
#include <systemd/sd-event.h>

struct clients;
struct config;
struct fuse_view;
struct ports;
struct registry;
struct worker;

/* Daemon-wide state. Fields other threads read are atomics or immutable after start. */
struct daemon {
        struct config *cfg;
        const char *config_path;
        struct registry *registry;
        struct ports *ports; /* listeners, ports, segments (core/ports.h); NULL: port requests are refused */
        sd_event *event;     /* the main thread's loop */
        int listen_fd;       /* the workers accept on it (daemon/worker.c) */
        char *socket_path;   /* unlinked at exit when we created it */
        struct worker **workers;
        unsigned n_workers;
        struct fuse_view *fuse;
        uint64_t start_usec;
        struct clients *clients; /* connections per uid and their limits */
        atomic_uint_fast64_t requests, errors;
};
