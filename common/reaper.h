/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>

/*
 * Closes fds that another process passed us, in threads that serve nobody.
 *
 * close() of a received fd can block for as long as the sender likes: a file
 * on a FUSE filesystem whose server never answers FLUSH, a socket with
 * SO_LINGER and unsent data (nested in a unix socket's queue too), a tty
 * draining its output. The daemon's workers and the library's ports never
 * close such an fd themselves.
 *
 * Each fd comes with a tag, whose fd it is (the uid of the process that sent
 * it). A tag has at most REAPER_TAG_CLOSING closes running at once, each in a
 * thread of its own (REAPER_THREADS_MAX in all, all signals blocked, never
 * joined): one sender's close that never returns holds up that sender's next
 * fds, nobody else's. The queue is bounded (REAPER_MAX fds held, queued or
 * being closed); callers bound what each tag may make them hold with
 * reaper_held() and refuse that tag past it. A child after fork() starts its
 * own threads.
 */
#define REAPER_MAX 4096u
#define REAPER_THREADS_MAX 8u
#define REAPER_TAG_CLOSING 2u
/* What callers let one tag have held before they refuse it (its connections, its ports). */
#define REAPER_TAG_REFUSE 64u

/* Starts one thread unless one runs: 0 or -errno. */
int reaper_start(void);
/*
 * Takes fd for the threads (one started if every running one is busy and
 * fewer than REAPER_THREADS_MAX run); false if it cannot (REAPER_MAX held, no
 * thread, no memory): fd is still the caller's.
 */
bool reaper_take(int fd, uint32_t tag);
/* Fds of tag held (queued or being closed), and of all tags. */
unsigned reaper_held(uint32_t tag);
unsigned reaper_held_total(void);
/* Tells the threads to end once the queue is empty; never waits for a close that is stuck. */
void reaper_stop(void);
