/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Closes the fds that clients pass us, in a thread that serves nobody.
 *
 * close() of a received fd can block for as long as the sender likes: a TCP
 * socket with SO_LINGER and unsent data, a file on a FUSE filesystem whose
 * server never answers FLUSH. Workers never close such an fd themselves. The
 * listening socket refuses fds outright where the kernel can (SO_PASSRIGHTS,
 * Linux 6.16); this is for older kernels, and for fds already in flight.
 */

/* Starts the thread. Before it (or if it could not start), reaper_close() closes in the caller. */
int reaper_start(void);
/* Takes fd; any thread; never blocks on the fd. */
void reaper_close(int fd);
/* Tells the thread to end once its queue is empty; never waits for a close that is stuck. */
void reaper_stop(void);
