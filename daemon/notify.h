/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

struct daemon;

/* sd_notify(3) messages; no-ops when not run by systemd ($NOTIFY_SOCKET unset). */
void notify_ready(struct daemon *d);
void notify_reloading(void);
void notify_stopping(void);
void notify_status(struct daemon *d);
/*
 * systemd's fd store (FDSTORE=1, FDSTOREREMOVE=1): keeps fd under fdname while
 * the service is restarted. 0 or -errno; no-ops without $NOTIFY_SOCKET.
 */
int notify_fdstore(const char *fdname, int fd);
int notify_fdstore_remove(const char *fdname);
