/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdio.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "clients.h"
#include "daemon.h"
#include "notify.h"
#include "registry.h"
#include "util.h"

static int format_status(struct daemon *d, char *buf, size_t size) {
        struct registry_stats st;
        char problem[sizeof(d->problem) + 2];

        registry_get_stats(d->registry, &st);
        pthread_mutex_lock(&d->problem_lock);
        (void) snprintf(problem, sizeof(problem), "%s%s", d->problem, d->problem[0] ? "; " : "");
        pthread_mutex_unlock(&d->problem_lock);
        return snprintf(buf, size,
                        "STATUS=%s%" PRIu64 " zones, %" PRIu64 " of %" PRIu64 " MiB used, %" PRIu64 " clients", problem,
                        st.zones, st.budget_used >> 20, st.budget >> 20, (uint64_t) clients_count(d->clients));
}

void notify_ready(struct daemon *d) {
        char status[512];

        (void) format_status(d, status, sizeof(status));
        (void) sd_notifyf(false, "READY=1\n%s", status);
}

void notify_reloading(void) {
        /* MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to this signal. */
        (void) sd_notifyf(false, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64 "\nSTATUS=Reloading configuration",
                          now_usec(CLOCK_MONOTONIC));
}

void notify_stopping(void) {
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
}

void notify_status(struct daemon *d) {
        char status[512];

        (void) format_status(d, status, sizeof(status));
        (void) sd_notify(false, status);
}

int notify_fdstore(const char *fdname, int fd) {
        char msg[64 + 256];

        (void) snprintf(msg, sizeof(msg), "FDSTORE=1\nFDNAME=%s", fdname);
        return sd_pid_notify_with_fds(0, false, msg, &fd, 1);
}

int notify_fdstore_remove(const char *fdname) {
        char msg[64 + 256];

        (void) snprintf(msg, sizeof(msg), "FDSTOREREMOVE=1\nFDNAME=%s", fdname);
        return sd_notify(false, msg);
}
