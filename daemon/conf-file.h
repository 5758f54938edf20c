/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "ports.h"
#include "registry.h"

struct config {
        char *socket_path;
        char *mount_path;              /* NULL: no FUSE view */
        unsigned threads;              /* port worker threads; 0 = number of CPUs, at most 4 */
        struct registry_limits limits; /* memory_budget, uid_quota, uid_max_zones */
        unsigned max_clients;          /* connections at once */
        unsigned uid_max_clients;      /* connections of one uid at once (root: only max_clients) */
        unsigned hello_timeout;        /* seconds a new connection has to say hello */
        struct ports_limits ports;     /* chunk_size, segment_chunks, port_memory, max_ports_per_uid, port_backlog */
        char *state_directory;         /* where zones declared with persist = yes are written */
        unsigned persist_interval;     /* seconds between writes of persisted zones; 0: at stop only */
        struct zone_decl *zones;
        size_t n_zones;
        struct port_decl *port_decls; /* [port NAME]: reserved names */
        size_t n_port_decls;
};

/* The built-in defaults (no file): what the daemon runs with when no config exists. */
int config_new_default(struct config **ret);
/*
 * Parses path over the defaults, as a start or reload does. -EINVAL with
 * *ret_errors (free() it) holding every error found, one "path:line: message"
 * line each, in line order; -ENOENT when the file does not exist.
 */
int config_parse(const char *path, struct config **ret, char **ret_errors);
/* config_parse(), each error logged at err. */
int config_load(const char *path, struct config **ret);
struct config *config_free(struct config *c);
static inline void config_freep(struct config **c) {
        config_free(*c);
}
