/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Applying the zones a config file declares: keep what did not change, create
 * what is new, refuse a changed size or tag (the running zone and its data
 * stay), retire what is no longer declared. Never a silent reset.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include "registry-internal.h"
#include "zone-header.h"

static bool decl_same_acl(const struct zone *z, const struct zone_decl *d) {
        return z->uid == d->uid && z->gid == d->gid && z->mode == d->mode;
}

/* Applies one declaration under the lock; what to log is written to msg (logged once the lock is gone). */
static int apply_decl_locked(struct registry *reg, const struct zone_decl *d, char *msg, size_t size) {
        struct zone *z = registry_lookup(reg, d->name);
        int r;

        assert_locked(reg);
        if (!z) {
                r = registry_create_locked(reg, d->name, d->tag, d->size, d->uid, d->gid, d->mode, true, &z);
                if (r < 0)
                        (void) snprintf(msg, size, "Zone '%s': cannot create it: %s", d->name, strerror(-r));
                else
                        (void) snprintf(msg, size, "Zone '%s': created, %" PRIu64 " bytes.", d->name, z->size);
                return r;
        }
        /*
         * A zone some client made under that name is never adopted: its creator
         * may still hold a writable mapping of what would become the declared zone.
         */
        if (!z->declared) {
                (void) snprintf(msg, size,
                                "Zone '%s': a zone of that name was created by uid %u; not declaring it (remove "
                                "that zone and reload).",
                                d->name, (unsigned) z->charged_uid);
                return -EEXIST;
        }
        if (zone_map_size(d->size) != z->map_size) {
                (void) snprintf(msg, size,
                                "Zone '%s': size changed from %" PRIu64 " to %" PRIu64
                                " bytes; keeping the running zone and its data (remove it to resize).",
                                d->name, z->size, d->size);
                return -EINVAL;
        }
        if (!streq(z->tag, d->tag)) {
                (void) snprintf(msg, size, "Zone '%s': tag changed from '%s' to '%s'; keeping the running zone.",
                                d->name, z->tag, d->tag);
                return -EEXIST;
        }
        if (!decl_same_acl(z, d)) {
                z->uid = d->uid;
                z->gid = d->gid;
                z->mode = d->mode;
                z->ctime_usec = now_usec(CLOCK_REALTIME);
                zone_memory_sync_acl(z);
                registry_changed(reg, REGISTRY_ZONE_CHANGED, z);
                registry_store_sync(reg, z);
                (void) snprintf(msg, size, "Zone '%s': owner %u:%u, mode %04o.", d->name, d->uid, d->gid, d->mode);
        }
        return 0;
}

static bool is_declared_in(const struct zone_decl *decls, size_t n, const char *name) {
        for (size_t i = 0; i < n; i++)
                if (streq(decls[i].name, name))
                        return true;
        return false;
}

int registry_apply_config(struct registry *reg, const struct registry_limits *lim, const struct zone_decl *decls,
                          size_t n_decls, registry_report_t report, void *userdata) {
        _cleanup_free_ struct shmz_msg_zone_info *v = NULL;
        int refused = 0, r;
        size_t n;

        registry_lock(reg);
        reg->budget = lim->budget;
        reg->quota = lim->quota;
        reg->max_zones = lim->max_zones;
        registry_unlock(reg);

        /* One declaration at a time, reporting outside the lock: a slow journal must not stall clients. */
        for (size_t i = 0; i < n_decls; i++) {
                char msg[512] = "";

                registry_lock(reg);
                r = apply_decl_locked(reg, &decls[i], msg, sizeof(msg));
                registry_unlock(reg);
                if (r < 0)
                        refused++;
                if (msg[0])
                        report(userdata, r < 0 ? LOG_ERR : LOG_INFO, msg);
        }

        /* Declared zones that the new config no longer has are retired. */
        r = registry_list(reg, &v, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                struct zone *z;
                unsigned attached = 0;
                char msg[512];

                if (!(v[i].flags & SHMZ_ZONE_INFO_DECLARED) || is_declared_in(decls, n_decls, v[i].name))
                        continue;
                registry_lock(reg);
                z = registry_lookup(reg, v[i].name);
                if (z && z->declared) {
                        attached = z->attached;
                        z->declared = false;
                        registry_unlink_locked(reg, z);
                }
                registry_unlock(reg);
                if (!z)
                        continue;
                (void) snprintf(msg, sizeof(msg),
                                "Zone '%s': no longer declared; retired (freed after its last detach, %u attached).",
                                v[i].name, attached);
                report(userdata, LOG_INFO, msg);
        }
        return refused;
}
