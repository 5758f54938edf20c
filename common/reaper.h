/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>

/*
 * Closes fds that another process passed us, in a thread that serves nobody.
 *
 * close() of a received fd can block for as long as the sender likes: a TCP
 * socket with SO_LINGER and unsent data, a file on a FUSE filesystem whose
 * server never answers FLUSH. The daemon's workers and the library's ports
 * never close such an fd themselves. One thread per process, all signals
 * blocked, never joined; a child after fork() makes its own.
 */

/* Starts the thread unless it runs: 0 or -errno. */
int reaper_start(void);
/* Takes fd for the thread (started if need be); false if it cannot (no thread, no memory): fd is still the caller's. */
bool reaper_take(int fd);
/* Tells the thread to end once its queue is empty; never waits for a close that is stuck. */
void reaper_stop(void);
