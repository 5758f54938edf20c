/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

struct clients;
struct config;
struct fuse_view;
struct history;
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
        uint64_t start_usec;          /* CLOCK_MONOTONIC */
        uint64_t start_realtime_usec; /* the same moment, for the metrics' start time */
        struct clients *clients;      /* connections per uid and their limits */
        struct history *history;      /* under systemd: the zones' history record (history.h); store callbacks only */
        atomic_uint_fast64_t requests, errors;
        /* One reload at a time (SIGHUP on the main thread, RELOAD on a worker's); guards cfg. */
        pthread_mutex_t reload_lock;
        pthread_mutex_t problem_lock; /* guards problem (the status line reads it under reload_lock too) */
        /*
         * Not empty while the running config is not the file's: the file was
         * refused at start (degraded: zones kept, built-in defaults) or at the
         * last reload (the previous config runs). Shown in STATUS= and the view.
         */
        char problem[192];
        atomic_bool degraded;
        atomic_uint config_errors; /* errors in the file last refused; 0 once one is applied */
        char *start_errors;        /* the file was refused at start: its errors (run() decides) */
        uint64_t persisted_usec;   /* CLOCK_MONOTONIC of the last persist_interval write (main thread) */
        /*
         * Reads the config file and applies it (main.c; NULL: RELOAD is refused).
         * -EINVAL if the file is refused (nothing changes), with *ret_errors (free()
         * it) holding each error as "path:line: message\n"; *ret_refused counts
         * declarations the registry refused (a changed size or tag: the running
         * zone stays). Any thread.
         */
        int (*reload)(struct daemon *d, char **ret_errors, int *ret_refused);
};
