/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* status (plain text) and metrics (Prometheus text exposition format 0.0.4). */
#include <inttypes.h>
#include <stdio.h>
#include <time.h>

#include "fuse-internal.h"

struct figure {
        const char *name; /* metric name without the shmzone_ prefix */
        const char *type; /* gauge or counter */
        const char *help;
        uint64_t value;
};

int status_text(struct fuse_view *v, bool prometheus, char **ret, size_t *ret_len) {
        _cleanup_free_ struct shmz_msg_zone_info *zi = NULL;
        struct fuse_view_figures fig = {};
        struct ports_stats ps = {};
        struct registry_stats st;
        char *buf = NULL;
        size_t len = 0, n = 0;
        FILE *f;
        int r;

        registry_get_stats(v->registry, &st);
        v->figures(v->figures_data, &fig);
        if (view_ports(v))
                ports_get_stats(view_ports(v), &ps);
        r = registry_list(v->registry, &zi, &n);
        if (r < 0)
                return r;

        const struct figure figs[] = {
                { "zones", "gauge", "Named zones.", st.zones },
                { "zones_unlinked", "gauge", "Zones removed but still attached.", st.zones_unlinked },
                { "memory_budget_bytes", "gauge", "Memory budget for all zones.", st.budget },
                { "memory_used_bytes", "gauge", "Memory taken by zones, headers included.", st.budget_used },
                { "memory_quota_bytes", "gauge", "Memory quota per uid.", st.quota },
                { "clients", "gauge", "Connected clients.", fig.clients },
                { "requests_total", "counter", "Requests served on the control socket.", fig.requests },
                { "errors_total", "counter",
                  "Requests refused or unreadable, and notices that could not apply (shmzoned(8)).", fig.errors },
                { "uptime_seconds", "gauge", "Seconds since the daemon started.", fig.uptime_usec / 1000000u },
                { "listeners", "gauge", "Published port names.", ps.listeners },
                { "ports", "gauge", "Live connections between two processes.", ps.ports },
                { "segments", "gauge", "Shared-memory segments of live ports.", ps.segments },
                { "segment_bytes", "gauge", "Memory of all segments, headers included.", ps.segment_bytes },
                { "chunks", "gauge", "Chunks of all segments.", ps.chunks },
                { "chunks_used", "gauge", "Chunks claimed by a sender and not released yet.", ps.chunks_used },
                { "messages_total", "counter", "Messages sent on ports since start (as their channels count them).",
                  ps.messages },
                { "message_bytes_total", "counter", "Bytes of the messages sent on ports since start.",
                  ps.message_bytes },
                { "ports_closed_total", "counter", "Ports that ended.", ps.ports_closed },
                { "peers_died_total", "counter", "Ports that ended because a process died.", ps.peers_died },
                { "config_degraded", "gauge", "1 while the config file is refused and built-in defaults run.",
                  fig.config_degraded },
                { "config_errors", "gauge", "Errors of the config file last refused; 0 once one is applied.",
                  fig.config_errors },
        };

        f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        /* The version as a label (an "info" metric), the start time for resets: both as Prometheus users expect. */
        if (prometheus)
                fprintf(f,
                        "# HELP shmzone_build_info The daemon's version.\n# TYPE shmzone_build_info gauge\n"
                        "shmzone_build_info{version=\"%s\"} 1\n"
                        "# HELP shmzone_start_time_seconds When the daemon started, seconds since the epoch.\n"
                        "# TYPE shmzone_start_time_seconds gauge\n"
                        "shmzone_start_time_seconds %" PRIu64 ".%06" PRIu64 "\n",
                        PACKAGE_VERSION, fig.start_usec / 1000000u, fig.start_usec % 1000000u);
        else
                fprintf(f, "%-20s %s\n", "version", PACKAGE_VERSION);
        for (size_t i = 0; i < ELEMENTSOF(figs); i++) {
                if (prometheus)
                        fprintf(f, "# HELP shmzone_%s %s\n# TYPE shmzone_%s %s\nshmzone_%s %" PRIu64 "\n", figs[i].name,
                                figs[i].help, figs[i].name, figs[i].type, figs[i].name, figs[i].value);
                else
                        fprintf(f, "%-20s %" PRIu64 "\n", figs[i].name, figs[i].value);
        }
        /* Zone names are [A-Za-z0-9._-]: safe as label values and as words, unquoted. */
        if (prometheus) {
                fputs("# HELP shmzone_zone_size_bytes Usable bytes of a zone.\n"
                      "# TYPE shmzone_zone_size_bytes gauge\n",
                      f);
                for (size_t i = 0; i < n; i++)
                        fprintf(f, "shmzone_zone_size_bytes{zone=\"%s\"} %" PRIu64 "\n", zi[i].name, zi[i].size);
                fputs("# HELP shmzone_zone_attached Clients attached to a zone.\n"
                      "# TYPE shmzone_zone_attached gauge\n",
                      f);
                for (size_t i = 0; i < n; i++)
                        fprintf(f, "shmzone_zone_attached{zone=\"%s\"} %" PRIu32 "\n", zi[i].name, zi[i].attached);
        } else if (n > 0) {
                fprintf(f, "\n%-32s %14s %8s %6s %s\n", "zone", "size", "attached", "mode", "tag");
                for (size_t i = 0; i < n; i++)
                        fprintf(f, "%-32s %14" PRIu64 " %8" PRIu32 " %6.4" PRIo32 " %s\n", zi[i].name, zi[i].size,
                                zi[i].attached, zi[i].mode,
                                (zi[i].flags & SHMZ_ZONE_INFO_PENDING) ? "(pending)" : zi[i].tag);
        }
        if (fclose(f) != 0 || !buf) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        *ret_len = len;
        return 0;
}
